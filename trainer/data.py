"""The streaming loader: epoch plan, packing, distribution and O(1)-resumable delivery of micro-batches.

Reads only what `schemas/` defines (manifest + Arrow IPC shards) and produces the packed micro-batch
of docs/ARCHITECTURE.md. The whole epoch is planned up front from the lengths in the shard index,
so every decision is a pure function of (shards, config, seed, epoch) and the loader state is O(1):

1. Draw (SPEC §1). Each source contributes `int(k * 1000)` samples per epoch (or an override).
   With n samples available and a count c: every sample appears `c // n` times plus a random
   subset of `c % n` distinct samples once more, i.e. all samples once plus balanced repeats when
   c ≥ n, a random subset without replacement when c < n. Redrawn each epoch, seeded by
   (seed, epoch), identical on every rank.
   Token-weighted mixing (option): with m_s the mean tokens per sample of source s and
   c_s = int(k_s * 1000), the count becomes round(c_s * m̄ / m_s) where m̄ = Σ c_s m_s / Σ c_s.
   Source s then contributes ≈ c_s * m̄ tokens, proportional to k_s, and the epoch keeps the
   total token count of the sample-weighted plan.
2. Pack. Best-fit decreasing over (tokens, tiles): samples sorted by tokens (ties: tiles, then a
   seeded random key), each goes into the open pack with the least free tokens that still has
   room for its tokens AND its tiles, else a new pack. A pack holds at most `max_length` tokens and
   `max_tiles` tiles; samples are never split. Packs are then shuffled (seeded).
3. Fill the last global step. A global step takes G = micro_batches_per_step × world_size packs.
   Padding would break "each sample exactly once" (repeats) or waste dummy forwards (empty packs),
   and dropping the partial step loses samples. Instead the planner uses P' = P rounded up to a
   multiple of G packs (P = what best-fit needs): the samples of the K lightest best-fit packs are
   re-dealt into K + (P' - P) packs with balanced tokens (longest first into the lightest pack
   with tile room), K doubling from 2(P' - P) up to P while every sample still fits. Packs are not
   padded (varlen attention), so a micro-batch costs time in proportion to its tokens: slightly
   lighter, equal packs cost the same GPU time as full ones and leave no rank idle at the step's
   gradient reduction, whereas half-empty packs would. `fill` (tokens / (P' × max_length)) drops by
   up to (G-1)/P': memory headroom, not lost time. The same re-deal also evens out best-fit's
   light last packs when P is already a multiple. If nothing can be re-dealt (budgets too tight),
   the P' - P packs holding the most samples are split in two instead. Only with fewer than P'
   samples (nearly every pack holds one) are the last P mod G packs dropped, and the plan reports
   how many samples that dropped.
4. Distribute. Step s is packs [s*G, (s+1)*G) of the plan, whatever the world size (elastic
   resume). Within a step, packs sorted by (tiles, tokens) are dealt greedily to the least-loaded
   rank that still needs a micro-batch, so tiles (then tokens) are balanced per rank per step.
   A rank's dataloader worker w of W takes the rank's micro-batches w, w+W, ...; the DataLoader
   delivers them in order.
5. Deliver. Workers read and collate (`collate`), the DataLoader pins memory when CUDA is present
   and prefetches; `PackedBatch.to(device, non_blocking=True)` moves a batch; `TimedIterator`
   measures how long the training loop waits for data.

Seeds: every random stream is `np.random.default_rng([seed, epoch, stream, ...])`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas.manifest import Manifest, SourceInfo
from schemas.record import MAX_K, MAX_SAMPLES_PER_EPOCH
from schemas.sample import IGNORE_INDEX, IMAGE_TOKEN_ID, TILE_SIZE, Sample
from schemas.shards import ShardReader, mismatch_message, verify_shards

PLAN_VERSION = 1
"""Bump when the planning algorithm changes: old loader states then refuse to resume."""
STREAM_DRAW = 0
STREAM_PACK_ORDER = 1
STREAM_PACK_SHUFFLE = 2
NO_TILE_BUDGET = 1 << 30
MAX_LISTED_PROBLEMS = 10
CLOSE_TIMEOUT_S = 60.0
"""How long closing the loader waits for its prefetch thread (and the worker processes it shuts down)."""
PREFETCH_THREAD_NAME = "xc-loader-prefetch"


class LoaderConfigError(ValueError):
    """A loader setting is invalid (a usage error: exit 2)."""


class ShardDataError(ValueError):
    """The shards cannot serve this plan (invalid data: exit 1)."""


# --------------------------------------------------------------------------- config


@dataclass
class LoaderConfig:
    max_length: int | None = None
    """Tokens per packed micro-batch (default: the max_length the shards were made with)."""
    max_tiles: int | None = None
    """Local 560-px tiles per packed micro-batch, bounding ViT work per step (default: no limit)."""
    seed: int = 0
    """Seed of the draw, packing and shuffle; each epoch uses (seed, epoch)."""
    epochs: int = 1
    """Passes over the epoch plan; each epoch redraws its samples."""
    micro_batches_per_step: int = 1
    """Packed micro-batches per rank per optimizer step (gradient accumulation)."""
    token_weighted: bool = False
    """Scale each source's sample count so sources contribute tokens (not samples) in proportion to k."""
    source_samples: dict[str, int] = field(default_factory=dict)
    """Samples per epoch for named sources (by source name or data.txt path), overriding int(k*1000)."""
    num_workers: int = 2
    """Dataloader worker processes per rank (0: read in the training process)."""
    prefetch: int = 2
    """Micro-batches each worker keeps ready (raised to cover one optimizer step)."""
    attention_cost: float = 0.0
    """Ranks get each step's packs by estimated compute, in tokens: a pack costs its tokens +
    attention_cost·Σ s² over its samples' lengths s + tile_cost·tiles (`trainer.flops.pack_cost_weights`
    derives both from the model; 0: tokens only). Changes which rank trains a pack, never the plan."""
    tile_cost: float = 0.0
    """See attention_cost."""

    def validate(self) -> None:
        """Raise LoaderConfigError listing every invalid field."""
        problems = []
        for name in ("max_length", "max_tiles"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "max_length" else 0):
                problems.append(f"{name} ({value}) must be positive")
        for name, low in (("seed", 0), ("epochs", 1), ("micro_batches_per_step", 1)):
            if getattr(self, name) < low:
                problems.append(f"{name} ({getattr(self, name)}) must be >= {low}")
        for name in ("num_workers", "prefetch"):
            if getattr(self, name) < 0:
                problems.append(f"{name} ({getattr(self, name)}) must be >= 0")
        for key, count in self.source_samples.items():
            if not isinstance(count, int) or count < 0:
                problems.append(f"source_samples[{key!r}] ({count!r}) must be a count >= 0")
        if problems:
            raise LoaderConfigError("invalid loader settings:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- index


@dataclass
class SampleIndex:
    """Lengths and locations of every stored sample, in manifest order (sources, shards, rows).

    Global sample id g: samples of source i are [source_offsets[i], source_offsets[i+1]).
    """

    shards_dir: Path
    manifest: Manifest
    shard_files: list[str]
    """Shard paths relative to shards_dir."""
    sample_shard: np.ndarray
    """int32[S] shard of each sample (index into shard_files)."""
    sample_row: np.ndarray
    """int32[S] row of each sample in its shard."""
    num_tokens: np.ndarray
    """int64[S]"""
    num_trained: np.ndarray
    """int64[S]"""
    num_tiles: np.ndarray
    """int64[S]"""
    source_offsets: np.ndarray
    """int64[num_sources + 1]"""

    @classmethod
    def load(cls, shards_dir: Path, *, checksums: bool = False) -> SampleIndex:
        """Read the manifest, check the shards against it, and read every sample's lengths."""
        shards_dir = Path(shards_dir)
        problems = verify_shards(shards_dir, checksums=checksums)
        if problems:
            raise ShardDataError(mismatch_message(shards_dir, problems))
        manifest = Manifest.load(shards_dir)
        shard_files: list[str] = []
        shard_of: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        trained: list[np.ndarray] = []
        tiles: list[np.ndarray] = []
        offsets = [0]
        for source in manifest.sources:
            for shard in source.shards:
                reader = ShardReader(shards_dir / shard.file)
                t, tr, ti = reader.lengths()
                shard_of.append(np.full(len(t), len(shard_files), dtype=np.int32))
                rows.append(np.arange(len(t), dtype=np.int32))
                tokens.append(t)
                trained.append(tr)
                tiles.append(ti)
                shard_files.append(shard.file)
            offsets.append(offsets[-1] + source.samples_written)
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(
            shards_dir=shards_dir,
            manifest=manifest,
            shard_files=shard_files,
            sample_shard=cat(shard_of, np.int32),
            sample_row=cat(rows, np.int32),
            num_tokens=cat(tokens, np.int64),
            num_trained=cat(trained, np.int64),
            num_tiles=cat(tiles, np.int64),
            source_offsets=np.asarray(offsets, dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.num_tokens.shape[0])

    def source_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Source position of each global sample id."""
        return np.searchsorted(self.source_offsets, sample_ids, side="right") - 1

    def describe(self, g: int) -> str:
        """Where sample g lives, for error messages (reads its provenance, not its tiles)."""
        path = self.shards_dir / self.shard_files[self.sample_shard[g]]
        source, file, index, record_id = ShardReader(path).provenance(int(self.sample_row[g]))
        return f"{path} row {self.sample_row[g]} (source {source!r}, {file} record {index}, id {record_id!r})"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these shards' contents: the manifest fingerprint and every shard's checksum."""
        m = self.manifest
        return {
            "fingerprint": asdict(m.fingerprint),
            "sources": [
                {
                    "name": s.name,
                    "path": s.path,
                    "k": s.k,
                    "samples": s.samples_written,
                    "shards": [sh.sha256 for sh in s.shards],
                }
                for s in m.sources
            ],
        }


def check_budgets(index: SampleIndex, max_length: int, max_tiles: int | None) -> None:
    """Raise ShardDataError naming every sample that cannot fit one pack (never split)."""
    too_long = np.flatnonzero(index.num_tokens > max_length)
    too_tiled = np.flatnonzero(index.num_tiles > max_tiles) if max_tiles is not None else np.zeros(0, int)
    if not len(too_long) and not len(too_tiled):
        return
    made_with = index.manifest.fingerprint.max_length
    lines = []
    if len(too_long):
        lines.append(
            f"{len(too_long)} sample(s) have more than max_length {max_length} tokens "
            f"(the shards were made with max_length {made_with}):"
        )
        lines += [
            f"  {index.num_tokens[g]} tokens: {index.describe(g)}" for g in too_long[:MAX_LISTED_PROBLEMS]
        ]
    if len(too_tiled):
        lines.append(f"{len(too_tiled)} sample(s) have more than max_tiles {max_tiles} tiles:")
        lines += [
            f"  {index.num_tiles[g]} tiles: {index.describe(g)}" for g in too_tiled[:MAX_LISTED_PROBLEMS]
        ]
    lines.append(
        f"a sample is never split: use --max-length >= {int(index.num_tokens.max())} and "
        f"--max-tiles >= {int(index.num_tiles.max())}, or re-shard with `xc-prep shard --max-length {max_length}`"
    )
    raise ShardDataError("\n".join(lines))


# --------------------------------------------------------------------------- draw


def check_weights(sources: list[SourceInfo]) -> None:
    """ShardDataError unless every source's k gives a sane int(k*1000): a finite k in [0, MAX_K].

    `xc-prep` refuses larger k at its data.txt line; a manifest written before it did, or edited,
    would otherwise ask the epoch plan for terabytes (k = 1e9) or overflow int() (k = 1e306).
    """
    bad = [s for s in sources if not _sane_k(s.k)]
    if bad:
        listed = "\n  ".join(f"source {s.name!r} ({s.path}): k {s.k:g}" for s in bad)
        raise ShardDataError(
            f"cannot plan the epoch: k must be a number in [0, {MAX_K:,}] (int(k*1000) samples per epoch, "
            f"at most {MAX_SAMPLES_PER_EPOCH:,}; the plan holds every drawn sample in memory):\n  {listed}\n"
            "fix k in data.txt and re-run `xc-prep shard`, or set the counts with --source-samples NAME=COUNT"
        )


def _sane_k(k: float) -> bool:
    return math.isfinite(k) and 0 <= k <= MAX_K


def source_counts(index: SampleIndex, config: LoaderConfig) -> list[int]:
    """Samples per epoch of each source (int(k*1000), token-weighted if asked, then overrides)."""
    sources = index.manifest.sources
    overridden = [s.name in config.source_samples or s.path in config.source_samples for s in sources]
    check_weights([s for s, o in zip(sources, overridden, strict=True) if not o])
    # an overridden source's k may be absurd: its count is replaced below
    counts = [s.samples_per_epoch if _sane_k(s.k) else 0 for s in sources]
    if config.token_weighted:
        sizes = np.diff(index.source_offsets)
        means = [
            float(index.num_tokens[index.source_offsets[i] : index.source_offsets[i + 1]].mean())
            if n
            else 0.0
            for i, n in enumerate(sizes)
        ]
        live = [i for i, c in enumerate(counts) if c > 0 and means[i] > 0]
        total = sum(counts[i] for i in live)
        overall = sum(counts[i] * means[i] for i in live) / total if total else 0.0
        counts = [
            round(counts[i] * overall / means[i]) if i in live else counts[i] for i in range(len(counts))
        ]
    problems = []
    by_key = {}
    for i, s in enumerate(sources):
        by_key[s.name] = i
        by_key[s.path] = i
    for key, count in config.source_samples.items():
        if key not in by_key:
            names = ", ".join(repr(s.name) for s in sources)
            problems.append(f"--source-samples {key}={count}: no source named {key!r} (sources: {names})")
        elif count > MAX_SAMPLES_PER_EPOCH:
            problems.append(
                f"--source-samples {key}={count:,}: more than {MAX_SAMPLES_PER_EPOCH:,} samples per epoch "
                "(the plan holds every drawn sample in memory)"
            )
        else:
            counts[by_key[key]] = count
    for i, s in enumerate(sources):
        available = int(index.source_offsets[i + 1] - index.source_offsets[i])
        if counts[i] > 0 and available == 0:
            problems.append(
                f"source {s.name!r} ({s.path}) asks for {counts[i]} samples per epoch but has none in the "
                f"shards ({s.rejected} rejected); fix its data or set --source-samples {s.name}=0"
            )
        elif counts[i] > MAX_SAMPLES_PER_EPOCH:  # token weighting scales k's count by a ratio of means
            problems.append(
                f"source {s.name!r} ({s.path}) gets {counts[i]:,} samples per epoch, more than "
                f"{MAX_SAMPLES_PER_EPOCH:,}; lower its k or set --source-samples {s.name}=COUNT"
            )
    if problems:
        raise ShardDataError("cannot draw the epoch:\n  " + "\n  ".join(problems))
    if sum(counts) == 0:
        raise ShardDataError("the epoch plan is empty: every source has k * 1000 < 1 (or is overridden to 0)")
    return counts


def draw_epoch(index: SampleIndex, counts: list[int], seed: int, epoch: int) -> np.ndarray:
    """int64[sum(counts)] global sample ids of one epoch, source by source.

    Each of a source's n samples appears c // n times, plus c % n distinct ones once more.
    """
    drawn = []
    for i, count in enumerate(counts):
        start, end = int(index.source_offsets[i]), int(index.source_offsets[i + 1])
        n = end - start
        if count == 0:
            continue
        copies, extra = divmod(count, n)
        rng = np.random.default_rng([seed, epoch, STREAM_DRAW, i])
        ids = np.concatenate([np.tile(np.arange(n), copies), rng.permutation(n)[:extra]])
        drawn.append(start + ids.astype(np.int64))
    return np.concatenate(drawn)


# --------------------------------------------------------------------------- packing


class _CapacityTree:
    """Max segment tree over free-token capacity 0..max_length.

    Leaf c holds the most free tiles among open packs with exactly c free tokens (-1: none).
    """

    def __init__(self, max_length: int):
        size = 1
        while size < max_length + 1:
            size *= 2
        self.size = size
        self.tree = [-1] * (2 * size)

    def set(self, capacity: int, value: int) -> None:
        tree = self.tree
        i = capacity + self.size
        tree[i] = value
        i >>= 1
        while i:
            best = max(tree[2 * i], tree[2 * i + 1])
            if tree[i] == best:
                break
            tree[i] = best
            i >>= 1

    def first_at_least(self, low: int, need: int) -> int:
        """Smallest capacity >= low whose leaf is >= need, or -1."""
        tree, size = self.tree, self.size
        i = low + size
        if tree[i] >= need:
            return low
        while i > 1:
            if not i & 1 and tree[i + 1] >= need:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] >= need else 2 * i + 1
                return i - size
            i >>= 1
        return -1


def pack_samples(
    tokens: np.ndarray, tiles: np.ndarray, max_length: int, max_tiles: int | None, order: np.ndarray
) -> list[list[int]]:
    """Best-fit decreasing with a tile constraint: positions into `tokens` grouped into packs.

    `order` is the placement order (callers pass tokens descending); each item goes to the open
    pack with the fewest free tokens that fits both its tokens and its tiles (among those, the
    fewest free tiles), else opens a new pack. Every item must fit an empty pack.
    """
    tile_budget = NO_TILE_BUDGET if max_tiles is None else max_tiles
    tree = _CapacityTree(max_length)
    buckets: dict[int, dict[int, list[int]]] = {}
    packs: list[list[int]] = []

    def put(pack: int, free_tokens: int, free_tiles: int) -> None:
        if free_tokens == 0:  # nothing fits any more (every sample has >= 1 token)
            return
        bucket = buckets.setdefault(free_tokens, {})
        bucket.setdefault(free_tiles, []).append(pack)
        if free_tiles > tree.tree[free_tokens + tree.size]:
            tree.set(free_tokens, free_tiles)

    for item in order.tolist():
        n_tok, n_til = int(tokens[item]), int(tiles[item])
        assert n_tok <= max_length and n_til <= tile_budget, f"item {item} exceeds the budget"
        capacity = tree.first_at_least(n_tok, n_til)
        if capacity < 0:
            packs.append([item])
            put(len(packs) - 1, max_length - n_tok, tile_budget - n_til)
            continue
        bucket = buckets[capacity]
        free_tiles = min(k for k in bucket if k >= n_til)
        members = bucket[free_tiles]
        pack = members.pop()
        if not members:
            del bucket[free_tiles]
        tree.set(capacity, max(bucket) if bucket else -1)
        if not bucket:
            del buckets[capacity]
        packs[pack].append(item)
        put(pack, capacity - n_tok, free_tiles - n_til)
    return packs


def balance_packs(
    tokens: np.ndarray,
    tiles: np.ndarray,
    max_length: int,
    max_tiles: int | None,
    order: np.ndarray,
    num_packs: int,
) -> list[list[int]] | None:
    """Exactly `num_packs` packs with balanced tokens (longest-processing-time-first), or None.

    Each item in `order` (tokens descending) joins the pack with the fewest tokens that has room
    for its tiles; None when an item fits no pack (the budgets are too tight for this count).
    """
    tile_budget = NO_TILE_BUDGET if max_tiles is None else max_tiles
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    pack_tiles = [0] * num_packs
    heap = [(0, p) for p in range(num_packs)]
    for item in order.tolist():
        n_tok, n_til = int(tokens[item]), int(tiles[item])
        skipped = []
        while heap and pack_tiles[heap[0][1]] + n_til > tile_budget:
            skipped.append(heapq.heappop(heap))
        if not heap or heap[0][0] + n_tok > max_length:
            return None
        load, p = heapq.heappop(heap)
        packs[p].append(item)
        pack_tiles[p] += n_til
        heapq.heappush(heap, (load + n_tok, p))
        for entry in skipped:
            heapq.heappush(heap, entry)
    return packs


def even_out(
    packs: list[list[int]],
    tokens: np.ndarray,
    tiles: np.ndarray,
    max_length: int,
    max_tiles: int | None,
    order: np.ndarray,
    extra: int,
) -> tuple[list[list[int]], int]:
    """Re-deal the samples of the lightest packs into those packs plus `extra` new ones, balanced.

    Tries the lightest 2·extra packs, then twice as many, ... up to all of them, and keeps the
    largest set that `balance_packs` can fit: the deficit of the added packs is spread as thinly
    as the budgets allow. Returns (packs, number of packs re-dealt), or (packs, 0) unchanged when
    no set fits.
    """
    loads = [int(tokens[p].sum()) for p in packs]
    by_load = sorted(range(len(packs)), key=lambda i: (loads[i], i))
    placement = np.empty(len(order), dtype=np.int64)
    placement[order] = np.arange(len(order))
    best: tuple[list[int], list[list[int]]] | None = None
    count = max(extra, 1)
    while True:
        count = min(2 * count, len(packs))
        chosen = by_load[:count]
        items = np.asarray([i for c in chosen for i in packs[c]], dtype=np.int64)
        dealt = balance_packs(
            tokens, tiles, max_length, max_tiles, items[np.argsort(placement[items])], count + extra
        )
        if dealt is None or not all(dealt):
            break
        best = (chosen, dealt)
        if count == len(packs):
            break
    if best is None:
        return packs, 0
    chosen_set = set(best[0])
    return [p for i, p in enumerate(packs) if i not in chosen_set] + best[1], len(best[1])


def split_packs(packs: list[list[int]], tokens: np.ndarray, count: int) -> int:
    """Split `count` packs in two (most samples first, tokens balanced), in place; returns splits done.

    Stops early when no pack holds two samples.
    """
    heap = [(-len(p), -int(tokens[p].sum()), i) for i, p in enumerate(packs)]
    heapq.heapify(heap)
    done = 0
    while done < count and heap and -heap[0][0] >= 2:
        _, _, i = heapq.heappop(heap)
        halves: tuple[list[int], list[int]] = ([], [])
        loads = [0, 0]
        for item in sorted(packs[i], key=lambda j: (-int(tokens[j]), j)):
            side = 0 if loads[0] <= loads[1] else 1
            halves[side].append(item)
            loads[side] += int(tokens[item])
        packs[i] = halves[0]
        packs.append(halves[1])
        for j in (i, len(packs) - 1):
            heapq.heappush(heap, (-len(packs[j]), -int(tokens[packs[j]].sum()), j))
        done += 1
    return done


def assign_ranks(pack_cost: np.ndarray, pack_tiles: np.ndarray, world_size: int) -> list[list[int]]:
    """Deal one global step's packs to ranks: positions in the step, per rank, costliest first.

    Longest processing time first: packs by estimated compute descending (then tiles) go to the
    rank with the least (compute, tiles) load that still needs one; every rank gets len /
    world_size packs. The step waits for its slowest rank, so this bounds the waiting. Where ranks
    also wait for each other after every micro-batch (ZeRO-2 reduces gradients in each backward),
    the i-th micro-batches of all ranks are then the i-th costliest of each: alike in cost.
    """
    n = len(pack_cost)
    assert n % world_size == 0, f"{n} packs do not split over {world_size} ranks"
    per_rank = n // world_size
    order = sorted(range(n), key=lambda i: (-float(pack_cost[i]), -int(pack_tiles[i]), i))
    loads = [(0.0, 0)] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (loads[r], r))
        ranks[r].append(i)
        loads[r] = (loads[r][0] + float(pack_cost[i]), loads[r][1] + int(pack_tiles[i]))
    return ranks


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SourcePlan:
    """One source's share of an epoch plan."""

    name: str
    path: str
    k: float
    available: int
    """Samples of this source in the shards."""
    drawn: int
    """Samples drawn for the epoch (int(k*1000), token-weighted or overridden)."""
    samples: int
    """Samples delivered in the epoch (drawn minus any dropped to fill the last step)."""
    unique: int
    """Distinct samples among them."""
    min_repeats: int
    max_repeats: int
    """Fewest and most times one distinct delivered sample appears."""
    tokens: int
    trained: int
    tiles: int


