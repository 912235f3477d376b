"""Reading regions of a slide for models (DESIGN §4 "Pyramid level per region").

A region is a square *frame* in level-0 pixels plus the *visible* box inside it (the part of
the frame that belongs to the region; the rest is black padding). Layer 1's frame is the
square around the whole slide, so the slide is resized by its longer side and black-padded
symmetrically; a child region's frame is its parent's frame mapped through θ and its visible
box is that frame clipped to the parent's visible box.

Each region is read from the pyramid level the rule picks, on a thread pool (decoders release
the GIL), then resampled onto the output grid with torchvision's ``roi_align`` (exact box
geometry, area-averaging when downscaling). A region that falls on whole pixels of the level
(after an integer area-average) is cropped instead: the same values, without resampling; one
within a pixel of drift of whole pixels takes the nearest ones (see :func:`_source_pixels`).
On CUDA, levels stored as JPEG tiles are decoded on the GPU (:mod:`.tile_decode`).
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..slide import Slide
from .tile_decode import DeviceTileDecoder, device_decoding_available


@dataclass
class RegionBatch:
    """Regions rendered for a model.

    Attributes
    ----------
    pixels : torch.Tensor
        ``(N, 3, size, size)`` uint8 on the reader's device; black outside each region's
        visible box.
    levels : np.ndarray
        ``(N,)`` pyramid level each region was read from.
    pixels_read : int
        RGB values read from the pyramid for this batch (windows × 3).
    """

    pixels: torch.Tensor
    levels: np.ndarray
    pixels_read: int

    @property
    def images(self) -> np.ndarray:
        """``(N, size, size, 3)`` uint8 numpy copy (channels last)."""
        return self.pixels.permute(0, 2, 3, 1).cpu().numpy()

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(N, 3, size, size)`` float32 in [0, 1] on ``device`` (default: where it is)."""
        tensor = self.pixels if device is None else self.pixels.to(device)
        return tensor.float().div_(255.0)


