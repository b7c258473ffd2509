# mypy: disable-error-code="call-arg,var-annotated"
# (numba intrinsics are called without their typing-context parameter)
"""Helper threads for the matmul kernels, with a hand-off cheap enough for decode-sized products.

A job is a jitted `*_drain` entry and its arguments. The caller stores it, then runs the entry itself,
which (GIL already released) bumps the job number that idle helpers poll; a helper that sees it takes the
free GIL at once, calls the same entry and releases the GIL again. Entries pull work items from the shared
atomic counter[0], so a helper that comes late only takes fewer items; the caller returns when all items
are finished (counter[1] == nitems). Idle helpers poll (GIL released, x86 `pause`) for
HYBRIDLLM_SPIN_US microseconds (default 50; a sleeping thread takes ~10-50 us to wake), then block on a
semaphore. llama.cpp's thread pool polls the same way. Polling longer helps on a quiet machine and hurts
on a busy one, where the poller takes CPU time from the threads doing the work.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
from numba import njit

from .simd import atomic_load, cpu_relax


@njit(cache=True, nogil=True)
def _spin_while_equal(ctl: np.ndarray, idx: int, value: int, iters: int) -> int:
    """Poll ctl[idx] until it differs from `value` (returned) or `iters` polls are done."""
    for _ in range(iters):
        v = atomic_load(ctl, idx)
        if v != value:
            return v
        cpu_relax()
    return atomic_load(ctl, idx)


@njit(cache=True, nogil=True)
def _spin_until(ctl: np.ndarray, idx: int, target: int, iters: int) -> bool:
    """Poll until ctl[idx] >= target; False if `iters` polls were not enough."""
    for _ in range(iters):
        if atomic_load(ctl, idx) >= target:
            return True
        cpu_relax()
    return atomic_load(ctl, idx) >= target


def _polls_per_us() -> float:
    ctl = np.zeros(1, np.int64)
    _spin_while_equal(ctl, 0, 0, 10)
    t = time.perf_counter()
    _spin_while_equal(ctl, 0, 0, 20000)
    return 20000 / max((time.perf_counter() - t) * 1e6, 1.0)


class Helpers:
    """n persistent helper threads."""

    def __init__(self, n: int, spin_us: float) -> None:
        self.n = n
        self.ctl = np.zeros(1 + n, np.int64)   # [0] job number, [1 + i] helper i is asleep
        self.no_post = np.zeros(0, np.int64)
        self.sems = [threading.Semaphore(0) for _ in range(n)]
        self.job: tuple[Callable[..., None], tuple, int] | None = None
        self.error: BaseException | None = None
        self.spin = max(1, int(spin_us * _polls_per_us()))
        for i in range(n):
            threading.Thread(target=self._loop, args=(i,), name=f"hybridllm-mm-{i}", daemon=True).start()

    def _loop(self, i: int) -> None:
        seen = 0
        while True:
            job_no = _spin_while_equal(self.ctl, 0, seen, self.spin)
            if job_no == seen:
                self.ctl[1 + i] = 1   # asleep: the next job releases our semaphore
                if self.ctl[0] == seen:
                    self.sems[i].acquire()
                self.ctl[1 + i] = 0
                continue
            seen = job_no
            job = self.job
            if job is None or i >= job[2]:
                continue
            try:
                job[0](self.no_post, *job[1])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.error = exc

    def run(self, fn: Callable[..., None], counter: np.ndarray, nitems: int, args: tuple, helpers: int) -> None:
        """Run `fn(counter, nitems, *args)` here and on `helpers` helpers; return when all items are done."""
        self.error = None
        self.job = (fn, (counter, nitems, *args), helpers)
        for i in range(helpers):
            if self.ctl[1 + i]:   # asleep: wake it (it finds the job number bumped by then or soon)
                self.sems[i].release()
        fn(self.ctl, counter, nitems, *args)   # bumps ctl[0] once the GIL is released
        while not _spin_until(counter, 1, nitems, self.spin):
            if self.error is not None:
                break
            time.sleep(0)
        if self.error is not None:
            raise self.error


_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_helpers: Helpers | None = None
_lock = threading.Lock()
_NO_POST = np.zeros(0, np.int64)
# Products below this many multiply-adds run on the calling thread alone. On a quiet machine ~256K (15 us
# of work) already gains from a second thread; on a busy one (other processes on the same cores) the
# helpers rarely get a core in time and cost more than they save, so by default only big products
# (the output matrix, prompt batches) are split.
SERIAL_MACS = int(os.environ.get("HYBRIDLLM_MATMUL_PARALLEL_MACS", str(1 << 21)))


def set_num_threads(n: int) -> None:
    """Threads the matmul kernels use (the calling thread included)."""
    global _threads
    _threads = max(1, int(n))


def get_num_threads() -> int:
    return _threads


def run_items(entry: Callable[..., None], nitems: int, macs: int, args: tuple,
              serial_counter: np.ndarray) -> None:
    """Run work items 0..nitems-1 of `entry` on up to get_num_threads() threads."""
    global _helpers
    helpers = min(_threads, nitems) - 1 if macs >= SERIAL_MACS else 0
    if helpers <= 0 or not _lock.acquire(blocking=False):  # small, or helpers busy with another caller
        serial_counter[:] = 0
        entry(_NO_POST, serial_counter, nitems, *args)
        return
    try:
        if _helpers is None or _helpers.n < helpers:
            _helpers = Helpers(max(helpers, _threads - 1), float(os.environ.get("HYBRIDLLM_SPIN_US", "50")))
        # a fresh counter: a helper still leaving the previous job must not see this one's items
        _helpers.run(entry, np.zeros(2, np.int64), nitems, args, helpers)
    finally:
        _lock.release()
