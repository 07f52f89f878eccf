"""GPU levers of the LoRA step, measured one against another in one process (issue 8, item 4).

Same model and recipe as bench/train_throughput.py, driven as its official mode is (the `7b`
preset, random init, bf16, PEFT LoRA r64 on the five linears, fix_vit, fix_sampler, chunked loss,
torch's fused AdamW with clipping, no DeepSpeed: bench/common.py's `build_lora_model`) on
synthetic packed rows of real-sized samples (bench/max_length.py's SAMPLE_CYCLE: photos at hd 18
with their exact token counts, multi-turn and text-only samples; each row starts at another
point of the cycle). A variant is `MODE:N[:ATTENTION][+FLAG...]`: MODE `eager` or `compiled`
(torch.compile of each decoder and ViT layer, `trainer.model.compile_layers`), N = decoder layers
recomputed in backward (32 = full checkpointing, as the official recipe; 0 = none), ATTENTION the
model's attention kernel (trainer/attention.py; default auto), FLAGs: `eagervit` (the ViT's layers
not compiled), `nodrop` (the LoRA and Plora dropouts removed: what dropout costs, an upper bound
for fusing it; not a training setting), `rngfunc` (recompiled with
torch._functorch.config.functionalize_rng_ops: backward regenerates the dropout masks from the
saved RNG state instead of keeping them), `cdt` (recompiled with inductor's coordinate-descent
tuning of its Triton kernels' launch configurations), `autotune` (recompiled with inductor's
max_autotune: matmuls benchmarked against Triton templates, which can fuse the element-wise work
around them), `cublaslt` (torch's matmuls through cuBLASLt instead of cuBLAS:
`torch.backends.cuda.preferred_blas_library`). The variants that compared the product's own paths
(`unfused`, `allrows`, `twodraws`, `randint`, `basefirst`) are gone with the switches they flipped;
their figures are in dev/LOG.md. Compiling is one-way, so eager variants come first, then compiled
ones with `eagervit`, then the rest. Each variant: --warmup steps, then --steps timed steps (host clock after a device sync); an out-of-memory step
fails the variant and the next one goes on.

Also, optionally: a torch.profiler breakdown of one step of a variant (kernel time by
category, the top kernels, the GPU's busy time within the step, a gzipped Chrome trace), the frozen ViT's forward time on a row's tiles, and whether this
torch's varlen_attn accepts grouped K/V heads without repeating them (and how long each takes).

MFU = trainer/flops.py's LoRA step FLOPs (4·N·tokens + attention; recomputation, LoRA/PLoRA and
the ViT not counted) / step time / the bf16 8192³ matmul rate measured in the same run.

    python -m dev.experiments.levers --out-json levers.json --profile --probe-gqa
    python -m dev.experiments.levers --preset tiny --length 2048 --hd-num 2 --variants eager:2,eager:0 --steps 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import json
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config

from bench.common import build_lora_model, measure_matmul_flops, optimizer_step, package_versions, sync
from bench.max_length import REAL_VOCAB_SIZE, synthetic_row
from trainer.attention import BACKENDS
from trainer.flops import step_flops, vit_flops
from trainer.model import compile_layers
from trainer.model_config import TINY_VOCAB_SIZE

KERNEL_CATEGORIES = (
    ("attention (flash/varlen/cudnn)", r"flash|fmha|attn|sdpa"),
    ("matmul (gemm)", r"gemm|cutlass|xmma|nvjet|sm90|cublas|matmul"),
    ("cross-entropy / softmax", r"softmax|cross_entropy|log_softmax|nll"),
    ("index gather/scatter", r"index|scatter|gather"),
    ("optimizer (AdamW, clip)", r"adam|multi_tensor|foreach|norm_kernel"),
    ("copies / casts", r"copy|cat|convert|contiguous"),
    ("compiled (triton) fused", r"triton"),
    ("elementwise / reduce (eager)", r"elementwise|reduce|vectorized|unrolled|dropout|fused"),
)


VARIANT_FLAGS = (
    "eagervit",
    "nodrop",
    "rngfunc",
    "cdt",
    "autotune",
    "cublaslt",
)
INDUCTOR_FLAGS = {"cdt": "coordinate_descent_tuning", "autotune": "max_autotune"}
"""Variant flags that recompile with an inductor option on."""


def parse_variants(text: str) -> list[tuple[str, int, str, frozenset[str]]]:
    out = []
    for item in text.split(","):
        spec, *flags = item.strip().split("+")
        mode, _, rest = spec.partition(":")
        layers, _, backend = rest.partition(":")
        if (
            mode not in ("eager", "compiled")
            or not layers.isdigit()
            or backend not in ("", *BACKENDS)
            or not set(flags) <= set(VARIANT_FLAGS)
        ):
            raise SystemExit(
                f"--variants: {item!r} is not MODE:N[:ATTENTION][+FLAG...] with MODE eager|compiled, "
                f"ATTENTION one of {', '.join(BACKENDS)}, FLAG one of {', '.join(VARIANT_FLAGS)}"
            )
        out.append((mode, int(layers), backend or "auto", frozenset(flags)))
    # Compiling is one-way: eager first, then compiled with the ViT eager, then the rest.
    order = [0 if mode == "eager" else 1 if "eagervit" in flags else 2 for mode, _, _, flags in out]
    if order != sorted(order):
        raise SystemExit(
            "--variants: put eager variants first, then compiled ones with +eagervit, then the rest"
        )
    return out


def to_device(row: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # tiles stay on the host (pinned by the loader in training): the model copies them
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "tiles" else v) for k, v in row.items()}


def one_step(
    model: Any, optimizer: Any, params: list[Any], row: dict[str, Any], device: torch.device
) -> float:
    out = model(**to_device(row, device))
    loss = out.loss_sum / max(1, out.num_tokens or 0)
    del out
    return optimizer_step(loss, optimizer, params)


def row_flops(model: Any, row: dict[str, Any]) -> tuple[float, float]:
    lengths = row["cu_seqlens"].diff().tolist()
    views = int(row["tiles"].shape[0]) + int(row["image_grids"].shape[0])
    return step_flops(model.config, [lengths], lora=True), vit_flops(model.config, views, trains=False)


def run_variant(
    model: Any,
    optimizer: Any,
    params: list[Any],
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    device: torch.device,
    mode: str,
    layers: int,
    backend: str,
    flags: frozenset[str],
    matmul_flops: float,
) -> dict[str, Any]:
    name = variant_name(mode, layers, backend, flags)
    info: dict[str, Any] = {
        "variant": name,
        "mode": mode,
        "checkpoint_layers": layers,
        "attention": backend,
        "flags": sorted(flags),
    }
    model.checkpoint_layers = layers
    base_model(model).attention_backend = backend
    restore = apply_flags(model, flags)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, flops = [], [], []
    try:
        for i in range(args.warmup + args.steps):
            row = rows[i % len(rows)]
            sync(device)
            t0 = time.perf_counter()
            loss = one_step(model, optimizer, params, row, device)
            sync(device)
            seconds = time.perf_counter() - t0
            if i < args.warmup:
                info.setdefault("warmup_s", []).append(seconds)
                continue
            times.append(seconds)
            losses.append(loss)
            flops.append(row_flops(model, row)[0])
    except torch.cuda.OutOfMemoryError as e:
        info["error"] = "out of memory: " + str(e).splitlines()[0][:200]
    except Exception:  # noqa: BLE001 - a broken variant must not lose the others' numbers
        info["error"] = traceback.format_exc()[-2000:]
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        # cudaFree of cached blocks to satisfy an allocation synchronizes the device
        info["alloc_retries"] = stats.get("num_alloc_retries", 0)
        info["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        info["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        gc.collect()
        torch.cuda.empty_cache()
    if times:
        tokens = sum(
            int(rows[(args.warmup + j) % len(rows)]["input_ids"].shape[1]) for j in range(len(times))
        )
        info.update(
            steps=len(times),
            step_s_p50=float(np.median(times)),
            step_s_mean=float(np.mean(times)),
            tokens_per_s=tokens / sum(times),
            mfu=sum(flops) / sum(times) / matmul_flops,
            losses=losses,
        )
    restore()
    return info


def variant_name(mode: str, layers: int, backend: str, flags: frozenset[str]) -> str:
    name = f"{mode}:{layers}" + ("" if backend == "auto" else f":{backend}")
    return name + "".join(f"+{f}" for f in VARIANT_FLAGS if f in flags)


def apply_flags(model: Any, flags: frozenset[str]) -> Callable[[], None]:
    """Set a variant's flags (VARIANT_FLAGS); returns what undoes them."""
    dropouts: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    if "nodrop" in flags:
        for parent in list(model.modules()):
            for key, child in parent.named_children():
                if isinstance(child, torch.nn.Dropout) and child.p > 0:
                    dropouts.append((parent, key, child))
        for parent, key, _ in dropouts:
            parent.add_module(key, torch.nn.Identity())  # (ModuleDict entries too)

    if "rngfunc" in flags:
        torch._functorch.config.functionalize_rng_ops = True
        torch._dynamo.reset()
    blas = torch.backends.cuda.preferred_blas_library()
    if "cublaslt" in flags:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    inductor = [INDUCTOR_FLAGS[f] for f in flags if f in INDUCTOR_FLAGS]
    for option in inductor:
        setattr(torch._inductor.config, option, True)
    if inductor:
        torch._dynamo.reset()

    def restore() -> None:
        for parent, key, child in dropouts:
            parent.add_module(key, child)
        if "rngfunc" in flags:
            torch._functorch.config.functionalize_rng_ops = False
            torch._dynamo.reset()
        for option in inductor:
            setattr(torch._inductor.config, option, False)
        if inductor:
            torch._dynamo.reset()
        torch.backends.cuda.preferred_blas_library(blas)

    return restore


