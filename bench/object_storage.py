"""Loader throughput from an S3-compatible server versus local disk: the same shards, the same
`trainer.loader.PackedLoader`, samples/s per loader worker.

The shards are written twice by the same `xc-prep shard` command: to a local folder and to
`s3://BUCKET/shards` on the server (their bytes are compared). Without --endpoint the bench starts
moto's S3 server (`moto[server]`, a separate process on 127.0.0.1) and points the standard AWS
variables at it; with --endpoint it uses that server (MinIO, moto, a real bucket: credentials from
the AWS environment) and a new bucket on it.

Each row: every stored sample `--repeat` times in one loader epoch, packed into 16384-token
micro-batches, read + collate with 0 (a prefetch thread), 1 and 2 dataloader workers, consumed as
fast as possible. "steady" excludes the first micro-batch (worker start-up); `read MB/s/worker` is
the loader's own account (`PackedLoader.read_stats`: stored bytes over the seconds the workers
spent reading and decoding them).

    python -m bench.object_storage                      # 8 records per kind, jpeg tiles
    python -m bench.object_storage --records 16 --workers 0 1 2 4 --codec raw
    python -m bench.object_storage --endpoint http://127.0.0.1:9000 --json out.json

Numbers depend on the CPU, on what else runs on it, and on the server; compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import (
    bench_header,
    make_photos,
    make_sources,
    new_bucket,
    resolve_tokenizer,
    s3_server,
    write_data_txt,
    write_json,
)
from pipeline import cli as prep_cli
from trainer.index import SampleIndex
from trainer.loader import PackedLoader, TimedIterator
from trainer.plan import LoaderConfig

HD_NUM = 18
MAX_LENGTH = 16384


@dataclass
class Row:
    location: str
    workers: int
    samples: int
    wall_s: float
    first_s: float
    first_samples: int
    wait_s: float
    read_mb_per_s_per_worker: float

    @property
    def steady_samples_per_s(self) -> float:
        return (self.samples - self.first_samples) / max(1e-9, self.wall_s - self.first_s)

    def cells(self) -> list[str]:
        per = max(1, self.workers)
        return [
            self.location,
            str(self.workers),
            f"{self.samples:,}",
            f"{self.wall_s:.2f}",
            f"{self.first_s:.2f}",
            f"{self.samples / self.wall_s:,.1f}",
            f"{self.steady_samples_per_s:,.1f}",
            f"{self.steady_samples_per_s / per:,.1f}",
            f"{self.read_mb_per_s_per_worker:,.1f}",
        ]


HEADER = [
    "shards",
    "workers",
    "samples",
    "wall s",
    "first batch s",
    "samples/s",
    "steady samples/s",
    "steady samples/s/worker",
    "read MB/s/worker",
]


# ---------------------------------------------------------------- measurements


def shard_to(out: str, work: Path, tokenizer: Path, codec: str, workers: int) -> float:
    """`xc-prep shard` of work/data.txt into `out`; returns the seconds it took."""
    argv = ["shard", str(work / "data.txt"), "--out", out, "--tokenizer", str(tokenizer)]
    argv += ["--hd-num", str(HD_NUM), "--max-length", str(MAX_LENGTH), "--workers", str(workers)]
    argv += ["--tile-codec", codec, "--samples-per-shard", "8", "--allow-path", str(work)]
    started = time.perf_counter()
    status = prep_cli.main(argv)
    if status != 0:
        raise RuntimeError(f"xc-prep {' '.join(argv)} failed with exit status {status}")
    return time.perf_counter() - started


def time_loader(location: str, label: str, workers: int, repeat: int) -> Row:
    index = SampleIndex.load(location)
    counts = {s.name: s.samples_written * repeat for s in index.manifest.sources}
    config = LoaderConfig(max_length=MAX_LENGTH, num_workers=workers, prefetch=2, source_samples=counts)
    loader = PackedLoader(index, config, pin_memory=False)
    plan = loader.plan(0)
    started = time.perf_counter()
    timed = TimedIterator(loader)
    samples = first_samples = 0
    first_s = 0.0
    for batch in timed:
        if not samples:
            first_s, first_samples = time.perf_counter() - started, len(batch.sample_keys)
        samples += len(batch.sample_keys)
    wall = time.perf_counter() - started
    assert samples == plan.num_samples, (samples, plan.num_samples)
    read = loader.read_stats()
    return Row(
        label,
        workers,
        samples,
        wall,
        first_s,
        first_samples,
        timed.total_wait_s,
        read["bytes_per_s_per_worker"] / 1e6,
    )


def tree_bytes(store_location: str) -> dict[str, bytes]:
    from schemas.storage import open_store

    store = open_store(store_location)
    return {rel: store.read_bytes(rel) for rel in store.list_files() if not rel.startswith(".work/")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=8, help="records per kind (single, multi, text)")
    parser.add_argument("--repeat", type=int, default=2, help="each sample this many times per loader epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--codec", default="jpeg", choices=["raw", "webp", "jpeg"])
    parser.add_argument("--prep-workers", type=int, default=2, help="xc-prep shard --workers")
    parser.add_argument("--endpoint", default=None, help="an S3 server's URL (default: start moto's here)")
    parser.add_argument("--tokenizer", default=None, help="default: ../shared tokenizer, else tiny")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    results = bench_header("object_storage", argv)
    with tempfile.TemporaryDirectory(prefix="xc-s3-bench-") as tmp, s3_server(args.endpoint) as endpoint:
        work = Path(tmp)
        tokenizer = resolve_tokenizer(args.tokenizer, "7b", work)
        sources = make_sources(make_photos(work / "photos"), args.records, seed=0)
        write_data_txt(work, sources)
        local, remote = str(work / "shards"), f"s3://{new_bucket()}/shards"
        prep = {
            "local": shard_to(local, work, tokenizer, args.codec, args.prep_workers),
            "s3": shard_to(remote, work, tokenizer, args.codec, args.prep_workers),
        }
        assert tree_bytes(local) == tree_bytes(remote), "the object store holds other bytes"
        results |= {
            "endpoint": endpoint,
            "codec": args.codec,
            "records": 3 * args.records,
            "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1m": os.getloadavg()[0],
            "torch": torch.__version__,
            "xc_prep_shard_s": prep,
        }
        rows = []
        for workers in args.workers:
            for label, location in (("local disk", local), ("S3 server", remote)):
                rows.append(time_loader(location, label, workers, args.repeat))
                print(f"  {label} x{workers}: {rows[-1].steady_samples_per_s:.1f} samples/s", file=sys.stderr)
                results["rows"] = [asdict(r) for r in rows]
                write_json(args.json, results)
    print(f"xc-prep shard: {prep['local']:.1f} s to local disk, {prep['s3']:.1f} s to the S3 server")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
