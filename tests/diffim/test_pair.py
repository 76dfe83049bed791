"""Differencing two real images with :func:`apfast.diffim.pair.subtract_pair` (tests/data/README.md).

DECam: ``DEC-OBS04a`` (science, FWHM 5.2 px) and ``DEC-OBS18a`` (reference, 3.9 px), single 330 s
frames of a sparse field on one TPV grid, sky-subtracted. ZTF: a 480 px cut of the quadrant with its
~160 DN sky as science, and a template made from it (convolved, scaled by 0.7, 450 DN more sky,
extra noise, cut 20/10 px further on with its WCS shifted to match) for the sky and warp paths.

Measured once (2 cores): DECam pair convolveTemplate, kernel sum 1.013 against a star flux ratio of
1.02, 4 stamps, pull robust std 1.00 in ~39k source-free pixels, residual at the kernel stars 10% of
their flux summed in |D| (noise included); the net residual flux in 1.5 FWHM at the 4 static stars
is 2.0%, -0.2%, 0.5% and 3.1% (the last within its noise) of the star's flux;
ZTF kernel sum 0.700 (truth 0.7).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from apfast.ccd.characterize import CharacterizeConfig, run_characterize
from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.ccd.psf_determiner import PsfDeterminerConfig, halfmax_fwhm
from apfast.dia.pair import detect_pair_sources, dia_table
from apfast.diffim.pair import SubtractConfig, make_exposure, overlap_fraction, subtract_pair
from apfast.diffim.psfmatch import InsufficientKernelSourcesError, PsfMatchConfig
from apfast.diffim.subtract import matching_fwhm, subtract_images
from apfast.errors import InputError
from apfast.exposure import Exposure
from apfast.masks import bitmask
from apfast.psf import GaussianPsf
from apfast.repo.pairio import read_fits_image

DECAM = "decam_sfft/DEC-OBS{}.mini.fits"
ZTF = "ztf_quadrant/ztf_20200924431759_000655_zr_c13_o_q3_{}_cut1024.fits.fz"
# the settings apfast subtract uses (apfast.run.subtract.SUBTRACT_DEFAULTS): a 256 px cutout has ~5 bright stars
CHAR = CharacterizeConfig(
    detection=DetectionConfig(threshold=5.0, threshold_type="stdev", include_threshold_multiplier=2.0),
    psf=PsfDeterminerConfig(min_stars=3),
)
PSFM = PsfMatchConfig(mode="auto", min_stamps=3)
BAD = bitmask(["BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP"])


def _decam(real_data: Path, which: str) -> Exposure:
    img = read_fits_image(real_data / DECAM.format(which), what="image")
    return make_exposure(img.data, wcs=img.wcs, gain=img.header_float(["GAIN"]),
                         saturation=img.header_float(["SATURATE"]))


@pytest.fixture(scope="module")
def decam(real_data: Path) -> dict[str, Any]:
    sci, tmp = _decam(real_data, "04a"), _decam(real_data, "18a")
    res = detect_pair_sources(subtract_pair(sci, tmp, characterize=CHAR, psfmatch=PSFM))
    return {"sci": sci, "tmp": tmp, "res": res}


def _aperture(img: np.ndarray, x: float, y: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= r * r


def _stars(exp: Exposure, fwhm: float, snr_min: float = 30.0) -> list[tuple[float, float]]:
    """Isolated bright peaks of an exposure, 30 px inside the border."""
    det = detect_sources(exp.image, exp.variance, exp.mask, psf_sigma=fwhm / 2.3548,
                         config=DetectionConfig(threshold=5.0))
    ny, nx = exp.shape
    out = []
    for i in range(det.id.size):
        x, y = float(det.peak_x[i]), float(det.peak_y[i])
        others = np.hypot(det.peak_x - x, det.peak_y - y)
        others[i] = np.inf
        if det.peak_snr[i] >= snr_min and 30 <= x < nx - 30 and 30 <= y < ny - 30 and others.min() > 4 * fwhm:
            out.append((x, y))
    return out


def test_fwhm_used_is_characterize_half_maximum(decam: dict[str, Any]) -> None:
    """Differencing sizes its basis from the same FWHM characterize reports, not the second moments."""
    res = decam["res"]
    st = res.stats
    assert st["fwhm_science"] == st["fwhm_science_characterize"]
    assert st["fwhm_template"] == st["fwhm_template_characterize"]
    # the header FWHMs of the frames (5.23 and 3.85 px) agree with the half-maximum widths ...
    assert st["fwhm_science"] == pytest.approx(5.23, rel=0.1)
    assert st["fwhm_template"] == pytest.approx(3.85, rel=0.1)
    # ... and the second-moment widths of the same PSF models (the old sizing) do not
    ny, nx = res.science.shape
    psf = res.science.psf
    assert psf is not None
    assert psf.fwhm((nx - 1) / 2, (ny - 1) / 2) > 1.3 * st["fwhm_science"]


def test_matching_fwhm_equals_characterize_report(real_data: Path) -> None:
    exp = _decam(real_data, "18a")
    assert exp.variance is not None and exp.mask is not None
    ch = run_characterize(exp.image, exp.mask, exp.variance, config=CHAR)
    ny, nx = exp.shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    assert matching_fwhm(ch.psf, xc, yc) == ch.psf_result.fwhm_center
    assert matching_fwhm(ch.psf, xc, yc) == halfmax_fwhm(ch.psf.compute_image(xc, yc))
    # a Gaussian keeps its analytic FWHM
    assert matching_fwhm(GaussianPsf(1.7, 25), 0, 0) == pytest.approx(1.7 * 2.354820045)


def test_decam_pull_statistics(decam: dict[str, Any]) -> None:
    res = decam["res"]
    diff = res.difference
    assert res.stats["mode"] == "convolveTemplate"  # the science is the blurrier image
    # source-free: unflagged, outside 3-sigma footprints of science, template and difference
    free = (diff.mask & BAD) == 0
    sig = res.stats["fwhm_science"] / 2.3548
    for exp, pol in ((res.science, "positive"), (res.template, "positive"), (diff, "both")):
        det = detect_sources(exp.image, exp.variance, exp.mask, psf_sigma=sig,
                             config=DetectionConfig(threshold=3.0, polarity=pol))
        free &= det.labels == 0
    assert free.sum() > 20_000
    pull = (diff.image[free] / np.sqrt(diff.variance[free])).astype(np.float64)
    med = float(np.median(pull))
    std = 1.4826 * float(np.median(np.abs(pull - med)))
    assert abs(med) < 0.05
    assert 0.8 <= std <= 1.3
    assert 0.8 <= res.stats["pull_std"] <= 1.3


def test_decam_static_stars_subtract(decam: dict[str, Any]) -> None:
    """At bright static stars the difference keeps a few percent of the star's flux at most."""
    res = decam["res"]
    fwhm = res.stats["fwhm_science"]
    # all but the variable nucleus (129, 128); measured: 2.0%, -0.2%, 0.5% and 3.1% (within the noise)
    stars = [s for s in _stars(res.science, fwhm, snr_min=20.0) if math.hypot(s[0] - 129, s[1] - 128) > 10]
    assert len(stars) >= 4
    for x, y in stars:
        ap = _aperture(res.science.image, x, y, 1.5 * fwhm)
        star = float(res.science.image[ap].sum())
        resid = float(res.difference.image[ap].sum())
        noise = math.sqrt(float(res.difference.variance[ap].sum()))
        assert abs(resid) < 0.05 * star + 3 * noise, (x, y, star, resid, noise)
        assert abs(resid) < 0.1 * star


