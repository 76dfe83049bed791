"""Background (mesh + full-resolution model) and cosmic-ray repair on a full 2048x4096 DECam CCD, steady state.

Budgets (issue): about 0.15 s for the background and 0.2 s for cosmic rays per CCD on 2 threads.
Baselines in the same groups: numpy reshape + median mesh with scipy RectBivariateSpline evaluation, and a
scipy.ndimage Laplacian + median-filter cosmic-ray detector (LA Cosmic-like, one pass).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import interpolate, ndimage

from apfast.ccd.background import BackgroundConfig, measure_background
from apfast.ccd.cosmicray import CosmicRayConfig, find_cosmic_rays

SHAPE = (4096, 2048)
SKY = 1000.0


@pytest.fixture(scope="module")
def ccd() -> tuple[np.ndarray, np.ndarray]:
    """Sky gradient + 2000 Gaussian stars + 1500 sharp cosmic rays + noise (float32 image and variance)."""
    rng = np.random.default_rng(2024)
    ny, nx = SHAPE
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    img = SKY + 0.02 * x + 0.01 * y
    for _ in range(2000):
        xc, yc = rng.uniform(10, nx - 10), rng.uniform(10, ny - 10)
        s = rng.uniform(1.06, 2.1)
        f = 10 ** rng.uniform(3, 6)
        i0, j0 = int(yc) - 10, int(xc) - 10
        yy, xx = np.mgrid[i0 : i0 + 21, j0 : j0 + 21]
        img[i0 : i0 + 21, j0 : j0 + 21] += (f / (2 * np.pi * s * s)
                                            * np.exp(-((xx - xc) ** 2 + (yy - yc) ** 2) / (2 * s * s)))
    for _ in range(1500):
        i, j = int(rng.uniform(5, ny - 25)), int(rng.uniform(5, nx - 25))
        amp = 10 ** rng.uniform(2.7, 3.8)
        length = int(rng.integers(1, 20))
        if rng.random() < 0.5:
            img[i, j : j + length] += amp
        else:
            idx = np.arange(length)
            img[i + idx, j + idx] += amp
    img = img + rng.normal(0.0, 1.0, SHAPE).astype(np.float32) * np.sqrt(np.maximum(img, 0) + 25.0)
    var = np.maximum(img, 0) + 25.0
    return img.astype(np.float32), var.astype(np.float32)


@pytest.mark.benchmark(group="background-2048x4096")
def test_apfast_background(benchmark, ccd):
    img, _ = ccd
    cfg = BackgroundConfig()
    measure_background(img, config=cfg).image()  # compile outside the timing

    def run():
        return measure_background(img, config=cfg).image()

    model = benchmark(run)
    assert model.shape == SHAPE  # budget 0.15 s: compared by hand, the shared CI machine is too noisy to gate on


@pytest.mark.benchmark(group="background-2048x4096")
def test_baseline_numpy_median_rectbivariatespline(benchmark, ccd):
    img, _ = ccd

    def run():
        b = 128
        cells = img.reshape(SHAPE[0] // b, b, SHAPE[1] // b, b).transpose(0, 2, 1, 3).reshape(
            SHAPE[0] // b, SHAPE[1] // b, -1
        )
        mesh = np.median(cells, axis=2)
        yc = np.arange(mesh.shape[0]) * b + (b - 1) / 2
        xc = np.arange(mesh.shape[1]) * b + (b - 1) / 2
        spl = interpolate.RectBivariateSpline(yc, xc, mesh, kx=3, ky=3)
        return spl(np.arange(SHAPE[0]), np.arange(SHAPE[1])).astype(np.float32)

    out = benchmark(run)
    assert out.shape == SHAPE


try:  # photutils is optional
    import photutils.background as _pb
except ImportError:  # pragma: no cover - depends on the environment
    _pb = None


@pytest.mark.skipif(_pb is None, reason="photutils not installed")
@pytest.mark.benchmark(group="background-2048x4096")
def test_baseline_photutils_background2d(benchmark, ccd):  # pragma: no cover - optional
    img, _ = ccd
    out = benchmark(lambda: _pb.Background2D(img, (128, 128), filter_size=(1, 1)).background)
    assert out.shape == SHAPE


@pytest.mark.benchmark(group="cosmicray-2048x4096")
def test_apfast_cosmic_rays(benchmark, ccd):
    img, var = ccd
    cfg = CosmicRayConfig()
    find_cosmic_rays(img[:256, :256], var[:256, :256], None, psf_sigma=1.06, background=SKY, config=cfg)

    def run():
        return find_cosmic_rays(img, var, None, psf_sigma=1.06, background=SKY, config=cfg)

    res = benchmark(run)
    assert res.n_cr > 1000  # budget 0.2 s: compared by hand, the shared CI machine is too noisy to gate on


@pytest.mark.benchmark(group="cosmicray-2048x4096")
def test_baseline_ndimage_laplacian(benchmark, ccd):
    img, var = ccd

    def run():
        lap = ndimage.convolve(img, np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32) / 4)
        fine = ndimage.median_filter(img, size=3) - ndimage.median_filter(img, size=7)
        sig = np.sqrt(var)
        cand = (lap > 5 * sig) & (lap / np.maximum(fine, 0.1 * sig) > 2.0)
        return ndimage.binary_dilation(cand)

    mask = benchmark(run)
    assert mask.sum() > 1000
