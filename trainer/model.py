"""Native InternLM-XComposer 2.5: InternLM2 decoder + Partial LoRA + CLIP ViT-L/14-560 + vision_proj.

Same architecture and parameter names as the released `internlm/internlm-xcomposer2d5-7b`
(SPEC §5), so its checkpoint loads and saves unchanged (`trainer/weights.py`), but written for
fine-tuning: packed rows with per-sample attention, chunked loss, per-layer checkpointing, no
network in the constructor, current transformers.

Module tree (= state-dict key prefixes):
  model.tok_embeddings, model.layers.{i}.{attention_norm, attention.{wqkv, wo}, ffn_norm,
  feed_forward.{w1, w2, w3}}, model.norm, output, vit.vision_tower.vision_model.*, vision_proj.{0, 2},
  plora_glb_GN, plora_sub_GN.
Each of the five linears is a `PLoRALinear` (an nn.Linear with `Plora_A/B` children, so PEFT can
wrap it by the names `attention.wqkv`, ...). Its `lora_sft/dpo/web` weights are unused by every
forward: they live outside the module's parameters, on the CPU, and appear only in `state_dict()`.

The packed micro-batch (docs/ARCHITECTURE.md), B = 1 row of T tokens holding S samples, I images
with N local tiles in all:
  input_ids int64[1, T], position_ids int64[1, T], cu_seqlens int32[S+1], max_seqlen int,
  tiles uint8[N, 560, 560, 3], image_grids int64[I, 2] (rows, cols), image_starts int64[I],
  targets int64[1, T] (already shifted, IGNORE_INDEX = not trained).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from schemas.sample import IGNORE_INDEX, MERGED_SIDE, TILE_SIZE, image_token_count
from trainer import images
from trainer.attention import (
    QueryRuns,
    attend_runs,
    cached_attention,
    query_runs,
    resolve_backend,
    varlen_attention,
)
from trainer.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy, token_losses

END_OF_TURN_ID = 92542
"""`[UNUSED_TOKEN_145]` in the InternLM2 tokenizer: ends every turn, the stop token at inference."""
VIT_PATCH_SIDE = 2 * MERGED_SIDE
"""A 560-px tile gives 40×40 ViT patches; 2×2 of them merge into one LLM token."""
UNUSED_ADAPTERS = ("lora_sft", "lora_dpo", "lora_web")
"""Per-linear adapters of the released model's writing/web modes: loaded and saved, never run."""
PLORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    """`config.json` of an IXC2.5 folder: official field names, our extras where the official file is silent.

    Defaults are the released 7B model's (SPEC §5). Fields the official file has but this code does
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
        if self.torch_dtype not in _DTYPES:
            problems.append(f"torch_dtype {self.torch_dtype!r} is not one of {', '.join(_DTYPES)}")
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
        return _DTYPES[self.torch_dtype]

    def unused_adapter_ranks(self) -> dict[str, int]:
        return dict(zip(UNUSED_ADAPTERS, (self.lora_sft_r, self.lora_dpo_r, self.lora_web_r), strict=True))

    def vision_config(self) -> CLIPVisionConfig:
        config = CLIPVisionConfig(
            hidden_size=self.vit_hidden_size,
            intermediate_size=self.vit_intermediate_size,
            num_hidden_layers=self.vit_num_hidden_layers,
            num_attention_heads=self.vit_num_attention_heads,
            image_size=TILE_SIZE,
            patch_size=self.vit_patch_size,
            hidden_act=self.vit_hidden_act,
            layer_norm_eps=self.vit_layer_norm_eps,
        )
        config._attn_implementation = "sdpa"
        return config

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


# --------------------------------------------------------------------------- decoder pieces


class RMSNorm(nn.Module):
    """InternLM2 RMSNorm: statistics in fp32, the weight applied in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, config: ModelConfig, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for rotate-half RoPE, with InternLM2's dynamic NTK scaling.

    position_ids int64[T]; seq_lens int64[T] = length of the sequence each token belongs to, or
    None when no sequence exceeds max_position_embeddings. As in HF's
    InternLM2DynamicNTKScalingRotaryEmbedding, a sequence of length L > max_position_embeddings
    uses the base theta·((f·L/max_pos) − (f − 1))^(d/(d−2)); shorter ones use theta itself.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, device=position_ids.device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # [dim/2]
    per_token = inv_freq.expand(position_ids.shape[0], -1)
    max_pos = config.max_position_embeddings
    if config.rope_scaling is not None and seq_lens is not None and bool((seq_lens > max_pos).any()):
        factor = float(config.rope_scaling["factor"])
        per_token = per_token.clone()
        # Only sequences beyond max_pos get another base: one per distinct length.
        for length in torch.unique(seq_lens[seq_lens > max_pos]).tolist():
            base = config.rope_theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            per_token[seq_lens == length] = 1.0 / (base**exponents)
    freqs = position_ids.float()[:, None] * per_token
    emb = torch.cat((freqs, freqs), dim=-1)
    # HF casts the fp32 tables to the activation dtype before rotating: same rounding here.
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, head_dim] with cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class PLoRALinear(nn.Linear):
    """`W x` for every token plus `Plora_B(Plora_A(dropout(x)))` on image tokens only (scale 1.0).

    An nn.Linear subclass, so PEFT's LoRA wraps it like any linear and forwards `image_tokens`
    through to it. `image_tokens` says which rows of x (flattened to [T, in]) are image tokens:
      None            no PLoRA at all (text-only decoding)
      float[T, 1]     a 0/1 mask in x's dtype: PLoRA runs on every row and is masked — no
                      gather/scatter, a fixed shape for torch.compile; used when the row has
                      image tokens (the PLoRA matmuls are ≈ 9 % of the linear's, so the text rows'
                      share costs little; CUDA's index_add_ scatter cost 12 % of a 16k step)
      int64[K]        an index: PLoRA on those rows only; an empty index (a row without images)
                      keeps Plora in the graph with zero gradients (every rank must touch every
                      trainable parameter) at no cost
    The two forms give the same values and gradients (tests/test_model.py).

    The released model also carries lora_sft/dpo/web A/B weights here. No forward uses them, so
    they are plain CPU tensors in `unused_adapters`: not parameters (no optimizer state, no
    gradients, never moved by `.to()`/DeepSpeed, kept in their loaded dtype), but present in
    `state_dict()` under their official names and accepted by `load_state_dict()`.
    """

    def __init__(
        self, in_features: int, out_features: int, plora_r: int, dropout: float, unused_ranks: dict[str, int]
    ):
        super().__init__(in_features, out_features, bias=False)
        self.Plora_A = nn.Linear(in_features, plora_r, bias=False)
        self.Plora_B = nn.Linear(plora_r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        storage = "meta" if self.weight.is_meta else "cpu"
        self.unused_adapters: dict[str, torch.Tensor] = {}
        for name, r in unused_ranks.items():
            self.unused_adapters[f"{name}_A.weight"] = torch.zeros(r, in_features, device=storage)
            self.unused_adapters[f"{name}_B.weight"] = torch.zeros(out_features, r, device=storage)
        self.unused_in_state_dict = True
        self.register_state_dict_post_hook(_add_unused_adapters)
        self.register_load_state_dict_pre_hook(_take_unused_adapters)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if image_tokens is None:
            return out
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        # In place below is safe: a linear's backward does not need its own output.
        if image_tokens.is_floating_point():
            delta = self.Plora_B(self.Plora_A(self.lora_dropout(flat_x)))
            flat_out.addcmul_(delta.to(out.dtype), image_tokens)
        elif flat_out.is_cuda:
            # Each device's fast kernels: CPU's index_select/index_add_ (and index_select's
            # backward) are per-row loops; CUDA's index_put_(accumulate) sorts the index.
            delta = self.Plora_B(self.Plora_A(self.lora_dropout(flat_x.index_select(0, image_tokens))))
            flat_out.index_add_(0, image_tokens, delta.to(out.dtype))
        else:
            delta = self.Plora_B(self.Plora_A(self.lora_dropout(flat_x[image_tokens])))
            flat_out.index_put_((image_tokens,), delta.to(out.dtype), accumulate=True)
        return out

    def extra_repr(self) -> str:
        ranks = {
            k.removesuffix("_A.weight"): v.shape[0]
            for k, v in self.unused_adapters.items()
            if k.endswith("_A.weight")
        }
        return f"{super().extra_repr()}, plora_r={self.Plora_A.out_features}, unused={ranks}"


def _add_unused_adapters(
    module: PLoRALinear, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    if module.unused_in_state_dict:
        for name, tensor in module.unused_adapters.items():
            state_dict[prefix + name] = tensor


def _take_unused_adapters(
    module: PLoRALinear,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    for name, current in module.unused_adapters.items():
        key = prefix + name
        if key not in state_dict:
            if module.unused_in_state_dict:
                missing_keys.append(key)
            continue
        tensor = state_dict.pop(key)
        if tuple(tensor.shape) != tuple(current.shape):
            error_msgs.append(
                f"size mismatch for {key}: expected {list(current.shape)}, got {list(tensor.shape)}"
            )
            continue
        # Kept as loaded (dtype and bits) on the CPU: written back byte-identical.
        module.unused_adapters[name] = tensor.detach().to("cpu")


class Attention(nn.Module):
    """GQA self-attention with InternLM2's packed `wqkv`.

    wqkv's output rows are viewed as (kv_heads, q_per_kv + 2, head_dim): per KV group, slots
    0..q_per_kv-1 are its query heads, then the key, then the value. Query head n = g·q_per_kv + j
    therefore belongs to group g = n // q_per_kv, the order every GQA kernel expects.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        unused = c.unused_adapter_ranks()
        self.wqkv = PLoRALinear(c.hidden_size, qkv_out, c.plora_r, c.plora_dropout, unused)
        self.wo = PLoRALinear(
            c.num_attention_heads * c.head_dim, c.hidden_size, c.plora_r, c.plora_dropout, unused
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        image_tokens: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        backend: str,
        cache: KVCache | None = None,
        queries: QueryRuns | None = None,
    ) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]; with `queries`, the output at queries.index only ([Q, hidden]):
        keys and values from every position, queries from those."""
        c = self.config
        t = x.shape[0]
        qkv = self.wqkv(x, image_tokens).view(t, c.num_key_value_heads, c.q_per_kv + 2, c.head_dim)
        k, v = qkv[:, :, -2], qkv[:, :, -1]
        cos, sin = rope
        k = apply_rotary(k, cos, sin)
        if queries is not None:
            qkv, cos, sin = (a.index_select(0, queries.index) for a in (qkv, cos, sin))
            t, image_tokens = qkv.shape[0], rows_of(image_tokens, queries.index)
        q = apply_rotary(qkv[:, :, : c.q_per_kv].reshape(t, c.num_attention_heads, c.head_dim), cos, sin)
        if queries is not None:
            out = attend_runs(q, k, v, queries, backend)  # type: ignore[arg-type]
        elif cache is None:
            out = varlen_attention(q, k, v.contiguous(), cu_seqlens, max_seqlen, backend)  # type: ignore[arg-type]
        else:
            k, v = cache.append(k, v)
            out = cached_attention(q, k, v)
        return self.wo(out.reshape(t, -1), image_tokens)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), each linear a PLoRALinear."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        unused = c.unused_adapter_ranks()
        self.w1 = PLoRALinear(c.hidden_size, c.intermediate_size, c.plora_r, c.plora_dropout, unused)
        self.w3 = PLoRALinear(c.hidden_size, c.intermediate_size, c.plora_r, c.plora_dropout, unused)
        self.w2 = PLoRALinear(c.intermediate_size, c.hidden_size, c.plora_r, c.plora_dropout, unused)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, image_tokens)) * self.w3(x, image_tokens), image_tokens)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        image_tokens: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        backend: str,
        cache: KVCache | None = None,
        queries: QueryRuns | None = None,
    ) -> torch.Tensor:
        """[T, hidden] -> [T, hidden], or [Q, hidden] at queries.index (Attention.forward)."""
        a = self.attention(
            self.attention_norm(x), rope, image_tokens, cu_seqlens, max_seqlen, backend, cache, queries
        )
        if queries is not None:
            x, image_tokens = x.index_select(0, queries.index), rows_of(image_tokens, queries.index)
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x), image_tokens)


