"""Coadds: statistics against a known scene, clipping, NO_DATA, zero-point scaling, PSF, combine kernel."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from apfast import masks
from apfast.diffim.coadd import CoaddConfig, make_coadd, psf_from_grid
from apfast.diffim.skymap import make_skymap
from apfast.diffim.warp import WarpedPsf
from apfast.errors import ConfigError, InputError, NoWorkFound
from apfast.exposure import Exposure, PhotoCalib, VisitInfo
from apfast.kernels.coadd import combine_clipped
from apfast.psf import GaussianPsf
from synth import tract_offset_wcs

SCALE = 0.2636
NODATA = masks.bitmask("NO_DATA")
SKYMAP = make_skymap([(150.0, 2.0)], pixel_scale=SCALE, tract_size=700, patch_size=300, overlap=20)
PATCH = "1,1"  # outer box 280..620 on both axes


def input_wcs(dx: float, dy: float, shape: tuple[int, int], rot: float = 0.0) -> WCS:
    """The tract's TAN projection, shifted so input pixel (0,0) is at tract pixel (x0+dx, y0+dy) and rotated."""
    return tract_offset_wcs(SKYMAP.tract_wcs(0), dx, dy, rot)


def stars_sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ra, dec, flux nJy) of stars spread over the patch."""
    tw = SKYMAP.tract_wcs(0)
    x = rng.uniform(300, 600, n)
    y = rng.uniform(300, 600, n)
    ra, dec = tw.all_pix2world(x, y, 0)
    return ra, dec, rng.uniform(2e4, 2e5, n)


def render(wcs: WCS, shape: tuple[int, int], stars, sigma: float, njy_per_count: float) -> np.ndarray:
    """Point-sampled Gaussian stars (counts) at the positions ``wcs`` gives them."""
    ra, dec, flux = stars
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.zeros(shape)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        img += fi / njy_per_count / (2 * np.pi * sigma**2) * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * sigma**2))
    return img


def make_input(rng, stars, *, dx, dy, shape=(360, 360), rot=0.0, zp=30.0, noise=4.0, sigma=2.0, visit=1):
    w = input_wcs(dx, dy, shape, rot)
    pc = PhotoCalib(zp)
    truth = render(w, shape, stars, sigma, pc.njy_per_instflux)
    img = truth + rng.normal(0.0, noise, shape)
    return Exposure(
        img.astype(np.float32), np.zeros(shape, np.int32), np.full(shape, noise**2, np.float32), wcs=w,
        psf=GaussianPsf(sigma, 25), photo_calib=pc, visit_info=VisitInfo(visit=visit, ccdnum=5, filter="r"),
    )


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(7)
    stars = stars_sky(rng, 12)
    inputs = []
    zps = [29.0, 30.0, 30.5, 31.0, 29.5, 30.2]
    for i, zp in enumerate(zps):
        inputs.append(make_input(rng, stars, dx=255 + rng.uniform(0, 8), dy=250 + rng.uniform(0, 8),
                                 rot=rng.uniform(-0.3, 0.3), zp=zp, noise=3.0 + i, visit=100 + i))
    return stars, inputs


def test_coadd_matches_truth_within_noise(scene):
    stars, inputs = scene
    coadd = make_coadd(inputs, 0, PATCH, SKYMAP)
    assert coadd.photo_calib.zero_point == 31.4
    assert coadd.metadata["NINPUTS"] == 6
    pw, shape = SKYMAP.patch_wcs(0, PATCH)
    assert coadd.shape == shape
    truth = render(pw, shape, stars, 2.0, 1.0)  # nJy per pixel on the patch grid
    good = (coadd.mask & NODATA) == 0
    # inputs span tract pixels ~[255..263, 615..623]: the patch interior is covered by all of them
    assert good[10:-10, 10:-10].all()
    pull = (coadd.image[good] - truth[good]) / np.sqrt(coadd.variance[good])
    n = pull.size
    assert abs(pull.mean()) < 5 / np.sqrt(n)  # unbiased; each pixel's pull is correlated with ~4 neighbours
    assert 0.95 < pull.std() < 1.05
    # the coadd noise is the weighted combination: far below the best single input's (3 counts -> nJy)
    best = min(np.sqrt(e.variance[0, 0]) * e.photo_calib.njy_per_instflux for e in inputs)
    assert np.median(np.sqrt(coadd.variance[good])) < best
    # fluxes of the stars (nJy) within an aperture: truth vs coadd, error from the variance plane
    x, y = pw.all_world2pix(stars[0], stars[1], 0)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for xi, yi in zip(x, y, strict=True):
        ap = ((xx - xi) ** 2 + (yy - yi) ** 2 < 64) & good
        diff = coadd.image[ap].sum() - truth[ap].sum()
        assert abs(diff) < 5 * 2 * np.sqrt(coadd.variance[ap].sum())  # x2: Lanczos noise correlation


def test_cosmic_ray_in_one_input_is_clipped(scene):
    stars, inputs = scene
    hit = [e.copy() for e in inputs]
    hit[2].image[150:152, 160:163] += 5000.0  # a CR the calexp did not mask
    cfg = CoaddConfig(clip_sigma=3.0)
    clean = make_coadd(inputs, 0, PATCH, SKYMAP, config=cfg)
    dirty = make_coadd(hit, 0, PATCH, SKYMAP, config=cfg)
    noclip = make_coadd(hit, 0, PATCH, SKYMAP, config=CoaddConfig(clip_sigma=0.0))
    pw, _ = SKYMAP.patch_wcs(0, PATCH)
    ra, dec = hit[2].wcs.all_pix2world([161.0], [150.5], 0)
    px, py = (int(round(float(v[0]))) for v in pw.all_world2pix(ra, dec, 0))
    box = (slice(py - 4, py + 5), slice(px - 4, px + 5))
    sig = np.sqrt(clean.variance[box])
    # values within 3 sigma of the others survive clipping: a sub-threshold remnant of one input of six
    # moves the mean by at most ~3 sigma_i w_i / sum(w) ~ 1.5 coadd sigma, on top of the noise
    assert np.max(np.abs(dirty.image[box] - clean.image[box]) / sig) < 5.0
    assert np.median(np.abs(dirty.image[box] - clean.image[box]) / sig) < 1.0
    assert np.max(np.abs(noclip.image[box] - clean.image[box]) / sig) > 20.0
    # elsewhere clipping changes (almost) nothing: the pull scatter is unchanged
    assert np.array_equal(dirty.image[:50], clean.image[:50])


def test_masked_input_pixels_are_excluded_and_planes_propagate(scene):
    _, inputs = scene
    e = [x.copy() for x in inputs]
    for x in e:
        x.mask[100:110, 100:110] |= masks.bitmask("SAT")  # saturated in every input
    e[0].mask[200:210, 200:210] |= masks.bitmask("INTRP")
    e[0].image[200:210, 200:210] = 1e6  # an interpolated value far off, but INTRP is not a bad plane
    coadd = make_coadd(e, 0, PATCH, SKYMAP, config=CoaddConfig(clip_sigma=0.0))
    pw, _ = SKYMAP.patch_wcs(0, PATCH)

    def at(exp, x, y):
        ra, dec = exp.wcs.all_pix2world([x], [y], 0)
        return tuple(int(round(float(v[0]))) for v in pw.all_world2pix(ra, dec, 0))

    px, py = at(e[0], 104.5, 104.5)
    assert coadd.mask[py, px] & NODATA and coadd.mask[py, px] & masks.bitmask("SAT")
    assert coadd.variance[py, px] == np.inf and coadd.image[py, px] == 0.0
    px, py = at(e[0], 204.5, 204.5)
    assert coadd.mask[py, px] & masks.bitmask("INTRP")
    assert not coadd.mask[py, px] & NODATA


def test_no_data_outside_inputs_and_patch_without_inputs(rng):
    stars = stars_sky(rng, 3)
    one = make_input(rng, stars, dx=400, dy=400, shape=(100, 120))  # covers tract x 400..520, y 400..500
    coadd = make_coadd([one], 0, PATCH, SKYMAP)
    nod = (coadd.mask & NODATA) != 0
    # patch origin is tract 280: input covers patch x 120..240, y 120..220 (minus the Lanczos edge)
    assert not nod[125:215, 125:235].any()
    assert nod[:115].all() and nod[:, :115].all() and nod[226:].all() and nod[:, 246:].all()
    assert np.all(coadd.image[nod] == 0.0) and np.all(np.isinf(coadd.variance[nod]))
    with pytest.raises(NoWorkFound, match="none of the 1 calexps overlaps tract 0 patch 0,0"):
        make_coadd([make_input(rng, stars, dx=500, dy=500, shape=(50, 50))], 0, "0,0", SKYMAP)


def test_zero_points_rescaled(rng):
    """The same sky seen with different zero points gives the same coadd in nJy."""
    stars = stars_sky(rng, 5)
    a = make_input(rng, stars, dx=260, dy=260, zp=28.0, noise=0.0)
    b = make_input(rng, stars, dx=260, dy=260, zp=32.0, noise=0.0)
    for e in (a, b):
        e.variance[:] = 1.0
    ca = make_coadd([a], 0, PATCH, SKYMAP)
    cb = make_coadd([b], 0, PATCH, SKYMAP)
    both = make_coadd([a, b], 0, PATCH, SKYMAP)
    good = (ca.mask & NODATA) == 0
    peak = ca.image[good].max()
    assert peak > 100
    np.testing.assert_allclose(ca.image[good], cb.image[good], atol=1e-5 * peak)
    np.testing.assert_allclose(both.image[good], ca.image[good], atol=1e-5 * peak)
    # variance scales by the square of the flux scale: input variance 1 count^2 at zp 28 -> 10**(0.8*3.4) nJy^2
    assert np.median(ca.variance[good]) == pytest.approx(10 ** (0.8 * 3.4), rel=0.5)
    # exposure weights: b (zp 32) has 1e-3.2 x the variance of a in nJy, so it dominates the mean's variance
    assert np.median(both.variance[good]) == pytest.approx(np.median(cb.variance[good]), rel=2e-3)


def test_coadd_psf_is_weighted_sum_of_warped_psfs(rng):
    stars = stars_sky(rng, 2)
    # integer offsets: the warp copies pixels, so each input's median variance is exactly its own
    specs = [(1.5, 2.0, 29.5), (2.2, 4.0, 30.0), (3.0, 3.0, 30.8)]
    inputs = []
    for i, (sigma, noise, zp) in enumerate(specs):
        inputs.append(make_input(rng, stars, dx=262, dy=258 + i, sigma=sigma, noise=noise, zp=zp, visit=i))
    coadd = make_coadd(inputs, 0, PATCH, SKYMAP)
    pw, _ = SKYMAP.patch_wcs(0, PATCH)
    w = np.array([1.0 / (n**2 * 10 ** (0.8 * (31.4 - zp))) for _, n, zp in specs])
    warped = [WarpedPsf(e.psf, e.wcs, pw) for e in inputs]
    k = coadd.psf.size
    psf = coadd.psf
    for gx in (psf.x_center - psf.x_scale, psf.x_center, psf.x_center + psf.x_scale):
        for gy in (psf.y_center - psf.y_scale, psf.y_center, psf.y_center + psf.y_scale):
            expected = np.zeros((k, k))
            for wi, p in zip(w, warped, strict=True):
                st = p.compute_image(gx, gy)
                o = (k - st.shape[0]) // 2
                expected[o : o + st.shape[0], o : o + st.shape[0]] += wi * st
            expected /= expected.sum()
            np.testing.assert_allclose(psf.compute_image(gx, gy), expected, rtol=0, atol=1e-12)
    # and against the analytic mixture of Gaussians (WarpedPsf of an aligned grid is the source stamp)
    r = k // 2
    d = np.arange(-r, r + 1)
    mix = sum(wi * np.exp(-0.5 * (d[:, None] ** 2 + d[None, :] ** 2) / s**2) / (2 * np.pi * s**2)
              for wi, (s, _, _) in zip(w, specs, strict=True))
    mix /= mix.sum()
    np.testing.assert_allclose(psf.compute_image(psf.x_center, psf.y_center), mix, atol=2e-4 * mix.max())
    mid = psf.compute_image(psf.x_center + 0.3 * psf.x_scale, psf.y_center - 0.7 * psf.y_scale)
    assert mid.sum() == pytest.approx(1.0)


def test_psf_from_grid_interpolates_quadratically():
    k = 5
    xs, ys = [10.0, 60.0, 110.0], [0.0, 200.0, 400.0]
    base = np.random.default_rng(3).uniform(0.5, 1.0, (k, k))

    def f(x, y):  # a PSF whose pixels vary quadratically (tensor degree <= 2) with position
        xn, yn = (x - 60.0) / 50.0, (y - 200.0) / 200.0
        st = base * (1 + 0.1 * xn + 0.05 * yn * yn + 0.02 * xn * xn * yn)
        st[2, 2] += 0.3 * xn * yn
        return st

    grid = np.array([[f(x, y) / f(x, y).sum() for x in xs] for y in ys])
    psf = psf_from_grid(grid, xs, ys)
    for x, y in [(10.0, 400.0), (33.0, 77.0), (100.0, 250.0)]:
        st = f(x, y)
        # the interpolant is exact for a tensor-quadratic numerator; normalisation makes it a ratio
        num = sum(grid[a, b] * _lag(ys, a, y) * _lag(xs, b, x) for a in range(3) for b in range(3))
        np.testing.assert_allclose(psf.compute_image(x, y), num / num.sum(), atol=1e-12)
        assert np.allclose(psf.compute_image(x, y), st / st.sum(), atol=5e-3)


def _lag(nodes, a, t):
    out = 1.0
    for j in range(3):
        if j != a:
            out *= (t - nodes[j]) / (nodes[a] - nodes[j])
    return out


def naive_combine(images, variances, masks_, scales, weights, use_ivar, bad, clip, n_iter):
    """Obviously-correct per-pixel version of the combine kernel (no min_inputs, drop_bits = 0)."""
    n, ny, nx = images.shape
    out = np.zeros((ny, nx))
    var = np.zeros((ny, nx))
    for y in range(ny):
        for x in range(nx):
            ok = [i for i in range(n) if not masks_[i, y, x] & bad and variances[i, y, x] > 0]
            xs = np.array([scales[i] * images[i, y, x] for i in ok])
            vs = np.array([scales[i] ** 2 * variances[i, y, x] for i in ok])
            ws = 1 / vs if use_ivar else np.array([weights[i] for i in ok])
            keep = np.ones(len(ok), bool)
            if len(ok) >= 3 and clip > 0:
                c = np.median(xs)
                for _ in range(n_iter):
                    mad = 1.4826 * np.median(np.abs(xs[keep] - c))
                    rej = keep & (np.abs(xs - c) > clip * np.maximum(np.sqrt(vs), mad))
                    if not rej.any():
                        break
                    keep &= ~rej
                    c = np.sum(ws[keep] * xs[keep]) / ws[keep].sum()
            if not keep.any():
                out[y, x], var[y, x] = 0.0, np.inf
                continue
            out[y, x] = np.sum(ws[keep] * xs[keep]) / ws[keep].sum()
            var[y, x] = np.sum(ws[keep] ** 2 * vs[keep]) / ws[keep].sum() ** 2
    return out, var


@pytest.mark.parametrize("use_ivar", [False, True])
def test_combine_kernel_against_naive(rng, use_ivar):
    n, ny, nx = 5, 12, 9
    images = rng.normal(0, 1, (n, ny, nx)).astype(np.float32)
    images[rng.random((n, ny, nx)) < 0.05] += 30.0  # outliers
    variances = rng.uniform(0.5, 2.0, (n, ny, nx)).astype(np.float32)
    m = np.where(rng.random((n, ny, nx)) < 0.2, 1, 0).astype(np.int32)
    m[:, 0, 0] = 1  # a pixel with no valid input
    scales = rng.uniform(0.5, 2.0, n)
    weights = rng.uniform(0.5, 2.0, n)
    outs = (np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32), np.empty((ny, nx), np.int32),
            np.empty((ny, nx), np.int16))
    before = images.copy()
    combine_clipped(images, variances, m, scales, weights, use_ivar, 1, 0, NODATA, 3.0, 2, 1, *outs)
    assert np.array_equal(images, before)
    ref, ref_var = naive_combine(images, variances, m, scales, weights, use_ivar, 1, 3.0, 2)
    np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1], ref_var, rtol=1e-5)
    assert outs[2][0, 0] & NODATA and outs[3][0, 0] == 0
    assert outs[3].max() <= n


def test_config_and_input_errors(scene):
    with pytest.raises(ConfigError, match="coadd.clip_sigma"):
        CoaddConfig(clip_sigma=-1.0)
    with pytest.raises(ConfigError, match="coadd.bad_mask_planes"):
        CoaddConfig(bad_mask_planes=("NOPE",))
    with pytest.raises(ConfigError, match="coadd.weighting"):
        CoaddConfig(weighting="median")
    _, inputs = scene
    bare = inputs[0].copy()
    bare.photo_calib = None
    with pytest.raises(InputError, match="has no photo_calib"):
        make_coadd([bare], 0, PATCH, SKYMAP)
    other = inputs[1].copy()
    other.visit_info = VisitInfo(visit=1, ccdnum=1, filter="g")
    with pytest.raises(InputError, match="several filters"):
        make_coadd([inputs[0], other], 0, PATCH, SKYMAP)