@dataclass
class EpochPlan:
    """One epoch: the packs in delivery order, G per global step. Independent of the world size.

    Packs are stored flat: pack p holds sample ids `sample_ids[pack_offsets[p]:pack_offsets[p+1]]`.
    """

    epoch: int
    seed: int
    plan_id: str
    max_length: int
    max_tiles: int | None
    global_batch: int
    """Packs per global step (micro_batches_per_step × world_size)."""
    sample_ids: np.ndarray
    """int64[samples] global sample ids, pack after pack."""
    pack_offsets: np.ndarray
    """int64[packs + 1]"""
    pack_tokens: np.ndarray
    pack_trained: np.ndarray
    pack_tiles: np.ndarray
    pack_cost: np.ndarray
    """float64[packs] estimated compute in tokens (LoaderConfig.attention_cost): deals packs to ranks."""
    sources: list[SourcePlan]
    min_packs: int
    """Packs best-fit decreasing needs (before making the count a multiple of global_batch)."""
    rebalanced: int
    """Packs (the lightest best-fit ones plus those added for a multiple of global_batch) re-dealt
    with balanced tokens."""
    split: int
    """Packs added by splitting so that the pack count is a multiple of global_batch."""
    dropped: int
    """Samples dropped because the packs could not be split (0 unless almost every pack holds one)."""
    max_sample_tokens: int

    @property
    def num_packs(self) -> int:
        return int(self.pack_tokens.shape[0])

    @property
    def steps(self) -> int:
        return self.num_packs // self.global_batch

    @property
    def num_samples(self) -> int:
        return int(self.sample_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.pack_tokens.sum())

    @property
    def fill(self) -> float:
        """Tokens / (packs × max_length)."""
        return self.num_tokens / max(1, self.num_packs * self.max_length)

    def pack(self, p: int) -> np.ndarray:
        return self.sample_ids[self.pack_offsets[p] : self.pack_offsets[p + 1]]

    def step_packs(self, step: int) -> range:
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def step_digest(self, step: int) -> str:
        """Names the samples of a global step (its packs' sample ids, in order): equal on any world
        size, so logs of a run and of its elastic resume can be compared step by step."""
        ids = np.concatenate([self.pack(p) for p in self.step_packs(step)]).astype(np.int64)
        return hashlib.sha1(ids.tobytes()).hexdigest()[:16]

    def step_trained(self, step: int) -> int:
        """Trained tokens of the whole global step (all ranks): the loss normalizer."""
        return int(self.pack_trained[step * self.global_batch : (step + 1) * self.global_batch].sum())

    def step_tokens(self, step: int) -> int:
        return int(self.pack_tokens[step * self.global_batch : (step + 1) * self.global_batch].sum())

    def rank_packs(self, step: int, rank: int, world_size: int) -> list[int]:
        """Pack ids of `rank`'s micro-batches in `step`, in delivery order."""
        if self.global_batch % world_size:
            raise LoaderConfigError(
                f"global batch ({self.global_batch} packs) is not divisible by world size {world_size}"
            )
        start = self.step_packs(step).start
        return [start + i for i in self.step_ranks(step, world_size)[rank]]

    def step_ranks(self, step: int, world_size: int) -> list[list[int]]:
        """Every rank's positions within `step` (see assign_ranks)."""
        s = self.step_packs(step)
        return assign_ranks(self.pack_cost[s.start : s.stop], self.pack_tiles[s.start : s.stop], world_size)


