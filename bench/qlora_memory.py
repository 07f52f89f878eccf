"""QLoRA vs LoRA on one GPU: peak memory and tokens/s at 4k/8k/16k rows, and the longest row that
trains within 24 GB and 48 GB cards' memory (issue 27).

Through the product's step: the `7b` preset (random init, bf16, real vocabulary 92,544) is built by
`trainer.model.build_model`, quantized by `trainer.qlora.quantize_base` (qlora) and wrapped by
`trainer.modelio.apply_recipe` with the recipe's resolved `TrainConfig` (PEFT LoRA r64 on the five
linears, fix_vit, fix_sampler, every decoder layer recomputed), then run by DeepSpeed (the config of
`trainer.config.deepspeed_config`: ZeRO-1, bf16) through `trainer.train.train_step` on one packed
row per optimizer step (global batch 1). One difference from `xc-train --recipe qlora`: the bench
builds the 16-bit model on the GPU and quantizes it there (xc-train reads it on the CPU, so the GPU
never holds it); peaks are reset after the build, so they measure training alone.

Rows: bench/max_length.py's `synthetic_row` (real-sized samples at hd 18, images and text, random
ids and tiles, 40 % of text tokens trained). Per recipe: the table at --lengths (one warm-up step,
then --steps timed ones), then for each --budgets-gib the allocator is capped with
`torch.cuda.set_per_process_memory_fraction(budget / card memory)` and bench/max_length.py's
search (doubling, then bisection to --granularity) finds the longest row whose step completes.
The budgets: a 24 GB card (24,564 MiB, e.g. RTX 4090) and a 48 GB card (46,068 MiB, L40S, RTX
A6000), each less 0.6 GiB for the CUDA context: 23.4 and 44.4 GiB.

    python -m bench.qlora_memory --recipes qlora --out-json qlora.json
    python -m bench.qlora_memory --recipes lora --out-json lora.json
    python -m bench.qlora_memory --preset tiny --lengths 256 --budgets-gib    # CPU: the table only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import package_versions
from bench.max_length import REAL_VOCAB_SIZE, search, synthetic_row
from trainer.batch import PackedBatch
from trainer.config import TrainConfig, deepspeed_config
from trainer.model import build_model
from trainer.model_config import TINY_VOCAB_SIZE
from trainer.modelio import Loaded, apply_recipe
from trainer.train import Dist, setup_distributed, train_step, trainable_groups


def build(recipe: str, preset: str, d: Dist, vocab: int, seed: int) -> tuple[Any, TrainConfig]:
    """The recipe's model in a DeepSpeed engine, as trainer/train.py builds it."""
    import deepspeed

    cfg = TrainConfig(shards=Path("."), model=preset, recipe=recipe, global_batch_size=1).resolve()
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    model = build_model(preset, seed=seed, dtype=dtype, device=d.device, vocab_size=vocab)
    loaded = Loaded(model, None, preset, f"{preset} preset, random init")
    if recipe == "qlora":
        from trainer.qlora import quantize_base

        quantize_base(loaded.model, d.device)
    model = apply_recipe(loaded, cfg).model
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(
        trainable_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=d.device.type == "cuda",
    )
    ds_config = deepspeed_config(cfg, world_size=1, bf16=d.device.type == "cuda")
    ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, cfg


def packed_row(length: int, hd_num: int, vocab: int, seed: int, device: torch.device) -> PackedBatch:
    row = synthetic_row(length, hd_num, vocab, seed)
    trained = int((row["targets"] != -100).sum())
    samples = int(row["cu_seqlens"].numel() - 1)
    return PackedBatch(
        **row,
        sample_keys=[("bench", i, i) for i in range(samples)],
        num_tokens=length,
        num_trained=trained,
        global_num_trained=trained,
        global_num_tokens=length,
    ).to(device)


def steps(engine: Any, cfg: TrainConfig, d: Dist, length: int, count: int, args: argparse.Namespace) -> dict:
    """`count` optimizer steps on one row of `length` tokens (after the caller's warm-up): ok,
    seconds per step, tokens/s, peak memory since the last reset."""
    batch = packed_row(length, args.hd_num, engine.module.config.vocab_size, args.seed, d.device)
    info: dict[str, Any] = {"length": length, "images": int(batch.image_grids.shape[0])}
    try:
        started = time.perf_counter()
        for _ in range(count):
            result = train_step(engine, [batch], d, 1, cfg, per_source=False)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        seconds = (time.perf_counter() - started) / count
        info.update(ok=True, loss=result["loss"], step_s=seconds, tokens_per_s=length / seconds)
    except torch.cuda.OutOfMemoryError as e:
        info.update(ok=False, error=str(e).splitlines()[0][:200])
    # Outside the except block: its frames no longer hold the activations.
    engine.optimizer.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        info["peak_allocated_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        info["peak_reserved_gib"] = torch.cuda.max_memory_reserved(d.device) / 2**30
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)
    return info


