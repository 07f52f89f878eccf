"""The training loop: setup, loop, micro-steps, log, save — top to bottom, one file.

Runs as one process without a launcher, or one process per GPU under `deepspeed`/`torchrun`
(multi-node included: ranks come from the launcher's RANK/WORLD_SIZE/LOCAL_RANK). CUDA gets NCCL
and bf16; CPU gets gloo and fp32, which is how the tests run the real DeepSpeed engine.

Loss normalization: the official recipe averages the loss per conversation, then over
accumulation steps and GPUs, so a short answer weighs as much as a long one. With packing, the
loss is the mean over every trained token of the global batch: each rank scales its micro-batch's
loss sum by world × accumulation / (trained tokens of the whole global step, known from the plan),
which DeepSpeed's 1/accumulation and the gradient average over ranks turn back into that mean.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from schemas.manifest import TOKENIZER_NAME, Manifest
from schemas.shards import file_sha256
from trainer import checkpoint as ckpt
from trainer.attention import resolve_backend
from trainer.batch import PackedBatch
from trainer.config import TrainConfig, batch_layout, deepspeed_config, warmup_cosine
from trainer.errors import ShardDataError, TrainingHalted
from trainer.flops import pack_cost_weights, peak_bf16_flops, step_flops
from trainer.index import SampleIndex
from trainer.loader import PackedLoader, TimedIterator
from trainer.loss import segment_losses
from trainer.model import IXCModel, compile_layers, num_parameters, row_token_losses
from trainer.model_config import PRESETS, ModelConfig, preset_config
from trainer.modelio import BASE_DIR_NAME, load_for_training, resolve_model_dir
from trainer.plan import LoaderConfig
from trainer.weights import load_config

SUMMARY_FILE = "train_summary.json"


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- setup


def setup_distributed() -> Dist:
    """Join the launcher's process group (or make a one-process group) through DeepSpeed."""
    import deepspeed

    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "MASTER_ADDR" not in os.environ:  # no launcher: a group of one on this machine
        if world_size != 1:
            raise ValueError(
                f"WORLD_SIZE is {world_size} but MASTER_ADDR is not set: start the ranks with `deepspeed` "
                "or `torchrun`, or set MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK for every rank"
            )
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loader_config(cfg: TrainConfig, world_size: int, model: ModelConfig | None = None) -> LoaderConfig:
    """The loader settings a training config implies (one packed row per micro-step); `model`
    gives the compute estimate that deals packs to ranks (tokens only without it)."""
    _, accumulation = batch_layout(cfg.global_batch_size, world_size)
    attention_cost, tile_cost = (
        pack_cost_weights(model, lora=bool(cfg.use_lora), vit_trains=not cfg.fix_vit) if model else (0.0, 0.0)
    )
    return LoaderConfig(
        attention_cost=attention_cost,
        tile_cost=tile_cost,
        max_length=cfg.max_length,
        max_tiles=cfg.max_tiles,
        seed=cfg.seed,
        epochs=cfg.epochs,
        micro_batches_per_step=accumulation,
        token_weighted=cfg.token_weighted,
        source_samples=cfg.source_sample_overrides(),
        num_workers=cfg.num_workers,
    )


def model_config(cfg: TrainConfig) -> ModelConfig | None:
    """The architecture --model names, without loading weights or looking online (None: not a
    preset, a readable local folder nor a hub id in the local cache)."""
    if cfg.model in PRESETS:
        return preset_config(cfg.model)
    try:
        return load_config(resolve_model_dir(cfg.model, offline=True))
    except (OSError, ValueError):
        return None


def load_index_on_all_ranks(shards: Path, d: Dist) -> SampleIndex:
    """`SampleIndex.load` on every rank; every rank raises if any found a problem (so no rank is left
    waiting in a collective)."""
    index, problem = None, None
    try:
        index = SampleIndex.load(shards)
    except ShardDataError as e:
        problem = str(e)
    if d.world_size > 1:
        found: list[str | None] = [None] * d.world_size
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise ShardDataError(problem)
    assert index is not None
    return index