class RegionReader:
    """Renders level-0 regions at a model's input size from the right pyramid level.

    Parameters
    ----------
    slide : Slide
        The slide to read.
    rule : {"enough", "paper"}
        Level rule (see :meth:`SlideGeometry.choose_level`).
    workers : int, optional
        Threads reading regions in parallel (default: CPU count, at most 8).
    device : torch.device or str
        Where regions are resampled and returned; on a GPU only the decoded window crosses
        the bus, once.
    decode : {"auto", "host", "device"}
        Where JPEG tiles are decoded: ``"host"`` on the CPU threads (through the slide's
        chunk cache), ``"device"`` by torchvision on the device the regions go to (levels
        stored as JPEG tiles only, see :mod:`.tile_decode`), ``"auto"`` on the device when
        it is a GPU.
    """

    def __init__(
        self,
        slide: Slide,
        rule: str = "enough",
        workers: int | None = None,
        device: torch.device | str = "cpu",
        decode: str = "auto",
    ) -> None:
        if decode not in ("auto", "host", "device"):
            raise ValueError(f"decode must be 'auto', 'host' or 'device', got {decode!r}")
        self.slide = slide
        self.device = torch.device(device)
        self.rule = rule
        self.decode = decode
        self._decoders: dict[torch.device, DeviceTileDecoder] = {}
        slide.geometry.choose_level(1, 1, 1, rule=rule)  # validates the rule name
        self.workers = workers or min(os.cpu_count() or 1, 8)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="napari-magnet-read")
        self.pixels_read = 0

    def close(self) -> None:
        """Stop the reading threads and drop the tiles decoded on the device."""
        self._pool.shutdown(wait=True)
        self._decoders.clear()

    def _decodes_on(self, device: torch.device) -> bool:
        if self.decode == "auto":
            return device_decoding_available(device)
        return self.decode == "device"

    def _decoder(self, device: torch.device) -> DeviceTileDecoder:
        if device not in self._decoders:
            self._decoders[device] = DeviceTileDecoder(self.slide, device)
        return self._decoders[device]

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(
        self,
        frames: np.ndarray,
        size: int,
        visible: np.ndarray | None = None,
        device: torch.device | str | None = None,
    ) -> RegionBatch:
        """Render each frame at ``size`` × ``size``.

        Parameters
        ----------
        frames : np.ndarray
            ``(N, 4)`` square frames ``(x0, y0, x1, y1)`` in level-0 pixels.
        size : int
            Output side.
        visible : np.ndarray, optional
            ``(N, 4)`` visible boxes; pixels whose centre falls outside are black. Defaults to
            the frames themselves (clipped to the slide).
        device : torch.device or str, optional
            Where to resample and return the regions for this call (default: the reader's).
        """
        device = self.device if device is None else torch.device(device)
        frames = np.asarray(frames, dtype=np.float64).reshape(-1, 4)
        if size < 1:
            raise ValueError(f"output size must be positive, got {size}")
        if visible is None:
            visible = frames
        visible = np.asarray(visible, dtype=np.float64).reshape(-1, 4)
        plans = [self._plan(frames[i], visible[i], size) for i in range(len(frames))]
        windows: list = [None] * len(plans)
        if self._decodes_on(device):
            requests = [
                (p.level, *p.window) if p is not None and not p.empty else None for p in plans
            ]
            try:
                windows = self._decoder(device).windows(requests)
            except RuntimeError as error:  # torchvision's decoder refused a tile
                warnings.warn(
                    f"decoding JPEG tiles on {device} failed ({error}); this reader decodes "
                    "on the CPU from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.decode = "host"
                self._decoders.clear()
        results = list(
            self._pool.map(
                lambda i: self._render(plans[i], windows[i], size, device), range(len(plans))
            )
        )
        if results:
            images = torch.stack([r[0] for r in results])
        else:
            images = torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device)
        levels = np.array([r[1] for r in results], dtype=np.int64)
        pixels = int(sum(r[2] for r in results))
        self.pixels_read += pixels
        return RegionBatch(images, levels, pixels)

    def _plan(self, frame: np.ndarray, visible: np.ndarray, size: int) -> _Plan | None:
        """Where a frame's visible output pixels come from, or None when it has none."""
        slide = self.slide
        geometry = slide.geometry
        fw, fh = frame[2] - frame[0], frame[3] - frame[1]
        if fw <= 0 or fh <= 0:
            return None
        level = geometry.choose_level(fw, fh, size, rule=self.rule)
        width0, height0 = slide.dimensions
        vx0, vy0 = max(visible[0], 0.0), max(visible[1], 0.0)
        vx1, vy1 = min(visible[2], float(width0)), min(visible[3], float(height0))
        # Output pixels whose centres fall inside the visible box.
        step_x, step_y = fw / size, fh / size
        i0 = max(math.ceil((vx0 - frame[0]) / step_x - 0.5), 0)
        i1 = min(math.floor((vx1 - frame[0]) / step_x - 0.5) + 1, size)
        j0 = max(math.ceil((vy0 - frame[1]) / step_y - 0.5), 0)
        j1 = min(math.floor((vy1 - frame[1]) / step_y - 0.5) + 1, size)
        if i1 <= i0 or j1 <= j0:
            return _Plan(level, (0, 0, 0, 0), (0, 0, 0, 0), (0.0, 0.0, 0.0, 0.0))
        # Level-0 extent of those output pixels, then the level window that covers it.
        bx0, bx1 = frame[0] + i0 * step_x, frame[0] + i1 * step_x
        by0, by1 = frame[1] + j0 * step_y, frame[1] + j1 * step_y
        scale_x, scale_y = geometry.level_scale(level)
        lw, lh = slide.level_dimensions[level]
        wx0 = min(max(math.floor(bx0 / scale_x), 0), lw - 1)
        wy0 = min(max(math.floor(by0 / scale_y), 0), lh - 1)
        wx1 = max(min(math.ceil(bx1 / scale_x), lw), wx0 + 1)
        wy1 = max(min(math.ceil(by1 / scale_y), lh), wy0 + 1)
        box = (bx0 / scale_x - wx0, by0 / scale_y - wy0, bx1 / scale_x - wx0, by1 / scale_y - wy0)
        return _Plan(level, (i0, j0, i1, j1), (wx0, wy0, wx1 - wx0, wy1 - wy0), box)

    def _render(
        self, plan: _Plan | None, window, size: int, device: torch.device
    ) -> tuple[torch.Tensor, int, int]:
        """One region from its plan and its window: ``(H, W, 3)`` numpy, ``(3, H, W)``
        tensor on ``device``, or None to read it on the host here."""
        out = torch.zeros((3, size, size), dtype=torch.uint8, device=device)
        if plan is None:
            return out, 0, 0
        level, (i0, j0, i1, j1) = plan.level, plan.pixels
        if plan.empty:
            return out, level, 0
        if window is None:
            window = self.slide.read_level(level, *plan.window)
        if isinstance(window, np.ndarray):
            wh, ww = window.shape[:2]
        else:
            wh, ww = window.shape[1:]
        box = plan.box
        # Area-average by the integer part of the downscale first: roi_align then needs at
        # most 2 x 2 samples per output pixel instead of thousands on single-level slides.
        factor = max(int(min((box[2] - box[0]) / (i1 - i0), (box[3] - box[1]) / (j1 - j0))), 1)
        corners = tuple(c / factor for c in box)
        limits = (math.ceil(ww / factor), math.ceil(wh / factor))
        pick = _source_pixels(corners, i1 - i0, j1 - j0, limits)
        read = ww * wh * 3
        with torch.inference_mode():
            if isinstance(window, np.ndarray):
                if pick is not None and factor == 1:  # the window's own pixels: no arithmetic
                    crop = torch.from_numpy(np.ascontiguousarray(_take(window, pick, 0)))
                    out[:, j0:j1, i0:i1] = crop.to(device, non_blocking=True).permute(2, 0, 1)
                    return out, level, read
                if not window.flags.writeable:  # a cached chunk: torch wants a writable buffer
                    window = window.copy()
                window = torch.from_numpy(window).to(device, non_blocking=True).permute(2, 0, 1)
            elif pick is not None and factor == 1:
                out[:, j0:j1, i0:i1] = _take(window, pick, 1)
                return out, level, read
            source = window[None].float().contiguous()
            if factor > 1:
                source = F.avg_pool2d(source, factor, ceil_mode=True)
            if pick is not None:  # the pooled pixels are the output's
                crop = _take(source[0], pick, 1)
                out[:, j0:j1, i0:i1] = crop.round_().clamp_(0, 255).to(torch.uint8)
                return out, level, read
            roi = torch.tensor([[0.0, *corners]], dtype=torch.float32)
            ratio = max(
                (corners[2] - corners[0]) / (i1 - i0), (corners[3] - corners[1]) / (j1 - j0)
            )
            resampled = roi_align(
                source,
                roi.to(device),
                output_size=(j1 - j0, i1 - i0),
                spatial_scale=1.0,
                sampling_ratio=_samples_per_side(ratio),
                aligned=True,
            )
            out[:, j0:j1, i0:i1] = resampled[0].round_().clamp_(0, 255).to(torch.uint8)
        return out, level, read


