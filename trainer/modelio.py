"""Which model a run trains and what it hands back: presets, folders, hub ids, recipes, PEFT, final save.

`--model` takes a preset (`tiny`, `7b`), a local folder in the official layout, or a hub id
(default `internlm/internlm-xcomposer2d5-7b`) resolved through the local Hugging Face cache and
downloaded with huggingface_hub when the network allows. A `tiny` base is written once to
`<output-dir>/base` (official layout, with the shards' tokenizer) so that adapters, `xc-merge`,
eval and generate can load it again by path.

Recipes (docs/IXC25.md#official-recipe): full fine-tuning trains every registered parameter except what fix_vit /
fix_sampler freeze (the unused lora_sft/dpo/web weights are not parameters: they never get
optimizer state). LoRA freezes the base and wraps the five linears by exact name with PEFT; the two
separator vectors stay frozen (the official recipe trains them and then drops them from the
adapter), and an unfrozen ViT or vision_proj is saved in the adapter through `modules_to_save`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from schemas.manifest import TOKENIZER_NAME
from trainer.config import TrainConfig
from trainer.model import IXCModel, PLoRALinear, build_model
from trainer.model_config import PRESETS
from trainer.output_files import finish_adapter_folder
from trainer.weights import CONFIG_FILE, load_model, save_model

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR_NAME = "base"


@dataclass
class Loaded:
    model: IXCModel
    """The module to train (LoRA layers injected in place when use_lora)."""
    base_dir: Path | None
    """Folder of the base weights (tokenizer check, adapter base path); None for the random 7b preset."""
    base_ref: str
    """What adapters record as base_model_name_or_path."""
    description: str
    peft_model: Any | None = None
    zero_stage: int = 2

    def save_final(self, engine: Any, final_dir: Path, d: Any) -> None:
        """Collective: the adapter (PEFT folder) or the full model (official layout) into final_dir."""
        params = [p for p in self.model.parameters() if self.peft_model is None or p.requires_grad]
        with _gathered(params, self.zero_stage):
            if d.is_main:
                final_dir.mkdir(parents=True, exist_ok=True)
                if self.peft_model is not None:
                    # Adapter only: the base embeddings never change under these recipes.
                    self.peft_model.save_pretrained(str(final_dir), save_embedding_layers=False)
                    finish_adapter_folder(final_dir, self.base_dir, self.model.config)
                else:
                    save_model(self.model, final_dir, copy_from=self.base_dir, overwrite=True)
                if self.base_dir is not None and not (final_dir / TOKENIZER_NAME).is_file():
                    src = self.base_dir / TOKENIZER_NAME
                    if src.is_file():
                        (final_dir / TOKENIZER_NAME).write_bytes(src.read_bytes())
        if dist.is_initialized():
            dist.barrier()


class _gathered:
    """ZeRO-3 partitions parameters: gather them for saving; a no-op for stages 0–2."""

    def __init__(self, params: list[torch.nn.Parameter], stage: int):
        self.ctx = None
        if stage == 3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def resolve_model_dir(model: str, offline: bool = False) -> Path:
    """A local folder, or a hub id found in the HF cache / downloaded (not when `offline`); clear
    message when it cannot be had."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; expected an IXC2.5 model folder")
        return path
    if path.exists() or model.count("/") != 1:
        raise FileNotFoundError(
            f"--model {model}: not a folder, a preset ({', '.join(PRESETS)}) or a hub id like "
            "internlm/internlm-xcomposer2d5-7b"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.py"]  # *.py: remote code, for outputs
    try:
        return Path(snapshot_download(model, local_files_only=True, allow_patterns=patterns))
    except Exception as e:  # not cached: try the network once
        if offline:
            raise FileNotFoundError(f"--model {model}: not in the local Hugging Face cache") from e
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"--model {model}: not in the local Hugging Face cache and it could not be downloaded ({e}). "
            f"Offline, download it elsewhere (`huggingface-cli download {model} --local-dir DIR`) and "
            "pass --model DIR"
        ) from e


def tokenizer_vocab_size(path: Path) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=str(path)).get_piece_size())


