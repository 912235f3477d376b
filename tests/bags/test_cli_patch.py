"""``napari-magnet patch SLIDES... --out DIR`` on generated and real slides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from napari_magnet.bags import PatchOptions, TissueOptions, read_bag, validate_bag
from napari_magnet.cli import main

from ..conftest import wsi

ARGS = ["--mpp", "8,4,1", "--patch-size", "32", "--quiet"]


def _patch(slide, out, *extra: str, quiet: bool = True) -> int:
    args = ["patch", str(slide), "--out", str(out), *ARGS, *extra]
    return main(args if quiet else [a for a in args if a != "--quiet"])


def _config(**tissue):
    return PatchOptions((8, 4, 1), 32, TissueOptions(**tissue)).config()


def test_patch_writes_one_bag_per_slide_and_reports_failures(
    synthetic_slide, cmu_path, tmp_path, capsys
):
    out = tmp_path / "bags"
    broken = wsi("broken.svs")
    rc = main(["patch", str(synthetic_slide), str(broken), str(cmu_path), "--out", str(out), *ARGS])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.svs" in captured.err and "not a slide" in captured.err
    assert "2 written, 0 skipped, 1 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["CMU-1-Small-Region.h5", "synthetic.h5"]
    for name in ("synthetic.h5", "CMU-1-Small-Region.h5"):
        assert validate_bag(out / name, _config()) == []
    bag = read_bag(out / "CMU-1-Small-Region.h5")
    assert bag.mpps == (8.0, 4.0, 1.0) and bag.slide_mpp == (0.499, 0.499)


def test_rerun_skips_valid_outputs_and_redoes_the_rest(synthetic_slide, tmp_path, capsys):
    out = tmp_path / "bags"
    assert _patch(synthetic_slide, out) == 0
    target = out / "synthetic.h5"
    stamp = target.stat().st_mtime_ns
    capsys.readouterr()
    assert _patch(synthetic_slide, out, quiet=False) == 0
    assert "skipped" in capsys.readouterr().out
    assert target.stat().st_mtime_ns == stamp
    # other settings: rewritten
    assert _patch(synthetic_slide, out, "--tissue-threshold", "0.5") == 0
    assert validate_bag(target, _config(min_fraction=0.5)) == []
    # a damaged file: rewritten
    target.write_bytes(target.read_bytes()[:2000])
    assert _patch(synthetic_slide, out) == 0
    assert validate_bag(target, _config()) == []
    assert sorted(p.name for p in out.iterdir()) == ["synthetic.h5"]  # no temporary files


def test_tissue_options_reach_the_bag(synthetic_slide, tmp_path):
    counts = []
    for threshold in ("0", "0.9"):
        out = tmp_path / threshold
        assert _patch(synthetic_slide, out, "--tissue-threshold", threshold, "--white", "200") == 0
        bag = read_bag(out / "synthetic.h5")
        assert '"white": 200' in bag.attrs["config"]
        counts.append(len(bag.levels[0]))
    assert counts[0] > counts[1] > 0


def test_bad_options_are_clear_errors(synthetic_slide, tmp_path, capsys):
    assert main(["patch", str(synthetic_slide), "--out", str(tmp_path), "--mpp", "8,3"]) == 2
    assert "divided by an integer" in capsys.readouterr().err
    assert main(["patch", str(synthetic_slide), "--out", str(tmp_path), "--white", "400"]) == 2
    assert "white" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_same_stem_twice_is_reported(synthetic_slide, tmp_path, capsys):
    twin = tmp_path / "elsewhere" / synthetic_slide.name
    twin.parent.mkdir()
    twin.write_bytes(synthetic_slide.read_bytes())
    out = tmp_path / "bags"
    rc = main(["patch", str(synthetic_slide), str(twin), "--out", str(out), *ARGS])
    assert rc == 1
    assert "also writes synthetic.h5" in capsys.readouterr().err


def test_the_installed_command(cmu_path, tmp_path):
    exe = Path(sys.executable).with_name("napari-magnet")
    result = subprocess.run(
        [str(exe), "patch", str(cmu_path), "--out", str(tmp_path), "--mpp", "4,2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1 written" in result.stdout
    bag = read_bag(tmp_path / "CMU-1-Small-Region.h5")
    assert [lv.patch_size for lv in bag.levels] == [224, 224]
