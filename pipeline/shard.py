"""`xc-prep shard`: validate, tokenize and tile every record of data.txt into Arrow IPC shards.

One run applies exactly the checks of `xc-prep validate` (its functions, its options, its media
safety flags), builds every valid record into a `schemas.sample.Sample` (pipeline/build.py) and
streams it into a shard. A record that fails either is listed in `rejects.jsonl` and the run still
succeeds (exit 0); only file-level problems (data.txt, a JSON file that does not parse) stop it
before anything is written (exit 1, reported as validate reports them). Bad flags or an output
folder it must not touch: exit 2. Ctrl-C: exit 130, finished units kept.

Output under --out:
    manifest.json              fingerprint, per-source and per-shard facts; written last, so its
                               presence means the folder is complete
    rejects.jsonl              one line per record not written (file, index, id, code, message)
    tokenizer.model            a copy of the tokenizer the shards were made with
    <source>/shard-00000.arrow one file per work unit that kept at least one sample
    .work/                     plan.json and one sidecar per finished work unit (what lets a
                               re-run resume); the trainer and `xc-prep info` ignore it

Work unit j of a source covers its records [j*S, (j+1)*S) with S = --samples-per-shard and writes
`<source>/shard-{j:05d}.arrow` (none if every record was rejected) and then its sidecar
`.work/<source>/shard-{j:05d}.json`, both atomically (temp file, fsync, rename). A re-run skips
every unit whose sidecar exists and whose shard still has the recorded size and sha256, so after a
crash, kill -9 or Ctrl-C the same command finishes the job (and rebuilds a damaged shard), and on a
finished folder it is a no-op that rewrites identical bytes. Whole-file facts (the JSON's sha256,
duplicate ids) are computed once before dispatch; units then run in a process pool and are merged
in unit order. Nothing written depends on --workers, timing or process ids, so the bytes are the
same for any --workers.

`.work/plan.json` records everything that decides the output (fingerprint, samples per shard,
media policy, each source's path, k, sha256 and record count). A run whose plan differs from the
folder's refuses to mix old and new shards and lists the differences; --overwrite deletes this
command's files in --out (nothing else) and starts over. Media files are not hashed: after editing
images in place, use --overwrite.

The manifest's `command` is the canonical form of the settings that determine the output:
--out, --workers and --overwrite are left out because they do not change a byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.checks import (
    RecordCheck,
    ValidateOptions,
    check_records,
    dumps_json,
    load_source,
    mark_duplicate_ids,
)
from pipeline.cli import add_media_policy_arguments, default_workers, media_policy_options
from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_VIDEO_SECONDS
from pipeline.sources import DataTxtError, parse_data_txt
from pipeline.template import DEFAULT_MAX_LENGTH, LAYOUTS
from pipeline.tiling import DEFAULT_HD_NUM, STYLES
from pipeline.validate import format_findings
from schemas.atomic import TEMP_SUFFIX, publish, temp_path, write_atomic
from schemas.cli import ExitCode, field_docs
from schemas.manifest import (
    MANIFEST_NAME,
    REJECTS_NAME,
    TOKENIZER_NAME,
    Fingerprint,
    Manifest,
    ShardInfo,
    SourceInfo,
)
from schemas.record import Source
from schemas.report import Finding
from schemas.sample import Layout, Style

DEFAULT_DATA_TXT = Path("data.txt")
DEFAULT_OUT = Path("shards")
DEFAULT_SAMPLES_PER_SHARD = 256
DEFAULT_TILE_CODEC = "raw"
TILE_CODEC_CHOICES = ("raw", "png")
"""Mirrors schemas.shards.TILE_CODECS (not imported here: pyarrow would slow every `xc-prep` start)."""

WORK_DIR = ".work"
PLAN_NAME = "plan.json"
LOCK_NAME = "lock"
SHARD_STEM = "shard-{unit:05d}"
SHARD_GLOB = "*/shard-*.arrow"
PROGRESS_POLL_S = 0.5
PACKAGE_NAME = "xcomposer-finetune"


class UsageError(Exception):
    """A bad flag value or an output folder the command must not touch (exit 2)."""


class WorkerDied(Exception):
    """A worker process was killed (e.g. by the out-of-memory killer); finished units are kept."""


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ShardConfig:
    """Settings of one `xc-prep shard` run; flags map 1:1 to fields."""

    data_txt: Path = DEFAULT_DATA_TXT
    """data.txt listing one `<json path> <k>` per line."""
    out: Path = DEFAULT_OUT
    """Output folder (created if missing)."""
    tokenizer: Path | None = None
    """The sentencepiece tokenizer.model of the model to fine-tune (required)."""
    hd_num: int = DEFAULT_HD_NUM
    """Maximum number of 560-px local tiles per image."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Maximum tokens per sample; longer samples are truncated between image blocks, or rejected."""
    style: Style = "train"
    """HD transform: train (official fine-tuning) or infer (model inference)."""
    layout: Layout = "official"
    """Token layout: official (training; <s> after a leading image) or inference (<s> first)."""
    workers: int = 1
    """Worker processes (output bytes do not depend on it)."""
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    """Records per work unit, so at most this many samples per shard file."""
    tile_codec: str = DEFAULT_TILE_CODEC
    """How tiles are stored; both are lossless: raw (fastest to read) or png (~2-3x smaller)."""
    font: Path | None = None
    """TrueType font for video frame labels (default: the one pipeline/video.py finds)."""
    overwrite: bool = False
    """Delete existing shards, manifest and work files in --out before writing."""
    # The media safety policy: the same flags and fields as `xc-prep validate` (validate.py).
    allow_path: tuple[Path, ...] = ()
    """Extra folders media files may lie in, besides the current directory and the JSON file's folder."""
    allow_any_path: bool = False
    """Accept media files anywhere (turns off the allowed-folders check)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width × height) accepted; checked from the header, before decoding."""
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    """Longest video accepted (frames / fps from the metadata), checked before decoding frames."""

    def media_policy(self) -> dict[str, Any]:
        """The policy fields as JSON values (they decide which records are rejected)."""
        return {
            "allow_path": [str(p) for p in self.allow_path],
            "allow_any_path": self.allow_any_path,
            "max_image_pixels": self.max_image_pixels,
            "max_video_seconds": self.max_video_seconds,
        }

    def check(self) -> None:
        """Raise UsageError naming the flag, the value and the fix."""
        if self.tokenizer is None:
            raise UsageError("--tokenizer is required: pass the model's tokenizer.model")
        if not self.tokenizer.exists():
            raise UsageError(f"--tokenizer {self.tokenizer}: not found")
        for flag, value in (
            ("--hd-num", self.hd_num),
            ("--max-length", self.max_length),
            ("--workers", self.workers),
            ("--samples-per-shard", self.samples_per_shard),
        ):
            if value < 1:
                raise UsageError(f"{flag} ({value}) must be at least 1")
        if self.font is not None and not self.font.is_file():
            raise UsageError(f"--font {self.font}: file not found")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out}: exists and is not a folder")

    def command(self) -> list[str]:
        """The canonical command line recorded in the manifest (without --out/--workers/--overwrite)."""
        cmd = ["xc-prep", "shard", str(self.data_txt), "--tokenizer", str(self.tokenizer)]
        cmd += ["--hd-num", str(self.hd_num), "--max-length", str(self.max_length)]
        cmd += ["--style", self.style, "--layout", self.layout]
        cmd += ["--samples-per-shard", str(self.samples_per_shard), "--tile-codec", self.tile_codec]
        if self.font is not None:
            cmd += ["--font", str(self.font)]
        for folder in self.allow_path:
            cmd += ["--allow-path", str(folder)]
        if self.allow_any_path:
            cmd += ["--allow-any-path"]
        if self.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS:
            cmd += ["--max-image-pixels", str(self.max_image_pixels)]
        if self.max_video_seconds != DEFAULT_MAX_VIDEO_SECONDS:
            cmd += ["--max-video-seconds", f"{self.max_video_seconds:g}"]
        return cmd


