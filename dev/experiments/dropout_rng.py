"""What the LoRA layer's two dropouts cost under torch.compile, and cheaper ways to draw them.

The fused LoRA layer (trainer/lora.py) drops its input twice, independently (Plora's and LoRA's
dropout, p = 0.05 each). Inductor draws one Philox call per element per dropout (or per four
elements where its `rand4x` helper exists): `standard`. `randint64` draws ONE 64-bit random
integer per element and reads both keep/drop decisions from two 31-bit fields of it: half the
Philox calls (p resolved to 2⁻³¹). `hashed` (`two_dropouts`' default) reads them from the two
16-bit halves of a keyed 32-bit hash of the element's index: no Philox per element (p resolved to
2⁻¹⁶). Timed: silu(a)·b → two dropouts → the two A-matmuls, forward + backward, compiled, at the
w2 input's shape [T, 14336] and the other linears' [T, 4096]; also the peak memory of the step.

    python -m dev.experiments.dropout_rng --out-json dropout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.lora import two_dropouts

P = 0.05


def standard(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.dropout(x, P, True), F.dropout(x, P, True)


def randint64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return two_dropouts(x, P, P, True, hashed=False)


def hashed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return two_dropouts(x, P, P, True)


KINDS = (("standard", standard), ("randint64", randint64), ("hashed", hashed))


def step(kind, a, b, a1, a2):
    x = F.silu(a) * b
    x1, x2 = kind(x)
    return F.linear(x1, a1).float().sum() + F.linear(x2, a2).float().sum()


def time_it(fn, args, iters: int = 10) -> tuple[float, float]:
    """(median ms, peak GiB allocated) of forward + backward."""
    for _ in range(3):
        fn(*args).backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn(*args).backward()
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
            # Compiled, as timed (eagerly `two_dropouts` is two F.dropout calls).
            draw = torch.compile(kind, dynamic=True)
            x1, x2 = draw(torch.ones(args.tokens, width, device="cuda", dtype=torch.bfloat16))
            row[f"{name}_drop_rate"] = [float((x1 == 0).float().mean()), float((x2 == 0).float().mean())]
            row[f"{name}_both_dropped"] = float(((x1 == 0) & (x2 == 0)).float().mean())
        rows.append(row)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "inductor_rand4x": hasattr(helpers, "rand4x"),
        "rows": rows,
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
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
