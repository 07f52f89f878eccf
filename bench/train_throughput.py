"""Training throughput on one GPU: our packed LoRA step versus the official recipe's step (issue 8).

Both modes train the same model on the same records, in one process, on one GPU:
  model     the `7b` preset (full IXC2.5-7B architecture, random init, bf16) with the LoRA recipe
            exactly as `trainer.modelio.apply_recipe` builds it (PEFT LoRA r64 on the five linears,
            fix_vit, fix_sampler), gradient checkpointing, torch AdamW (fused) on the trainable
            parameters, gradient clipping 1.0, one optimizer step per micro-batch. DeepSpeed is not
            used (not installed on the GPU machine): on one GPU ZeRO-2 partitions nothing and adds
            only a wrapper, plus fp32 master copies of the 0.15 B LoRA weights, not emulated here.
            As DeepSpeed's bf16 engine does, the PEFT adapters are cast to bf16.
  data      real photos (scikit-image's bundled images at 0.3–2 MP, JPEG) in three sources:
            single-image (1–2 turns), multi-image multi-turn (2–3 images) and text-only records
            with answers of 40–400 words, sharded with `xc-prep shard` (real tokenizer, hd 18).
  levers    the official mode runs first, eager, every decoder layer recomputed (the official
            recipe's gradient checkpointing); then ours with --checkpoint-layers N (default all)
            and --compile (torch.compile of each decoder and ViT layer), if given. --attention
            picks the kernel for both modes; kernels compiled at first use (FlashAttention-4) are
            built before either mode is timed (`trainer.attention.warm_up`).
  ours      `trainer.loader.PackedLoader` (≤ 4 workers) → packed rows of ≤ max_length tokens →
            `model(...)` with the chunked loss (no full logits); data wait = the time the loop
            blocks in `next()` (`trainer.loader.TimedIterator`); each step ends with a device sync, as
            xc-train's do.
  official  one conversation per step (B = 1: padding to the longest in the batch pads nothing),
            every record once after the warm-up (--official-steps), its one host sync the HF
            Trainer's NaN filter of the loss after backward, read from the JSON inside the training
            process: tokenize, decode, HD-transform
            (`pipeline.build.build_sample`: load_rgb + hd_transform) and normalize to float32 with
            numpy, copy the float pixels to the GPU; the forward returns the full logits, which
            are cast to fp32 for one standard cross-entropy. Our model's image path takes uint8
            tiles and normalizes them on the GPU, so the official step pays that too (≈ 1 ms) on
            top of its CPU normalization, and the float copy is made but not read by the model.
            Its LoRA layer is PEFT's stock `lora.Linear`, as in the official recipe; with
            --official-lora both (the default) it runs a second time with our fused LoRA layer
            (trainer/lora.py), the conservative baseline, and the ratio is given against both.

Step time: from one step's host sync to the next.
MFU = model FLOPs / step time / the card's bf16 matmul rate measured in the same run (8192³).
Model FLOPs (trainer/flops.py) per packed row with sample lengths s_i, N = LLM matmul parameters
(decoder linears + output head), L layers, d hidden size:
  F = 2·N·Σ s_i + 2·L·d·Σ s_i²        LoRA step = 2·F (no weight gradients for the frozen base)
Recomputation, the LoRA/PLoRA matmuls and the ViT are not counted; ViT FLOPs are reported apart.

    python bench/train_throughput.py --out-json out.json        # one GPU, 7b, hd 18, 16k rows
    python bench/train_throughput.py --preset tiny --steps 3 --warmup 1 --hd-num 2 --max-length 2048
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import itertools
import json
import os
import platform
import random
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

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(REPO_ROOT)]
from prep_throughput import make_photos  # noqa: E402

from pipeline import cli as prep_cli  # noqa: E402
from pipeline.build import build_sample  # noqa: E402
from pipeline.checks import record_from_json  # noqa: E402
from pipeline.tiling import CLIP_MEAN, CLIP_STD  # noqa: E402
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer  # noqa: E402
from schemas.sample import IGNORE_INDEX  # noqa: E402
from schemas.shards import ShardReader  # noqa: E402
from trainer.attention import BACKENDS, resolve_backend, warm_up  # noqa: E402
from trainer.batch import PackedBatch, collate  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.flops import llm_matmul_params, peak_bf16_flops, step_flops, vit_flops  # noqa: E402
from trainer.index import SampleIndex  # noqa: E402
from trainer.loader import PackedLoader, TimedIterator  # noqa: E402
from trainer.model import IXCModel, build_model, compile_layers  # noqa: E402
from trainer.modelio import Loaded, apply_recipe  # noqa: E402
from trainer.plan import LoaderConfig  # noqa: E402
from trainer.train import trainable_groups  # noqa: E402

TOKENIZER_CANDIDATES = (
    REPO_ROOT / ".bench" / "tokenizer.model",
    REPO_ROOT.parent / "shared" / "ixc25" / "tokenizer.model",
)
MAX_LOADER_WORKERS = 4
ANSWER_WORDS = (40, 80, 150, 250, 400)
"""Answer lengths in words (≈ 1.3 tokens each), drawn per answer."""
PROSE = (
    "The light comes from the left and leaves long, soft shadows across the scene.",
    "In the foreground the main subject is sharp, while the background falls gently out of focus.",
    "The colours are natural, with warm tones in the highlights and cooler blues in the shade.",
    "Several smaller details, such as the texture of the surface, reward a closer look.",
    "Taken together, the composition guides the eye from the centre towards the upper right.",
    "A careful answer would also mention what is missing: there is no text and no visible logo.",
    "Compared with a typical snapshot, the framing is deliberate and the horizon is level.",
    "If the photo were cropped more tightly, the subject would dominate even more clearly.",
)
QUESTIONS = (
    "Explain how a hash table handles collisions, with an example.",
    "Summarize the causes of the French Revolution in a few paragraphs.",
    "What should I check before buying a used bicycle?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Compare gradient descent with Newton's method for a beginner.",
)
MATMUL_SIZE = 8192


# ---------------------------------------------------------------- data


def prose(rng: random.Random, words: int) -> str:
    """About `words` words of plausible answer text, deterministic per rng."""
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(rng.choice(PROSE))
    return " ".join(out)


def human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def bot(text: str) -> dict[str, str]:
    return {"from": "bot", "value": text}


def make_sources(photos: list[Path], per_kind: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Three sources of `per_kind` records: single-image, multi-image multi-turn, text-only."""
    rng = random.Random(seed)
    answer = lambda: prose(rng, rng.choice(ANSWER_WORDS))  # noqa: E731
    single, multi, text = [], [], []
    for i in range(per_kind):
        turns = [human("Describe this photo in detail."), bot(answer())]
        if i % 2:
            turns += [human("What time of day was it taken, and how can you tell?"), bot(answer())]
        single.append({"id": f"single-{i}", "image": str(rng.choice(photos)), "conversations": turns})

        images = [str(p) for p in rng.sample(photos, 2 + i % 2)]
        turns = [human("Image1: <ImageHere>; Image2: <ImageHere>; What differs between them?"), bot(answer())]
        if len(images) == 3:
            turns += [human("Image3: <ImageHere>; How does this one compare?"), bot(answer())]
        turns += [human("Which would suit a magazine cover, and why?"), bot(answer())]
        multi.append({"id": f"multi-{i}", "image": images, "conversations": turns})

        turns = [human(QUESTIONS[i % len(QUESTIONS)]), bot(answer())]
        if i % 3 == 0:
            turns += [human("Can you make it shorter?"), bot(prose(rng, 40))]
        text.append({"id": f"text-{i}", "conversations": turns})
    return {"single": single, "multi": multi, "text": text}


