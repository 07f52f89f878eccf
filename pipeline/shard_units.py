"""Work units of `xc-prep shard` and the process pool that runs them.

Unit j of a source covers its records [j*S, (j+1)*S) (S = --samples-per-shard): it checks them with
pipeline/checks.py, builds each valid one (pipeline/build.py), streams the samples into
`<source>/shard-{j:05d}.arrow` and then writes its sidecar `.work/<source>/shard-{j:05d}.json`
(stats, the shard's size and sha256, the rejects), both atomically. A unit whose sidecar exists and
whose shard is intact is reused: that is what lets a re-run resume. `run_units` returns the sidecars
in unit order whatever --workers is.

The shard is written to a local file first (beside its final name in a local folder; in the
temp folder, $TMPDIR, for an object store) and published whole (`Store.publish_file`), so an
object store never holds a part of one; its sidecar, written after it, is what marks the unit done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checks import (
    BUG_HINT,
    HINTS,
    RecordCheck,
    ValidateOptions,
    check_records,
    exception_text,
    shallow_records,
)
from pipeline.json_source import dumps_json
from pipeline.shard_config import ShardConfig, validate_options
from pipeline.shard_folder import SHARD_STEM, SHARD_SUFFIX, WORK_DIR
from pipeline.workers import start_worker, stop_pool
from schemas.atomic import temp_path
from schemas.record import Source
from schemas.report import Finding
from schemas.storage import Store

PROGRESS_POLL_S = 0.5


class WorkerDied(Exception):
    """A worker process was killed (e.g. by the out-of-memory killer); finished units are kept."""


@dataclass
class SourceInput:
    """One data.txt source after the whole-file work: what its work units need."""

    source: Source
    input_sha256: str
    records: list[Any]
    """The JSON file's top-level list, unchecked."""
    duplicates: dict[int, Finding]
    """`duplicate_id` finding by record index (needs the whole file: `read_inputs` computes it once)."""


@dataclass(frozen=True)
class UnitTask:
    """Records [start, end) of one source: one shard file and one sidecar."""

    source_pos: int
    source: Source
    unit: int
    records: tuple[int, int]
    raw: tuple[Any, ...]
    """The JSON values of records [start, end)."""
    duplicates: dict[int, Finding]
    """`duplicate_id` findings of records in the range, from the whole-file pass."""
    store: Store
    """The output folder (--out)."""

    @property
    def source_name(self) -> str:
        return self.source.name

    @property
    def file(self) -> str:
        """The JSON path as written in data.txt."""
        return self.source.path

    @property
    def shard_file(self) -> str:
        """Shard path relative to --out (as listed in the manifest)."""
        return f"{self.source_name}/{SHARD_STEM.format(unit=self.unit)}{SHARD_SUFFIX}"

    @property
    def sidecar_file(self) -> str:
        """Sidecar path relative to --out."""
        return f"{WORK_DIR}/{self.source_name}/{SHARD_STEM.format(unit=self.unit)}.json"

    def local_temp(self) -> Path:
        """Where the shard is written before it is published: its temp name in a local folder, a
        file in $TMPDIR for an object store."""
        if self.store.is_local:
            return temp_path(self.store.local_path(self.shard_file))
        name = f"xc-prep-{uuid.uuid4().hex}{SHARD_SUFFIX}"
        return Path(tempfile.gettempdir()) / name


def make_tasks(config: ShardConfig, inputs: list[SourceInput]) -> list[UnitTask]:
    """One task per unit; with --workers > 1 the records are made fit to send (`shallow_records`)."""
    size = config.samples_per_shard
    store = config.store()
    tasks = []
    for pos, si in enumerate(inputs):
        for unit, start in enumerate(range(0, len(si.records), size)):
            end = min(start + size, len(si.records))
            raw = si.records[start:end]
            tasks.append(
                UnitTask(
                    source_pos=pos,
                    source=si.source,
                    unit=unit,
                    records=(start, end),
                    raw=tuple(shallow_records(raw) if config.workers > 1 else raw),
                    duplicates={i: f for i, f in si.duplicates.items() if start <= i < end},
                    store=store,
                )
            )
    return tasks


def finished_unit(task: UnitTask) -> dict[str, Any] | None:
    """The sidecar of a unit an earlier run finished, if its shard is still intact; else None.

    Intact: the recorded size, and in a local folder the recorded sha256 too (a damaged file is
    rebuilt). An object store keeps what it accepted, and reading every shard back to hash it
    would download the corpus: there the size is checked, and each sample's own checksum when read.
    """
    store = task.store
    if store.size(task.sidecar_file) is None:
        return None
    try:
        sidecar = json.loads(store.read_bytes(task.sidecar_file))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if sidecar.get("records") != list(task.records):
        return None
    shard = sidecar.get("shard")
    size = store.size(task.shard_file)
    if shard is None:
        return None if size is not None else sidecar
    if size != shard["bytes"]:
        return None
    if store.is_local:
        from schemas.shards import file_sha256

        if file_sha256(store.local_path(task.shard_file)) != shard["sha256"]:
            return None
    return sidecar


