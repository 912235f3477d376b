"""The regions of interest (ROIs) of a Magnify run as one table: :class:`RoiTable`.

An ROI is a region a model looked at: one region of a
:class:`~napari_magnet.engine.types.MagnifyStep`, in level-0 pixels (DESIGN §2, §6). It travels
between three places, always through a :class:`RoiTable`:

* a Magnify run's steps → :meth:`RoiTable.from_steps`;
* GeoJSON (the run export, the autosave) ↔ :meth:`RoiTable.to_annotations` /
  :meth:`RoiTable.from_annotations` (records) and :meth:`RoiTable.to_geojson_features` /
  :meth:`RoiTable.from_geojson_features` (Feature dicts);
* a napari Shapes layer ↔ :meth:`RoiTable.to_layer_data` / :meth:`RoiTable.from_layer`.

How an ROI is encoded in GeoJSON and in a Shapes layer, and the reading of both back into
columns, live in :mod:`.roi_columns` (its public names are importable from here too).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .annotation import (
    FEATURE_ID_NAMESPACE,
    PROPERTIES_KEY,
    REVIEW_STATES,
    Annotation,
    rectangle,
)
from .colors import branch_color, rgb_to_rgba
from .coords import is_axis_aligned_rectangle, level0_to_world, mpp_or_unit
from .geojson_read import parse_geojson
from .geojson_write import annotation_to_feature
from .roi_columns import (
    MEASUREMENT_NAMES,
    ROI_FEATURES,
    UNKNOWN_LEVEL,
    RoiLayerData,
    roi_columns_from_annotations,
    roi_columns_from_layer,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyStep

__all__ = [
    "MEASUREMENT_NAMES",
    "ROI_FEATURES",
    "UNKNOWN_LEVEL",
    "RoiLayerData",
    "RoiTable",
]

_NAN = float("nan")


def _per_region(values: Any, n: int, dtype: type, missing: Any) -> np.ndarray:
    """A step's per-region array, or ``missing`` for every region when it has another length."""
    arr = np.asarray(values, dtype=dtype).reshape(-1)
    return arr if len(arr) == n else np.full(n, missing, dtype=dtype)


