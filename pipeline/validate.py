"""Check data.txt, its JSON files and their media in one pass; the `xc-prep validate` command.

Every problem becomes a `schemas.report.Finding` with a stable snake_case `code`, a message that
says what and why, and a `hint` that says what to do. Nothing stops at the first problem: the
report lists everything, grouped by code, then a per-source table and one summary line.
Exit status: 0 no errors (warnings allowed), 1 errors, 2 usage error (bad flag, no data.txt).

Reusable API (`xc-prep shard` calls the same functions, so both apply exactly the same checks):

    opts = ValidateOptions(hd_num=18, max_length=16384, tokenizer=Path("tokenizer.model"))
    sources, findings = pipeline.sources.parse_data_txt(Path("data.txt"))
    check = check_source(sources[0], opts)      # one JSON file; a pure function of its arguments
    check.file_findings    # list[Finding]: unreadable file, JSON syntax error (line/col), not a list
    check.records          # list[RecordCheck] in file order: index, id, record, findings, plus
                           # num_images, num_videos, tokens, trained_tokens (None without tokenizer)
    check.records[i].record  # schemas.record.Record, or None when that record has an error

Finer pieces for callers that spread one big file over processes (all picklable in and out):

    load_source(source) -> LoadedSource                    raw records, file findings, sha256
    check_records(source, raw_records, start, opts) -> list[RecordCheck]
    mark_duplicate_ids(file, checks) -> list[RecordCheck]  needs the whole file: run it once

The whole run: `check_all(data_txt, opts, workers=, progress=) -> CheckedInputs`,
`build_report(checked, opts) -> Report`, `validate(data_txt, opts, ...) -> Report`,
`format_report(report) -> str`, `format_findings(findings) -> str` (the grouped listing alone),
`dumps_json(obj) -> str` (JSON text that always encodes as UTF-8, for reports and rejects).

Finding codes: see `HINTS` below (record, file and media codes) and `pipeline.sources.DATA_TXT_CODES`
(data.txt codes: source_missing_k, source_bad_k, source_nonpositive_k, source_extra_columns,
source_file_missing, source_zero_samples, source_duplicate, data_txt_empty).

Safety policy (RELIABILITY.md; the flags come from `add_media_policy_arguments`, shared with shard):
a media path must resolve, after `..` and symlinks, inside the current directory, the JSON file's
folder or an --allow-path folder (`media_outside_roots`, the file is never opened; --allow-any-path
turns this off); images over --max-image-pixels and videos over --max-video-seconds (or with frames
over --max-image-pixels) are refused from headers/metadata before decoding (`image_too_large`,
`video_too_long`, `video_frame_too_large`); text that is not valid Unicode (lone surrogates from
"\\ud800" escapes) is `invalid_unicode`. No input makes the checks raise: tests/test_fuzz.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import DataError
from pipeline.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    load_rgb,
    probe_image_size,
    real_path,
    resolve_path,
    within_roots,
)
from pipeline.sources import DataTxtError, parse_data_txt
from pipeline.template import DEFAULT_MAX_LENGTH, LAYOUTS
from pipeline.tiling import DEFAULT_HD_NUM, STYLES
from schemas.cli import ExitCode
from schemas.record import (
    IMAGE_PLACEHOLDER,
    Record,
    Role,
    Source,
    Turn,
    is_video_path,
    role_of,
)
from schemas.report import Finding, Report, Severity, SourceSummary
from schemas.sample import IGNORE_INDEX, Layout, Style

DEFAULT_MAX_VIDEO_SECONDS = 7200.0
"""Two hours: longer is almost surely a mistake; only 32 frames are ever decoded, but the frame
index and the 1-fps sampling list grow with the length."""

RECORD_KEYS = frozenset({"id", "conversations", "image"})
TURN_KEYS = frozenset({"from", "value"})
# Strings the tokenizer maps to special ids: ids 92544..92549 lie outside the 92,544-row embedding
# matrix, and the turn markers / BOS / EOS / UNK inside a value break turn parsing and labels.
SPECIAL_STRINGS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
    "[UNUSED_TOKEN_145]",
    "[UNUSED_TOKEN_146]",
    "</s>",
    "<s>",
    "<unk>",
)
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_STRINGS))
_PLACEHOLDER_LOWER = IMAGE_PLACEHOLDER.lower()

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

HINTS: dict[str, str] = {
    # file level
    "file_unreadable": "check the file's permissions",
    "json_not_utf8": "save the file as UTF-8 JSON",
    "json_syntax": "fix the JSON at that line and column (a trailing comma or an unescaped quote is typical)",
    "json_not_a_list": 'the file must hold a JSON list of records: [{"id": ..., "conversations": [...]}, ...]',
    "source_empty": "add records to the file, or remove its line from data.txt",
    # record structure
    "record_not_object": 'each list element must be an object {"id", "conversations", "image"?}',
    "id_missing": 'add a unique "id" (a string or an integer) to the record',
    "id_bad_type": 'make "id" a string or an integer',
    "duplicate_id": "give every record of a file its own id",
    "unknown_key": "remove or rename the key; only id, conversations, image (and from, value in turns) are read",
    "conversations_missing": 'add "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]',
    "conversations_bad_type": '"conversations" must be a non-empty list of {"from", "value"} objects',
    "conversations_empty": "add at least one user turn and one assistant answer, or drop the record",
    "turn_not_object": 'each turn must be an object {"from": ..., "value": ...}',
    "turn_missing_from": 'add "from": "human" (user) or "gpt" (assistant)',
    "turn_missing_value": 'add "value": the turn\'s text',
    "value_not_string": '"value" must be a string',
    "value_empty": "write the turn's text, or drop the turn (and its pair)",
    "unknown_role": 'use "human"/"user" for the user and "gpt"/"bot"/"assistant" for the answer',
    "turn_order": "turns must alternate user, assistant, user, ... starting with the user",
    "last_turn_not_assistant": "end the conversation with an assistant answer (the last user turn is never trained on)",
    # placeholders and special strings
    "placeholder_count_mismatch": (
        "write one <ImageHere> per image in the user text, in image order "
        "(e.g. 'Image1: <ImageHere>; Image2: <ImageHere>.'); a single image needs none"
    ),
    "placeholder_in_assistant": "remove <ImageHere> from assistant answers: images belong to user turns",
    "placeholder_without_media": 'remove <ImageHere>, or add the image path(s) under "image"',
    "placeholder_lookalike": "write the placeholder exactly as <ImageHere> (case-sensitive), or reword the text",
    "placeholder_other_format": (
        "convert the file with `xc-prep convert FILE --out DIR` (LLaVA/ShareGPT/OpenAI records; it places "
        "<ImageHere> by the official rules), or write <ImageHere> yourself"
    ),
    "special_token": (
        "remove or reword the special string (e.g. write '<|im_start|>' as '< |im_start| >'): "
        "the tokenizer turns it into a control token"
    ),
    # media
    "image_bad_type": '"image" must be a path string or a non-empty list of path strings',
    "media_missing": "fix the path; relative paths resolve against the current directory, then the JSON file's folder",
    "media_empty": "the file has 0 bytes: re-download or re-export it",
    "image_unreadable": "the file is not an image Pillow can open: check that it is a JPEG/PNG/WebP/... and not HTML or text",
    "image_corrupt": "the image is truncated or damaged: re-download or re-export it",
    "image_too_large": (
        "downscale the image (HD tiling at hd_num 18 never uses more than 10,080 px on a side), "
        "or raise --max-image-pixels if the file is trusted"
    ),
    "video_unreadable": "re-encode the video (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or fix the path",
    "video_too_long": "cut the video (e.g. ffmpeg -i in.mp4 -t 600 -c copy out.mp4), or raise --max-video-seconds",
    "video_frame_too_large": "downscale the video (e.g. ffmpeg -i in.mp4 -vf scale=1920:-2 out.mp4), or raise --max-image-pixels",
    "media_outside_roots": (
        "keep media inside the current directory or the JSON file's folder, or allow the folder with "
        "--allow-path FOLDER (repeatable), or allow every path with --allow-any-path"
    ),
    # text
    "invalid_unicode": (
        "the JSON holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), which is not text: "
        "fix the exporter or remove the character"
    ),
    # length (with --tokenizer)
    "too_long_no_trained_tokens": (
        "shorten the text, use fewer or smaller images, lower --hd-num, or raise --max-length: "
        "no answer token would be left to train on"
    ),
    "too_long_cuts_image": (
        "shorten the text, use fewer or smaller images, lower --hd-num, or raise --max-length: "
        "truncation would cut inside an image"
    ),
    "truncated": "the sample is cut to --max-length and loses its last answer tokens; raise --max-length or shorten it",
}
"""Every record/file/media finding code with its default fix hint (doubles as the list of codes)."""

# ---------------------------------------------------------------- options and results


@dataclass(frozen=True)
class ValidateOptions:
    """What the checks depend on; flags of `xc-prep validate` map 1:1 to these fields."""

    hd_num: int = DEFAULT_HD_NUM
    """Maximum number of 560-px local tiles per image (decides image token counts)."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Maximum tokens per sample; longer samples are truncated, or rejected when nothing trainable is left."""
    tokenizer: Path | None = None
    """tokenizer.model (or a model folder holding one); without it the length check is skipped."""
    style: Style = "train"
    """HD transform whose grid decides image token counts: train (official fine-tuning) or infer."""
    layout: Layout = "official"
    """Token layout: official (training; <s> after a leading image) or inference (<s> first)."""
    decode_images: bool = True
    """Decode every image and the sampled video frames (finds truncated files); False reads
    headers and metadata only."""
    allow_path: tuple[Path, ...] = ()
    """Extra folders media files may lie in, besides the current directory and the JSON file's folder."""
    allow_any_path: bool = False
    """Accept media files anywhere (turns off the allowed-folders check)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width × height) accepted; checked from the header, before decoding."""
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    """Longest video accepted (frames / fps from the metadata), checked before decoding frames."""


