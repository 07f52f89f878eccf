"""Resumable training checkpoints: atomic, keep-last-K, model + optimizer + scheduler + loader + RNG.

Layout under `<output_dir>/checkpoints/`:
  step-00000120/            a complete checkpoint (renamed into place only once every rank wrote)
    ds/                     DeepSpeed's own files (model, optimizer and scheduler state per rank)
    rng-rank00000.pt        each rank's torch (and CUDA) RNG state
    trainer_state.json      step, loader state, config, metrics — written last, then the rename
  step-00000140.partial/    an interrupted write: never taken for a checkpoint, removed on resume
A checkpoint is complete iff its folder name has no `.partial` suffix; the rename is the commit.
`trainer_state.json` lists every other file of the checkpoint with its size: a truncated or
missing file is reported, naming it, before DeepSpeed reads anything.

`<output_dir>/best/` (the model or adapter of the best held-out loss) is replaced the same way:
written as `best.partial/`, then renamed into place (`replace_folder`, `recover_folder`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from schemas.atomic import publish_tree, write_json_atomic
from trainer.errors import CheckpointError
from trainer.model import IXCModel, unused_adapters_excluded

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: 'auto' → latest complete one (or None), 'none' → None, else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
            f"complete ones: {[str(p) for p in complete_checkpoints(output_dir)] or 'none'}"
        )
    return path


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """Collective, in place of a barrier: True iff every rank's `ok` is. A rank that failed tells
    the others, so that all raise together instead of some waiting in a collective for it."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor(
        [int(ok)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu"
    )
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_checkpoint(
    engine: Any, output_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint's folder.

    An OSError (full disk, quota, vanished mount) raises CheckpointError on every rank: the rank
    that hit it names the error, the others say another rank failed. Failures inside DeepSpeed's
    own save (which has collectives of its own) reach the other ranks as a backend error instead.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    partial = root / (final.name + PARTIAL_SUFFIX)
    rank = _rank()
    failure: OSError | None = None

    def phase(work: Callable[[], None]) -> None:
        nonlocal failure
        if failure is None:
            try:
                work()
            except OSError as e:  # the older checkpoints are untouched
                failure = e
        if not _all_ok(failure is None):
            raise _write_failed(output_dir, final, partial, failure) from failure

    def prepare() -> None:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()

    def write_rank_files() -> None:
        # Frozen weights (a LoRA run's whole base model, the 2.42 B unused adapters of any run) are
        # not training state: the resumed run rebuilds them from --model (`check_same_model`), so a
        # checkpoint holds only what trains.
        with contextlib.ExitStack() as stack:
            for model in engine.module.modules():
                if isinstance(model, IXCModel):
                    stack.enter_context(unused_adapters_excluded(model))
            engine.save_checkpoint(str(partial / "ds"), tag="state", exclude_frozen_parameters=True)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, partial / f"rng-rank{rank:05d}.pt")

    def commit() -> None:
        if rank != 0:
            return
        files = {
            str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()
        }
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        record = {"step": step, "world_size": world_size, **trainer_state, "files": files}
        write_json_atomic(partial / STATE_FILE, record)
        shutil.rmtree(final, ignore_errors=True)
        publish_tree(partial, final)  # every file durable before the rename that commits them
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    phase(prepare)
    phase(write_rank_files)
    phase(commit)
    return final


def _write_failed(output_dir: Path, final: Path, partial: Path, failure: OSError | None) -> CheckpointError:
    done = [p for p in complete_checkpoints(output_dir) if p != final]
    previous = (
        f"the last complete checkpoint {done[-1]} is intact" if done else "no earlier checkpoint exists"
    )
    cause = f"{failure}" if failure is not None else "another rank failed to write its part (see its log)"
    return CheckpointError(
        f"writing checkpoint {final.name} under {final.parent} failed: {cause}; {previous} (the "
        f"unfinished {partial.name} is never used). Free space and rerun with --resume auto"
    )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint whose files all have their recorded sizes."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path / STATE_FILE}: unreadable ({e}); resume from an earlier checkpoint"
        ) from e
    for rel, size in state.get("files", {}).items():
        f = path / rel
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, expected {size}"
            older = [str(p) for p in complete_checkpoints(path.parent.parent) if p != path]
            raise CheckpointError(
                f"{f}: {found} (truncated or damaged checkpoint); resume from an earlier one with "
                f"--resume {older[-1] if older else 'none'}"
            )
    return state


