"""The QLoRA recipe's base: each decoder layer's five PLoRA linears stored in 4-bit NF4 (bitsandbytes).

`--recipe qlora` is the LoRA recipe (trainer/modelio.py `apply_recipe`) over a base whose large
frozen matrices W (attention wqkv/wo, feed-forward w1/w2/w3: 6.5 B of the 7B's parameters) are
quantized to NF4 with double-quantized block scales (bitsandbytes' `Params4bit`, blocks of 64).
Their `W x` runs bitsandbytes' 4-bit matmul, which dequantizes to the activations' dtype; the
Plora matrices beside them (the image-token updates, frozen) and the LoRA adapters stay in the
model dtype (bf16 on GPU), as do the ViT, vision_proj, the embeddings and the output head. The
base is read on the CPU and each matrix reaches the device already quantized, so the GPU never
holds the 16-bit decoder.

The LoRA layers wrap these linears as any PLoRA linear (`trainer.lora.PLoRALoraLinear`): with a
4-bit W they take PEFT's forward, the base layer's 4-bit product plus the low-rank updates. The
adapter saved is the LoRA recipe's, and loads on the 16-bit base like it.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.model import IXCModel, PLoRALinear

QUANT_TYPE = "nf4"
BLOCKSIZE = 64


def require_bitsandbytes() -> Any:
    """bitsandbytes, or a ValueError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError("--recipe qlora needs bitsandbytes: pip install 'xcomposer-finetune[qlora]'") from e
    return bitsandbytes


class PLoRALinear4bit(PLoRALinear):
    """A PLoRALinear whose W is a bitsandbytes `Params4bit` (NF4): `W x` by bitsandbytes' kernel."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        weight: Any = self.weight  # a bitsandbytes Params4bit: uint8 storage plus its quant_state
        return bnb.matmul_4bit(x, weight.t(), quant_state=weight.quant_state)


def quantize_base(model: IXCModel, device: torch.device) -> int:
    """Quantize every PLoRA linear's W to NF4 on `device` and move the rest of the model there;
    returns the number of matrices quantized. The model's dtype is the 4-bit kernel's compute dtype."""
    bnb = require_bitsandbytes()
    quantized = 0
    for module in list(model.plora_linears()):
        weight = module.weight.detach()
        module.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type=QUANT_TYPE,
            compress_statistics=True,
            blocksize=BLOCKSIZE,
        ).to(device)
        # The same module, the same Plora and hooks; only how it computes W x changes.
        module.__class__ = PLoRALinear4bit
        quantized += 1
    model.to(device)
    return quantized


def is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, PLoRALinear4bit)
