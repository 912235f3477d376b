"""Replaying a model's fixed-shape stages as CUDA graphs.

A MagNet layer is hundreds of small kernels (grouped branch convolutions, BatchNorm, entmax,
sampling); at batch 1 on a GPU their launch cost, not their arithmetic, decides the run time.
Every stage of a Magnify has fixed shapes for a given model, so each is captured once per
model and device, then replayed with new inputs copied into its static buffers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence

import torch


class CudaGraphCache:
    """Captured graphs keyed by stage; any stage that cannot be captured runs eagerly."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple] = {}
        self._eager: set[Hashable] = set()

    def run(
        self, key: Hashable, fn: Callable[..., Sequence[torch.Tensor]], *inputs: torch.Tensor
    ) -> Sequence[torch.Tensor]:
        """``fn(*inputs)``, replayed from a graph captured on the first call.

        The returned tensors are the graph's static outputs: valid until the same stage runs
        again, so copy what must outlive that.
        """
        key = (key,) + tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key in self._eager:
            return fn(*inputs)
        entry = self._entries.get(key)
        if entry is None:
            try:
                entry = self._capture(fn, inputs)
            except Exception as error:  # noqa: BLE001 - any capture failure: stay eager
                warnings.warn(
                    f"CUDA graph capture failed for {key[0]!r}, running eagerly: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._eager.add(key)
                return fn(*inputs)
            self._entries[key] = entry
        static_inputs, static_outputs, graph = entry
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_outputs

    @staticmethod
    def _capture(fn, inputs):
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuDNN picks algorithms, allocator settles
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_outputs = tuple(fn(*static_inputs))
        return static_inputs, static_outputs, graph


def graph_cache_for(model: torch.nn.Module, device: torch.device) -> CudaGraphCache | None:
    """The model's graph cache on ``device`` (created on first use); None off CUDA."""
    if device.type != "cuda":
        return None
    caches = model.__dict__.setdefault("_napari_magnet_cuda_graphs", {})
    return caches.setdefault(str(device), CudaGraphCache())
