"""Video to one tiled image strip, as the IXC2.5 model's video path does (docs/IXC25.md#video).

1. Frames: decord (or PyAV where decord is not installed, same frames: pipeline/video_decoders.py),
   one per second (stride round(fps) from frame 0); more than 32 → 32 of them at
   `int(i * n / 33)`.
2. Layout: each frame resized so its long side is 1120. Landscape frames are stacked vertically,
   portrait (and square) ones side by side, each under a 40-px band labelled `<IMAGE i>`, with a
   2-px black line between frames, on a white canvas.
3. Strip transform: the canvas resized so its short side is 560, the long side padded with white
   at its end to a multiple of 560: a 1×N or N×1 grid of tiles, tiled like any image.

The official code downloads the SimHei font at run time; we take a font path and fall back to the
font bundled with Pillow, so the `<IMAGE i>` label pixels differ but every size and grid is equal.
The resizes repeat the official transposes: PIL resamples horizontally then vertically with 8-bit
rounding in between, so a transposed resize is not byte-equal to a direct one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.video_decoders import Decoder, VideoInfo, open_video
from schemas.sample import TILE_SIZE

MAX_FRAMES = 32
FRAME_LONG_SIDE = 1120
LABEL_BAND = 40
"""Height of the `<IMAGE i>` label band above each frame."""
FRAME_GAP = 10
"""Space after each frame; the separator line sits in its middle."""
LINE_WIDTH = 2
FONT_SIZE = 40
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


# ---------------------------------------------------------------- reading


def probe_video(path: Path, decoder: Decoder | None = None) -> VideoInfo:
    """Frame count, fps and frame size, decoding at most the first frame."""
    return open_video(path, decoder).info()


def sample_frame_indices(num_frames: int, fps: float) -> list[int]:
    """Indices of the frames the model sees: one per second from 0, at most 32 spread evenly."""
    # Upstream crashes on fps < 0.5 (stride 0); one frame per decoded frame is the sane limit.
    stride = max(1, int(round(float(fps))))
    positions = list(range(0, num_frames, stride))
    if len(positions) > MAX_FRAMES:
        step = len(positions) / (MAX_FRAMES + 1)
        positions = [positions[int(i * step)] for i in range(MAX_FRAMES)]
    return positions


def read_frames(path: Path, decoder: Decoder | None = None) -> list[np.ndarray]:
    """The sampled frames, uint8[h, w, 3] RGB each (decord if installed, else PyAV: the same frames)."""
    reader = open_video(path, decoder)
    info = reader.info()
    return reader.frames(sample_frame_indices(info.frames, info.fps))


# ---------------------------------------------------------------- layout (sizes)


def _frame_size(width: int, height: int) -> tuple[int, int]:
    """Frame size after scaling its long side to 1120 (official float expressions).

    Upstream crashes when the short side scales below one pixel (an aspect ratio over 1120:1);
    one pixel is the sane limit, as in tiling.
    """
    scale = width / height
    if width > height:
        return FRAME_LONG_SIDE, max(1, int(FRAME_LONG_SIDE / scale))
    return max(1, int(FRAME_LONG_SIDE * scale)), FRAME_LONG_SIDE


def _canvas_size(num_frames: int, width: int, height: int) -> tuple[int, int]:
    frame_w, frame_h = _frame_size(width, height)
    if width > height:  # stacked vertically
        return frame_w, num_frames * (frame_h + FRAME_GAP + LABEL_BAND)
    return num_frames * (frame_w + FRAME_GAP), frame_h + LABEL_BAND


def _strip_size(canvas_w: int, canvas_h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized w, h), (padded w, h)) of the strip transform, short side 560."""
    long_side, short_side = max(canvas_w, canvas_h), min(canvas_w, canvas_h)
    new_long = int(TILE_SIZE * (long_side / short_side))
    padded_long = math.ceil(new_long / TILE_SIZE) * TILE_SIZE
    if canvas_w < canvas_h:
        return (TILE_SIZE, new_long), (TILE_SIZE, padded_long)
    return (new_long, TILE_SIZE), (padded_long, TILE_SIZE)