def _base_model(cfg: TrainConfig, manifest_dir: Path, output_dir: Path, dtype: torch.dtype, d: Any) -> Loaded:
    attention = cfg.attention
    if cfg.model == "tiny":
        base = output_dir / BASE_DIR_NAME
        if d.is_main and not (base / CONFIG_FILE).is_file():
            vocab = tokenizer_vocab_size(manifest_dir / TOKENIZER_NAME)
            model = build_model("tiny", seed=cfg.seed, vocab_size=vocab)
            base.mkdir(parents=True, exist_ok=True)  # the tokenizer first: generation_config.json reads it
            (base / TOKENIZER_NAME).write_bytes((manifest_dir / TOKENIZER_NAME).read_bytes())
            save_model(model, base, dtype=torch.float32, overwrite=True)
        if dist.is_initialized():
            dist.barrier()
        model = load_model(base, dtype=dtype, device=d.device, attention=attention)
        return Loaded(model, base, str(base.resolve()), f"tiny preset, saved to {base}")
    if cfg.model == "7b":
        vocab = tokenizer_vocab_size(manifest_dir / TOKENIZER_NAME)
        model = build_model(
            "7b", seed=cfg.seed, dtype=dtype, device=d.device, vocab_size=vocab, attention=attention
        )
        return Loaded(model, None, "7b", "7b preset, random init")
    folder = resolve_model_dir(cfg.model)
    model = load_model(folder, dtype=dtype, device=d.device, attention=attention)
    return Loaded(model, folder, cfg.model, f"loaded from {folder}")


def apply_recipe(loaded: Loaded, cfg: TrainConfig, *, fused_lora: bool = True) -> Loaded:
    """Freeze per fix_vit/fix_sampler; wrap with PEFT LoRA when use_lora.

    LoRA wraps each PLoRA linear in `trainer.lora.PLoRALoraLinear` (both low-rank updates in one
    matmul); `fused_lora=False` keeps PEFT's own `lora.Linear`, the official recipe's layer: the
    reference the fused one is tested and benchmarked against.
    """
    model = loaded.model
    vision_post_ln = model.vit.vision_tower.vision_model.post_layernorm
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        from trainer.lora import PLoRALoraLinear

        model.requires_grad_(False)
        modules_to_save = [
            name for name, fixed in (("vit", cfg.fix_vit), ("vision_proj", cfg.fix_sampler)) if not fixed
        ]
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            modules_to_save=modules_to_save or None,
            task_type="CAUSAL_LM",
        )
        if fused_lora:
            lora._register_custom_module({PLoRALinear: PLoRALoraLinear})
        peft_model = get_peft_model(model, lora)
        peft_model.peft_config["default"].base_model_name_or_path = loaded.base_ref
        loaded.peft_model = peft_model
    else:
        model.requires_grad_(True)
        model.vit.requires_grad_(not cfg.fix_vit)
        model.vision_proj.requires_grad_(not cfg.fix_sampler)
    # Features are taken before post_layernorm (docs/IXC25.md#vision): it never gets a gradient.
    vision_post_ln.requires_grad_(False)
    loaded.zero_stage = cfg.zero_stage or 0
    return loaded


def load_for_training(
    cfg: TrainConfig, *, manifest_dir: Path, output_dir: Path, dtype: torch.dtype, d: Any
) -> Loaded:
    torch.manual_seed(cfg.seed)  # LoRA init is random: identical on every rank
    if cfg.recipe == "qlora":  # read on the CPU; each decoder matrix reaches the device in 4 bits
        from trainer.qlora import quantize_base

        cpu = dataclasses.replace(d, device=torch.device("cpu"))
        loaded = _base_model(cfg, manifest_dir, output_dir, dtype, cpu)
        quantize_base(loaded.model, d.device)
        loaded.description += ", decoder linears in 4-bit NF4"
        return apply_recipe(loaded, cfg)
    return apply_recipe(_base_model(cfg, manifest_dir, output_dir, dtype, d), cfg)


def load_for_inference(
    path: str | Path, *, dtype: torch.dtype, device: torch.device, base: IXCModel | None = None
) -> IXCModel:
    """A model folder, or a PEFT adapter folder on top of `base` (default: its recorded base),
    LoRA kept unmerged."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftConfig, PeftModel

        if base is None:
            base_ref = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
            if base_ref == "7b":
                raise ValueError(f"{path}: an adapter of the random 7b preset has no saved base to load")
            base = load_model(resolve_model_dir(base_ref), dtype=dtype, device=device)
        wrapped = PeftModel.from_pretrained(base, str(path))
        model = cast(IXCModel, wrapped.base_model.model)
        model.source_dir = Path(os.fspath(base.source_dir)) if base.source_dir else None
        return model.eval()
    if base is not None:
        raise ValueError(f"{path}: no {ADAPTER_CONFIG}; a base model is only for an adapter folder")
    return load_model(resolve_model_dir(str(path)), dtype=dtype, device=device)
