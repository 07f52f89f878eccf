"""SIGINT and SIGTERM during training (issue 27): every rank finishes its step, one checkpoint is
written, the run exits 130 with one line and no traceback, and the same command resumes it. One rank,
and two gloo ranks where the signal reaches one rank only (as Slurm may deliver it). A second
Ctrl-C exits at once.

The runs are subprocesses; `SLOW_STEPS` makes each optimizer step take a while, so that signals
land mid-run at a known place.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DIST_ENV

from trainer.checkpoint import checkpoint_root, complete_checkpoints, verify_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent

SLOW_STEPS = """
import sys, time
import trainer.train as train_module
from trainer.cli import main

real_step = train_module.train_step

def slow_step(*args, **kwargs):  # each optimizer step takes at least STEP_S seconds
    started = time.monotonic()
    result = real_step(*args, **kwargs)
    time.sleep(max(0.0, STEP_S - (time.monotonic() - started)))
    return result

train_module.train_step = slow_step
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "lora",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "1", "--warmup-ratio", "0",
        "--learning-rate", "1e-3", "--epochs", "5", "--save-every-steps", "100", *extra,
    ]  # fmt: skip


def start(
    script: Path, args: list[str], tmp_path: Path, rank: int | None = None, world: int = 1, port: int = 0
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen, text: str, timeout_s: float = 240) -> list[str]:
    """Read proc's stderr until a line containing `text`; returns the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}; exit {proc.poll()}:\n{''.join(lines)[-3000:]}")


def script_with_step_time(tmp_path: Path, step_s: float) -> Path:
    script = tmp_path / "slow.py"
    script.write_text(f"STEP_S = {step_s}\n" + SLOW_STEPS)
    return script


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_and_the_same_command_resumes(
    tiny_text_shards: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "run"
    script = script_with_step_time(tmp_path, 0.5)
    proc = start(script, argv(tiny_text_shards, out), tmp_path)
    try:
        before = wait_for_line(proc, "step 2/20 |")
        proc.send_signal(sig)
        sent = time.monotonic()
        rest = proc.stderr.read()  # type: ignore[union-attr]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(before) + rest
    assert proc.returncode == 130, log[-3000:]
    assert time.monotonic() - sent < 30
    assert "Traceback" not in log
    done = complete_checkpoints(out)
    assert len(done) == 1
    step = int(done[0].name.removeprefix("step-"))
    assert step in (2, 3)  # the step under way when the signal came is finished, no more
    line = (
        f"xc-train: stopped at step {step} ({sig.name}); checkpoint {done[0]} is intact; rerun the same "
        "command to resume\n"
    )
    assert log.endswith(line), log[-1500:]
    assert f"xc-train: {sig.name} received: finishing this step, then a checkpoint" in log
    assert verify_checkpoint(done[0])["step"] == step
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped_by"] == sig.name and summary["steps"] == step and summary["final_dir"] is None

    # the same command resumes at the next step and runs to the end
    again = start(script_with_step_time(tmp_path, 0.0), argv(tiny_text_shards, out), tmp_path)
    log = again.communicate(timeout=300)[1]
    assert again.returncode == 0, log[-3000:]
    assert f"resumed from {done[0]} at step {step}" in log and f"step {step + 1}/20 |" in log
    assert f"step {step}/20 |" not in log
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 20


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tiny_text_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(script_with_step_time(tmp_path, 8.0), argv(tiny_text_shards, out), tmp_path)
    try:
        before = wait_for_line(proc, "step 1/20 |")
        time.sleep(1.0)  # well inside step 2, which takes 8 s
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rest = proc.stderr.read()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(before) + rest
    assert proc.returncode == 130 and time.monotonic() - sent < 5, log[-3000:]
    assert (
        f"xc-train: SIGINT again: exiting now without a checkpoint; the last complete one under {checkpoint_root(out)} is intact"
        in log
    )
    assert "Traceback" not in log and not complete_checkpoints(out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("rank", "sig"), [(1, signal.SIGTERM), (0, signal.SIGINT)], ids=["SIGTERM-rank1", "SIGINT-rank0"]
)
def test_a_signal_to_one_rank_stops_both(
    tiny_text_shards: Path, tmp_path: Path, rank: int, sig: signal.Signals
) -> None:
    """Both ranks stop at the same step with one checkpoint (written by both), exit 130; rank 0
    says so. After the SIGTERM, two ranks resume it."""
    out = tmp_path / "run"
    script = script_with_step_time(tmp_path, 0.5)
    port = free_port()
    procs = [start(script, argv(tiny_text_shards, out), tmp_path, r, 2, port) for r in (0, 1)]
    try:
        before = wait_for_line(procs[0], "step 2/20 |")
        procs[rank].send_signal(sig)
        logs = [p.stderr.read() for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs[0] = "".join(before) + logs[0]
    assert [p.returncode for p in procs] == [130, 130], "\n\n".join(logs)[-4000:]
    assert not any("Traceback" in log for log in logs)
    done = complete_checkpoints(out)
    assert len(done) == 1 and verify_checkpoint(done[0])["world_size"] == 2
    step = int(done[0].name.removeprefix("step-"))
    assert logs[0].endswith(
        f"xc-train: stopped at step {step} ({sig.name if rank == 0 else 'a stop signal on another rank'}); "
        f"checkpoint {done[0]} is intact; rerun the same command to resume\n"
    ), logs[0][-1500:]
    assert "stopped at step" not in logs[1]  # one line, from rank 0
    if rank == 0:
        return
    port = free_port()
    extra = ("--stop-after-steps", "1")
    again = [
        start(script_with_step_time(tmp_path, 0.0), argv(tiny_text_shards, out, *extra), tmp_path, r, 2, port)
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[1] for p in again]
    assert [p.returncode for p in again] == [0, 0], "\n\n".join(logs)[-4000:]
    assert f"resumed from {done[0]} at step {step}" in logs[0] and f"step {step + 1}/20 |" in logs[0]
