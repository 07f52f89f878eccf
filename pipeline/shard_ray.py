"""`xc-prep shard --engine ray`: the work units of pipeline/shard_units.py as Ray tasks.

For teams that already run a Ray cluster: each unit is one task (one CPU) running the very
`run_unit` the local process pool runs, so the shards, sidecars and manifest are byte for byte the
local pool's. The driver (this process) reads the inputs, plans, and merges the sidecars the tasks
return, in unit order; the tasks write the shards and sidecars themselves, so --out must be a
location every node reaches (s3://..., or a shared file system at the same path), and so must
data.txt's JSON files' media, the tokenizer and --font; each task runs in the driver's current
directory, where relative paths start.

The cluster: the one `ray.init()` finds (RAY_ADDRESS, or a `ray start` on this machine); a
process that already called `ray.init` keeps its own. `ray` is the optional `[ray]` extra.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pipeline.shard_config import ShardConfig, UsageError
from pipeline.shard_units import Progress, UnitTask, run_unit

WAIT_S = 0.5
PROBE_TIMEOUT_S = 5.0
"""How long to wait for the cluster's address to answer before saying none is there (Ray itself
retries a dead address for minutes)."""
TASK_RETRIES = 2
"""Ray re-runs a task whose worker died (a lost node) this many times; a unit's output is the same
whoever writes it, and a resumed `xc-prep shard` redoes what is still missing."""

_tokenizers: dict[str, Any] = {}


def _unit_on_worker(config: ShardConfig, task: UnitTask, cwd: str) -> tuple[dict[str, Any], bool]:
    """One unit inside a Ray worker, in the driver's current directory (relative media paths and
    the allowed folders start there); the tokenizer loads once per worker process."""
    from pipeline.tokenization import Tokenizer

    os.chdir(cwd)
    assert config.tokenizer is not None, "checked by ShardConfig.check"
    key = str(config.tokenizer)
    if key not in _tokenizers:
        _tokenizers[key] = Tokenizer.from_path(config.tokenizer)
    return run_unit(task, config, _tokenizers[key], lambda n: None)


def connect() -> Any:
    """The `ray` module, connected to the cluster (UsageError saying how when it cannot)."""
    try:
        import ray
    except ImportError as e:
        raise UsageError("--engine ray needs Ray: pip install 'xcomposer-finetune[ray]'") from e
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "auto")
        try:
            probe(address)
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            raise UsageError(
                f"--engine ray: no Ray cluster at {address!r} ({e}); start one (`ray start --head` here, "
                "or on the head node) and set RAY_ADDRESS=HOST:PORT, or use --engine local"
            ) from e
    return ray


def probe(address: str) -> None:
    """Raise OSError at once if nothing listens at a HOST:PORT (or ray://HOST:PORT) address; "auto"
    is left to Ray, which fails fast when no local cluster is recorded."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
        pass


def run_units_on_ray(
    config: ShardConfig, tasks: list[UnitTask], progress: Progress
) -> list[tuple[dict[str, Any], bool]]:
    """Run every unit as a Ray task; results in unit order. Ctrl-C cancels the tasks in flight
    (finished units are kept: their sidecars are written)."""
    if not tasks:
        return []
    ray = connect()
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_unit_on_worker)
    config_ref = ray.put(config)
    refs = [remote.remote(config_ref, task, os.getcwd()) for task in tasks]
    position = {ref: j for j, ref in enumerate(refs)}
    results: list[tuple[dict[str, Any], bool] | None] = [None] * len(tasks)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
            for ref in done:
                j = position[ref]
                results[j] = ray.get(ref)
                task = tasks[j]
                progress.add(task.source_pos, task.records[1] - task.records[0])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    assert all(r is not None for r in results), "every task returned"
    return [r for r in results if r is not None]
