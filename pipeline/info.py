"""`xc-prep info SHARDS_DIR [--json] [--verify]`: what a shard folder holds, and whether it is intact.

SHARDS_DIR is a folder or an object-store prefix (s3://BUCKET/PREFIX: schemas/storage.py).

The summary comes from `manifest.json` alone (fingerprint, per-source counts, tokens, tiles, bytes),
so it is instant on any size of folder. `--verify` re-reads every shard and checks its size, sha256,
Arrow footer, codec and sample count with `schemas.shards.verify_shards` (the trainer runs the same
checks at start-up without the sha256, and checks each sample's own sha256 as it reads it), and the
copy of the tokenizer against the fingerprint; any problem exits 1, naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas.cli import ExitCode
from schemas.manifest import REJECTS_NAME, Manifest
from schemas.storage import StorageError, Store, open_store


def count_rejects(store: Store) -> int | None:
    if store.size(REJECTS_NAME) is None:
        return None
    return sum(1 for line in store.read_bytes(REJECTS_NAME).splitlines() if line.strip())


def info_json(shard_dir: str | Path, manifest: Manifest, problems: list[str] | None) -> dict[str, Any]:
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


def print_info(store: Store, manifest: Manifest) -> None:
    from pipeline.shard import summary_table

    fp = manifest.fingerprint
    print(
        f"{store.url()}: format {manifest.format_version}, made by {' '.join(manifest.command) or '(unknown)'}"
    )
    print(
        f"fingerprint: tokenizer {fp.tokenizer_sha256[:16]}…, layout {fp.layout}, style {fp.style}, "
        f"hd_num {fp.hd_num}, max_length {fp.max_length}, tile_codec {fp.tile_codec}"
        + (f" (quality {fp.jpeg_quality})" if fp.jpeg_quality is not None else "")
        + f", code {fp.code_version}"
    )
    print(summary_table(manifest))
    for s in manifest.sources:
        written = max(s.samples_written, 1)
        print(
            f"{s.name}: {s.path}, k {s.k} ({s.samples_per_epoch:,} samples/epoch), "
            f"{s.total_tokens / written:,.0f} tokens and {s.tiles / written:.1f} tiles per sample"
        )
    rejects = count_rejects(store)
    if rejects:
        print(f"{rejects:,} rejected record(s) listed in {store.url(REJECTS_NAME)}")


def run(args: argparse.Namespace) -> int:
    from schemas.shards import tokenizer_problems, verify_shards

    try:
        store = open_store(args.shards_dir)
    except StorageError as e:
        print(f"xc-prep info: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    shard_dir = store.url()
    try:
        manifest = Manifest.load(store)
    except (OSError, ValueError, KeyError, TypeError) as e:  # OSError: missing, or unreachable
        print(f"xc-prep info: error: {e}", file=sys.stderr)
        return ExitCode.INVALID_DATA
    problems = None
    if args.verify:
        try:
            problems = verify_shards(store) + tokenizer_problems(store, manifest)
        except OSError as e:  # an object store that stopped answering (after retries)
            print(f"xc-prep info: error reading {shard_dir}: {e}", file=sys.stderr)
            return ExitCode.INVALID_DATA
    if args.json:
        print(json.dumps(info_json(shard_dir, manifest, problems), indent=2))
    else:
        print_info(store, manifest)
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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="summarize a shard folder; --verify re-checks every shard's sha256",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "shards_dir", metavar="SHARDS_DIR", help="a folder (or s3://BUCKET/PREFIX) written by `xc-prep shard`"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--verify", action="store_true", help="re-read every shard and check size, sha256 and sample count"
    )
    p.set_defaults(run=run)
