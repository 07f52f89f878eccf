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
With separate `cu_seqlens_k`, segment s has fewer queries than keys: its queries are the LAST
q_len positions of its k_len keys (causal mask aligned to the end, as flash-attn aligns it). The
model's last layer uses that to attend from trained positions only (`QueryRuns`).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

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
    varlen_attn = None  # type: ignore[assignment]

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


MERGE_GAP = 32
"""Runs of one sample separated by at most this many untrained tokens become one run (the gap's
queries are computed and dropped) rather than two prefix copies of the sample's keys."""
MAX_KEY_COPIES = 4
"""A sample whose runs would copy more than this many times its length of keys is one run."""


@dataclass
class QueryRuns:
    """Attention from a subset of a packed row's positions to everything before each of them in
    its sample: the last decoder layer's queries at trained positions only (IXCModel.forward).

    The positions (sorted) are cut into runs, consecutive positions of one sample. Run r's queries
    are index[cu_seqlens_q[r]:cu_seqlens_q[r+1]]; its keys are the rows key_index[cu_seqlens_k[r]:
    cu_seqlens_k[r+1]], its sample's start up to the run's last query, so the queries are the last
    q_len of the k_len keys: `varlen_attention` with cu_seqlens_k, end-aligned causal mask. Each
    run repeats its sample's prefix (MERGE_GAP and MAX_KEY_COPIES bound the copies); `index` also
    holds the positions of the gaps that were merged: they are computed, and the caller ignores them.
    """

    index: torch.Tensor  # int64[Q] query positions in the row, ascending
    key_index: torch.Tensor  # int64[sum k_len] key positions, run after run
    cu_seqlens_q: torch.Tensor  # int32[R+1]
    cu_seqlens_k: torch.Tensor  # int32[R+1]
    max_seqlen_q: int
    max_seqlen_k: int

    def to(self, device: torch.device) -> QueryRuns:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return replace(
            self,
            index=move(self.index),
            key_index=move(self.key_index),
            cu_seqlens_q=move(self.cu_seqlens_q),
            cu_seqlens_k=move(self.cu_seqlens_k),
        )


def query_runs(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> QueryRuns | None:
    """QueryRuns for `positions` int64[P] (ascending, each in [0, T)) of a row cut by cu_seqlens
    int[S+1]; None for no position. Computed on the CPU (run counts size the tensors)."""
    positions = positions.detach().to("cpu", torch.int64)
    if positions.numel() == 0:
        return None
    bounds = cu_seqlens.detach().to("cpu", torch.int64)
    if (
        bool((positions[1:] <= positions[:-1]).any())
        or int(positions[0]) < 0
        or int(positions[-1]) >= int(bounds[-1])
    ):
        raise ValueError(f"query positions must ascend strictly within [0, {int(bounds[-1])})")
    sample = torch.searchsorted(bounds[1:], positions, right=True)
    breaks = ((positions[1:] != positions[:-1] + 1) | (sample[1:] != sample[:-1])).nonzero().squeeze(1) + 1
    firsts = [0, *breaks.tolist()]
    lasts = [b - 1 for b in firsts[1:]] + [positions.numel() - 1]
    pos, smp, starts = positions.tolist(), sample.tolist(), bounds.tolist()
    # Per sample: [start, end) of each run (end exclusive), gaps up to MERGE_GAP closed.
    per_sample: dict[int, list[list[int]]] = {}
    for first, last in zip(firsts, lasts, strict=True):
        runs = per_sample.setdefault(smp[first], [])
        if runs and pos[first] - runs[-1][1] <= MERGE_GAP:
            runs[-1][1] = pos[last] + 1
        else:
            runs.append([pos[first], pos[last] + 1])
    spans: list[tuple[int, int, int]] = []  # (key start, query start, end)
    for s, runs in per_sample.items():
        if sum(end - starts[s] for _, end in runs) > MAX_KEY_COPIES * (starts[s + 1] - starts[s]):
            runs = [[runs[0][0], runs[-1][1]]]
        spans.extend((starts[s], a, b) for a, b in runs)
    q_len = torch.tensor([b - a for _, a, b in spans])
    k_len = torch.tensor([b - k for k, _, b in spans])
    return QueryRuns(
        index=torch.cat([torch.arange(a, b) for _, a, b in spans]),
        key_index=torch.cat([torch.arange(k, b) for k, _, b in spans]),
        cu_seqlens_q=F.pad(q_len.cumsum(0), (1, 0)).to(torch.int32),
        cu_seqlens_k=F.pad(k_len.cumsum(0), (1, 0)).to(torch.int32),
        max_seqlen_q=int(q_len.max()),
        max_seqlen_k=int(k_len.max()),
    )


def attend_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: QueryRuns, backend: Backend
) -> torch.Tensor:
    """Attention of q [Q, H, D] (the row's positions runs.index) to the whole row's k/v [T, H_kv, D],
    each run to its keys (QueryRuns) -> [Q, H, D]."""
    return varlen_attention(
        q,
        k.index_select(0, runs.key_index),
        v.index_select(0, runs.key_index),
        runs.cu_seqlens_q,
        runs.max_seqlen_q,
        backend,
        runs.cu_seqlens_k,
        runs.max_seqlen_k,
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: Backend,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sample [cu_seqlens[s], cu_seqlens[s+1]) to itself; with
    `cu_seqlens_k`, of each query segment to its key segment, end-aligned. Shapes: module doc."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    elif max_seqlen_k is None:
        raise ValueError("varlen_attention: cu_seqlens_k given without max_seqlen_k")
    if backend == "flash":
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal=True
        )
    if backend == "fa4":
        return _fa4_varlen(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k)  # type: ignore[arg-type]
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
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **kwargs)
        return cast(torch.Tensor, out)  # (with return_aux it would be a tuple)
    bounds = cu_seqlens.tolist()
    if cu_seqlens_k is not cu_seqlens:
        bounds_k = cu_seqlens_k.tolist()
        return torch.cat(
            [
                cached_attention(q[qs:qe], k[ks:ke], v[ks:ke])
                for qs, qe, ks, ke in zip(bounds[:-1], bounds[1:], bounds_k[:-1], bounds_k[1:], strict=True)
            ]
        )
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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> torch.Tensor:
    out, _ = fa4_varlen_func(
        q,
        k,
        v.contiguous(),
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        causal=True,
    )
    return out


