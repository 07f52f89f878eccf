"""`config.json` of an IXC2.5 model folder as a typed `ModelConfig`, its checks, and the presets.

Official field names and defaults (the released 7B's, docs/IXC25.md#config-json); our extra fields (Plora and
unused-adapter ranks, ViT sizes) are written back only when they differ from the official value
or were in the source file, so the released config.json round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from schemas.sample import MERGED_SIDE, TILE_SIZE

VIT_PATCH_SIDE = 2 * MERGED_SIDE
"""A 560-px tile gives 40×40 ViT patches; 2×2 of them merge into one LLM token."""
UNUSED_ADAPTERS = ("lora_sft", "lora_dpo", "lora_web")
"""Per-linear adapters of the released model's writing/web modes: loaded and saved, never run."""
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""config.json's torch_dtype names."""


@dataclass
class ModelConfig:
    """`config.json` of an IXC2.5 folder: official field names, our extras where the official file is silent.

    Defaults are the released 7B model's (docs/IXC25.md#config-json). Fields the official file has but this code does
    not read (auto_map, use_cache, ...) ride along in `extra` and are written back unchanged.
    """

    architectures: list[str] = field(default_factory=lambda: ["InternLMXComposer2ForCausalLM"])
    """Class names for transformers' Auto loaders (official value kept)."""
    model_type: str = "internlm2"
    """transformers model type; must be internlm2."""
    vocab_size: int = 92544
    """Rows of tok_embeddings and output."""
    hidden_size: int = 4096
    """Decoder width."""
    intermediate_size: int = 14336
    """SwiGLU inner width (w1/w3 out, w2 in)."""
    num_hidden_layers: int = 32
    """Decoder layers."""
    num_attention_heads: int = 32
    """Query heads; head_dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int = 8
    """Key/value heads (GQA groups of wqkv)."""
    max_position_embeddings: int = 24576
    """RoPE length beyond which dynamic NTK scaling starts."""
    max_length: int = 16384
    """Training context of the released recipe."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: {"type": "dynamic", "factor": 2.0})
    """RoPE scaling: {'type': 'dynamic', 'factor': f} or null."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    bias: bool = False
    """Linear biases in the decoder (always false for InternLM2)."""
    bos_token_id: int = 1
    """`<s>`."""
    eos_token_id: int = 2
    """`</s>`."""
    pad_token_id: int = 2
    """Padding id (= eos)."""
    tie_word_embeddings: bool = False
    """output and tok_embeddings are separate matrices."""
    torch_dtype: str = "bfloat16"
    """Dtype of the stored weights and the default load/save dtype."""
    initializer_range: float = 0.02
    """Std of the normal init of a fresh (random) model."""

    # --- ours: absent from the official file, official values by default (written only if changed)
    plora_r: int = 256
    """Rank of the Partial LoRA (Plora_A/B) on the five linears."""
    plora_dropout: float = 0.05
    """Dropout on the Plora input while training (the official value)."""
    lora_sft_r: int = 256
    """Rank of the unused lora_sft adapters."""
    lora_dpo_r: int = 256
    """Rank of the unused lora_dpo adapters."""
    lora_web_r: int = 512
    """Rank of the unused lora_web adapters."""
    vit_hidden_size: int = 1024
    """CLIP ViT width (the merged image token has 4× this)."""
    vit_intermediate_size: int = 4096
    """CLIP ViT MLP width."""
    vit_num_hidden_layers: int = 24
    """CLIP ViT layers (features are the last layer's output)."""
    vit_num_attention_heads: int = 16
    """CLIP ViT heads."""
    vit_patch_size: int = 14
    """ViT patch side in pixels: a 560-px tile must give 40×40 patches."""
    vit_layer_norm_eps: float = 1e-5
    """CLIP LayerNorm epsilon."""
    vit_hidden_act: str = "quick_gelu"
    """CLIP MLP activation."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown config.json fields, kept for writing back."""
    source_keys: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """Keys (in order) of the config.json this came from: written back in that order."""

    def __post_init__(self) -> None:
        problems = []
        if self.model_type != "internlm2":
            problems.append(f"model_type is {self.model_type!r}, expected 'internlm2' (an IXC2.5 checkpoint)")
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            problems.append(
                f"head dim ({self.hidden_size // self.num_attention_heads}) must be even for RoPE"
            )
        if TILE_SIZE % self.vit_patch_size or TILE_SIZE // self.vit_patch_size != VIT_PATCH_SIDE:
            problems.append(
                f"vit_patch_size ({self.vit_patch_size}) must cut a {TILE_SIZE}-px tile into "
                f"{VIT_PATCH_SIDE}×{VIT_PATCH_SIDE} patches (use 14)"
            )
        if self.vit_hidden_size % self.vit_num_attention_heads:
            problems.append(
                f"vit_hidden_size ({self.vit_hidden_size}) must be divisible by "
                f"vit_num_attention_heads ({self.vit_num_attention_heads})"
            )
        if self.rope_scaling is not None and self.rope_scaling.get("type") != "dynamic":
            problems.append(
                f"rope_scaling {self.rope_scaling} is not supported (only type 'dynamic', or null)"
            )
        if self.torch_dtype not in DTYPES:
            problems.append(f"torch_dtype {self.torch_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings is true, but IXC2.5 has an untied output head")
        if self.bias:
            problems.append("bias is true, but InternLM2 linears have no bias")
        if problems:
            raise ValueError("invalid IXC2.5 model config:\n  " + "\n  ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_per_kv(self) -> int:
        """Query heads per key/value group (4 in the 7B model)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def image_feature_size(self) -> int:
        """Width of a merged image token before vision_proj: 2×2 ViT patches concatenated."""
        return 4 * self.vit_hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def unused_adapter_ranks(self) -> dict[str, int]:
        return dict(zip(UNUSED_ADAPTERS, (self.lora_sft_r, self.lora_dpo_r, self.lora_web_r), strict=True))

    def to_dict(self) -> dict[str, Any]:
        """config.json content: the source file's keys in its order, official fields, our fields if changed.

        Our extra fields are written only when they differ from the official default or were in
        the source file, so the released config.json round-trips unchanged.
        """
        defaults = ModelConfig()
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source_keys"):
                continue
            value = getattr(self, f.name)
            if (
                f.name in _OUR_FIELDS
                and value == getattr(defaults, f.name)
                and f.name not in self.source_keys
            ):
                continue
            values[f.name] = value
        values.update(self.extra)
        ordered = {k: values.pop(k) for k in self.source_keys if k in values}
        return ordered | values

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "torch_dtype" not in values and isinstance(extra.get("dtype"), str):
            values["torch_dtype"] = extra["dtype"]  # transformers >= 5 writes `dtype`
        return cls(**values, extra=extra, source_keys=tuple(data))


_OUR_FIELDS = {
    "plora_r",
    "plora_dropout",
    "lora_sft_r",
    "lora_dpo_r",
    "lora_web_r",
    "vit_hidden_size",
    "vit_intermediate_size",
    "vit_num_hidden_layers",
    "vit_num_attention_heads",
    "vit_patch_size",
    "vit_layer_norm_eps",
    "vit_hidden_act",
    "initializer_range",
}

PRESETS = ("tiny", "7b")
TINY_VOCAB_SIZE = 512
"""The tiny tokenizer's default vocabulary (`xc-prep tiny-tokenizer`)."""


def preset_config(name: str, vocab_size: int | None = None) -> ModelConfig:
    """`7b`: the released sizes. `tiny`: the same architecture at toy size (tests, demo).

    `vocab_size` overrides the vocabulary (the tiny tokenizer's size for `tiny`).
    """
    if name == "7b":
        config = ModelConfig()
    elif name == "tiny":
        config = ModelConfig(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            plora_r=8,
            lora_sft_r=4,
            lora_dpo_r=4,
            lora_web_r=8,
            vit_hidden_size=32,
            vit_intermediate_size=64,
            vit_num_hidden_layers=2,
            vit_num_attention_heads=2,
        )
    else:
        raise ValueError(f"unknown model preset {name!r}: use one of {', '.join(PRESETS)} or a model folder")
    if vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    return config
