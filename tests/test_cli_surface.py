"""The command lines' flags, frozen: adding or removing a flag is a decision, not a side effect.

Every flag of every `xc-train` and `xc-prep` subcommand and of `xc-chat` is read from its parser
and compared with PINNED (torchtitan's test_no_new_cli_options). A new flag needs a user story: if it has one, add
it to PINNED and to CHANGELOG.md ("Unreleased"); a setting without one belongs in a --config file
(`trainer.config.CONFIG_FILE_ONLY`). A removed flag is recorded in CHANGELOG.md too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from chat.cli import build_parser as build_chat_parser
from pipeline.cli import build_parser as build_prep_parser
from trainer.cli import SUBCOMMANDS, build_parser, split_subcommand
from trainer.config import CONFIG_FILE_ONLY, TrainConfig, add_config_flags, config_from_args

PINNED: dict[str, tuple[str, ...]] = {
    "xc-train fit": (
        "--attention",
        "--checkpoint-layers",
        "--compile",
        "--config",
        "--deepspeed",
        "--early-stop-patience",
        "--epochs",
        "--eval-every-steps",
        "--eval-fraction",
        "--eval-shards",
        "--fix-sampler",
        "--fix-vit",
        "--global-batch-size",
        "--gradient-checkpointing",
        "--keep-last",
        "--learning-rate",
        "--local_rank",
        "--log-every-steps",
        "--lora-alpha",
        "--lora-dropout",
        "--lora-r",
        "--max-length",
        "--max-steps",
        "--max-tiles",
        "--model",
        "--nan-policy",
        "--num-workers",
        "--output-dir",
        "--recipe",
        "--report-to",
        "--resume",
        "--save-every-steps",
        "--save-final",
        "--seed",
        "--shards",
        "--source-samples",
        "--stop-after-steps",
        "--token-weighted",
        "--warmup-ratio",
        "--weight-decay",
        "--zero-stage",
    ),
    "xc-train plan": (
        "--attention",
        "--checkpoint-layers",
        "--compile",
        "--config",
        "--deepspeed",
        "--early-stop-patience",
        "--epochs",
        "--eval-every-steps",
        "--eval-fraction",
        "--eval-shards",
        "--fix-sampler",
        "--fix-vit",
        "--global-batch-size",
        "--gradient-checkpointing",
        "--keep-last",
        "--learning-rate",
        "--log-every-steps",
        "--lora-alpha",
        "--lora-dropout",
        "--lora-r",
        "--max-length",
        "--max-steps",
        "--max-tiles",
        "--model",
        "--nan-policy",
        "--num-workers",
        "--output-dir",
        "--recipe",
        "--report-to",
        "--resume",
        "--save-every-steps",
        "--save-final",
        "--seed",
        "--shards",
        "--source-samples",
        "--stop-after-steps",
        "--token-weighted",
        "--warmup-ratio",
        "--weight-decay",
        "--world-size",
        "--zero-stage",
    ),
    "xc-train eval": (
        "--json",
        "--model",
        "--shards",
    ),
    "xc-train generate": (
        "--max-new-tokens",
        "--model",
        "--sample",
        "--seed",
        "--shards",
        "--temperature",
        "--top-p",
    ),
    "xc-train merge": (
        "--adapter",
        "--base",
        "--out",
        "--overwrite",
    ),
    "xc-prep validate": (
        "--allow-any-path",
        "--allow-path",
        "--hd-num",
        "--json",
        "--layout",
        "--max-image-pixels",
        "--max-length",
        "--max-video-seconds",
        "--style",
        "--tokenizer",
        "--workers",
        "DATA_TXT",
    ),
    "xc-prep shard": (
        "--allow-any-path",
        "--allow-path",
        "--engine",
        "--finalize",
        "--font",
        "--hd-num",
        "--jpeg-quality",
        "--layout",
        "--max-image-pixels",
        "--max-length",
        "--max-video-seconds",
        "--out",
        "--overwrite",
        "--part",
        "--samples-per-shard",
        "--style",
        "--tile-codec",
        "--tokenizer",
        "--workers",
        "DATA_TXT",
    ),
    "xc-prep convert": (
        "--image-folder",
        "--out",
        "--split",
        "--system",
        "INPUTS",
    ),
    "xc-prep export": (
        "--format",
        "--out",
        "SHARD_DIR",
    ),
    "xc-prep info": (
        "--json",
        "--verify",
        "SHARDS_DIR",
    ),
    "xc-prep preview": (
        "--allow-any-path",
        "--allow-path",
        "--font",
        "--hd-num",
        "--json",
        "--layout",
        "--max-image-pixels",
        "--max-length",
        "--max-video-seconds",
        "--record",
        "--sample",
        "--shards",
        "--source",
        "--style",
        "--tokenizer",
        "JSON_FILE",
    ),
    "xc-prep tiny-tokenizer": (
        "--out",
        "--vocab-size",
    ),
    "xc-chat": (
        "--adapter",
        "--font",
        "--hd-num",
        "--image",
        "--json",
        "--max-new-tokens",
        "--model",
        "--prompt",
        "--repetition-penalty",
        "--seed",
        "--show-prompt",
        "--system",
        "--temperature",
        "--tokenizer",
        "--top-k",
        "--top-p",
        "--use-meta",
        "--video",
    ),
}
"""Each subcommand's flags (an option's first spelling; a positional as its NAME), sorted."""


def flags(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    return tuple(
        sorted(
            a.option_strings[0] if a.option_strings else a.dest.upper()
            for a in parser._actions
            if not isinstance(a, argparse._HelpAction)
        )
    )


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {f"xc-train {name}": build() for name, (build, _) in SUBCOMMANDS.items()}
    prep = next(a for a in build_prep_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found |= {f"xc-prep {name}": parser for name, parser in prep.choices.items()}
    found["xc-chat"] = build_chat_parser()
    return found


def test_no_flag_is_added_or_removed_without_a_decision() -> None:
    found = parsers()
    assert sorted(found) == sorted(PINNED), (
        "a subcommand was added or removed: update PINNED and CHANGELOG.md"
    )
    problems = []
    for command, pinned in PINNED.items():
        added = sorted(set(flags(found[command])) - set(pinned))
        removed = sorted(set(pinned) - set(flags(found[command])))
        if added:
            problems.append(f"`{command}` has new flags {added}")
        if removed:
            problems.append(f"`{command}` lost flags {removed}")
    assert not problems, (
        "; ".join(problems) + ". Adding a flag is a decision: give it a user story (or make the setting "
        "config-file-only: trainer.config.CONFIG_FILE_ONLY), then update PINNED in "
        "tests/test_cli_surface.py and record the change in CHANGELOG.md (Unreleased)."
    )


def test_the_bare_form_is_fit_and_plan_only_is_plan() -> None:
    assert flags(build_parser()) == PINNED["xc-train fit"]
    assert split_subcommand(["--shards", "s"]) == ("fit", ["--shards", "s"], False)
    assert split_subcommand(["--shards", "s", "--plan-only", "--world-size", "2"]) == (
        "plan",
        ["--shards", "s", "--world-size", "2"],
        False,
    )
    # The deepspeed launcher puts --local_rank=N before a named subcommand.
    assert split_subcommand(["--local_rank=1", "fit", "--shards", "s"]) == (
        "fit",
        ["--local_rank=1", "--shards", "s"],
        True,
    )


def test_config_file_only_settings_have_no_flag_but_load_from_a_config_file(tmp_path: Path) -> None:
    assert CONFIG_FILE_ONLY < {f for f in TrainConfig.__dataclass_fields__}
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert not {a.dest for a in parser._actions} & CONFIG_FILE_ONLY
    with pytest.raises(SystemExit):
        parser.parse_args(["--adam-beta2", "0.9"])
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"adam_beta2": 0.98, "max_grad_norm": 0.5}))
    cfg = config_from_args(parser.parse_args(["--config", str(config), "--shards", "s"]))
    assert (cfg.adam_beta2, cfg.max_grad_norm) == (0.98, 0.5)


def test_help_of_every_subcommand_answers_without_importing_torch() -> None:
    script = (
        "import contextlib, io, sys\n"
        "from trainer.cli import SUBCOMMANDS, main, merge_main\n"
        "for argv in [['--help'], *([name, '--help'] for name in SUBCOMMANDS)]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0, argv\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert merge_main(['--help']) == 0\n"
        "from chat.cli import main as chat_main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert chat_main(['--help']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'peft', 'deepspeed') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
