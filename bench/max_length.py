"""The largest max_length that trains on this GPU: LoRA, hd 18, one packed row, one full step (issue 8).

The model and recipe of bench/train_throughput.py (the `7b` preset, random init, bf16, PEFT LoRA
r64 on the five linears, fix_vit, fix_sampler, gradient checkpointing, chunked loss), driven as
its official mode is (bench/common.py's `build_lora_model`: torch's fused AdamW, gradient
clipping, no DeepSpeed): one forward + backward + optimizer step on one packed row of L tokens.
xc-train's DeepSpeed engine keeps fp32 master copies of the trainable weights and AdamW's state in
fp32 (at least 8 bytes more per trainable parameter than here: ≥ 1.2 GB for the 7B's 151 M LoRA
parameters): leave that much spare.
A trial passes when that step completes; torch.cuda.OutOfMemoryError fails it (the cache is then
emptied before the next trial).

The row: real-sized samples, repeated until the row is full. The cycle mirrors the throughput
bench's mix at hd 18 — a single photo with two answers, two or three photos with a multi-turn
comparison, a text-only answer — using the HD grids of its photo sizes (640×480 → 2×2 tiles,
1024×768 → 3×3, 1280×960 → 3×4, 1080×1440 → 4×3), each image taking its exact token count; the
last sample is text-only and fills the row to exactly L. No sample exceeds 16,384 tokens, so
attention stays per sample (varlen); token ids and tile pixels are random (uint8, not zeros);
40 % of each sample's text tokens are trained.

Search: L doubles from --start until a step fails (or a fit of peak memory against L predicts
the doubling would not fit), then bisects to --granularity (1,024) tokens; each guess inside
the bracket alternates between the memory fit's prediction and the midpoint. The search stops
when --time-budget-s would be exceeded by the next trial (its time predicted from the last
one) and reports the best length so far and the open bracket.

    python -m bench.max_length --out-json max_length.json --time-budget-s 240
    python -m bench.max_length --preset tiny --start 1024 --hd-num 2        # CPU: one size only
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import bench_header, build_lora_model, device_name, package_versions, sync, write_json
from pipeline.tiling import hd_grid
from schemas.sample import IGNORE_INDEX, TILE_SIZE, image_token_count
from trainer.model_config import TINY_VOCAB_SIZE

REAL_VOCAB_SIZE = 92544
SAMPLE_CYCLE: tuple[tuple[tuple[tuple[int, int], ...], int], ...] = (
    (((1280, 960),), 420),
    (((1024, 768), (640, 480)), 900),
    ((), 650),
    (((1080, 1440),), 300),
    (((640, 480), (1280, 960), (1024, 768)), 1300),
    ((), 260),
)
"""(photo sizes, text tokens) per sample, cycled; sizes → HD grids at --hd-num."""
TRAINED_FRACTION = 0.4
TILE_BANK = 16


def synthetic_row(
    length: int, hd_num: int, vocab_size: int, seed: int = 0, offset: int = 0
) -> dict[str, Any]:
    """One packed row of exactly `length` tokens from SAMPLE_CYCLE, starting at its `offset`-th entry
    (CPU tensors, model kwargs)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    grids: list[tuple[int, int]] = []
    starts: list[int] = []
    trained = np.zeros(length, dtype=bool)
    at, k = 0, offset
    while at < length:
        sizes, text = SAMPLE_CYCLE[k % len(SAMPLE_CYCLE)]
        k += 1
        sample_grids = [hd_grid(w, h, hd_num, "train") for w, h in sizes]
        image_tokens = [image_token_count(r, c) for r, c in sample_grids]
        n = sum(image_tokens) + text
        if at + n > length:  # the last sample: text only, exactly what is left
            sample_grids, image_tokens, n = [], [], length - at
        cursor = at + 8  # a few text tokens (<s>, the question) before the first image
        image_positions = [np.zeros(0, dtype=np.int64)]
        for grid, tokens in zip(sample_grids, image_tokens, strict=True):
            grids.append(grid)
            starts.append(cursor)
            image_positions.append(np.arange(cursor, cursor + tokens))
            cursor += tokens + 4
        text_positions = np.setdiff1d(np.arange(at, at + n), np.concatenate(image_positions))
        last = text_positions[-max(1, int(TRAINED_FRACTION * len(text_positions))) :]
        trained[last[last < at + n - 1]] = True  # a sample's last position predicts nothing
        lengths.append(n)
        at += n
    num_tiles = sum(r * c for r, c in grids)
    bank = torch.randint(0, 256, (TILE_BANK, TILE_SIZE, TILE_SIZE, 3), dtype=torch.uint8, generator=gen)
    tiles = bank[torch.arange(num_tiles) % TILE_BANK]
    ids = torch.randint(3, vocab_size, (1, length), generator=gen)
    targets = torch.where(torch.from_numpy(trained), ids.roll(-1, 1)[0], IGNORE_INDEX)[None]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return {
        "input_ids": ids,
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
        "tiles": tiles,
        "image_grids": torch.tensor(grids, dtype=torch.int64).view(-1, 2),
        "image_starts": torch.tensor(starts, dtype=torch.int64),
        "targets": targets,
    }


