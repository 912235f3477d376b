"""Model checkpoints: ``<name>.safetensors`` (weights) + ``<name>.json`` (what they are).

Nothing here ever unpickles: weights are read with :mod:`safetensors` only, and a pickle
(``torch.save``'s zip archive or a raw pickle stream) is recognised from its first bytes and
refused *without being executed*.

The JSON sidecar::

    {
      "format": "napari-magnet-checkpoint/1",
      "architecture": "magnet",            # or "ats", … (a registered model family)
      "model_name": "magnet3",
      "config": {...},                      # the architecture's config dict
      "config_hash": "<sha256 of the canonical JSON of config>",
      "weights_file": "<name>.safetensors",
      "weights_sha256": "<sha256 of the weights file>",
      "provenance": {"package": "napari-magnet", "package_version": "…", "created": "…Z",
                     "torch_version": "…", "python_version": "…", "notes": "…", …}
    }

The safetensors header metadata repeats ``format``, ``architecture`` and ``config_hash`` so a
weights file separated from its JSON can still be told apart.

A model that can be saved exposes ``architecture`` (str) and ``config`` with ``to_dict()``
(JSON-ready) — :class:`~napari_magnet.models.magnet.MagNet` does; so must any architecture
registered with :func:`~napari_magnet.models.family.register_family`.

Every failure raises :class:`CheckpointError` (a ``ValueError``) naming the file and the problem.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..io.atomic import atomic_path, atomic_write_text
from .family import get_family

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_paths",
    "config_hash_of",
    "load_checkpoint",
    "load_state_into",
    "read_checkpoint",
    "save_checkpoint",
    "sha256_of",
]

FORMAT = "napari-magnet-checkpoint/1"
_WEIGHTS_SUFFIX = ".safetensors"
_JSON_SUFFIX = ".json"
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}
_REQUIRED_KEYS = ("format", "architecture", "config", "config_hash")
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is unsafe, or does not fit the model."""


# ----------------------------------------------------------------------------- small helpers


def sha256_of(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def config_hash_of(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, compact, ASCII) of a config dict."""
    text = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, json)`` paths of the pair that ``path`` names.

    ``x.safetensors`` or ``x.json`` name the pair ``x.*``; any other name ``x`` means
    ``x.safetensors`` + ``x.json``.
    """
    p = Path(path)
    if p.suffix == _WEIGHTS_SUFFIX or p.suffix == _JSON_SUFFIX:
        stem = p.with_suffix("")
    else:
        stem = p
    return (stem.with_name(stem.name + _WEIGHTS_SUFFIX), stem.with_name(stem.name + _JSON_SUFFIX))


def _sniff(path: Path) -> str:
    """Kind of file from its first bytes: 'safetensors', 'zip', 'pickle', 'empty' or 'unknown'."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 1 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _refuse_pickle(path: Path, kind: str) -> CheckpointError:
    what = (
        "a zip archive as written by torch.save (it holds a pickle)"
        if kind == "zip"
        else "a Python pickle"
        if kind == "pickle"
        else f"not a safetensors file (a {path.suffix} file is usually a pickle)"
    )
    return CheckpointError(
        f"{path}: {what}. Pickled checkpoints can run arbitrary code when loaded and are "
        f"refused for safety; it was not opened. Convert it to a .safetensors + .json pair "
        f"with napari_magnet.models.checkpoints.save_checkpoint in a trusted environment."
    )


def _check_safetensors_layout(path: Path) -> dict[str, Any]:
    """Validate the safetensors header and sizes before handing the file to safetensors."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {n} bytes announced, "
                f"file has {size} bytes)"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {k!r})") from None
    have = size - 8 - n
    if have < end:
        raise CheckpointError(
            f"{path}: truncated safetensors file (tensor data needs {end} bytes, {have} present)"
        )
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


