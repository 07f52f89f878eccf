"""Native InternLM-XComposer 2.5: InternLM2 decoder + Partial LoRA + CLIP ViT-L/14-560 + vision_proj.

This file holds the decoder, `IXCModel` and its construction; `config.json` is
`trainer/model_config.py`, the vision tower and image-token layout `trainer/vision.py`.

Same architecture and parameter names as the released `internlm/internlm-xcomposer2d5-7b`
(docs/IXC25.md#architecture), so its checkpoint loads and saves unchanged (`trainer/weights.py`), but written for
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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from schemas.sample import IGNORE_INDEX, TILE_SIZE, image_token_count
from trainer import images
from trainer.attention import (
    KVCache,
    QueryRuns,
    attend_runs,
    cached_attention,
    query_runs,
    resolve_backend,
    varlen_attention,
)
from trainer.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy, token_losses
from trainer.model_config import ModelConfig, preset_config
from trainer.vision import VisionTower, assemble_image_tokens, merge_patches

END_OF_TURN_ID = 92542
"""`[UNUSED_TOKEN_145]` in the InternLM2 tokenizer: ends every turn, the stop token at inference."""


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

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`W x` (a 4-bit W under QLoRA: `trainer.qlora.PLoRALinear4bit`)."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base_forward(x)
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
        elif cache is None or cache.length == 0:
            # A prompt: the varlen kernels; its keys and values kept for the steps after.
            if cache is not None:
                cache.append(k, v)
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
    the first, are recomputed while checkpointing is on; None = all), `chunk_tokens` of the loss;
    `compile_layers(model)` compiles the decoder and ViT layers in place.

    Given targets, the last decoder layer computes its queries, `wo` and feed-forward only at the
    trained positions, the only rows the loss reads; its keys and values still come from every
    position. Exact: the other rows' outputs feed nothing. `trained_rows_only=False` runs it on
    every row, the reference this is tested against.
    """

    # Read by PEFT/transformers helpers (weight-conversion scoping); HF's InternLM2 uses "model".
    base_model_prefix = "model"

    def __init__(self, config: ModelConfig, attention: str = "auto", trained_rows_only: bool = True):
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
        self.trained_rows_only = trained_rows_only
        # ZeRO-3 gathers each module's weights in a collective that every rank must join, in forward
        # too: then a row without images runs the blank image through the vision side (set by the
        # trainer; also under no_grad, for held-out evaluation).
        self.vision_in_every_row = False
        self.source_dir: Path | None = None  # set by weights.load_model: tokenizer files are copied from it
        # transformers.GenerationConfig for `generate` (PEFT sets it); None: the source folder's file.
        self.generation_config: Any = None

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

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """transformers' `generate` for the arguments users pass, images included (`trainer.hf.generate`)."""
        from trainer.hf import generate

        return generate(self, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        # PEFT's causal-LM wrapper reads this attribute; `generate` never calls it.
        raise NotImplementedError("IXCModel.generate runs its own KV-cache loop (trainer.generate)")

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
            if self.vision_in_every_row or (torch.is_grad_enabled() and self.vision_trains()):
                # A row without images while the vision side trains: a blank 1×1 image runs through
                # it and adds nothing (zero rows copied in, exact zero gradients), so the backward
                # reaches the same parameters in the same order as a row with images. ZeRO-2/3
                # reduce gradients in that order; a rank whose row skipped the ViT put them out of step.
                # Under ZeRO-3 the forward's weight gathers need it as well (`vision_in_every_row`).
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
        """Decoder stack + final norm: [T, hidden] -> [T, hidden]. With `caches`: one sequence, appended
        to (the prompt through the varlen kernels, each new token through `cached_attention`).
        With `queries`: the last layer computes only the rows queries.index -> [Q, hidden]."""
        device = embeds.device
        position_ids = position_ids.to(device)
        backend = resolve_backend(self.attention_backend, device, embeds.dtype, self.config.head_dim)
        if caches is None:
            seq_lens = None
            if max_seqlen > self.config.max_position_embeddings:
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                seq_lens = torch.repeat_interleave(lengths, lengths).to(device)
        else:
            # Generation: one sequence; its length so far sets the NTK base, as in HF's cache path.
            past = caches[0].length
            seq_lens = torch.full_like(position_ids, past + embeds.shape[0])
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
    trained_rows_only: bool = True,
) -> IXCModel:
    """A freshly initialized IXCModel from a config or a preset name ('tiny', '7b').

    device='meta' allocates nothing (counting keys/shapes of the 7B, planning). dtype defaults to
    fp32 on CPU and the config's torch_dtype elsewhere. Unused adapters stay on the CPU (or meta).
    attention and trained_rows_only: see IXCModel.
    """
    if isinstance(config, str):
        config = preset_config(config, vocab_size)
    elif vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else config.dtype
    with torch.device(device):
        model = IXCModel(config, attention=attention, trained_rows_only=trained_rows_only)
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
