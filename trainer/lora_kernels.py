"""Triton kernels for the fused LoRA layer (trainer/lora.py): its two dropouts applied inside the
low-rank A-matmuls, on CUDA.

A LoRA-wrapped PLoRA linear drops its input x [T, K] twice, independently, before the Plora and
LoRA A-matmuls. Compiled with `two_dropouts`, the kernel that makes x (an RMSNorm, SwiGLU) writes
two dropped copies of it, the two A-matmuls read them, and backward writes two [T, K] input
gradients that one more kernel masks and adds: seven passes over [T, K] per linear that carry
nothing but dropout. Here the keep/drop decisions (`trainer.lora.hashed_bits`: the same keyed
hash of the element index, the same 16-bit fields and thresholds) are computed where x is read:

    forward   h₁ = m ⊙ c₁ (x ⊙ keep₁) A₁ᵀ,  h₂ = c₂ (x ⊙ keep₂) A₂ᵀ      one kernel, x read once
    backward  dx = keep₁ ⊙ (g₁ A₁) + keep₂ ⊙ (g₂ A₂)                      one kernel, one write
              dA₂ = g₂ᵀ (x ⊙ keep₂)   (and dA₁ when Plora_A trains)      x read once

(m the image-token mask per row, c the dropout scales with LoRA's alpha/r folded into c₂, and
g = dh ⊙ the same per-row and per-column factors). trainer/lora.py wraps the three launchers as
the custom op `dropped_low_rank_in` and calls it under torch.compile on CUDA, where it stands in
for `two_dropouts` and the two A-matmuls with the same keys and so the same masks. Tests run the
kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIX_MULTIPLIER_0: tl.constexpr = tl.constexpr(0x21F0AAAD)
MIX_MULTIPLIER_1: tl.constexpr = tl.constexpr(0x735A2D97)
"""splitmix32's finalizer multipliers (trainer.lora._HASH_MULTIPLIERS; a test pins them equal)."""


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = tl.mul(h, MIX_MULTIPLIER_0, sanitize_overflow=False)
    h = h ^ (h >> 15)
    h = tl.mul(h, MIX_MULTIPLIER_1, sanitize_overflow=False)
    return h ^ (h >> 15)


@triton.jit
def _fields(rows, cols, width, keys_ptr):
    """The high and low 16 bits of `hashed_bits` at (rows, cols) of a [*, width] tensor: the
    fields that decide the first and the second dropout."""
    k0 = tl.load(keys_ptr).to(tl.uint32, bitcast=True)
    k1 = tl.load(keys_ptr + 1).to(tl.uint32, bitcast=True)
    index = (rows[:, None] * width + cols[None, :]).to(tl.uint32, bitcast=True)
    bits = _mix32(_mix32(index ^ k0) ^ k1)
    return bits >> 16, bits & 0xFFFF


