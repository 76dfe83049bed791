"""The fast paths of the DIA stage agree with the straightforward computations they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from apfast.dia.diasource import _median, _scaled_variance, noise_scale_factor
from apfast.exposure import Exposure
from apfast.kernels import dia_noise as kn
from apfast.kernels import forced as kf
from apfast.psf import GaussianPsf

SIGMA = 2.1


def naive_noise_scale_factor(image, variance, mask, psf_sigma, *, tile=256, n_tiles=24):
    """The SciPy float64 computation the kernel replaces (same tiles, filters, cuts, MAD)."""
    ny, nx = image.shape
    t = min(tile, ny, nx)
    n_side = max(1, round(math.sqrt(n_tiles * nx / max(ny, 1))))
    xs = np.linspace(0, nx - t, n_side).astype(int)
    ys = np.linspace(0, ny - t, max(1, n_tiles // n_side)).astype(int)
    edge = math.ceil(4 * psf_sigma)
    z = []
    for yy in ys:
        for xx in xs:
            sl = (slice(yy, yy + t), slice(xx, xx + t))
            bad = (mask[sl] != 0) | ~np.isfinite(image[sl]) | ~np.isfinite(variance[sl])
            im = np.where(bad, 0.0, image[sl].astype(np.float64))
            va = np.where(bad, 0.0, variance[sl].astype(np.float64))
            sm = gaussian_filter(im, psf_sigma, mode="constant", truncate=4.0)
            sv = gaussian_filter(va, psf_sigma / math.sqrt(2.0), mode="constant", truncate=4.0)
            sv /= 4.0 * math.pi * psf_sigma**2
            near_bad = (
                gaussian_filter(bad.astype(np.float32), psf_sigma, mode="constant", truncate=4.0) > 1e-3
            )
            good = ~near_bad & (sv > 0)
            good[:edge] = good[-edge:] = False
            good[:, :edge] = good[:, -edge:] = False
            z.append(sm[good] / np.sqrt(sv[good]))
    zz = np.concatenate(z)
    if zz.size < 1000:
        return 1.0
    med = float(np.median(zz))
    return float(1.4826 * np.median(np.abs(zz - med)))


def _scene(rng, shape=(700, 500)):
    """Noise following a slowly varying variance plane, masked blobs over bright pixels, a few NaNs."""
    var = np.broadcast_to(9.0 * (1.0 + 0.2 * np.linspace(0, 1, shape[1]))[None, :], shape).astype(np.float32)
    img = (rng.normal(0.0, 1.0, shape) * np.sqrt(var)).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    for _ in range(15):
        y, x = rng.integers(20, shape[0] - 20), rng.integers(20, shape[1] - 20)
        mask[y - 3 : y + 4, x - 2 : x + 3] |= 32
        img[y, x] += 500.0
    img[rng.integers(0, shape[0], 20), rng.integers(0, shape[1], 20)] = np.nan
    return img, var, mask


@pytest.mark.parametrize("psf_sigma", [1.3, SIGMA, 3.37])
def test_noise_scale_factor_matches_scipy_reference(rng: np.random.Generator, psf_sigma: float) -> None:
    img, var, mask = _scene(rng)
    fast = noise_scale_factor(img, var, mask, psf_sigma, tile=128, n_tiles=12)
    slow = naive_noise_scale_factor(img, var, mask, psf_sigma, tile=128, n_tiles=12)
    # float32 sums vs float64: ~1e-7 per sample; the median moves by at most that much
    assert fast == pytest.approx(slow, rel=2e-5)


def test_noise_scale_factor_recovers_known_noise(rng: np.random.Generator) -> None:
    shape = (1024, 600)
    img = rng.normal(0.0, 2.0, shape).astype(np.float32)
    var = np.full(shape, 4.0, np.float32)
    mask = np.zeros(shape, np.int32)
    # MAD of ~N correlated samples: effective independent count N / (4 pi sigma^2 * 2); 5 sigma of that
    t, nt = 256, 24
    n_eff = nt * (t - 2 * math.ceil(4 * SIGMA)) ** 2 / (8 * math.pi * SIGMA**2)
    tol = 5 * 1.17 / math.sqrt(n_eff)
    assert noise_scale_factor(img, var, mask, SIGMA, tile=t, n_tiles=nt) == pytest.approx(1.0, rel=tol)
    assert noise_scale_factor(img, var / 1.5**2, mask, SIGMA, tile=t, n_tiles=nt) == pytest.approx(
        1.5, rel=tol
    )


def test_noise_scale_factor_too_few_pixels_is_one() -> None:
    img = np.zeros((22, 22), np.float32)  # 24 (repeated) tiles of 4x4 inner pixels: < 1000 samples
    assert noise_scale_factor(img, np.ones_like(img), np.zeros((22, 22), np.int32), SIGMA) == 1.0


@pytest.mark.parametrize("n", [1, 2, 1001, 40000, 40001])
def test_median_is_exact(rng: np.random.Generator, n: int) -> None:
    z = rng.standard_t(3, n).astype(np.float32)
    assert _median(z, None) == pytest.approx(float(np.median(z.astype(np.float64))), abs=0, rel=1e-12)
    c = 0.3
    assert _median(z, c) == pytest.approx(
        float(np.median(np.abs(z.astype(np.float64) - c))), abs=0, rel=1e-12
    )


def test_median_falls_back_outside_histogram_range(rng: np.random.Generator) -> None:
    z = (100.0 + np.abs(rng.normal(0.0, 1.0, 5001)) * 1e4).astype(np.float32)  # all beyond the range
    out = np.zeros(2)
    assert not kn.select_ranks(z, 0.0, False, 2500, 2500, -64.0, 64.0, 1 << 10, out)
    assert _median(z, None) == float(np.median(z.astype(np.float64)))
    assert _median(z, 5.0) == pytest.approx(float(np.median(np.abs(z.astype(np.float64) - 5.0))), rel=1e-12)
    bad = z.copy()
    bad[3] = np.nan
    assert not kn.select_ranks(bad, 0.0, False, 2500, 2500, -1e6, 1e6, 1 << 10, out)


def test_scaled_variance_is_bit_identical_to_numpy(rng: np.random.Generator) -> None:
    var = rng.uniform(1.0, 50.0, (64, 80)).astype(np.float32)
    tpl = rng.normal(100.0, 300.0, (64, 80)).astype(np.float32)
    tpl[0, :5] = [np.nan, np.inf, -np.inf, -0.0, 3e38]
    scale, frac = 1.0873, 0.02
    ref_t = np.maximum(np.nan_to_num(tpl, nan=0.0), 0.0)
    ref_t *= np.float32(frac)
    with np.errstate(over="ignore"):
        ref_t *= ref_t
        ref = var * np.float32(scale**2) + ref_t
    got = _scaled_variance(var, scale, Exposure(tpl), frac)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert _scaled_variance(var, 1.0, None, frac) is var
    np.testing.assert_array_equal(
        _scaled_variance(var, scale, Exposure(tpl), 0.0), var * np.float32(scale**2)
    )


def test_serial_forced_kernel_equals_parallel(rng: np.random.Generator) -> None:
    ny, nx = 120, 140
    img = rng.normal(0.0, 1.0, (ny, nx)).astype(np.float32)
    var = np.ones((ny, nx), np.float32)
    mask = np.zeros((ny, nx), np.int32)
    mask[50:53, 60:62] = 1
    basis = np.array(GaussianPsf(2.0, 15).compute_image(0.0, 0.0), dtype=np.float64)[None]
    n = 40
    x = rng.uniform(-5, nx + 5, n)
    y = rng.uniform(-5, ny + 5, n)
    outs = []
    for kernel in (kf.forced_psf_flux, kf.forced_psf_flux_serial):
        o = [np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, np.int32), np.zeros(n, np.int32)]
        kernel(img, var, mask, basis, np.ones((n, 1)), False, x, y, 1, *o)
        outs.append(o)
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (outs[0][4] & kf.FLAG_EDGE).any()  # some stamps hang off the image