def test_decam_kernel_sum_is_the_flux_ratio(decam: dict[str, Any]) -> None:
    res = decam["res"]
    fwhm = res.stats["fwhm_science"]
    ratios = []
    for x, y in _stars(res.science, fwhm, snr_min=50.0):
        ap = _aperture(res.science.image, x, y, 3 * fwhm)
        ratios.append(float(res.science.image[ap].sum()) / float(res.template.image[ap].sum()))
    assert len(ratios) >= 3
    assert res.stats["kernel_sum"] == pytest.approx(float(np.median(ratios)), abs=0.05)
    assert res.stats["n_stamps"] >= 3


def test_decam_dia_table(decam: dict[str, Any]) -> None:
    res = decam["res"]
    tab = res.table
    assert tab is not None and res.sources is not None
    assert list(tab) == ["id", "x", "y", "ra", "dec", "flux", "flux_err", "snr", "is_negative", "is_dipole", "flags",
                         "reliability"]
    assert np.all((tab["reliability"] >= 0) & (tab["reliability"] <= 1))
    assert tab["id"].size == res.stats["n_dia_sources"] >= 1
    assert np.isfinite(tab["ra"]).all() and np.isfinite(tab["dec"]).all()
    # the known variable nucleus near (129, 128) brightens (SFFT finds it at 47 sigma)
    d = np.hypot(tab["x"] - 129, tab["y"] - 128)
    j = int(np.argmin(d))
    assert d[j] < 3 and tab["snr"][j] > 10 and not tab["is_negative"][j]
    assert tab["reliability"][j] > 0.9  # a real change on real data, scored real by the shipped model
    # fluxes are in science image units: the table equals the nJy columns over the unit calibration
    assert dia_table(res.sources, None)["flux"][j] == pytest.approx(tab["flux"][j], rel=1e-9)


