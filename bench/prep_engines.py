"""`xc-prep shard --engine ray` versus the local process pool on the same machine and records:
wall time, samples/s and samples/s per core, and the two folders compared byte for byte.

Ray runs on a local instance the bench starts with `--cpus` CPUs (`ray.init(num_cpus=...)`; its
start-up is timed apart), so both engines get the same cores: the local pool `--workers CPUS`,
Ray one task per work unit, one CPU each. Each engine writes a fresh folder with the same command.

    python -m bench.prep_engines                        # 8 records per kind, 2 CPUs, jpeg tiles
    python -m bench.prep_engines --records 16 --cpus 4 --json out.json

Numbers depend on the CPU and on what else runs on it; compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    bench_header,
    make_photos,
    make_sources,
    resolve_tokenizer,
    write_data_txt,
    write_json,
)
from pipeline import cli as prep_cli
from schemas.manifest import Manifest

HD_NUM = 18
MAX_LENGTH = 16384


def shard(work: Path, out: Path, tokenizer: Path, codec: str, *extra: str) -> float:
    argv = ["shard", str(work / "data.txt"), "--out", str(out), "--tokenizer", str(tokenizer)]
    argv += ["--hd-num", str(HD_NUM), "--max-length", str(MAX_LENGTH), "--tile-codec", codec]
    argv += ["--samples-per-shard", "4", "--allow-path", str(work), *extra]
    started = time.perf_counter()
    status = prep_cli.main(argv)
    if status != 0:
        raise RuntimeError(f"xc-prep {' '.join(argv)} failed with exit status {status}")
    return time.perf_counter() - started


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=8, help="records per kind (single, multi, text)")
    parser.add_argument("--cpus", type=int, default=2, help="local pool --workers = Ray's num_cpus")
    parser.add_argument("--codec", default="jpeg", choices=["raw", "webp", "jpeg"])
    parser.add_argument("--tokenizer", default=None, help="default: ../shared tokenizer, else tiny")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import ray

    results = bench_header("prep_engines", argv)
    with tempfile.TemporaryDirectory(prefix="xc-engines-bench-") as tmp:
        work = Path(tmp)
        tokenizer = resolve_tokenizer(args.tokenizer, "7b", work)
        sources = make_sources(make_photos(work / "photos"), args.records, seed=0)
        write_data_txt(work, sources)

        local_s = shard(work, work / "local", tokenizer, args.codec, "--workers", str(args.cpus))
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - started
        try:
            ray_s = shard(work, work / "ray", tokenizer, args.codec, "--engine", "ray")
        finally:
            ray.shutdown()
        identical = tree_bytes(work / "local") == tree_bytes(work / "ray")
        manifest = Manifest.load(work / "local")
        samples = sum(s.samples_written for s in manifest.sources)
        units = sum(len(s.shards) for s in manifest.sources)
    results |= {
        "codec": args.codec,
        "records": 3 * args.records,
        "samples": samples,
        "work_units": units,
        "cpus": args.cpus,
        "machine_cpus": len(os.sched_getaffinity(0)),
        "load_avg_1m": os.getloadavg()[0],
        "ray": ray.__version__,
        "byte_identical": identical,
        "local_pool_s": local_s,
        "ray_start_s": ray_start_s,
        "ray_s": ray_s,
    }
    write_json(args.json, results)
    print(f"{samples} samples in {units} work units, {args.cpus} CPUs; outputs byte-identical: {identical}")
    print("| engine | wall s | samples/s | samples/s/core |")
    print("|---|---|---|---|")
    for name, seconds in (("local pool", local_s), ("ray (instance already up)", ray_s)):
        print(f"| {name} | {seconds:.1f} | {samples / seconds:.2f} | {samples / seconds / args.cpus:.2f} |")
    print(f"Ray's own start-up (ray.init): {ray_start_s:.1f} s")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
