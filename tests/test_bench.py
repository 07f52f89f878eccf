"""bench/ and dev/experiments/ cannot rot silently: every module imports, none edits sys.path, and
the training-throughput bench's tiny CPU smoke runs xc-train's step against the official baseline."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    f"{package}.{path.stem}"
    for package in ("bench", "dev.experiments")
    for path in sorted((REPO_ROOT / package.replace(".", "/")).glob("*.py"))
    if path.stem != "__init__"
]


def test_bench_and_experiments_are_found() -> None:
    assert {"bench.common", "bench.train_throughput", "dev.experiments.levers"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_bench_and_experiment_module_imports_without_sys_path_edits(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as `python -m NAME` from the repository root, so imported here from it (not run)."""
    source = (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert "sys.path" not in source, f"{module}: run it with `python -m {module}` instead of editing sys.path"
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    imported = importlib.import_module(module)
    assert Path(imported.__file__ or "").resolve().is_relative_to(REPO_ROOT)


@pytest.mark.slow
def test_train_throughput_tiny_cpu_smoke_runs_ours_through_deepspeed_and_the_official_baseline(
    tmp_path: Path,
) -> None:
    out = tmp_path / "train_throughput.json"
    argv = ["--preset", "tiny", "--steps", "1", "--warmup", "1", "--hd-num", "2", "--max-length", "2048"]
    argv += ["--records", "1", "--official-steps", "1", "--official-warmup", "1", "--official-lora", "peft"]
    argv += ["--shard-workers", "1", "--out-json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", *argv],
        cwd=REPO_ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["command"] == ["python", "-m", "bench.train_throughput", *argv]
    phases = {p["name"]: p for p in results["phases"]}
    assert set(phases) == {"official", "ours"}
    assert phases["ours"]["zero_stage"] == 1  # the LoRA recipe's engine, as xc-train builds it
    assert all(p["measured_steps"] == 1 and math.isfinite(p["final_loss"]) for p in phases.values())
    assert "ours / official: tokens/s" in done.stdout