def code_version() -> str:
    try:
        return metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(config: ShardConfig, tokenizer_sha256: str) -> Fingerprint:
    return Fingerprint(
        tokenizer_sha256=tokenizer_sha256,
        layout=config.layout,
        style=config.style,
        hd_num=config.hd_num,
        max_length=config.max_length,
        tile_codec=config.tile_codec,
        code_version=code_version(),
    )


# ---------------------------------------------------------------- inputs and plan


@dataclass
class SourceInput:
    """One data.txt source after the whole-file work: what its work units need."""

    source: Source
    input_sha256: str
    records: list[Any]
    """The JSON file's top-level list, unchecked."""
    duplicates: dict[int, Finding]
    """`duplicate_id` finding by record index (needs the whole file, so computed once here)."""


def validate_options(config: ShardConfig) -> ValidateOptions:
    """The options `xc-prep validate` would get for these settings.

    Media are not decoded during the checks (decode_images=False) because build_sample decodes
    every one anyway with the same `load_rgb` / `read_frames`, so a damaged image or video is
    still rejected (`image_corrupt`, `video_unreadable`), at half the decoding cost.
    """
    return ValidateOptions(
        hd_num=config.hd_num,
        max_length=config.max_length,
        tokenizer=config.tokenizer,
        style=config.style,
        layout=config.layout,
        decode_images=False,
        allow_path=config.allow_path,
        allow_any_path=config.allow_any_path,
        max_image_pixels=config.max_image_pixels,
        max_video_seconds=config.max_video_seconds,
    )


