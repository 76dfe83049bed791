"""DIA source detection and measurement (apfast.dia.diasource, kernels/forced.py, kernels/dipole.py).

Synthetic difference images: Gaussian (or spatially varying PolynomialPixelPsf)
point sources of known flux and position on white noise of known variance, so
every tolerance below follows from the noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from apfast.dia.diasource import (
    DiaSourceConfig,
    fast_psf,
    forced_photometry,
    psf_basis,
    run_dia_detection,
)
from apfast.diffim.decorrelate import ConvolvedPsf
from apfast.errors import ConfigError, InputError
from apfast.exposure import Exposure, PhotoCalib, VisitInfo
from apfast.kernels import dipole as kd
from apfast.kernels import forced as kf
from apfast.kernels.measure import lanczos_shift
from apfast.masks import bitmask
from apfast.psf import GaussianPsf, PolynomialPixelPsf, PsfModel
from apfast.run.config import load_config

SIGMA = 2.0  # PSF sigma, pixels
# the unit tests check errors against the exact injected noise: no variance rescaling, no template floor
EXACT = DiaSourceConfig(scale_variance=False, template_flux_error=0.0)

NOISE = 10.0  # per-pixel noise sigma
PIXSCALE = 0.26  # arcsec / pixel
#: S/N of a PSF-fit flux F on white noise: F / (NOISE sqrt(4 pi) SIGMA)
PSF_NOISE = NOISE * math.sqrt(4 * math.pi) * SIGMA

#: The DiaSource columns the stage must fill (names exactly as the APDB schema).
REQUIRED = [
    "x", "xErr", "y", "yErr", "ra", "raErr", "dec", "decErr", "ra_dec_Cov", "centroid_flag", "apFlux",
    "apFluxErr", "apFlux_flag", "apFlux_flag_apertureTruncated", "isNegative", "snr", "psfFlux", "psfFluxErr",
    "psfChi2", "psfNdata", "psfFlux_flag", "psfFlux_flag_edge", "psfFlux_flag_noGoodPixels", "dipoleMeanFlux",
    "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr", "dipoleLength", "dipoleAngle", "dipoleChi2",
    "dipoleNdata", "isDipole", "dipoleFitAttempted", "scienceFlux", "scienceFluxErr", "forced_PsfFlux_flag",
    "forced_PsfFlux_flag_edge", "forced_PsfFlux_flag_noGoodPixels", "templateFlux", "templateFluxErr", "ixx",
    "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF", "shape_flag", "extendedness", "bboxSize", "pixelFlags",
    "pixelFlags_bad", "pixelFlags_cr", "pixelFlags_crCenter", "pixelFlags_edge", "pixelFlags_nodata",
    "pixelFlags_nodataCenter", "pixelFlags_interpolated", "pixelFlags_interpolatedCenter", "pixelFlags_offimage",
    "pixelFlags_saturated", "pixelFlags_saturatedCenter", "pixelFlags_suspect", "pixelFlags_suspectCenter"
]


def make_wcs(shape: tuple[int, int]) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-PIXSCALE / 3600, PIXSCALE / 3600]
    return w


def add_gaussian(img: np.ndarray, x: float, y: float, flux: float, sigma: float = SIGMA) -> None:
    """Add a point-sampled circular Gaussian of total ``flux`` at ``(x, y)`` in place."""
    r = int(7 * sigma)
    ix, iy = int(round(x)), int(round(y))
    yy, xx = np.mgrid[iy - r : iy + r + 1, ix - r : ix + r + 1]
    ok = (yy >= 0) & (yy < img.shape[0]) & (xx >= 0) & (xx < img.shape[1])
    prof = flux / (2 * np.pi * sigma * sigma) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma * sigma))
    img[yy[ok], xx[ok]] += prof[ok]


def exposure(img: np.ndarray, *, psf: PsfModel | None = None, zp: float = 31.4, mask: np.ndarray | None = None,
             visit_info: VisitInfo | None = None) -> Exposure:  # fmt: skip
    return Exposure(
        img.astype(np.float32), mask=np.zeros(img.shape, np.int32) if mask is None else mask,
        variance=np.full(img.shape, NOISE**2, np.float32),
        psf=psf or GaussianPsf(SIGMA, 25), wcs=make_wcs(img.shape), photo_calib=PhotoCalib(zp), visit_info=visit_info,
    )  # fmt: skip


def grid_positions(rng: np.random.Generator, shape: tuple[int, int], step: int = 70, margin: int = 40):
    g1 = np.arange(margin, shape[1] - margin + 1, step)
    g0 = np.arange(margin, shape[0] - margin + 1, step)
    gx, gy = np.meshgrid(g1, g0)
    return gx.ravel() + rng.uniform(-0.5, 0.5, gx.size), gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)


def match(cols: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, radius: float = 2.0):
    d, i = cKDTree(np.c_[cols["x"], cols["y"]]).query(np.c_[x, y])
    return d < radius, i


# --------------------------------------------------------------------------- config
def test_config_defaults_and_validation():
    cfg = DiaSourceConfig()
    det = cfg.detection  # Rubin's DIA detection: 5 sigma of the variance, both signs merged with growFootprint 2
    assert (det.threshold, det.threshold_type, det.polarity, det.grow_merge) == (5.0, "variance", "both", 2)
    assert det.n_sigma_to_grow == 2.4 and det.smooth and det.min_pixels == 1 and cfg.aperture_radius == 12.0
    assert cfg.do_dipole_fit and cfg.dipole_max_separation_sigma == 5.0
    assert cfg.dipole_min_snr == pytest.approx(5 * math.sqrt(2)) and cfg.dipole_max_flux_ratio == 0.65
    for key, value in (("aperture_radius", 0.0), ("dipole_max_flux_ratio", 0.4), ("dipole_max_iter", 0),
                       ("bad_mask_planes", ("NOPE",))):  # fmt: skip
        with pytest.raises(ConfigError, match=f"dia.{key}"):
            DiaSourceConfig(**{key: value})
    # the detection options moved to dia.detection; the old flat spellings still set them
    for key, new, value in (("threshold", "threshold", -1.0), ("grow_footprint", "grow_merge", -1)):
        with pytest.raises(ConfigError, match=rf"dia\.detection\.{new} = .*\(from -c dia\.{key}="):
            load_config(overrides=[f"dia.{key}={value}"])
    cfg = load_config(overrides=["dia.threshold=6", "dia.grow_footprint=3"]).dia
    assert (cfg.detection.threshold, cfg.detection.grow_merge) == (6.0, 3)


# --------------------------------------------------------------------------- detection + measurement
@pytest.fixture(scope="module")
def field():
    """1024^2 difference with 196 point sources of both signs at S/N 10-50 on a grid, plus truth."""
    rng = np.random.default_rng(11)
    shape = (1024, 1024)
    img = rng.normal(0.0, NOISE, shape)
    x, y = grid_positions(rng, shape)
    snr = rng.uniform(10, 50, x.size)
    flux = np.where(rng.uniform(size=x.size) < 0.5, -1.0, 1.0) * snr * PSF_NOISE
    for a, b, f in zip(x, y, flux, strict=True):
        add_gaussian(img, a, b, f)
    vi = VisitInfo(visit=289400, ccdnum=35, filter="g", mjd=58909.0, exptime=60.0)
    diff = exposure(img, visit_info=vi)
    sci = exposure(np.zeros(shape))
    res = run_dia_detection(diff, sci, None, config=EXACT)
    return {"x": x, "y": y, "flux": flux, "res": res, "diff": diff}


def test_completeness_flux_and_centroid_pulls(field):
    res, x, y, flux = field["res"], field["x"], field["y"], field["flux"]
    c = res.sources
    ok, i = match(c, x, y)
    assert ok.all(), f"missed {np.count_nonzero(~ok)} of {x.size} sources at S/N >= 10"
    assert res.n_sources == x.size  # no spurious or split sources
    assert np.array_equal(c["isNegative"][i], flux < 0)
    assert res.n_positive == np.count_nonzero(flux > 0) and res.n_negative == np.count_nonzero(flux < 0)
    assert res.n_dipole == 0 and not c["dipoleFitAttempted"].any()
    pull = (c["psfFlux"][i] - flux) / c["psfFluxErr"][i]  # zp 31.4: 1 count = 1 nJy
    n = x.size
    assert abs(pull.mean()) < 4 / math.sqrt(n)
    assert 0.85 < pull.std() < 1.15
    for ax in ("x", "y"):
        p = (c[ax][i] - field[ax]) / c[ax + "Err"][i]
        assert abs(p.mean()) < 4 / math.sqrt(n) and 0.8 < p.std() < 1.25, ax
    # aperture flux (12 px) of a Gaussian holds all the flux; its error is sqrt(pi r^2) NOISE
    ap = (c["apFlux"][i] - flux) / c["apFluxErr"][i]
    assert abs(ap.mean()) < 4 / math.sqrt(n) and 0.8 < ap.std() < 1.2
    assert np.allclose(c["apFluxErr"], math.sqrt(math.pi * 144) * NOISE, rtol=0.02)
    # adaptive moments of a point source equal the PSF's (SIGMA^2) within the noise
    assert np.median(c["ixx"]) == pytest.approx(SIGMA**2, rel=0.05)
    assert np.allclose(c["ixxPSF"], SIGMA**2, rtol=0.01) and np.allclose(c["ixyPSF"], 0.0, atol=0.01)
    # snr is the detection significance: close to the PSF-fit S/N
    assert np.median(c["snr"][i] / np.abs(c["psfFlux"][i] / c["psfFluxErr"][i])) == pytest.approx(1.0, abs=0.1)


def test_columns_follow_the_apdb_schema(field):
    c, diff = field["res"].sources, field["diff"]
    missing = [k for k in REQUIRED if k not in c]
    assert not missing
    n = field["res"].n_sources
    assert all(v.shape == (n,) for v in c.values())
    for k in ("psfNdata", "dipoleNdata", "bboxSize"):
        assert c[k].dtype == np.int32
    assert (c["psfNdata"] == 625).all() and (c["dipoleNdata"] == 0).all() and (c["bboxSize"] > 0).all()
    for k in ("x", "y", "ra", "dec"):
        assert np.isfinite(c[k]).all()  # NOT NULL
    for k in REQUIRED:
        if k.endswith("_flag") or k.startswith("pixelFlags") or k.startswith("is") or k.endswith("Attempted"):
            assert c[k].dtype == bool, k
    assert np.isnan(c["templateFlux"]).all() and np.isnan(c["extendedness"]).all()
    # visit columns from the VisitInfo
    assert (c["visit"] == 289400).all() and (c["detector"] == 35).all() and (c["band"] == "g").all()
    assert np.allclose(c["midpointMjdTai"], 58909.0 + 30.0 / 86400)
    # sky position and its error from the WCS: 0.26"/px, so raErr cos(dec) = decErr = 0.26/3600 xErr
    ra, dec = diff.wcs.pixel_to_world_values(c["x"], c["y"])
    assert np.allclose(c["ra"], ra, atol=1e-10) and np.allclose(c["dec"], dec, atol=1e-10)
    cosd = np.cos(np.radians(c["dec"]))
    assert np.allclose(c["raErr"] * cosd, PIXSCALE / 3600 * c["xErr"], rtol=1e-3)
    assert np.allclose(c["decErr"], PIXSCALE / 3600 * c["yErr"], rtol=1e-3)
    assert np.allclose(c["ra_dec_Cov"], 0.0, atol=1e-14)
    # the returned mask has DETECTED on positive and DETECTED_NEGATIVE on negative footprints
    m = field["res"].mask
    assert m.shape == diff.shape
    pos = c["isNegative"] == 0
    iy, ix = np.round(c["y"]).astype(int), np.round(c["x"]).astype(int)
    assert (m[iy[pos], ix[pos]] & bitmask("DETECTED")).all()
    assert (m[iy[~pos], ix[~pos]] & bitmask("DETECTED_NEGATIVE")).all()
    assert not (diff.mask & bitmask(("DETECTED", "DETECTED_NEGATIVE"))).any()  # input untouched


def test_pure_noise_gives_few_false_detections(rng):
    # Kaiser: ~1.5 per 2k x 4k per sign at 5 sigma; a 1k x 1k image should give well under 10
    img = rng.normal(0.0, NOISE, (1024, 1024))
    res = run_dia_detection(exposure(img), exposure(np.zeros_like(img)), None, config=EXACT)
    assert res.n_sources < 10


# --------------------------------------------------------------------------- dipoles
def _dipole_image(rng, sep, flux, angle, shape=(128, 128)):
    img = rng.normal(0.0, NOISE, shape)
    xc, yc = shape[1] / 2 + rng.uniform(-0.5, 0.5), shape[0] / 2 + rng.uniform(-0.5, 0.5)
    dx, dy = 0.5 * sep * math.cos(angle), 0.5 * sep * math.sin(angle)
    add_gaussian(img, xc + dx, yc + dy, flux)
    add_gaussian(img, xc - dx, yc - dy, -flux)
    return img, xc, yc


def test_dipole_is_one_source_fitted_within_errors(rng):
    sep, flux = 3.0, 5000.0  # each lobe S/N ~ 70
    rows = []
    for _ in range(12):
        angle = rng.uniform(-math.pi, math.pi)
        img, xc, yc = _dipole_image(rng, sep, flux, angle)
        res = run_dia_detection(exposure(img), exposure(np.zeros_like(img)), None, config=EXACT)
        c = res.sources
        assert res.n_sources == 1 and res.n_dipole == 1
        assert c["isDipole"][0] and c["dipoleFitAttempted"][0] and c["dipoleNdata"][0] > 100
        dang = (c["dipoleAngle"][0] - math.degrees(angle) + 180) % 360 - 180
        rows.append([
            (c["dipoleMeanFlux"][0] - flux) / c["dipoleMeanFluxErr"][0],
            c["dipoleFluxDiff"][0] / c["dipoleFluxDiffErr"][0],
            c["dipoleLength"][0] / PIXSCALE, dang, (c["x"][0] - xc) / c["xErr"][0], (c["y"][0] - yc) / c["yErr"][0],
            c["dipoleChi2"][0] / (c["dipoleNdata"][0] - 7),
        ])  # fmt: skip
    a = np.array(rows)
    assert (np.abs(a[:, :2]) < 4).all()  # mean flux and flux difference within 4 sigma of truth
    assert (np.abs(a[:, 4:6]) < 4).all()  # centroid = midpoint of the lobes
    # separation and angle: the scatter seen for this S/N is ~0.2 px and ~1 degree
    assert abs(a[:, 2].mean() - sep) < 0.15 and a[:, 2].std() < 0.4
    assert np.abs(a[:, 3]).max() < 5.0
    assert np.abs(a[:, 6] - 1).max() < 0.2  # chi2 per degree of freedom ~ 1


def test_single_psf_and_lopsided_pair_are_not_dipoles(rng):
    img = rng.normal(0.0, NOISE, (128, 128))
    add_gaussian(img, 64.3, 63.8, 4000.0)
    c = run_dia_detection(exposure(img), exposure(np.zeros_like(img)), None, config=EXACT).sources
    assert c["x"].size == 1 and not c["isDipole"][0] and not c["dipoleFitAttempted"][0]
    assert np.isnan(c["dipoleMeanFlux"][0]) and c["dipoleNdata"][0] == 0
    # a bright positive source with a faint negative residual 6 px away: fitted, but one lobe has ~90% of the flux
    img = rng.normal(0.0, NOISE, (128, 128))
    add_gaussian(img, 64.3, 63.8, 9000.0)
    add_gaussian(img, 70.3, 63.8, -1000.0)
    res = run_dia_detection(exposure(img), exposure(np.zeros_like(img)), None, config=EXACT)
    c = res.sources
    assert c["x"].size == 1 and c["dipoleFitAttempted"][0] and not c["isDipole"][0]
    assert res.n_positive == 1 and res.n_dipole == 0
    assert c["dipoleFluxDiff"][0] > 0.6 * (c["dipoleMeanFlux"][0] * 2)


def test_dipole_kernel_recovers_its_own_model_exactly():
    """Noise-free data made with the kernel's own model: LM must land on the true parameters."""
    k = 25
    stamp = GaussianPsf(2.2, k).compute_image(0, 0)
    ny, nx = 60, 60
    truth = np.array([31.3, 29.6, 28.1, 30.7, 3000.0, 2500.0, 1.5])
    yy, xx = np.mgrid[:ny, :nx]
    px, py = xx.ravel().astype(np.int64), yy.ravel().astype(np.int64)
    npix = px.size
    model = np.empty(npix)
    scratch = [np.empty(npix) for _ in range(6)]
    kd.dipole_model(truth, stamp, px, py, npix, model, np.empty((npix, 7)), False, *scratch, np.empty((k, k)))
    img = model.reshape(ny, nx).astype(np.float32)
    var = np.ones((ny, nx), np.float32)
    start = np.array([[32.0, 30.0, 27.0, 31.0]])
    out = [np.empty((1, 7)), np.empty((1, 7, 7)), np.empty(1), np.zeros(1, np.int32), np.zeros(1, np.int32)]
    kd.fit_dipoles(img, var, np.zeros((ny, nx), np.int32), np.ones((ny, nx), np.int32), np.ones(1, np.int32),
                   np.array([[0, ny, 0, nx]], np.int32), stamp[None], np.ones((1, 1)), False, start, 0, 10.0, 100,
                   *out)  # fmt: skip
    p, cov, chi2, nd, fl = out
    assert fl[0] == 0 and nd[0] == npix
    assert np.allclose(p[0, :4], truth[:4], atol=2e-3) and np.allclose(p[0, 4:6], truth[4:6], rtol=2e-3)
    assert chi2[0] < 1e-3  # float32 rounding of the data only
    assert (np.diag(cov[0]) > 0).all()


