"""The npe2 manifest is valid and reaches the installed package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from npe2 import PluginManifest


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(npe2), "validate", "napari-magnet"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_manifest_contributes_reader_for_every_openslide_suffix():
    manifest = PluginManifest.from_distribution("napari-magnet")
    patterns = {p for reader in manifest.contributions.readers for p in reader.filename_patterns}
    for suffix in (
        "svs",
        "tif",
        "tiff",
        "ndpi",
        "vms",
        "vmu",
        "scn",
        "mrxs",
        "svslide",
        "bif",
        "dcm",
    ):
        assert f"*.{suffix}" in patterns
    assert any(reader.accepts_directories for reader in manifest.contributions.readers)