def duplicate_ids(file: str, records: list[Any]) -> dict[int, Finding]:
    """What validate's `mark_duplicate_ids` adds to each record of a whole file, from the ids alone."""
    stubs = [
        RecordCheck(i, raw.get("id") if isinstance(raw, dict) else None, None, [])
        for i, raw in enumerate(records)
    ]
    return {check.index: check.findings[-1] for check in mark_duplicate_ids(file, stubs) if check.findings}


def read_inputs(config: ShardConfig) -> tuple[list[SourceInput], list[Finding]]:
    """Parse data.txt and read every JSON file as `xc-prep validate` does.

    Returns the usable sources and the file-level findings (data.txt lines, unreadable or invalid
    JSON files); per-record checks run later, inside the work units.
    """
    try:
        sources, findings = parse_data_txt(config.data_txt)
    except DataTxtError as e:
        raise UsageError(f"{e.message} ({e.hint})") from e
    inputs = []
    for source in sources:
        loaded = load_source(source)
        findings += loaded.file_findings
        if loaded.records is not None:
            assert loaded.sha256 is not None, f"{source.path}: parsed without a sha256"
            dups = duplicate_ids(source.path, loaded.records)
            inputs.append(SourceInput(source, loaded.sha256, loaded.records, dups))
    return inputs, findings


def make_plan(config: ShardConfig, fp: Fingerprint, inputs: list[SourceInput]) -> dict[str, Any]:
    """Everything that decides the output; a folder is only resumed under an identical plan."""
    return {
        "fingerprint": asdict(fp),
        "samples_per_shard": config.samples_per_shard,
        "media_policy": config.media_policy(),
        "sources": [
            {
                "name": si.source.name,
                "path": si.source.path,
                "k": si.source.k,
                "input_sha256": si.input_sha256,
                "records": len(si.records),
            }
            for si in inputs
        ],
    }


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


# ---------------------------------------------------------------- the output folder


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


# ---------------------------------------------------------------- work units


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
    out: Path

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
        return f"{self.source_name}/{SHARD_STEM.format(unit=self.unit)}.arrow"

    @property
    def shard_path(self) -> Path:
        return self.out / self.shard_file

    @property
    def sidecar_path(self) -> Path:
        return self.out / WORK_DIR / self.source_name / f"{SHARD_STEM.format(unit=self.unit)}.json"


def make_tasks(config: ShardConfig, inputs: list[SourceInput]) -> list[UnitTask]:
    size = config.samples_per_shard
    tasks = []
    for pos, si in enumerate(inputs):
        for unit, start in enumerate(range(0, len(si.records), size)):
            end = min(start + size, len(si.records))
            tasks.append(
                UnitTask(
                    source_pos=pos,
                    source=si.source,
                    unit=unit,
                    records=(start, end),
                    raw=tuple(si.records[start:end]),
                    duplicates={i: f for i, f in si.duplicates.items() if start <= i < end},
                    out=config.out,
                )
            )
    return tasks


