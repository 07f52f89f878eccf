"""One validated record → one training `Sample` (template + tiling + video): what a shard worker runs.

Grids come first, from image headers and video metadata, so the template can truncate before any
pixel is decoded: images cut away by `max_length` are never decoded or tiled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, load_rgb, probe_image_size
from pipeline.media_probe import MediaProbe, media_grid
from pipeline.template import DEFAULT_MAX_LENGTH, TokenizerLike, render_conversation
from pipeline.tiling import DEFAULT_HD_NUM, grid_of, hd_transform, to_tiles
from pipeline.video import video_grid, video_strip
from schemas.record import Record, is_video_path
from schemas.sample import TILE_SIZE, ImageSpan, Layout, Sample, Style


def header_probe(path: Path, *, is_video: bool, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> MediaProbe:
    """What the image header or the video metadata says, without decoding pixels (DataError if unreadable)."""
    if is_video:
        return MediaProbe("video", grid=video_grid(path))
    return MediaProbe("image", size=probe_image_size(path, max_pixels))


def media_padded(
    path: Path,
    *,
    is_video: bool,
    hd_num: int,
    style: Style,
    font_path: str | Path | None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """The resized, white-padded image (or video strip), uint8[rows·560, cols·560, 3]."""
    if is_video:
        return video_strip(path, font_path)
    return hd_transform(load_rgb(path, max_pixels), hd_num, style)


def build_sample(
    record: Record,
    tokenizer: TokenizerLike,
    *,
    source_name: str,
    file: str,
    index: int,
    hd_num: int = DEFAULT_HD_NUM,
    style: Style = "train",
    layout: Layout = "official",
    max_length: int = DEFAULT_MAX_LENGTH,
    font_path: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Sample:
    """Tokenize and tile one record; raises `DataError` for bad data (missing media, too long...)."""
    videos = [is_video_path(m) for m in record.media]
    grids = [
        media_grid(header_probe(p, is_video=v, max_pixels=max_image_pixels), hd_num, style)
        for p, v in zip(record.media_paths, videos, strict=True)
    ]
    rendered = render_conversation(record.turns, grids, tokenizer, layout=layout, max_length=max_length)

    tiles: list[np.ndarray] = []
    for k, grid in enumerate(rendered.grids):
        path = record.media_paths[k]
        padded = media_padded(
            path,
            is_video=videos[k],
            hd_num=hd_num,
            style=style,
            font_path=font_path,
            max_pixels=max_image_pixels,
        )
        if grid_of(padded) != grid:  # a header that lies about the pixel size
            raise DataError(
                "media_size_mismatch",
                f"{path}: decoded to a {grid_of(padded)} tile grid, its header promised {grid}",
                hint="re-save the file so its header matches its pixels",
            )
        tiles.append(to_tiles(padded))

    extra: dict[str, int | bool] = {}
    if rendered.truncated:
        extra = {
            "truncated": True,
            "full_length": rendered.full_length,
            "dropped_images": rendered.dropped_images,
        }
    sample = Sample(
        input_ids=rendered.input_ids,
        labels=rendered.labels,
        images=[ImageSpan(grid=g, span=s) for g, s in zip(rendered.grids, rendered.spans, strict=True)],
        tiles=np.concatenate(tiles) if tiles else np.zeros((0, TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8),
        source=source_name,
        file=file,
        index=index,
        id=record.id,
        layout=layout,
        extra=extra,
    )
    sample.check()
    return sample
