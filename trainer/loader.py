"""Delivery of one rank's packed micro-batches, O(1)-resumable, from the epoch plan (`trainer/plan.py`).

The rank's micro-batches of each step come from the plan; dataloader worker w of W takes the
rank's micro-batches w, w+W, ...; the DataLoader delivers them in order. Workers read and collate
(`trainer/batch.py`), the DataLoader pins memory when CUDA is present and prefetches;
`PackedBatch.to(device, non_blocking=True)` moves a batch; `TimedIterator` measures how long the
training loop waits for data. The state is (epoch, step) plus the plan's id: `state_dict()` /
`load_state_dict()` resume exactly, also on another world size with the same global batch.
Each micro-batch carries the bytes its samples took to read and the seconds that took
(`read_bytes`, `read_s`); `read_stats()` sums what was handed out: the read throughput per worker,
from a local disk or an object store (ranged reads: schemas/storage.py).
"""

from __future__ import annotations

import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas.shards import ShardReader
from schemas.storage import Store
from trainer.batch import PackedBatch, collate
from trainer.errors import LoaderConfigError, ShardDataError
from trainer.index import SampleIndex, check_budgets, read_sample
from trainer.plan import (
    EpochPlan,
    LoaderConfig,
    compute_plan_id,
    format_plan,
    plan_epoch,
    resolve_max_length,
)

CLOSE_TIMEOUT_S = 60.0
"""How long closing the loader waits for its prefetch thread (and the worker processes it shuts down)."""
PREFETCH_THREAD_NAME = "xc-loader-prefetch"


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

    def __init__(self, store: Store, shard_files: list[str], work: list[_MicroBatchWork]):
        self.store = store
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
            started = time.perf_counter()
            read_bytes = 0
            for shard, row in zip(item.shards.tolist(), item.rows.tolist(), strict=True):
                before = readers[shard].bytes_read if shard in readers else 0
                samples.append(read_sample(readers, self.store, self.shard_files, shard, row))
                read_bytes += readers[shard].bytes_read - before
            read_s = time.perf_counter() - started
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
                read_bytes=read_bytes,
                read_s=read_s,
            )


def _ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves SIGINT and SIGTERM to the training process (trainer/stop.py), which
    finishes its step and then shuts the workers down; a worker that died of the signal would fail
    that step. Workers still exit when the training process is gone (torch watches the parent)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


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
        shards: str | Path | SampleIndex,
        config: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool | None = None,
    ):
        config.validate()
        if not 0 <= rank < world_size:
            raise LoaderConfigError(f"rank {rank} is not in [0, world size {world_size})")
        self.index = shards if isinstance(shards, SampleIndex) else SampleIndex.load(shards)
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
        self._read_bytes = 0
        self._read_s = 0.0

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

    def read_stats(self) -> dict[str, float]:
        """Bytes of the samples handed out so far, the seconds the workers spent reading them, and
        their rate: the read throughput of one worker (the workers read side by side)."""
        return {
            "read_bytes": self._read_bytes,
            "read_s": self._read_s,
            "bytes_per_s_per_worker": self._read_bytes / self._read_s if self._read_s > 0 else 0.0,
        }

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
        dataset = _RankStream(self.index.store, self.index.shard_files, work)
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
            worker_init_fn=_ignore_stop_signals,
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
                self._read_bytes += batch.read_bytes
                self._read_s += batch.read_s
                # The state follows what was handed out, not what the prefetching has read.
                if batch.micro_step == last_micro:
                    done = batch.step + 1 == self.steps_in_epoch(batch.epoch)
                    self._epoch, self._step = (batch.epoch + 1, 0) if done else (batch.epoch, batch.step + 1)
                yield batch
            self._epoch, self._step = self.config.epochs, 0
        except ShardDataError as e:
            raise _worker_message(e) from None
        finally:  # the prefetch thread or the _batches generator: either ends the streams
            batches.close()  # type: ignore[attr-defined]


def _worker_message(error: ShardDataError) -> ShardDataError:
    """torch re-raises a worker process's exception with the worker's whole traceback as its
    message; the user needs the message the worker raised (it names the shard and the fix)."""
    text = str(error)
    marker = f"\n{ShardDataError.__module__}.{ShardDataError.__qualname__}: "
    if "Original Traceback" not in text or marker not in text:
        return error
    return ShardDataError(text.rsplit(marker, 1)[1].strip())


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
    shards: str | Path | SampleIndex, config: LoaderConfig, *, world_size: int = 1, out: TextIO | None = None
) -> PackedLoader:
    """Print the epoch plan (`PackedLoader.summary`) without touching a model; returns the loader."""
    loader = PackedLoader(shards, config, world_size=world_size, pin_memory=False)
    print(loader.summary(), file=out or sys.stdout)
    return loader