def profile_step(
    model: Any,
    optimizer: Any,
    params: list[Any],
    row: dict[str, Any],
    device: torch.device,
    out_dir: Path | None,
) -> dict[str, Any]:
    """Kernel time of one step by category, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    # A step first: the variant ended by emptying the allocator's cache, and the first step after
    # that maps its memory again (milliseconds of host time per large tensor, the GPU idling).
    one_step(model, optimizer, params, row, device)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_step(model, optimizer, params, row, device)
        sync(device)
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = evt.self_cuda_time_total
            kernels[evt.key] = kernels.get(evt.key, 0.0) + us / 1e6
    total = sum(kernels.values())
    categories: dict[str, float] = {}
    for name, seconds in kernels.items():
        label = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, name, re.I)), "other")
        categories[label] = categories.get(label, 0.0) + seconds
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    busy = gpu_busy_s(prof)
    if out_dir is not None:
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90
        )
        (out_dir / "profile_table.txt").write_text(table)
        trace = out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(out_dir / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    return {
        "gpu_busy_s": busy["busy_s"],
        "gpu_span_s": busy["span_s"],
        "kernel_s": total,
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "top": [{"kernel": k[:160], "s": s} for k, s in top],
    }


def gpu_busy_s(prof: Any) -> dict[str, float]:
    """The union of the device's kernel/copy intervals and the span from the first to the last."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return {"busy_s": 0.0, "span_s": 0.0}
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return {"busy_s": busy / 1e6, "span_s": (spans[-1][1] - spans[0][0]) / 1e6}


