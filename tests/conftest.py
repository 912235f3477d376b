"""Shared fixtures: the real whole-slide files in ../shared/testdata/wsi."""

from __future__ import annotations

from pathlib import Path

import pytest

WSI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "wsi"


def wsi(name: str) -> Path:
    """Path of a real test slide; skips when the shared test data is not beside the repo."""
    path = WSI_DIR / name
    if not path.exists():
        pytest.skip(f"shared test data missing: {path}")
    return path


@pytest.fixture
def cmu_path() -> Path:
    return wsi("CMU-1-Small-Region.svs")


@pytest.fixture
def ndpi_path() -> Path:
    return wsi("hamamatsu_fluorescence_DAPI.ndpi")


@pytest.fixture
def boxes_path() -> Path:
    return wsi("boxes.tiff")
