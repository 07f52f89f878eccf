"""What an output folder carries beside the weights, so that loaders other than ours can use it.

A full-model folder (`final/` of full fine-tuning, `xc-merge`, a saved preset) gets, besides
`config.json` and the weights (`trainer/weights.py`):
  - the base folder's companion files, byte for byte: remote code (`*.py`, which `auto_map` in
    config.json points to; the official `trust_remote_code` loading and lmdeploy import it),
    tokenizer files, chat template, `generation_config.json`, fonts (`COMPANION_SUFFIXES`);
  - a `generation_config.json` when the base had none: bos/eos/pad of config.json, and the end of
    turn as a second eos, so that transformers' `generate` stops where `chat()` does;
  - a `README.md` naming what official loading still lacks (a preset base has no remote code),
    only when something is missing.
An adapter folder (LoRA) gets an `adapter_config.json` that PEFT 0.8.2, the official environment's
version, accepts (`PEFT_082_LORA_FIELDS`), and the base's `generation_config.json`.
Safetensors files are made readable as the umask allows (safetensors writes them 0600).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from schemas.manifest import TOKENIZER_NAME
from schemas.tokens import END_OF_TURN
from trainer.model_config import ModelConfig

GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"
README = "README.md"
TOKENIZER_CONFIG = "tokenizer_config.json"
COMPANION_SUFFIXES = (".py", ".json", ".model", ".ttf", ".jinja", ".txt", ".tiktoken")
"""Files of a base folder copied into every full-model output (weights and `NOT_COMPANIONS` aside)."""
NOT_COMPANIONS = frozenset(
    {
        "config.json",  # written from the model (byte-identical when unchanged: weights.save_model)
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        ADAPTER_CONFIG,
        "train_config.json",
        "train_summary.json",
        "trainer_state.json",
    }
)
RELEASED_REPO = "internlm/internlm-xcomposer2d5-7b"
README_TITLE = "# Loading this model folder"
"""First line of the README.md written here (a stale one is removed once nothing is missing)."""
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vit_hidden_size",
    "vit_num_hidden_layers",
)
"""config.json sizes the official remote code cannot change (it builds the released shapes)."""

PEFT_082_LORA_FIELDS = frozenset(
    {
        # PeftConfigMixin, PeftConfig
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        # LoraConfig
        "r",
        "target_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "loftq_config",
    }
)
"""The fields PEFT 0.8.2's `LoraConfig(**json)` accepts (it raises TypeError on any other)."""


# --------------------------------------------------------------------------- full-model folders


def readable_by_group(path: Path) -> None:
    """chmod to 0666 minus the process umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def companion_files(source: Path) -> list[Path]:
    """The files of `source` that loading needs besides config.json and the weights."""
    return sorted(
        p
        for p in source.iterdir()
        if p.is_file() and p.suffix in COMPANION_SUFFIXES and p.name not in NOT_COMPANIONS
    )


def copy_companions(source: Path, folder: Path) -> None:
    """Copy the companion files of `source` into `folder`, byte for byte (new files, umask modes)."""
    if source.resolve() == folder.resolve():
        return
    for path in companion_files(source):
        shutil.copyfile(path, folder / path.name)


def generation_config(config: ModelConfig, tokenizer_path: Path | None) -> dict[str, Any]:
    """transformers' generation defaults for a folder without one: stop at `</s>` and at the end of
    a turn (`[UNUSED_TOKEN_145]`, looked up in the folder's tokenizer), greedy (transformers' default)."""
    stop = [config.eos_token_id]
    end_of_turn = _piece_id(tokenizer_path, END_OF_TURN) if tokenizer_path is not None else None
    if end_of_turn is not None and end_of_turn < config.vocab_size and end_of_turn not in stop:
        stop.append(end_of_turn)
    return {"bos_token_id": config.bos_token_id, "eos_token_id": stop, "pad_token_id": config.pad_token_id}


def _piece_id(tokenizer_path: Path, piece: str) -> int | None:
    if not tokenizer_path.is_file():
        return None
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except (RuntimeError, OSError):  # not a sentencepiece model: its end of turn is unknown
        return None
    piece_id = int(sp.piece_to_id(piece))
    return None if piece_id == sp.unk_id() else piece_id


def missing_for_official_loading(folder: Path, config: dict[str, Any]) -> list[str]:
    """The files and config entries official `trust_remote_code` loading and lmdeploy need that
    `folder` lacks."""
    missing = []
    auto_map = config.get("auto_map")
    if not auto_map:
        missing.append(
            "config.json has no `auto_map` (the remote-code classes transformers and lmdeploy load)"
        )
    else:
        refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if r]
        modules = sorted({r.rsplit(".", 1)[0] for r in refs if "--" not in r})
        absent = [f"{m}.py" for m in modules if not (folder / f"{m}.py").is_file()]
        if absent:
            missing.append(f"the remote-code files `auto_map` names: {', '.join(absent)}")
    for name in (TOKENIZER_NAME, TOKENIZER_CONFIG):
        if not (folder / name).is_file():
            missing.append(f"{name} (the tokenizer official loading reads)")
    return missing


def unreleased_sizes(config: dict[str, Any]) -> list[str]:
    """`field value` for each size that differs from the released model's (empty for the 7B)."""
    released = ModelConfig()
    return [f"{f} {config[f]}" for f in SIZE_FIELDS if f in config and config[f] != getattr(released, f)]


