"""Difference any two images of one sky: the whole differencing chain on two Exposures (no I/O).

:func:`subtract_pair` is what ``apfast subtract`` and :func:`apfast.subtract_fits` run
after reading the files (:mod:`apfast.repo.pairio`):

1. **Planes** (:func:`make_exposure`): pixels that are not finite, or flagged in an
   input mask (non-zero bits outside ``subtract.mask_ignore_bits``), or at or above
   the saturation level are masked (``NO_DATA``, ``BAD``, ``SAT``); a variance file
   is used as is, a weight (inverse-variance) file inverted, and without either the
   variance is estimated: the robust sky noise (1.4826 MAD of the sky-subtracted
   pixels, 3-sigma clipped) squared plus ``max(image - sky, 0) / gain`` when the
   gain (e-/DN, header ``GAIN``) is known.
2. **Overlap** (:func:`overlap_fraction`): the fraction of science pixels the
   template covers, from the two WCSs (TPV and SIP honoured); less than
   ``subtract.min_overlap`` is an error that gives the fraction.
3. **Sky, cosmic rays and PSF** of each image: :func:`apfast.ccd.characterize.run_characterize`
   subtracts a background mesh (``characterize.background``), repairs cosmic
   rays and measures the PSF model; its half-maximum FWHM is the width every
   differencing length is derived from (:func:`apfast.diffim.subtract.matching_fwhm`).
4. **Warp** the template onto the science pixel grid (:func:`apfast.diffim.warp.warp_exposure`).
5. **PSF matching, subtraction, decorrelation** (:func:`apfast.diffim.stage.run_image_difference`;
   kernel stars detected on the warped, sky-subtracted template).
6. **Quality numbers** (:func:`difference_quality`): pull statistics of the
   difference in source-free pixels and the residual left at the kernel stars.

DIA sources on the result are a DIA-layer step: :func:`apfast.dia.pair.detect_pair_sources`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from astropy.wcs import WCS

from apfast._configbase import ConfigSection, opt
from apfast.ccd.background import BackgroundConfig, NoGoodBackgroundPixelsError, measure_background
from apfast.ccd.characterize import CharacterizeConfig, run_characterize
from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.diffim.decorrelate import DecorrelationConfig
from apfast.diffim.psfmatch import SIGMA_PER_FWHM, PsfMatchConfig
from apfast.diffim.stage import DifferenceConfig, DiffimResult, run_image_difference
from apfast.diffim.warp import WarpConfig, warp_exposure
from apfast.errors import InputError
from apfast.exposure import Exposure, PhotoCalib
from apfast.masks import bitmask
from apfast.psf import PsfModel

__all__ = [
    "PairResult",
    "SubtractConfig",
    "difference_quality",
    "estimate_variance",
    "make_exposure",
    "overlap_fraction",
    "subtract_pair",
]

log = logging.getLogger(__name__)

#: Instrumental zero point that makes PhotoCalib's nJy equal to image units (``PhotoCalib(31.4)``).
_UNIT_ZP = 31.4
_BAD_FOR_STATS = bitmask(["BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT"])



@dataclass(frozen=True, slots=True, kw_only=True)
class SubtractConfig(ConfigSection):
    """Differencing two FITS images with ``apfast subtract`` / :func:`apfast.subtract_fits` (``subtract``)."""

    _key_prefix: ClassVar[str] = "subtract."

    min_overlap: float = opt(
        0.05, "Smallest fraction of the science image the template must cover; less is an error (0-1)."
    )
    mask_ignore_bits: int = opt(
        0, "Bits of input mask files that do not make a pixel bad (ZTF: 2050 = source 2 + dirt 2048); "
           "any other non-zero bit masks the pixel BAD."
    )
    saturation_keys: tuple[str, ...] = opt(
        ("SATURATE", "SATURAT"), "Header keywords whose value is the saturation level (pixels at or above: SAT)."
    )
    gain_keys: tuple[str, ...] = opt(
        ("GAIN",), "Header keywords holding the gain (e-/DN) for the estimated variance's source term."
    )
    zero_point_keys: tuple[str, ...] = opt(
        ("MAGZERO", "MAGZP"), "Header keywords holding a magnitude zero point (kept in the outputs' PhotoCalib)."
    )
    psf_max_size: int = opt(
        51, "Largest side (pixels, odd) kept of a PSF model image given with --science-psf/--template-psf."
    )

    def _validate(self) -> None:
        if not 0.0 <= self.min_overlap <= 1.0:
            self._fail("min_overlap", self.min_overlap, "use a fraction in [0, 1], e.g. 0.05")
        if self.psf_max_size < 3 or self.psf_max_size % 2 == 0:
            self._fail("psf_max_size", self.psf_max_size, "use an odd integer >= 3, e.g. 51")
        if self.mask_ignore_bits < 0:
            self._fail("mask_ignore_bits", self.mask_ignore_bits, "use a non-negative integer bit set, e.g. 2050")


@dataclass(frozen=True, slots=True, eq=False)
class PairResult:
    """Output of :func:`subtract_pair`.

    Attributes
    ----------
    difference : Exposure
        The decorrelated ``science - template`` on the science pixel grid, in science units.
    science : Exposure
        The science image after sky subtraction and cosmic-ray repair, with its PSF.
    template : Exposure
        The template warped onto the science grid, sky-subtracted, with its PSF.
    matched : Exposure
        The convolved image (the template in ``convolveTemplate`` mode).
    diffim : DiffimResult
        Everything the differencing stage returned (kernel, stamps, timings).
    sources : dict of str to ndarray or None
        DIA sources (APDB ``DiaSource`` columns) once :func:`apfast.dia.pair.detect_pair_sources` ran.
    table : dict of str to ndarray or None
        Their compact table (:data:`apfast.dia.pair.DIA_TABLE_COLUMNS`).
    stats : dict
        ``mode``, ``fwhm_science``, ``fwhm_template`` (half-maximum, pixels),
        ``kernel_sum``, ``n_stamps``, ``overlap``, ``pull_median``, ``pull_std``,
        ``n_pull_pixels``, ``star_residual`` (median over the kernel stars of
        ``sum |difference| / science flux`` within one FWHM), ``n_dia_sources`` (None before detection).
    timings : dict of str to float
        Seconds per step.
    """

    difference: Exposure
    science: Exposure
    template: Exposure
    matched: Exposure
    diffim: DiffimResult
    sources: dict[str, np.ndarray] | None
    table: dict[str, np.ndarray] | None
    stats: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- planes
def _robust_sigma(v: np.ndarray) -> float:
    """1.4826 MAD after 3 rounds of 3-sigma clipping about the median."""
    v = v[np.isfinite(v)].astype(np.float64)
    if v.size == 0:
        return math.nan
    centre = float(np.median(v))
    sig = 1.4826 * float(np.median(np.abs(v - centre)))
    for _ in range(3):
        if not sig > 0:
            break
        v = v[np.abs(v - centre) < 3 * sig]
        centre = float(np.median(v))
        sig = 1.4826 * float(np.median(np.abs(v - centre)))
    return sig


def estimate_variance(image: np.ndarray, mask: np.ndarray, *, gain: float | None = None) -> np.ndarray:
    """Variance of an image that came without one: robust sky noise squared plus the source term.

    Parameters
    ----------
    image : ndarray (ny, nx) float32
        Pixels (with or without sky).
    mask : ndarray (ny, nx) int32
        Masked pixels (any bit) are left out of the noise estimate.
    gain : float, optional
        Electrons per image unit; adds ``max(image - sky, 0) / gain`` (Poisson noise of sources).

    Returns
    -------
    ndarray (ny, nx) float32

    Raises
    ------
    InputError
        If no pixel is usable or the image has no noise (a constant image).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(100.0, 5.0, (200, 200)).astype(np.float32)
    >>> var = estimate_variance(img, np.zeros(img.shape, np.int32))
    >>> bool(abs(float(np.median(var)) / 25.0 - 1.0) < 0.05)
    True
    """
    ny, nx = image.shape
    good = (mask == 0) & np.isfinite(image)
    try:
        bcfg = BackgroundConfig(bin_size=max(16, min(128, min(ny, nx) // 2)))
        sky = measure_background(image, np.where(good, 0, bitmask("BAD")).astype(np.int32), config=bcfg).image()
    except NoGoodBackgroundPixelsError:
        sky = np.zeros(image.shape, np.float32)
    resid = image - sky
    step = max(1, int(good.sum()) // 1_000_000)
    sigma = _robust_sigma(resid[good][::step])
    if not (math.isfinite(sigma) and sigma > 0):
        msg = (
            f"cannot estimate the noise of a {ny}x{nx} image ({int(good.sum())} usable pixels, robust sigma {sigma}); "
            "give a variance or weight file"
        )
        raise InputError(msg)
    var = np.full(image.shape, sigma * sigma, np.float32)
    if gain is not None and gain > 0:
        var += np.clip(np.nan_to_num(resid), 0.0, None).astype(np.float32) / np.float32(gain)
    return var


def make_exposure(
    image: Any, *, wcs: WCS | None, variance: Any = None, weight: Any = None, mask: Any = None,
    gain: float | None = None, saturation: float | None = None, zero_point: float | None = None,
    mask_ignore_bits: int = 0, role: str = "science",
) -> Exposure:
    """An :class:`Exposure` from the planes of an input image (module docstring, step 1).

    Parameters
    ----------
    image : array_like (ny, nx)
        Pixels, any real dtype or byte order.
    wcs : astropy.wcs.WCS
        Celestial WCS of the image.
    variance, weight : array_like (ny, nx), optional
        Variance, or inverse variance (at most one); estimated when neither is given.
    mask : array_like of int (ny, nx), optional
        Input mask: non-zero bits other than ``mask_ignore_bits`` mark bad pixels.
    gain : float, optional
        e-/DN, for the estimated variance.
    saturation : float, optional
        Pixels at or above it get ``SAT``.
    zero_point : float, optional
        Magnitude zero point for the PhotoCalib (otherwise fluxes stay in image units).
    role : str
        ``"science"`` or ``"template"``, for messages.

    Returns
    -------
    Exposure

    Raises
    ------
    InputError
        If a plane's shape differs from the image's, both variance and weight are
        given, or no pixel is usable.
    """
    img = np.array(image, dtype=np.float32)
    if img.ndim != 2:
        msg = f"the {role} image must be 2-D, got shape {img.shape}"
        raise InputError(msg)
    shape = img.shape
    if variance is not None and weight is not None:
        msg = f"give the {role} variance or its weight (inverse variance), not both"
        raise InputError(msg)
    planes = {"variance": variance, "weight": weight, "mask": mask}
    for name, plane in planes.items():
        if plane is not None and np.shape(plane) != shape:
            msg = (
                f"the {role} {name} has shape {np.shape(plane)} but the {role} image has {shape}; "
                f"give a {name} of the image's shape"
            )
            raise InputError(msg)
    msk = np.zeros(shape, np.int32)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype.kind == "f":
            m = np.nan_to_num(m, nan=1.0).astype(np.int64)
        msk[(m.astype(np.int64) & ~np.int64(mask_ignore_bits)) != 0] |= bitmask("BAD")
    finite = np.isfinite(img)
    msk[~finite] |= bitmask(["BAD", "NO_DATA"])
    if saturation is not None and math.isfinite(saturation):
        msk[finite & (img >= saturation)] |= bitmask("SAT")
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        ok = np.isfinite(w) & (w > 0)
        var = np.where(ok, 1.0 / np.where(ok, w, 1.0), 0.0).astype(np.float32)
        msk[~ok] |= bitmask(["BAD", "NO_DATA"])
    elif variance is not None:
        var = np.array(variance, dtype=np.float32)
        ok = np.isfinite(var) & (var > 0)
        var[~ok] = 0.0
        msk[~ok] |= bitmask(["BAD", "NO_DATA"])
    else:
        var = estimate_variance(np.where(finite, img, np.nan).astype(np.float32), msk, gain=gain)
    if not (msk == 0).any():
        msg = f"every pixel of the {role} image is masked (non-finite, flagged, saturated or variance <= 0)"
        raise InputError(msg)
    # masked pixels keep finite values so nothing downstream meets a NaN
    img[~finite] = 0.0
    pc = PhotoCalib(float(zero_point)) if zero_point is not None and math.isfinite(zero_point) else None
    return Exposure(img, msk, var, wcs=wcs, photo_calib=pc)


# --------------------------------------------------------------------------- geometry
def overlap_fraction(science_wcs: WCS, science_shape: tuple[int, int], template_wcs: WCS,
                     template_shape: tuple[int, int], *, n: int = 33) -> float:
    """Fraction of the science image the template covers, sampled on an ``n`` x ``n`` grid of pixels.

    Each sample pixel goes to the sky through the science WCS and back through the
    template's; it is covered when it lands inside the template. Points the WCS
    cannot map (the far side of a projection) count as uncovered.

    Examples
    --------
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval, w.wcs.crpix, w.wcs.cdelt = [10.0, 0.0], [50.0, 50.0], [-1e-4, 1e-4]
    >>> round(overlap_fraction(w, (100, 100), w, (100, 50)), 2)
    0.52
    """
    ny, nx = science_shape
    ty, tx = template_shape
    gy, gx = np.meshgrid(np.linspace(0, ny - 1, n), np.linspace(0, nx - 1, n), indexing="ij")
    with np.errstate(invalid="ignore"):
        try:
            ra, dec = science_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
            u, v = template_wcs.all_world2pix(ra, dec, 0, quiet=True)
        except Exception:  # astropy/wcslib raise several types for points they cannot map
            return 0.0
        inside = (u >= -0.5) & (u <= tx - 0.5) & (v >= -0.5) & (v <= ty - 0.5)
    return float(np.count_nonzero(inside & np.isfinite(u) & np.isfinite(v)) / inside.size)


# --------------------------------------------------------------------------- quality
def difference_quality(diff: Exposure, science: Exposure, template: Exposure, stamp_x: np.ndarray,
                       stamp_y: np.ndarray, fwhm: float) -> dict[str, float]:
    """Pull statistics in source-free pixels and the residual left at the kernel stars.

    Source-free pixels: unflagged in the difference and outside the 5-sigma
    footprints of the science and the template (grown by 2.4 PSF sigma) and of the
    difference (both signs). The star residual of one kernel star is
    ``sum |difference| / sum science`` within ``fwhm`` of its centre; the median over the
    stars is returned.

    Returns
    -------
    dict
        ``pull_median``, ``pull_std`` (1.4826 MAD), ``n_pull_pixels``, ``star_residual``.
    """
    assert diff.variance is not None and diff.mask is not None
    sig = max(fwhm * SIGMA_PER_FWHM, 0.5)
    det_cfg = DetectionConfig(threshold=5.0)
    footprints = np.zeros(diff.shape, bool)
    for exp in (science, template):
        assert exp.variance is not None and exp.mask is not None
        footprints |= detect_sources(exp.image, exp.variance, exp.mask, psf_sigma=sig, config=det_cfg).labels > 0
    dd = detect_sources(diff.image, diff.variance, diff.mask, psf_sigma=sig,
                        config=DetectionConfig(threshold=5.0, polarity="both"))
    footprints |= dd.labels > 0
    ok = ((diff.mask & _BAD_FOR_STATS) == 0) & ~footprints & (diff.variance > 0) & np.isfinite(diff.image)
    pulls = diff.image[ok] / np.sqrt(diff.variance[ok])
    med = float(np.median(pulls)) if pulls.size else math.nan
    std = float(1.4826 * np.median(np.abs(pulls - med))) if pulls.size else math.nan
    ratios = []
    ny, nx = diff.shape
    r = max(fwhm, 1.0)
    h = int(math.ceil(r))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    ap = xx**2 + yy**2 <= r * r
    for x, y in zip(np.asarray(stamp_x, int), np.asarray(stamp_y, int), strict=True):
        if h <= x < nx - h and h <= y < ny - h:
            s = float(science.image[y - h : y + h + 1, x - h : x + h + 1][ap].sum())
            d = float(np.abs(diff.image[y - h : y + h + 1, x - h : x + h + 1][ap]).sum())
            if s > 0:
                ratios.append(d / s)
    return {
        "pull_median": med, "pull_std": std, "n_pull_pixels": int(pulls.size),
        "star_residual": float(np.median(ratios)) if ratios else math.nan,
    }


# --------------------------------------------------------------------------- the chain
def _characterized(exp: Exposure, cfg: CharacterizeConfig, role: str,
                   psf: PsfModel | None = None) -> tuple[Exposure, Any]:
    """Sky-subtracted, CR-repaired planes and the measured (or the given) PSF of one image."""
    assert exp.variance is not None and exp.mask is not None
    res = run_characterize(exp.image, exp.mask, exp.variance, config=cfg, psf=psf)
    origin = "given" if psf is not None else f"from {res.psf_result.n_stars} stars"
    log.info("%s: PSF FWHM %.2f px (half maximum) %s, sky %.1f, %d cosmic rays", role,
             res.psf_result.fwhm_center, origin, float(np.median(res.background.values)), res.n_cosmic_rays)
    out = Exposure(res.image, res.mask, res.variance, wcs=exp.wcs, psf=res.psf, photo_calib=exp.photo_calib,
                   visit_info=exp.visit_info, metadata=exp.metadata.copy(), xy0=exp.xy0)
    return out, res


def subtract_pair(
    science: Exposure, template: Exposure, *, config: SubtractConfig | None = None,
    characterize: CharacterizeConfig | None = None, warp: WarpConfig | None = None,
    psfmatch: PsfMatchConfig | None = None, decorrelation: DecorrelationConfig | None = None,
    difference: DifferenceConfig | None = None, science_psf: PsfModel | None = None,
    template_psf: PsfModel | None = None,
) -> PairResult:
    """Difference two exposures of one sky on different pixel grids (module docstring); inputs unchanged.

    Parameters
    ----------
    science, template : Exposure
        Image, variance, mask and a celestial WCS each (:func:`make_exposure`); sky
        may still be in them. A PSF already attached is replaced by the one measured.
    config : SubtractConfig, optional
    characterize : CharacterizeConfig, optional
        Background, cosmic rays and PSF measurement of each image.
    warp, psfmatch, decorrelation, difference : optional
        Configs of the warp and of :func:`apfast.diffim.stage.run_image_difference`.
    science_psf, template_psf : PsfModel, optional
        Known PSFs (on each image's own pixel grid, e.g. WebbPSF models): used instead of
        measuring them, for fields with few isolated stars.

    Returns
    -------
    PairResult

    Raises
    ------
    InputError
        A missing plane or WCS, or images that overlap less than ``subtract.min_overlap``.
    apfast.ccd.psf_determiner.NoPsfStarsError
        Too few PSF stars in one image (the message names the config keys).
    apfast.diffim.psfmatch.InsufficientKernelSourcesError
        Too few kernel stars (the message names the config keys).
    """
    cfg = config or SubtractConfig()
    ccfg = characterize or CharacterizeConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for exp, role in ((science, "science"), (template, "template")):
        if not isinstance(exp, Exposure):
            msg = f"the {role} must be an apfast.Exposure, got {type(exp).__name__}"
            raise InputError(msg)
        if exp.wcs is None or not exp.wcs.has_celestial:
            msg = f"the {role} image has no celestial WCS; subtract needs one on each image to align them"
            raise InputError(msg)
        if exp.variance is None or exp.mask is None:
            msg = f"the {role} exposure needs variance and mask planes; build it with apfast.diffim.pair.make_exposure"
            raise InputError(msg)
    overlap = overlap_fraction(science.wcs, science.shape, template.wcs, template.shape)
    if overlap < cfg.min_overlap:
        msg = (
            f"the images do not overlap: the template covers {overlap:.1%} of the science image, "
            f"subtract.min_overlap is {cfg.min_overlap:.1%}; check that both show the same field"
        )
        raise InputError(msg)
    sci, sci_char = _characterized(science, ccfg, "science", science_psf)
    timings["characterize_science"] = time.perf_counter() - t0
    t = time.perf_counter()
    tpl_own, tpl_char = _characterized(template, ccfg, "template", template_psf)
    timings["characterize_template"] = time.perf_counter() - t
    t = time.perf_counter()
    tpl = warp_exposure(tpl_own, science.wcs, science.shape, config=warp or WarpConfig())
    if tpl.photo_calib is None:
        tpl.photo_calib = template.photo_calib
    timings["warp"] = time.perf_counter() - t
    pm = psfmatch or PsfMatchConfig()
    res = run_image_difference(sci, tpl, sources=None, psfmatch=pm, decorrelation=decorrelation,
                               config=difference)
    timings.update(res.timings)
    sub = res.subtraction
    diff = res.difference
    if diff.photo_calib is None:
        # DIA fluxes in image units: a PhotoCalib of 1 nJy per count
        diff.photo_calib = PhotoCalib(_UNIT_ZP)
    meta = sub.metadata
    t = time.perf_counter()
    quality = difference_quality(diff, sci, tpl, sub.solution.stamp_x, sub.solution.stamp_y,
                                 max(meta["fwhm_science"], meta["fwhm_template"]))
    timings["quality"] = time.perf_counter() - t
    xc, yc = (science.shape[1] - 1) / 2.0, (science.shape[0] - 1) / 2.0
    stats: dict[str, Any] = {
        "mode": sub.mode,
        "fwhm_science": float(meta["fwhm_science"]),
        "fwhm_template": float(meta["fwhm_template"]),
        "fwhm_science_characterize": float(sci_char.psf_result.fwhm_center),
        "fwhm_template_characterize": float(tpl_char.psf_result.fwhm_center),
        "kernel_sum": float(sub.kernel.sum(xc, yc)),
        "kernel_size": int(meta["kernel_size"]),
        "n_stamps": int(sub.n_stamps_used),
        "n_candidates": int(meta["n_candidates"]),
        "overlap": overlap,
        "residual_background": float(res.stats.get("DIFFBKG", 0.0)),
        "n_dia_sources": None,
        **quality,
    }
    timings["total"] = time.perf_counter() - t0
    return PairResult(difference=diff, science=sci, template=tpl, matched=res.matched, diffim=res,
                      sources=None, table=None, stats=stats, timings=timings)
