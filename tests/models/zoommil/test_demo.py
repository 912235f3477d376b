"""The shipped ``zoommil-demo``: loads by name, lists first with the other trained models, and
tells a macro-metastasis slide from a negative one it has never seen."""

from __future__ import annotations

import pytest

from napari_magnet import open_slide
from napari_magnet.engine.magnify import magnify
from napari_magnet.engine.types import MagnifyResult
from napari_magnet.models.registry import SHIPPED, listed_models, load_model

pytestmark = pytest.mark.skipif(
    not SHIPPED["zoommil-demo"].is_file(), reason="zoommil-demo is not shipped"
)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from napari_magnet.synth import SyntheticSlideSpec
    from napari_magnet.synth.writing import generate_slide

    folder = tmp_path_factory.mktemp("zoommil-demo")
    out = {}
    for kind, seed in (("macro", 90_001), ("negative", 90_002)):
        path = folder / f"{kind}.tif"
        generate_slide(path, SyntheticSlideSpec(8192, 8192, 0.5, seed=seed, lesion_kind=kind))
        out[kind] = path
    return out


def test_the_demo_tells_a_macro_slide_from_a_negative_one(slides):
    assert "zoommil-demo" in listed_models()[:2]
    model = load_model("zoommil-demo", device="cpu")
    assert model.model_name == "zoommil-demo" and model.checkpoint_sha256
    probabilities = {}
    for kind, path in slides.items():
        with open_slide(path) as slide:
            items = list(magnify(slide, model, device="cpu"))
        result = items[-1]
        assert isinstance(result, MagnifyResult)
        assert [step.layer for step in items[:-1]] == [1, 2, 3]
        probabilities[kind] = result.probability
    assert probabilities["macro"] > 0.5 > probabilities["negative"], probabilities
