"""Register the native model with transformers' Auto classes (model_type `internlm2`), no remote code.

After `import trainer.hf`, `AutoModelForCausalLM.from_pretrained(folder)` loads an official-layout
IXC2.5 folder with this package's model, and PEFT's
`AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` loads an adapter written by `xc-train`
on top of its recorded base — the same call the official scripts use, without
`trust_remote_code` or the network. Loading goes through `trainer.weights.load_model`, so the
unused lora_sft/dpo/web weights are kept and every key is checked.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from trainer.model import IXCModel
from trainer.modelio import resolve_model_dir
from trainer.weights import load_model

MODEL_TYPE = "internlm2"


class IXCConfig(PretrainedConfig):
    """transformers-side view of an IXC2.5 config.json (the model itself reads `ModelConfig`)."""

    model_type = MODEL_TYPE


class IXCForCausalLM(IXCModel):
    """The class the Auto loaders resolve `internlm2` to; `from_pretrained` returns an `IXCModel`."""

    config_class = IXCConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> IXCModel:
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        device = kwargs.get("device_map") or "cpu"
        if not isinstance(device, str | torch.device):  # a per-module device map: load on the CPU
            device = "cpu"
        folder = resolve_model_dir(str(pretrained_model_name_or_path))
        return load_model(folder, dtype=dtype, device=device if device != "auto" else "cpu")


def register() -> None:
    """Idempotent: map model_type internlm2 to this package's config and model classes."""
    try:
        AutoConfig.register(MODEL_TYPE, IXCConfig)
    except ValueError:  # already registered (by an earlier import)
        pass
    try:
        AutoModelForCausalLM.register(IXCConfig, IXCForCausalLM)
    except ValueError:
        pass


register()
