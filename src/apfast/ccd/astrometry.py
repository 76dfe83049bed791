"""Astrometric calibration: triangle pattern matching to a reference catalogue, then a TAN-SIP fit.

The raw header WCS of a DECam CCD can be wrong by ~10 arcsec and ~0.1 deg, so
matching starts with a pattern matcher, not a nearest-neighbour guess:

1. Project the reference stars into pixels with the initial WCS.
2. Build every triangle of the ``n_bright`` brightest sources and references and
   describe each by its sorted side lengths (log scale, so the tolerance is relative)
   and the direction of its longest side. Because the pixel scale and orientation are
   known to a few percent and degrees, a triangle's absolute size and direction are
   strong constraints: this is the "optimistic pattern matcher" idea (Tabur 2007) with
   the prior of Rubin's ``MatchPessimisticB`` (max offset, max rotation).
3. Each pair of congruent triangles proposes a similarity transform; proposals vote in
   offset bins and the winner is verified by the number of all-source matches.
4. Iterate one-to-one nearest-neighbour matching (``scipy.spatial.cKDTree``) with a
   shrinking radius, and fit a TAN-SIP WCS by linear least squares on the gnomonic
   projection about a CRVAL re-centred on the CCD, rejecting outliers at
   ``rej_sigma`` times the robust RMS.

The fit (Shupe et al. 2005, SIP convention): with ``u = x - CRPIX1``,
``v = y - CRPIX2`` (0-based pixels here, 1-based in the FITS cards),
``[xi, eta] = CD @ [u + f(u, v), v + g(u, v)]``, ``f = sum A_pq u^p v^q``,
``g = sum B_pq u^p v^q`` over ``2 <= p + q <= order``. We fit ``xi`` and ``eta``
as full polynomials of total degree ``order`` in ``(u, v)``; the linear terms give
CD and ``CD^-1`` times the higher terms gives A and B. The inverse polynomials AP
and BP are fitted on a grid so FITS readers can go both ways.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from scipy.spatial import cKDTree

from apfast._configbase import ConfigSection, opt
from apfast.errors import AlgorithmError

__all__ = [
    "AstrometryConfig",
    "AstrometryError",
    "AstrometryResult",
    "fit_tan_sip",
    "match_nearest",
    "match_pattern",
    "solve_astrometry",
]


class AstrometryError(AlgorithmError):
    """Astrometry failed: too few sources, references or matches (numbers in ``metadata``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AstrometryConfig(ConfigSection):
    """Configuration of astrometric matching and fitting (``calibrate.astrometry``)."""

    _key_prefix: ClassVar[str] = "calibrate.astrometry."

    sip_order: int = opt(4, "Highest total polynomial order of the TAN-SIP fit (DECam: 4).")
    order_selection: Literal["cv", "fixed"] = opt(
        "cv",
        "How the fitted order is chosen up to sip_order.",
        choices={
            "cv": "5-fold cross-validation among orders 1..sip_order: a high order is used only when the "
                  "matched stars constrain it (an order-4 fit to ~80 stars over-fits the corners)",
            "fixed": "always sip_order (if there are at least 2 stars per polynomial term)",
        },
    )
    n_bright: int = opt(40, "Brightest sources/references used for triangle matching.")
    max_offset_arcsec: float = opt(60.0, "Largest shift of the initial WCS the matcher searches for (arcsec).")
    max_rotation_deg: float = opt(1.0, "Largest rotation error of the initial WCS (deg).")
    max_scale_error: float = opt(0.03, "Largest relative pixel-scale error of the initial WCS.")
    min_triangle_side: float = opt(40.0, "Shortest triangle side used (pixels).")
    match_radius_px: float = opt(3.0, "Final one-to-one matching radius (pixels).")
    min_matches: int = opt(10, "Fewest matches accepted (Rubin: minMatchedPairs=30 at most).")
    rej_sigma: float = opt(3.0, "Outlier rejection threshold in robust RMS units.")
    n_rej_iter: int = opt(3, "Fit/reject iterations.")

    def _validate(self) -> None:
        checks = [
            ("sip_order", 1 <= self.sip_order <= 6, "an integer 1..6"),
            ("n_bright", 6 <= self.n_bright <= 200, "6..200"),
            ("max_offset_arcsec", self.max_offset_arcsec > 0, "> 0"),
            ("max_rotation_deg", 0 < self.max_rotation_deg <= 180, "0 < value <= 180"),
            ("max_scale_error", 0 < self.max_scale_error < 0.5, "0 < value < 0.5"),
            ("match_radius_px", self.match_radius_px > 0, "> 0"),
            ("min_matches", self.min_matches >= 3, ">= 3"),
            ("rej_sigma", self.rej_sigma > 0, "> 0"),
            ("n_rej_iter", self.n_rej_iter >= 0, ">= 0"),
        ]
        self._check_ranges(checks)


@dataclass(frozen=True, slots=True)
class AstrometryResult:
    """The fitted WCS and the evidence for it."""

    wcs: WCS
    n_matches: int
    rms_arcsec: float
    src_index: np.ndarray
    ref_index: np.ndarray
    residual_arcsec: np.ndarray
    initial_offset_arcsec: float
    initial_rotation_deg: float
    metadata: dict[str, Any] = field(default_factory=dict)


# -- pattern matching ---------------------------------------------------------------------------------
def _triangles(xy: np.ndarray, min_side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangles of the points ``xy`` (n, 2): vertex indices ordered by opposite side, log sides, angle."""
    n = len(xy)
    if n < 3:
        return np.empty((0, 3), np.int64), np.empty((0, 3)), np.empty(0)
    idx = np.array(list(itertools.combinations(range(n), 3)), dtype=np.int64)
    p = xy[idx]  # (T, 3, 2)
    # side i is opposite vertex i
    sides = np.stack(
        [np.hypot(*(p[:, 1] - p[:, 2]).T), np.hypot(*(p[:, 2] - p[:, 0]).T), np.hypot(*(p[:, 0] - p[:, 1]).T)],
        axis=1,
    )
    order = np.argsort(-sides, axis=1)  # longest first
    sides = np.take_along_axis(sides, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    keep = (sides[:, 2] >= min_side) & (sides[:, 0] - sides[:, 1] > 1.0) & (sides[:, 1] - sides[:, 2] > 1.0)
    idx, sides = idx[keep], sides[keep]
    # direction of the longest side, from the vertex opposite the middle side to the one opposite the shortest
    a, b = xy[idx[:, 1]], xy[idx[:, 2]]
    ang = np.arctan2(b[:, 1] - a[:, 1], b[:, 0] - a[:, 0])
    return idx, np.log(sides), ang


def _apply(s: float, theta: float, t: np.ndarray, xy: np.ndarray) -> np.ndarray:
    c, sn = math.cos(theta), math.sin(theta)
    return np.column_stack([s * (c * xy[:, 0] - sn * xy[:, 1]), s * (sn * xy[:, 0] + c * xy[:, 1])]) + t


def match_nearest(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour matches of points ``a`` to ``b`` within ``radius`` (closest pairs first)."""
    if len(a) == 0 or len(b) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    tree = cKDTree(b)
    d, j = tree.query(a, k=3, distance_upper_bound=radius)
    ii = np.repeat(np.arange(len(a)), d.shape[1])
    d, j = d.ravel(), j.ravel()
    ok = np.isfinite(d)
    ii, j, d = ii[ok], j[ok], d[ok]
    order = np.argsort(d, kind="stable")
    used_a = np.zeros(len(a), bool)
    used_b = np.zeros(len(b), bool)
    out_a, out_b, out_d = [], [], []
    for k in order:
        if not used_a[ii[k]] and not used_b[j[k]]:
            used_a[ii[k]] = used_b[j[k]] = True
            out_a.append(ii[k])
            out_b.append(j[k])
            out_d.append(d[k])
    return np.array(out_a, np.int64), np.array(out_b, np.int64), np.array(out_d)


def match_pattern(
    src_xy: np.ndarray, ref_xy: np.ndarray, *, config: AstrometryConfig, pixel_scale_arcsec: float
) -> tuple[float, float, np.ndarray, int]:
    """Find the similarity transform taking reference pixel positions onto source positions.

    Parameters
    ----------
    src_xy, ref_xy : ndarray (n, 2)
        Source and (initial-WCS projected) reference positions in pixels, brightest first.
    config : AstrometryConfig
    pixel_scale_arcsec : float
        To convert ``max_offset_arcsec`` to pixels.

    Returns
    -------
    scale, angle (rad), shift (2,), n_verified
        ``src ~= scale * R(angle) @ ref + shift``.

    Raises
    ------
    AstrometryError
        If no transform within the priors is supported by ``min_matches`` sources.
    """
    nb = config.n_bright
    s_idx, s_ls, s_ang = _triangles(src_xy[:nb], config.min_triangle_side)
    r_idx, r_ls, r_ang = _triangles(ref_xy[: int(nb * 1.5)], config.min_triangle_side)
    if len(s_idx) == 0 or len(r_idx) == 0:
        msg = (
            f"too few well-spread sources ({len(src_xy)}) or references ({len(ref_xy)}) to form triangles; "
            "lower calibrate.astrometry.min_triangle_side or check the detection threshold"
        )
        raise AstrometryError(msg, n_sources=len(src_xy), n_refs=len(ref_xy))
    tol = math.log1p(config.max_scale_error) + 0.01
    tree = cKDTree(r_ls)
    max_off = config.max_offset_arcsec / pixel_scale_arcsec
    max_rot = math.radians(config.max_rotation_deg)
    near = tree.query_ball_point(s_ls, tol)
    ks = np.repeat(np.arange(len(near)), [len(n) for n in near])
    ms = np.fromiter(itertools.chain.from_iterable(near), dtype=np.int64, count=len(ks))
    dang = (s_ang[ks] - r_ang[ms] + math.pi) % (2 * math.pi) - math.pi
    keep = np.abs(dang) <= max_rot
    ks, ms = ks[keep], ms[keep]
    # similarity transforms of every congruent pair at once: src = s R(theta) ref + t
    a = ref_xy[r_idx[ms]]  # (P, 3, 2)
    b = src_xy[s_idx[ks]]
    am, bm = a.mean(1), b.mean(1)
    ac, bc = a - am[:, None], b - bm[:, None]
    num_c = (ac * bc).sum((1, 2))
    num_s = (ac[..., 0] * bc[..., 1] - ac[..., 1] * bc[..., 0]).sum(1)
    den = (ac * ac).sum((1, 2))
    theta = np.arctan2(num_s, num_c)
    scale = np.hypot(num_c, num_s) / den
    centre = ref_xy.mean(0)
    # the shift each transform implies at the centre of the reference cloud
    c, sn = np.cos(theta), np.sin(theta)
    rel = centre - am
    moved = bm + scale[:, None] * np.column_stack([c * rel[:, 0] - sn * rel[:, 1], sn * rel[:, 0] + c * rel[:, 1]])
    shift = moved - centre
    ok = (np.abs(scale - 1) <= config.max_scale_error) & (np.abs(theta) <= max_rot)
    ok &= np.hypot(shift[:, 0], shift[:, 1]) <= max_off + 5
    votes = np.column_stack([shift[ok], scale[ok], theta[ok]])
    if len(votes) == 0:
        msg = (
            f"no triangle of the {min(nb, len(src_xy))} brightest sources matches the references within "
            f"offset {config.max_offset_arcsec}\" and rotation {config.max_rotation_deg} deg; widen "
            "calibrate.astrometry.max_offset_arcsec / max_rotation_deg or check the reference catalogue"
        )
        raise AstrometryError(msg, n_sources=len(src_xy), n_refs=len(ref_xy), n_votes=0)
    v = votes
    # densest 4-px cell of proposed shifts, refined by the median of its members
    cell = np.floor(v[:, :2] / 4.0).astype(np.int64)
    keys, inv, counts = np.unique(cell, axis=0, return_inverse=True, return_counts=True)
    best_n, best = -1, None
    for cand in np.argsort(-counts)[:5]:
        members = v[inv.ravel() == cand]
        s, th = float(np.median(members[:, 2])), float(np.median(members[:, 3]))
        shift = np.median(members[:, :2], axis=0)
        t = centre + shift - _apply(s, th, np.zeros(2), centre[None])[0]
        ia, _, _ = match_nearest(_apply(s, th, t, ref_xy), src_xy, 2 * config.match_radius_px)
        if len(ia) > best_n:
            best_n, best = len(ia), (s, th, t)
    assert best is not None
    if best_n < config.min_matches:
        msg = (
            f"the best pattern match verifies only {best_n} source(s) (< calibrate.astrometry.min_matches = "
            f"{config.min_matches}); lower min_matches or check the reference catalogue and the detections"
        )
        raise AstrometryError(msg, n_sources=len(src_xy), n_refs=len(ref_xy), n_verified=best_n)
    s, th, t = best
    return s, th, t, best_n


# -- TAN-SIP fitting ----------------------------------------------------------------------------------
def _gnomonic(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-plane coordinates (deg) of (ra, dec) about (ra0, dec0)."""
    r, d = np.radians(ra), np.radians(dec)
    r0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(r - r0)
    xi = np.cos(d) * np.sin(r - r0) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(r - r0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def _inverse_gnomonic(xi: Any, eta: Any, ra0: float, dec0: float) -> tuple[Any, Any]:
    """Sky position (deg) of tangent-plane coordinates (deg) about (ra0, dec0); scalars or arrays."""
    x, y = np.radians(xi), np.radians(eta)
    d0 = math.radians(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(rho > 0, np.sin(c) / np.where(rho > 0, rho, 1.0), 1.0)
    dec = np.arcsin(np.cos(c) * math.sin(d0) + y * ratio * math.cos(d0))
    ra = math.radians(ra0) + np.arctan2(x * ratio, np.cos(d0) * np.cos(c) - y * ratio * math.sin(d0))
    out_ra, out_dec = np.degrees(ra) % 360.0, np.degrees(dec)
    if np.ndim(out_ra) == 0:
        return float(out_ra), float(out_dec)
    return out_ra, out_dec


def _terms(order: int, lo: int = 0) -> list[tuple[int, int]]:
    return [(p, q) for n in range(lo, order + 1) for p in range(n, -1, -1) for q in [n - p]]


def _design(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]], scale: float) -> np.ndarray:
    us, vs = u / scale, v / scale
    return np.column_stack([us**p * vs**q for p, q in terms])


def _sip_wcs(crpix: tuple[float, float], crval: tuple[float, float], cd: np.ndarray,
             a: dict[tuple[int, int], float], b: dict[tuple[int, int], float], order: int,
             ap: dict[tuple[int, int], float] | None, bp: dict[tuple[int, int], float] | None,
             inv_order: int, shape: tuple[int, int] | None) -> WCS:
    h = fits.Header()
    h["NAXIS"] = 2
    if shape is not None:
        h["NAXIS1"], h["NAXIS2"] = shape[1], shape[0]
    h["CTYPE1"], h["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if order >= 2 else ("RA---TAN", "DEC--TAN")
    h["CRPIX1"], h["CRPIX2"] = crpix[0] + 1.0, crpix[1] + 1.0
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd[0, 0], cd[0, 1], cd[1, 0], cd[1, 1]
    h["RADESYS"] = "ICRS"
    if order >= 2:
        h["A_ORDER"] = h["B_ORDER"] = order
        for (p, q), val in a.items():
            h[f"A_{p}_{q}"] = val
        for (p, q), val in b.items():
            h[f"B_{p}_{q}"] = val
        if ap is not None and bp is not None:
            h["AP_ORDER"] = h["BP_ORDER"] = inv_order
            for (p, q), val in ap.items():
                h[f"AP_{p}_{q}"] = val
            for (p, q), val in bp.items():
                h[f"BP_{p}_{q}"] = val
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(h)


@dataclass(frozen=True, slots=True)
class SipSolution:
    """A fitted TAN-SIP solution evaluated with numpy (0-based pixels), convertible to an astropy WCS.

    The fit loop uses it instead of astropy's WCS, whose construction and iterative
    inversion cost ~15 ms per call.
    """

    crpix: tuple[float, float]
    crval: tuple[float, float]
    cd: np.ndarray
    a: dict[tuple[int, int], float]
    b: dict[tuple[int, int], float]
    order: int
    ap: dict[tuple[int, int], float] | None
    bp: dict[tuple[int, int], float] | None
    inv_order: int

    def pix2world(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sky (deg) of 0-based pixel positions."""
        u, v = np.asarray(x, float) - self.crpix[0], np.asarray(y, float) - self.crpix[1]
        f = _poly(self.a, u, v)
        g = _poly(self.b, u, v)
        xi = self.cd[0, 0] * (u + f) + self.cd[0, 1] * (v + g)
        eta = self.cd[1, 0] * (u + f) + self.cd[1, 1] * (v + g)
        return _inverse_gnomonic(xi, eta, *self.crval)

    def world2pix(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel positions of sky positions (deg), through the fitted inverse polynomials."""
        xi, eta = _gnomonic(np.asarray(ra, float), np.asarray(dec, float), *self.crval)
        cdinv = np.linalg.inv(self.cd)
        uu = cdinv[0, 0] * xi + cdinv[0, 1] * eta
        vv = cdinv[1, 0] * xi + cdinv[1, 1] * eta
        if self.ap is not None and self.bp is not None:
            uu, vv = uu + _poly(self.ap, uu, vv), vv + _poly(self.bp, uu, vv)
        return uu + self.crpix[0], vv + self.crpix[1]

    def to_wcs(self, shape: tuple[int, int] | None = None) -> WCS:
        """The astropy WCS (``RA---TAN-SIP`` with A, B, AP, BP cards; plain TAN for order 1)."""
        return _sip_wcs(self.crpix, self.crval, self.cd, self.a, self.b, self.order, self.ap, self.bp,
                        self.inv_order, shape)


def _poly(coeffs: dict[tuple[int, int], float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u, dtype=float)
    for (p, q), c in coeffs.items():
        out = out + c * u**p * v**q
    return out


def fit_tan_sip(
    x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray, *, order: int,
    crpix: tuple[float, float], crval: tuple[float, float], shape: tuple[int, int] | None = None,
    weights: np.ndarray | None = None,
) -> WCS:
    """Fit a TAN-SIP WCS to matched pixel (0-based) and sky positions (deg).

    CRPIX stays fixed; CRVAL is re-centred on the sky position of CRPIX (three
    passes), so the constant terms vanish and the linear terms are the CD matrix.
    Needs at least as many points as polynomial terms (``(order+1)(order+2)/2``).
    """
    return _fit_sip(x, y, ra, dec, order=order, crpix=crpix, crval=crval, weights=weights).to_wcs(shape)


def _fit_sip(
    x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray, *, order: int,
    crpix: tuple[float, float], crval: tuple[float, float], weights: np.ndarray | None = None,
) -> SipSolution:
    terms = _terms(order)
    if len(x) < len(terms) + 2:
        msg = f"{len(x)} matches cannot constrain a SIP order-{order} fit ({len(terms)} terms per axis)"
        raise AstrometryError(msg, n_matches=len(x), order=order)
    u, v = np.asarray(x, float) - crpix[0], np.asarray(y, float) - crpix[1]
    scale = max(np.max(np.abs(u)), np.max(np.abs(v)), 1.0)
    w = np.ones_like(u) if weights is None else np.asarray(weights, float)
    sw = np.sqrt(w)[:, None]
    des = _design(u, v, terms, scale)
    ra0, dec0 = crval
    for _ in range(3):
        xi, eta = _gnomonic(ra, dec, ra0, dec0)
        cx, *_ = np.linalg.lstsq(des * sw, xi * sw[:, 0], rcond=None)
        cy, *_ = np.linalg.lstsq(des * sw, eta * sw[:, 0], rcond=None)
        # the sky position of CRPIX is the constant term: move CRVAL there and refit
        ra0, dec0 = _inverse_gnomonic(cx[0], cy[0], ra0, dec0)
    # constant terms are now ~0: the linear terms are CD
    lin = {t: i for i, t in enumerate(terms)}
    cd = np.array([[cx[lin[(1, 0)]], cx[lin[(0, 1)]]], [cy[lin[(1, 0)]], cy[lin[(0, 1)]]]]) / scale
    cdinv = np.linalg.inv(cd)
    a: dict[tuple[int, int], float] = {}
    b: dict[tuple[int, int], float] = {}
    for (p, q), i in lin.items():
        if p + q < 2:
            continue
        f, g = cdinv @ np.array([cx[i], cy[i]]) / scale ** (p + q)
        a[(p, q)], b[(p, q)] = float(f), float(g)
    ap = bp = None
    inv_order = min(order + 1, 6)
    if order >= 2:
        # inverse polynomials on a grid covering the fitted area
        gx = np.linspace(u.min(), u.max(), 40)
        gy = np.linspace(v.min(), v.max(), 40)
        gu, gv = (m.ravel() for m in np.meshgrid(gx, gy))
        U, V = gu + _poly(a, gu, gv), gv + _poly(b, gu, gv)
        iterms = _terms(inv_order, 1)
        iscale = max(np.max(np.abs(U)), np.max(np.abs(V)), 1.0)
        ides = _design(U, V, iterms, iscale)
        capx, *_ = np.linalg.lstsq(ides, gu - U, rcond=None)
        capy, *_ = np.linalg.lstsq(ides, gv - V, rcond=None)
        ap = {t: float(c / iscale ** (t[0] + t[1])) for t, c in zip(iterms, capx, strict=True)}
        bp = {t: float(c / iscale ** (t[0] + t[1])) for t, c in zip(iterms, capy, strict=True)}
    return SipSolution(crpix, (float(ra0), float(dec0)), cd, a, b, order, ap, bp, inv_order)


def _choose_order(xy: np.ndarray, ra: np.ndarray, dec: np.ndarray, w: np.ndarray | None, max_order: int,
                  crpix: tuple[float, float], crval: tuple[float, float], k: int = 5) -> int:
    """The SIP order (1..max_order) with the smallest k-fold cross-validated residual.

    A higher order must lower the cross-validated RMS by more than 3% to be preferred,
    and needs at least 3 matches per polynomial term in every training fold.
    """
    n = len(xy)
    folds = np.arange(n) % k
    best_order, best_rms = 1, np.inf
    for order in range(1, max_order + 1):
        if (n * (k - 1)) // k < 3 * len(_terms(order)):
            break
        sq = np.empty(n)
        for f in range(k):
            tr, te = folds != f, folds == f
            sol = _fit_sip(xy[tr, 0], xy[tr, 1], ra[tr], dec[tr], order=order, crpix=crpix, crval=crval,
                           weights=None if w is None else w[tr])
            fra, fdec = sol.pix2world(xy[te, 0], xy[te, 1])
            sq[te] = _sky_sep_arcsec(fra, fdec, ra[te], dec[te]) ** 2
        rms = float(np.sqrt(np.mean(sq)))
        if rms < 0.97 * best_rms:
            best_order, best_rms = order, rms
    return best_order


def _sky_sep_arcsec(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    r1, d1, r2, d2 = (np.radians(a) for a in (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1)))) * 3600.0


def solve_astrometry(
    src_x: np.ndarray, src_y: np.ndarray, src_flux: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
    ref_mag: np.ndarray, initial_wcs: WCS, *, shape: tuple[int, int], config: AstrometryConfig | None = None,
    src_err: np.ndarray | None = None,
) -> AstrometryResult:
    """Match sources to references and fit a TAN-SIP WCS.

    Parameters
    ----------
    src_x, src_y : ndarray (n,)
        Source centroids, 0-based pixels of the (trimmed) image.
    src_flux : ndarray (n,)
        Source fluxes (any unit): brightness order for the pattern matcher.
    ref_ra, ref_dec, ref_mag : ndarray (m,)
        Reference positions (deg, at the epoch of the image) and magnitudes.
    initial_wcs : astropy.wcs.WCS
        The approximate WCS (e.g. from the raw header, shifted to the trimmed grid).
    shape : (ny, nx)
        Image shape: the fit's CRPIX is its centre and references outside are dropped.
    config : AstrometryConfig, optional
    src_err : ndarray (n,), optional
        Centroid errors (pixels) for weighting; default equal weights.

    Returns
    -------
    AstrometryResult

    Raises
    ------
    AstrometryError
        With counts in ``metadata`` when there are too few sources, references or matches.
    """
    cfg = config or AstrometryConfig()
    ny, nx = shape
    sx, sy = np.asarray(src_x, float), np.asarray(src_y, float)
    good = np.isfinite(sx) & np.isfinite(sy) & np.isfinite(src_flux)
    if good.sum() < cfg.min_matches:
        msg = (
            f"only {int(good.sum())} usable source(s) for astrometry (need calibrate.astrometry.min_matches = "
            f"{cfg.min_matches}); lower the detection threshold or min_matches"
        )
        raise AstrometryError(msg, n_sources=int(good.sum()))
    s_order = np.argsort(-np.asarray(src_flux)[good], kind="stable")
    s_ids = np.flatnonzero(good)[s_order]
    src_xy = np.column_stack([sx[s_ids], sy[s_ids]])
    rx, ry = initial_wcs.all_world2pix(ref_ra, ref_dec, 0)
    margin = cfg.max_offset_arcsec / _pixel_scale(initial_wcs) + 10
    inside = (rx > -margin) & (rx < nx + margin) & (ry > -margin) & (ry < ny + margin) & np.isfinite(ref_mag)
    if inside.sum() < cfg.min_matches:
        msg = (
            f"only {int(inside.sum())} reference star(s) fall on the image with the initial WCS (need "
            f"{cfg.min_matches}); check the reference catalogue covers this CCD and the raw WCS"
        )
        raise AstrometryError(msg, n_refs=int(inside.sum()))
    r_ids = np.flatnonzero(inside)[np.argsort(np.asarray(ref_mag)[inside], kind="stable")]
    ref_xy = np.column_stack([rx[r_ids], ry[r_ids]])
    scale_arcsec = _pixel_scale(initial_wcs)
    s, th, t, _ = match_pattern(src_xy, ref_xy, config=cfg, pixel_scale_arcsec=scale_arcsec)
    pred = _apply(s, th, t, ref_xy)
    initial_offset = float(np.median(np.hypot(*(pred - ref_xy).T)) * scale_arcsec)

    # iterate: match with a shrinking radius, fit linear then full order, reject outliers
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    ra0, dec0 = initial_wcs.all_pix2world([[crpix[0], crpix[1]]], 0)[0]
    crval = (float(ra0), float(dec0))
    radius = 3 * cfg.match_radius_px
    sol: SipSolution | None = None
    ia = ib = np.empty(0, np.int64)
    order = 1
    res = np.empty(0)
    for it in range(cfg.n_rej_iter + 2):
        if sol is None:
            ia, ib, _ = match_nearest(src_xy, pred, radius)
        else:
            px, py = sol.world2pix(ref_ra[r_ids], ref_dec[r_ids])
            ia, ib, _ = match_nearest(src_xy, np.column_stack([px, py]), radius)
        if len(ia) < cfg.min_matches:
            msg = (
                f"only {len(ia)} source-reference match(es) within {radius:.1f} px (need "
                f"calibrate.astrometry.min_matches = {cfg.min_matches}); raise match_radius_px or check the refcat"
            )
            raise AstrometryError(msg, n_matches=len(ia))
        order = 1 if it == 0 else cfg.sip_order
        while order > 1 and len(ia) < 2 * len(_terms(order)):
            order -= 1
        w = None if src_err is None else 1.0 / np.maximum(np.asarray(src_err)[s_ids[ia]], 0.01) ** 2
        for _ in range(2):  # fit, drop outliers beyond rej_sigma, refit
            rra, rdec = ref_ra[r_ids[ib]], ref_dec[r_ids[ib]]
            sol = _fit_sip(src_xy[ia, 0], src_xy[ia, 1], rra, rdec, order=order, crpix=crpix, crval=crval,
                           weights=w)
            fra, fdec = sol.pix2world(src_xy[ia, 0], src_xy[ia, 1])
            res = _sky_sep_arcsec(fra, fdec, rra, rdec)
            # 2-D residuals are Rayleigh distributed: per-axis sigma = median / sqrt(2 ln 2)
            sigma = max(float(np.median(res)) / 1.1774, 1e-4)
            keep = res < cfg.rej_sigma * sigma * 1.4142
            if it == 0 or keep.all() or keep.sum() < cfg.min_matches:
                break
            ia, ib = ia[keep], ib[keep]
            w = None if w is None else w[keep]
        radius = max(cfg.match_radius_px, min(radius, 3.0 * cfg.rej_sigma * sigma / scale_arcsec))
    assert sol is not None
    if cfg.order_selection == "cv" and order > 1:
        w = None if src_err is None else 1.0 / np.maximum(np.asarray(src_err)[s_ids[ia]], 0.01) ** 2
        rra, rdec = ref_ra[r_ids[ib]], ref_dec[r_ids[ib]]
        order = _choose_order(src_xy[ia], rra, rdec, w, order, crpix, crval)
        sol = _fit_sip(src_xy[ia, 0], src_xy[ia, 1], rra, rdec, order=order, crpix=crpix, crval=crval, weights=w)
    wcs = sol.to_wcs(shape)
    fra, fdec = wcs.all_pix2world(src_xy[ia, 0], src_xy[ia, 1], 0)
    res = _sky_sep_arcsec(fra, fdec, ref_ra[r_ids[ib]], ref_dec[r_ids[ib]])
    return AstrometryResult(
        wcs=wcs,
        n_matches=len(ia),
        rms_arcsec=float(np.sqrt(np.mean(res**2))),
        src_index=s_ids[ia],
        ref_index=r_ids[ib],
        residual_arcsec=res,
        initial_offset_arcsec=initial_offset,
        initial_rotation_deg=math.degrees(th),
        metadata={"sip_order": order, "pattern_scale": s},
    )


def _pixel_scale(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS in arcsec."""
    m = wcs.celestial.pixel_scale_matrix
    return float(math.sqrt(abs(np.linalg.det(m))) * 3600.0)