def trial(
    model: Any, optimizer: Any, params: list[Any], length: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One LoRA step on a row of `length` tokens: ok, seconds, peak memory."""
    row = synthetic_row(length, args.hd_num, model.config.vocab_size, args.seed)
    info: dict[str, Any] = {
        "length": length,
        "samples": int(row["cu_seqlens"].numel() - 1),
        "images": int(row["image_grids"].shape[0]),
        "tiles": int(row["tiles"].shape[0]),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    oom = False
    try:
        out = model(
            **{
                k: (v.to(device) if isinstance(v, torch.Tensor) and k != "tiles" else v)
                for k, v in row.items()
            }
        )
        loss = out.loss_sum / max(1, out.num_tokens or 0)
        del out
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        info["loss"] = float(loss.detach())
        del loss
        sync(device)
    except torch.cuda.OutOfMemoryError as e:
        oom = True
        info["error"] = str(e).splitlines()[0][:300]
    # Outside the except block: the exception's frames no longer pin the activations.
    optimizer.zero_grad(set_to_none=True)
    info["ok"] = not oom
    info["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        info["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        info["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        gc.collect()
        torch.cuda.empty_cache()
    return info


def predict_limit(trials: list[dict[str, Any]], capacity_gib: float) -> float | None:
    """L where a straight-line fit of peak reserved memory against L reaches capacity (≥ 2 passes)."""
    ok = [t for t in trials if t["ok"] and "peak_reserved_gib" in t]
    if len({t["length"] for t in ok}) < 2:
        return None
    x = np.array([t["length"] for t in ok], dtype=float)
    y = np.array([t["peak_reserved_gib"] for t in ok])
    slope, intercept = np.polyfit(x, y, 1)
    return (capacity_gib - intercept) / slope if slope > 0 else None


def search(
    run: Callable[[int], dict[str, Any]],
    *,
    start: int,
    granularity: int,
    max_tokens: int,
    time_left_s: Callable[[], float],
    capacity_gib: float,
) -> tuple[int | None, int | None, str]:
    """Doubling, then bisection to `granularity`: (longest ok, shortest out-of-memory, why it stopped)."""
    gran = granularity
    floor = lambda n: max(gran, n // gran * gran)  # noqa: E731
    trials: list[dict[str, Any]] = []
    lo: int | None = None  # longest row that trained
    hi: int | None = None  # shortest row that ran out of memory
    length, guided = start, True
    while True:
        last = next((t for t in reversed(trials) if t["ok"]), None)
        if last is not None and last["seconds"] * length / last["length"] > time_left_s():
            return lo, hi, f"time budget reached before trying {length:,}"
        info = run(length)
        trials.append(info)
        if info["ok"]:
            lo = length
        else:
            hi = length
        if lo is None:  # even the first length failed: halve down
            if length <= gran:
                return lo, hi, "the smallest length does not fit"
            length = floor(length // 2)
            continue
        if hi is not None and hi - lo <= gran:
            return lo, hi, "search complete"
        prediction = predict_limit(trials, capacity_gib)
        if hi is None:
            nxt = 2 * lo
            if prediction is not None and prediction < nxt:  # spare a trial that would run out of memory
                nxt = max(lo + gran, floor(int(prediction)))
            if nxt > max_tokens:
                return lo, hi, f"--max-tokens {max_tokens:,} reached"
        else:
            nxt = floor((lo + hi) // 2)
            if guided and prediction is not None:
                nxt = floor(int(prediction))
            nxt = min(max(nxt, lo + gran), hi - gran)
            guided = not guided
        length = nxt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--start", type=int, default=16384, help="first length tried")
    parser.add_argument(
        "--granularity", type=int, default=1024, help="bisect until the bracket is this narrow"
    )
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="never try more than this")
    parser.add_argument(
        "--time-budget-s", type=float, default=300.0, help="stop the search before exceeding this"
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="default: 92,544 (7b) or 512 (tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = args.vocab_size or (REAL_VOCAB_SIZE if args.preset == "7b" else TINY_VOCAB_SIZE)
    model, optimizer, params, _ = build_lora_model(args.preset, device, dtype, vocab, args.seed)
    card = device_name(device)
    results: dict[str, Any] = {
        **bench_header("max_length", argv),
        "device": card,
        "torch": torch.__version__,
        "versions": package_versions(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "preset": args.preset,
        "hd_num": args.hd_num,
        "row": "real-sized samples cycled (SAMPLE_CYCLE), last one text-only to fill; random ids and tiles",
        "model_build_s": time.perf_counter() - started,
        "trials": [],
    }
    capacity_gib = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        other = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
        capacity_gib = (total - other) / 2**30 - 0.5
        results["gpu_memory_gib"] = total / 2**30
        results["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    print(
        f"{card} | {args.preset} LoRA built in {results['model_build_s']:.1f} s | capacity {capacity_gib} GiB",
        file=sys.stderr,
    )

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        write_json(args.out_json, results)

    def run(length: int) -> dict[str, Any]:
        info = trial(model, optimizer, params, length, args, device)
        print(
            f"  L={length:,}: {'ok' if info['ok'] else 'OUT OF MEMORY'} in {info['seconds']:.1f} s, peak "
            f"{info.get('peak_allocated_gib', 0):.1f} GiB allocated / {info.get('peak_reserved_gib', 0):.1f} reserved "
            f"({info['samples']} samples, {info['images']} images, {info['tiles']} tiles)",
            file=sys.stderr,
            flush=True,
        )
        results["trials"].append(info)
        save()
        return info

    if device.type == "cuda":
        lo, hi, stop = search(
            run,
            start=args.start,
            granularity=args.granularity,
            max_tokens=args.max_tokens,
            time_left_s=lambda: args.time_budget_s - (time.perf_counter() - started),
            capacity_gib=capacity_gib or 0.0,
        )
    else:
        ok = run(args.start)["ok"]
        lo, hi, stop = (args.start if ok else None), None, "CPU: one size only (no memory limit to find)"
    results.update(
        best=lo,
        bracket=[lo, hi],
        stop=stop,
        complete=stop == "search complete",
        prediction=predict_limit(results["trials"], capacity_gib or 0.0),
    )
    save()
    print("\n| card | best max_length | bracket (ok, OOM) | trials | stop |\n|---|---|---|---|---|")
    print(f"| {card} | {lo if lo is None else f'{lo:,}'} | {lo}, {hi} | {len(results['trials'])} | {stop} |")
    for t in results["trials"]:
        print(
            f"  L={t['length']:,} {'ok ' if t['ok'] else 'OOM'} {t['seconds']:.1f} s "
            f"peak {t.get('peak_allocated_gib', 0):.1f}/{t.get('peak_reserved_gib', 0):.1f} GiB"
        )
    return 0 if lo is not None else 1


if __name__ == "__main__":
    sys.exit(main())
