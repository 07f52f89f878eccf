"""`xc-train`: fine-tune from shards, plan the epoch, evaluate, generate, merge a LoRA adapter.

  xc-train [fit] --shards DIR --model PATH|tiny|7b --output-dir DIR [--recipe full|lora] [flags]
  xc-train plan --shards DIR [--world-size N] [flags]      the epoch plan, no model
  xc-train eval --model DIR --shards DIR [--json PATH]     per-sample and mean loss
  xc-train generate --model DIR --shards DIR --sample N    answer a stored sample's prompt
  xc-train merge --adapter DIR [--base PATH] --out DIR     LoRA adapter -> full checkpoint

The bare form (`xc-train --shards ...`) is `fit`; `xc-train ... --plan-only` is `plan`; `xc-merge`
is `merge`. Training flags map 1:1 to `trainer.config.TrainConfig` fields (their docstrings are
the help). Each subcommand parses its flags before importing torch, so `--help` answers at once.
Exit status: `schemas.cli.ExitCode`, by error type (`trainer.errors.exit_code`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from schemas.cli import ExitCode
from trainer.config import add_config_flags, config_from_args
from trainer.errors import HALTS, HANDLED, LoaderConfigError, Stopped, exit_code

PLAN_ONLY = "--plan-only"
"""The older spelling of `xc-train plan`: `xc-train --shards DIR --plan-only ...`."""
LAUNCHER_RANK_FLAGS = ("--local_rank=", "--local-rank=")
"""The deepspeed launcher puts `--local_rank=N` before the user's arguments (the rank is read
from LOCAL_RANK instead)."""


# ---------------------------------------------------------------- parsers


def build_parser(prog: str = "xc-train") -> argparse.ArgumentParser:
    """`xc-train [fit]`: every TrainConfig field as a flag."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune InternLM-XComposer 2.5 from pre-tokenized shards (made by `xc-prep shard`). "
        "Other subcommands: `xc-train plan|eval|generate|merge ...` (see their --help).",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_flags(parser)
    return parser


