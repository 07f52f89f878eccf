"""Loader throughput: packed micro-batches from shards (`trainer.loader.PackedLoader`) versus the
official per-sample path, on the same records and the same machine.

Data: real photos (scikit-image's sample images at 0.3–2 MP, JPEG, made by bench/common.py)
in three sources: single-image, multi-image (2–3) and text-only records, sharded once with
`xc-prep shard` for each tile codec.
  official  what the official recipe does per sample inside the training process: parse the JSON
            record, tokenize the turns, decode every image, HD transform (docs/IXC25.md#hd-transform, written out
            here with PIL/numpy) and normalize to float32 [3, H, W]. One process = one worker.
  loader    PackedLoader over the shards, every sample `--repeat` times in one epoch, packed into
            16384-token micro-batches: read + collate (+ pin + copy to the GPU when CUDA is
            present), with 0 (a prefetch thread), 1 and 2 dataloader workers, consumed as fast as
            possible. Wall time includes worker start-up ("first batch s", once per epoch);
            "steady samples/s" excludes it.
samples/s and tokens/s are also given per worker (per core): `official` must run once per GPU
step in the training process, the loader in its workers.

    python -m bench.loader_throughput                       # 32 records per kind
    python -m bench.loader_throughput --records 64 --workers 0 1 2 4

Numbers depend on the CPU and on what else runs on it; compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import REAL_TOKENIZER, make_photos, write_data_txt
from bench.prep_throughput import make_records
from pipeline.shard import shard
from pipeline.shard_config import ShardConfig
from pipeline.tiling import hd_grid
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from schemas.shards import ShardReader
from trainer.index import SampleIndex
from trainer.loader import PackedLoader, TimedIterator
from trainer.plan import LoaderConfig

TILE = 560
HD_NUM = 18
CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), dtype=np.float32).reshape(3, 1, 1)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), dtype=np.float32).reshape(3, 1, 1)
TEXT_ANSWER = "A careful, complete answer that walks through the reasoning step by step. " * 12


# ---------------------------------------------------------------- the official per-sample path


def official_hd_transform(img: Image.Image, hd_num: int = HD_NUM) -> np.ndarray:
    """docs/IXC25.md#hd-transform, training style: resize + centred white padding → normalized float32 [3, H, W]."""
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale = min(math.ceil(width * 1.5 / TILE), scale - 1)
    new_w = int(scale * TILE)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / TILE) * TILE
    canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
    canvas.paste(img, (0, (padded_h - new_h) // 2))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    chw = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (chw - CLIP_MEAN) / CLIP_STD


def official_sample(record_json: str, tokenizer: Tokenizer) -> tuple[list[list[int]], list[np.ndarray]]:
    """Per sample, at every epoch: JSON → token ids per turn + normalized images."""
    record = json.loads(record_json)
    ids = [tokenizer.encode(turn["value"].strip()) for turn in record["conversations"]]
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(official_hd_transform(im.convert("RGB")))
    return ids, images


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    path: str
    codec: str
    workers: int
    samples: int
    tokens: int
    tiles: int
    wall_s: float
    wait_s: float
    first_s: float
    """Time to the first micro-batch (worker start-up, first read); steady rates exclude it."""
    first_samples: int = 0

    def cells(self) -> list[str]:
        per = max(1, self.workers)
        return [
            self.path,
            self.codec,
            str(self.workers),
            f"{self.samples:,}",
            f"{self.tokens / self.samples:,.0f}",
            f"{self.tiles / self.samples:.1f}",
            f"{self.wall_s:.2f}",
            f"{self.samples / self.wall_s:,.1f}",
            f"{self.tokens / self.wall_s:,.0f}",
            f"{self.samples / self.wall_s / per:,.1f}",
            f"{self.tokens / self.wall_s / per:,.0f}",
            f"{self.first_s:.2f}" if self.path == "loader" else "-",
            f"{(self.samples - self.first_samples) / max(1e-9, self.wall_s - self.first_s):,.1f}",
        ]


def time_official(records: list[str], tokens: list[int], tiles: list[int], tokenizer: Tokenizer) -> Row:
    started = time.perf_counter()
    for record in records:
        official_sample(record, tokenizer)
    wall = time.perf_counter() - started
    return Row("official", "jpeg", 1, len(records), sum(tokens), sum(tiles), wall, wall, 0.0)


def time_loader(shards: Path, codec: str, workers: int, repeat: int) -> Row:
    index = SampleIndex.load(shards)
    counts = {s.name: s.samples_written * repeat for s in index.manifest.sources}
    config = LoaderConfig(max_length=16384, num_workers=workers, prefetch=2, source_samples=counts)
    loader = PackedLoader(index, config)
    plan = loader.plan(0)
    device = "cuda" if torch.cuda.is_available() else None
    started = time.perf_counter()
    timed = TimedIterator(loader)
    samples = tokens = tiles = first_samples = 0
    first_s = 0.0
    for batch in timed:
        if device:
            batch = batch.to(device, non_blocking=True)
        if not samples:
            first_s, first_samples = time.perf_counter() - started, len(batch.sample_keys)
        samples += len(batch.sample_keys)
        tokens += batch.num_tokens
        tiles += int(batch.tiles.shape[0])
    if device:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    assert samples == plan.num_samples
    return Row(
        "loader", codec, workers, samples, tokens, tiles, wall, timed.total_wait_s, first_s, first_samples
    )


def make_text_records(count: int) -> list[dict]:
    records = []
    for i in range(count):
        question = f"Question {i}: explain the idea in a few paragraphs."
        answer = TEXT_ANSWER * (1 + i % 4)
        conversations = [{"from": "human", "value": question}, {"from": "bot", "value": answer}]
        records.append({"id": f"text-{i}", "conversations": conversations})
    return records


def build_shards(work: Path, sources: dict[str, list[dict]], tokenizer: Path, codec: str) -> Path:
    write_data_txt(work, sources)
    out = work / f"shards-{codec}"
    config = ShardConfig(
        data_txt=work / "data.txt",
        out=out,
        tokenizer=tokenizer,
        hd_num=HD_NUM,
        workers=max(1, min(4, (os.cpu_count() or 1) - 1)),
        samples_per_shard=32,
        tile_codec=codec,
        overwrite=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        status = shard(config)
    assert status == 0, f"xc-prep shard failed with status {status}"
    return out


def print_table(rows: list[Row]) -> None:
    header = [
        "path",
        "codec",
        "workers",
        "samples",
        "tokens/sample",
        "tiles/sample",
        "wall s",
        "samples/s",
        "tokens/s",
        "samples/s/worker",
        "tokens/s/worker",
        "first batch s",
        "steady samples/s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=32, help="records per kind (single, multi, text)")
    parser.add_argument("--repeat", type=int, default=2, help="each sample this many times per loader epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--codecs", nargs="+", default=["raw", "jpeg"])
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="default: ../shared tokenizer, else tiny"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xc-loader-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_path = args.tokenizer or (
            REAL_TOKENIZER if REAL_TOKENIZER.is_file() else build_tiny_tokenizer(work / "tiny.model")
        )
        photos = make_photos(work / "photos")
        for p in photos:  # the baseline's transform must tile like the pipeline's
            with Image.open(p) as im:
                c, h, w = official_hd_transform(im.convert("RGB")).shape
                assert (h // TILE, w // TILE) == hd_grid(*im.size, HD_NUM, "train"), p
        sources = {
            "single": make_records(photos, args.records, (1,)),
            "multi": make_records(photos, args.records, (2, 3)),
            "text": make_text_records(args.records),
        }
        for name, records in sources.items():
            for r in records:
                r["id"] = f"{name}-{r['id']}"
        print(
            f"{len(photos)} photos; {3 * args.records} records; tokenizer {tokenizer_path}; "
            f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}); "
            f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
            file=sys.stderr,
        )
        rows = []
        for codec in args.codecs:
            started = time.perf_counter()
            shards = build_shards(work, sources, tokenizer_path, codec)
            print(f"  sharded ({codec}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            if not rows:  # the official path, once, with per-record token/tile counts from the shards
                index = SampleIndex.load(shards)
                by_id = {}
                for g in range(len(index)):
                    reader = ShardReader(shards / index.shard_files[index.sample_shard[g]])
                    record_id = reader.provenance(int(index.sample_row[g]))[3]
                    by_id[record_id] = (int(index.num_tokens[g]), int(index.num_tiles[g]))
                all_records = [r for records in sources.values() for r in records]
                kept = [r for r in all_records if r["id"] in by_id]
                tokenizer = Tokenizer.from_path(tokenizer_path)
                rows.append(
                    time_official(
                        [json.dumps(r) for r in kept],
                        [by_id[r["id"]][0] for r in kept],
                        [by_id[r["id"]][1] for r in kept],
                        tokenizer,
                    )
                )
                print(f"  official: {rows[-1].samples / rows[-1].wall_s:.1f} samples/s", file=sys.stderr)
            for workers in args.workers:
                rows.append(time_loader(shards, codec, workers, args.repeat))
                print(
                    f"  loader {codec} x{workers}: {rows[-1].samples / rows[-1].wall_s:.1f} samples/s",
                    file=sys.stderr,
                )
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
