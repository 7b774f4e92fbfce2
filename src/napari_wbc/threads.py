"""How many CPU threads to compute with, without oversubscribing the machine.

torch, dask and the BLAS under numpy each start a thread per core by default.
Together, or beside another job, they fight over the cores: OpenMP threads
spin while they wait for each other, and a classification that takes 11 s
with one thread took 28–44 s with torch's default on a 2-core machine with
another job running (issue #13). So napari-wbc chooses one number for all of
them: the cores this process may use, less those that other work keeps busy,
at least one. Busy is the 1-minute load average, read before we start, but
no more than the tasks running at that moment besides this one (Linux's
``/proc/loadavg``): the average still counts work that has just ended, and
a command run right after another would otherwise take half the cores of an
idle machine.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def running_elsewhere() -> int | None:
    """Tasks running or runnable now, besides the one asking (None where unknown)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            running = int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(running - 1, 0)


def default_threads() -> int:
    """Available cores less the ones other work keeps busy, at least 1."""
    cores = available_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    now = running_elsewhere()
    if now is not None:
        busy = min(busy, now)
    return max(1, min(cores, round(cores - busy)))


def compute_threads() -> int:
    """Threads the computation was given (:func:`configure_threads`), else the cores."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return available_cores()


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default :func:`default_threads`) for torch, dask and BLAS.

    Safe to call before torch is imported (it then sets the environment that
    torch reads when it starts, and keeps OpenMP from spinning) and after.
    Returns the number chosen.
    """
    from .errors import WBCError

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise WBCError(f"--threads must be a positive whole number, got {threads!r}")
    n = threads or default_threads()
    for name in _ENV:
        os.environ[name] = str(n)
    # Idle OpenMP threads sleep instead of spinning: spinning threads steal
    # the cores from dask's readers and from other jobs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
    import dask

    dask.config.set(num_workers=n)
    log.info("computing with %d thread(s)", n)
    return n


def thread_map(fn, items) -> list:
    """``[fn(x) for x in items]``, on :func:`compute_threads` threads, in order.

    For work that releases the GIL (decoding, scipy and scikit-image
    filters, numpy): a plain loop below two items or with one thread.
    """
    items = list(items)
    workers = min(compute_threads(), 8, len(items))
    if workers < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


class Prefetched:
    """``fn(x) for x in items``, in order, computed on one background thread.

    Up to ``ahead`` results are computed ahead of the consumer, starting at
    once (before the first is asked for), so work that releases the GIL
    (reading, decoding, detecting: numpy and scipy) runs while the caller
    computes something else (the networks). ``items`` is drawn on the
    caller's thread. With ``ahead < 1`` it is a plain loop on the caller's
    thread. An exception in ``fn`` is raised at the item it belongs to.
    :meth:`close` (Cancel) cancels what has not started and waits for the
    one item in progress, so no thread outlives it; it is called at the end
    and on an error.
    """

    def __init__(self, fn, items, ahead: int):
        from collections import deque

        self._fn = fn
        self._items = iter(items)
        self._ahead = ahead
        self._pending: deque = deque()
        self._pool = None
        if ahead >= 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="napari-wbc-prefetch")
            self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            try:
                x = next(self._items)
            except StopIteration:
                return
            self._pending.append(self._pool.submit(self._fn, x))

    def __iter__(self):
        return self

    def __next__(self):
        if self._pool is None:
            return self._fn(next(self._items))
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            result = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return result

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._items = iter(())

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
