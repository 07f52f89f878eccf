"""Causal attention over a packed row: every sample attends only to its own earlier tokens.

One import guard picks the kernel (STYLE 23); `resolve_backend` turns a request into one of:
  flash   flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), GQA native
  fa4     FlashAttention-4 (`pip install flash-attn-4`: CuTe DSL kernels compiled at first use,
          Hopper sm90 and Blackwell sm100), GQA native; run outside torch.compile's graph. Only
          for the head dims checked against fp32 on an H200 (FA4_HEAD_DIMS): 4.0.0b36 gave wrong
          gradients at head dim 16 (the tiny preset), right ones at 64 and 128 (the 7B)
  varlen  `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16); K/V are repeated per query
          head where the installed torch has no `enable_gqa` (torch 2.11)
  sdpa    torch SDPA one sample at a time, any device and dtype: the CPU path, and the degraded
          CUDA path when neither kernel above is usable (one loud warning per process)

Shapes (T = tokens of the packed row, H = query heads, H_kv = key/value heads, D = head dim):
  q [T, H, D], k/v [T, H_kv, D], cu_seqlens int32[S+1] (cu_seqlens[0] = 0, cu_seqlens[-1] = T)
  -> out [T, H, D]
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["flash", "fa4", "varlen", "sdpa"]
BACKENDS = ("auto", "flash", "fa4", "varlen", "sdpa")

try:  # the optional accelerator: a broken CUDA build raises more than ImportError
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001
    flash_attn_varlen_func = None

try:  # FlashAttention-4 lives in the flash_attn.cute namespace (no flash_attn/__init__.py)
    from flash_attn.cute.interface import flash_attn_varlen_func as fa4_varlen_func
except Exception:  # noqa: BLE001
    fa4_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn
except Exception:  # noqa: BLE001
    varlen_attn = None

# torch changed varlen_attn's keywords between releases: read them once instead of pinning a version.
_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()
_HALF = (torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


FA4_HEAD_DIMS = (64, 128)
"""Head dims at which FlashAttention-4's output and q/k/v gradients were checked against fp32."""


def fa4_usable(device: torch.device, head_dim: int) -> bool:
    """FlashAttention-4 is installed, this GPU is one it has kernels for (sm90, sm100) and the
    head dim is one it was checked at."""
    return (
        fa4_varlen_func is not None
        and head_dim in FA4_HEAD_DIMS
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] in (9, 10)
    )


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Backend:
    """The kernel to use for `requested` (one of BACKENDS) on this device, dtype and head dim.

    'auto' prefers FlashAttention-4 (where installed, on sm90/sm100, at FA4_HEAD_DIMS), then
    flash-attn, then torch varlen, then per-sample SDPA (warned once). An explicit
    request that cannot run here raises ValueError saying why and what to pick instead.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(BACKENDS)}")
    fast_ok = device.type == "cuda" and dtype in _HALF
    if requested == "auto":
        if fast_ok and fa4_usable(device, head_dim):
            return "fa4"
        if fast_ok and flash_attn_varlen_func is not None:
            return "flash"
        if fast_ok and varlen_attn is not None:
            return "varlen"
        if fast_ok:
            message = (
                "attention: DEGRADED per-sample SDPA on CUDA: neither flash-attn nor torch varlen_attn is "
                "installed, so packed rows run one sample at a time; pip install flash-attn"
            )
        else:
            message = (
                f"attention: per-sample SDPA fallback on {device.type}/{str(dtype).removeprefix('torch.')} "
                "(the varlen kernels need CUDA and bf16/fp16): fine for tests, slow for long rows"
            )
        _warn_once(f"sdpa:{device.type}:{dtype}", message)
        return "sdpa"
    if requested in ("flash", "fa4", "varlen"):
        if requested == "fa4":
            if fa4_varlen_func is None:
                raise ValueError(
                    "--attention fa4: flash-attn-4 is not installed; use --attention auto or sdpa"
                )
            if head_dim not in FA4_HEAD_DIMS:
                raise ValueError(
                    f"--attention fa4: checked at head dims {FA4_HEAD_DIMS} only (this model: {head_dim}); "
                    "use --attention auto"
                )
            if fast_ok and not fa4_usable(device, head_dim):
                raise ValueError(
                    "--attention fa4: FlashAttention-4 needs a Hopper (sm90) or Blackwell (sm100) GPU"
                )
        else:
            available = flash_attn_varlen_func if requested == "flash" else varlen_attn
            if available is None:
                what = (
                    "flash-attn is not installed" if requested == "flash" else "this torch has no varlen_attn"
                )
                raise ValueError(f"--attention {requested}: {what}; use --attention auto or sdpa")
        if not fast_ok:
            raise ValueError(
                f"--attention {requested} needs a CUDA device and bf16/fp16 (got {device.type}, {dtype}); "
                "use --attention auto or sdpa"
            )
    return requested  # type: ignore[return-value]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: Backend,
) -> torch.Tensor:
    """Causal attention of each sample [cu_seqlens[s], cu_seqlens[s+1]) to itself. Shapes: module doc."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if backend == "flash":
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    if backend == "fa4":
        return _fa4_varlen(q, k, v, cu_seqlens, max_seqlen)
    if backend == "varlen":
        kwargs: dict[str, Any] = {}
        if "is_causal" in _VARLEN_PARAMS:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)  # (left, right) = (unbounded, 0): causal
        if num_kv_heads != num_heads:
            if "enable_gqa" in _VARLEN_PARAMS:
                kwargs["enable_gqa"] = True
            else:
                # Query head n reads KV head n // (H / H_kv): repeat_interleave keeps that order.
                k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
                v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # SDPA takes [B, H, L, D]; with the batch dimension the CPU flash kernel runs (~7x faster
        # than 3-D inputs, which fall back to the math path). enable_gqa maps query head n to
        # KV head n // (H / H_kv).
        out = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],
            k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None],
            is_causal=True,
            enable_gqa=num_kv_heads != num_heads,
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


@torch.compiler.disable  # CuTe DSL kernels behind an autograd.Function: not traceable
def _fa4_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    out, _ = fa4_varlen_func(
        q,
        k,
        v.contiguous(),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        causal=True,
    )
    return out


WARM_UP_LENGTHS = (1, 64, 124, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def warm_up(
    backend: Backend,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    lengths: tuple[int, ...] = WARM_UP_LENGTHS,
) -> float:
    """Run forward + backward once per row length in `lengths` (one sample each, then all as one
    packed row) so that kernels compiled at first use (FlashAttention-4's JIT picks its tile
    configuration by length) are built before anything is timed. Returns the seconds it took."""
    started = time.perf_counter()
    rows = [[n] for n in lengths] + [list(lengths)]
    for row in rows:
        t = sum(row)
        q = torch.randn(t, num_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(t, num_kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(t, num_kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, *itertools.accumulate(row)], dtype=torch.int32, device=device)
        varlen_attention(q, k, v, cu, max(row), backend).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of the newest q_len tokens of ONE sequence to all its k_len cached + new keys.

    q [q_len, H, D], k/v [k_len, H_kv, D] with k_len >= q_len; the mask is causal aligned to the
    end (query i sits at position k_len - q_len + i). Used by generation with a KV cache.
    """
    q_len, k_len = q.shape[0], k.shape[0]
    mask = None
    if 1 < q_len < k_len:
        offset = k_len - q_len
        rows = torch.arange(q_len, device=q.device)[:, None] + offset
        mask = torch.arange(k_len, device=q.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        is_causal=q_len == k_len and q_len > 1,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(0, 1)
