"""The output folder of `xc-prep shard`: its lock, the plan its files were written under, and what
a run may delete (everything it wrote, with --overwrite; the temp files of a killed run, always).

What the folder holds is described in pipeline/shard.py; `.work/` holds plan.json, the lock and one
sidecar per finished work unit (pipeline/shard_units.py), and while `--part` runs are under way
their locks and one record per finished part (`--finalize` deletes both). The folder may be an
object-store prefix: everything goes through its `schemas.storage.Store`.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

from pipeline.shard_config import ShardConfig, UsageError
from schemas.atomic import TEMP_SUFFIX
from schemas.manifest import MANIFEST_NAME, REJECTS_NAME, TOKENIZER_NAME
from schemas.shards import SHARD_SUFFIX
from schemas.storage import Lock, LockHeld, StorageError, Store

WORK_DIR = ".work"
PLAN_NAME = "plan.json"
LOCK_NAME = "lock"
PARTS_DIR = f"{WORK_DIR}/parts"
"""One record per finished --part (`part-I-of-N.json`): how --finalize names the missing parts."""
SHARD_STEM = "shard-{unit:05d}"
SHARD_GLOB = f"*/shard-*{SHARD_SUFFIX}"


def lock_name(part: tuple[int, int] | None) -> str:
    """The lock of a whole run (and of --finalize), or of one --part: parts run side by side."""
    if part is None:
        return f"{WORK_DIR}/{LOCK_NAME}"
    return f"{WORK_DIR}/{LOCK_NAME}-part-{part[0]}-of-{part[1]}"


def part_record(part: tuple[int, int]) -> str:
    return f"{PARTS_DIR}/part-{part[0]}-of-{part[1]}.json"


def is_run_state(rel: str) -> bool:
    """Locks and part records: bookkeeping of runs in progress, not output."""
    name = rel.rsplit("/", 1)[-1]
    return rel.startswith(PARTS_DIR + "/") or (rel.startswith(WORK_DIR + "/") and name.startswith(LOCK_NAME))


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


def lock_output(store: Store, part: tuple[int, int] | None = None) -> Lock:
    """Hold the folder's (or one part's) lock for this run: a flock (released even by kill -9), or a
    lease object on an object store (expires LEASE_TTL_S after a crash)."""
    try:
        return store.lock(
            lock_name(part), "`xc-prep shard`" + (f" --part {part[0]}/{part[1]}" if part else "")
        )
    except LockHeld as e:
        raise UsageError(f"--out {e}") from None
    except StorageError as e:
        raise UsageError(f"--out {store.url()}: {e}") from None


def existing_output(store: Store) -> list[str]:
    """Files of an earlier `xc-prep shard` run in the folder (locks aside), relative to it."""
    names = (MANIFEST_NAME, REJECTS_NAME, TOKENIZER_NAME)
    found = []
    for rel in store.list_files():
        if rel in names or fnmatch.fnmatch(rel, SHARD_GLOB) and rel.count("/") == 1:
            found.append(rel)
        elif rel.startswith(WORK_DIR + "/") and not is_run_state(rel):
            found.append(rel)
    return found


def remove_output(store: Store) -> None:
    """--overwrite: delete what `xc-prep shard` writes, and nothing else the folder may hold."""
    remove_temp_files(store)
    written = existing_output(store) + store.list_files(PARTS_DIR)
    for rel in written:
        store.delete(rel)
    if store.is_local:  # the folders they leave empty (an object store has none)
        out = store.local_path()
        for folder in {(out / rel).parent for rel in written}:
            while folder != out and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


def remove_temp_files(store: Store) -> None:
    """Temp files of a run that was killed before its rename: never part of the output (an object
    store has none: its objects appear whole)."""
    if not store.is_local:
        return
    out = store.local_path()
    for pattern in (f".*{TEMP_SUFFIX}", f"*/.*{TEMP_SUFFIX}", f"{WORK_DIR}/*/.*{TEMP_SUFFIX}"):
        for tmp in out.glob(pattern):
            tmp.unlink()


def prepare_output(config: ShardConfig, plan: dict[str, Any]) -> None:
    """Refuse to mix outputs of different plans; --overwrite clears the folder; record the plan."""
    store = config.store()
    out = config.out
    plan_rel = f"{WORK_DIR}/{PLAN_NAME}"
    if config.overwrite:
        remove_output(store)
    elif existing := existing_output(store):
        if store.size(plan_rel) is None:
            raise UsageError(
                f"--out {out}: holds output of an earlier run without its {WORK_DIR}/{PLAN_NAME} "
                f"(e.g. {store.url(existing[0])}), so it cannot be resumed safely; pass --overwrite to "
                "replace it, or choose another --out"
            )
        try:
            old_plan = json.loads(store.read_bytes(plan_rel))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(
                f"{store.url(plan_rel)}: damaged; pass --overwrite to rebuild {out}, or choose another --out"
            ) from None
        if diffs := plan_differences(old_plan, plan):
            listed = "\n  ".join(diffs)
            raise UsageError(
                f"--out {out}: was written with different settings or inputs; refusing to mix old and new "
                f"shards:\n  {listed}\npass --overwrite to replace its shards, or choose another --out"
            )
    remove_temp_files(store)
    store.write_bytes(plan_rel, (json.dumps(plan, indent=2) + "\n").encode())


def clear_run_state(store: Store) -> None:
    """After --finalize: the part records and the parts' locks (the folder's own lock stays, as
    after a one-host run), so the folder holds exactly what a one-host run leaves."""
    for rel in store.list_files(WORK_DIR):
        if is_run_state(rel) and rel != lock_name(None):
            store.delete(rel)
    if store.is_local and (parts := store.local_path(PARTS_DIR)).is_dir() and not any(parts.iterdir()):
        parts.rmdir()
