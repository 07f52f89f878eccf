"""Lab (issue 24): candidate tile codecs on real photos at hd 18 — bytes, encode and decode speed, error.

Not product code: a one-way experiment, deleted once the codecs are chosen (its numbers are in
dev/LOG.md). Photos: bench/prep_throughput.py's scikit-image JPEGs (0.3–2 MP, quality 90); tiles:
the product's HD transform. Bytes are per image, divided by that image's source JPEG bytes.

    PYTHONPATH=. python dev/tile_codec_lab.py --work /tmp/codec-lab
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.prep_throughput import make_photos  # noqa: E402
from pipeline.media import load_rgb  # noqa: E402
from pipeline.tiling import hd_transform, to_tiles  # noqa: E402

TILE = 560
TILE_BYTES = TILE * TILE * 3


def pil_encode(fmt: str, **kw: object) -> Callable[[np.ndarray], bytes]:
    def enc(tile: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(tile, "RGB").save(buf, format=fmt, **kw)
        return buf.getvalue()

    return enc


def pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def zstd_codec(level: int, delta: bool, axis: int = 1) -> tuple[Callable, Callable]:
    codec = pa.Codec("zstd", compression_level=level)

    def enc(tile: np.ndarray) -> bytes:
        a = tile
        if delta:  # PNG's Sub (axis 1) or Up (axis 0) filter: each byte minus its left/upper neighbour
            a = np.diff(tile, axis=axis, prepend=np.zeros_like(tile[:1] if axis == 0 else tile[:, :1]))
        return codec.compress(np.ascontiguousarray(a).tobytes(), asbytes=True)

    def dec(data: bytes) -> np.ndarray:
        flat = np.frombuffer(codec.decompress(data, TILE_BYTES), dtype=np.uint8).reshape(TILE, TILE, 3)
        if delta:
            return np.cumsum(flat, axis=axis, dtype=np.uint8)
        return flat

    return enc, dec


def lz4_codec() -> tuple[Callable, Callable]:
    codec = pa.Codec("lz4")

    def enc(tile: np.ndarray) -> bytes:
        return codec.compress(tile.tobytes(), asbytes=True)

    def dec(data: bytes) -> np.ndarray:
        return np.frombuffer(codec.decompress(data, TILE_BYTES), dtype=np.uint8).reshape(TILE, TILE, 3)

    return enc, dec


def candidates() -> dict[str, tuple[Callable, Callable, bool]]:
    """name -> (encode, decode, lossless)."""
    raw = (lambda t: t.tobytes(), lambda d: np.frombuffer(d, np.uint8).reshape(TILE, TILE, 3), True)
    out = {
        "raw": raw,
        "lz4": (*lz4_codec(), True),
        "zstd1": (*zstd_codec(1, False), True),
        "zstd3": (*zstd_codec(3, False), True),
        "delta+zstd1": (*zstd_codec(1, True), True),
        "delta+zstd3": (*zstd_codec(3, True), True),
        "up+zstd1": (*zstd_codec(1, True, axis=0), True),
        "up+zstd3": (*zstd_codec(3, True, axis=0), True),
        "webpL-m0q25": (pil_encode("WEBP", lossless=True, quality=25, method=0), pil_decode, True),
        "webpL-m0q50": (pil_encode("WEBP", lossless=True, quality=50, method=0), pil_decode, True),
        "webpL-m0q100": (pil_encode("WEBP", lossless=True, quality=100, method=0), pil_decode, True),
        "webpL-m1q0": (pil_encode("WEBP", lossless=True, quality=0, method=1), pil_decode, True),
        "png1": (pil_encode("PNG", compress_level=1), pil_decode, True),
        "png6": (pil_encode("PNG", compress_level=6), pil_decode, True),
        "webpL-m0q0": (pil_encode("WEBP", lossless=True, quality=0, method=0), pil_decode, True),
        "webpL-m1q25": (pil_encode("WEBP", lossless=True, quality=25, method=1), pil_decode, True),
        "webpL-m4q75": (pil_encode("WEBP", lossless=True, quality=75, method=4), pil_decode, True),
        "qoi": (pil_encode("QOI"), pil_decode, True),
    }
    for q in (70, 75, 80, 82, 83, 84, 85, 88, 90, 92, 95):
        for sub, name in ((0, "444"), (2, "420")):
            out[f"jpeg{q}-{name}"] = (pil_encode("JPEG", quality=q, subsampling=sub), pil_decode, False)
            out[f"jpeg{q}-{name}-opt"] = (
                pil_encode("JPEG", quality=q, subsampling=sub, optimize=True),
                pil_decode,
                False,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--photos", type=int, default=35, help="use the first N photos")
    args = parser.parse_args(argv)
    photos = make_photos(args.work / "photos")[: args.photos]
    images = []
    for p in photos:
        tiles = to_tiles(hd_transform(load_rgb(p), args.hd_num, "train"))
        images.append((p.stat().st_size, tiles))
    n_tiles = sum(len(t) for _, t in images)
    src_bytes = sum(s for s, _ in images)
    print(f"{len(images)} photos, {n_tiles} tiles, {src_bytes / 1e6:.2f} MB JPEG, hd {args.hd_num}")
    print(
        "| codec | stored/source | MB per image | encode ms/tile | encode images/s | decode ms/tile "
        "| decode tiles/s | max abs | mean abs | PSNR dB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (enc, dec, lossless) in candidates().items():
        if args.only and name not in args.only:
            continue
        stored = 0
        enc_s = dec_s = 0.0
        max_abs = 0
        abs_sum = sq_sum = 0.0
        for _, tiles in images:
            t0 = time.perf_counter()
            blobs = [enc(t) for t in tiles]
            enc_s += time.perf_counter() - t0
            stored += sum(len(b) for b in blobs)
            t0 = time.perf_counter()
            decoded = [dec(b) for b in blobs]
            dec_s += time.perf_counter() - t0
            for a, b in zip(tiles, decoded, strict=True):
                d = np.abs(a.astype(np.int16) - b.astype(np.int16))
                max_abs = max(max_abs, int(d.max()))
                abs_sum += float(d.sum())
                sq_sum += float((d.astype(np.int64) ** 2).sum())
        if lossless:
            assert max_abs == 0, f"{name} is not lossless"
        count = n_tiles * TILE_BYTES
        mse = sq_sum / count
        psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
        print(
            f"| {name} | {stored / src_bytes:.2f}x | {stored / len(images) / 1e6:.3f} "
            f"| {1000 * enc_s / n_tiles:.2f} | {len(images) / enc_s:.1f} | {1000 * dec_s / n_tiles:.2f} "
            f"| {n_tiles / dec_s:.0f} | {max_abs} | {abs_sum / count:.3f} | {psnr:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
