"""The sky and instrument model behind :mod:`apfast.sim.simulate`: WCS, PSF, catalogues, render lists.

Nothing here writes files. The driver in :mod:`apfast.sim.simulate` draws the random
choices, stores them in the truth folder, and :func:`render_electrons` turns a
stored render list back into the noiseless image, so ``truth_image`` reproduces
exactly what the simulator rendered.

Conventions
-----------
* Trimmed CCD pixels are 0-based ``(x, y)`` = ``(column, row)``, 2048 x 4096.
* Focal-plane coordinates ``(u, v)`` in pixels from the boresight:
  ``u = x - 1023.5 + fx``, ``v = y - 2047.5 + fy`` with ``(fx, fy)`` the CCD centre
  from ``camera/decam.toml``.
* The PSF is a double Gaussian: a core with covariance ``s1^2 [[1+e1, e2], [e2, 1-e1]]``
  (weight 0.85) and a wing with four times that covariance (weight 0.15). Its FWHM
  (geometric mean of the major- and minor-axis FWHM) is ``2.4052 * s1 * (1-e^2)^(1/4)``,
  and ``FWHM(u, v) = fwhm0 * (1 + cu*u/S + cv*v/S + cr*(u^2+v^2)/S^2)`` with ``S = 10000``;
  ``e1``, ``e2`` are linear in ``u/S``, ``v/S``.
* Galaxies: exponential discs approximated by 8 Gaussians (weights fitted once by NNLS,
  half-light radius = ``r_e``), axis ratio ``q``, position angle ``pa`` (from +x towards +y).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from apfast.kernels.render import fill_sky, render_mixtures

PIXEL_SCALE = 0.2636  # arcsec / pixel
NX, NY = 2048, 4096  # trimmed columns, rows
RAW_NY, RAW_NX = 4146, 2160
DATA_X0, DATA_Y0 = 56, 50  # raw (x, y) of trimmed (0, 0)
NAMP = 1024  # columns per amplifier
FIELD_RA, FIELD_DEC = 150.0, 2.2  # nominal pointing, degrees
PSF_CORE_FRACTION = 0.85
PSF_WING_VAR_RATIO = 4.0  # wing sigma = 2 * core sigma
FWHM_OVER_SIGMA1 = 2.405189523660273  # double Gaussian above, solved numerically
PSF_SCALE = 10000.0  # focal-plane pixels, normalises u, v in the PSF and sky models
# exponential profile as a mixture of Gaussians: sigma_k / r_e and weights (sum 1)
EXP_SIGMAS = np.array([0.04, 0.09, 0.17, 0.29, 0.45, 0.68, 1.0, 1.45])
EXP_WEIGHTS = np.array(
    [2.5876e-04, 1.9019e-03, 1.02942e-02, 4.08682e-02, 1.031499e-01, 2.675204e-01, 3.127450e-01, 2.674117e-01]
)
EXP_WEIGHTS = EXP_WEIGHTS / EXP_WEIGHTS.sum()

FILTER_STRINGS = {
    "g": "g DECam SDSS c0001 4720.0 1520.0",
    "r": "r DECam SDSS c0002 6415.0 1480.0",
    "i": "i DECam SDSS c0003 7835.0 1470.0",
}
ZP_1S = {"g": 26.45, "r": 26.55, "i": 26.35}  # AB mag giving 1 electron per second at airmass 1
EXTINCTION = {"g": 0.18, "r": 0.10, "i": 0.08}  # mag per airmass
SKY_MAG = {"g": 22.0, "r": 21.1, "i": 20.3}  # mag / arcsec^2

KIND_STAR, KIND_GALAXY = 0, 1


def mjd_to_year(mjd: float) -> float:
    """Julian year of an MJD (``2000.0 + (mjd - 51544.5) / 365.25``)."""
    return 2000.0 + (mjd - 51544.5) / 365.25


def tan_deproject(xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (TAN) deprojection: tangent-plane offsets (deg) about ``(ra0, dec0)`` to RA, Dec (deg)."""
    x = np.radians(xi)
    y = np.radians(eta)
    d0 = math.radians(dec0)
    den = math.cos(d0) - y * math.sin(d0)
    ra = ra0 + np.degrees(np.arctan2(x, den))
    dec = np.degrees(np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, den)))
    return np.mod(ra, 360.0), dec


def ccd_centre(camera: Any, ccdnum: int) -> tuple[float, float]:
    """Focal-plane centre ``(fx, fy)`` of a CCD in pixels, from the camera description."""
    fp = camera.detectors[int(ccdnum)]["focal_plane"]
    return float(fp[0]), float(fp[1])


