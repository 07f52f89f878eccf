"""Worker processes of `xc-prep validate` and `xc-prep shard`: they never outlive the run.

- A worker exits when the run's main process dies, however it dies (kill -9 included). Workers
  are started with the spawn method, so each is the main process's own child: on Linux the kernel
  kills it when its parent exits (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), and a thread in every
  worker checks every WATCH_INTERVAL_S that its parent is still the main process (other systems,
  and a parent gone before the prctl took effect). Left alone, an idle worker would wait forever on
  its task queue (it holds both ends of the pipe), and a busy one would finish its unit and then
  wait, holding the output pipe open.
- Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and `timeout`,
  docker and Slurm send SIGTERM. The main process alone handles them (`stop_on_sigterm` makes
  SIGTERM stop a run as Ctrl-C does) and kills the workers (`stop_pool`).

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=start_worker, initargs=(os.getpid(),))
    with stop_on_sigterm():
        try:
            ...
        except BaseException:
            stop_pool(pool)
            raise
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

WATCH_INTERVAL_S = 0.5
PR_SET_PDEATHSIG = 1
"""linux/prctl.h: deliver a signal to this process when its parent exits."""
JOIN_TIMEOUT_S = 10.0


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the main process: the run stops as it does on Ctrl-C."""


def start_worker(main_pid: int, then: Callable[..., None] | None = None, *args: Any) -> None:
    """Pool initializer of a worker the main process `main_pid` started itself (the spawn start
    method): leave signals to it, die with it; then `then(*args)`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the watcher below still works
            pass
    # A process is re-parented the moment its parent exits (reaped or not): if that happened
    # before the prctl above, the kernel will not send the signal, so look now, then keep looking.
    if os.getppid() != main_pid:
        os._exit(1)
    threading.Thread(target=_watch, args=(main_pid,), name="xc-parent-watch", daemon=True).start()
    if then is not None:
        then(*args)


def _watch(main_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != main_pid:
            os._exit(1)  # no cleanup: the main process is gone, and with it anyone to report to


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within this block, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and kill the workers now (they ignore SIGTERM), rather than
    wait for their current task."""
    pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=JOIN_TIMEOUT_S)
