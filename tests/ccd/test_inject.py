"""Fake injection (apfast.ccd.inject): flux and position, variance, mask, determinism, catalogue files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from apfast.ccd.inject import InjectConfig, inject_sources, mag_to_njy, make_random_catalog
from apfast.errors import ConfigError, InputError
from apfast.exposure import Exposure, PhotoCalib
from apfast.masks import bitmask
from apfast.psf import GaussianPsf
from apfast.run.inject import InjectCatalogError, catalog_for_ccd, read_catalog_file

NY, NX, SKY_VAR, ZP = 240, 200, 25.0, 30.0


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [NX / 2, NY / 2]
    w.wcs.cd = np.array([[-0.263, 0.01], [0.008, 0.263]]) / 3600.0
    return w


def _exposure(rng: np.random.Generator, *, noise: bool = True) -> Exposure:
    img = rng.normal(0.0, np.sqrt(SKY_VAR), (NY, NX)).astype(np.float32) if noise else np.zeros((NY, NX), np.float32)
    mask = np.zeros((NY, NX), np.int32)
    mask[:, :10] = bitmask("NO_DATA")
    return Exposure(img, mask, np.full((NY, NX), SKY_VAR, np.float32), wcs=_wcs(), psf=GaussianPsf(1.8, 25),
                    photo_calib=PhotoCalib(ZP))


def _catalog(exp: Exposure, xs: list[float], ys: list[float], mags: list[float]) -> Table:
    assert exp.wcs is not None
    ra, dec = exp.wcs.all_pix2world(np.array(xs), np.array(ys), 0)
    return Table({"ra": ra, "dec": dec, "mag": np.array(mags, float)})


def test_flux_position_variance_and_mask(rng: np.random.Generator) -> None:
    exp = _exposure(rng)
    before = exp.image.copy(), exp.variance.copy(), exp.mask.copy()
    xs, ys = [40.3, 100.71, 150.5], [50.45, 120.2, 190.9]
    cfg = InjectConfig(n_per_ccd=0, add_noise=False)
    res = inject_sources(exp, _catalog(exp, xs, ys, [21.0, 22.0, 23.0]), config=cfg, visit=1, ccdnum=2)
    cat, out = res.catalog, res.exposure
    # the input is untouched
    assert np.array_equal(exp.image, before[0]) and np.array_equal(exp.variance, before[1])
    assert np.array_equal(exp.mask, before[2])
    np.testing.assert_allclose(cat["x"], xs, atol=1e-6)
    np.testing.assert_allclose(cat["y"], ys, atol=1e-6)
    np.testing.assert_allclose(cat["flux_nJy"], mag_to_njy([21.0, 22.0, 23.0]))
    np.testing.assert_allclose(cat["flux"], np.asarray(cat["flux_nJy"]) * 10 ** (0.4 * (ZP - 31.4)))
    assert cat["injected"].all()
    added = out.image.astype(float) - exp.image
    yy, xx = np.mgrid[:NY, :NX]
    for x, y, f in zip(xs, ys, cat["flux"], strict=True):
        ap = (xx - x) ** 2 + (yy - y) ** 2 < 12.0**2
        assert added[ap].sum() == pytest.approx(f, rel=0.01)
        w = added * ap
        assert abs((w * xx).sum() / w.sum() - x) < 0.1 and abs((w * yy).sum() / w.sum() - y) < 0.1
    # variance gets the Poisson term: model / gain, summed = the injected flux (gain 1)
    dvar = out.variance.astype(float) - exp.variance
    assert dvar.min() >= 0 and dvar.sum() == pytest.approx(float(np.sum(cat["flux"])), rel=1e-3)
    # INJECTED where the fake exceeds 1 sigma and at each centre; nowhere far from the fakes
    inj = (out.mask & bitmask("INJECTED")) != 0
    for x, y in zip(xs, ys, strict=True):
        assert inj[int(round(y)), int(round(x))]
    far = np.ones((NY, NX), bool)
    for x, y in zip(xs, ys, strict=True):
        far &= (xx - x) ** 2 + (yy - y) ** 2 > 13.0**2
    assert not inj[far].any()
    assert ((out.mask & ~bitmask("INJECTED")) == exp.mask).all()  # the other planes are kept


def test_injection_does_not_land_off_image_or_on_no_data(rng: np.random.Generator) -> None:
    exp = _exposure(rng)
    cfg = InjectConfig(add_noise=False)
    res = inject_sources(exp, _catalog(exp, [5.0, -30.0, 100.0], [100.0, 100.0, 100.0], [20.0, 20.0, 20.0]),
                         config=cfg, visit=1, ccdnum=2)
    assert res.catalog["injected"].tolist() == [False, False, True]
    added = res.exposure.image.astype(float) - exp.image
    assert np.allclose(added[:, :60], 0.0)  # nothing from the rejected fakes


def test_noise_is_deterministic_and_poisson(rng: np.random.Generator) -> None:
    exp = _exposure(rng, noise=False)
    exp.variance[:] = 1e-6
    cat = _catalog(exp, [100.0], [120.0], [16.0])
    cfg = InjectConfig(seed=3)
    a = inject_sources(exp, cat, config=cfg, visit=7, ccdnum=9).exposure
    b = inject_sources(exp, cat, config=cfg, visit=7, ccdnum=9).exposure
    c = inject_sources(exp, cat, config=InjectConfig(seed=4), visit=7, ccdnum=9).exposure
    quiet = inject_sources(exp, cat, config=InjectConfig(add_noise=False), visit=7, ccdnum=9).exposure
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    resid = (a.image.astype(float) - quiet.image) / np.sqrt(quiet.variance)
    core = quiet.image > 100.0
    assert core.sum() > 20 and 0.7 < resid[core].std() < 1.3  # the noise matches the added variance


def test_random_catalog_is_deterministic_and_in_range(rng: np.random.Generator) -> None:
    exp = _exposure(rng)
    cfg = InjectConfig(n_per_ccd=50, mag_range=(19.0, 23.0), seed=11, template_fraction=0.3)
    a = make_random_catalog(exp, visit=5, ccdnum=35, config=cfg)
    b = make_random_catalog(exp, visit=5, ccdnum=35, config=cfg)
    c = make_random_catalog(exp, visit=6, ccdnum=35, config=cfg)
    assert len(a) == 50 and all(np.array_equal(a[k], b[k]) for k in a.colnames)
    assert not np.array_equal(a["ra"], c["ra"])
    assert a["mag"].min() >= 19.0 and a["mag"].max() <= 23.0
    assert 5 <= a["on_template"].sum() <= 25
    assert len(np.unique(a["injection_id"])) == 50 and a["injection_id"][0] == (5 * 100 + 35) * 100000
    res = inject_sources(exp, a, config=cfg, visit=5, ccdnum=35)
    assert res.catalog["x"].min() >= 19.9 and res.catalog["x"].max() <= NX - 20.9


def test_hosted_fakes_sit_on_galaxies(rng: np.random.Generator) -> None:
    exp = _exposure(rng)
    src = Table({"id": np.array([101, 102, 103]), "x": [60.0, 120.0, 160.0], "y": [60.0, 100.0, 200.0],
                 "Ixx": [9.0, 3.3, 8.0], "Iyy": [9.0, 3.3, 8.0], "Ixx_psf": [3.24] * 3, "Iyy_psf": [3.24] * 3,
                 "snr": [50.0, 50.0, 5.0], "shape_flag": [False] * 3})
    cfg = InjectConfig(n_per_ccd=20, host_fraction=1.0, host_offset_max=0.8, add_noise=False)
    cat = inject_sources(exp, make_random_catalog(exp, visit=1, ccdnum=1, config=cfg, sources=src), config=cfg,
                         visit=1, ccdnum=1).catalog
    assert set(cat["host_id"].tolist()) == {101}  # 102 is point-like, 103 too faint
    dist = np.hypot(cat["x"] - 60.0, cat["y"] - 60.0) * 0.263
    assert dist.max() <= 0.81
    np.testing.assert_allclose(dist, cat["host_offset_arcsec"], atol=0.02)


def test_template_fakes_cancel_in_a_difference(rng: np.random.Generator) -> None:
    """The same fakes injected into science and template (same PSF) leave no flux in science - template."""
    sci, tmpl = _exposure(rng), _exposure(rng)
    cfg = InjectConfig(add_noise=False)
    cat = _catalog(sci, [60.2, 140.7], [80.4, 160.1], [20.0, 21.0])
    s = inject_sources(sci, cat, config=cfg, visit=1, ccdnum=1).exposure
    t = inject_sources(tmpl, cat, config=cfg, visit=1, ccdnum=1, plane="INJECTED_TEMPLATE", add_noise=False).exposure
    before = sci.image.astype(float) - tmpl.image
    after = s.image.astype(float) - t.image
    assert np.abs(after - before).max() < 1e-3 * float(np.max(s.image - sci.image))
    assert ((t.mask & bitmask("INJECTED_TEMPLATE")) != 0).sum() > 10
    assert not ((t.mask & bitmask("INJECTED")) != 0).any()


def test_config_rules() -> None:
    assert not InjectConfig().enabled and InjectConfig(n_per_ccd=3).enabled
    with pytest.raises(ConfigError, match="inject.mag_range"):
        InjectConfig(mag_range=(24.0, 20.0))
    with pytest.raises(ConfigError, match="not both"):
        InjectConfig(catalog="x.csv", n_per_ccd=3)
    with pytest.raises(ConfigError, match="inject.template_fraction"):
        InjectConfig(template_fraction=1.5)


def test_exposure_without_psf_is_refused(rng: np.random.Generator) -> None:
    exp = _exposure(rng)
    bare = Exposure(exp.image, exp.mask, exp.variance, wcs=exp.wcs, photo_calib=exp.photo_calib)
    with pytest.raises(InputError, match="without psf"):
        inject_sources(bare, _catalog(exp, [50.0], [50.0], [20.0]), config=InjectConfig(), visit=1, ccdnum=1)


def test_catalog_files(tmp_path: Path, rng: np.random.Generator) -> None:
    exp = _exposure(rng)
    assert exp.wcs is not None
    ra, dec = exp.wcs.all_pix2world([50.0, 100.0, 5000.0, 60.0], [50.0, 100.0, 50.0, 60.0], 0)
    csv = tmp_path / "fakes.csv"
    csv.write_text("RA,Dec,mag,visit,on_template\n" + "".join(
        f"{r},{d},{m},{v},{t}\n" for r, d, m, v, t in zip(ra, dec, [20, 21, 22, 23], [1, 1, 1, 2],
                                                         ["True", "False", "False", "True"], strict=True)))
    t = read_catalog_file(csv)
    assert t.colnames == ["ra", "dec", "mag", "visit", "on_template", "injection_id"]
    assert t["on_template"].tolist() == [True, False, False, True]
    cfg = InjectConfig(catalog=str(csv))
    here = catalog_for_ccd(cfg, exp, visit=1, ccdnum=35)  # visit 1 rows on the CCD (no ccdnum column)
    assert here["injection_id"].tolist() == [0, 1]
    fits_path = tmp_path / "fakes.fits"
    Table({"ra": ra, "dec": dec, "mag": [20.0, 21, 22, 23], "ccdnum": [35, 35, 36, 35]}).write(fits_path)
    assert len(catalog_for_ccd(InjectConfig(catalog=str(fits_path)), exp, visit=9, ccdnum=35)) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("ra,dec,magnitude\n1,2,3\n")
    with pytest.raises(InjectCatalogError, match=r"bad\.csv: no column 'mag'"):
        read_catalog_file(bad)
    with pytest.raises(InjectCatalogError, match="no such file"):
        read_catalog_file(tmp_path / "missing.csv")
    nan = tmp_path / "nan.csv"
    nan.write_text("ra,dec,mag\n1,2,\n")
    with pytest.raises(InjectCatalogError, match="'mag' has a missing"):
        read_catalog_file(nan)