def test_cholesky_solve_matches_numpy(rng):
    a = rng.normal(size=(7, 7))
    a = a @ a.T + 7 * np.eye(7)
    b = rng.normal(size=7)
    out = np.empty(7)
    assert kd.cholesky_solve(a, b, out, np.empty((7, 7)))
    assert np.allclose(out, np.linalg.solve(a, b), rtol=1e-10)
    assert not kd.cholesky_solve(-a, b, out, np.empty((7, 7)))


# --------------------------------------------------------------------------- forced photometry
def _naive_forced(image, variance, psf, x, y):
    """Obvious NumPy version: Lanczos-shifted PSF, weighted least squares over the in-image stamp."""
    k = psf.shape[0]
    h = k // 2
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    shifted = np.empty_like(psf)
    lanczos_shift(psf, x - ix, y - iy, shifted)
    ys, xs = np.mgrid[iy - h : iy + h + 1, ix - h : ix + h + 1]
    ok = (ys >= 0) & (ys < image.shape[0]) & (xs >= 0) & (xs < image.shape[1])
    d = image[ys[ok], xs[ok]].astype(np.float64)
    w = 1.0 / variance[ys[ok], xs[ok]].astype(np.float64)
    p = shifted[ok]
    f = (p * d * w).sum() / (p * p * w).sum()
    return f, 1.0 / math.sqrt((p * p * w).sum()), ((d - f * p) ** 2 * w).sum()


