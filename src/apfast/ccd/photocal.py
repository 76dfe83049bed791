"""Photometric calibration: aperture correction and a clipped-median zero point.

**Aperture correction** (Rubin's ``measureApCorr``): PSF fluxes miss the light
beyond the model stamp and any PSF-model error; on the PSF stars the ratio of a
large-aperture flux (the calibration flux) to the PSF flux is fitted as a
polynomial of position, and PSF fluxes are multiplied by it.

**Zero point** (Rubin's ``PhotoCalTask`` with ``useMedian=True``): for every
matched reference star, ``zp_i = m_ref,i + c * colour_i + 2.5 log10(f_i)``; the zero
point is the median after ``n_iter`` rounds of ``n_sigma`` clipping about the
median, keeping only stars whose combined error is below ``sigma_max`` mag. Its
error is ``1.2533 * robust_sigma / sqrt(n)`` (the standard error of a median).
Magnitudes are AB, so ``PhotoCalib(zero_point)`` converts counts to nJy.

**Which flux the zero point refers to.** The instrumental fluxes are PSF fluxes multiplied by the
aperture correction, i.e. put on the scale of the *calibration aperture* (``calibrate.calib_flux_radius``,
12 pixels = 3.2" on DECam, as Rubin's ``base_CircularApertureFlux_12_0``). The zero point therefore
calibrates calibration-aperture fluxes, not total fluxes: the light of a point source outside that
aperture (about 1-2% on DECam) is not included, in the calexp's ``PhotoCalib`` and everything made from
it (DIA-source and forced fluxes in nJy). The calexp header says so (``ZPFLUX``).

**Colour terms.** The reference magnitudes are put into the camera's natural system first,
``m = m_ref + c0 + c1 x + c2 x^2 + ...`` with ``x`` a reference colour, from
``calibrate.photocal.colour_terms`` or else the camera description's ``[photometry]`` table (DECam:
the Legacy Surveys PS1 -> DECam terms in ``g - i``, used only for ``0.4 < g - i < 2.7``). Without them
a PS1-calibrated DECam g zero point is off by the mean colour term of the stars, ~0.05 mag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast._constants import MAD_TO_SIGMA
from apfast.errors import AlgorithmError
from apfast.exposure import PhotoCalib
from apfast.psf import poly_terms

__all__ = [
    "ApCorrModel",
    "PhotoCalConfig",
    "PhotoCalError",
    "PhotoCalResult",
    "fit_aperture_correction",
    "fit_zero_point",
]


class PhotoCalError(AlgorithmError):
    """Too few usable reference matches for a zero point or aperture correction."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PhotoCalConfig(ConfigSection):
    """Zero point and aperture correction (``calibrate.photocal``)."""

    _key_prefix: ClassVar[str] = "calibrate.photocal."

    n_sigma: float = opt(3.0, "Clipping threshold (robust sigma) of zero-point outliers.")
    n_iter: int = opt(20, "Clipping iterations (Rubin: 20).")
    sigma_max: float = opt(0.25, "Largest per-star zero-point error (mag) used.")
    min_stars: int = opt(5, "Fewest stars for a zero point.")
    colour_terms: tuple[str, ...] = opt(
        (),
        "Colour terms as 'band:ref1-ref2:c0,c1,...', e.g. 'g:g-r:0.0,-0.02' adds "
        "c0 + c1*(g-r) to the reference magnitude of band g.",
    )
    camera_colour_terms: bool = opt(
        True,
        "Use the camera description's colour terms ([photometry] of its TOML; DECam: PS1 -> DECam) for bands "
        "colour_terms does not list.",
    )
    apcorr_order: int = opt(1, "Polynomial degree of the aperture correction map.")
    apcorr_min_stars: int = opt(5, "Fewest stars for an aperture correction.")

    def _validate(self) -> None:
        checks = [
            ("n_sigma", self.n_sigma > 0, "> 0"),
            ("n_iter", self.n_iter >= 1, ">= 1"),
            ("sigma_max", self.sigma_max > 0, "> 0"),
            ("min_stars", self.min_stars >= 1, ">= 1"),
            ("apcorr_order", 0 <= self.apcorr_order <= 3, "0..3"),
            ("apcorr_min_stars", self.apcorr_min_stars >= 1, ">= 1"),
        ]
        self._check_ranges(checks)
        for term in self.colour_terms:
            try:
                _parse_colour_term(term)
            except ValueError:
                self._raise("colour_terms",
                            f" entry {term!r} is not 'band:ref1-ref2:c0,c1,...' (e.g. 'g:g-r:0.0,-0.02')")

    def colour_term(self, band: str) -> tuple[str, str, tuple[float, ...]] | None:
        """``(ref1, ref2, coeffs)`` of the colour term for ``band``, or ``None``."""
        for term in self.colour_terms:
            b, r1, r2, c = _parse_colour_term(term)
            if b == band:
                return r1, r2, c
        return None


