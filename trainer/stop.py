"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (Slurm preemption, `kill`): finish the step, save, exit.

While the loop runs, the first SIGINT or SIGTERM only raises a flag. After each optimizer step
the ranks all-reduce it (`StopSignals.agreed`), so a signal that reached one rank alone (Slurm
may deliver to a single task; a terminal reaches every process of its group) stops every rank at
the same step: they write a checkpoint and the run exits with status 130 and one line naming it.
A second signal, at least `REPEAT_AFTER_S` after the first, exits at once without a checkpoint
(the last complete one stays intact). Copies of the first that arrive within that time are the
same request forwarded by a launcher (torchrun and deepspeed pass a signal on to every rank).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from schemas.cli import ExitCode

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_AFTER_S = 1.0
"""A second signal this long after the first exits at once; earlier ones are taken as copies."""


class StopSignals:
    """SIGINT/SIGTERM handlers for the training loop (`install`, then `restore`)."""

    def __init__(self, announce: bool, where: str):
        self.announce = announce
        """Whether this process prints the first signal's line (rank 0)."""
        self.where = where
        """The checkpoint folder, for the message of an immediate exit."""
        self.received: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        """Take over the stop signals (only the main thread may; elsewhere, nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, now
            if self.announce:
                print(
                    f"xc-train: {self.received} received: finishing this step, then a checkpoint "
                    f"(Ctrl-C again after {REPEAT_AFTER_S:g} s exits at once, without one)",
                    file=sys.stderr,
                    flush=True,
                )
        elif now - self._first_at >= REPEAT_AFTER_S:
            print(
                f"xc-train: {signal.Signals(signum).name} again: exiting now without a checkpoint; "
                f"the last complete one under {self.where} is intact",
                file=sys.stderr,
                flush=True,
            )
            os._exit(ExitCode.INTERRUPTED)

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """Collective: whether any rank received a stop signal (every rank calls it once per step)."""
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32, device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
