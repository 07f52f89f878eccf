"""`train_step`'s loss normalisation against an independent reference, on 1 and 2 ranks (issue 33).

The README promises "the loss is the mean over every trained token of the global batch". Here
`trainer.train.train_step` drives the real DeepSpeed engine (gloo, fp32) through one global step
whose micro-batches hold 250, 5, 1 and 40 trained tokens. The gradient DeepSpeed accumulated (read
with `safe_get_full_grad` at the step's last micro-batch, before clipping and the optimizer step)
and the logged loss must equal autograd of

    sum of the token cross-entropies of the whole global batch / its trained tokens

computed by hand: plain `F.cross_entropy` on the full logits of a copy of the model taken before
DeepSpeed wrapped it, the trained tokens counted from the targets. Scaling a micro-batch by its own
trained tokens reweighs the micro-batches by 1.2× to 296×; dropping the world × accumulation
factor divides the gradient by 4: both fail here by orders above the tolerance.
Dropout is off (the reference draws no masks); text rows only (the ViT plays no part in the scale).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DIST_ENV

from schemas.sample import IGNORE_INDEX, TILE_SIZE, Sample
from trainer import train as train_module
from trainer.batch import PackedBatch, collate
from trainer.config import TrainConfig, deepspeed_config
from trainer.model import build_model
from trainer.model_config import preset_config

GRAD_RTOL = 1e-4
"""Largest |DeepSpeed − reference| of a parameter's gradient, relative to its largest entry (fp32;
measured ~7e-7: the chunked loss and the summation order differ from the reference)."""
ROWS = [[(300, 250)], [(20, 3), (30, 2)], [(80, 1)], [(64, 40)]]
"""The global step's packed rows, as (tokens, trained tokens at the end) per sample."""


def global_batch() -> list[PackedBatch]:
    """The four micro-batches of one global step, the same on every rank (seeded)."""
    rng = np.random.default_rng(0)
    batches = []
    for pack, row in enumerate(ROWS):
        samples = []
        for tokens, trained in row:
            ids = rng.integers(3, 500, tokens).astype(np.int32)
            labels = np.full(tokens, IGNORE_INDEX, np.int32)
            labels[tokens - trained :] = ids[tokens - trained :]
            no_tiles = np.zeros((0, TILE_SIZE, TILE_SIZE, 3), np.uint8)
            sample = Sample(ids, labels, [], no_tiles, "text", "text.json", len(batches), f"r{pack}")
            sample.check()
            samples.append(sample)
        batches.append(dataclasses.replace(collate(samples), pack=pack))
    trained = sum(b.num_trained for b in batches)
    tokens = sum(b.num_tokens for b in batches)
    assert sorted(b.num_trained for b in batches) == [1, 5, 40, 250], "ROWS no longer differ as documented"
    return [dataclasses.replace(b, global_num_trained=trained, global_num_tokens=tokens) for b in batches]