@dataclass(frozen=True)
class RecordCheck:
    """The outcome of checking one record."""

    index: int
    """0-based position of the record in its JSON file."""
    id: Any
    """The record's `id` as written (None when missing or the record is not an object)."""
    record: Record | None
    """The validated record; None when `findings` holds an error."""
    findings: list[Finding]
    num_images: int = 0
    num_videos: int = 0
    tokens: int | None = None
    """Tokens of the whole sample before truncation (None without a tokenizer or with errors)."""
    trained_tokens: int | None = None
    """Trained (labelled) tokens left after truncation to max_length."""

    @property
    def ok(self) -> bool:
        return self.record is not None


@dataclass(frozen=True)
class LoadedSource:
    """A JSON source file read and parsed, before its records are checked."""

    source: Source
    records: list[Any] | None
    """The top-level list, or None when the file cannot be used (see file_findings)."""
    file_findings: list[Finding]
    sha256: str | None
    """sha256 of the exact bytes that were parsed (None when unreadable)."""


@dataclass(frozen=True)
class SourceCheck:
    """The outcome of checking one JSON source file."""

    source: Source
    file_findings: list[Finding]
    records: list[RecordCheck]
    sha256: str | None = None

    @property
    def findings(self) -> list[Finding]:
        return self.file_findings + [f for r in self.records for f in r.findings]


