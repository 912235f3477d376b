"""Where a slide's autosave goes: the sidecar, or the data dir when the folder is read-only."""

from __future__ import annotations

import os

from napari_magnet.io.autosave_paths import (
    DATA_DIR_ENV,
    data_dir,
    fallback_path,
    folder_writable,
    save_path,
    saved_path,
    sidecar_path,
)


def test_sidecar_and_fallback_names(tmp_path, monkeypatch):
    slide = tmp_path / "CMU-1.svs"
    assert sidecar_path(slide) == tmp_path / "CMU-1.svs.annotations.geojson"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    assert data_dir() == tmp_path / "data" and data_dir(tmp_path) == tmp_path
    fallback = fallback_path(slide)
    assert fallback.parent == tmp_path / "data" / "annotations"
    assert fallback.name.endswith("-CMU-1.svs.annotations.geojson")
    assert fallback_path(tmp_path / "other" / "CMU-1.svs") != fallback  # keyed by the path


def test_read_only_folder_falls_back_and_newest_file_wins(tmp_path):
    slide = tmp_path / "slides" / "s.tif"
    slide.parent.mkdir()
    assert saved_path(slide, tmp_path / "data") is None
    assert save_path(slide, tmp_path / "data") == sidecar_path(slide)
    os.chmod(slide.parent, 0o555)  # the bits forbid writing (respected even as root)
    try:
        assert not folder_writable(slide.parent)
        target = save_path(slide, tmp_path / "data")
        assert target == fallback_path(slide, tmp_path / "data")
    finally:
        os.chmod(slide.parent, 0o755)
    sidecar_path(slide).write_text("{}")
    target.parent.mkdir(parents=True)
    target.write_text("{}")
    os.utime(sidecar_path(slide), ns=(1, 1))
    assert saved_path(slide, tmp_path / "data") == target
    assert not folder_writable(tmp_path / "missing")
