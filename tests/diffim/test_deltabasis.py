"""The delta-function (pixel) kernel basis: its normal equations, noise correction, fit and automatic choice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from apfast.diffim.deltabasis import choose_basis, make_delta_basis, peak_snr, solve_delta_kernel
from apfast.diffim.psfmatch import PsfMatchConfig, make_basis, select_stamps, solve_kernel
from apfast.diffim.subtract import subtract_images
from apfast.errors import AlgorithmError, ConfigError
from apfast.exposure import Exposure
from apfast.kernels.psfmatch import delta_stamp_normal_equations, stamp_normal_equations
from apfast.psf import GaussianPsf


def _design(ref: np.ndarray, tgt: np.ndarray, x: int, y: int, half: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force design matrix (pixels x (nk + 1)) of one stamp and its target pixels."""
    cols = []
    for v in range(-r, r + 1):
        for u in range(-r, r + 1):
            cols.append(ref[y - half - v : y + half + 1 - v, x - half - u : x + half + 1 - u].astype(float).ravel())
    cols.append(np.ones((2 * half + 1) ** 2))
    return np.array(cols).T, tgt[y - half : y + half + 1, x - half : x + half + 1].astype(float).ravel()


def test_lag_sums_equal_brute_force_normal_equations() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(60, 70)).astype(np.float32)
    tgt = rng.normal(size=(60, 70)).astype(np.float32)
    half, r = 5, 3
    cx, cy = np.array([20, 45]), np.array([22, 35])
    nk = (2 * r + 1) ** 2
    m, b, sws = np.zeros((2, nk + 1, nk + 1)), np.zeros((2, nk + 1)), np.zeros(2)
    delta_stamp_normal_equations(ref, tgt, ref, np.zeros((4 * r + 1,) * 2), cx, cy, half, r, m, b, sws)
    for i in range(2):
        a, t = _design(ref, tgt, int(cx[i]), int(cy[i]), half, r)
        np.testing.assert_allclose(m[i], a.T @ a, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(b[i], a.T @ t, rtol=1e-10, atol=1e-9)
        assert sws[i] == pytest.approx(t @ t, rel=1e-12)


def test_delta_basis_through_the_separable_kernel_gives_the_same_equations() -> None:
    """The pixel basis is separable (delta x delta): the Gaussian path's kernel must agree, unit weights."""
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(40, 40)).astype(np.float32)
    tgt = rng.normal(size=(40, 40)).astype(np.float32)
    half, r = 4, 2
    basis = make_delta_basis(2 * r + 1)
    nk = basis.n_basis
    c = np.array([20], dtype=np.int64)
    ones = np.ones_like(ref)
    m1, b1 = np.zeros((1, nk + 1, nk + 1)), np.zeros((1, nk + 1))
    stamp_normal_equations(ref, tgt, ones, ones, c, c, half, basis.row_filt, basis.col_filt, basis.pairs, True, m1,
                           b1, np.zeros(1), np.zeros(1), np.zeros(1, np.int64))
    m2, b2 = np.zeros((1, nk + 1, nk + 1)), np.zeros((1, nk + 1))
    delta_stamp_normal_equations(ref, tgt, ref, np.zeros((4 * r + 1,) * 2), c, c, half, r, m2, b2, np.zeros(1))
    np.testing.assert_allclose(m1, m2, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(b1, b2, rtol=1e-9, atol=1e-8)


def test_noise_correction_removes_the_reference_variance_on_the_diagonal() -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(50, 50)).astype(np.float32)
    var = rng.uniform(1.0, 3.0, size=(50, 50)).astype(np.float32)
    half, r = 4, 2
    nk = (2 * r + 1) ** 2
    c = np.array([25], dtype=np.int64)
    rho = np.zeros((4 * r + 1,) * 2)
    m0, m1 = np.zeros((1, nk + 1, nk + 1)), np.zeros((1, nk + 1, nk + 1))
    delta_stamp_normal_equations(ref, ref, var, rho, c, c, half, r, m0, np.zeros((1, nk + 1)), np.zeros(1))
    rho[2 * r, 2 * r] = 1.0  # white noise
    delta_stamp_normal_equations(ref, ref, var, rho, c, c, half, r, m1, np.zeros((1, nk + 1)), np.zeros(1))
    vsum = np.array([var[25 - half - v : 25 + half + 1 - v, 25 - half - u : 25 + half + 1 - u].sum()
                     for v in range(-r, r + 1) for u in range(-r, r + 1)])
    diff = (m0 - m1)[0]
    np.testing.assert_allclose(np.diag(diff)[:nk], vsum, rtol=1e-5)
    off = diff[:nk, :nk] - np.diag(vsum)
    assert np.abs(off).max() < 1e-6 * vsum.max()  # white: nothing off the diagonal
    np.testing.assert_array_equal(m0[:, nk], m1[:, nk])  # the background column is exact


