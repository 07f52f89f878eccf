"""`xc-train`: fine-tune from shards, or plan, evaluate and generate.

  xc-train --shards DIR --model PATH|tiny|7b --output-dir DIR [--recipe full|lora] [flags]
  xc-train --shards DIR --plan-only [--world-size N]      the epoch plan, no model
  xc-train eval --model DIR --shards DIR [--json PATH]     per-sample and mean loss
  xc-train generate --model DIR --shards DIR --sample N    answer a stored sample's prompt

Training flags map 1:1 to `trainer.config.TrainConfig` fields (their docstrings are the help).
Exit status: 0 ok, 1 invalid data or a halted run, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.config import add_config_flags, config_from_args
from trainer.index import ShardDataError
from trainer.loader import plan_main
from trainer.plan import LoaderConfigError

SUBCOMMANDS = ("eval", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xc-train",
        description="Fine-tune InternLM-XComposer 2.5 from pre-tokenized shards (made by `xc-prep shard`). "
        "Subcommands: `xc-train eval ...`, `xc-train generate ...` (see their --help).",
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="print the epoch plan (per-source samples, coverage, repeats, token share, steps, fill) and exit",
    )
    parser.add_argument(
        "--world-size", type=int, default=1, metavar="N", help="data-parallel ranks to plan for (--plan-only)"
    )
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_flags(parser)
    return parser


def run_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from trainer.checkpoint import CheckpointError
    from trainer.train import TrainingHalted, train

    try:
        cfg = config_from_args(args).resolve()
    except (ValueError, OSError) as e:
        print(f"xc-train: error: {e}", file=sys.stderr)
        return 2
    if args.plan_only:
        try:
            if args.world_size < 1:
                raise LoaderConfigError(f"--world-size ({args.world_size}) must be >= 1")
            from trainer.train import loader_config, model_config

            config = loader_config(cfg, args.world_size, model_config(cfg))
            plan_main(Path(cfg.shards), config, world_size=args.world_size)
        except (LoaderConfigError, ValueError) as e:
            print(f"xc-train: error: {e}", file=sys.stderr)
            return 1 if isinstance(e, ShardDataError) else 2
        except OSError as e:
            print(f"xc-train: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        train(cfg, argv if argv is not None else sys.argv)
    except (TrainingHalted, CheckpointError) as e:
        print(f"xc-train: stopped: {e}", file=sys.stderr)
        return 1
    except (ShardDataError, OSError) as e:  # OSError: a missing file, a full disk, no permission
        print(f"xc-train: error: {e}", file=sys.stderr)
        return 1
    except (LoaderConfigError, ValueError) as e:
        print(f"xc-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """A launched rank (torchrun/deepspeed, several ranks) leaves its process group before the
    interpreter exits: left to the interpreter's teardown, a rank can abort ("terminate called
    without an active exception", seen once on two gloo ranks). A single in-process run keeps it
    for the next call."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------- eval and generate


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xc-train eval", description="Per-sample and mean loss on shards.")
    p.add_argument("--model", required=True, help="model folder or LoRA adapter folder")
    p.add_argument("--shards", type=Path, required=True, help="shard folder (every stored sample once)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return p


def run_eval(argv: list[str]) -> int:
    from trainer.evaluate import evaluate, format_eval

    try:
        args = build_eval_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        result = evaluate(args.model, args.shards)
        print(format_eval(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    except (ShardDataError, OSError, ValueError) as e:
        print(f"xc-train eval: error: {e}", file=sys.stderr)
        return 1
    return 0


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xc-train generate",
        description="Answer the prompt of a stored sample (its tokens before the first trained token).",
    )
    p.add_argument("--model", required=True, help="model folder or LoRA adapter folder")
    p.add_argument("--shards", type=Path, required=True, help="shard folder holding the prompt sample")
    p.add_argument("--sample", type=int, default=0, help="global sample number (manifest order) [0]")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def run_generate(argv: list[str]) -> int:
    from trainer.evaluate import generate_for_sample

    try:
        args = build_generate_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        result = generate_for_sample(
            args.model,
            args.shards,
            args.sample,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except (ShardDataError, OSError, ValueError, IndexError) as e:
        print(f"xc-train generate: error: {e}", file=sys.stderr)
        return 1
    print(f"sample {args.sample} ({result['source']} #{result['index']}, id {result['id']!r})")
    print(f"prompt:    {result['prompt_text']!r}")
    print(f"generated: {result['generated_text']!r}")
    print(f"reference: {result['reference_text']!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw and raw[0] == "eval":
        return run_eval(raw[1:])
    if raw and raw[0] == "generate":
        return run_generate(raw[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(raw)
    except SystemExit as e:  # argparse: --help exits 0, a usage error exits 2
        return int(e.code or 0)
    return run_train(args, argv)


if __name__ == "__main__":
    sys.exit(main())
