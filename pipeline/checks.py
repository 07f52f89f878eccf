"""The check engine behind `xc-prep validate` and `xc-prep shard`: every file, record, media and length check.

Every problem becomes a `schemas.report.Finding` with a stable snake_case `code`, a message that
says what and why, and a `hint` that says what to do. Nothing stops at the first problem: a check
returns every finding of its record or file. `xc-prep validate` (validate.py) runs these checks over
all of data.txt and reports; `xc-prep shard` runs the same functions inside its work units, so both
apply exactly the same checks.

    opts = ValidateOptions(hd_num=18, max_length=16384, tokenizer=Path("tokenizer.model"))
    sources, findings = pipeline.sources.parse_data_txt(Path("data.txt"))
    check = check_source(sources[0], opts)      # one JSON file; a pure function of its arguments
    check.file_findings    # list[Finding]: unreadable file, JSON syntax error (line/col), not a list
    check.records          # list[RecordCheck] in file order: index, id, record, findings, plus
                           # num_images, num_videos, tokens, trained_tokens (None without tokenizer)
    check.records[i].record  # schemas.record.Record, or None when that record has an error

Finer pieces for callers that spread one big file over processes (all picklable in and out):

    load_source(source) -> LoadedSource                    raw records, file findings, sha256
                                                           (pipeline/json_source.py)
    shallow_records(raw_records) -> list                   what may cross a process boundary
    check_records(source, raw_records, start, opts) -> list[RecordCheck]
    mark_duplicate_ids(file, checks) -> list[RecordCheck]  needs the whole file: run it once

Finding codes: see `HINTS` below (record, file and media codes) and `pipeline.sources.DATA_TXT_CODES`
(data.txt codes: source_missing_k, source_bad_k, source_nonpositive_k, source_extra_columns,
source_file_missing, source_zero_samples, source_duplicate, data_txt_empty).

Safety policy (RELIABILITY.md; the flags come from `pipeline.flags.add_media_policy_arguments`):
a media path must resolve, after `..` and symlinks, inside the current directory, the JSON file's
folder or an --allow-path folder (`media_outside_roots`, the file is never opened; --allow-any-path
turns this off); images over --max-image-pixels and videos over --max-video-seconds (or with frames
over --max-image-pixels) are refused from headers/metadata before decoding (`image_too_large`,
`video_too_long`, `video_frame_too_large`); text that is not valid Unicode (lone surrogates from
"\\ud800" escapes) is `invalid_unicode`; the strings the tokenizer turns into control ids are
`special_token`; a record nested more than MAX_RECORD_DEPTH levels is `record_too_deep`. No input
makes the checks raise (tests/test_fuzz.py), and should one ever fail on a record, that record gets
a `check_failed` error naming the exception and the others are checked.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.json_source import (
    FILE_HINTS,
    escape_surrogates,
    finding_id,
    json_depth,
    json_type,
    load_source,
    lone_surrogate,
    short,
)
from pipeline.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_VIDEO_SECONDS,
    real_path,
    resolve_path,
    within_roots,
)
from pipeline.media_probe import MediaProbe, media_grid, probe_media
from pipeline.template import DEFAULT_MAX_LENGTH, SPECIAL_TOKEN_HINT
from pipeline.tiling import DEFAULT_HD_NUM
from pipeline.tokenization import ADDED_TOKENS, BOS, EOS, UNK
from schemas.record import (
    IMAGE_PLACEHOLDER,
    Record,
    Role,
    Source,
    Turn,
    is_video_path,
    role_of,
)
from schemas.report import Finding, Severity
from schemas.sample import IGNORE_INDEX, Layout, Style

RECORD_KEYS = frozenset({"id", "conversations", "image"})
TURN_KEYS = frozenset({"from", "value"})
IXC_SPECIAL_PATTERN = "|".join(
    [re.escape(s) for s in (BOS, EOS, UNK, *ADDED_TOKENS)] + [r"\[UNUSED_TOKEN_\d+\]"]
)
"""Without --tokenizer: the strings IXC2.5's tokenizer turns into control ids (its control pieces,
its 147 `[UNUSED_TOKEN_n]` pieces, the HF tokenizer's added tokens). With a tokenizer the set is
that tokenizer's own (`Tokenizer.forbidden_strings`), and the template checks the ids too."""
MAX_RECORD_DEPTH = 32
"""Deepest nesting of lists/objects in a record: a record needs 3 (record, conversations, turn).
Pickling (to worker processes), repr and the JSON encoder recurse once per level and Python stops
near 1,000, so a deeper record is refused before it is sent anywhere (`shallow_records`)."""
_PLACEHOLDER_LOWER = IMAGE_PLACEHOLDER.lower()
BUG_HINT = (
    "an error inside xc-prep, not a rule about your data: the record is left out and the run goes "
    "on; please report it with the record (file, index) and this message"
)

