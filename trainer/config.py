"""Typed training configuration: the single source of truth for `xc-train` flags and config files.

Every field of `TrainConfig` is a `--kebab-case` flag whose help text is the field's docstring;
`--config FILE` (YAML or JSON, same field names) sets defaults that flags override. Fields left
`None` take the recipe's default (docs/IXC25.md#official-recipe) in `resolve()`. The DeepSpeed JSON is generated
from the resolved config by `deepspeed_config()`, never kept by hand beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from schemas.cli import add_dataclass_flags

DEFAULT_MODEL = "internlm/internlm-xcomposer2d5-7b"
LORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
"""The five PLoRA linears of every decoder layer (`trainer.model.PLoRALinear`): what LoRA wraps by default."""

CONFIG_FILE_ONLY: frozenset[str] = frozenset(
    {"use_lora", "lora_targets", "adam_beta1", "adam_beta2", "max_grad_norm"}
)
"""TrainConfig fields without a flag: the official recipe's values, changed in a --config file if at
all (`--recipe lora` is how LoRA is chosen; the LoRA targets are exact module names)."""

# The official recipes (docs/IXC25.md#official-recipe). Keys are TrainConfig fields that are None until resolved.
RECIPES: dict[str, dict[str, Any]] = {
    "full": {
        "learning_rate": 1e-5,
        "fix_vit": False,
        "fix_sampler": False,
        "use_lora": False,
        "zero_stage": 2,
    },
    "lora": {
        "learning_rate": 5e-5,
        "fix_vit": True,
        "fix_sampler": True,
        "use_lora": True,
        "zero_stage": 1,
    },
    # The LoRA recipe over a base whose decoder linears are stored in 4-bit NF4 (trainer/qlora.py).
    "qlora": {
        "learning_rate": 5e-5,
        "fix_vit": True,
        "fix_sampler": True,
        "use_lora": True,
        "zero_stage": 1,
    },
}
TRACKERS = ("tensorboard", "wandb", "mlflow")
"""What --report-to can name (or `none`)."""


@dataclass
class TrainConfig:
    shards: str | None = None
    """Shard folder written by `xc-prep shard` (holds manifest.json), or s3://BUCKET/PREFIX."""
    model: str = DEFAULT_MODEL
    """Model folder (official layout), a hub id resolved through the local HF cache, or a preset: tiny, 7b."""
    output_dir: Path = Path("output")
    """Where checkpoints, TensorBoard logs, the final model/adapter and the resolved config go."""
    recipe: Literal["full", "lora", "qlora"] = "full"
    """Official recipe whose defaults apply: full fine-tuning or LoRA (docs/IXC25.md#official-recipe);
    qlora is LoRA over a base whose decoder linears are stored in 4-bit NF4 (bitsandbytes)."""

    # --- what trains
    use_lora: bool | None = None
    """Train PEFT LoRA adapters on the five base linears instead of the full weights (recipe default)."""
    fix_vit: bool | None = None
    """Freeze the CLIP vision tower (recipe default)."""
    fix_sampler: bool | None = None
    """Freeze vision_proj, the 'sampler' (recipe default)."""
    lora_r: int = 64
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Exact module names LoRA wraps (never the Plora/lora_* sub-layers)."""

    # --- optimisation
    learning_rate: float | None = None
    """Peak learning rate (recipe default: full 1e-5, LoRA 5e-5)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and separator vectors)."""
    warmup_ratio: float = 0.01
    """Fraction of the optimizer steps spent in linear warm-up before the cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    epochs: int = 1
    """Passes over the epoch plan."""
    max_steps: int | None = None
    """Train this many optimizer steps in all (default: the whole plan for --epochs); sets the schedule."""
    stop_after_steps: int | None = None
    """Checkpoint and exit after this many steps of this invocation (e.g. to fit a job's time slot);
    the schedule still spans the whole run, and --resume auto continues it."""
    global_batch_size: int | None = None
    """Packed rows per optimizer step over all ranks (default: 8 per rank, the official accumulation)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in the backward pass (non-reentrant)."""
    checkpoint_layers: int | None = None
    """With gradient checkpointing, recompute only the first N decoder layers (default: all). Fewer
    keep more activations and run faster; docs/PERFORMANCE.md#checkpoint-layers says how to pick N
    for a card."""
    compile: bool = False
    """torch.compile each decoder and ViT layer (regional, dynamic shapes; fuses norms, RoPE, SwiGLU,
    the LoRA/PLoRA element-wise work and the ViT's LayerNorm/quick_gelu). The first step pays the
    compile (1–2 minutes for the 7B on an H200); a new kind of row (one without images) compiles
    once more. Not with --zero-stage 3."""
    seed: int = 42
    """Seed for the epoch plan, initialisation of new weights and dropout."""

    # --- data
    max_length: int = 16384
    """Token budget of one packed row; must be >= the shards' max_length."""
    max_tiles: int | None = None
    """Tile budget of one packed row, bounding the ViT work per micro-step (default: only max_length
    bounds it, ~40 tiles per 16k row since a tile takes 400+ tokens)."""
    token_weighted: bool = False
    """Mix sources by tokens instead of samples (k still sets the proportions)."""
    source_samples: tuple[str, ...] = ()
    """Samples per epoch for named sources, overriding int(k*1000): NAME=COUNT (source name or data.txt path)."""
    num_workers: int = 2
    """Loader worker processes per rank."""

    # --- held-out evaluation
    eval_shards: str | None = None
    """Shard folder or s3://BUCKET/PREFIX of held-out samples (`xc-prep shard` with the same
    tokenizer), evaluated during training."""
    eval_fraction: float = 0.0
    """Hold out this fraction of each source's stored samples (at least one of each source with two
    or more; seeded by --seed, the same on every rank) for evaluation: they never train."""
    eval_every_steps: int | None = None
    """Evaluate every N optimizer steps and at the end (default: every --save-every-steps)."""
    early_stop_patience: int | None = None
    """Stop (with a checkpoint and the final save) after this many evaluations in a row without a
    lower eval loss (default: never)."""

    # --- engine
    deepspeed: Path | None = None
    """A DeepSpeed JSON config to use as is, instead of the built-in preset."""
    zero_stage: int | None = None
    """ZeRO stage of the built-in DeepSpeed preset (recipe default: 2 for full, 1 for LoRA). ZeRO-2
    reduces gradients in every micro-batch's backward, so ranks wait for each other after each one;
    ZeRO-1 reduces once per step (the adapters' gradients are small): ranks run their micro-batches
    without waiting. 3 partitions the weights too (full fine-tuning on 80 GB cards)."""
    attention: Literal["auto", "flash", "fa4", "varlen", "sdpa"] = "auto"
    """Attention kernel: FlashAttention-4 (sm90/sm100) or flash-attn if installed, torch varlen on
    CUDA, per-sample SDPA otherwise."""

    # --- checkpoints and telemetry
    save_every_steps: int = 500
    """Write a resumable checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep."""
    resume: str = "auto"
    """'auto' resumes from the latest complete checkpoint in output-dir, 'none' starts fresh, or a path."""
    log_every_steps: int = 1
    """Print and log scalars every N optimizer steps."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop naming the samples, or skip the step and count it."""
    save_final: bool = True
    """Save the final model (official layout) or adapter (PEFT folder) at the end."""
    report_to: tuple[str, ...] = ("tensorboard",)
    """Where scalars, the resolved config and the outputs' paths go: any of tensorboard, wandb,
    mlflow (space- or comma-separated), or none. W&B and MLflow read their usual environment
    (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...)."""

    def resolve(self) -> TrainConfig:
        """Fill recipe defaults and check the combination; raises ValueError saying the fix."""
        resolved = dataclasses.replace(self)
        for key, value in RECIPES[self.recipe].items():
            if getattr(resolved, key) is None:
                setattr(resolved, key, value)
        if resolved.shards is None:
            raise ValueError("--shards is required: the folder written by `xc-prep shard`")
        if problems := numeric_problems(resolved):
            raise ValueError("invalid settings:\n  " + "\n  ".join(problems))
        if resolved.compile and resolved.zero_stage == 3:
            raise ValueError(
                "--compile does not work with --zero-stage 3 (ZeRO-3 gathers each linear's weights in "
                "hooks inside the compiled layers); use --zero-stage 2, or drop --compile"
            )
        for item in resolved.source_samples:
            name, sep, count = item.rpartition("=")
            if not sep or not name or not count.isdigit():
                raise ValueError(f"--source-samples {item!r}: expected NAME=COUNT, e.g. vqa=500")
        if resolved.recipe == "qlora" and resolved.zero_stage == 3:
            raise ValueError(
                "--recipe qlora does not work with --zero-stage 3 (ZeRO-3 partitions every weight; "
                "bitsandbytes' 4-bit weights cannot be split); use --zero-stage 1 or 2"
            )
        resolved.report_to = _trackers(resolved.report_to)
        _check_evaluation(resolved)
        return resolved

    def source_sample_overrides(self) -> dict[str, int]:
        return {name: int(count) for name, _, count in (s.rpartition("=") for s in self.source_samples)}

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class NumberRule:
    """What one numeric setting must be: `low` (inclusive unless `open_low`) up to `high`
    (exclusive), finite; `text` says it to the user."""

    low: float
    high: float = math.inf
    open_low: bool = False
    text: str = ""

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):  # NaN fails every comparison; inf is never a setting
            return False
        return (value > self.low if self.open_low else value >= self.low) and value < self.high