# ----------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked for consistency (not yet against a model).

    Attributes
    ----------
    weights_path, json_path : Path
    meta : dict
        The JSON sidecar.
    state_dict : dict of str to torch.Tensor
    sha256 : str
        sha256 of the weights file.
    """

    weights_path: Path
    json_path: Path
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    sha256: str

    @property
    def architecture(self) -> str:
        """Architecture name (``"magnet"``, ``"ats"``, …)."""
        return str(self.meta["architecture"])

    @property
    def config(self) -> dict[str, Any]:
        """Architecture config dict."""
        return dict(self.meta["config"])

    @property
    def config_hash(self) -> str:
        """Stored config hash."""
        return str(self.meta["config_hash"])

    @property
    def model_name(self) -> str:
        """Name recorded at save time (falls back to the config's name or the file stem)."""
        return str(self.meta.get("model_name") or self.config.get("name") or self.weights_path.stem)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: checkpoint JSON must be an object, got {type(meta).__name__}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint JSON lacks {missing}")
    if meta["format"] != FORMAT:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {meta['format']!r} (expected {FORMAT!r})"
        )
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: 'config' must be an object")
    if config_hash_of(meta["config"]) != meta["config_hash"]:
        raise CheckpointError(
            f"{path}: config_hash does not match the config (file edited or corrupt)"
        )
    return meta


