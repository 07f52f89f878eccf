"""GPU side of images: uint8 tiles from the shards -> normalized ViT inputs, and the global views.

The shards hold each image's padded HD canvas cut into 560×560 uint8 tiles (docs/IXC25.md#hd-transform). What the
official transform does after that is done here, on the device the tiles are sent to:
  - CLIP normalization of every tile (`normalize_tiles`), in fp32, then cast to the model dtype;
  - the GLOBAL view of each image (`global_views`): the tiles reassembled into the padded canvas,
    normalized, and bicubic-resized to 560×560 (align_corners=False, no antialias, aspect not
    kept), exactly the official `F.interpolate(img.float(), (560, 560), mode='bicubic')`.

Shapes: tiles uint8[N, 560, 560, 3] (all local tiles of all images, image by image, row-major
within an image); grids (rows, cols) per image, sum(rows·cols) == N; outputs float[*, 3, 560, 560].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from schemas.sample import TILE_SIZE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8[..., H, W, 3] -> fp32[..., 3, H, W] as torchvision's ToTensor + Normalize compute it."""
    x = pixels.movedim(-1, -3).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.sub(mean).div(std)


def normalize_tiles(tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8[N, 560, 560, 3] -> dtype[N, 3, 560, 560], CLIP-normalized (computed in fp32)."""
    _check_tiles(tiles)
    return _normalize(tiles).to(dtype)


def global_views(
    tiles: torch.Tensor, grids: Sequence[tuple[int, int]] | torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8[N, 560, 560, 3] + I grids -> dtype[I, 3, 560, 560]: each image's bicubic global view."""
    _check_tiles(tiles)
    grid_list = [(int(r), int(c)) for r, c in (grids.tolist() if isinstance(grids, torch.Tensor) else grids)]
    total = sum(r * c for r, c in grid_list)
    if total != tiles.shape[0]:
        raise ValueError(f"grids {grid_list} cover {total} tiles but {tiles.shape[0]} were given")
    views = []
    offset = 0
    for rows, cols in grid_list:
        own = tiles[offset : offset + rows * cols]
        offset += rows * cols
        # (rows·cols, 560, 560, 3) -> the padded canvas (rows·560, cols·560, 3), row-major tiles.
        canvas = own.view(rows, cols, TILE_SIZE, TILE_SIZE, 3).permute(0, 2, 1, 3, 4)
        canvas = canvas.reshape(rows * TILE_SIZE, cols * TILE_SIZE, 3)
        image = _normalize(canvas).unsqueeze(0)
        view = F.interpolate(
            image, size=(TILE_SIZE, TILE_SIZE), mode="bicubic", align_corners=False, antialias=False
        )
        views.append(view[0].to(dtype))
    if not views:
        return torch.empty(0, 3, TILE_SIZE, TILE_SIZE, dtype=dtype, device=tiles.device)
    return torch.stack(views)


def _check_tiles(tiles: torch.Tensor) -> None:
    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tuple(tiles.shape[1:]) != (TILE_SIZE, TILE_SIZE, 3):
        raise ValueError(
            f"tiles must be uint8[N, {TILE_SIZE}, {TILE_SIZE}, 3] (as stored in the shards), "
            f"got {str(tiles.dtype).removeprefix('torch.')}{list(tiles.shape)}"
        )
