"""`xc-prep validate`: check data.txt, its JSON files and their media in one pass, and report.

The checks themselves live in pipeline/checks.py (`xc-prep shard` runs the same functions). This
module runs them over every source of data.txt, in worker processes for large inputs, and prints
the report: findings grouped by code, then a per-source table and one summary line.
Exit status: 0 no errors (warnings allowed), 1 errors, 2 usage error (bad flag, no data.txt).

    checked = check_all(data_txt, opts, workers=2, progress=False)  # -> CheckedInputs
    report = build_report(checked, opts)                            # -> schemas.report.Report
    report = validate(data_txt, opts, workers=2)                    # both in one call
    format_report(report) -> str       the human report
    format_findings(findings) -> str   the grouped listing alone (also used by `xc-prep shard`)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checks import (
    RecordCheck,
    SourceCheck,
    ValidateOptions,
    cached_tokenizer,
    check_records,
    mark_duplicate_ids,
    shallow_records,
)
from pipeline.flags import add_media_policy_arguments, default_workers, media_policy_options
from pipeline.json_source import dumps_json, load_source
from pipeline.sources import DataTxtError, parse_data_txt
from pipeline.template import DEFAULT_MAX_LENGTH
from pipeline.tiling import DEFAULT_HD_NUM
from pipeline.workers import Terminated, start_worker, stop_on_sigterm, stop_pool
from schemas.cli import ExitCode
from schemas.report import Finding, Report, SourceSummary
from schemas.sample import LAYOUTS, STYLES

# Work sizing: relative cost of one text-only record vs one media file to decode, measured on a
# 2-core machine (a 640×480 JPEG decodes in ~3 ms, a text-only record checks in ~15 µs).
TEXT_COST = 1
TOKENIZED_TEXT_COST = 8
MEDIA_COST = 200
PARALLEL_MIN_COST = 20_000
"""Below this a process pool costs more to start (~0.3 s) than it saves."""
CHUNKS_PER_WORKER = 6
PROGRESS_MIN_COST = 5_000
MAX_SHOWN_PER_CODE = 30
"""The human report lists this many findings per code; --json has them all."""


@dataclass(frozen=True)
class CheckedInputs:
    """Everything `check_all` found: data.txt findings and one SourceCheck per parsed source."""

    data_txt: str
    data_txt_findings: list[Finding]
    sources: list[SourceCheck]


# ---------------------------------------------------------------- the whole run


def _record_cost(raw: Any, text_cost: int) -> int:
    image = raw.get("image") if isinstance(raw, dict) else None
    num_media = 1 if isinstance(image, str) else len(image) if isinstance(image, list) else 0
    return text_cost + MEDIA_COST * num_media


def _chunks(records: list[Any], target_cost: int, text_cost: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of about `target_cost` each."""
    start, cost = 0, 0
    for i, raw in enumerate(records):
        cost += _record_cost(raw, text_cost)
        if cost >= target_cost:
            yield start, i + 1
            start, cost = i + 1, 0
    if start < len(records):
        yield start, len(records)


def check_all(
    data_txt: Path, opts: ValidateOptions, *, workers: int = 1, progress: bool = False
) -> CheckedInputs:
    """Parse data.txt and check every source; parallel over `workers` processes for large inputs.

    The result does not depend on `workers`. Raises `DataTxtError` when data.txt is missing.
    """
    sources, data_txt_findings = parse_data_txt(data_txt)
    loaded = [load_source(s) for s in sources]
    text_cost = TOKENIZED_TEXT_COST if opts.tokenizer is not None else TEXT_COST
    costs = [sum(_record_cost(r, text_cost) for r in ls.records or []) for ls in loaded]
    total_cost = sum(costs)
    total_records = sum(len(ls.records or []) for ls in loaded)
    use_pool = workers > 1 and total_cost >= PARALLEL_MIN_COST
    target = max(1, total_cost // (workers * CHUNKS_PER_WORKER)) if use_pool else 2_000
    # (source position, start, raw records[start:end]) in file order; results keep that order
    tasks = [
        (pos, start, ls.records[start:end])
        for pos, ls in enumerate(loaded)
        if ls.records is not None
        for start, end in _chunks(ls.records, target, text_cost)
    ]
    results: list[list[RecordCheck] | None] = [None] * len(tasks)

    from tqdm import tqdm

    from pipeline.progress import ProgressLines

    show = progress and total_cost >= PROGRESS_MIN_COST
    terminal = sys.stderr.isatty()
    bar = tqdm(
        total=total_records, unit="rec", desc="validate", disable=not (show and terminal), file=sys.stderr
    )
    # a log file, not a terminal: a line every few seconds instead of the bar
    lines = ProgressLines("xc-prep validate", total_records, "records") if show and not terminal else None

    def advance(n: int) -> None:
        bar.update(n)
        if lines is not None:
            lines.add(n)

    try:
        if use_pool:
            # spawn: every worker is this process's own child, so it knows the run is over when its
            # parent changes (pipeline/workers.py); a forkserver's children would not
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=context,
                initializer=start_worker,  # dies with this process, leaves Ctrl-C and SIGTERM to it
                initargs=(os.getpid(),),
            )
            try:
                futures = {
                    # shallow_records: a record too deeply nested to pickle is not sent
                    pool.submit(check_records, loaded[pos].source, shallow_records(chunk), start, opts): n
                    for n, (pos, start, chunk) in enumerate(tasks)
                }
                for future in as_completed(futures):
                    n = futures[future]
                    results[n] = future.result()
                    advance(len(tasks[n][2]))
            except BaseException:
                stop_pool(pool)  # Ctrl-C, SIGTERM or a dead worker: not after the running chunks
                raise
            pool.shutdown(wait=True)
        else:
            for n, (pos, start, chunk) in enumerate(tasks):
                results[n] = check_records(loaded[pos].source, chunk, start, opts)
                advance(len(chunk))
    finally:
        bar.close()
        if lines is not None:
            lines.close()

    per_source: list[list[RecordCheck]] = [[] for _ in loaded]
    for (pos, _, _), done in zip(tasks, results, strict=True):
        assert done is not None, "every task has a result"
        per_source[pos].extend(done)
    checks = [
        SourceCheck(ls.source, ls.file_findings, mark_duplicate_ids(ls.source.path, recs), ls.sha256)
        for ls, recs in zip(loaded, per_source, strict=True)
    ]
    return CheckedInputs(str(data_txt), data_txt_findings, checks)


