"""`xc-prep preview`: show what one record becomes (tokens, trained spans, image blocks and grids).

    xc-prep preview data/vqa.json --record 3 --tokenizer path/to/tokenizer.model [--json]
    xc-prep preview --shards shards/ [--source NAME] --sample 7 [--json]   (a stored sample)

The human view prints the decoded text with every image block as `<image rows×cols: N tokens>`,
the turn markers as `<|im_start|>`/`<|im_end|>`, and the trained tokens (labels != -100) between
⟦ and ⟧. `--json` prints exactly
`{"input_ids": [...], "labels": [...], "images": [{"grid": [rows, cols], "span": [start, end]}]}`
with -100 inside image spans in both lists, the format of the golden vectors.
Media paths resolve against the current directory, then the JSON file's folder. The record is shown
even when `xc-prep validate` would refuse it, except for what is never safe to build: media
outside the allowed folders (the policy and flags of `xc-prep validate`), text that becomes control
tokens, and records nested too deeply; those, and any error, end in a message, not a traceback.

With --shards, N counts stored samples across all sources in manifest order (shard by shard, row by
row), or within --source NAME; the stored sample is shown exactly as one built from JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.checks import HINTS, ValidateOptions, check_records, exception_text, record_from_json
from pipeline.errors import DataError
from pipeline.flags import add_media_policy_arguments, media_policy_options
from pipeline.json_source import json_size_limit
from pipeline.template import DEFAULT_MAX_LENGTH
from pipeline.tiling import DEFAULT_HD_NUM
from schemas.cli import ExitCode
from schemas.manifest import TOKENIZER_NAME, Manifest, shard_member
from schemas.record import Record, Source
from schemas.sample import IGNORE_INDEX, LAYOUTS, STYLES, Sample
from schemas.tokens import for_display

TOKENIZER_ENV = "XC_TOKENIZER"
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


# ---------------------------------------------------------------- rendering a Sample


def sample_to_preview_json(sample: Sample) -> dict[str, Any]:
    """The golden-vector format: ids and labels (-100 on images) and each image's grid and span."""
    return {
        "input_ids": sample.input_ids.tolist(),
        "labels": sample.labels.tolist(),
        "images": [{"grid": list(im.grid), "span": list(im.span)} for im in sample.images],
    }


def render_sample_text(sample: Sample, tokenizer: Any) -> str:
    """Decoded text: image blocks as `<image r×c: N tokens>`, trained runs between ⟦ and ⟧."""
    image_at = {im.span[0]: im for im in sample.images}
    out: list[str] = []
    pos = 0
    while pos < sample.num_tokens:
        if (im := image_at.get(pos)) is not None:
            rows, cols = im.grid
            out.append(f"<image {rows}×{cols}: {im.span[1] - im.span[0]} tokens>")
            pos = im.span[1]
            continue
        end = min([s for s in image_at if s > pos], default=sample.num_tokens)
        ids = sample.input_ids[pos:end].tolist()
        trained = (sample.labels[pos:end] != IGNORE_INDEX).tolist()
        for is_trained, run in itertools.groupby(zip(ids, trained, strict=True), key=lambda x: x[1]):
            text = for_display(tokenizer.decode([i for i, _ in run]))
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if is_trained else text)
        pos = end
    return "".join(out)


def render_sample_summary(sample: Sample, media: tuple[str, ...] = ()) -> str:
    """Header lines: counts, layout, and per image its grid, tiles and token span."""
    lines = [
        f"{sample.file} record {sample.index} (id {sample.id!r}): {sample.num_tokens} tokens, "
        f"{sample.num_trained} trained, {len(sample.images)} image(s), {sample.num_tiles} tile(s), "
        f"layout {sample.layout}"
    ]
    if sample.extra.get("truncated"):
        lines.append(
            f"  truncated from {sample.extra['full_length']} tokens; "
            f"{sample.extra['dropped_images']} image(s) dropped"
        )
    for k, im in enumerate(sample.images):
        name = f" {media[k]}" if k < len(media) else ""
        lines.append(
            f"  image {k + 1}{name}: grid {im.grid[0]}×{im.grid[1]} ({im.num_tiles} tiles), "
            f"tokens [{im.span[0]}, {im.span[1]})"
        )
    lines.append(f"  trained tokens are shown as {TRAINED_OPEN}...{TRAINED_CLOSE}")
    return "\n".join(lines)


# ---------------------------------------------------------------- reading one record


