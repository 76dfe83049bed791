"""processCcd for a calibrated CCD (``apfast ingest --calibrated``): ISR skipped, the rest as for raws.

:func:`apfast.run.pipeline.process_ccd` hands a CCD here when the registry has a ``calibrated`` row
for it. The image, weight and mask files become image, mask and variance planes
(:func:`apfast.ccd.calibrated_input.planes_from_calibrated`, the camera's ``[calibrated]`` table
giving the weight meaning, the data-quality mapping, gain and saturation); then background, cosmic
rays and PSF (characterize), the astrometric refit against the astrometric refcat starting from the
header WCS (TPV or SIP, as astropy reads it) and the zero point against the photometric refcat
(calibrate), and the same outputs (``calexp``, ``calexpBackground``, ``src``, ``srcMatch``).
A variance built from the gain and read noise (no weight map) is rescaled to the measured sky
noise by default (``characterize.scale_variance``; header cards ``VARRATIO``, ``VARSCALE``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from astropy.io import fits

from apfast.camera.calibrated import get_calibrated_camera
from apfast.ccd.calibrate import mjd_to_epoch, run_calibrate
from apfast.ccd.calibrated_input import CalibratedPlanes, planes_from_calibrated
from apfast.ccd.characterize import run_characterize
from apfast.errors import CalibrationError
from apfast.exposure import VisitInfo
from apfast.repo.butler import Butler
from apfast.repo.calibrated import CalibratedPixels, read_calibrated
from apfast.repo.writer import OutputWriter

if TYPE_CHECKING:
    from apfast.run.pipeline import CcdOutcome

__all__ = ["calibrated_planes", "process_calibrated_ccd"]


def _value(spec: Any, header: Any, what: str) -> float | None:
    if spec is None:
        return None
    v = spec.resolve(header, what=what, required=False)
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def calibrated_planes(butler: Butler, cal_row: dict[str, Any]) -> tuple[CalibratedPlanes, CalibratedPixels]:
    """Read one calibrated CCD and build its image, mask and variance planes (the camera's rules)."""
    cal = get_calibrated_camera(butler.registry.camera)
    px = read_calibrated(butler.repo.root, cal_row)
    h = px.header
    planes = planes_from_calibrated(
        px.image, weight=px.weight, dq=px.mask, weight_kind=cal.weight_kind, dq_mode=cal.dq_mode,
        dq_map=cal.dq_map, gain=_value(cal.gain, h, "gain"), read_noise=_value(cal.read_noise, h, "read noise") or 0.0,
        saturation=_value(cal.saturation, h, "saturation"), to_electrons=cal.to_electrons,
    )
    return planes, px


def header_zero_point(butler: Butler, px: CalibratedPixels, did: dict[str, Any]) -> tuple[float, float]:
    """``(zero point, 0)`` of the calibrated planes from the camera's ``magzero`` keyword.

    The keyword gives the zero point of the file's units; when the pixels became electrons the
    zero point grows by ``2.5 log10(gain)``.

    Raises
    ------
    CalibrationError
        The camera names no ``magzero`` keyword, or the header lacks it (one line naming both).
    """
    cal = get_calibrated_camera(butler.registry.camera)
    tag = f"visit={did['visit']} ccdnum={did['ccdnum']}"
    zp = _value(cal.magzero, px.header, "zero point")
    if zp is None or not math.isfinite(zp):
        key = cal.magzero.key if cal.magzero is not None else None
        msg = (f"{tag}: calibrate.zero_point_source = 'header' but "
               + (f"the header has no usable {key}" if key else f"camera {cal.camera.name} names no calibrated.magzero")
               + "; set calibrate.zero_point_source = 'refcat' or fix the camera description")
        raise CalibrationError(msg)
    if cal.to_electrons:
        gain = _value(cal.gain, px.header, "gain")
        assert gain is not None  # planes_from_calibrated has checked it
        zp += 2.5 * math.log10(gain)
    return zp, 0.0


def process_calibrated_ccd(butler: Butler, row: dict[str, Any], cal_row: dict[str, Any], cfg: Any, *,
                           writer: OutputWriter | None = None) -> CcdOutcome:
    """processCcd of one calibrated CCD; returns a :class:`apfast.run.pipeline.CcdOutcome`.

    Raises
    ------
    ApfastError
        A stage failure (the message names the CCD and what to change); ``CalibrationError`` if the
        image has no header WCS to start the astrometric fit from.
    """
    from apfast.run.pipeline import (  # at call time: pipeline imports this module lazily
        _colour_term,
        _refs,
        calexp_outcome,
        calexp_stats,
    )

    did = {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}
    out: Butler | OutputWriter = writer if writer is not None else butler
    timings: dict[str, float] = {}
    t = time.perf_counter()
    planes, px = calibrated_planes(butler, cal_row)
    camera = butler.registry.camera
    timings["read"] = time.perf_counter() - t
    timings["isr"] = 0.0

    t = time.perf_counter()
    char = run_characterize(planes.image, planes.mask, planes.variance, config=cfg.characterize,
                            variance_source=planes.variance_source)
    timings["characterize"] = time.perf_counter() - t

    t = time.perf_counter()
    if px.wcs is None:
        msg = (f"calibrated visit={did['visit']} ccdnum={did['ccdnum']} ({cal_row['image']}) has no header WCS; "
               "astrometry needs one to start from")
        raise CalibrationError(msg)
    initial_wcs = px.wcs
    ny, nx = planes.image.shape
    cra, cdec = initial_wcs.all_pix2world([0, nx - 1, nx - 1, 0], [0, 0, ny - 1, ny - 1], 0)
    corners_ra, corners_dec = [float(v) % 360.0 for v in cra], [float(v) for v in cdec]
    margin = cfg.calibrate.astrometry.max_offset_arcsec / 3600.0 + 0.01
    root = butler.repo.root
    ccfg = cfg.calibrate
    astrom_refs = None
    if ccfg.astrometry_source == "refcat":
        astrom_refs = _refs(root, ccfg.astrometry_refcat, corners_ra, corners_dec, margin,
                            mag_col=ccfg.astrometry_mag, epoch=mjd_to_epoch(row["mjd"]), did=did)
    band = str(row["filter"])
    camera = butler.registry.camera
    term, colour_range = _colour_term(ccfg.photocal, camera, band)
    photom_refs, header_zp = None, None
    if ccfg.zero_point_source == "refcat":
        photom_refs = _refs(root, ccfg.photometry_refcat, corners_ra, corners_dec, margin,
                            mag_col=f"{camera.ref_bands.get(band, band)}_mag", epoch=None, did=did,
                            colour=(term[0], term[1]) if term else None)
    else:
        header_zp = header_zero_point(butler, px, did)
    timings["refcat"] = time.perf_counter() - t

    t = time.perf_counter()
    cal = run_calibrate(char.image, char.mask, char.variance, psf=char.psf, psf_sigma=char.psf_sigma,
                        initial_wcs=initial_wcs, astrom_refs=astrom_refs, photom_refs=photom_refs,
                        config=ccfg, colour_coeffs=term[2] if term else (), colour_range=colour_range,
                        header_zero_point=header_zp)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    meta = fits.Header()
    stats = calexp_stats(char, cal, N_SAT=planes.n_saturated)
    meta["CALINPUT"] = (True, "processed from a calibrated image (ISR skipped)")
    meta["ASTRSRC"] = (ccfg.astrometry_source, "WCS: refcat fit or the input header's")
    meta["ZPSRC"] = (ccfg.zero_point_source, "zero point: refcat fit or the input header's")
    vi = VisitInfo(visit=did["visit"], ccdnum=did["ccdnum"], detector=row.get("detector"), filter=band,
                   mjd=row.get("mjd"), date_obs=row.get("taiObs"), exptime=row.get("expTime"),
                   airmass=row.get("airmass"), ra=row.get("ra"), dec=row.get("dec"), object=row.get("object"),
                   camera=camera.name)
    return calexp_outcome(out, did, char, cal, meta=meta, stats=stats, visit_info=vi, camera=camera, term=term,
                          cfg=cfg, timings=timings, t_write=t)
