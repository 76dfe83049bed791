"""DiaObject summary statistics from DiaSource history (Rubin's ``DiaObjectCalculationTask``; no I/O).

:func:`compute_object_versions` builds full DiaObject rows (APDB schema 10.0.0, all
columns but ``pixelId``) for a set of object ids from every DiaSource of each object,
vectorised over objects: ``np.bincount`` sums per object and one sort per band, no
Python loop per object. :mod:`apfast.dia.association` re-exports everything public here,
and the small column-set helpers below are shared with it.

Column sets are ``dict[str, numpy.ndarray]`` keyed by APDB column names; NULL is NaN
(floats may also come as object arrays holding ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from apfast.errors import InputError

__all__ = ["BANDS", "DIA_OBJECT_COLUMNS", "compute_object_versions", "dia_object_band_columns"]

Columns = dict[str, np.ndarray]

#: The six Rubin bands with per-band DiaObject columns, in schema order.
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")


def dia_object_band_columns(band: str) -> tuple[str, ...]:
    """Return the DiaObject columns that hold per-band statistics of ``band``.

    Parameters
    ----------
    band : str
        One of :data:`BANDS`.

    Returns
    -------
    tuple of str
        ``{band}_psfFluxMean`` ... ``{band}_psfFluxErrMean`` (12 names).

    Examples
    --------
    >>> dia_object_band_columns("g")[:2]
    ('g_psfFluxMean', 'g_psfFluxMeanErr')
    """
    return tuple(f"{band}_{c}" for c in (
        "psfFluxMean", "psfFluxMeanErr", "psfFluxSigma", "psfFluxNdata", "fpFluxMean", "fpFluxMeanErr",
        "scienceFluxMean", "scienceFluxMeanErr", "psfFluxMin", "psfFluxMax", "psfFluxMaxSlope",
        "psfFluxErrMean"))


def _schema_columns() -> tuple[str, ...]:
    cols = ["diaObjectId", "validityStartMjdTai", "validityEndMjdTai", "ra", "raErr", "dec", "decErr", "ra_dec_Cov"]
    for b in BANDS:
        cols += [f"{b}_psfFluxMean", f"{b}_psfFluxMeanErr", f"{b}_psfFluxSigma", f"{b}_psfFluxNdata",
                 f"{b}_fpFluxMean", f"{b}_fpFluxMeanErr"]
    cols += [f"{b}_scienceFlux{s}" for b in BANDS for s in ("Mean", "MeanErr")]
    cols += [f"{b}_psfFlux{s}" for b in BANDS for s in ("Min", "Max", "MaxSlope", "ErrMean")]
    cols += ["firstDiaSourceMjdTai", "lastDiaSourceMjdTai", "nDiaSources"]
    return tuple(cols)


#: DiaObject columns written by :func:`compute_object_versions`, in APDB schema order
#: (every column of schema 10.0.0 except ``pixelId``, which the APDB layer computes).
DIA_OBJECT_COLUMNS: tuple[str, ...] = _schema_columns()
_INT_COLUMNS = frozenset({"diaObjectId", "nDiaSources", *(f"{b}_psfFluxNdata" for b in BANDS)})


# ------------------------------------------------------------------------------ column-set helpers


def _float_array(values: Any, name: str) -> np.ndarray:
    """1-D float64 copy-free view where possible; ``None`` in object arrays becomes NaN."""
    a = np.asarray(values)
    if a.dtype.kind == "O":
        a = np.where(a == None, np.nan, a)  # noqa: E711 - elementwise on an object array, not an identity test
    try:
        a = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        msg = f"column '{name}' must be numeric (got dtype {np.asarray(values).dtype}): {exc}"
        raise InputError(msg) from None
    if a.ndim != 1:
        msg = f"column '{name}' must be 1-D, got shape {a.shape}; pass one value per row"
        raise InputError(msg)
    return a

def _n_rows(cols: Mapping[str, Any], name: str) -> int:
    lengths = {k: len(np.asarray(v)) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        msg = f"the columns of {name} have different lengths {lengths}: a column set needs one value per row"
        raise InputError(msg)
    return next(iter(lengths.values()), 0)


def _require(cols: Mapping[str, Any], name: str, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in cols]
    if missing:
        msg = (f"{name} lacks the column(s) {missing} (has {sorted(cols)[:12]}...): add them under their "
               f"APDB names")
        raise InputError(msg)


def _int_ids(values: Any, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    f = _float_array(a, name)
    if not np.all(np.isfinite(f)):
        msg = f"column '{name}' has NULL/NaN ids at rows {np.flatnonzero(~np.isfinite(f))[:5].tolist()}: fill them"
        raise InputError(msg)
    return f.astype(np.int64)


# ----------------------------------------------------------------------------- DiaObject statistics


def _segments(g_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of the runs of equal values in a sorted group array, and the run's group."""
    if len(g_sorted) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    return starts, g_sorted[starts]