@dataclass(frozen=True, eq=False)
class RoiTable:
    """The ROIs of a run (or of a layer, or of a file), one row each, in level-0 pixels.

    Columns are tuples (strings) and read-only numpy arrays, all of the same length. Build one
    with a ``from_*`` constructor; :meth:`with_review` gives a copy with other classes and
    review states.

    Attributes
    ----------
    ids : tuple of str
        Lineage names, e.g. ``"1.3.2"``.
    parent_ids : tuple of str
        The lineage name of the region each ROI was cut from; ``""`` for layer 1's.
    layers : np.ndarray
        ``(N,)`` int, the 1-based magnifying layer (0: unknown).
    boxes : np.ndarray
        ``(N, 4)`` float ``(x0, y0, x1, y1)``, level-0 pixels.
    levels : np.ndarray
        ``(N,)`` int, the pyramid level the ROI's pixels were read from
        (:data:`UNKNOWN_LEVEL`: unknown).
    scales : np.ndarray
        ``(N,)`` float, zoom relative to the parent region (NaN: unknown).
    attention_mass : np.ndarray
        ``(N,)`` float, the attention behind each ROI (NaN: unknown).
    aux_probability : np.ndarray
        ``(N,)`` float, the slide probability of the auxiliary head fed by the ROI's layer
        (NaN: none).
    probability : np.ndarray
        ``(N,)`` float, the slide probability of the run the ROI belongs to (NaN: none).
    classes : tuple of str
        Class names; ``""`` = unclassified.
    reviews : tuple of str
        Review states, each one of :data:`~.annotation.REVIEW_STATES`.
    outlines : tuple of np.ndarray or None
        ``(K, 2)`` level-0 ``(x, y)`` outline of each ROI when it is not simply its box's
        rectangle (an ROI read from a file or a layer keeps its vertices exactly); ``None``:
        every ROI is the rectangle of its box.
    feature_ids : tuple of (str or None) or None
        GeoJSON feature id of each ROI (``None``: the writer derives one from the content).
    slide_name : str or None
        The slide file name recorded in ``properties.napari_magnet.slide`` (``None``: none).
    """

    ids: tuple[str, ...]
    parent_ids: tuple[str, ...]
    layers: np.ndarray
    boxes: np.ndarray
    levels: np.ndarray
    scales: np.ndarray
    attention_mass: np.ndarray
    aux_probability: np.ndarray
    probability: np.ndarray
    classes: tuple[str, ...]
    reviews: tuple[str, ...]
    outlines: tuple[np.ndarray, ...] | None = None
    feature_ids: tuple[str | None, ...] | None = None
    slide_name: str | None = None

    def __post_init__(self) -> None:
        def frozen_array(values: Any, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
            arr = np.array(values, dtype=dtype).reshape(shape)
            arr.flags.writeable = False
            return arr

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        n = len(self.ids)
        put("ids", tuple(str(v) for v in self.ids))
        for name in ("parent_ids", "classes", "reviews"):
            put(name, tuple(str(v) for v in getattr(self, name)))
        for name in ("layers", "levels"):
            put(name, frozen_array(getattr(self, name), np.int64, (-1,)))
        for name in ("scales", "attention_mass", "aux_probability", "probability"):
            put(name, frozen_array(getattr(self, name), np.float64, (-1,)))
        put("boxes", frozen_array(self.boxes, np.float64, (-1, 4)))
        if self.outlines is not None:
            put("outlines", tuple(frozen_array(o, np.float64, (-1, 2)) for o in self.outlines))
        if self.feature_ids is not None:
            put("feature_ids", tuple(None if v is None else str(v) for v in self.feature_ids))
        for name in (
            "parent_ids",
            "layers",
            "boxes",
            "levels",
            "scales",
            "attention_mass",
            "aux_probability",
            "probability",
            "classes",
            "reviews",
            "outlines",
            "feature_ids",
        ):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise ValueError(f"RoiTable: {len(column)} {name} for {n} ids")
        bad = sorted({r for r in self.reviews if r not in REVIEW_STATES})
        if bad:
            raise ValueError(f"RoiTable: review states {bad} not in {REVIEW_STATES}")

    def __len__(self) -> int:
        return len(self.ids)

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def from_steps(
        cls, steps: Iterable[MagnifyStep], *, slide_name: str = "", probability: float | None = None
    ) -> RoiTable:
        """The regions of a Magnify run, unclassified and unreviewed.

        Parameters
        ----------
        steps : iterable of MagnifyStep
            The run's steps, in order; every region of every step becomes one row.
        slide_name : str
            The slide's file name: recorded, and it seeds the stable feature ids (a UUID from
            the slide name and the lineage id, so re-exporting a run gives the same ids).
        probability : float, optional
            The run's slide probability.

        Returns
        -------
        RoiTable
            Per-region numbers a step lacks (no attention mass, say) are unknown.

        Raises
        ------
        ValueError
            When a step has not as many region ids as boxes.
        """
        columns: dict[str, list] = {
            k: []
            for k in (
                "ids",
                "parent_ids",
                "layers",
                "boxes",
                "levels",
                "scales",
                "attention_mass",
                "aux_probability",
            )
        }
        for step in steps:
            boxes = np.asarray(step.boxes, dtype=float).reshape(-1, 4)
            n = len(boxes)
            ids = [str(r) for r in step.region_ids]
            if len(ids) != n:
                raise ValueError(f"layer {step.layer}: {len(ids)} region ids for {n} boxes")
            parents = [str(p) for p in (step.parent_ids or [])] + [""] * n
            aux = _NAN if step.aux_probability is None else float(step.aux_probability)
            columns["ids"] += ids
            columns["parent_ids"] += parents[:n]
            columns["layers"] += [int(step.layer)] * n
            columns["boxes"] += list(boxes)
            columns["levels"] += list(_per_region(step.levels, n, float, UNKNOWN_LEVEL))
            columns["scales"] += list(_per_region(step.scales, n, float, _NAN))
            columns["attention_mass"] += list(_per_region(step.attention_mass, n, float, _NAN))
            columns["aux_probability"] += [aux] * n
        total = len(columns["ids"])
        return cls(
            **columns,
            probability=[_NAN if probability is None else float(probability)] * total,
            classes=[""] * total,
            reviews=["unreviewed"] * total,
            feature_ids=[
                str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"roi:{slide_name}:{rid}"))
                for rid in columns["ids"]
            ],
            slide_name=str(slide_name),
        )

    @classmethod
    def from_annotations(cls, annotations: Sequence[Annotation]) -> RoiTable:
        """ROIs read back from GeoJSON (our export or autosave; :func:`~.geojson.read_geojson`).

        Parameters
        ----------
        annotations : sequence of Annotation
            One per ROI. The lineage comes from ``properties.napari_magnet`` (``region_id``,
            ``parent_id``, ``layer``; the name when there is no ``region_id``), the numbers
            from the measurements; outlines, feature ids, classes and review states are kept.

        Returns
        -------
        RoiTable
            ``slide_name`` is the slide every annotation records, if they agree.
        """
        return cls(**roi_columns_from_annotations(annotations))

    @classmethod
    def from_geojson_features(
        cls, features: Iterable[dict], *, source: str = "<ROI features>"
    ) -> RoiTable:
        """ROIs from GeoJSON ``Feature`` dicts (e.g. :meth:`to_geojson_features`' output).

        Parameters
        ----------
        features : iterable of dict
            GeoJSON Features; points and lines are skipped with a warning.
        source : str
            Names the features in error messages.

        Returns
        -------
        RoiTable
            As :meth:`from_annotations` of the parsed features.

        Raises
        ------
        GeoJSONError
            For a feature that is not valid GeoJSON.
        """
        collection = {"type": "FeatureCollection", "features": list(features)}
        return cls.from_annotations(parse_geojson(collection, source=source))

    @classmethod
    def from_layer(
        cls,
        data: Sequence[np.ndarray],
        features: Any,
        mpp: Sequence[float] | None,
        *,
        shape_types: Sequence[str] | None = None,
        scale: Sequence[float] = (1.0, 1.0),
        translate: Sequence[float] = (0.0, 0.0),
        slide_name: str | None = None,
    ) -> RoiTable:
        """The ROIs of a napari Shapes layer.

        Parameters
        ----------
        data : sequence of np.ndarray
            The layer's ``data``: vertices in its data coordinates, ``(row, col)``.
        features : DataFrame or dict of columns
            The layer's features table: the :data:`ROI_FEATURES` columns that are present
            (the lineage id falls back on a ``name`` column).
        mpp : (mpp_x, mpp_y) or None
            The slide's µm per level-0 pixel.
        shape_types : sequence of str, optional
            The layer's ``shape_type`` (default: every shape is a polygon). Ellipses become
            64-gons; lines and paths have no area and are left out.
        scale, translate : sequence of float
            The layer's data → world transform.
        slide_name : str, optional
            The slide file name to record (``""`` or ``None``: none).

        Returns
        -------
        RoiTable
            One row per area shape, its level-0 outline kept exactly.
        """
        return cls(
            **roi_columns_from_layer(
                data,
                features,
                mpp,
                shape_types=shape_types,
                scale=scale,
                translate=translate,
                slide_name=slide_name,
            )
        )

    # -- changes -----------------------------------------------------------------------------

    def with_review(self, review_states: Mapping[str, tuple[str, str]]) -> RoiTable:
        """A copy with classes and review states set by ROI id.

        Parameters
        ----------
        review_states : mapping of str to (class, review state)
            By lineage id; ``""`` or ``None`` as a class unclassifies. ROIs not in the mapping
            keep theirs.

        Returns
        -------
        RoiTable
            The new table (this one is unchanged).

        Raises
        ------
        ValueError
            For a review state not in :data:`~.annotation.REVIEW_STATES`.
        """
        classes, reviews = list(self.classes), list(self.reviews)
        for i, rid in enumerate(self.ids):
            if rid in review_states:
                klass, review = review_states[rid]
                classes[i], reviews[i] = str(klass or ""), str(review)
        return dataclasses.replace(self, classes=tuple(classes), reviews=tuple(reviews))

    # -- conversions -------------------------------------------------------------------------

    def outline(self, i: int) -> np.ndarray:
        """The outline of one ROI.

        Parameters
        ----------
        i : int
            The row.

        Returns
        -------
        np.ndarray
            ``(K, 2)`` level-0 ``(x, y)``: its box's rectangle unless it has an outline of
            its own.
        """
        if self.outlines is not None:
            return self.outlines[i]
        return rectangle(*self.boxes[i])

    def to_features(self) -> dict[str, list]:
        """The features table of an ROI Shapes layer.

        Returns
        -------
        dict of str to list
            Columns :data:`ROI_FEATURES`, Python scalars: ``class`` ``""`` when unclassified,
            unknown numbers NaN, an unknown level :data:`UNKNOWN_LEVEL`.
        """
        return {
            "id": list(self.ids),
            "parent": list(self.parent_ids),
            "layer": [int(v) for v in self.layers],
            "scale": [float(v) for v in self.scales],
            "level": [int(v) for v in self.levels],
            "attention_mass": [float(v) for v in self.attention_mass],
            "aux_probability": [float(v) for v in self.aux_probability],
            "probability": [float(v) for v in self.probability],
            "class": list(self.classes),
            "review": list(self.reviews),
        }

    def to_layer_data(self, mpp: Sequence[float] | None) -> RoiLayerData:
        """What a Shapes layer of these ROIs needs.

        Parameters
        ----------
        mpp : (mpp_x, mpp_y) or None
            The slide's µm per level-0 pixel (``None``: world units are level-0 pixels).

        Returns
        -------
        RoiLayerData
            World ``(row, col)`` rectangles, the :meth:`to_features` table (the slide
            probability included, so hovering an ROI can show it) and the lineage colours.
        """
        outlines = [self.outline(i) for i in range(len(self))]
        colors = np.array([rgb_to_rgba(branch_color(r)) for r in self.ids]).reshape(-1, 4)
        return RoiLayerData(
            rects=[level0_to_world(o, mpp) for o in outlines],
            features=self.to_features(),
            edge_colors=colors,
            shape_types=[
                "rectangle" if is_axis_aligned_rectangle(o) else "polygon" for o in outlines
            ],
        )

    def to_annotations(
        self,
        *,
        mpp: Sequence[float] | None = None,
        mark_as_roi: bool = False,
        class_colors: Mapping[str, Sequence[int]] | None = None,
    ) -> list[Annotation]:
        """The ROIs as GeoJSON annotation records (encoding in the module docstring).

        Parameters
        ----------
        mpp : (mpp_x, mpp_y), optional
            Recorded in ``properties.napari_magnet.mpp`` (our GeoJSON reader puts the shapes
            back in µm with it).
        mark_as_roi : bool
            Record ``"kind": "roi"`` in ``properties.napari_magnet``, as the viewer's files do.
        class_colors : mapping of str to (r, g, b), optional
            Colour of each class, pinned on the annotations of that class.

        Returns
        -------
        list of Annotation
            One per ROI, in order.
        """
        m = MEASUREMENT_NAMES
        recorded_mpp = list(mpp_or_unit(mpp)) if mpp is not None else None
        out: list[Annotation] = []
        for i, rid in enumerate(self.ids):
            measurements: dict[str, float] = {}
            for key, values in (("attention_mass", self.attention_mass), ("scale", self.scales)):
                if not math.isnan(values[i]):
                    measurements[m[key]] = float(values[i])
            if self.levels[i] >= 0:
                measurements[m["level"]] = float(self.levels[i])
            if self.layers[i] >= 1:
                measurements[m["layer"]] = float(self.layers[i])
            for key, values in (
                ("aux_probability", self.aux_probability),
                ("probability", self.probability),
            ):
                if not math.isnan(values[i]):
                    measurements[m[key]] = float(values[i])
            ours: dict[str, Any] = {}
            if self.slide_name is not None:
                ours["slide"] = self.slide_name
            ours.update(region_id=rid, parent_id=self.parent_ids[i], layer=int(self.layers[i]))
            if mark_as_roi:
                ours["kind"] = "roi"
            if recorded_mpp is not None:
                ours["mpp"] = recorded_mpp
            klass = self.classes[i] or None
            out.append(
                Annotation(
                    polygon=np.array(self.outline(i)),
                    name=rid,
                    classification=klass,
                    review=self.reviews[i],
                    measurements=measurements,
                    properties={PROPERTIES_KEY: ours},
                    color=branch_color(rid),
                    id=self.feature_ids[i] if self.feature_ids is not None else None,
                    class_color=(
                        tuple(int(c) for c in class_colors[klass])  # type: ignore[arg-type]
                        if klass and class_colors and klass in class_colors
                        else None
                    ),
                )
            )
        return out

    def to_geojson_features(
        self,
        *,
        mpp: Sequence[float] | None = None,
        mark_as_roi: bool = False,
        class_colors: Mapping[str, Sequence[int]] | None = None,
    ) -> list[dict]:
        """The ROIs as GeoJSON ``Feature`` dicts, exactly as :func:`~.geojson.write_geojson`
        writes them.

        Parameters
        ----------
        mpp, mark_as_roi, class_colors
            As for :meth:`to_annotations`.

        Returns
        -------
        list of dict
            One JSON-ready Feature per ROI.
        """
        annotations = self.to_annotations(
            mpp=mpp, mark_as_roi=mark_as_roi, class_colors=class_colors
        )
        return [annotation_to_feature(a, i, class_colors) for i, a in enumerate(annotations)]
