"""`xc-prep convert`: LLaVA, ShareGPT, OpenAI-messages and Hugging Face data → the official JSON format.

    xc-prep convert llava_v1_5_mix665k.json --image-folder /data/llava --out converted/
    xc-prep convert chats.jsonl more.json --out converted/ --system drop
    xc-prep convert my_dataset/ --split train --out converted/     (a save_to_disk folder: needs '[hf]')
    xc-prep convert train-0000.parquet train-0001.parquet --out converted/

Each input is a JSON list or JSON Lines file of records (pipeline/chat_formats.py says which shapes
are read and how `<ImageHere>` and system turns are placed), a folder written by the `datasets`
library's `save_to_disk`, or a parquet file; image cells of a dataset are written out as files.

Output under --out, every file written atomically (temp file, fsync, rename):
    <input name>.json   the converted records, in input order, one per line
    images/             images that came as bytes (dataset cells, data: URLs), named by their sha256
    rejects.jsonl       one line per record not converted: file, index, line, id, code, message, fix
    data.txt            written last: `<name>.json <k>` per input with k = records / 1000, so every
                        record is drawn once per epoch; edit k to weigh the sources

Media paths are written relative to --out when the file lies inside it, else absolute; relative
input paths resolve against --image-folder when given, else the current directory, then the input
file's folder. Nothing is fetched from the network. Ids are kept; a missing id becomes the record's
index and a repeated one `<id>#<index>` (the summary counts both).
Exit status: 0 converted (rejected records are listed, not fatal); 1 an input could not be read or
gave no record (then no data.txt is written: rejects.jsonl says why); 2 usage error. An existing
data.txt in --out that convert did not write is never replaced.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import math
import os
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.chat_formats import (
    CONVERT_HINTS,
    SYSTEM_POLICIES,
    MediaKind,
    SystemPolicy,
    convert_record,
    json_type,
    reject,
)
from pipeline.errors import DataError
from pipeline.hf_dataset import HF_HINTS, hf_rows, is_hf_input
from pipeline.media import resolve_path
from schemas.atomic import write_atomic
from schemas.cli import ExitCode
from schemas.report import Finding

DATA_TXT_NAME = "data.txt"
DATA_TXT_HEADER = (
    "# written by xc-prep convert: k = records / 1000 (every record once per epoch); edit to weigh"
)
REJECTS_NAME = "rejects.jsonl"
IMAGES_DIR = "images"
KNOWN_RECORD_KEYS = frozenset(
    {"id", "conversations", "messages", "image", "images", "video", "videos", "system"}
)
IMAGE_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
}
VIDEO_MIME_EXTENSIONS = {
    "video/mp4": ".mp4",
    "video/x-msvideo": ".avi",
    "video/x-matroska": ".mkv",
    "video/quicktime": ".mov",
    "video/x-ms-wmv": ".wmv",
}
FILE_HINTS: dict[str, str] = {
    "file_unreadable": "check the path and its permissions",
    "json_not_utf8": "save the file as UTF-8",
    "json_not_a_list": "the file must hold a JSON list of records, or one JSON record per line (JSON Lines)",
    "nothing_converted": "fix the rejected records (see rejects.jsonl) and convert again",
    **HF_HINTS,
}
"""Problems with a whole input: the run writes no converted file (exit 1)."""


# ---------------------------------------------------------------- media


class MediaStore:
    """Turns the media values of records into paths for the official JSON (files written under --out)."""

    def __init__(self, out_dir: Path, image_folder: Path | None):
        self.out_dir = out_dir
        self.image_folder = image_folder
        self.input_dir = Path.cwd()
        self.written: set[str] = set()
        self.outside_roots: set[Path] = set()
        """Folders of referenced files outside --out and the current directory (for --allow-path)."""

    def resolve(self, value: Any, kind: MediaKind) -> str:
        if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a datasets.Image cell
            if value.get("bytes") is not None:
                return self._write(bytes(value["bytes"]), kind, mime=None)
            value = value.get("path")
        if not isinstance(value, str) or not value.strip():
            raise reject(
                "media_bad_type", f"a {kind} is given as a JSON {json_type(value)} ({str(value)[:60]!r})"
            )
        if value.startswith("data:"):
            return self._data_url(value, kind)
        scheme = urllib.parse.urlsplit(value).scheme.lower()
        if scheme == "file":
            value = urllib.parse.unquote(urllib.parse.urlsplit(value).path)
        elif scheme in ("http", "https", "ftp", "s3", "gs", "hf"):
            raise reject("media_remote", f"the {kind} {value[:80]!r} is a remote URL")
        return self._local(value, kind)

    def _local(self, path_text: str, kind: MediaKind) -> str:
        path = Path(path_text)
        folders = [self.image_folder] if self.image_folder else [Path.cwd(), self.input_dir]
        if path.is_absolute():
            found, folder = (path, path.parent) if _is_file(path) else (None, None)
        else:
            folder = next((f for f in folders if _is_file(f / path)), None)
            found = folder / path if folder is not None else None
        if found is None or folder is None:
            where = "" if path.is_absolute() else " in " + " nor in ".join(str(f) for f in folders)
            raise reject("media_missing", f"the {kind} {path_text!r} was not found{where}")
        real, out = found.resolve(), self.out_dir.resolve()
        if real.is_relative_to(out):
            return os.path.relpath(real, out)
        if not real.is_relative_to(Path.cwd().resolve()):
            self.outside_roots.add(folder.resolve())
        return os.path.abspath(found)

    def _data_url(self, url: str, kind: MediaKind) -> str:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise reject("media_data_url", f"the {kind} data: URL is not base64 ({header[:40]!r})")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise reject("media_data_url", f"the {kind} data: URL does not decode as base64 ({e})") from e
        return self._write(data, kind, mime=header[len("data:") : -len(";base64")].lower())

    def _write(self, data: bytes, kind: MediaKind, mime: str | None) -> str:
        if kind == "video":
            if mime not in VIDEO_MIME_EXTENSIONS:
                raise reject("video_extension", f"a video given as bytes of type {mime or 'unknown'!r}")
            extension = VIDEO_MIME_EXTENSIONS[mime]
        else:
            extension = _image_extension(data)
        name = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()[:32]}{extension}"
        if name not in self.written:
            target = self.out_dir / name
            if not (target.is_file() and target.read_bytes() == data):
                write_atomic(target, data)
            self.written.add(name)
        return name


def _is_file(path: Path) -> bool:
    """Path.is_file() that says False for names the OS refuses (NUL, too long, bad encoding)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _image_extension(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError

    from pipeline.media import ACCEPTED_FORMATS_TEXT, IMAGE_FORMATS

    try:
        # the header only (validate decodes it later), and only formats decoded in-process
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt = im.format or ""
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise reject(
            "image_bytes_unreadable",
            f"{len(data):,} bytes that are not a {ACCEPTED_FORMATS_TEXT} image ({e})",
        ) from e
    return IMAGE_EXTENSIONS.get(fmt, "." + fmt.lower())


# ---------------------------------------------------------------- reading inputs


@dataclass(frozen=True)
class RawRecord:
    index: int
    line: int | None
    value: Any
    error: DataError | None = None


def read_json_records(path: Path) -> Iterator[RawRecord]:
    """A JSON list or JSON Lines file, record by record; raises DataError when the file is unusable."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DataError("file_unreadable", f"cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise DataError("json_not_utf8", f"byte {e.start} is not UTF-8 ({e.reason})") from e
    try:
        whole = json.loads(text)
    except (RecursionError, ValueError) as e:  # nested too deeply, a 5,000-digit number
        if not isinstance(e, json.JSONDecodeError):
            raise DataError("json_syntax", f"the JSON holds a value Python refuses to parse ({e})") from e
        if e.msg != "Extra data":  # several values: JSON Lines
            raise DataError(
                "json_syntax", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from e
        return _json_lines(text)
    if isinstance(whole, dict) and any(k in whole for k in ("conversations", "messages")):
        whole = [whole]  # a JSON Lines file with one record
    if not isinstance(whole, list):
        raise DataError("json_not_a_list", f"the top level is a JSON {json_type(whole)}, not a list")
    return (RawRecord(i, None, value) for i, value in enumerate(whole))


def _json_lines(text: str) -> Iterator[RawRecord]:
    index = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = RawRecord(index, line_no, json.loads(line))
        except json.JSONDecodeError as e:
            record = RawRecord(
                index, line_no, None, reject("json_syntax", f"line {line_no}: {e.msg} (column {e.colno})")
            )
        except (RecursionError, ValueError) as e:  # nested too deeply, a 5,000-digit number
            record = RawRecord(index, line_no, None, reject("json_syntax", f"line {line_no}: {e}"))
        yield record
        index += 1


# ---------------------------------------------------------------- converting one input


@dataclass
class InputResult:
    """One input file converted: the official records and everything the summary reports."""

    path: Path
    label: str
    """The input as given on the command line (used in rejects and the summary)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Finding] = field(default_factory=list)
    read: int = 0
    layouts: Counter[str] = field(default_factory=Counter)
    system: Counter[str] = field(default_factory=Counter)
    joined_turns: int = 0
    ids_from_index: int = 0
    ids_renamed: int = 0
    ignored_keys: Counter[str] = field(default_factory=Counter)
    file_error: Finding | None = None