def check_same_model(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """The frozen weights of a resumed run come from its --model (and --seed, for a preset's random
    init), not from the checkpoint: both must be the saved run's."""
    saved = state.get("config", {})
    for key in ("model", "seed"):
        if key in saved and saved[key] != config[key]:
            raise CheckpointError(
                f"{path}: saved by a run with --{key} {saved[key]}, this run has --{key} {config[key]}; "
                f"the frozen weights are not in the checkpoint, so resume with --{key} {saved[key]} "
                "(or --resume none to start over)"
            )


def needs_universal(state: dict[str, Any], world_size: int) -> bool:
    """A checkpoint from another data-parallel size: ZeRO's partitioned optimizer state must be
    re-split, which DeepSpeed does from its 'universal' checkpoint format (`load_universal`)."""
    return int(state.get("world_size", world_size)) != world_size


def _universal_dir(path: Path) -> Path:
    return Path(path) / "universal"


def convert_to_universal(path: Path) -> Path:
    """Rank 0: DeepSpeed's ds_to_universal of the checkpoint's ZeRO state, written atomically once."""
    target = _universal_dir(path)
    failed = None
    if _rank() == 0 and not target.is_dir():
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(Path(path) / "ds" / "state"), "--output_folder", str(partial / "state"),
            "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            failed = done.stderr[-2000:]
        else:
            os.replace(partial, target)
    # Every rank reaches the barrier, then every rank fails (no rank waits for one that raised).
    _barrier()
    if failed is not None or not target.is_dir():
        raise CheckpointError(
            f"{path}: converting to DeepSpeed's universal format for a resume on another number "
            f"of ranks failed" + (f":\n{failed}" if failed is not None else " (see rank 0's message)")
        )
    return target


def load_checkpoint(engine: Any, path: Path) -> dict[str, Any]:
    """Collective: restore DeepSpeed state and this rank's RNG; returns the trainer state.

    A checkpoint saved on another number of ranks is loaded from its universal conversion
    (`convert_to_universal`, which the caller runs before building the engine with
    `checkpoint.load_universal`).
    """
    path = Path(path)
    state = verify_checkpoint(path)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    load_dir = _universal_dir(path) if needs_universal(state, world_size) else path / "ds"
    # Not strict: frozen weights are not in the checkpoint (see save_checkpoint).
    load_path, _ = engine.load_checkpoint(str(load_dir), tag="state", load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"{path / 'ds'}: DeepSpeed found no checkpoint to load (damaged folder?)")
    steps_beside_params(engine.optimizer)
    rng_file = path / f"rng-rank{_rank():05d}.pt"
    if rng_file.is_file():  # a resume on more ranks than saved starts the extra ranks' RNG fresh
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def steps_beside_params(optimizer: Any) -> None:
    """Adam's step counts on their parameters' device where the optimizer needs them there.

    DeepSpeed's universal loader (elastic resume) sets each `step` as a CPU tensor; torch's fused
    (and capturable) AdamW then refuses to step CUDA parameters ("state_steps is on cpu"). Its own
    `load_state_dict` moves them, so only the universal path needs this.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO and DeepSpeed's bf16 wrap torch's
    for group in getattr(inner, "param_groups", []):
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            step = inner.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device != param.device:
                inner.state[param]["step"] = step.to(param.device, torch.float32)


PREVIOUS_SUFFIX = ".previous"


def replace_folder(partial: Path, final: Path) -> None:
    """Put the complete folder `partial` in place of `final`: the old one is renamed aside first and
    removed last, so a crash leaves either folder whole (`recover_folder` puts it back)."""
    previous = final.with_name(final.name + PREVIOUS_SUFFIX)
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    publish_tree(partial, final)
    shutil.rmtree(previous, ignore_errors=True)


def recover_folder(final: Path) -> None:
    """After a crash inside `replace_folder`: keep the newest whole folder, drop the unfinished one."""
    previous = final.with_name(final.name + PREVIOUS_SUFFIX)
    if previous.is_dir() and not final.exists():
        os.replace(previous, final)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(final.with_name(final.name + PARTIAL_SUFFIX), ignore_errors=True)


def remove_partials(output_dir: Path) -> list[Path]:
    """Delete interrupted checkpoint writes (rank 0, before training); returns what was removed."""
    root = checkpoint_root(output_dir)
    removed = []
    if root.is_dir() and _rank() == 0:
        for p in root.glob("*" + PARTIAL_SUFFIX):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