def resolve_max_length(index: SampleIndex, config: LoaderConfig) -> int:
    return config.max_length if config.max_length is not None else index.manifest.fingerprint.max_length


def compute_plan_id(index: SampleIndex, config: LoaderConfig, global_batch: int) -> str:
    """Hash of every input of the plan (not of world size, workers or prefetch)."""
    inputs = {
        "version": PLAN_VERSION,
        "shards": index.fingerprint(),
        "max_length": resolve_max_length(index, config),
        "max_tiles": config.max_tiles,
        "seed": config.seed,
        "global_batch": global_batch,
        "token_weighted": config.token_weighted,
        "source_samples": sorted(config.source_samples.items()),
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_epoch(index: SampleIndex, config: LoaderConfig, epoch: int, global_batch: int) -> EpochPlan:
    """Draw, pack, fill the last step and shuffle one epoch (pure function of its arguments)."""
    config.validate()
    max_length = resolve_max_length(index, config)
    check_budgets(index, max_length, config.max_tiles)
    counts = source_counts(index, config)
    seed = config.seed
    drawn = draw_epoch(index, counts, seed, epoch)
    tokens, tiles = index.num_tokens[drawn], index.num_tiles[drawn]
    tie_break = np.random.default_rng([seed, epoch, STREAM_PACK_ORDER]).random(len(drawn))
    order = np.lexsort((tie_break, -tiles, -tokens))
    packs = pack_samples(tokens, tiles, max_length, config.max_tiles, order)

    min_packs = len(packs)
    extra = -min_packs % global_batch
    split, rebalanced = 0, 0
    if len(drawn) >= min_packs + extra:
        packs, rebalanced = even_out(packs, tokens, tiles, max_length, config.max_tiles, order, extra)
        if not rebalanced and extra:
            split = split_packs(packs, tokens, extra)
            assert split == extra, f"split {split} of {extra} packs"
    rng = np.random.default_rng([seed, epoch, STREAM_PACK_SHUFFLE])
    packs = [packs[i] for i in rng.permutation(len(packs))]
    dropped_packs = len(packs) % global_batch
    if dropped_packs:
        packs = packs[: len(packs) - dropped_packs]
    if not packs:
        raise ShardDataError(
            f"the epoch plan has {len(drawn)} samples in fewer packs than one global batch "
            f"({global_batch} packs); lower --micro-batches-per-step or the world size, or draw more samples"
        )
    # Within a pack, keep placement order (longest first); positions map back to global ids.
    positions = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=sum(map(len, packs)))
    sample_ids = drawn[positions]
    pack_offsets = np.zeros(len(packs) + 1, dtype=np.int64)
    pack_offsets[1:] = np.cumsum([len(p) for p in packs])
    pack_of = np.repeat(np.arange(len(packs)), np.diff(pack_offsets))
    sum_by_pack = lambda values: np.bincount(pack_of, weights=values, minlength=len(packs)).astype(np.int64)  # noqa: E731
    pack_tokens = sum_by_pack(index.num_tokens[sample_ids])
    pack_tiles = sum_by_pack(index.num_tiles[sample_ids])
    assert pack_tokens.max() <= max_length, "a pack exceeds max_length"
    assert config.max_tiles is None or pack_tiles.max() <= config.max_tiles, "a pack exceeds max_tiles"

    source_of = index.source_of(sample_ids)
    plans = []
    for i, s in enumerate(index.manifest.sources):
        ids = sample_ids[source_of == i]
        repeats = np.unique(ids, return_counts=True)[1]
        plans.append(
            SourcePlan(
                name=s.name,
                path=s.path,
                k=s.k,
                available=int(index.source_offsets[i + 1] - index.source_offsets[i]),
                drawn=counts[i],
                samples=len(ids),
                unique=len(repeats),
                min_repeats=int(repeats.min()) if len(repeats) else 0,
                max_repeats=int(repeats.max()) if len(repeats) else 0,
                tokens=int(index.num_tokens[ids].sum()),
                trained=int(index.num_trained[ids].sum()),
                tiles=int(index.num_tiles[ids].sum()),
            )
        )
    return EpochPlan(
        epoch=epoch,
        seed=seed,
        plan_id=compute_plan_id(index, config, global_batch),
        max_length=max_length,
        max_tiles=config.max_tiles,
        global_batch=global_batch,
        sample_ids=sample_ids,
        pack_offsets=pack_offsets,
        pack_tokens=pack_tokens,
        pack_trained=sum_by_pack(index.num_trained[sample_ids]),
        pack_tiles=pack_tiles,
        pack_cost=pack_tokens
        + config.attention_cost
        * np.bincount(pack_of, weights=index.num_tokens[sample_ids] ** 2.0, minlength=len(packs))
        + config.tile_cost * pack_tiles,
        sources=plans,
        min_packs=min_packs,
        rebalanced=rebalanced,
        split=split,
        dropped=len(drawn) - len(sample_ids),
        max_sample_tokens=int(tokens.max()),
    )


