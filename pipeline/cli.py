"""`xc-prep`: the data preparation command line (validate, shard, info, preview, tiny-tokenizer).

Each subcommand lives in its own module, which exposes `add_parser(subparsers)`; the parser it
adds sets `run=<function(args) -> int>`. Exit status: 0 ok, 1 invalid data, 2 usage error.
The flags several subcommands share are defined here: --workers' default (`default_workers`) and
the media safety policy (`add_media_policy_arguments`, `media_policy_options`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_VIDEO_SECONDS

SUBCOMMAND_MODULES = ("validate", "shard", "info", "preview", "tokenization")


# ---------------------------------------------------------------- flags shared by subcommands


def default_workers() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


MEDIA_POLICY_FIELDS = ("allow_path", "allow_any_path", "max_image_pixels", "max_video_seconds")
"""The option fields the media policy flags set (ValidateOptions, ShardConfig)."""


def add_media_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the media safety policy, shared by `xc-prep validate` and `xc-prep shard`.

    They map 1:1 to the fields of `pipeline.checks.ValidateOptions` allow_path, allow_any_path, max_image_pixels and
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


# ---------------------------------------------------------------- entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xc-prep",
        description="Validate, tokenize and tile IXC2.5 fine-tuning data into pre-tokenized shards.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"pipeline.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, a usage error exits 2
        return int(e.code or 0)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
