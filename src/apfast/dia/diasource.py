"""DIA source detection and measurement on a difference image (Rubin ``ImageDifferenceTask`` + ``DipoleFitTask``).

:func:`run_dia_detection` does, without I/O (as in Rubin's ap_pipe):

1. clears ``DETECTED`` / ``DETECTED_NEGATIVE`` and detects with ``dia.detection``
   (:func:`apfast.ccd.detection.detect_sources`, PSF sigma from the difference PSF's
   half-maximum FWHM at the CCD centre, :func:`apfast.diffim.subtract.matching_fwhm`):
   by default both polarities at ``dia.detection.threshold`` = 5 sigma of the per-pixel
   variance of the PSF-smoothed difference, footprints grown by ``n_sigma_to_grow`` =
   2.4 PSF sigma plus ``grow_merge`` = 2 pixels and merged, so a dipole is one source;
2. measures every footprint (:func:`apfast.ccd.measurement.measure_sources`:
   centroid, adaptive moments, PSF and aperture fluxes);
3. fits footprints holding both a positive and a negative peak with the dipole
   model of :mod:`apfast.kernels.dipole` (real PSF, Lanczos-3 shifted, plus a
   constant); a successful fit moves the centroid to the midpoint of the lobes and
   the PSF flux is re-fitted there (Rubin measures PsfFlux at the dipole centroid);
4. forced PSF photometry (:mod:`apfast.kernels.forced`) at the final centroids on
   the science calexp (``scienceFlux``) and the PSF-matched template
   (``templateFlux``);
5. converts to a column set named as the APDB ``DiaSource`` table: fluxes in nJy
   with each image's ``photo_calib`` (the difference's when an image has none),
   ``ra``/``dec`` and their errors (degrees of each coordinate) and covariance from
   the WCS Jacobian at the centroid.

**Dipole classification** (``isDipole``). Rubin's ``ClassificationDipole`` asks for
a combined S/N ``sqrt((F+/sF+)^2 + (F-/sF-)^2) > minSn`` and bounds each lobe's
flux fraction; the fraction as written there (``|F|/(2 total)``) can never
exceed 0.5 and so never rejects anything. apfast uses the evident intent: a
footprint is a dipole when the fit succeeded, both lobe fluxes are positive,
the combined S/N exceeds ``dia.dipole_min_snr`` and *each* lobe carries at most
``dia.dipole_max_flux_ratio`` of ``F+ + F-`` (so a lopsided pair, e.g. a transient
next to a small subtraction residual, is not a dipole).

Column sets are ``dict[str, ndarray]``; NULL is NaN in float columns, boolean
columns are never NULL, and the NOT NULL integer columns (``psfNdata``,
``dipoleNdata``, ``bboxSize``) are int32 with 0 for "none".
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt, subsection
from apfast._constants import FWHM_PER_SIGMA, MAD_TO_SIGMA
from apfast.ccd.detection import DetectionConfig, check_planes, detect_sources
from apfast.ccd.measurement import MeasurementConfig, aperture_name, measure_sources
from apfast.diffim.subtract import matching_fwhm
from apfast.errors import InputError
from apfast.exposure import Exposure, PhotoCalib
from apfast.kernels import dia_noise as _kn
from apfast.kernels import dipole as _kd
from apfast.kernels import forced as _kf
from apfast.masks import MASK_PLANES, bitmask
from apfast.psf import GaussianPsf, ImagePsf, PolynomialPixelPsf, PsfModel

__all__ = [
    "DiaSourceConfig",
    "DiaSourceResult",
    "fast_psf",
    "forced_photometry",
    "psf_basis",
    "run_dia_detection",
]

log = logging.getLogger(__name__)

#: Sentinel: "not computed yet" (None is a valid linear form: the PSF has none).
_UNSET: Any = object()
#: Histogram range of the smoothed S/N samples for the exact median (values outside fall back to a partition).
_Z_RANGE = 64.0

#: Pixel-flag columns -> mask planes ORed over the footprint (``Center``: over the 3x3 centre).
_PIXEL_FLAGS = {
    "bad": ("BAD",),
    "cr": ("CR",),
    "edge": ("EDGE",),
    "nodata": ("NO_DATA",),
    "interpolated": ("INTRP",),
    "saturated": ("SAT",),
    "suspect": ("SUSPECT",),
}
_CENTER_FLAGS = ("cr", "nodata", "interpolated", "saturated", "suspect")
#: Fakes (apfast.ccd.inject): flags with their ``Center`` form, kept out of the general ``pixelFlags``
#: (an injected source is not a measurement problem).
_INJECTED_FLAGS = {"injected": ("INJECTED",), "injected_template": ("INJECTED_TEMPLATE",)}


def _dia_detection() -> DetectionConfig:
    """Rubin's DIA detection: 5 sigma of the variance plane, both polarities, footprints merged (growFootprint 2)."""
    return DetectionConfig(threshold=5.0, threshold_type="variance", polarity="both", grow_merge=2)