def format_plan(plan: EpochPlan, world_size: int | None = None) -> str:
    """The epoch plan as a table: per source samples, coverage, repeats, token share; packs and steps."""
    total_tokens = max(1, plan.num_tokens)
    header = (
        f"{'source':<20} {'k':>6} {'avail':>9} {'drawn':>9} {'samples':>9} {'unique':>9} {'cover':>7} "
        f"{'repeats':>8} {'tokens':>13} {'share':>6} {'trained':>12} {'tiles':>8}"
    )
    lines = [
        f"epoch {plan.epoch} plan {plan.plan_id} | seed {plan.seed} | max_length {plan.max_length} | "
        f"max_tiles {plan.max_tiles if plan.max_tiles is not None else 'none'} | "
        f"global batch {plan.global_batch} packs",
        header,
        "-" * len(header),
    ]
    for s in plan.sources:
        repeats = f"{s.min_repeats}" if s.min_repeats == s.max_repeats else f"{s.min_repeats}-{s.max_repeats}"
        lines.append(
            f"{s.name[:20]:<20} {s.k:>6g} {s.available:>9,} {s.drawn:>9,} {s.samples:>9,} {s.unique:>9,} "
            f"{s.unique / max(1, s.available):>7.1%} {repeats + 'x':>8} {s.tokens:>13,} "
            f"{s.tokens / total_tokens:>6.1%} {s.trained:>12,} {s.tiles:>8,}"
        )
    trained = sum(s.trained for s in plan.sources)
    tiles = sum(s.tiles for s in plan.sources)
    lines.append(
        f"{'total':<20} {'':>6} {sum(s.available for s in plan.sources):>9,} "
        f"{sum(s.drawn for s in plan.sources):>9,} {plan.num_samples:>9,} "
        f"{sum(s.unique for s in plan.sources):>9,} {'':>7} {'':>8} {plan.num_tokens:>13,} {'100%':>6} "
        f"{trained:>12,} {tiles:>8,}"
    )
    per_pack = np.diff(plan.pack_offsets)
    lines.append(
        f"packs {plan.num_packs:,} ({per_pack.mean():.1f} samples each; tokens min {plan.pack_tokens.min():,} "
        f"mean {plan.pack_tokens.mean():,.0f} max {plan.pack_tokens.max():,}) | fill {plan.fill:.1%}"
        + (f" | tiles {tiles / (plan.num_packs * plan.max_tiles):.1%} of budget" if plan.max_tiles else "")
    )
    lines.append(
        f"steps {plan.steps:,} of {plan.global_batch} packs | trained tokens per step mean "
        f"{trained / max(1, plan.steps):,.0f}"
    )
    if plan.rebalanced:
        added = plan.num_packs - plan.min_packs
        lines.append(
            f"best-fit needs {plan.min_packs:,} packs; the samples of the lightest "
            f"{plan.rebalanced - added:,} were re-dealt into {plan.rebalanced:,} packs with balanced tokens"
            + (f" (+{added} for a multiple of the global batch; no sample lost)" if added else "")
        )
    if plan.split:
        lines.append(
            f"packing needs {plan.min_packs:,} packs; {plan.split} split in two to fill the last global step "
            "(no sample lost)"
        )
    if plan.dropped:
        lines.append(
            f"WARNING: {plan.dropped} sample(s) dropped: too few samples to split packs into a multiple "
            f"of the global batch ({plan.global_batch})"
        )
    if world_size and world_size > 1:
        spread, over, over_micro = [], [], []
        for step in range(plan.steps):
            start = plan.step_packs(step).start
            ranks = np.asarray(plan.step_ranks(step, world_size)) + start  # [rank, micro-batch]
            rank_tiles = plan.pack_tiles[ranks].sum(axis=1)
            cost = plan.pack_cost[ranks]
            mean = cost.sum(axis=1).mean()
            spread.append(int(rank_tiles.max() - rank_tiles.min()))
            over.append(cost.sum(axis=1).max() / mean - 1)
            over_micro.append(cost.max(axis=0).sum() / mean - 1)
        lines.append(
            f"{world_size} ranks × {plan.global_batch // world_size} micro-batches: the busiest rank's estimated "
            f"compute is {np.mean(over):.1%} above the mean per step (at most {max(over):.1%}; "
            f"{np.mean(over_micro):.1%} where ranks wait for each other after every micro-batch, as under "
            f"ZeRO-2); tiles per rank per step differ by at most {max(spread)} (mean {np.mean(spread):.1f})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- collate


@dataclass
class PackedBatch:
    """One packed micro-batch (docs/ARCHITECTURE.md): B = 1 row of T tokens from S samples.

    Shapes: input_ids/position_ids/targets int64[1, T], cu_seqlens int32[S+1], tiles
    uint8[N, 560, 560, 3], image_grids int64[I, 2], image_starts int64[I] (absolute in the row).
    """

    input_ids: torch.Tensor
    """int64[1, T]; image positions hold 0 (their embeddings are replaced)."""
    position_ids: torch.Tensor
    """int64[1, T]; restart at 0 for each sample."""
    cu_seqlens: torch.Tensor
    """int32[S+1] sample boundaries for varlen attention."""
    max_seqlen: int
    targets: torch.Tensor
    """int64[1, T] label to predict at position t (shifted within each sample; -100: not trained)."""
    tiles: torch.Tensor
    """uint8[N, 560, 560, 3] local tiles of all images in the row, image by image (normalize on GPU)."""
    image_grids: torch.Tensor
    """int64[I, 2] (rows, cols) per image."""
    image_starts: torch.Tensor
    """int64[I] first position of each image block in the row."""
    sample_keys: list[tuple[str, int, Any]]
    """(source, record index, id) of each sample, for logs and NaN reports."""
    num_tokens: int
    num_trained: int
    """Positions with a target in this micro-batch."""
    epoch: int = 0
    step: int = 0
    """Global step (optimizer step) within the epoch."""
    micro_step: int = 0
    """Index of this micro-batch among the rank's micro-batches of the step."""
    pack: int = 0
    """Pack id in the epoch plan: names this micro-batch the same way on any world size."""
    global_num_trained: int = 0
    """Trained tokens of the whole global step (all ranks): divide the summed loss by it."""
    global_num_tokens: int = 0

    def _map(self, fn: Any) -> PackedBatch:
        tensors = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **tensors)

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of `IXCModel.forward` for this row (without targets)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "tiles": self.tiles,
            "image_grids": self.image_grids,
            "image_starts": self.image_starts,
        }

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """Copy every tensor to `device` (asynchronously from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Page-locked copy (the DataLoader's pin thread calls this when CUDA is present)."""
        return self._map(lambda t: t.pin_memory())


