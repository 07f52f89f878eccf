"""Time and peak GPU memory of one forward + backward of a preset model on a synthetic packed row.

  python -m dev.experiments.model_step --preset 7b --tokens 16384 --images 2 --grid 3x4 --trainable all

Random init on the device (no checkpoint needed), bf16, per-layer gradient checkpointing on,
the chunked loss. --trainable: all (full fine-tuning), no-vit (fix_vit), plora (only Plora_A/B:
a stand-in for adapter training's frozen base).
Optimizer state is not allocated: this measures activations + gradients, not a whole step.
"""

from __future__ import annotations

import argparse
import time

import torch

from schemas.sample import image_token_count
from trainer.model import build_model, num_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="7b")
    parser.add_argument("--tokens", type=int, default=16384, help="row length T")
    parser.add_argument("--samples", type=int, default=3, help="samples packed in the row")
    parser.add_argument("--images", type=int, default=2, help="images in the row (one per sample at most)")
    parser.add_argument("--grid", default="3x4", help="rows x cols of local tiles per image")
    parser.add_argument("--trainable", choices=("all", "no-vit", "plora"), default="all")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    model = build_model(args.preset, device=device, dtype=torch.bfloat16, attention=args.attention).train()
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable()
    if args.trainable != "all":
        model.vit.requires_grad_(False)
    if args.trainable == "plora":
        for name, p in model.named_parameters():
            p.requires_grad_("Plora_" in name)
    rows, cols = (int(x) for x in args.grid.split("x"))
    per_sample = args.tokens // args.samples
    if args.images and image_token_count(rows, cols) + 16 > per_sample:
        raise SystemExit(
            f"a {args.grid} image ({image_token_count(rows, cols)} tokens) does not fit {per_sample}-token samples"
        )
    lengths = [per_sample] * (args.samples - 1) + [args.tokens - per_sample * (args.samples - 1)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    starts = [int(cu[i]) + 8 for i in range(min(args.images, args.samples))]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), generator=gen)
    row = {
        "input_ids": ids.to(device),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None].to(device),
        "cu_seqlens": cu.to(device),
        "max_seqlen": max(lengths),
        "tiles": torch.randint(
            0, 256, (len(starts) * rows * cols, 560, 560, 3), dtype=torch.uint8, generator=gen
        ),
        "image_grids": torch.tensor([[rows, cols]] * len(starts)),
        "image_starts": torch.tensor(starts),
        "targets": ids.roll(-1, 1).to(device),
    }
    print(
        f"{args.preset}: {num_parameters(model) / 1e9:.2f} B parameters ({num_parameters(model, True) / 1e9:.2f} B "
        f"trainable) + {model.unused_adapter_numel() / 1e9:.2f} B unused adapters on the CPU; "
        f"T={args.tokens:,} in {args.samples} samples, {len(starts)} images of {args.grid} "
        f"({len(starts) * image_token_count(rows, cols):,} image tokens), trainable={args.trainable}, "
        f"checkpointing={'off' if args.no_checkpointing else 'on'}"
    )
    base = torch.cuda.memory_allocated()
    for step in range(args.steps):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(**row)
        (out.loss_sum / out.num_tokens).backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        print(
            f"step {step}: {seconds:.3f} s, {args.tokens / seconds:,.0f} tok/s, loss {out.loss_sum.item() / out.num_tokens:.4f}, "
            f"peak {peak / 2**30:.1f} GiB (weights {base / 2**30:.1f} GiB)"
        )
        model.zero_grad(set_to_none=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
