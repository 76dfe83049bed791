"""Association of DIA sources with DiaObjects and DiaObject summary statistics (no DB, no I/O).

Rubin's ``AssociationTask`` and ``DiaObjectCalculationTask`` (as in Rubin's ap_pipe) on
column sets: ``dict[str, numpy.ndarray]`` keyed by APDB column names (schema 10.0.0).

- :func:`dia_source_ids` / :func:`dia_forced_source_ids`: ``(ccd_visit_id << 20) | n`` with
  ``ccd_visit_id = visit * 100 + detector``.
- :func:`match_sources`: unit vectors and a :class:`scipy.spatial.cKDTree`; every pair within
  the radius is a candidate and pairs are taken nearest first, one-to-one.
- :func:`associate`: drop sources with NaN positions (Rubin does the same), match, give each
  source its ``diaObjectId``; an unmatched source starts a new DiaObject whose id is its
  own ``diaSourceId`` (Rubin's rule).
- :func:`compute_object_versions` (implemented in :mod:`apfast.dia.association_stats`): new
  DiaObject rows (one per id) from every DiaSource of each object, vectorised over objects.

The lead glues these to the APDB transaction (:mod:`apfast.dia.diapipe`). Nothing here reads
or writes files or databases, and no input array is modified.

Examples
--------
>>> import numpy as np
>>> src = {"diaSourceId": dia_source_ids(7, 35, 2), "ra": np.array([10.0, 10.1]), "dec": np.array([0.0, 0.0])}
>>> obj = {"diaObjectId": np.array([42]), "ra": np.array([10.0 + 0.2 / 3600]), "dec": np.array([0.0])}
>>> res = associate(src, obj, visit=7, detector=35, max_dist_arcsec=1.0)
>>> res.sources["diaObjectId"].tolist() == [42, int(src["diaSourceId"][1])]
True
>>> res.n_matched, res.n_new
(1, 1)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from apfast._configbase import ConfigSection, opt
from apfast.dia.association_stats import (
    BANDS,
    DIA_OBJECT_COLUMNS,
    _float_array,
    _int_ids,
    _n_rows,
    _require,
    compute_object_versions,
    dia_object_band_columns,
)
from apfast.errors import ApfastError, InputError

__all__ = [
    "BANDS",
    "DIA_OBJECT_COLUMNS",
    "ID_ROW_BITS",
    "AssociationConfig",
    "AssociationResult",
    "associate",
    "ccd_visit_id",
    "compute_object_versions",
    "dia_forced_source_ids",
    "dia_object_band_columns",
    "dia_source_ids",
    "match_sources",
    "unit_vectors",
]

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]

#: Bits of a source/forced-source id that hold the row number within a CCD-visit.
ID_ROW_BITS = 20
_MAX_ROWS = 1 << ID_ROW_BITS
#: Largest visit whose ids still fit an int64 after the shift.
_MAX_VISIT = ((1 << (63 - ID_ROW_BITS)) - 1) // 100 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationConfig(ConfigSection):
    """Matching DIA sources to DiaObjects (``association``)."""

    max_dist_arcsec: float = opt(
        1.0, "Largest source-object separation that still associates, in arcsec (Rubin maxDistArcSeconds)."
    )
    pixel_margin: int = opt(
        300, "Pixels by which the CCD box is grown for the DiaObject region load (Rubin pixelMargin)."
    )

    def _validate(self) -> None:
        d = self.max_dist_arcsec
        if not (math.isfinite(d) and 0 < d <= 3600):
            self._fail("max_dist_arcsec", d, "use a finite radius > 0 and <= 3600 arcsec, e.g. 1.0")
        if self.pixel_margin < 0:
            self._fail("pixel_margin", self.pixel_margin, "use a margin >= 0 pixels, e.g. 300")


# ---------------------------------------------------------------------------------------------- ids


def ccd_visit_id(visit: int, detector: int) -> int:
    """Return ``visit * 100 + detector`` after checking both fit the id scheme.

    Raises
    ------
    ApfastError
        If ``detector`` is outside 0..99 or ``visit`` is negative or too large for int64 ids.

    Examples
    --------
    >>> ccd_visit_id(289400, 35)
    28940035
    """
    visit, detector = int(visit), int(detector)
    if not 0 <= detector <= 99:
        msg = f"detector {detector} cannot form a ccdVisitId (visit*100 + detector): use a detector number 0..99"
        raise ApfastError(msg)
    if not 0 <= visit <= _MAX_VISIT:
        msg = f"visit {visit} cannot form a 64-bit DIA source id: use a visit number 0..{_MAX_VISIT}"
        raise ApfastError(msg)
    return visit * 100 + detector


def _row_ids(visit: int, detector: int, n: int, what: str) -> np.ndarray:
    n = int(n)
    if not 0 <= n <= _MAX_ROWS:
        msg = (f"{n} {what} rows for visit {visit} detector {detector} do not fit the "
               f"{ID_ROW_BITS}-bit row field of the id: at most {_MAX_ROWS} rows per CCD-visit; "
               f"raise the detection threshold or split the catalogue")
        raise ApfastError(msg)
    return (np.int64(ccd_visit_id(visit, detector)) << np.int64(ID_ROW_BITS)) | np.arange(n, dtype=np.int64)


def dia_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Return the ``diaSourceId`` of rows ``0..n-1`` of one CCD-visit's DIA source catalogue.

    ``diaSourceId = ((visit * 100 + detector) << 20) | row``.

    Parameters
    ----------
    visit, detector : int
        The CCD-visit (DECam detector = ccdnum).
    n : int
        Number of rows (at most ``2**20``).

    Returns
    -------
    ndarray of int64, shape (n,)

    Raises
    ------
    ApfastError
        If ``n`` exceeds ``2**20`` or the visit/detector do not fit the scheme.

    Examples
    --------
    >>> ids = dia_source_ids(289400, 35, 3)
    >>> (ids >> 20).tolist(), (ids & (2**20 - 1)).tolist()
    ([28940035, 28940035, 28940035], [0, 1, 2])
    """
    return _row_ids(visit, detector, n, "DIA source")