def _pair(kernel: np.ndarray, *, shape: tuple[int, int] = (512, 512), seed: int = 11, ref_noise: float = 5.0,
          n_stars: int = 160, flux: tuple[float, float] = (3.0, 5.0)) -> tuple[Exposure, Exposure, dict]:
    """Template with Gaussian stars (sigma 1.5) and a science = template (x) ``kernel``, both with noise."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    xs = rng.uniform(30, nx - 30, n_stars)
    ys = rng.uniform(30, ny - 30, n_stars)
    f = 10 ** rng.uniform(*flux, n_stars)
    yy, xx = np.mgrid[0:ny, 0:nx]
    t = np.zeros(shape)
    for x0, y0, fl in zip(xs, ys, f, strict=True):
        sl = (slice(int(y0) - 12, int(y0) + 13), slice(int(x0) - 12, int(x0) + 13))
        t[sl] += fl * np.exp(-0.5 * ((xx[sl] - x0) ** 2 + (yy[sl] - y0) ** 2) / 1.5**2) / (2 * np.pi * 1.5**2)
    s = fftconvolve(t, kernel, mode="same")
    vt = np.full(shape, ref_noise**2, np.float32)
    vs = np.full(shape, 25.0, np.float32) + np.clip(s, 0, None).astype(np.float32)
    t = (t + rng.normal(size=shape) * ref_noise).astype(np.float32)
    s = (s + rng.normal(size=shape) * np.sqrt(vs)).astype(np.float32)
    sci = Exposure(s, np.zeros(shape, np.int32), vs, psf=GaussianPsf(2.2, 25))
    tmp = Exposure(t, np.zeros(shape, np.int32), vt, psf=GaussianPsf(1.5, 25))
    return sci, tmp, {"x": xs, "y": ys, "snr": f / (ref_noise * 5.0)}


def _ring_kernel() -> np.ndarray:
    """A kernel no sum of three centred Gaussians can represent: a core plus an offset ghost (a double image)."""
    yy, xx = np.mgrid[-10:11, -10:11]
    k = np.exp(-0.5 * (xx**2 + yy**2) / 1.2**2)
    k /= k.sum()
    k[10 + 4, 10 - 3] += 0.35  # a sharp ghost 5 px away
    return k / k.sum()


def _star_residual(res, cat: dict) -> float:
    d, v = res.difference.image, res.difference.variance
    out = []
    for x, y in zip(cat["x"], cat["y"], strict=True):
        ix, iy = int(round(x)), int(round(y))
        if 40 < ix < d.shape[1] - 40 and 40 < iy < d.shape[0] - 40:
            cut = d[iy - 6 : iy + 7, ix - 6 : ix + 7] / np.sqrt(v[iy - 6 : iy + 7, ix - 6 : ix + 7])
            out.append(np.abs(cut).max())
    return float(np.median(out))


@pytest.fixture(scope="module")
def ghost_pair() -> tuple[Exposure, Exposure, dict]:
    return _pair(_ring_kernel())


def test_auto_chooses_delta_for_a_kernel_gaussians_cannot_represent(ghost_pair) -> None:
    sci, tmp, cat = ghost_pair
    gauss = subtract_images(sci, tmp, sources=cat, config=PsfMatchConfig(basis="gaussian", size_cell=64))
    auto = subtract_images(sci, tmp, sources=cat, config=PsfMatchConfig(basis="auto", size_cell=64))
    choice = auto.metadata["basis_choice"]
    assert choice.basis == "delta", choice
    assert choice.gaussian_core_chi2 > PsfMatchConfig().auto_core_chi2
    assert choice.delta_core_chi2 < 0.5 * choice.gaussian_core_chi2
    # the recovered kernel has the ghost's flux where it was put (spread over the few pixels a
    # sigma-1.5 star cannot tell apart, the Laplacian's choice), and the stars subtract to the noise
    k = auto.kernel.evaluate(256.0, 256.0)
    r = k.shape[0] // 2
    ghost = k[r + 2 : r + 7, r - 5 : r].sum()
    assert ghost == pytest.approx(0.35 / 1.35, abs=0.12)
    assert ghost > 3 * abs(k[r - 6 : r - 1, r + 1 : r + 6].sum())  # and not at the mirrored offset
    assert np.unravel_index(np.argmax(k[r + 2 :, :]), k[r + 2 :, :].shape) == (2, r - 3)
    assert auto.kernel.sum(256.0, 256.0) == pytest.approx(1.0, abs=0.01)
    assert _star_residual(auto, cat) < 4.0 < 2 * 4.0 < _star_residual(gauss, cat)
    assert auto.solution.basis.sigmas == ()  # the solution really is the pixel basis


def test_auto_keeps_gaussian_when_gaussians_fit() -> None:
    yy, xx = np.mgrid[-10:11, -10:11]
    k = np.exp(-0.5 * (xx**2 + yy**2) / 1.6**2)
    sci, tmp, cat = _pair(k / k.sum(), seed=12)
    res = subtract_images(sci, tmp, sources=cat, config=PsfMatchConfig(size_cell=64))
    choice = res.metadata["basis_choice"]
    assert choice.basis == "gaussian"
    assert choice.gaussian_core_chi2 < PsfMatchConfig().auto_core_chi2
    assert np.isnan(choice.delta_core_chi2)  # never tried: no time spent
    assert res.metadata["basis"] == "gaussian"


def test_noise_correction_undoes_the_smoothing_bias_of_a_noisy_reference() -> None:
    """Same PSF in both images (true kernel a delta), a noisy reference, faint stamps: least squares
    without the correction prefers a kernel that smooths the reference's noise away, which lowers
    the peak of every star it convolves."""
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    sci, tmp, cat = _pair(delta, seed=13, ref_noise=8.0, flux=(3.0, 3.6))
    ref, var_ref = tmp.image, tmp.variance
    tgt, var_tgt = sci.image, sci.variance
    cfg = PsfMatchConfig(size_cell=64, basis="delta", delta_min_peak_snr=0.0)
    bad = np.zeros(ref.shape, bool)
    half, r = 11, 10
    cx, cy = select_stamps(cat["x"], cat["y"], cat["snr"], np.ones(cat["x"].size, bool), bad, half=half, r=r,
                           isolation=3.0, config=cfg)
    gauss = solve_kernel(ref, var_ref, tgt, var_tgt, bad, cx, cy, basis=make_basis((0.7, 1.4, 2.8), (4, 2, 2), 21),
                         half=half, config=cfg)
    yy, xx = np.mgrid[-10:11, -10:11]
    star = np.exp(-0.5 * (xx**2 + yy**2) / 1.5**2)
    peak = {}
    for corr in (False, True):
        c = PsfMatchConfig(size_cell=64, basis="delta", delta_min_peak_snr=0.0, delta_max_stamps=100,
                           delta_noise_correction=corr)
        sol, _, _ = solve_delta_kernel(ref, var_ref, tgt, var_tgt, gauss, half=half, fwhm=3.5, config=c,
                                       held_out=False)
        k = sol.kernel.evaluate(256.0, 256.0)
        peak[corr] = float((k * star).sum() / k.sum())  # a star's peak after the kernel, relative to before
    # measured: 0.924 without, 0.952 with (the rest is the regulariser's smoothing)
    assert peak[False] < 0.94  # diluted towards smoothing
    assert peak[True] > peak[False] + 0.02


def test_peak_snr_is_the_reference_pixel_over_its_noise() -> None:
    img = np.zeros((5, 5), np.float32)
    img[2, 3] = 30.0
    var = np.full((5, 5), 4.0, np.float32)
    assert peak_snr(img, var, np.array([3]), np.array([2]))[0] == pytest.approx(15.0)


def test_choose_basis_configured_gaussian_does_no_delta_work(ghost_pair) -> None:
    sci, tmp, cat = ghost_pair
    res = subtract_images(sci, tmp, sources=cat, config=PsfMatchConfig(basis="gaussian", size_cell=64))
    choice = res.metadata["basis_choice"]
    assert (choice.basis, choice.reason, choice.seconds) == ("gaussian", "configured", 0.0)
    assert np.isnan(choice.gaussian_core_chi2)  # not even the ~15 ms check is spent
    assert choose_basis.__module__ == "apfast.diffim.deltabasis"


@pytest.mark.parametrize(("key", "value"), [
    ("basis", "pixels"), ("delta_lambda", ()), ("delta_lambda", (-1.0,)), ("delta_kernel_size", 20),
    ("delta_max_stamps", 1), ("auto_core_chi2", 0.0), ("auto_min_gain", 1.0), ("delta_stamp_fwhm_scaling", 0.0),
])
def test_bad_delta_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"difference.psfmatch.{key}"):
        PsfMatchConfig(**{key: value})


@pytest.fixture(scope="module")
def faint_delta_pair() -> dict:
    """Identical PSFs, a very noisy reference (noise 15), faint stars: the noise correction's hard case."""
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    sci, tmp, cat = _pair(delta, seed=13, ref_noise=15.0, flux=(3.0, 3.6))
    cfg = PsfMatchConfig(size_cell=64, basis="delta", delta_min_peak_snr=0.0)
    bad = np.zeros(tmp.image.shape, bool)
    cx, cy = select_stamps(cat["x"], cat["y"], cat["snr"], np.ones(cat["x"].size, bool), bad, half=11, r=10,
                           isolation=3.0, config=cfg)
    gauss = solve_kernel(tmp.image, tmp.variance, sci.image, sci.variance, bad, cx, cy,
                         basis=make_basis((0.7, 1.4, 2.8), (4, 2, 2), 21), half=11, config=cfg)
    return {"sci": sci, "tmp": tmp, "gauss": gauss}


