"""Detection: kernels vs naive references, completeness, false positives, polarity, dipoles, mask bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from apfast.ccd.detection import DetectionConfig, detect_sources, gaussian_kernel_1d
from apfast.errors import ConfigError, InputError
from apfast.kernels import detect as kd
from apfast.masks import bitmask
from naive import detect as naive

SIGMA = 1.8


def gaussian_stars(shape, xs, ys, fluxes, sigma=SIGMA):
    """Point-sampled normalised Gaussians (float64)."""
    img = np.zeros(shape)
    r = int(math.ceil(6 * sigma))
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = int(round(x)), int(round(y))
        y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, shape[0]), max(ix - r, 0), min(ix + r + 1, shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += (
            f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        )
    return img


def flux_for_snr(snr, noise, sigma=SIGMA):
    """Flux of a Gaussian star whose matched-filter S/N is ``snr`` in white noise ``noise``."""
    return snr * noise * math.sqrt(4 * math.pi) * sigma


def kaiser_count(area, nu, sigma):
    """Expected number of >= nu excursions of white noise smoothed by a Gaussian (DMTN-006, Euler char.)."""
    return area * nu * math.exp(-nu * nu / 2) / (2**2.5 * math.pi**1.5 * sigma**2)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_label_matches_scipy_exactly(rng, density):
    for _ in range(20):
        shape = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        b = (rng.random(shape) < density).astype(np.uint8)
        lab = np.empty(shape, np.int32)
        n = kd.label_components(b, lab)
        ref, nref = ndimage.label(b, structure=np.ones((3, 3)))
        assert n == nref
        np.testing.assert_array_equal(lab, ref)


def test_label_keeps_different_codes_apart(rng):
    codes = rng.integers(0, 3, (60, 50)).astype(np.uint8)
    lab = np.empty(codes.shape, np.int32)
    n = kd.label_components(codes, lab)
    ref, nref = naive.label(codes)
    assert n == nref
    np.testing.assert_array_equal(lab, ref)
    # a 1 next to a 2 is two components
    c = np.array([[1, 2]], np.uint8)
    lab = np.empty(c.shape, np.int32)
    assert kd.label_components(c, lab) == 2


@pytest.mark.parametrize("radius", [0.0, 1.0, 2.5, 4.32, 6.0])
def test_dilate_disk_matches_scipy(rng, radius):
    codes = (rng.random((50, 61)) < 0.01).astype(np.uint8) * 2
    out = np.zeros_like(codes)
    kd.dilate_disk(codes, 2, radius, 4, out)
    np.testing.assert_array_equal(out == 4, naive.dilate_disk(codes == 2, radius))


def test_smoothing_matches_naive_with_masked_pixels(rng):
    img = rng.normal(0, 3, (40, 57)).astype(np.float32)
    var = rng.uniform(1, 4, img.shape).astype(np.float32)
    good = (rng.random(img.shape) > 0.1).astype(np.uint8)
    k1 = gaussian_kernel_1d(1.5)
    num, den = np.empty_like(img), np.empty_like(img)
    kd.smooth_separable(img, var, good, k1, k1 * k1, num, den, np.empty_like(img), np.empty_like(img), True)
    rn, rd = naive.smooth(img, var, good.astype(bool), k1)
    np.testing.assert_allclose(num, rn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(den, rd, rtol=1e-5, atol=1e-7)


def test_all_snr10_stars_found_and_positions_right(rng):
    shape = (400, 400)
    noise = 2.0
    g = np.arange(20, 400, 40, dtype=float)
    ys, xs = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g, indexing="ij"))
    flux = flux_for_snr(10.0, noise)
    img = gaussian_stars(shape, xs, ys, np.full(xs.size, flux)) + rng.normal(0, noise, shape)
    res = detect_sources(img, np.full(shape, noise**2), np.zeros(shape, np.int32), psf_sigma=SIGMA)
    assert res.n_footprints == xs.size
    # every star is inside exactly one footprint, at its peak
    labs = res.labels[np.round(ys).astype(int), np.round(xs).astype(int)]
    assert np.unique(labs).size == xs.size and labs.min() > 0
    order = labs - 1
    assert np.all(np.abs(res.peak_x[order] - xs) <= 1.5) and np.all(np.abs(res.peak_y[order] - ys) <= 1.5)
    # the smoothed S/N at the peak is the injected 10 within the noise (+ the max-of-pixels bias)
    assert abs(np.median(res.peak_snr) - 10.0) < 1.0
    assert res.has_positive.all() and not res.has_negative.any()


def test_false_positives_follow_gaussian_expectation(rng):
    shape = (1024, 1024)
    img = rng.normal(0, 1, shape).astype(np.float32)
    cfg = DetectionConfig(threshold=3.5, n_sigma_to_grow=0.0)
    res = detect_sources(
        img, np.ones(shape, np.float32), np.zeros(shape, np.int32), psf_sigma=SIGMA, config=cfg
    )
    expected = kaiser_count(img.size, 3.5, SIGMA)
    assert abs(res.n_footprints - expected) < 4 * math.sqrt(expected) + 0.1 * expected


def test_false_positives_full_ccd_at_5_sigma(rng):
    shape = (4096, 2048)
    img = rng.standard_normal(shape, dtype=np.float32)
    res = detect_sources(img, np.ones(shape, np.float32), np.zeros(shape, np.int32), psf_sigma=SIGMA,
                         config=DetectionConfig(polarity="both"))  # fmt: skip
    expected = 2 * kaiser_count(img.size, 5.0, SIGMA)  # ~3: both signs
    assert res.n_footprints <= 12  # Poisson(3.1) exceeds 12 with probability < 1e-4
    assert expected > 2.5


def test_stdev_threshold_type_agrees_with_variance_on_white_noise(rng):
    shape = (512, 512)
    img = rng.normal(0, 2.0, shape)
    img += gaussian_stars(shape, [100.0, 300.0], [200.0, 400.0], [flux_for_snr(20, 2.0)] * 2)
    args = (img, np.full(shape, 4.0), np.zeros(shape, np.int32))
    a = detect_sources(*args, psf_sigma=SIGMA, config=DetectionConfig(threshold_type="stdev"))
    b = detect_sources(*args, psf_sigma=SIGMA, config=DetectionConfig(threshold_type="variance"))
    # the smoothed-noise stdev is sigma * sqrt(sum K^2) = 2 / (sqrt(4 pi) * 1.8)
    assert a.noise == pytest.approx(2.0 / (math.sqrt(4 * math.pi) * SIGMA), rel=0.05)
    assert a.n_footprints == b.n_footprints == 2


def test_negative_sources_need_negative_polarity(rng):
    shape = (200, 200)
    img = rng.normal(0, 1, shape) - gaussian_stars(
        shape, [50.0, 150.0], [60.0, 140.0], [flux_for_snr(15, 1)] * 2
    )
    var, mask = np.ones(shape), np.zeros(shape, np.int32)
    pos = detect_sources(img, var, mask, psf_sigma=SIGMA)
    assert pos.n_footprints == 0
    both = detect_sources(img, var, mask, psf_sigma=SIGMA, config=DetectionConfig(polarity="both"))
    assert both.n_footprints == 2
    assert both.has_negative.all() and not both.has_positive.any()
    assert np.all(both.peak_snr < -5)
    det, neg = bitmask("DETECTED"), bitmask("DETECTED_NEGATIVE")
    assert not np.any(both.mask & det)
    np.testing.assert_array_equal((both.mask & neg) != 0, both.labels > 0)


def test_dipole_is_one_footprint_with_both_polarities(rng):
    shape = (120, 120)
    f = flux_for_snr(20, 1.0)
    img = gaussian_stars(shape, [58.5], [60.0], [f]) - gaussian_stars(shape, [61.5], [60.0], [f])
    img += rng.normal(0, 1, shape)
    res = detect_sources(img, np.ones(shape), np.zeros(shape, np.int32), psf_sigma=SIGMA,
                         config=DetectionConfig(polarity="both"))  # fmt: skip
    assert res.n_footprints == 1
    assert res.has_positive[0] and res.has_negative[0]
    assert res.pos_peak_x[0] < res.neg_peak_x[0]
    assert res.pos_peak_snr[0] > 5 and res.neg_peak_snr[0] < -5
    m = res.mask[res.labels == 1]
    assert np.any(m & bitmask("DETECTED")) and np.any(m & bitmask("DETECTED_NEGATIVE"))


def test_detected_bits_cover_grown_footprints_and_input_untouched(rng):
    shape = (150, 160)
    img = (
        rng.normal(0, 1, shape) + gaussian_stars(shape, [40.2, 100.7], [50.1, 90.3], [300.0, 800.0])
    ).astype(">f4")
    mask = np.zeros(shape, np.int32)
    mask[0, 0] = bitmask("DETECTED") | bitmask("CR")  # stale DETECTED bit is cleared, CR kept
    img_copy, mask_copy = img.copy(), mask.copy()
    res = detect_sources(img, np.ones(shape, ">f4"), mask, psf_sigma=SIGMA)
    np.testing.assert_array_equal(img, img_copy)
    np.testing.assert_array_equal(mask, mask_copy)
    assert res.n_footprints == 2
    np.testing.assert_array_equal((res.mask & bitmask("DETECTED")) != 0, res.labels > 0)
    assert res.mask[0, 0] == bitmask("CR")
    # footprints were grown by 2.4 sigma: larger than the raw above-threshold area
    raw = detect_sources(
        img, np.ones(shape), mask, psf_sigma=SIGMA, config=DetectionConfig(n_sigma_to_grow=0)
    )
    assert np.all(res.npix > raw.npix)
    assert res.grow_radius == pytest.approx(2.4 * SIGMA)


def test_include_threshold_multiplier_and_min_pixels(rng):
    shape = (200, 200)
    img = rng.normal(0, 1, shape) + gaussian_stars(
        shape, [50.0, 150.0], [100.0, 100.0], [flux_for_snr(12, 1), flux_for_snr(200, 1)]
    )
    var, mask = np.ones(shape), np.zeros(shape, np.int32)
    res = detect_sources(
        img, var, mask, psf_sigma=SIGMA, config=DetectionConfig(include_threshold_multiplier=10)
    )
    assert res.n_footprints == 1 and abs(res.peak_x[0] - 150) <= 1
    res = detect_sources(img, var, mask, psf_sigma=SIGMA, config=DetectionConfig(min_pixels=10_000))
    assert res.n_footprints == 0


def test_bad_pixels_are_ignored(rng):
    shape = (100, 100)
    img = rng.normal(0, 1, shape)
    img[30:33, 40:43] = 1e6
    img[70, 70] = np.nan
    mask = np.zeros(shape, np.int32)
    mask[30:33, 40:43] = bitmask("BAD")
    res = detect_sources(img, np.ones(shape), mask, psf_sigma=SIGMA)
    assert res.n_footprints == 0
    assert np.all(np.isfinite(res.significance))


def test_no_smoothing_thresholds_pixels(rng):
    img = np.zeros((20, 20))
    img[5, 5] = 6.0
    img[10, 12] = -7.0
    res = detect_sources(img, np.ones_like(img), np.zeros(img.shape, np.int32), psf_sigma=1.0,
                         config=DetectionConfig(smooth=False, polarity="both", n_sigma_to_grow=0,
                                                grow_merge=0))  # fmt: skip
    assert res.n_footprints == 2
    np.testing.assert_array_equal(res.npix, [1, 1])
    np.testing.assert_allclose(res.peak_snr, [6.0, -7.0])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"threshold": -1}, "threshold"),
        ({"threshold_type": "pixel_stdev"}, "threshold_type"),
        ({"polarity": "up"}, "polarity"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"include_threshold_multiplier": 0.5}, "include_threshold_multiplier"),
        ({"grow_merge": -1}, "grow_merge"),
        ({"bad_mask_planes": ("BAD", "NOPE")}, "bad_mask_planes"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"detection.{key}"):
        DetectionConfig(**kwargs)


def test_input_errors():
    img = np.zeros((10, 10))
    with pytest.raises(InputError, match="shape"):
        detect_sources(img, np.ones((10, 11)), np.zeros((10, 10), np.int32), psf_sigma=1.0)
    with pytest.raises(InputError, match="psf_sigma"):
        detect_sources(img, np.ones_like(img), np.zeros((10, 10), np.int32), psf_sigma=0.0)
    with pytest.raises(InputError, match="no usable pixel"):
        detect_sources(img, np.zeros_like(img), np.zeros((10, 10), np.int32), psf_sigma=1.0)
    with pytest.raises(InputError, match="integer mask"):
        detect_sources(img, np.ones_like(img), np.zeros((10, 10)), psf_sigma=1.0)


def test_warmup_cases_run():
    for kernel, args in kd._warmup_cases():
        kernel(*args)
