"""`xc-prep shard`: validate, tokenize and tile every record of data.txt into Arrow IPC shards.

One run applies exactly the checks of `xc-prep validate` (its functions, its options, its media
safety flags), builds every valid record into a `schemas.sample.Sample` (pipeline/build.py) and
streams it into a shard. A record that fails either is listed in `rejects.jsonl` and the run still
succeeds (exit 0); only file-level problems (data.txt, a JSON file that does not parse) stop it
before anything is written (exit 1, reported as validate reports them). A record that hits an error
inside xc-prep (`check_failed`, `build_failed`: any exception, not a data rule) is rejected too and
the run goes on, then exits 1 naming it. Bad flags or an output folder it must not touch: exit 2.
Ctrl-C or SIGTERM: exit 130, finished units kept; the worker processes die with the main one.

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
--out, --workers, --overwrite, --part, --finalize and --engine are left out because they do not
change a byte.

--out may be an object-store prefix (s3://BUCKET/PREFIX, schemas/storage.py): every file above is
then an object written whole (shards uploaded once complete, sidecars and the manifest in one PUT
each, the manifest last), and the lock is a lease object. On many machines, `--part I/N` runs the
units j with j % N == I and records the part in `.work/parts/`; the same command with `--finalize`
instead of `--part` checks that every unit is done (naming the parts that are not), then writes
rejects, tokenizer and manifest: the folder is byte for byte a one-host run's, whatever N.
`--engine ray` runs the units as Ray tasks (pipeline/shard_ray.py), again with the same bytes.

This module reads the inputs, plans the run, merges the units' sidecars into the manifest and the
rejects, and holds the CLI; the settings are in shard_config.py, the output folder's handling in
shard_folder.py, the work units and the process pool in shard_units.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.checks import RecordCheck, mark_duplicate_ids
from pipeline.flags import (
    MEDIA_POLICY_FIELDS,
    add_media_policy_arguments,
    default_workers,
    media_policy_options,
)
from pipeline.json_source import dumps_json, load_source
from pipeline.shard_config import ShardConfig, UsageError, fingerprint
from pipeline.shard_folder import (
    PARTS_DIR,
    clear_run_state,
    lock_output,
    part_record,
    prepare_output,
)
from pipeline.shard_units import (
    Progress,
    SourceInput,
    UnitTask,
    WorkerDied,
    finished_unit,
    make_tasks,
    run_units,
)
from pipeline.sources import DataTxtError, parse_data_txt
from pipeline.validate import format_findings
from pipeline.workers import Terminated, stop_on_sigterm
from schemas.cli import ExitCode, add_dataclass_flags, field_docs
from schemas.manifest import (
    MANIFEST_NAME,
    REJECTS_NAME,
    TOKENIZER_NAME,
    Fingerprint,
    Manifest,
    ShardInfo,
    SourceInfo,
)
from schemas.report import Finding
from schemas.storage import Store

# ---------------------------------------------------------------- inputs and plan


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


# ---------------------------------------------------------------- manifest and rejects


UNEXPECTED_CODES = frozenset({"check_failed", "build_failed"})
"""Reject codes of an error inside xc-prep rather than a rule about the data: the run goes on, then exits 1."""
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


def write_results(store: Store, tokenizer: Any, manifest: Manifest, rejects: list[dict[str, Any]]) -> None:
    """rejects.jsonl, tokenizer.model, then manifest.json last (its presence marks a complete folder)."""
    lines = "".join(dumps_json(r) + "\n" for r in rejects)
    store.write_bytes(REJECTS_NAME, lines.encode())
    store.write_bytes(TOKENIZER_NAME, Path(tokenizer.path).read_bytes())
    store.write_bytes(MANIFEST_NAME, manifest.dumps().encode())


# ---------------------------------------------------------------- parts


class PartsMissing(Exception):
    """--finalize before every work unit is done (exit 1; the message names the missing parts)."""


def finished_results(store: Store, tasks: list[UnitTask]) -> list[tuple[dict[str, Any], bool]]:
    """--finalize: every unit's sidecar (as reused results), or PartsMissing naming what is not done."""
    sidecars = [finished_unit(task) for task in tasks]
    missing = [j for j, sidecar in enumerate(sidecars) if sidecar is None]
    if not missing:
        return [(sidecar, True) for sidecar in sidecars if sidecar is not None]
    counts = sorted(
        {int(rel.rsplit("-of-", 1)[1].removesuffix(".json")) for rel in store.list_files(PARTS_DIR)}
    )
    lines = [
        f"--finalize: {len(missing)} of {len(tasks)} work units are not finished "
        f"(e.g. {store.url(tasks[missing[0]].shard_file)}), so no manifest was written"
    ]
    for n in counts:
        parts = sorted({j % n for j in missing})
        lines.append(
            f"parts not finished (of {n}): {', '.join(f'{i}/{n}' for i in parts)}: run each with the same "
            f"command and --part I/{n} instead of --finalize (a killed part resumes), then --finalize again"
        )
    if not counts:
        lines.append("no --part run has finished here yet: run every --part I/N first")
    raise PartsMissing("\n".join(lines))


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
    line = f"{written:,} samples in {config.store().url()}/ ({seconds:.1f} s"
    if reused < len(results):
        line += f", {written / max(seconds, 1e-9):.1f} samples/s"
    if reused:
        line += f"; {reused} of {len(results)} work units reused from an earlier run"
    print(line + ")")
    if rejected:
        print(f"{rejected:,} record(s) rejected: see {config.store().url(REJECTS_NAME)}")
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
    store = config.store()
    part = config.part_of()
    lock = lock_output(store, part if config.part is not None else None)
    try:
        prepare_output(config, plan)
        tasks = make_tasks(config, inputs)
        if config.finalize:
            results = finished_results(store, tasks)
        else:
            mine = [task for j, task in enumerate(tasks) if j % part[1] == part[0]]
            progress = Progress(inputs, mine)
            try:
                results = run_units(config, tokenizer, mine, progress)
            finally:
                progress.close()
            if config.part is not None:
                lock.check()
                record = {"part": list(part), "units": [t.shard_file for t in mine]}
                store.write_bytes(part_record(part), (json.dumps(record, indent=1) + "\n").encode())
                print_part_summary(config, part, len(tasks), results, time.perf_counter() - started)
                return ExitCode.OK
        manifest, rejects = merge(config, fp, inputs, tasks, [sidecar for sidecar, _ in results])
        lock.check()
        write_results(store, tokenizer, manifest, rejects)
        clear_run_state(store)
    finally:
        lock.release()
    print_summary(config, manifest, results, time.perf_counter() - started)
    if failed := [r for r in rejects if r["code"] in UNEXPECTED_CODES]:
        first = failed[0]
        print(
            f"FAILED: {len(failed):,} record(s) hit an error inside xc-prep ({', '.join(sorted(UNEXPECTED_CODES))} "
            f"in {REJECTS_NAME}), e.g. {first['file']} record {first['index']}: {first['message']}. "
            "The shards hold every other record and the folder is complete; please report the error "
            "with the record.",
            file=sys.stderr,
        )
        return ExitCode.INVALID_DATA
    return ExitCode.OK