def finished_unit(task: UnitTask) -> dict[str, Any] | None:
    """The sidecar of a unit an earlier run finished, if its shard is still intact; else None."""
    from schemas.shards import file_sha256

    try:
        sidecar = json.loads(task.sidecar_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if sidecar.get("records") != list(task.records):
        return None
    shard = sidecar.get("shard")
    if shard is None:
        return None if task.shard_path.exists() else sidecar
    path = task.shard_path
    if not path.is_file() or path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
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
    from schemas.shards import ShardWriter, file_sha256

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
    tmp = temp_path(task.shard_path)
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
                rejects.append(
                    Finding(task.file, None, check.index, check.id, e.code, e.message, hint=e.hint).to_json()
                )
                progress(1)
                continue
            except Exception as e:  # a bug, not bad data: stop, but say which record triggered it
                raise RuntimeError(
                    f"{task.file} record {check.index} (id {check.id!r}): unexpected error while building "
                    f"the sample: {type(e).__name__}: {e}"
                ) from e
            if writer is None:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                writer = ShardWriter(tmp, config.tile_codec)
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
        publish(tmp, task.shard_path)
        shard = {
            "file": task.shard_file,
            "records": list(task.records),
            "samples": stats["samples_written"],
            "bytes": task.shard_path.stat().st_size,
            "sha256": file_sha256(task.shard_path),
        }
    else:
        task.shard_path.unlink(missing_ok=True)  # a stale shard from an interrupted older attempt
    sidecar = {
        "unit": task.unit,
        "records": list(task.records),
        "stats": stats,
        "shard": shard,
        "rejects": rejects,
    }
    write_atomic(task.sidecar_path, (dumps_json(sidecar, indent=1) + "\n").encode())
    return sidecar, False


# Worker-process state for the pool (set by the initializer; the tokenizer loads once per process).
_worker_config: ShardConfig | None = None
_worker_tokenizer: Any = None
_worker_counters: Any = None


def _init_worker(config: ShardConfig, counters: Any) -> None:
    from pipeline.tokenization import Tokenizer

    # Ctrl-C reaches the whole process group: the main process alone handles it (and stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    """One tqdm bar per source on stderr with samples/s and ETA (off when stderr is not a terminal)."""

    def __init__(self, inputs: list[SourceInput]):
        from tqdm import tqdm

        disable = not sys.stderr.isatty()
        self.bars = [
            tqdm(
                total=len(si.records),
                desc=si.source.name,
                unit="sample",
                position=i,
                leave=True,
                file=sys.stderr,
                disable=disable,
                dynamic_ncols=True,
            )
            for i, si in enumerate(inputs)
        ]

    def add(self, source_pos: int, n: int) -> None:
        self.bars[source_pos].update(n)

    def set(self, counts: Any) -> None:
        for bar, count in zip(self.bars, counts, strict=True):
            if count != bar.n:
                bar.update(count - bar.n)

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def run_units(
    config: ShardConfig, tokenizer: Any, tasks: list[UnitTask], progress: Progress
) -> list[tuple[dict[str, Any], bool]]:
    """Run every unit, in a pool when --workers > 1; results come back in unit order."""
    workers = min(config.workers, len(tasks))
    if workers <= 1:
        return [run_unit(t, config, tokenizer, functools.partial(progress.add, t.source_pos)) for t in tasks]
    # spawn: no fork of a process holding tqdm's threads. An executor, not multiprocessing.Pool:
    # a worker that dies (or fails to start) raises BrokenProcessPool instead of hanging the run.
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.Array("q", len(progress.bars))
    results = []
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(config, counters))
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
        # Ctrl-C, a bug in a unit or a dead worker: stop the other workers now rather than after
        # their current unit; whatever they leave half-written is a temp file the next run deletes.
        pool.shutdown(wait=False, cancel_futures=True)
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join(timeout=10)
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


# ---------------------------------------------------------------- manifest and rejects


STAT_FIELDS = ("records_read", "samples_written", "rejected", "total_tokens", "trained_tokens", "tiles")


