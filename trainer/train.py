"""The training loop: setup, loop, micro-steps, log, save — top to bottom, one file.

Runs as one process without a launcher, or one process per GPU under `deepspeed`/`torchrun`
(multi-node included: ranks come from the launcher's RANK/WORLD_SIZE/LOCAL_RANK). CUDA gets NCCL
and bf16; CPU gets gloo and fp32, which is how the tests run the real DeepSpeed engine.

Loss normalization: the official recipe averages the loss per conversation, then over
accumulation steps and GPUs, so a short answer weighs as much as a long one. With packing, the
loss is the mean over every trained token of the global batch: each rank scales its micro-batch's
loss sum by world × accumulation / (trained tokens of the whole global step, known from the plan),
which DeepSpeed's 1/accumulation and the gradient average over ranks turn back into that mean.

Start-up checks what can fail fast before anything slow: the trackers' libraries, the shards'
manifest, --model and its tokenizer, then DeepSpeed's process group, the shard checksums and the
model. Held-out evaluation (trainer/heldout.py), SIGINT/SIGTERM (trainer/stop.py) and the
trackers (trainer/trackers.py) each meet the loop at one place, after the optimizer step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from schemas.atomic import write_json_atomic
from trainer import checkpoint as ckpt
from trainer.attention import resolve_backend
from trainer.batch import PackedBatch
from trainer.config import TrainConfig, batch_layout, deepspeed_config, warmup_cosine
from trainer.errors import Stopped, TrainingHalted
from trainer.flops import peak_bf16_flops, step_flops
from trainer.heldout import EvalRecord, EvalRows, evaluate_rows, pack_rows, split_samples
from trainer.loader import PackedLoader, TimedIterator
from trainer.loss import segment_losses
from trainer.model import IXCModel, compile_layers, num_parameters, row_token_losses
from trainer.modelio import load_for_training
from trainer.planning import loader_config, model_config  # noqa: F401  (model_config: re-exported)
from trainer.shard_checks import check_eval_shards, check_model, load_index_on_all_ranks, load_manifest
from trainer.stop import StopSignals
from trainer.trackers import Trackers, check_installed, eval_scalars, train_scalars

SUMMARY_FILE = "train_summary.json"
BEST_DIR_NAME = "best"


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
        if not cuda and rank == 0:
            announce_extension_build()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def announce_extension_build() -> None:
    """One line when DeepSpeed is about to compile its CPU communication extension (1-4 minutes,
    silent otherwise). It is not shipped with DeepSpeed: torch builds it into its extension cache
    (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and rebuilds it when the cached build
    was made from another DeepSpeed install (another virtual environment), whose paths its
    build.ninja names."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or installed_ops.get(builder.NAME, False) or not builder.is_compatible(False):
        return
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    ninja = folder / "build.ninja"
    source = str(Path(deepspeed.__file__).parent)
    if any(folder.glob(f"{builder.NAME}*.so")) and ninja.is_file() and source in ninja.read_text():
        return
    print(
        f"xc-train: DeepSpeed compiles its CPU communication extension {builder.NAME} now (1-4 minutes, "
        f"once per DeepSpeed install); later runs load it from {folder}",
        file=sys.stderr,
        flush=True,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def build_engine(
    model: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], total_steps: int
) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR]:
    """DeepSpeed's engine over `model` and the schedule it steps: torch's AdamW (fused on CUDA) on
    the trainable parameters, warm-up then cosine over `total_steps`. `ds_config` gains
    zero_allow_untested_optimizer (torch's AdamW under ZeRO), so the run's record shows it."""
    import deepspeed

    assert cfg.learning_rate is not None, "build_engine takes a resolved TrainConfig"
    cuda = any(p.is_cuda for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        trainable_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=cuda,
    )
    ds_config["zero_allow_untested_optimizer"] = True

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # Built by DeepSpeed on the optimizer it actually steps (ZeRO wraps ours).
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, total_steps=total_steps, warmup_ratio=cfg.warmup_ratio)
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine, scheduler


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
    own_norm = float("nan")
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
        if last and not engine.zero_optimization():
            # Without ZeRO, DeepSpeed's fp32 engine keeps no gradient norm: measure it here, after
            # the last backward's all-reduce and before the step clips and clears the gradients.
            own_norm = gradient_norm(engine.module)
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
    grad_norm = float(grad_norm) if grad_norm is not None else own_norm
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