def read_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and check a checkpoint pair; either file of the pair may be given.

    Raises
    ------
    CheckpointError
        Missing file, pickle given, truncated/corrupt safetensors, malformed JSON, or a
        weights file that does not belong to the JSON.
    """
    p = Path(path)
    if p.is_file() and p.suffix not in (_WEIGHTS_SUFFIX, _JSON_SUFFIX):
        kind = _sniff(p)
        if kind in ("zip", "pickle") or p.suffix in _PICKLE_SUFFIXES:
            raise _refuse_pickle(p, kind)
        raise CheckpointError(
            f"{p}: not a checkpoint (expected a {_WEIGHTS_SUFFIX} + {_JSON_SUFFIX} pair)"
        )
    weights, meta_path = checkpoint_paths(p)
    if not weights.is_file() and not meta_path.is_file():
        raise CheckpointError(
            f"{p}: checkpoint not found (neither {weights.name} nor "
            f"{meta_path.name} exists in {weights.parent})"
        )
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing (its JSON {meta_path.name} exists)")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path}: checkpoint JSON missing (needed next to {weights.name})"
        )
    kind = _sniff(weights)
    if kind in ("zip", "pickle"):
        raise _refuse_pickle(weights, kind)
    if kind == "empty":
        raise CheckpointError(f"{weights}: empty file")
    meta = _read_json(meta_path)
    st_meta = _check_safetensors_layout(weights)
    digest = sha256_of(weights)
    want = meta.get("weights_sha256")
    if want and want != digest:
        raise CheckpointError(
            f"{weights}: sha256 {digest[:12]}… differs from the "
            f"{want[:12]}… recorded in {meta_path.name} (modified, or paired "
            f"with another checkpoint's JSON)"
        )
    for key in ("architecture", "config_hash"):
        if key in st_meta and st_meta[key] != str(meta[key]):
            raise CheckpointError(
                f"{weights}: its {key} {st_meta[key]!r} differs from "
                f"{meta_path.name}'s {meta[key]!r}: the files do not belong "
                f"together"
            )
    try:
        from safetensors.torch import load_file

        state = load_file(str(weights), device=str(torch.device(device)))
    except Exception as exc:  # SafetensorError and friends
        raise CheckpointError(f"{weights}: corrupt safetensors file ({exc})") from None
    return Checkpoint(
        weights_path=weights, json_path=meta_path, meta=meta, state_dict=state, sha256=digest
    )


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(
            f"{type(model).__name__} has no config with to_dict(); it cannot be checkpointed"
        )
    return dict(cfg.to_dict())


def _architecture(model: nn.Module) -> str:
    arch = getattr(model, "architecture", None)
    if not isinstance(arch, str) or not arch:
        raise TypeError(f"{type(model).__name__} has no 'architecture' name")
    return arch


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def load_state_into(model: nn.Module, checkpoint: Checkpoint | str | os.PathLike) -> Checkpoint:
    """Load a checkpoint's weights into ``model`` after checking they belong to it.

    Checks the architecture name, the config (every differing field is listed), then the
    state dict: missing keys, unexpected keys and shape mismatches, all reported together.
    On success the weights are copied (``strict=True``) and the :class:`Checkpoint` returned.
    """
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    where = ck.weights_path
    arch = _architecture(model)
    if ck.architecture != arch:
        raise CheckpointError(
            f"{where}: architecture mismatch: the checkpoint is "
            f"{ck.architecture!r}, the model is {arch!r}"
        )
    problems: list[str] = []
    mine = _config_dict(model)
    theirs = ck.config
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k, None) != theirs.get(k, None))
    if diff:
        problems.append(
            "config mismatch: "
            + "; ".join(
                f"{k}: checkpoint {_short(theirs.get(k, '<absent>'))} vs model "
                f"{_short(mine.get(k, '<absent>'))}"
                for k in diff
            )
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(ck.state_dict))
    unexpected = sorted(set(ck.state_dict) - set(own))
    shapes = sorted(
        k
        for k in set(own) & set(ck.state_dict)
        if tuple(own[k].shape) != tuple(ck.state_dict[k].shape)
    )

    def listing(keys: list[str]) -> str:
        head = ", ".join(keys[:8])
        return f"{head}{f', … ({len(keys)} in all)' if len(keys) > 8 else ''}"

    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if shapes:
        problems.append(
            "shape mismatches: "
            + ", ".join(
                f"{k} checkpoint {tuple(ck.state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                for k in shapes[:8]
            )
            + (f", … ({len(shapes)} in all)" if len(shapes) > 8 else "")
        )
    if problems:
        raise CheckpointError(
            f"{where}: does not fit the {arch!r} model "
            f"{mine.get('name', '')!r}: " + " | ".join(problems)
        )
    model.load_state_dict(ck.state_dict, strict=True)
    try:
        model.checkpoint_sha256 = ck.sha256
    except AttributeError:  # pragma: no cover - exotic modules
        pass
    return ck


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint describes (via the registry) and load its weights.

    The model is on ``device``, in eval mode, with ``model_name`` and ``checkpoint_sha256``.
    """
    ck = read_checkpoint(path)
    try:
        model = get_family(ck.architecture).build(ck.config)
    except KeyError:
        raise CheckpointError(f"{ck.json_path}: unknown architecture {ck.architecture!r}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{ck.json_path}: invalid {ck.architecture!r} config: {exc}"
        ) from None
    load_state_into(model, ck)
    model.model_name = ck.model_name
    model.checkpoint_sha256 = ck.sha256
    return model.to(device).eval()


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
    model_name: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` then ``<name>.json``, each atomically (:mod:`..io.atomic`).

    Parameters
    ----------
    model : nn.Module
        Has ``architecture`` and ``config.to_dict()``.
    path : str or Path
        ``<name>``, ``<name>.safetensors`` or ``<name>.json``.
    notes : str
        Free text stored in the provenance.
    extra : mapping, optional
        JSON-ready extra provenance (e.g. training epochs, metrics).
    model_name : str, optional
        Name recorded for the model (default: ``model.model_name`` or the config's name).

    Returns
    -------
    (Path, Path)
        The weights and JSON paths. sha256 of the weights is recorded in the JSON and set as
        ``model.checkpoint_sha256``.
    """
    from safetensors.torch import save_file

    from .. import __version__

    arch = _architecture(model)
    config = _config_dict(model)
    chash = config_hash_of(config)
    weights, meta_path = checkpoint_paths(path)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    # the weights first, then the JSON that names their digest: a crash in between leaves the
    # new weights beside the old JSON, whose sha256 no longer matches (reported on loading)
    with atomic_path(weights) as tmp_weights:
        save_file(
            state,
            str(tmp_weights),
            metadata={"format": FORMAT, "architecture": arch, "config_hash": chash},
        )
    digest = sha256_of(weights)
    name = model_name or getattr(model, "model_name", None) or config.get("name") or weights.stem
    meta = {
        "format": FORMAT,
        "architecture": arch,
        "model_name": str(name),
        "config": config,
        "config_hash": chash,
        "weights_file": weights.name,
        "weights_sha256": digest,
        "provenance": {
            "package": "napari-magnet",
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "notes": str(notes),
            **dict(extra or {}),
        },
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    try:
        model.checkpoint_sha256 = digest
    except AttributeError:  # pragma: no cover
        pass
    return weights, meta_path
