"""Real-data test of image differencing: apfast vs SFFT's published difference on DECam cutouts.

Data (``tests/data/real/decam_sfft``, see tests/data/README.md): 5 reference frames ``DEC-OBS18[a-e]`` and
5 science frames ``DEC-OBS04[a-e]``, 256x256 DECam CCD N6 i-band cutouts (ADU, sky-subtracted),
all already resampled onto one common TPV WCS, plus ``sfft_difference_decorr.fits``, SFFT's
decorrelated difference of the two 5-frame stacks.

Inputs. Each frame becomes an :class:`~apfast.exposure.Exposure`: float32 image, variance =
(robust MAD sky noise of 3-sigma-clipped pixels)^2 + max(image, 0) / GAINA, empty mask, the
header's WCS and a :class:`~apfast.psf.GaussianPsf` from the ``FWHM`` keyword (sigma = FWHM/2.3548,
odd size ~6 FWHM). A determined PSF is not used: a 256x256 cutout of this sparse field has only
~5 bright, isolated stellar detections, below what :func:`apfast.ccd.psf_determiner.determine_psf`
needs for a stable pixel basis. All frames share one nominal zero point (30.0), so photometric
differences between epochs are left to the PSF-matching kernel sum, as in SFFT.

Stacks. Both epochs go through the real coadd path: a sky map from
:func:`apfast.diffim.skymap.skymap_for_calexps` (one patch covering the cutout), :func:`apfast.diffim.coadd.make_coadd`
(exposure-weighted, 3-sigma clipped mean, coadd PSF), then a warp back onto the frames' common
pixel grid with :func:`apfast.diffim.warp.warp_exposure` - what :func:`apfast.diffim.template.get_template` does for
templates. The science stack is built the same way so both are resampled identically and the
difference lands on SFFT's pixel grid (positions compare pixel for pixel). A direct per-pixel
combine without resampling would also be valid here (one shared WCS); the coadd path was chosen
because it exercises the production code and it works on 256x256 frames (pull std ~0.98 below).

Differencing: :func:`apfast.diffim.stage.run_image_difference` with default PsfMatchConfig,
DecorrelationConfig and DifferenceConfig (the defaults find the 5 stamps they need on this cutout).

Findings that fixed the thresholds (measured once, 2 cores):
- Difference background noise (3-sigma clipped std, source-free): apfast 78.9 coadd units (nJy-like
  scale, = 21.7 ADU) vs SFFT 20.35 ADU; pull std of apfast's source-free pixels 0.966 (16487 pixels).
- Static stars (template S/N >= 20, star-like, isolated, their aperture inside the unmasked difference,
  > 15 px from the dipole): (100.4, 72.9), (178.4, 202.2), (123.8, 210.5). Residual RMS / noise in a
  radius = science FWHM (5.2 px) aperture: apfast 3.69, 1.46, 1.35; SFFT 3.33, 1.95, 1.30; medians
  1.46 vs 1.95. With a 3 px aperture: medians 2.03 vs 2.80. On the brightest static star apfast
  is worse at both radii. (Before differencing used the half-maximum FWHM, the basis was sized
  from second moments: kernel 21 px, medians 1.93 and 2.88.)
- The known dipole at (60, 181) (the brightest star, template peak ~20000 ADU): SFFT leaves a
  +122/-98 sigma dipole; apfast's aperture statistic there is 8.0 vs SFFT 21.7.
- The most significant SFFT residual outside the dipole zone and inside the valid region is a
  positive-only 47 sigma source at (129, 128) on an extended template object (adaptive size 4.25 px
  vs 1.7 px for stars): a real brightening (nuclear variable). apfast detects it at ~50 sigma.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apfast import masks
from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.ccd.measurement import measure_sources
from apfast.diffim.coadd import make_coadd
from apfast.diffim.decorrelate import DecorrelationConfig
from apfast.diffim.psfmatch import PsfMatchConfig
from apfast.diffim.skymap import skymap_for_calexps
from apfast.diffim.stage import DifferenceConfig, run_image_difference
from apfast.diffim.warp import warp_exposure
from apfast.exposure import Exposure, PhotoCalib, VisitInfo
from apfast.psf import GaussianPsf

DIPOLE_XY = (60.0, 181.0)
DIPOLE_ZONE = 15.0
FWHM_TO_SIGMA = 1.0 / 2.3548
NOMINAL_ZP = 30.0


def _clipped_stats(values: np.ndarray) -> tuple[float, float]:
    """Mean and std after 3 rounds of 3-sigma clipping started from median / MAD."""
    v = np.asarray(values, dtype=np.float64)
    centre = float(np.median(v))
    sig = 1.4826 * float(np.median(np.abs(v - centre)))
    for _ in range(3):
        keep = np.abs(v - centre) < 3 * sig
        centre = float(v[keep].mean())
        sig = float(v[keep].std())
    return centre, sig


def _load_frame(path: Path) -> tuple[Exposure, float]:
    header = fits.getheader(path)
    data = np.asarray(fits.getdata(path), dtype=np.float64)
    with warnings.catch_warnings():
        # astropy's FITSFixedWarning about the IRAF/TPV cards; the TPV terms are still applied by wcslib
        warnings.simplefilter("ignore")
        wcs = WCS(header)
    med = float(np.median(data))
    mad = 1.4826 * float(np.median(np.abs(data - med)))
    sky_pixels = data[np.abs(data - med) < 3 * mad]
    sky_sigma = 1.4826 * float(np.median(np.abs(sky_pixels - np.median(sky_pixels))))
    variance = sky_sigma**2 + np.maximum(data, 0.0) / float(header["GAINA"])
    fwhm = float(header["FWHM"])
    size = 2 * round(3 * fwhm) + 1
    exp = Exposure(
        data.astype(np.float32),
        np.zeros(data.shape, dtype=np.int32),
        variance.astype(np.float32),
        wcs=wcs,
        psf=GaussianPsf(fwhm * FWHM_TO_SIGMA, size),
        photo_calib=PhotoCalib(NOMINAL_ZP),
        visit_info=VisitInfo(filter="i"),
    )
    return exp, fwhm


def _stack(frames: list[Exposure], skymap: Any, grid: WCS, shape: tuple[int, int]) -> Exposure:
    """make_coadd onto the single patch, then warp back onto the frames' common grid."""
    coadd = make_coadd(frames, 0, "0,0", skymap)
    return warp_exposure(coadd, grid, shape)


