"""Characterize an ISR-corrected CCD: background, cosmic rays, bright sources, PSF (no I/O).

Rubin's ``CharacterizeImageTask`` (as in Rubin's ap_pipe), reorganised for speed:

1. subtract a first background (128-px mesh, clipped mean, Akima spline);
2. measure the sky noise against the variance plane and rescale the variance when they
   disagree (Rubin's ``ScaleVarianceTask``; by default only for calibrated images whose
   variance comes from a gain: :mod:`apfast.ccd.scale_variance`);
3. find, mask and repair cosmic rays, assuming a Gaussian PSF of the smaller of
   ``install_psf_sigma`` (Rubin: 1.5 px) and the width measured on the bright stars
   (``estimate_psf_sigma``): a PSF narrower than the real one makes the sharpness
   test conservative, so star cores are not eaten, even on undersampled images;
4. ``psf_iterations`` times: detect bright sources (5 sigma x 10, smoothed with the
   current PSF; after the first pass only with ``redetect``), measure them with the
   current PSF, and determine the PSF (star selection + PCA);
5. re-measure the background with every detection masked and subtract it too.

The result carries the background-subtracted, CR-repaired image and the PSF
model for :mod:`apfast.ccd.calibrate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt, subsection
from apfast._constants import FWHM_PER_SIGMA
from apfast.ccd.background import BackgroundConfig, BackgroundModel, measure_background, subtract_background
from apfast.ccd.cosmicray import CosmicRayConfig, find_cosmic_rays
from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.ccd.measurement import MeasurementConfig, MeasurementResult, measure_sources
from apfast.ccd.psf_determiner import (
    NoPsfStarsError,
    PsfDeterminerConfig,
    PsfResult,
    determine_psf,
    halfmax_fwhm,
    stellar_locus_size,
)
from apfast.ccd.scale_variance import ScaleVarianceConfig, VarianceScale, VarianceSource, scale_variance
from apfast.masks import bitmask
from apfast.psf import PsfModel

__all__ = ["CharacterizeConfig", "CharacterizeResult", "clean_star_flags", "run_characterize"]

log = logging.getLogger(__name__)


def _bright_detection() -> DetectionConfig:
    return DetectionConfig(threshold=5.0, threshold_type="stdev", include_threshold_multiplier=10.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CharacterizeConfig(ConfigSection):
    """Background, cosmic rays, bright-source detection and the PSF model (``characterize``)."""

    _key_prefix: ClassVar[str] = "characterize."

    install_psf_sigma: float = opt(1.5, "Sigma (pixels) of the Gaussian PSF assumed before one is measured.")
    psf_iterations: int = opt(2, "Detect-measure-PSF passes (Rubin psfIterations).")
    estimate_psf_sigma: bool = opt(
        True,
        "Measure the stars' width before cosmic-ray repair and use it if narrower than "
        "install_psf_sigma (undersampled images); the bright detection is then reused.",
    )
    redetect: bool = opt(
        False,
        "Re-detect in every PSF iteration (Rubin); off: later iterations re-measure the "
        "first iteration's bright footprints with the new PSF, which saves a detection pass.",
    )
    do_cosmic_rays: bool = opt(True, "Find, mask and repair cosmic rays.")
    scale_variance: ScaleVarianceConfig = subsection(
        ScaleVarianceConfig, doc="Rescale the variance plane to the measured sky noise (Rubin ScaleVarianceTask)."
    )
    background: BackgroundConfig = subsection(BackgroundConfig, doc="First background model (before detection).")
    final_background: BackgroundConfig = subsection(
        BackgroundConfig, doc="Background refit with DETECTED pixels ignored; added to the first."
    )
    cosmicray: CosmicRayConfig = subsection(CosmicRayConfig, doc="Cosmic-ray repair.")
    detection: DetectionConfig = subsection(
        DetectionConfig,
        doc="Bright-source detection (Rubin: 5 sigma stdev x includeThresholdMultiplier 10).",
        factory=_bright_detection,
    )
    measurement: MeasurementConfig = subsection(MeasurementConfig, doc="Measurement.")
    psf: PsfDeterminerConfig = subsection(PsfDeterminerConfig, doc="PSF determiner.")

    def _validate(self) -> None:
        if not self.install_psf_sigma > 0:
            self._raise("install_psf_sigma", f" = {self.install_psf_sigma!r} must be > 0 (pixels)")
        if not 1 <= self.psf_iterations <= 10:
            self._raise("psf_iterations", f" = {self.psf_iterations!r} must be 1..10")


@dataclass(frozen=True, slots=True)
class CharacterizeResult:
    """Characterized image planes, background, PSF and the bright-source catalogue (``icSrc``)."""

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    background: BackgroundModel
    psf: PsfModel
    psf_result: PsfResult
    catalog: MeasurementResult
    psf_sigma: float
    n_cosmic_rays: int
    timings: dict[str, float] = field(default_factory=dict)
    #: The variance rescaling measured (None when ``characterize.scale_variance.apply`` skips this variance).
    variance_scale: VarianceScale | None = None


def clean_star_flags(cat: MeasurementResult) -> np.ndarray:
    """Sources fit to define a PSF or an aperture correction: no failed fits, no bad pixels near the centre."""
    ok = np.ones(len(cat), bool)
    for name in ("centroid_flag", "shape_flag", "psfFlux_flag", "pixelFlags_saturated", "pixelFlags_edge",
                 "pixelFlags_bad", "pixelFlags_cr_center", "pixelFlags_interpolated_center",
                 "pixelFlags_suspect_center", "is_negative"):
        if name in cat:
            ok &= ~np.asarray(cat[name], bool)
    return ok


def _with_detection_hint(exc: NoPsfStarsError, det: DetectionConfig) -> NoPsfStarsError:
    """The error plus the option that most often helps: bright-source detection keeps only strong peaks.

    With Rubin's includeThresholdMultiplier 10 only footprints peaking at 10x the 5-sigma
    threshold become PSF candidates; a small or sparse image (a 256 px cutout) has too few.
    """
    msg = (
        f"{exc}; only sources peaking above {det.threshold * det.include_threshold_multiplier:g} x the "
        f"{det.threshold_type} noise are PSF candidates: lower characterize.detection.include_threshold_multiplier "
        f"(now {det.include_threshold_multiplier:g}, e.g. 1) to use fainter stars"
    )
    return NoPsfStarsError(msg, **exc.metadata)


def _add_backgrounds(a: BackgroundModel, b: BackgroundModel) -> BackgroundModel:
    """One model equal to the sum of two models on the same mesh (evaluation is linear in the values)."""
    if a.values.shape != b.values.shape or a.bin_size != b.bin_size or a.interpolation != b.interpolation:
        return a
    d = a.to_dict()
    d["values"] = (a.values.astype(np.float64) + b.values).astype(np.float32)
    return BackgroundModel.from_dict(d)


def run_characterize(
    image: np.ndarray, mask: np.ndarray, variance: np.ndarray, *, config: CharacterizeConfig | None = None,
    psf: PsfModel | None = None, variance_source: VarianceSource = "isr",
) -> CharacterizeResult:
    """Characterize one ISR-corrected CCD; inputs are not modified.

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float32
        ISR output and its variance.
    mask : ndarray (ny, nx) int32
        ISR mask planes.
    config : CharacterizeConfig, optional
    psf : PsfModel, optional
        A known PSF (e.g. a WebbPSF model): used as is, no PSF stars are selected; the
        result's ``psf_result`` then lists no stars and its FWHM is the model's.
    variance_source : {"isr", "weight", "gain"}
        Where ``variance`` came from (ISR, a calibrated image's weight map, or its gain and read
        noise); ``characterize.scale_variance.apply`` decides from it whether the variance is
        measured against the sky and rescaled.

    Returns
    -------
    CharacterizeResult

    Raises
    ------
    apfast.ccd.psf_determiner.NoPsfStarsError
        Too few PSF stars (the message names counts and config keys).
    apfast.ccd.cosmicray.TooManyCosmicRaysError
        More CR pixels than ``characterize.cosmicray.max_cr_pixels``.
    """
    cfg = config or CharacterizeConfig()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    img, bkg = subtract_background(image, mask, config=cfg.background)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    msk = np.ascontiguousarray(mask, dtype=np.int32)
    timings["background"] = time.perf_counter() - t

    given = psf
    sigma = cfg.install_psf_sigma
    if given is not None:
        c = given.size // 2
        sigma = halfmax_fwhm(given.compute_image(c, c)) / FWHM_PER_SIGMA
    bad_bits = bitmask(["BAD", "SAT", "CR", "INTRP", "EDGE", "NO_DATA"])
    det = None
    timings["detection"] = timings["measurement"] = timings["psf"] = 0.0
    if cfg.estimate_psf_sigma and given is None:
        # measure the stars' width before the CR test: an installed PSF wider than the real one
        # (an undersampled image) would make every star core look like a cosmic ray
        t = time.perf_counter()
        det = detect_sources(img, var, msk, psf_sigma=sigma, config=cfg.detection)
        timings["detection"] += time.perf_counter() - t
        t = time.perf_counter()
        pre = measure_sources(img, var, msk, det, psf=None, psf_sigma=sigma, config=cfg.measurement)
        timings["measurement"] += time.perf_counter() - t
        size = np.sqrt(0.5 * (np.asarray(pre["Ixx"], float) + np.asarray(pre["Iyy"], float)))
        est = stellar_locus_size(np.asarray(pre["snr"], float), size, clean_star_flags(pre), config=cfg.psf)
        if np.isfinite(est):
            sigma = min(sigma, est)
    vscale = None
    if cfg.scale_variance.applies_to(variance_source):
        # before the CR test and every S/N: both read the variance. Bright footprints (if detected
        # above) are left out; the interquartile range shrugs off faint sources and cosmic rays
        t = time.perf_counter()
        var, vscale = scale_variance(img, var, det.mask if det is not None else msk, config=cfg.scale_variance)
        timings["scale_variance"] = time.perf_counter() - t
    n_cr = 0
    if cfg.do_cosmic_rays:
        t = time.perf_counter()
        cr = find_cosmic_rays(img, var, msk, psf_sigma=sigma, config=cfg.cosmicray)
        img, msk, n_cr = cr.image, cr.mask, cr.n_cr
        timings["cosmic_rays"] = time.perf_counter() - t

    psf_res: PsfResult | None = None
    cat: MeasurementResult | None = None
    for _ in range(cfg.psf_iterations if given is None else 1):
        if det is None or cfg.redetect:
            t = time.perf_counter()
            det = detect_sources(img, var, msk, psf_sigma=sigma, config=cfg.detection)
            timings["detection"] += time.perf_counter() - t
        t = time.perf_counter()
        cat = measure_sources(img, var, msk, det, psf=psf, psf_sigma=sigma, config=cfg.measurement)
        timings["measurement"] += time.perf_counter() - t
        if given is not None:  # a known PSF: one detect-measure pass, no PSF stars
            none = np.zeros(0, dtype=np.int64)
            psf_res = PsfResult(psf=given, star_index=none, candidate_index=none, size=sigma,
                                fwhm_center=sigma * FWHM_PER_SIGMA, n_stars=0)
            break
        t = time.perf_counter()
        size = np.sqrt(0.5 * (np.asarray(cat["Ixx"], float) + np.asarray(cat["Iyy"], float)))
        flux = np.asarray(cat["gaussianFlux"] if psf is None else cat["psfFlux"], float)
        try:
            psf_res = determine_psf(
                img, var, (msk & bad_bits) != 0, np.asarray(cat["x"], float), np.asarray(cat["y"], float), flux,
                np.asarray(cat["snr"], float), size, clean_star_flags(cat), config=cfg.psf,
            )
        except NoPsfStarsError as exc:
            raise _with_detection_hint(exc, cfg.detection) from None
        psf = psf_res.psf
        sigma = psf_res.fwhm_center / FWHM_PER_SIGMA
        timings["psf"] += time.perf_counter() - t
    assert psf is not None and psf_res is not None and cat is not None and det is not None

    # refit the background with the sources masked, and remove what the first pass left
    t = time.perf_counter()
    final = measure_background(img, det.mask, config=cfg.final_background)
    img = (img - final.image()).astype(np.float32)
    bkg = _add_backgrounds(bkg, final)
    timings["background"] += time.perf_counter() - t
    log.debug("characterize: %d CR, PSF FWHM %.2f px from %d stars", n_cr, psf_res.fwhm_center, psf_res.n_stars)
    return CharacterizeResult(img, msk, var, bkg, psf, psf_res, cat, sigma, n_cr, timings, vscale)


def summarize(res: CharacterizeResult) -> dict[str, Any]:
    """Numbers worth logging and storing in the calexp metadata (``VARRATIO``, ``VARSCALE`` when measured)."""
    out: dict[str, Any] = {
        "PSF_FWHM": round(float(res.psf_result.fwhm_center), 4),
        "SEEING": round(float(res.psf_result.seeing), 4),
        "PSF_NSTR": int(res.psf_result.n_stars),
        "N_CR": int(res.n_cosmic_rays),
        "N_ICSRC": len(res.catalog),
    }
    if res.variance_scale is not None:
        out.update({k: v for k, (v, _) in res.variance_scale.header_cards().items()})
    return out
