"""FITS tile compression of exposure outputs (``output.compression``): round trips, noise, partial reads."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from test_exposure import full_exposure, poly_psf

from apfast.errors import ConfigError, InputError
from apfast.exposure import COMPRESSIONS, Exposure, read_exposure, write_exposure
from apfast.psf import GaussianPsf
from apfast.repo.butler import Butler
from apfast.repo.writer import OutputConfig, OutputWriter
from apfast.run.config import load_config

SIGMA = 10.0  # sky noise of the synthetic image


def _sky_exposure(rng: np.random.Generator, shape: tuple[int, int] = (256, 192)) -> Exposure:
    """Sky noise (sigma 10) plus Gaussian stars, a block of exact zeros and a few NaNs; variance from it."""
    ny, nx = shape
    image = rng.normal(0.0, SIGMA, shape)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for _ in range(15):
        x0, y0, flux = rng.uniform(0, nx), rng.uniform(0, ny), 10 ** rng.uniform(3, 5)
        image += flux / (2 * np.pi * 2.0**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.0**2))
    image = image.astype(np.float32)
    image[:8, :40] = 0.0  # e.g. NO_DATA filled with zeros: must stay exactly zero
    image[100, 50:53] = np.nan
    variance = (SIGMA**2 + np.maximum(image, 0) / 4.0).astype(np.float32)
    variance[100, 50:53] = np.nan
    mask = (rng.random(shape) < 0.02).astype(np.int32) * 5
    mask[:, 7] |= 1 << 20
    return Exposure(image, mask, variance, psf=GaussianPsf(1.8, 21))


def _types(path) -> dict[str, type]:
    with fits.open(path) as hdul:
        return {h.name: type(h) for h in hdul[1:4]}


@pytest.mark.parametrize("compression", ["none", "mask", "lossless"])
def test_lossless_choices_round_trip_bit_exact(tmp_path, rng, compression):
    exp = full_exposure(rng, poly_psf())
    exp.image[3, 4:9] = np.nan
    exp.image[5, :] = 0.0
    exp.variance[3, 4] = np.inf
    path = write_exposure(tmp_path / "e.fits", exp, config_sha="cd" * 32, compression=compression)
    back = read_exposure(path)
    for plane in ("image", "mask", "variance"):
        a, b = getattr(exp, plane), getattr(back, plane)
        assert b.dtype == a.dtype and b.dtype.isnative and b.flags.c_contiguous
        assert a.tobytes() == b.tobytes(), plane  # bit for bit, NaN payloads included
    assert back.psf == exp.psf and back.visit_info == exp.visit_info and back.photo_calib == exp.photo_calib
    assert back.metadata["PROVSTG"] == "calibrate" and "ZIMAGE" not in back.metadata
    xs, ys = rng.uniform(0, 96, 20), rng.uniform(0, 64, 20)
    assert np.array_equal(np.array(back.wcs.all_pix2world(xs, ys, 0)), np.array(exp.wcs.all_pix2world(xs, ys, 0)))
    types = _types(path)
    assert types["MASK"] is (fits.ImageHDU if compression == "none" else fits.CompImageHDU)
    assert types["IMAGE"] is (fits.CompImageHDU if compression == "lossless" else fits.ImageHDU)
    with fits.open(path) as hdul:  # what other tools see: the plane headers with WCS and mask-plane cards
        assert hdul["MASK"].header["CTYPE1"] == "RA---TAN-SIP" and "MP_BAD" in hdul["MASK"].header
        assert fits.getheader(path)["CFGSHA"] == "cd" * 32


def test_quantized_error_is_a_small_unbiased_fraction_of_the_noise(tmp_path, rng):
    exp = _sky_exposure(rng)
    q = 16.0
    path = write_exposure(tmp_path / "q.fits", exp, compression="quantized", quantize_level=q)
    back = read_exposure(path)
    assert np.array_equal(back.mask, exp.mask)  # masks are always lossless
    nan = np.isnan(exp.image)
    assert np.array_equal(np.isnan(back.image), nan) and np.array_equal(np.isnan(back.variance), nan)
    zero = exp.image == 0
    assert np.all(back.image[zero] == 0)  # SUBTRACTIVE_DITHER_2 keeps zeros exact
    ok = ~nan & ~zero
    resid = (back.image[ok].astype(np.float64) - exp.image[ok]) / np.sqrt(exp.variance[ok])
    # uniform rounding over one step of sigma/q: rms sigma/(q sqrt 12) = 0.018 sigma at q = 16
    assert 0 < resid.std() < 1.0 / q
    assert abs(resid.mean()) < 5 * resid.std() / np.sqrt(resid.size)
    rel_var = np.abs(back.variance[ok] / exp.variance[ok] - 1)
    assert rel_var.max() < 0.05
    assert path.stat().st_size < 0.5 * write_exposure(tmp_path / "n.fits", exp).stat().st_size
    # the dither seed comes from the data, not the clock: the same exposure gives the same file
    again = write_exposure(tmp_path / "q2.fits", exp, compression="quantized", quantize_level=q)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_bbox_read_equals_the_box_of_the_full_read(tmp_path, rng, compression):
    exp = _sky_exposure(rng)
    exp.xy0 = (7, 11)
    path = write_exposure(tmp_path / "e.fits", exp, compression=compression)
    full = read_exposure(path)
    box = read_exposure(path, bbox=(20, 61, 5, 150))  # crosses 16-row tile boundaries
    sub = full.subimage(20, 61, 5, 150)
    assert box.xy0 == sub.xy0 == (12, 31)
    for plane in ("image", "mask", "variance"):
        assert getattr(box, plane).tobytes() == np.ascontiguousarray(getattr(sub, plane)).tobytes(), plane


def test_bad_compression_arguments(tmp_path, rng):
    exp = Exposure(np.ones((20, 30)), np.zeros((20, 30), np.int32), np.ones((20, 30)))
    with pytest.raises(InputError, match="'none', 'mask', 'lossless', 'quantized'"):
        write_exposure(tmp_path / "e.fits", exp, compression="rice")
    with pytest.raises(InputError, match="quantize_level"):
        write_exposure(tmp_path / "e.fits", exp, compression="quantized", quantize_level=0.0)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="output.quantize_level"):
        load_config(overrides=["output.quantize_level=-4"])
    with pytest.raises(ConfigError, match="output.compression"):
        load_config(overrides=["output.compression=fpack"])
    cfg = load_config(overrides=["output.compression=quantized", "output.write_matched=false"])
    assert cfg.output.compression == "quantized" and not cfg.output.write_matched


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_butler_writes_the_configured_compression_and_reads_it_back(tmp_path, rng, compression):
    exp = _sky_exposure(rng)
    butler = Butler(tmp_path, output=OutputConfig(compression=compression))
    did = {"visit": 3, "ccdnum": 9}
    before = [p.copy() for p in (exp.image, exp.mask, exp.variance)]
    with OutputWriter(butler) as writer:  # the background thread compresses; the planes stay untouched
        writer.put(exp, "calexp", did)
        writer.put(exp, "deepDiff_differenceExp", did)
    for a, b in zip(before, (exp.image, exp.mask, exp.variance), strict=True):
        assert a.tobytes() == b.tobytes()
    for name in ("calexp", "deepDiff_differenceExp"):
        back = butler.get(name, did)
        assert np.array_equal(back.mask, exp.mask) and back.psf == exp.psf
        if compression == "quantized":
            np.testing.assert_allclose(back.image, exp.image, atol=SIGMA / 16)
        else:
            assert back.image.tobytes() == exp.image.tobytes()
        assert _types(butler.getUri(name, did))["MASK"] is (
            fits.ImageHDU if compression == "none" else fits.CompImageHDU)
    # template-repository exposures (deepCoadd patches, read in memory-mapped boxes) stay uncompressed
    butler.put(exp, "deepCoadd", filter="g", tract=0, patch="1,2")
    assert set(_types(butler.getUri("deepCoadd", filter="g", tract=0, patch="1,2")).values()) == {fits.ImageHDU}


def test_default_butler_uses_the_default_output_config(tmp_path, rng):
    assert Butler(tmp_path).output == OutputConfig() == load_config().output
