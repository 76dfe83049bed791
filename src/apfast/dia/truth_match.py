"""Match DIA sources to what is known to be there: injected fakes and simulated truth (no I/O).

The pure half of ``apfast verify`` (:mod:`apfast.run.verify` reads the inputs):

- :func:`match_nearest` pairs each truth entry with its nearest DIA source within a radius;
- :func:`explained_by_truth` says which DIA sources a real change in a simulated sky explains
  (a transient of that visit, a variable star, or a star that moved by its proper motion);
- :func:`completeness` bins detected / total against magnitude or expected S/N;
- :func:`pull_stats` summarises ``(measured - true) / error`` by its median and a robust sigma.

Angles are in degrees, separations in arcsec.

Examples
--------
>>> import numpy as np
>>> src_ra, src_dec = np.array([10.0, 10.001]), np.array([-5.0, -5.0])
>>> match_nearest(src_ra, src_dec, np.array([10.0001, 11.0]), np.array([-5.0, -5.0]), 1.0).tolist()
[0, -1]
>>> [(r.lo, r.n, r.n_detected) for r in completeness(np.array([20.1, 20.7, 21.2]), np.array([True, False, True]),
...                                                     [20.0, 20.5, 21.0, 21.5])]
[(20.0, 1, 1), (20.5, 1, 0), (21.0, 1, 1)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MOVER_PM_MAS_PER_YR",
    "CompletenessBin",
    "completeness",
    "explained_by_truth",
    "match_nearest",
    "pull_stats",
    "robust_sigma",
    "sep_arcsec",
]

#: A star whose proper motion is at least this (mas/yr) leaves a dipole between template and science
#: epochs (about a year apart in the simulation).
MOVER_PM_MAS_PER_YR: float = 20.0


def sep_arcsec(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> np.ndarray:
    """Angular separation (arcsec) of positions in degrees; the arguments broadcast together.

    Examples
    --------
    >>> round(float(sep_arcsec(0.0, 0.0, 0.0, 1.0 / 3600)), 6)
    1.0
    """
    r = np.radians
    ra1, dec1, ra2, dec2 = (np.asarray(a, dtype=np.float64) for a in (ra1, dec1, ra2, dec2))
    # haversine: accurate for the sub-arcsecond separations matching cares about
    s = np.sin(0.5 * r(dec2 - dec1)) ** 2 + np.cos(r(dec1)) * np.cos(r(dec2)) * np.sin(0.5 * r(ra2 - ra1)) ** 2
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0)))) * 3600.0


def match_nearest(src_ra: Any, src_dec: Any, ref_ra: Any, ref_dec: Any, radius_arcsec: float) -> np.ndarray:
    """Index of the nearest source within ``radius_arcsec`` of each reference position, or -1.

    Several references may share a source (two fakes closer than the radius both match it).

    Parameters
    ----------
    src_ra, src_dec : array_like, shape (n,)
        DIA source positions (deg).
    ref_ra, ref_dec : array_like, shape (m,)
        Truth positions (deg).
    radius_arcsec : float

    Returns
    -------
    ndarray of int64, shape (m,)
    """
    sra, sdec = np.asarray(src_ra, float), np.asarray(src_dec, float)
    rra, rdec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    out = np.full(rra.shape[0], -1, np.int64)
    if sra.size == 0 or rra.size == 0:
        return out
    step = max(1, 2_000_000 // sra.size)  # bound the (m, n) separation block
    for a in range(0, rra.size, step):
        sep = sep_arcsec(sra[None, :], sdec[None, :], rra[a : a + step, None], rdec[a : a + step, None])
        j = np.argmin(sep, axis=1)
        ok = sep[np.arange(j.size), j] < radius_arcsec
        out[a : a + step] = np.where(ok, j, -1)
    return out


def explained_by_truth(ra: Any, dec: Any, visit: int, transients: dict[str, np.ndarray],
                       sources: dict[str, np.ndarray] | None, *, transient_radius: float = 2.0,
                       mover_radius: float = 2.5) -> np.ndarray:
    """Which DIA sources of one visit a real change in the simulated sky explains.

    A source is explained by a simulated transient of that visit within ``transient_radius``
    arcsec, or by a variable star or a star with proper motion >= :data:`MOVER_PM_MAS_PER_YR` within
    ``mover_radius`` (their catalogue positions are at the reference epoch, off by up to 0.3"/yr).

    Parameters
    ----------
    ra, dec : array_like, shape (n,)
        DIA sources of the visit (deg).
    visit : int
    transients : dict of str to ndarray
        ``truth/transients.csv`` columns ``visit``, ``ra``, ``dec`` (already cut to the CCD).
    sources : dict of str to ndarray, optional
        ``truth/sources.csv`` columns ``ra``, ``dec``, ``pmra``, ``pmdec`` (mas/yr), ``variable``.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    out = np.zeros(ra.size, bool)
    if ra.size == 0:
        return out
    tv = np.asarray(transients["visit"]).astype(np.int64) == int(visit)
    if tv.any():
        tra, tdec = np.asarray(transients["ra"], float)[tv], np.asarray(transients["dec"], float)[tv]
        out |= match_nearest(tra, tdec, ra, dec, transient_radius) >= 0
    if sources is not None and len(sources["ra"]):
        pm = np.hypot(np.asarray(sources["pmra"], float), np.asarray(sources["pmdec"], float))
        mover = np.asarray(sources["variable"]).astype(bool) | (pm >= MOVER_PM_MAS_PER_YR)
        if mover.any():
            mra, mdec = np.asarray(sources["ra"], float)[mover], np.asarray(sources["dec"], float)[mover]
            out |= match_nearest(mra, mdec, ra, dec, mover_radius) >= 0
    return out


@dataclass(frozen=True, slots=True)
class CompletenessBin:
    """One bin of a completeness curve: ``[lo, hi)``, entries, detected entries, their fraction (NaN if empty)."""

    lo: float
    hi: float
    n: int
    n_detected: int

    @property
    def fraction(self) -> float:
        """``n_detected / n``, NaN for an empty bin."""
        return self.n_detected / self.n if self.n else float("nan")


def completeness(values: Any, detected: Any, edges: Sequence[float]) -> list[CompletenessBin]:
    """Detected fraction in bins ``[edges[i], edges[i + 1])`` of ``values`` (magnitude, S/N ...).

    Parameters
    ----------
    values : array_like of float, shape (n,)
    detected : array_like of bool, shape (n,)
    edges : sequence of float
        Increasing bin edges; ``inf`` closes an open-ended last bin.

    Returns
    -------
    list of CompletenessBin
    """
    v, d = np.asarray(values, float), np.asarray(detected, bool)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (v >= lo) & (v < hi)
        out.append(CompletenessBin(float(lo), float(hi), int(inside.sum()), int((inside & d).sum())))
    return out


def robust_sigma(x: Any) -> float:
    """1.4826 times the median absolute deviation (the standard deviation for Gaussian data); NaN if empty.

    Examples
    --------
    >>> robust_sigma([1.0, 2.0, 3.0])
    1.4826
    """
    a = np.asarray(x, float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def pull_stats(measured: Any, true: Any, err: Any) -> dict[str, float]:
    """``n``, ``median`` and ``robust_sigma`` of ``(measured - true) / err`` over finite entries.

    For unbiased fluxes with right errors the median is ~0 and the robust sigma ~1.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (np.asarray(measured, float) - np.asarray(true, float)) / np.asarray(err, float)
    p = p[np.isfinite(p)]
    return {"n": int(p.size), "median": float(np.median(p)) if p.size else float("nan"),
            "robust_sigma": robust_sigma(p)}