def _parse_colour_term(term: str) -> tuple[str, str, str, tuple[float, ...]]:
    band, colour, coeffs = term.split(":")
    r1, r2 = colour.split("-")
    c = tuple(float(v) for v in coeffs.split(","))
    if not band or not r1 or not r2 or not c:
        raise ValueError(term)
    return band.strip(), r1.strip(), r2.strip(), c


@dataclass(frozen=True, slots=True)
class PhotoCalResult:
    """The zero point and its evidence."""

    photo_calib: PhotoCalib
    zero_point: float
    zero_point_err: float
    sigma: float
    n_used: int
    used: np.ndarray  # bool per input match


@dataclass(frozen=True, slots=True)
class ApCorrModel:
    """Aperture correction ``c(x, y)`` as a polynomial of normalised position (:func:`apfast.psf.poly_terms`)."""

    coeffs: np.ndarray
    order: int
    x_center: float
    y_center: float
    x_scale: float
    y_scale: float
    n_stars: int
    sigma: float

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Evaluate at positions (0-based pixels)."""
        xs, ys = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        xn, yn = (xs - self.x_center) / self.x_scale, (ys - self.y_center) / self.y_scale
        terms = np.array([poly_terms(a, b, self.order) for a, b in zip(xn, yn, strict=True)])
        return terms @ self.coeffs

    def to_header_cards(self) -> list[tuple[str, float | int, str]]:
        """FITS cards describing the model (``APC_*``)."""
        cards: list[tuple[str, float | int, str]] = [
            ("APC_ORD", self.order, "aperture correction polynomial order"),
            ("APC_XC", self.x_center, "aperture correction x centre"),
            ("APC_YC", self.y_center, "aperture correction y centre"),
            ("APC_XS", self.x_scale, "aperture correction x scale"),
            ("APC_YS", self.y_scale, "aperture correction y scale"),
            ("APC_N", self.n_stars, "stars used for aperture correction"),
            ("APC_SIG", self.sigma, "rms scatter of aperture correction"),
        ]
        cards += [(f"APC_C{i}", float(c), "aperture correction coefficient") for i, c in enumerate(self.coeffs)]
        return cards

    @classmethod
    def from_header(cls, header: object) -> ApCorrModel | None:
        """Rebuild from ``APC_*`` cards, or ``None`` if absent."""
        h = header  # astropy Header or mapping
        if "APC_ORD" not in h:  # type: ignore[operator]
            return None
        order = int(h["APC_ORD"])  # type: ignore[index]
        n = (order + 1) * (order + 2) // 2
        return cls(
            coeffs=np.array([float(h[f"APC_C{i}"]) for i in range(n)]),  # type: ignore[index]
            order=order,
            x_center=float(h["APC_XC"]), y_center=float(h["APC_YC"]),  # type: ignore[index]
            x_scale=float(h["APC_XS"]), y_scale=float(h["APC_YS"]),  # type: ignore[index]
            n_stars=int(h["APC_N"]), sigma=float(h["APC_SIG"]),  # type: ignore[index]
        )


def fit_aperture_correction(
    x: np.ndarray, y: np.ndarray, psf_flux: np.ndarray, ap_flux: np.ndarray, *, shape: tuple[int, int],
    config: PhotoCalConfig | None = None,
) -> ApCorrModel:
    """Fit ``ap_flux / psf_flux`` over PSF stars as a polynomial of position, with 3-sigma clipping.

    Raises
    ------
    PhotoCalError
        If fewer than ``apcorr_min_stars`` stars have positive fluxes.
    """
    cfg = config or PhotoCalConfig()
    ok = np.isfinite(psf_flux) & np.isfinite(ap_flux) & (psf_flux > 0) & (ap_flux > 0)
    ok &= np.isfinite(x) & np.isfinite(y)
    if ok.sum() < cfg.apcorr_min_stars:
        msg = (
            f"only {int(ok.sum())} star(s) with positive PSF and aperture fluxes for the aperture correction "
            f"(need calibrate.photocal.apcorr_min_stars = {cfg.apcorr_min_stars})"
        )
        raise PhotoCalError(msg, n_stars=int(ok.sum()))
    ny, nx = shape
    xc, yc, xs, ys = (nx - 1) / 2, (ny - 1) / 2, nx / 2, ny / 2
    order = cfg.apcorr_order
    while order > 0 and ok.sum() < 3 * (order + 1) * (order + 2) // 2:
        order -= 1
    ratio = ap_flux / psf_flux
    terms = np.array([poly_terms(a, b, order) for a, b in zip((x - xc) / xs, (y - yc) / ys, strict=True)])
    use = ok.copy()
    coeffs = np.zeros(terms.shape[1])
    sig = 0.0
    for _ in range(5):
        coeffs, *_ = np.linalg.lstsq(terms[use], ratio[use], rcond=None)
        r = ratio - terms @ coeffs
        sig = MAD_TO_SIGMA * float(np.median(np.abs(r[use])))
        new = ok & (np.abs(r) < 3 * max(sig, 1e-6))
        if new.sum() < cfg.apcorr_min_stars or np.array_equal(new, use):
            break
        use = new
    return ApCorrModel(coeffs, order, xc, yc, xs, ys, int(use.sum()), sig)


def fit_zero_point(
    inst_flux: np.ndarray, inst_flux_err: np.ndarray, ref_mag: np.ndarray, ref_mag_err: np.ndarray, *,
    colour: np.ndarray | None = None, colour_coeffs: tuple[float, ...] = (), config: PhotoCalConfig | None = None,
    colour_range: tuple[float, float] | None = None,
) -> PhotoCalResult:
    """Clipped-median zero point from matched instrumental fluxes and reference magnitudes.

    Parameters
    ----------
    inst_flux, inst_flux_err : ndarray (n,)
        Aperture-corrected instrumental fluxes (counts) and errors.
    ref_mag, ref_mag_err : ndarray (n,)
        Reference AB magnitudes and errors in the image's band.
    colour : ndarray (n,), optional
        Reference colour for the colour term; ``colour_coeffs`` are polynomial coefficients in it.
    colour_range : (float, float), optional
        With a colour term: stars whose colour lies outside it are not used (the term does not hold there).

    Raises
    ------
    PhotoCalError
        If fewer than ``min_stars`` stars survive; the message gives the counts and config keys.
    """
    cfg = config or PhotoCalConfig()
    f, fe = np.asarray(inst_flux, float), np.asarray(inst_flux_err, float)
    m, me = np.asarray(ref_mag, float), np.asarray(ref_mag_err, float)
    if colour is not None and colour_coeffs:
        m = m + np.polyval(list(colour_coeffs)[::-1], np.asarray(colour, float))
    ok = np.isfinite(f) & (f > 0) & np.isfinite(m)
    if colour is not None and colour_coeffs and colour_range is not None:
        c = np.asarray(colour, float)
        with np.errstate(invalid="ignore"):
            ok &= (c >= colour_range[0]) & (c <= colour_range[1])
    me = np.where(np.isfinite(me), me, 0.0)
    err = np.sqrt(me**2 + (1.0857 * np.where(ok, fe / np.where(f > 0, f, 1), np.inf)) ** 2)
    n_match = int(ok.sum())
    ok &= err < cfg.sigma_max
    n_precise = int(ok.sum())
    if n_precise < cfg.min_stars:
        msg = (
            f"only {n_precise} of {len(f)} matched reference star(s) have zero-point errors below "
            f"calibrate.photocal.sigma_max = {cfg.sigma_max} mag ({n_match} with positive flux); need "
            f"calibrate.photocal.min_stars = {cfg.min_stars}"
        )
        raise PhotoCalError(msg, n_matches=len(f), n_positive=n_match, n_precise=n_precise)
    zp_i = np.where(ok, m + 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)
    use = ok.copy()
    zp = float(np.median(zp_i[use]))
    sig = 0.0
    for _ in range(cfg.n_iter):
        resid = zp_i - zp
        sig = MAD_TO_SIGMA * float(np.median(np.abs(resid[use])))
        new = ok & (np.abs(resid) <= cfg.n_sigma * max(sig, 1e-4))
        if new.sum() < cfg.min_stars:
            break
        zp_new = float(np.median(zp_i[new]))
        if np.array_equal(new, use) and zp_new == zp:
            break
        use, zp = new, zp_new
    n = int(use.sum())
    zp_err = 1.2533 * sig / math.sqrt(max(n, 1))
    return PhotoCalResult(PhotoCalib(zp, zp_err), zp, zp_err, sig, n, use)