@triton.jit
def _forward_kernel(
    x_ptr, a1_ptr, a2_ptr, row_scale_ptr, keys_ptr, h1_ptr, h2_ptr,
    T, K, t1, t2, scale1, scale2,
    R1: tl.constexpr, R2: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r1, r2 = tl.arange(0, R1), tl.arange(0, R2)
    row_ok = rows < T
    acc1 = tl.zeros((BM, R1), tl.float32)
    acc2 = tl.zeros((BM, R2), tl.float32)
    for k in range(0, K, BK):
        cols = k + tl.arange(0, BK)
        col_ok = cols < K
        x = tl.load(
            x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        high, low = _fields(rows, cols, K, keys_ptr)
        a1 = tl.load(a1_ptr + r1[None, :] * K + cols[:, None], mask=col_ok[:, None], other=0.0)
        a2 = tl.load(a2_ptr + r2[None, :] * K + cols[:, None], mask=col_ok[:, None], other=0.0)
        acc1 = tl.dot(tl.where(high >= t1, x, 0.0), a1, acc1)
        acc2 = tl.dot(tl.where(low >= t2, x, 0.0), a2, acc2)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    h1 = acc1 * (row_scale * scale1)[:, None]
    h2 = acc2 * scale2
    tl.store(h1_ptr + rows[:, None] * R1 + r1[None, :], h1.to(h1_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(h2_ptr + rows[:, None] * R2 + r2[None, :], h2.to(h2_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _input_grad_kernel(
    g1_ptr, g2_ptr, a1_ptr, a2_ptr, keys_ptr, dx_ptr,
    T, K, t1, t2,
    R1: tl.constexpr, R2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    blocks_n = (K + BN - 1) // BN
    rows = (pid // blocks_n) * BM + tl.arange(0, BM)
    cols = (pid % blocks_n) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < T, cols < K
    acc1 = tl.zeros((BM, BN), tl.float32)
    for r in tl.static_range(0, R1, BR):
        rr = r + tl.arange(0, BR)
        g = tl.load(g1_ptr + rows[:, None] * R1 + rr[None, :], mask=row_ok[:, None], other=0.0)
        a = tl.load(a1_ptr + rr[:, None] * K + cols[None, :], mask=col_ok[None, :], other=0.0)
        acc1 = tl.dot(g, a, acc1)
    r2 = tl.arange(0, R2)
    g = tl.load(g2_ptr + rows[:, None] * R2 + r2[None, :], mask=row_ok[:, None], other=0.0)
    a = tl.load(a2_ptr + r2[:, None] * K + cols[None, :], mask=col_ok[None, :], other=0.0)
    acc2 = tl.dot(g, a)
    high, low = _fields(rows, cols, K, keys_ptr)
    dx = tl.where(high >= t1, acc1, 0.0) + tl.where(low >= t2, acc2, 0.0)
    tl.store(
        dx_ptr + rows[:, None] * K + cols[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, keys_ptr, partial_ptr,
    T, K, rows_per_split, threshold,
    HIGH: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    col_ok = cols < K
    r = tl.arange(0, R)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, T)
    acc = tl.zeros((R, BN), tl.float32)
    for t in range(start, end, BT):
        rows = t + tl.arange(0, BT)
        row_ok = rows < end
        g = tl.load(g_ptr + rows[None, :] * R + r[:, None], mask=row_ok[None, :], other=0.0)
        x = tl.load(
            x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        high, low = _fields(rows, cols, K, keys_ptr)
        field = high if HIGH else low
        acc = tl.dot(g, tl.where(field >= threshold, x, 0.0), acc)
    tl.store(partial_ptr + split * R * K + r[:, None] * K + cols[None, :], acc, mask=col_ok[None, :])


def supported(x: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> bool:
    """Whether the kernels take this layer: CUDA, bf16/fp16, ranks powers of two of at least 16
    (tl.dot's shapes), fewer than 2³¹ input elements (the hash's index)."""
    ranks_ok = all(r >= 16 and r & (r - 1) == 0 for r in (a1.shape[0], a2.shape[0]))
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and a1.dtype == a2.dtype == x.dtype
        and ranks_ok
        and x.numel() < 1 << 31
    )


# Tile sizes: the forward keeps both accumulators of a row block ([BM, R1 + R2] fp32) so that each
# element's hash is computed once; bench/dropout_rng.py compares alternatives.
FORWARD_CONFIG = {"BM": 64, "BK": 64, "num_warps": 8, "num_stages": 3}
INPUT_GRAD_CONFIG = {"BM": 128, "BN": 128, "BR": 64, "num_warps": 8, "num_stages": 3}
WEIGHT_GRAD_CONFIG = {"BT": 64, "BN": 128, "num_warps": 8, "num_stages": 3}
WEIGHT_GRAD_PROGRAMS = 512
"""Enough (column block × row split) programs to fill an H100/H200 a few times over."""


def launch_forward(
    x: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    row_scale: torch.Tensor,
    keys: torch.Tensor,
    t1: int,
    t2: int,
    scale1: float,
    scale2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h₁, h₂) = (row_scale ⊙ scale1 · (x ⊙ keep₁) a1ᵀ, scale2 · (x ⊙ keep₂) a2ᵀ), contiguous
    x [T, K], a1 [R1, K], a2 [R2, K], row_scale [T], keys int32 [2]: keep₁ where the high 16 bits
    of `hashed_bits(x.shape, keys)` are ≥ t1, keep₂ where the low 16 bits are ≥ t2."""
    T, K = x.shape
    h1 = x.new_empty(T, a1.shape[0])
    h2 = x.new_empty(T, a2.shape[0])
    cfg = dict(FORWARD_CONFIG)
    grid = (triton.cdiv(T, cfg["BM"]),)
    _forward_kernel[grid](
        x, a1, a2, row_scale, keys, h1, h2, T, K, t1, t2, scale1, scale2,
        R1=a1.shape[0], R2=a2.shape[0], **cfg,
    )  # fmt: skip
    return h1, h2


def launch_input_grad(
    g1: torch.Tensor,
    g2: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    keys: torch.Tensor,
    t1: int,
    t2: int,
) -> torch.Tensor:
    """keep₁ ⊙ (g1 a1) + keep₂ ⊙ (g2 a2) [T, K] for contiguous g1 [T, R1], g2 [T, R2]."""
    T, K = g1.shape[0], a1.shape[1]
    dx = g1.new_empty(T, K)
    cfg = dict(INPUT_GRAD_CONFIG)
    cfg["BR"] = min(cfg["BR"], a1.shape[0])
    grid = (triton.cdiv(T, cfg["BM"]) * triton.cdiv(K, cfg["BN"]),)
    _input_grad_kernel[grid](g1, g2, a1, a2, keys, dx, T, K, t1, t2, R1=a1.shape[0], R2=a2.shape[0], **cfg)
    return dx


def launch_weight_grad(
    g: torch.Tensor, x: torch.Tensor, keys: torch.Tensor, threshold: int, high: bool
) -> torch.Tensor:
    """gᵀ (x ⊙ keep) [R, K] in fp32 for contiguous g [T, R], x [T, K]; keep from the high 16 bits
    (the first dropout) or the low ones."""
    T, K = x.shape
    R = g.shape[1]
    cfg = dict(WEIGHT_GRAD_CONFIG)
    blocks_n = triton.cdiv(K, cfg["BN"])
    splits = max(1, min(triton.cdiv(WEIGHT_GRAD_PROGRAMS, blocks_n), triton.cdiv(T, cfg["BT"])))
    rows_per_split = triton.cdiv(triton.cdiv(T, splits), cfg["BT"]) * cfg["BT"]
    splits = triton.cdiv(T, rows_per_split)
    partial = torch.empty(splits, R, K, device=x.device, dtype=torch.float32)
    _weight_grad_kernel[(blocks_n, splits)](
        g, x, keys, partial, T, K, rows_per_split, threshold, HIGH=high, R=R, **cfg
    )
    return partial.sum(0)
