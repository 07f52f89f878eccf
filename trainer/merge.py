"""`xc-train merge` (also `xc-merge`): fold a LoRA adapter into its base and write a full checkpoint
in the official layout.

W += (alpha / r) · B · A on the five target linears (PEFT's merge); every other tensor — the
Plora and unused lora_sft/dpo/web weights, norms, ViT, vision_proj, separators — is written with
the bytes it was loaded with. The result loads with `--model` like the released checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.modelio import ADAPTER_CONFIG, resolve_model_dir
from trainer.weights import load_config, load_model, save_model


@torch.no_grad()
def merge(adapter: Path, base: str | None, out: Path, *, overwrite: bool = False) -> Path:
    """Merge the adapter folder into `base` (default: the base the adapter records) and save to `out`."""
    from peft import PeftConfig, PeftModel

    if not (adapter / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{adapter}: no {ADAPTER_CONFIG}; expected a LoRA adapter folder from xc-train"
        )
    base_ref = base or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    base_dir = resolve_model_dir(base_ref)
    dtype = load_config(base_dir).dtype
    model = load_model(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    save_model(merged, out, dtype=dtype, copy_from=base_dir, overwrite=overwrite)
    return out