def cd_matrix(rot_deg: float) -> np.ndarray:
    """CD matrix (deg/px) of DECam-like orientation: +y towards +RA, +x towards -Dec, rotated by ``rot_deg``."""
    s = PIXEL_SCALE / 3600.0
    base = np.array([[0.0, s], [-s, 0.0]])
    c, n = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    return np.array([[c, -n], [n, c]]) @ base


def true_wcs_header(
    ra0: float, dec0: float, rot_deg: float, fx: float, fy: float, sip: Mapping[str, float], *, raw: bool = False
) -> dict[str, Any]:
    """FITS WCS cards (TAN-SIP) of a CCD: tangent point at the boresight, CRPIX at the boresight.

    The SIP polynomial in focal-plane pixels ``(u, v)`` is the optical distortion
    (radial ``k u r^2`` plus quadratic terms), shared by every CCD of a visit.
    ``raw=True`` gives the cards for the raw pixel grid (CRPIX shifted by 56, 50).
    """
    cd = cd_matrix(rot_deg)
    hdr: dict[str, Any] = {
        "WCSAXES": 2,
        "CTYPE1": "RA---TAN-SIP",
        "CTYPE2": "DEC--TAN-SIP",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRVAL1": float(ra0),
        "CRVAL2": float(dec0),
        "CRPIX1": 1023.5 - fx + 1.0 + (DATA_X0 if raw else 0),
        "CRPIX2": 2047.5 - fy + 1.0 + (DATA_Y0 if raw else 0),
        "CD1_1": float(cd[0, 0]),
        "CD1_2": float(cd[0, 1]),
        "CD2_1": float(cd[1, 0]),
        "CD2_2": float(cd[1, 1]),
        "RADESYS": "ICRS",
        "A_ORDER": 3,
        "B_ORDER": 3,
    }
    k = float(sip["k"])
    hdr.update(
        {
            "A_3_0": k, "A_1_2": k, "A_2_0": float(sip["a20"]), "A_1_1": float(sip["a11"]), "A_0_2": float(sip["a02"]),
            "B_0_3": k, "B_2_1": k, "B_2_0": float(sip["b20"]), "B_1_1": float(sip["b11"]), "B_0_2": float(sip["b02"]),
        }
    )
    return hdr


def approx_wcs_header(true_hdr: Mapping[str, Any], dra_arcsec: float, ddec_arcsec: float, *,
                      raw: bool) -> dict[str, Any]:
    """The header WCS: the true one without distortion (linear TAN), tangent point offset by a few arcsec/10."""
    hdr = {k: v for k, v in true_hdr.items() if k[:2] not in ("A_", "B_")}
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    dec0 = float(true_hdr["CRVAL2"])
    hdr["CRVAL1"] = float(true_hdr["CRVAL1"]) + dra_arcsec / 3600.0 / math.cos(math.radians(dec0))
    hdr["CRVAL2"] = dec0 + ddec_arcsec / 3600.0
    if raw:
        hdr["CRPIX1"] = float(true_hdr["CRPIX1"]) + DATA_X0
        hdr["CRPIX2"] = float(true_hdr["CRPIX2"]) + DATA_Y0
    return hdr


def make_wcs(hdr: Mapping[str, Any]):
    """An astropy WCS from a dict of WCS cards."""
    from astropy.io import fits
    from astropy.wcs import WCS

    h = fits.Header()
    for key, val in hdr.items():
        h[key] = val
    return WCS(h)


