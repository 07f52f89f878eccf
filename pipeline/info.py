"""`xc-prep info SHARDS_DIR [--json] [--verify]`: what a shard folder holds, and whether it is intact.

The summary comes from `manifest.json` alone (fingerprint, per-source counts, tokens, tiles, bytes),
so it is instant on any size of folder. `--verify` re-reads every shard and checks its size, sha256,
Arrow footer and sample count with `schemas.shards.verify_shards` (the very check the trainer runs at
start-up), and the copy of the tokenizer against the fingerprint; any problem exits 1, naming the file.

`xc-prep preview --shards DIR [--source NAME] --sample N` (arguments and code here, one call in
preview.py) shows a stored sample the way preview shows one built from JSON. N counts samples
across all sources in manifest order (shard by shard, row by row), or within --source NAME.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas.cli import ExitCode
from schemas.manifest import REJECTS_NAME, TOKENIZER_NAME, Manifest


def tokenizer_problems(shard_dir: Path, manifest: Manifest) -> list[str]:
    """The copied tokenizer must be the one the fingerprint names (the trainer may load it)."""
    from schemas.shards import file_sha256

    path = shard_dir / TOKENIZER_NAME
    if not path.is_file():
        return [
            f"{path}: missing (the shards were made with tokenizer sha256 {manifest.fingerprint.tokenizer_sha256})"
        ]
    if file_sha256(path) != manifest.fingerprint.tokenizer_sha256:
        return [f"{path}: sha256 does not match the manifest's fingerprint (replaced or corrupted)"]
    return []


def count_rejects(shard_dir: Path) -> int | None:
    path = shard_dir / REJECTS_NAME
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def info_json(shard_dir: Path, manifest: Manifest, problems: list[str] | None) -> dict[str, Any]:
    sources = manifest.sources
    totals = {
        "records_read": sum(s.records_read for s in sources),
        "samples_written": sum(s.samples_written for s in sources),
        "rejected": sum(s.rejected for s in sources),
        "total_tokens": sum(s.total_tokens for s in sources),
        "trained_tokens": sum(s.trained_tokens for s in sources),
        "tiles": sum(s.tiles for s in sources),
        "shards": sum(len(s.shards) for s in sources),
        "bytes": sum(sh.bytes for s in sources for sh in s.shards),
    }
    data: dict[str, Any] = {"shard_dir": str(shard_dir), "totals": totals, "manifest": manifest.to_json()}
    if problems is not None:
        data["verify"] = {"ok": not problems, "problems": problems}
    return data


def print_info(shard_dir: Path, manifest: Manifest) -> None:
    from pipeline.shard import summary_table

    fp = manifest.fingerprint
    print(
        f"{shard_dir}: format {manifest.format_version}, made by {' '.join(manifest.command) or '(unknown)'}"
    )
    print(
        f"fingerprint: tokenizer {fp.tokenizer_sha256[:16]}…, layout {fp.layout}, style {fp.style}, "
        f"hd_num {fp.hd_num}, max_length {fp.max_length}, tile_codec {fp.tile_codec}, code {fp.code_version}"
    )
    print(summary_table(manifest))
    for s in manifest.sources:
        written = max(s.samples_written, 1)
        print(
            f"{s.name}: {s.path}, k {s.k} ({s.samples_per_epoch:,} samples/epoch), "
            f"{s.total_tokens / written:,.0f} tokens and {s.tiles / written:.1f} tiles per sample"
        )
    rejects = count_rejects(shard_dir)
    if rejects:
        print(f"{rejects:,} rejected record(s) listed in {shard_dir / REJECTS_NAME}")


def run(args: argparse.Namespace) -> int:
    from schemas.shards import verify_shards

    shard_dir = Path(args.shards_dir)
    try:
        manifest = Manifest.load(shard_dir)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        print(f"xc-prep info: error: {e}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    problems = None
    if args.verify:
        problems = verify_shards(shard_dir) + tokenizer_problems(shard_dir, manifest)
    if args.json:
        print(json.dumps(info_json(shard_dir, manifest, problems), indent=2))
    else:
        print_info(shard_dir, manifest)
    if problems is None:
        return ExitCode.OK
    for problem in problems:
        print(f"verify: {problem}", file=sys.stderr)
    shards = sum(len(s.shards) for s in manifest.sources)
    if problems:
        print(
            f"verify: {len(problems)} problem(s) in {shard_dir}; re-run the `xc-prep shard` command "
            "(it rebuilds damaged shards) or restore the folder from a copy",
            file=sys.stderr,
        )
        return ExitCode.INVALID_DATA
    print(f"verify: ok ({shards} shard(s), sizes and sha256 match the manifest)", file=sys.stderr)
    return ExitCode.OK


# ---------------------------------------------------------------- preview of a stored sample


def add_stored_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """`xc-prep preview --shards DIR [--source NAME] --sample N` (added to preview's parser)."""
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        metavar="DIR",
        help="show a stored sample of this shard folder instead of building one from JSON_FILE",
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
    from pipeline.preview import render_sample_summary, render_sample_text, sample_to_preview_json
    from pipeline.tokenization import Tokenizer
    from schemas.shards import ShardReader

    if args.json_file is not None:
        print("xc-prep preview: pass either JSON_FILE or --shards DIR, not both", file=sys.stderr)
        return ExitCode.USAGE
    shard_dir = Path(args.shards)
    try:
        manifest = Manifest.load(shard_dir)
        file, row = locate_sample(manifest, args.sample, args.source)
        sample = ShardReader(shard_dir / file).read(row)
    except (FileNotFoundError, ValueError) as e:
        print(f"xc-prep preview: {e}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    if args.json:
        print(json.dumps(sample_to_preview_json(sample)))
        return ExitCode.OK
    # The folder's own copy is the tokenizer the sample was made with.
    copy = shard_dir / TOKENIZER_NAME
    tokenizer_path = copy if copy.is_file() else args.tokenizer
    if tokenizer_path is None:
        print(f"xc-prep preview: {copy} is missing; pass --tokenizer", file=sys.stderr)
        return ExitCode.USAGE
    print(f"stored sample {args.sample}: {shard_dir / file} row {row}")
    print(render_sample_summary(sample))
    print("-" * 72)
    print(render_sample_text(sample, Tokenizer.from_path(tokenizer_path)))
    return ExitCode.OK


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="summarize a shard folder; --verify re-checks every shard's sha256",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("shards_dir", metavar="SHARDS_DIR", help="a folder written by `xc-prep shard`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--verify", action="store_true", help="re-read every shard and check size, sha256 and sample count"
    )
    p.set_defaults(run=run)