@pytest.fixture(scope="module")
def real_diffim(real_data: Path) -> dict[str, Any]:
    folder = real_data / "decam_sfft"
    refs = [_load_frame(folder / f"DEC-OBS18{c}.mini.fits") for c in "abcde"]
    scis = [_load_frame(folder / f"DEC-OBS04{c}.mini.fits") for c in "abcde"]
    frames = [e for e, _ in refs + scis]
    grid = frames[0].wcs
    shape = frames[0].shape
    skymap = skymap_for_calexps([e.wcs for e in frames], [e.shape for e in frames],
                                patch_size=400, margin=20, overlap=10)
    found = skymap.find_tracts_patches(grid, shape)
    assert found == [(0, "0,0")], f"expected one patch to cover the cutout, got {found}"
    template = _stack([e for e, _ in refs], skymap, grid, shape)
    science = _stack([e for e, _ in scis], skymap, grid, shape)
    result = run_image_difference(
        science, template, sources=None, psfmatch=PsfMatchConfig(),
        decorrelation=DecorrelationConfig(), config=DifferenceConfig(),
    )
    sfft = np.asarray(fits.getdata(folder / "sfft_difference_decorr.fits"), dtype=np.float64)
    sci_fwhm = float(np.median([f for _, f in scis]))
    tmpl_fwhm = float(np.median([f for _, f in refs]))
    diff = result.difference

    invalid = masks.bitmask(["BAD", "SAT", "INTRP", "CR", "EDGE", "NO_DATA", "SUSPECT"])
    valid = ((diff.mask & invalid) == 0) & np.isfinite(diff.image) & np.isfinite(diff.variance)

    # template sources: 3 sigma footprints for the source-free mask, 5 sigma + measurement for stars
    tmask = np.where(valid, 0, template.mask | masks.bitmask("EDGE")).astype(np.int32)
    tsig = tmpl_fwhm * FWHM_TO_SIGMA
    low = detect_sources(template.image, template.variance, tmask, psf_sigma=tsig,
                         config=DetectionConfig(threshold=3.0))
    dlow = detect_sources(diff.image, diff.variance, diff.mask, psf_sigma=sci_fwhm * FWHM_TO_SIGMA,
                          config=DetectionConfig(threshold=3.0, polarity="both"))
    source_free = valid & (low.labels == 0) & (dlow.labels == 0)
    det = detect_sources(template.image, template.variance, tmask, psf_sigma=tsig,
                         config=DetectionConfig(threshold=5.0))
    meas = measure_sources(template.image, template.variance, tmask, det, psf=None, psf_sigma=tsig)
    return {
        "result": result, "diff": diff, "sfft": sfft, "valid": valid, "source_free": source_free,
        "meas": meas.columns, "sci_fwhm": sci_fwhm, "tmpl_fwhm": tmpl_fwhm,
    }


def _static_stars(d: dict[str, Any]) -> list[tuple[float, float]]:
    c = d["meas"]
    x, y, snr = c["x"], c["y"], c["snr"]
    size = np.sqrt((c["Ixx"] + c["Iyy"]) / 2.0)
    psf_sigma = d["tmpl_fwhm"] * FWHM_TO_SIGMA
    ny, nx = d["valid"].shape
    yy, xx = np.mgrid[:ny, :nx]
    iso = 3.0 * d["sci_fwhm"]
    stars = []
    for i in range(x.size):
        if not (np.isfinite(x[i]) and np.isfinite(size[i]) and snr[i] >= 20.0):
            continue
        if abs(size[i] / psf_sigma - 1.0) > 0.2 or c["pixelFlags_saturated"][i] or c["centroid_flag"][i]:
            continue
        if math.hypot(x[i] - DIPOLE_XY[0], y[i] - DIPOLE_XY[1]) < DIPOLE_ZONE:
            continue
        others = np.hypot(x - x[i], y - y[i])
        others[i] = np.inf
        if np.nanmin(others) < iso:
            continue
        # the aperture of the residual statistic must be unmasked (the isolation radius may touch the
        # EDGE band, which grows with the kernel: 15 px for the 31 px kernel of this pair)
        box = (xx - x[i]) ** 2 + (yy - y[i]) ** 2 <= d["sci_fwhm"] ** 2
        if not d["valid"][box].all():
            continue
        stars.append((float(x[i]), float(y[i])))
    return stars


