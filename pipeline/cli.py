"""`xc-prep`: the data preparation command line (convert, validate, shard, info, preview,
export, tiny-tokenizer).

Each subcommand lives in its own module, which exposes `add_parser(subparsers)`; the parser it
adds sets `run=<function(args) -> int>`. Exit status: 0 ok, 1 invalid data, 2 usage error.
The flags several subcommands share are in pipeline/flags.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("convert", "validate", "shard", "info", "preview", "export", "tokenization")


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
