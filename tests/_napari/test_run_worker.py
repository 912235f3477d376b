"""The worker side of a run: model listing through the family seam, the model cache, and no
model-family names in the viewer code."""

from __future__ import annotations

import ast
from pathlib import Path

import napari_magnet._napari as viewer_package
from napari_magnet._napari.run_worker import (
    clear_model_cache,
    load_model_cached,
    model_choices,
    patches_adjustable,
)
from napari_magnet.models.family import families
from napari_magnet.models.registry import family_of_spec, listed_models


def test_models_and_patches_come_from_the_families():
    assert model_choices() == listed_models()
    for name in model_choices():
        family = family_of_spec(name)
        assert family is not None, name
        assert patches_adjustable(name) is family.adjustable_patches
    assert patches_adjustable("no-such-model") is False
    assert patches_adjustable("/nowhere/model.safetensors") is False


def test_named_models_are_cached_per_device(tmp_path):
    name = next(n for n in model_choices() if n != "demo")
    clear_model_cache()
    try:
        first = load_model_cached(name, "cpu")
        assert load_model_cached(name, "cpu") is first
    finally:
        clear_model_cache()


def _names() -> set[str]:
    names = set()
    for family in families():
        names.add(family.architecture)
        names.update(family.configs)
    return names


def _literals(node: ast.AST) -> list[str]:
    return [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def test_no_viewer_module_compares_against_a_family_or_model_name():
    """The viewer asks the family seam; it never tests a name (``== "ats"``,
    ``startswith("magnet")``, a preferred-order tuple of names …)."""
    names = _names()
    assert names
    offending = []
    for path in sorted(Path(viewer_package.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            suspects: list[str] = []
            if isinstance(node, ast.Compare):
                suspects = _literals(node)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
            ):
                suspects = _literals(node)
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                suspects = [s for s in _literals(node) if s in names]
            hits = [s for s in suspects if any(s == n or (s and n.startswith(s)) for n in names)]
            if hits:
                offending.append(f"{path.name}:{node.lineno}: {hits}")
    assert not offending, offending