def _aperture_stat(img: np.ndarray, free: np.ndarray, stars: list[tuple[float, float]], radius: float) -> np.ndarray:
    """Residual RMS in a circular aperture per star, in units of the image's own background noise."""
    centre, noise = _clipped_stats(img[free])
    ny, nx = img.shape
    yy, xx = np.mgrid[:ny, :nx]
    out = []
    for x, y in stars:
        ap = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        out.append(math.sqrt(float(np.mean((img[ap] - centre) ** 2))) / noise)
    return np.array(out)


def test_static_star_residuals_no_worse_than_sfft(real_diffim: dict[str, Any]) -> None:
    d = real_diffim
    stars = _static_stars(d)
    assert len(stars) >= 3, f"expected >= 3 bright isolated static stars on the template, found {stars}"
    radius = d["sci_fwhm"]  # PSF-sized: radius = science FWHM (~5.2 px)
    ours = _aperture_stat(d["diff"].image.astype(np.float64), d["source_free"], stars, radius)
    theirs = _aperture_stat(d["sfft"], d["source_free"], stars, radius)
    assert np.median(ours) <= np.median(theirs), (
        f"apfast residual RMS/noise at static stars {stars}: {np.round(ours, 2)} (median {np.median(ours):.3f}) "
        f"vs SFFT {np.round(theirs, 2)} (median {np.median(theirs):.3f})"
    )


def test_dipole_star_better_than_sfft(real_diffim: dict[str, Any]) -> None:
    """The brightest star leaves a strong SFFT dipole; apfast's residual there must be smaller."""
    d = real_diffim
    ours = _aperture_stat(d["diff"].image.astype(np.float64), d["source_free"], [DIPOLE_XY], d["sci_fwhm"])
    theirs = _aperture_stat(d["sfft"], d["source_free"], [DIPOLE_XY], d["sci_fwhm"])
    assert theirs[0] > 10.0, f"SFFT's dipole should be strong (> 10x noise), got {theirs[0]:.2f}"
    assert ours[0] < theirs[0], f"apfast residual at the dipole star {ours[0]:.2f} vs SFFT {theirs[0]:.2f}"


def test_same_variable_detected(real_diffim: dict[str, Any]) -> None:
    d = real_diffim
    sfft = d["sfft"]
    _, sfft_noise = _clipped_stats(sfft[d["source_free"]])
    cfg = DetectionConfig(threshold=5.0, polarity="both")
    psf_sigma = d["sci_fwhm"] * FWHM_TO_SIGMA
    ref = detect_sources(sfft, np.full(sfft.shape, sfft_noise**2), np.zeros(sfft.shape, np.int32),
                         psf_sigma=psf_sigma, config=cfg)
    best = None
    for i in np.argsort(-np.abs(ref.peak_snr)):
        px, py = int(ref.peak_x[i]), int(ref.peak_y[i])
        if not d["valid"][py, px] or math.hypot(px - DIPOLE_XY[0], py - DIPOLE_XY[1]) < DIPOLE_ZONE:
            continue
        best = (px, py, float(ref.peak_snr[i]))
        break
    assert best is not None, "SFFT's difference has no >= 5 sigma source outside the dipole zone"
    assert abs(best[2]) >= 20.0, f"SFFT's strongest residual should be a clear variable, got {best}"
    diff = d["diff"]
    ours = detect_sources(diff.image, diff.variance, diff.mask, psf_sigma=psf_sigma, config=cfg)
    dist = np.hypot(ours.peak_x - best[0], ours.peak_y - best[1])
    near = (dist <= 3.0) & (np.abs(ours.peak_snr) >= 5.0)
    assert near.any(), (
        f"apfast finds no >= 5 sigma source within 3 px of SFFT's variable at {best}; "
        f"nearest: {dist.min() if dist.size else None}"
    )
    # same sign as SFFT's (both science - template)
    j = int(np.flatnonzero(near)[np.argmax(np.abs(ours.peak_snr[near]))])
    assert np.sign(ours.peak_snr[j]) == np.sign(best[2])


def test_pull_distribution(real_diffim: dict[str, Any]) -> None:
    d = real_diffim
    diff = d["diff"]
    free = d["source_free"]
    assert free.sum() > 10_000, f"too few source-free pixels: {free.sum()}"
    pull = diff.image[free].astype(np.float64) / np.sqrt(diff.variance[free].astype(np.float64))
    std = float(pull.std())
    assert abs(std - 1.0) <= 0.1, f"pull std of source-free difference pixels is {std:.3f}, expected 1.00 +/- 0.1"
