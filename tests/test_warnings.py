"""The suite's warning filters (pyproject.toml): FutureWarning and DeprecationWarning attributed
to ``napari_magnet`` fail a test; the same warnings from other packages do not.

A warning is attributed to the module of the frame its ``stacklevel`` points at, so the probes
below run code whose module globals are named like ours or napari's, exactly as a real call
from ``napari_magnet`` into napari would be seen by the ``warnings`` machinery.
"""

from __future__ import annotations

import warnings

import pytest


def _function_in(module: str, source: str, name: str):
    """A function defined in a (fake) module called ``module``."""
    namespace = {"__name__": module, "warnings": warnings}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace[name]


_WARN = """
def warn(category, stacklevel):
    warnings.warn("probe", category, stacklevel=stacklevel)
"""
_CALL = """
def call(function, *args):
    return function(*args)
"""


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("module", ["napari_magnet", "napari_magnet._napari.widget"])
def test_a_warning_from_napari_magnet_fails(category, module):
    warn = _function_in(module, _WARN, "warn")
    with pytest.raises(category, match="probe"):
        warn(category, 1)


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_a_napari_warning_pointing_at_our_call_fails(category):
    # napari warns with stacklevel=2 so the warning names its caller: us
    napari_warn = _function_in("napari.components.layerlist", _WARN, "warn")
    our_call = _function_in("napari_magnet._napari.layers", _CALL, "call")
    with pytest.raises(category, match="probe"):
        our_call(napari_warn, category, 2)


@pytest.mark.parametrize("module", ["napari.components.layerlist", "tifffile", "other_package"])
def test_warnings_from_elsewhere_do_not_fail(module):
    warn = _function_in(module, _WARN, "warn")
    with warnings.catch_warnings(record=True) as caught:  # keeps the configured filters
        warn(FutureWarning, 1)
        warn(DeprecationWarning, 1)
    assert all(w.message.args == ("probe",) for w in caught)
    # napari's own deprecations are ignored, the rest are shown
    expected = 1 if module.startswith("napari.") else 2
    assert len(caught) == expected
