"""Offline preparation throughput (`xc-prep shard`) per tile codec, versus the official per-sample
work at training time; the jpeg codec's tile error.

What it measures, on real photos (scikit-image's sample images, upscaled and centre-cropped to
0.3–2 MP and saved as JPEG quality 90), for single-image and multi-image (2–3 images) records:
  prep     `xc-prep shard` with one worker (so samples/s = samples/s per core): validation, JPEG
           decode, HD transform, tokenization, tile encoding, checksums and the atomic shard
           write, per codec;
  official what the official recipe redoes for every sample at every epoch inside the training
           process: decode + HD transform + normalize to float32 [3, H, W] (numpy, one core);
  read     what the trainer does instead: read one stored sample back (checked against its
           sha256, tiles decoded to uint8), as a loader worker does;
  storage  shard bytes per sample next to the source JPEG bytes per sample;
  error    each lossy codec's tiles against the exact (raw) tiles of the same records: max and
           mean absolute difference in grey levels, PSNR over all tiles.

To compare two versions of the code, run the bench on each checkout in turn on the same machine,
`--rounds` times each (the rows of one round run back to back).

    python -m bench.prep_throughput                      # 24 records per kind, hd 18, every codec
    python -m bench.prep_throughput --codecs raw jpeg --jpeg-quality 75 85 95
    python -m bench.prep_throughput --kinds single --codecs raw jpeg --rounds 3

Numbers depend on the CPU and on what else runs on it; compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import REAL_TOKENIZER, make_photos
from pipeline.media import load_rgb
from pipeline.shard import shard
from pipeline.shard_config import ShardConfig
from pipeline.tiling import CLIP_MEAN, CLIP_STD, hd_transform
from pipeline.tokenization import build_tiny_tokenizer
from schemas.manifest import Manifest
from schemas.shards import ShardReader

CODECS = ("raw", "webp", "jpeg")
KINDS = {"single": (1,), "multi": (2, 3)}
ANSWER = "The photo shows a scene with several objects; the colours are natural and the light is soft. " * 4


# ---------------------------------------------------------------- data


def make_records(photos: list[Path], count: int, images_per_record: tuple[int, ...]) -> list[dict]:
    records = []
    for i in range(count):
        n = images_per_record[i % len(images_per_record)]
        images = [str(photos[(i * 3 + j) % len(photos)]) for j in range(n)]
        image: str | list[str] = images[0] if n == 1 else images
        question = "Describe this photo in detail."
        if n > 1:
            question = " ".join(f"Image{j + 1}: <ImageHere>;" for j in range(n)) + " Compare the photos."
        conversations = [{"from": "human", "value": question}, {"from": "bot", "value": ANSWER}]
        records.append({"id": i, "conversations": conversations, "image": image})
    return records


def record_source_bytes(record: dict) -> int:
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    return sum(Path(p).stat().st_size for p in images)


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    kind: str
    codec: str
    samples: int
    images: int
    tiles: int
    prep_s: float
    official_s: float
    read_s: float
    shard_bytes: int
    source_bytes: int


def time_official(records: list[dict], hd_num: int) -> float:
    """Decode + HD transform + CLIP normalize to float32 [3, H, W], as the official dataset does per sample."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    started = time.perf_counter()
    for record in records:
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        for path in images:
            padded = hd_transform(load_rgb(Path(path)), hd_num, "train")
            chw = padded.transpose(2, 0, 1).astype(np.float32) / 255.0
            normalized = (chw - mean) / std
            assert normalized.dtype == np.float32
    return time.perf_counter() - started


def time_read(out: Path) -> tuple[float, int]:
    manifest = Manifest.load(out)
    started = time.perf_counter()
    n = 0
    for source in manifest.sources:
        for info in source.shards:
            reader = ShardReader(out / info.file)
            for row in range(len(reader)):
                sample = reader.read(row)
                assert sample.tiles.dtype == np.uint8
                n += 1
    return time.perf_counter() - started, n