def dia_forced_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Return the ``diaForcedSourceId`` of rows ``0..n-1`` of one CCD-visit's forced sources.

    Same scheme as :func:`dia_source_ids`: ``((visit * 100 + detector) << 20) | row``.

    Examples
    --------
    >>> int(dia_forced_source_ids(1, 2, 1)[0]) == (102 << 20)
    True
    """
    return _row_ids(visit, detector, n, "forced source")


# ---------------------------------------------------------------------------------------- matching


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Return unit vectors of sky positions.

    Parameters
    ----------
    ra, dec : array_like of float, shape (n,)
        Degrees.

    Returns
    -------
    ndarray of float64, shape (n, 3)
        ``(cos dec cos ra, cos dec sin ra, sin dec)``.
    """
    r = np.radians(np.asarray(ra, dtype=np.float64))
    d = np.radians(np.asarray(dec, dtype=np.float64))
    c = np.cos(d)
    return np.column_stack((c * np.cos(r), c * np.sin(r), np.sin(d)))


def _candidate_objects(src_dec: np.ndarray, obj_dec: np.ndarray, r_deg: float) -> np.ndarray:
    """Indices of objects within ``r_deg`` in dec of some source (|ddec| <= angular distance, so exact)."""
    s = np.sort(src_dec)
    lo, hi = s - r_deg, s + r_deg
    start = np.flatnonzero(np.r_[True, lo[1:] > hi[:-1]])  # merge the equal-width strips
    end = np.r_[start[1:], len(s)] - 1
    k = np.searchsorted(lo[start], obj_dec, side="right") - 1
    ok = k >= 0
    ok[ok] = obj_dec[ok] <= hi[end[k[ok]]]
    return np.flatnonzero(ok)