@dataclass(frozen=True)
class _Plan:
    """A region's source: its level, the output pixels it fills ``(i0, j0, i1, j1)``, the
    level window ``(x, y, w, h)`` read, and their box in window pixels (fractional)."""

    level: int
    pixels: tuple[int, int, int, int]
    window: tuple[int, int, int, int]
    box: tuple[float, float, float, float]

    @property
    def empty(self) -> bool:
        """Whether no output pixel of the region is visible (nothing to read)."""
        return self.pixels[2] <= self.pixels[0]


#: Source pixels a region may drift by across its width and still be read as the source's own
#: pixels (nearest sampling) rather than resampled.
MAX_DRIFT = 1.0


def _nearest(start: float, stop: float, n: int, limit: int) -> slice | np.ndarray | None:
    """Source pixels under ``n`` output pixels spanning ``[start, stop)``, or None when the
    span drifts from ``n`` source pixels by more than :data:`MAX_DRIFT` or leaves the source."""
    if abs((stop - start) - n) > MAX_DRIFT + 1e-9:
        return None
    ratio = (stop - start) / n
    idx = np.floor(start + (np.arange(n) + 0.5) * ratio + 1e-9).astype(np.int64)
    if idx[0] < 0 or idx[-1] >= limit:
        return None
    if idx[-1] - idx[0] == n - 1:  # consecutive: a crop
        return slice(int(idx[0]), int(idx[0]) + n)
    return idx


def _source_pixels(
    corners: tuple[float, float, float, float],
    width: int,
    height: int,
    limits: tuple[int, int],
) -> tuple | None:
    """``(columns, rows)`` of a source of ``limits`` (width, height) pixels that give a box's
    ``width`` × ``height`` output pixels, when the box is within :data:`MAX_DRIFT` of that
    many whole pixels; else None (the box is resampled).

    A box on whole pixels gives a crop: the values ``roi_align`` gives (aligned, adaptive
    sampling takes one sample at each source pixel's centre), without its cost. A box a little
    off (a 224-px patch at 0.5 µm/px of a 0.499 µm/px slide spans 224.45 pixels) takes each
    output pixel's nearest source pixel: a column or row at most is repeated or skipped, as
    when a patch is read at the level's own pixel size and the difference ignored.
    """
    columns = _nearest(corners[0], corners[2], width, limits[0])
    rows = _nearest(corners[1], corners[3], height, limits[1])
    return None if columns is None or rows is None else (columns, rows)


def _take(source, pick: tuple, axis: int):
    """``source``'s pixels at ``pick`` (from :func:`_source_pixels`): rows on ``axis``,
    columns on the next (numpy HWC: 0; torch CHW: 1)."""
    columns, rows = pick
    if isinstance(source, torch.Tensor):
        columns, rows = (
            v if isinstance(v, slice) else torch.from_numpy(v).to(source.device)
            for v in (columns, rows)
        )
    lead = (slice(None),) * axis
    return source[(*lead, rows)][(*lead, slice(None), columns)]


#: Source pixels per output pixel up to which one bilinear sample per output pixel is taken.
NEAR_ONE = 1.02


def _samples_per_side(ratio: float) -> int:
    """``roi_align``'s samples per output pixel and side for a downscale of ``ratio``.

    Its adaptive rule (``ceil(ratio)``) takes 2 × 2 samples as soon as the ratio passes 1, so
    a patch at 0.5 µm/px of a 0.499 µm/px slide is blurred over half a pixel and costs four
    times the samples; up to :data:`NEAR_ONE` one bilinear sample per pixel (as a plain resize
    does) is the sharper and cheaper rendering. Above it the area is averaged as before.
    """
    return 1 if ratio <= NEAR_ONE else math.ceil(ratio)