def rows_of(image_tokens: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The PLoRA selector (PLoRALinear) for the rows `index` of a row: a mask is indexed, None and
    the empty index (no image token) stay."""
    if image_tokens is None or image_tokens.numel() == 0:
        return image_tokens
    if image_tokens.is_floating_point():
        return image_tokens.index_select(0, index)
    # Index form: where the kept rows are image tokens, renumbered among the kept rows.
    return torch.isin(index, image_tokens).nonzero().squeeze(1)


def plora_selector(
    image_index: torch.Tensor | None, num_tokens: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """What PLoRALinear takes for a row of `num_tokens` with image tokens at `image_index` int64[K]:
    None stays None, an empty index stays (no images), else a 0/1 mask float[T, 1] in `dtype`."""
    if image_index is None or image_index.numel() == 0:
        return image_index
    mask = torch.zeros(num_tokens, 1, dtype=dtype, device=image_index.device)
    return mask.index_fill_(0, image_index, 1.0)


class InternLM2Model(nn.Module):
    """The decoder stack; named `model` inside IXCModel as in the official checkpoint."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class KVCache:
    """One layer's keys/values of the sequence so far ([T, H_kv, D]), for generation."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k])
        self.v = v if self.v is None else torch.cat([self.v, v])
        return self.k, self.v


# --------------------------------------------------------------------------- vision


class _CLIPHolder(nn.Module):
    # transformers 5 flattened CLIPVisionModel (no `.vision_model` level); the official checkpoint
    # keeps that level, so it is restored here: keys vit.vision_tower.vision_model.*.
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class VisionTower(nn.Module):
    """CLIP ViT-L/14 at 560 px. Output: the LAST encoder layer (before post_layernorm), CLS dropped."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.vision_tower = _CLIPHolder(config.vision_config())
        # post_layernorm is in the checkpoint but not on the feature path: frozen so that no
        # optimizer carries state for it and no rank waits for a gradient it never gets.
        self.vision_tower.vision_model.post_layernorm.requires_grad_(False)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """float[B, 3, 560, 560] -> [B, 1600, vit_hidden] (40×40 patches, row-major)."""
        clip = self.vision_tower.vision_model
        h = clip.pre_layrnorm(patch_embeddings(clip.embeddings, pixels))
        for layer in clip.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, None, use_reentrant=False)
            else:
                h = layer(h, None)
        return h[:, 1:]


