"""Two independent dropouts of one input, drawn cheaply under torch.compile.

The fused LoRA layer (trainer/lora.py) drops every linear's input twice, once for Plora and once
for LoRA (p = 0.05 each in the official recipe). Eagerly that is two `F.dropout` calls. Compiled,
inductor (torch 2.11) draws the random numbers inside the kernel that also computes the input
(RMSNorm, SwiGLU), one Philox call (10 rounds of 32-bit multiplies) per element per draw, and that
arithmetic, not memory, bounds those kernels. `two_dropouts` picks one of three draws:

  bits     (CUDA with Triton, the default there) a Triton kernel makes one Philox call per FOUR
           elements: its four 32-bit words give each element two 16-bit fields, one per dropout,
           and the 2 keep bits of each element are packed four to a byte (`keep_bits`). The
           compiled consumer unpacks them inside the fused kernel; backward keeps only the packed
           bits (N/4 bytes). Each rate is p rounded to a multiple of 2⁻¹⁶ (`threshold`; 0.05 ->
           0.0500031) with kept values scaled by the inverse of the rounded keep rate (unbiased).
  randint  (the default elsewhere, e.g. compiled on CPU) one 64-bit `torch.randint` per element,
           read as two 31-bit fields: half the Philox calls of two `F.dropout`s, rates exact to 2⁻³¹.
  torch    two `F.dropout` calls (PEFT's draws; always the draw in eager mode).

All three are independent inverted dropouts at the given rates; they differ in which random
numbers they read, so a run's masks depend on the draw (and on the device).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

try:  # the optional accelerator (STYLE 23): Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

Draw = Literal["auto", "bits", "randint", "torch"]
DRAWS = ("auto", "bits", "randint", "torch")

BITS_FIELD = 1 << 16
"""`bits`: each keep/drop decision compares a 16-bit field of a Philox word with the threshold."""
BITS_ELEMENTS = 4
"""`bits`: elements per Philox call (four 32-bit words, two fields each) and per packed byte."""
BITS_BLOCK = 1024
RANDINT_FIELD = 1 << 31
"""`randint`: each decision reads 31 bits of the element's 64-bit draw."""


def threshold(p: float, field: int = BITS_FIELD) -> int:
    """Drop where a uniform `field`-valued integer is below this: p rounded to a multiple of 1/field."""
    return min(max(round(p * field), 1), field - 1)


if triton is not None:

    @triton.jit
    def _two_keeps(word, threshold1, threshold2):
        # One 32-bit Philox word -> one element's 2 keep bits: low field dropout 1, high field 2.
        keep1 = ((word & 0xFFFF).to(tl.int32) >= threshold1).to(tl.int32)
        keep2 = ((word >> 16).to(tl.int32) >= threshold2).to(tl.int32)
        return keep1 | (keep2 << 1)

    @triton.jit
    def _keep_bits_kernel(seed_ptr, out_ptr, groups, threshold1, threshold2, BLOCK: tl.constexpr):
        group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(tl.load(seed_ptr), group.to(tl.uint32))
        packed = (
            _two_keeps(w0, threshold1, threshold2)
            | (_two_keeps(w1, threshold1, threshold2) << 2)
            | (_two_keeps(w2, threshold1, threshold2) << 4)
            | (_two_keeps(w3, threshold1, threshold2) << 6)
        )
        tl.store(out_ptr + group, packed.to(tl.uint8), mask=group < groups)


@torch.library.custom_op("xcomposer::keep_bits", mutates_args=())
def keep_bits(seed: torch.Tensor, numel: int, threshold1: int, threshold2: int) -> torch.Tensor:
    """uint8[ceil(numel / 4)]: element e's keep bits for dropout 1 and 2 are bits 2(e % 4) and
    2(e % 4) + 1 of byte e // 4 (keep where the element's 16-bit field >= the threshold).

    seed: int64[1], the Philox key (a fresh draw per call); the counter is the byte's index.
    """
    groups = -(-numel // BITS_ELEMENTS)
    assert triton is not None, "keep_bits needs Triton"
    assert groups < 1 << 32, f"{numel} elements: the 32-bit Philox counter would wrap"
    out = torch.empty(groups, dtype=torch.uint8, device=seed.device)
    if groups:
        grid = (triton.cdiv(groups, BITS_BLOCK),)
        _keep_bits_kernel[grid](seed, out, groups, threshold1, threshold2, BLOCK=BITS_BLOCK)
    return out


@keep_bits.register_fake
def _keep_bits_fake(seed: torch.Tensor, numel: int, threshold1: int, threshold2: int) -> torch.Tensor:
    return seed.new_empty(-(-numel // BITS_ELEMENTS), dtype=torch.uint8)


def unpack_keep_bits(
    packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`keep_bits`' bytes -> the two 0/1 keep masks of `shape` (index arithmetic that inductor
    fuses into the kernel that reads them)."""
    shifts = torch.arange(0, 2 * BITS_ELEMENTS, 2, device=packed.device, dtype=torch.int32)
    both = (packed.to(torch.int32)[:, None] >> shifts) & 3
    both = both.reshape(-1)[: math.prod(shape)].view(shape)
    return (both & 1).to(dtype), (both >> 1).to(dtype)


def resolve_draw(draw: Draw, x: torch.Tensor) -> Draw:
    if draw == "auto":
        return "bits" if x.is_cuda and triton is not None else "randint"
    if draw == "bits" and (triton is None or x.device.type != "cuda"):
        raise RuntimeError(
            f"dropout draw 'bits' needs Triton and a CUDA tensor (got {x.device}, Triton "
            f"{'present' if triton else 'missing'}); use 'auto', 'randint' or 'torch'"
        )
    return draw


def two_dropouts(
    x: torch.Tensor, p1: float, p2: float, training: bool, draw: Draw = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop₁(x), drop₂(x)): two independent inverted dropouts of one input, at rates p1 and p2.

    `draw` (module docstring) applies under torch.compile; eagerly, or with a rate of 0 or 1, both
    are `F.dropout` calls (or nothing, outside training).
    """
    if not training or not (0.0 < p1 < 1.0 and 0.0 < p2 < 1.0) or not torch.compiler.is_compiling():
        draw = "torch"
    draw = resolve_draw(draw, x)
    if draw == "torch":
        return (
            F.dropout(x, p1, training) if p1 > 0 else x,
            F.dropout(x, p2, training) if p2 > 0 else x,
        )
    if draw == "bits":
        t1, t2 = threshold(p1), threshold(p2)
        seed = torch.randint(0, 1 << 62, (1,), device=x.device)
        keep1, keep2 = unpack_keep_bits(keep_bits(seed, x.numel(), t1, t2), x.shape, x.dtype)
        return x * keep1 * (BITS_FIELD / (BITS_FIELD - t1)), x * keep2 * (BITS_FIELD / (BITS_FIELD - t2))
    draw64 = torch.randint(0, RANDINT_FIELD * RANDINT_FIELD, x.shape, device=x.device)
    keep1 = (draw64 >> 31) >= math.ceil(p1 * RANDINT_FIELD)
    keep2 = (draw64 & (RANDINT_FIELD - 1)) >= math.ceil(p2 * RANDINT_FIELD)
    return x * keep1 * (1.0 / (1.0 - p1)), x * keep2 * (1.0 / (1.0 - p2))