def check_fingerprint(manifest: Manifest, model_dir: Path | None, cfg: TrainConfig) -> None:
    """Refuse shards made with another tokenizer or a longer max_length than training allows."""
    fp = manifest.fingerprint
    if model_dir is not None and (model_dir / TOKENIZER_NAME).is_file():
        model_sha = file_sha256(model_dir / TOKENIZER_NAME)
        if model_sha != fp.tokenizer_sha256:
            raise ValueError(
                f"the shards in {cfg.shards} were tokenized with another tokenizer "
                f"(sha256 {fp.tokenizer_sha256[:12]}…) than the model's {model_dir / TOKENIZER_NAME} "
                f"({model_sha[:12]}…): re-run `xc-prep shard --tokenizer {model_dir}`"
            )
    if fp.max_length > cfg.max_length:
        raise ValueError(
            f"the shards were made with max_length {fp.max_length} but --max-length is {cfg.max_length}: "
            f"samples may not fit a packed row; use --max-length {fp.max_length} or re-shard"
        )


def trainable_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norm scales and the separator vectors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "norm" in name or "GN" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def log_line(d: Dist, text: str) -> None:
    if d.is_main:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one optimizer step


def reduces_every_micro_batch(engine: Any) -> bool:
    """Whether DeepSpeed reduces gradients inside every micro-batch's backward, in the order its
    gradient hooks fire (ZeRO-2/3, or overlap_comm): then every rank must run the same backward at
    the same micro-batch. Otherwise (ZeRO-0/1) gradients meet once, in parameter order, at the
    step's last micro-batch, and the ranks need not wait for each other before it."""
    return bool(engine.zero_optimization_partition_gradients() or engine.zero_overlap_comm())