def patch_embeddings(embeddings: CLIPVisionEmbeddings, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' CLIPVisionEmbeddings.forward (no position interpolation), its p×p stride-p
    patch convolution computed as one matmul: [B·patches, 3·p·p] × [3·p·p, C].

    Same products, accumulated in another order. On CUDA the convolution ran as cuDNN's implicit
    GEMM at 20 TFLOP/s (2.7 ms for 28 views of 560 px on an H200).
    ZeRO-3 gathers a module's weights only when that module is called: the matmul reads the
    convolution's weight without calling it, so under ZeRO-3 the module itself runs.
    """
    conv = embeddings.patch_embedding
    if hasattr(conv.weight, "ds_id"):
        return embeddings(pixels)
    b, channels, height, width = pixels.shape
    size, p = cast(int, embeddings.image_size), conv.weight.shape[-1]
    if (height, width) != (size, size):
        raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({size}*{size}).")
    side = size // p
    patches = pixels.to(conv.weight.dtype).reshape(b, channels, side, p, side, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, side * side, channels * p * p)
    x = F.linear(patches, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
    cls = embeddings.class_embedding.to(x.dtype).expand(b, 1, -1)
    return torch.cat([cls, x], dim=1) + embeddings.position_embedding(embeddings.position_ids)


def merge_patches(features: torch.Tensor) -> torch.Tensor:
    """[B, 1600, C] -> [B, 20, 20, 4C]: token (y, x) = concat of patches (2y,2x), (2y,2x+1), (2y+1,2x), (2y+1,2x+1)."""
    b, n, c = features.shape
    assert n == VIT_PATCH_SIDE**2, f"expected {VIT_PATCH_SIDE**2} patches per tile, got {n}"
    side = MERGED_SIDE
    grid = features.reshape(b, side, 2, side, 2, c).permute(0, 1, 3, 2, 4, 5)  # (b, y, x, dy, dx, c)
    return grid.reshape(b, side, side, 4 * c)


def assemble_image_tokens(
    merged: torch.Tensor, grids: list[tuple[int, int]], glb_gn: torch.Tensor, sub_gn: torch.Tensor
) -> torch.Tensor:
    """Lay out each image's tokens as the official model does (SPEC §5), before vision_proj.

    merged [I + N, 20, 20, 4C]: the I global views first, then the N local tiles image by image.
    Per image: global 20×20 with `sub_gn` after each row (420), one `glb_gn`, then the local tiles
    reassembled into (rows·20)×(cols·20) with `sub_gn` after each of its rows.
    Returns [sum image_token_count(grid), 4C].
    """
    num_images = len(grids)
    width = merged.shape[-1]
    sub = sub_gn.reshape(1, 1, width).to(merged.dtype)
    glb = glb_gn.reshape(1, width).to(merged.dtype)
    out = []
    offset = num_images
    for i, (rows, cols) in enumerate(grids):
        side = MERGED_SIDE
        global_rows = torch.cat([merged[i], sub.expand(side, 1, width)], dim=1).reshape(-1, width)
        local = merged[offset : offset + rows * cols].reshape(rows, cols, side, side, width)
        offset += rows * cols
        local = local.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, width)
        local_rows = torch.cat([local, sub.expand(rows * side, 1, width)], dim=1).reshape(-1, width)
        out.extend([global_rows, glb, local_rows])
        assert sum(p.shape[0] for p in out[-3:]) == image_token_count(rows, cols)
    return torch.cat(out)


# --------------------------------------------------------------------------- the model


class ModelOutput(dict):
    """What `IXCModel.forward` returns (B = 1), read as attributes.

    A dict (like transformers' ModelOutput) because DeepSpeed ZeRO-3 looks for tensors in a
    module's outputs to re-gather the module's own parameters (the separators) in backward.
      hidden [1, T, hidden_size]  final-normed hidden states (feed `output` for per-sample losses),
             or [1, Q, hidden_size] at the row positions `positions` when the last layer ran on
             the trained rows only (IXCModel.trained_rows_only): `row_token_losses` takes both
      positions  int64[Q] or None (every position)
      loss_sum  fp32 scalar: sum of the token losses over trained targets (when targets were given)
      num_tokens  trained tokens behind loss_sum
      logits [1, T, vocab]  in the model dtype, only with return_logits=True (small inputs only)
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor | None = None,
        loss_sum: torch.Tensor | None = None,
        num_tokens: int | None = None,
        logits: torch.Tensor | None = None,
    ):
        super().__init__(
            hidden=hidden, positions=positions, loss_sum=loss_sum, num_tokens=num_tokens, logits=logits
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class LMHead(nn.Linear):
    """The untied `output` projection. It computes the loss itself, inside its own forward, so that
    ZeRO-3 (which gathers a module's weights only around that module's forward and backward) holds
    the full weight while the chunked loss reads it.

    forward(hidden [T, D]) -> logits [T, V]; with targets int64[T]: (loss sum fp32, trained tokens),
    or with per_token=True the fp32[T] token losses (for evaluation, under no_grad).
    """

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        per_token: bool = False,
    ) -> Any:
        if targets is None:
            return F.linear(hidden, self.weight)
        if per_token:
            return token_losses(hidden, self.weight, targets, chunk_tokens)
        return chunked_cross_entropy(hidden, self.weight, targets, chunk_tokens)


@torch.no_grad()
def row_token_losses(head: LMHead, out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """fp32[T]: each position's loss for the row's targets int64[T] (0 where not trained), from
    `out.hidden` at every position or at `out.positions` only. For logging and evaluation."""
    hidden = out.hidden[0].detach()
    targets = targets.to(hidden.device)
    if out.positions is None:
        return head(hidden, targets, per_token=True)
    losses = head(hidden, targets.index_select(0, out.positions), per_token=True)
    return losses.new_zeros(targets.shape[0]).index_copy_(0, out.positions, losses)


class IXCModel(nn.Module):
    """InternLM-XComposer 2.5 for fine-tuning: `forward` on one packed row (module docstring).

    Runtime switches (not saved): `attention_backend` ('auto', 'flash', 'varlen', 'sdpa'),
    `gradient_checkpointing_enable()/disable()`, `checkpoint_layers` (how many decoder layers, from
    the first, are recomputed while checkpointing is on; None = all), `chunk_tokens` of the loss,
    `trained_rows_only` (default True: given targets, the last decoder layer computes its queries,
    `wo` and feed-forward only at the trained positions, the only rows the loss reads; its keys and
    values still come from every position. Exact: the other rows' outputs feed nothing);
    `compile_layers(model)` compiles the decoder and ViT layers in place.
    """

    # Read by PEFT/transformers helpers (weight-conversion scoping); HF's InternLM2 uses "model".
    base_model_prefix = "model"

    def __init__(self, config: ModelConfig, attention: str = "auto"):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.vit = VisionTower(config)
        feat = config.image_feature_size
        self.vision_proj = nn.Sequential(
            nn.Linear(feat, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, feat))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, feat))
        self.attention_backend = attention
        self.gradient_checkpointing = False
        self.checkpoint_layers: int | None = None
        self.chunk_tokens = DEFAULT_CHUNK_TOKENS
        self.trained_rows_only = True
        self.source_dir: Path | None = None  # set by weights.load_model: tokenizer files are copied from it

    # ---- switches

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each decoder (and ViT) layer in backward; always non-reentrant (kwargs ignored)."""
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled
        # Every VisionTower, not just self.vit: PEFT's modules_to_save trains a copy of it.
        for module in self.modules():
            if isinstance(module, VisionTower):
                module.gradient_checkpointing = enabled

    def set_unused_adapters_in_state_dict(self, enabled: bool) -> None:
        """Whether `state_dict()` includes the 2.42 B lora_sft/dpo/web weights (default True).

        Turn off for frequent training checkpoints; `weights.save_model` always writes them.
        """
        for module in self.plora_linears():
            module.unused_in_state_dict = enabled

    def plora_linears(self) -> Iterator[PLoRALinear]:
        return (m for m in self.modules() if isinstance(m, PLoRALinear))

    def unused_adapter_numel(self) -> int:
        return sum(t.numel() for m in self.plora_linears() for t in m.unused_adapters.values())

    def reset_buffers(self) -> None:
        """Refill the non-persistent buffers (CLIP position ids) after `to_empty()`."""
        emb = self.vit.vision_tower.vision_model.embeddings
        emb.position_ids.copy_(torch.arange(emb.num_positions, device=emb.position_ids.device).expand(1, -1))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        # PEFT's causal-LM wrapper reads this attribute; generation goes through trainer.generate.
        raise NotImplementedError("use trainer.generate.generate(model, ...) to generate with IXCModel")

    # ---- pieces

    def vision_trains(self) -> bool:
        """Whether any parameter of the vision side (ViT, separators, vision_proj) trains."""
        parts = (self.vit, self.vision_proj)
        return any(p.requires_grad for m in parts for p in m.parameters()) or any(
            p.requires_grad for p in (self.plora_glb_GN, self.plora_sub_GN)
        )

    def encode_images(self, tiles: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """uint8[N, 560, 560, 3] + I grids -> [sum image_token_count(grid), hidden] (after vision_proj)."""
        # Read from a bare parameter: PEFT's modules_to_save may wrap vit and vision_proj.
        dtype, device = self.plora_sub_GN.dtype, self.plora_sub_GN.device
        tiles = tiles.to(device, non_blocking=True)
        pixels = torch.cat([images.global_views(tiles, grids, dtype), images.normalize_tiles(tiles, dtype)])
        # A frozen ViT (fix_vit) needs no graph: its activations are not kept.
        vit_trains = any(p.requires_grad for p in self.vit.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vit_trains):
            merged = merge_patches(self.vit(pixels))
        tokens = assemble_image_tokens(merged, grids, self.plora_glb_GN, self.plora_sub_GN)
        return self.vision_proj(tokens)

    def embed(
        self,
        input_ids: torch.Tensor,
        tiles: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [T, hidden] with image features scattered in, and image_index int64[K].

        input_ids int64[T]; image positions may hold anything >= -100 (0 or IMAGE_TOKEN_ID):
        their embeddings are replaced.
        """
        t = input_ids.shape[0]
        device = self.model.tok_embeddings.weight.device
        embeds = self.model.tok_embeddings(input_ids.to(device).clamp_min(0))
        grids = [] if image_grids is None else [(int(r), int(c)) for r, c in image_grids.tolist()]
        if not grids:
            no_images = torch.zeros(0, dtype=torch.long, device=device)
            if torch.is_grad_enabled() and self.vision_trains():
                # A row without images while the vision side trains: a blank 1×1 image runs through
                # it and adds nothing (zero rows copied in, exact zero gradients), so the backward
                # reaches the same parameters in the same order as a row with images. ZeRO-2/3
                # reduce gradients in that order; a rank whose row skipped the ViT put them out of step.
                blank = torch.zeros(1, TILE_SIZE, TILE_SIZE, 3, dtype=torch.uint8)
                features = self.encode_images(blank, [(1, 1)])[:0]
                return embeds.index_copy(0, no_images, features.to(embeds.dtype)), no_images
            return embeds, no_images
        if tiles is None or image_starts is None:
            raise ValueError("image_grids given without tiles or image_starts")
        starts = [int(s) for s in image_starts.tolist()]
        if len(starts) != len(grids):
            raise ValueError(f"{len(grids)} image grids but {len(starts)} image starts")
        spans = []
        previous_end = 0
        for i, (start, (rows, cols)) in enumerate(zip(starts, grids, strict=True)):
            end = start + image_token_count(rows, cols)
            if start < previous_end or end > t:
                raise ValueError(
                    f"image {i}: span [{start}, {end}) for grid {rows}×{cols} overlaps the previous image "
                    f"(ends {previous_end}) or runs past the row (T={t})"
                )
            spans.append(torch.arange(start, end))
            previous_end = end
        image_index = torch.cat(spans).to(device, non_blocking=True)
        features = self.encode_images(tiles, grids)
        # Out of place: the gradient reaching the overwritten token embeddings is zero, as it should.
        return embeds.index_copy(0, image_index, features.to(embeds.dtype)), image_index

    def decode(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        image_index: torch.Tensor | None,
        caches: list[KVCache] | None = None,
        queries: QueryRuns | None = None,
    ) -> torch.Tensor:
        """Decoder stack + final norm: [T, hidden] -> [T, hidden]. With `caches`: one sequence, appended to.
        With `queries`: the last layer computes only the rows queries.index -> [Q, hidden]."""
        device = embeds.device
        position_ids = position_ids.to(device)
        if caches is None:
            backend = resolve_backend(self.attention_backend, device, embeds.dtype, self.config.head_dim)
            seq_lens = None
            if max_seqlen > self.config.max_position_embeddings:
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                seq_lens = torch.repeat_interleave(lengths, lengths).to(device)
        else:
            # Generation: one sequence; its length so far sets the NTK base, as in HF's cache path.
            past = 0 if caches[0].k is None else caches[0].k.shape[0]
            seq_lens = torch.full_like(position_ids, past + embeds.shape[0])
            backend = "sdpa"
        rope = rotary_cos_sin(position_ids, self.config, embeds.dtype, seq_lens)
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        image_tokens = plora_selector(image_index, embeds.shape[0], embeds.dtype)
        h = embeds
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        recomputed = len(self.model.layers) if self.checkpoint_layers is None else self.checkpoint_layers
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            cache = None if caches is None else caches[i]
            subset = queries if i == last else None
            if use_checkpoint and cache is None and i < recomputed:
                h = checkpoint(
                    layer,
                    h,
                    rope,
                    image_tokens,
                    cu_seqlens,
                    max_seqlen,
                    backend,
                    None,
                    subset,
                    use_reentrant=False,
                )
            else:
                h = layer(h, rope, image_tokens, cu_seqlens, max_seqlen, backend, cache, subset)
        return self.model.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        tiles: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_starts: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_logits: bool = False,
        **hf_kwargs: Any,
    ) -> ModelOutput:
        """One packed row (shapes: module docstring) -> ModelOutput.

        Defaults: cu_seqlens = one sample of T tokens, position_ids restart at 0 in each sample,
        max_seqlen from cu_seqlens. With `targets`, the chunked loss sum and token count are
        returned; the full logits only with return_logits=True.
        `hf_kwargs` absorbs what PEFT's causal-LM wrapper passes (attention_mask=None, ...); any
        value other than None is refused.
        """
        given = sorted(k for k, v in hf_kwargs.items() if v is not None)
        if given:
            raise ValueError(
                f"IXCModel.forward does not take {', '.join(given)}: packed rows use cu_seqlens, "
                "position_ids and targets (docs/ARCHITECTURE.md)"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T] (one packed row), got {list(input_ids.shape)}")
        ids = input_ids[0]
        t = ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, t], dtype=torch.int32)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t or bool((lengths <= 0).any()):
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={t}")
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        if position_ids is None:
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
            position_ids = torch.arange(t, device=cu_seqlens.device) - starts
        else:
            position_ids = position_ids[0]
        embeds, image_index = self.embed(ids, tiles, image_grids, image_starts)
        queries = None
        if targets is not None and not return_logits and self.trained_rows_only:
            queries = query_runs((targets[0] != IGNORE_INDEX).nonzero().squeeze(1), cu_seqlens)
        if queries is not None:
            queries = queries.to(embeds.device)
        hidden = self.decode(embeds, position_ids, cu_seqlens, max_seqlen, image_index, queries=queries)
        out = ModelOutput(hidden=hidden[None], positions=None if queries is None else queries.index)
        if targets is not None:
            row_targets = targets[0].to(hidden.device)
            if queries is not None:
                row_targets = row_targets.index_select(0, queries.index)
            out.loss_sum, out.num_tokens = self.output(hidden, row_targets, self.chunk_tokens)
        if return_logits:
            out.logits = self.output(hidden)[None]
        return out