def collate(samples: list[Sample]) -> PackedBatch:
    """Pack samples (in order) into one row: shift targets within each sample, offset image starts."""
    lengths = [s.num_tokens for s in samples]
    total = sum(lengths)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    input_ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64)
    input_ids[input_ids == IMAGE_TOKEN_ID] = 0
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    targets = np.full(total, IGNORE_INDEX, dtype=np.int64)
    grids, starts = [], []
    for s, start in zip(samples, offsets[:-1].tolist(), strict=True):
        # The label of position t+1 is predicted at t; a sample's last position predicts nothing.
        targets[start : start + s.num_tokens - 1] = s.labels[1:]
        for im in s.images:
            grids.append(im.grid)
            starts.append(start + im.span[0])
    num_tiles = sum(s.num_tiles for s in samples)
    # Allocating in shared memory here (to spare torch's copy when a worker sends it) measured
    # slower: 53 vs 75 samples/s with one worker (H200 host, 10 raw tiles per sample).
    tiles = torch.empty((num_tiles, TILE_SIZE, TILE_SIZE, 3), dtype=torch.uint8)
    at = 0
    for s in samples:
        if s.num_tiles:
            tiles[at : at + s.num_tiles].copy_(torch.from_numpy(s.tiles))
            at += s.num_tiles
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids).view(1, total),
        position_ids=torch.from_numpy(position_ids).view(1, total),
        cu_seqlens=torch.from_numpy(offsets.astype(np.int32)),
        max_seqlen=max(lengths),
        targets=torch.from_numpy(targets).view(1, total),
        tiles=tiles,
        image_grids=torch.tensor(grids, dtype=torch.int64).view(-1, 2),
        image_starts=torch.tensor(starts, dtype=torch.int64),
        sample_keys=[(s.source, s.index, s.id) for s in samples],
        num_tokens=total,
        num_trained=int((targets != IGNORE_INDEX).sum()),
    )


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class _MicroBatchWork:
    """What one micro-batch needs, small enough to pickle to workers."""

    epoch: int
    step: int
    micro_step: int
    pack: int
    shards: np.ndarray
    rows: np.ndarray
    num_trained: int
    global_num_trained: int
    global_num_tokens: int


