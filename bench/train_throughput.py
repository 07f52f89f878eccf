"""Training throughput on one GPU: xc-train's packed LoRA step versus the official recipe's step (issue 8).

Both modes train the same model on the same records, in one process, on one GPU:
  model     the `7b` preset (full IXC2.5-7B architecture, random init, bf16) with the LoRA recipe
            (PEFT LoRA r64 on the five linears, fix_vit, fix_sampler), gradient checkpointing.
  data      real photos (scikit-image's bundled images at 0.3–2 MP, JPEG) in three sources:
            single-image (1–2 turns), multi-image multi-turn (2–3 images) and text-only records
            with answers of 40–400 words, sharded with `xc-prep shard` (real tokenizer, hd 18;
            bench/common.py).
  levers    the official mode runs first, eager, every decoder layer recomputed (the official
            recipe's gradient checkpointing); then ours with --checkpoint-layers N (default all)
            and --compile (torch.compile of each decoder and ViT layer), if given. --attention
            picks the kernel for both modes; kernels compiled at first use (FlashAttention-4) are
            built before either mode is timed (`trainer.attention.warm_up`).
  ours      xc-train's own code, built as `trainer.train.train` builds it: the model from
            `trainer.modelio.load_for_training` (our LoRA layer, trainer/lora.py), the DeepSpeed
            engine from `trainer.train.build_engine` (the LoRA recipe's ZeRO stage, bf16 on CUDA,
            torch's fused AdamW, clipping 1.0, warm-up + cosine), `trainer.loader.PackedLoader`
            configured by `trainer.train.loader_config` (≤ 4 workers) → packed rows of ≤
            max_length tokens → `trainer.train.train_step` (chunked loss, no full logits), one
            row per optimizer step (--global-batch-size 1); data wait = the time the loop blocks
            in `next()` (`trainer.loader.TimedIterator`); each step ends with a device sync, as
            xc-train's do.
  official  the baseline, emulated here (it is not the product): one conversation per step (B = 1:
            padding to the longest in the batch pads nothing), every record once after the warm-up
            (--official-steps), its one host sync the HF Trainer's NaN filter of the loss after
            backward, read from the JSON inside the training process: tokenize, decode, HD-transform
            (`pipeline.build.build_sample`: load_rgb + hd_transform) and normalize to float32 with
            numpy, copy the float pixels to the GPU; the forward returns the full logits, which
            are cast to fp32 for one standard cross-entropy; torch's AdamW driven directly, clipping
            1.0 (bench/common.py's `build_lora_model`: on one GPU ZeRO partitions nothing). Our
            model's image path takes uint8 tiles and normalizes them on the GPU, so the official
            step pays that too (≈ 1 ms) on top of its CPU normalization, and the float copy is
            made but not read by the model. Its LoRA layer is PEFT's stock `lora.Linear`, as in
            the official recipe; with --official-lora both (the default) it runs a second time
            with our fused LoRA layer (trainer/lora.py), the conservative baseline, and the ratio
            is given against both.

Step time: from one step's host sync to the next.
MFU = model FLOPs / step time / the card's bf16 matmul rate measured in the same run (8192³).
Model FLOPs (trainer/flops.py) per packed row with sample lengths s_i, N = LLM matmul parameters
(decoder linears + output head), L layers, d hidden size:
  F = 2·N·Σ s_i + 2·L·d·Σ s_i²        LoRA step = 2·F (no weight gradients for the frozen base)
Recomputation, the LoRA/PLoRA matmuls and the ViT are not counted; ViT FLOPs are reported apart.

    python -m bench.train_throughput --out-json out.json        # one GPU, 7b, hd 18, 16k rows
    python -m bench.train_throughput --preset tiny --steps 3 --warmup 1 --hd-num 2 --max-length 2048
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    bench_header,
    build_lora_model,
    build_shards,
    host_info,
    make_photos,
    make_sources,
    measure_matmul_flops,
    peak_gib,
    reset_peak,
    resolve_tokenizer,
    sync,
    update,
    write_json,
)
from pipeline.build import build_sample
from pipeline.checks import record_from_json
from pipeline.tiling import CLIP_MEAN, CLIP_STD
from pipeline.tokenization import Tokenizer
from schemas.sample import IGNORE_INDEX
from trainer.attention import BACKENDS, resolve_backend, warm_up
from trainer.batch import PackedBatch, collate
from trainer.config import TrainConfig, deepspeed_config
from trainer.flops import llm_matmul_params, peak_bf16_flops, step_flops, vit_flops
from trainer.index import SampleIndex
from trainer.loader import PackedLoader, TimedIterator
from trainer.model import IXCModel, compile_layers
from trainer.model_config import preset_config
from trainer.modelio import load_for_training
from trainer.train import build_engine, loader_config, setup_distributed, train_step

MAX_LOADER_WORKERS = 4


# ---------------------------------------------------------------- data


def kept_ids(index: SampleIndex) -> set[str]:
    """Record ids that made it into the shards (the official mode trains on the same records)."""
    ids = set()
    for g in range(len(index)):
        reader = index.reader(int(index.sample_shard[g]))
        ids.add(str(reader.provenance(int(index.sample_row[g]))[3]))
    return ids


def model_facts(model: IXCModel) -> dict[str, Any]:
    return {
        "llm_matmul_params": llm_matmul_params(model.config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "unused_adapters_on_cpu": model.unused_adapter_numel(),
    }


# ---------------------------------------------------------------- measurement


def batch_flops(model: IXCModel, batch: PackedBatch) -> tuple[float, float]:
    lengths = batch.cu_seqlens.diff().tolist()
    views = int(batch.tiles.shape[0]) + int(batch.image_grids.shape[0])  # local tiles + global views
    return step_flops(model.config, [lengths], lora=True), vit_flops(model.config, views, trains=False)


@dataclass
class Step:
    step_s: float
    data_s: float
    """ours: blocked in next() (data wait); official: CPU work of the sample inside the step."""
    tokens: int
    samples: int
    tiles: int
    images: int
    llm_flops: float
    vit_flops: float
    loss: float


@dataclass
class Phase:
    name: str
    warmup: list[Step] = field(default_factory=list)
    measured: list[Step] = field(default_factory=list)
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def add(
        self,
        i: int,
        warmup: int,
        model: IXCModel,
        batch: PackedBatch,
        step_s: float,
        data_s: float,
        samples: int,
        loss: float,
    ) -> None:
        """Record (and log) step i of this phase: a warm-up step while i < warmup."""
        llm, vit = batch_flops(model, batch)
        step = Step(
            step_s=step_s,
            data_s=data_s,
            tokens=batch.num_tokens,
            samples=samples,
            tiles=int(batch.tiles.shape[0]),
            images=int(batch.image_grids.shape[0]),
            llm_flops=llm,
            vit_flops=vit,
            loss=loss,
        )
        (self.warmup if i < warmup else self.measured).append(step)
        log_step(self.name, i, warmup, step)

    def summary(self, peak_flops: float | None, datasheet_flops: float | None) -> dict[str, Any]:
        steps = self.measured
        if not steps:
            return {"name": self.name, "error": self.error, "measured_steps": 0}
        total = sum(s.step_s for s in steps)
        times = np.array([s.step_s for s in steps])
        llm, vit = sum(s.llm_flops for s in steps), sum(s.vit_flops for s in steps)
        out = {
            "name": self.name,
            "measured_steps": len(steps),
            "warmup_steps": len(self.warmup),
            "total_s": total,
            "tokens": sum(s.tokens for s in steps),
            "samples": sum(s.samples for s in steps),
            "tokens_per_step": sum(s.tokens for s in steps) / len(steps),
            "samples_per_step": sum(s.samples for s in steps) / len(steps),
            "tiles_per_step": sum(s.tiles for s in steps) / len(steps),
            "tokens_per_s": sum(s.tokens for s in steps) / total,
            "samples_per_s": sum(s.samples for s in steps) / total,
            "step_s_p50": float(np.percentile(times, 50)),
            "step_s_p99": float(np.percentile(times, 99)),
            "step_s_max": float(times.max()),
            "data_pct": 100 * sum(s.data_s for s in steps) / total,
            "llm_tflops_per_s": llm / total / 1e12,
            "vit_tflops_per_s": vit / total / 1e12,
            "mfu": llm / total / peak_flops if peak_flops else None,
            "mfu_with_vit": (llm + vit) / total / peak_flops if peak_flops else None,
            "mfu_datasheet": llm / total / datasheet_flops if datasheet_flops else None,
            "peak_allocated_gib": self.peak_allocated_gib,
            "peak_reserved_gib": self.peak_reserved_gib,
            "final_loss": steps[-1].loss,
            "error": self.error,
            **self.notes,
        }
        return out


# ---------------------------------------------------------------- ours: xc-train's step


def ours_config(
    args: argparse.Namespace, shards: Path, work: Path, index: SampleIndex
) -> tuple[TrainConfig, int]:
    """The xc-train config of our mode (one packed row per optimizer step, --warmup + --steps steps,
    the bench's levers) and how often it draws each sample so that the epoch has that many rows."""
    needed = args.warmup + args.steps
    architecture = preset_config(args.preset)
    for repeat in range(1, 1000):
        cfg = TrainConfig(
            shards=shards,
            model=args.preset,
            output_dir=work / "ours",
            recipe="lora",
            seed=args.seed,
            max_length=args.max_length,
            global_batch_size=1,
            max_steps=needed,
            checkpoint_layers=args.checkpoint_layers,
            compile=args.compile,
            attention=args.attention,
            num_workers=min(MAX_LOADER_WORKERS, os.cpu_count() or 1),
            source_samples=tuple(f"{s.name}={s.samples_written * repeat}" for s in index.manifest.sources),
        ).resolve()
        if PackedLoader(index, loader_config(cfg, 1, architecture)).plan(0).steps >= needed:
            return cfg, repeat
    raise AssertionError(f"the shards in {shards} give no plan of {needed} steps")


def run_ours(
    cfg: TrainConfig, repeat: int, args: argparse.Namespace, dtype: torch.dtype
) -> tuple[Phase, IXCModel]:
    """xc-train's step: model, engine, loader and `train_step` as `trainer.train.train` builds them."""
    assert cfg.shards is not None and cfg.max_steps is not None, "ours_config sets both"
    started = time.perf_counter()
    d = setup_distributed()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    loaded = load_for_training(
        cfg, manifest_dir=Path(cfg.shards), output_dir=Path(cfg.output_dir), dtype=dtype, d=d
    )
    model: IXCModel = loaded.model
    model.gradient_checkpointing_enable()
    model.checkpoint_layers = cfg.checkpoint_layers
    model.train()
    if cfg.compile:
        compile_layers(model)
    built = time.perf_counter()
    ds_config = deepspeed_config(cfg, world_size=d.world_size, bf16=d.device.type == "cuda")
    engine, _ = build_engine(model, cfg, ds_config, cfg.max_steps)
    index = SampleIndex.load(cfg.shards)
    loader = PackedLoader(index, loader_config(cfg, d.world_size, model.config))
    plan = loader.plan(0)
    phase = Phase(
        "ours",
        notes={
            "loader_workers": cfg.num_workers,
            "plan_fill": plan.fill,
            "sample_repeats": repeat,
            "zero_stage": ds_config["zero_optimization"]["stage"],
            "model_build_s": built - started,
            "engine_build_s": time.perf_counter() - built,
        },
    )
    print(loader.summary(), file=sys.stderr)
    timed = TimedIterator(iter(loader))
    sync(d.device)
    last = time.perf_counter()
    try:
        for i in range(cfg.max_steps):
            if i == args.warmup:
                reset_peak(d.device)
            batch = next(timed).to(d.device)
            result = train_step(engine, [batch], d, 1, cfg, per_source=False)
            sync(d.device)  # xc-train synchronizes after each step too
            now = time.perf_counter()
            samples = len(batch.sample_keys)
            phase.add(i, args.warmup, model, batch, now - last, timed.last_wait_s, samples, result["loss"])
            last = now
    finally:
        timed.close()  # stops the loader's worker processes
    phase.peak_allocated_gib, phase.peak_reserved_gib = peak_gib(d.device)
    return phase, model


# ---------------------------------------------------------------- official: the baseline's step


def normalize_float(tiles: np.ndarray) -> np.ndarray:
    """uint8[N, 560, 560, 3] → float32[N, 3, 560, 560], CLIP-normalized on the CPU (ToTensor + Normalize)."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    chw = tiles.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return (chw - mean) / std


def run_official(
    model: IXCModel,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    records: list[tuple[str, str]],
    work: Path,
    tokenizer: Tokenizer,
    args: argparse.Namespace,
    device: torch.device,
    fused_lora: bool,
) -> Phase:
    """One conversation per step from the JSON: per-sample CPU image work, full fp32 logits + CE.

    fused_lora: our LoRA layer (trainer/lora.py) instead of PEFT's stock one, which the official
    recipe runs."""
    phase = Phase(
        official_name(fused_lora),
        notes={
            "batch_size": 1,
            "padding_tokens": 0,
            "lora_layer": "fused" if fused_lora else "peft",
            "records": len(records),
        },
    )
    needed = args.official_warmup + args.official_steps
    sync(device)
    last = time.perf_counter()
    for i in range(needed):
        if i == args.official_warmup:
            reset_peak(device)
        source, record_json = records[i % len(records)]
        started = time.perf_counter()
        # --- the official dataset's __getitem__, in the training process, every epoch
        record = record_from_json(json.loads(record_json), work, f"{source} record")
        sample = build_sample(
            record,
            tokenizer,
            source_name=source,
            file=source,
            index=i,
            hd_num=args.hd_num,
            max_length=args.max_length,
        )
        pixels = torch.from_numpy(normalize_float(sample.tiles))
        batch = collate([sample])  # B = 1: nothing to pad
        data_s = time.perf_counter() - started
        pixels = pixels.to(device)  # the float copy the official code makes (the model reads the uint8 tiles)
        batch = batch.to(device)
        out = model(**batch.model_inputs(), return_logits=True)
        logits = out.logits[0].float()  # [T, V] fp32, as the official model's forward
        loss = F.cross_entropy(logits, batch.targets[0], ignore_index=IGNORE_INDEX)
        loss.backward()
        # The HF Trainer's NaN/inf filter of the step's loss after backward: its one host sync per
        # step; a step's time runs from one to the next (the update is launched after it).
        loss_value = float(loss.detach())
        now = time.perf_counter()
        phase.add(i, args.official_warmup, model, batch, now - last, data_s, 1, loss_value)
        last = now
        update(optimizer, params)
        del out, logits, loss, pixels
    sync(device)
    phase.peak_allocated_gib, phase.peak_reserved_gib = peak_gib(device)
    return phase


# ---------------------------------------------------------------- report


def log_step(name: str, i: int, warmup: int, s: Step) -> None:
    kind = "warm-up" if i < warmup else "measured"
    print(
        f"  {name} step {i} ({kind}): {s.step_s:.3f} s | {s.tokens:,} tok, {s.samples} samples, {s.tiles} tiles | "
        f"data {s.data_s * 1000:.1f} ms | loss {s.loss:.4f}",
        file=sys.stderr,
        flush=True,
    )


def official_name(fused_lora: bool) -> str:
    return "official+fused-lora" if fused_lora else "official"


def print_table(results: dict[str, Any]) -> None:
    rows = [p for p in results["phases"] if p.get("measured_steps")]
    header = [
        "mode",
        "steps",
        "tokens/step",
        "samples/step",
        "tiles/step",
        "step s p50",
        "step s p99",
        "LLM tokens/s",
        "samples/s",
        "MFU (LLM)",
        "MFU (LLM+ViT)",
        "ViT TFLOP/s",
        "data %",
        "peak GiB (alloc/reserved)",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    gib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for p in rows:
        cells = [
            p["name"],
            str(p["measured_steps"]),
            f"{p['tokens_per_step']:,.0f}",
            f"{p['samples_per_step']:.2f}",
            f"{p['tiles_per_step']:.1f}",
            f"{p['step_s_p50']:.3f}",
            f"{p['step_s_p99']:.3f}",
            f"{p['tokens_per_s']:,.0f}",
            f"{p['samples_per_s']:.2f}",
            pct(p["mfu"]),
            pct(p["mfu_with_vit"]),
            f"{p['vit_tflops_per_s']:.1f}",
            f"{p['data_pct']:.2f} %",
            f"{gib(p['peak_allocated_gib'])} / {gib(p['peak_reserved_gib'])}",
        ]
        print("| " + " | ".join(cells) + " |")
    for p in results["phases"]:
        if p.get("error"):
            print(f"{p['name']}: FAILED: {p['error'].strip().splitlines()[-1]}")
    for name, ratio in results.get("ratios", {}).items():
        print(
            f"ours / {name}: tokens/s {ratio['tokens_per_s']:.2f}x, samples/s {ratio['samples_per_s']:.2f}x "
            f"(card {results['device']}, measured bf16 matmul {results['matmul']['flops'] / 1e12:.0f} TFLOP/s)"
        )


# ---------------------------------------------------------------- main


def free_memory(device: torch.device) -> None:
    """Return a dropped model's memory before the next one is built (one model at a time)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--steps", type=int, default=20, help="measured steps of our mode")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps of our mode")
    parser.add_argument(
        "--official-steps",
        type=int,
        default=None,
        help="measured steps of the official mode (default: one per record, so that it trains on every "
        "record once, the data ours draws from)",
    )
    parser.add_argument("--official-warmup", type=int, default=3, help="warm-up steps of the official mode")
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--records", type=int, default=16, help="records per kind (single, multi, text)")
    parser.add_argument("--shard-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.model, or 'tiny' (default for --preset tiny)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument(
        "--official-lora",
        default="both",
        choices=("peft", "fused", "both"),
        help="the official mode's LoRA layer: PEFT's stock one (the official recipe's), ours "
        "(trainer/lora.py), or both, one after the other",
    )
    parser.add_argument(
        "--checkpoint-layers",
        type=int,
        default=None,
        help="ours: decoder layers recomputed in backward (default all, as the official mode always)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="ours: torch.compile each decoder and ViT layer"
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=BACKENDS,
        help="the model's attention kernel, for both modes (trainer/attention.py)",
    )
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or (args.official_steps is not None and args.official_steps < 1):
        parser.error("--warmup, --steps and --official-steps must be >= 1")

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {
        **bench_header("train_throughput", argv),
        **host_info(device),
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "hd_num": args.hd_num,
        "max_length": args.max_length,
        "flops_formula": "LoRA step = 2*F, F = 2*N*sum(s_i) + 2*L*d*sum(s_i^2) (trainer/flops.py); ViT apart",
        "optimizer": "ours: xc-train's DeepSpeed engine (trainer.train.build_engine: the LoRA recipe's ZeRO "
        "stage, torch AdamW fused on CUDA, grad clip 1.0, warm-up + cosine) stepped by trainer.train.train_step; "
        "official: torch AdamW (fused on CUDA) driven directly, grad clip 1.0; one step per packed row or record",
        "ours_levers": {"checkpoint_layers": args.checkpoint_layers, "compile": args.compile},
        "attention": args.attention,
        "phases": [],
    }
    card = results["device"]
    official_layers = (
        []
        if args.skip_official
        else {"peft": [False], "fused": [True], "both": [False, True]}[args.official_lora]
    )

    with tempfile.TemporaryDirectory(prefix="xc-train-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_path = resolve_tokenizer(args.tokenizer, args.preset, work)
        tokenizer = Tokenizer.from_path(tokenizer_path)
        results["tokenizer"] = str(tokenizer_path)

        # --- data on a side thread (the shard workers are processes) while the official model is built
        def prepare() -> tuple[Path, dict[str, list[dict[str, Any]]]]:
            t0 = time.perf_counter()
            photos = make_photos(work / "photos")
            sources = make_sources(photos, args.records, args.seed)
            out = build_shards(
                work, sources, tokenizer_path, args.hd_num, args.max_length, args.shard_workers
            )
            results["data_prep_s"] = time.perf_counter() - t0
            return out, sources

        def build_official(
            fused_lora: bool,
        ) -> tuple[IXCModel, torch.optim.Optimizer, list[torch.nn.Parameter]]:
            """PEFT's LoRA layer (the official recipe's) or ours on the same weights (same seed)."""
            t0 = time.perf_counter()
            built, opt, trainable, _ = build_lora_model(
                args.preset, device, dtype, tokenizer.vocab_size, args.seed, fused_lora=fused_lora
            )
            built.attention_backend = args.attention
            results.setdefault("model_build_s", time.perf_counter() - t0)
            results.setdefault("model", model_facts(built))
            return built, opt, trainable

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            data_future = pool.submit(prepare)
            if official_layers:
                model, optimizer, params = build_official(official_layers[0])
            shards, sources = data_future.result()
        index = SampleIndex.load(shards)
        results["data"] = {
            "sources": {
                s.name: {
                    "records": len(sources[Path(s.path).stem]),
                    "samples": s.samples_written,
                    "rejected": s.rejected,
                }
                for s in index.manifest.sources
            },
            "tokens_per_sample": float(index.num_tokens.mean()),
            "tiles_per_sample": float(index.num_tiles.mean()),
            "trained_per_sample": float(index.num_trained.mean()),
            "max_sample_tokens": int(index.num_tokens.max()),
        }
        print(
            f"{card} | torch {torch.__version__} | {args.preset} | data {json.dumps(results['data'])} | "
            f"prep {results['data_prep_s']:.1f} s",
            file=sys.stderr,
        )

        results["matmul"] = measure_matmul_flops(device)
        peak, datasheet = results["matmul"]["flops"], peak_bf16_flops(device)
        results["datasheet_bf16_flops"] = datasheet
        print(f"matmul {results['matmul']}", file=sys.stderr)

        phases: list[Phase] = []

        def record(phase: Phase) -> None:
            phases.append(phase)
            results["phases"] = [p.summary(peak, datasheet) for p in phases]
            results["steps"] = {p.name: [asdict(s) for s in p.warmup + p.measured] for p in phases}
            results["elapsed_s"] = time.perf_counter() - started
            write_json(args.out_json, results)

        # Kernels compiled at first use (FlashAttention-4 builds one per tile configuration, chosen
        # by length) are built here, before either mode is timed: a measured step must not pay one.
        # The CPU's kernels are not compiled.
        c = preset_config(args.preset)
        backend = resolve_backend(args.attention, device, dtype, c.head_dim)
        results["attention_backend"] = backend
        results["attention_warm_up_s"] = (
            warm_up(backend, c.num_attention_heads, c.num_key_value_heads, c.head_dim, dtype, device)
            if device.type == "cuda"
            else 0.0
        )
        # The official mode first, eager, every decoder layer recomputed, as the official recipe runs;
        # one model in memory at a time.
        if official_layers:
            kept = kept_ids(index)
            by_kind = [
                [(name, json.dumps(r)) for r in records if str(r["id"]) in kept]
                for name, records in sources.items()
            ]
            # single, multi, text, single, ...: every window of three steps sees each kind once
            interleaved = [r for group in itertools.zip_longest(*by_kind) for r in group if r is not None]
            if args.official_steps is None:
                args.official_steps = len(interleaved)  # after the warm-up, each record once
            for n, fused_lora in enumerate(official_layers):
                if n > 0:
                    del model, optimizer, params
                    free_memory(device)
                    model, optimizer, params = build_official(fused_lora)
                try:
                    record(
                        run_official(
                            model, optimizer, params, interleaved, work, tokenizer, args, device, fused_lora
                        )
                    )
                except Exception:  # keep going: the other mode's numbers are still worth having
                    traceback.print_exc()
                    record(Phase(official_name(fused_lora), error=traceback.format_exc()))
            del model, optimizer, params
            free_memory(device)

        cfg, repeat = ours_config(args, shards, work, index)
        try:
            phase, ours_model = run_ours(cfg, repeat, args, dtype)
            results.setdefault("model", model_facts(ours_model))
            record(phase)
        except Exception:
            traceback.print_exc()
            record(Phase("ours", error=traceback.format_exc()))
        if "model" in results:
            m = results["model"]
            print(
                f"{args.preset}: {m['parameters'] / 1e9:.2f} B params, {m['trainable'] / 1e6:.1f} M trainable "
                f"(LoRA), {m['unused_adapters_on_cpu'] / 1e9:.2f} B unused adapters on the CPU",
                file=sys.stderr,
            )

        ours = next((p for p in results["phases"] if p["name"] == "ours"), {})
        results["ratios"] = {
            official["name"]: {
                "tokens_per_s": ours["tokens_per_s"] / official["tokens_per_s"],
                "samples_per_s": ours["samples_per_s"] / official["samples_per_s"],
            }
            for official in results["phases"]
            if official["name"].startswith("official")
            and official.get("measured_steps")
            and ours.get("measured_steps")
        }
        results["elapsed_s"] = time.perf_counter() - started
        write_json(args.out_json, results)
    print_table(results)
    return 0 if all(not p.get("error") for p in results["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