def test_inputs_unchanged(decam: dict[str, Any], real_data: Path) -> None:
    fresh = _decam(real_data, "04a")
    assert np.array_equal(fresh.image, decam["sci"].image)
    assert np.array_equal(fresh.variance, decam["sci"].variance)


@pytest.fixture(scope="module")
def ztf_pair(real_data: Path) -> tuple[Exposure, Exposure]:
    img = read_fits_image(real_data / ZTF.format("sciimg"), what="image")
    zmask = fits.getdata(real_data / ZTF.format("mskimg"), 1).astype(np.int32)
    data = img.data.astype(np.float64)
    assert float(np.nanmedian(data)) > 100  # the sky is still in
    rng = np.random.default_rng(15)
    tdata = 0.7 * ndimage.gaussian_filter(np.nan_to_num(data), 1.3) + 450.0
    tdata += rng.normal(0.0, 3.0, data.shape)
    sl_s = (slice(0, 480), slice(0, 480))
    sl_t = (slice(20, 500), slice(10, 490))
    twcs = img.wcs.deepcopy()
    twcs.wcs.crpix = twcs.wcs.crpix - np.array([10.0, 20.0])
    gain = img.header_float(["GAIN"])
    sci = make_exposure(data[sl_s], wcs=img.wcs, mask=zmask[sl_s], mask_ignore_bits=2 | 2048, gain=gain,
                        saturation=img.header_float(["SATURATE"]))
    tmp = make_exposure(tdata[sl_t], wcs=twcs, mask=zmask[sl_t], mask_ignore_bits=2 | 2048, gain=gain)
    return sci, tmp


def test_ztf_sky_and_warp(ztf_pair: tuple[Exposure, Exposure]) -> None:
    """Images with 160 and 560 DN of sky on shifted grids: kernel sum = the 0.7 flux scaling."""
    sci, tmp = ztf_pair
    res = subtract_pair(sci, tmp, characterize=CharacterizeConfig(), psfmatch=PsfMatchConfig(mode="auto"))
    st = res.stats
    assert st["overlap"] == pytest.approx((460 / 480) * (470 / 480), abs=0.03)
    assert st["mode"] == "convolveScience"  # the science is the sharper image
    assert st["kernel_sum"] == pytest.approx(0.7, abs=0.02)
    assert st["n_stamps"] >= 10
    assert abs(st["pull_median"]) < 0.1
    # the sky is gone from the difference
    good = (res.difference.mask & BAD) == 0
    assert abs(float(np.median(res.difference.image[good]))) < 0.2 * math.sqrt(float(np.median(
        res.difference.variance[good])))


