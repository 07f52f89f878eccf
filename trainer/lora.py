"""PEFT's LoRA layer for a PLoRALinear, with both low-rank updates added by one matmul.

A LoRA-wrapped PLoRA linear computes, on the flattened rows x [T, in]:

    out = W x  +  m ⊙ Plora_B(Plora_A(drop₁(x)))  +  s · lora_B(lora_A(drop₂(x)))

(m the 0/1 image-token mask [T, 1], s = alpha / r). PEFT's own forward makes each update a
[T, out] tensor and adds it (and in backward multiplies the [T, out] gradient by m and by s):
four passes over [T, out] for updates whose rank is 256 and 64. Since m and s are per row,
they move onto the rank-sized activations, and both updates become one matmul, added to W x
inside a matmul:

    out = W x + [m ⊙ h₁ | s · h₂] [Plora_B | lora_B]ᵀ       h₁ = Plora_A(drop₁(x)), h₂ = lora_A(drop₂(x))

the rank-320 product made first and the base matmul accumulating into it in place
(`linear_plus_low_rank`: cuBLAS reads that output once, inside the large matmul).

Same values up to rounding (the sum is now accumulated in fp32 inside the matmul), same
dropout draws in the same order, same gradients; the frozen Plora_B gets no weight gradient.
Everything else (adapter names, saving, merging, other forms of `image_tokens`) is PEFT's.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from trainer.model import PLoRALinear


@torch.library.custom_op("xcomposer::linear_plus_low_rank", mutates_args=())
def linear_plus_low_rank(
    x: torch.Tensor,
    weight: torch.Tensor,
    h1: torch.Tensor,
    h2: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """x Wᵀ + [h₁ | h₂] [b₁ | b₂]ᵀ: x [T, in], W [O, in], h₁ [T, r₁], h₂ [T, r₂], b₁ [O, r₁], b₂ [O, r₂].

    A custom op, so that torch.compile calls it as it is: one matmul accumulates in place into
    the other's fresh output (an out-of-place addmm, which is what a compiled graph makes of it,
    first copies the [T, O] input). The rank-320 product comes first and the base GEMM accumulates
    into it: its epilogue reads the [T, O] output once, inside the large GEMM, where the other
    order would have the low-rank GEMM read and write it again.
    """
    low_rank = torch.cat((h1, h2), dim=1), torch.cat((b1, b2), dim=1).t()
    return torch.mm(*low_rank).addmm_(x, weight.t())


@linear_plus_low_rank.register_fake
def _linear_plus_low_rank_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    h1: torch.Tensor,
    h2: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_plus_low_rank_setup(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    x, weight, h1, h2, b1, b2 = inputs
    # An activation is kept only for its weight's gradient (W and Plora_B are frozen under LoRA).
    ctx.save_for_backward(
        x if weight.requires_grad else None,
        weight,
        h1 if b1.requires_grad else None,
        h2 if b2.requires_grad else None,
        b1,
        b2,
    )


def _linear_plus_low_rank_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, h1, h2, b1, b2 = ctx.saved_tensors
    need_x, need_w, need_h1, need_h2, need_b1, need_b2 = ctx.needs_input_grad
    grad_h1 = grad_h2 = None
    if need_h1 or need_h2:
        # One matmul [T, O] @ [O, r₁ + r₂] for both activation gradients.
        grad_h = grad @ torch.cat((b1, b2), dim=1)
        grad_h1, grad_h2 = grad_h[:, : b1.shape[1]], grad_h[:, b1.shape[1] :]
    return (
        grad @ weight if need_x else None,
        grad.t() @ x if need_w else None,
        grad_h1 if need_h1 else None,
        grad_h2 if need_h2 else None,
        grad.t() @ h1 if need_b1 else None,
        grad.t() @ h2 if need_b2 else None,
    )


linear_plus_low_rank.register_autograd(
    _linear_plus_low_rank_backward, setup_context=_linear_plus_low_rank_setup
)


_FIELD = 1 << 31
"""Each keep/drop decision of the 64-bit draw (`two_dropouts`' fallback) reads 31 bits of it."""

_HASH_FIELD = 1 << 16
"""Each keep/drop decision of the hashed draw reads 16 bits of the element's 32-bit hash."""

_HASH_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
"""The multipliers of splitmix32's finalizer as commonly written (x ^= x >> 16, x *= 0x21f0aaad,
x ^= x >> 15, x *= 0x735a2d97, x ^= x >> 15: one of the low-bias 32-bit hashes found with Chris
Wellons' hash-prospector), both below 2³¹, so they are int32 values as written."""


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """The splitmix32 finalizer on int32 tensors (multiplications wrap mod 2³²; the masks make
    the arithmetic right shifts logical)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _HASH_MULTIPLIERS[0]
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _HASH_MULTIPLIERS[1]
    return h ^ ((h >> 15) & 0x1FFFF)


def hashed_bits(shape: torch.Size, keys: torch.Tensor) -> torch.Tensor:
    """32 random-looking bits per element of `shape` (int32): two rounds of `_mix32` over the
    element's flat index, keyed by the two int32 values of `keys` (mix(mix(i ⊕ k₀) ⊕ k₁)).

    A pure function of index and keys: compiled, it is a few integer operations inside the
    kernel that uses it (no Philox, nothing read from memory), and backward can compute it again
    instead of keeping masks. Needs fewer than 2³¹ elements.
    """
    index = torch.arange(shape.numel(), dtype=torch.int32, device=keys.device).view(shape)
    return _mix32(_mix32(index ^ keys[0]) ^ keys[1])


def _hash_threshold(p: float) -> int | None:
    """The 16-bit threshold for rate p (p rounded up to a multiple of 2⁻¹⁶), or None where that
    rounding would move p by more than 0.1 % of it (rates below ≈ 0.015 that are not near a
    multiple): those take the 64-bit draw."""
    threshold = math.ceil(p * _HASH_FIELD)
    return threshold if threshold < _HASH_FIELD and threshold / _HASH_FIELD - p <= 1e-3 * p else None


def two_dropouts(
    x: torch.Tensor, p1: float, p2: float, training: bool, hashed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop₁(x), drop₂(x)): two independent inverted dropouts of one input, at rates p1 and p2.

    Eager: two `F.dropout` calls. Under torch.compile, where inductor spends one Philox call
    (10 rounds of 32-bit multiplies) per element per dropout and the LoRA layers' input kernels
    are bound by that arithmetic, both decisions come from one 32-bit hash of the element's index
    (`hashed_bits`, keyed by two int32 values drawn from torch's generator for the call, so the
    RNG state, seeding and checkpointed recomputation behave as for any random op): the high and
    low 16 bits decide each dropout (drop where the field is below the rate's threshold), the
    rate is p rounded up to a multiple of 2⁻¹⁶ (0.05 → 0.0500031) and kept values are scaled by
    1/(1 - that rate). Rates too fine for 16 bits, or inputs of 2³¹ elements or more, draw one
    64-bit integer per element instead and read two 31-bit fields of it (so does `hashed=False`).
    """
    if not training or not (0.0 < p1 < 1.0 and 0.0 < p2 < 1.0) or not torch.compiler.is_compiling():
        return (
            F.dropout(x, p1, training) if p1 > 0 else x,
            F.dropout(x, p2, training) if p2 > 0 else x,
        )
    t1, t2 = _hash_threshold(p1), _hash_threshold(p2)
    if hashed and t1 is not None and t2 is not None and x.numel() < 1 << 31:
        keys = torch.randint(-(1 << 31), 1 << 31, (2,), dtype=torch.int32, device=x.device)
        bits = hashed_bits(x.shape, keys)
        keep1 = ((bits >> 16) & 0xFFFF) >= t1
        keep2 = (bits & 0xFFFF) >= t2
        scale1, scale2 = _HASH_FIELD / (_HASH_FIELD - t1), _HASH_FIELD / (_HASH_FIELD - t2)
    else:
        draw = torch.randint(0, _FIELD * _FIELD, x.shape, device=x.device)
        keep1 = (draw >> 31) >= math.ceil(p1 * _FIELD)
        keep2 = (draw & (_FIELD - 1)) >= math.ceil(p2 * _FIELD)
        scale1, scale2 = 1.0 / (1.0 - p1), 1.0 / (1.0 - p2)
    return x * keep1 * scale1, x * keep2 * scale2


def _dropout_rate(module: torch.nn.Module) -> float:
    """p of an nn.Dropout, 0 for nn.Identity (PEFT's lora_dropout when dropout is 0)."""
    return float(module.p) if isinstance(module, torch.nn.Dropout) else 0.0


class PLoRALoraLinear(LoraLinear):
    """PEFT `lora.Linear` around a PLoRALinear, with the fused forward above.

    The fused path runs for training and evaluation alike when one plain LoRA adapter is active
    and unmerged, the row has image tokens given as the 0/1 mask, and the adapter has the model's
    dtype; anything else (index form, no image tokens, merged or disabled adapters, several
    adapters, DoRA and other variants, mixed dtypes) is PEFT's forward unchanged. PEFT's own
    `lora.Linear` (`apply_recipe(..., fused_lora=False)`) is the reference it is tested against.
    """

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        if kwargs or len(args) != 1 or self.disable_adapters or self.merged:
            return None
        image_tokens = args[0]
        if image_tokens is None or not image_tokens.is_floating_point():
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        base = cast(PLoRALinear, self.get_base_layer())
        weights = (
            base.weight,
            base.Plora_B.weight,
            self.lora_A[active[0]].weight,
            self.lora_B[active[0]].weight,
        )
        # ZeRO-3 gathers a module's weights only when that module is called: the fused path reads
        # Plora_B's and lora_B's weights without calling them, so it stands aside there.
        if any(hasattr(w, "ds_id") for w in weights):
            return None
        # A 4-bit W (QLoRA, trainer/qlora.py): PEFT's forward, whose base layer runs bitsandbytes'
        # 4-bit matmul; the dtype test below turns it away (its storage is uint8).
        return active[0] if len({x.dtype, *(w.dtype for w in weights)}) == 1 else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._fused_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = cast(PLoRALinear, self.get_base_layer())
        image_tokens = args[0]
        flat_x = x.reshape(-1, x.shape[-1])
        x_plora, x_lora = two_dropouts(
            flat_x, _dropout_rate(base.lora_dropout), _dropout_rate(self.lora_dropout[adapter]), self.training
        )
        h_plora = base.Plora_A(x_plora) * image_tokens
        h_lora = self.lora_A[adapter](x_lora)
        scaling = self.scaling[adapter]
        if scaling != 1.0:
            h_lora = h_lora * scaling
        out = linear_plus_low_rank(
            flat_x, base.weight, h_plora, h_lora, base.Plora_B.weight, self.lora_B[adapter].weight
        )
        return out.view(*x.shape[:-1], out.shape[-1])