def gradient_norm(model: torch.nn.Module) -> float:
    """The 2-norm of every gradient the model's parameters hold."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


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
    from tqdm import tqdm

    cfg = cfg.resolve()
    assert cfg.shards is not None and cfg.learning_rate is not None, "resolve() fills both"
    started = time.perf_counter()
    startup: dict[str, float] = {}  # seconds per start-up phase (setup = process group + shard check)

    def phase_done(name: str) -> None:
        startup[name] = time.perf_counter() - started - sum(startup.values())

    # --- what fails fast: trackers' libraries, manifests, --model and its tokenizer
    check_installed(cfg.report_to)
    output_dir = Path(cfg.output_dir)
    manifest = load_manifest(cfg.shards)
    check_model(cfg, manifest, output_dir)
    if cfg.eval_shards is not None:
        check_eval_shards(load_manifest(cfg.eval_shards), cfg.eval_shards, manifest)

    d = setup_distributed()
    torch.manual_seed(cfg.seed + d.rank)
    global_batch, accumulation = batch_layout(cfg.global_batch_size, d.world_size)
    bf16 = d.device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # Derived now, so that a conflicting --deepspeed file is refused before anything loads.
    ds_config = deepspeed_config(cfg, world_size=d.world_size, bf16=bf16)

    # --- shards: verified against the manifest before any step uses them
    eval_shards = (
        load_index_on_all_ranks(cfg.eval_shards, d.world_size) if cfg.eval_shards is not None else None
    )
    # held-out samples (--eval-fraction) leave the training index
    index, eval_index = split_samples(
        load_index_on_all_ranks(cfg.shards, d.world_size), eval_shards, cfg.eval_fraction, cfg.seed
    )
    if d.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partials(output_dir)
        ckpt.recover_folder(output_dir / BEST_DIR_NAME)
    # the checkpoint to resume is checked before the model is built (a 7B takes tens of seconds)
    resume_from = ckpt.resolve_resume(output_dir, cfg.resume)
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = ckpt.verify_checkpoint(resume_from)
        ckpt.check_same_model(saved, cfg.to_json(), resume_from)
    phase_done("setup")
    loaded = load_for_training(
        cfg, manifest_dir=index.tokenizer_dir(), output_dir=output_dir, dtype=dtype, d=d
    )
    phase_done("model")
    model: IXCModel = loaded.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.checkpoint_layers = cfg.checkpoint_layers
    model.train()
    model.vision_in_every_row = ds_config.get("zero_optimization", {}).get("stage") == 3
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
    eval_rows = pack_rows(eval_index, loader.max_length, cfg.max_tiles) if eval_index is not None else None
    eval_every = cfg.eval_every_steps or cfg.save_every_steps

    # --- optimizer, schedule, engine
    if resume_from is not None:
        if ckpt.needs_universal(saved, d.world_size):
            # Elastic resume: same global batch, another number of ranks.
            ckpt.convert_to_universal(resume_from)
            ds_config["checkpoint"] = {"load_universal": True}
            phase_done("universal")
    engine, scheduler = build_engine(model, cfg, ds_config, total_steps)
    phase_done("deepspeed")

    # --- resume
    step = 0
    history: list[dict[str, Any]] = []
    evals = EvalRecord()
    if resume_from is not None:
        state = ckpt.load_checkpoint(engine, resume_from)
        loader.load_state_dict(state["loader"])
        step = int(state["step"])
        history = list(state.get("history", []))
        evals = EvalRecord.from_state(state.get("eval"))
        phase_done("resume")
        log_line(d, f"resumed from {resume_from} at step {step} (loaded in {startup['resume']:.1f} s)")

    # --- start-up summary, resolved config beside the outputs
    trainable = num_parameters(model, trainable_only=True)
    total_params = num_parameters(model)
    run_info = {"config": cfg.to_json(), "command": argv or sys.argv, "deepspeed": ds_config}
    if d.is_main:
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
                *([_eval_line(eval_rows, eval_every, cfg)] if eval_rows is not None else []),
                f"start-up {sum(startup.values()):.1f} s: "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in startup.items()),
            ]
        ),
    )

    # --- loop
    trackers = Trackers(cfg.report_to, output_dir, run_info) if d.is_main else None
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
    stops = StopSignals(announce=d.is_main, where=str(ckpt.checkpoint_root(output_dir))).install()
    stopped_by: str | None = None  # the signal that stopped the run
    saved_to: Path | None = None
    if evals.stopped_early:
        log_line(d, f"the run stopped early at step {step} (see {SUMMARY_FILE}); nothing left to train")
        total_steps = step
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
                    if trackers is not None:
                        trackers.log(train_scalars(record), step)
                    mfu = f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""
                    progress.write(
                        f"step {step}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.1e} | "
                        f"{elapsed:.2f} s/step | {record['tokens_per_s']:,.0f} tok/s | data wait "
                        f"{record['data_wait_pct']:.1f}%{mfu}",
                        file=sys.stderr,
                    )
            # Every rank learns of a signal that reached any of them (one collective per step).
            if stops.agreed(d.world_size, d.device):
                stopped_by = stops.received or "a stop signal on another rank"
            elif eval_rows is not None and (step % eval_every == 0 or step == total_steps):
                evaluate_and_keep_best(engine, loaded, eval_rows, evals, step, d, output_dir, trackers)
                if evals.out_of_patience(cfg.early_stop_patience):
                    evals.stopped_early = True
                    log_line(
                        d,
                        f"stopping early: the eval loss has not improved for {evals.since_best} "
                        f"evaluation(s) (best {evals.best_loss:.4f} at step {evals.best_step}, in "
                        f"{output_dir / BEST_DIR_NAME})",
                    )
            stop_after = cfg.stop_after_steps is not None and step - start_step >= cfg.stop_after_steps
            stop_now = stop_after or stopped_by is not None or evals.stopped_early
            if step % cfg.save_every_steps == 0 or step == total_steps or stop_now:
                save_started = time.perf_counter()
                saved_to = ckpt.save_checkpoint(
                    engine,
                    output_dir,
                    step,
                    {
                        "loader": loader.state_dict(),
                        "config": cfg.to_json(),
                        "history": history,
                        "eval": evals.state_dict(),
                    },
                    cfg.keep_last,
                )
                saves.append({"step": step, "seconds": time.perf_counter() - save_started})
                log_line(d, f"checkpoint {saved_to} saved in {saves[-1]['seconds']:.1f} s")
                step_time = time.perf_counter()  # the next step's time leaves the write out
            if stop_after and stopped_by is None and not evals.stopped_early:
                log_line(
                    d, f"stopping after {cfg.stop_after_steps} step(s) as asked; resume with --resume auto"
                )
            if stop_now:
                break
    except BaseException:
        if trackers is not None:
            trackers.abort()
        raise
    finally:
        stops.restore()
        batches_iter.close()  # stopped early (max/stop-after steps, an error): the loader's threads end here
        progress.close()

    # --- save
    final_dir = output_dir / "final"
    finished = step == total_steps or evals.stopped_early
    if cfg.save_final and finished:
        loaded.save_final(engine, final_dir, d)
    peak_bytes = torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else None
    peaks: list[int | None] = [peak_bytes] * d.world_size
    if dist.is_initialized():
        dist.all_gather_object(peaks, peak_bytes)  # every rank's, for the summary
    best = (
        {"step": evals.best_step, "eval_loss": evals.best_loss, "dir": str(output_dir / BEST_DIR_NAME)}
        if evals.best_step is not None
        else None
    )
    summary: dict[str, Any] = {
        "steps": step,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "skipped_samples": skipped_total,
        "final_dir": str(final_dir) if cfg.save_final and finished else None,
        "peak_gpu_memory_bytes": peaks if d.device.type == "cuda" else None,
        "world_size": d.world_size,
        "startup_s": startup,
        "checkpoint_saves": saves,
        "evaluations": evals.history,
        "best": best,
        "stopped_early": evals.stopped_early,
        "stopped_by": stopped_by,
        "data_read": loader.read_stats(),
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
        read = summary["data_read"]
        log_line(
            d,
            f"data read: {read['read_bytes'] / 1e6:,.1f} MB in {read['read_s']:.1f} s of loader time "
            f"({read['bytes_per_s_per_worker'] / 1e6:,.1f} MB/s per worker, reading and decoding) from "
            f"{index.shards_dir}",
        )
        if trackers is not None:
            trackers.close(
                {
                    "output_dir": str(output_dir),
                    "final": str(final_dir) if cfg.save_final and finished else None,
                    "best": str(best["dir"]) if best else None,
                    "summary": str(output_dir / SUMMARY_FILE),
                    "checkpoint": str(saved_to) if saved_to is not None else None,
                }
            )
        if stopped_by is None:
            final_loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
            log_line(d, f"done: {step} steps, final loss {final_loss}, outputs in {output_dir}")
    if dist.is_initialized():
        dist.barrier()
    if stopped_by is not None:
        raise Stopped(
            f"stopped at step {step} ({stopped_by}); checkpoint {saved_to} is intact; rerun the same "
            "command to resume"
            if d.is_main
            else ""
        )
    return summary


# ---------------------------------------------------------------- held-out evaluation


def evaluate_and_keep_best(
    engine: Any,
    loaded: Any,
    rows: EvalRows,
    evals: EvalRecord,
    step: int,
    d: Dist,
    output_dir: Path,
    trackers: Trackers | None,
) -> None:
    """Collective: evaluate the held-out rows, log the losses, and on a new best loss write its
    model or adapter to `best/` (beside it `eval.json`), replacing the previous one atomically."""
    started = time.perf_counter()
    result = evaluate_rows(engine.module, rows, d.rank, d.world_size, d.device)
    result["seconds"] = time.perf_counter() - started
    improved = evals.add(step, result)
    if improved:
        best = output_dir / BEST_DIR_NAME
        partial = best.with_name(best.name + ckpt.PARTIAL_SUFFIX)
        if d.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        loaded.save_final(engine, partial, d)  # collective; ends with a barrier
        if d.is_main:
            write_json_atomic(partial / "eval.json", {"step": step, **result})
            ckpt.replace_folder(partial, best)
        if dist.is_initialized():
            dist.barrier()
    if trackers is not None:
        trackers.log(eval_scalars(result), step)
    by_source = " | ".join(f"{k} {v:.4f}" for k, v in result["source_loss"].items())
    log_line(
        d,
        f"eval step {step} | loss {result['loss']:.4f} | {by_source} | {result['samples']} samples, "
        f"{result['seconds']:.1f} s"
        + (
            f" | best so far, saved to {output_dir / BEST_DIR_NAME}"
            if improved
            else f" | best {evals.best_loss:.4f} at step {evals.best_step}"
        ),
    )


def _eval_line(rows: EvalRows, every: int, cfg: TrainConfig) -> str:
    source = (
        f"--eval-shards {cfg.eval_shards}"
        if cfg.eval_shards is not None
        else f"--eval-fraction {cfg.eval_fraction:g}"
    )
    patience = (
        f", early stop after {cfg.early_stop_patience} without improvement" if cfg.early_stop_patience else ""
    )
    return (
        f"held-out evaluation: {rows.num_samples:,} samples ({source}) in {len(rows.rows):,} rows, every "
        f"{every} steps and at the end{patience}"
    )


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
