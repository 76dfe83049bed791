"""Zero point and aperture correction against truth, with outliers and noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apfast.ccd.photocal import ApCorrModel, PhotoCalConfig, PhotoCalError, fit_aperture_correction, fit_zero_point
from apfast.errors import ConfigError


def test_zero_point_recovers_truth_with_outliers(rng: np.random.Generator) -> None:
    zp_true = 28.7
    n = 300
    mag = rng.uniform(15, 21, n)
    flux = 10 ** (-0.4 * (mag - zp_true))
    ferr = np.sqrt(flux + 400.0)  # Poisson + sky
    meas = flux + rng.normal(0, ferr)
    merr = np.full(n, 0.01)
    ref = mag + rng.normal(0, merr)
    ref[:20] += rng.choice([-1.5, 2.0], 20)  # variables, blends, mismatches
    res = fit_zero_point(meas, ferr, ref, merr)
    assert abs(res.zero_point - zp_true) < max(4 * res.zero_point_err, 0.005)
    assert res.zero_point_err < 0.005
    assert not res.used[:20].any()
    assert res.photo_calib.zero_point == res.zero_point
    # a 20 mag star then comes out at 20 mag
    assert float(res.photo_calib.instflux_to_mag(10 ** (-0.4 * (20 - zp_true)))) == pytest.approx(20, abs=0.01)


def test_colour_term(rng: np.random.Generator) -> None:
    zp_true = 27.0
    n = 200
    mag = rng.uniform(16, 20, n)
    colour = rng.uniform(0, 1.5, n)
    # the instrument band differs from the reference band by a colour term 0.1 * (g - r)
    flux = 10 ** (-0.4 * (mag + 0.1 * colour - zp_true))
    cfg = PhotoCalConfig(colour_terms=("g:g-r:0.0,0.1",))
    r1, r2, c = cfg.colour_term("g")
    assert (r1, r2, c) == ("g", "r", (0.0, 0.1))
    res = fit_zero_point(flux, np.sqrt(flux), mag, np.full(n, 0.005), colour=colour, colour_coeffs=c, config=cfg)
    assert res.zero_point == pytest.approx(zp_true, abs=0.002)
    plain = fit_zero_point(flux, np.sqrt(flux), mag, np.full(n, 0.005))
    assert abs(plain.zero_point - zp_true) > 0.03  # ignoring the term biases it


def test_too_few_stars_message() -> None:
    with pytest.raises(PhotoCalError, match=r"calibrate.photocal.min_stars") as exc:
        fit_zero_point(np.array([100.0, 200.0]), np.array([1.0, 1.0]), np.array([20.0, 19.0]), np.array([0.01, 0.01]))
    assert exc.value.metadata["n_precise"] == 2


def test_aperture_correction_spatial(rng: np.random.Generator) -> None:
    shape = (4096, 2048)
    n = 150
    x = rng.uniform(0, shape[1], n)
    y = rng.uniform(0, shape[0], n)
    true = 1.05 + 0.02 * (x - 1024) / 1024 - 0.01 * (y - 2048) / 2048
    psf = 10 ** rng.uniform(4, 5.5, n)
    ap = psf * true * (1 + rng.normal(0, 0.005, n))
    ap[:5] *= 1.5  # blends
    model = fit_aperture_correction(x, y, psf, ap, shape=shape)
    assert model.order == 1
    grid = model(np.array([0, 2047, 1024]), np.array([0, 4095, 2048]))
    expect = 1.05 + 0.02 * (np.array([0, 2047, 1024]) - 1024) / 1024 - 0.01 * (np.array([0, 4095, 2048]) - 2048) / 2048
    np.testing.assert_allclose(grid, expect, atol=0.003)
    from astropy.io import fits

    h = fits.Header()
    for k, v, c in model.to_header_cards():
        h[k] = (v, c)
    back = ApCorrModel.from_header(h)
    np.testing.assert_allclose(back(x, y), model(x, y))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="colour_terms entry 'g-r'"):
        PhotoCalConfig(colour_terms=("g-r",))
    with pytest.raises(ConfigError, match="calibrate.photocal.n_sigma"):
        PhotoCalConfig(n_sigma=0)


def test_decam_colour_terms_put_ps1_on_the_decam_system() -> None:
    """The DECam description's PS1 -> DECam terms: without them a PS1 zero point is off by ~0.04 mag in g."""
    from apfast.camera import get_camera
    from apfast.sim.simulate_build import decam_to_ps1

    cam = get_camera("DECam")
    assert len(cam.colour_terms) == 5 and cam.colour_range == (0.4, 2.7) and cam.ref_bands == {"Y": "y"}
    rng = np.random.default_rng(11)
    n = 400
    g = rng.uniform(16.5, 20.0, n)
    gi = rng.uniform(0.2, 3.0, n)  # some stars outside the terms' range
    decam = {"g": g, "r": g - 0.45 * gi, "i": g - gi, "z": g - 1.2 * gi}
    ps1 = decam_to_ps1(decam)
    r1, r2, coeffs = PhotoCalConfig(colour_terms=cam.colour_terms).colour_term("g")
    colour = ps1[r1] - ps1[r2]
    np.testing.assert_allclose(ps1["g"] + np.polyval(list(coeffs)[::-1], colour), g, atol=1e-6)  # inverts exactly
    zp_true = 31.0
    flux = 10 ** (-0.4 * (g - zp_true))
    err = 0.002 * flux
    with_terms = fit_zero_point(flux, err, ps1["g"], np.full(n, 0.005), colour=colour, colour_coeffs=coeffs,
                                colour_range=cam.colour_range)
    assert abs(with_terms.zero_point - zp_true) < 0.002
    assert with_terms.n_used < n - 20  # stars outside 0.4 < g - i < 2.7 left out
    without = fit_zero_point(flux, err, ps1["g"], np.full(n, 0.005))
    assert without.zero_point - zp_true == pytest.approx(-0.045, abs=0.02)


def test_camera_photometry_table_errors_name_the_file(tmp_path: Path) -> None:
    from apfast.camera import load_camera

    src = (Path(__file__).parents[2] / "src" / "apfast" / "camera" / "decam.toml").read_text()
    bad = tmp_path / "cam.toml"
    bad.write_text(src.replace("colour_range = [0.4, 2.7]", "colour_range = 0.4"))
    with pytest.raises(ConfigError, match=r"cam\.toml.*colour_range must be \[low, high\]"):
        load_camera(bad)


def test_camera_colour_terms_must_be_a_list(tmp_path: Path) -> None:
    from apfast.camera import load_camera

    src = (Path(__file__).parents[2] / "src" / "apfast" / "camera" / "decam.toml").read_text()
    start = src.index("colour_terms = [")
    end = src.index("]", start) + 1
    bad = tmp_path / "cam.toml"
    bad.write_text(src[:start] + 'colour_terms = "g:g-i:0.1"' + src[end:])
    with pytest.raises(ConfigError, match=r"cam\.toml.*colour_terms must be a list"):
        load_camera(bad)
