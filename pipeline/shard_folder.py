"""The output folder of `xc-prep shard`: its lock, the plan its files were written under, and what
a run may delete (everything it wrote, with --overwrite; the temp files of a killed run, always).

What the folder holds is described in pipeline/shard.py; `.work/` holds plan.json, the lock and one
sidecar per finished work unit (pipeline/shard_units.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.shard_config import ShardConfig, UsageError
from schemas.atomic import TEMP_SUFFIX, write_atomic
from schemas.manifest import MANIFEST_NAME, REJECTS_NAME, TOKENIZER_NAME
from schemas.shards import SHARD_SUFFIX

WORK_DIR = ".work"
PLAN_NAME = "plan.json"
LOCK_NAME = "lock"
SHARD_STEM = "shard-{unit:05d}"
SHARD_GLOB = f"*/shard-*{SHARD_SUFFIX}"


def plan_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between the plan a folder was written with and the current one."""
    diffs = []
    for key, new_value in new["fingerprint"].items():
        old_value = old.get("fingerprint", {}).get(key)
        if old_value != new_value:
            diffs.append(f"{key}: {old_value} -> {new_value}")
    if old.get("samples_per_shard") != new["samples_per_shard"]:
        diffs.append(f"samples_per_shard: {old.get('samples_per_shard')} -> {new['samples_per_shard']}")
    for key, new_value in new["media_policy"].items():
        if (old_value := old.get("media_policy", {}).get(key)) != new_value:
            diffs.append(f"{key}: {old_value} -> {new_value}")
    old_sources = old.get("sources", [])
    if [s.get("path") for s in old_sources] != [s["path"] for s in new["sources"]]:
        diffs.append(
            f"data.txt sources: {[s.get('path') for s in old_sources]} -> {[s['path'] for s in new['sources']]}"
        )
        return diffs
    for o, n in zip(old_sources, new["sources"], strict=True):
        if o.get("input_sha256") != n["input_sha256"]:
            diffs.append(
                f"{n['path']} changed (sha256 {str(o.get('input_sha256'))[:12]}… -> {n['input_sha256'][:12]}…)"
            )
        for key in ("name", "k", "records"):
            if o.get(key) != n[key]:
                diffs.append(f"{n['path']}: {key} {o.get(key)} -> {n[key]}")
    return diffs


def lock_output(out: Path) -> int:
    """Hold an exclusive lock on the folder for this process's life (released even by kill -9)."""
    import fcntl

    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"--out {out}: another `xc-prep shard` is writing to this folder; wait for it or choose another --out"
        ) from None
    return fd


def existing_output(out: Path) -> list[Path]:
    """Files of an earlier `xc-prep shard` run in `out` (the lock file aside)."""
    found = [out / name for name in (MANIFEST_NAME, REJECTS_NAME, TOKENIZER_NAME) if (out / name).exists()]
    found += sorted(out.glob(SHARD_GLOB))
    work = out / WORK_DIR
    if work.is_dir():
        found += sorted(p for p in work.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    return found


def remove_output(out: Path) -> None:
    """--overwrite: delete what `xc-prep shard` writes, and nothing else the folder may hold."""
    remove_temp_files(out)
    for name in (MANIFEST_NAME, REJECTS_NAME, TOKENIZER_NAME):
        (out / name).unlink(missing_ok=True)
    shard_dirs = set()
    for shard in out.glob(SHARD_GLOB):
        shard.unlink()
        shard_dirs.add(shard.parent)
    for folder in shard_dirs:
        if not any(folder.iterdir()):
            folder.rmdir()
    work = out / WORK_DIR
    for entry in work.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != LOCK_NAME:
            entry.unlink()


def remove_temp_files(out: Path) -> None:
    """Temp files of a run that was killed before its rename: never part of the output."""
    for pattern in (f".*{TEMP_SUFFIX}", f"*/.*{TEMP_SUFFIX}", f"{WORK_DIR}/*/.*{TEMP_SUFFIX}"):
        for tmp in out.glob(pattern):
            tmp.unlink()


def prepare_output(config: ShardConfig, plan: dict[str, Any]) -> None:
    """Refuse to mix outputs of different plans; --overwrite clears the folder; record the plan."""
    out = config.out
    plan_path = out / WORK_DIR / PLAN_NAME
    if config.overwrite:
        remove_output(out)
    elif existing := existing_output(out):
        try:
            old_plan = json.loads(plan_path.read_text())
        except FileNotFoundError:
            raise UsageError(
                f"--out {out}: holds output of an earlier run without its {WORK_DIR}/{PLAN_NAME} "
                f"(e.g. {existing[0]}), so it cannot be resumed safely; pass --overwrite to replace it, "
                "or choose another --out"
            ) from None
        except json.JSONDecodeError:
            raise UsageError(
                f"{plan_path}: damaged; pass --overwrite to rebuild {out}, or choose another --out"
            ) from None
        if diffs := plan_differences(old_plan, plan):
            listed = "\n  ".join(diffs)
            raise UsageError(
                f"--out {out}: was written with different settings or inputs; refusing to mix old and new "
                f"shards:\n  {listed}\npass --overwrite to replace its shards, or choose another --out"
            )
    remove_temp_files(out)
    write_atomic(plan_path, (json.dumps(plan, indent=2) + "\n").encode())