def build_report(checked: CheckedInputs, opts: ValidateOptions) -> Report:
    """Findings in a deterministic order, one SourceSummary per source, and notes."""
    report = Report(findings=list(checked.data_txt_findings))
    for sc in checked.sources:
        findings = sc.findings
        report.findings.extend(findings)
        summary = SourceSummary(
            file=sc.source.path,
            k=sc.source.k,
            records=len(sc.records),
            images=sum(r.num_images for r in sc.records),
            videos=sum(r.num_videos for r in sc.records),
            errors=sum(1 for f in findings if f.severity == "error"),
            warnings=sum(1 for f in findings if f.severity == "warning"),
        )
        if opts.tokenizer is not None:
            tokens = [r.tokens for r in sc.records if r.tokens is not None]
            summary.tokens_total = sum(tokens)
            summary.tokens_max = max(tokens, default=0)
            summary.trained_tokens_total = sum(r.trained_tokens or 0 for r in sc.records)
        report.sources.append(summary)
    if opts.tokenizer is None:
        report.notes.append(
            "length check skipped: no --tokenizer given (pass the model's tokenizer.model to count "
            f"tokens, images included, against --max-length {opts.max_length})"
        )
    else:
        report.notes.append(
            f"token counts: tokenizer {opts.tokenizer}, hd_num {opts.hd_num}, style {opts.style}, "
            f"layout {opts.layout}, max_length {opts.max_length}"
        )
    if not opts.decode_images:
        report.notes.append("images were not decoded (header check only): truncated files may pass")
    if opts.allow_any_path:
        report.notes.append("media paths were not confined to allowed folders (--allow-any-path)")
    return report


def validate(data_txt: Path, opts: ValidateOptions, *, workers: int = 1, progress: bool = False) -> Report:
    """Check everything `data_txt` names and return the report (raises DataTxtError if it is missing)."""
    return build_report(check_all(data_txt, opts, workers=workers, progress=progress), opts)


# ---------------------------------------------------------------- human report


def _where(f: Finding) -> str:
    if f.index is None:
        return f"{f.file}:{f.line}" if f.line is not None else f.file
    return f"{f.file} record {f.index}" + (f" (id {f.id!r})" if f.id is not None else "")