def video_grid(path: Path) -> tuple[int, int]:
    """(rows, cols) of the video's strip, from its metadata (one frame decoded)."""
    return strip_grid(probe_video(path))


def strip_grid(info: VideoInfo) -> tuple[int, int]:
    """(rows, cols) of the strip of a video with this metadata."""
    num_frames = len(sample_frame_indices(info.frames, info.fps))
    _, (padded_w, padded_h) = _strip_size(*_canvas_size(num_frames, info.width, info.height))
    return padded_h // TILE_SIZE, padded_w // TILE_SIZE


# ---------------------------------------------------------------- layout (pixels)


def load_font(font_path: str | Path | None = None, size: int = FONT_SIZE) -> Font:
    """The label font: a TrueType file if given, else the font bundled with Pillow."""
    if font_path is None:
        return ImageFont.load_default(size=size)
    try:
        return ImageFont.truetype(str(font_path), size=size)
    except OSError as e:
        raise ValueError(f"font {font_path}: cannot load it as a TrueType/OpenType font ({e})") from e


def frames_to_canvas(frames: list[np.ndarray], font: Font) -> Image.Image:
    """Lay the frames out with their `<IMAGE i>` labels, as the official `frame2img`."""
    assert frames, "no frames to lay out"
    height, width = frames[0].shape[:2]
    frame_w, frame_h = _frame_size(width, height)
    images = [Image.fromarray(f).resize((frame_w, frame_h), Image.Resampling.BILINEAR) for f in frames]
    canvas = Image.new("RGB", _canvas_size(len(frames), width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    last = len(images) - 1
    if width > height:
        slot_h = frame_h + FRAME_GAP + LABEL_BAND
        for i, im in enumerate(images):
            top = i * slot_h
            canvas.paste(im, (0, top + LABEL_BAND))
            draw.text((0, top), f"<IMAGE {i}>", font=font, fill=BLACK)
            if i < last:
                y = top + LABEL_BAND + frame_h + FRAME_GAP // 2
                draw.line([(0, y), (canvas.width, y)], fill=BLACK, width=LINE_WIDTH)
    else:
        slot_w = frame_w + FRAME_GAP
        for i, im in enumerate(images):
            left = i * slot_w
            canvas.paste(im, (left, LABEL_BAND))
            draw.text((left, 0), f"<IMAGE {i}>", font=font, fill=BLACK)
            if i < last:
                x = left + frame_w + FRAME_GAP // 2
                draw.line([(x, 0), (x, canvas.height)], fill=BLACK, width=LINE_WIDTH)
    return canvas


def strip_transform(canvas: Image.Image) -> np.ndarray:
    """Short side to 560, long side padded with white at its end → uint8[H, W, 3]."""
    (new_w, new_h), (padded_w, padded_h) = _strip_size(canvas.width, canvas.height)
    # Upstream transposes a tall canvas to landscape, resizes, and transposes back.
    if canvas.width < canvas.height:
        resized = (
            canvas.transpose(Image.Transpose.TRANSPOSE)
            .resize((new_h, new_w), Image.Resampling.BILINEAR)
            .transpose(Image.Transpose.TRANSPOSE)
        )
    else:
        resized = canvas.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded = Image.new("RGB", (padded_w, padded_h), WHITE)
    padded.paste(resized, (0, 0))
    return np.asarray(padded, dtype=np.uint8)


def video_strip(path: Path, font_path: str | Path | None = None) -> np.ndarray:
    """The padded strip image of a video, uint8[H, W, 3] with H, W multiples of 560."""
    frames = read_frames(path)
    return strip_transform(frames_to_canvas(frames, load_font(font_path)))
