"""HD dynamic partition of an image into 560×560 tiles (docs/IXC25.md#hd-transform), as uint8 arrays.

Two styles, both from the official code:
  train  the fine-tuning transform (`R560_HD18_Identity_transform`): width capped at 1.5× the
         source width, the resized image centred vertically in white padding (default);
  infer  the model's inference transform (`Image_transform`): width capped at 1× the source
         width, white padding at the bottom only.

The arithmetic deliberately repeats the official float expressions (`scale / ratio`,
`int(new_w / ratio)`): an exact integer formula would differ at rare rounding boundaries.

Shapes: `hd_transform` returns the padded image uint8[H, W, 3] with H = rows·560, W = cols·560;
`to_tiles` cuts it into uint8[N_tiles, 560, 560, 3], row-major. Normalisation with the CLIP
mean/std and the bicubic global view happen on the trainer side (GPU), from these exact bytes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from schemas.sample import STYLES, TILE_SIZE, Style

DEFAULT_HD_NUM = 18
TRAIN_WIDTH_CAP = 1.5
"""The fine-tuning transform lets an image grow to 1.5× its width (inference: 1×)."""
PAD_FILL = (255, 255, 255)
# Not used here (normalisation happens on the GPU) but part of the transform's definition.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check(hd_num: int, style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown HD style {style!r} (expected one of {', '.join(STYLES)})")
    if hd_num < 1:
        raise ValueError(f"hd_num must be >= 1, got {hd_num}")


def _resized_size(width: int, height: int, hd_num: int, style: Style) -> tuple[int, int, bool]:
    """(new_w, new_h, transposed) of the resize step, in the landscape (transposed) frame."""
    _check(hd_num, style)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    cap = TRAIN_WIDTH_CAP if style == "train" else 1.0
    scale = min(math.ceil(width * cap / TILE_SIZE), scale)
    new_w = int(scale * TILE_SIZE)
    # Upstream crashes on a zero height (ratio > new_w); one pixel is the sane limit.
    new_h = max(1, int(new_w / ratio))
    return new_w, new_h, transposed


def hd_size(width: int, height: int, hd_num: int = DEFAULT_HD_NUM, style: Style = "train") -> tuple[int, int]:
    """(W, H) of the resized and padded image, from the source size alone."""
    new_w, new_h, transposed = _resized_size(width, height, hd_num, style)
    padded_h = math.ceil(new_h / TILE_SIZE) * TILE_SIZE
    return (padded_h, new_w) if transposed else (new_w, padded_h)


def hd_grid(width: int, height: int, hd_num: int = DEFAULT_HD_NUM, style: Style = "train") -> tuple[int, int]:
    """(rows, cols) of 560-px tiles for a source image of `width`×`height` (header size suffices)."""
    out_w, out_h = hd_size(width, height, hd_num, style)
    return out_h // TILE_SIZE, out_w // TILE_SIZE


def hd_transform(img: Image.Image, hd_num: int = DEFAULT_HD_NUM, style: Style = "train") -> np.ndarray:
    """Resize and pad an RGB image as the official transform does → uint8[H, W, 3]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    new_w, new_h, transposed = _resized_size(img.width, img.height, hd_num, style)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    # torchvision's resize of a PIL image is PIL's bilinear resize (antialiased on downscale).
    resized = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / TILE_SIZE) * TILE_SIZE
    top = (padded_h - new_h) // 2 if style == "train" else 0
    canvas = Image.new("RGB", (new_w, padded_h), PAD_FILL)
    canvas.paste(resized, (0, top))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return np.asarray(canvas, dtype=np.uint8)


def to_tiles(padded: np.ndarray) -> np.ndarray:
    """uint8[rows·560, cols·560, 3] → uint8[rows·cols, 560, 560, 3], tiles in row-major order."""
    height, width, channels = padded.shape
    assert height % TILE_SIZE == 0 and width % TILE_SIZE == 0 and channels == 3, padded.shape
    rows, cols = height // TILE_SIZE, width // TILE_SIZE
    tiles = padded.reshape(rows, TILE_SIZE, cols, TILE_SIZE, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(tiles.reshape(rows * cols, TILE_SIZE, TILE_SIZE, 3))


def grid_of(padded: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of a padded image."""
    return padded.shape[0] // TILE_SIZE, padded.shape[1] // TILE_SIZE
