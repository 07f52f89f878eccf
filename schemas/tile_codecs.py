"""Tile codecs: how a shard stores each uint8[560, 560, 3] tile (the fingerprint's `tile_codec`).

  raw   the 940,800 pixel bytes as they are: exact, nothing to decode (the default)
  webp  WebP lossless (libwebp through Pillow, fastest method): exact, several times smaller
  jpeg  baseline JPEG, 4:2:0 chroma, optimized Huffman tables, at the fingerprint's `jpeg_quality`
        (libjpeg-turbo through Pillow): lossy, close to the source JPEG's size

560 is a multiple of the 16-pixel macroblock of 4:2:0 JPEG, so every tile is a whole number of
blocks and is encoded on its own: no tile depends on another. docs/PERFORMANCE.md#tile-codecs gives
the sizes, speeds and the JPEG error on photos.

A sample's tiles are one Arrow binary array: the `raw` codec hands the tiles' own memory to Arrow
(no copy). Decoding (loader worker processes, on the CPU) opens only the format the codec names.
"""

from __future__ import annotations

import io
from typing import Literal, get_args

import numpy as np
import pyarrow as pa

from schemas.sample import TILE_SIZE

TILE_BYTES = TILE_SIZE * TILE_SIZE * 3
TileCodec = Literal["raw", "webp", "jpeg"]
TILE_CODECS: tuple[TileCodec, ...] = get_args(TileCodec)
DEFAULT_JPEG_QUALITY = 83
"""The `jpeg` codec's quality when none is given (docs/PERFORMANCE.md#tile-codecs: why this one)."""
JPEG_QUALITY_RANGE = (1, 100)
JPEG_SUBSAMPLING = 2
"""Pillow's code for 4:2:0 chroma subsampling."""
WEBP_METHOD = 0
"""libwebp's effort, 0 (fastest) to 6: more effort stores a few per cent less, at many times the time."""
WEBP_QUALITY = 0
"""In lossless mode WebP's quality is effort, not fidelity: 0 is the fastest."""
PIL_FORMAT = {"webp": "WEBP", "jpeg": "JPEG"}
"""The only format Pillow may detect when decoding a codec's tile."""


def check_codec(codec: str, jpeg_quality: int | None) -> None:
    """Raise ValueError for an unknown codec or a quality that does not belong to it."""
    if codec not in TILE_CODECS:
        raise ValueError(f"unknown tile codec {codec!r} (expected one of {', '.join(TILE_CODECS)})")
    if codec == "jpeg":
        low, high = JPEG_QUALITY_RANGE
        if jpeg_quality is None or not low <= jpeg_quality <= high:
            raise ValueError(f"jpeg quality {jpeg_quality!r} must be an integer in [{low}, {high}]")
    elif jpeg_quality is not None:
        raise ValueError(f"a jpeg quality ({jpeg_quality}) is only for the jpeg codec, not {codec!r}")


def _pil_bytes(tile: np.ndarray, codec: str, jpeg_quality: int | None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(tile, "RGB")
    if codec == "jpeg":
        image.save(buf, "JPEG", quality=jpeg_quality, subsampling=JPEG_SUBSAMPLING, optimize=True)
    else:
        image.save(buf, "WEBP", lossless=True, quality=WEBP_QUALITY, method=WEBP_METHOD)
    return buf.getvalue()


def encode_tiles(tiles: np.ndarray, codec: str, jpeg_quality: int | None = None) -> pa.BinaryArray:
    """uint8[N, 560, 560, 3] -> a binary array of N encoded tiles."""
    assert tiles.dtype == np.uint8 and tiles.shape[1:] == (TILE_SIZE, TILE_SIZE, 3), tiles.shape
    check_codec(codec, jpeg_quality)
    if codec == "raw":
        data = pa.py_buffer(np.ascontiguousarray(tiles))  # the tiles' own memory
        offsets = pa.py_buffer(np.arange(len(tiles) + 1, dtype=np.int32) * TILE_BYTES)
        return pa.BinaryArray.from_buffers(pa.binary(), len(tiles), [None, offsets, data])
    return pa.array([_pil_bytes(t, codec, jpeg_quality) for t in tiles], type=pa.binary())


def decode_tiles(encoded: pa.BinaryArray, codec: str) -> np.ndarray:
    """A binary array of N encoded tiles -> uint8[N, 560, 560, 3] (ValueError if a tile is not one)."""
    out = np.empty((len(encoded), TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
    for i in range(len(encoded)):
        data = encoded[i].as_buffer()
        if codec == "raw":
            if data.size != TILE_BYTES:
                raise ValueError(f"raw tile {i} has {data.size} bytes, expected {TILE_BYTES}")
            out[i] = np.frombuffer(data, dtype=np.uint8).reshape(TILE_SIZE, TILE_SIZE, 3)
        elif codec in PIL_FORMAT:
            out[i] = _pil_decode(data, codec, i)
        else:
            raise ValueError(f"unknown tile codec {codec!r} (expected one of {', '.join(TILE_CODECS)})")
    return out


def _pil_decode(data: pa.Buffer, codec: str, i: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=[PIL_FORMAT[codec]]) as image:
        if image.size != (TILE_SIZE, TILE_SIZE):  # from the header, before decoding
            raise ValueError(
                f"{codec} tile {i} is {image.size[0]}×{image.size[1]}, expected {TILE_SIZE}×{TILE_SIZE}"
            )
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
