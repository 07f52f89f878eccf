"""Peak memory and time of the LM loss at 16k tokens × 92,544 vocab: chunked vs full fp32 logits.

The official code computes `output(hidden).float()` for every position, then one cross-entropy:
16,384 × 92,544 × 4 bytes = 6.07 GB of logits alone. `trainer.loss.chunked_cross_entropy` keeps
one chunk of logits alive at a time and recomputes it in backward.

Measured: forward + backward of the loss only (hidden [T, D] and the head weight [V, D] are
allocated beforehand and not counted; their gradients are). On CUDA from the allocator's peak
statistics; on CPU from the peak RSS of a fresh subprocess per method (ru_maxrss).

  python -m dev.experiments.loss_memory             # CUDA if present, 16,384 tokens, bf16
  python -m dev.experiments.loss_memory --device cpu --tokens 2048 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from schemas.sample import IGNORE_INDEX
from trainer.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy, plain_cross_entropy

GB = 1e9
REPO_ROOT = Path(__file__).resolve().parents[2]


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (
        torch.randn(args.vocab, args.hidden, device=device, dtype=dtype, generator=gen) * 0.02
    ).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    targets[torch.rand(args.tokens, device=device, generator=gen) >= args.trained_fraction] = IGNORE_INDEX

    def run() -> float:
        hidden.grad = weight.grad = None
        if method == "plain":
            loss, n = plain_cross_entropy(hidden, weight, targets)
        else:
            loss, n = chunked_cross_entropy(hidden, weight, targets, args.chunk)
        (loss / max(n, 1)).backward()
        return loss.item() / max(n, 1)

    if device.type == "cuda":
        run()  # warm-up (kernels, allocator)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        loss = run()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_gb": peak / GB, "seconds": seconds, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384, help="positions in the row (default 16384)")
    parser.add_argument("--vocab", type=int, default=92544, help="vocabulary (default 92544)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096)")
    parser.add_argument(
        "--chunk", type=int, default=DEFAULT_CHUNK_TOKENS, help="chunk_tokens of the chunked loss"
    )
    parser.add_argument(
        "--trained-fraction", type=float, default=1.0, help="share of positions with a target"
    )
    parser.add_argument(
        "--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="chunked,plain", help="comma list of chunked, plain")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # subprocess mode (CPU)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0
    rows = []
    for method in args.methods.split(","):
        if args.device == "cpu":
            # A fresh process per method: ru_maxrss only ever grows.
            cmd = [sys.executable, "-m", "dev.experiments.loss_memory"]
            cmd += [*(argv if argv is not None else sys.argv[1:]), "--one", method]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
            result = json.loads(done.stdout)
        else:
            result = measure(method, args)
            torch.cuda.empty_cache()
        rows.append((method, result))
    logits_gb = args.tokens * args.vocab * 4 / GB
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"loss fwd+bwd, T={args.tokens:,} V={args.vocab:,} D={args.hidden:,} {args.dtype} on {where}, "
        f"chunk {args.chunk}, trained {args.trained_fraction:.0%} (fp32 logits alone: {logits_gb:.2f} GB)"
    )
    print(f"{'method':<10}{'peak GB':>10}{'time s':>10}{'loss':>12}")
    for method, r in rows:
        print(f"{method:<10}{r['peak_gb']:>10.3f}{r['seconds']:>10.3f}{r['loss']:>12.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