def longest_row(
    engine: Any,
    cfg: TrainConfig,
    d: Dist,
    budget: float,
    total_gib: float,
    time_s: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The longest row whose step completes with the allocator capped at `budget` GiB."""
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total_gib), d.device)
    trials: list[dict[str, Any]] = []
    deadline = time.perf_counter() + time_s

    def run(length: int) -> dict[str, Any]:
        info = steps(engine, cfg, d, length, 1, args)
        info["seconds"] = info.get("step_s", 0.0)
        trials.append(info)
        print(f"  cap {budget} GiB, {length:,}: {'ok' if info['ok'] else 'OOM'}", file=sys.stderr, flush=True)
        return info

    try:
        lo, hi, stop = search(
            run,
            start=min(args.lengths),
            granularity=args.granularity,
            max_tokens=args.max_tokens,
            time_left_s=lambda: deadline - time.perf_counter(),
            capacity_gib=budget,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, d.device)
    return {"budget_gib": budget, "longest_ok": lo, "shortest_oom": hi, "stop": stop, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["qlora", "lora"], choices=("qlora", "lora"))
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--budgets-gib", nargs="*", type=float, default=[23.4, 44.4])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per length (after one warm-up)")
    parser.add_argument("--granularity", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=1 << 18)
    parser.add_argument("--time-budget-s", type=float, default=540.0, help="for all recipes together")
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    d = setup_distributed()
    cuda = d.device.type == "cuda"
    vocab = REAL_VOCAB_SIZE if args.preset == "7b" else TINY_VOCAB_SIZE
    total_gib = torch.cuda.get_device_properties(d.device).total_memory / 2**30 if cuda else None
    card = torch.cuda.get_device_name(d.device) if cuda else "cpu"
    results: dict[str, Any] = {
        "bench": "qlora_memory",
        "command": ["python", "-m", "bench.qlora_memory", *(sys.argv[1:] if argv is None else argv)],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": card,
        "gpu_memory_gib": total_gib,
        "versions": package_versions(),
        "preset": args.preset,
        "recipes": {},
    }

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        if args.out_json is not None:
            args.out_json.write_text(json.dumps(results, indent=2) + "\n")

    for recipe in args.recipes:
        built = time.perf_counter()
        engine, cfg = build(recipe, args.preset, d, vocab, args.seed)
        out: dict[str, Any] = {"build_s": time.perf_counter() - built, "table": [], "budgets": []}
        if cuda:
            out["weights_gib"] = torch.cuda.memory_allocated(d.device) / 2**30
            torch.cuda.reset_peak_memory_stats(d.device)
        results["recipes"][recipe] = out
        print(
            f"{card} | {recipe}: built in {out['build_s']:.0f} s, {out.get('weights_gib', 0):.1f} GiB",
            file=sys.stderr,
        )
        steps(engine, cfg, d, min(args.lengths), 1, args)  # warm-up: kernels, optimizer state
        for length in args.lengths:
            steps(engine, cfg, d, length, 1, args)
            info = steps(engine, cfg, d, length, args.steps, args)
            out["table"].append(info)
            print(f"  {length:,}: {info}", file=sys.stderr, flush=True)
            save()
        for budget in args.budgets_gib if cuda else []:
            assert total_gib is not None
            time_left = (args.time_budget_s - (time.perf_counter() - started)) / 2
            out["budgets"].append(longest_row(engine, cfg, d, budget, total_gib, time_left, args))
            save()
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    print(f"\n{card}, {args.preset}, hd {args.hd_num}, global batch 1, ZeRO-1, every layer recomputed")
    print(
        "| recipe | row tokens | tokens/s | peak allocated GiB | peak reserved GiB |\n|---|---|---|---|---|"
    )
    for recipe, out in results["recipes"].items():
        for t in out["table"]:
            tps = f"{t['tokens_per_s']:,.0f}" if t["ok"] else "OOM"
            print(
                f"| {recipe} | {t['length']:,} | {tps} | {t.get('peak_allocated_gib', 0):.1f} | {t.get('peak_reserved_gib', 0):.1f} |"
            )
    print("\n| recipe | budget GiB | longest row that trains | shortest OOM | stop |\n|---|---|---|---|---|")
    for recipe, out in results["recipes"].items():
        for b in out["budgets"]:
            print(f"| {recipe} | {b['budget_gib']} | {b['longest_ok']} | {b['shortest_oom']} | {b['stop']} |")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
