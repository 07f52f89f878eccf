"""Causal attention over packed rows, kernel against kernel, on one GPU (issue 8, item 4).

The decoder's attention at IXC2.5-7B's shapes (32 query heads, 8 K/V heads, head dim 128, bf16)
over packed rows of real-sized samples. Each kernel gets the same q/k/v and output gradient:
  varlen        trainer.attention 'varlen': torch varlen_attn (the FA2 code in torch's flash
                backend), K/V repeated to 32 heads where this torch has no enable_gqa
  varlen-gqa    torch varlen_attn given the 8 K/V heads as they are
  fa4           trainer.attention 'fa4': FlashAttention-4 (flash-attn-4), where installed
  fa4-repeat    the same with K/V repeated to 32 heads (no grouped dK/dV accumulation in backward)
  cudnn         cuDNN's ragged fused attention over the whole row (aten._cudnn_attention_forward
                with cu_seqlens, the op under torch's nested-tensor SDPA), K/V repeated
  cudnn-gqa     the same op given the 8 K/V heads
  sdpa-cudnn    F.scaled_dot_product_attention one sample at a time, cuDNN backend only
  sdpa-flash    the same, flash backend only (enable_gqa)
  flash         flash-attn's flash_attn_varlen_func, where installed
A kernel that raises is reported with its error and skipped.

Correctness: on a small mixed row every kernel's output and q/k/v gradients are compared with
float32 per-sample attention (math backend); reported as max |diff| / max |reference|.
Timing: CUDA events, median of --repeats after --warmup, forward alone and forward + backward.
FLOPs (model FLOPs, causal): forward 2·H·D·Σ s_i² per layer (QKᵀ and AV, half of each);
backward twice the forward; TFLOP/s = those FLOPs / time.

    python -m dev.experiments.attention_kernels --out-json attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer import attention

# Rows as packed by the throughput bench's mix: multi-image (≈ 11.9k tokens), single-image
# (≈ 4.8k), text-only (≈ 300); the last two rows are the text-heavy and long-context extremes.
DEFAULT_ROWS = "11900,3900,300;4800,4800,4800,1400,300;8000,6000,2000;400x40;65536"

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def parse_rows(text: str) -> list[list[int]]:
    rows = []
    for item in text.split(";"):
        lengths: list[int] = []
        for part in item.split(","):
            size, _, times = part.strip().partition("x")
            lengths += [int(size)] * int(times or 1)
        rows.append(lengths)
    return rows


def per_sample_sdpa(backend: Any) -> Kernel:
    from torch.nn.attention import sdpa_kernel

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        bounds = cu.tolist()
        outs = []
        with sdpa_kernel([backend]):
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
                if ks.shape[1] != qs.shape[1] and backend.name == "CUDNN_ATTENTION":
                    rep = qs.shape[1] // ks.shape[1]
                    ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
                out = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, enable_gqa=ks.shape[1] != qs.shape[1]
                )
                outs.append(out[0].transpose(0, 1))
        return torch.cat(outs, dim=0)

    return run


def varlen_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int
) -> torch.Tensor:
    kwargs: dict[str, Any] = {}
    params = attention._VARLEN_PARAMS
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return attention.varlen_attn(q, k, v.contiguous(), cu, cu, max_len, max_len, **kwargs)


def cudnn_ragged(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, repeat: bool
) -> torch.Tensor:
    if repeat:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.ops.aten._cudnn_attention_forward(
        q, k.contiguous(), v.contiguous(), None, cu, cu, max_len, max_len, True, 0.0, True, False
    )
    return out[0]


def kernels() -> dict[str, Kernel]:
    from torch.nn.attention import SDPBackend

    found: dict[str, Kernel] = {
        "varlen": lambda q, k, v, cu, m: attention.varlen_attention(q, k, v, cu, m, "varlen"),
        "varlen-gqa": varlen_grouped,
        "cudnn": lambda q, k, v, cu, m: cudnn_ragged(q, k, v, cu, m, repeat=True),
        "cudnn-gqa": lambda q, k, v, cu, m: cudnn_ragged(q, k, v, cu, m, repeat=False),
        "sdpa-cudnn": per_sample_sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": per_sample_sdpa(SDPBackend.FLASH_ATTENTION),
    }
    if attention.fa4_varlen_func is not None:
        found["fa4"] = lambda q, k, v, cu, m: attention.varlen_attention(q, k, v, cu, m, "fa4")
        found["fa4-repeat"] = lambda q, k, v, cu, m: attention.varlen_attention(
            q,
            k.repeat_interleave(q.shape[1] // k.shape[1], dim=1),
            v.repeat_interleave(q.shape[1] // v.shape[1], dim=1),
            cu,
            m,
            "fa4",
        )
    if attention.flash_attn_varlen_func is not None:
        found["flash"] = lambda q, k, v, cu, m: attention.varlen_attention(q, k, v, cu, m, "flash")
    return found


def make_inputs(
    lengths: list[int], heads: int, kv_heads: int, head_dim: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(seed)
    t = sum(lengths)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    q, k, v = randn(t, heads, head_dim), randn(t, kv_heads, head_dim), randn(t, kv_heads, head_dim)
    grad = randn(t, heads, head_dim)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, grad, cu


def run_once(
    kernel: Kernel, inputs: tuple[torch.Tensor, ...], max_len: int, backward: bool
) -> list[torch.Tensor]:
    q, k, v, grad, cu = inputs
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = kernel(q, k, v, cu, max_len)
    if not backward:
        return [out]
    out.backward(grad)
    return [out, q.grad, k.grad, v.grad]  # type: ignore[list-item]


def check(kernel: Kernel, device: torch.device, heads: int, kv_heads: int, head_dim: int) -> dict[str, float]:
    lengths = [700, 1, 300, 1029]
    inputs = make_inputs(lengths, heads, kv_heads, head_dim, device, seed=1)
    got = run_once(kernel, inputs, max(lengths), backward=True)
    q, k, v, grad, cu = inputs
    ref = run_once(
        lambda *a: attention.varlen_attention(*a, "sdpa"),
        (q.float(), k.float(), v.float(), grad.float(), cu),
        max(lengths),
        backward=True,
    )
    return {
        name: float((g.float() - r).abs().max() / r.abs().max())
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
    }


def timed(
    kernel: Kernel, inputs: tuple[torch.Tensor, ...], max_len: int, backward: bool, warmup: int, repeats: int
) -> float:
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once(kernel, inputs, max_len, backward)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        default=DEFAULT_ROWS,
        help="';'-separated rows of ','-separated sample lengths (NxK = K samples of N)",
    )
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kernels", default=None, help="comma-separated subset of the kernels (default all)")
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    available = kernels()
    chosen = args.kernels.split(",") if args.kernels else list(available)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "shape": {
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": "bfloat16",
        },
        "check": {},
        "rows": [],
    }
    for name in chosen:
        try:
            results["check"][name] = check(available[name], device, args.heads, args.kv_heads, args.head_dim)
        except Exception as exc:  # noqa: BLE001 — a kernel that cannot run is a result
            results["check"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"check {name}: {results['check'][name]}", file=sys.stderr, flush=True)
    for lengths in parse_rows(args.rows):
        inputs = make_inputs(lengths, args.heads, args.kv_heads, args.head_dim, device, seed=0)
        fwd_flops = 2 * args.heads * args.head_dim * sum(s * s for s in lengths)
        row: dict[str, Any] = {
            "tokens": sum(lengths),
            "samples": len(lengths),
            "lengths": lengths,
            "kernels": {},
        }
        for name in chosen:
            if "error" in results["check"][name]:
                continue
            try:
                fwd = timed(available[name], inputs, max(lengths), False, args.warmup, args.repeats)
                both = timed(available[name], inputs, max(lengths), True, args.warmup, args.repeats)
                row["kernels"][name] = {
                    "fwd_ms": fwd * 1000,
                    "fwd_bwd_ms": both * 1000,
                    "fwd_tflops": fwd_flops / fwd / 1e12,
                    "fwd_bwd_tflops": 3 * fwd_flops / both / 1e12,
                }
            except Exception as exc:  # noqa: BLE001
                row["kernels"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                traceback.print_exc()
            torch.cuda.empty_cache()
        results["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{results['card']} | torch {results['torch']} | cuDNN {results['cudnn']} | {results['shape']} | {results['date']}"
    )
    print("\n| kernel | max rel. error vs fp32 (out, dq, dk, dv) |\n|---|---|")
    for name, c in results["check"].items():
        text = c.get("error") or ", ".join(f"{c[k]:.1e}" for k in ("out", "dq", "dk", "dv"))
        print(f"| {name} | {text} |")
    names = [n for n, c in results["check"].items() if "error" not in c]
    for title, ms, tflops in (
        ("forward + backward", "fwd_bwd_ms", "fwd_bwd_tflops"),
        ("forward", "fwd_ms", "fwd_tflops"),
    ):
        print(f"\n{title}: ms (TFLOP/s)\n")
        print("| row (tokens, samples) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for row in results["rows"]:
            cells = []
            for n in names:
                k = row["kernels"].get(n)
                cells.append(
                    "–" if k is None else "error" if "error" in k else f"{k[ms]:.1f} ({k[tflops]:.0f})"
                )
            print(f"| {row['tokens']:,}, {row['samples']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
