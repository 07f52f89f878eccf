"""Parse `data.txt`, the list of JSON sources, into `schemas.record.Source`s plus findings.

One line per source: `<json path> <k>` (docs/IXC25.md#data-txt); the source contributes `int(k * 1000)` samples
per epoch, at most `schemas.record.MAX_SAMPLES_PER_EPOCH` (k <= MAX_K). Blank lines and lines starting with `#` are skipped (the official recipe would choke on
them, we are lenient). Paths resolve against the current directory first, then against data.txt's
folder. Every problem becomes a `Finding` whose `file` is data.txt as the user named it and whose
`line` is 1-based; a line with an error yields no `Source`.

    sources, findings = parse_data_txt(Path("data/data.txt"))

A data.txt that does not exist or cannot be read raises `DataTxtError` (a usage error, exit 2).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.errors import DataError
from pipeline.media import resolve_path
from schemas.record import MAX_K, MAX_SAMPLES_PER_EPOCH, Source
from schemas.report import Finding, Severity

LINE_FORMAT = 'expected "<file.json> <k>", e.g. "data/vqa.json 0.5"'
DATA_TXT_CODES = frozenset(
    {
        "source_missing_k",
        "source_bad_k",
        "source_nonpositive_k",
        "source_extra_columns",
        "source_file_missing",
        "source_zero_samples",
        "source_duplicate",
        "data_txt_empty",
    }
)
"""Every finding code about a data.txt line (usage errors raise `DataTxtError` instead)."""


class DataTxtError(DataError):
    """data.txt itself is missing or unreadable: nothing to validate (a usage error)."""


def _samples_text(k: float) -> str:
    """int(k * 1000) as text, in scientific notation when it is too long to read."""
    samples = k * 1000
    if not math.isfinite(samples):
        return "more than 1e308 (it overflows)"
    return f"{int(samples):,}" if samples < 1e15 else f"{samples:.3g}"


def _path_problem(path: Path) -> str | None:
    """Why the OS cannot even look the path up (NUL, name too long...), or None."""
    try:
        path.stat()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
    return None


def _is_file(path: Path) -> bool:
    return _path_problem(path) is None and path.is_file()


def parse_data_txt(data_txt: Path) -> tuple[list[Source], list[Finding]]:
    """Read `data_txt` into sources (in file order) and findings about its lines."""
    shown = str(data_txt)
    if not data_txt.exists():
        raise DataTxtError("data_txt_missing", f"{shown}: file not found", "check the path to data.txt")
    if not data_txt.is_file():
        raise DataTxtError(
            "data_txt_missing", f"{shown}: is not a file", "pass the data.txt file, not its folder"
        )
    try:
        text = data_txt.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataTxtError(
            "data_txt_unreadable", f"{shown}: not UTF-8 text ({e})", "save data.txt as UTF-8 text"
        ) from e
    except OSError as e:
        raise DataTxtError("data_txt_unreadable", f"{shown}: cannot read ({e})", "check permissions") from e

    sources: list[Source] = []
    findings: list[Finding] = []
    seen: dict[Path, int] = {}

    def finding(line: int, code: str, message: str, hint: str, severity: Severity = "error") -> None:
        findings.append(Finding(shown, line, None, None, code, message, severity, hint))

    # read_text() already turned \r\n and \r into \n; splitlines() would also split on \x0b, \x0c,
    # \x85, \u2028..., which editors do not count, and the line numbers would disagree.
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        path = parts[0]
        if len(parts) == 1:
            finding(
                line_no,
                "source_missing_k",
                f"no k after {path!r} ({LINE_FORMAT})",
                f'add the weight, e.g. "{path} 0.5" for 500 samples per epoch',
            )
            continue
        if len(parts) > 2:
            joined = " ".join(parts[:-1])
            hint = "keep exactly two columns: the JSON path and k"
            if _is_file(resolve_path(joined, data_txt.parent)):
                hint = f"{joined!r} exists, but paths with spaces are not supported: rename the file"
            finding(
                line_no, "source_extra_columns", f"{len(parts)} columns in {line!r} ({LINE_FORMAT})", hint
            )
            continue
        k_text = parts[1]
        try:
            k = float(k_text)
        except ValueError:
            finding(
                line_no,
                "source_bad_k",
                f"k {k_text!r} is not a number ({LINE_FORMAT})",
                "write k as a decimal number such as 0.5 (int(k * 1000) samples per epoch)",
            )
            continue
        if not math.isfinite(k):
            finding(
                line_no,
                "source_bad_k",
                f"k {k_text!r} is not a finite number ({LINE_FORMAT})",
                "write k as a positive decimal number such as 0.5",
            )
            continue
        if k <= 0:
            finding(
                line_no,
                "source_nonpositive_k",
                f"k {k_text!r} must be > 0",
                "remove the line to drop the source, or give it a positive weight",
            )
            continue
        if k > MAX_K:
            finding(
                line_no,
                "source_bad_k",
                f"k {k_text!r} asks for int(k * 1000) = {_samples_text(k)} samples per epoch, more than "
                f"{MAX_SAMPLES_PER_EPOCH:,} (k {MAX_K:,}): the trainer's epoch plan holds every drawn "
                "sample in memory",
                f"write k as the number of thousands of samples per epoch, at most {MAX_K:,} "
                '(e.g. "data/vqa.json 0.5" for 500)',
            )
            continue

        resolved = resolve_path(path, data_txt.parent)
        if (problem := _path_problem(resolved)) is not None:
            finding(
                line_no,
                "source_file_missing",
                f"{path!r} cannot be opened ({problem})",
                "fix the path; relative paths resolve against the current directory, then data.txt's folder",
            )
            continue
        if not resolved.exists():
            finding(
                line_no,
                "source_file_missing",
                f"{path!r} not found in the current directory ({Path.cwd()}) nor in data.txt's folder "
                f"({data_txt.parent.absolute()})",
                "fix the path; relative paths resolve against the current directory, then data.txt's folder",
            )
            continue
        if not resolved.is_file():
            finding(line_no, "source_file_missing", f"{path!r} is not a file", "name a JSON file")
            continue
        if int(k * 1000) == 0:
            finding(
                line_no,
                "source_zero_samples",
                f"k {k_text} gives int(k * 1000) = 0 samples per epoch: the source is never used",
                "use k >= 0.001",
                "warning",
            )
        key = resolved.resolve()
        if key in seen:
            finding(
                line_no,
                "source_duplicate",
                f"{path!r} is already listed on line {seen[key]}: it will be sampled twice",
                "list each JSON file once and add the weights",
                "warning",
            )
        seen.setdefault(key, line_no)
        sources.append(Source(path=path, resolved=resolved, k=k, line=line_no))

    if not sources and not findings:
        finding(
            1,
            "data_txt_empty",
            f"no sources listed ({LINE_FORMAT})",
            "add one line per JSON file",
        )
    return sources, findings
