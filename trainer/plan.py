"""The epoch plan: which samples an epoch draws, how they are packed into rows, which rank trains each.

Reads only the shard index (`trainer/index.py`); no sample is opened. The whole epoch is planned up
front from the lengths in the index, so every decision is a pure function of (shards, config,
seed, epoch), whatever the world size, and the loader state is O(1) (`trainer/loader.py`):

1. Draw (docs/IXC25.md#data-txt). Each source contributes `int(k * 1000)` samples per epoch (or an override).
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

Seeds: every random stream is `np.random.default_rng([seed, epoch, stream, ...])`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field

import numpy as np

from schemas.manifest import SourceInfo
from schemas.record import MAX_K, MAX_SAMPLES_PER_EPOCH
from trainer.errors import LoaderConfigError, ShardDataError
from trainer.index import SampleIndex, check_budgets

PLAN_VERSION = 1
"""Bump when the planning algorithm changes: old loader states then refuse to resume."""
STREAM_DRAW = 0
STREAM_PACK_ORDER = 1
STREAM_PACK_SHUFFLE = 2
NO_TILE_BUDGET = 1 << 30


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
