"""Where a slide's annotations are autosaved: a sidecar next to the slide, or the data dir.

The sidecar is ``<slide file>.annotations.geojson`` next to the slide (e.g.
``CMU-1.svs.annotations.geojson``); when that folder is not writable — including a folder whose
permission bits forbid writing, which we respect even when running as root — the file goes to
``<data dir>/annotations/<sha256(slide path)[:16]>-<slide file>.annotations.geojson`` with
``<data dir>`` = ``$NAPARI_MAGNET_DATA_DIR`` or ``platformdirs.user_data_dir("napari-magnet")``.
Pure filesystem logic: no napari, no Qt.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = [
    "DATA_DIR_ENV",
    "SIDECAR_SUFFIX",
    "data_dir",
    "fallback_path",
    "folder_writable",
    "save_path",
    "saved_path",
    "sidecar_path",
]

#: Suffix of an autosave file, after the slide's file name.
SIDECAR_SUFFIX = ".annotations.geojson"
#: Environment variable naming the fallback data folder.
DATA_DIR_ENV = "NAPARI_MAGNET_DATA_DIR"


def sidecar_path(slide_path: str | os.PathLike) -> Path:
    """The sidecar file of a slide.

    Parameters
    ----------
    slide_path : path-like
        The slide file.

    Returns
    -------
    Path
        ``<slide file>.annotations.geojson`` next to the slide.
    """
    p = Path(slide_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The fallback folder of the autosave.

    Parameters
    ----------
    override : path-like, optional
        Used when given.

    Returns
    -------
    Path
        ``override``, else ``$NAPARI_MAGNET_DATA_DIR``, else the user data dir.
    """
    if override is not None:
        return Path(override)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-magnet"))


def fallback_path(
    slide_path: str | os.PathLike, data_dir_override: str | os.PathLike | None = None
) -> Path:
    """The data-dir file of a slide.

    Parameters
    ----------
    slide_path : path-like
        The slide file.
    data_dir_override : path-like, optional
        The fallback folder (default: :func:`data_dir`).

    Returns
    -------
    Path
        ``<data dir>/annotations/<sha256(absolute slide path)[:16]>-<slide file>`` plus
        :data:`SIDECAR_SUFFIX`.
    """
    absolute = os.path.abspath(os.fspath(slide_path))
    digest = hashlib.sha256(absolute.encode("utf-8")).hexdigest()[:16]
    return (
        data_dir(data_dir_override)
        / "annotations"
        / (f"{digest}-{Path(absolute).name}{SIDECAR_SUFFIX}")
    )


def folder_writable(folder: str | os.PathLike) -> bool:
    """Whether we may create files in a folder.

    Parameters
    ----------
    folder : path-like
        The folder.

    Returns
    -------
    bool
        It exists, ``os.access`` allows writing, and its permission bits allow someone to
        write (a folder marked read-only is respected even by root, who could override it).
    """
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    if not stat.S_ISDIR(mode) or not (mode & 0o222):
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def save_path(
    slide_path: str | os.PathLike, data_dir_override: str | os.PathLike | None = None
) -> Path:
    """Where the autosave of a slide goes now.

    Parameters
    ----------
    slide_path : path-like
        The slide file.
    data_dir_override : path-like, optional
        The fallback folder (default: :func:`data_dir`).

    Returns
    -------
    Path
        The sidecar when it can be written, else :func:`fallback_path`.
    """
    side = sidecar_path(slide_path)
    if folder_writable(side.parent) and (not side.exists() or os.access(side, os.W_OK)):
        return side
    return fallback_path(slide_path, data_dir_override)


def saved_path(
    slide_path: str | os.PathLike, data_dir_override: str | os.PathLike | None = None
) -> Path | None:
    """The newest existing autosave of a slide.

    Parameters
    ----------
    slide_path : path-like
        The slide file.
    data_dir_override : path-like, optional
        The fallback folder (default: :func:`data_dir`).

    Returns
    -------
    Path or None
        The newer of the sidecar and the data-dir file, ``None`` when neither exists.
    """
    found = []
    for p in (sidecar_path(slide_path), fallback_path(slide_path, data_dir_override)):
        try:
            found.append((p.stat().st_mtime_ns, p))
        except OSError:
            continue
    return max(found)[1] if found else None