def build_shards(
    work: Path,
    sources: dict[str, list[dict[str, Any]]],
    tokenizer: Path,
    hd_num: int,
    max_length: int,
    workers: int,
) -> Path:
    """`xc-prep shard` over one JSON file per source; returns the shard folder."""
    lines = []
    for name, records in sources.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps(records))
        lines.append(f"{path} 1")
    (work / "data.txt").write_text("\n".join(lines) + "\n")
    out = work / "shards"
    argv = ["shard", str(work / "data.txt"), "--out", str(out), "--tokenizer", str(tokenizer)]
    argv += ["--hd-num", str(hd_num), "--max-length", str(max_length), "--workers", str(workers)]
    argv += ["--allow-path", str(work), "--overwrite"]
    status = prep_cli.main(argv)
    if status != 0:
        raise RuntimeError(f"xc-prep {' '.join(argv)} failed with exit status {status}")
    return out


def kept_ids(index: SampleIndex) -> set[str]:
    """Record ids that made it into the shards (the official mode trains on the same records)."""
    ids = set()
    for g in range(len(index)):
        reader = ShardReader(index.shards_dir / index.shard_files[index.sample_shard[g]])
        ids.add(str(reader.provenance(int(index.sample_row[g]))[3]))
    return ids


def resolve_tokenizer(arg: str | None, preset: str, work: Path) -> Path:
    if arg == "tiny" or (arg is None and preset == "tiny"):
        return build_tiny_tokenizer(work / "tiny.model")
    if arg is not None:
        return Path(arg)
    for path in TOKENIZER_CANDIDATES:
        if path.is_file():
            return path
    raise SystemExit(f"no tokenizer.model at {' or '.join(map(str, TOKENIZER_CANDIDATES))}; pass --tokenizer")


