"""Atomic file output and JSON-safe values, used by every writer of the project.

A file is written to a temporary name in its own folder, flushed to disk and renamed onto
its final name (``os.replace``), so a crash or a kill at any moment leaves either the old
file or the new one, never half of one. This module imports nothing of the project's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write to it inside the ``with`` block.

    On success the temporary file is fsynced, given ``path``'s permissions (0o644 for a new
    file) and renamed onto ``path``; on any error (``KeyboardInterrupt`` included) it is
    deleted and the error propagates. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike, value: Any, *, indent: int | None = 1, ensure_ascii: bool = True
) -> Path:
    """Write ``json_safe(value)`` as JSON (with a final newline) atomically; returns ``path``.

    ``indent`` and ``ensure_ascii`` are :func:`json.dumps`'s (``ensure_ascii=False`` writes
    non-ASCII text as UTF-8 instead of ``\\u`` escapes).
    """
    return atomic_write_text(
        path,
        json.dumps(json_safe(value), indent=indent, allow_nan=False, ensure_ascii=ensure_ascii)
        + "\n",
    )


def json_safe(value: Any) -> Any:
    """The value with JSON types only.

    numpy scalars and arrays become Python numbers and lists, tuples lists, paths strings,
    non-finite floats ``None``; dict keys become strings; any other object its ``str``.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)
