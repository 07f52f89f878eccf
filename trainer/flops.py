"""Model FLOPs of a training step, for MFU (telemetry and bench/train_throughput.py).

Per packed row with sample lengths s_i (T = Σ s_i), N = LLM matmul parameters (the decoder's
five linears per layer plus the output head; embeddings are a lookup, PLoRA/unused adapters
excluded), L layers, d = hidden size:
  forward   F = 2·N·T + 2·L·d·Σ s_i²            (causal attention: QKᵀ and AV, each ½·2·s²·d)
  full FT   3·F   (forward + gradients w.r.t. activations and weights)
  LoRA      2·F   (forward + gradients w.r.t. activations; weight gradients of frozen W skipped:
                   the issue's 4·N·tokens + attention)
Activation recomputation is not counted (model FLOPs, not hardware FLOPs). ViT FLOPs are
reported separately (`vit_flops`).
"""

from __future__ import annotations

import torch

from schemas.sample import TILE_SIZE
from trainer.model_config import ModelConfig

# Dense bf16 tensor-core peaks by the vendor's datasheets (no sparsity); used only when the
# bench has not measured the card. H100/H200 SXM: 989 TFLOP/s.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def llm_matmul_params(config: ModelConfig) -> int:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f
    return config.num_hidden_layers * per_layer + d * v


def forward_flops(config: ModelConfig, sample_lengths: list[int]) -> float:
    tokens = sum(sample_lengths)
    attention = 2 * config.num_hidden_layers * config.hidden_size * sum(s * s for s in sample_lengths)
    return 2 * llm_matmul_params(config) * tokens + attention


def step_flops(config: ModelConfig, packs: list[list[int]], lora: bool) -> float:
    """Model FLOPs of one rank's micro-batches (packs = sample lengths per packed row)."""
    factor = 2 if lora else 3
    return factor * sum(forward_flops(config, lengths) for lengths in packs)


def vit_flops(config: ModelConfig, num_views: int, trains: bool) -> float:
    """ViT forward (+ backward if it trains) FLOPs for `num_views` 560-px views (tiles + global views)."""
    tokens = (TILE_SIZE // config.vit_patch_size) ** 2 + 1
    d, f = config.vit_hidden_size, config.vit_intermediate_size
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
    forward = config.vit_num_hidden_layers * per_layer * num_views
    return forward * (3 if trains else 1)


def pack_cost_weights(config: ModelConfig, lora: bool, vit_trains: bool) -> tuple[float, float]:
    """(attention_cost, tile_cost) of `LoaderConfig`, which deals each step's packs to ranks by
    estimated compute: the step FLOPs of attention per unit of Σ s_i² (s_i = a sample's tokens)
    and of one 560-px view through the ViT, in units of one token's linear-layer FLOPs."""
    factor = 2 if lora else 3
    per_token = factor * 2 * llm_matmul_params(config)
    attention = factor * 2 * config.num_hidden_layers * config.hidden_size / per_token
    return attention, vit_flops(config, 1, vit_trains) / per_token


def peak_bf16_flops(device: torch.device) -> float | None:
    """The card's datasheet bf16 dense peak, or None (CPU, unknown card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None
