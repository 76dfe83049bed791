"""HTM pixel indexing and range coverings of sky polygons, for the APDB's ``pixelId`` column.

Rubin's APDB stores the HTM level-20 index of every DiaObject and DiaSource in
``pixelId`` and finds the rows of a sky region with ``pixelId BETWEEN a AND b``
over a few index ranges that cover the region (a superset), followed by an
exact position test. This module provides the three pieces:

- :func:`htm_index` - the level-``L`` trixel of each position (numba kernel in
  :mod:`apfast.kernels.htm`; identical to ``lsst.sphgeom.HtmPixelization``);
- :func:`htm_ranges` - inclusive level-``L`` index ranges covering a convex
  spherical polygon, at most ``max_ranges`` of them;
- :func:`polygon_contains` - the exact point-in-polygon test.

A trixel at level ``l`` with id ``t`` holds the level-``L`` ids
``[t * 4**(L-l), (t + 1) * 4**(L-l) - 1]``, so a covering computed at a coarse
level is turned into level-20 ranges by shifting.
"""

from __future__ import annotations

import numpy as np

from apfast.errors import InputError
from apfast.kernels.htm import htm_index as _htm_index_kernel
from apfast.kernels.htm import root_vertices

__all__ = ["htm_index", "htm_ranges", "polygon_contains", "polygon_normals"]

#: Stop refining the covering when more than this many trixels straddle the edge.
_MAX_PARTIAL_FACTOR = 8


def htm_index(ra_deg: np.ndarray, dec_deg: np.ndarray, level: int = 20) -> np.ndarray:
    """HTM index of sky positions.

    Parameters
    ----------
    ra_deg, dec_deg : array_like of float, shape (n,)
        Positions in degrees (ICRS).
    level : int, optional
        HTM subdivision level, 0..24 (Rubin's APDB uses 20).

    Returns
    -------
    ndarray of int64, shape (n,)
        Trixel ids in ``[8 * 4**level, 16 * 4**level)``.

    Raises
    ------
    InputError
        If the level is out of range, the arrays differ in length or hold NaN.

    Examples
    --------
    >>> int(htm_index([0.0], [90.0], 0)[0])  # the north pole is in N3
    15
    """
    if not 0 <= int(level) <= 24:
        msg = f"HTM level {level} is out of range; use 0..24 (Rubin's APDB uses 20)"
        raise InputError(msg)
    ra = np.ascontiguousarray(ra_deg, dtype=np.float64).reshape(-1)
    dec = np.ascontiguousarray(dec_deg, dtype=np.float64).reshape(-1)
    if ra.shape != dec.shape:
        msg = f"ra has {ra.size} values but dec has {dec.size}; pass one ra and one dec per position"
        raise InputError(msg)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        msg = "ra/dec hold NaN or inf; every position needs finite coordinates for its HTM index"
        raise InputError(msg)
    return _htm_index_kernel(ra, dec, int(level))


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64).reshape(-1))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64).reshape(-1))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def polygon_normals(polygon_ra: np.ndarray, polygon_dec: np.ndarray) -> np.ndarray:
    """Inward unit normals of the great-circle edges of a convex spherical polygon.

    Parameters
    ----------
    polygon_ra, polygon_dec : array_like of float, shape (m,), m >= 3
        Corners in degrees, in either winding order.

    Returns
    -------
    ndarray of float64, shape (m, 3)
        ``n_i`` such that a point ``p`` is inside when ``n_i . p >= 0`` for all i.

    Raises
    ------
    InputError
        If the polygon has fewer than 3 corners, repeated corners or is not convex.
    """
    v = _unit_vectors(polygon_ra, polygon_dec)
    m = v.shape[0]
    if m < 3 or np.size(polygon_ra) != np.size(polygon_dec):
        msg = f"a sky polygon needs >= 3 corners with one ra and one dec each (got {m})"
        raise InputError(msg)
    n = np.cross(v, np.roll(v, -1, axis=0))
    norm = np.linalg.norm(n, axis=1)
    if np.any(norm < 1e-15):
        msg = "the sky polygon has repeated or antipodal neighbouring corners; pass distinct corners"
        raise InputError(msg)
    n /= norm[:, None]
    centre = v.sum(axis=0)
    side = n @ centre
    if np.all(side < 0):
        n = -n
    elif not np.all(side > 0):
        msg = "the sky polygon is not convex; pass the corners of a convex footprint (e.g. its 4 corners)"
        raise InputError(msg)
    # convexity: every corner must be inside every edge's half-space
    if np.any(v @ n.T < -1e-12):
        msg = "the sky polygon is not convex; pass the corners of a convex footprint in order"
        raise InputError(msg)
    return n


