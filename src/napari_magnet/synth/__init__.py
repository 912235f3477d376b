"""Deterministic synthetic whole-slide images with ground truth (DESIGN §7).

:func:`generate_slide` writes a real pyramidal, tiled, JPEG-compressed TIFF that OpenSlide
opens as ``generic-tiff``: level 0 is the first IFD, each lower level (downsample 4, 16, ...,
down to at most 1024 px on the longer side) is a further main IFD with the "reduced
resolution" bit set, tiles are YCbCr 4:2:0 JPEG, and XResolution/YResolution in pixels per
centimetre give OpenSlide's ``openslide.mpp-x``/``mpp-y``. :func:`generate_cohort` makes a
labelled set of them with a ``cohort.csv``.

The content imitates an H&E-stained lymph-node section: one to three irregular tissue
pieces (pink stroma with purple nuclei) on near-white glass, and, on positive slides,
tumour deposits sized like Camelyon's classes (macro > 2 mm, micro 0.2-2 mm, isolated
tumour cells < 0.2 mm) with larger, pleomorphic, densely packed nuclei in nests. Slides of
either label can carry *distractors* whose mean colour matches the tumour's (dense small
lymphocytes, or dark tissue folds), so colour alone cannot separate the classes. Stain
vectors, stain intensity and glass tone vary with the seed.

A 100,000 x 100,000 px slide takes about a minute on two cores, with a few hundred MB of
memory. The modules, in the order a slide goes through them:

* :mod:`.spec`: the spec, lesions, truth record and size classes;
* :mod:`.layout`: tissue, stain-variation fields and lesions on coarse grids;
* :mod:`.textures`: the per-slide bank of periodic textures;
* :mod:`.rendering`: one tile at a time, in a thread pool;
* :mod:`.writing`: the TIFF pyramid; :mod:`.truth`: its ground-truth sidecar;
* :mod:`.cohort`: many slides and their ``cohort.csv``.

The package imports neither torch nor napari.
"""

from .cohort import generate_cohort
from .spec import (
    LESION_KINDS,
    SIZE_RANGES_MM,
    SLIDE_CLASSES,
    Lesion,
    SyntheticSlideInfo,
    SyntheticSlideSpec,
    sidecar_path,
)
from .truth import read_ground_truth
from .writing import generate_slide

__all__ = [
    "LESION_KINDS",
    "SLIDE_CLASSES",
    "SIZE_RANGES_MM",
    "Lesion",
    "SyntheticSlideSpec",
    "SyntheticSlideInfo",
    "generate_slide",
    "read_ground_truth",
    "generate_cohort",
    "sidecar_path",
]
