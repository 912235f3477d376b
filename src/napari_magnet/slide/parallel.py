"""One shared thread pool for decoding the tiles of a read in parallel.

JPEG and deflate decoders (imagecodecs) and OpenSlide (through ctypes) release the GIL, so a
viewport's tiles decode on every core at once. The calling thread works too: a read never
waits for a pool thread to become free, which keeps nested use (dask's threads, the engine's
readers, napari's slicing thread all calling in at once) free of deadlocks and no slower than
decoding alone.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

WORKERS_ENV = "NAPARI_MAGNET_DECODE_THREADS"
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def decode_workers() -> int:
    """Pool size: ``$NAPARI_MAGNET_DECODE_THREADS``, or the CPU count (at most 16)."""
    value = os.environ.get(WORKERS_ENV)
    if value:
        return max(int(value), 0)
    return min(os.cpu_count() or 1, 16)


def _shared_pool() -> ThreadPoolExecutor | None:
    global _pool, _pool_workers
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                workers = decode_workers()
                if workers <= 1:
                    return None
                _pool_workers = workers
                _pool = ThreadPoolExecutor(workers, thread_name_prefix="napari-magnet-decode")
    return _pool


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's pool threads: it makes a pool of its own."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def run_all(jobs: Sequence[Callable[[], None]]) -> None:
    """Run ``jobs`` on the calling thread and the shared pool; return when all are done.

    Parameters
    ----------
    jobs : sequence of callables
        Independent jobs without arguments. Each runs exactly once, in no set order.

    Raises
    ------
    BaseException
        The first exception a job raised, once every job has finished.
    """
    if not jobs:
        return
    pool = _shared_pool() if len(jobs) > 1 else None
    if pool is None:
        for job in jobs:
            job()
        return
    pending = deque(jobs)
    remaining = [len(jobs)]
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                job = pending.popleft()
            except IndexError:
                return
            try:
                job()
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                errors.append(error)
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    helpers = min(len(jobs) - 1, _pool_workers)
    for _ in range(helpers):
        try:
            pool.submit(drain)
        except RuntimeError:  # interpreter shutting down: the caller does it all
            break
    drain()
    done.wait()
    if errors:
        raise errors[0]