def step_against_reference(d: train_module.Dist, stage: int, output_dir: Path) -> dict[str, Any]:
    """One global step through `train_step` on this rank's share of `global_batch()` (rank r takes
    micro-batches r, r + world, ...), and the by-hand reference on the whole global batch.

    Returns the logged loss, DeepSpeed's grad norm and the worst gradient mismatch, and their
    reference values. Collective: every rank calls it with the same stage."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    everything = global_batch()
    mine = everything[d.rank :: d.world_size]
    mine = [dataclasses.replace(b, micro_step=i) for i, b in enumerate(mine)]
    accumulation = len(mine)
    cfg = TrainConfig(
        shards=Path("unused"), model="tiny", output_dir=output_dir, recipe="full", zero_stage=stage,
        global_batch_size=len(everything), seed=3,
    ).resolve()  # fmt: skip
    config = dataclasses.replace(preset_config("tiny", vocab_size=512), plora_dropout=0.0)
    model = build_model(config, seed=cfg.seed)
    model.train()
    reference = copy.deepcopy(model)  # DeepSpeed flattens and partitions the one it wraps

    ds_config = deepspeed_config(cfg, world_size=d.world_size, bf16=False)
    ds_config["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.AdamW(train_module.trainable_groups(model, cfg.weight_decay), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    # The accumulated gradient, read where it is complete: between the last backward and the step.
    accumulated: dict[str, torch.Tensor | None] = {}
    real_step = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if engine.is_gradient_accumulation_boundary():
            for name, p in engine.module.named_parameters():  # collective under ZeRO: every rank
                if p.requires_grad:
                    g = safe_get_full_grad(p)
                    accumulated[name] = None if g is None else g.detach().clone()
        return real_step(*args, **kwargs)

    engine.step = step
    result = train_module.train_step(engine, mine, d, accumulation, cfg, per_source=False)
    assert accumulated, "DeepSpeed never reached the accumulation boundary"

    token_loss_sum = torch.zeros((), dtype=torch.float64)
    trained = 0
    for batch in everything:
        logits = reference(**batch.model_inputs(), return_logits=True).logits[0]
        targets = batch.targets[0]
        token_loss_sum = token_loss_sum + F.cross_entropy(
            logits.double(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        trained += int((targets != IGNORE_INDEX).sum())
    mean = token_loss_sum / trained
    mean.backward()

    worst = ("", 0.0)
    squares = 0.0
    for name, p in reference.named_parameters():
        if not p.requires_grad:
            continue
        got = accumulated[name]
        if p.grad is None:  # not reached by text rows (the vision side)
            assert got is None or not got.any(), f"{name}: DeepSpeed has a gradient, the reference none"
            continue
        assert got is not None, f"{name}: the reference has a gradient, DeepSpeed none"
        want = p.grad.double()
        squares += float(want.pow(2).sum())
        rel = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if rel > worst[1]:
            worst = (name, rel)
    return {
        "loss": result["loss"],
        "reference_loss": float(mean.detach()),
        "trained_tokens": result["trained_tokens"],
        "reference_trained_tokens": trained,
        "grad_norm": result["grad_norm"],
        "reference_grad_norm": squares**0.5,
        "worst_gradient": worst,
    }


def assert_matches_reference(report: dict[str, Any], where: str) -> None:
    assert report["trained_tokens"] == report["reference_trained_tokens"] == 296, where
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=1e-6), f"{where}: logged loss"
    name, rel = report["worst_gradient"]
    assert rel <= GRAD_RTOL, (
        f"{where}: the accumulated gradient of {name} is off by {rel:.2e} of its largest entry: it is "
        "not d(sum of token losses / trained tokens of the global batch)"
    )
    assert report["grad_norm"] == pytest.approx(report["reference_grad_norm"], rel=GRAD_RTOL), where


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_rank_gradient_and_loss_are_the_mean_over_the_global_batchs_trained_tokens(
    one_rank_group: train_module.Dist, tmp_path: Path, stage: int
) -> None:
    """4 micro-batches of accumulation on one rank; ZeRO-2 (full recipe), ZeRO-1 (LoRA's
    default: gradients reduced once per step) and no ZeRO (whose fp32 engine keeps no gradient
    norm: the step measures it)."""
    report = step_against_reference(one_rank_group, stage, tmp_path)
    assert_matches_reference(report, f"1 rank, ZeRO-{stage}")


# --------------------------------------------------------------------------- 2 ranks

TWO_RANK_STAGES = (1, 2, 3)


def _rank_main(out: Path) -> None:
    """A launched rank: every stage of TWO_RANK_STAGES in one process group; reports as JSON."""
    d = train_module.setup_distributed()
    reports = {stage: step_against_reference(d, stage, out) for stage in TWO_RANK_STAGES}
    if d.is_main:
        (out / "reports.json").write_text(json.dumps(reports))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_gradient_and_loss_are_the_mean_over_the_global_batchs_trained_tokens(
    tmp_path: Path,
) -> None:
    """2 gloo ranks × 2 micro-batches each (rank 0: 250 and 1 trained tokens, rank 1: 5 and 40), under
    ZeRO-1, -2 and -3: each rank's accumulated gradient is the reference's for the whole batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env.update(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(repo),
        )  # fmt: skip
        cmd = [sys.executable, __file__, str(tmp_path)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    reports = json.loads((tmp_path / "reports.json").read_text())
    assert sorted(reports) == [str(s) for s in TWO_RANK_STAGES]
    for stage, report in reports.items():
        assert_matches_reference(report, f"2 ranks, ZeRO-{stage}")


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