AT_LEAST_1 = NumberRule(1, text="a whole number >= 1")
AT_LEAST_0 = NumberRule(0, text="a whole number >= 0")
POSITIVE = NumberRule(0, open_low=True, text="a finite number > 0")
NON_NEGATIVE = NumberRule(0, text="a finite number >= 0")
FRACTION = NumberRule(0, 1, text="a number in [0, 1)")
NUMBER_RULES: dict[str, NumberRule] = {
    "lora_r": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "learning_rate": POSITIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "warmup_ratio": FRACTION,
    "max_grad_norm": NumberRule(0, text="a finite number >= 0 (0 disables clipping)"),
    "epochs": AT_LEAST_1,
    "max_steps": AT_LEAST_1,
    "stop_after_steps": AT_LEAST_1,
    "global_batch_size": AT_LEAST_1,
    "checkpoint_layers": AT_LEAST_0,
    "seed": AT_LEAST_0,
    "max_length": NumberRule(2, text="a whole number >= 2 (a sample needs a token and its target)"),
    "max_tiles": AT_LEAST_1,
    "num_workers": AT_LEAST_0,
    "zero_stage": NumberRule(0, 4, text="0, 1, 2 or 3"),
    "save_every_steps": AT_LEAST_1,
    "keep_last": AT_LEAST_1,
    "log_every_steps": AT_LEAST_1,
    "eval_fraction": FRACTION,
    "eval_every_steps": AT_LEAST_1,
    "early_stop_patience": AT_LEAST_1,
}
"""One rule per numeric TrainConfig field (a test checks none is missing), applied at start-up:
`--save-every-steps 0` would divide by zero after the first step, minutes into a run."""


