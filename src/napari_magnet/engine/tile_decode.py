"""Windows of a slide level decoded by torchvision's JPEG decoder, on the model's device.

On CUDA, ``torchvision.io.decode_jpeg`` decodes a batch of JPEG files with nvJPEG: the
compressed tiles cross the bus instead of decoded pixels, and the CPU threads that would
decode them are free to read ahead. :class:`DeviceTileDecoder` gathers the tiles that a batch
of windows touches, decodes the ones it does not hold in one call, keeps the most recent
tiles on the device (neighbouring patches share tiles), and pastes each window together.
Levels without stand-alone JPEG tiles (:meth:`Slide.jpeg_tiles` is None) are not its
business: the caller reads them on the host.

The same code runs on the CPU (libjpeg-turbo inside torchvision), which is how it is tested
here; there it gives OpenSlide's pixels exactly.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ..slide import Slide

__all__ = ["DeviceTileDecoder", "device_decoding_available"]


def device_decoding_available(device: torch.device | str) -> bool:
    """Whether ``decode="auto"`` decodes JPEG tiles on ``device`` (CUDA only: on a CPU the
    host path decodes on several threads and caches, which is as fast)."""
    return torch.device(device).type == "cuda"


class DeviceTileDecoder:
    """Decode a slide's JPEG tiles on ``device`` and assemble windows from them.

    Parameters
    ----------
    slide : Slide
        The open slide.
    device : torch.device or str
        Where tiles are decoded and windows returned.
    max_tiles : int
        Decoded tiles kept on the device (least recently used dropped first).
    """

    def __init__(self, slide: Slide, device: torch.device | str, max_tiles: int = 256) -> None:
        self.slide = slide
        self.device = torch.device(device)
        self.max_tiles = max(1, int(max_tiles))
        self._levels = {}
        self._cache: OrderedDict[tuple[int, int], torch.Tensor | None] = OrderedDict()
        self._background = torch.tensor(slide.background, dtype=torch.uint8).view(3, 1, 1)
        self._background = self._background.to(self.device)
        self.tiles_decoded = 0

    def serves(self, level: int) -> bool:
        """Whether ``level`` is stored as JPEG tiles this decoder can read."""
        if level not in self._levels:
            self._levels[level] = self.slide.jpeg_tiles(level)
        return self._levels[level] is not None

    def windows(
        self, requests: Sequence[tuple[int, int, int, int, int] | None]
    ) -> list[torch.Tensor | None]:
        """``(3, h, w)`` uint8 windows on the device for ``(level, x, y, w, h)`` requests.

        A request that is None, or whose level :meth:`serves` says no to, gives None. Each
        window must lie inside its level. Tiles missing from the file take the slide's
        background colour.
        """
        served = [r is not None and self.serves(r[0]) for r in requests]
        tiles: dict[tuple[int, int], torch.Tensor | None] = {}
        missing: list[tuple[int, int]] = []
        for request, ok in zip(requests, served):
            if not ok:
                continue
            level, x, y, w, h = request
            for index, _, _ in self._levels[level].tiles(x, y, w, h):
                key = (level, index)
                if key in tiles or key in missing:
                    continue
                if key in self._cache:
                    self._cache.move_to_end(key)
                    tiles[key] = self._cache[key]
                else:
                    missing.append(key)
        tiles.update(self._decode(missing))
        out = [self._assemble(r, tiles) if ok else None for r, ok in zip(requests, served)]
        for key in missing:
            self._cache[key] = tiles[key]
        while len(self._cache) > self.max_tiles:
            self._cache.popitem(last=False)
        return out

    def _decode(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor | None]:
        """The tiles ``keys``, decoded in one batch (None for a tile the file lacks)."""
        result: dict[tuple[int, int], torch.Tensor | None] = {}
        streams, found = [], []
        for level, index in keys:
            data = self._levels[level].stream(index)
            if data is None:
                result[(level, index)] = None
            else:
                streams.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                found.append((level, index))
        if streams:
            with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec
                warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
                decoded = decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)
            self.tiles_decoded += len(decoded)
            result.update(zip(found, decoded))
        return result

    def _assemble(
        self,
        request: tuple[int, int, int, int, int],
        tiles: dict[tuple[int, int], torch.Tensor | None],
    ) -> torch.Tensor:
        level, x, y, w, h = request
        source = self._levels[level]
        tw, th = source.tile_width, source.tile_height
        out = torch.empty((3, h, w), dtype=torch.uint8, device=self.device)
        for index, tx, ty in source.tiles(x, y, w, h):
            tile = tiles[(level, index)]
            oy0, ox0 = max(ty * th, y), max(tx * tw, x)
            oy1, ox1 = min((ty + 1) * th, y + h), min((tx + 1) * tw, x + w)
            target = out[:, oy0 - y : oy1 - y, ox0 - x : ox1 - x]
            if tile is None:
                target.copy_(self._background.expand_as(target))
            else:
                target.copy_(tile[:, oy0 - ty * th : oy1 - ty * th, ox0 - tx * tw : ox1 - tx * tw])
        return out
