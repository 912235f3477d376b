"""``napari-magnet demo`` runs end to end headless and leaves a screenshot."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image


def test_headless_demo_saves_a_screenshot_of_the_run(tmp_path):
    env = dict(os.environ, NAPARI_MAGNET_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "demo-output"
    result = subprocess.run(
        [sys.executable, "-m", "napari_magnet.cli", "demo", "--headless", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shot = out / "demo.png"
    assert f"Screenshot saved to {shot}" in result.stdout
    assert "p = " in result.stdout  # the run finished and reported its probability
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[0] >= 600 and image.std() > 10
    assert (tmp_path / "cache" / "samples").is_dir()