def numeric_problems(cfg: TrainConfig) -> list[str]:
    """Every numeric setting that breaks its rule, each with the flag, the value and the default."""
    defaults = TrainConfig()
    problems = []
    for name, rule in NUMBER_RULES.items():
        value = getattr(cfg, name)
        if value is None or rule.holds(value):
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        example = (
            f", e.g. {flag} {default}" if default is not None else " (or leave it unset for the default)"
        )
        problems.append(f"{flag} {value}: must be {rule.text}{example}")
    return problems


def _trackers(names: tuple[str, ...]) -> tuple[str, ...]:
    """--report-to's names, split at commas, checked, without repeats; `none` alone means none."""
    found = [n.strip().lower() for item in names for n in str(item).split(",") if n.strip()]
    unknown = [n for n in found if n not in (*TRACKERS, "none")]
    if unknown:
        raise ValueError(f"--report-to {', '.join(unknown)}: expected any of {', '.join(TRACKERS)}, or none")
    if "none" in found and len(set(found)) > 1:
        raise ValueError("--report-to none cannot be combined with a tracker")
    return tuple(dict.fromkeys(n for n in found if n != "none"))


def _check_evaluation(cfg: TrainConfig) -> None:
    """The held-out evaluation settings: one source of samples, and what needs one."""
    if cfg.eval_shards is not None and cfg.eval_fraction > 0:
        raise ValueError("--eval-shards and --eval-fraction both choose the held-out samples: give one")
    evaluates = cfg.eval_shards is not None or cfg.eval_fraction > 0
    for name, value in (
        ("eval_every_steps", cfg.eval_every_steps),
        ("early_stop_patience", cfg.early_stop_patience),
    ):
        flag = "--" + name.replace("_", "-")
        if value is not None and not evaluates:
            raise ValueError(f"{flag} needs held-out samples: add --eval-shards DIR or --eval-fraction F")