def run_case(
    work: Path,
    kind: str,
    records: list[dict],
    codec: str,
    tokenizer: Path,
    hd_num: int,
    jpeg_quality: int | None = None,
) -> Row:
    """One `xc-prep shard` of `records` under `work/<kind>-<codec>[-q<quality>]/shards` (photos in
    `work/photos`)."""
    case = work / (f"{kind}-{codec}" if jpeg_quality is None else f"{kind}-{codec}-q{jpeg_quality}")
    case.mkdir(parents=True, exist_ok=True)
    (case / "data.json").write_text(json.dumps(records))
    (case / "data.txt").write_text(f"{case / 'data.json'} 1\n")
    out = case / "shards"
    config = ShardConfig(
        data_txt=case / "data.txt",
        out=out,
        tokenizer=tokenizer,
        hd_num=hd_num,
        workers=1,
        samples_per_shard=64,
        tile_codec=codec,
        **({"jpeg_quality": jpeg_quality} if jpeg_quality is not None else {}),
        overwrite=True,
        allow_path=(work / "photos",),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        status = shard(config)
        prep_s = time.perf_counter() - started
    assert status == 0, f"xc-prep shard failed with status {status}"
    manifest = Manifest.load(out)
    (source,) = manifest.sources
    assert source.rejected == 0, f"{source.rejected} records rejected: see {out / 'rejects.jsonl'}"
    read_s, n = time_read(out)
    assert n == len(records)
    return Row(
        kind=kind,
        codec=codec,
        samples=len(records),
        images=sum(len(r["image"]) if isinstance(r["image"], list) else 1 for r in records),
        tiles=source.tiles,
        prep_s=prep_s,
        official_s=time_official(records, hd_num),
        read_s=read_s,
        shard_bytes=sum(s.bytes for s in source.shards),
        source_bytes=sum(record_source_bytes(r) for r in records),
    )


def tile_error(exact_dir: Path, lossy_dir: Path) -> tuple[int, float, float]:
    """(max abs, mean abs, PSNR dB) of the tiles in `lossy_dir` against those in `exact_dir`."""
    max_abs, abs_sum, sq_sum, count = 0, 0.0, 0.0, 0
    exact, lossy = Manifest.load(exact_dir), Manifest.load(lossy_dir)
    for es, ls in zip(exact.sources, lossy.sources, strict=True):
        for eh, lh in zip(es.shards, ls.shards, strict=True):
            for a, b in zip(ShardReader(exact_dir / eh.file), ShardReader(lossy_dir / lh.file), strict=True):
                d = np.abs(a.tiles.astype(np.int16) - b.tiles.astype(np.int16))
                max_abs = max(max_abs, int(d.max(initial=0)))
                abs_sum += float(d.sum())
                sq_sum += float(np.square(d, dtype=np.int64).sum())
                count += d.size
    mse = sq_sum / max(count, 1)
    return max_abs, abs_sum / max(count, 1), float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def label(codec: str, quality: int | None) -> str:
    return codec if quality is None else f"{codec} q{quality}"


def print_table(rows: list[tuple[str, str, Row]], hd_num: int) -> None:
    print(f"\nhd_num {hd_num}, one core each; prep = xc-prep shard incl. validation, checksums and write\n")
    header = (
        "| round | records | codec | tiles/sample | prep samples/s/core | prep ms/sample | official ms/sample "
        "| read ms/sample | read tiles/s | MB/sample stored | MB/sample source JPEG | stored/source |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for code, codec, r in rows:
        stored, source = r.shard_bytes / r.samples / 1e6, r.source_bytes / r.samples / 1e6
        print(
            f"| {code} | {r.kind} ({r.images / r.samples:.1f} img) | {codec} | {r.tiles / r.samples:.1f} "
            f"| {r.samples / r.prep_s:.1f} | {1000 * r.prep_s / r.samples:.0f} "
            f"| {1000 * r.official_s / r.samples:.0f} | {1000 * r.read_s / r.samples:.1f} | {r.tiles / r.read_s:.0f} "
            f"| {stored:.3f} | {source:.3f} | {stored / source:.2f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=24, help="records per kind")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    parser.add_argument("--jpeg-quality", type=int, nargs="+", default=[None], help="jpeg qualities to run")
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="default: ../shared tokenizer, else a tiny one"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of every case")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xc-bench-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = (
                REAL_TOKENIZER if REAL_TOKENIZER.is_file() else build_tiny_tokenizer(work / "tiny.model")
            )
        photos = make_photos(work / "photos")
        print(
            f"{len(photos)} photos, {sum(p.stat().st_size for p in photos) / 1e6:.1f} MB JPEG; tokenizer {tokenizer}"
        )
        for kind in args.kinds:
            (work / f"records-{kind}.json").write_text(
                json.dumps(make_records(photos, args.records, KINDS[kind]))
            )
        cases = [
            (codec, quality)
            for codec in args.codecs
            for quality in (args.jpeg_quality if codec == "jpeg" else [None])
        ]
        rows: list[tuple[str, str, Row]] = []
        folders: dict[tuple[str, str, int | None], Path] = {}
        for r in range(args.rounds):
            round_root = work / f"round{r}"
            round_root.mkdir(exist_ok=True)
            if not (round_root / "photos").exists():
                (round_root / "photos").symlink_to(work / "photos")
            for codec, quality in cases:
                for kind in args.kinds:
                    records = json.loads((work / f"records-{kind}.json").read_text())
                    extra = {} if quality is None else {"jpeg_quality": quality}
                    row = run_case(round_root, kind, records, codec, tokenizer, args.hd_num, **extra)
                    rows.append((f"round {r}", label(codec, quality), row))
                    case = f"{kind}-{codec}" if quality is None else f"{kind}-{codec}-q{quality}"
                    folders[(kind, codec, quality)] = round_root / case / "shards"
                    print(
                        f"  round {r}: {kind}/{label(codec, quality)}: {row.samples / row.prep_s:.1f} samples/s",
                        file=sys.stderr,
                    )
        print_table(rows, args.hd_num)
        lossy = [(codec, quality) for codec, quality in cases if codec == "jpeg"]
        if lossy:
            print("\n| round | records | codec | max abs | mean abs | PSNR dB |\n|---|---|---|---|---|---|")
        for kind in args.kinds:
            for codec, quality in lossy:
                exact = folders.get((kind, "raw", None))
                coded = folders.get((kind, codec, quality))
                if exact is None or coded is None:
                    continue
                max_abs, mean_abs, psnr = tile_error(exact, coded)
                print(
                    f"| last round | {kind} | {label(codec, quality)} | {max_abs} | {mean_abs:.3f} | {psnr:.1f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
