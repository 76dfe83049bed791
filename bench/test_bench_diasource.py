"""DIA source detection + measurement on a full 2048x4096 difference (target <= 0.3 s, 2 threads).

The difference holds 100 point sources of both signs at S/N 10-100 and 6 dipoles,
with a spatially varying PolynomialPixelPsf (k = 25) and white noise. The baseline
in the same group is scipy: PSF-smoothing of image and variance, thresholding
both signs, ``label`` and a per-label ``sum`` and ``center_of_mass`` (no growing,
merging, PSF fits, dipoles or forced photometry: less work than ours).

Forced photometry at 2000 positions of a full CCD (target < 50 ms) is timed in a
second group against a NumPy loop over 200 positions.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from astropy.wcs import WCS
from scipy import ndimage

from apfast.dia.diasource import forced_photometry, run_dia_detection
from apfast.exposure import Exposure, PhotoCalib
from apfast.psf import GaussianPsf, PolynomialPixelPsf

SHAPE = (4096, 2048)
NOISE = 10.0
N_SOURCES = 100
N_DIPOLES = 6


def _psf() -> PolynomialPixelPsf:
    k = 25
    b = np.stack([GaussianPsf(1.8, k).compute_image(0, 0), GaussianPsf(2.4, k).compute_image(0, 0)])
    coeffs = np.array([[0.5, -0.3, -0.2], [0.5, 0.3, 0.2]])
    return PolynomialPixelPsf(b, coeffs, 1, SHAPE[1] / 2, SHAPE[0] / 2, SHAPE[1] / 2, SHAPE[0] / 2)


def _add(img: np.ndarray, x: float, y: float, flux: float, sigma: float) -> None:
    r = int(6 * sigma)
    ix, iy = int(round(x)), int(round(y))
    yy, xx = np.mgrid[iy - r : iy + r + 1, ix - r : ix + r + 1]
    img[iy - r : iy + r + 1, ix - r : ix + r + 1] += (
        flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    ).astype(np.float32)


@pytest.fixture(scope="module")
def ccd():
    """(difference, science, template) exposures of a full DECam-sized CCD."""
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    rng = np.random.default_rng(7)
    img = rng.standard_normal(SHAPE, dtype=np.float32) * NOISE
    sci = rng.standard_normal(SHAPE, dtype=np.float32) * NOISE
    xs = rng.uniform(30, SHAPE[1] - 30, N_SOURCES + N_DIPOLES)
    ys = rng.uniform(30, SHAPE[0] - 30, N_SOURCES + N_DIPOLES)
    snr = np.where(np.arange(xs.size) < N_SOURCES, rng.uniform(10, 100, xs.size), rng.uniform(30, 100, xs.size))
    sign = np.where(rng.uniform(size=xs.size) < 0.5, -1.0, 1.0)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        sigma = 2.1
        f = snr[i] * NOISE * math.sqrt(4 * math.pi) * sigma
        if i < N_SOURCES:
            _add(img, x, y, sign[i] * f, sigma)
            _add(sci, x, y, max(sign[i], 0) * f, sigma)
        else:  # dipole: +/- pair 2 px apart
            _add(img, x + 1.0, y, f, sigma)
            _add(img, x - 1.0, y, -f, sigma)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [SHAPE[1] / 2, SHAPE[0] / 2]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    psf = _psf()
    var = np.full(SHAPE, NOISE**2, np.float32)
    mask = np.zeros(SHAPE, np.int32)

    def exp(a: np.ndarray) -> Exposure:
        return Exposure(a, mask=mask, variance=var, psf=psf, wcs=wcs, photo_calib=PhotoCalib(31.0))

    return exp(img), exp(sci), exp(np.zeros(SHAPE, np.float32))


@pytest.mark.benchmark(group="dia-detect-measure-full-ccd")
def test_run_dia_detection_apfast(benchmark, ccd):
    diff, sci, tpl = ccd
    run_dia_detection(diff, sci, tpl)  # compile outside the timing
    res = benchmark(run_dia_detection, diff, sci, tpl)
    assert N_SOURCES - 5 <= res.n_sources <= N_SOURCES + N_DIPOLES + 10
    assert res.n_dipole >= N_DIPOLES - 2


@pytest.mark.benchmark(group="dia-detect-measure-full-ccd")
def test_dia_baseline_scipy(benchmark, ccd):
    diff, _, _ = ccd
    img, var = diff.image, diff.variance
    sigma = 2.1

    def run():
        num = ndimage.gaussian_filter(img, sigma, truncate=3.5)
        # variance of the smoothed image: K^2 of a Gaussian is a Gaussian of sigma/sqrt(2) over 4 pi sigma^2
        den = ndimage.gaussian_filter(var, sigma / math.sqrt(2), truncate=3.5 * math.sqrt(2)) / (4 * math.pi * sigma**2)
        snr = num / np.sqrt(den)
        lab, n = ndimage.label(np.abs(snr) > 5.0, structure=np.ones((3, 3)))
        idx = np.arange(1, n + 1)
        return n, ndimage.sum(img, lab, idx), ndimage.center_of_mass(np.abs(img), lab, idx)

    n, _, _ = benchmark(run)
    assert n >= N_SOURCES - 5


@pytest.mark.benchmark(group="forced-photometry-2000")
def test_forced_photometry_apfast(benchmark, ccd):
    _, sci, _ = ccd
    rng = np.random.default_rng(3)
    x = rng.uniform(0, SHAPE[1] - 1, 2000)
    y = rng.uniform(0, SHAPE[0] - 1, 2000)
    forced_photometry(sci, x, y)
    out = benchmark(forced_photometry, sci, x, y)
    assert np.isfinite(out["flux"]).all()


@pytest.mark.benchmark(group="forced-photometry-2000")
def test_forced_photometry_baseline_numpy_200(benchmark, ccd):
    _, sci, _ = ccd
    rng = np.random.default_rng(3)
    x = rng.uniform(20, SHAPE[1] - 20, 200)
    y = rng.uniform(20, SHAPE[0] - 20, 200)
    img, var, psf = sci.image, sci.variance, sci.psf
    h = psf.size // 2

    def run():
        out = np.empty(200)
        for s in range(200):
            p = ndimage.shift(psf.compute_image(x[s], y[s]), (y[s] - round(y[s]), x[s] - round(x[s])), order=3)
            iy, ix = round(y[s]), round(x[s])
            d = img[iy - h : iy + h + 1, ix - h : ix + h + 1]
            w = 1.0 / var[iy - h : iy + h + 1, ix - h : ix + h + 1]
            out[s] = (p * d * w).sum() / (p * p * w).sum()
        return out

    assert np.isfinite(benchmark(run)).all()