def merge(
    config: ShardConfig,
    fp: Fingerprint,
    inputs: list[SourceInput],
    tasks: list[UnitTask],
    sidecars: list[dict[str, Any]],
) -> tuple[Manifest, list[dict[str, Any]]]:
    """Sidecars (in unit order) -> the manifest and the rejects, both in a deterministic order."""
    infos = [
        SourceInfo(name=si.source.name, path=si.source.path, k=si.source.k, input_sha256=si.input_sha256)
        for si in inputs
    ]
    rejects: list[dict[str, Any]] = []
    for task, sidecar in zip(tasks, sidecars, strict=True):
        info = infos[task.source_pos]
        for name in STAT_FIELDS:
            setattr(info, name, getattr(info, name) + sidecar["stats"][name])
        if (shard := sidecar["shard"]) is not None:
            info.shards.append(ShardInfo(**{**shard, "records": tuple(shard["records"])}))
        rejects.extend(sidecar["rejects"])
    for si, info in zip(inputs, infos, strict=True):
        assert info.records_read == len(si.records), (
            f"{info.path}: read {info.records_read} of {len(si.records)}"
        )
        assert info.records_read == info.samples_written + info.rejected, (
            f"{info.path}: records_read {info.records_read} != samples_written {info.samples_written} "
            f"+ rejected {info.rejected}"
        )
    return Manifest(fingerprint=fp, sources=infos, command=config.command()), rejects


def write_results(
    config: ShardConfig, tokenizer: Any, manifest: Manifest, rejects: list[dict[str, Any]]
) -> None:
    """rejects.jsonl, tokenizer.model, then manifest.json last (its presence marks a complete folder)."""
    lines = "".join(dumps_json(r) + "\n" for r in rejects)
    write_atomic(config.out / REJECTS_NAME, lines.encode())
    write_atomic(config.out / TOKENIZER_NAME, Path(tokenizer.path).read_bytes())
    write_atomic(config.out / MANIFEST_NAME, manifest.dumps().encode())


# ---------------------------------------------------------------- summary