def convert_input(
    path: Path, label: str, store: MediaStore, system: SystemPolicy, split: str | None
) -> InputResult:
    """Convert every record of one input; record problems become rejects, file problems `file_error`."""
    result = InputResult(path, label)
    store.input_dir = (path.parent if path.is_file() else path).absolute()
    try:
        if is_hf_input(path):
            _, rows, _ = hf_rows(path, split)
            raw_records: Iterator[RawRecord] = (RawRecord(i, None, row) for i, row in enumerate(rows))
        else:
            raw_records = read_json_records(path)
        ids: set[Any] = set()
        for raw in raw_records:
            result.read += 1
            _convert_one(raw, result, store, system, ids)
    except DataError as e:
        hint = FILE_HINTS.get(e.code) or CONVERT_HINTS.get(e.code, "")
        result.file_error = Finding(label, None, None, None, e.code, e.message, "error", e.hint or hint)
        return result
    if not result.records:
        result.file_error = Finding(
            label,
            None,
            None,
            None,
            "nothing_converted",
            f"none of its {result.read:,} records could be converted",
            "error",
            FILE_HINTS["nothing_converted"],
        )
    return result


def _convert_one(
    raw: RawRecord, result: InputResult, store: MediaStore, system: SystemPolicy, ids: set[Any]
) -> None:
    value = raw.value
    raw_id = value.get("id") if isinstance(value, dict) else None
    shown_id = raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    try:
        if raw.error is not None:
            raise raw.error
        converted = convert_record(value, store.resolve, system)
        rid: Any = shown_id
        if rid is None:
            rid = raw.index
            result.ids_from_index += 1
        if rid in ids:
            rid = f"{rid}#{raw.index}"
            result.ids_renamed += 1
            if rid in ids:
                raise reject("duplicate_id", f"the id {shown_id!r} repeats and {rid!r} is taken too")
    except DataError as e:
        result.rejects.append(
            Finding(result.label, raw.line, raw.index, shown_id, e.code, e.message, "error", e.hint)
        )
        return
    ids.add(rid)
    result.records.append({"id": rid, **converted.record})
    result.layouts[converted.layout] += 1
    result.system[converted.system] += 1
    result.joined_turns += converted.joined_turns
    result.ignored_keys.update(k for k in value if k not in KNOWN_RECORD_KEYS)


