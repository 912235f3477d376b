"""Encoders: the registry, seeded initialisation, weights files and their errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from napari_magnet.bags.encoders import (
    EncoderError,
    RandomFeaturesWarning,
    build_encoder,
    known_encoders,
    load_weights_file,
)

SMALL = "torchvision:resnet18"


def _quiet(name, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomFeaturesWarning)
        return build_encoder(name, **kwargs)


def _patches(n=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def _features(encoder, x):
    with torch.inference_mode():
        return encoder.module(x)


def test_registry_lists_the_families():
    names = known_encoders()
    assert "resnet50-trunc" in names
    assert "torchvision:<name>" in names and "timm:<name>" in names


@pytest.mark.parametrize("name", ["nope", "torchvision:no_such_model", "torchvision:"])
def test_unknown_names_are_clear_errors(name):
    with pytest.raises(EncoderError):
        _quiet(name)


def test_no_weights_warns_that_features_are_random():
    with pytest.warns(RandomFeaturesWarning, match="random"):
        encoder = build_encoder(SMALL)
    assert encoder.weights is None and encoder.config["seed"] == 0
    assert encoder.dim == 512


def test_initialisation_is_deterministic_under_a_seed():
    x = _patches()
    state = torch.get_rng_state()
    a, b = _quiet(SMALL), _quiet(SMALL)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(_features(a, x), _features(b, x))
    c = _quiet(SMALL, seed=1)
    assert not torch.allclose(_features(a, x), _features(c, x))
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_resnet50_trunc_is_1024d_and_loads_a_full_resnet50(tmp_path):
    trunc = _quiet("resnet50-trunc")
    x = _patches(size=64)
    assert trunc.dim == 1024
    assert _features(trunc, x).shape == (2, 1024)
    torch.manual_seed(5)
    full = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)  # layer4 and fc included: ignored
    loaded = build_encoder("resnet50-trunc", weights=path)
    assert torch.equal(loaded.module.body.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    assert not torch.allclose(_features(trunc, x), _features(loaded, x))
    assert loaded.weights_sha256 and loaded.config_hash() != trunc.config_hash()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_sets_the_features(tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None).eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomFeaturesWarning)  # weights given: no warning
        encoder = build_encoder(SMALL, weights=path)
    x = _patches()
    reference.fc = torch.nn.Identity()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = reference((x.float() / 255 - mean) / std)
    torch.testing.assert_close(_features(encoder, x), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_features(_quiet(SMALL), x), expected)


def test_wrong_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(EncoderError, match="not found"):
        build_encoder(SMALL, weights=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EncoderError, match="not a safetensors file nor a torch state dict"):
        build_encoder(SMALL, weights=garbage)
    nothing = tmp_path / "nothing.pt"
    torch.save({"epoch": 3}, nothing)
    with pytest.raises(EncoderError, match="no state dict"):
        load_weights_file(nothing)
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), other)
    with pytest.raises(EncoderError, match="does not fit"):
        build_encoder(SMALL, weights=other)


def test_timm_models_by_name():
    pytest.importorskip("timm")
    encoder = _quiet("timm:resnet10t")
    assert _features(encoder, _patches()).shape == (2, encoder.dim)
