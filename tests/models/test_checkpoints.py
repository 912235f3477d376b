"""Checkpoints (safetensors + JSON, never pickles), the model registry and backbone weights."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from napari_magnet.models import registry
from napari_magnet.models.backbones import build_backbone, load_imagenet_weights
from napari_magnet.models.checkpoints import (
    FORMAT,
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    load_state_into,
    read_checkpoint,
    save_checkpoint,
    sha256_of,
)
from napari_magnet.models.family import Family, register_family, unregister_family
from napari_magnet.models.magnet import MAGNET_CONFIGS, MagNet
from napari_magnet.models.registry import load_model, resolve_device

LITE = MAGNET_CONFIGS["magnet3-lite"]


def perturbed_lite(seed: int = 0) -> MagNet:
    """A lite model whose every tensor (BN statistics included) differs from a fresh init."""
    torch.manual_seed(seed)
    model = MagNet(LITE)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn(t.shape, generator=g))
                if t.ndim == 1:  # keeps BatchNorm running variances positive
                    t.abs_()
    return model.eval()


def run_layer1(model: MagNet) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 112, 112, generator=g)
    lo = F.interpolate(x, size=56, mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = model.magnify_layer(1, lo, x)
        logit = model.classify(torch.rand(18, 3, 224, 224, generator=g), 1)
        aux = model.aux_logit(1, out.patches, 1)
    return out.theta, out.maps, out.patches, logit, aux


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = perturbed_lite()
    w, j = save_checkpoint(model, d / "lite", notes="unit test", extra={"epochs": 3})
    return model, w, j


# ----------------------------------------------------------------------------- round trip


def test_save_writes_the_pair(saved):
    model, w, j = saved
    assert w.name == "lite.safetensors" and j.name == "lite.json"
    meta = json.loads(j.read_text())
    assert meta["format"] == FORMAT
    assert meta["architecture"] == "magnet"
    assert meta["config"] == LITE.to_dict()
    assert meta["config_hash"] == LITE.config_hash()
    assert meta["weights_sha256"] == sha256_of(w) == model.checkpoint_sha256
    prov = meta["provenance"]
    assert prov["notes"] == "unit test" and prov["epochs"] == 3
    assert {"package_version", "created", "torch_version"} <= set(prov)
    assert not list(w.parent.glob("*.tmp"))


@pytest.mark.parametrize("which", ["weights", "json", "stem"])
def test_round_trip_identical_outputs(saved, which):
    model, w, j = saved
    path = {"weights": w, "json": j, "stem": w.with_suffix("")}[which]
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.checkpoint_sha256 == sha256_of(w)
    assert loaded.model_name == "magnet3-lite"
    for a, b in zip(run_layer1(model), run_layer1(loaded)):
        assert torch.equal(a, b)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_load_model_with_path_and_weights(saved):
    model, w, _ = saved
    m1 = load_model(str(w), device="cpu")
    m2 = load_model("magnet3-lite", device="cpu", weights=w)
    assert m1.checkpoint_sha256 == m2.checkpoint_sha256 == sha256_of(w)
    for a, b in zip(run_layer1(m1), run_layer1(m2)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- mismatches


def test_config_mismatch_is_named(saved, tmp_path):
    _, w, _ = saved
    cfg4 = dataclasses.replace(LITE, name="magnet4-lite", patches_per_layer=(3, 2, 3, 2))
    other = MagNet(cfg4)
    with pytest.raises(CheckpointError) as ei:
        load_state_into(other, w)
    msg = str(ei.value)
    assert str(w) in msg
    assert "patches_per_layer: checkpoint [3, 2, 3] vs model [3, 2, 3, 2]" in msg
    assert "name: checkpoint 'magnet3-lite' vs model 'magnet4-lite'" in msg
    assert "missing keys" in msg and "stacks.3" in msg
    # same structure, different hyper-parameter: the config field alone is reported
    cfg = dataclasses.replace(LITE, grey_threshold=20)
    with pytest.raises(CheckpointError, match="grey_threshold") as ei:
        load_state_into(MagNet(cfg), w)
    assert "missing keys" not in str(ei.value)
    with pytest.raises(CheckpointError, match="config mismatch"):
        load_model("magnet3", device="cpu", weights=w)


def test_shape_mismatch_and_unexpected_keys_are_listed(tmp_path):
    model = MagNet(LITE)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["head.0.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    del sd["gru.bias_hh_l0"]
    path = tmp_path / "odd"
    save_checkpoint(model, path)  # valid pair, then swap in the odd weights + fix the JSON
    w, j = checkpoint_paths(path)
    save_file(sd, str(w))
    meta = json.loads(j.read_text())
    meta["weights_sha256"] = sha256_of(w)
    j.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(w)
    msg = str(ei.value)
    assert "shape mismatches: head.0.weight checkpoint (3, 3)" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "missing keys: gru.bias_hh_l0" in msg


class _TinyConfig:
    def __init__(self, width: int = 4):
        self.width = width

    def to_dict(self):
        return {"name": "tiny", "width": self.width}


class _Tiny(nn.Module):
    architecture = "tiny-test"

    def __init__(self, width: int = 4):
        super().__init__()
        self.config = _TinyConfig(width)
        self.lin = nn.Linear(width, 1)


def test_architecture_mismatch_and_registered_architecture(tmp_path, monkeypatch):
    tiny = _Tiny()
    w, _ = save_checkpoint(tiny, tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="architecture mismatch.*'tiny-test'.*'magnet'"):
        load_state_into(MagNet(LITE), w)
    with pytest.raises(CheckpointError, match="unknown architecture 'tiny-test'"):
        load_checkpoint(w)
    register_family(
        Family(
            architecture="tiny-test",
            config_class=dict,
            build=lambda cfg: _Tiny(int(cfg["width"])),
            configs={},
            magnify=lambda *a: iter(()),
        )
    )
    try:
        loaded = load_checkpoint(w)
    finally:
        unregister_family("tiny-test")
    assert torch.equal(loaded.lin.weight, tiny.lin.weight)
    assert loaded.model_name == "tiny"


# ----------------------------------------------------------------------------- broken files


def test_missing_files(saved, tmp_path):
    _, w, j = saved
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nothing.safetensors")
    only_w = tmp_path / "only.safetensors"
    only_w.write_bytes(w.read_bytes())
    with pytest.raises(CheckpointError, match="JSON missing") as ei:
        read_checkpoint(only_w)
    assert "only.json" in str(ei.value)
    only_j = tmp_path / "lonely.json"
    only_j.write_text(j.read_text())
    with pytest.raises(CheckpointError, match="weights file missing"):
        read_checkpoint(only_j)


def _copy_pair(w, j, dst: pathlib.Path, stem: str):
    w2, j2 = dst / f"{stem}.safetensors", dst / f"{stem}.json"
    w2.write_bytes(w.read_bytes())
    j2.write_text(j.read_text())
    return w2, j2


def test_truncated_and_corrupt_weights(saved, tmp_path):
    _, w, j = saved
    w2, _ = _copy_pair(w, j, tmp_path, "trunc")
    data = w.read_bytes()
    w2.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as ei:
        load_checkpoint(w2)
    assert str(w2) in str(ei.value)
    w2.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(w2)
    w3, _ = _copy_pair(w, j, tmp_path, "garbled")
    w3.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_checkpoint(w3)
    # flipped bytes in the tensor data: the recorded sha256 catches it
    w4, _ = _copy_pair(w, j, tmp_path, "flipped")
    w4.write_bytes(data[:-10] + bytes(10))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(w4)


def test_malformed_json(saved, tmp_path):
    _, w, j = saved
    _, j2 = _copy_pair(w, j, tmp_path, "badjson")
    j2.write_text(j.read_text()[:-20])
    with pytest.raises(CheckpointError, match="malformed JSON at line") as ei:
        load_checkpoint(j2)
    assert str(j2) in str(ei.value)
    meta = json.loads(j.read_text())
    meta["config"]["grey_threshold"] = 99.0  # edited without updating the hash
    j2.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config_hash does not match"):
        load_checkpoint(j2)
    del meta["architecture"]
    j2.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks.*architecture"):
        load_checkpoint(j2)


def test_pair_from_different_checkpoints(saved, tmp_path):
    _, w, j = saved
    other = MagNet(dataclasses.replace(LITE, name="renamed"))
    w_other, _ = save_checkpoint(other, tmp_path / "other")
    w2, _ = _copy_pair(w, j, tmp_path, "mixed")
    w2.write_bytes(w_other.read_bytes())
    with pytest.raises(CheckpointError, match="sha256|do not belong"):
        load_checkpoint(w2)


# ----------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates ``marker`` — a stand-in for arbitrary code execution."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_payload_is_live(tmp_path):
    """Sanity check of the test itself: unpickling the payload really runs it."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize(
    "kind", ["raw.pkl", "raw.pt", "zip.pt", "zip.pth", "raw.safetensors", "zip.safetensors"]
)
def test_pickles_are_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    fmt, suffix = kind.split(".")
    path = tmp_path / f"evil.{suffix}"
    if fmt == "raw":
        path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    else:
        torch.save({"state_dict": _Payload(marker)}, path)
    if suffix == "safetensors":  # a JSON sidecar so that the weights are actually looked at
        saved_json = tmp_path / "evil.json"
        model = _Tiny()
        save_checkpoint(model, tmp_path / "decoy")
        saved_json.write_text((tmp_path / "decoy.json").read_text())
    for loader in (read_checkpoint, load_checkpoint, lambda p: load_model(p, device="cpu")):
        with pytest.raises(CheckpointError, match="refused for safety") as ei:
            loader(path)
        assert str(path) in str(ei.value)
        assert "pickle" in str(ei.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- registry


def test_named_models_are_reproducible_and_ready():
    state = torch.random.get_rng_state()
    a = load_model("magnet3-lite", device="cpu")
    b = load_model("magnet3-lite", device="cpu")
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert a.model_name == "magnet3-lite" and a.checkpoint_sha256 == ""
    assert not a.training
    assert next(a.parameters()).device.type == "cpu"
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = load_model("magnet3-lite", device="cpu", seed=1)
    assert not torch.equal(c.stacks[0].to_map.weight, a.stacks[0].to_map.weight)


def test_unknown_name_and_demo(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'magnet9'.*magnet3-lite.*magnet4"):
        load_model("magnet9", device="cpu")
    monkeypatch.setitem(registry.SHIPPED, "demo", tmp_path / "weights" / "demo.safetensors")
    with pytest.raises(CheckpointError, match="not been trained and shipped"):
        load_model("demo", device="cpu")
    # once shipped, "demo" loads the checkpoint
    save_checkpoint(perturbed_lite(), tmp_path / "weights" / "demo")
    demo = load_model("demo", device="cpu")
    assert demo.model_name == "demo" and demo.checkpoint_sha256


def _tiny_family(configs):
    return Family(
        architecture="tiny-arch",
        config_class=dict,
        build=lambda c: _Tiny(3),
        configs=configs,
        magnify=lambda *a: iter(()),
    )


def test_register_config_and_devices():
    register_family(_tiny_family({"tiny": lambda: _Tiny(3)}))
    try:
        assert "tiny" in registry.known_models()
        m = load_model("tiny", device="cpu")
        assert m.model_name == "tiny" and m.lin.in_features == 3
        with pytest.raises(ValueError, match="already registered"):
            register_family(_tiny_family({"tiny": lambda: _Tiny(5)}))
        with pytest.raises(ValueError, match="already registered"):
            register_family(
                replace(_tiny_family({"magnet3": lambda: _Tiny(5)}), architecture="other-arch")
            )
        with pytest.raises(ValueError, match="reserved"):
            register_family(
                replace(_tiny_family({"demo": lambda: _Tiny(5)}), architecture="other-arch")
            )
    finally:
        unregister_family("tiny-arch")
    assert "tiny" not in registry.known_models()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_backbone_imagenet_weights_from_file(tmp_path, fmt):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    ref = resnet18(weights=None)  # stands in for an ImageNet state dict (with its fc)
    path = tmp_path / f"r18.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    bb = build_backbone("resnet18", weights=path).eval()
    assert torch.equal(bb.trunk.conv1.weight, ref.conv1.weight)
    ref.fc = nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(bb(x), ref.eval()((x - mean) / std), atol=1e-5)
    bad = {k: v for k, v in sd.items() if not k.startswith("layer4")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*layer4"):
        load_imagenet_weights(build_backbone("resnet18").trunk, tmp_path / "bad.safetensors")
    assert build_backbone("small").out_features == 64


def test_shipped_demo_model_loads_and_says_what_it_is():
    from napari_magnet.models import registry

    if not registry.DEMO_CHECKPOINT.is_file():
        pytest.skip("no demo model shipped in this checkout")
    demo = load_model("demo", device="cpu")
    assert demo.model_name == "demo" and len(demo.checkpoint_sha256) == 64
    notes = json.loads(registry.DEMO_CHECKPOINT.with_suffix(".json").read_text())
    assert "not for diagnosis" in notes["provenance"]["notes"].lower()
