"""A bounded, thread-safe LRU cache of decoded chunks, shared by all levels of a slide."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import numpy as np

DEFAULT_CACHE_MB = 512
CACHE_ENV = "NAPARI_MAGNET_CACHE_MB"


def default_cache_bytes() -> int:
    """Cache size in bytes: ``$NAPARI_MAGNET_CACHE_MB`` megabytes, or 512 MB."""
    megabytes = float(os.environ.get(CACHE_ENV, DEFAULT_CACHE_MB))
    return max(int(megabytes * 1024 * 1024), 0)


class ChunkCache:
    """Least-recently-used cache bounded in bytes.

    Values are numpy arrays or anything else with ``nbytes`` and ``setflags`` (the pyramid
    keeps parts of units for OpenSlide's levels); the bound counts their ``nbytes``.

    Concurrent misses of the same key decode once: the first caller decodes while the others
    wait on a per-key lock, so napari's parallel chunk loads never decode a tile twice.

    Parameters
    ----------
    max_bytes : int
        Upper bound of the bytes held; 0 disables caching.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every cached chunk."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, np.ndarray]:
        """The cached arrays among ``keys`` (a hit for each), under one lock acquisition."""
        found: dict[Hashable, np.ndarray] = {}
        with self._lock:
            items = self._items
            for key in keys:
                value = items.get(key)
                if value is not None:
                    items.move_to_end(key)
                    found[key] = value
            self.hits += len(found)
        return found

    def put(
        self,
        key: Hashable,
        value: np.ndarray,
        replace: bool | Callable[[np.ndarray], bool] = False,
    ) -> None:
        """Store ``value`` (made read-only) and count a miss.

        Parameters
        ----------
        key : hashable
            Cache key.
        value : numpy.ndarray
            Anything with ``nbytes`` and ``setflags`` (a unit's pixels, or a part of them).
        replace : bool or callable
            Whether a value already cached under ``key`` gives way to this one: a bool, or a
            function of the cached value (else the cached one stays).
        """
        value.setflags(write=False)
        with self._lock:
            self.misses += 1
        self._store(key, value, replace)

    def get_or_compute(self, key: Hashable, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """Return the cached array for ``key``, computing and storing it on a miss."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
            key_lock = self._pending.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                found = self._items.get(key)
                if found is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return found
                self.misses += 1
            try:
                value = compute()
                value.setflags(write=False)
                self._store(key, value)  # stored before the key lock opens: no second decode
            finally:
                with self._lock:
                    self._pending.pop(key, None)
            return value

    def _store(self, key: Hashable, value: np.ndarray, replace=False) -> None:
        size = value.nbytes
        with self._lock:
            old = self._items.get(key)
            if old is not None:
                if not (replace(old) if callable(replace) else replace):
                    return
                del self._items[key]
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