# ---------------------------------------------------------------- model


def build_lora_model(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    vocab_size: int,
    seed: int = 0,
    fused_lora: bool = True,
) -> tuple[IXCModel, torch.optim.Optimizer, list[torch.nn.Parameter], TrainConfig]:
    """The trainer's LoRA recipe on a random preset: model, fused AdamW, trainable params, config.
    fused_lora=False: PEFT's own LoRA layer, as the official recipe runs (`apply_recipe`)."""
    torch.manual_seed(seed)
    model = build_model(preset, seed=seed, dtype=dtype, device=device, vocab_size=vocab_size)
    cfg = TrainConfig(shards=Path("."), model=preset, recipe="lora").resolve()
    loaded = Loaded(model, None, preset, f"{preset} preset, random init")
    model = apply_recipe(loaded, cfg, fused_lora=fused_lora).model
    # PEFT creates the adapters in fp32; DeepSpeed's bf16 engine casts the whole module to bf16.
    model.to(dtype)
    model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=device.type == "cuda",
    )
    return model, optimizer, params, cfg


def measure_matmul_flops(device: torch.device) -> dict[str, Any]:
    """The card's bf16 matmul rate: median of 20 timed 8192³ products on random data."""
    size, dtype = (MATMUL_SIZE, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * size**3 / seconds}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


# ---------------------------------------------------------------- measurement


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


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> float:
    """Backward and update, then the loss as a float (one host sync: the step has run)."""
    loss.backward()
    update(optimizer, params)
    return float(loss.detach())