# --------------------------------------------------------------------------- construction


@torch.no_grad()
def init_weights(model: IXCModel, seed: int) -> None:
    """Deterministic random init from `seed` (a fresh model, not a pretrained-like one).

    Matrices, embeddings and separators ~ N(0, initializer_range); norm weights 1; biases 0; the
    unused lora_sft/dpo/web adapters 0. Same seed, same device -> same weights.
    """
    std = model.config.initializer_range
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith(".bias"):
            p.zero_()
        elif p.dim() == 1 and "norm" in name:  # RMSNorm / LayerNorm scales (pre_layrnorm too)
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=generators[p.device])
    for module in model.plora_linears():
        for key, tensor in module.unused_adapters.items():
            if not tensor.is_meta:
                module.unused_adapters[key] = torch.zeros_like(tensor)


def build_model(
    config: ModelConfig | str,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    attention: str = "auto",
) -> IXCModel:
    """A freshly initialized IXCModel from a config or a preset name ('tiny', '7b').

    device='meta' allocates nothing (counting keys/shapes of the 7B, planning). dtype defaults to
    fp32 on CPU and the config's torch_dtype elsewhere. Unused adapters stay on the CPU (or meta).
    """
    if isinstance(config, str):
        config = preset_config(config, vocab_size)
    elif vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else config.dtype
    with torch.device(device):
        model = IXCModel(config, attention=attention)
    model.to(dtype)
    for module in model.plora_linears():
        for key, tensor in module.unused_adapters.items():
            module.unused_adapters[key] = tensor.to(dtype)
    init_weights(model, seed)
    return model


