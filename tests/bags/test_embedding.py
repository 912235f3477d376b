"""Embedding bag files: features per magnification, equal to a per-patch reference, skip /
overwrite, atomic writes, the ``embed`` command."""

from __future__ import annotations

import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch

from napari_magnet.bags import PatchOptions, patch_slide, read_bag, validate_bag
from napari_magnet.bags.embedding import embed_bag, embed_bags
from napari_magnet.bags.encoders import Encoder, RandomFeaturesWarning, build_encoder
from napari_magnet.bags.pixels import read_patch
from napari_magnet.bags.tissue import TissueOptions
from napari_magnet.cli import main
from napari_magnet.slide import open_slide

NAME = "torchvision:resnet18"


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomFeaturesWarning)
        return build_encoder(NAME, probe_size=32)


@pytest.fixture(scope="module")
def bag_file(synthetic_slide, tmp_path_factory):
    path = tmp_path_factory.mktemp("bags") / f"{synthetic_slide.stem}.h5"
    options = PatchOptions((16.0, 8.0), 32, TissueOptions(min_fraction=0.0))
    assert patch_slide(synthetic_slide, path, options).status == "written"
    return path


@pytest.fixture
def fresh(bag_file, tmp_path):
    """A copy of the bag (no features) in its own folder."""
    path = tmp_path / bag_file.name
    shutil.copyfile(bag_file, path)
    return path


def test_features_per_magnification(fresh, encoder, synthetic_slide, tmp_path):
    out = tmp_path / "out" / fresh.name
    seen = []
    outcome = embed_bag(
        fresh,
        encoder,
        "cpu",
        16,
        output=out,
        slide=synthetic_slide,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert outcome.status == "written", outcome.reason
    bag = read_bag(out)
    assert outcome.patches == sum(len(level) for level in bag.levels) == seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    for level in bag.levels:
        assert level.features.shape == (len(level), encoder.dim)
        assert level.features.dtype == np.float16
        attrs = level.attrs["features_attrs"]
        assert attrs["encoder"] == NAME
        assert attrs["config_hash"] == encoder.config_hash(dtype="float16")
        assert int(attrs["dim"]) == encoder.dim
    assert not validate_bag(out)
    with h5py.File(out, "r") as f:  # the root link CLAM / TRIDENT read: the finest grid
        np.testing.assert_array_equal(f["features"][()], bag.levels[-1].features)
    assert read_bag(fresh).levels[0].features is None  # the source bag is left alone


def test_features_equal_a_per_patch_reference(fresh, encoder, synthetic_slide):
    outcome = embed_bag(fresh, encoder, "cpu", 8, slide=synthetic_slide, dtype="float32")
    assert outcome.status == "written", outcome.reason
    bag = read_bag(fresh)
    with open_slide(synthetic_slide) as slide:
        for level in bag.levels:
            assert level.features.dtype == np.float32
            rows = np.linspace(0, len(level) - 1, 6).astype(int)  # edge patches included
            patches = np.stack([read_patch(slide, level, *level.coords[i]) for i in rows])
            x = torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous()
            with torch.inference_mode():
                expected = encoder.module(x).numpy()
            got = level.features[rows]
            cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1)
            cosine /= np.linalg.norm(expected, axis=1)
            assert cosine.min() > 0.99, cosine
            scale = np.abs(expected).mean()
            assert np.abs(got - expected).mean() < 0.1 * scale


def test_skip_and_overwrite(fresh, encoder, synthetic_slide):
    first = embed_bag(fresh, encoder, "cpu", 32, slide=synthetic_slide)
    assert first.status == "written"
    stamp = fresh.stat().st_mtime_ns
    assert embed_bag(fresh, encoder, "cpu", 32, slide=synthetic_slide).status == "skipped"
    assert fresh.stat().st_mtime_ns == stamp
    again = embed_bag(fresh, encoder, "cpu", 32, slide=synthetic_slide, overwrite=True)
    assert again.status == "written"
    other = embed_bag(fresh, encoder, "cpu", 32, slide=synthetic_slide, dtype="float32")
    assert other.status == "written"  # another configuration: embedded again
    assert read_bag(fresh).levels[0].features.dtype == np.float32


class _Exploding(torch.nn.Module):
    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("killed midway")
        return self.inner(x)


def test_a_failure_midway_leaves_the_file_as_it_was(fresh, encoder, synthetic_slide):
    assert embed_bag(fresh, encoder, "cpu", 32, slide=synthetic_slide).status == "written"
    before = fresh.read_bytes()
    broken = Encoder("broken", _Exploding(encoder.module, after=2), encoder.dim, config={"x": 1})
    outcome = embed_bag(fresh, broken, "cpu", 8, slide=synthetic_slide, overwrite=True)
    assert outcome.status == "failed" and "killed midway" in outcome.reason
    assert fresh.read_bytes() == before and not validate_bag(fresh)
    assert sorted(p.name for p in fresh.parent.iterdir()) == [fresh.name]  # no temp files
    assert read_bag(fresh).levels[-1].features.shape[1] == encoder.dim


def test_missing_slide_is_a_failure_with_its_reason(fresh, encoder):
    import h5py

    with h5py.File(fresh, "r+") as f:  # the slide has moved since the bag was made
        f.attrs["slide_path"] = str(fresh.parent / "moved" / str(f.attrs["slide_file"]))
    outcome = embed_bag(fresh, encoder, "cpu", 8)
    assert outcome.status == "failed" and "not found" in outcome.reason
    assert not validate_bag(fresh)
    gone = embed_bag(fresh.parent / "nope.h5", encoder, "cpu", 8, output=fresh)
    assert gone.status == "failed" and "not found" in gone.reason


def test_embed_bags_and_the_command(bag_file, synthetic_slide, tmp_path, encoder, capsys):
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copyfile(bag_file, patches / bag_file.name)
    out = tmp_path / "features"
    args = ["embed", "--patches", str(patches), "--encoder", NAME, "--out", str(out)]
    args += ["--slides", str(synthetic_slide.parent), "--batch-size", "16", "--quiet"]
    args += ["--device", "cpu"]
    assert main(args) == 0
    assert "random" in capsys.readouterr().err
    bag = read_bag(out / bag_file.name)
    assert all(level.features is not None for level in bag.levels)
    assert main(args) == 0
    assert "0 written, 1 skipped, 0 failed" in capsys.readouterr().out
    outcomes = embed_bags([patches / bag_file.name], out, encoder)  # the same configuration
    assert outcomes[0].status == "skipped"
    outcomes = embed_bags([patches / bag_file.name], out, encoder, overwrite=True)
    # without --slides the slide is found where it was when the bag was made
    assert outcomes[0].status == "written", outcomes[0].reason
    assert main([*args[:-2], "--device", "cpu", "--weights", str(tmp_path / "none.pt")]) == 2
