"""Flags several `xc-prep` subcommands share: --workers' default and the media safety policy.

`xc-prep validate` and `xc-prep shard` take the same media policy flags (--allow-path,
--allow-any-path, --max-image-pixels, --max-video-seconds), which map 1:1 to the fields of
`pipeline.checks.ValidateOptions` named in `MEDIA_POLICY_FIELDS`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_VIDEO_SECONDS


def default_workers() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


MEDIA_POLICY_FIELDS = ("allow_path", "allow_any_path", "max_image_pixels", "max_video_seconds")
"""The option fields the media policy flags set (ValidateOptions, ShardConfig)."""


def add_media_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the media safety policy, shared by `xc-prep validate` and `xc-prep shard`;
    `media_policy_options(args)` turns them into the fields named in `MEDIA_POLICY_FIELDS`."""
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