def psf_at(psf: Mapping[str, Any], u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF ``(fwhm_px, e1, e2)`` at focal-plane pixels ``(u, v)`` for a visit's PSF model dict."""
    us = np.asarray(u, dtype=np.float64) / PSF_SCALE
    vs = np.asarray(v, dtype=np.float64) / PSF_SCALE
    fwhm = psf["fwhm0_px"] * (1.0 + psf["cu"] * us + psf["cv"] * vs + psf["cr"] * (us * us + vs * vs))
    e1 = psf["e1_0"] + psf["e1_u"] * us + psf["e1_v"] * vs
    e2 = psf["e2_0"] + psf["e2_u"] * us + psf["e2_v"] * vs
    return fwhm, e1, e2


def psf_core_cov(fwhm: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Covariance ``(sxx, sxy, syy)`` of the PSF core Gaussian for FWHM (px) and ellipticity."""
    e2sum = np.minimum(e1 * e1 + e2 * e2, 0.25)
    s1 = fwhm / FWHM_OVER_SIGMA1 / (1.0 - e2sum) ** 0.25
    var = s1 * s1
    return var * (1.0 + e1), var * e2, var * (1.0 - e1)


def build_components(
    src: Mapping[str, np.ndarray], psf: Mapping[str, Any], fx: float, fy: float
) -> tuple[np.ndarray, ...]:
    """Turn a render list into the flat arrays :func:`render_mixtures` takes.

    ``src`` has float arrays ``x, y, flux`` (electrons), ``kind`` (0 star, 1 galaxy),
    ``re_px``, ``q``, ``pa`` (radians). Returns ``(radius, start, count, w, ixx, ixy, iyy, norm)``.
    """
    x = np.asarray(src["x"], np.float64)
    n = x.size
    u = x - 1023.5 + fx
    v = np.asarray(src["y"], np.float64) - 2047.5 + fy
    cxx, cxy, cyy = psf_core_cov(*psf_at(psf, u, v))
    psf_w = np.array([PSF_CORE_FRACTION, 1.0 - PSF_CORE_FRACTION])
    psf_m = np.array([1.0, PSF_WING_VAR_RATIO])
    isgal = np.asarray(src["kind"]) == KIND_GALAXY
    ng = EXP_SIGMAS.size
    count = np.where(isgal, 2 * ng, 2).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    m = int(count.sum())
    sxx = np.empty(m)
    sxy = np.empty(m)
    syy = np.empty(m)
    w = np.empty(m)
    # stars: two PSF components
    st = np.flatnonzero(~isgal)
    for j in range(2):
        idx = start[st] + j
        sxx[idx], sxy[idx], syy[idx] = psf_m[j] * cxx[st], psf_m[j] * cxy[st], psf_m[j] * cyy[st]
        w[idx] = psf_w[j]
    gl = np.flatnonzero(isgal)
    if gl.size:
        re = np.asarray(src["re_px"], np.float64)[gl]
        q = np.asarray(src["q"], np.float64)[gl]
        pa = np.asarray(src["pa"], np.float64)[gl]
        a2 = re * re / q
        b2 = re * re * q
        c, s = np.cos(pa), np.sin(pa)
        gxx = a2 * c * c + b2 * s * s
        gyy = a2 * s * s + b2 * c * c
        gxy = (a2 - b2) * c * s
        for k in range(ng):
            f2 = EXP_SIGMAS[k] ** 2
            for j in range(2):
                idx = start[gl] + 2 * k + j
                sxx[idx] = f2 * gxx + psf_m[j] * cxx[gl]
                sxy[idx] = f2 * gxy + psf_m[j] * cxy[gl]
                syy[idx] = f2 * gyy + psf_m[j] * cyy[gl]
                w[idx] = EXP_WEIGHTS[k] * psf_w[j]
    det = sxx * syy - sxy * sxy
    ixx, ixy, iyy = syy / det, -sxy / det, sxx / det
    norm = 1.0 / (2.0 * math.pi * np.sqrt(det))
    lam = 0.5 * (sxx + syy) + np.sqrt(0.25 * (sxx - syy) ** 2 + sxy * sxy)
    # widest component per source sets the stamp size: profile below 1e-3 e- at the edge
    smax = np.maximum.reduceat(np.sqrt(lam), start) if n else np.zeros(0)
    wn = np.maximum.reduceat(w * norm, start) if n else np.zeros(0)
    flux = np.abs(np.asarray(src["flux"], np.float64))
    peak = np.maximum(flux * np.minimum(wn, 1.0) / 1e-3, math.e)
    radius = np.clip(np.ceil(smax * np.sqrt(2.0 * np.log(peak))) + 1, 3, 400).astype(np.int64)
    return radius, start, count, w, ixx, ixy, iyy, norm


def render_sources(image: np.ndarray, src: Mapping[str, np.ndarray], psf: Mapping[str, Any], fx: float,
                   fy: float) -> None:
    """Add the sources of a render list (electrons) to ``image`` in place."""
    if len(src["x"]) == 0:
        return
    radius, start, count, w, ixx, ixy, iyy, norm = build_components(src, psf, fx, fy)
    render_mixtures(
        image,
        np.ascontiguousarray(src["x"], np.float64),
        np.ascontiguousarray(src["y"], np.float64),
        np.ascontiguousarray(src["flux"], np.float64),
        radius, start, count, w, ixx, ixy, iyy, norm, 32,
    )


def render_electrons(meta: Mapping[str, Any], static: Mapping[str, np.ndarray], transients: Mapping[str, np.ndarray],
                     *, sky: bool = True, sources: bool = True) -> np.ndarray:
    """Noiseless electrons per pixel before the flat field: sky, then static sources, then transients.

    ``meta`` is a per-(visit, ccd) truth dict (``psf``, ``sky``, ``focal_plane_centre``).
    Returns float32 (4096, 2048).
    """
    fx, fy = meta["focal_plane_centre"]
    img = np.zeros((NY, NX), np.float32)
    if sky:
        s = meta["sky"]
        fill_sky(img, float(s["level_e"]), float(s["gu"]), float(s["gv"]), fx - 1023.5, fy - 2047.5, PSF_SCALE)
    if sources:
        render_sources(img, static, meta["psf"], fx, fy)
        render_sources(img, transients, meta["psf"], fx, fy)
    return img


def psf_stamp(meta: Mapping[str, Any], x: float, y: float, half: int) -> tuple[np.ndarray, int, int]:
    """Unit-flux PSF sampled on the (2*half+1)^2 pixels around ``(x, y)``; returns ``(stamp, i0, j0)``."""
    fx, fy = meta["focal_plane_centre"]
    i0 = int(math.floor(y + 0.5)) - half
    j0 = int(math.floor(x + 0.5)) - half
    stamp = np.zeros((2 * half + 1, 2 * half + 1), np.float32)
    src = {"x": np.array([x - j0]), "y": np.array([y - i0]), "flux": np.array([1.0]), "kind": np.array([0]),
           "re_px": np.array([0.0]), "q": np.array([1.0]), "pa": np.array([0.0])}
    radius, start, count, w, ixx, ixy, iyy, norm = build_components(src, meta["psf"], fx + j0, fy + i0)
    render_mixtures(stamp, src["x"], src["y"], src["flux"], np.array([2 * half + 2]), start, count, w, ixx, ixy,
                    iyy, norm, 8)
    return stamp.astype(np.float64), i0, j0


def powerlaw_mags(rng: np.random.Generator, n: int, m1: float, m2: float, slope: float) -> np.ndarray:
    """Magnitudes with ``dN/dm ∝ 10**(slope*m)`` between ``m1`` and ``m2``."""
    u = rng.random(n)
    return m1 + np.log10(1.0 + u * (10.0 ** (slope * (m2 - m1)) - 1.0)) / slope


def make_sky_catalogue(rng: np.random.Generator, centres: list[tuple[float, float]], *, margin_px: float = 700.0,
                       star_density: float = 8000.0, galaxy_density: float = 8000.0,
                       n_bright_per_ccd: int = 4) -> dict[str, np.ndarray]:
    """Static stars and galaxies over the CCDs' focal-plane box plus a margin (positions at epoch 2016.0).

    Densities are per square degree (stars 16-23.5 mag with ``dN/dm ∝ 10^(0.2 m)``,
    galaxies 17.5-23.5 with ``10^(0.4 m)``), plus ``n_bright_per_ccd`` bright stars
    (11.5-14 mag, saturated) per CCD, half on each amplifier.
    Returns a dict of columns (ids start at 1).
    """
    fxs = np.array([c[0] for c in centres])
    fys = np.array([c[1] for c in centres])
    u0, u1 = fxs.min() - NX / 2 - margin_px, fxs.max() + NX / 2 + margin_px
    v0, v1 = fys.min() - NY / 2 - margin_px, fys.max() + NY / 2 + margin_px
    area = (u1 - u0) * (v1 - v0) * (PIXEL_SCALE / 3600.0) ** 2
    nstar = rng.poisson(star_density * area)
    ngal = rng.poisson(galaxy_density * area)
    u = np.concatenate([rng.uniform(u0, u1, nstar), rng.uniform(u0, u1, ngal)])
    v = np.concatenate([rng.uniform(v0, v1, nstar), rng.uniform(v0, v1, ngal)])
    g = np.concatenate([powerlaw_mags(rng, nstar, 16.0, 23.5, 0.2), powerlaw_mags(rng, ngal, 17.5, 23.5, 0.4)])
    kind = np.concatenate([np.zeros(nstar, np.int64), np.ones(ngal, np.int64)])
    # bright saturated stars: per CCD, one per amplifier at least
    bu, bv, bg = [], [], []
    for fx, fy in centres:
        for b in range(n_bright_per_ccd):
            side = -1 if b % 2 == 0 else 1
            bu.append(fx + side * rng.uniform(150, NAMP - 150))
            bv.append(fy + rng.uniform(-NY / 2 + 300, NY / 2 - 300))
            bg.append(rng.uniform(11.5, 14.0))
    u = np.concatenate([u, bu])
    v = np.concatenate([v, bv])
    g = np.concatenate([g, bg])
    kind = np.concatenate([kind, np.zeros(len(bu), np.int64)])
    n = u.size
    isstar = kind == KIND_STAR
    gr = np.where(isstar, rng.uniform(0.2, 1.4, n), rng.uniform(0.3, 1.0, n))
    cd = cd_matrix(0.0)
    xi = cd[0, 0] * u + cd[0, 1] * v
    eta = cd[1, 0] * u + cd[1, 1] * v
    ra, dec = tan_deproject(xi, eta, FIELD_RA, FIELD_DEC)
    # proper motions: most stars a few mas/yr, 2% fast movers (50-300 mas/yr); galaxies none
    pmra = np.where(isstar, rng.normal(0.0, 4.0, n), 0.0)
    pmdec = np.where(isstar, rng.normal(-2.0, 4.0, n), 0.0)
    fast = isstar & (rng.random(n) < 0.02)
    amp = rng.uniform(50.0, 300.0, n)
    ang = rng.uniform(0, 2 * math.pi, n)
    pmra = np.where(fast, amp * np.cos(ang), pmra)
    pmdec = np.where(fast, amp * np.sin(ang), pmdec)
    re = np.where(isstar, 0.0, np.clip(10 ** rng.normal(np.log10(0.9) - 0.08 * (g - 20.0), 0.18), 0.25, 4.0))
    return {
        "id": np.arange(1, n + 1, dtype=np.int64),
        "type": np.where(isstar, "star", "galaxy"),
        "kind": kind,
        "ra": ra,
        "dec": dec,
        "pmra": pmra,
        "pmdec": pmdec,
        "g": g,
        "r": g - gr,
        "i": g - gr - np.where(isstar, 0.45 * gr, 0.35 * gr),
        "z": g - gr - np.where(isstar, 0.65 * gr, 0.55 * gr),
        "re_arcsec": re,
        "q": np.where(isstar, 1.0, rng.uniform(0.3, 1.0, n)),
        "pa_deg": np.where(isstar, 0.0, rng.uniform(0.0, 180.0, n)),
    }


def positions_at_epoch(cat: Mapping[str, np.ndarray], year: float,
                       ref_year: float = 2016.0) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (deg) at Julian ``year`` from ``ref_year`` positions and proper motions (mas/yr, pmra = mu_a cos d)."""
    dt = year - ref_year
    dec = cat["dec"] + cat["pmdec"] * dt / 3.6e6
    ra = cat["ra"] + cat["pmra"] * dt / 3.6e6 / np.cos(np.radians(cat["dec"]))
    return ra, dec


def snr_to_flux(stamp: np.ndarray, var: np.ndarray, gain: float, snr: float, n_template: int, sign: int) -> float:
    """Flux (ADU) whose expected PSF-photometry S/N on the difference image is ``snr``.

    With the unit PSF ``P`` and per-pixel variance ``V`` of the static scene (ADU^2),
    ``A = sum(P^2 V) / (sum P^2)^2`` and ``B = sum(P^3) / gain / (sum P^2)^2``; the
    flux variance is ``sigma^2(F) = (1 + 1/N_template) A + F B`` (the template is taken
    as a coadd of ``N_template`` visits of similar depth), and ``F = sign * snr * sigma(F)``
    is solved as a quadratic.
    """
    p2 = float((stamp * stamp).sum())
    a = (1.0 + 1.0 / n_template) * float((stamp * stamp * var).sum()) / p2**2
    b = float((stamp**3).sum()) / gain / p2**2
    s2 = snr * snr
    if sign > 0:
        return 0.5 * (s2 * b + math.sqrt(s2 * s2 * b * b + 4 * s2 * a))
    return -0.5 * (-s2 * b + math.sqrt(s2 * s2 * b * b + 4 * s2 * a))


def flux_snr(stamp: np.ndarray, var: np.ndarray, gain: float, flux: float, n_template: int) -> float:
    """Expected S/N of a difference-image flux (ADU), the inverse of :func:`snr_to_flux`."""
    p2 = float((stamp * stamp).sum())
    a = (1.0 + 1.0 / n_template) * float((stamp * stamp * var).sum()) / p2**2
    b = float((stamp**3).sum()) / gain / p2**2
    return abs(flux) / math.sqrt(max(a + flux * b, 1e-30))
