"""Start-up on a folder of many small shards: `xc-train plan` and a training run's first step.

Builds `--shards` shards of `--samples-per-shard` text-only records each with `xc-prep shard` (tiny
tokenizer), then times, each in a new process as a user runs them:
  plan   `xc-train plan --shards DIR` (manifest, every shard's size, footer and lengths, the plan)
  fit    `xc-train --model tiny ... --max-steps 1`: wall time to the end of one step, and the
         start-up phases from train_summary.json (`setup` holds the shard check)
`--code DIR` runs the same commands from another source tree (e.g. an export of main:
`git archive main | tar -x -C /tmp/main-tree`) for a before/after in one invocation; each tree
shards with its own code (shard formats differ across versions).

    python -m bench.startup --shards 10000 --samples-per-shard 4
    python -m bench.startup --shards 10000 --code . /tmp/main-tree --repeat 2

Numbers depend on the CPU, the disk and its page cache (the folder was just written: warm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ANSWER = "A short answer of a few words."


def run(code: Path, argv: list[str], cwd: Path) -> float:
    """Run `python -m ...` from source tree `code`; returns the wall seconds (raises on failure)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(code.resolve()),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return seconds


def make_shards(code: Path, work: Path, shards: int, per_shard: int, workers: int) -> tuple[Path, float]:
    from pipeline.tokenization import build_tiny_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(work / "tiny.model")
    records = [
        {
            "id": i,
            "conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": ANSWER}],
        }
        for i in range(shards * per_shard)
    ]
    (work / "text.json").write_text(json.dumps(records))
    (work / "data.txt").write_text("text.json 1\n")
    out = work / "shards"
    argv = ["-m", "pipeline.cli", "shard", "data.txt", "--tokenizer", str(tokenizer), "--out", str(out)]
    argv += ["--samples-per-shard", str(per_shard), "--workers", str(workers), "--max-length", "256"]
    return out, run(code, argv, work)


def time_plan(code: Path, shards: Path) -> float:
    argv = [
        "-m",
        "trainer.cli",
        "plan",
        "--shards",
        str(shards),
        "--max-length",
        "256",
        "--global-batch-size",
        "8",
    ]
    return run(code, argv, shards.parent)


def time_fit(code: Path, shards: Path, out: Path) -> tuple[float, dict[str, float]]:
    argv = ["-m", "trainer.cli", "--shards", str(shards), "--model", "tiny", "--output-dir", str(out)]
    argv += ["--recipe", "full", "--max-length", "256", "--global-batch-size", "2", "--num-workers", "0"]
    argv += ["--max-steps", "1", "--no-save-final", "--save-every-steps", "1000", "--resume", "none"]
    seconds = run(code, argv, shards.parent)
    summary = json.loads((out / "train_summary.json").read_text())
    return seconds, summary["startup_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--samples-per-shard", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="xc-prep shard workers (building only)")
    parser.add_argument("--code", type=Path, nargs="+", default=[REPO_ROOT], help="source trees to compare")
    parser.add_argument("--repeat", type=int, default=1, help="timings per tree, interleaved")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xc-startup-") as tmp:
        work = args.keep or Path(tmp)
        folders = {}
        for i, code in enumerate(args.code):
            folders[code], seconds = make_shards(
                code, work / f"tree{i}", args.shards, args.samples_per_shard, args.workers
            )
            files = len(list(folders[code].rglob("*.arrow")))
            size = sum(p.stat().st_size for p in folders[code].rglob("*.arrow"))
            print(f"{code}: {files:,} shards, {size / 1e6:.1f} MB, made in {seconds:.0f} s", file=sys.stderr)
        print("| code | xc-train plan s | xc-train fit: wall s (1 step) | fit start-up phases s |")
        print("|---|---|---|---|")
        for r in range(args.repeat):
            for i, code in enumerate(args.code):
                plan_s = time_plan(code, folders[code])
                fit_s, phases = time_fit(code, folders[code], work / f"run{i}-{r}")
                shown = ", ".join(f"{name} {s:.1f}" for name, s in phases.items())
                print(f"| {code} | {plan_s:.1f} | {fit_s:.1f} | {shown} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