def summary_table(manifest: Manifest) -> str:
    """Per-source counts as a fixed-width table with a total row (also used by `xc-prep info`)."""
    header = ["source", "records", "written", "rejected", "tokens", "trained", "tiles", "MB", "shards"]
    counts: list[tuple[str, list[int]]] = []
    for s in manifest.sources:
        size = sum(sh.bytes for sh in s.shards)
        values = [s.records_read, s.samples_written, s.rejected, s.total_tokens, s.trained_tokens, s.tiles]
        counts.append((s.name, [*values, size, len(s.shards)]))
    if len(counts) > 1:
        counts.append(("total", [sum(column) for column in zip(*(v for _, v in counts), strict=True)]))
    cells = [header] + [
        [name, *(f"{v:,}" for v in values[:6]), f"{values[6] / 1e6:,.1f}", f"{values[7]:,}"]
        for name, values in counts
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join(lines)


def print_summary(
    config: ShardConfig, manifest: Manifest, results: list[tuple[dict[str, Any], bool]], seconds: float
) -> None:
    print(summary_table(manifest))
    written = sum(s.samples_written for s in manifest.sources)
    rejected = sum(s.rejected for s in manifest.sources)
    reused = sum(1 for _, was_reused in results if was_reused)
    warnings = sum(sidecar["stats"]["warnings"] for sidecar, _ in results)
    line = f"{written:,} samples in {config.out}/ ({seconds:.1f} s"
    if reused < len(results):
        line += f", {written / max(seconds, 1e-9):.1f} samples/s"
    if reused:
        line += f"; {reused} of {len(results)} work units reused from an earlier run"
    print(line + ")")
    if rejected:
        print(f"{rejected:,} record(s) rejected: see {config.out / REJECTS_NAME}")
    if truncated := sum(sidecar["stats"]["truncated"] for sidecar, _ in results):
        print(
            f"{truncated:,} sample(s) truncated to --max-length {config.max_length} (answers kept where they fit)"
        )
    if warnings:
        print(f"{warnings:,} warning(s) on written records: run `xc-prep validate` to list them")


# ---------------------------------------------------------------- command


def load_tokenizer(path: Path) -> Any:
    from pipeline.tokenization import Tokenizer

    try:
        return Tokenizer.from_path(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--tokenizer: {e}") from e


def shard(config: ShardConfig) -> int:
    """The whole command; returns the exit status."""
    started = time.perf_counter()
    config.check()
    assert config.tokenizer is not None
    tokenizer = load_tokenizer(config.tokenizer)
    inputs, file_findings = read_inputs(config)
    if file_findings:
        report_file_findings(file_findings)
    if any(f.severity == "error" for f in file_findings):
        return ExitCode.INVALID_DATA
    fp = fingerprint(config, tokenizer.sha256)
    plan = make_plan(config, fp, inputs)
    config.out.mkdir(parents=True, exist_ok=True)
    lock = lock_output(config.out)
    try:
        prepare_output(config, plan)
        tasks = make_tasks(config, inputs)
        progress = Progress(inputs)
        try:
            results = run_units(config, tokenizer, tasks, progress)
        finally:
            progress.close()
        manifest, rejects = merge(config, fp, inputs, tasks, [sidecar for sidecar, _ in results])
        write_results(config, tokenizer, manifest, rejects)
    finally:
        os.close(lock)
    print_summary(config, manifest, results, time.perf_counter() - started)
    return ExitCode.OK


def report_file_findings(findings: list[Finding]) -> None:
    """data.txt and JSON-file problems, printed as `xc-prep validate` prints them."""
    print(format_findings(findings))
    if errors := [f for f in findings if f.severity == "error"]:
        files = len({f.file for f in errors})
        print(
            f"FAILED: {len(errors)} file-level error(s) in {files} file(s); nothing was written. "
            "Fix them and run again (`xc-prep validate DATA_TXT` lists every problem)."
        )


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    try:
        policy = media_policy_options(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return ShardConfig(
        data_txt=Path(args.data_txt),
        out=Path(args.out),
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        hd_num=args.hd_num,
        max_length=args.max_length,
        style=args.style,
        layout=args.layout,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        tile_codec=args.tile_codec,
        font=Path(args.font) if args.font else None,
        overwrite=args.overwrite,
        **policy,
    )


def run(args: argparse.Namespace) -> int:
    try:
        return shard(config_from_args(args))
    except UsageError as e:
        print(f"xc-prep shard: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except WorkerDied as e:
        print(f"xc-prep shard: error: {e}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    except KeyboardInterrupt:
        print(
            "\nxc-prep shard: interrupted; finished shards are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    except OSError as e:  # a full disk, a read-only folder, ...: every finished unit is already safe
        print(
            f"xc-prep shard: error writing to {args.out}: {e}\n"
            "finished shards are kept (written atomically, no manifest yet); free space or fix the "
            "folder and re-run the same command to resume",
            file=sys.stderr,
        )
        return ExitCode.INVALID_DATA


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d, docs = ShardConfig(), field_docs(ShardConfig)

    def doc(name: str, default: object = None) -> str:
        return docs[name] if default is None else f"{docs[name]} (default {default})"

    p = subparsers.add_parser(
        "shard",
        help="validate, tokenize and tile data.txt's records into resumable Arrow shards",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "data_txt", nargs="?", default=str(d.data_txt), metavar="DATA_TXT", help=doc("data_txt", d.data_txt)
    )
    p.add_argument("--out", default=str(d.out), help=doc("out", d.out))
    p.add_argument("--tokenizer", required=True, help=doc("tokenizer"))
    p.add_argument("--hd-num", type=int, metavar="N", default=d.hd_num, help=doc("hd_num", d.hd_num))
    p.add_argument(
        "--max-length", type=int, metavar="N", default=d.max_length, help=doc("max_length", d.max_length)
    )
    p.add_argument("--style", choices=STYLES, default=d.style, help=doc("style", d.style))
    p.add_argument("--layout", choices=LAYOUTS, default=d.layout, help=doc("layout", d.layout))
    p.add_argument(
        "--workers", type=int, metavar="N", default=default_workers(), help=doc("workers", "all CPU cores")
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        metavar="N",
        default=d.samples_per_shard,
        help=doc("samples_per_shard", d.samples_per_shard),
    )
    p.add_argument(
        "--tile-codec", choices=TILE_CODEC_CHOICES, default=d.tile_codec, help=doc("tile_codec", d.tile_codec)
    )
    p.add_argument("--font", default=None, help=doc("font"))
    p.add_argument("--overwrite", action="store_true", help=doc("overwrite"))
    add_media_policy_arguments(p)
    p.set_defaults(run=run)