class _RankStream(IterableDataset):
    """A rank's micro-batches; dataloader worker w of W reads items w, w+W, ... (in-order delivery)."""

    def __init__(self, shards_dir: Path, shard_files: list[str], work: list[_MicroBatchWork]):
        self.shards_dir = shards_dir
        self.shard_files = shard_files
        self.work = work

    def __len__(self) -> int:
        return len(self.work)

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers: dict[int, ShardReader] = {}
        for item in self.work[worker::workers]:
            samples = []
            for shard, row in zip(item.shards.tolist(), item.rows.tolist(), strict=True):
                if shard not in readers:
                    readers[shard] = ShardReader(self.shards_dir / self.shard_files[shard])
                samples.append(readers[shard].read(row))
            batch = collate(samples)
            if batch.num_trained != item.num_trained:
                raise ShardDataError(
                    f"epoch {item.epoch} step {item.step}: samples {batch.sample_keys} have "
                    f"{batch.num_trained} shifted targets but the shard index says {item.num_trained} "
                    "trained tokens (a sample's first position must not be trained); re-shard"
                )
            yield replace(
                batch,
                epoch=item.epoch,
                step=item.step,
                micro_step=item.micro_step,
                pack=item.pack,
                global_num_trained=item.global_num_trained,
                global_num_tokens=item.global_num_tokens,
            )


