"""PSF determination on synthetic images with a spatially varying PSF: star selection and FWHM accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apfast.ccd.psf_determiner import NoPsfStarsError, PsfDeterminerConfig, determine_psf, halfmax_fwhm
from apfast.kernels.stamps import extract_stamps_lanczos3

SHAPE = (1024, 512)


def _sigma(x: float, y: float) -> tuple[float, float]:
    """True PSF (Gaussian, elliptical) varying ~8% corner to corner."""
    xn, yn = (x - SHAPE[1] / 2) / (SHAPE[1] / 2), (y - SHAPE[0] / 2) / (SHAPE[0] / 2)
    sx = 1.8 * (1 + 0.04 * xn + 0.03 * yn * yn)
    sy = 1.9 * (1 + 0.02 * xn * yn - 0.04 * yn)
    return sx, sy


def _render(rng: np.random.Generator, n_stars: int = 250, n_gal: int = 60, sky_sigma: float = 10.0):
    img = rng.normal(0, sky_sigma, SHAPE).astype(np.float64)
    xs = rng.uniform(20, SHAPE[1] - 20, n_stars)
    ys = rng.uniform(20, SHAPE[0] - 20, n_stars)
    flux = 10 ** rng.uniform(3.5, 5.5, n_stars)
    yy, xx = np.mgrid[-15:16, -15:16]
    for x, y, f in zip(xs, ys, flux, strict=True):
        sx, sy = _sigma(x, y)
        ix, iy = int(round(x)), int(round(y))
        dx, dy = xx + ix - x, yy + iy - y
        stamp = f * np.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2)) / (2 * math.pi * sx * sy)
        y0, x0 = iy - 15, ix - 15
        ys0, xs0 = max(y0, 0), max(x0, 0)
        ys1, xs1 = min(y0 + 31, SHAPE[0]), min(x0 + 31, SHAPE[1])
        img[ys0:ys1, xs0:xs1] += stamp[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]
    gx = rng.uniform(20, SHAPE[1] - 20, n_gal)
    gy = rng.uniform(20, SHAPE[0] - 20, n_gal)
    gf = 10 ** rng.uniform(4, 5, n_gal)
    for x, y, f in zip(gx, gy, gf, strict=True):
        s = 4.0
        ix, iy = int(round(x)), int(round(y))
        dx, dy = xx + ix - x, yy + iy - y
        stamp = f * np.exp(-0.5 * (dx**2 + dy**2) / s**2) / (2 * math.pi * s * s)
        y0, x0 = iy - 15, ix - 15
        ys0, xs0 = max(y0, 0), max(x0, 0)
        ys1, xs1 = min(y0 + 31, SHAPE[0]), min(x0 + 31, SHAPE[1])
        img[ys0:ys1, xs0:xs1] += stamp[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]
    # catalogue as measurement would give it: centroids with small noise, sizes, S/N
    x = np.concatenate([xs, gx]) + rng.normal(0, 0.01, n_stars + n_gal)
    y = np.concatenate([ys, gy]) + rng.normal(0, 0.01, n_stars + n_gal)
    f = np.concatenate([flux, gf])
    size = np.concatenate([[math.sqrt(0.5 * (a * a + b * b))
                            for a, b in (_sigma(u, v) for u, v in zip(xs, ys, strict=True))],
                           np.full(n_gal, 4.0)]) + rng.normal(0, 0.02, n_stars + n_gal)
    snr = f / (sky_sigma * 2 * math.sqrt(math.pi) * size)
    var = np.full(SHAPE, sky_sigma**2) + np.clip(img, 0, None)
    return img.astype(np.float32), var.astype(np.float32), x, y, f, snr, size, n_stars


def test_psf_fwhm_centre_and_corners(rng: np.random.Generator) -> None:
    img, var, x, y, f, snr, size, n_stars = _render(rng)
    bad = np.zeros(SHAPE, np.uint8)
    cfg = PsfDeterminerConfig(cell_size=128)  # a 512x1024 test image: 32 cells of 3 stars
    res = determine_psf(img, var, bad, x, y, f, snr, size, np.ones(len(x), bool), config=cfg)
    assert res.n_stars >= 30
    assert np.all(res.star_index < n_stars)  # no galaxy became a PSF star
    for px, py in [(256, 512), (40, 40), (470, 40), (40, 980), (470, 980)]:
        sx, sy = _sigma(px, py)
        true = 2.3548 * math.sqrt(sx * sy)
        got = halfmax_fwhm(res.psf.compute_image(px, py))
        assert got == pytest.approx(true, rel=0.03), (px, py, got, true)


def test_halfmax_fwhm_gaussian() -> None:
    yy, xx = np.mgrid[-12:13, -12:13]
    for s in (1.2, 1.7, 2.5, 4.0):
        g = np.exp(-0.5 * (xx**2 + yy**2) / s**2)
        assert halfmax_fwhm(g) == pytest.approx(2.3548 * s, rel=0.01)


def test_lanczos_stamps_centre_and_preserve_flux(rng: np.random.Generator) -> None:
    img = np.zeros((64, 64), np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    x0, y0, s = 30.37, 31.81, 2.0
    img[:] = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / s**2)
    out = np.empty((1, 15, 15), np.float32)
    flags = np.empty(1, np.int32)
    extract_stamps_lanczos3(img, np.zeros((64, 64), np.uint8), np.array([x0]), np.array([y0]), 7, out, flags)
    assert flags[0] == 0
    sy, sx = np.mgrid[-7:8, -7:8]
    expect = np.exp(-0.5 * (sx**2 + sy**2) / s**2)
    # Lanczos-3 is not exact on a sampled Gaussian of sigma 2: ~0.35% of the peak, ~0.02 px of centroid
    assert np.max(np.abs(out[0] - expect)) < 5e-3
    assert abs((out[0] * sx).sum() / out[0].sum()) < 0.03
    # off the edge and touching a bad pixel are flagged
    bad = np.zeros((64, 64), np.uint8)
    bad[32, 30] = 1
    extract_stamps_lanczos3(img, bad, np.array([x0]), np.array([y0]), 7, out, flags)
    assert flags[0] == 2
    extract_stamps_lanczos3(img, bad, np.array([3.0]), np.array([y0]), 7, out, flags)
    assert flags[0] == 1


@pytest.mark.parametrize("shape", [(60, 441), (500, 121)])
def test_principal_axes_match_svd(rng: np.random.Generator, shape: tuple[int, int]) -> None:
    """The PCA axes come from the smaller Gram matrix: the same as numpy's SVD up to sign, either orientation."""
    from apfast.ccd.psf_determiner import _principal_axes

    m, p = shape
    # PSF-like residual stamps: a few strong components plus noise, singular values well separated
    comps = rng.standard_normal((4, p))
    a = (rng.standard_normal((m, 4)) * [8.0, 4.0, 2.0, 1.0]) @ comps + 0.05 * rng.standard_normal((m, p))
    got = _principal_axes(a, 4)
    want = np.linalg.svd(a, full_matrices=False)[2][:4]
    assert got.shape == (4, p)
    np.testing.assert_allclose(np.abs(np.sum(got * want, axis=1)), 1.0, atol=1e-9)
    # rank-deficient: identical stamps leave no residual direction; zero rows, never NaN
    flat = np.tile(rng.standard_normal(p), (m, 1))
    axes = _principal_axes(flat - flat.mean(0), 3)
    assert np.isfinite(axes).all()


def test_no_stars_message(rng: np.random.Generator) -> None:
    img, var, x, y, f, snr, size, _ = _render(rng, n_stars=3, n_gal=5)
    with pytest.raises(NoPsfStarsError, match="characterize.psf"):
        determine_psf(img, var, np.zeros(SHAPE, np.uint8), x, y, f, snr, size, np.ones(len(x), bool))


def test_config_validation() -> None:
    from apfast.errors import ConfigError

    with pytest.raises(ConfigError, match="characterize.psf.kernel_size_min"):
        PsfDeterminerConfig(kernel_size_min=24)