@dataclass(frozen=True, slots=True, kw_only=True)
class DiaSourceConfig(ConfigSection):
    """DIA source detection and measurement on the difference image (``dia``)."""

    _key_prefix: ClassVar[str] = "dia."

    detection: DetectionConfig = subsection(
        DetectionConfig,
        doc="Detection on the difference: both signs at threshold sigma of the per-pixel variance of the "
        "PSF-smoothed difference (Rubin ApPipe 5.0), + and - footprints grown by grow_merge more pixels and "
        "merged (Rubin growFootprint 2).",
        factory=_dia_detection,
    )
    aperture_radius: float = opt(12.0, "Radius (pixels) of the apFlux circular aperture (> 0).")
    do_dipole_fit: bool = opt(True, "Fit the dipole model to footprints with both positive and negative peaks.")
    dipole_max_separation_sigma: float = opt(
        5.0, "Dipole lobes start at most this many PSF sigma apart and move at most this far (Rubin maxSeparation)."
    )
    dipole_min_snr: float = opt(
        5.0 * math.sqrt(2.0), "isDipole needs the lobes' combined S/N above this (Rubin minSn = 5 sqrt 2)."
    )
    dipole_max_flux_ratio: float = opt(
        0.65, "isDipole needs each lobe to carry at most this fraction of F+ + F- (Rubin maxFluxRatio); in (0.5, 1]."
    )
    dipole_max_iter: int = opt(50, "Iteration limit of the Levenberg-Marquardt dipole fit (>= 1).")
    bad_mask_planes: tuple[str, ...] = opt(
        ("BAD", "SAT", "NO_DATA"), "Mask planes whose pixels are left out of every flux and dipole fit."
    )
    scale_variance: bool = opt(
        True,
        "Rescale the difference's variance so the PSF-smoothed noise has unit robust scatter before detecting "
        "(Rubin's ScaleVarianceTask on the diffim): warping and coadding leave the template's variance plane "
        "short of its noise on PSF scales, which would otherwise turn into false 5-sigma detections.",
    )
    template_flux_error: float = opt(
        0.02,
        "Systematic error floor of the subtraction as a fraction of the static scene: detection and fluxes use "
        "variance + (this x matched template)^2 per pixel, so PSF-matching residuals at bright stars and galaxy "
        "cores (~1-2% of their flux) are not reported as DIA sources. 0 turns it off (Rubin's behaviour).",
    )
    psf_grid_spacing: int = opt(
        256,
        "For PSF models without a linear basis: spacing (pixels) of the grid the PSF is evaluated on and "
        "bilinearly interpolated from when there are more positions than grid nodes (>= 16).",
    )

    def _validate(self) -> None:
        if not (math.isfinite(self.aperture_radius) and self.aperture_radius > 0):
            self._fail("aperture_radius", self.aperture_radius, "use a positive radius in pixels, e.g. 12.0")
        if not (math.isfinite(self.dipole_max_separation_sigma) and self.dipole_max_separation_sigma > 0):
            self._fail("dipole_max_separation_sigma", self.dipole_max_separation_sigma, "use a positive number, e.g. 5")
        if not (math.isfinite(self.dipole_min_snr) and self.dipole_min_snr >= 0):
            self._fail("dipole_min_snr", self.dipole_min_snr, "use a non-negative S/N, e.g. 7.07")
        if not (0.5 < self.dipole_max_flux_ratio <= 1.0):
            self._fail("dipole_max_flux_ratio", self.dipole_max_flux_ratio, "use a fraction in (0.5, 1], e.g. 0.65")
        if self.dipole_max_iter < 1:
            self._fail("dipole_max_iter", self.dipole_max_iter, "use an integer >= 1, e.g. 50")
        if not (math.isfinite(self.template_flux_error) and 0 <= self.template_flux_error < 1):
            self._fail("template_flux_error", self.template_flux_error, "use a fraction in [0, 1), e.g. 0.02")
        if self.psf_grid_spacing < 16:
            self._fail("psf_grid_spacing", self.psf_grid_spacing, "use an integer >= 16 pixels, e.g. 256")
        unknown = [p for p in self.bad_mask_planes if p not in MASK_PLANES]
        if unknown:
            self._fail("bad_mask_planes", self.bad_mask_planes, f"unknown plane(s) {unknown}; known: {MASK_PLANES}")


@dataclass(frozen=True, slots=True, eq=False)
class DiaSourceResult:
    """Output of :func:`run_dia_detection`.

    Attributes
    ----------
    sources : dict of str to ndarray
        Column set, one row per DIA source, APDB ``DiaSource`` column names (module docstring).
    n_positive, n_negative, n_dipole : int
        Sources classified positive (brightest peak positive, not a dipole), negative, and dipoles;
        they add up to the number of rows.
    timings : dict of str to float
        Seconds per step: ``detect``, ``measure``, ``dipole``, ``forced``, ``columns``, ``total``.
    mask : ndarray, int32, shape (ny, nx)
        Copy of the difference mask with ``DETECTED`` / ``DETECTED_NEGATIVE`` set on the footprints.
    """

    sources: dict[str, np.ndarray]
    n_positive: int
    n_negative: int
    n_dipole: int
    timings: dict[str, float]
    mask: np.ndarray

    @property
    def n_sources(self) -> int:
        """Number of rows."""
        return int(self.sources["x"].shape[0])