@dataclass(frozen=True)
class CheckedInputs:
    """Everything `check_all` found: data.txt findings and one SourceCheck per parsed source."""

    data_txt: str
    data_txt_findings: list[Finding]
    sources: list[SourceCheck]


# ---------------------------------------------------------------- file level


def load_source(source: Source) -> LoadedSource:
    """Read and parse one JSON source; file-level problems become findings."""

    def fail(code: str, message: str, line: int | None = None) -> LoadedSource:
        finding = Finding(source.path, line, None, None, code, message, "error", HINTS[code])
        return LoadedSource(source, None, [finding], sha256)

    sha256 = None
    try:
        data = source.resolved.read_bytes()
    except OSError as e:
        return fail("file_unreadable", f"cannot read {source.resolved} ({e.strerror or e})")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return fail("json_not_utf8", f"byte {e.start} (line {line}) is not UTF-8 ({e.reason})", line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return fail("json_syntax", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", e.lineno)
    except RecursionError:
        return fail("json_syntax", "the JSON nests lists/objects too deeply for the parser (~900 levels)")
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        return fail("json_syntax", f"the JSON holds a value Python refuses to parse ({e})")
    if not isinstance(obj, list):
        return fail(
            "json_not_a_list", f"the top level is a JSON {_json_type(obj)}, expected a list of records"
        )
    if not obj:
        return fail(
            "source_empty",
            f"the file holds no records, but data.txt line {source.line} asks for "
            f"{source.samples_per_epoch} samples per epoch",
        )
    return LoadedSource(source, obj, [], sha256)


def check_source(source: Source, opts: ValidateOptions) -> SourceCheck:
    """Check one JSON source file and all its records (a pure function; safe in worker processes)."""
    loaded = load_source(source)
    if loaded.records is None:
        return SourceCheck(source, loaded.file_findings, [], loaded.sha256)
    checks = check_records(source, loaded.records, 0, opts)
    return SourceCheck(source, loaded.file_findings, mark_duplicate_ids(source.path, checks), loaded.sha256)


def mark_duplicate_ids(file: str, checks: list[RecordCheck]) -> list[RecordCheck]:
    """Later records reusing an id of an earlier record of the same file get a `duplicate_id` error."""
    first_index: dict[tuple[type, Any], int] = {}
    out = []
    for check in checks:
        rid = check.id
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            key = (type(rid), rid)
            if key in first_index:
                finding = Finding(
                    file,
                    None,
                    check.index,
                    rid,
                    "duplicate_id",
                    f"id {rid!r} is already used by record {first_index[key]}",
                    "error",
                    HINTS["duplicate_id"],
                )
                check = dataclasses.replace(check, record=None, findings=[*check.findings, finding])
            else:
                first_index[key] = check.index
        out.append(check)
    return out


# ---------------------------------------------------------------- record level


def check_records(
    source: Source, raw_records: list[Any], start: int, opts: ValidateOptions
) -> list[RecordCheck]:
    """Check records `raw_records` found at positions start, start+1, ... of `source` (no duplicate-id check)."""
    json_dir = source.resolved.parent
    roots = media_roots(json_dir, opts)
    return [
        _check_record(raw, start + i, source.path, json_dir, roots, opts) for i, raw in enumerate(raw_records)
    ]


def media_roots(json_dir: Path, opts: ValidateOptions) -> tuple[Path, ...] | None:
    """The folders media files may resolve into (symlinks and `..` resolved); None: anywhere.

    By default the current directory and the JSON file's folder, plus every --allow-path.
    """
    if opts.allow_any_path:
        return None
    roots = (real_path(p) for p in (Path.cwd(), json_dir, *opts.allow_path))
    return tuple(dict.fromkeys(r for r in roots if r is not None))


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps(obj, ensure_ascii=False)` whose text always encodes as UTF-8.

    JSON input may hold lone UTF-16 surrogates ("\\ud800" escapes); a record id carries them into
    findings. They are written back as the same escapes, which every JSON reader decodes again.
    """
    return _escape_surrogates(json.dumps(obj, ensure_ascii=False, **kwargs))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a list nested ~900 deep parses, but repr() may not have the stack left
        return f"<a JSON {_json_type(value)} nested too deeply to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lone_surrogate(text: str) -> str | None:
    """Where `text` holds an unpaired UTF-16 surrogate (not text: it cannot be encoded), or None."""
    if (m := _LONE_SURROGATE.search(text)) is None:
        return None
    return f"the unpaired surrogate {m.group()!r} at character {m.start()}"


def _escape_surrogates(text: str) -> str:
    """Lone surrogates as visible backslash-u text, so that findings always encode as UTF-8."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _finding_id(rid: Any) -> Any:
    """The record id as findings and rejects.jsonl carry it: JSON-safe, UTF-8-safe and small.

    A string or integer id is kept (lone surrogates escaped as text); an invalid id is kept when it
    is a small plain JSON value, else it is replaced by its shortened repr.
    """
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    if isinstance(rid, str):
        return _escape_surrogates(rid)
    try:
        text = json.dumps(rid, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):  # NaN/Infinity, or nested too deeply
        return _short(rid)
    return rid if len(text) <= 200 and not _LONE_SURROGATE.search(text) else _short(rid)


def _check_record(
    raw: Any, index: int, file: str, json_dir: Path, roots: tuple[Path, ...] | None, opts: ValidateOptions
) -> RecordCheck:
    findings: list[Finding] = []
    raw_id = raw.get("id") if isinstance(raw, dict) else None
    rid = _finding_id(raw_id)

    def add(code: str, message: str, severity: Severity = "error", hint: str | None = None) -> None:
        findings.append(
            Finding(
                file, None, index, rid, code, message, severity, HINTS.get(code, "") if hint is None else hint
            )
        )

    if not isinstance(raw, dict):
        add(
            "record_not_object", f"the record is a JSON {_json_type(raw)} ({_short(raw)}), expected an object"
        )
        return RecordCheck(index, None, None, findings)

    if "id" not in raw:
        add("id_missing", 'the record has no "id"')
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        add(
            "id_bad_type",
            f"id {_short(raw_id)} is a JSON {_json_type(raw_id)}, expected a string or an integer",
        )
    elif isinstance(raw_id, str) and (bad := _lone_surrogate(raw_id)):
        add("invalid_unicode", f"the id holds {bad}")
    if extra := [k for k in raw if k not in RECORD_KEYS]:
        add(
            "unknown_key",
            f"unknown key(s) {', '.join(_short(k, 40) for k in extra)} will be ignored",
            "warning",
        )

    turns = _check_conversations(raw, add)
    media_or_none = _check_image_field(raw, add)
    media = media_or_none or []
    media_paths: list[Path] = []
    probes: list[MediaProbe | None] = []
    for i, path in enumerate(media):
        label = "image" if isinstance(raw.get("image"), str) else f"image[{i}]"
        resolved = resolve_path(path, json_dir)
        media_paths.append(resolved)
        if roots is not None and not within_roots(resolved, roots):
            # Never opened: a record must not make us read /etc/..., a device or another user's files.
            real = real_path(resolved)
            where = (
                f"resolves to {real}, outside"
                if real
                else "cannot be resolved (a symlink loop?), so it may lie outside"
            )
            allowed = ", ".join(str(r) for r in roots)
            add("media_outside_roots", f"{label} {path!r} {where} the allowed folders ({allowed})")
            probes.append(None)
            continue
        probes.append(_check_media(label, path, resolved, json_dir, opts, add))
    if turns is not None and media_or_none is not None:
        _check_placeholders(turns, len(media), add)

    num_videos = sum(1 for p in media if is_video_path(p))
    if any(f.severity == "error" for f in findings):
        return RecordCheck(index, rid, None, findings, len(media) - num_videos, num_videos)
    # No error: every turn has a known role and a string value, every media file a probe.
    assert turns is not None, f"record {index}: conversations unchecked"
    valid_turns = tuple(Turn(role, value) for role, value in turns if role is not None)
    usable = [p for p in probes if p is not None]
    assert len(valid_turns) == len(turns) and len(usable) == len(media), f"record {index}: unchecked parts"
    tokens = trained = None
    if opts.tokenizer is not None:
        tokens, trained = _check_length(valid_turns, usable, opts, add)
    record = None
    if not any(f.severity == "error" for f in findings):
        record = Record(id=rid, turns=valid_turns, media=tuple(media), media_paths=tuple(media_paths))
    return RecordCheck(index, rid, record, findings, len(media) - num_videos, num_videos, tokens, trained)


AddFinding = Callable[..., None]


def _check_conversations(raw: dict[str, Any], add: AddFinding) -> list[tuple[Role | None, Any]] | None:
    """(role, value) per turn (role None when unknown), or None when the list itself is unusable."""
    if "conversations" not in raw:
        add("conversations_missing", 'the record has no "conversations"')
        return None
    conv = raw["conversations"]
    if not isinstance(conv, list):
        add(
            "conversations_bad_type",
            f'"conversations" is a JSON {_json_type(conv)}, expected a list of turns',
        )
        return None
    if not conv:
        add("conversations_empty", '"conversations" is an empty list')
        return None

    turns: list[tuple[Role | None, Any]] = []
    extra_keys: set[str] = set()
    for t, turn in enumerate(conv):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            add(
                "turn_not_object",
                f"{where} is a JSON {_json_type(turn)} ({_short(turn)}), expected an object",
            )
            turns.append((None, None))
            continue
        extra_keys.update(k for k in turn if k not in TURN_KEYS)
        role: Role | None = None
        if "from" not in turn:
            add("turn_missing_from", f'{where} has no "from"')
        elif not isinstance(turn["from"], str) or (role := role_of(turn["from"])) is None:
            add("unknown_role", f'{where} has "from" {_short(turn["from"])}: not a user or assistant role')
        value = turn.get("value")
        if "value" not in turn:
            add("turn_missing_value", f'{where} has no "value"')
        elif not isinstance(value, str):
            add("value_not_string", f'{where} "value" is a JSON {_json_type(value)}, expected a string')
            value = None
        else:
            if not value.strip():
                add("value_empty", f'{where} "value" is empty after stripping whitespace')
            if bad := _lone_surrogate(value):
                add("invalid_unicode", f'{where} "value" holds {bad}')
            if found := _SPECIAL_RE.findall(value):
                names = ", ".join(dict.fromkeys(found))
                add("special_token", f"{where} contains the special string(s) {names}")
        turns.append((role, value))
    if extra_keys:
        add(
            "unknown_key",
            f"turns have unknown key(s) {', '.join(map(repr, sorted(extra_keys)))} (ignored)",
            "warning",
        )

    roles = [role for role, _ in turns]
    if all(roles):
        for t, actual in enumerate(roles):
            expected = "user" if t % 2 == 0 else "assistant"
            if actual != expected:
                add(
                    "turn_order",
                    f"conversations[{t}] is {'a user' if actual == 'user' else 'an assistant'} turn where "
                    f"{'a user' if expected == 'user' else 'an assistant'} turn is expected",
                )
                break
    if roles[-1] == "user":
        add("last_turn_not_assistant", f"the last turn (conversations[{len(roles) - 1}]) is a user turn")
    return turns


def _check_image_field(raw: dict[str, Any], add: AddFinding) -> list[str] | None:
    """The media paths of the record ([] for text-only), or None when `image` has the wrong type."""
    if "image" not in raw:
        return []
    image = raw["image"]
    if isinstance(image, str):
        if not image.strip():
            add("image_bad_type", '"image" is an empty string')
            return None
        return [image] if _usable_path_text("image", image, add) else None
    if isinstance(image, list):
        if not image:
            add("image_bad_type", '"image" is an empty list (drop the key for a text-only record)')
            return None
        bad = [i for i, p in enumerate(image) if not isinstance(p, str) or not p.strip()]
        if bad:
            shown = ", ".join(f"image[{i}] = {_short(image[i], 30)}" for i in bad[:5])
            add("image_bad_type", f'"image" entries must be non-empty path strings: {shown}')
            return None
        usable = [_usable_path_text(f"image[{i}]", p, add) for i, p in enumerate(image)]
        return list(image) if all(usable) else None
    add(
        "image_bad_type",
        f'"image" is a JSON {_json_type(image)} ({_short(image)}), expected a path or a list of paths',
    )
    return None


def _usable_path_text(label: str, path: str, add: AddFinding) -> bool:
    """False (after a finding) for path text no file name can hold: NUL, lone surrogates."""
    if "\x00" in path:
        add("image_bad_type", f"{label} {_short(path, 40)} holds a NUL character, which no file name can")
        return False
    if bad := _lone_surrogate(path):
        add("invalid_unicode", f"{label} {_short(path, 40)} holds {bad}")
        return False
    return True


# Image/video placeholders of other formats (LLaVA, ShareGPT, Qwen-VL): IXC2.5 reads them as plain
# text, so a converted-by-hand LLaVA record trains on the literal `<image>` beside its image.
_OTHER_PLACEHOLDER_RE = re.compile(r"<(?:image|img|video)>", re.IGNORECASE)


def _warn_other_placeholders(turns: list[tuple[Role | None, Any]], add: AddFinding) -> None:
    for t, (role, value) in enumerate(turns):
        if role == "user" and isinstance(value, str) and (found := _OTHER_PLACEHOLDER_RE.findall(value)):
            add(
                "placeholder_other_format",
                f"conversations[{t}] holds {', '.join(dict.fromkeys(found))}, a placeholder of another "
                "format (LLaVA/ShareGPT) that IXC2.5 reads as plain text",
                "warning",
            )


def _check_placeholders(turns: list[tuple[Role | None, Any]], num_media: int, add: AddFinding) -> None:
    _warn_other_placeholders(turns, add)
    user_count = 0
    for t, (role, value) in enumerate(turns):
        if not isinstance(value, str):
            continue
        count = value.count(IMAGE_PLACEHOLDER)
        if value.lower().count(_PLACEHOLDER_LOWER) != count:
            add(
                "placeholder_lookalike",
                f"conversations[{t}] holds a mis-spelled <ImageHere> (case differs)",
                "warning",
            )
        if not count:
            continue
        if role == "assistant":
            add(
                "placeholder_in_assistant",
                f"conversations[{t}] (an assistant answer) contains {count} <ImageHere>",
            )
        else:
            user_count += count
    if num_media == 0:
        if user_count:
            add("placeholder_without_media", f"{user_count} <ImageHere> in a record without images")
    elif num_media == 1:
        if user_count > 1:
            add(
                "placeholder_count_mismatch",
                f"{user_count} <ImageHere> for 1 image: a single image takes at most one placeholder",
            )
    elif user_count != num_media:
        add(
            "placeholder_count_mismatch",
            f"{user_count} <ImageHere> in user turns for {num_media} images: each image needs exactly one",
        )


# ---------------------------------------------------------------- media


@dataclass(frozen=True)
class MediaProbe:
    """What one media file told us: its size (image) or tile grid (video), or why it is unusable."""

    kind: Literal["image", "video"]
    size: tuple[int, int] | None = None
    """Image only: (width, height) from the header (no EXIF rotation, as upstream)."""
    grid: tuple[int, int] | None = None
    """Video only: (rows, cols) of the frame strip's tiles (independent of hd_num)."""
    error: tuple[str, str] | None = None
    """(code, message) when the file cannot be used."""


_media_cache: dict[tuple[str, int, int, bool, int, float], MediaProbe] = {}
"""Per process: records often share media; keyed by path, size and mtime so edits are seen."""


def probe_media(
    path: Path,
    *,
    is_video: bool,
    decode: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS,
) -> MediaProbe:
    """Open an image (fully decoded unless decode=False) or a video; bad data gives `error`, never raises.

    Sizes and lengths are checked from headers and metadata before any pixel is decoded.
    """
    kind: Literal["image", "video"] = "video" if is_video else "image"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return MediaProbe(kind, error=("media_missing", "not found"))
    except (OSError, ValueError) as e:  # ValueError: NUL or an unencodable name
        return MediaProbe(
            kind, error=("media_missing", f"cannot be read ({getattr(e, 'strerror', None) or e})")
        )
    if not path.is_file():
        return MediaProbe(kind, error=("media_missing", "is not a file"))
    if stat.st_size == 0:
        return MediaProbe(kind, error=("media_empty", "is empty (0 bytes)"))
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns, decode, max_image_pixels, max_video_seconds)
    if (cached := _media_cache.get(key)) is not None:
        return cached
    try:
        if is_video:
            probe = _probe_video(path, max_image_pixels, max_video_seconds, decode)
        else:
            size = probe_image_size(path, max_image_pixels)
            if decode:
                load_rgb(path, max_image_pixels)
            probe = MediaProbe("image", size=size)
    except DataError as e:
        # media.py and video.py start their messages with the path; the finding names it already
        reason = e.message.removeprefix(f"{path}: ")
        probe = MediaProbe(kind, error=(e.code, reason))
    _media_cache[key] = probe
    return probe


def _probe_video(path: Path, max_image_pixels: int, max_video_seconds: float, decode: bool) -> MediaProbe:
    """Check length and frame size from the metadata, then (with `decode`) decode the frames
    training would use (1 fps, at most 32); the strip's grid comes from the metadata."""
    from pipeline import video  # decord is slow to import: only records with videos pay for it

    info = video.probe_video(path)  # frame count and fps from the container; decodes frame 0 only
    seconds = info.frames / info.fps
    if seconds > max_video_seconds:
        raise DataError(
            "video_too_long",
            f"{info.frames:,} frames at {info.fps:g} fps = {seconds:,.0f} s, more than "
            f"--max-video-seconds {max_video_seconds:g} (refused before decoding its frames)",
        )
    if info.width * info.height > max_image_pixels:
        raise DataError(
            "video_frame_too_large",
            f"its {info.width}×{info.height} frames have more than --max-image-pixels "
            f"{max_image_pixels:,} pixels each (refused before decoding the sampled frames)",
        )
    if decode:  # `xc-prep shard` skips this: building the sample decodes the same frames
        video.read_frames(path)
    return MediaProbe("video", grid=video.strip_grid(info))


def _check_media(
    label: str, path: str, resolved: Path, json_dir: Path, opts: ValidateOptions, add: AddFinding
) -> MediaProbe | None:
    """Probe one media file; the probe when usable, else None after adding a finding."""
    probe = probe_media(
        resolved,
        is_video=is_video_path(path),
        decode=opts.decode_images,
        max_image_pixels=opts.max_image_pixels,
        max_video_seconds=opts.max_video_seconds,
    )
    if probe.error is not None:
        code, reason = probe.error
        if code == "media_missing" and reason == "not found":
            cwd, folder = Path.cwd(), json_dir.absolute()
            where = f"the current directory ({cwd})" + (
                "" if folder == cwd else f" nor in the JSON file's folder ({folder})"
            )
            add(code, f"{label} {path!r}: not found in {where}")
        else:
            shown = "" if resolved == Path(path) else f" (found as {resolved})"
            add(code, f"{label} {path!r}{shown}: {reason}")
        return None
    return probe


# ---------------------------------------------------------------- length (with a tokenizer)

_tokenizers: dict[Path, Any] = {}


def _tokenizer(path: Path) -> Any:
    """The tokenizer at `path` (a pipeline.tokenization.Tokenizer), loaded once per process."""
    from pipeline.tokenization import Tokenizer

    if path not in _tokenizers:
        _tokenizers[path] = Tokenizer.from_path(path)
    return _tokenizers[path]


def media_grid(probe: MediaProbe, opts: ValidateOptions) -> tuple[int, int]:
    """(rows, cols) of tiles the media file becomes under `opts` (hd_num and style)."""
    from pipeline.tiling import hd_grid

    if probe.kind == "video":
        assert probe.grid is not None
        return probe.grid
    assert probe.size is not None
    return hd_grid(probe.size[0], probe.size[1], opts.hd_num, opts.style)


def _check_length(
    turns: tuple[Turn, ...], media: list[MediaProbe], opts: ValidateOptions, add: AddFinding
) -> tuple[int, int]:
    """(tokens before truncation, trained tokens kept); adds too_long_* errors or a `truncated` warning.

    The cut is at max_length exactly as pipeline.template truncates; a cut inside an image block
    is an error here (the template would drop that image and everything after it).
    """
    from pipeline.template import render_conversation

    assert opts.tokenizer is not None, "length check without a tokenizer"
    grids = [media_grid(m, opts) for m in media]
    tokenizer = _tokenizer(opts.tokenizer)
    try:
        # Render untruncated, then apply the template's cut ourselves to tell the two errors apart.
        full = render_conversation(turns, grids, tokenizer, layout=opts.layout, max_length=sys.maxsize)
    except DataError as e:
        add(e.code, e.message, hint=e.hint or None)
        return 0, 0
    length = full.num_tokens
    total_trained = full.num_trained
    if length <= opts.max_length:
        return length, total_trained
    cut = opts.max_length
    trained = int((full.labels[:cut] != IGNORE_INDEX).sum())
    image_tokens = sum(end - start for start, end in full.spans)
    where = (
        f"the sample takes {length:,} tokens ({image_tokens:,} of them for {len(grids)} image(s) at "
        f"hd_num {opts.hd_num}), more than --max-length {opts.max_length:,}"
        if grids
        else f"the sample takes {length:,} tokens, more than --max-length {opts.max_length:,}"
    )
    if trained == 0:
        add("too_long_no_trained_tokens", f"{where}: no answer token is left to train on after the cut")
    elif cut_in := [k for k, (start, end) in enumerate(full.spans) if start < cut < end]:
        start, end = full.spans[cut_in[0]]
        add(
            "too_long_cuts_image",
            f"{where}: the cut falls inside image {cut_in[0]} (tokens {start:,}..{end:,})",
        )
    else:
        add("truncated", f"{where}: it keeps {trained:,} of {total_trained:,} trained tokens", "warning")
    return length, trained


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

    show = progress and sys.stderr.isatty() and total_cost >= PROGRESS_MIN_COST
    with tqdm(total=total_records, unit="rec", desc="validate", disable=not show, file=sys.stderr) as bar:
        if use_pool:
            context = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {
                    pool.submit(check_records, loaded[pos].source, chunk, start, opts): n
                    for n, (pos, start, chunk) in enumerate(tasks)
                }
                for future in as_completed(futures):
                    n = futures[future]
                    results[n] = future.result()
                    bar.update(len(tasks[n][2]))
        else:
            for n, (pos, start, chunk) in enumerate(tasks):
                results[n] = check_records(loaded[pos].source, chunk, start, opts)
                bar.update(len(chunk))

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


def default_workers() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_media_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the media safety policy, shared by `xc-prep validate` and `xc-prep shard`.

    They map 1:1 to the ValidateOptions fields allow_path, allow_any_path, max_image_pixels and
    max_video_seconds; `media_policy_options(args)` turns them into those fields.
    """
    parser.add_argument(
        "--allow-path",
        action="append",
        type=Path,
        default=[],
        metavar="FOLDER",
        help="also accept media files inside FOLDER (repeatable); by default a media path must resolve "
        "(after '..' and symlinks) inside the current directory or the JSON file's folder",
    )
    parser.add_argument(
        "--allow-any-path",
        action="store_true",
        help="accept media files anywhere on the file system (turns the allowed-folders check off)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image (width × height) accepted, checked from the header before decoding "
        f"(default {DEFAULT_MAX_IMAGE_PIXELS:,}); also bounds video frame size",
    )
    parser.add_argument(
        "--max-video-seconds",
        type=float,
        metavar="S",
        default=DEFAULT_MAX_VIDEO_SECONDS,
        help=f"longest video accepted, from its metadata before decoding (default {DEFAULT_MAX_VIDEO_SECONDS:g})",
    )


def media_policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """ValidateOptions fields from the media policy flags; ValueError (a usage error) names the flag."""
    for folder in args.allow_path:
        if not folder.is_dir():
            raise ValueError(f"--allow-path {folder}: not an existing folder")
    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels ({args.max_image_pixels}) must be at least 1")
    if not 0 < args.max_video_seconds < float("inf"):
        raise ValueError(
            f"--max-video-seconds ({args.max_video_seconds}) must be a positive number of seconds"
        )
    return {
        "allow_path": tuple(folder.resolve() for folder in args.allow_path),  # the same in every worker
        "allow_any_path": args.allow_any_path,
        "max_image_pixels": args.max_image_pixels,
        "max_video_seconds": args.max_video_seconds,
    }


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
            _tokenizer(opts.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            return _usage_error(f"--tokenizer {opts.tokenizer}: {e}")
    try:
        report = validate(args.data_txt, opts, workers=args.workers, progress=True)
    except DataTxtError as e:
        return _usage_error(f"{e.message} ({e.hint})")
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
