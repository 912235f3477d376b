"""The slide side of :meth:`AttentionSampling.forward`: its reader callbacks (DESIGN §5, §6).

:class:`SlideReads` turns the forward's view-normalised centres into level-0 frames and reads
them, for ``B`` slides at once, each through its own :class:`~napari_magnet.engine.regions.
RegionReader`. A Magnify run uses it with one slide and no augmentation; a training step with
the slides of a :class:`~napari_magnet.engine.batches.SlideBatch` and their
:class:`~napari_magnet.models.augment.Dihedral` ops. Under an op the view (and so every
attention map) is the augmented image: a centre is mapped back to the slide's own orientation
before its frame is computed, and every region, patch and visibility mask is transformed with
the op, so the networks see what the augmented slide shows there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...engine.frames import patch_frames, visible_mask

__all__ = ["SlideReads"]


class SlideReads:
    """Reader callbacks over ``B`` slides: ``read_regions``, ``read_patches`` and ``visible``.

    Parameters
    ----------
    config : ATSConfig
        The model's configuration (sizes and level-0 sides of regions and patches).
    readers : sequence of RegionReader
        One per slide.
    frames : np.ndarray
        ``(B, 4)`` level-0 square frames the view shows.
    visible : np.ndarray
        ``(B, 4)`` level-0 boxes of each slide's visible area (outside: black padding).
    device : torch.device
        Where reads are resampled and returned.
    ops : sequence of Dihedral, optional
        Each slide's augmentation (the view was transformed with it); ``None``: none.
    run : callable, optional
        ``run(per_slide) -> Tensor`` calls ``per_slide(b)`` for every slide and concatenates
        the results batch-major (e.g. :meth:`SlideBatch.read`, in parallel); default in turn.
    keep : bool
        Keep each read's :class:`~napari_magnet.engine.regions.RegionBatch` per slide in
        :attr:`batches` (Magnify reports their levels and pixels).

    Attributes
    ----------
    region_frames, patch_frames : list of np.ndarray or None
        Per slide, the level-0 frames of the last regions (``(N1, 4)``) and patches
        (``(n, 4)``; two-level ``(N1 * N2, 4)``, region-major) read, in the slide's own
        orientation.
    batches : dict
        With ``keep``: ``"regions"`` / ``"patches"`` → per-slide list of the last reads.
    """

    def __init__(
        self,
        config: Any,
        readers: Sequence[Any],
        frames: np.ndarray,
        visible: np.ndarray,
        device: torch.device,
        ops: Sequence[Any] | None = None,
        run: Callable[[Callable[[int], torch.Tensor]], torch.Tensor] | None = None,
        keep: bool = False,
    ) -> None:
        self.config = config
        self.readers = list(readers)
        self.frames = np.asarray(frames, dtype=np.float64).reshape(-1, 4)
        self.visible = np.asarray(visible, dtype=np.float64).reshape(-1, 4)
        if not len(self.readers) == len(self.frames) == len(self.visible):
            raise ValueError(
                f"{len(self.readers)} readers for {len(self.frames)} frames and "
                f"{len(self.visible)} visible boxes"
            )
        self.device = torch.device(device)
        self.ops = list(ops) if ops else None
        self.run = run or (lambda per_slide: torch.cat([per_slide(b) for b in range(len(self))]))
        self.keep = keep
        self.region_frames: list[np.ndarray] | None = None
        self.patch_frames: list[np.ndarray] | None = None
        self.batches: dict[str, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.readers)

    def _op(self, b: int):
        return self.ops[b] if self.ops else None

    def child_frames(
        self, parents: list[np.ndarray], centres: torch.Tensor, side: float
    ) -> list[np.ndarray]:
        """Level-0 frames of ``side`` around ``centres``, for every slide.

        Parameters
        ----------
        parents : list of np.ndarray
            Per slide, the ``(n_parents, 4)`` level-0 frames the centres are normalised to.
        centres : Tensor
            ``(B, n_parents, k, 2)`` normalised ``(x, y)`` in each (augmented) parent frame.
        side : float
            Level-0 side of the new frames.

        Returns
        -------
        list of np.ndarray
            Per slide ``(n_parents * k, 4)``, parent-major, in the slide's own orientation.
        """
        c = centres.detach().float().cpu()
        out = []
        for b in range(len(self)):
            op = self._op(b)
            frames = []
            for i, parent in enumerate(parents[b]):
                pts = c[b, i]
                if op is not None:  # augmented coordinates → the slide's own
                    pts = (op.matrix() @ (pts * 2 - 1).T).T.add(1).div(2)
                frames.append(patch_frames(parent, pts.numpy().astype(np.float64), side))
            out.append(np.concatenate(frames))
        return out

    def read(self, frames: list[np.ndarray], size: int, what: str = "") -> torch.Tensor:
        """Read every slide's ``frames`` at ``size``, each transformed with its slide's op.

        Returns
        -------
        Tensor
            ``(Σ_b len(frames[b]), 3, size, size)`` float in ``[0, 1]``, batch-major.
        """
        kept: list[Any] = [None] * len(self)

        def one(b: int) -> torch.Tensor:
            op = self._op(b)
            visible = np.repeat(self.visible[b : b + 1], len(frames[b]), axis=0)
            batch = self.readers[b].read(frames[b], size, visible, device=self.device)
            if self.keep:
                kept[b] = batch
            return op.apply(batch.pixels) if op is not None else batch.pixels

        pixels = self.run(one)
        if self.keep:
            self.batches[what] = kept
        return pixels.to(self.device, non_blocking=True).float().div_(255.0)

    def _slides(self) -> list[np.ndarray]:
        return [self.frames[b : b + 1] for b in range(len(self))]

    def read_regions(self, centres: torch.Tensor) -> torch.Tensor:
        """The forward's ``read_regions``: regions around the view's draws.

        Parameters
        ----------
        centres : Tensor
            ``(B, N1, 2)`` view-normalised ``(x, y)``.

        Returns
        -------
        Tensor
            ``(B * N1, 3, R, R)`` float in ``[0, 1]``; their frames go to :attr:`region_frames`.
        """
        cfg = self.config
        self.region_frames = self.child_frames(self._slides(), centres[:, None], cfg.region_side)
        return self.read(self.region_frames, cfg.region_size, "regions")

    def read_patches(
        self, centres: torch.Tensor, patch_centres: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward's ``read_patches``: patches around the draws.

        Parameters
        ----------
        centres : Tensor
            ``(B, n, 2)`` view-normalised ``(x, y)`` (two-level: the regions', unused).
        patch_centres : Tensor, optional
            Two-level: ``(B * N1, N2, 2)`` normalised to the regions last read by
            :meth:`read_regions`.

        Returns
        -------
        Tensor
            ``(B * n, 3, P, P)`` (two-level ``(B * N1 * N2, 3, P, P)``, region-major) float in
            ``[0, 1]``; their frames go to :attr:`patch_frames`.
        """
        cfg = self.config
        if patch_centres is None:
            parents, pts = self._slides(), centres[:, None]
        else:
            if self.region_frames is None:
                raise ValueError("read_regions must come before two-level read_patches")
            parents = self.region_frames
            pts = patch_centres.reshape(len(self), -1, *patch_centres.shape[1:])
        self.patch_frames = self.child_frames(parents, pts, cfg.patch_side)
        return self.read(self.patch_frames, cfg.patch_size, "patches")

    def visible_mask(self, attention: torch.Tensor, level: int) -> torch.Tensor:
        """The forward's ``visible``: 1 where a map's position shows the slide, else 0.

        Parameters
        ----------
        attention : Tensor
            Level 1: the view's maps ``(B, h', w')``; level 2: the regions' ``(B * N1, R', R')``
            (over :attr:`region_frames`).
        level : int
            1 or 2.

        Returns
        -------
        Tensor
            float32 mask of ``attention``'s shape, transformed with each slide's op. A map that
            shows nothing of the slide gets all ones.
        """
        parents = self._slides() if level == 1 else self.region_frames
        if parents is None:
            raise ValueError("read_regions must come before the regions' visible mask")
        h, w = attention.shape[-2:]
        masks = []
        for b in range(len(self)):
            op = self._op(b)
            for frame in parents[b]:
                inside = visible_mask(frame, self.visible[b], (h, w))
                if not inside.any():
                    inside = np.ones_like(inside)
                mask = torch.from_numpy(inside).to(attention.device, torch.float32)[None]
                masks.append(op.apply(mask) if op is not None else mask)
        return torch.cat(masks)