PREVIEW_REFUSED = frozenset(
    {"media_outside_roots", "special_token", "record_too_deep", "invalid_unicode", "check_failed"}
)
"""Findings preview refuses on (others it shows anyway): never open media outside the allowed
folders, never build text into control ids, never touch what cannot be encoded or traversed."""


def load_raw_record(json_file: Path, index: int) -> Any:
    """The JSON value of record `index` (0-based) of a JSON file, or a DataError saying what is wrong."""
    if json_file.is_dir():
        raise DataError("json_missing", f"{json_file}: is a folder; pass a JSON file of records")
    try:
        if (size := json_file.stat().st_size) > (limit := json_size_limit()):
            raise DataError(
                "json_too_large",
                f"{json_file}: {size:,} bytes, more than the {limit:,} bytes this machine can read",
            )
        records = json.loads(json_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError("json_missing", f"{json_file}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError("json_invalid", f"{json_file}: not valid JSON ({e})") from e
    except (OSError, RecursionError, ValueError, MemoryError) as e:
        raise DataError("json_invalid", f"{json_file}: cannot read it ({type(e).__name__}: {e})") from e
    if not isinstance(records, list):
        raise DataError("json_not_list", f"{json_file}: expected a JSON list of records")
    if not 0 <= index < len(records):
        raise DataError(
            "record_out_of_range", f"{json_file}: --record {index} is out of range (0..{len(records) - 1})"
        )
    return records[index]


def load_record(json_file: Path, index: int, opts: ValidateOptions | None = None) -> Record:
    """Record `index` (0-based) of a JSON file, or a DataError saying what is wrong: the file, or
    a finding in PREVIEW_REFUSED from the checks under `opts` (default: the default policy)."""
    raw = load_raw_record(json_file, index)
    source = Source(path=str(json_file), resolved=json_file, k=1.0, line=0)
    (check,) = check_records(source, [raw], index, opts or ValidateOptions(decode_images=False))
    if refused := [f for f in check.findings if f.code in PREVIEW_REFUSED]:
        first = refused[0]
        more = f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""
        raise DataError(first.code, first.message + more, hint=first.hint)
    return record_from_json(raw, json_file.parent, f"{json_file} record {index}")


# ---------------------------------------------------------------- preview of a stored sample


def add_stored_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """`--shards DIR [--source NAME] --sample N`: show a stored sample instead of a JSON record."""
    parser.add_argument(
        "--shards",
        default=None,
        metavar="DIR",
        help="show a stored sample of this shard folder (or s3://BUCKET/PREFIX) instead of building one from JSON_FILE",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="with --shards: count --sample within this source (its name, or its path in data.txt)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        help="with --shards: 0-based sample number, across all sources in manifest order unless --source",
    )


def locate_sample(manifest: Manifest, number: int, source: str | None = None) -> tuple[str, int]:
    """(shard file relative to the folder, row) of stored sample `number`; ValueError when out of range."""
    sources = manifest.sources
    if source is not None:
        sources = [s for s in sources if source in (s.name, s.path)]
        if not sources:
            known = ", ".join(s.name for s in manifest.sources)
            raise ValueError(f"--source {source!r} is not in the manifest (sources: {known})")
    total = sum(s.samples_written for s in sources)
    if not 0 <= number < total:
        raise ValueError(f"--sample {number} is out of range: {total} sample(s) stored (0..{total - 1})")
    for s in sources:
        for shard in s.shards:
            if number < shard.samples:
                return shard.file, number
            number -= shard.samples
    raise AssertionError("unreachable: shard sample counts add up to samples_written")


def preview_stored(args: argparse.Namespace) -> int:
    """Show a stored sample exactly as `xc-prep preview` shows one built from JSON."""
    from pipeline.tokenization import Tokenizer
    from schemas.shards import ShardReader
    from schemas.storage import StorageError, open_store

    if args.json_file is not None:
        print("xc-prep preview: pass either JSON_FILE or --shards DIR, not both", file=sys.stderr)
        return ExitCode.USAGE
    try:
        store = open_store(args.shards)
        manifest = Manifest.load(store)
        file, row = locate_sample(manifest, args.sample, args.source)
        sample = ShardReader.open(store, shard_member(store, file)).read(row)
    except StorageError as e:
        print(f"xc-prep preview: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except (OSError, ValueError, KeyError, TypeError) as e:  # OSError: missing, or unreachable
        print(f"xc-prep preview: {e}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    if args.json:
        print(json.dumps(sample_to_preview_json(sample)))
        return ExitCode.OK
    # The folder's own copy is the tokenizer the sample was made with.
    if store.size(TOKENIZER_NAME) is not None:
        tokenizer = Tokenizer(store.read_bytes(TOKENIZER_NAME), path=None)
    elif args.tokenizer is not None:
        tokenizer = Tokenizer.from_path(args.tokenizer)
    else:
        print(f"xc-prep preview: {store.url(TOKENIZER_NAME)} is missing; pass --tokenizer", file=sys.stderr)
        return ExitCode.USAGE
    print(f"stored sample {args.sample}: {store.url(file)} row {row}")
    print(render_sample_summary(sample))
    print("-" * 72)
    print(render_sample_text(sample, tokenizer))
    return ExitCode.OK


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preview",
        help="show the tokens, trained spans and image grids one record becomes",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "json_file", type=Path, nargs="?", metavar="JSON_FILE", help="an upstream-format JSON file"
    )
    p.add_argument("--record", type=int, default=0, help="0-based record position in the file (default 0)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=os.environ.get(TOKENIZER_ENV),
        help=f"tokenizer.model or a model folder (default: ${TOKENIZER_ENV})",
        metavar="PATH",
    )
    p.add_argument(
        "--hd-num",
        type=int,
        default=DEFAULT_HD_NUM,
        help=f"maximum 560-px local tiles per image (default {DEFAULT_HD_NUM})",
    )
    p.add_argument(
        "--style", choices=STYLES, default="train", help="HD transform: official fine-tuning or inference"
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="official",
        help="official (training; <s> after a leading image) or inference (<s> first)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"maximum tokens per sample (default {DEFAULT_MAX_LENGTH})",
    )
    p.add_argument("--font", type=Path, default=None, help="TrueType font for video frame labels")
    p.add_argument("--json", action="store_true", help="print the golden-vector JSON instead of text")
    add_stored_sample_arguments(p)  # --shards DIR [--source NAME] --sample N
    add_media_policy_arguments(p)  # the allowed folders and size limits of `xc-prep validate`
    p.set_defaults(run=run)


def _usage_error(message: str) -> int:
    print(f"xc-prep preview: {message}", file=sys.stderr)
    return ExitCode.USAGE


def run(args: argparse.Namespace) -> int:
    if args.shards is not None:
        return preview_stored(args)
    if args.json_file is None:
        return _usage_error("pass a JSON_FILE (or --shards DIR to show a stored sample)")
    if args.tokenizer is None:
        return _usage_error(
            f"--tokenizer is required (or set ${TOKENIZER_ENV}): the model's tokenizer.model, or a demo "
            "one from `xc-prep tiny-tokenizer --out tiny.model`"
        )
    if args.record < 0:
        return _usage_error(f"--record ({args.record}) must be a 0-based position, at least 0")
    for flag, value in (("--hd-num", args.hd_num), ("--max-length", args.max_length)):
        if value < 1:
            return _usage_error(f"{flag} ({value}) must be at least 1")
    from pipeline.build import build_sample
    from pipeline.tokenization import Tokenizer

    try:
        tokenizer = Tokenizer.from_path(args.tokenizer)
        policy = media_policy_options(args)
    except (FileNotFoundError, ValueError) as e:
        return _usage_error(str(e))
    opts = ValidateOptions(
        hd_num=args.hd_num,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
        style=args.style,
        layout=args.layout,
        decode_images=False,  # building the sample decodes them
        **policy,
    )
    try:
        record = load_record(args.json_file, args.record, opts)
        sample = build_sample(
            record,
            tokenizer,
            source_name="preview",
            file=str(args.json_file),
            index=args.record,
            hd_num=args.hd_num,
            style=args.style,
            layout=args.layout,
            max_length=args.max_length,
            font_path=args.font,
            max_image_pixels=args.max_image_pixels,
        )
    except DataError as e:
        print(f"{args.json_file} record {args.record}: [{e.code}] {e.message}", file=sys.stderr)
        if hint := e.hint or HINTS.get(e.code):
            print(f"  fix: {hint}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    except Exception as e:  # an error inside xc-prep: name it and the record, without a traceback
        print(
            f"{args.json_file} record {args.record}: [build_failed] building the sample failed: "
            f"{exception_text(e)}; please report it with the record",
            file=sys.stderr,
        )
        return ExitCode.INVALID_DATA
    if args.json:
        print(json.dumps(sample_to_preview_json(sample)))
    else:
        print(render_sample_summary(sample, record.media))
        print("-" * 72)
        print(render_sample_text(sample, tokenizer))
    return ExitCode.OK