# ---------------------------------------------------------------- writing


def k_for(records: int) -> str:
    """The shortest k with int(k * 1000) == records (as data.txt reads it): each record once per epoch."""
    k = records / 1000
    while int(k * 1000) < records:  # 0.029 * 1000 = 28.999...: take the next float up
        k = math.nextafter(k, math.inf)
    return repr(k)


def records_json(records: list[dict[str, Any]]) -> str:
    """A JSON list with one record per line (readable, diffable, deterministic)."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def output_names(inputs: list[Path], split: str | None) -> list[str]:
    """`<input stem>.json` per input (`<folder>-<split>.json` for a dataset folder with --split), unique."""
    names: list[str] = []
    for path in inputs:
        stem = (f"{path.name}-{split}" if split else path.name) if path.is_dir() else path.stem
        base, n = stem or "converted", 1
        name = f"{base}.json"
        while name in names or name in (DATA_TXT_NAME, REJECTS_NAME):
            n += 1
            name = f"{base}-{n}.json"
        names.append(name)
    return names


def data_txt_entry(out_dir: Path, name: str) -> str:
    """How data.txt names an output: its bare name, unless that would find another file from the
    current directory (data.txt paths resolve there first), then its absolute path."""
    target = (out_dir / name).resolve()
    if resolve_path(name, out_dir).resolve() == target:
        return name
    return str(target)


def write_outputs(out_dir: Path, results: list[InputResult], names: list[str]) -> Path:
    """The converted JSON files, then data.txt (its presence means the folder is complete)."""
    lines = [DATA_TXT_HEADER]
    for result, name in zip(results, names, strict=True):
        write_atomic(out_dir / name, records_json(result.records).encode())
        lines.append(f"{data_txt_entry(out_dir, name)} {k_for(len(result.records))}")
    data_txt = out_dir / DATA_TXT_NAME
    write_atomic(data_txt, ("\n".join(lines) + "\n").encode())
    return data_txt


def write_rejects(out_dir: Path, results: list[InputResult]) -> Path:
    rows = [
        {
            "file": f.file,
            "index": f.index,
            "line": f.line,
            "id": f.id,
            "code": f.code,
            "message": f.message,
            "fix": f.hint,
        }
        for r in results
        for f in r.rejects
    ]
    path = out_dir / REJECTS_NAME
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
    return path


# ---------------------------------------------------------------- summary


def summary_lines(result: InputResult, name: str | None) -> list[str]:
    head = f"{result.label}: {result.read:,} records read, {len(result.records):,} converted, {len(result.rejects):,} rejected"
    if name is not None:
        head += f" -> {name}"
    lines = [head]
    facts = []
    if result.layouts:
        facts.append("turns as " + ", ".join(f"{k} {v:,}" for k, v in sorted(result.layouts.items())))
    if result.system["merged"]:
        facts.append(f"system turn merged into the first question in {result.system['merged']:,}")
    if result.system["dropped"]:
        facts.append(f"system turn dropped in {result.system['dropped']:,}")
    if result.joined_turns:
        facts.append(f"{result.joined_turns:,} consecutive same-role turns joined")
    if result.ids_from_index:
        facts.append(f"{result.ids_from_index:,} ids set to the record index (none given)")
    if result.ids_renamed:
        facts.append(f"{result.ids_renamed:,} repeated ids renamed <id>#<index>")
    if result.ignored_keys:
        facts.append(
            "keys not converted: " + ", ".join(f"{k} ({v:,})" for k, v in result.ignored_keys.most_common())
        )
    lines += [f"  {fact}" for fact in facts]
    return lines


def _format_findings(findings: list[Finding]) -> str:
    from pipeline.validate import format_findings  # the grouped listing validate prints

    return format_findings(findings)


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert LLaVA, ShareGPT, OpenAI-messages or Hugging Face data to the official JSON + data.txt",
        description=(
            "Convert JSON/JSON Lines files of LLaVA, ShareGPT or OpenAI chat records, saved Hugging Face "
            "dataset folders or parquet files into the official IXC2.5 JSON format and a data.txt. Every "
            "record that cannot be converted is listed in OUT/rejects.jsonl with the reason and a fix. "
            "Exit 0: converted; 1: an input could not be read or gave no record; 2: usage error."
        ),
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="JSON/JSONL file, dataset folder or .parquet"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for the converted files"
    )
    parser.add_argument(
        "--image-folder",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder that relative image/video paths start from (LLaVA's image folder); by default the "
        "current directory, then the input file's folder",
    )
    parser.add_argument(
        "--system",
        choices=SYSTEM_POLICIES,
        default="merge",
        help="what to do with a system turn, which the official format lacks: merge (default) puts its "
        "text before the first question, drop leaves it out",
    )
    parser.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="split of a saved DatasetDict folder (needed when it has several)",
    )
    parser.set_defaults(run=run)


def _usage_error(message: str) -> int:
    print(f"xc-prep convert: {message}", file=sys.stderr)
    return ExitCode.USAGE


def run(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        return _usage_error(f"input not found: {', '.join(missing)}")
    if args.image_folder is not None and not args.image_folder.is_dir():
        return _usage_error(f"--image-folder {args.image_folder}: not an existing folder")
    if args.out.exists() and not args.out.is_dir():
        return _usage_error(f"--out {args.out}: exists and is not a folder")
    names = output_names(args.inputs, args.split)
    inputs = {p.resolve() for p in args.inputs}
    if clash := [n for n in names if (args.out / n).resolve() in inputs]:
        return _usage_error(
            f"--out {args.out}: writing {', '.join(clash)} would replace an input; pick another folder"
        )
    data_txt = args.out / DATA_TXT_NAME
    if data_txt.is_file() and not data_txt.read_text(errors="replace").startswith(DATA_TXT_HEADER):
        return _usage_error(
            f"--out {args.out}: holds a data.txt that xc-prep convert did not write; pick another folder"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    data_txt.unlink(missing_ok=True)  # a folder with data.txt always holds one complete conversion
    store = MediaStore(args.out, args.image_folder.resolve() if args.image_folder else None)
    results = [convert_input(p, str(p), store, args.system, args.split) for p in args.inputs]
    for result, name in zip(results, names, strict=True):
        print("\n".join(summary_lines(result, name if result.file_error is None else None)))
    rejects = [f for r in results for f in r.rejects]
    rejects_path = write_rejects(args.out, results)
    if rejects:
        print(f"\nrejected records ({len(rejects):,}; all of them in {rejects_path}):\n")
        print(_format_findings(rejects))
    file_errors = [r.file_error for r in results if r.file_error is not None]
    if file_errors:
        print(_format_findings(file_errors))
        print(f"FAILED: {len(file_errors)} input(s) gave nothing to convert; no data.txt was written")
        return ExitCode.INVALID_DATA
    write_outputs(args.out, results, names)
    converted = sum(len(r.records) for r in results)
    images = f", {len(store.written):,} images written to {args.out / IMAGES_DIR}" if store.written else ""
    print(f"\nOK: {converted:,} records converted, {len(rejects):,} rejected{images}; wrote {data_txt}")
    allow = "".join(f" --allow-path {folder}" for folder in sorted(store.outside_roots))
    print(f"next: xc-prep validate {data_txt}{allow}")
    return ExitCode.OK