HINTS: dict[str, str] = {
    **FILE_HINTS,
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
    "placeholder_other_format": (
        "convert the file with `xc-prep convert FILE --out DIR` (LLaVA/ShareGPT/OpenAI records; it places "
        "<ImageHere> by the official rules), or write <ImageHere> yourself"
    ),
    "placeholder_lookalike": "write the placeholder exactly as <ImageHere> (case-sensitive), or reword the text",
    "special_token": SPECIAL_TOKEN_HINT,
    "record_too_deep": (
        f"the record nests lists/objects more than {MAX_RECORD_DEPTH} levels deep: keep only "
        '"id", "conversations" and "image" (a record needs 3 levels)'
    ),
    "check_failed": BUG_HINT,
    "build_failed": BUG_HINT,
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
class SourceCheck:
    """The outcome of checking one JSON source file."""

    source: Source
    file_findings: list[Finding]
    records: list[RecordCheck]
    sha256: str | None = None

    @property
    def findings(self) -> list[Finding]:
        return self.file_findings + [f for r in self.records for f in r.findings]


# ---------------------------------------------------------------- file level


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
    """Check records `raw_records` found at positions start, start+1, ... of `source` (no duplicate-id check).

    Never raises for a record: a check that fails on one (a bug, or an input it does not handle)
    gives that record a `check_failed` error naming the exception, and the others are checked.
    """
    context = _RecordContext(
        file=source.path,
        json_dir=source.resolved.parent,
        roots=media_roots(source.resolved.parent, opts),
        special=special_strings_pattern(opts.tokenizer),
        opts=opts,
    )
    return [_guarded_check(raw, start + i, context) for i, raw in enumerate(raw_records)]


@dataclass(frozen=True)
class _RecordContext:
    """What every record check of one call needs (computed once per call)."""

    file: str
    json_dir: Path
    roots: tuple[Path, ...] | None
    special: re.Pattern[str]
    opts: ValidateOptions


def _guarded_check(raw: Any, index: int, context: _RecordContext) -> RecordCheck:
    try:
        return _check_record(raw, index, context)
    except Exception as e:  # one record's failure is that record's error, never the whole run's
        rid = finding_id(_raw_id(raw))
        finding = Finding(
            context.file,
            None,
            index,
            rid,
            "check_failed",
            f"checking the record failed: {exception_text(e)}",
            "error",
            HINTS["check_failed"],
        )
        return RecordCheck(index, rid, None, [finding])


def exception_text(e: BaseException, limit: int = 500) -> str:
    """`Type: message (at file.py:line)` of an unexpected exception, for a finding or a reject."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    text = f"{type(e).__name__}: {escape_surrogates(str(e))}"
    return (text if len(text) <= limit else text[: limit - 3] + "...") + where


_special_patterns: dict[Path | None, re.Pattern[str]] = {}


def special_strings_pattern(tokenizer: Path | None) -> re.Pattern[str]:
    """What a turn's text must not hold: the tokenizer's `forbidden_strings`, or without a tokenizer
    IXC2.5's (`IXC_SPECIAL_PATTERN`); compiled once per process."""
    if tokenizer not in _special_patterns:
        if tokenizer is None:
            pattern = IXC_SPECIAL_PATTERN
        else:
            strings = sorted(cached_tokenizer(tokenizer).forbidden_strings, key=len, reverse=True)
            pattern = "|".join(re.escape(s) for s in strings)
        _special_patterns[tokenizer] = re.compile(pattern)
    return _special_patterns[tokenizer]


@dataclass(frozen=True)
class OverDeepRecord:
    """What crosses a process boundary in place of a record nested too deeply to send."""

    id: Any
    """The record's id as findings carry it (`_finding_id`)."""


def shallow_records(raw_records: list[Any]) -> list[Any]:
    """The records as they may cross a process boundary: one nested deeper than MAX_RECORD_DEPTH
    becomes an `OverDeepRecord` (pickling it could exhaust the stack); the checks report both the
    same way (`record_too_deep`), so the result does not depend on the number of workers."""
    return [
        OverDeepRecord(finding_id(_raw_id(raw)))
        if json_depth(raw, MAX_RECORD_DEPTH) > MAX_RECORD_DEPTH
        else raw
        for raw in raw_records
    ]


def _raw_id(raw: Any) -> Any:
    return raw.get("id") if isinstance(raw, dict) else None


def media_roots(json_dir: Path, opts: ValidateOptions) -> tuple[Path, ...] | None:
    """The folders media files may resolve into (symlinks and `..` resolved); None: anywhere.

    By default the current directory and the JSON file's folder, plus every --allow-path.
    """
    if opts.allow_any_path:
        return None
    roots = (real_path(p) for p in (Path.cwd(), json_dir, *opts.allow_path))
    return tuple(dict.fromkeys(r for r in roots if r is not None))


def record_from_json(raw: Any, json_dir: Path, where: str) -> Record:
    """A `Record` from one JSON element: the one place that maps record JSON to a `Record`.

    It checks only the shape it reads (a DataError otherwise), so `xc-prep preview` shows even
    records the checks would refuse; `_check_record` applies every rule first, then builds its
    record here.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
        raise DataError("record_malformed", f"{where}: expected an object with a 'conversations' list")
    turns = []
    for t, turn in enumerate(raw["conversations"]):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise DataError("turn_malformed", f"{where}: conversations[{t}] needs string 'from' and 'value'")
        # Upstream maps every non-user role to the assistant; preview does the same.
        turns.append(Turn(role_of(turn["from"]) or "assistant", turn["value"]))
    media = raw.get("image", [])
    media = [media] if isinstance(media, str) else media
    if not isinstance(media, list) or not all(isinstance(m, str) for m in media):
        raise DataError("image_malformed", f"{where}: 'image' must be a path or a list of paths")
    return Record(
        id=raw.get("id"),
        turns=tuple(turns),
        media=tuple(media),
        media_paths=tuple(resolve_path(m, json_dir) for m in media),
    )


def _check_record(raw: Any, index: int, context: _RecordContext) -> RecordCheck:
    file, json_dir, roots, opts = context.file, context.json_dir, context.roots, context.opts
    findings: list[Finding] = []
    if isinstance(raw, OverDeepRecord) or json_depth(raw, MAX_RECORD_DEPTH) > MAX_RECORD_DEPTH:
        rid = raw.id if isinstance(raw, OverDeepRecord) else finding_id(_raw_id(raw))
        message = f"the record nests lists/objects more than {MAX_RECORD_DEPTH} levels deep"
        finding = Finding(
            file, None, index, rid, "record_too_deep", message, "error", HINTS["record_too_deep"]
        )
        return RecordCheck(index, rid, None, [finding])
    raw_id = _raw_id(raw)
    rid = finding_id(raw_id)

    def add(code: str, message: str, severity: Severity = "error", hint: str | None = None) -> None:
        findings.append(
            Finding(
                file, None, index, rid, code, message, severity, HINTS.get(code, "") if hint is None else hint
            )
        )

    if not isinstance(raw, dict):
        add("record_not_object", f"the record is a JSON {json_type(raw)} ({short(raw)}), expected an object")
        return RecordCheck(index, None, None, findings)

    if "id" not in raw:
        add("id_missing", 'the record has no "id"')
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        add(
            "id_bad_type",
            f"id {short(raw_id)} is a JSON {json_type(raw_id)}, expected a string or an integer",
        )
    elif isinstance(raw_id, str) and (bad := lone_surrogate(raw_id)):
        add("invalid_unicode", f"the id holds {bad}")
    if extra := [k for k in raw if k not in RECORD_KEYS]:
        add(
            "unknown_key",
            f"unknown key(s) {', '.join(short(k, 40) for k in extra)} will be ignored",
            "warning",
        )

    turns = _check_conversations(raw, add, context.special)
    media_or_none = _check_image_field(raw, add)
    media = media_or_none or []
    probes: list[MediaProbe | None] = []
    for i, path in enumerate(media):
        label = "image" if isinstance(raw.get("image"), str) else f"image[{i}]"
        resolved = resolve_path(path, json_dir)
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
    built = record_from_json(raw, json_dir, f"{file} record {index}")
    usable = [p for p in probes if p is not None]
    assert len(built.turns) == len(turns) and len(usable) == len(media), f"record {index}: unchecked parts"
    tokens = trained = None
    if opts.tokenizer is not None:
        tokens, trained = _check_length(built.turns, usable, opts, add)
    record = None if any(f.severity == "error" for f in findings) else built
    return RecordCheck(index, rid, record, findings, len(media) - num_videos, num_videos, tokens, trained)


AddFinding = Callable[..., None]


def _check_conversations(
    raw: dict[str, Any], add: AddFinding, special: re.Pattern[str]
) -> list[tuple[Role | None, Any]] | None:
    """(role, value) per turn (role None when unknown), or None when the list itself is unusable."""
    if "conversations" not in raw:
        add("conversations_missing", 'the record has no "conversations"')
        return None
    conv = raw["conversations"]
    if not isinstance(conv, list):
        add(
            "conversations_bad_type",
            f'"conversations" is a JSON {json_type(conv)}, expected a list of turns',
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
                f"{where} is a JSON {json_type(turn)} ({short(turn)}), expected an object",
            )
            turns.append((None, None))
            continue
        extra_keys.update(k for k in turn if k not in TURN_KEYS)
        role: Role | None = None
        if "from" not in turn:
            add("turn_missing_from", f'{where} has no "from"')
        elif not isinstance(turn["from"], str) or (role := role_of(turn["from"])) is None:
            add("unknown_role", f'{where} has "from" {short(turn["from"])}: not a user or assistant role')
        value = turn.get("value")
        if "value" not in turn:
            add("turn_missing_value", f'{where} has no "value"')
        elif not isinstance(value, str):
            add("value_not_string", f'{where} "value" is a JSON {json_type(value)}, expected a string')
            value = None
        else:
            if not value.strip():
                add("value_empty", f'{where} "value" is empty after stripping whitespace')
            if bad := lone_surrogate(value):
                add("invalid_unicode", f'{where} "value" holds {bad}')
            if found := special.findall(value):
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
            shown = ", ".join(f"image[{i}] = {short(image[i], 30)}" for i in bad[:5])
            add("image_bad_type", f'"image" entries must be non-empty path strings: {shown}')
            return None
        usable = [_usable_path_text(f"image[{i}]", p, add) for i, p in enumerate(image)]
        return list(image) if all(usable) else None
    add(
        "image_bad_type",
        f'"image" is a JSON {json_type(image)} ({short(image)}), expected a path or a list of paths',
    )
    return None


def _usable_path_text(label: str, path: str, add: AddFinding) -> bool:
    """False (after a finding) for path text no file name can hold: NUL, lone surrogates."""
    if "\x00" in path:
        add("image_bad_type", f"{label} {short(path, 40)} holds a NUL character, which no file name can")
        return False
    if bad := lone_surrogate(path):
        add("invalid_unicode", f"{label} {short(path, 40)} holds {bad}")
        return False
    return True


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


def cached_tokenizer(path: Path) -> Any:
    """The tokenizer at `path` (a pipeline.tokenization.Tokenizer), loaded once per process."""
    from pipeline.tokenization import Tokenizer

    if path not in _tokenizers:
        _tokenizers[path] = Tokenizer.from_path(path)
    return _tokenizers[path]


def _check_length(
    turns: tuple[Turn, ...], media: list[MediaProbe], opts: ValidateOptions, add: AddFinding
) -> tuple[int, int]:
    """(tokens before truncation, trained tokens kept); adds too_long_* errors or a `truncated` warning.

    The cut is at max_length exactly as pipeline.template truncates; a cut inside an image block
    is an error here (the template would drop that image and everything after it).
    """
    from pipeline.template import render_conversation

    assert opts.tokenizer is not None, "length check without a tokenizer"
    grids = [media_grid(m, opts.hd_num, opts.style) for m in media]
    tokenizer = cached_tokenizer(opts.tokenizer)
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