def batch_layout(global_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(global batch, gradient accumulation per rank), checked; one packed row per micro-step."""
    global_batch = global_batch_size or 8 * world_size
    if global_batch % world_size:
        lower = global_batch // world_size * world_size
        raise ValueError(
            f"--global-batch-size ({global_batch}) must be divisible by the world size ({world_size}); "
            f"use {lower or world_size} or {lower + world_size}"
        )
    return global_batch, global_batch // world_size


def deepspeed_config(cfg: TrainConfig, *, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for a resolved TrainConfig (or the user's --deepspeed file, checked)."""
    _, accumulation = batch_layout(cfg.global_batch_size, world_size)
    derived = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": accumulation * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    if cfg.deepspeed is not None:
        try:
            user = json.loads(Path(cfg.deepspeed).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed {cfg.deepspeed}: not a JSON file ({e})") from e
        for key, value in derived.items():
            if user.get(key, "auto") not in ("auto", value):
                raise ValueError(
                    f"{cfg.deepspeed}: {key} is {user[key]!r} but the config derives {value!r}; "
                    'remove it or set it to "auto" (it is computed from --global-batch-size)'
                )
        return {**user, **derived, "bf16": {"enabled": bf16}}
    stage = cfg.zero_stage
    assert stage is not None, "deepspeed_config takes a resolved TrainConfig"
    zero: dict[str, Any] = {"stage": stage}
    # ZeRO-1 without gradient hooks: gradients meet once, at the step's last micro-batch, in parameter order
    if stage == 1:
        zero.update(overlap_comm=False, contiguous_gradients=False, reduce_bucket_size=5e8)
    if stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5)
    return {
        **derived,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(step: int, *, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based), exactly transformers' cosine-with-warmup
    schedule that the official recipe uses: linear from 0 over ceil(ratio·total) steps, then cosine to 0."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- flags and config files


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per TrainConfig field but those of CONFIG_FILE_ONLY (which --help
    lists as config-file keys), and `--config`; defaults stay None so files can fill them."""
    add_dataclass_flags(parser, TrainConfig, exclude=CONFIG_FILE_ONLY, none_defaults=True, show_defaults=True)
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON file of TrainConfig fields.")
    keys = ", ".join(sorted(CONFIG_FILE_ONLY))
    parser.epilog = f"Settable in a --config file only: {keys} (defaults: the official recipe)."


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags. Unknown keys in a file are an error naming them."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
    return from_dict(values)


def load_config_file(path: Path) -> dict[str, Any]:
    """A --config file's fields; a file that cannot be read or parsed is a usage error (ValueError)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot be read ({e.strerror or e})") from e
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:  # not a ValueError: the CLI would print a traceback
            raise ValueError(f"{path}: not valid YAML ({e})") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def from_dict(values: dict[str, Any]) -> TrainConfig:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        guesses = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            guesses.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ValueError(f"unknown config keys: {', '.join(guesses)} (see `xc-train --help`)")
    hints = typing.get_type_hints(TrainConfig)
    converted: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        try:
            converted[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as e:
            problems.append(f"{key}: {value!r} {e}")
    if problems:
        raise ValueError("invalid config values:\n  " + "\n  ".join(problems))
    return TrainConfig(**converted)


def _coerce(value: Any, hint: Any) -> Any:
    """A config-file value as the field's type. YAML reads `1e-5` (no dot) as a string, so numbers
    given as strings are converted; anything that is not the type raises, saying the expectation."""
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"is not one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin is tuple:
        return (value,) if isinstance(value, str) else tuple(str(v) for v in value)
    if hint is Path:
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("is not a boolean (true or false)")
        return value
    if hint in (int, float):
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            number = hint(value)  # "1e-5" -> 1e-05; int("2.5") raises
            if number != float(value):
                raise ValueError
        except ValueError:
            raise ValueError(f"is not {'a whole number' if hint is int else 'a number'}") from None
        return number
    return value


__all__ = [
    "DEFAULT_MODEL",
    "LORA_TARGETS",
    "RECIPES",
    "TRACKERS",
    "CONFIG_FILE_ONLY",
    "TrainConfig",
    "add_config_flags",
    "batch_layout",
    "config_from_args",
    "deepspeed_config",
    "from_dict",
    "warmup_cosine",
]