def update(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Clip to norm 1.0, AdamW step, clear the gradients: launched, not waited for."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def batch_flops(model: IXCModel, batch: PackedBatch) -> tuple[float, float]:
    lengths = batch.cu_seqlens.diff().tolist()
    views = int(batch.tiles.shape[0]) + int(batch.image_grids.shape[0])  # local tiles + global views
    return step_flops(model.config, [lengths], lora=True), vit_flops(model.config, views, trains=False)


def run_ours(
    model: IXCModel,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    shards: Path,
    args: argparse.Namespace,
    device: torch.device,
) -> Phase:
    """Packed rows from the shards through the trainer's loader; chunked loss."""
    index = SampleIndex.load(shards)
    needed = args.warmup + args.steps
    workers = min(MAX_LOADER_WORKERS, os.cpu_count() or 1)
    for repeat in range(1, 1000):  # draw every sample `repeat` times so the epoch has enough rows
        counts = {s.name: s.samples_written * repeat for s in index.manifest.sources}
        config = LoaderConfig(
            max_length=args.max_length, seed=args.seed, source_samples=counts, num_workers=workers, prefetch=2
        )
        loader = PackedLoader(index, config)
        plan = loader.plan(0)
        if plan.steps >= needed:
            break
    phase = Phase("ours", notes={"loader_workers": workers, "plan_fill": plan.fill, "sample_repeats": repeat})
    print(loader.summary(), file=sys.stderr)
    stream = iter(loader)
    timed = TimedIterator(stream)
    sync(device)
    last = time.perf_counter()
    try:
        for i in range(needed):
            if i == args.warmup:
                reset_peak(device)
            batch = next(timed).to(device)
            out = model(**batch.model_inputs(), targets=batch.targets)
            loss = optimizer_step(out.loss_sum / max(1, out.num_tokens or 0), optimizer, params)
            del out
            sync(device)  # xc-train synchronizes after each step too
            now = time.perf_counter()
            phase.add(
                i, args.warmup, model, batch, now - last, timed.last_wait_s, len(batch.sample_keys), loss
            )
            last = now
    finally:
        stream.close()  # stops the loader's worker processes
    phase.peak_allocated_gib, phase.peak_reserved_gib = peak_gib(device)
    return phase


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


def log_step(name: str, i: int, warmup: int, s: Step) -> None:
    kind = "warm-up" if i < warmup else "measured"
    print(
        f"  {name} step {i} ({kind}): {s.step_s:.3f} s | {s.tokens:,} tok, {s.samples} samples, {s.tiles} tiles | "
        f"data {s.data_s * 1000:.1f} ms | loss {s.loss:.4f}",
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------- report


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


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


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
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results: dict[str, Any] = {
        "bench": "train_throughput",
        "command": ["python", "bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": card,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "versions": package_versions(),
        "cpus": os.cpu_count(),
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "hd_num": args.hd_num,
        "max_length": args.max_length,
        "flops_formula": "LoRA step = 2*F, F = 2*N*sum(s_i) + 2*L*d*sum(s_i^2) (trainer/flops.py); ViT apart",
        "optimizer": "torch AdamW(fused on CUDA) driven directly, grad clip 1.0, one step per micro-batch; "
        "no DeepSpeed (ZeRO-2 on one GPU adds only a wrapper and fp32 LoRA master weights)",
        "ours_levers": {"checkpoint_layers": args.checkpoint_layers, "compile": args.compile},
        "attention": args.attention,
        "phases": [],
    }

    with tempfile.TemporaryDirectory(prefix="xc-train-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_path = resolve_tokenizer(args.tokenizer, args.preset, work)
        tokenizer = Tokenizer.from_path(tokenizer_path)
        results["tokenizer"] = str(tokenizer_path)

        # --- data on a side thread (the shard workers are processes) while the model is built
        def prepare() -> tuple[Path, dict[str, list[dict[str, Any]]]]:
            t0 = time.perf_counter()
            photos = make_photos(work / "photos")
            sources = make_sources(photos, args.records, args.seed)
            out = build_shards(
                work, sources, tokenizer_path, args.hd_num, args.max_length, args.shard_workers
            )
            results["data_prep_s"] = time.perf_counter() - t0
            return out, sources

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            data_future = pool.submit(prepare)
            t0 = time.perf_counter()
            official_layers = (
                []
                if args.skip_official
                else {"peft": [False], "fused": [True], "both": [False, True]}[args.official_lora]
            )
            model_fused = official_layers[0] if official_layers else True
            model, optimizer, params, _ = build_lora_model(
                args.preset, device, dtype, tokenizer.vocab_size, args.seed, fused_lora=model_fused
            )
            results["model_build_s"] = time.perf_counter() - t0
            model.attention_backend = args.attention
            shards, sources = data_future.result()
        results["model"] = {
            "llm_matmul_params": llm_matmul_params(model.config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params),
            "unused_adapters_on_cpu": model.unused_adapter_numel(),
        }
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
            f"{card} | torch {torch.__version__} | {args.preset} {results['model']['parameters'] / 1e9:.2f} B params, "
            f"{results['model']['trainable'] / 1e6:.1f} M trainable (LoRA), "
            f"{results['model']['unused_adapters_on_cpu'] / 1e9:.2f} B unused adapters on the CPU | "
            f"data {json.dumps(results['data'])} | prep {results['data_prep_s']:.1f} s, model {results['model_build_s']:.1f} s",
            file=sys.stderr,
        )

        results["matmul"] = measure_matmul_flops(device)
        peak, datasheet = results["matmul"]["flops"], peak_bf16_flops(device)
        results["datasheet_bf16_flops"] = datasheet
        print(f"matmul {results['matmul']}", file=sys.stderr)

        phases: list[Phase] = []

        def rebuild(fused_lora: bool) -> tuple[IXCModel, torch.optim.Optimizer, list[torch.nn.Parameter]]:
            """PEFT's LoRA layer (the official recipe's) and ours are two models of the same weights
            (same seed); the caller drops the one in use first, so that one is in memory at a time."""
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            built, opt, trainable, _ = build_lora_model(
                args.preset, device, dtype, tokenizer.vocab_size, args.seed, fused_lora=fused_lora
            )
            built.attention_backend = args.attention
            return built, opt, trainable

        def record(phase: Phase) -> None:
            phases.append(phase)
            results["phases"] = [p.summary(peak, datasheet) for p in phases]
            results["steps"] = {p.name: [asdict(s) for s in p.warmup + p.measured] for p in phases}
            results["elapsed_s"] = time.perf_counter() - started
            write_json(args.out_json, results)

        # Kernels compiled at first use (FlashAttention-4 builds one per tile configuration, chosen
        # by length) are built here, before either mode is timed: a measured step must not pay one.
        c = model.config
        backend = resolve_backend(args.attention, device, dtype, c.head_dim)
        results["attention_backend"] = backend
        results["attention_warm_up_s"] = warm_up(
            backend, c.num_attention_heads, c.num_key_value_heads, c.head_dim, dtype, device
        )
        # The official mode first: it runs as the official recipe does (eager, every decoder layer
        # recomputed), and compiling our layers (--compile) cannot be undone.
        if not args.skip_official:
            kept = kept_ids(index)
            by_kind = [
                [(name, json.dumps(r)) for r in records if str(r["id"]) in kept]
                for name, records in sources.items()
            ]
            # single, multi, text, single, ...: every window of three steps sees each kind once
            interleaved = [r for group in itertools.zip_longest(*by_kind) for r in group if r is not None]
            if args.official_steps is None:
                args.official_steps = len(interleaved)  # after the warm-up, each record once
            for fused_lora in official_layers:
                if fused_lora != model_fused:
                    del model, optimizer, params
                    model, optimizer, params = rebuild(fused_lora)
                    model_fused = fused_lora
                try:
                    record(
                        run_official(
                            model, optimizer, params, interleaved, work, tokenizer, args, device, fused_lora
                        )
                    )
                except Exception:  # keep going: the other mode's numbers are still worth having
                    traceback.print_exc()
                    record(Phase(official_name(fused_lora), error=traceback.format_exc()))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not model_fused:
            del model, optimizer, params
            model, optimizer, params = rebuild(True)
        model.checkpoint_layers = args.checkpoint_layers
        if args.compile:
            compile_layers(model)
        try:
            record(run_ours(model, optimizer, params, shards, args, device))
        except Exception:
            traceback.print_exc()
            record(Phase("ours", error=traceback.format_exc()))

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
