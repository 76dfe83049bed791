"""Exposure containers, FITS round trips and PSF models (apfast.exposure, apfast.psf)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from apfast import masks
from apfast.errors import AlgorithmError, InputError
from apfast.exposure import (
    Background,
    Exposure,
    PhotoCalib,
    VisitInfo,
    read_background,
    read_exposure,
    write_background,
    write_exposure,
)
from apfast.psf import (
    FWHM_PER_SIGMA,
    PSF_TYPES,
    GaussianPsf,
    ImagePsf,
    PolynomialPixelPsf,
    moments_fwhm,
    poly_terms,
    psf_from_hdus,
)

NY, NX = 64, 96


def gaussian_stamp(sigma: float, size: int, x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
    """Slow, obvious point-sampled Gaussian (not normalised)."""
    r = size // 2
    out = np.zeros((size, size))
    for j in range(size):
        for i in range(size):
            out[j, i] = math.exp(-0.5 * (((i - r) - x0) ** 2 + ((j - r) - y0) ** 2) / sigma**2)
    return out


def sip_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [150.1234567891234, 2.2345678912345]
    w.wcs.crpix = [48.5, 32.25]
    w.wcs.cd = np.array([[-7.3e-5, 1.1e-6], [0.9e-6, 7.3e-5]])
    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], a[1, 1], a[0, 2] = 1.3e-6, -2.1e-7, 4.4e-7
    b[2, 0], b[1, 1], b[0, 2] = -3.3e-7, 8.1e-7, 2.2e-6
    from astropy.wcs import Sip

    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def poly_psf() -> PolynomialPixelPsf:
    basis = np.stack([gaussian_stamp(1.5, 21), gaussian_stamp(3.0, 21)])
    # 2 basis stamps, order 2 -> 6 terms (1, x, y, x^2, xy, y^2)
    coeffs = np.array([[1.0, 0.5, 0.0, 0.0, 0.1, 0.0], [0.5, 0.0, -0.25, 0.05, 0.0, 0.0]])
    return PolynomialPixelPsf(basis, coeffs, 2, NX / 2, NY / 2, NX / 2, NY / 2)


PSFS = {
    "gaussian": lambda: GaussianPsf(1.7, 17),
    "image": lambda: ImagePsf(gaussian_stamp(2.2, 19) + 0.001),
    "polynomial": poly_psf,
}


def full_exposure(rng: np.random.Generator, psf) -> Exposure:
    image = rng.normal(100.0, 5.0, size=(NY, NX)).astype(np.float32)
    mask = rng.integers(0, 1 << len(masks.MASK_PLANES), size=(NY, NX), dtype=np.int32)
    variance = rng.uniform(20.0, 30.0, size=(NY, NX)).astype(np.float32)
    meta = fits.Header()
    meta["PROVSTG"] = ("calibrate", "stage that wrote it")
    meta["NSTARS"] = 123
    meta["SEEING"] = 1.2345678901234567
    meta.add_history("made by test_exposure")
    vi = VisitInfo(
        visit=289401,
        ccdnum=35,
        detector="N4",
        filter="g",
        mjd=58547.254953703705,
        date_obs="2019-03-05T06:07:08.123456",
        exptime=90.0,
        airmass=1.2,
        ra=150.0,
        dec=2.0,
        object="field 1",
        camera="DECam",
    )
    return Exposure(
        image,
        mask,
        variance,
        wcs=sip_wcs(),
        psf=psf,
        photo_calib=PhotoCalib(31.123456789, 0.0123),
        visit_info=vi,
        metadata=meta,
    )


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("psf_name", sorted(PSFS))
def test_round_trip_bit_exact(tmp_path, rng, psf_name):
    exp = full_exposure(rng, PSFS[psf_name]())
    path = write_exposure(tmp_path / "calexp.fits", exp, config_sha="ab" * 32)
    back = read_exposure(path)
    for plane in ("image", "mask", "variance"):
        a, b = getattr(exp, plane), getattr(back, plane)
        assert b.dtype == a.dtype and b.dtype.isnative and b.flags.c_contiguous
        assert np.array_equal(a, b)
    assert back.visit_info == exp.visit_info
    assert back.photo_calib == exp.photo_calib
    assert back.psf == exp.psf and type(back.psf) is type(exp.psf)
    np.testing.assert_array_equal(back.psf.compute_image(10.0, 50.0), exp.psf.compute_image(10.0, 50.0))
    # WCS: same parameters, same SIP, same sky positions bit for bit
    assert np.array_equal(back.wcs.wcs.crval, exp.wcs.wcs.crval)
    assert back.wcs.sip is not None
    assert np.array_equal(back.wcs.sip.a, exp.wcs.sip.a) and np.array_equal(back.wcs.sip.b, exp.wcs.sip.b)
    xs, ys = rng.uniform(0, NX, 50), rng.uniform(0, NY, 50)
    assert np.array_equal(
        np.array(back.wcs.all_pix2world(xs, ys, 0)), np.array(exp.wcs.all_pix2world(xs, ys, 0))
    )
    # metadata: extra cards survive, history kept, markers not leaked
    assert back.metadata["PROVSTG"] == "calibrate" and back.metadata["NSTARS"] == 123
    assert back.metadata["SEEING"] == 1.2345678901234567
    assert "made by test_exposure" in str(back.metadata["HISTORY"])
    assert "APFTYPE" not in back.metadata and "VISIT" not in back.metadata
    assert fits.getheader(path)["CFGSHA"] == "ab" * 32


def test_file_opens_in_astropy_with_extnames(tmp_path, rng):
    exp = full_exposure(rng, poly_psf())
    path = write_exposure(tmp_path / "e.fits", exp)
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        assert names == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF_BASIS", "PSF_COEFFS"]
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4")
        assert hdul["MASK"].data.dtype == np.dtype(">i4")
        for name, bit in masks.MASK_BITS.items():
            assert hdul["MASK"].header[f"MP_{name}"] == bit
        for ext in ("IMAGE", "MASK", "VARIANCE"):
            assert hdul[ext].header["CTYPE1"] == "RA---TAN-SIP"
        assert hdul["PSF_BASIS"].header["PSFTYPE"] == "POLYPIX"
        assert hdul[0].header["BAND"] == "g" and hdul[0].header["MAGZERO"] == 31.123456789
        assert hdul[0].header["FLUXMAG0"] == pytest.approx(10 ** (0.4 * 31.123456789), rel=1e-14)


def test_minimal_exposure_round_trip(tmp_path):
    exp = Exposure(np.arange(12, dtype=np.float64).reshape(3, 4))
    back = read_exposure(write_exposure(tmp_path / "m.fits", exp))
    assert back.mask is None and back.variance is None and back.wcs is None and back.psf is None
    assert back.visit_info is None and back.photo_calib is None and back.xy0 == (0, 0)
    assert np.array_equal(back.image, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_big_endian_inputs_are_normalised(rng):
    img = rng.normal(size=(8, 9)).astype(">f4")
    msk = np.zeros((8, 9), dtype=">i4")
    var = np.ones((8, 9), dtype=">f8")
    exp = Exposure(img, msk, var)
    for arr, dt in ((exp.image, np.float32), (exp.mask, np.int32), (exp.variance, np.float32)):
        assert arr.dtype == np.dtype(dt) and arr.dtype.isnative
    assert np.array_equal(exp.image, img.astype(np.float32))


def test_bad_planes_rejected():
    with pytest.raises(InputError, match="same shape"):
        Exposure(np.zeros((4, 4)), variance=np.zeros((4, 5)))
    with pytest.raises(InputError, match="2-D"):
        Exposure(np.zeros(5))
    with pytest.raises(InputError, match="bit mask"):
        Exposure(np.zeros((4, 4)), mask=np.zeros((4, 4)))


def test_atomic_write_leaves_no_partial_file(tmp_path, rng, monkeypatch):
    final = tmp_path / "calexp.fits"
    first = Exposure(np.ones((5, 5), dtype=np.float32))
    write_exposure(final, first)
    before = final.read_bytes()
    real_writeto = fits.HDUList.writeto

    def crash_after_partial_write(self, name, *args, **kwargs):
        real_writeto(self, name, *args, **kwargs)
        with open(name, "r+b") as fh:  # truncate what was written, then "crash"
            fh.truncate(2880)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fits.HDUList, "writeto", crash_after_partial_write)
    import apfast.exposure

    monkeypatch.setattr(apfast.exposure, "_streamable", lambda hdul: False)  # astropy's writer, patched above
    with pytest.raises(OSError, match="simulated"):
        write_exposure(final, full_exposure(rng, None))
    with pytest.raises(OSError, match="simulated"):
        write_exposure(tmp_path / "new.fits", full_exposure(rng, None))
    monkeypatch.undo()
    assert final.read_bytes() == before  # the old complete file is untouched
    assert not (tmp_path / "new.fits").exists()
    assert sorted(os.listdir(tmp_path)) == ["calexp.fits"]  # no temporary left behind


def test_streamed_write_is_astropys_bytes_and_atomic(tmp_path, rng, monkeypatch):
    import apfast.exposure

    exp = full_exposure(rng, None)
    streamed = write_exposure(tmp_path / "a.fits", exp)
    fits.HDUList(apfast.exposure.exposure_hdulist(exp)).writeto(tmp_path / "b.fits")
    assert streamed.read_bytes() == (tmp_path / "b.fits").read_bytes()  # byte for byte astropy's file
    before = streamed.read_bytes()
    real = apfast.exposure._write_image_hdu
    calls = []

    def fail_on_second_plane(f, hdu):
        calls.append(hdu.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated, mid-stream)")
        real(f, hdu)

    monkeypatch.setattr(apfast.exposure, "_write_image_hdu", fail_on_second_plane)
    with pytest.raises(OSError, match="mid-stream"):
        write_exposure(streamed, full_exposure(rng, None))
    monkeypatch.undo()
    assert streamed.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.fits", "b.fits"]


def test_not_an_exposure(tmp_path):
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((3, 3))).writeto(plain)
    with pytest.raises(InputError, match=r"plain\.fits.*no 'IMAGE' extension"):
        read_exposure(plain)
    text = tmp_path / "notes.fits"
    text.write_text("hello")
    with pytest.raises(InputError, match="notes.fits"):
        read_exposure(text)
    with pytest.raises(InputError, match="does not exist"):
        read_exposure(tmp_path / "missing.fits")


# ----------------------------------------------------------------------------- subimage
def test_subimage_is_a_view_with_shifted_wcs(tmp_path, rng):
    exp = full_exposure(rng, poly_psf())
    sub = exp.subimage(10, 40, 20, 70)
    assert sub.shape == (30, 50) and sub.xy0 == (20, 10)
    assert np.shares_memory(sub.image, exp.image) and np.shares_memory(sub.mask, exp.mask)
    sub.image[0, 0] = -1.0
    assert exp.image[10, 20] == -1.0
    xs, ys = rng.uniform(0, 50, 40), rng.uniform(0, 30, 40)
    a = np.array(sub.wcs.all_pix2world(xs, ys, 0))
    b = np.array(exp.wcs.all_pix2world(xs + 20, ys + 10, 0))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-11)
    back = read_exposure(write_exposure(tmp_path / "sub.fits", sub))
    assert back.xy0 == (20, 10)
    np.testing.assert_allclose(np.array(back.wcs.all_pix2world(xs, ys, 0)), b, rtol=0, atol=1e-11)
    nested = sub.subimage(1, 3, 2, 5)
    assert nested.xy0 == (22, 11) and nested.image[0, 0] == exp.image[11, 22]
    with pytest.raises(InputError, match="outside"):
        exp.subimage(0, NY + 1, 0, 5)
    with pytest.raises(InputError, match="empty"):
        exp.subimage(5, 5, 0, 5)


# ----------------------------------------------------------------------------- photo calib, visit info
def test_photo_calib_conversions():
    pc = PhotoCalib(27.5, 0.02)
    assert pc.instflux_to_mag(10.0) == pytest.approx(25.0, abs=1e-12)
    assert PhotoCalib(31.4).instflux_to_njy(7.0) == pytest.approx(7.0, rel=1e-14)
    flux = np.array([1.0, 10.0, 1000.0])
    njy = pc.instflux_to_njy(flux)
    np.testing.assert_allclose(pc.njy_to_instflux(njy), flux, rtol=1e-14)
    # nJy -> AB mag must agree with the zero point definition
    np.testing.assert_allclose(-2.5 * np.log10(njy) + 31.4, pc.instflux_to_mag(flux), atol=1e-12)
    mags = pc.instflux_to_mag(np.array([-1.0, 0.0, 1.0]))
    assert np.isnan(mags[0]) and np.isnan(mags[1]) and mags[2] == 27.5
    val, err = pc.instflux_to_njy(100.0, 10.0)
    expected = val * math.hypot(0.1, 0.4 * math.log(10) * 0.02)
    assert err == pytest.approx(expected, rel=1e-12)
    hdr = fits.Header(pc.to_cards())
    assert PhotoCalib.from_header(hdr) == pc
    del hdr["MAGZERO"]
    assert PhotoCalib.from_header(hdr).zero_point == pytest.approx(27.5, abs=1e-12)
    with pytest.raises(InputError, match="finite"):
        PhotoCalib(float("nan"))


def test_visit_info_header_round_trip():
    vi = VisitInfo(visit=1, ccdnum=2, filter="r", mjd=58000.5, ra=10.0, dec=-5.0, exptime=None)
    hdr = fits.Header(vi.to_cards())
    assert "EXPTIME" not in hdr
    assert VisitInfo.from_header(hdr) == vi
    assert VisitInfo.from_header(fits.Header()) is None
    with pytest.raises(InputError, match="VISIT"):
        VisitInfo.from_header(fits.Header([("VISIT", "abc")]))


# ----------------------------------------------------------------------------- PSFs
@pytest.mark.parametrize("psf_name", sorted(PSFS))
def test_psf_normalised_and_centred(psf_name):
    psf = PSFS[psf_name]()
    for x, y in ((0.0, 0.0), (NX / 2, NY / 2), (NX - 1.0, 3.0)):
        img = psf.compute_image(x, y)
        assert img.dtype == np.float64 and img.shape == (psf.size, psf.size) and psf.size % 2 == 1
        assert img.sum() == pytest.approx(1.0, abs=1e-13)
        r = psf.size // 2
        assert np.unravel_index(np.argmax(img), img.shape) == (r, r)


def test_gaussian_fwhm_exact():
    for sigma in (1.2, 1.7, 3.3):
        psf = GaussianPsf(sigma, 2 * int(6 * sigma) + 1)
        assert psf.fwhm(5.0, 5.0) == FWHM_PER_SIGMA * sigma
        assert abs(FWHM_PER_SIGMA - 2.3548200450309493) < 1e-15
        # the moments of its own (point-sampled) stamp give the same FWHM
        assert moments_fwhm(psf.compute_image(0, 0)) == pytest.approx(FWHM_PER_SIGMA * sigma, rel=1e-6)
        np.testing.assert_allclose(
            psf.compute_image(0, 0),
            gaussian_stamp(sigma, psf.size) / gaussian_stamp(sigma, psf.size).sum(),
            rtol=1e-13,
        )
        assert ImagePsf(psf.compute_image(0, 0)).fwhm(0, 0) == pytest.approx(FWHM_PER_SIGMA * sigma, rel=1e-6)


def test_polynomial_psf_varies_as_specified():
    psf = poly_psf()
    b0, b1 = psf.basis
    for x, y in ((0.0, 0.0), (48.0, 32.0), (90.0, 5.0), (13.0, 60.0)):
        xn, yn = (x - 48.0) / 48.0, (y - 32.0) / 32.0
        w0 = 1.0 + 0.5 * xn + 0.1 * xn * yn  # terms 1, x, xy
        w1 = 0.5 - 0.25 * yn + 0.05 * xn**2  # terms 1, y, x^2
        expected = w0 * b0 + w1 * b1
        np.testing.assert_allclose(psf.compute_image(x, y), expected / expected.sum(), rtol=1e-12, atol=1e-16)
    # the narrow component dominates on the right (x grows w0), so the PSF gets narrower there
    assert psf.fwhm(NX - 1.0, NY / 2) < psf.fwhm(0.0, NY / 2)
    assert poly_terms(2.0, 3.0, 3).tolist() == [1, 2, 3, 4, 6, 9, 8, 12, 18, 27]


def test_polynomial_psf_validation_and_negative_flux():
    basis = gaussian_stamp(2.0, 11)[None]
    with pytest.raises(InputError, match=r"\(1, 3\)"):
        PolynomialPixelPsf(basis, np.ones((1, 2)), 1, 0, 0, 1, 1)
    with pytest.raises(InputError, match="k odd"):
        PolynomialPixelPsf(np.ones((1, 4, 4)), np.ones((1, 1)), 0, 0, 0, 1, 1)
    with pytest.raises(InputError, match="positive"):
        PolynomialPixelPsf(basis, np.ones((1, 1)), 0, 0, 0, 0, 1)
    psf = PolynomialPixelPsf(basis, np.array([[1.0, -1.0, 0.0]]), 1, 0.0, 0.0, 10.0, 10.0)
    with pytest.raises(AlgorithmError, match="outside the area"):
        psf.compute_image(20.0, 0.0)


def test_image_psf_validation():
    with pytest.raises(InputError, match="odd size"):
        ImagePsf(np.ones((4, 4)))
    with pytest.raises(InputError, match="non-finite"):
        ImagePsf(np.full((3, 3), np.nan))
    with pytest.raises(InputError, match="positive total"):
        ImagePsf(np.zeros((3, 3)))
    with pytest.raises(InputError, match="odd"):
        GaussianPsf(1.0, 10)


def test_psf_registry_and_unknown_type():
    assert {"GAUSSIAN", "IMAGE", "POLYPIX"} <= set(PSF_TYPES)
    hdu = fits.ImageHDU(np.ones((3, 3)), name="PSF_X")
    hdu.header["PSFTYPE"] = "NOPE"
    with pytest.raises(InputError, match="NOPE"):
        psf_from_hdus([hdu], source="f.fits")
    g = GaussianPsf(2.0, 13).to_hdus()
    del g[0].header["PSFSIGMA"]
    with pytest.raises(InputError, match="PSFSIGMA"):
        psf_from_hdus(g)


def test_psf_with_wcs_pixel_scale_sanity():
    # the SIP WCS used above has ~0.263"/px, like DECam
    scale = proj_plane_pixel_scales(sip_wcs().celestial) * 3600
    assert scale == pytest.approx([0.263, 0.263], rel=0.01)


# ----------------------------------------------------------------------------- background
def test_background_round_trip(tmp_path, rng):
    vals = rng.normal(1000, 3, size=(16, 8)).astype(np.float32)
    var = rng.uniform(1, 2, size=(16, 8)).astype(np.float32)
    meta = fits.Header([("BKGSTAT", "MEANCLIP")])
    bkg = Background(
        bin_size=256,
        values=vals.astype(">f4"),
        image_shape=(4096, 2048),
        interpolation="akima",
        variance=var,
        metadata=meta,
    )
    assert bkg.values.dtype.isnative
    back = read_background(write_background(tmp_path / "bkgd.fits", bkg))
    assert np.array_equal(back.values, vals) and np.array_equal(back.variance, var)
    assert (back.bin_size, back.image_shape, back.interpolation) == (256, (4096, 2048), "akima")
    assert back.metadata["BKGSTAT"] == "MEANCLIP"
    no_var = read_background(
        write_background(tmp_path / "b2.fits", Background(bin_size=4, values=vals, image_shape=(64, 32)))
    )
    assert no_var.variance is None
    with pytest.raises(InputError, match="variance shape"):
        Background(bin_size=4, values=vals, image_shape=(64, 32), variance=var[:2])
    with pytest.raises(InputError, match="not an apfast background"):
        read_background(write_exposure(tmp_path / "e.fits", Exposure(np.zeros((2, 2)))))