def print_part_summary(
    config: ShardConfig,
    part: tuple[int, int],
    units: int,
    results: list[tuple[dict[str, Any], bool]],
    seconds: float,
) -> None:
    written = sum(sidecar["stats"]["samples_written"] for sidecar, _ in results)
    reused = sum(1 for _, was_reused in results if was_reused)
    print(
        f"part {part[0]}/{part[1]}: {len(results)} of {units} work units done, {written:,} samples in "
        f"{config.store().url()}/ ({seconds:.1f} s; {reused} reused from an earlier run). When every part "
        "is done, run the same command once with --finalize instead of --part"
    )


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
        out=str(args.out),
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        hd_num=args.hd_num,
        max_length=args.max_length,
        style=args.style,
        layout=args.layout,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        tile_codec=args.tile_codec,
        jpeg_quality=args.jpeg_quality,
        font=Path(args.font) if args.font else None,
        overwrite=args.overwrite,
        part=args.part,
        finalize=args.finalize,
        engine=args.engine,
        **policy,
    )


def run(args: argparse.Namespace) -> int:
    try:
        with stop_on_sigterm():
            return shard(config_from_args(args))
    except UsageError as e:
        print(f"xc-prep shard: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except (WorkerDied, PartsMissing) as e:
        print(f"xc-prep shard: error: {e}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    except KeyboardInterrupt as e:
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(
            f"\nxc-prep shard: {how}; finished shards are kept, re-run the same command to resume",
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
    p = subparsers.add_parser(
        "shard",
        help="validate, tokenize and tile data.txt's records into resumable Arrow shards",
        description=__doc__.split("\n\n")[0],
    )
    workers_help = f"{field_docs(ShardConfig)['workers']} (default all CPU cores)"
    add_dataclass_flags(
        p,
        ShardConfig,
        exclude=MEDIA_POLICY_FIELDS,  # added below with validate's flags and help
        show_defaults=True,
        positional=("data_txt",),
        overrides={
            # text, not Path, for these two: config_from_args reads an empty value as unset
            "tokenizer": {"type": str, "required": True},
            "font": {"type": str},
            "hd_num": {"metavar": "N"},
            "max_length": {"metavar": "N"},
            "workers": {"metavar": "N", "default": default_workers(), "help": workers_help},
            "samples_per_shard": {"metavar": "N"},
            "part": {"metavar": "I/N"},
            "jpeg_quality": {"metavar": "Q"},
        },
    )
    add_media_policy_arguments(p)
    p.set_defaults(run=run)