def _weighted_mean(g: np.ndarray, value: np.ndarray, err: np.ndarray, n_groups: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean, its error and the number of rows used, per group.

    Rows with a non-finite value, or an error that is non-finite or <= 0, are left out
    (Rubin drops NaN flux or error). Groups with no usable row get NaN, NaN, 0.
    """
    ok = np.isfinite(value) & np.isfinite(err) & (err > 0)
    gk = g[ok]
    w = 1.0 / err[ok] ** 2
    sw = np.bincount(gk, weights=w, minlength=n_groups)
    swx = np.bincount(gk, weights=w * value[ok], minlength=n_groups)
    n = np.bincount(gk, minlength=n_groups).astype(np.int64)
    has = sw > 0
    mean = np.full(n_groups, np.nan)
    mean_err = np.full(n_groups, np.nan)
    mean[has] = swx[has] / sw[has]
    mean_err[has] = np.sqrt(1.0 / sw[has])
    return mean, mean_err, n


def _coordinate_weights(g: np.ndarray, err: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weights ``1/err**2`` for groups whose errors are all finite and > 0, else 1 (unweighted)."""
    valid = np.isfinite(err) & (err > 0)
    weighted = np.bincount(g[~valid], minlength=n_groups) == 0
    use = np.take(weighted, g)
    w = np.ones(len(g))
    w[use] = 1.0 / err[use] ** 2
    return w, weighted


def _mean_positions(g: np.ndarray, n_groups: int, ra: np.ndarray, dec: np.ndarray, ra_err: np.ndarray,
                    dec_err: np.ndarray, cov: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted mean positions in the tangent plane at each group's mean unit vector.

    ``xi`` (east) is averaged with ``1/raErr**2`` and ``eta`` (north) with ``1/decErr**2``;
    a group with any missing error in a coordinate is averaged unweighted in it and its
    error is NaN. Working in the tangent plane makes the 0/360 wrap and the poles safe.
    """
    r, d = np.radians(ra), np.radians(dec)
    cd = np.cos(d)
    vx, vy, vz = cd * np.cos(r), cd * np.sin(r), np.sin(d)
    # tangent point: the normalised sum of each group's unit vectors, with east and north unit vectors
    cx, cy, cz = (np.bincount(g, weights=w, minlength=n_groups) for w in (vx, vy, vz))
    norm = np.sqrt(cx * cx + cy * cy + cz * cz)
    cx, cy, cz = cx / norm, cy / norm, cz / norm
    rho = np.hypot(cx, cy)  # cos(dec0); 0 exactly at a pole, where any east will do
    at_pole = rho == 0
    rho_s = np.where(at_pole, 1.0, rho)
    ex, ey = np.where(at_pole, 0.0, -cy / rho_s), np.where(at_pole, 1.0, cx / rho_s)
    nx, ny, nz = -cz * ey, cz * ex, rho  # north = c x east: (-sin d0 cos a0, -sin d0 sin a0, cos d0)
    pc = vx * np.take(cx, g) + vy * np.take(cy, g) + vz * np.take(cz, g)
    xi = (vx * np.take(ex, g) + vy * np.take(ey, g)) / pc
    eta = (vx * np.take(nx, g) + vy * np.take(ny, g) + vz * np.take(nz, g)) / pc
    w_ra, ra_weighted = _coordinate_weights(g, ra_err, n_groups)
    w_dec, dec_weighted = _coordinate_weights(g, dec_err, n_groups)
    sw_ra = np.bincount(g, weights=w_ra, minlength=n_groups)
    sw_dec = np.bincount(g, weights=w_dec, minlength=n_groups)
    xi_m = np.bincount(g, weights=w_ra * xi, minlength=n_groups) / sw_ra
    eta_m = np.bincount(g, weights=w_dec * eta, minlength=n_groups) / sw_dec
    px = cx + xi_m * ex + eta_m * nx
    py = cy + xi_m * ey + eta_m * ny
    pz = cz + eta_m * nz
    out = {
        "ra": np.degrees(np.arctan2(py, px)) % 360.0,
        "dec": np.degrees(np.arctan2(pz, np.hypot(px, py))),
        "raErr": np.where(ra_weighted, np.sqrt(1.0 / sw_ra), np.nan),
        "decErr": np.where(dec_weighted, np.sqrt(1.0 / sw_dec), np.nan),
    }
    cov_ok = ra_weighted & dec_weighted & (np.bincount(g[~np.isfinite(cov)], minlength=n_groups) == 0)
    use = np.take(cov_ok, g)
    s_cov = np.bincount(g[use], weights=(w_ra * w_dec * cov)[use], minlength=n_groups)
    out["ra_dec_Cov"] = np.where(cov_ok, s_cov / (sw_ra * sw_dec), np.nan)
    out["ra"][out["ra"] >= 360.0] = 0.0  # -tiny % 360 rounds to 360.0
    return out


def _band_stats(g: np.ndarray, n_groups: int, flux: np.ndarray, err: np.ndarray, t: np.ndarray
                ) -> dict[str, np.ndarray]:
    """psfFlux statistics of one band per group (see :func:`compute_object_versions`)."""
    out: dict[str, np.ndarray] = {}
    out["psfFluxMean"], out["psfFluxMeanErr"], out["psfFluxNdata"] = _weighted_mean(g, flux, err, n_groups)
    fin = np.isfinite(flux)
    gf, ff, tf = g[fin], flux[fin], t[fin]
    nf = np.bincount(gf, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        fmean = np.bincount(gf, weights=ff, minlength=n_groups) / nf
        ss = np.bincount(gf, weights=(ff - np.take(fmean, gf)) ** 2, minlength=n_groups)
        out["psfFluxSigma"] = np.where(nf > 1, np.sqrt(ss / np.maximum(nf - 1, 1)), np.nan)
    efin = np.isfinite(err)
    ne = np.bincount(g[efin], minlength=n_groups)
    se = np.bincount(g[efin], weights=err[efin], minlength=n_groups)
    out["psfFluxErrMean"] = np.where(ne > 0, se / np.maximum(ne, 1), np.nan)
    # min, max and max slope from one sort: by group, then time, then flux (NaN times last)
    order = _sort_group_time(gf, tf, ff, n_groups)
    gs, fs, ts = gf[order], ff[order], tf[order]
    starts, grp = _segments(gs)
    for name, ufunc in (("psfFluxMin", np.minimum), ("psfFluxMax", np.maximum)):
        col = np.full(n_groups, np.nan)
        if len(starts):
            col[grp] = ufunc.reduceat(fs, starts)
        out[name] = col
    slope_col = np.full(n_groups, np.nan)
    if len(gs) > 1:
        dt = np.diff(ts)
        ok = (gs[1:] == gs[:-1]) & (dt > 0)
        slope = np.abs(np.diff(fs)[ok]) / dt[ok]
        s_starts, s_grp = _segments(gs[:-1][ok])
        if len(s_starts):
            slope_col[s_grp] = np.maximum.reduceat(slope, s_starts)
    out["psfFluxMaxSlope"] = slope_col
    return out


def _sort_group_time(g: np.ndarray, t: np.ndarray, f: np.ndarray, n_groups: int) -> np.ndarray:
    """Order by group, then time, then value; same as ``np.lexsort((f, t, g))`` but faster.

    A stable time sort followed by a stable (radix, for < 2**16 groups) sort by group;
    the full three-key lexsort is used only when a group has two rows at the same time.
    """
    order = np.argsort(t, kind="stable")
    gt = g[order].astype(np.uint16 if n_groups < 2**16 else np.int64)
    order = order[np.argsort(gt, kind="stable")]
    gs, ts = g[order], t[order]
    if np.any((gs[1:] == gs[:-1]) & (ts[1:] == ts[:-1])):
        return np.lexsort((f, t, g))
    return order


def _band_mask(values: Any, band: str) -> np.ndarray:
    b = np.asarray(values)
    if b.dtype.kind == "S":
        return b == band.encode()
    return np.asarray(b == band, dtype=bool)


def _map_to_groups(ids: np.ndarray, order: np.ndarray, sorted_ids: np.ndarray, row_ids: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``row_ids`` that are in ``ids``, and the position in ``ids`` of each."""
    if len(sorted_ids) == 0 or len(row_ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, row_ids), len(sorted_ids) - 1)
    rows = np.flatnonzero(sorted_ids[pos] == row_ids)
    return rows, order[pos[rows]]


def _column(cols: Mapping[str, Any], key: str, rows: np.ndarray | None, n: int) -> np.ndarray:
    """Float column ``key`` at ``rows`` (None = all rows); NaN (NULL) if the column is absent."""
    if key not in cols:
        return np.full(n, np.nan)
    a = _float_array(cols[key], key)
    return a if rows is None else np.take(a, rows)


def _checked_ids(object_ids: Any, band: str, validity_start: float) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Validate band, validity start and ids: (vstart, ids, order, sorted_ids); InputError on a bad one."""
    if band not in BANDS:
        msg = f"band {band!r} has no DiaObject columns: use one of {', '.join(BANDS)}"
        raise InputError(msg)
    vstart = float(validity_start)
    if not math.isfinite(vstart):
        msg = f"validity_start = {validity_start!r} must be a finite MJD (the visit midpoint)"
        raise InputError(msg)
    ids = np.asarray(object_ids, dtype=np.int64).reshape(-1)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(dup):
        msg = f"object_ids lists diaObjectId {int(sorted_ids[dup[0]])} more than once: pass each id once"
        raise InputError(msg)
    return vstart, ids, order, sorted_ids


def _null_versions(ids: np.ndarray, vstart: float) -> Columns:
    """Output columns for ``ids``, all NULL (NaN, int 0) but ``diaObjectId`` and ``validityStartMjdTai``."""
    n_groups = len(ids)
    float_cols = [c for c in DIA_OBJECT_COLUMNS if c not in _INT_COLUMNS]
    block = np.full((len(float_cols), n_groups), np.nan)  # one allocation; each column is a row view
    out: Columns = {}
    for col in DIA_OBJECT_COLUMNS:
        out[col] = np.zeros(n_groups, np.int64) if col in _INT_COLUMNS else block[float_cols.index(col)]
    out["diaObjectId"] = ids.copy()
    out["validityStartMjdTai"][:] = vstart
    return out


def _group_history(
    history: Mapping[str, Any], ids: np.ndarray, order: np.ndarray, sorted_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The history rows of the asked-for objects: (rows, group of each, take (None = all rows), n_src per group)."""
    n_groups = len(ids)
    h_n = _n_rows(history, "history") if history else 0
    if h_n:
        _require(history, "history", ("diaObjectId", "ra", "dec", "midpointMjdTai", "band", "psfFlux",
                                      "psfFluxErr"))
    h_oid = _float_array(history["diaObjectId"], "diaObjectId") if h_n else np.zeros(0)
    h_ok = np.flatnonzero(np.isfinite(h_oid))
    sub, g = _map_to_groups(ids, order, sorted_ids, h_oid[h_ok].astype(np.int64))
    rows = h_ok[sub]
    take = None if len(rows) == h_n else rows  # usually every history row belongs to an asked-for object
    n_src = np.bincount(g, minlength=n_groups)
    if np.any(n_src == 0):
        missing = ids[n_src == 0]
        msg = (f"{len(missing)} object id(s) have no DiaSource in history (first: {missing[:5].tolist()}): "
               f"include every source of each object, or leave such ids out")
        raise InputError(msg)
    return rows, g, take, n_src


def _all_band_columns(
    out: Columns, history: Mapping[str, Any], g: np.ndarray, take: np.ndarray | None, nr: int, n_src: np.ndarray
) -> np.ndarray:
    """Fill position, counts and first/last times over all bands (in place); return the source times."""
    n_groups = len(n_src)
    pos = _mean_positions(g, n_groups, _column(history, "ra", take, nr), _column(history, "dec", take, nr),
                          _column(history, "raErr", take, nr), _column(history, "decErr", take, nr),
                          _column(history, "ra_dec_Cov", take, nr))
    out.update(pos)
    out["nDiaSources"] = n_src.astype(np.int64)
    t_all = _column(history, "midpointMjdTai", take, nr)
    first, last = np.full(n_groups, np.inf), np.full(n_groups, -np.inf)
    np.fmin.at(first, g, t_all)  # fmin/fmax skip NaN times
    np.fmax.at(last, g, t_all)
    out["firstDiaSourceMjdTai"] = np.where(np.isfinite(first), first, np.nan)
    out["lastDiaSourceMjdTai"] = np.where(np.isfinite(last), last, np.nan)
    return t_all


def _band_columns(
    out: Columns,
    history: Mapping[str, Any],
    band: str,
    rows: np.ndarray,
    g: np.ndarray,
    take: np.ndarray | None,
    t_all: np.ndarray,
    n_groups: int,
) -> None:
    """Fill the flux columns of ``band`` from its sources (in place)."""
    inb = _band_mask(history["band"], band)
    if take is not None:
        inb = inb[take]
    rb, gb = rows[inb], g[inb]
    stats = _band_stats(gb, n_groups, _column(history, "psfFlux", rb, len(rb)),
                        _column(history, "psfFluxErr", rb, len(rb)), t_all[inb])
    for name, stat in stats.items():
        out[f"{band}_{name}"] = stat
    sm, se, _ = _weighted_mean(gb, _column(history, "scienceFlux", rb, len(rb)),
                               _column(history, "scienceFluxErr", rb, len(rb)),
                               n_groups)
    out[f"{band}_scienceFluxMean"], out[f"{band}_scienceFluxMeanErr"] = sm, se


def _forced_flux_means(
    out: Columns, forced_history: Mapping[str, Any], band: str, ids: np.ndarray, order: np.ndarray,
    sorted_ids: np.ndarray
) -> None:
    """Fill ``{band}_fpFluxMean/MeanErr`` from the forced sources of ``band`` (in place)."""
    _require(forced_history, "forced_history", ("diaObjectId", "band", "psfFlux", "psfFluxErr"))
    f_oid = _float_array(forced_history["diaObjectId"], "diaObjectId")
    f_ok = np.flatnonzero(np.isfinite(f_oid) & _band_mask(forced_history["band"], band))
    fsub, fg = _map_to_groups(ids, order, sorted_ids, f_oid[f_ok].astype(np.int64))
    frows = f_ok[fsub]
    fm, fe, _ = _weighted_mean(fg, _float_array(forced_history["psfFlux"], "psfFlux")[frows],
                               _float_array(forced_history["psfFluxErr"], "psfFluxErr")[frows], len(ids))
    out[f"{band}_fpFluxMean"], out[f"{band}_fpFluxMeanErr"] = fm, fe


def compute_object_versions(object_ids: Any, history: Mapping[str, Any], *, band: str, validity_start: float,
                            prior: Mapping[str, Any] | None = None,
                            forced_history: Mapping[str, Any] | None = None) -> Columns:
    """Compute new DiaObject versions (full rows) from all DiaSources of each object.

    Rows of ``history`` whose ``diaObjectId`` is not in ``object_ids`` are ignored.
    Per object (one output row per id, in the order of ``object_ids``):

    - ``ra, dec``: mean position, in the tangent plane at the mean unit vector (safe at
      the 0/360 wrap and the poles), weighted by ``1/raErr**2`` and ``1/decErr**2``;
      unweighted in a coordinate if any source lacks a finite error > 0 in it.
      ``raErr``, ``decErr``: error of the weighted mean ``sqrt(1/sum w)`` (NaN when
      unweighted); ``ra_dec_Cov``: ``sum(w_ra w_dec cov) / (sum w_ra sum w_dec)`` (NaN
      unless both coordinates are weighted and every source has a covariance).
    - ``nDiaSources`` (all bands), ``firstDiaSourceMjdTai``, ``lastDiaSourceMjdTai``.
    - ``validityStartMjdTai = validity_start``; ``validityEndMjdTai = NaN`` (NULL).
    - Columns of ``band``, from its sources only:
      ``psfFluxMean`` / ``psfFluxMeanErr`` / ``psfFluxNdata``: inverse-variance weighted
      mean over sources with finite ``psfFlux`` and ``psfFluxErr > 0`` (Ndata = their
      count); ``psfFluxSigma``: sample standard deviation (ddof=1) of the finite fluxes,
      NaN for fewer than two; ``psfFluxMin`` / ``psfFluxMax``; ``psfFluxMaxSlope``: the
      largest ``|dflux/dt|`` (nJy/day) between time-consecutive sources (pairs with equal
      times skipped); ``psfFluxErrMean``: mean of the finite ``psfFluxErr``;
      ``scienceFluxMean/MeanErr``: weighted mean of ``scienceFlux``; ``fpFluxMean/MeanErr``:
      weighted mean of the ``psfFlux`` of ``forced_history`` rows of that band (copied
      from ``prior`` when ``forced_history`` is None).
    - Columns of the other bands are copied from the object's row in ``prior``, or are
      NULL (NaN; ``{b}_psfFluxNdata = 0``) when it has none.

    ``pixelId`` is not computed (the APDB layer adds it).

    Parameters
    ----------
    object_ids : array_like of int, shape (k,)
        Unique ids of the objects to compute.
    history : dict of str to ndarray
        DiaSource rows including the new ones; needs ``diaObjectId``, ``ra``, ``dec``,
        ``midpointMjdTai``, ``band``, ``psfFlux``, ``psfFluxErr``; uses ``raErr``,
        ``decErr``, ``ra_dec_Cov``, ``scienceFlux``, ``scienceFluxErr`` when present
        (missing = NULL). Floats may be object arrays with ``None`` for NULL.
    band : str
        The band of the current visit (one of ``u g r i z y``).
    validity_start : float
        ``validityStartMjdTai`` of the new versions (MJD TAI of the visit midpoint).
    prior : dict of str to ndarray, optional
        Current versions of (some of) the objects, one row per id, for the other bands.
    forced_history : dict of str to ndarray, optional
        DiaForcedSource rows (``diaObjectId``, ``band``, ``psfFlux``, ``psfFluxErr``).

    Returns
    -------
    dict of str to ndarray
        The columns :data:`DIA_OBJECT_COLUMNS`, each of length k: float64, with int64 for
        ``diaObjectId``, ``nDiaSources`` and ``{b}_psfFluxNdata``.

    Raises
    ------
    InputError
        Duplicate ids, an id with no row in ``history``, a missing column or a bad band.

    Examples
    --------
    >>> h = {"diaObjectId": np.array([5, 5]), "ra": np.array([1.0, 1.0]), "dec": np.array([2.0, 2.0]),
    ...      "midpointMjdTai": np.array([60000.0, 60001.0]), "band": np.array(["g", "g"]),
    ...      "psfFlux": np.array([100.0, 300.0]), "psfFluxErr": np.array([10.0, 10.0])}
    >>> o = compute_object_versions([5], h, band="g", validity_start=60001.0)
    >>> float(o["g_psfFluxMean"][0]), float(o["g_psfFluxMaxSlope"][0]), int(o["nDiaSources"][0])
    (200.0, 200.0, 2)
    """
    vstart, ids, order, sorted_ids = _checked_ids(object_ids, band, validity_start)
    n_groups = len(ids)
    out = _null_versions(ids, vstart)
    if n_groups == 0:
        return out

    rows, g, take, n_src = _group_history(history, ids, order, sorted_ids)
    t_all = _all_band_columns(out, history, g, take, len(rows), n_src)
    _band_columns(out, history, band, rows, g, take, t_all, n_groups)

    copy_cols = [c for b in BANDS if b != band for c in dia_object_band_columns(b)]
    if forced_history is not None and _n_rows(forced_history, "forced_history"):
        _forced_flux_means(out, forced_history, band, ids, order, sorted_ids)
    elif forced_history is None:
        copy_cols += [f"{band}_fpFluxMean", f"{band}_fpFluxMeanErr"]
    _copy_from_prior(out, prior, ids, order, sorted_ids, copy_cols)
    return out


def _copy_from_prior(out: Columns, prior: Mapping[str, Any] | None, ids: np.ndarray, order: np.ndarray,
                     sorted_ids: np.ndarray, columns: list[str]) -> None:
    """Fill ``columns`` of ``out`` (in place) from the matching rows of ``prior``; others stay NULL."""
    if not prior or _n_rows(prior, "prior") == 0:
        return
    _require(prior, "prior", ("diaObjectId",))
    pid = _int_ids(prior["diaObjectId"], "diaObjectId")
    u, cnt = np.unique(pid, return_counts=True)
    if np.any(cnt > 1):
        msg = (f"prior holds diaObjectId {int(u[cnt > 1][0])} {int(cnt[cnt > 1][0])} times: pass only the "
               f"current version of each DiaObject")
        raise InputError(msg)
    prow, pg = _map_to_groups(ids, order, sorted_ids, pid)
    for col in columns:
        if col not in prior:
            continue
        vals = _float_array(prior[col], col)[prow]
        if col in _INT_COLUMNS:
            out[col][pg] = np.where(np.isfinite(vals), vals, 0).astype(np.int64)
        else:
            out[col][pg] = vals
