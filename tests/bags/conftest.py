"""Synthetic slides shared by the bag tests (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_magnet.synth import SyntheticSlideSpec, generate_slide


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 4096 x 3072 px synthetic slide at 0.5 µm per pixel (levels: downsamples 1 and 4)."""
    path = tmp_path_factory.mktemp("synth") / "synthetic.tif"
    generate_slide(path, SyntheticSlideSpec(width=4096, height=3072, mpp=0.5, seed=3, label=0))
    return path


@pytest.fixture(scope="session")
def synthetic_40x(tmp_path_factory) -> Path:
    """A slide scanned at 0.25 µm per pixel (a 40× scan), 4096 x 3072 px."""
    path = tmp_path_factory.mktemp("synth40") / "synthetic40x.tif"
    generate_slide(path, SyntheticSlideSpec(width=4096, height=3072, mpp=0.25, seed=4, label=0))
    return path
