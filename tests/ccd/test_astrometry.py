"""Astrometry: pattern matching from a WCS off by 10 arcsec and 0.1 deg, TAN-SIP fit accuracy, failures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apfast.ccd.astrometry import AstrometryConfig, AstrometryError, fit_tan_sip, solve_astrometry

SHAPE = (4096, 2048)
SCALE = 0.2636 / 3600.0


def _wcs(ra0: float, dec0: float, rot_deg: float, sip: bool, dx: float = 0.0, dy: float = 0.0) -> WCS:
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, SHAPE[1], SHAPE[0]
    h["CTYPE1"], h["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if sip else ("RA---TAN", "DEC--TAN")
    h["CRPIX1"], h["CRPIX2"] = 1024.5 + dx, 2048.5 + dy
    h["CRVAL1"], h["CRVAL2"] = ra0, dec0
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -SCALE * c, SCALE * s, SCALE * s, SCALE * c
    if sip:
        h["A_ORDER"] = h["B_ORDER"] = 3
        # a few pixels of distortion at the corners, like a CCD off-axis in DECam
        h["A_2_0"], h["A_0_2"], h["A_1_1"], h["A_3_0"] = 2.0e-7, -1.5e-7, 1.0e-7, 3.0e-11
        h["B_0_2"], h["B_2_0"], h["B_1_1"], h["B_0_3"] = 1.8e-7, -1.0e-7, 1.2e-7, -2.0e-11
    return WCS(h)


def _scene(rng: np.random.Generator, n: int = 600):
    true = _wcs(150.0, 2.2, 0.0, True)
    x = rng.uniform(-20, SHAPE[1] + 20, n)
    y = rng.uniform(-20, SHAPE[0] + 20, n)
    ra, dec = true.all_pix2world(x, y, 0)
    mag = 16 + 5 * rng.power(3.0, n)  # more faint stars than bright ones
    on = (x >= 0) & (x < SHAPE[1]) & (y >= 0) & (y < SHAPE[0]) & (mag < 20.5)
    err = 0.01 + 0.05 * 10 ** (0.4 * (mag[on] - 20))
    sx = x[on] + rng.normal(0, err)
    sy = y[on] + rng.normal(0, err)
    flux = 10 ** (-0.4 * (mag[on] - 30))
    # junk detections: cosmic rays, galaxies not in the refcat
    nj = 40
    sx = np.concatenate([sx, rng.uniform(0, SHAPE[1], nj)])
    sy = np.concatenate([sy, rng.uniform(0, SHAPE[0], nj)])
    flux = np.concatenate([flux, 10 ** (-0.4 * (rng.uniform(17, 21, nj) - 30))])
    err = np.concatenate([err, np.full(nj, 0.1)])
    return true, sx, sy, flux, err, ra, dec, mag


def _wcs_error_arcsec(a: WCS, b: WCS) -> np.ndarray:
    gx, gy = np.meshgrid(np.linspace(0, SHAPE[1] - 1, 21), np.linspace(0, SHAPE[0] - 1, 41))
    ra1, dec1 = a.all_pix2world(gx.ravel(), gy.ravel(), 0)
    ra2, dec2 = b.all_pix2world(gx.ravel(), gy.ravel(), 0)
    return np.hypot((ra1 - ra2) * np.cos(np.radians(dec1)), dec1 - dec2) * 3600.0


@pytest.mark.parametrize(("dx_arcsec", "dy_arcsec", "rot"), [(10.0, -7.0, 0.1), (-12.0, 9.0, -0.12), (0.5, 0.5, 0.0)])
def test_solve_from_bad_initial_wcs(rng: np.random.Generator, dx_arcsec: float, dy_arcsec: float, rot: float) -> None:
    true, sx, sy, flux, err, ra, dec, mag = _scene(rng)
    init = _wcs(150.0, 2.2, rot, False, dx=dx_arcsec / 0.2636, dy=dy_arcsec / 0.2636)
    before = _wcs_error_arcsec(init, true)
    # really off (the third case is off only by the distortion and half an arcsec)
    assert before.max() > (5.0 if abs(dx_arcsec) > 1 else 0.5)
    res = solve_astrometry(sx, sy, flux, ra, dec, mag, init, shape=SHAPE, src_err=err)
    after = _wcs_error_arcsec(res.wcs, true)
    rms = float(np.sqrt(np.mean(after**2)))
    assert rms < 0.03, f"WCS error RMS {rms:.4f} arcsec"
    assert after.max() < 0.06  # corners included
    assert res.n_matches > 150
    assert res.rms_arcsec < 0.05


def test_fit_recovers_exact_sip(rng: np.random.Generator) -> None:
    true = _wcs(10.0, -45.0, 30.0, True)
    x = rng.uniform(0, SHAPE[1], 300)
    y = rng.uniform(0, SHAPE[0], 300)
    ra, dec = true.all_pix2world(x, y, 0)
    fit = fit_tan_sip(x, y, ra, dec, order=3, crpix=(1023.5, 2047.5), crval=(10.01, -45.01), shape=SHAPE)
    assert _wcs_error_arcsec(fit, true).max() < 1e-3
    # the inverse polynomials make world->pixel consistent
    px, py = fit.all_world2pix(ra, dec, 0)
    assert np.max(np.hypot(px - x, py - y)) < 1e-3


def test_ra_wrap(rng: np.random.Generator) -> None:
    true = _wcs(359.99, 0.5, 0.0, True)
    x = rng.uniform(0, SHAPE[1], 200)
    y = rng.uniform(0, SHAPE[0], 200)
    ra, dec = true.all_pix2world(x, y, 0)
    fit = fit_tan_sip(x, y, ra, dec, order=3, crpix=(1023.5, 2047.5), crval=(359.99, 0.5), shape=SHAPE)
    assert _wcs_error_arcsec(fit, true).max() < 1e-3


def test_too_few_sources_message(rng: np.random.Generator) -> None:
    true, sx, sy, flux, err, ra, dec, mag = _scene(rng)
    with pytest.raises(AstrometryError, match="usable source") as exc:
        solve_astrometry(sx[:5], sy[:5], flux[:5], ra, dec, mag, true, shape=SHAPE)
    assert exc.value.metadata["n_sources"] == 5
    assert "min_matches" in str(exc.value)


def test_no_references_on_image(rng: np.random.Generator) -> None:
    true, sx, sy, flux, err, ra, dec, mag = _scene(rng)
    with pytest.raises(AstrometryError, match="reference star"):
        solve_astrometry(sx, sy, flux, ra + 5.0, dec, mag, true, shape=SHAPE)


def test_wrong_field_fails_cleanly(rng: np.random.Generator) -> None:
    """References from another field projected onto the CCD: no pattern verifies."""
    true, sx, sy, flux, err, ra, dec, mag = _scene(rng)
    other = np.random.default_rng(99)
    _, _, _, _, _, ra2, dec2, mag2 = _scene(other)
    with pytest.raises(AstrometryError, match="triangle|verifies|match"):
        solve_astrometry(sx, sy, flux, ra2, dec2, mag2, true, shape=SHAPE)


def test_config_validation() -> None:
    from apfast.errors import ConfigError

    with pytest.raises(ConfigError, match="calibrate.astrometry.sip_order = 9"):
        AstrometryConfig(sip_order=9)