WARM_UP_LENGTHS = (1, 64, 124, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
WARM_UP_QUERY_LENGTHS = (1, 64, 512, 2048)
"""Queries per segment tried against each key length: the last layer's trained runs (QueryRuns)."""


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
    packed row), and for fewer queries than keys (WARM_UP_QUERY_LENGTHS against each length), so
    that kernels compiled at first use (FlashAttention-4's JIT picks its tile configuration by
    length) are built before anything is timed. Returns the seconds it took."""
    started = time.perf_counter()
    rows = [([n], [n]) for n in lengths] + [(list(lengths), list(lengths))]
    rows += [([m], [n]) for n in lengths for m in WARM_UP_QUERY_LENGTHS if m < n]

    def make(t: int, heads: int) -> torch.Tensor:
        return torch.randn(t, heads, head_dim, device=device, dtype=dtype, requires_grad=True)

    for q_lens, k_lens in rows:
        q, k, v = (
            make(sum(q_lens), num_heads),
            make(sum(k_lens), num_kv_heads),
            make(sum(k_lens), num_kv_heads),
        )
        cu_q, cu_k = (
            torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
            for lens in (q_lens, k_lens)
        )
        if q_lens == k_lens:
            out = varlen_attention(q, k, v, cu_q, max(q_lens), backend)
        else:
            out = varlen_attention(q, k, v, cu_q, max(q_lens), backend, cu_k, max(k_lens))
        out.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


class KVCache:
    """One layer's keys and values of the sequence so far (`k`, `v`: [length, H_kv, D]), for generation.

    Kept in a buffer of `capacity` rows (grown when a longer sequence comes): appending a token
    copies one row, where concatenating would copy the whole cache at every step.
    """

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[: self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[: self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' k, v [n, H_kv, D]; returns every position's [length + n, H_kv, D]."""
        end = self.length + k.shape[0]
        if self._k is None or self._v is None or end > self._k.shape[0]:
            size = max(end, self.capacity, 2 * self.length)
            grown_k, grown_v = k.new_empty((size, *k.shape[1:])), v.new_empty((size, *v.shape[1:]))
            if self._k is not None and self._v is not None:
                grown_k[: self.length], grown_v[: self.length] = (
                    self._k[: self.length],
                    self._v[: self.length],
                )
            self._k, self._v = grown_k, grown_v
        self._k[self.length : end], self._v[self.length : end] = k, v
        self.length = end
        return self._k[:end], self._v[:end]


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