def write_loading_notes(folder: Path, config: dict[str, Any]) -> None:
    """README.md saying what official loading lacks; none (and no stale one of ours) when complete."""
    readme = folder / README
    missing, sizes = missing_for_official_loading(folder, config), unreleased_sizes(config)
    if not missing and not sizes:
        if readme.is_file() and readme.read_text(errors="replace").startswith(README_TITLE):
            readme.unlink()
        return
    lines = [
        README_TITLE,
        "",
        "Written by xcomposer-finetune. This folder loads with this toolkit: `xc-chat --model DIR`,",
        "`xc-train eval/generate --model DIR`, and transformers after `import trainer.hf`",
        "(`AutoModelForCausalLM.from_pretrained(DIR)`, no remote code).",
        "",
    ]
    if sizes:
        lines += [
            f"Its sizes are not the released model's ({', '.join(sizes)}): the official remote code",
            "builds the released shapes, so official loading and lmdeploy cannot use this folder.",
            "",
        ]
    if missing:
        lines += [
            "The official loading (`AutoModel.from_pretrained(DIR, trust_remote_code=True)` and its",
            "`chat()`) and lmdeploy also need what this folder lacks:",
            "",
            *(f"- {m}" for m in missing),
            "",
            "Its base folder had none of it (a preset, or a folder without remote code). Copy them from",
            f"{RELEASED_REPO}:",
            "",
            "```bash",
            f"huggingface-cli download {RELEASED_REPO} --include '*.py' 'tokenizer*' \\",
            "    special_tokens_map.json generation_config.json --local-dir DIR",
            "```",
            "",
            "and copy the `auto_map` entry of its config.json into this folder's config.json.",
            "",
        ]
    readme.write_text("\n".join(lines))


def finish_model_folder(folder: Path, config: ModelConfig, source: Path | None) -> None:
    """Companions from `source`, generation_config.json, loading notes: after config.json and weights."""
    if source is not None:
        copy_companions(source, folder)
    if not (folder / GENERATION_CONFIG).is_file():
        values = generation_config(config, folder / TOKENIZER_NAME)
        (folder / GENERATION_CONFIG).write_text(json.dumps(values, indent=2) + "\n")
    write_loading_notes(folder, json.loads((folder / "config.json").read_text()))


# --------------------------------------------------------------------------- adapter folders


def portable_adapter_config(folder: Path) -> None:
    """Rewrite adapter_config.json with only the fields PEFT 0.8.2 accepts.

    A field left out must hold the value PEFT gives it by default, so that every PEFT version
    reads the same adapter; otherwise the adapter is not portable and this raises ValueError.
    (`peft_version` only records the writer.)
    """
    from peft import LoraConfig

    path = folder / ADAPTER_CONFIG
    written = json.loads(path.read_text())
    defaults = LoraConfig().to_dict()
    changed = [
        f"{k}={v!r}"
        for k, v in written.items()
        if k not in PEFT_082_LORA_FIELDS | {"peft_version"} and k in defaults and v != _jsonable(defaults[k])
    ]
    if changed:
        raise ValueError(
            f"{path}: {', '.join(changed)} cannot be written for PEFT 0.8 (the official environment), "
            "which has no such setting; leave it at PEFT's default"
        )
    kept = {k: v for k, v in written.items() if k in PEFT_082_LORA_FIELDS}
    path.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> Any:
    """A default as it reads back from adapter_config.json (sets become lists, objects dicts)."""
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else vars(o)))


def finish_adapter_folder(folder: Path, base_dir: Path | None, config: ModelConfig) -> None:
    """adapter_config.json for PEFT 0.8.2, readable weights, the base's generation_config.json."""
    portable_adapter_config(folder)
    for path in folder.glob("*.safetensors"):
        readable_by_group(path)
    source = base_dir / GENERATION_CONFIG if base_dir is not None else None
    if source is not None and source.is_file():
        shutil.copyfile(source, folder / GENERATION_CONFIG)
    elif not (folder / GENERATION_CONFIG).is_file():
        tokenizer = base_dir / TOKENIZER_NAME if base_dir is not None else folder / TOKENIZER_NAME
        values = generation_config(config, tokenizer)
        (folder / GENERATION_CONFIG).write_text(json.dumps(values, indent=2) + "\n")