def format_findings(findings: list[Finding], max_shown: int = MAX_SHOWN_PER_CODE) -> str:
    """Findings grouped by code (errors first, groups in order of first appearance), with fix hints."""
    groups: dict[tuple[bool, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.severity != "error", f.code), []).append(f)
    lines: list[str] = []
    for (_, code), group in sorted(groups.items(), key=lambda item: item[0][0]):
        n = len(group)
        kind = group[0].severity + ("s" if n != 1 else "")
        common_hint = group[0].hint
        lines.append(f"{code}: {n:,} {kind}")
        if common_hint:
            lines.append(f"  fix: {common_hint}")
        for f in group[:max_shown]:
            lines.append(f"  {_where(f)}: {f.message}")
            if f.hint and f.hint != common_hint:
                lines.append(f"    fix: {f.hint}")
        if n > max_shown:
            lines.append(f"  ... and {n - max_shown:,} more (--json PATH lists them all)")
        lines.append("")
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    out = []
    for r, row in enumerate(rows):
        cells = [
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  " + "  ".join(cells).rstrip())
        if r == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def format_report(report: Report) -> str:
    """The human report: findings by code, a table per source, notes and one summary line."""
    lines = [format_findings(report.findings)] if report.findings else []
    if report.sources:
        has_tokens = any(s.tokens_total is not None for s in report.sources)
        header = ["source", "k", "records", "images", "videos", "errors", "warnings"]
        if has_tokens:
            header += ["tokens", "max tokens", "trained"]
        rows = [header]
        for s in report.sources:
            row = [
                s.file,
                f"{s.k:g}",
                f"{s.records:,}",
                f"{s.images:,}",
                f"{s.videos:,}",
                f"{s.errors:,}",
                f"{s.warnings:,}",
            ]
            if has_tokens:
                row += [
                    "-" if s.tokens_total is None else f"{s.tokens_total:,}",
                    "-" if s.tokens_max is None else f"{s.tokens_max:,}",
                    "-" if s.trained_tokens_total is None else f"{s.trained_tokens_total:,}",
                ]
            rows.append(row)
        lines += ["sources:", *_table(rows), ""]
    lines += [f"note: {note}" for note in report.notes]
    errors, warnings = len(report.errors), len(report.warnings)
    records = sum(s.records for s in report.sources)
    counts = (
        f"{len(report.sources)} source{'s' if len(report.sources) != 1 else ''}, {records:,} records, "
        f"{errors:,} error{'s' if errors != 1 else ''}, {warnings:,} warning{'s' if warnings != 1 else ''}"
    )
    if report.ok:
        lines.append(f"OK: {counts}")
    else:
        bad = len({f.file for f in report.errors})
        lines.append(
            f"FAILED: {counts} (in {bad} file{'s' if bad != 1 else ''}); fix the errors above and run again"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check data.txt, its JSON files and media; report every problem in one pass",
        description=(
            "Check data.txt, every JSON file it lists, every record and every image/video, and report "
            "all problems at once. Exit 0: no errors; 1: errors found; 2: usage error."
        ),
    )
    parser.add_argument(
        "data_txt", metavar="DATA_TXT", type=Path, help="data.txt listing '<file.json> <k>' lines"
    )
    parser.add_argument(
        "--hd-num",
        type=int,
        metavar="N",
        default=DEFAULT_HD_NUM,
        help=f"maximum 560-px local tiles per image, decides image token counts (default {DEFAULT_HD_NUM})",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_LENGTH,
        help=f"maximum tokens per sample (default {DEFAULT_MAX_LENGTH})",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        metavar="PATH",
        default=None,
        help="tokenizer.model or a model folder holding one; enables the length check",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the report as JSON here"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=default_workers(),
        help="worker processes for large inputs (default: the available CPU cores)",
    )
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="train",
        help="HD transform for image token counts: train (official fine-tuning, default) or infer",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="official",
        help="token layout: official (training, default) or inference (<s> first)",
    )
    add_media_policy_arguments(parser)
    parser.set_defaults(run=run)


def _usage_error(message: str) -> int:
    print(f"xc-prep validate: {message}", file=sys.stderr)
    return ExitCode.USAGE


def run(args: argparse.Namespace) -> int:
    for flag, value in (
        ("--hd-num", args.hd_num),
        ("--max-length", args.max_length),
        ("--workers", args.workers),
    ):
        if value < 1:
            return _usage_error(f"{flag} ({value}) must be at least 1")
    try:
        policy = media_policy_options(args)
    except ValueError as e:
        return _usage_error(str(e))
    opts = ValidateOptions(
        hd_num=args.hd_num,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        style=args.style,
        layout=args.layout,
        **policy,
    )
    if opts.tokenizer is not None:
        try:
            cached_tokenizer(opts.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            return _usage_error(f"--tokenizer {opts.tokenizer}: {e}")
    try:
        with stop_on_sigterm():
            report = validate(args.data_txt, opts, workers=args.workers, progress=True)
    except DataTxtError as e:
        return _usage_error(f"{e.message} ({e.hint})")
    except KeyboardInterrupt as e:
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"\nxc-prep validate: {how}; nothing was reported", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenProcessPool as e:
        print(
            f"xc-prep validate: error: a worker process died ({e}): killed, or out of memory? "
            "Run again, with fewer --workers if memory is short",
            file=sys.stderr,
        )
        return ExitCode.INVALID_DATA
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(dumps_json(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return ExitCode.OK if report.ok else ExitCode.INVALID_DATA


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.validate DATA_TXT ...` (same as `xc-prep validate`)."""
    parser = argparse.ArgumentParser(prog="xc-prep")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:
        return int(e.code or 0)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
