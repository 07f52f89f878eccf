"""`xc-train`: the training command line. For now the dry run: `xc-train --shards DIR --plan-only`.

`build_parser()` builds every flag (loader flags map 1:1 to `LoaderConfig` fields, kebab-case, with
the field docstrings as help); each mode is one function taking the parsed arguments.
Exit status: 0 ok, 1 invalid data, 2 usage error.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from trainer.data import LoaderConfig, LoaderConfigError, ShardDataError, plan_main


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field (used as --help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = after.value.value.strip()
    return docs


def _source_samples(text: str) -> tuple[str, int]:
    name, sep, count = text.rpartition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=COUNT, e.g. vqa=500")
    return name, int(count)


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per LoaderConfig field."""
    group = parser.add_argument_group("data loading (trainer.data.LoaderConfig)")
    docs = field_docs(LoaderConfig)
    for f in fields(LoaderConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if f.name == "token_weighted":
            group.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "source_samples":
            group.add_argument(
                flag, type=_source_samples, action="append", default=[], metavar="NAME=COUNT", help=help_text
            )
        else:
            default = f.default if f.default is not MISSING else None
            shown = f" [{default}]" if default is not None else ""
            group.add_argument(flag, type=int, default=default, metavar="N", help=help_text + shown)


def loader_config_from_args(args: argparse.Namespace) -> LoaderConfig:
    values = {f.name: getattr(args, f.name) for f in fields(LoaderConfig)}
    values["source_samples"] = dict(args.source_samples)
    config = LoaderConfig(**values)
    config.validate()
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xc-train",
        description="Fine-tune InternLM-XComposer 2.5 from pre-tokenized shards (made by `xc-prep shard`).",
    )
    parser.add_argument(
        "--shards", type=Path, required=True, metavar="DIR", help="shard folder (with manifest.json)"
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="print the epoch plan (per-source samples, coverage, repeats, token share, steps, fill) and exit",
    )
    parser.add_argument(
        "--world-size", type=int, default=1, metavar="N", help="data-parallel ranks (for --plan-only) [1]"
    )
    add_loader_arguments(parser)
    return parser


def run_plan_only(args: argparse.Namespace) -> int:
    try:
        config = loader_config_from_args(args)
        if args.world_size < 1:
            raise LoaderConfigError(f"--world-size ({args.world_size}) must be >= 1")
        plan_main(args.shards, config, world_size=args.world_size)
    except LoaderConfigError as e:
        print(f"xc-train: error: {e}", file=sys.stderr)
        return 2
    except (ShardDataError, FileNotFoundError, ValueError) as e:
        print(f"xc-train: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, a usage error exits 2
        return int(e.code or 0)
    if args.plan_only:
        return run_plan_only(args)
    print("xc-train: error: training is not implemented yet; use --plan-only", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