def _greedy_one_to_one(si: np.ndarray, oi: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Positions of the accepted pairs: nearest first, ties by source then object index."""
    order = np.lexsort((oi, si, dist))
    used_s: set[int] = set()
    used_o: set[int] = set()
    keep = []
    for k, s, o in zip(order.tolist(), si[order].tolist(), oi[order].tolist(), strict=True):
        if s in used_s or o in used_o:
            continue
        used_s.add(s)
        used_o.add(o)
        keep.append(k)
    return np.asarray(keep, dtype=np.int64)


def match_sources(src_ra: Any, src_dec: Any, obj_ra: Any, obj_dec: Any, *,
                  max_dist_arcsec: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match sources to objects one-to-one, nearest pairs first, within a radius.

    Every (source, object) pair closer than ``max_dist_arcsec`` is a candidate. The
    candidates are taken in order of increasing distance (ties: lower source index, then
    lower object index) and a pair is accepted when neither its source nor its object is
    already taken: each object gets at most one source and each source at most one object,
    as in Rubin's ``AssociationTask``. Positions with NaN never match.

    Candidates come from a :class:`scipy.spatial.cKDTree` on unit vectors (chord distance,
    exact at the 0/360 wrap and at the poles); only objects within the radius in dec of
    some source are put in the tree, which keeps a 10^5-object region cheap.

    Parameters
    ----------
    src_ra, src_dec : array_like of float, shape (n,)
        Source positions, degrees.
    obj_ra, obj_dec : array_like of float, shape (m,)
        Object positions, degrees.
    max_dist_arcsec : float
        Match radius (inclusive), arcsec; finite and > 0.

    Returns
    -------
    src_index : ndarray of int64, shape (k,)
        Matched source rows, increasing.
    obj_index : ndarray of int64, shape (k,)
        The object row matched to each.
    dist_arcsec : ndarray of float64, shape (k,)
        Angular separation of each pair, arcsec.

    Raises
    ------
    InputError
        For arrays of different lengths, not 1-D, or a bad radius.

    Examples
    --------
    >>> s, o, d = match_sources([0.0, 0.0], [0.0, 0.5 / 3600], [0.0], [0.2 / 3600], max_dist_arcsec=1.0)
    >>> s.tolist(), o.tolist(), round(float(d[0]), 6)
    ([0], [0], 0.2)
    """
    sra, sdec = _float_array(src_ra, "src_ra"), _float_array(src_dec, "src_dec")
    ora, odec = _float_array(obj_ra, "obj_ra"), _float_array(obj_dec, "obj_dec")
    if len(sra) != len(sdec) or len(ora) != len(odec):
        msg = (f"ra and dec lengths differ (sources {len(sra)} vs {len(sdec)}, objects {len(ora)} vs "
               f"{len(odec)}): pass one ra and one dec per row")
        raise InputError(msg)
    r_arcsec = float(max_dist_arcsec)
    if not (math.isfinite(r_arcsec) and 0 < r_arcsec <= 3600 * 180):
        msg = f"max_dist_arcsec = {max_dist_arcsec!r} is invalid: use a finite radius > 0, e.g. 1.0"
        raise InputError(msg)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    s_ok = np.flatnonzero(np.isfinite(sra) & np.isfinite(sdec))
    o_ok = np.flatnonzero(np.isfinite(ora) & np.isfinite(odec))
    if len(s_ok) == 0 or len(o_ok) == 0:
        return empty
    r_rad = math.radians(r_arcsec / 3600.0)
    pad = 1e-9 * r_arcsec / 3600.0 + 1e-12  # float slack on the cheap dec pre-cut only
    o_ok = o_ok[_candidate_objects(sdec[s_ok], odec[o_ok], r_arcsec / 3600.0 + pad)]
    if len(o_ok) == 0:
        return empty
    sv = unit_vectors(sra[s_ok], sdec[s_ok])
    ov = unit_vectors(ora[o_ok], odec[o_ok])
    chord = 2.0 * math.sin(r_rad / 2.0)
    tree = cKDTree(ov, balanced_tree=False, compact_nodes=False)
    hits = tree.query_ball_point(sv, chord * (1 + 1e-9), return_sorted=False)
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    if counts.sum() == 0:
        return empty
    si = np.repeat(np.arange(len(s_ok), dtype=np.int64), counts)
    oi = np.fromiter((j for h in hits for j in h), dtype=np.int64, count=int(counts.sum()))
    c = np.sqrt(np.sum((sv[si] - ov[oi]) ** 2, axis=1))
    dist = np.degrees(2.0 * np.arcsin(np.minimum(c / 2.0, 1.0))) * 3600.0
    within = dist <= r_arcsec
    si, oi, dist = si[within], oi[within], dist[within]
    keep = _greedy_one_to_one(si, oi, dist)
    if len(keep) == 0:
        return empty
    s_idx, o_idx, d = s_ok[si[keep]], o_ok[oi[keep]], dist[keep]
    order = np.argsort(s_idx, kind="stable")
    return s_idx[order], o_idx[order], d[order]


# -------------------------------------------------------------------------------------- associate


@dataclass(frozen=True, slots=True)
class AssociationResult:
    """The sources of one CCD-visit with their ``diaObjectId``, and what happened to them.

    Attributes
    ----------
    sources : dict of str to ndarray
        The input sources without the NaN-position rows, as new arrays, with
        ``diaObjectId`` (int64) filled: the matched object's id, or for a new object the
        source's own ``diaSourceId``.
    matched_object_ids : ndarray of int64
        Ids of the existing objects that got a source, in source order.
    new_object_ids : ndarray of int64
        Ids of the new objects (= the ``diaSourceId`` of their first source), in source order.
    n_matched, n_new : int
        Their counts.
    dropped_source_ids : ndarray of int64
        ``diaSourceId`` of the sources dropped for a NaN ra or dec (Rubin drops them too).
    n_dropped : int
        Their count.
    distance_arcsec : ndarray of float64
        Per row of ``sources``: separation from the matched object, NaN for new objects.
    """

    sources: Columns
    matched_object_ids: np.ndarray
    new_object_ids: np.ndarray
    n_matched: int
    n_new: int
    dropped_source_ids: np.ndarray
    n_dropped: int
    distance_arcsec: np.ndarray


def associate(sources: Mapping[str, Any], objects: Mapping[str, Any] | None, *, visit: int, detector: int,
              max_dist_arcsec: float) -> AssociationResult:
    """Associate one CCD-visit's DIA sources with the DiaObjects around it.

    Sources with a NaN ``ra`` or ``dec`` are dropped and reported. The rest are matched
    with :func:`match_sources`: a matched source takes the object's ``diaObjectId``; an
    unmatched one starts a new DiaObject whose id is the source's own ``diaSourceId``.
    The inputs are not modified.

    Parameters
    ----------
    sources : dict of str to ndarray
        DIA sources of this CCD-visit with at least ``diaSourceId``, ``ra``, ``dec``
        (degrees). ``diaSourceId`` must come from :func:`dia_source_ids` for this
        visit and detector; ``visit``/``detector`` columns, if present, must match.
    objects : dict of str to ndarray, or None
        The current DiaObject versions in the region, with at least ``diaObjectId``,
        ``ra``, ``dec``. ``None`` or an empty dict means no objects.
    visit, detector : int
        The CCD-visit.
    max_dist_arcsec : float
        Match radius, arcsec (``association.max_dist_arcsec``).

    Returns
    -------
    AssociationResult

    Raises
    ------
    InputError
        Missing columns, unequal column lengths, source ids of another CCD-visit, or
        an object id present twice whose rows both matched a source.

    Examples
    --------
    >>> src = {"diaSourceId": dia_source_ids(1, 1, 1), "ra": np.array([5.0]), "dec": np.array([-3.0])}
    >>> associate(src, None, visit=1, detector=1, max_dist_arcsec=1.0).n_new
    1
    """
    _require(sources, "sources", ("diaSourceId", "ra", "dec"))
    n = _n_rows(sources, "sources")
    ids = _int_ids(sources["diaSourceId"], "diaSourceId")
    cvid = ccd_visit_id(visit, detector)
    bad = np.flatnonzero((ids >> ID_ROW_BITS) != cvid)
    if len(bad):
        msg = (f"sources row {int(bad[0])} has diaSourceId {int(ids[bad[0]])}, which is not of visit {visit} "
               f"detector {detector}: make ids with apfast.dia.association.dia_source_ids({visit}, {detector}, n)")
        raise InputError(msg)
    for col, want in (("visit", visit), ("detector", detector)):
        if col in sources:
            wrong = np.flatnonzero(_float_array(sources[col], col) != want)
            if len(wrong):
                msg = (f"sources column '{col}' holds {np.asarray(sources[col])[wrong[0]]!r} at row {int(wrong[0])} "
                       f"but the CCD-visit is visit={visit} detector={detector}: pass one CCD-visit at a time")
                raise InputError(msg)
    ra, dec = _float_array(sources["ra"], "ra"), _float_array(sources["dec"], "dec")
    keep = np.isfinite(ra) & np.isfinite(dec)
    dropped = ids[~keep]
    if len(dropped):
        log.warning("visit %d detector %d: dropped %d of %d DIA sources with NaN ra/dec before association",
                    visit, detector, len(dropped), n)
    rows = np.flatnonzero(keep)
    out: Columns = {k: np.asarray(v)[rows] for k, v in sources.items()}
    src_ids = ids[rows]
    obj_id_col = np.zeros(0, np.int64)
    if objects:
        m = _n_rows(objects, "objects")
        if m:
            _require(objects, "objects", ("diaObjectId", "ra", "dec"))
            obj_id_col = _int_ids(objects["diaObjectId"], "diaObjectId")
    if len(obj_id_col):
        si, oi, d = match_sources(ra[rows], dec[rows], objects["ra"], objects["dec"],  # type: ignore[index]
                                  max_dist_arcsec=max_dist_arcsec)
    else:
        si, oi, d = match_sources(ra[rows], dec[rows], [], [], max_dist_arcsec=max_dist_arcsec)
    matched_ids = obj_id_col[oi]
    if len(np.unique(matched_ids)) != len(matched_ids):  # only matched ids: np.unique of a region is slow
        u, cnt = np.unique(matched_ids, return_counts=True)
        msg = (f"objects holds diaObjectId {int(u[cnt > 1][0])} more than once and both rows matched a source: "
               f"pass only the current version of each DiaObject (validityEndMjdTai IS NULL)")
        raise InputError(msg)
    dia_obj = src_ids.copy()
    dia_obj[si] = matched_ids
    dist = np.full(len(rows), np.nan)
    dist[si] = d
    is_new = np.ones(len(rows), bool)
    is_new[si] = False
    out["diaObjectId"] = dia_obj
    log.info("visit %d detector %d: %d sources matched existing DiaObjects, %d new", visit, detector,
             len(si), int(is_new.sum()))
    return AssociationResult(
        sources=out,
        matched_object_ids=dia_obj[si],
        new_object_ids=src_ids[is_new],
        n_matched=len(si),
        n_new=int(is_new.sum()),
        dropped_source_ids=dropped,
        n_dropped=len(dropped),
        distance_arcsec=dist,
    )
