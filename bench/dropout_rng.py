"""What the LoRA layer's two dropouts cost under torch.compile, and cheaper ways to draw them.

The fused LoRA layer (trainer/lora.py) drops its input twice, independently (Plora's and LoRA's
dropout, p = 0.05 each). Inductor draws one Philox call per element per dropout (or per four
elements where its `rand4x` helper exists): `standard`. `randint64` draws ONE 64-bit random
integer per element and reads both keep/drop decisions from two 31-bit fields of it: half the
Philox calls (p resolved to 2⁻³¹). `hashed` (`two_dropouts`' default) reads them from the two
16-bit halves of a keyed 32-bit hash of the element's index: no Philox per element (p resolved to
2⁻¹⁶). `kernel` applies those hashed masks inside the A-matmuls instead (trainer/lora_kernels.py,
the layer's default on CUDA): no dropped copies of the input. Timed: silu(a)·b → two dropouts → the
two A-matmuls, forward + backward, compiled, at the w2 input's shape [T, 14336] and the other
linears' [T, 4096]; also the peak memory of the step. `--configs` also times the kernels' tile
configurations.

    python bench/dropout_rng.py --out-json dropout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import lora_kernels  # noqa: E402
from trainer.lora import _HASH_FIELD, _hash_threshold, dropped_low_rank_in, two_dropouts  # noqa: E402

P = 0.05


def standard(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.dropout(x, P, True), F.dropout(x, P, True)


def randint64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return two_dropouts(x, P, P, True, hashed=False)


def hashed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return two_dropouts(x, P, P, True)


def kernel(x: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two A-matmuls of the hashed dropouts with the masks applied inside (h₁, h₂)."""
    t = _hash_threshold(P)
    keys = torch.randint(-(1 << 31), 1 << 31, (2,), dtype=torch.int32, device=x.device)
    ones = x.new_ones(x.shape[0])
    scale = _HASH_FIELD / (_HASH_FIELD - t)
    return dropped_low_rank_in(x, a1, a2, ones, keys, t, t, scale, scale)


KINDS = (("standard", standard), ("randint64", randint64), ("hashed", hashed), ("kernel", None))


def step(kind, a, b, a1, a2):
    x = F.silu(a) * b
    if kind is None:
        h1, h2 = kernel(x, a1, a2)
        return h1.float().sum() + h2.float().sum()
    x1, x2 = kind(x)
    return F.linear(x1, a1).float().sum() + F.linear(x2, a2).float().sum()


CONFIGS = {
    "FORWARD_CONFIG": [
        {"BM": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BK": 128, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BK": 32, "num_warps": 4, "num_stages": 4},
        {"BM": 128, "BK": 64, "num_warps": 16, "num_stages": 3},
    ],
    "INPUT_GRAD_CONFIG": [
        {"BM": 128, "BN": 128, "BR": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 256, "BR": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 128, "BR": 64, "num_warps": 4, "num_stages": 3},
        {"BM": 128, "BN": 128, "BR": 32, "num_warps": 4, "num_stages": 4},
    ],
    "WEIGHT_GRAD_CONFIG": [
        {"BT": 64, "BN": 128, "num_warps": 8, "num_stages": 3},
        {"BT": 128, "BN": 128, "num_warps": 8, "num_stages": 3},
        {"BT": 64, "BN": 64, "num_warps": 4, "num_stages": 4},
        {"BT": 128, "BN": 256, "num_warps": 8, "num_stages": 3},
    ],
}
"""Tile configurations of trainer/lora_kernels.py timed by --configs (the first: the default)."""


def time_configs(tokens: int) -> list[dict]:
    """Each kernel's forward or gradient alone under each of its CONFIGS, at both widths."""
    rows = []
    for width in (14336, 4096):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        a1 = torch.randn(256, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        a2 = torch.randn(64, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        g1 = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
        g2 = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        keys = torch.tensor([123, 456], dtype=torch.int32, device="cuda")
        ones = x.new_ones(tokens)
        t = _hash_threshold(P)
        calls = {
            "FORWARD_CONFIG": (lora_kernels.launch_forward, (x, a1, a2, ones, keys, t, t, 1.0, 1.0)),
            "INPUT_GRAD_CONFIG": (lora_kernels.launch_input_grad, (g1, g2, a1, a2, keys, t, t)),
            "WEIGHT_GRAD_CONFIG": (lora_kernels.launch_weight_grad, (g2, x, keys, t, False)),
        }
        for name, configs in CONFIGS.items():
            default = getattr(lora_kernels, name)
            for config in configs:
                setattr(lora_kernels, name, config)
                try:
                    ms = time_it(*calls[name], backward=False)[0]
                except Exception as e:  # a configuration that does not fit (registers, shared memory)
                    ms = f"failed: {type(e).__name__}"
                rows.append({"width": width, "kernel": name, "config": config, "ms": ms})
            setattr(lora_kernels, name, default)
    return rows


def time_it(fn, args, iters: int = 10, backward: bool = True) -> tuple[float, float]:
    """(median ms, peak GiB allocated) of forward + backward (or of the call alone)."""
    run = (lambda: fn(*args).backward()) if backward else (lambda: fn(*args))
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--configs", action="store_true", help="also time the kernels' tile configurations")
    args = parser.parse_args()
    import torch._inductor.runtime.triton_helpers as helpers

    rows = []
    for width in (14336, 4096):
        gen = torch.Generator(device="cuda").manual_seed(0)
        a, b = (
            torch.randn(
                args.tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen
            ).requires_grad_()
            for _ in range(2)
        )
        a1 = torch.randn(256, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        a2 = torch.randn(64, width, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        row = {"shape": [args.tokens, width]}
        for name, kind in KINDS:
            fn = torch.compile(lambda a, b, a1, a2, kind=kind: step(kind, a, b, a1, a2), dynamic=True)
            row[f"{name}_ms"], row[f"{name}_peak_gib"] = time_it(fn, (a, b, a1, a2))
            ones = torch.ones(args.tokens, width, device="cuda", dtype=torch.bfloat16)
            if kind is None:  # the masks of the first 64 columns, read through one-hot A rows
                eye1, eye2 = (torch.eye(r, width, device="cuda", dtype=torch.bfloat16) for r in (64, 64))
                x1, x2 = kernel(ones, eye1, eye2)
            else:  # compiled, as timed (eagerly `two_dropouts` is two F.dropout calls)
                x1, x2 = torch.compile(kind, dynamic=True)(ones)
            row[f"{name}_drop_rate"] = [float((x1 == 0).float().mean()), float((x2 == 0).float().mean())]
            row[f"{name}_both_dropped"] = float(((x1 == 0) & (x2 == 0)).float().mean())
        rows.append(row)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "inductor_rand4x": hasattr(helpers, "rand4x"),
        "rows": rows,
        "configs": time_configs(args.tokens) if args.configs else [],
    }
    print(json.dumps(result, indent=1))
    print("| shape | draw | fwd+bwd ms | peak GiB | drop rates | both dropped (p² = 0.0025) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for name, _ in KINDS:
            rates = ", ".join(f"{v:.5f}" for v in r[f"{name}_drop_rate"])
            print(
                f"| {r['shape']} | {name} | {r[f'{name}_ms']:.2f} | {r[f'{name}_peak_gib']:.2f} | {rates} | "
                f"{r[f'{name}_both_dropped']:.5f} |"
            )
    for c in result["configs"]:
        ms = c["ms"] if isinstance(c["ms"], str) else f"{c['ms']:.3f} ms"
        print(f"| {c['width']} | {c['kernel']} | {c['config']} | {ms} |")
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
