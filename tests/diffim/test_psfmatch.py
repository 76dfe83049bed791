"""Tests of Alard-Lupton PSF matching and image subtraction (apfast.diffim.psfmatch, apfast.diffim.subtract).

Synthetic truth: stars with Gaussian (science: spatially varying width, template:
double-Gaussian) PSFs on white noise of known variance, the template at a
different photometric scale, a differential background gradient in the science.
"""

from __future__ import annotations

import numpy as np
import pytest

from apfast.diffim.psfmatch import (
    InsufficientKernelSourcesError,
    PsfMatchConfig,
    SpatialKernel,
    basis_sigmas,
    make_basis,
)
from apfast.diffim.subtract import fft_convolve_terms, subtract_images
from apfast.errors import ConfigError, InputError
from apfast.exposure import Exposure
from apfast.kernels.convolve import combine_spatial_terms, grow_mask_bits
from apfast.kernels.psfmatch import stamp_normal_equations
from apfast.masks import bitmask
from apfast.psf import GaussianPsf, ImagePsf
from naive import psfmatch as naive

FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))
SHAPE = (384, 384)
SKY_VAR_SCI = 100.0
SKY_VAR_TMPL = 40.0
TMPL_SCALE = 1.3  # template counts per science count


WING = 0.12  # flux fraction of the wide Gaussian of every PSF


