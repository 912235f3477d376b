"""The records a Magnify run streams (DESIGN §6).

Plain dataclasses holding numpy arrays in level-0 pixel coordinates (x, y), so the UI, the CLI
and the exporters consume them without knowing which model produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MagnifyStep:
    """The regions one magnifying layer looked at.

    Attributes
    ----------
    layer : int
        1-based index of the magnifying layer.
    region_ids : list of str
        Lineage names, e.g. ``"1.3.2"`` (patch 2 of region 1.3's input).
    parent_ids : list of str
        Lineage name of the region each region was cut from; ``""`` for layer 1's.
    boxes : np.ndarray
        ``(N, 4)`` float boxes ``(x0, y0, x1, y1)`` in level-0 pixels.
    levels : np.ndarray
        ``(N,)`` int, the pyramid level each region's pixels were read from.
    attention_maps : list of np.ndarray
        One 2-D float map per input image of the layer.
    attention_boxes : np.ndarray
        ``(M, 4)`` level-0 box each attention map covers.
    attention_mass : np.ndarray
        ``(N,)`` attention mass behind each region (model-defined, in [0, 1]).
    scales : np.ndarray
        ``(N,)`` zoom of each region relative to its parent (the spatial transformer's s);
        1 for a frozen patch.
    aux_probability : float or None
        Slide-level probability of an auxiliary head fed by this layer's regions, when the
        model has one.
    patches : np.ndarray or None
        Optional ``(N, H, W, 3)`` uint8 images of the regions as the model saw them.
    """

    layer: int
    region_ids: list[str]
    parent_ids: list[str]
    boxes: np.ndarray
    levels: np.ndarray
    attention_maps: list[np.ndarray]
    attention_boxes: np.ndarray
    attention_mass: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0))
    aux_probability: float | None = None
    patches: np.ndarray | None = None


@dataclass
class MagnifyResult:
    """The slide-level outcome of a Magnify run (the last item of the stream)."""

    probability: float
    label: int
    pixels_processed: int
    pixels_read: int
    seconds: float
    model_name: str
    checkpoint_sha256: str
    config_hash: str = ""

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict of the fields."""
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class MagnifyOptions:
    """How a family's run behaves (what :func:`~napari_magnet.engine.magnify.magnify` was
    asked besides the slide, the model and the start region).

    Attributes
    ----------
    keep_patches : bool
        Attach the images each step's regions were rendered as to the steps.
    seed : int
        Seed of families that sample; a fixed seed makes runs repeatable.
    n_patches : int or None
        Override of the patches drawn, for families with ``adjustable_patches``.
    aux_heads : bool
        Compute per-layer auxiliary predictions where a family has them.
    """

    keep_patches: bool = False
    seed: int = 0
    n_patches: int | None = None
    aux_heads: bool = True
