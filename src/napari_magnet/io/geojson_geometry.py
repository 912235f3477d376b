"""GeoJSON geometries → polygon rings, checked: the geometry half of :mod:`.geojson_read`.

:class:`GeometryReader` turns a feature's ``geometry`` into ``(shell, holes)`` polygons in
level-0 pixels: ``Polygon`` and ``MultiPolygon`` are read, ``GeometryCollection`` members are
followed, point and line geometries are skipped, and every position is checked (numbers,
finite, within the bounds, at least 3 distinct points per ring, a vertex budget). Any problem
raises :class:`~.annotation.GeoJSONError`; what is accepted is described in :mod:`.geojson`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from .annotation import GeoJSONError, has_three_distinct_points

__all__ = [
    "COORD_LIMIT",
    "GEOMETRY_TYPES",
    "MAX_NESTING",
    "SKIPPED_GEOMETRY_TYPES",
    "GeometryReader",
]

#: Largest |coordinate| accepted, in level-0 pixels (a 10-million-pixel-wide slide is far
#: beyond any scanner; larger numbers are almost surely another unit or a corrupt file).
COORD_LIMIT = 1e7
#: Deepest GeometryCollection nesting followed.
MAX_NESTING = 8

#: Geometry types that have no area: skipped, not an error.
SKIPPED_GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")
#: Every geometry type a GeoJSON file may hold.
GEOMETRY_TYPES = ("Polygon", "MultiPolygon", "GeometryCollection", *SKIPPED_GEOMETRY_TYPES)


class GeometryReader:
    """Reads the geometries of one GeoJSON source into checked polygon rings.

    Parameters
    ----------
    source : str
        Names the source in error messages.
    max_extent : (width, height) or None
        Level-0 size of the slide; positions beyond it (with ``extent_tolerance``) are an
        error. Without it the bound is ±:data:`COORD_LIMIT`.
    extent_tolerance : float
        Fraction of the slide's longer side allowed beyond its edges (at least 1 px).
    max_vertices : int
        Most vertices accepted from the source, all rings together.

    Attributes
    ----------
    skipped : list of str
        One line per skipped (null, point or line) geometry, in reading order.
    bounds : (x0, y0, x1, y1)
        The accepted coordinate range.

    Raises
    ------
    ValueError
        When ``max_extent`` is not two positive finite numbers.
    """

    def __init__(
        self,
        source: str,
        max_extent: tuple[float, float] | None,
        extent_tolerance: float,
        max_vertices: int,
    ) -> None:
        self.source = source
        self.vertex_budget = max_vertices
        self.max_vertices = max_vertices
        self.skipped: list[str] = []
        if max_extent is not None:
            w, h = (float(v) for v in max_extent)
            if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
                raise ValueError(f"max_extent must be two positive numbers, got {max_extent!r}")
            tol = max(float(extent_tolerance) * max(w, h), 1.0)
            self.bounds = (-tol, -tol, w + tol, h + tol)
        else:
            self.bounds = (-COORD_LIMIT, -COORD_LIMIT, COORD_LIMIT, COORD_LIMIT)
        self.max_extent = max_extent

    def fail(self, problem: str) -> GeoJSONError:
        """The error for ``problem``, naming the source (to raise).

        Parameters
        ----------
        problem : str
            What is wrong, and where.

        Returns
        -------
        GeoJSONError
            ``"<source>: <problem>"``.
        """
        return GeoJSONError(f"{self.source}: {problem}")

    def geometry(self, geom: Any, where: str, depth: int) -> list[tuple[np.ndarray, list]]:
        """The polygons of one GeoJSON geometry.

        Parameters
        ----------
        geom : Any
            The decoded ``geometry`` member (``None`` for a null geometry).
        where : str
            Names the geometry in error messages and in :attr:`skipped`.
        depth : int
            How deep in GeometryCollections it is (0 at a feature).

        Returns
        -------
        list of (np.ndarray, list of np.ndarray)
            One ``(shell, holes)`` per polygon; empty when the geometry is skipped (a null,
            point or line geometry, recorded in :attr:`skipped`).

        Raises
        ------
        GeoJSONError
            For a geometry that is not valid GeoJSON or breaks a bound.
        """
        if geom is None:
            self.skipped.append(f"{where}: null geometry")
            return []
        if not isinstance(geom, dict):
            raise self.fail(f"{where}: 'geometry' is not an object")
        kind = geom.get("type")
        if kind == "GeometryCollection":
            if depth >= MAX_NESTING:
                raise self.fail(f"{where}: GeometryCollection nested too deeply")
            members = geom.get("geometries")
            if not isinstance(members, list):
                raise self.fail(f"{where}: GeometryCollection has no 'geometries' list")
            out = []
            for i, member in enumerate(members):
                out.extend(self.geometry(member, f"{where}.geometries[{i}]", depth + 1))
            return out
        if kind in SKIPPED_GEOMETRY_TYPES:
            if "coordinates" not in geom:
                raise self.fail(f"{where}: {kind} has no 'coordinates'")
            self.skipped.append(f"{where}: {kind} geometry")
            return []
        if kind not in ("Polygon", "MultiPolygon"):
            raise self.fail(f"{where}: unsupported geometry type {str(kind)[:60]!r}")
        if "coordinates" not in geom:
            raise self.fail(f"{where}: {kind} has no 'coordinates'")
        coords = geom["coordinates"]
        if kind == "Polygon":
            return [self.polygon(coords, f"{where} Polygon")]
        if not isinstance(coords, list) or not coords:
            raise self.fail(f"{where}: MultiPolygon 'coordinates' is not a non-empty list")
        return [self.polygon(c, f"{where} MultiPolygon[{i}]") for i, c in enumerate(coords)]

    def polygon(self, coords: Any, where: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """The rings of a Polygon's ``coordinates``.

        Parameters
        ----------
        coords : Any
            The decoded ``coordinates``: a list of rings.
        where : str
            Names the polygon in error messages.

        Returns
        -------
        (np.ndarray, list of np.ndarray)
            The exterior ring and the holes, each as :meth:`ring` returns it.
        """
        if not isinstance(coords, list) or not coords:
            raise self.fail(f"{where}: 'coordinates' is not a non-empty list of rings")
        rings = [self.ring(r, f"{where} ring {i}") for i, r in enumerate(coords)]
        return rings[0], rings[1:]

    def ring(self, raw: Any, where: str) -> np.ndarray:
        """One checked ring.

        Parameters
        ----------
        raw : Any
            The decoded ring: a list of ``[x, y]`` positions (extra dimensions are ignored).
        where : str
            Names the ring in error messages.

        Returns
        -------
        np.ndarray
            ``(K, 2)`` float ``(x, y)``, the closing position dropped; every coordinate is
            finite and within :attr:`bounds`, with at least 3 distinct points.

        Raises
        ------
        GeoJSONError
            For a malformed, non-finite, out-of-bounds or degenerate ring, or when the file
            has more than ``max_vertices`` vertices in all.
        """
        if not isinstance(raw, list):
            raise self.fail(f"{where}: a ring must be a list of [x, y] positions")
        n = len(raw)
        self.vertex_budget -= n
        if self.vertex_budget < 0:
            raise self.fail(f"too many vertices (more than {self.max_vertices})")
        arr = self._fast_ring(raw)
        if arr is None:
            arr = self._slow_ring(raw, where)
        if not np.all(np.isfinite(arr)):
            k = int(np.argwhere(~np.isfinite(arr))[0, 0])
            raise self.fail(f"{where}: position {k} has a non-finite coordinate (NaN/Infinity)")
        bx0, by0, bx1, by1 = self.bounds
        bad = (arr[:, 0] < bx0) | (arr[:, 0] > bx1) | (arr[:, 1] < by0) | (arr[:, 1] > by1)
        if np.any(bad):
            k = int(np.argmax(bad))
            limit = (
                f"the slide extent {tuple(self.max_extent)} (with tolerance)"
                if self.max_extent is not None
                else f"±{COORD_LIMIT:g} px"
            )
            raise self.fail(
                f"{where}: position {k} ({arr[k, 0]:g}, {arr[k, 1]:g}) is beyond {limit}"
            )
        if n > 1 and np.array_equal(arr[0], arr[-1]):
            arr = arr[:-1]
        if not has_three_distinct_points(arr):
            raise self.fail(f"{where}: a polygon ring needs at least 3 distinct points")
        return arr

    @staticmethod
    def _fast_ring(raw: list) -> np.ndarray | None:
        """Vectorised parse of a well-formed ring; ``None`` sends it to the checking path."""
        if not raw:
            return None
        try:
            arr = np.array(raw)
        except (ValueError, TypeError, OverflowError):
            return None
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "if":
            return None
        # numpy silently turns JSON true/false mixed with numbers into 1/0: refuse those
        if not set(map(type, itertools.chain.from_iterable(raw))) <= {int, float}:
            return None
        return np.ascontiguousarray(arr[:, :2], dtype=np.float64)

    def _slow_ring(self, raw: list, where: str) -> np.ndarray:
        """Position-by-position parse that names the first bad position."""
        n = len(raw)
        arr = np.empty((n, 2), dtype=np.float64)
        for k, pt in enumerate(raw):
            if not isinstance(pt, (list, tuple)) or len(pt) < 2:
                raise self.fail(f"{where}: position {k} is not an [x, y] list")
            for d in (0, 1):
                v = pt[d]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise self.fail(
                        f"{where}: position {k} has a non-numeric coordinate {str(v)[:40]!r}"
                    )
                if isinstance(v, int) and abs(v) > COORD_LIMIT:
                    raise self.fail(
                        f"{where}: position {k} coordinate {str(v)[:40]} is beyond "
                        f"±{COORD_LIMIT:g} px"
                    )
                arr[k, d] = v
        return arr
