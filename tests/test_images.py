"""GPU-side image preparation: CLIP normalization and the bicubic global view against the golden vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.images import CLIP_MEAN, CLIP_STD, global_views, normalize_tiles


def _tiles_of(canvas: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w, _ = canvas.shape
    rows, cols = h // 560, w // 560
    tiles = torch.from_numpy(canvas.copy()).view(rows, 560, cols, 560, 3).permute(0, 2, 1, 3, 4)
    return tiles.reshape(-1, 560, 560, 3).contiguous(), (rows, cols)


def test_global_view_matches_golden(ixc_dir: Path) -> None:
    golden = ixc_dir / "golden" / "hd"
    canvas = np.asarray(Image.open(golden / "upstream__panda__hd18_train.png").convert("RGB"))
    tiles, grid = _tiles_of(canvas)
    view = global_views(tiles, [grid])
    expected = np.load(golden / "panda__hd18_train__global_view.npy")
    assert view.shape == (1, 3, 560, 560)
    assert np.abs(view[0].numpy() - expected).max() < 1e-4


def test_global_view_of_a_multi_tile_canvas_is_the_resized_whole(ixc_dir: Path) -> None:
    canvas = np.asarray(
        Image.open(ixc_dir / "golden" / "hd" / "synthetic__4000x500__hd18_train.png").convert("RGB")
    )
    tiles, grid = _tiles_of(canvas)
    assert grid[0] * grid[1] > 1
    x = torch.from_numpy(canvas.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = F.interpolate(x[None], size=(560, 560), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(global_views(tiles, [grid])[0], expected, atol=1e-5, rtol=0)


def test_normalize_tiles_is_clip_normalization() -> None:
    tiles = torch.randint(0, 256, (2, 560, 560, 3), dtype=torch.uint8)
    out = normalize_tiles(tiles, torch.bfloat16)
    assert out.shape == (2, 3, 560, 560) and out.dtype == torch.bfloat16
    ref = (tiles[1, 7, 9].float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[1, :, 7, 9].float(), ref, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="uint8"):
        normalize_tiles(tiles.float())
    with pytest.raises(ValueError, match="cover 1 tiles but 2"):
        global_views(tiles, [(1, 1)])
