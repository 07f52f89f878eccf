"""Training from shards of each tile codec: same records, same steps, `xc-train` on each (issue 24).

Builds the photo records of bench/train_throughput.py (single-image, multi-image multi-turn and
text-only sources; photos from `--images DIR`, a folder of JPEGs, or else scikit-image's sample
photos), shards them once per `--codecs` with `xc-prep shard --tile-codec ...`, then runs
`xc-train` (a new process each, `--train-args` passed through) on every shard folder, `--seeds`
times, and reads `train_summary.json`:
  loss      the loss of every logged step, and the mean over the last half of the steps: codecs are
            compared with the same seed (same plan, same initialization; only the pixels differ),
            seeds against each other give the run-to-run noise;
  speed     tokens/s and data wait % of every step after `--skip` steps (compilation, warm-up):
            median tokens/s and mean data wait.
With `--store s3` the shards are written to and trained from an S3 server: moto's, started here on
127.0.0.1 (`moto[server]`, or only `moto` + flask + flask-cors), or `--endpoint URL`; the run's
`data_read` (the loader's bytes/s per worker) is reported too.

    # CPU: a tiny model, two seeds, loss curves of exact and jpeg shards
    python -m bench.codec_training --model tiny --hd-num 4 --max-length 4096 --steps 40 --seeds 1 2 \
        --train-args="--recipe lora --learning-rate 1e-3 --global-batch-size 2 --num-workers 1"
    # one GPU: the 7B LoRA step from exact and jpeg shards, 4 loader workers
    python -m bench.codec_training --model 7b --images /path/to/jpegs --steps 30 --skip 8 \
        --train-args="--recipe lora --global-batch-size 2 --num-workers 4 --compile --checkpoint-layers 14"
    # the same with the shards on a local S3 server (moto)
    python -m bench.codec_training --model 7b --images /path/to/jpegs --steps 30 --skip 8 --store s3 \
        --train-args="--recipe lora --global-batch-size 2 --num-workers 4"

Numbers depend on the machine; compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    make_photos,
    make_sources,
    new_bucket,
    resolve_tokenizer,
    s3_server,
    write_data_txt,
)
from pipeline import cli as prep_cli
from schemas.manifest import Manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


def shard(
    work: Path, root: str, codec: str, tokenizer: Path, images: Path, hd_num: int, max_length: int
) -> str:
    """`xc-prep shard` into ROOT/shards-CODEC (ROOT: a folder or an s3:// URL)."""
    out = f"{root}/shards-{codec}"
    argv = ["shard", str(work / "data.txt"), "--out", out, "--tokenizer", str(tokenizer)]
    argv += ["--hd-num", str(hd_num), "--max-length", str(max_length), "--tile-codec", codec]
    argv += ["--allow-path", str(images), "--workers", str(os.cpu_count() or 1), "--overwrite"]
    started = time.perf_counter()
    if (status := prep_cli.main(argv)) != 0:
        raise RuntimeError(f"xc-prep {' '.join(argv)} failed with exit status {status}")
    seconds = time.perf_counter() - started
    source_bytes = sum(p.stat().st_size for p in images.iterdir() if p.suffix in IMAGE_SUFFIXES)
    stored = sum(sh.bytes for s in Manifest.load(out).sources for sh in s.shards)
    print(
        f"{codec}: {stored / 1e6:.1f} MB of shards in {seconds:.0f} s (the photo folder: {source_bytes / 1e6:.1f} MB)"
    )
    return out


def train(
    shards: str, out: Path, model: str, max_length: int, steps: int, seed: int, extra: list[str]
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "trainer.cli", "--shards", str(shards), "--model", model]
    argv += ["--output-dir", str(out), "--max-length", str(max_length), "--max-steps", str(steps)]
    argv += ["--seed", str(seed), "--log-every-steps", "1", "--save-every-steps", "100000", "--no-save-final"]
    argv += ["--resume", "none", *extra]
    # keep the caller's PYTHONPATH: packages may be installed outside site-packages
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return json.loads((out / "train_summary.json").read_text())


def describe(summary: dict[str, Any], skip: int) -> dict[str, Any]:
    history = summary["history"]
    losses = [h["loss"] for h in history]
    timed = history[skip:] or history
    return {
        "steps": summary["steps"],
        "losses": losses,
        "last_half_loss": statistics.fmean(losses[len(losses) // 2 :]),
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in timed),
        "data_wait_pct": statistics.fmean(h["data_wait_pct"] for h in timed),
        "startup_s": summary["startup_s"],
        "peak_gpu_memory_bytes": summary["peak_gpu_memory_bytes"],
        "data_read": summary.get("data_read"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="xc-train --model (tiny, 7b or a folder)")
    parser.add_argument(
        "--images", type=Path, default=None, help="a folder of JPEG photos (default: scikit-image's)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="default: .bench/ or ../shared tokenizer; tiny for --model tiny"
    )
    parser.add_argument("--codecs", nargs="+", default=["raw", "jpeg"])
    parser.add_argument("--records", type=int, default=16, help="records per kind (single, multi, text)")
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="steps left out of the speed figures")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--train-args", default="--recipe lora --num-workers 4", help="more xc-train flags")
    parser.add_argument("--store", choices=["local", "s3"], default="local", help="where the shards are")
    parser.add_argument("--endpoint", default=None, help="--store s3: this server (default: start moto's)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xc-codec-train-") as tmp, contextlib.ExitStack() as stack:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        images = args.images.resolve() if args.images else work / "photos"
        photos = (
            sorted(p for p in images.iterdir() if p.suffix in IMAGE_SUFFIXES)
            if args.images
            else make_photos(images)
        )
        if not photos:
            raise SystemExit(f"--images {images}: no .jpg files")
        tokenizer = resolve_tokenizer(args.tokenizer, "tiny" if args.model == "tiny" else "7b", work)
        write_data_txt(work, make_sources(photos, args.records, seed=0))
        if args.store == "s3":  # xc-train (a child process) inherits the AWS variables s3_server sets
            print(f"S3 server: {stack.enter_context(s3_server(args.endpoint))}", flush=True)
            root = f"s3://{new_bucket()}"
        else:
            root = str(work)
        folders = {
            c: shard(work, root, c, tokenizer, images, args.hd_num, args.max_length) for c in args.codecs
        }
        results: dict[str, dict[str, Any]] = {}
        for seed in args.seeds:
            for codec, shards in folders.items():
                summary = train(
                    shards, work / f"run-{codec}-{seed}", args.model, args.max_length, args.steps, seed,
                    shlex.split(args.train_args),
                )  # fmt: skip
                results[f"{codec} seed {seed}"] = row = describe(summary, args.skip)
                print(
                    f"{codec} seed {seed}: {row['steps']} steps | loss, last half {row['last_half_loss']:.4f} | "
                    f"{row['tokens_per_s']:,.0f} tok/s (median after {args.skip}) | data wait "
                    f"{row['data_wait_pct']:.2f}%"
                    + (
                        f" | read {row['data_read']['bytes_per_s_per_worker'] / 1e6:,.1f} MB/s per worker"
                        if row["data_read"]
                        else ""
                    ),
                    flush=True,
                )
        print("\n| run | steps | mean loss, last half | median tokens/s | data wait % | loss per step |")
        print("|---|---|---|---|---|---|")
        for name, row in results.items():
            curve = " ".join(f"{x:.3f}" for x in row["losses"])
            print(
                f"| {name} | {row['steps']} | {row['last_half_loss']:.4f} | {row['tokens_per_s']:,.0f} "
                f"| {row['data_wait_pct']:.2f} | {curve} |"
            )
        if args.out_json:
            args.out_json.write_text(
                json.dumps(
                    {"args": vars(args) | {"images": str(images)}, "results": results}, indent=2, default=str
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
