"""Detection and measurement of a full 2048x4096 CCD with ~2000 stars (the DIA target: <= 0.3 s for both).

Baselines in the same groups: scipy ``gaussian_filter`` + ``label`` for detection
(no variance plane, no growing: less work than ours), and a numpy per-source loop
(weighted centroid, PSF fit, one aperture) for measurement, timed on 200 sources.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import ndimage

from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.ccd.measurement import measure_sources
from apfast.psf import GaussianPsf

SHAPE = (4096, 2048)
SIGMA = 1.8
N_STARS = 2000


@pytest.fixture(scope="module")
def ccd():
    """Sky-subtracted CCD: white noise sigma 10 plus 2000 Gaussian stars at S/N 10-500."""
    rng = np.random.default_rng(99)
    img = rng.standard_normal(SHAPE, dtype=np.float32) * 10.0
    xs = rng.uniform(10, SHAPE[1] - 10, N_STARS)
    ys = rng.uniform(10, SHAPE[0] - 10, N_STARS)
    flux = 10.0 * math.sqrt(4 * math.pi) * SIGMA * 10.0 ** rng.uniform(1, np.log10(500), N_STARS)
    r = 10
    d = np.arange(-r, r + 1)
    for x, y, f in zip(xs, ys, flux, strict=True):
        ix, iy = int(x), int(y)
        gx = np.exp(-0.5 * ((d + ix - x) / SIGMA) ** 2)
        gy = np.exp(-0.5 * ((d + iy - y) / SIGMA) ** 2)
        y0, x0 = iy - r, ix - r
        sl = (slice(max(y0, 0), min(iy + r + 1, SHAPE[0])), slice(max(x0, 0), min(ix + r + 1, SHAPE[1])))
        stamp = (f / (2 * np.pi * SIGMA**2)) * np.outer(gy, gx)
        img[sl] += stamp[sl[0].start - y0 : sl[0].stop - y0, sl[1].start - x0 : sl[1].stop - x0].astype(
            np.float32
        )
    var = np.full(SHAPE, 100.0, np.float32)
    mask = np.zeros(SHAPE, np.int32)
    return img, var, mask


@pytest.mark.benchmark(group="detect-full-ccd")
def test_detect_apfast(benchmark, ccd):
    img, var, mask = ccd
    cfg = DetectionConfig(polarity="both")
    detect_sources(img, var, mask, psf_sigma=SIGMA, config=cfg)  # compile outside the timing
    res = benchmark(detect_sources, img, var, mask, psf_sigma=SIGMA, config=cfg)
    assert res.n_footprints >= 0.75 * N_STARS  # grown footprints of close pairs merge (no deblending)


@pytest.mark.benchmark(group="detect-full-ccd")
def test_detect_baseline_scipy(benchmark, ccd):
    img, _var, _ = ccd

    def run():
        sm = ndimage.gaussian_filter(img, SIGMA, truncate=3.5)
        noise = 10.0 / (math.sqrt(4 * math.pi) * SIGMA)
        return ndimage.label(sm > 5 * noise, structure=np.ones((3, 3)))

    _, n = benchmark(run)
    assert n >= 0.9 * N_STARS


@pytest.mark.benchmark(group="measure-full-ccd")
def test_measure_apfast_all_sources(benchmark, ccd):
    img, var, mask = ccd
    det = detect_sources(img, var, mask, psf_sigma=SIGMA)
    psf = GaussianPsf(SIGMA, 23)
    measure_sources(img, var, mask, det, psf=psf, psf_sigma=SIGMA)  # compile
    cat = benchmark(measure_sources, img, var, mask, det, psf=psf, psf_sigma=SIGMA)
    assert len(cat) == det.n_footprints
    assert np.nanmedian(cat["psfFlux"] / cat["gaussianFlux"]) == pytest.approx(1.0, abs=0.05)


@pytest.mark.benchmark(group="measure-full-ccd")
def test_measure_baseline_numpy_loop_200_sources(benchmark, ccd):
    """Per-source numpy: 10 weighted-centroid iterations, PSF fit, one aperture (200 sources only)."""
    img, var, mask = ccd
    det = detect_sources(img, var, mask, psf_sigma=SIGMA)
    stamp = GaussianPsf(SIGMA, 23).compute_image(0, 0)
    h = 11
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    keep = (
        (det.peak_x > h)
        & (det.peak_x < SHAPE[1] - h - 1)
        & (det.peak_y > h)
        & (det.peak_y < SHAPE[0] - h - 1)
    )
    px, py = det.peak_x[keep][:200], det.peak_y[keep][:200]

    def run():
        out = []
        for x, y in zip(px, py, strict=True):
            d = img[y - h : y + h + 1, x - h : x + h + 1].astype(np.float64)
            v = var[y - h : y + h + 1, x - h : x + h + 1].astype(np.float64)
            cx = cy = 0.0
            for _ in range(10):
                w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * SIGMA**2)) * d
                cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
            f = (stamp * d / v).sum() / (stamp**2 / v).sum()
            ap = d[(xx - cx) ** 2 + (yy - cy) ** 2 <= 36].sum()
            out.append((x + cx, y + cy, f, ap))
        return out

    res = benchmark(run)
    assert len(res) == px.size


@pytest.mark.benchmark(group="detect-and-measure-full-ccd")
def test_detect_and_measure_budget(benchmark, ccd):
    img, var, mask = ccd
    cfg = DetectionConfig(polarity="both")
    psf = GaussianPsf(SIGMA, 23)

    def run():
        det = detect_sources(img, var, mask, psf_sigma=SIGMA, config=cfg)
        return measure_sources(img, var, mask, det, psf=psf, psf_sigma=SIGMA)

    run()
    cat = benchmark.pedantic(run, rounds=5, iterations=1)
    assert len(cat) >= 0.75 * N_STARS
    # target 0.3 s on an idle machine; wall time on a shared 2-core box swings 2-3x, so the gate is opt-in
    if benchmark.stats and os.environ.get("APFAST_BENCH_BUDGET") == "1":
        assert benchmark.stats.stats.min < 0.3
