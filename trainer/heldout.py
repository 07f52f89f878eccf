"""Held-out evaluation during training: which samples, packed how, evaluated where, and what is kept.

The held-out samples are `--eval-shards` (checked like the training shards) or a seeded share of
the training shards (`--eval-fraction`, `trainer.index.hold_out`). They are packed once into rows
of `--max-length` tokens by the plan's best-fit packing (attention never crosses samples, so a
sample's loss is its loss alone) and evaluated through the training forward: the model with
targets, then the per-token losses of `row_token_losses` summed per sample by `segment_losses`,
as `xc-train eval` does. Rank r evaluates rows r, r+W, ...; the sums (per source: loss, trained
tokens) are all-reduced, so every rank gets the token-weighted means.

`EvalRecord` keeps the best loss, its step and how many evaluations since have not improved on
it (`--early-stop-patience`); it rides in the checkpoint, so a resumed run continues the count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from schemas.shards import ShardReader
from trainer.batch import PackedBatch, collate
from trainer.index import SampleIndex, check_budgets, hold_out, read_sample
from trainer.loss import segment_losses
from trainer.model import IXCModel, row_token_losses
from trainer.plan import pack_samples


@dataclass(frozen=True)
class EvalRows:
    """The held-out samples packed into rows: row i holds the global ids `rows[i]` of `index`."""

    index: SampleIndex
    rows: list[np.ndarray]

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.rows)


def split_samples(
    train: SampleIndex, eval_shards: SampleIndex | None, eval_fraction: float, seed: int
) -> tuple[SampleIndex, SampleIndex | None]:
    """(the samples that train, the held-out samples or None): --eval-shards' samples, or a held-out
    --eval-fraction of the training shards."""
    if eval_fraction > 0:
        return hold_out(train, eval_fraction, seed)
    return train, eval_shards


def pack_rows(index: SampleIndex, max_length: int, max_tiles: int | None) -> EvalRows:
    """Best-fit decreasing packing of every held-out sample once (deterministic, no shuffle)."""
    check_budgets(index, max_length, max_tiles)
    order = np.lexsort((np.arange(len(index)), -index.num_tiles, -index.num_tokens))
    packs = pack_samples(index.num_tokens, index.num_tiles, max_length, max_tiles, order)
    return EvalRows(index, [np.asarray(sorted(p), dtype=np.int64) for p in packs])


@torch.no_grad()
def sample_losses(model: IXCModel, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32[S] loss sums, int64[S] trained tokens) of each sample of one packed row, through the
    training forward (targets given: the last layer runs on the trained positions only)."""
    out = model(**batch.model_inputs(), targets=batch.targets)
    losses = row_token_losses(model.output, out, batch.targets[0])
    return segment_losses(losses, batch.targets[0], batch.cu_seqlens)


@torch.no_grad()
def evaluate_rows(model: IXCModel, rows: EvalRows, rank: int, world_size: int, device: torch.device) -> dict:
    """Token-weighted held-out loss, overall and per source, over every rank's share (collective).

    Every rank runs the same number of forwards (a rank short of a row runs row 0 again and drops
    its result): under ZeRO-3 each forward gathers the weights in collectives."""
    index = rows.index
    names = [s.name for s in index.manifest.sources]
    sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device)  # (loss sum, trained tokens)
    per_rank = math.ceil(len(rows.rows) / world_size)
    readers: dict[int, ShardReader] = {}
    was_training = model.training
    model.eval()
    try:
        for i in range(per_rank):
            r = i * world_size + rank
            ids = rows.rows[r] if r < len(rows.rows) else rows.rows[0]
            samples = []
            for g in ids.tolist():
                shard, row = int(index.sample_shard[g]), int(index.sample_row[g])
                samples.append(read_sample(readers, index.store, index.shard_files, shard, row))
            loss_sums, counts = sample_losses(model, collate(samples).to(device))
            if r < len(rows.rows):
                sources = torch.as_tensor(index.source_of(ids), device=device)
                sums[:, 0].index_add_(0, sources, loss_sums.to(device, torch.float64))
                sums[:, 1].index_add_(0, sources, counts.to(device, torch.float64))
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    totals = sums.sum(dim=0).tolist()
    return {
        "loss": totals[0] / max(1.0, totals[1]),
        "source_loss": {n: s / c for n, (s, c) in zip(names, sums.tolist(), strict=True) if c > 0},
        "samples": rows.num_samples,
        "trained_tokens": int(totals[1]),
    }


@dataclass
class EvalRecord:
    """Every evaluation of the run, the best one, and the count since it (early stopping)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    since_best: int = 0
    stopped_early: bool = False

    def add(self, step: int, result: dict[str, Any]) -> bool:
        """Record one evaluation; True when it is the best so far (strictly lower loss)."""
        self.history.append({"step": step, **result})
        if self.best_loss is None or result["loss"] < self.best_loss:
            self.best_loss, self.best_step, self.since_best = result["loss"], step, 0
            return True
        self.since_best += 1
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.since_best >= patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EvalRecord:
        return cls(**state) if state else cls()
