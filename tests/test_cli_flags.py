"""schemas/cli.py `add_dataclass_flags`: one flag per dataclass field, typed from its annotation."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from pipeline.cli import build_parser
from pipeline.shard_config import ShardConfig
from schemas.cli import add_dataclass_flags, field_docs


@dataclass(frozen=True)
class Toy:
    source: Path = Path("in.txt")
    """Where to read."""
    out: Path | None = None
    """Where to write."""
    size: int = 3
    """How many."""
    mode: Literal["fast", "exact"] = "exact"
    """Which way."""
    names: tuple[str, ...] = ()
    """Which ones."""
    dry_run: bool = False
    """Only say what would happen."""
    check: bool = True
    """Check the result."""


def parser_for(**kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_dataclass_flags(parser, Toy, **kwargs)  # type: ignore[arg-type]
    return parser


def test_each_field_becomes_a_typed_flag_with_its_docstring_as_help() -> None:
    parser = parser_for(positional=("source",), show_defaults=True)
    args = parser.parse_args(["a.txt", "--out", "o", "--size", "5", "--mode", "fast", "--names", "x", "y"])
    assert vars(args) == {
        "source": Path("a.txt"),
        "out": Path("o"),
        "size": 5,
        "mode": "fast",
        "names": ["x", "y"],
        "dry_run": False,
        "check": True,
    }
    assert parser.parse_args(["--dry-run", "--no-check"]).source == Path("in.txt")
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["size"] == "How many. (default 3)" and helps["out"] == "Where to write."
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--mode", "slow"])


def test_none_defaults_exclude_and_overrides() -> None:
    parser = parser_for(none_defaults=True, exclude={"names"}, overrides={"size": {"metavar": "N"}})
    args = parser.parse_args([])
    assert vars(args) == dict.fromkeys(["source", "out", "size", "mode", "dry_run", "check"])
    assert parser.parse_args(["--no-dry-run"]).dry_run is False  # a file's True can be turned off
    assert "--size N" in parser.format_help()
    with pytest.raises(SystemExit):  # an unknown flag
        parser.parse_args(["--names", "x"])


def test_xc_prep_shard_flags_come_from_shard_config() -> None:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in subparsers.choices["shard"]._actions}
    docs = field_docs(ShardConfig)
    for f in dataclasses.fields(ShardConfig):
        assert f.name in actions, f.name
        if f.name not in ("allow_path", "allow_any_path", "max_image_pixels", "max_video_seconds"):
            assert actions[f.name].help.startswith(docs[f.name]), f.name
