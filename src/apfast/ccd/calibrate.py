"""Calibrate a characterized CCD: sources, aperture correction, astrometry, zero point (no I/O).

Rubin's ``CalibrateTask`` (as in Rubin's ap_pipe): detect at 5 sigma, measure
with the PSF model, fit the aperture correction on PSF-like stars, match to the
astrometric reference catalogue (Gaia, proper motions applied to the visit
epoch) with a pattern matcher and fit TAN-SIP (:mod:`apfast.ccd.astrometry`), then
match to the photometric catalogue (Pan-STARRS) and fit the zero point
(:mod:`apfast.ccd.photocal`). The source catalogue (``src``) gets sky positions and
calibrated fluxes in nJy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from apfast._configbase import ConfigSection, opt, subsection
from apfast.ccd.astrometry import AstrometryConfig, AstrometryResult, match_nearest, solve_astrometry
from apfast.ccd.characterize import clean_star_flags
from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.ccd.measurement import MeasurementConfig, aperture_name, measure_sources
from apfast.ccd.photocal import (
    ApCorrModel,
    PhotoCalConfig,
    PhotoCalError,
    PhotoCalResult,
    fit_aperture_correction,
    fit_zero_point,
)
from apfast.exposure import PhotoCalib
from apfast.psf import PsfModel

__all__ = ["CalibrateConfig", "CalibrateResult", "RefCatalog", "mjd_to_epoch", "run_calibrate"]

log = logging.getLogger(__name__)


def _calib_detection() -> DetectionConfig:
    return DetectionConfig(threshold=5.0, threshold_type="stdev")


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrateConfig(ConfigSection):
    """Detection, measurement, astrometry and photometric calibration (``calibrate``)."""

    _key_prefix: ClassVar[str] = "calibrate."

    astrometry_refcat: str = opt("gaia", "Reference catalogue for astrometry.")
    astrometry_mag: str = opt("G_mag", "Refcat column ordering astrometric stars.")
    photometry_refcat: str = opt("ps1", "Reference catalogue for the zero point.")
    photometry_match_arcsec: float = opt(1.0, "Match radius (arcsec) of sources to photometric references.")
    calib_flux_radius: float = opt(12.0, "Aperture radius (pixels) of the calibration flux (Rubin: 12).")
    apcorr_min_snr: float = opt(50.0, "Lowest S/N of aperture-correction stars.")
    astrometry_source: Literal["refcat", "header"] = opt(
        "refcat", "Where the WCS comes from (a raw has no usable header WCS: refcat only).",
        choices={"refcat": "fit TAN-SIP against astrometry_refcat, starting from the header WCS",
                 "header": "a calibrated image's header WCS as it is (TPV/SIP), no reference catalogue"})
    zero_point_source: Literal["refcat", "header"] = opt(
        "refcat", "Where the zero point comes from (raws: refcat only).",
        choices={"refcat": "fit against photometry_refcat",
                 "header": "a calibrated image's zero point keyword (calibrated.magzero of the camera, e.g. ZTF "
                           "MAGZP, DECam CP MAGZERO), + 2.5 log10(gain) when the pixels became electrons"})
    detection: DetectionConfig = subsection(
        DetectionConfig, doc="Source detection (5 sigma).", factory=_calib_detection
    )
    measurement: MeasurementConfig = subsection(MeasurementConfig, doc="Measurement.")
    astrometry: AstrometryConfig = subsection(AstrometryConfig, doc="Astrometric fit.")
    photocal: PhotoCalConfig = subsection(PhotoCalConfig, doc="Zero point.")

    def _validate(self) -> None:
        if not self.photometry_match_arcsec > 0:
            self._raise("photometry_match_arcsec", f" = {self.photometry_match_arcsec!r} must be > 0")
        if self.calib_flux_radius not in self.measurement.aperture_radii:
            self._raise(
                "calib_flux_radius",
                f" = {self.calib_flux_radius} is not one of "
                f"{self._prefix}measurement.aperture_radii = {self.measurement.aperture_radii}",
            )


@dataclass(frozen=True, slots=True)
class RefCatalog:
    """Reference stars for one CCD: positions at the visit epoch (deg) and magnitudes."""

    ra: np.ndarray
    dec: np.ndarray
    mag: np.ndarray
    mag_err: np.ndarray
    name: str = ""
    colour: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class CalibrateResult:
    """The ``src`` catalogue, the fitted WCS and photometric calibration, and their evidence."""

    catalog: Table
    wcs: WCS
    photocal: PhotoCalResult
    apcorr: ApCorrModel
    astrometry: AstrometryResult
    matches: Table
    timings: dict[str, float] = field(default_factory=dict)


def mjd_to_epoch(mjd: float) -> float:
    """Julian epoch (years) of an MJD: ``2000 + (mjd - 51544.5) / 365.25``."""
    return 2000.0 + (float(mjd) - 51544.5) / 365.25


def run_calibrate(
    image: np.ndarray, mask: np.ndarray, variance: np.ndarray, *, psf: PsfModel, psf_sigma: float,
    initial_wcs: WCS, astrom_refs: RefCatalog | None, photom_refs: RefCatalog | None,
    config: CalibrateConfig | None = None, colour_coeffs: tuple[float, ...] = (),
    colour_range: tuple[float, float] | None = None, header_zero_point: tuple[float, float] | None = None,
) -> CalibrateResult:
    """Detect, measure and calibrate one characterized CCD; inputs are not modified.

    Parameters
    ----------
    image, mask, variance : ndarray (ny, nx)
        Background-subtracted, CR-repaired planes from :func:`apfast.ccd.characterize.run_characterize`.
    psf : PsfModel
        The PSF model; ``psf_sigma`` its Gaussian-equivalent sigma (pixels).
    initial_wcs : astropy.wcs.WCS
        Approximate WCS on this (trimmed) pixel grid.
    astrom_refs, photom_refs : RefCatalog or None
        Astrometric (epoch-corrected) and photometric references in the image's band. ``None``
        astrometric references keep ``initial_wcs`` as it is (a calibrated image's header WCS);
        ``None`` photometric references take ``header_zero_point`` instead of a fit.
    config : CalibrateConfig, optional
    colour_coeffs : tuple of float
        Colour-term polynomial in ``photom_refs.colour`` (empty: none).
    colour_range : (float, float), optional
        Reference colours where the colour term holds; other stars are left out of the zero point.
    header_zero_point : (float, float), optional
        ``(zero point, error)`` of the image units, used when ``photom_refs`` is ``None``.

    Raises
    ------
    apfast.ccd.astrometry.AstrometryError, apfast.ccd.photocal.PhotoCalError
        With the counts and the config keys to change.
    """
    cfg = config or CalibrateConfig()
    timings: dict[str, float] = {}
    shape = image.shape
    t = time.perf_counter()
    det = detect_sources(image, variance, mask, psf_sigma=psf_sigma, config=cfg.detection)
    timings["detection"] = time.perf_counter() - t
    t = time.perf_counter()
    meas = measure_sources(image, variance, det.mask, det, psf=psf, psf_sigma=psf_sigma, config=cfg.measurement)
    timings["measurement"] = time.perf_counter() - t
    cat = meas.to_table()
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    psf_flux = np.asarray(cat["psfFlux"], float)
    psf_err = np.asarray(cat["psfFluxErr"], float)
    snr = np.asarray(cat["snr"], float)
    clean = clean_star_flags(meas)

    # aperture correction on bright clean point sources (size within 10% of the PSF's)
    t = time.perf_counter()
    ap = aperture_name(cfg.calib_flux_radius)
    ap_flux = np.asarray(cat[ap], float)
    size = np.sqrt(0.5 * (np.asarray(cat["Ixx"], float) + np.asarray(cat["Iyy"], float)))
    psf_size = np.sqrt(0.5 * (np.asarray(cat["Ixx_psf"], float) + np.asarray(cat["Iyy_psf"], float)))
    stars = clean & (snr > cfg.apcorr_min_snr) & (np.abs(size / psf_size - 1) < 0.1)
    if f"{ap}_flag" in cat.colnames:
        stars &= ~np.asarray(cat[f"{ap}_flag"], bool)
    apcorr = fit_aperture_correction(x[stars], y[stars], psf_flux[stars], ap_flux[stars], shape=shape,
                                     config=cfg.photocal)
    corr = apcorr(x, y)
    cat["apCorr"] = corr
    cat["psfFlux_apCorr"] = psf_flux * corr
    cat["psfFluxErr_apCorr"] = psf_err * corr
    cat["calib_psf_used"] = stars
    timings["apcorr"] = time.perf_counter() - t

    # astrometry
    t = time.perf_counter()
    use = clean & (psf_flux > 0)
    xerr = np.hypot(np.asarray(cat["xErr"], float), np.asarray(cat["yErr"], float))
    if astrom_refs is None:  # the header WCS as given (no reference catalogue)
        none = np.zeros(0, np.int64)
        astro = AstrometryResult(initial_wcs, 0, float("nan"), none, none, np.zeros(0), 0.0, 0.0,
                                 metadata={"source": "header"})
    else:
        astro = solve_astrometry(x[use], y[use], psf_flux[use], astrom_refs.ra, astrom_refs.dec, astrom_refs.mag,
                                 initial_wcs, shape=shape, config=cfg.astrometry, src_err=xerr[use])
    wcs = astro.wcs
    ra, dec = wcs.all_pix2world(x, y, 0)
    cat["coord_ra"], cat["coord_dec"] = ra % 360.0, dec
    astro_used = np.zeros(len(cat), bool)
    astro_used[np.flatnonzero(use)[astro.src_index]] = True
    cat["calib_astrometry_used"] = astro_used
    timings["astrometry"] = time.perf_counter() - t

    # photometric zero point against the photometric catalogue
    t = time.perf_counter()
    if photom_refs is None:
        if header_zero_point is None:
            msg = "run_calibrate needs photom_refs or header_zero_point"
            raise ValueError(msg)
        return _header_photocal(cat, wcs, apcorr, astro, header_zero_point, timings, t)
    px, py = wcs.all_world2pix(photom_refs.ra, photom_refs.dec, 0)
    on = np.isfinite(px) & np.isfinite(py) & (px > -5) & (px < shape[1] + 5) & (py > -5) & (py < shape[0] + 5)
    ref_idx = np.flatnonzero(on)
    scale = float(np.sqrt(abs(np.linalg.det(wcs.celestial.pixel_scale_matrix))) * 3600.0)
    radius = cfg.photometry_match_arcsec / scale
    good_src = np.flatnonzero(clean & np.isfinite(x) & (psf_flux > 0))
    pairs_s, pairs_r, dist = match_nearest(np.column_stack([x[good_src], y[good_src]]),
                                    np.column_stack([px[ref_idx], py[ref_idx]]), radius)
    si, ri = good_src[pairs_s], ref_idx[pairs_r]
    colour = None if photom_refs.colour is None else photom_refs.colour[ri]
    try:
        pc = fit_zero_point(cat["psfFlux_apCorr"][si], cat["psfFluxErr_apCorr"][si], photom_refs.mag[ri],
                            photom_refs.mag_err[ri], colour=colour, colour_coeffs=colour_coeffs,
                            config=cfg.photocal, colour_range=colour_range)
    except PhotoCalError as exc:
        msg = (
            f"{exc} ({len(si)} source(s) matched to {photom_refs.name or 'the photometric refcat'} within "
            f"{cfg.photometry_match_arcsec} arcsec)"
        )
        raise PhotoCalError(msg, **exc.metadata) from None
    photo_used = np.zeros(len(cat), bool)
    photo_used[si[pc.used]] = True
    cat["calib_photometry_used"] = photo_used
    factor = pc.photo_calib.njy_per_instflux
    cat["psfFlux_nJy"] = cat["psfFlux_apCorr"] * factor
    cat["psfFluxErr_nJy"] = cat["psfFluxErr_apCorr"] * factor
    timings["photocal"] = time.perf_counter() - t

    matches = Table(
        {
            "src_index": si,
            "ref_ra": photom_refs.ra[ri],
            "ref_dec": photom_refs.dec[ri],
            "ref_mag": photom_refs.mag[ri],
            "distance_arcsec": dist * scale,
            "used": pc.used,
        }
    )
    cat.meta.update({"ZP": pc.zero_point, "ZP_ERR": pc.zero_point_err, "ASTR_RMS": astro.rms_arcsec,
                     "ASTR_N": astro.n_matches})
    return CalibrateResult(cat, wcs, pc, apcorr, astro, matches, timings)


def _header_photocal(cat: Table, wcs: WCS, apcorr: ApCorrModel, astro: AstrometryResult,
                     zero_point: tuple[float, float], timings: dict[str, float], t: float) -> CalibrateResult:
    """Finish :func:`run_calibrate` with a given zero point (a calibrated image's header MAGZERO)."""
    zp, err = float(zero_point[0]), float(zero_point[1])
    pc = PhotoCalResult(PhotoCalib(zp, err), zp, err, float("nan"), 0, np.zeros(0, bool))
    cat["calib_photometry_used"] = np.zeros(len(cat), bool)
    factor = pc.photo_calib.njy_per_instflux
    cat["psfFlux_nJy"] = cat["psfFlux_apCorr"] * factor
    cat["psfFluxErr_nJy"] = cat["psfFluxErr_apCorr"] * factor
    timings["photocal"] = time.perf_counter() - t
    matches = Table({"src_index": np.zeros(0, np.int64), "ref_ra": np.zeros(0), "ref_dec": np.zeros(0),
                     "ref_mag": np.zeros(0), "distance_arcsec": np.zeros(0), "used": np.zeros(0, bool)})
    cat.meta.update({"ZP": zp, "ZP_ERR": err, "ASTR_RMS": astro.rms_arcsec, "ASTR_N": astro.n_matches})
    return CalibrateResult(cat, wcs, pc, apcorr, astro, matches, timings)
