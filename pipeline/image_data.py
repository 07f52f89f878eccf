"""Whether an image file holds the pixel data its header promises (a truncated image is corrupt).

Pillow refuses most truncated files itself (`image file is truncated`, with LOAD_TRUNCATED_IMAGES
off): GIF, BMP, TIFF, PPM, WebP and ICO, and any PNG or JPEG cut short. Two forms pass its
decoders, because the compressed stream ends cleanly before the last pixel and the rest of the
image is left blank: a PNG whose zlib stream ends early (black rows), and a JPEG closed by an EOI
marker mid-scan (libjpeg fills the missing blocks with grey and Pillow does not report it). Here:

- `too_little_data(path, im)`, from the header and the file size, before any pixel is decoded: a
  PNG or JPEG smaller than the least its pixel count can compress to (deflate stores at most 1,032
  bytes per byte; a Huffman-coded JPEG spends at least 1 bit per 8×8 block) is refused, whatever it
  claims. This is what stops a few-KB file that claims a 13,000² image from costing a full decode.
- `png_short_stream(path)`, before decoding: the PNG's image data (its IDAT chunks), inflated in
  bounded pieces, must hold every scanline the header promises.

A JPEG cut mid-scan and re-closed with EOI but still holding more than 1 bit per block is not
detected (only libjpeg's warning tells, and Pillow drops it).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from PIL import Image

DEFLATE_MAX_RATIO = 1032
"""Deflate's best case: a 258-byte match coded in 2 bits (a 1-bit length and a 1-bit distance code)."""
JPEG_MIN_BITS_PER_BLOCK = 1
"""Each 8×8 block of a Huffman-coded JPEG costs at least a 1-bit DC code (a flat grey image encoded
with optimized tables measures 2 bits per block)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type (grey, RGB, palette, grey+alpha, RGBA)."""
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""Interlace passes as (x0, y0, dx, dy)."""
INFLATE_PIECE = 1 << 20
"""Inflate at most this many bytes at a time: the check holds no more than that of the image."""


def too_little_data(path: Path, im: Image.Image) -> str | None:
    """Why the file is too small for the image its header describes, or None (header and size only)."""
    width, height = im.size
    if im.format == "PNG":
        # 1 bit per pixel is the least any PNG colour type stores, plus one filter byte per row
        least = height * (1 + math.ceil(width / 8)) // DEFLATE_MAX_RATIO
        why = f"a {width}×{height} PNG takes at least {least:,} bytes even at deflate's best compression"
    elif im.format in ("JPEG", "MPO"):
        least = math.ceil(width / 8) * math.ceil(height / 8) * JPEG_MIN_BITS_PER_BLOCK // 8
        why = f"a {width}×{height} JPEG takes at least {least:,} bytes (1 bit per 8×8 block)"
    else:
        return None
    size = path.stat().st_size
    if size >= least:
        return None
    return f"the file holds {size:,} bytes, but {why}: it is truncated or its header lies"


def png_short_stream(path: Path) -> str | None:
    """Why the PNG's image data does not hold every row its header promises, or None.

    Walks the chunks, inflates the IDAT data in pieces of at most INFLATE_PIECE bytes and counts
    the bytes against the scanline size the header gives (interlaced images per Adam7 pass).
    """
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return "it does not start with the PNG signature"
        inflater = zlib.decompressobj()
        expected: int | None = None
        produced = 0
        seen_idat = False
        while True:
            head = f.read(8)
            if len(head) < 8:
                break  # no IEND: the file ends inside the image data
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IHDR":
                ihdr = f.read(length)
                if len(ihdr) < 13:
                    return "its IHDR chunk is damaged"
                expected = _png_data_bytes(ihdr)
                f.seek(4, 1)  # CRC
                continue
            if kind != b"IDAT":
                if seen_idat:
                    break  # the image data is one run of IDAT chunks
                f.seek(length + 4, 1)
                continue
            if expected is None:
                return "its image data comes before its IHDR chunk"
            seen_idat = True
            left = length
            while left:
                piece = f.read(min(left, INFLATE_PIECE))
                if not piece:
                    break
                left -= len(piece)
                try:
                    produced += _inflated_size(inflater, piece)
                except zlib.error as e:
                    return f"its image data does not inflate ({e})"
                if produced >= expected:
                    return None  # every row is there; what follows is Pillow's to judge
            f.seek(left + 4, 1)
    if expected is None:
        return "it has no IHDR chunk"
    return (
        f"its image data ends after {produced:,} of the {expected:,} bytes its header promises "
        f"({100 * produced / max(1, expected):.0f}%): the file is truncated"
    )


def _inflated_size(inflater: zlib._Decompress, data: bytes) -> int:
    """Bytes `data` inflates to, never holding more than INFLATE_PIECE of them at once."""
    total = len(inflater.decompress(data, INFLATE_PIECE))
    while inflater.unconsumed_tail:
        total += len(inflater.decompress(inflater.unconsumed_tail, INFLATE_PIECE))
    return total


def _png_data_bytes(ihdr: bytes) -> int:
    """Inflated size of a PNG's image data: one filter byte plus the packed samples per row."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    bits = depth * PNG_CHANNELS.get(colour, 1)
    if not interlace:
        return height * (1 + math.ceil(width * bits / 8))
    total = 0
    for x0, y0, dx, dy in ADAM7:
        cols = max(0, math.ceil((width - x0) / dx))
        rows = max(0, math.ceil((height - y0) / dy))
        if cols and rows:
            total += rows * (1 + math.ceil(cols * bits / 8))
    return total
