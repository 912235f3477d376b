"""Models: the family seam (:mod:`.family`), the built-in families and the model registry.

Each family lives in its own folder and registers itself when imported; the built-in ones are
imported here, so ``from napari_magnet.models.registry import load_model`` knows them all:

* :mod:`.magnet` — magnifying networks (MagNet), DESIGN §4;
* :mod:`.ats` — attention sampling, one or two levels, DESIGN §5;
* :mod:`.zoommil` — ZoomMIL (and its ABMIL baseline) over patch embeddings, DESIGN §9.

A new family registers a :class:`~.family.Family` with :func:`~.family.register_family`; the
engine, the trainer, the CLI and the viewer then run it without knowing its name.
"""

from . import ats, magnet, zoommil  # noqa: F401  (each registers its family)