def polygon_contains(
    polygon_ra: np.ndarray, polygon_dec: np.ndarray, ra_deg: np.ndarray, dec_deg: np.ndarray
) -> np.ndarray:
    """Exact test of which positions lie inside a convex spherical polygon (edges included).

    Parameters
    ----------
    polygon_ra, polygon_dec : array_like of float, shape (m,)
        Polygon corners in degrees.
    ra_deg, dec_deg : array_like of float, shape (n,)
        Positions in degrees.

    Returns
    -------
    ndarray of bool, shape (n,)

    Examples
    --------
    >>> polygon_contains([0, 1, 1, 0], [0, 0, 1, 1], [0.5, 2.0], [0.5, 0.5]).tolist()
    [True, False]
    """
    n = polygon_normals(polygon_ra, polygon_dec)
    p = _unit_vectors(ra_deg, dec_deg)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.all(p @ n.T >= 0.0, axis=1)


def _children(tri: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 4 children (vertices and ids) of each trixel ``tri`` (k, 3, 3)."""
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    w0 = v1 + v2
    w1 = v0 + v2
    w2 = v0 + v1
    w0 /= np.linalg.norm(w0, axis=1)[:, None]
    w1 /= np.linalg.norm(w1, axis=1)[:, None]
    w2 /= np.linalg.norm(w2, axis=1)[:, None]
    kids = np.stack(
        [
            np.stack([v0, w2, w1], axis=1),
            np.stack([v1, w0, w2], axis=1),
            np.stack([v2, w1, w0], axis=1),
            np.stack([w0, w1, w2], axis=1),
        ],
        axis=1,
    ).reshape(-1, 3, 3)
    kid_ids = (ids[:, None] * 4 + np.arange(4, dtype=np.int64)[None, :]).reshape(-1)
    return kids, kid_ids


def _classify(tri: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Conservative (inside, outside) flags of trixels against a convex polygon.

    Inside: all three corners inside (a convex polygon then holds the whole
    trixel, itself the convex hull of its corners). Outside: the trixel's
    bounding cap lies entirely beyond one edge's great circle. Anything else is
    "partial" (possibly a false partial near corners: only costs a finer level).
    """
    inside_corner = np.einsum("kvc,ec->kve", tri, normals) >= 0.0  # (k, 3, m)
    inside = np.all(inside_corner, axis=(1, 2))
    centre = tri.sum(axis=1)
    centre /= np.linalg.norm(centre, axis=1)[:, None]
    cos_r = np.min(np.einsum("kvc,kc->kv", tri, centre), axis=1)
    sin_r = np.sqrt(np.clip(1.0 - cos_r * cos_r, 0.0, None))
    # cap (centre c, radius r) is outside half-space n.p >= 0 when n.c < -sin(r); small pad for rounding
    outside = np.any(centre @ normals.T < -(sin_r[:, None] + 1e-12), axis=1)
    return inside, outside & ~inside


def _merge(ranges: np.ndarray) -> np.ndarray:
    """Sort and merge overlapping or adjacent inclusive ranges (n, 2)."""
    if ranges.shape[0] == 0:
        return ranges
    r = ranges[np.argsort(ranges[:, 0], kind="stable")]
    out = [r[0].copy()]
    for a, b in r[1:]:
        if a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append(np.array([a, b], dtype=np.int64))
    return np.array(out, dtype=np.int64)


def _coarsen(ranges: np.ndarray, max_ranges: int) -> np.ndarray:
    """Close the smallest gaps between sorted ranges until at most ``max_ranges`` remain."""
    if ranges.shape[0] <= max_ranges:
        return ranges
    gaps = ranges[1:, 0] - ranges[:-1, 1]
    # keep the (max_ranges - 1) largest gaps open
    keep = np.sort(np.argsort(gaps, kind="stable")[::-1][: max_ranges - 1])
    starts = np.concatenate([[0], keep + 1])
    ends = np.concatenate([keep, [ranges.shape[0] - 1]])
    return np.stack([ranges[starts, 0], ranges[ends, 1]], axis=1)


def htm_ranges(
    polygon_ra: np.ndarray, polygon_dec: np.ndarray, level: int = 20, *, max_ranges: int = 64
) -> np.ndarray:
    """Inclusive HTM index ranges at ``level`` that cover a convex sky polygon.

    Descends the HTM from the 8 roots, keeping trixels fully inside the polygon
    and refining those that straddle an edge until ``level`` is reached or more
    than ``8 * max_ranges`` straddle; the straddling trixels are then taken
    whole. The level-``level`` ranges are merged and, if more than
    ``max_ranges`` remain, the smallest gaps between them are closed. The
    result is a superset of the polygon (never misses a point inside it).

    Parameters
    ----------
    polygon_ra, polygon_dec : array_like of float, shape (m,)
        Corners of a convex polygon in degrees, either winding order.
    level : int, optional
        HTM level of the returned ids (20 for the APDB ``pixelId``).
    max_ranges : int, optional
        Upper bound on the number of ranges (keyword-only), >= 1.

    Returns
    -------
    ndarray of int64, shape (n, 2)
        Sorted, disjoint ``[start, end]`` inclusive ranges, ``n <= max_ranges``.

    Raises
    ------
    InputError
        For a bad polygon (see :func:`polygon_normals`), level or max_ranges.

    Examples
    --------
    >>> r = htm_ranges([10, 10.1, 10.1, 10], [-5, -5, -4.9, -4.9], 20, max_ranges=16)
    >>> r.shape[0] <= 16 and bool(np.all(r[:, 0] <= r[:, 1]))
    True
    """
    if not 0 <= int(level) <= 24:
        msg = f"HTM level {level} is out of range; use 0..24 (Rubin's APDB uses 20)"
        raise InputError(msg)
    if int(max_ranges) < 1:
        msg = f"max_ranges={max_ranges} must be >= 1"
        raise InputError(msg)
    normals = polygon_normals(polygon_ra, polygon_dec)
    tri = root_vertices()
    ids = np.arange(8, 16, dtype=np.int64)
    full: list[np.ndarray] = []  # level-`level` ranges of fully-inside trixels
    lvl = 0
    while True:
        inside, outside = _classify(tri, normals)
        shift = 2 * (level - lvl)
        if np.any(inside):
            t = ids[inside]
            full.append(np.stack([t << shift, ((t + 1) << shift) - 1], axis=1))
        partial = ~inside & ~outside
        tri, ids = tri[partial], ids[partial]
        if lvl == level or ids.size == 0 or ids.size * 4 > _MAX_PARTIAL_FACTOR * max_ranges:
            break
        tri, ids = _children(tri, ids)
        lvl += 1
    shift = 2 * (level - lvl)
    if ids.size:
        full.append(np.stack([ids << shift, ((ids + 1) << shift) - 1], axis=1))
    if not full:
        return np.zeros((0, 2), dtype=np.int64)
    return _coarsen(_merge(np.concatenate(full)), int(max_ranges))
