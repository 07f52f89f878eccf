"""Trainer faults (issue 10): NaN loss, full disk and truncated files in checkpoints, corrupted shards.

Each test injects the fault into a real run (tiny preset, DeepSpeed on gloo, text-only shards)
and checks what the user sees and that the last good checkpoint stays usable.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.cli import main as train_main
from trainer.model import IXCModel

pytestmark = pytest.mark.slow


def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "full",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "0", "--learning-rate", "1e-3",
        "--save-every-steps", "1", "--log-every-steps", "1", *extra,
    ]  # fmt: skip


def poison_forward(monkeypatch: pytest.MonkeyPatch, *, call: int, factor: float) -> None:
    """Make the `call`-th model forward return a non-finite loss (loss × factor)."""
    real_forward = IXCModel.forward
    calls = {"n": 0}

    def forward(self: IXCModel, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call and out.loss_sum is not None:
            out.loss_sum = out.loss_sum * factor
        return out

    monkeypatch.setattr(IXCModel, "forward", forward)


def test_nan_loss_stops_naming_the_samples_and_keeps_the_last_checkpoint(
    tiny_text_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_forward = IXCModel.forward
    poison_forward(monkeypatch, call=5, factor=float("nan"))  # the 5th micro-batch (step 3)
    out = tmp_path / "run"
    assert train_main(run_args(tiny_text_shards, out, "--epochs", "1")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 0 step 2" in err and "samples (source, index, id)" in err
    assert "001-text" in err and "is intact" in err
    done = ckpt.complete_checkpoints(out)
    assert [p.name for p in done][-1] == "step-00000002"
    # the last good checkpoint is usable: a rerun without the fault resumes from it and finishes
    monkeypatch.setattr(IXCModel, "forward", real_forward)
    assert train_main(run_args(tiny_text_shards, out, "--epochs", "1", "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "at step 2" in err


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


@pytest.mark.parametrize("save_every", [1, 100])
def test_non_finite_gradient_norm_stops_at_its_step_naming_the_samples(
    tiny_text_shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    save_every: int,
) -> None:
    """A finite loss with non-finite gradients: the run halts at that step, naming its samples,
    before any checkpoint of it and before the next step."""
    real_forward = IXCModel.forward
    calls = {"n": 0}

    def forward(self: IXCModel, *args: Any, **kwargs: Any) -> Any:
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3 and out.loss_sum is not None:  # step 1's first micro-batch
            out.loss_sum = _InfiniteGradient.apply(out.loss_sum)
        return out

    monkeypatch.setattr(IXCModel, "forward", forward)
    out = tmp_path / "run"
    args = run_args(tiny_text_shards, out, "--epochs", "1", "--save-every-steps", str(save_every))
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite gradient norm" in err and "at step 1; samples:" in err and "001-text" in err
    assert calls["n"] == 4  # two micro-batches a step: nothing of step 2 ran
    done = [p.name for p in ckpt.complete_checkpoints(out)]
    assert done == (["step-00000001"] if save_every == 1 else [])


def test_nan_policy_skip_finishes_and_lists_the_skipped_samples(
    tiny_text_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_forward(monkeypatch, call=2, factor=float("inf"))
    out = tmp_path / "run"
    assert train_main(run_args(tiny_text_shards, out, "--nan-policy", "skip", "--no-save-final")) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_samples"] and all(k[0] == "001-text" for k in summary["skipped_samples"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])


def test_full_disk_during_a_checkpoint_is_a_clear_error_and_keeps_the_previous_one(
    tiny_text_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import deepspeed

    real_save = deepspeed.DeepSpeedEngine.save_checkpoint
    calls = {"n": 0}

    def save_checkpoint(self, save_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: part of it is written, then the disk is full
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            (Path(save_dir) / "half-written.pt").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(save_dir))
        return real_save(self, save_dir, *args, **kwargs)

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", save_checkpoint)
    out = tmp_path / "run"
    assert train_main(run_args(tiny_text_shards, out, "--epochs", "2")) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-00000001" in err and "is intact" in err
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000001"]
    assert (out / "checkpoints" / "step-00000002.partial").is_dir()  # never taken for a checkpoint
    assert ckpt.resolve_resume(out, "auto") == out / "checkpoints" / "step-00000001"
    ckpt.verify_checkpoint(out / "checkpoints" / "step-00000001")


def test_truncated_checkpoint_is_detected_naming_the_file(
    tiny_text_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert train_main(run_args(tiny_text_shards, out, "--no-save-final")) == 0
    latest = ckpt.complete_checkpoints(out)[-1]
    victim = max((p for p in (latest / "ds").rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or damaged checkpoint") as e:
        ckpt.verify_checkpoint(latest)
    assert str(victim) in str(e.value)
    assert train_main(run_args(tiny_text_shards, out, "--resume", str(latest))) == 1
    assert str(victim) in capsys.readouterr().err


def test_elastic_resume_puts_fused_adams_step_counts_beside_their_parameters() -> None:
    """DeepSpeed's universal loader leaves Adam's `step` on the CPU; torch's fused AdamW (the CUDA
    default) then refuses to step ("state_steps is on cpu"). Seen on 2 × H200, 2 -> 1 ranks."""
    fused, plain = (torch.nn.Parameter(torch.zeros(2, device="meta")) for _ in range(2))
    inner = torch.optim.SGD([fused, plain], lr=0.1)  # any torch optimizer: only groups and state are read
    inner.param_groups = [{"params": [fused], "fused": True}, {"params": [plain], "fused": None}]
    inner.state[fused]["step"] = torch.tensor(3.0)
    inner.state[plain]["step"] = torch.tensor(3.0)

    class ZeroWrapper:  # DeepSpeed's optimizers hold torch's as `.optimizer`
        optimizer = inner

    ckpt.steps_beside_params(ZeroWrapper())
    assert inner.state[fused]["step"].device.type == "meta"  # beside its parameter
    assert inner.state[plain]["step"].device.type == "cpu"  # foreach/for-loop Adam wants it there


def test_corrupted_shard_stops_before_any_step(
    tiny_text_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from schemas.shards import ShardReader, token_columns

    shards = tmp_path / "shards"
    shutil.copytree(tiny_text_shards, shards)
    (victim,) = shards.rglob("*.arrow")
    data = bytearray(victim.read_bytes())
    for sample in ShardReader(victim):  # one flipped bit in every sample's token ids
        at = data.find(token_columns(sample)[0].tobytes())
        assert at > 0
        data[at + 4] ^= 0x01
    victim.write_bytes(bytes(data))
    out = tmp_path / "run"
    assert train_main(run_args(shards, out)) == 1
    err = capsys.readouterr().err
    assert f"{victim}: row" in err and "does not match its sha256" in err and "xc-prep shard" in err
    assert not (out / "checkpoints").exists()


FULL_DISK_ON_RANK0 = """
import errno, os, sys
import torch.distributed as dist
from trainer import checkpoint
from trainer.cli import main

real = checkpoint.write_json_atomic
def write(path, data):
    # rank 0 alone finishes a checkpoint; at the second one its disk is full
    if dist.get_rank() == 0 and data.get("step") == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real(path, data)
checkpoint.write_json_atomic = write
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
def test_full_disk_on_one_rank_stops_every_rank_with_the_error(
    tiny_text_shards: Path, tmp_path: Path
) -> None:
    """Two gloo ranks; rank 0's disk fills while it completes a checkpoint: both ranks stop promptly
    with the checkpoint error (none left waiting in a collective), the previous checkpoint intact."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    repo = Path(__file__).resolve().parent.parent
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(repo),
        )  # fmt: skip
        cmd = [sys.executable, "-c", FULL_DISK_ON_RANK0, *run_args(tiny_text_shards, out, "--epochs", "2")]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    started = time.monotonic()
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"both ranks stopped {time.monotonic() - started:.1f} s after launch")
    assert [p.returncode for p in procs] == [1, 1], "\n\n".join(logs)
    assert "No space left on device" in logs[0] and "step-00000001" in logs[0] and "is intact" in logs[0]
    assert "step-00000002" in logs[1] and "another rank" in logs[1], logs[1]
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000001"]