def test_forced_kernel_matches_naive(rng):
    img = rng.normal(0, 3, (50, 60)).astype(np.float32)
    var = rng.uniform(5, 20, img.shape).astype(np.float32)
    psf = GaussianPsf(1.7, 15).compute_image(0, 0)
    x = np.array([30.2, 5.4, 0.3, 58.9])
    y = np.array([25.7, 30.1, 2.2, 48.5])
    n = x.size
    out = [np.empty(n), np.empty(n), np.empty(n), np.zeros(n, np.int32), np.zeros(n, np.int32)]
    kf.forced_psf_flux(img, var, np.zeros(img.shape, np.int32), psf[None], np.ones((n, 1)), False, x, y, 0, *out)
    for s in range(n):
        f, e, c = _naive_forced(img, var, psf, x[s], y[s])
        assert out[0][s] == pytest.approx(f, rel=1e-9, abs=1e-9)
        assert out[1][s] == pytest.approx(e, rel=1e-9)
        assert out[2][s] == pytest.approx(c, rel=1e-6)
    assert list(out[4]) == [0, kf.FLAG_EDGE, kf.FLAG_EDGE, kf.FLAG_EDGE]


def test_forced_photometry_unbiased_with_matching_errors(rng):
    shape = (400, 400)
    x, y = grid_positions(rng, shape, step=40, margin=20)
    flux = 1500.0  # S/N ~ 21
    clean = np.zeros(shape)
    for a, b in zip(x, y, strict=True):
        add_gaussian(clean, a, b, flux)
    pulls = []
    for _ in range(20):
        exp = exposure(clean + rng.normal(0.0, NOISE, shape), zp=30.0)
        out = forced_photometry(exp, x, y)
        njy = exp.photo_calib.instflux_to_njy(flux)
        pulls.append((out["flux"] - njy) / out["fluxErr"])
        assert not out["flag"].any() and not out["flag_edge"].any()
    p = np.concatenate(pulls)
    assert abs(p.mean()) < 4 / math.sqrt(p.size) + 0.02
    assert abs(p.std() - 1.0) < 0.1
    assert np.allclose(out["fluxErr"], exp.photo_calib.instflux_to_njy(PSF_NOISE), rtol=0.01)