def test_subtract_images_handles_sky_in_the_inputs(ztf_pair: tuple[Exposure, Exposure]) -> None:
    """subtract_images on images that still have their sky, kernel stars detected on the template."""
    sci, tmp = ztf_pair
    assert sci.variance is not None and sci.mask is not None
    ch = run_characterize(sci.image, sci.mask, sci.variance)
    # the template on the science grid: the same pixels as the science, sky and all
    t_img = tmp.image[: 460, : 470]
    s_img = sci.image[20:480, 10:480]
    s = Exposure(s_img, sci.mask[20:480, 10:480], sci.variance[20:480, 10:480], psf=ch.psf)
    t = Exposure(t_img, None if tmp.mask is None else tmp.mask[:460, :470],
                 None if tmp.variance is None else tmp.variance[:460, :470],
                 psf=GaussianPsf(math.hypot(ch.psf_result.fwhm_center / 2.3548, 1.3), 25))
    assert float(np.median(t.image)) > 500 and float(np.median(s.image)) > 100
    res = subtract_images(s, t, config=PsfMatchConfig(mode="convolveScience"))
    assert res.metadata["kernel_sum_center"] == pytest.approx(0.7, abs=0.02)
    assert res.n_stamps_used >= 10


def test_too_few_kernel_stars_names_the_keys() -> None:
    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 5.0, (96, 96)).astype(np.float32)
    var = np.full(img.shape, 25.0, np.float32)
    e = Exposure(img, np.zeros(img.shape, np.int32), var, psf=GaussianPsf(1.5, 21))
    keys = r"difference\.psfmatch\.n_star_per_cell .*difference\.psfmatch\.size_cell"
    with pytest.raises(InsufficientKernelSourcesError, match=keys):
        subtract_images(e, e.copy())


def test_overlap_and_plane_errors(real_data: Path) -> None:
    sci = _decam(real_data, "04a")
    far = sci.copy()
    assert far.wcs is not None
    far.wcs.wcs.crval = far.wcs.wcs.crval + np.array([0.0, 1.0])
    assert overlap_fraction(sci.wcs, sci.shape, far.wcs, far.shape) == 0.0
    with pytest.raises(InputError, match=r"do not overlap: the template covers 0\.0% .*subtract\.min_overlap"):
        subtract_pair(sci, far, config=SubtractConfig())
    with pytest.raises(InputError, match=r"science variance has shape \(10, 10\) but the science image has"):
        make_exposure(sci.image, wcs=sci.wcs, variance=np.ones((10, 10)))
    nowcs = Exposure(sci.image, sci.mask, sci.variance)
    with pytest.raises(InputError, match="template image has no celestial WCS"):
        subtract_pair(sci, nowcs)


def test_small_image_passes_the_default_stamp_minimum() -> None:
    """A 120 px image: one 128 px cell held at most 3 stars, under min_stamps 5; the cells now shrink.

    (The stamp plus kernel margin, ~36 px here, leaves only the central 48 px for kernel stars.)
    """
    from apfast.diffim.psfmatch import effective_cell_size

    rng = np.random.default_rng(11)
    n = 120
    yy, xx = np.mgrid[:n, :n]

    def scene(sigma: float, scale: float) -> np.ndarray:
        img = np.zeros((n, n))
        for x0 in (38.3, 50.1, 61.7, 74.2):
            for y0 in (37.8, 50.4, 62.2, 73.9):
                r2 = (xx - x0) ** 2 + (yy - y0) ** 2
                img += scale * 2e4 * np.exp(-0.5 * r2 / sigma**2) / (2 * np.pi * sigma**2)
        return img + rng.normal(0.0, 5.0, img.shape)

    var = np.full((n, n), 25.0)
    sci = Exposure(scene(1.8, 1.1), variance=var, psf=GaussianPsf(1.8, 21))
    tmp = Exposure(scene(1.3, 1.0), variance=var, psf=GaussianPsf(1.3, 21))
    cfg = PsfMatchConfig()
    assert effective_cell_size(n, n, cfg) < cfg.size_cell
    # a catalogue: detection merges stars this close into one footprint
    gx, gy = np.meshgrid((38.3, 50.1, 61.7, 74.2), (37.8, 50.4, 62.2, 73.9))
    cat = {"x": gx.ravel(), "y": gy.ravel(), "snr": np.full(16, 300.0)}
    res = subtract_images(sci, tmp, sources=cat, config=cfg)
    assert res.n_stamps_used >= cfg.min_stamps
    assert res.kernel.sum(59.5, 59.5) == pytest.approx(1.1, abs=0.01)