def train_step(
    engine: Any, batches: list[PackedBatch], d: Dist, accumulation: int, cfg: TrainConfig, per_source: bool
) -> dict[str, Any]:
    """Forward/backward every micro-batch of one global step on this rank, then the optimizer step.

    A micro-batch with a non-finite loss adds nothing (nan-policy skip) or halts every rank before
    the optimizer step (stop). Where gradients are reduced in every backward, the ranks agree on
    each micro-batch first and all skip it; otherwise only its rank skips it, and the ranks agree
    once, after the step's last backward."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    skipped: list[Any] = []
    bad_here: list[PackedBatch] = []
    source_sums: dict[str, list[float]] = {}
    reduce_each = reduces_every_micro_batch(engine)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # Dropout (LoRA, Plora) draws from a stream named by the micro-batch, not by the rank: the
        # run is the same on any world size, and a resumed run replays the same masks.
        torch.manual_seed(micro_batch_seed(cfg.seed, batch.epoch, batch.pack))
        out = engine(**batch.model_inputs(), targets=batch.targets)
        bad = (~torch.isfinite(out.loss_sum.detach())).to(torch.int32).reshape(1)
        if reduce_each and d.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        finite = not bad.item()
        # An exact zero that touches each trainable parameter: a skipped micro-batch still fires
        # ZeRO's gradient hooks on every rank, and every parameter has a gradient when gradients are
        # reduced once per step (ZeRO-1 reduces those that have one: the same set on every rank).
        touch = not finite or (not reduce_each and last and d.world_size > 1)
        zero: torch.Tensor | float = 0.0
        if touch:
            trained = (p for p in engine.module.parameters() if p.requires_grad)
            zero = sum((p.sum() * 0.0 for p in trained), torch.zeros((), device=d.device))
        if not finite:
            bad_here.append(batch)
            engine.backward(zero)  # and none of this micro-batch's non-finite activations
        else:
            scale = d.world_size * accumulation / max(1, batch.global_num_trained)
            engine.backward(out.loss_sum * scale + zero)
            loss_sum += out.loss_sum.detach().double()
        if reduce_each:
            skipped.extend(_halt_or_skip(bad_here, batches[0], d, cfg))
            bad_here = []
        elif last:  # before the optimizer step: one agreement for the whole step
            skipped.extend(_halt_or_skip(bad_here, batches[0], d, cfg, agree=True))
        engine.step()
        if per_source and finite:
            with torch.no_grad():
                unwrapped = engine.module
                losses = row_token_losses(unwrapped.output, out, batch.targets[0])
                sums, counts = segment_losses(losses, batch.targets[0], batch.cu_seqlens)
            for (source, _, _), s, c in zip(batch.sample_keys, sums.tolist(), counts.tolist(), strict=True):
                acc = source_sums.setdefault(source, [0.0, 0])
                acc[0] += s
                acc[1] += c
    if d.world_size > 1:
        dist.all_reduce(loss_sum)
    global_trained = max(1, batches[0].global_num_trained)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if not math.isfinite(grad_norm) and not skipped:
        raise TrainingHalted(
            f"non-finite gradient norm ({grad_norm}) at step {batches[0].step}; samples: "
            f"{_gather_keys([k for b in batches for k in b.sample_keys], d)}. The last checkpoint under "
            f"{ckpt.checkpoint_root(cfg.output_dir)} is intact"
        )
    if per_source and d.world_size > 1:
        gathered: list[dict[str, list[float]]] = [{} for _ in range(d.world_size)]
        dist.all_gather_object(gathered, source_sums)
        source_sums = {}
        for part in gathered:
            for k, (s, c) in part.items():
                acc = source_sums.setdefault(k, [0.0, 0])
                acc[0] += s
                acc[1] += c
    return {
        "loss": float(loss_sum.item()) / global_trained,
        "grad_norm": grad_norm,
        "tokens": batches[0].global_num_tokens,
        "trained_tokens": global_trained,
        "skipped": skipped,
        "source_loss": {k: s / max(1, c) for k, (s, c) in source_sums.items()},
    }


def micro_batch_seed(seed: int, epoch: int, pack: int) -> int:
    """The torch seed of one micro-batch: a function of (seed, epoch, pack id in the plan) only."""
    return int(np.random.SeedSequence([seed, epoch, pack]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _halt_or_skip(
    bad: list[PackedBatch], step: PackedBatch, d: Dist, cfg: TrainConfig, agree: bool = False
) -> list[Any]:
    """The sample keys of the non-finite micro-batches (this rank's `bad`, gathered from every
    rank), or TrainingHalted on every rank under nan-policy stop. `agree`: the ranks first learn
    whether any of them has one (else they agreed on the micro-batch already and all hold it)."""
    if agree and d.world_size > 1:
        count = torch.tensor([len(bad)], dtype=torch.int64, device=d.device)
        dist.all_reduce(count)
        if not count.item():
            return []
    elif not bad:
        return []
    found = _gather_keys([(d.rank, b.micro_step, list(b.sample_keys)) for b in bad], d)
    keys = [k for _, _, ks in found for k in ks]
    if cfg.nan_policy == "stop":
        micro = sorted({m for _, m, _ in found})
        where = f"micro-batch{'es' if len(micro) > 1 else ''} {', '.join(map(str, micro))}"
        if agree and d.world_size > 1:
            ranks = sorted({r for r, _, _ in found})
            where += f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        raise TrainingHalted(
            f"non-finite loss at epoch {step.epoch} step {step.step} {where}; samples (source, index, id): "
            f"{keys}. The last checkpoint under {ckpt.checkpoint_root(cfg.output_dir)} is intact; rerun "
            "with --nan-policy skip to drop such micro-batches"
        )
    return keys


def _gather_keys(keys: list[Any], d: Dist) -> list[Any]:
    """Every rank's list (of sample keys, or anything picklable), concatenated in rank order."""
    if d.world_size == 1:
        return list(keys)
    parts: list[list[Any]] = [[] for _ in range(d.world_size)]
    dist.all_gather_object(parts, list(keys))
    return [k for part in parts for k in part]


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune per the resolved config; returns the run summary (also written to output-dir)."""
    import deepspeed
    from tqdm import tqdm

    cfg = cfg.resolve()
    assert cfg.shards is not None and cfg.learning_rate is not None, "resolve() fills both"
    started = time.perf_counter()
    startup: dict[str, float] = {}  # seconds per start-up phase (setup = process group + shard check)

    def phase_done(name: str) -> None:
        startup[name] = time.perf_counter() - started - sum(startup.values())

    d = setup_distributed()
    torch.manual_seed(cfg.seed + d.rank)
    output_dir = Path(cfg.output_dir)
    global_batch, accumulation = batch_layout(cfg.global_batch_size, d.world_size)
    bf16 = d.device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # Derived now, so that a conflicting --deepspeed file is refused before anything loads.
    ds_config = deepspeed_config(cfg, world_size=d.world_size, bf16=bf16)

    # --- shards: verified against the manifest before any step uses them
    index = load_index_on_all_ranks(Path(cfg.shards), d)  # each sample is checked as it is read
    manifest = index.manifest

    # --- model (+ LoRA), frozen parts per recipe; the tokenizer is checked before the weights load
    # (presets are built from the shards' own tokenizer, but a tiny base that an earlier run left in
    # output-dir is reused: it is checked like a folder)
    model_dir = None if cfg.model in PRESETS else resolve_model_dir(cfg.model)
    if cfg.model == "tiny":
        model_dir = output_dir / BASE_DIR_NAME
    check_fingerprint(manifest, model_dir, cfg)
    if d.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partials(output_dir)
    # the checkpoint to resume is checked before the model is built (a 7B takes tens of seconds)
    resume_from = ckpt.resolve_resume(output_dir, cfg.resume)
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = ckpt.verify_checkpoint(resume_from)
        ckpt.check_same_model(saved, cfg.to_json(), resume_from)
    phase_done("setup")
    loaded = load_for_training(cfg, manifest_dir=Path(cfg.shards), output_dir=output_dir, dtype=dtype, d=d)
    phase_done("model")
    model: IXCModel = loaded.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.checkpoint_layers = cfg.checkpoint_layers
    model.train()
    if cfg.compile:
        decoder, vision = compile_layers(model)
        log_line(
            d, f"torch.compile: {decoder} decoder and {vision} ViT layers, compiled during the first step"
        )

    # --- data
    loader = PackedLoader(
        index, loader_config(cfg, d.world_size, model.config), rank=d.rank, world_size=d.world_size
    )
    total_steps = loader.total_steps if cfg.max_steps is None else min(cfg.max_steps, loader.total_steps)
    if total_steps <= 0:
        raise ValueError(f"{cfg.shards}: the epoch plan has no optimizer step (too few samples?)")

    # --- optimizer, schedule, engine
    optimizer = torch.optim.AdamW(
        trainable_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=d.device.type == "cuda",
    )
    ds_config["zero_allow_untested_optimizer"] = True  # torch's (fused) AdamW under ZeRO
    if resume_from is not None:
        if ckpt.needs_universal(saved, d.world_size):
            # Elastic resume: same global batch, another number of ranks.
            ckpt.convert_to_universal(resume_from)
            ds_config["checkpoint"] = {"load_universal": True}
            phase_done("universal")

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # Built by DeepSpeed on the optimizer it actually steps (ZeRO wraps ours).
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, total_steps=total_steps, warmup_ratio=cfg.warmup_ratio)
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    phase_done("deepspeed")

    # --- resume
    step = 0
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        state = ckpt.load_checkpoint(engine, resume_from)
        loader.load_state_dict(state["loader"])
        step = int(state["step"])
        history = list(state.get("history", []))
        phase_done("resume")
        log_line(d, f"resumed from {resume_from} at step {step} (loaded in {startup['resume']:.1f} s)")

    # --- start-up summary, resolved config beside the outputs
    trainable = num_parameters(model, trainable_only=True)
    total_params = num_parameters(model)
    if d.is_main:
        run_info = {"config": cfg.to_json(), "command": argv or sys.argv, "deepspeed": ds_config}
        (output_dir / "train_config.json").write_text(json.dumps(run_info, indent=2) + "\n")
    log_line(
        d,
        "\n".join(
            [
                f"xc-train | model {cfg.model} ({loaded.description}) | recipe {cfg.recipe} | "
                f"{'LoRA r=' + str(cfg.lora_r) if cfg.use_lora else 'full'} | fix_vit {cfg.fix_vit} | "
                f"fix_sampler {cfg.fix_sampler}",
                f"parameters {total_params:,} ({trainable:,} trainable) | {d.world_size} rank(s) on "
                f"{d.device.type} | {str(dtype).removeprefix('torch.')} | ZeRO {ds_config.get('zero_optimization', {}).get('stage', '-')} | "
                f"attention {resolve_backend(cfg.attention, d.device, dtype, model.config.head_dim)}",
                f"global batch {global_batch} packed rows = 1 × {accumulation} accumulation × {d.world_size} "
                f"rank(s) | {total_steps} optimizer steps | lr {cfg.learning_rate:g} cosine, warmup "
                f"{cfg.warmup_ratio:.0%}",
                loader.summary(),
                f"start-up {sum(startup.values()):.1f} s: "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in startup.items()),
            ]
        ),
    )

    # --- loop
    writer = _tensorboard(output_dir) if d.is_main else None
    peak = peak_bf16_flops(d.device)
    batches_iter = TimedIterator(iter(loader))
    progress = tqdm(
        total=total_steps,
        initial=step,
        disable=not (d.is_main and sys.stderr.isatty()),  # log lines only, when not a terminal
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    skipped_total: list[Any] = []
    saves: list[dict[str, float]] = []  # checkpoint write times
    start_step = step
    step_time = time.perf_counter()
    try:
        while step < total_steps:
            batches = []
            for _ in range(accumulation):
                batches.append(next(batches_iter).to(d.device))
            wait_s = batches_iter.pop_wait_s()
            log_now = (step + 1) % cfg.log_every_steps == 0 or step + 1 == total_steps
            lr = scheduler.get_last_lr()[0]  # the rate this step applies (the scheduler steps after it)
            result = train_step(engine, batches, d, accumulation, cfg, per_source=log_now)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            elapsed, step_time = now - step_time, now
            step += 1
            skipped_total.extend(result["skipped"])
            # Every rank's packs of the step, from the plan (no collective): exact on any world size.
            plan = loader.plan(batches[0].epoch)
            packs = [index.num_tokens[plan.pack(p)].tolist() for p in plan.step_packs(batches[0].step)]
            flops = step_flops(model.config, packs, lora=bool(cfg.use_lora))
            record = {
                "step": step,
                "samples": plan.step_digest(batches[0].step),
                "loss": result["loss"],
                "lr": lr,
                "grad_norm": result["grad_norm"],
                "step_s": elapsed,
                "tokens_per_s": result["tokens"] / elapsed,
                "data_wait_pct": 100.0 * wait_s / elapsed,
                "model_flops": flops,
                "mfu": flops / elapsed / (peak * d.world_size) if peak else None,
                "source_loss": result["source_loss"],
            }
            history.append({k: v for k, v in record.items() if k != "source_loss"})
            if d.is_main:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
                if log_now:
                    _log_scalars(writer, record)
                    mfu = f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""
                    progress.write(
                        f"step {step}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.1e} | "
                        f"{elapsed:.2f} s/step | {record['tokens_per_s']:,.0f} tok/s | data wait "
                        f"{record['data_wait_pct']:.1f}%{mfu}",
                        file=sys.stderr,
                    )
            stop_now = cfg.stop_after_steps is not None and step - start_step >= cfg.stop_after_steps
            if step % cfg.save_every_steps == 0 or step == total_steps or stop_now:
                save_started = time.perf_counter()
                saved_to = ckpt.save_checkpoint(
                    engine,
                    output_dir,
                    step,
                    {"loader": loader.state_dict(), "config": cfg.to_json(), "history": history},
                    cfg.keep_last,
                )
                saves.append({"step": step, "seconds": time.perf_counter() - save_started})
                log_line(d, f"checkpoint {saved_to} saved in {saves[-1]['seconds']:.1f} s")
                step_time = time.perf_counter()  # the next step's time leaves the write out
            if stop_now:
                log_line(
                    d, f"stopping after {cfg.stop_after_steps} step(s) as asked; resume with --resume auto"
                )
                break
    finally:
        batches_iter.close()  # stopped early (max/stop-after steps, an error): the loader's threads end here
        progress.close()
        if writer is not None:
            writer.close()

    # --- save
    final_dir = output_dir / "final"
    finished = step == total_steps
    if cfg.save_final and finished:
        loaded.save_final(engine, final_dir, d)
    peak_bytes = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else None
    peaks: list[int | None] = [peak_bytes] * d.world_size
    if dist.is_initialized():
        dist.all_gather_object(peaks, peak_bytes)  # every rank's, for the summary
    summary = {
        "steps": step,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "skipped_samples": skipped_total,
        "final_dir": str(final_dir) if cfg.save_final and finished else None,
        "peak_gpu_memory_bytes": peaks if d.device.type == "cuda" else None,
        "world_size": d.world_size,
        "startup_s": startup,
        "checkpoint_saves": saves,
    }
    if d.is_main:
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _plot_loss(history, output_dir / "loss.png")
        if skipped_total:
            log_line(
                d, f"warning: {len(skipped_total)} sample(s) skipped for non-finite loss: {skipped_total}"
            )
        if d.device.type == "cuda":
            log_line(
                d, "peak GPU memory per rank: " + ", ".join(f"{(p or 0) / 2**30:.1f}" for p in peaks) + " GiB"
            )
        log_line(d, f"done: {step} steps, final loss {summary['final_loss']:.4f}, outputs in {output_dir}")
    if dist.is_initialized():
        dist.barrier()
    return summary


# ---------------------------------------------------------------- telemetry


def _tensorboard(output_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install only loses the scalars
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


def _log_scalars(writer: Any, record: dict[str, Any]) -> None:
    if writer is None:
        return
    step = record["step"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_pct", "mfu"):
        if record.get(key) is not None and math.isfinite(record[key]):
            writer.add_scalar(f"train/{key}", record[key], step)
    for source, value in record["source_loss"].items():
        writer.add_scalar(f"loss_by_source/{source}", value, step)


def _plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    losses = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