def test_forced_photometry_edges_and_masks(rng):
    img = rng.normal(0.0, NOISE, (100, 100))
    add_gaussian(img, 1.2, 50.0, 3000.0)
    mask = np.zeros(img.shape, np.int32)
    mask[70:90, 70:90] = bitmask("BAD")
    exp = exposure(img, mask=mask)
    out = forced_photometry(exp, [50.0, 1.2, 99.0, 80.0, -40.0, np.nan], [50.0, 50.0, 99.0, 80.0, 50.0, 3.0])
    assert list(out["flag_edge"]) == [False, True, True, False, True, True]
    assert list(out["flag_noGoodPixels"]) == [False, False, False, False, True, True]
    assert list(out["flag"]) == [False, False, False, False, True, True]
    assert out["flux"][1] == pytest.approx(3000.0, abs=5 * out["fluxErr"][1])  # truncated stamp still fits
    assert out["fluxErr"][3] > 2 * out["fluxErr"][0]  # masked centre: only the wings are used
    assert np.isnan(out["flux"][4:]).all()
    with pytest.raises(InputError, match="photo_calib"):
        forced_photometry(Exposure(img, variance=np.ones_like(img), psf=GaussianPsf(2, 11)), [1.0], [1.0])
    with pytest.raises(InputError, match="1-D"):
        forced_photometry(exp, [1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- PSF models
def _varying_psf(shape):
    """PolynomialPixelPsf mixing two Gaussians (sigma 1.7 and 2.6) linearly in x."""
    k = 31
    b = np.stack([GaussianPsf(1.7, k).compute_image(0, 0), GaussianPsf(2.6, k).compute_image(0, 0)])
    coeffs = np.array([[0.5, -0.5, 0.0], [0.5, 0.5, 0.0]])  # w0 = (1 - xn)/2, w1 = (1 + xn)/2
    return PolynomialPixelPsf(b, coeffs, 1, shape[1] / 2, shape[0] / 2, shape[1] / 2, shape[0] / 2)


def test_polynomial_psf_sources_measured_with_the_local_psf(rng):
    shape = (512, 1024)
    psf = _varying_psf(shape)
    x, y = grid_positions(rng, shape, step=64, margin=40)
    flux = 3000.0
    img = rng.normal(0.0, NOISE, shape)
    for a, b in zip(x, y, strict=True):
        w1 = (1 + (a - shape[1] / 2) / (shape[1] / 2)) / 2
        add_gaussian(img, a, b, (1 - w1) * flux, 1.7)
        add_gaussian(img, a, b, w1 * flux, 2.6)
    diff = exposure(img, psf=psf)
    res = run_dia_detection(diff, exposure(img, psf=psf), exposure(np.zeros(shape), psf=psf, zp=32.0), config=EXACT)
    c = res.sources
    ok, i = match(c, x, y)
    assert ok.all()
    pull = (c["psfFlux"][i] - flux) / c["psfFluxErr"][i]
    assert abs(pull.mean()) < 4 / math.sqrt(x.size) + 0.05 and 0.8 < pull.std() < 1.2
    # the science image is the same pixels: same flux; the template is blank and its zero point 32
    assert np.allclose(c["scienceFlux"], c["psfFlux"], rtol=1e-3, atol=0.05 * np.median(c["psfFluxErr"]))
    t = (c["templateFlux"] / c["templateFluxErr"])[i]
    assert abs(t.mean()) < 0.3 and c["templateFluxErr"][0] == pytest.approx(
        PhotoCalib(32.0).instflux_to_njy(c["psfFluxErr"][0]), rel=0.05
    )
    # PSF moments follow the position: the wider component dominates at large x
    hi = np.argmax(c["x"])
    lo = np.argmin(c["x"])
    assert c["ixxPSF"][hi] > c["ixxPSF"][lo] + 1.0


def test_psf_representations_are_exact_or_close():
    shape = (400, 300)
    poly = _varying_psf(shape)
    conv = ConvolvedPsf(poly, GaussianPsf(1.0, 7).compute_image(0, 0), size=31)
    x = np.array([10.0, 150.5, 290.0])
    y = np.array([5.0, 200.0, 390.0])
    for model in (poly, conv):
        basis, w, per = psf_basis(model, x, y, shape=shape, xy0=(100, 50))
        assert not per
        fm = fast_psf(model, shape=shape, xy0=(100, 50))
        for s in range(3):
            stamp = np.tensordot(w[s], basis, axes=1)
            truth = model.compute_image(x[s] + 100, y[s] + 50)
            assert np.allclose(stamp / stamp.sum(), truth, atol=1e-14)
            assert np.allclose(fm.compute_image(x[s], y[s]), truth, atol=1e-14)

    class Opaque(PsfModel):  # a model with no linear basis: evaluated on a grid
        size = 31

        def compute_image(self, x, y):
            return conv.compute_image(x, y)

        def to_hdus(self):  # pragma: no cover - not written
            return []

        @classmethod
        def from_hdus(cls, hdus):  # pragma: no cover
            return cls()

    many_x = np.linspace(0, 299, 200)
    many_y = np.linspace(0, 399, 200)
    basis, w, per = psf_basis(Opaque(), many_x, many_y, shape=shape, grid_spacing=64)
    assert not per and (np.count_nonzero(w, axis=1) <= 4).all() and np.allclose(w.sum(axis=1), 1.0)
    for s in (0, 77, 199):
        stamp = np.tensordot(w[s], basis, axes=1)
        assert np.abs(stamp / stamp.sum() - conv.compute_image(many_x[s], many_y[s])).max() < 2e-4
    basis, w, per = psf_basis(Opaque(), x, y, shape=shape)  # few positions: exact stamps
    assert per and np.allclose(basis[1], conv.compute_image(x[1], y[1]))


# --------------------------------------------------------------------------- flags and inputs
def test_pixel_flags_and_edges(rng):
    img = rng.normal(0.0, NOISE, (200, 200))
    for a, b in ((50, 50), (150, 50), (50, 150), (2.0, 100)):
        add_gaussian(img, a, b, 5000.0)
    mask = np.zeros(img.shape, np.int32)
    mask[50, 50] = bitmask("SAT")
    mask[53, 150] = bitmask("CR")  # in the footprint, not the centre
    mask[150, 50] = bitmask("INTRP")
    c = run_dia_detection(exposure(img, mask=mask), exposure(np.zeros_like(img)), None, config=EXACT).sources
    assert c["x"].size == 4
    order = np.lexsort((c["x"], c["y"]))
    c = {k: v[order] for k, v in c.items()}  # (50,50), (150,50), (2,100), (50,150)
    assert list(c["pixelFlags_saturated"]) == [True, False, False, False]
    assert list(c["pixelFlags_saturatedCenter"]) == [True, False, False, False]
    assert list(c["pixelFlags_cr"]) == [False, True, False, False]
    assert not c["pixelFlags_crCenter"].any()
    assert list(c["pixelFlags_interpolatedCenter"]) == [False, False, False, True]
    assert list(c["pixelFlags_edge"]) == [False, False, True, False]
    assert list(c["psfFlux_flag_edge"]) == [False, False, True, False]
    assert list(c["apFlux_flag_apertureTruncated"]) == [False, False, True, False]
    assert list(c["pixelFlags"]) == [True, True, True, True]
    assert not c["pixelFlags_offimage"].any()
    # the saturated pixel is left out of the PSF fit (bad_mask_planes), the flux is still right
    assert c["psfNdata"][0] == 624
    assert c["psfFlux"][0] == pytest.approx(5000.0, abs=4 * c["psfFluxErr"][0])


def test_input_errors_and_inputs_unchanged(rng):
    img = rng.normal(0.0, NOISE, (64, 64))
    diff = exposure(img)
    before = diff.image.copy()
    with pytest.raises(InputError, match="shape"):
        run_dia_detection(diff, exposure(np.zeros((64, 65))), None)
    with pytest.raises(InputError, match="no wcs"):
        run_dia_detection(Exposure(img, variance=np.ones_like(img), psf=GaussianPsf(2, 11),
                                   photo_calib=PhotoCalib(30)), diff, None)  # fmt: skip
    with pytest.raises(InputError, match="no psf"):
        run_dia_detection(Exposure(img, variance=np.ones_like(img)), diff, None)
    sci = Exposure(img, variance=np.ones_like(img))  # no PSF on the science image
    add_gaussian(diff.image, 30, 30, 5000.0)
    with pytest.raises(InputError, match="science exposure has no PSF"):
        run_dia_detection(diff, sci, None, config=EXACT)
    assert not np.array_equal(diff.image, before)  # (we changed it ourselves above)
    snapshot = diff.image.copy()
    run_dia_detection(diff, exposure(np.zeros_like(img)), None)
    assert np.array_equal(diff.image, snapshot)


# ------------------------------------------------------------------ false-positive controls (on by default)
def test_noise_scale_factor_measures_psf_scale_noise(rng: np.random.Generator) -> None:
    """1 for white noise with the right variance; the true ratio when the variance plane is off or the
    noise is correlated (what warping a template does: less per-pixel variance, same PSF-scale noise)."""
    from scipy.ndimage import gaussian_filter

    from apfast.dia.diasource import noise_scale_factor

    shape = (1024, 1024)
    img = rng.normal(0.0, NOISE, shape).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    var = np.full(shape, NOISE**2, np.float32)
    assert noise_scale_factor(img, var, mask, SIGMA) == pytest.approx(1.0, abs=0.03)
    assert noise_scale_factor(img, var / 1.3**2, mask, SIGMA) == pytest.approx(1.3, rel=0.03)
    # correlated noise whose per-pixel variance is NOISE^2 (the plane is "right" pixel by pixel)
    corr = gaussian_filter(rng.normal(0.0, 1.0, shape), 0.8)
    corr = (corr / corr.std() * NOISE).astype(np.float32)
    assert noise_scale_factor(corr, var, mask, SIGMA) > 1.3
    # masked pixels and NaNs are left out
    bad = img.copy()
    bad[:, :300] = np.nan
    mask[:, :300] = 1
    assert noise_scale_factor(bad, var, mask, SIGMA) == pytest.approx(1.0, abs=0.04)


def test_variance_rescaling_removes_false_detections(rng: np.random.Generator) -> None:
    """A variance plane 30% short of the real noise turns noise into '5 sigma' sources; rescaling fixes it."""
    shape = (1024, 1024)
    img = rng.normal(0.0, 1.3 * NOISE, shape).astype(np.float32)
    n_plain = run_dia_detection(exposure(img), exposure(np.zeros_like(img)), None, config=EXACT).n_sources
    n_scaled = run_dia_detection(exposure(img), exposure(np.zeros_like(img)), None,
                                 config=DiaSourceConfig(template_flux_error=0.0)).n_sources
    assert n_plain >= 10
    assert n_scaled <= 2


def test_template_floor_hides_subtraction_residuals_of_bright_stars(rng: np.random.Generator) -> None:
    """A 1.5% PSF-matching residual on a bright static star is not a DIA source with the floor; a real
    transient of the same absolute flux on empty sky still is."""
    shape = (256, 512)
    k = 25
    stamp = GaussianPsf(SIGMA, k).compute_image(0, 0)
    star = np.zeros(shape, np.float32)
    star[100 - k // 2:100 + k // 2 + 1, 120 - k // 2:120 + k // 2 + 1] += 2e6 * stamp
    diff = rng.normal(0.0, NOISE, shape).astype(np.float32)
    diff += 0.015 * star  # the residual at the star
    diff[100 - k // 2:100 + k // 2 + 1, 380 - k // 2:380 + k // 2 + 1] += 0.015 * 2e6 * stamp  # a transient
    templ = exposure(star + rng.normal(0.0, NOISE, shape).astype(np.float32))
    plain = run_dia_detection(exposure(diff), exposure(star), templ, config=EXACT).sources
    floor = run_dia_detection(exposure(diff), exposure(star), templ,
                              config=DiaSourceConfig(scale_variance=False)).sources
    assert sorted(np.round(plain["x"] / 10).astype(int).tolist()) == [12, 38]
    assert np.round(floor["x"] / 10).astype(int).tolist() == [38]