def unit_checks(task: UnitTask, opts: ValidateOptions) -> list[RecordCheck]:
    """validate's checks of the unit's records, with the whole-file duplicate-id findings applied
    exactly as `mark_duplicate_ids` applies them (finding appended, record dropped)."""
    checks = check_records(task.source, list(task.raw), task.records[0], opts)
    return [
        dataclasses.replace(c, record=None, findings=[*c.findings, task.duplicates[c.index]])
        if c.index in task.duplicates
        else c
        for c in checks
    ]


def reject_json(findings: list[Finding]) -> dict[str, Any]:
    """One rejects.jsonl line for a record: its first error, with the other errors' codes appended."""
    first, *more = findings
    line = first.to_json()
    if more:
        line["message"] += f" (+{len(more)} more: {', '.join(dict.fromkeys(f.code for f in more))})"
    return line


def run_unit(
    task: UnitTask, config: ShardConfig, tokenizer: Any, progress: Callable[[int], None]
) -> tuple[dict[str, Any], bool]:
    """Build, write and record one unit, or reuse an earlier run's; returns (sidecar, reused)."""
    from pipeline.build import build_sample
    from pipeline.errors import DataError
    from schemas.shards import ShardWriter

    if (done := finished_unit(task)) is not None:
        progress(task.records[1] - task.records[0])
        return done, True
    stats = {
        "records_read": task.records[1] - task.records[0],
        "samples_written": 0,
        "rejected": 0,
        "total_tokens": 0,
        "trained_tokens": 0,
        "tiles": 0,
        "warnings": 0,
        "truncated": 0,
    }
    rejects: list[dict[str, Any]] = []
    tmp = task.local_temp()
    writer: ShardWriter | None = None
    try:
        for check in unit_checks(task, validate_options(config)):
            errors = [f for f in check.findings if f.severity == "error"]
            stats["warnings"] += len(check.findings) - len(errors)
            if errors or check.record is None:
                assert errors, f"{task.file} record {check.index}: no record and no error finding"
                rejects.append(reject_json(errors))
                progress(1)
                continue
            try:
                sample = build_sample(
                    check.record,
                    tokenizer,
                    source_name=task.source_name,
                    file=task.file,
                    index=check.index,
                    hd_num=config.hd_num,
                    style=config.style,
                    layout=config.layout,
                    max_length=config.max_length,
                    font_path=config.font,
                    max_image_pixels=config.max_image_pixels,
                )
            except DataError as e:
                hint = e.hint or HINTS.get(e.code, "")  # the fix the checks give for this code
                rejects.append(
                    Finding(task.file, None, check.index, check.id, e.code, e.message, hint=hint).to_json()
                )
                progress(1)
                continue
            except Exception as e:
                # Not a rule about the data (those raise DataError) but an error inside the build:
                # this record is left out, the run goes on, and `xc-prep shard` exits 1 naming it.
                message = f"building the sample failed: {exception_text(e)}"
                finding = Finding(
                    task.file, None, check.index, check.id, "build_failed", message, hint=BUG_HINT
                )
                rejects.append(finding.to_json())
                progress(1)
                continue
            if writer is None:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                writer = ShardWriter(tmp, config.tile_codec, config.stored_jpeg_quality)
            writer.write(sample)
            stats["samples_written"] += 1
            stats["total_tokens"] += sample.num_tokens
            stats["trained_tokens"] += sample.num_trained
            stats["tiles"] += sample.num_tiles
            stats["truncated"] += int(bool(sample.extra.get("truncated")))
            progress(1)
    except BaseException:
        if writer is not None:
            writer.close()
            tmp.unlink(missing_ok=True)
        raise
    stats["rejected"] = len(rejects)
    shard = None
    if writer is not None:
        writer.close()
        shard = {
            "file": task.shard_file,
            "records": list(task.records),
            "samples": stats["samples_written"],
            "bytes": writer.bytes,
            "sha256": writer.sha256,
        }
        task.store.publish_file(tmp, task.shard_file)
    else:
        task.store.delete(task.shard_file)  # a stale shard from an interrupted older attempt
    sidecar = {
        "unit": task.unit,
        "records": list(task.records),
        "stats": stats,
        "shard": shard,
        "rejects": rejects,
    }
    task.store.write_bytes(task.sidecar_file, (dumps_json(sidecar, indent=1) + "\n").encode())
    return sidecar, False


