"""Reading one JSON source file, and JSON values as findings and reports carry them.

`load_source(source)` reads and parses a data.txt source into a `LoadedSource`: the top-level list,
its sha256, or the file-level findings that make it unusable (unreadable, larger than memory
allows, not UTF-8, a JSON syntax error with line and column, not a list, empty). A file larger than
`json_size_limit()` (memory / JSON_MEMORY_FACTOR) is refused from its size, before it is read.

`dumps_json(obj)`: JSON text that always encodes as UTF-8 (lone surrogates escaped); `finding_id`,
`short` and `json_type` show record ids and values in findings; `json_depth` measures nesting
without recursion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.record import Source
from schemas.report import Finding

FILE_HINTS: dict[str, str] = {
    # file level
    "file_unreadable": "check the file's permissions",
    "json_not_utf8": "save the file as UTF-8 JSON",
    "json_syntax": "fix the JSON at that line and column (a trailing comma or an unescaped quote is typical)",
    "json_not_a_list": 'the file must hold a JSON list of records: [{"id": ..., "conversations": [...]}, ...]',
    "source_empty": "add records to the file, or remove its line from data.txt",
    "json_too_large": (
        "split the file into several JSON files, each on its own data.txt line with its share of k, "
        "or run on a machine with more memory"
    ),
}
"""The file-level finding codes with their fix hints."""


@dataclass(frozen=True)
class LoadedSource:
    """A JSON source file read and parsed, before its records are checked."""

    source: Source
    records: list[Any] | None
    """The top-level list, or None when the file cannot be used (see file_findings)."""
    file_findings: list[Finding]
    sha256: str | None
    """sha256 of the exact bytes that were parsed (None when unreadable)."""


def load_source(source: Source) -> LoadedSource:
    """Read and parse one JSON source; file-level problems become findings."""

    def fail(code: str, message: str, line: int | None = None) -> LoadedSource:
        finding = Finding(source.path, line, None, None, code, message, "error", FILE_HINTS[code])
        return LoadedSource(source, None, [finding], sha256)

    sha256 = None
    limit = json_size_limit()
    try:
        size = source.resolved.stat().st_size
        if size > limit:
            return fail("json_too_large", _too_large_message(size, limit))
        data = source.resolved.read_bytes()
    except OSError as e:
        return fail("file_unreadable", f"cannot read {source.resolved} ({e.strerror or e})")
    except MemoryError:
        return fail("json_too_large", _too_large_message(size, limit, ran_out=True))
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return fail("json_not_utf8", f"byte {e.start} (line {line}) is not UTF-8 ({e.reason})", line)
    except MemoryError:
        return fail("json_too_large", _too_large_message(size, limit, ran_out=True))
    try:
        obj = json.loads(text)
    except MemoryError:
        del data, text
        return fail("json_too_large", _too_large_message(size, limit, ran_out=True))
    except json.JSONDecodeError as e:
        return fail("json_syntax", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", e.lineno)
    except RecursionError:
        return fail("json_syntax", "the JSON nests lists/objects too deeply for the parser (~900 levels)")
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        return fail("json_syntax", f"the JSON holds a value Python refuses to parse ({e})")
    if not isinstance(obj, list):
        return fail(
            "json_not_a_list", f"the top level is a JSON {json_type(obj)}, expected a list of records"
        )
    if not obj:
        return fail(
            "source_empty",
            f"the file holds no records, but data.txt line {source.line} asks for "
            f"{source.samples_per_epoch} samples per epoch",
        )
    return LoadedSource(source, obj, [], sha256)


JSON_MEMORY_FACTOR = 10
"""A JSON file costs about this many times its size in memory while it is read and checked (its
bytes, its text, the parsed records and what the checks derive from them)."""


def memory_bytes() -> int:
    """The memory this process may use: the machine's, or its container's limit (cgroup) if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def json_size_limit() -> int:
    """The largest JSON file `load_source` reads: memory / JSON_MEMORY_FACTOR."""
    return memory_bytes() // JSON_MEMORY_FACTOR


def _too_large_message(size: int, limit: int, ran_out: bool = False) -> str:
    why = (
        "reading it ran out of memory"
        if ran_out
        else f"more than the {limit / 1e9:,.1f} GB limit: reading and checking a JSON file takes about "
        f"{JSON_MEMORY_FACTOR}× its size in memory, and this machine has {memory_bytes() / 1e9:,.1f} GB"
    )
    return f"the file is {size / 1e9:,.2f} GB, {why}"


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj, ensure_ascii=False)` whose text always encodes as UTF-8.

    JSON input may hold lone UTF-16 surrogates ("\\ud800" escapes); a record id carries them into
    findings. They are written back as the same escapes, which every JSON reader decodes again.
    """
    return escape_surrogates(json.dumps(obj, ensure_ascii=False, **kwargs))


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a list nested ~900 deep parses, but repr() may not have the stack left
        return f"<a JSON {json_type(value)} nested too deeply to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds an unpaired UTF-16 surrogate (not text: it cannot be encoded), or None."""
    if (m := _LONE_SURROGATE.search(text)) is None:
        return None
    return f"the unpaired surrogate {m.group()!r} at character {m.start()}"


def escape_surrogates(text: str) -> str:
    """Lone surrogates as visible backslash-u text, so that findings always encode as UTF-8."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def finding_id(rid: Any) -> Any:
    """The record id as findings and rejects.jsonl carry it: JSON-safe, UTF-8-safe and small.

    A string or integer id is kept (lone surrogates escaped as text); an invalid id is kept when it
    is a small plain JSON value, else it is replaced by its shortened repr.
    """
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    if isinstance(rid, str):
        return escape_surrogates(rid)
    try:
        text = json.dumps(rid, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):  # NaN/Infinity, or nested too deeply
        return short(rid)
    return rid if len(text) <= 200 and not _LONE_SURROGATE.search(text) else short(rid)


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of lists/objects in a JSON value (a scalar: 0), without recursion; counting
    stops once it passes `limit`."""
    if type(value) is not dict and type(value) is not list:
        return 0
    depth = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if type(node) is dict else node
        if level > depth:
            depth = level
            if depth > limit:
                break
        stack.extend((c, level + 1) for c in children if type(c) is dict or type(c) is list)
    return depth
