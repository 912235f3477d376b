"""Flip/rotation augmentation shared by every family's training (DESIGN §4 Training).

One element of the dihedral group of the square per slide and epoch; reads deeper in the
pyramid are mapped back through the same op (:meth:`Dihedral.to_original`), so every zoom
reads the level-0 region the augmented slide shows there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Dihedral", "augment"]

_A_FLIP = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
_A_ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]])


@dataclass(frozen=True)
class Dihedral:
    """One of the 8 symmetries of the square: optional horizontal flip, then ``k`` quarter turns.

    ``apply`` acts on the last two dims (``torch.flip(x, [-1])`` then
    ``torch.rot90(x, k, (-2, -1))``); vertical flips are ``flip + k=2``. On normalized
    coordinates (x right, y down; exact for square images under either ``align_corners``):
    ``apply(X)(u) = X(A u)`` with ``A = matrix()``.

    For training with region reads: if layer 1 sees ``apply(I1)``, a θ chain ``M`` computed in
    that augmented frame corresponds to ``A @ M`` in the slide's own frame
    (:meth:`to_original`), which samples exactly ``apply`` of the region read at the square box
    centred at ``A·T`` with half-size ``S``. So ``read_hi`` for an augmented forward can read
    the box of ``to_original(chain)`` and return ``apply(region)``.
    """

    k: int = 0
    flip: bool = False

    @classmethod
    def random(cls, generator: torch.Generator | None = None) -> Dihedral:
        """A uniformly random element (from ``generator``, or torch's global RNG)."""
        i = int(torch.randint(0, 8, (1,), generator=generator).item())
        return cls(k=i % 4, flip=bool(i // 4))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform images ``(…, H, W)`` (square for the coordinate identity to hold)."""
        if self.flip:
            x = torch.flip(x, dims=[-1])
        if self.k % 4:
            x = torch.rot90(x, self.k % 4, dims=(-2, -1))
        return x

    def matrix(self, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The 2×2 ``A`` with ``apply(X)(u) = X(A u)``: ``A = F^flip · R^k``."""
        a = torch.eye(2)
        if self.flip:
            a = a @ _A_FLIP
        for _ in range(self.k % 4):
            a = a @ _A_ROT
        return a.to(device=device, dtype=dtype)

    def to_original(self, chain: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 2, 3)`` chains from the augmented frame to the original: ``A @ chain``."""
        return self.matrix(device=chain.device, dtype=chain.dtype) @ chain


def augment(
    *tensors: torch.Tensor, op: Dihedral | None = None, generator: torch.Generator | None = None
) -> tuple[tuple[torch.Tensor, ...], Dihedral]:
    """Apply one random flip/rotation consistently to every tensor (last two dims).

    Returns the transformed tensors and the :class:`Dihedral` used (pass ``op`` to reuse one).
    """
    op = Dihedral.random(generator) if op is None else op
    return tuple(op.apply(t) for t in tensors), op