def _render(shape, xs, ys, fluxes, widths_fn):
    """Point-sampled double-Gaussian stars; ``widths_fn(x, y) -> (core_sigma, wing_sigma)``."""
    img = np.zeros(shape)
    r = 20
    d = np.arange(-r, r + 1)
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = round(x), round(y)
        c, w = widths_fn(x, y)
        dx = (d + ix - x)[None, :]
        dy = (d + iy - y)[:, None]
        rr = dx**2 + dy**2
        prof = (1 - WING) * np.exp(-0.5 * rr / c**2) / (2 * np.pi * c**2)
        prof += WING * np.exp(-0.5 * rr / w**2) / (2 * np.pi * w**2)
        y0, x0 = iy - r, ix - r
        ya, yb = max(y0, 0), min(iy + r + 1, shape[0])
        xa, xb = max(x0, 0), min(ix + r + 1, shape[1])
        img[ya:yb, xa:xb] += f * prof[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return img


def psf_widths(fwhm_sci, fwhm_tmpl):
    """(core, wing) sigmas of science and template: the wider PSF is the narrower one convolved with a Gaussian."""
    cs, ct = fwhm_sci / FWHM, fwhm_tmpl / FWHM
    if cs >= ct:
        e2 = cs**2 - ct**2
        return (cs, np.sqrt((1.8 * ct) ** 2 + e2)), (ct, 1.8 * ct)
    e2 = ct**2 - cs**2
    return (cs, 1.8 * cs), (ct, np.sqrt((1.8 * cs) ** 2 + e2))


def make_pair(rng, *, fwhm_sci, fwhm_tmpl, n_stars=110, shape=SHAPE):
    """Science and template Exposures plus the true catalogue and background.

    The science PSF width varies linearly by 4% in x and 2% in y across the image;
    the template is at ``TMPL_SCALE`` times the science photometric scale and the
    science has a background ``3 + 4 xn - 2 yn`` (xn, yn in [-1, 1]).
    """
    ny, nx = shape
    xs = rng.uniform(8, nx - 8, n_stars)
    ys = rng.uniform(8, ny - 8, n_stars)
    flux = 10 ** rng.uniform(3.3, 5.0, n_stars)
    (c_s, w_s), (c_t, w_t) = psf_widths(fwhm_sci, fwhm_tmpl)

    def wid_sci(x, y):
        f = 1.0 + 0.04 * (x - nx / 2) / nx + 0.02 * (y - ny / 2) / ny
        return c_s * f, w_s * f

    stars_s = _render(shape, xs, ys, flux, wid_sci)
    stars_t = _render(shape, xs, ys, TMPL_SCALE * flux, lambda x, y: (c_t, w_t))
    yy, xx = np.mgrid[0:ny, 0:nx]
    bg = 3.0 + 4.0 * (xx - (nx - 1) / 2) / (nx / 2) - 2.0 * (yy - (ny - 1) / 2) / (ny / 2)
    var_s = SKY_VAR_SCI + stars_s
    var_t = SKY_VAR_TMPL + stars_t
    img_s = stars_s + bg + rng.standard_normal(shape) * np.sqrt(var_s)
    img_t = stars_t + rng.standard_normal(shape) * np.sqrt(var_t)
    psf_s = ImagePsf(_render((45, 45), [22.0], [22.0], [1.0], lambda x, y: (c_s, w_s)))
    psf_t = ImagePsf(_render((45, 45), [22.0], [22.0], [1.0], lambda x, y: (c_t, w_t)))
    sci = Exposure(img_s, np.zeros(shape, np.int32), var_s, psf=psf_s)
    tmp = Exposure(img_t, np.zeros(shape, np.int32), var_t, psf=psf_t)
    snr = flux / np.sqrt(4 * np.pi * c_s**2 * SKY_VAR_SCI)
    cat = {"x": xs, "y": ys, "snr": snr}
    return sci, tmp, cat, bg, (xs, ys, flux)


def _pulls(res, xs, ys, fwhm):
    """Pull (diff / sqrt(var)) of source-free, unmasked pixels and chi^2/pixel in star apertures."""
    diff = res.difference
    ny, nx = diff.shape
    pull = diff.image / np.sqrt(diff.variance)
    yy, xx = np.mgrid[0:ny, 0:nx]
    near = np.zeros((ny, nx), bool)
    for x, y in zip(xs, ys, strict=True):
        near |= (xx - x) ** 2 + (yy - y) ** 2 < (3.0 * fwhm) ** 2
    free = ~near & (diff.mask == 0)
    chi = []
    for x, y in zip(xs, ys, strict=True):
        ap = (xx - x) ** 2 + (yy - y) ** 2 <= fwhm**2
        if np.any(diff.mask[ap] != 0):
            continue
        chi.append(np.mean(pull[ap] ** 2))
    return pull[free], np.asarray(chi)


# ---------------------------------------------------------------------------- kernels vs naive
def test_stamp_normal_equations_match_naive(rng):
    basis = make_basis((1.0, 2.0), (2, 1), 9)
    ref = rng.normal(0, 1, (60, 70)).astype(np.float32)
    tgt = rng.normal(0, 1, (60, 70)).astype(np.float32)
    wgt = rng.uniform(0.5, 2.0, (60, 70)).astype(np.float32)
    wgt[30, 30] = 0.0
    cx = np.array([20, 35, 49], np.int64)
    cy = np.array([15, 30, 44], np.int64)
    half = 6
    nb = basis.n_basis
    m = np.zeros((3, nb + 1, nb + 1))
    b = np.zeros((3, nb + 1))
    sws, wvr, npix = np.zeros(3), np.zeros(3), np.zeros(3, np.int64)
    stamp_normal_equations(ref, tgt, wgt, wgt, cx, cy, half, basis.row_filt, basis.col_filt, basis.pairs, True,
                           m, b, sws, wvr, npix)
    raw = np.einsum("bv,bu->bvu", basis.col_filt[basis.pairs[:, 1]], basis.row_filt[basis.pairs[:, 0]])
    m_ref, b_ref = naive.stamp_normal_equations(ref, tgt, wgt, raw, cx, cy, half, True)
    np.testing.assert_allclose(m, m_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(b, b_ref, rtol=1e-9, atol=1e-9)
    assert npix.tolist() == [169, 168, 169]


def test_spatial_convolution_matches_naive(rng):
    basis = make_basis((0.8, 1.6), (2, 1), 9)
    coeffs = rng.normal(0, 1, (basis.n_basis, 3))
    kern = SpatialKernel(basis=basis.images, coeffs=coeffs, order=1, x_center=20.0, y_center=15.0,
                         x_scale=24.0, y_scale=18.0)
    img = rng.normal(5, 2, (36, 48)).astype(np.float32)
    tgt = rng.normal(0, 1, (36, 48)).astype(np.float32)
    convs = fft_convolve_terms(img, kern.term_images())
    matched = np.empty_like(img)
    diff = np.empty_like(img)
    bgc = np.array([0.5, -0.2, 0.1])
    combine_spatial_terms(convs, 1, bgc, 1, 20.0, 15.0, 24.0, 18.0, tgt, -2.0, matched, diff)
    ref = naive.convolve_spatial(img.astype(np.float64), kern.evaluate)
    yy, xx = np.mgrid[0:36, 0:48]
    bg = bgc[0] + bgc[1] * (xx - 20.0) / 24.0 + bgc[2] * (yy - 15.0) / 18.0
    inner = (slice(4, -4), slice(4, -4))  # FFT wrap-around only reaches the kernel half-width border
    scale = np.abs(ref).max()
    np.testing.assert_allclose(matched[inner], ref[inner], atol=2e-6 * scale)
    np.testing.assert_allclose(diff[inner], -2.0 * (tgt - ref - bg)[inner], atol=5e-6 * scale)


def test_grow_mask_bits_matches_naive(rng):
    mask = np.zeros((50, 40), np.int32)
    idx = rng.integers(0, 50 * 40, 30)
    mask.flat[idx] = rng.choice([1, 16, 32, 256, 33], 30)
    out = np.empty_like(mask)
    grow = ~bitmask("DETECTED") & 0x3FF
    grow_mask_bits(mask, 3, grow, out)
    np.testing.assert_array_equal(out, naive.grow_mask_bits(mask, 3, grow))
    assert np.count_nonzero(out & 32) == np.count_nonzero(mask & 32)  # DETECTED is not spread


def test_basis_zero_sum_and_sigma_rule():
    cfg = PsfMatchConfig()
    sig, k = basis_sigmas(3.0, 6.0, cfg)
    s_k = np.sqrt((6.0 / FWHM) ** 2 - (3.0 / FWHM) ** 2)
    np.testing.assert_allclose(sig, [s_k / 2, s_k, 2 * s_k])
    assert k == 27  # int(6 * 4.41) = 26, made odd
    sig2, k2 = basis_sigmas(2.0, 2.2, cfg)  # sigma_K below the minimum -> [0.7, 1.4, 2.8]
    np.testing.assert_allclose(sig2, [0.7, 1.4, 2.8])
    assert k2 == 21
    sig3, k3 = basis_sigmas(3.0, 12.0, cfg)
    assert k3 == 35 and sig3[-1] > 8
    b = make_basis(sig, (4, 2, 2), k)
    assert b.n_basis == 27
    sums = b.images.sum(axis=(1, 2))
    assert abs(sums[0] - 1) < 1e-12 and np.abs(sums[1:]).max() < 1e-12


# ---------------------------------------------------------------------------- subtraction truth
@pytest.mark.parametrize("ratio", [0.6, 1.0, 1.35, 1.8])
def test_subtraction_statistics_auto(rng, ratio):
    fwhm_t = 3.6
    sci, tmp, cat, _, (xs, ys, _) = make_pair(rng, fwhm_sci=ratio * fwhm_t, fwhm_tmpl=fwhm_t)
    res = subtract_images(sci, tmp, sources=cat, config=PsfMatchConfig(mode="auto"))
    narrower_sci = sci.psf.fwhm(192, 192) < tmp.psf.fwhm(192, 192)
    assert res.mode == ("convolveScience" if narrower_sci else "convolveTemplate")
    if ratio != 1.0:
        assert narrower_sci == (ratio < 1)
    assert res.n_stamps_used >= 15
    pull, chi = _pulls(res, xs, ys, max(ratio, 1.0) * fwhm_t)
    n = pull.size
    assert n > 20000
    assert abs(pull.mean()) < 0.02, pull.mean()
    assert abs(pull.std() - 1.0) < 0.05, pull.std()
    assert chi.size > 30
    assert np.median(chi) < 1.5, np.median(chi)
    ks = res.kernel.sum(SHAPE[1] / 2, SHAPE[0] / 2)
    if res.mode == "convolveTemplate":
        expect_ks = 1.0 / TMPL_SCALE
        # background truth: template has none, so b = the science gradient
        b_c = float(res.background.evaluate((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2))
        assert abs(b_c - 3.0) < 0.3, b_c
        assert res.difference.psf is sci.psf
    else:
        expect_ks = TMPL_SCALE
        assert isinstance(res.difference.psf, ImagePsf)
        assert res.difference.psf.fwhm(0, 0) > sci.psf.fwhm(0, 0)
    assert abs(ks / expect_ks - 1) < 0.01, (ks, expect_ks)


def test_convolve_science_keeps_science_units(rng):
    """A transient added to the science has its science flux in the difference in both modes."""
    sci, tmp, cat, _, _ = make_pair(rng, fwhm_sci=3.0, fwhm_tmpl=3.0)
    (c, w), _ = psf_widths(3.0, 3.0)
    extra = _render(SHAPE, [191.3], [200.6], [3e4], lambda x, y: (c, w))
    sci2 = Exposure(sci.image + extra, sci.mask, sci.variance + extra, psf=sci.psf)
    fluxes = []
    for mode in ("convolveTemplate", "convolveScience"):
        res = subtract_images(sci2, tmp, sources=cat, config=PsfMatchConfig(mode=mode))
        box = res.difference.image[185:217, 175:208].astype(np.float64)
        fluxes.append(box.sum())
        err = np.sqrt(res.difference.variance[185:217, 175:208].astype(np.float64).sum())
        assert abs(box.sum() - 3e4) < 5 * err + 0.01 * 3e4, (mode, box.sum(), err)
    assert fluxes[0] > 0 and fluxes[1] > 0


def test_detect_on_template_when_no_catalogue(rng):
    sci, tmp, _, _, (xs, ys, _) = make_pair(rng, fwhm_sci=4.5, fwhm_tmpl=3.5)
    res = subtract_images(sci, tmp)
    assert res.n_stamps_used >= 15
    pull, _ = _pulls(res, xs, ys, 4.5)
    assert abs(pull.std() - 1.0) < 0.05
    assert abs(res.kernel.sum(192, 192) * TMPL_SCALE - 1) < 0.01


def test_masks_edges_nodata_and_inputs_unmodified(rng):
    sci, tmp, cat, _, _ = make_pair(rng, fwhm_sci=4.0, fwhm_tmpl=3.0)
    tmp.image[100:110, 250:260] = np.nan
    tmp.mask[300, 40] = bitmask("SAT")
    sci.mask[50, 60] = bitmask("CR")
    before = [a.copy() for a in (sci.image, sci.mask, sci.variance, tmp.image, tmp.mask, tmp.variance)]
    res = subtract_images(sci, tmp, sources=cat)
    after = (sci.image, sci.mask, sci.variance, tmp.image, tmp.mask, tmp.variance)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    d = res.difference
    r = res.kernel.size // 2
    assert np.all(np.isfinite(d.image)) and np.all(np.isfinite(d.variance))
    edge = bitmask("EDGE")
    assert np.all(d.mask[:r] & edge) and np.all(d.mask[:, -r:] & edge)
    assert not np.any(d.mask[r:-r, r:-r] & edge)
    nodata = (d.mask & bitmask("NO_DATA")) != 0
    assert nodata[100 - r, 250 - r] and nodata[109 + r, 259 + r] and not nodata[100 - r - 1, 250]
    sat = (d.mask & bitmask("SAT")) != 0
    assert sat[300 - r, 40 + r] and not sat[300 - r - 1, 40]
    assert d.mask[50, 60] & bitmask("CR") and not d.mask[50, 62] & bitmask("CR")  # science mask not grown
    assert res.matched.mask[300, 40] & bitmask("SAT")


# ---------------------------------------------------------------------------- errors and config
def test_too_few_stamps_raises_with_metadata(rng):
    sci, tmp, cat, _, _ = make_pair(rng, fwhm_sci=4.0, fwhm_tmpl=3.0, n_stars=3)
    with pytest.raises(InsufficientKernelSourcesError, match="difference.psfmatch.stamp_snr_min") as info:
        subtract_images(sci, tmp, sources=cat)
    assert info.value.n_required == 5 and info.value.n_sources <= 3
    assert info.value.metadata["n_required"] == 5


def test_shape_mismatch_and_missing_planes(rng):
    a = Exposure(np.zeros((40, 40)), variance=np.ones((40, 40)), psf=GaussianPsf(1.5, 15))
    b = Exposure(np.zeros((40, 41)), variance=np.ones((40, 41)), psf=GaussianPsf(1.5, 15))
    with pytest.raises(InputError, match="warp the template"):
        subtract_images(a, b)
    c = Exposure(np.zeros((40, 40)), psf=GaussianPsf(1.5, 15))
    with pytest.raises(InputError, match="no variance plane"):
        subtract_images(a, c)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kernel_size_min": 20}, "difference.psfmatch.kernel_size_min"),
        ({"spatial_kernel_order": 3}, "difference.psfmatch.spatial_kernel_order"),
        ({"alard_sig_gauss": (1.0, 2.0)}, "difference.psfmatch.alard_sig_gauss"),
        ({"bad_mask_planes": ("NOPE",)}, "difference.psfmatch.bad_mask_planes"),
        ({"mode": "convolveBoth"}, "difference.psfmatch.mode"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        PsfMatchConfig(**kwargs)


# ---------------------------------------------------------------------------- real data
def _load_decam(path):
    from astropy.io import fits

    with fits.open(path) as hdul:
        hdu = hdul[0]
        img = np.asarray(hdu.data, dtype=np.float32)
        gain, fwhm = float(hdu.header["GAIN"]), float(hdu.header["FWHM"])
    sky_var = (1.4826 * np.median(np.abs(img - np.median(img)))) ** 2
    var = (sky_var + np.clip(img, 0, None) / gain).astype(np.float32)
    s = fwhm / FWHM
    return Exposure(img, np.zeros(img.shape, np.int32), var, psf=GaussianPsf(s, 2 * int(5 * s) + 1))


def test_real_decam_pair(real_data):
    """DECam 2018 science vs 2016 reference on one grid: the difference is noise-like."""
    d = real_data / "decam_sfft"
    sci = _load_decam(d / "DEC-OBS04a.mini.fits")
    tmp = _load_decam(d / "DEC-OBS18a.mini.fits")
    cfg = PsfMatchConfig(size_cell=64, stamp_fwhm_scaling=3.0, min_stamps=4)  # a 256x256 cutout has few stars
    res = subtract_images(sci, tmp, config=cfg)
    assert res.mode == "convolveTemplate" and res.n_stamps_used >= 4
    assert 0.9 < res.kernel.sum(128, 128) < 1.15  # same exposure time and gain: photometric scale near 1
    good = res.difference.mask == 0
    pull = (res.difference.image / np.sqrt(res.difference.variance))[good]
    robust = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert abs(np.median(pull)) < 0.1
    assert 0.85 < robust < 1.15
    assert np.mean(np.abs(pull) > 5) < 0.002


def test_catalogue_formats_and_flags():
    from astropy.table import Table

    from apfast.diffim.psfmatch import _catalogue_arrays

    x = np.arange(3.0)
    tab = Table({"x": x, "y": x, "psfFlux": x + 1, "psfFluxErr": np.full(3, 0.1),
                 "centroid_flag": [False, True, False]})
    _, _, snr, ok = _catalogue_arrays(tab)
    np.testing.assert_allclose(snr, [10, 20, 30])
    assert ok.tolist() == [True, False, True]
    rec = np.array([(1.0, 2.0, 30.0)], dtype=[("x", "f8"), ("y", "f8"), ("snr", "f8")])
    assert _catalogue_arrays(rec)[2].tolist() == [30.0]
    with pytest.raises(InputError, match="'x' and 'y'"):
        _catalogue_arrays({"ra": x})


def test_fft_convolve_thread_safe(rng):
    import threading

    imgs = [rng.normal(0, 1, (64, 80)).astype(np.float32) for _ in range(4)]
    kern = rng.normal(0, 1, (2, 7, 7))
    serial = [fft_convolve_terms(im, kern) for im in imgs]
    out = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        out[i] = fft_convolve_terms(imgs[i], kern)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, out, strict=True):
        np.testing.assert_array_equal(a, b)
