"""Feature bags: tissue patches of a slide at several magnifications, on disk (DESIGN §10).

* :mod:`.tissue`: the tissue mask from a low-resolution level, tissue fraction of boxes;
* :mod:`.grid`: nested patch grids at target µm per pixel (never pyramid level indices);
* :mod:`.pixels`: a patch's pixels, read from the coarsest level with enough and resampled;
* :mod:`.records`: :class:`Bag` and :class:`BagLevel`, what every reader returns;
* :mod:`.bagfile`: our HDF5 file (write atomically, read, validate, add features);
* :mod:`.foreign`: CLAM's and TRIDENT's coordinate and feature files;
* :mod:`.patching`: slides → bag files (``napari-magnet patch``).

Imports neither torch (except to read CLAM's ``.pt`` files) nor napari.
"""

from .bagfile import BagError, add_features, bag_kind, read_bag, validate_bag, write_bag
from .grid import level_name, nested_grid, parse_mpps, plan_magnifications
from .patching import PatchOptions, SlideOutcome, bag_path_for, patch_slide, patch_slides
from .records import Bag, BagLevel
from .tissue import TissueMask, TissueOptions, slide_tissue_mask

__all__ = [
    "Bag",
    "BagError",
    "BagLevel",
    "PatchOptions",
    "SlideOutcome",
    "TissueMask",
    "TissueOptions",
    "add_features",
    "bag_kind",
    "bag_path_for",
    "level_name",
    "nested_grid",
    "parse_mpps",
    "patch_slide",
    "patch_slides",
    "plan_magnifications",
    "read_bag",
    "slide_tissue_mask",
    "validate_bag",
    "write_bag",
]