# Worker-process state for the pool (set by the initializer; the tokenizer loads once per process).
_worker_config: ShardConfig | None = None
_worker_tokenizer: Any = None
_worker_counters: Any = None


def _init_worker(config: ShardConfig, counters: Any) -> None:
    from pipeline.tokenization import Tokenizer

    global _worker_config, _worker_tokenizer, _worker_counters
    _worker_config, _worker_counters = config, counters
    assert config.tokenizer is not None, "checked by ShardConfig.check"
    _worker_tokenizer = Tokenizer.from_path(config.tokenizer)


def _run_unit_in_worker(task: UnitTask) -> tuple[dict[str, Any], bool]:
    assert _worker_config is not None, "worker not initialized"

    def progress(n: int) -> None:
        with _worker_counters.get_lock():
            _worker_counters[task.source_pos] += n

    return run_unit(task, _worker_config, _worker_tokenizer, progress)


class Progress:
    """One tqdm bar per source on stderr with samples/s and ETA; when stderr is not a terminal (a
    log file), a progress line every few seconds instead (pipeline/progress.py). The totals are the
    records of `tasks`, the units this run builds (a --part builds a share of them)."""

    def __init__(self, inputs: list[SourceInput], tasks: list[UnitTask]):
        from tqdm import tqdm

        from pipeline.progress import ProgressLines

        totals = [0] * len(inputs)
        for task in tasks:
            totals[task.source_pos] += task.records[1] - task.records[0]
        terminal = sys.stderr.isatty()
        self.lines = None if terminal else ProgressLines("xc-prep shard", sum(totals), "samples")
        self.bars = [
            tqdm(
                total=totals[i],
                desc=si.source.name,
                unit="sample",
                position=i,
                leave=True,
                file=sys.stderr,
                disable=not terminal,
                dynamic_ncols=True,
            )
            for i, si in enumerate(inputs)
        ]

    def add(self, source_pos: int, n: int) -> None:
        self.bars[source_pos].update(n)
        if self.lines is not None:
            self.lines.add(n)

    def set(self, counts: Any) -> None:
        for bar, count in zip(self.bars, counts, strict=True):
            if count != bar.n:
                bar.update(count - bar.n)
        if self.lines is not None:
            self.lines.set(sum(counts))

    def close(self) -> None:
        for bar in self.bars:
            bar.close()
        if self.lines is not None:
            self.lines.close()


def run_units(
    config: ShardConfig, tokenizer: Any, tasks: list[UnitTask], progress: Progress
) -> list[tuple[dict[str, Any], bool]]:
    """Run every unit, in a pool when --workers > 1 (or as Ray tasks with --engine ray); results
    come back in unit order."""
    if config.engine == "ray":
        from pipeline.shard_ray import run_units_on_ray

        return run_units_on_ray(config, tasks, progress)
    workers = min(config.workers, len(tasks))
    if workers <= 1:
        return [run_unit(t, config, tokenizer, functools.partial(progress.add, t.source_pos)) for t in tasks]
    # spawn: no fork of a process holding tqdm's threads. An executor, not multiprocessing.Pool:
    # a worker that dies (or fails to start) raises BrokenProcessPool instead of hanging the run.
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.Array("q", len(progress.bars))
    results = []
    pool = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=start_worker,  # dies with this process, leaves Ctrl-C and SIGTERM to it
        initargs=(os.getpid(), _init_worker, config, counters),
    )
    waiting_for = tasks[0]
    try:
        futures = [pool.submit(_run_unit_in_worker, task) for task in tasks]
        for task, future in zip(tasks, futures, strict=True):
            waiting_for = task
            while True:
                try:
                    results.append(future.result(timeout=PROGRESS_POLL_S))
                    break
                except FutureTimeoutError:
                    progress.set(counters[:])
            progress.set(counters[:])
    except BaseException as e:
        # Ctrl-C, SIGTERM, an error writing a unit or a dead worker: stop the other workers now
        # rather than after their current unit; what they leave half-written is a temp file the
        # next run deletes.
        stop_pool(pool)
        if isinstance(e, BrokenProcessPool):
            unit = waiting_for
            raise WorkerDied(
                f"a worker process died while building {unit.shard_file} (records {unit.records[0]}.."
                f"{unit.records[1] - 1} of {unit.file}): killed, or out of memory? Finished shards are kept; "
                "re-run the same command to resume (with fewer --workers if memory is short)"
            ) from e
        raise
    pool.shutdown(wait=True)
    return results
