"""How fast `xc-prep validate` checks text-only records (target: 10,000 records in < 10 s on 2 cores).

    python -m bench.validate_throughput [--records 10000] [--tokenizer PATH]

Writes a seeded JSON file of text-only conversations (2-6 turns, answers of ~300-2,000 characters,
like the official example data) into a temp folder, then times:
  - `xc-prep validate` as a user runs it (a fresh process: interpreter start-up included),
  - the in-process `pipeline.validate.validate()` with --workers 1 and 2,
  - the same with the length check (the given tokenizer, else ../shared's, else a tiny one).
and prints one table row per case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import REAL_TOKENIZER, REPO_ROOT
from pipeline.checks import ValidateOptions
from pipeline.tokenization import build_tiny_tokenizer
from pipeline.validate import validate

WORDS = (
    "the image shows a small cat sitting on wooden table next to cup of coffee while light from "
    "window falls across room and two people talk about weather history science music art city "
    "river mountain bridge train station market colour texture shape detail background foreground"
).split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append({"from": "human", "value": sentence(rng, rng.randint(6, 30))})
            answer = " ".join(sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(3, 20)))
            turns.append({"from": "gpt", "value": answer})
        records.append({"id": i, "conversations": turns})
    return records


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        json_path = root / "text.json"
        json_path.write_text(json.dumps(make_records(args.records)))
        data_txt = root / "data.txt"
        data_txt.write_text("text.json 1\n")
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = (
                REAL_TOKENIZER if REAL_TOKENIZER.is_file() else build_tiny_tokenizer(root / "tiny.model")
            )

        size_mb = json_path.stat().st_size / 1e6
        print(f"{args.records:,} text-only records, {size_mb:.1f} MB JSON, {os.cpu_count()} CPU cores")
        print(f"tokenizer for the length check: {tokenizer}\n")
        rows = []

        def cli(*extra: str) -> None:
            cmd = [sys.executable, "-m", "pipeline.cli", "validate", str(data_txt), *extra]
            out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            assert out.returncode == 0, out.stdout + out.stderr

        rows.append(("xc-prep validate (new process)", 2, timed(lambda: cli("--workers", "2"))))
        for workers in (1, 2):
            t = timed(lambda w=workers: validate(data_txt, ValidateOptions(), workers=w))
            rows.append(("validate() in process", workers, t))
        opts = ValidateOptions(tokenizer=tokenizer)
        for workers in (1, 2):
            t = timed(lambda w=workers: validate(data_txt, opts, workers=w))
            rows.append(("validate() + length check", workers, t))
        t = timed(lambda: cli("--workers", "2", "--tokenizer", str(tokenizer)))
        rows.append(("xc-prep validate --tokenizer (new process)", 2, t))

        width = max(len(r[0]) for r in rows)
        print(f"{'case':<{width}}  workers  seconds  records/s")
        for name, workers, seconds in rows:
            print(f"{name:<{width}}  {workers:>7}  {seconds:>7.2f}  {args.records / seconds:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
