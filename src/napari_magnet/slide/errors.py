"""The one error type for slides that cannot be opened or decoded."""

from __future__ import annotations

from pathlib import Path


class SlideError(RuntimeError):
    """A slide could not be opened or its pixels could not be decoded.

    Parameters
    ----------
    path : str or Path
        The file (or folder) the user asked for.
    reason : str
        What went wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")