def compile_layers(
    model: nn.Module, backend: str = "inductor", decoder: bool = True, vision: bool = True
) -> tuple[int, int]:
    """torch.compile every decoder layer and ViT encoder layer of `model` in place (regional
    compilation); returns how many of each were compiled. (decoder/vision: which stacks.)

    The layers of each stack share one code path, so one compilation (with dynamic shapes: rows,
    image-token counts, sample and tile counts vary per step) serves all of them. `nn.Module.compile`
    keeps the parameter names, so checkpoints and PEFT adapters are unchanged. Works through PEFT's
    wrappers (call it after LoRA is applied); checkpointing wraps the compiled layer. The ViT's
    layers are compiled too: frozen (fix_vit) they run forward only, where eager LayerNorm,
    quick_gelu and residual kernels are most of what is not a matmul.
    """
    decoder_layers = [m for m in model.modules() if isinstance(m, DecoderLayer)] if decoder else []
    # Every VisionTower: PEFT's modules_to_save trains a copy of it.
    vision_layers = [
        layer
        for tower in model.modules()
        if vision and isinstance(tower, VisionTower)
        for layer in tower.vision_tower.vision_model.encoder.layers
    ]
    for layer in (*decoder_layers, *vision_layers):
        layer.compile(backend=backend, dynamic=True)
    return len(decoder_layers), len(vision_layers)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Registered parameters (the unused adapters are not parameters: see unused_adapter_numel);
    full sizes under ZeRO-3, whose partitioned parameters hold an empty tensor (`ds_numel`)."""
    return sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only
    )


@contextmanager
def unused_adapters_excluded(model: IXCModel) -> Iterator[IXCModel]:
    """`with unused_adapters_excluded(model): sd = model.state_dict()` — without the 2.42 B frozen weights."""
    model.set_unused_adapters_in_state_dict(False)
    try:
        yield model
    finally:
        model.set_unused_adapters_in_state_dict(True)
