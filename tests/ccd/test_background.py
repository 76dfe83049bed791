"""Background mesh, hole filling and spline interpolation: kernels vs naive references and synthetic skies."""

from __future__ import annotations

import numpy as np
import pytest

from apfast.ccd.background import (
    BackgroundConfig,
    BackgroundModel,
    NoGoodBackgroundPixelsError,
    cell_edges,
    measure_background,
    subtract_background,
)
from apfast.errors import ConfigError, InputError
from apfast.kernels import background as kb
from apfast.masks import bitmask
from naive import bkg_cr as naive

IGNORE = bitmask(BackgroundConfig().ignored_mask_planes)


# ------------------------------------------------------------------------------------------ kernels vs naive
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 101, 1000, 16384])
@pytest.mark.parametrize("statistic", ["MEANCLIP", "MEDIAN"])
def test_clipped_stats_matches_naive(rng, n, statistic):
    x = rng.normal(100.0, 5.0, n).astype(np.float32)
    x[: n // 20] += 500.0  # outliers
    buf = x.copy()
    got = kb.clipped_stats(buf, n, kb.STAT_MEANCLIP if statistic == "MEANCLIP" else kb.STAT_MEDIAN, 3.0, 3)
    want = naive.clipped_stats(x, statistic, 3.0, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert sorted(buf.tolist()) == sorted(x.tolist())  # only reordered


def test_clipped_stats_degenerate(rng):
    buf = np.full(50, 7.0, dtype=np.float32)
    assert kb.clipped_stats(buf, 50, kb.STAT_MEANCLIP, 3.0, 3) == (7.0, 0.0)
    v, s = kb.clipped_stats(np.empty(0, np.float32), 0, kb.STAT_MEANCLIP, 3.0, 3)
    assert np.isnan(v) and np.isnan(s)
    # integer-quantised data with zero IQR falls back to the plain std
    x = np.zeros(100, np.float32)
    x[:3] = 1.0
    got = kb.clipped_stats(x.copy(), 100, kb.STAT_MEANCLIP, 3.0, 3)
    np.testing.assert_allclose(got, naive.clipped_stats(x, "MEANCLIP", 3.0, 3), rtol=1e-6)


@pytest.mark.parametrize("shape,bin_size", [((300, 200), 64), ((130, 70), 32), ((40, 50), 128)])
@pytest.mark.parametrize("statistic", ["MEANCLIP", "MEDIAN"])
def test_mesh_statistics_matches_naive(rng, shape, bin_size, statistic):
    img = rng.normal(50.0, 3.0, shape).astype(np.float32)
    img[rng.random(shape) < 0.01] = np.nan
    img[rng.random(shape) < 0.02] += 1000.0
    mask = np.where(rng.random(shape) < 0.1, bitmask("DETECTED"), 0).astype(np.int32)
    mask[rng.random(shape) < 0.05] |= bitmask("SUSPECT")  # not ignored
    cfg = BackgroundConfig(bin_size=bin_size, statistic=statistic)
    model = measure_background(img, mask, config=cfg)
    vals, stds, counts = naive.mesh(img, mask, IGNORE, bin_size, statistic)
    np.testing.assert_array_equal(model.counts, counts)
    np.testing.assert_allclose(model.values, vals, rtol=2e-6)
    np.testing.assert_allclose(model.stds, stds, rtol=2e-5)
    assert not model.filled.any()


@pytest.mark.parametrize("method", ["AKIMA", "CUBIC", "LINEAR"])
@pytest.mark.parametrize("shape,bin_size", [((512, 384), 64), ((100, 300), 40), ((64, 200), 64), ((50, 50), 64)])
def test_interpolation_matches_scipy(rng, method, shape, bin_size):
    ye, xe = cell_edges(shape[0], bin_size), cell_edges(shape[1], bin_size)
    values = rng.normal(10.0, 2.0, (len(ye) - 1, len(xe) - 1)).astype(np.float32)
    model = BackgroundModel(
        bin_size=bin_size, image_shape=shape, values=values, stds=np.ones_like(values),
        counts=np.ones(values.shape, np.int32), filled=np.zeros(values.shape, bool), interpolation=method,
    )
    got = model.image()
    want = naive.interpolate(values, shape, bin_size, method)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # the model passes through the mesh at the cell centres when those are whole pixels
    yc, xc = model.cell_centres
    iy, ix = np.meshgrid(yc, xc, indexing="ij")
    whole = (iy % 1 == 0) & (ix % 1 == 0)
    if whole.any():
        np.testing.assert_allclose(got[iy[whole].astype(int), ix[whole].astype(int)], values[whole], rtol=1e-6)


def test_fill_mesh_holes_kernel():
    vals = np.arange(20, dtype=np.float32).reshape(4, 5)
    stds = np.ones_like(vals)
    good = np.ones(vals.shape, bool)
    good[0:2, 0:2] = False
    good[3, 4] = False
    filled = np.zeros(vals.shape, bool)
    v = vals.copy()
    assert kb.fill_mesh_holes(v, stds, good, filled) == 15
    np.testing.assert_array_equal(filled, ~good)
    # (3,4) touches (2,3), (2,4), (3,3); (1,1) touches its 5 good neighbours in the first pass
    assert v[3, 4] == pytest.approx(np.mean([vals[2, 3], vals[2, 4], vals[3, 3]]))
    assert v[1, 1] == pytest.approx(np.mean([vals[0, 2], vals[1, 2], vals[2, 0], vals[2, 1], vals[2, 2]]))
    # (0,0) only touches cells filled in the first pass: it is filled in the second from them
    assert v[0, 0] == pytest.approx(np.mean([v[0, 1], v[1, 0], v[1, 1]]))
    assert kb.fill_mesh_holes(v, stds, np.zeros(vals.shape, bool), filled) == 0


# ------------------------------------------------------------------------------------------ synthetic skies
def test_flat_sky_mesh_within_noise(rng):
    sky, sigma, b = 1000.0, 20.0, 128
    img = (sky + rng.normal(0.0, sigma, (1024, 512))).astype(np.float32)
    model = measure_background(img, config=BackgroundConfig(bin_size=b))
    n = model.counts
    assert np.all(n == b * b)
    # clipping at 3 sigma keeps 99.7% of a Gaussian: the clipped mean is unbiased, its error ~ sigma/sqrt(N)
    assert np.all(np.abs(model.values - sky) < 5 * sigma / np.sqrt(n))
    np.testing.assert_allclose(model.stds, sigma, rtol=0.05)
    # between the outer cell centres the spline's noise is that of the mesh; the half-cell extrapolation
    # beyond them amplifies it (the end cubic is steered by the noise of the last three cells)
    resid = model.image() - sky
    h = b // 2
    assert np.abs(resid[h:-h, h:-h]).max() < 6 * sigma / b
    assert np.abs(resid).max() < 15 * sigma / b


def _stars(rng, img, n, sigma_psf=1.5):
    ny, nx = img.shape
    for _ in range(n):
        naive.add_gaussian_star(
            img, rng.uniform(0, nx), rng.uniform(0, ny), 10 ** rng.uniform(2.5, 4.5), sigma_psf
        )


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_smooth_skies_with_stars(rng, kind):
    ny, nx, sigma, b = 1024, 768, 10.0, 128
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    if kind == "linear":
        sky = 1000.0 + 0.2 * x - 0.1 * y
    else:
        sky = 1000.0 + 150.0 * ((x - 300) / nx) ** 2 - 100.0 * ((y - 600) / ny) ** 2 + 40.0 * (x * y) / (nx * ny)
    clean = sky + rng.normal(0.0, sigma, sky.shape)
    # no stars: the model error is the statistical error of the cells, sigma / sqrt(N) = 0.08
    model = measure_background(clean.astype(np.float32), config=BackgroundConfig(bin_size=b))
    resid = model.image() - sky
    h = b // 2
    assert np.abs(resid[h:-h, h:-h]).max() < 6 * sigma / b
    assert np.abs(resid).max() < 15 * sigma / b
    assert resid[h:-h, h:-h].std() < 2 * sigma / b
    # with ~300 stars of 300..30000 counts the clipped means stay within 0.5% of the sky
    img = clean.copy()
    _stars(rng, img, 300)
    model = measure_background(img.astype(np.float32), config=BackgroundConfig(bin_size=b))
    resid = model.image() - sky
    assert np.abs(resid).max() < 0.005 * 1000.0
    assert abs(np.median(resid)) < 3 * sigma / b + 0.2  # star wings bias the clipped mean up slightly


def test_quadratic_reproduced_exactly_without_noise():
    ny, nx, b = 512, 1024, 64
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    sky = 500.0 + 1e-4 * (x - 200) ** 2 + 3e-4 * (y - 100) ** 2 + 0.05 * x
    model = measure_background(sky.astype(np.float32), config=BackgroundConfig(bin_size=b))
    # cell means of a quadratic exceed the centre value by f''/24 * (b^2 - 1) in each axis
    bias = (2e-4 + 6e-4) / 24 * (b * b - 1)
    np.testing.assert_allclose(model.image(), sky + bias, rtol=0, atol=0.01)


@pytest.mark.parametrize("method", ["AKIMA", "CUBIC"])
def test_smooth_model_has_no_kinks(rng, method):
    shape, b = (512, 512), 64
    values = rng.normal(100.0, 5.0, (8, 8)).astype(np.float32)
    kw = dict(bin_size=b, image_shape=shape, values=values, stds=np.ones_like(values),
              counts=np.ones(values.shape, np.int32), filled=np.zeros(values.shape, bool))
    smooth = BackgroundModel(interpolation=method, **kw).image().astype(np.float64)
    linear = BackgroundModel(interpolation="LINEAR", **kw).image().astype(np.float64)
    step = np.abs(np.diff(values, axis=1)).max()
    # a C1 model's second difference is bounded by its curvature ~ step / b^2; a kink gives ~ step / b
    bound = 20 * step / b**2
    assert np.abs(np.diff(smooth, 2, axis=1)).max() < bound
    assert np.abs(np.diff(smooth, 2, axis=0)).max() < bound
    assert np.abs(np.diff(linear, 2, axis=1)).max() > bound  # the test can fail


def test_masked_region_ignored_and_empty_cells_filled(rng):
    sky, sigma, b = 200.0, 5.0, 64
    img = (sky + rng.normal(0.0, sigma, (512, 512))).astype(np.float32)
    mask = np.zeros(img.shape, np.int32)
    img[100:180, 300:420] = 60000.0  # a saturated blob, masked
    mask[100:180, 300:420] = bitmask("SAT")
    img[0:128, 0:128] = np.nan  # a dead corner: four cells without any good pixel
    mask[0:128, 0:128] = bitmask("NO_DATA")
    img_in, mask_in = img.copy(), mask.copy()
    model = measure_background(img, mask, config=BackgroundConfig(bin_size=b))
    np.testing.assert_array_equal(img, img_in)
    np.testing.assert_array_equal(mask, mask_in)
    assert model.filled[:2, :2].all() and model.filled.sum() == 4
    assert np.all(model.counts[:2, :2] == 0)
    full = model.image()
    assert np.all(np.isfinite(full))
    assert np.abs(full - sky).max() < 5 * sigma / np.sqrt(0.2 * b * b)
    # the same pixels unmasked pull the model far off: the mask is what protects it
    bad = measure_background(img, None, config=BackgroundConfig(bin_size=b, statistic="MEDIAN"))
    assert bad.values[2, 5] > sky + 100


def test_sparse_cells_are_filled_not_trusted(rng):
    img = rng.normal(0.0, 1.0, (256, 256)).astype(np.float32)
    mask = np.full(img.shape, bitmask("BAD"), np.int32)
    mask[::64, ::64] = 0  # one good pixel per cell, far below 10% of the cell
    mask[128:, 128:] = 0
    img[mask == 0] += 50.0
    img[128:, 128:] -= 50.0
    model = measure_background(img, mask, config=BackgroundConfig(bin_size=64))
    assert model.filled[:2, :].all() and model.filled[:, :2].all() and not model.filled[2:, 2:].any()
    assert np.all(np.abs(model.values) < 0.5)


def test_all_masked_raises(rng):
    img = rng.normal(0.0, 1.0, (128, 128)).astype(np.float32)
    mask = np.full(img.shape, bitmask("BAD"), np.int32)
    with pytest.raises(NoGoodBackgroundPixelsError, match="min_good_fraction") as exc:
        measure_background(img, mask, config=BackgroundConfig(bin_size=64))
    assert exc.value.metadata["n_good_pixels"] == 0


@pytest.mark.parametrize("dtype", [">f4", "<f8", ">f8", "int16"])
def test_dtypes_and_byte_order(rng, dtype):
    img = (300 + rng.normal(0.0, 5.0, (256, 192))).astype(np.float32)
    if dtype == "int16":
        img = np.round(img)
    ref = measure_background(img, config=BackgroundConfig(bin_size=64))
    other = img.astype(dtype)
    before = other.copy()
    got = measure_background(other, config=BackgroundConfig(bin_size=64))
    np.testing.assert_array_equal(other, before)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-6)
    sub, model = subtract_background(other, None, config=BackgroundConfig(bin_size=64))
    assert sub.dtype == np.float32
    np.testing.assert_allclose(sub, img - model.image(), atol=1e-4)


def test_subtract_background_does_not_mutate(rng):
    img = (10 + rng.normal(0.0, 1.0, (128, 256))).astype(np.float32)
    mask = np.zeros(img.shape, np.int32)
    keep = img.copy()
    sub, model = subtract_background(img, mask, config=BackgroundConfig(bin_size=64))
    np.testing.assert_array_equal(img, keep)
    assert abs(float(sub.mean())) < 0.05
    assert sub is not img


def test_model_round_trip_and_validation(rng):
    img = (10 + rng.normal(0.0, 1.0, (200, 300))).astype(np.float32)
    model = measure_background(img, config=BackgroundConfig(bin_size=64, interpolation="CUBIC"))
    d = model.to_dict()
    again = BackgroundModel.from_dict(d)
    np.testing.assert_array_equal(again.image(), model.image())
    assert again.interpolation == "CUBIC" and again.image_shape == (200, 300)
    with pytest.raises(ValueError):
        model.values[0, 0] = 1.0  # read-only arrays: the frozen model cannot be changed behind its back
    with pytest.raises(InputError, match="needs a mesh of shape"):
        BackgroundModel.from_dict({**d, "values": np.zeros((2, 2))})
    with pytest.raises(InputError, match="finite"):
        BackgroundModel.from_dict({**d, "values": np.full(model.values.shape, np.nan)})
    with pytest.raises(InputError, match="2-D"):
        measure_background(np.zeros(10), config=BackgroundConfig())
    with pytest.raises(InputError, match="mask shape"):
        measure_background(np.zeros((10, 10)), np.zeros((5, 5), np.int32), config=BackgroundConfig())


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"bin_size": 2}, "background.bin_size"),
        ({"n_sigma": 0.0}, "background.n_sigma"),
        ({"n_iter": 0}, "background.n_iter"),
        ({"statistic": "MEAN"}, "background.statistic"),
        ({"interpolation": "SPLINE"}, "background.interpolation"),
        ({"ignored_mask_planes": ("BAD", "NOPE")}, "background.ignored_mask_planes"),
        ({"min_good_fraction": 0.0}, "background.min_good_fraction"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        BackgroundConfig(**kwargs)


def test_cell_edges_take_the_remainder():
    assert cell_edges(4096, 128).tolist() == list(range(0, 4096 + 1, 128))
    e = cell_edges(1000, 128)
    assert e[-1] == 1000 and np.diff(e)[-1] == 1000 - 6 * 128 and len(e) == 8
    assert cell_edges(10, 128).tolist() == [0, 10]


def test_warmup_cases_run():
    for kernel, args in kb._warmup_cases():
        kernel(*args)
