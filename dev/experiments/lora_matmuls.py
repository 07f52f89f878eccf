"""The matmuls of one LoRA + PLoRA linear (issue 8 levers): three ways to add the low-rank update.

For each of IXC2.5-7B's five linear shapes at T tokens (frozen W [O, K], low-rank activations
h [T, 320] = [PLoRA 256 | LoRA 64], B [O, 320]), times on random bf16 data:

  forward
    base+addmm   x Wᵀ, then the update accumulated in place: out.addmm_(h, Bᵀ)
    addmm+base   h Bᵀ first, then the base GEMM accumulates into it: out.addmm_(x, Wᵀ)
                 (trainer/lora.py's order, `linear_plus_low_rank`)
    folded       one GEMM over the concatenated K: [x | h] [W | B]ᵀ
  backward (activation gradients; W frozen)
    two          dy W and dy B
    folded       dy [W | B] (one GEMM giving [dx | dh])
  base only      x Wᵀ, dy W: the floor the low-rank work sits on
also the base GEMMs with Wᵀ stored instead of W, and w1 and w3 (same input) as one GEMM over
their concatenated outputs, forward and backward.

CUDA events, median of --reps after warm-up, variants interleaved per repetition so that clock
changes hit them alike; the card's 8192³ bf16 rate measured first.

    python -m dev.experiments.lora_matmuls --out-json out.json [--blas cublaslt]   # one CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

SHAPES = {  # name: (out, in)
    "wqkv": (6144, 4096),
    "wo": (4096, 4096),
    "w1": (14336, 4096),
    "w3": (14336, 4096),
    "w2": (4096, 14336),
}
RANK = 256 + 64


def time_all(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per variant, the variants run in turn within each repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_peak(rand: Callable[..., torch.Tensor], reps: int, warmup: int) -> float:
    a, b = rand(8192, 8192), rand(8192, 8192)
    return 2 * 8192**3 / (time_all({"mm": lambda: a @ b}, reps, warmup)["mm"] / 1e3)


def measure_linear(
    name: str, T: int, out_f: int, in_f: int, rand: Callable[..., torch.Tensor], reps: int, warmup: int
) -> dict:
    x, h, dy = rand(T, in_f), rand(T, RANK, scale=0.1), rand(T, out_f, scale=1e-3)
    w, bw = rand(out_f, in_f, scale=0.02), rand(out_f, RANK, scale=0.02)
    xcat, wcat, wt = torch.cat((x, h), dim=1), torch.cat((w, bw), dim=1), w.t().contiguous()
    fwd = time_all(
        {
            "base": lambda: x @ w.t(),
            "base+addmm": lambda: (x @ w.t()).addmm_(h, bw.t()),
            "addmm+base": lambda: (h @ bw.t()).addmm_(x, w.t()),
            "folded": lambda: xcat @ wcat.t(),
        },
        reps,
        warmup,
    )
    bwd = time_all(
        {"base": lambda: dy @ w, "two": lambda: (dy @ w, dy @ bw), "folded": lambda: dy @ wcat}, reps, warmup
    )
    layout = time_all(
        {"x Wᵀ, Wᵀ stored [K, O]": lambda: x @ wt, "dy W, Wᵀ stored": lambda: dy @ wt.t()}, reps, warmup
    )
    return {
        "linear": name,
        "out": out_f,
        "in": in_f,
        "forward_ms": fwd,
        "backward_ms": bwd,
        "layout_ms": layout,
        "base_forward_tflops": 2 * T * in_f * out_f / (fwd["base"] / 1e3) / 1e12,
    }


def measure_w13(T: int, rand: Callable[..., torch.Tensor], reps: int, warmup: int) -> dict[str, float]:
    """w1 and w3 read the same input: one GEMM over their concatenated outputs, and in backward
    one over the concatenated gradients (dx = dy₁ W₁ + dy₃ W₃ without the add)."""
    x, w1, w3 = rand(T, 4096), rand(14336, 4096, scale=0.02), rand(14336, 4096, scale=0.02)
    dy1, dy3 = rand(T, 14336, scale=1e-3), rand(T, 14336, scale=1e-3)
    w13, dy13 = torch.cat((w1, w3)), torch.cat((dy1, dy3), dim=1)
    return time_all(
        {
            "fwd two": lambda: (x @ w1.t(), x @ w3.t()),
            "fwd fused": lambda: x @ w13.t(),
            "bwd two+add": lambda: (dy1 @ w1).add_(dy3 @ w3),
            "bwd two addmm": lambda: (dy1 @ w1).addmm_(dy3, w3),
            "bwd fused": lambda: dy13 @ w13,
        },
        reps,
        warmup,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--blas", choices=("cublas", "cublaslt"), default=None, help="torch's preferred BLAS library"
    )
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dev/experiments/lora_matmuls.py times CUDA matmuls: no CUDA device here")
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen) * scale

    rate = measure_peak(rand, args.reps, args.warmup)
    T = args.tokens
    rows = [measure_linear(name, T, *shape, rand, args.reps, args.warmup) for name, shape in SHAPES.items()]
    fused = measure_w13(T, rand, args.reps, args.warmup)
    print(f"matmul 8192³ bf16: {rate / 1e12:.0f} TFLOP/s; T = {T}; times in ms (median of {args.reps})")
    print("| linear | fwd base | base+addmm | addmm+base | folded | bwd base | two | folded |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {k: 0.0 for k in ("fb", "fa", "fr", "ff", "bb", "bt", "bf")}
    for r in rows:
        f, bk = r["forward_ms"], r["backward_ms"]
        vals = (f["base"], f["base+addmm"], f["addmm+base"], f["folded"], bk["base"], bk["two"], bk["folded"])
        for key, v in zip(totals, vals, strict=True):
            totals[key] += v
        print(f"| {r['linear']} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print("| layer | " + " | ".join(f"{v:.3f}" for v in totals.values()) + " |")
    for r in rows:
        print(r["linear"], " ".join(f"{k}: {v:.3f}" for k, v in r["layout_ms"].items()))
    print("w1+w3:", " ".join(f"{k}: {v:.3f}" for k, v in fused.items()))
    if args.out_json:
        with open(args.out_json, "w") as fh:
            json.dump(
                {
                    "matmul_tflops": rate / 1e12,
                    "tokens": T,
                    "rows": rows,
                    "layer_ms": totals,
                    "w13_ms": fused,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