def base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vit_time(model: Any, row: dict[str, Any], device: torch.device) -> dict[str, Any]:
    base = base_model(model)
    grids = [tuple(g) for g in row["image_grids"].tolist()]
    with torch.no_grad():
        for _ in range(2):
            base.encode_images(row["tiles"], grids)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            base.encode_images(row["tiles"], grids)
        sync(device)
    return {"views": int(row["tiles"].shape[0]) + len(grids), "s": (time.perf_counter() - t0) / 3}


def probe_gqa(device: torch.device, tokens: int = 16384, samples: int = 3) -> dict[str, Any]:
    """Does varlen_attn take 8 K/V heads for 32 query heads as is? Same output as repeated K/V, and times."""
    from torch.nn.attention.varlen import varlen_attn

    from trainer.attention import _VARLEN_PARAMS

    causal: dict[str, Any] = (
        {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}
    )
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(tokens, 32, 128, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    k = torch.randn(tokens, 8, 128, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    v = torch.randn(tokens, 8, 128, device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    bounds = np.linspace(0, tokens, samples + 1).astype(int).tolist()
    cu = torch.tensor(bounds, device=device, dtype=torch.int32)
    longest = int(np.diff(bounds).max())

    def repeated() -> torch.Tensor:
        kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        return varlen_attn(q, kr, vr, cu, cu, longest, longest, **causal)

    def grouped() -> torch.Tensor:
        return varlen_attn(q, k, v, cu, cu, longest, longest, **causal)

    def timed(fn: Any) -> float:
        grad = torch.ones(tokens, 32, 128, device=device, dtype=torch.bfloat16)
        for _ in range(2):
            fn().backward(grad)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            fn().backward(grad)
        sync(device)
        return (time.perf_counter() - t0) / 5

    out: dict[str, Any] = {"tokens": tokens, "samples": samples}
    reference = repeated().detach()
    out["repeated_fwd_bwd_s"] = timed(repeated)
    try:
        got = grouped().detach()
        out["grouped_rel_err"] = float((got.float() - reference.float()).norm() / reference.float().norm())
        out["grouped_fwd_bwd_s"] = timed(grouped)
    except Exception as e:  # noqa: BLE001
        out["grouped_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--length", type=int, default=16384, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=3, help="distinct rows, cycled")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="eager:32,eager:16,eager:0,compiled:32,compiled:0")
    parser.add_argument(
        "--profile", action="store_true", help="profile one step of a variant (--profile-variant)"
    )
    parser.add_argument(
        "--profile-variant",
        default=None,
        help="the variant to profile, as written in --variants (default the first)",
    )
    parser.add_argument("--probe-gqa", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = REAL_VOCAB_SIZE if args.preset == "7b" else TINY_VOCAB_SIZE
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "bench": "levers",
        "command": ["python", "-m", "dev.experiments.levers", *(sys.argv[1:] if argv is None else argv)],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": card,
        "versions": package_versions(),
        "preset": args.preset,
        "length": args.length,
        "hd_num": args.hd_num,
        "variants": [],
    }
    out_dir = args.out_json.parent if args.out_json is not None else None

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        if args.out_json is not None:
            args.out_json.parent.mkdir(parents=True, exist_ok=True)
            args.out_json.write_text(json.dumps(results, indent=2) + "\n")

    if args.probe_gqa and device.type == "cuda":
        try:
            results["gqa_probe"] = probe_gqa(device)
        except Exception:  # noqa: BLE001
            results["gqa_probe"] = {"error": traceback.format_exc()[-1500:]}
        print(f"gqa probe: {results['gqa_probe']}", file=sys.stderr, flush=True)
    results["matmul"] = measure_matmul_flops(device)
    matmul = results["matmul"]["flops"]
    model, optimizer, params, _ = build_lora_model(args.preset, device, dtype, vocab, args.seed)
    rows = [synthetic_row(args.length, args.hd_num, vocab, args.seed + i, offset=i) for i in range(args.rows)]
    if device.type == "cuda":
        for row in rows:
            row["tiles"] = row["tiles"].pin_memory()
    results["rows"] = []
    for r in rows:
        llm, vit = row_flops(model, r)
        results["rows"].append(
            {
                "tokens": int(r["input_ids"].shape[1]),
                "samples": int(r["cu_seqlens"].numel() - 1),
                "images": int(r["image_grids"].shape[0]),
                "tiles": int(r["tiles"].shape[0]),
                "llm_flops": llm,
                "vit_flops": vit,
            }
        )
    print(
        f"{card} | matmul {matmul / 1e12:.0f} TFLOP/s | rows {results['rows']}", file=sys.stderr, flush=True
    )
    if args.profile or device.type == "cuda":
        results["vit"] = vit_time(model, rows[0], device)
        print(f"vit forward: {results['vit']}", file=sys.stderr, flush=True)
    save()

    decoder_compiled = vision_compiled = False
    profiled = args.profile_variant or args.variants.split(",")[0].strip()
    for mode, layers, backend, flags in variants:
        if mode == "compiled":
            compile_layers(
                model, decoder=not decoder_compiled, vision="eagervit" not in flags and not vision_compiled
            )
            decoder_compiled = True
            vision_compiled = vision_compiled or "eagervit" not in flags
        info = run_variant(model, optimizer, params, rows, args, device, mode, layers, backend, flags, matmul)
        results["variants"].append(info)
        print(
            f"{info['variant']}: {json.dumps({k: v for k, v in info.items() if k != 'losses'})}",
            file=sys.stderr,
            flush=True,
        )
        save()
        if args.profile and info["variant"] == profiled.removesuffix(":auto") and "error" not in info:
            results["profile"] = profile_step(model, optimizer, params, rows[0], device, out_dir)
            print(json.dumps(results["profile"], indent=1), file=sys.stderr, flush=True)
            save()
    if decoder_compiled:
        from torch._dynamo.utils import counters

        results["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break")}
    save()

    print(f"\n{card}, {args.preset}, rows of {args.length:,} tokens, matmul {matmul / 1e12:.0f} TFLOP/s")
    print(
        "| variant | step s p50 | tokens/s | MFU | peak GiB alloc / reserved | warm-up s |\n|---|---|---|---|---|---|"
    )
    for v in results["variants"]:
        if "error" in v:
            print(f"| {v['variant']} | {v['error'].splitlines()[-1][:80]} | | | | |")
            continue
        print(
            f"| {v['variant']} | {v['step_s_p50']:.3f} | {v['tokens_per_s']:,.0f} | {100 * v['mfu']:.1f} % | "
            f"{v.get('peak_allocated_gib', 0):.1f} / {v.get('peak_reserved_gib', 0):.1f} | "
            f"{', '.join(f'{s:.1f}' for s in v.get('warmup_s', []))} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
