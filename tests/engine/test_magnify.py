"""``magnify`` streams MagNet's layers on real slides."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_magnet import load_model, magnify, open_slide
from napari_magnet.engine.types import MagnifyResult, MagnifyStep


@pytest.fixture(scope="module")
def lite():
    return load_model("magnet3-lite", device="cpu")


def run(slide, model, **kwargs):
    items = list(magnify(slide, model, device="cpu", **kwargs))
    return items[:-1], items[-1]


def assert_nested(steps, slide_box, tolerance=1.0):
    boxes = {}
    for step in steps:
        for rid, pid, box in zip(step.region_ids, step.parent_ids, step.boxes):
            parent = boxes[pid] if pid else slide_box
            assert box[0] >= parent[0] - tolerance and box[1] >= parent[1] - tolerance
            assert box[2] <= parent[2] + tolerance and box[3] <= parent[3] + tolerance
            assert box[2] >= box[0] and box[3] >= box[1]
            boxes[rid] = box
    return boxes


def test_magnet_on_cmu_streams_layers_with_lineage(cmu_path, lite):
    with open_slide(cmu_path) as slide:
        steps, result = run(slide, lite)
        width, height = slide.dimensions
    assert [s.layer for s in steps] == [1, 2, 3]
    assert all(isinstance(s, MagnifyStep) for s in steps)
    assert steps[0].region_ids == ["1", "2", "3"]
    assert steps[0].parent_ids == ["", "", ""]
    assert steps[1].region_ids == ["1.1", "1.2", "2.1", "2.2", "3.1", "3.2"]
    assert len(steps[2].region_ids) == 18 and steps[2].region_ids[5] == "1.2.3"
    assert steps[2].parent_ids[5] == "1.2"
    boxes = assert_nested(steps, (0, 0, width, height))
    # The frozen first patch of layer 2 is its parent region.
    for parent in ("1", "2", "3"):
        np.testing.assert_allclose(boxes[f"{parent}.1"], boxes[parent], atol=1e-6)
    for step in steps:
        n_inputs = 1 if step.layer == 1 else len(set(step.parent_ids))
        assert len(step.attention_maps) == n_inputs == len(step.attention_boxes)
        assert all(m.shape == (56, 56) for m in step.attention_maps)
        assert step.levels.shape == (len(step.region_ids),)
        assert ((step.attention_mass >= 0) & (step.attention_mass <= 1 + 1e-6)).all()
        assert ((step.scales >= 0.05 - 1e-6) & (step.scales <= 1 + 1e-6)).all()
    assert steps[0].aux_probability is not None and steps[2].aux_probability is not None
    assert isinstance(result, MagnifyResult)
    fields = {f.name for f in dataclasses.fields(MagnifyResult)}
    assert {
        "probability",
        "label",
        "pixels_processed",
        "pixels_read",
        "seconds",
        "model_name",
        "checkpoint_sha256",
    } <= fields
    assert 0 <= result.probability <= 1 and result.label in (0, 1)
    assert result.pixels_processed == (10 * 56**2 + 18 * 224**2) * 3
    assert result.pixels_read > 0 and result.seconds > 0
    assert result.model_name == "magnet3-lite"


def test_steps_arrive_one_layer_at_a_time(cmu_path, lite):
    calls = {layer: 0 for layer in (1, 2, 3)}
    hooks = [
        lite.stacks[i].register_forward_hook(
            lambda *_, layer=i + 1: calls.__setitem__(layer, calls[layer] + 1)
        )
        for i in range(3)
    ]
    try:
        with open_slide(cmu_path) as slide:
            stream = magnify(slide, lite, device="cpu")
            first = next(stream)
            assert first.layer == 1
            assert calls == {1: 1, 2: 0, 3: 0}
            second = next(stream)
            assert second.layer == 2 and calls[3] == 0
            stream.close()  # cancelling stops the run: layer 3 never runs
            assert calls[3] == 0
    finally:
        for hook in hooks:
            hook.remove()


def test_deterministic_for_a_fixed_model_and_slide(cmu_path, lite):
    with open_slide(cmu_path) as slide:
        a_steps, a = run(slide, lite)
        b_steps, b = run(slide, lite)
    assert a.probability == b.probability
    for sa, sb in zip(a_steps, b_steps):
        np.testing.assert_array_equal(sa.boxes, sb.boxes)


def test_magnify_inside_a_box(cmu_path, lite):
    box = (300.0, 500.0, 1300.0, 1100.0)
    with open_slide(cmu_path) as slide:
        steps, _ = run(slide, lite, box=box)
    assert_nested(steps, box)


@pytest.mark.parametrize("box", [(0, 0, 0, 10), (5000, 5000, 6000, 6000), (0, 0, float("nan"), 10)])
def test_bad_boxes_are_rejected(cmu_path, lite, box):
    with open_slide(cmu_path) as slide, pytest.raises(ValueError, match="box"):
        next(magnify(slide, lite, device="cpu", box=box))


def test_not_a_model_is_rejected(cmu_path):
    import torch

    with open_slide(cmu_path) as slide, pytest.raises(TypeError, match="not a model"):
        next(magnify(slide, torch.nn.Linear(2, 2), device="cpu"))


def test_attention_sampling_through_the_same_stream(cmu_path):
    model = load_model("ats", device="cpu")
    with open_slide(cmu_path) as slide:
        steps, result = run(slide, model)
        width, height = slide.dimensions
    (step,) = steps
    assert step.region_ids == [str(i) for i in range(1, 21)]
    assert step.parent_ids == [""] * 20
    boxes = step.boxes
    assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 3] <= height).all()
    (attention,) = step.attention_maps
    assert attention.shape == (256, 256) and attention.sum() == pytest.approx(1.0, abs=1e-4)
    assert result.pixels_processed == (256 * 256 + 20 * 50 * 50) * 3
    assert result.model_name == "ats"


def test_attention_sampling_patch_count_override(cmu_path):
    model = load_model("ats", device="cpu")
    with open_slide(cmu_path) as slide:
        steps, result = run(slide, model, n_patches=5)
        assert len(steps[0].region_ids) == 5
        with pytest.raises(ValueError, match="at least 1"):
            run(slide, model, n_patches=0)
        with pytest.raises(ValueError, match="fixed by its architecture"):
            run(slide, load_model("magnet3-lite", device="cpu"), n_patches=4)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_run(cmu_path):
    cpu_model = load_model("magnet3-lite", device="cpu")
    gpu_model = load_model("magnet3-lite", device="cuda")
    with open_slide(cmu_path) as slide:
        cpu_steps, cpu = run(slide, cpu_model)
        gpu_items = list(magnify(slide, gpu_model, device="cuda"))
    gpu_steps, gpu = gpu_items[:-1], gpu_items[-1]
    assert gpu.probability == pytest.approx(cpu.probability, abs=1e-3)
    for a, b in zip(cpu_steps, gpu_steps):
        assert a.region_ids == b.region_ids
        np.testing.assert_allclose(a.boxes, b.boxes, atol=2.0)


def test_auxiliary_heads_can_be_skipped(cmu_path, lite):
    with open_slide(cmu_path) as slide:
        with_aux, a = run(slide, lite)
        without, b = run(slide, lite, aux_heads=False)
    assert all(s.aux_probability is None for s in without)
    assert a.probability == b.probability
    np.testing.assert_array_equal(with_aux[-1].boxes, without[-1].boxes)