def test_indefinite_corrected_equations_fall_back_with_a_warning(faint_delta_pair: dict,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    p = faint_delta_pair
    cfg = PsfMatchConfig(size_cell=64, basis="delta", delta_min_peak_snr=0.0, delta_lambda=(1e-6,))
    with caplog.at_level("WARNING", logger="apfast.diffim.deltabasis"):
        sol, _, _ = solve_delta_kernel(p["tmp"].image, p["tmp"].variance, p["sci"].image, p["sci"].variance,
                                       p["gauss"], half=11, fwhm=3.5, config=cfg, held_out=False)
    assert "fitting without the noise correction (difference.psfmatch.delta_noise_correction)" in caplog.text
    assert sol.kernel.sum(256.0, 256.0) == pytest.approx(1.0, abs=0.1)  # still a usable kernel


def test_singular_delta_equations_name_the_keys(faint_delta_pair: dict) -> None:
    """A reference with nothing in it and no regularisation: nothing can determine the kernel."""
    p = faint_delta_pair
    blank = np.zeros_like(p["tmp"].image)
    cfg = PsfMatchConfig(size_cell=64, basis="delta", delta_min_peak_snr=0.0, delta_lambda=(0.0,),
                         delta_noise_correction=False)
    with pytest.raises(AlgorithmError, match=r'basis = "gaussian".*delta_lambda'):
        solve_delta_kernel(blank, p["tmp"].variance, p["sci"].image, p["sci"].variance, p["gauss"], half=11,
                           fwhm=3.5, config=cfg, held_out=False)
