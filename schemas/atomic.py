"""Atomic, durable file writes shared by the shard writer and the training checkpoints.

A reader (or a resumed run) sees either the old file or the complete new one, never a part: the
bytes go to a hidden temp name, are fsync'ed, renamed into place, and the folder is fsync'ed so
that the rename itself survives a power loss. A checkpoint folder is published the same way, every
file of it fsync'ed before its rename. The order write → fsync(file) → rename → fsync(folder) is
what tests/test_atomic.py observes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: Path) -> None:
    """fsync every file under a folder, then every folder (deepest first) and the folder itself."""
    folders = [path]
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            folders.append(p)
    for folder in reversed(folders):
        fsync_dir(folder)


def temp_path(path: Path) -> Path:
    """The hidden temp name a file is written under before its atomic rename."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def publish(tmp: Path, path: Path) -> None:
    """Make a fully written temp file durable, then atomically give it its final name."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_tree(tmp: Path, path: Path) -> None:
    """Make every file and folder of a fully written temp folder durable, then atomically give it
    its final name (which must not exist) and make that rename durable."""
    fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    publish(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