class _ThreadPrefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (num_workers = 0)."""

    _END = object()

    def __init__(self, iterable: Iterable[PackedBatch], depth: int, pin: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(iter(iterable), pin), name=PREFETCH_THREAD_NAME, daemon=True
        )
        self._thread.start()

    def _run(self, it: Iterator[PackedBatch], pin: bool) -> None:
        try:
            for item in it:
                if pin:
                    item = item.pin_memory()
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
        finally:  # a generator source (PackedLoader._batches) shuts its streams down here
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[PackedBatch]:
        try:
            while True:
                item = self._queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (also when never iterated) and wait for it to end.

        Waiting matters at exit: a daemon thread still shutting the source's worker processes down
        while the interpreter finalizes aborts the process ("terminate called without an active
        exception")."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_TIMEOUT_S)


T = TypeVar("T")


class TimedIterator(Generic[T]):
    """Wraps an iterator and records how long each `next()` blocked (the training loop's data wait)."""

    def __init__(self, iterable: Iterable[T]):
        self._it = iter(iterable)
        self.last_wait_s = 0.0
        """Wait of the latest next()."""
        self.total_wait_s = 0.0
        self._pending_s = 0.0
        self.count = 0
        """Items delivered."""

    def __iter__(self) -> TimedIterator[T]:
        return self

    def __next__(self) -> T:
        start = time.perf_counter()
        try:
            item = next(self._it)
        finally:
            self.last_wait_s = time.perf_counter() - start
            self.total_wait_s += self.last_wait_s
            self._pending_s += self.last_wait_s
        self.count += 1
        return item

    def pop_wait_s(self) -> float:
        """Seconds waited since the previous call (e.g. over one optimizer step's micro-batches)."""
        waited, self._pending_s = self._pending_s, 0.0
        return waited

    def close(self) -> None:
        """Close the wrapped iterator now (a generator runs its `finally`: the loader stops its
        threads and worker processes), not whenever it is garbage-collected: at interpreter exit a
        still-running loader thread aborts the process."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class PackedLoader:
    """One rank's loader: iterate to get PackedBatch micro-batches, `micro_batches_per_step` per step.

    Iteration continues from the current (epoch, step) to the end of the last epoch. The state
    advances as micro-batches are handed out; `state_dict()` taken between optimizer steps resumes
    at the next step, taken in the middle of a step it replays that step (its gradients were not
    applied). One iterator at a time; after `load_state_dict`, start a new one.
    """

    def __init__(
        self,
        shards: Path | SampleIndex,
        config: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool | None = None,
    ):
        config.validate()
        if not 0 <= rank < world_size:
            raise LoaderConfigError(f"rank {rank} is not in [0, world size {world_size})")
        self.index = shards if isinstance(shards, SampleIndex) else SampleIndex.load(Path(shards))
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.global_batch = config.micro_batches_per_step * world_size
        self.max_length = resolve_max_length(self.index, config)
        check_budgets(self.index, self.max_length, config.max_tiles)
        self.plan_id = compute_plan_id(self.index, config, self.global_batch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._plans: dict[int, EpochPlan] = {}
        self._steps: dict[int, int] = {}
        self._plan_lock = threading.Lock()  # the delivery thread plans the next epoch ahead
        self._epoch = 0
        self._step = 0

    # --- plan

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan (computed once, cached for the two latest epochs asked)."""
        with self._plan_lock:
            if epoch not in self._plans:
                if len(self._plans) >= 2:
                    del self._plans[min(self._plans)]
                self._plans[epoch] = plan_epoch(self.index, self.config, epoch, self.global_batch)
                self._steps[epoch] = self._plans[epoch].steps
            return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = self.plan(epoch).steps
        return self._steps[epoch]

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all epochs (plans each epoch once; redraws change the count slightly)."""
        return sum(self.steps_in_epoch(e) for e in range(self.config.epochs))

    def summary(self) -> str:
        """The start-up block: shards, global batch, the current epoch's plan, steps of every epoch."""
        m = self.index.manifest
        lines = [
            f"shards {self.index.shards_dir} | {len(m.sources)} source(s), {len(self.index):,} samples | "
            f"made with max_length {m.fingerprint.max_length}, hd_num {m.fingerprint.hd_num}",
            f"global batch {self.global_batch} packs = {self.config.micro_batches_per_step} micro-batches × "
            f"{self.world_size} rank(s) | {self.config.num_workers} loader worker(s) per rank",
            format_plan(self.plan(min(self._epoch, self.config.epochs - 1)), world_size=self.world_size),
        ]
        if self.config.epochs > 1:
            steps = [self.steps_in_epoch(e) for e in range(self.config.epochs)]
            lines.append(
                f"epochs {self.config.epochs}: steps {'/'.join(map(str, steps))} (total {sum(steps):,})"
            )
        return "\n".join(lines)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Next global step within the epoch."""
        return self._step

    # --- resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.config.seed,
            "plan_id": self.plan_id,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at (epoch, step); refuses a state made from other shards or plan settings."""
        if state["plan_id"] != self.plan_id:
            hints = []
            if state.get("seed") != self.config.seed:
                hints.append(f"seed was {state.get('seed')}, now {self.config.seed}")
            if state.get("global_batch", self.global_batch) != self.global_batch:
                hints.append(
                    f"global batch was {state['global_batch']} packs, now {self.global_batch} "
                    f"({self.config.micro_batches_per_step} micro-batches × {self.world_size} ranks)"
                )
            raise LoaderConfigError(
                f"loader state is for plan {state['plan_id']}, these shards and settings give plan "
                f"{self.plan_id}: "
                + (
                    "; ".join(hints)
                    or "the shards, sources, max_length, max_tiles, "
                    "token weighting or source sample counts changed"
                )
                + "; resume with the settings of the saved run (same global batch: micro-batches × ranks)"
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < self.config.epochs and step >= self.steps_in_epoch(epoch):
            epoch, step = epoch + 1, 0
        self._epoch, self._step = epoch, step

    # --- delivery

    def _work(self, plan: EpochPlan, start_step: int) -> list[_MicroBatchWork]:
        work = []
        for step in range(start_step, plan.steps):
            global_trained, global_tokens = plan.step_trained(step), plan.step_tokens(step)
            for micro, p in enumerate(plan.rank_packs(step, self.rank, self.world_size)):
                ids = plan.pack(p)
                work.append(
                    _MicroBatchWork(
                        epoch=plan.epoch,
                        step=step,
                        micro_step=micro,
                        pack=p,
                        shards=self.index.sample_shard[ids],
                        rows=self.index.sample_row[ids],
                        num_trained=int(plan.pack_trained[p]),
                        global_num_trained=global_trained,
                        global_num_tokens=global_tokens,
                    )
                )
        return work

    def _stream(self, work: list[_MicroBatchWork]) -> Iterable[PackedBatch]:
        dataset = _RankStream(self.index.shards_dir, self.index.shard_files, work)
        workers = min(self.config.num_workers, len(work))
        if workers == 0:
            if self.config.prefetch == 0:
                return dataset
            return _ThreadPrefetcher(dataset, self.config.prefetch, self.pin_memory)
        # Enough in flight to cover one optimizer step's micro-batches of this rank.
        prefetch = max(self.config.prefetch, math.ceil(self.config.micro_batches_per_step / workers), 1)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=prefetch,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def _open(self, epoch: int, start_step: int) -> _OpenEpoch | None:
        """The first epoch from `epoch` (at `start_step`, later ones from 0) with micro-batches for
        this rank, its delivery already started; None when training is over."""
        while epoch < self.config.epochs:
            plan = self.plan(epoch)
            work = self._work(plan, start_step)
            if work:
                stream = self._stream(work)
                return _OpenEpoch(epoch, plan, stream, iter(stream), len(work))
            epoch, start_step = epoch + 1, 0
        return None

    def _batches(self, epoch: int, step: int) -> Iterator[PackedBatch]:
        """This rank's micro-batches from (epoch, step) on, epochs chained. The next epoch's delivery
        is started when the current epoch's last micro-batch is handed out, so its workers load
        while that one trains."""
        current = self._open(epoch, step)
        upcoming = None
        try:
            while current is not None:
                for i, batch in enumerate(current.batches):
                    if i == current.count - 1:
                        upcoming = self._open(current.epoch + 1, 0)
                    yield batch
                current.close()
                current, upcoming = upcoming, None
        finally:  # stopped early (max_steps, an error): end the streams' workers and threads
            for pending in (current, upcoming):
                if pending is not None:
                    pending.close()

    def __iter__(self) -> Iterator[PackedBatch]:
        last_micro = self.config.micro_batches_per_step - 1
        batches: Iterable[PackedBatch] = self._batches(self._epoch, self._step)
        if self.config.num_workers > 0:
            # Epoch changes (planning, forking the next epoch's workers, joining the last ones: 0.4 s
            # per epoch on an H200 host) run in this thread, not in the training loop.
            batches = _ThreadPrefetcher(batches, depth=1, pin=False)
        try:
            for batch in batches:
                # The state follows what was handed out, not what the prefetching has read.
                if batch.micro_step == last_micro:
                    done = batch.step + 1 == self.steps_in_epoch(batch.epoch)
                    self._epoch, self._step = (batch.epoch + 1, 0) if done else (batch.epoch, batch.step + 1)
                yield batch
            self._epoch, self._step = self.config.epochs, 0
        finally:  # the prefetch thread or the _batches generator: either ends the streams
            batches.close()  # type: ignore[attr-defined]


@dataclass
class _OpenEpoch:
    """One epoch's delivery in progress (PackedLoader.__iter__)."""

    epoch: int
    plan: EpochPlan
    stream: Iterable[PackedBatch]
    batches: Iterator[PackedBatch]
    count: int
    """Micro-batches this rank gets in this epoch (from the starting step)."""

    def close(self) -> None:
        """Shut down DataLoader workers / stop the prefetch thread, also when never iterated."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()
        close = getattr(self.batches, "close", None)  # a generator
        if close is not None:
            close()
        if isinstance(self.stream, _ThreadPrefetcher):
            self.stream.close()


# --------------------------------------------------------------------------- dry run


def plan_main(
    shards_dir: Path, config: LoaderConfig, *, world_size: int = 1, out: TextIO | None = None
) -> PackedLoader:
    """Print the epoch plan (`PackedLoader.summary`) without touching a model; returns the loader."""
    loader = PackedLoader(Path(shards_dir), config, world_size=world_size, pin_memory=False)
    print(loader.summary(), file=out or sys.stdout)
    return loader