def build_plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xc-train plan",
        description="Print the epoch plan (per-source samples, coverage, repeats, token share, steps, "
        "pack fill) of a training config, without a model. Also spelled `xc-train --plan-only ...`.",
    )
    parser.add_argument(
        "--world-size", type=int, default=1, metavar="N", help="data-parallel ranks to plan for [1]"
    )
    add_config_flags(parser)
    return parser


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xc-train eval", description="Per-sample and mean loss on shards.")
    p.add_argument("--model", required=True, help="model folder or LoRA adapter folder")
    p.add_argument(
        "--shards", required=True, help="shard folder or s3://BUCKET/PREFIX (every stored sample once)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return p


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xc-train generate",
        description="Answer the prompt of a stored sample (its tokens before the first trained token).",
    )
    p.add_argument("--model", required=True, help="model folder or LoRA adapter folder")
    p.add_argument(
        "--shards", required=True, help="shard folder or s3://BUCKET/PREFIX holding the prompt sample"
    )
    p.add_argument("--sample", type=int, default=0, help="global sample number (manifest order) [0]")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def build_merge_parser(prog: str = "xc-train merge") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fold a LoRA adapter into its base and write a full checkpoint in the official layout.",
    )
    p.add_argument(
        "--adapter", type=Path, required=True, help="adapter folder written by xc-train --recipe lora"
    )
    p.add_argument(
        "--base", default=None, help="base model folder or hub id (default: the adapter's recorded base)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for the merged checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    return p


# ---------------------------------------------------------------- subcommands


def run_fit(args: argparse.Namespace, command: list[str]) -> ExitCode:
    cfg = config_from_args(args).resolve()
    from trainer.train import train

    try:
        train(cfg, command)
    finally:
        _leave_process_group()
    return ExitCode.OK


def run_plan(args: argparse.Namespace, command: list[str]) -> ExitCode:
    cfg = config_from_args(args).resolve()
    if args.world_size < 1:
        raise LoaderConfigError(f"--world-size ({args.world_size}) must be >= 1")
    from trainer.index import SampleIndex, hold_out
    from trainer.loader import plan_main
    from trainer.planning import loader_config, model_config

    assert cfg.shards is not None, "resolve() requires --shards"
    config = loader_config(cfg, args.world_size, model_config(cfg))
    index = SampleIndex.load(cfg.shards)
    if cfg.eval_fraction > 0:  # the plan of the samples that train: the held-out ones are left out
        index, _ = hold_out(index, cfg.eval_fraction, cfg.seed)
    plan_main(index, config, world_size=args.world_size)
    return ExitCode.OK


def run_eval(args: argparse.Namespace, command: list[str]) -> ExitCode:
    from schemas.atomic import write_json_atomic
    from trainer.evaluate import evaluate, format_eval

    result = evaluate(args.model, args.shards)
    print(format_eval(result))
    if args.json:
        write_json_atomic(args.json, result)
    return ExitCode.OK


def run_generate(args: argparse.Namespace, command: list[str]) -> ExitCode:
    from trainer.evaluate import generate_for_sample

    result = generate_for_sample(
        args.model,
        args.shards,
        args.sample,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(f"sample {args.sample} ({result['source']} #{result['index']}, id {result['id']!r})")
    print(f"prompt:    {result['prompt_text']!r}")
    print(f"generated: {result['generated_text']!r}")
    print(f"reference: {result['reference_text']!r}")
    return ExitCode.OK


def run_merge(args: argparse.Namespace, command: list[str]) -> ExitCode:
    from trainer.merge import merge

    merge(args.adapter, args.base, args.out, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.out}")
    return ExitCode.OK


def _leave_process_group() -> None:
    """A launched rank (torchrun/deepspeed, several ranks) leaves its process group before the
    interpreter exits: left to the interpreter's teardown, a rank can abort ("terminate called
    without an active exception", seen once on two gloo ranks). A single in-process run keeps it
    for the next call."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()


Runner = Callable[[argparse.Namespace, list[str]], ExitCode]
SUBCOMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Runner]] = {
    "fit": (lambda: build_parser("xc-train fit"), run_fit),
    "plan": (build_plan_parser, run_plan),
    "eval": (build_eval_parser, run_eval),
    "generate": (build_generate_parser, run_generate),
    "merge": (build_merge_parser, run_merge),
}


# ---------------------------------------------------------------- entry points


def split_subcommand(argv: list[str]) -> tuple[str, list[str], bool]:
    """(subcommand, its arguments, whether it was named): the first word names it; without one,
    `fit`, or `plan` where `--plan-only` is given."""
    launcher = [a for a in argv[:1] if a.startswith(LAUNCHER_RANK_FLAGS)]
    rest = argv[len(launcher) :]
    if rest and rest[0] in SUBCOMMANDS:
        return rest[0], launcher + rest[1:], True
    if PLAN_ONLY in rest:
        return "plan", [a for a in rest if a != PLAN_ONLY], False
    return "fit", argv, False


def run(name: str, parser: argparse.ArgumentParser, argv: list[str], command: list[str]) -> int:
    """Parse, run one subcommand, and turn its error (if any) into one line and an exit status."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, a usage error exits 2
        return int(e.code or 0)
    try:
        return SUBCOMMANDS[name][1](args, command)
    except HANDLED as e:
        if isinstance(e, Stopped):
            if str(e):
                print(f"{parser.prog}: {e}", file=sys.stderr)
        elif isinstance(e, KeyboardInterrupt):
            print(f"{parser.prog}: interrupted", file=sys.stderr)
        else:
            print(f"{parser.prog}: {'stopped' if isinstance(e, HALTS) else 'error'}: {e}", file=sys.stderr)
        return exit_code(e)


def main(argv: list[str] | None = None) -> int:
    """`xc-train`. The command recorded with a run is `argv` (the process's when None)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    name, rest, named = split_subcommand(raw)
    parser = SUBCOMMANDS[name][0]() if named or name != "fit" else build_parser()
    return run(name, parser, rest, argv if argv is not None else sys.argv)


def merge_main(argv: list[str] | None = None) -> int:
    """`xc-merge`: `xc-train merge` under its own name."""
    raw = list(sys.argv[1:] if argv is None else argv)
    return run("merge", build_merge_parser("xc-merge"), raw, raw)


if __name__ == "__main__":
    sys.exit(main())
