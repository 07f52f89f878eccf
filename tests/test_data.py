"""trainer/{index,plan,batch,loader}.py: epoch plan, packing, distribution over ranks × workers, resume, collate, dry run."""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from schemas.manifest import Fingerprint, Manifest, ShardInfo, SourceInfo
from schemas.sample import IGNORE_INDEX, IMAGE_TOKEN_ID, TILE_SIZE, ImageSpan, Sample, image_token_count
from schemas.shards import ShardReader, file_sha256, token_columns, write_shard
from schemas.storage import open_store
from trainer.batch import collate
from trainer.cli import main as cli_main
from trainer.index import SampleIndex, ShardDataError
from trainer.loader import PREFETCH_THREAD_NAME, PackedLoader, TimedIterator, plan_main
from trainer.plan import (
    LoaderConfig,
    LoaderConfigError,
    assign_ranks,
    format_plan,
    pack_samples,
    plan_epoch,
    split_packs,
)

MAX_LENGTH = 2048
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks


# --------------------------------------------------------------------------- fixtures


def make_sample(rng: np.random.Generator, source: str, index: int, text_len: int, grids: list) -> Sample:
    """Images first, then text; user part untrained, answer trained, position 0 never trained."""
    pieces_ids, pieces_labels, images, tiles, at = [], [], [], [], 0
    for grid in grids:
        n = image_token_count(*grid)
        pieces_ids.append(np.full(n, IMAGE_TOKEN_ID, np.int32))
        pieces_labels.append(np.full(n, IGNORE_INDEX, np.int32))
        images.append(ImageSpan(grid=grid, span=(at, at + n)))
        tiles += [np.full((TILE_SIZE, TILE_SIZE, 3), (index + len(tiles)) % 256, np.uint8)] * (
            grid[0] * grid[1]
        )
        at += n
    ids = rng.integers(3, 1000, text_len).astype(np.int32)
    labels = ids.copy()
    labels[: max(1, text_len // 3)] = IGNORE_INDEX
    pieces_ids.append(ids)
    pieces_labels.append(labels)
    sample = Sample(
        input_ids=np.concatenate(pieces_ids),
        labels=np.concatenate(pieces_labels),
        images=images,
        tiles=np.stack(tiles) if tiles else np.zeros((0, TILE_SIZE, TILE_SIZE, 3), np.uint8),
        source=source,
        file=f"{source}.json",
        index=index,
        id=f"{source}-{index}",
    )
    sample.check()
    return sample


def write_source(root: Path, name: str, k: float, samples: list[Sample], per_shard: int) -> SourceInfo:
    info = SourceInfo(name=name, path=f"data/{name}.json", k=k, input_sha256="0" * 64)
    for start in range(0, len(samples), per_shard):
        chunk = samples[start : start + per_shard]
        file = f"{name}-{start // per_shard:05d}.arrow"
        write_shard(root / file, chunk, "raw")
        info.shards.append(
            ShardInfo(
                file=file,
                records=(start, start + len(chunk)),
                samples=len(chunk),
                bytes=(root / file).stat().st_size,
                sha256=file_sha256(root / file),
            )
        )
    info.records_read = info.samples_written = len(samples)
    info.total_tokens = sum(s.num_tokens for s in samples)
    info.trained_tokens = sum(s.num_trained for s in samples)
    info.tiles = sum(s.num_tiles for s in samples)
    return info


def fingerprint(max_length: int = MAX_LENGTH) -> Fingerprint:
    return Fingerprint("t" * 64, "official", "train", 18, max_length, "raw", None, "test")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """text: 240 samples, 100 drawn (subset); image: 12 samples of 1-2 tiles, 30 drawn (2-3 repeats);
    chat: 40 samples, 60 drawn (1-2 repeats)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 0.7, 240), 20, 900).astype(int)
    text = [make_sample(rng, "text", i, int(n), []) for i, n in enumerate(lengths)]
    image = [make_sample(rng, "image", i, int(rng.integers(20, 300)), [(1, 1 + i % 2)]) for i in range(12)]
    chat = [make_sample(rng, "chat", i, int(rng.integers(30, 400)), []) for i in range(40)]
    sources = [
        write_source(root, "text", 0.1, text, per_shard=70),
        write_source(root, "image", 0.03, image, per_shard=5),
        write_source(root, "chat", 0.06, chat, per_shard=40),
    ]
    (root / "manifest.json").write_text(Manifest(fingerprint(), sources, ["test"]).dumps())
    return root


@pytest.fixture(scope="module")
def index(shards: Path) -> SampleIndex:
    return SampleIndex.load(shards)


def config(**overrides) -> LoaderConfig:
    values = dict(max_tiles=3, seed=7, micro_batches_per_step=GLOBAL_BATCH, num_workers=0, prefetch=0)
    values.update(overrides)
    return LoaderConfig(**values)


def run_ranks(index: SampleIndex, world_size: int, workers: int, epochs: int = 1) -> list[list]:
    """Every rank's delivered micro-batches as (epoch, step, micro, keys)."""
    out = []
    for rank in range(world_size):
        cfg = config(micro_batches_per_step=GLOBAL_BATCH // world_size, num_workers=workers, epochs=epochs)
        loader = PackedLoader(index, cfg, rank=rank, world_size=world_size)
        out.append([(b.epoch, b.step, b.micro_step, tuple(b.sample_keys)) for b in loader])
    return out


def plan_keys(index: SampleIndex, plan) -> list[tuple]:
    keys = []
    for g in plan.sample_ids:
        source = int(index.source_of(np.asarray([g]))[0])
        name = index.manifest.sources[source].name
        local = int(g - index.source_offsets[source])
        keys.append((name, local, f"{name}-{local}"))
    return keys


# --------------------------------------------------------------------------- plan


def test_plan_counts_coverage_and_repeats(index: SampleIndex):
    plan = plan_epoch(index, config(), 0, GLOBAL_BATCH)
    by_name = {s.name: s for s in plan.sources}
    assert {n: s.samples for n, s in by_name.items()} == {"text": 100, "image": 30, "chat": 60}
    assert by_name["text"].unique == 100 and by_name["text"].max_repeats == 1  # subset w/o replacement
    assert (by_name["image"].unique, by_name["image"].min_repeats, by_name["image"].max_repeats) == (12, 2, 3)
    assert (by_name["chat"].unique, by_name["chat"].min_repeats, by_name["chat"].max_repeats) == (40, 1, 2)
    assert plan.dropped == 0 and plan.num_packs % GLOBAL_BATCH == 0
    counted = Counter(name for name, _, _ in plan_keys(index, plan))
    assert counted == {"text": 100, "image": 30, "chat": 60}
    # same inputs, same plan; next epoch redraws
    again = plan_epoch(index, config(), 0, GLOBAL_BATCH)
    assert np.array_equal(plan.sample_ids, again.sample_ids)
    other = plan_epoch(index, config(), 1, GLOBAL_BATCH)
    assert set(plan.sample_ids.tolist()) != set(other.sample_ids.tolist())


def test_packs_respect_budgets(index: SampleIndex):
    for max_tiles in (2, 3, None):
        plan = plan_epoch(index, config(max_tiles=max_tiles), 0, GLOBAL_BATCH)
        assert plan.pack_tokens.max() <= MAX_LENGTH
        if max_tiles is not None:
            assert plan.pack_tiles.max() <= max_tiles
        for p in range(plan.num_packs):
            ids = plan.pack(p)
            assert index.num_tokens[ids].sum() == plan.pack_tokens[p]
            assert index.num_tiles[ids].sum() == plan.pack_tiles[p]


def synthetic_index(lengths: np.ndarray, tiles: np.ndarray, k: float, max_length: int = 16384) -> SampleIndex:
    """An index without files (planning reads only the arrays)."""
    n = len(lengths)
    source = SourceInfo(name="mix", path="mix.json", k=k, input_sha256="0", samples_written=n, records_read=n)
    return SampleIndex(
        store=open_store("/nonexistent"),
        manifest=Manifest(fingerprint(max_length), [source]),
        shard_files=[],
        sample_shard=np.zeros(n, np.int32),
        sample_row=np.arange(n, dtype=np.int32),
        num_tokens=lengths.astype(np.int64),
        num_trained=(lengths // 2).astype(np.int64),
        num_tiles=tiles.astype(np.int64),
        source_offsets=np.asarray([0, n], np.int64),
    )


def test_fill_on_realistic_length_mix():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(1200), 0.8, 4000), 200, 6000).astype(int)
    tiles = np.where(lengths > 841, np.minimum((lengths - 441) // 400, 6), 0)
    index = synthetic_index(lengths, tiles, k=4.0)
    plan = plan_epoch(index, LoaderConfig(max_tiles=24), 0, global_batch=8)
    assert plan.fill >= 0.95, format_plan(plan)
    assert plan.pack_tokens.max() <= 16384 and plan.pack_tiles.max() <= 24
    assert plan.num_samples == 4000 and plan.dropped == 0 and plan.num_packs % 8 == 0
    # a large global batch over a short epoch: more, lighter packs, but equal ones (no straggler)
    plan = plan_epoch(index, LoaderConfig(max_tiles=24), 0, global_batch=32)
    assert plan.num_packs % 32 == 0 and plan.num_samples == 4000
    assert plan.pack_tokens.min() >= 0.95 * plan.pack_tokens.max(), format_plan(plan)


def test_pack_samples_tile_constraint_is_binding():
    tokens = np.asarray([100] * 10)
    tiles = np.asarray([1] * 10)
    packs = pack_samples(tokens, tiles, 16384, 3, np.arange(10))
    assert sorted(len(p) for p in packs) == [1, 3, 3, 3]


def test_remainder_is_split_not_dropped():
    lengths = np.full(50, 300)  # 50 samples fit in 1 pack of 16384; global batch 4 needs 4 packs
    index = synthetic_index(lengths, np.zeros(50, int), k=0.05)
    plan = plan_epoch(index, LoaderConfig(), 0, global_batch=4)
    assert (plan.num_packs, plan.min_packs, plan.dropped, plan.num_samples) == (4, 1, 0, 50)
    assert plan.rebalanced == 4 and sorted(plan.pack_tokens.tolist()) == [3600, 3600, 3900, 3900]
    # the fallback when balancing cannot fit: split the packs holding the most samples
    packs = [[0, 1, 2, 3], [4]]
    assert split_packs(packs, np.asarray([5, 4, 3, 2, 9]), 2) == 2
    assert sorted(map(sorted, packs)) == [[0], [1, 2], [3], [4]] or sorted(map(sorted, packs)) == [
        [0, 3],
        [1],
        [2],
        [4],
    ]
    # every pack holds one sample: nothing to split, the partial step is dropped and reported
    index = synthetic_index(np.full(10, 16000), np.zeros(10, int), k=0.01)
    plan = plan_epoch(index, LoaderConfig(), 0, global_batch=4)
    assert (plan.num_packs, plan.dropped, plan.num_samples) == (8, 2, 8)
    assert "2 sample(s) dropped" in format_plan(plan)


def test_token_weighted_counts():
    lengths = np.concatenate([np.full(100, 200), np.full(100, 1000)])
    index = synthetic_index(lengths, np.zeros(200, int), k=0.1)
    index.manifest.sources = [
        SourceInfo(
            name="short", path="s.json", k=0.1, input_sha256="0", samples_written=100, records_read=100
        ),
        SourceInfo(
            name="long", path="l.json", k=0.1, input_sha256="0", samples_written=100, records_read=100
        ),
    ]
    index.source_offsets = np.asarray([0, 100, 200])
    plan = plan_epoch(index, LoaderConfig(token_weighted=True), 0, global_batch=1)
    short, long = plan.sources
    assert (short.samples, long.samples) == (300, 60)  # m̄ = 600: 100·600/200, 100·600/1000
    assert short.tokens == long.tokens == 60000  # the sample-weighted plan's total, split by k
    overridden = plan_epoch(index, LoaderConfig(source_samples={"l.json": 7}), 0, global_batch=1)
    assert [s.samples for s in overridden.sources] == [100, 7]


def test_too_long_sample_and_bad_settings_are_precise_errors(index: SampleIndex):
    with pytest.raises(
        ShardDataError, match=r"more than max_length 500 tokens.*made with max_length 2048"
    ) as e:
        plan_epoch(index, config(max_length=500), 0, GLOBAL_BATCH)
    assert "text-00000.arrow row" in str(e.value) and "id 'text-" in str(e.value)
    with pytest.raises(ShardDataError, match="more than max_tiles 1 tiles"):
        plan_epoch(index, config(max_tiles=1), 0, GLOBAL_BATCH)
    with pytest.raises(ShardDataError, match="no source named 'nope'"):
        plan_epoch(index, config(source_samples={"nope": 3}), 0, GLOBAL_BATCH)
    with pytest.raises(LoaderConfigError, match=r"epochs \(0\).*\n.*num_workers"):
        LoaderConfig(epochs=0, num_workers=-1).validate()


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_ranks_cover_the_plan_exactly_once(index: SampleIndex, workers: int):
    plan = plan_epoch(index, config(), 0, GLOBAL_BATCH)
    expected = Counter(plan_keys(index, plan))
    for world_size in (1, 2, 3):
        delivered = run_ranks(index, world_size, workers)
        per_rank = [Counter(k for *_, keys in rank for k in keys) for rank in delivered]
        assert sum(per_rank, Counter()) == expected, (world_size, workers)
        for rank in delivered:  # every rank: micro_batches_per_step micro-batches per step, in order
            assert [(s, m) for _, s, m, _ in rank] == [
                (s, m) for s in range(plan.steps) for m in range(GLOBAL_BATCH // world_size)
            ]
        text = [{k for k in c if k[0] == "text"} for c in per_rank]  # no repeats in the text source
        assert sum(map(len, text)) == len(set().union(*text)) == 100  # ranks disjoint


def test_ranks_get_balanced_estimated_compute(index: SampleIndex):
    attention, tile = 1e-3, 50.0
    plan = plan_epoch(index, config(attention_cost=attention, tile_cost=tile), 0, GLOBAL_BATCH)
    p = 0  # a pack's cost: tokens + attention·Σ s² + tile·tiles
    lengths = index.num_tokens[plan.pack(p)]
    assert plan.pack_cost[p] == pytest.approx(
        lengths.sum() + attention * (lengths**2).sum() + tile * plan.pack_tiles[p]
    )
    assert plan_epoch(index, config(), 0, GLOBAL_BATCH).plan_id == plan.plan_id  # same samples per step
    for step in range(plan.steps):
        packs = plan.step_packs(step)
        rank_cost = [sum(plan.pack_cost[p] for p in plan.rank_packs(step, r, 3)) for r in range(3)]
        assert sum(rank_cost) == pytest.approx(plan.pack_cost[packs.start : packs.stop].sum())
        assert max(rank_cost) - min(rank_cost) <= plan.pack_cost[packs.start : packs.stop].max()


def test_assign_ranks_splits_the_costly_packs_and_breaks_ties_by_tiles():
    # equal tokens, but two packs hold one long sample each (quadratic attention): one per rank
    assert assign_ranks(np.array([9.0, 1.0, 9.0, 1.0]), np.zeros(4), 2) == [[0, 1], [2, 3]]
    # equal cost: tiles balanced
    assert assign_ranks(np.ones(4), np.array([5, 5, 0, 0]), 2) == [[0, 2], [1, 3]]
    # each rank's packs costliest first: the i-th micro-batches of all ranks are alike (under
    # ZeRO-2 the ranks wait for each other after every micro-batch)
    assert assign_ranks(np.array([1.0, 5.0, 3.0, 9.0, 2.0, 4.0]), np.zeros(6), 2) == [[3, 2, 0], [1, 5, 4]]


# --------------------------------------------------------------------------- resume


def take(loader: PackedLoader, steps: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(steps * loader.config.micro_batches_per_step)]


def step_sets(batches: list) -> list:
    """Per (epoch, step): the multiset of sample keys over all ranks."""
    steps: dict = {}
    for rank in batches:
        for epoch, step, _, keys in rank:
            steps.setdefault((epoch, step), Counter()).update(keys)
    return sorted(steps.items())


@pytest.mark.parametrize("resume_world", [2, 3, 1])
def test_resume_matches_uninterrupted(index: SampleIndex, resume_world: int):
    world, stop_at = 2, 2
    uninterrupted = run_ranks(index, world, workers=0, epochs=2)
    # stop after `stop_at` steps of epoch 0 on every rank, restore into a fresh loader, continue
    state = None
    for rank in range(world):
        # workers: the delivery runs ahead of the consumer; the state must follow what was taken
        cfg = config(micro_batches_per_step=GLOBAL_BATCH // world, epochs=2, num_workers=1)
        first = PackedLoader(index, cfg, rank=rank, world_size=world)
        head = take(first, stop_at)
        assert [b.sample_keys for b in head] == [list(k) for *_, k in uninterrupted[rank][: len(head)]]
        state = first.state_dict()
    assert state is not None and (state["epoch"], state["step"]) == (0, stop_at)
    resumed = []
    for rank in range(resume_world):
        cfg = config(micro_batches_per_step=GLOBAL_BATCH // resume_world, epochs=2, num_workers=1)
        loader = PackedLoader(index, cfg, rank=rank, world_size=resume_world)
        loader.load_state_dict(state)
        resumed.append([(b.epoch, b.step, b.micro_step, tuple(b.sample_keys)) for b in loader])
    expected = [[b for b in rank if (b[0], b[1]) >= (0, stop_at)] for rank in uninterrupted]
    if resume_world == world:
        assert resumed == expected  # same ids, same order, same rank
    assert step_sets(resumed) == step_sets(expected)  # same global batches at any world size


def test_state_refuses_other_plan(index: SampleIndex):
    state = PackedLoader(index, config()).state_dict()
    assert set(state) >= {"epoch", "step", "seed", "plan_id"}
    with pytest.raises(LoaderConfigError, match="seed was 7, now 8"):
        PackedLoader(index, config(seed=8)).load_state_dict(state)
    with pytest.raises(LoaderConfigError, match="global batch was 6 packs, now 4"):
        PackedLoader(index, config(micro_batches_per_step=2), world_size=2).load_state_dict(state)


def test_global_trained_tokens_per_step(index: SampleIndex):
    delivered = []
    for rank in range(2):
        loader = PackedLoader(index, config(micro_batches_per_step=3), rank=rank, world_size=2)
        delivered += list(loader)
    per_step: dict = {}
    for b in delivered:
        per_step.setdefault(b.step, []).append(b)
    for batches in per_step.values():
        assert {b.global_num_trained for b in batches} == {sum(b.num_trained for b in batches)}
        assert {b.global_num_tokens for b in batches} == {sum(b.num_tokens for b in batches)}


# --------------------------------------------------------------------------- collate


def test_collate_packs_a_row():
    rng = np.random.default_rng(3)
    a = make_sample(rng, "s", 0, 10, [])
    b = make_sample(rng, "s", 1, 6, [(1, 2)])
    batch = collate([a, b])
    n_img = image_token_count(1, 2)
    total = 10 + n_img + 6
    assert batch.input_ids.shape == batch.position_ids.shape == batch.targets.shape == (1, total)
    assert batch.cu_seqlens.tolist() == [0, 10, total] and str(batch.cu_seqlens.dtype) == "torch.int32"
    assert batch.max_seqlen == n_img + 6
    assert batch.position_ids[0].tolist() == list(range(10)) + list(range(n_img + 6))
    ids = batch.input_ids[0].numpy()
    assert (ids[10 : 10 + n_img] == 0).all() and ids[:10].tolist() == a.input_ids.tolist()
    targets = batch.targets[0].numpy()
    assert targets[:9].tolist() == a.labels[1:].tolist() and targets[9] == IGNORE_INDEX
    assert targets[10 : total - 1].tolist() == b.labels[1:].tolist() and targets[-1] == IGNORE_INDEX
    assert batch.num_trained == a.num_trained + b.num_trained == int((targets != IGNORE_INDEX).sum())
    assert batch.image_grids.tolist() == [[1, 2]] and batch.image_starts.tolist() == [10]
    assert batch.tiles.shape == (2, TILE_SIZE, TILE_SIZE, 3) and str(batch.tiles.dtype) == "torch.uint8"
    assert np.array_equal(batch.tiles.numpy(), b.tiles)
    assert batch.sample_keys == [("s", 0, "s-0"), ("s", 1, "s-1")]
    moved = batch.to("cpu")
    assert moved.input_ids.equal(batch.input_ids) and moved.sample_keys == batch.sample_keys


def test_delivered_batches_match_stored_samples(shards: Path, index: SampleIndex):
    """Every micro-batch the loader delivers (thread prefetch) is its samples' shard rows, read
    here with ShardReader by (source, index) and collated: ids, targets, boundaries, tiles."""
    names = [source.name for source in index.manifest.sources]
    readers: dict[str, ShardReader] = {}
    loader = PackedLoader(index, config(micro_batches_per_step=1, prefetch=2))  # thread prefetch
    timed = TimedIterator(loader)
    tiles = 0
    for batch in timed:
        stored = []
        for source, local, sample_id in batch.sample_keys:
            g = int(index.source_offsets[names.index(source)]) + local
            file = index.shard_files[int(index.sample_shard[g])]
            row = readers.setdefault(file, ShardReader(shards / file)).read(int(index.sample_row[g]))
            assert (row.source, row.index, row.id) == (source, local, sample_id)
            stored.append(row)
        expected = collate(stored)
        for name in (
            "input_ids",
            "position_ids",
            "cu_seqlens",
            "targets",
            "tiles",
            "image_grids",
            "image_starts",
        ):
            assert torch.equal(getattr(batch, name), getattr(expected, name)), (name, batch.sample_keys)
        assert (batch.num_tokens, batch.num_trained) == (expected.num_tokens, expected.num_trained)
        assert batch.input_ids.shape[1] == batch.num_tokens == int(batch.cu_seqlens[-1])
        for start, (rows, cols) in zip(batch.image_starts.tolist(), batch.image_grids.tolist(), strict=True):
            n = image_token_count(rows, cols)
            assert (batch.input_ids[0, start : start + n] == 0).all()
        tiles += batch.tiles.shape[0]
    assert timed.count == loader.plan(0).num_packs and timed.total_wait_s >= 0
    assert tiles > 0, "no batch held an image"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_sample_is_refused_naming_its_shard_before_it_is_delivered(
    shards: Path, tmp_path: Path, workers: int
):
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    victim = damaged / "chat-00000.arrow"
    text_ids, _ = token_columns(ShardReader(victim).read(3))
    data = bytearray(victim.read_bytes())
    at = data.find(text_ids.tobytes())
    assert at > 0
    data[at + 8] ^= 0x01  # one bit of one token id of row 3
    victim.write_bytes(bytes(data))
    index = SampleIndex.load(damaged)  # start-up reads no token or tile: it cannot see the damage
    loader = PackedLoader(index, config(micro_batches_per_step=1, num_workers=workers, prefetch=2))
    delivered = []
    with pytest.raises(ShardDataError) as caught:
        for batch in loader:
            delivered += batch.sample_keys
    message = str(caught.value)
    assert f"{victim}: row 3 does not match its sha256" in message and "xc-prep shard" in message
    assert "Traceback" not in message  # a worker's error reads as the worker raised it
    assert ("chat", 3, "chat-3") not in delivered


@pytest.mark.parametrize("workers", [0, 1])
def test_next_epoch_starts_loading_before_the_last_batch_trains(
    index: SampleIndex, workers: int, monkeypatch: pytest.MonkeyPatch
):
    """No worker start-up wait at epoch boundaries: epoch e+1's delivery is started when epoch e's
    last micro-batch is handed out; stopping early ends every started stream."""
    cfg = config(micro_batches_per_step=1, num_workers=workers, prefetch=2, epochs=3)
    loader = PackedLoader(index, cfg)
    opened: list[int] = []
    original = PackedLoader._stream

    def recording(self: PackedLoader, work: list) -> Any:
        opened.append(work[0].epoch)
        return original(self, work)

    monkeypatch.setattr(PackedLoader, "_stream", recording)
    per_epoch = [loader.steps_in_epoch(e) for e in range(3)]
    threads_before = threading.active_count()
    seen = []
    stream = iter(loader)
    for batch in stream:
        seen.append(batch.epoch)
        if len(seen) == per_epoch[0]:  # epoch 0's last batch: epoch 1 is already loading
            assert opened == [0, 1]
        if len(seen) == per_epoch[0] + 1:
            break
    stream.close()  # stopped early, with epoch 1 in flight
    assert seen == [0] * per_epoch[0] + [1]
    # close() returns once its prefetch thread has ended (one still shutting the workers down
    # when the interpreter exits aborts the process); multiprocessing's queue feeders follow
    assert not [t for t in threading.enumerate() if t.name == PREFETCH_THREAD_NAME]
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before
    # a full run still delivers every epoch's batches once, in order
    monkeypatch.setattr(PackedLoader, "_stream", original)
    full = [b.epoch for b in PackedLoader(index, cfg)]
    assert full == [e for e in range(3) for _ in range(per_epoch[e])]


# --------------------------------------------------------------------------- dry run


def test_plan_main_and_cli(shards: Path, capsys: pytest.CaptureFixture):
    out = io.StringIO()
    loader = plan_main(shards, config(epochs=2, micro_batches_per_step=3), world_size=2, out=out)
    text = out.getvalue()
    for needle in ("text", "image", "chat", "fill", "steps", "2 ranks", "epochs 2"):
        assert needle in text
    assert loader.total_steps == loader.plan(0).steps + loader.plan(1).steps
    argv = ["--shards", str(shards), "--plan-only", "--max-tiles", "3", "--world-size", "3"]
    assert cli_main(argv + ["--global-batch-size", "6", "--source-samples", "chat=10"]) == 0
    printed = capsys.readouterr().out
    assert "global batch 6 packs = 2 micro-batches × 3 rank(s)" in printed and "100.0%" in printed
    assert cli_main(argv + ["--max-length", "100"]) == 1
    assert cli_main(argv + ["--epochs", "0"]) == 2
    assert cli_main(["--shards", str(shards), "--plan-only", "--source-samples", "x"]) == 2
    assert "more than max_length 100" in capsys.readouterr().err


def test_loader_config_is_plain_data():
    assert asdict(LoaderConfig())["max_length"] is None