# --------------------------------------------------------------------------- PSF representations
def _poly_weights(psf: PolynomialPixelPsf, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(n, nb)`` basis weights of a PolynomialPixelPsf at many positions (vectorised ``poly_terms``)."""
    xn = (x - psf.x_center) / psf.x_scale
    yn = (y - psf.y_center) / psf.y_scale
    terms = [xn ** (d - j) * yn**j for d in range(psf.order + 1) for j in range(d + 1)]
    return np.ascontiguousarray(np.stack(terms, axis=1) @ psf.coeffs.T)


def _linear_form(psf: PsfModel) -> PolynomialPixelPsf | np.ndarray | None:
    """The PSF as a constant stamp or an equivalent PolynomialPixelPsf, or None if it has no linear basis.

    A ``ConvolvedPsf`` of a linear model is linear too: convolution and the centred
    crop commute with the weighted basis sum, and both sides normalise at the end,
    so convolving each basis stamp reproduces ``compute_image`` exactly.
    """
    if isinstance(psf, (GaussianPsf, ImagePsf)):
        return np.ascontiguousarray(psf.compute_image(0.0, 0.0), dtype=np.float64)
    if isinstance(psf, PolynomialPixelPsf):
        return psf
    from apfast.diffim.decorrelate import ConvolvedPsf

    if isinstance(psf, ConvolvedPsf):
        from apfast.diffim.fftw import convolve_full

        base = _linear_form(psf.base)
        if base is None:
            return None
        r = psf.size // 2

        def conv(stamp: np.ndarray) -> np.ndarray:
            full = convolve_full(stamp, psf.kernel)
            c = full.shape[0] // 2
            if r > c:
                full = np.pad(full, r - c)
                c = r
            return full[c - r : c + r + 1, c - r : c + r + 1]

        if isinstance(base, np.ndarray):
            out = conv(base)
            return out / out.sum()
        basis = np.stack([conv(b) for b in base.basis])
        return PolynomialPixelPsf(
            basis, base.coeffs, base.order, base.x_center, base.y_center, base.x_scale, base.y_scale
        )
    return None


def _grid(shape: tuple[int, int], spacing: int) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    gx = np.linspace(0.0, nx - 1.0, max(2, math.ceil((nx - 1) / spacing) + 1))
    gy = np.linspace(0.0, ny - 1.0, max(2, math.ceil((ny - 1) / spacing) + 1))
    return gx, gy


def _bilinear(g: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower node index and fraction of each ``v`` on the grid ``g`` (clamped to the grid)."""
    v = np.clip(v, g[0], g[-1])
    i = np.clip(np.searchsorted(g, v, side="right") - 1, 0, g.size - 2)
    return i, (v - g[i]) / (g[i + 1] - g[i])


def psf_basis(
    psf: PsfModel, x: np.ndarray, y: np.ndarray, *, shape: tuple[int, int], xy0: tuple[int, int] = (0, 0),
    grid_spacing: int = 256,
) -> tuple[np.ndarray, np.ndarray, bool]:  # fmt: skip
    """PSF stamps at many positions as ``(basis, weights, per_source)`` for the numba kernels.

    Stamp ``s`` is ``sum_b weights[s, b] basis[b]`` (normalised by the kernel), or
    ``basis[s]`` when ``per_source``. Constant and polynomial models (and a
    :class:`~apfast.diffim.decorrelate.ConvolvedPsf` of them) are exact. Any other model is
    evaluated per position when there are fewer positions than grid nodes, else on a
    grid of nodes ``grid_spacing`` apart and bilinearly interpolated (sparse weights).

    Parameters
    ----------
    psf : PsfModel
    x, y : ndarray, float64, shape (n,)
        Positions in the exposure's pixel coordinates (the PSF is evaluated at ``+ xy0``).
    shape : tuple of int
        ``(ny, nx)`` of the exposure (grid extent).
    xy0 : tuple of int
        Parent-image offset of pixel ``[0, 0]``.
    grid_spacing : int
        Grid node spacing in pixels.

    Returns
    -------
    basis : ndarray, float64, shape (nb, k, k)
    weights : ndarray, float64, shape (n, nb)
    per_source : bool

    Examples
    --------
    >>> import numpy as np
    >>> b, w, per = psf_basis(GaussianPsf(2.0, 15), np.array([3.0, 9.0]), np.zeros(2), shape=(20, 20))
    >>> b.shape, w.shape, per
    ((1, 15, 15), (2, 1), False)
    """
    return _psf_basis(psf, _linear_form(psf), x, y, shape=shape, xy0=xy0, grid_spacing=grid_spacing)


def _psf_basis(
    psf: PsfModel, lin: PolynomialPixelPsf | np.ndarray | None, x: np.ndarray, y: np.ndarray, *,
    shape: tuple[int, int], xy0: tuple[int, int], grid_spacing: int,
) -> tuple[np.ndarray, np.ndarray, bool]:  # fmt: skip
    """:func:`psf_basis` with ``lin = _linear_form(psf)`` already computed (one convolution per CCD)."""
    n = x.shape[0]
    px = x + xy0[0]
    py = y + xy0[1]
    # copies: model arrays are read-only, and numba compiles read-only arrays as a separate signature
    if isinstance(lin, np.ndarray):
        return np.array(lin[None], dtype=np.float64), np.ones((n, 1)), False
    if isinstance(lin, PolynomialPixelPsf):
        return np.array(lin.basis, dtype=np.float64), _poly_weights(lin, px, py), False
    gx, gy = _grid(shape, grid_spacing)
    if n <= gx.size * gy.size:
        stamps = [np.asarray(psf.compute_image(float(a), float(b)), dtype=np.float64)
                  for a, b in zip(px, py, strict=True)]
        if not stamps:
            k = psf.size
            return np.zeros((0, k, k)), np.zeros((0, 0)), True
        return np.ascontiguousarray(np.stack(stamps)), np.zeros((n, 0)), True
    basis = np.stack([
        np.asarray(psf.compute_image(float(a + xy0[0]), float(b + xy0[1])), dtype=np.float64) for b in gy for a in gx
    ])  # fmt: skip
    ix, tx = _bilinear(gx, x)
    iy, ty = _bilinear(gy, y)
    weights = np.zeros((n, basis.shape[0]))
    rows = np.arange(n)
    for dy, wy in ((0, 1.0 - ty), (1, ty)):
        for dx, wx in ((0, 1.0 - tx), (1, tx)):
            weights[rows, (iy + dy) * gx.size + ix + dx] += wy * wx
    return np.ascontiguousarray(basis), weights, False


def fast_psf(psf: PsfModel, *, shape: tuple[int, int], xy0: tuple[int, int] = (0, 0), grid_spacing: int = 256) -> Any:
    """A PSF for :func:`apfast.ccd.measurement.measure_sources` in local pixel coordinates, fast to evaluate in bulk.

    Linear models (see :func:`psf_basis`) become an exact ``ImagePsf`` or
    ``PolynomialPixelPsf``; others a callable that interpolates a node grid.
    """
    return _fast_psf(psf, _linear_form(psf), shape=shape, xy0=xy0, grid_spacing=grid_spacing)


def _fast_psf(
    psf: PsfModel, lin: PolynomialPixelPsf | np.ndarray | None, *, shape: tuple[int, int], xy0: tuple[int, int],
    grid_spacing: int,
) -> Any:  # fmt: skip
    """:func:`fast_psf` with ``lin = _linear_form(psf)`` already computed."""
    if isinstance(lin, np.ndarray):
        return ImagePsf(lin)
    if isinstance(lin, PolynomialPixelPsf):
        return PolynomialPixelPsf(
            lin.basis, lin.coeffs, lin.order, lin.x_center - xy0[0], lin.y_center - xy0[1], lin.x_scale, lin.y_scale
        )
    gx, gy = _grid(shape, grid_spacing)
    nodes = np.stack([
        np.asarray(psf.compute_image(float(a + xy0[0]), float(b + xy0[1])), dtype=np.float64) for b in gy for a in gx
    ])  # fmt: skip

    def evaluate(x: float, y: float) -> np.ndarray:
        ix, tx = _bilinear(gx, np.array([x]))
        iy, ty = _bilinear(gy, np.array([y]))
        i, j, u, v = int(iy[0]), int(ix[0]), float(ty[0]), float(tx[0])
        s = gx.size
        out = (1 - u) * ((1 - v) * nodes[i * s + j] + v * nodes[i * s + j + 1]) + u * (
            (1 - v) * nodes[(i + 1) * s + j] + v * nodes[(i + 1) * s + j + 1]
        )
        return out / out.sum()

    return evaluate


# --------------------------------------------------------------------------- forced photometry
def _exposure_planes(exposure: Exposure, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if exposure.variance is None:
        msg = f"the {what} exposure has no variance plane; forced photometry and detection need one"
        raise InputError(msg)
    mask = exposure.mask if exposure.mask is not None else np.zeros(exposure.shape, np.int32)
    return check_planes(exposure.image, exposure.variance, mask)


#: Below this many positions the serial compilations of the forced / pixel-flag kernels are used:
#: starting the thread pool costs more than fitting a few hundred 25x25 stamps.
_SERIAL_BELOW = 512


def _forced_raw(
    exposure: Exposure, x: np.ndarray, y: np.ndarray, bad_bits: int, grid_spacing: int, what: str,
    lin: Any = _UNSET,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Forced PSF fit in image units: flux, err, chi2, ndata, flags (module kernels).

    ``lin``: ``_linear_form(exposure.psf)`` if the caller already has it.
    """
    if exposure.psf is None:
        msg = f"the {what} exposure has no PSF model; attach one (characterise the image first)"
        raise InputError(msg)
    img, var, msk = _exposure_planes(exposure, what)
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    n = x.shape[0]
    out = {k: np.empty(n) for k in ("flux", "err", "chi2")}
    out["ndata"] = np.zeros(n, np.int32)
    out["flags"] = np.zeros(n, np.int32)
    if n:
        # row order: neighbouring positions share image rows (cache and TLB), ~1.5x faster on a full CCD
        order = np.argsort(np.nan_to_num(y), kind="stable")
        xs, ys = np.ascontiguousarray(x[order]), np.ascontiguousarray(y[order])
        if lin is _UNSET:
            lin = _linear_form(exposure.psf)
        basis, weights, per = _psf_basis(
            exposure.psf, lin, xs, ys, shape=img.shape, xy0=exposure.xy0, grid_spacing=grid_spacing
        )
        res = {k: np.empty_like(v) for k, v in out.items()}
        kernel = _kf.forced_psf_flux_serial if n < _SERIAL_BELOW else _kf.forced_psf_flux
        kernel(
            img, var, msk, basis, weights, per, xs, ys, bad_bits,
            res["flux"], res["err"], res["chi2"], res["ndata"], res["flags"],
        )  # fmt: skip
        for k, v in res.items():
            out[k][order] = v
    return out


def forced_photometry(
    exposure: Exposure, x: Any, y: Any, *, photo_calib: PhotoCalib | None = None,
    bad_mask_planes: tuple[str, ...] = ("BAD", "SAT", "NO_DATA"), grid_spacing: int = 256,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Forced PSF photometry of ``exposure`` at fixed pixel positions (Rubin ``base_PsfFlux``).

    The amplitude of the exposure's PSF, Lanczos-3 shifted to each sub-pixel
    position, is fitted by variance-weighted linear least squares
    (:func:`apfast.kernels.forced.forced_psf_flux`). Used for ``scienceFlux`` /
    ``templateFlux`` of DIA sources and for DIA forced sources.

    Parameters
    ----------
    exposure : Exposure
        Needs ``variance`` and ``psf``; ``mask`` optional.
    x, y : array_like, shape (n,)
        Positions in the exposure's pixel coordinates (pixel centres at integers).
    photo_calib : PhotoCalib, optional
        Calibration to nJy; default ``exposure.photo_calib``.
    bad_mask_planes : tuple of str
        Pixels with these planes are not used.
    grid_spacing : int
        See :func:`psf_basis` (only for PSF models without a linear basis).

    Returns
    -------
    dict of str to ndarray, each shape (n,)
        ``flux``, ``fluxErr`` (float64, nJy; NaN when no pixel was usable),
        ``flag`` (bool: no usable pixel or non-finite result),
        ``flag_edge`` (bool: the stamp was truncated by the image border),
        ``flag_noGoodPixels`` (bool).

    Raises
    ------
    InputError
        If the exposure has no variance, PSF or calibration, or ``x`` and ``y`` differ in length.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((40, 40), np.float32)
    >>> exp = Exposure(img, variance=np.ones_like(img), psf=GaussianPsf(2.0, 15), photo_calib=PhotoCalib(31.4))
    >>> out = forced_photometry(exp, [20.0, 39.0], [20.0, 20.0])
    >>> [bool(v) for v in out["flag_edge"]], round(float(out["fluxErr"][0]), 2)
    ([False, True], 7.09)
    """
    xa = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ya = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if xa.shape != ya.shape or xa.ndim != 1:
        msg = f"x and y must be 1-D arrays of one length, got shapes {xa.shape} and {ya.shape}"
        raise InputError(msg)
    pc = photo_calib if photo_calib is not None else exposure.photo_calib
    if pc is None:
        msg = "the exposure has no photo_calib and none was passed; calibrate it (apfast photocal) or pass photo_calib="
        raise InputError(msg)
    raw = _forced_raw(exposure, xa, ya, bitmask(bad_mask_planes), int(grid_spacing), "forced-photometry")
    flux, err = pc.instflux_to_njy(raw["flux"], raw["err"])
    flux = np.atleast_1d(np.asarray(flux, dtype=np.float64))
    err = np.atleast_1d(np.asarray(err, dtype=np.float64))
    nogood = (raw["flags"] & _kf.FLAG_NO_GOOD_PIXELS) != 0
    return {
        "flux": flux,
        "fluxErr": err,
        "flag": nogood | ~np.isfinite(flux),
        "flag_edge": (raw["flags"] & _kf.FLAG_EDGE) != 0,
        "flag_noGoodPixels": nogood,
    }


# --------------------------------------------------------------------------- sky coordinates
def _sky(wcs: Any, x: np.ndarray, y: np.ndarray, cxx: np.ndarray, cyy: np.ndarray,
         cxy: np.ndarray) -> dict[str, np.ndarray]:
    """ra, dec (deg) and the covariance of (ra, dec) from the pixel covariance via the WCS Jacobian."""
    n = x.shape[0]
    xs = np.concatenate([x, x + 0.5, x - 0.5, x, x])
    ys = np.concatenate([y, y, y, y + 0.5, y - 0.5])
    ra_all, dec_all = (np.asarray(a, dtype=np.float64) for a in wcs.pixel_to_world_values(xs, ys))
    ra, dec = ra_all[:n], dec_all[:n]

    def dra(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a - b + 180.0) % 360.0 - 180.0

    j11 = dra(ra_all[n : 2 * n], ra_all[2 * n : 3 * n])  # d ra / dx (per pixel)
    j12 = dra(ra_all[3 * n : 4 * n], ra_all[4 * n :])
    j21 = dec_all[n : 2 * n] - dec_all[2 * n : 3 * n]
    j22 = dec_all[3 * n : 4 * n] - dec_all[4 * n :]
    var_ra = j11 * j11 * cxx + 2 * j11 * j12 * cxy + j12 * j12 * cyy
    var_dec = j21 * j21 * cxx + 2 * j21 * j22 * cxy + j22 * j22 * cyy
    cov = j11 * j21 * cxx + (j11 * j22 + j12 * j21) * cxy + j12 * j22 * cyy
    return {"ra": ra % 360.0, "raErr": np.sqrt(var_ra), "dec": dec, "decErr": np.sqrt(var_dec), "ra_dec_Cov": cov}


def _separation_arcsec(wcs: Any, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray) -> np.ndarray:
    ra, dec = (np.radians(np.asarray(a, dtype=np.float64))
               for a in wcs.pixel_to_world_values(np.concatenate([x1, x2]), np.concatenate([y1, y2])))
    n = x1.shape[0]
    sd = np.sin((dec[n:] - dec[:n]) / 2) ** 2 + np.cos(dec[:n]) * np.cos(dec[n:]) * np.sin((ra[n:] - ra[:n]) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(sd, 0.0, 1.0)))) * 3600.0


# --------------------------------------------------------------------------- the stage
def _check_inputs(difference: Any, science: Any, template: Any) -> None:
    for what, exp in (("difference", difference), ("science", science), ("template", template)):
        if exp is None and what != "template":
            msg = f"run_dia_detection needs a {what} Exposure, got None"
            raise InputError(msg)
        if exp is not None and not isinstance(exp, Exposure):
            msg = f"{what} must be an apfast Exposure, got {type(exp).__name__}"
            raise InputError(msg)
        if exp is not None and exp.shape != difference.shape:
            msg = (
                f"the {what} image has shape {exp.shape} but the difference has {difference.shape}; "
                "pass the calexp and the PSF-matched template on the difference's pixel grid"
            )
            raise InputError(msg)
    for attr, fix in (
        ("psf", "attach the decorrelated difference PSF (run_image_difference sets it)"),
        ("wcs", "attach the science calexp's WCS"),
        ("photo_calib", "attach the science calexp's photo_calib"),
    ):
        if getattr(difference, attr) is None:
            msg = f"the difference exposure has no {attr}; DIA source measurement needs it: {fix}"
            raise InputError(msg)


def _fit_dipole_candidates(
    img: np.ndarray, var: np.ndarray, msk: np.ndarray, det: Any, difference: Exposure, psf_sigma: float,
    cfg: DiaSourceConfig, lin: Any = _UNSET,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Run the dipole kernel on footprints with both signs; per-source arrays (NaN where not fitted)."""
    n = det.n_footprints
    sx = det.pos_peak_x - det.neg_peak_x
    sy = det.pos_peak_y - det.neg_peak_y
    max_sep = cfg.dipole_max_separation_sigma * psf_sigma
    cand = (det.has_positive & det.has_negative & (np.hypot(sx, sy) <= max_sep) if cfg.do_dipole_fit
            else np.zeros(n, bool))
    idx = np.flatnonzero(cand)
    m = idx.size
    params = np.full((n, _kd.NPAR), np.nan)
    cov = np.full((n, _kd.NPAR, _kd.NPAR), np.nan)
    chi2 = np.full(n, np.nan)
    ndata = np.zeros(n, np.int32)
    flags = np.zeros(n, np.int32)
    if m:
        start = np.ascontiguousarray(
            np.stack([det.pos_peak_x[idx], det.pos_peak_y[idx], det.neg_peak_x[idx], det.neg_peak_y[idx]], axis=1),
            dtype=np.float64,
        )
        assert difference.psf is not None  # run_dia_detection checked it
        if lin is _UNSET:
            lin = _linear_form(difference.psf)
        basis, weights, per = _psf_basis(
            difference.psf, lin, det.peak_x[idx].astype(np.float64), det.peak_y[idx].astype(np.float64),
            shape=img.shape, xy0=difference.xy0, grid_spacing=cfg.psf_grid_spacing,
        )  # fmt: skip
        p_c = np.empty((m, _kd.NPAR))
        c_c = np.empty((m, _kd.NPAR, _kd.NPAR))
        x2_c = np.empty(m)
        nd_c = np.zeros(m, np.int32)
        fl_c = np.zeros(m, np.int32)
        _kd.fit_dipoles(
            img, var, msk, det.labels, np.ascontiguousarray(det.id[idx]), np.ascontiguousarray(det.bbox[idx]),
            basis, weights, per, start, bitmask(cfg.bad_mask_planes), float(max_sep), int(cfg.dipole_max_iter),
            p_c, c_c, x2_c, nd_c, fl_c,
        )  # fmt: skip
        params[idx], cov[idx], chi2[idx], ndata[idx], flags[idx] = p_c, c_c, x2_c, nd_c, fl_c
    ok = cand & ((flags & _kd.FLAG_FAILED) == 0) & np.isfinite(params).all(axis=1)
    ok &= np.isfinite(cov[:, 4, 4]) & np.isfinite(cov[:, 5, 5])
    fp, fn = params[:, 4], params[:, 5]
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.hypot(fp / np.sqrt(cov[:, 4, 4]), fn / np.sqrt(cov[:, 5, 5]))
        share = fp / (fp + fn)
    r = cfg.dipole_max_flux_ratio
    is_dipole = ok & (fp > 0) & (fn > 0) & (snr > cfg.dipole_min_snr) & (share <= r) & (1.0 - share <= r)
    c = cov
    return {
        "attempted": cand,
        "ok": ok,
        "is_dipole": np.where(ok, is_dipole, False),
        "params": params,
        "x": 0.5 * (params[:, 0] + params[:, 2]),
        "y": 0.5 * (params[:, 1] + params[:, 3]),
        "cxx": 0.25 * (c[:, 0, 0] + c[:, 2, 2] + 2 * c[:, 0, 2]),
        "cyy": 0.25 * (c[:, 1, 1] + c[:, 3, 3] + 2 * c[:, 1, 3]),
        "cxy": 0.25 * (c[:, 0, 1] + c[:, 0, 3] + c[:, 2, 1] + c[:, 2, 3]),
        "mean": 0.5 * (fp + fn),
        "mean_err": 0.5 * np.sqrt(np.maximum(c[:, 4, 4] + c[:, 5, 5] + 2 * c[:, 4, 5], 0.0)),
        "diff": fp - fn,
        "diff_err": np.sqrt(np.maximum(c[:, 4, 4] + c[:, 5, 5] - 2 * c[:, 4, 5], 0.0)),
        "angle": np.degrees(np.arctan2(params[:, 1] - params[:, 3], params[:, 0] - params[:, 2])),
        "chi2": chi2,
        "ndata": np.where(cand, ndata, 0).astype(np.int32),
        "snr": snr,
        "flags": flags,
    }


def _njy(pc: PhotoCalib, flux: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f, e = pc.instflux_to_njy(flux, err)
    return np.atleast_1d(np.asarray(f, np.float64)), np.atleast_1d(np.asarray(e, np.float64))


def run_dia_detection(
    difference: Exposure, science: Exposure, template: Exposure | None, *, config: DiaSourceConfig | None = None
) -> DiaSourceResult:
    """Detect and measure DIA sources on a difference image (module docstring); no I/O, inputs unchanged.

    Parameters
    ----------
    difference : Exposure
        The (decorrelated) difference: image, variance, mask, PSF, WCS and photo_calib.
    science : Exposure
        The science calexp on the same pixel grid (``scienceFlux``).
    template : Exposure or None
        The PSF-matched template on the same grid (``templateFlux``; NaN when None).
    config : DiaSourceConfig, optional

    Returns
    -------
    DiaSourceResult

    Raises
    ------
    InputError
        On missing planes, PSF, WCS or calibration, or images of different shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.wcs import WCS
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> wcs.wcs.crval, wcs.wcs.crpix, wcs.wcs.cdelt = [150.0, 2.0], [50.0, 50.0], [-7.2e-5, 7.2e-5]
    >>> psf = GaussianPsf(2.0, 21)
    >>> img = np.random.default_rng(0).normal(0.0, 1.0, (100, 100)).astype(np.float32)
    >>> img[30:51, 40:61] += 400.0 * psf.compute_image(0, 0)
    >>> kw = dict(variance=np.ones_like(img), psf=psf, wcs=wcs, photo_calib=PhotoCalib(31.4))
    >>> res = run_dia_detection(Exposure(img, **kw), Exposure(np.zeros_like(img), **kw), None)
    >>> res.n_sources, round(float(res.sources["x"][0])), round(float(res.sources["y"][0]))
    (1, 50, 40)
    """
    cfg = config if config is not None else DiaSourceConfig()
    _check_inputs(difference, science, template)
    assert difference.psf is not None  # _check_inputs raised InputError otherwise
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # DETECTED / DETECTED_NEGATIVE of the input are ignored: detect_sources clears them in its output
    # mask and no measurement reads them, so the 8M-pixel copy that clearing them here costs is skipped
    img, var, msk = _exposure_planes(difference, "difference")
    ny, nx = img.shape
    x0, y0 = difference.xy0
    # the half-maximum width, as differencing uses (the second moments of a measured PSF are wing-dominated)
    psf_sigma = matching_fwhm(difference.psf, 0.5 * (nx - 1) + x0, 0.5 * (ny - 1) + y0) / FWHM_PER_SIGMA
    noise_scale = noise_scale_factor(img, var, msk, psf_sigma) if cfg.scale_variance else 1.0
    var = _scaled_variance(var, noise_scale, template, cfg.template_flux_error)
    det = detect_sources(img, var, msk, psf_sigma=psf_sigma, config=cfg.detection)
    t1 = time.perf_counter()
    timings["detect"] = t1 - t0
    lin = _linear_form(difference.psf)  # once: a ConvolvedPsf's basis costs a convolution per stamp
    model = _fast_psf(difference.psf, lin, shape=img.shape, xy0=difference.xy0, grid_spacing=cfg.psf_grid_spacing)
    mcfg = MeasurementConfig(aperture_radii=(cfg.aperture_radius,), bad_mask_planes=cfg.bad_mask_planes)
    meas = measure_sources(img, var, msk, det, psf=model, psf_sigma=psf_sigma, config=mcfg)
    t2 = time.perf_counter()
    timings["measure"] = t2 - t1
    dip = _fit_dipole_candidates(img, var, msk, det, difference, psf_sigma, cfg, lin)
    ok = dip["ok"]
    x = np.where(ok, dip["x"], meas["x"])
    y = np.where(ok, dip["y"], meas["y"])
    cxx = np.where(ok, dip["cxx"], meas["xErr"] ** 2)
    cyy = np.where(ok, dip["cyy"], meas["yErr"] ** 2)
    cxy = np.where(ok, dip["cxy"], 0.0)
    bad_bits = bitmask(cfg.bad_mask_planes)
    psf_flux, psf_err = meas["psfFlux"].copy(), meas["psfFluxErr"].copy()
    psf_chi2, psf_nd = meas["psfChi2"].copy(), meas["psfNdata"].astype(np.int32)
    psf_edge, psf_nogood = meas["psfFlux_flag_edge"].copy(), meas["psfFlux_flag"].copy()
    if ok.any():  # PsfFlux at the dipole centroid, as Rubin's slot centroid
        w = np.flatnonzero(ok)
        re = _forced_raw(difference, x[w], y[w], bad_bits, cfg.psf_grid_spacing, "difference", lin)
        psf_flux[w], psf_err[w], psf_chi2[w], psf_nd[w] = re["flux"], re["err"], re["chi2"], re["ndata"]
        psf_edge[w] = (re["flags"] & _kf.FLAG_EDGE) != 0
        psf_nogood[w] = (re["flags"] & _kf.FLAG_NO_GOOD_PIXELS) != 0
    t3 = time.perf_counter()
    timings["dipole"] = t3 - t2
    sci = _forced_raw(science, x, y, bad_bits, cfg.psf_grid_spacing, "science")
    tpl = _forced_raw(template, x, y, bad_bits, cfg.psf_grid_spacing, "template") if template is not None else None
    t4 = time.perf_counter()
    timings["forced"] = t4 - t3
    cols = _columns(difference, science, template, det, meas, dip, cfg, img.shape, x, y, cxx, cyy, cxy, msk,
                    (psf_flux, psf_err, psf_chi2, psf_nd, psf_edge, psf_nogood), sci, tpl)  # fmt: skip
    t5 = time.perf_counter()
    timings["columns"] = t5 - t4
    timings["total"] = t5 - t0
    is_dip, is_neg = cols["isDipole"], cols["isNegative"]
    res = DiaSourceResult(
        sources=cols,
        n_positive=int((~is_dip & ~is_neg).sum()),
        n_negative=int((~is_dip & is_neg).sum()),
        n_dipole=int(is_dip.sum()),
        timings=timings,
        mask=det.mask,
    )
    log.info(
        "DIA sources: %d (%d positive, %d negative, %d dipoles; %d dipole fits) in %.3f s",
        res.n_sources, res.n_positive, res.n_negative, res.n_dipole, int(dip["attempted"].sum()), timings["total"],
    )  # fmt: skip
    return res


def noise_scale_factor(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, psf_sigma: float, *,
                       tile: int = 256, n_tiles: int = 24) -> float:
    """Robust scatter of the PSF-smoothed image in units of its predicted sigma (1.0 = variance is right).

    The image is smoothed with a Gaussian of the PSF's sigma on ``n_tiles`` tiles spread over it;
    the predicted variance of a smoothed pixel is the variance convolved with the squared kernel.
    The ratio's scatter is the MAD over unmasked pixels (robust to the few sources). Returns 1.0
    when too few good pixels are left. The tiles are smoothed in parallel by
    :func:`apfast.kernels.dia_noise.smoothed_snr_tiles` (``scipy.ndimage.gaussian_filter``'s
    kernels, float32 sums: the factor agrees with the float64 SciPy computation to ~1e-6).
    """
    img, var, msk = check_planes(image, variance, mask)
    ny, nx = img.shape
    t = min(tile, ny, nx)
    n_side = max(1, round(math.sqrt(n_tiles * nx / max(ny, 1))))
    xs = np.linspace(0, nx - t, n_side).astype(int)
    ys = np.linspace(0, ny - t, max(1, n_tiles // n_side)).astype(int)
    k_img = _gauss_kernel_1d(psf_sigma)
    k_var = _gauss_kernel_1d(psf_sigma / math.sqrt(2.0))
    edge = max(math.ceil(4 * psf_sigma), k_img.size // 2, k_var.size // 2)  # ceil(4 sigma) >= both radii
    m = t - 2 * edge
    if m <= 0:
        return 1.0
    tile_y = np.repeat(ys, xs.size).astype(np.int64)
    tile_x = np.tile(xs, ys.size).astype(np.int64)
    out = np.empty((tile_y.size, m * m), np.float32)
    counts = np.zeros(tile_y.size, np.int64)
    _kn.smoothed_snr_tiles(
        img, var, msk, tile_y, tile_x, t, k_img, k_var, edge, 1e-3, 1.0 / (4.0 * math.pi * psf_sigma**2), out, counts
    )  # fmt: skip
    zz = np.concatenate([out[q, : counts[q]] for q in range(counts.size)])
    if zz.size < 1000:
        return 1.0
    med = _median(zz, None)
    return float(MAD_TO_SIGMA * _median(zz, med))


def _median(z: np.ndarray, center: float | None) -> float:
    """Median of ``z`` (``center is None``) or of ``|z - center|``, exact, in O(n) (histogram select)."""
    n = z.size
    k0, k1 = (n - 1) // 2, n // 2
    pair = np.zeros(2)
    absolute = center is not None
    c = float(center) if center is not None else 0.0
    lo = 0.0 if absolute else -_Z_RANGE
    if not _kn.select_ranks(z, c, absolute, k0, k1, lo, _Z_RANGE, 1 << 16, pair):
        u = np.abs(z.astype(np.float64) - c) if absolute else z.astype(np.float64)
        pair[:] = np.partition(u, (k0, k1))[[k0, k1]]
    return float(0.5 * (pair[0] + pair[1]))


def _gauss_kernel_1d(sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d``'s kernel at ``truncate=4``: radius ``int(4 sigma + 0.5)``, sum 1."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 / sigma**2 * x**2)
    return k / k.sum()


def _scaled_variance(var: np.ndarray, noise_scale: float, template: Exposure | None, frac: float) -> np.ndarray:
    """``var * noise_scale**2 + (frac * max(template, 0))**2`` in float32 (NaN template pixels count 0).

    The subtraction's systematic error at static sources; one fused pass
    (:func:`apfast.kernels.dia_noise.scaled_variance_with_floor`), bit-identical to the NumPy
    expression. Returns ``var`` itself when there is nothing to do.
    """
    s2 = np.float32(noise_scale**2)
    if template is None or frac <= 0:
        return var * s2 if noise_scale != 1.0 else var
    tpl = np.ascontiguousarray(template.image, dtype=np.float32)
    out = np.empty_like(var)
    _kn.scaled_variance_with_floor(var, tpl, s2, np.float32(frac), out)
    return out


def _columns(
    difference: Exposure, science: Exposure, template: Exposure | None, det: Any, meas: Any, dip: dict[str, np.ndarray],
    cfg: DiaSourceConfig, shape: tuple[int, int], x: np.ndarray, y: np.ndarray, cxx: np.ndarray, cyy: np.ndarray,
    cxy: np.ndarray, msk: np.ndarray, psf: tuple[np.ndarray, ...], sci: dict[str, np.ndarray],
    tpl: dict[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Assemble the APDB DiaSource column set (schema column order)."""
    n = x.shape[0]
    ny, nx = shape
    pc = difference.photo_calib
    assert pc is not None  # checked by _check_inputs
    cols: dict[str, np.ndarray] = {}
    vi = difference.visit_info or science.visit_info
    if vi is not None:
        if vi.visit is not None:
            cols["visit"] = np.full(n, vi.visit, np.int64)
        if vi.ccdnum is not None:
            cols["detector"] = np.full(n, vi.ccdnum, np.int16)
        if vi.mjd is not None and vi.exptime is not None:
            cols["midpointMjdTai"] = np.full(n, vi.mjd + vi.exptime / 2.0 / 86400.0)
        if vi.exptime is not None:
            cols["exposureTime"] = np.full(n, float(vi.exptime))
    cols.update(_sky(difference.wcs, x, y, cxx, cyy, cxy))
    cols["x"], cols["xErr"] = x, np.sqrt(cxx)
    cols["y"], cols["yErr"] = y, np.sqrt(cyy)
    cols["centroid_flag"] = np.where(dip["ok"], False, meas["centroid_flag"])
    stem = aperture_name(cfg.aperture_radius)
    cols["apFlux"], cols["apFluxErr"] = _njy(pc, meas[stem], meas[stem + "Err"])
    r = cfg.aperture_radius
    mx, my = meas["x"], meas["y"]
    truncated = (mx - r < -0.5) | (mx + r > nx - 0.5) | (my - r < -0.5) | (my + r > ny - 0.5)
    cols["apFlux_flag"] = meas[stem + "_flag"] | ~np.isfinite(cols["apFlux"])
    cols["apFlux_flag_apertureTruncated"] = truncated
    cols["isNegative"] = meas["is_negative"].astype(bool)
    cols["snr"] = np.abs(det.peak_snr).astype(np.float64)
    pf, pe, pchi2, pnd, pedge, pnogood = psf
    cols["psfFlux"], cols["psfFluxErr"] = _njy(pc, pf, pe)
    cols["psfChi2"] = pchi2
    cols["psfNdata"] = np.asarray(pnd, np.int32)
    cols["psfFlux_flag"] = pnogood | ~np.isfinite(cols["psfFlux"])
    cols["psfFlux_flag_edge"] = pedge
    cols["psfFlux_flag_noGoodPixels"] = pnogood
    ok = dip["ok"]
    nan = np.full(n, np.nan)
    mean, mean_err = _njy(pc, dip["mean"], dip["mean_err"])
    diff, diff_err = _njy(pc, dip["diff"], dip["diff_err"])
    cols["dipoleMeanFlux"], cols["dipoleMeanFluxErr"] = np.where(ok, mean, nan), np.where(ok, mean_err, nan)
    cols["dipoleFluxDiff"], cols["dipoleFluxDiffErr"] = np.where(ok, diff, nan), np.where(ok, diff_err, nan)
    length = nan.copy()
    if ok.any():
        p = dip["params"][ok]
        length[ok] = _separation_arcsec(difference.wcs, p[:, 0], p[:, 1], p[:, 2], p[:, 3])
    cols["dipoleLength"] = length
    cols["dipoleAngle"] = np.where(ok, dip["angle"], nan)
    cols["dipoleChi2"] = np.where(dip["attempted"], dip["chi2"], nan)
    cols["dipoleNdata"] = dip["ndata"]
    spc = science.photo_calib or pc
    cols["scienceFlux"], cols["scienceFluxErr"] = _njy(spc, sci["flux"], sci["err"])
    nogood = (sci["flags"] & _kf.FLAG_NO_GOOD_PIXELS) != 0
    cols["forced_PsfFlux_flag"] = nogood | ~np.isfinite(cols["scienceFlux"])
    cols["forced_PsfFlux_flag_edge"] = (sci["flags"] & _kf.FLAG_EDGE) != 0
    cols["forced_PsfFlux_flag_noGoodPixels"] = nogood
    if tpl is not None and template is not None:
        cols["templateFlux"], cols["templateFluxErr"] = _njy(template.photo_calib or pc, tpl["flux"], tpl["err"])
    else:
        cols["templateFlux"], cols["templateFluxErr"] = nan.copy(), nan.copy()
    for ours, theirs in (("ixx", "Ixx"), ("iyy", "Iyy"), ("ixy", "Ixy"), ("ixxPSF", "Ixx_psf"),
                         ("iyyPSF", "Iyy_psf"), ("ixyPSF", "Ixy_psf")):  # fmt: skip
        cols[ours] = np.asarray(meas[theirs], np.float64)
    cols["shape_flag"] = meas["shape_flag"].astype(bool)
    cols["extendedness"] = nan.copy()
    if vi is not None and vi.filter:
        cols["band"] = np.full(n, str(vi.filter)[:1])
    cols["isDipole"] = dip["is_dipole"].astype(bool)
    cols["dipoleFitAttempted"] = dip["attempted"].astype(bool)
    cols["bboxSize"] = np.asarray(meas["bboxSize"], np.int32)
    fp_bits = np.zeros(n, np.int32)
    ctr_bits = np.zeros(n, np.int32)
    if n:
        bits_kernel = _kf.footprint_mask_bits_serial if n < _SERIAL_BELOW else _kf.footprint_mask_bits
        bits_kernel(
            det.labels, msk, np.ascontiguousarray(det.id), np.ascontiguousarray(det.bbox), x, y, fp_bits, ctr_bits
        )
    bb = det.bbox
    border = (bb[:, 0] == 0) | (bb[:, 2] == 0) | (bb[:, 1] == ny) | (bb[:, 3] == nx)
    offimage = ~((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5))
    flags: dict[str, np.ndarray] = {}
    for name, planes in _PIXEL_FLAGS.items():
        bits = bitmask(planes)
        flags[name] = (fp_bits & bits) != 0
        if name in _CENTER_FLAGS:
            flags[name + "Center"] = (ctr_bits & bits) != 0
    flags["edge"] |= border
    flags["offimage"] = offimage
    anyflag = np.zeros(n, bool)
    for v in flags.values():
        anyflag |= v
    cols["pixelFlags"] = anyflag
    for name in ("bad", "cr", "crCenter", "edge", "nodata", "nodataCenter", "interpolated", "interpolatedCenter",
                 "offimage", "saturated", "saturatedCenter", "suspect", "suspectCenter"):  # fmt: skip
        cols[f"pixelFlags_{name}"] = flags[name]
    for name, planes in _INJECTED_FLAGS.items():
        bits = bitmask(planes)
        cols[f"pixelFlags_{name}"] = (fp_bits & bits) != 0
        cols[f"pixelFlags_{name}Center"] = (ctr_bits & bits) != 0
    return cols
