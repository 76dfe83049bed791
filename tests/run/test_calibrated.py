"""Calibrated inputs (ingest --calibrated): a real ZTF quadrant and a synthetic DECam InstCal CCD."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from apfast.camera.calibrated import get_calibrated_camera
from apfast.ccd.calibrated_input import mask_from_dq, planes_from_calibrated
from apfast.ccd.characterize import run_characterize, summarize
from apfast.errors import ConfigError, IngestError, InputError
from apfast.masks import bitmask
from apfast.repo.butler import Butler
from apfast.repo.calibrated import ingest_calibrated
from apfast.run.calibrated import calibrated_planes
from apfast.run.cli import main

ZTF = Path(__file__).parents[1] / "data" / "real" / "ztf_quadrant"
SCI = ZTF / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg_cut1024.fits.fz"
MSK = ZTF / "ztf_20200924431759_000655_zr_c13_o_q3_mskimg_cut1024.fits.fz"


# ----------------------------------------------------------------------------------- pure functions
def test_mask_from_dq_bits_and_values() -> None:
    dq = np.array([[0, 1, 1 << 8, (1 << 8) | (1 << 10), 1 << 1]])
    got = mask_from_dq(dq, mode="bits", mapping={0: ["BAD"], 8: ["SAT"], 10: ["NO_DATA"]})
    assert got.tolist() == [[0, bitmask("BAD"), bitmask("SAT"), bitmask(["SAT", "NO_DATA"]), 0]]
    vals = mask_from_dq(np.array([[0, 1, 3, 5, 7]]), mode="values", mapping={1: ["BAD"], 3: ["SAT"], 5: ["CR"]})
    assert vals.tolist() == [[0, bitmask("BAD"), bitmask("SAT"), bitmask("CR"), 0]]


def test_planes_from_weight_and_from_gain() -> None:
    img = np.full((4, 5), 100.0, np.float32)
    img[0, 0] = np.nan
    w = np.full((4, 5), 0.25, np.float32)
    w[1, 1] = 0.0
    p = planes_from_calibrated(img, weight=w, gain=2.0, to_electrons=True, saturation=1e9)
    assert p.variance[2, 2] == pytest.approx(4.0 * 4.0)  # 1/w ADU^2 times gain^2
    assert p.image[2, 2] == pytest.approx(200.0)
    for yx in ((0, 0), (1, 1)):
        assert p.mask[yx] & bitmask("NO_DATA") and p.variance[yx] == 0 and p.image[yx] == 0
    q = planes_from_calibrated(img, gain=2.0, read_noise=4.0)  # no weight map: Poisson + read noise, ADU
    assert q.variance[2, 2] == pytest.approx(100.0 / 2.0 + (4.0 / 2.0) ** 2)
    with pytest.raises(InputError, match="no weight map and no usable gain"):
        planes_from_calibrated(img)


def test_builtin_descriptions_parse_and_unknown_camera_is_one_line() -> None:
    z = get_calibrated_camera("ZTF")
    assert z.dq_mode == "bits" and z.dq_map[8] == ("SAT",) and z.dataid == {"field": "FIELDID", "ccdid": "CCDID",
                                                                          "qid": "QID"}
    d = get_calibrated_camera("decam-instcal")
    assert d.dq_mode == "values" and d.dq_map[5] == ("CR",) and d.files["weight"] == "_oow_"
    with pytest.raises(ConfigError, match="unknown calibrated camera 'nope'; give one of decam-instcal, ztf"):
        get_calibrated_camera("nope")
    with pytest.raises(ConfigError, match="no \\[calibrated\\] table"):
        get_calibrated_camera("src/apfast/camera/decam.toml" if Path("src/apfast/camera/decam.toml").exists()
                              else Path(__file__).parents[2] / "src/apfast/camera/decam.toml")


# ----------------------------------------------------------------------------------- real ZTF quadrant
@pytest.fixture(scope="module")
def ztf_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ztf") / "repo"
    assert main(["-q", "ingest", str(repo), str(ZTF), "--calibrated", "--camera", "ztf"]) == 0
    return repo


def test_ztf_ingest_registers_the_quadrant_with_its_mask(ztf_repo: Path) -> None:
    with sqlite3.connect(ztf_repo / "registry.sqlite3") as c:
        c.row_factory = sqlite3.Row
        raw = [dict(r) for r in c.execute("SELECT * FROM raw")]
        cal = [dict(r) for r in c.execute("SELECT * FROM calibrated")]
    assert len(raw) == 1 and len(cal) == 1
    r = raw[0]
    # visit = DBEXPID, ccdnum = RCID + 1, the band from FILTER 'ZTF_r', the field in `object`
    assert (r["visit"], r["ccdnum"], r["filter"], r["object"], r["date"]) == (136243177, 51, "r", "655", "2020-09-24")
    assert r["mjd"] == pytest.approx(59116.4317708) and r["expTime"] == 30.0
    assert json.loads(cal[0]["dataid"]) == {"field": 655, "ccdid": 13, "qid": 3}
    assert cal[0]["mask"].endswith("_mskimg_cut1024.fits.fz") and cal[0]["weight"] is None
    assert (ztf_repo / cal[0]["mask"]).exists()
    # the footprint from the TPV header WCS contains the five VSX variables of the cutout
    vsx = Table.read(ZTF / "vsx_in_ztf_cut1024.csv", format="ascii.csv")
    ras = [r[f"corner_ra_{i}"] for i in range(4)]
    decs = [r[f"corner_dec_{i}"] for i in range(4)]
    assert min(ras) < vsx["RAJ2000"].min() and vsx["RAJ2000"].max() < max(ras)
    assert min(decs) < vsx["DEJ2000"].min() and vsx["DEJ2000"].max() < max(decs)


def test_ztf_reingest_is_a_no_op_and_errors_are_one_line(ztf_repo: Path, tmp_path: Path, capsys) -> None:
    rep = ingest_calibrated(ztf_repo, [SCI], camera="ztf")
    assert rep.n_rows == 0 and rep.already_present == (SCI,)
    # a mask without its image names the image to add, and nothing is created
    assert main(["-q", "ingest", str(tmp_path / "r1"), str(MSK), "--calibrated", "--camera", "ztf"]) == 1
    err = capsys.readouterr().err
    assert "a mask file without its image ztf_20200924431759_000655_zr_c13_o_q3_sciimg_cut1024.fits.fz" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r1").exists()
    assert main(["-q", "ingest", str(tmp_path / "r2"), str(SCI), "--calibrated", "--camera", "hst"]) == 2
    assert "unknown calibrated camera 'hst'" in capsys.readouterr().err
    assert main(["-q", "ingest", str(tmp_path / "r2"), str(SCI), "--calibrated"]) == 2
    assert "--calibrated needs --camera" in capsys.readouterr().err
    # a header without the dataId keyword: the message names the file and the keyword
    bad = tmp_path / "in" / SCI.name
    bad.parent.mkdir()
    with fits.open(SCI) as hdul:
        hdul[1].header.remove("QID")
        hdul.writeto(bad)
    with pytest.raises(IngestError, match=f"{bad}: HDU 1 lacks keyword QID"):
        ingest_calibrated(tmp_path / "r3", [bad], camera="ztf")


def test_ztf_planes_mask_mapping_variance_and_characterize(ztf_repo: Path) -> None:
    butler = Butler(ztf_repo)
    cal_row = butler.registry.calibrated_row(136243177, 51)
    planes, px = calibrated_planes(butler, cal_row)
    dq = fits.getdata(MSK).astype(np.int64)
    gain = 6.0
    # every mapped mskimg bit lands on its plane, unmapped bits (1 = source, 11 = PSF source) on none
    assert np.count_nonzero(planes.mask & bitmask("CR")) == np.count_nonzero(dq & (1 << 7))
    sat = (dq & (1 << 8)) != 0
    assert np.all(planes.mask[sat] & bitmask("SAT"))
    only_sources = (dq & ~((1 << 1) | (1 << 11))) == 0
    assert not np.any(planes.mask[only_sources & (px.image < 58647.152)])
    # electrons and the Poisson + read-noise variance of a sky-included image
    good = planes.mask == 0
    assert np.allclose(planes.image[good], px.image[good] * gain, rtol=1e-6)
    expect = np.maximum(px.image[good], 0) * gain + 9.0**2
    assert np.allclose(planes.variance[good], expect, rtol=1e-5)
    # the gain-based variance is a lower bound of the sky noise: the sigma-clipped sky RMS of this
    # quadrant is 1.16x sqrt(variance) (pixel-to-pixel differences: 1.11x); flat-field noise and the
    # fpack quantisation of the cutout are not in GAIN and READNOI (characterize.scale_variance rescales it:
    # test_ztf_variance_scaling_makes_the_pulls_unit_width)
    from astropy.stats import sigma_clipped_stats

    sky = planes.image[good]
    _, _, rms = sigma_clipped_stats(sky, sigma=3, maxiters=10)
    ratio = float(rms) / float(np.sqrt(np.median(planes.variance[good])))
    assert 1.05 < ratio < 1.25
    mad_rms = float(rms)
    char = run_characterize(planes.image, planes.mask, planes.variance)
    # PSF FWHM (pixels) against the header SEEING (FWHM in pixels per its comment; IPAC's measurement)
    # apfast's seeing (pixel-deconvolved Moffat FWHM of the PSF stars) against IPAC's SEEING (pixels)
    # 1.14 px, 8% below IPAC's; it was 1.22 when the adaptive moments converged only for stars well off a
    # pixel centre, so that only those were PSF stars (their Moffat fits come out wider: 1.14 vs 1.06 px
    # for stars within 0.2 px of a pixel centre)
    assert summarize(char)["SEEING"] == pytest.approx(float(px.header["SEEING"]), rel=0.10)
    assert 1.3 < 2.3548 * char.psf_sigma < 2.2  # the pixel-integrated PSF: undersampled at 1.01"/px
    assert abs(float(np.median(char.background.image())) - float(np.median(sky))) < mad_rms / 4


def test_ztf_header_tpv_wcs_puts_the_vsx_variables_on_stars(ztf_repo: Path) -> None:
    butler = Butler(ztf_repo)
    planes, px = calibrated_planes(butler, butler.registry.calibrated_row(136243177, 51))
    vsx = Table.read(ZTF / "vsx_in_ztf_cut1024.csv", format="ascii.csv")
    x, y = px.wcs.all_world2pix(np.asarray(vsx["RAJ2000"]), np.asarray(vsx["DEJ2000"]), 0)
    img = planes.image
    bkg = float(np.median(img))
    for xi, yi in zip(x, y, strict=True):
        iy, ix = int(round(yi)), int(round(xi))
        stamp = img[iy - 3:iy + 4, ix - 3:ix + 4]
        py, pxl = np.unravel_index(int(np.argmax(stamp)), stamp.shape)
        # a star peaks within 2 pixels (2 arcsec) of the catalogue position, well above the sky
        assert np.hypot(py - 3, pxl - 3) <= 2.0
        assert float(stamp.max()) > bkg + 20 * np.sqrt(bkg)


def test_ztf_tpv_wcs_survives_the_calexp_header() -> None:
    """wcslib reads TPV in full (0.25" of distortion on this cutout) and the calexp writes it back as PV cards."""
    from apfast.exposure import _wcs_header, wcs_from_header

    h = fits.getheader(SCI, 1)
    w = wcs_from_header(h)
    back = wcs_from_header(_wcs_header(w))
    flat = h.copy()
    flat["CTYPE1"], flat["CTYPE2"] = "RA---TAN", "DEC--TAN"
    for k in [k for k in flat if k.startswith("PV")]:
        del flat[k]
    gx, gy = np.meshgrid(np.linspace(0, 1023, 9), np.linspace(0, 1023, 9))

    def sep(a: object, b: object) -> float:
        r1, d1 = a.all_pix2world(gx.ravel(), gy.ravel(), 0)  # type: ignore[attr-defined]
        r2, d2 = b.all_pix2world(gx.ravel(), gy.ravel(), 0)  # type: ignore[attr-defined]
        return float(np.max(np.hypot((r1 - r2) * np.cos(np.radians(d1)), d1 - d2)) * 3600.0)

    assert sep(w, back) < 1e-6
    assert sep(w, wcs_from_header(flat)) > 0.2


def source_free_pulls(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, psf_sigma: float) -> np.ndarray:
    """image / sqrt(variance) of background-subtracted pixels outside 5-sigma source footprints and bad pixels
    (negative footprints are kept: leaving out the low tail of the noise would narrow it)."""
    from apfast.ccd.detection import DetectionConfig, detect_sources

    det = detect_sources(image, variance, mask, psf_sigma=psf_sigma,
                         config=DetectionConfig(threshold=5.0, threshold_type="stdev", polarity="positive"))
    bad = bitmask(["DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "CR", "INTRP", "EDGE", "NO_DATA"])
    good = ((det.mask & bad) == 0) & (variance > 0)
    return image[good] / np.sqrt(variance[good])


def robust_std(a: np.ndarray) -> float:
    q25, q75 = np.percentile(a, [25, 75])
    return float(0.7413 * (q75 - q25))


def test_ztf_process_ccd_with_header_wcs_and_magzp(ztf_repo: Path) -> None:
    """End to end on the undersampled quadrant (stars of sigma ~0.6 px): PSF, aperture correction, zero point
    and a variance rescaled to the sky noise."""
    rc = main(["-q", "process-ccd", str(ztf_repo), "--output", str(ztf_repo.parent / "hdr"), "--doraise",
               "-c", "calibrate.astrometry_source=header", "-c", "calibrate.zero_point_source=header"])
    assert rc == 0
    butler = Butler(ztf_repo.parent / "hdr")
    calexp = butler.get("calexp", visit=136243177, ccdnum=51)
    md = calexp.metadata
    # MAGZP is for the file's DN; the calexp is in electrons (GAIN = 6)
    assert calexp.photo_calib.zero_point == pytest.approx(26.285139 + 2.5 * np.log10(6.0), abs=1e-9)
    assert (md["ASTRSRC"], md["ZPSRC"]) == ("header", "header")
    # seeing (pixel-deconvolved Moffat FWHM of the PSF stars) against IPAC's SEEING (1.241 px = 1.26")
    assert md["SEEING"] == pytest.approx(1.241, rel=0.10)
    # the PSF model's moments exist (they were NaN) and match the stars': the aperture correction has stars
    src = butler.get("src", visit=136243177, ccdnum=51)

    def col(name: str) -> np.ndarray:  # NaN where the stored table masks a value
        return np.ma.filled(np.ma.asarray(src[name], dtype=float), np.nan)

    assert np.all(np.isfinite(col("Ixx_psf"))) and not np.any(col("psf_shape_flag"))
    used = col("calib_psf_used") == 1
    assert used.sum() > 100 and md["APC_N"] > 100
    size = np.sqrt(0.5 * (col("Ixx")[used] + col("Iyy")[used]))
    assert 0.55 < float(np.median(size)) < 0.85  # sigma ~0.6 px before the pixel, ~0.7 px after
    assert 1.0 < float(np.median(col("apCorr"))) < 1.15
    # the gain-based variance was rescaled to the sky noise: source-free pulls have unit width
    assert md["VARSCALE"] == md["VARRATIO"] and 1.1 < md["VARSCALE"] < 1.35
    pulls = source_free_pulls(calexp.image, calexp.variance, calexp.mask, 0.7)
    assert pulls.size > 500_000
    assert 0.95 < robust_std(pulls) < 1.05


def test_ztf_variance_scaling_makes_the_pulls_unit_width(ztf_repo: Path) -> None:
    """Without characterize.scale_variance the gain-based variance is 1.1x too small in sigma; with it the
    robust width of the sky pulls is 1 within 5%."""
    from apfast.ccd.characterize import CharacterizeConfig
    from apfast.ccd.scale_variance import ScaleVarianceConfig

    butler = Butler(ztf_repo)
    planes, _ = calibrated_planes(butler, butler.registry.calibrated_row(136243177, 51))
    assert planes.variance_source == "gain"
    width = {}
    for apply in ("never", "gain"):
        cfg = CharacterizeConfig(scale_variance=ScaleVarianceConfig(apply=apply))  # type: ignore[arg-type]
        char = run_characterize(planes.image, planes.mask, planes.variance, config=cfg, variance_source="gain")
        width[apply] = robust_std(source_free_pulls(char.image, char.variance, char.mask, char.psf_sigma))
        if apply == "never":
            assert char.variance_scale is None and "VARSCALE" not in summarize(char)
        else:
            assert char.variance_scale is not None and char.variance_scale.applied
            assert summarize(char)["VARSCALE"] == pytest.approx(char.variance_scale.factor, abs=1e-5)
    assert width["never"] > 1.07
    assert 0.95 < width["gain"] < 1.05
    # a weight-map variance is the survey's own noise model: left alone unless apply = "calibrated"
    assert not CharacterizeConfig().scale_variance.applies_to("weight")


@pytest.mark.parametrize(("setting", "expect"), [
    ("characterize.scale_variance.apply=weights",
     "'characterize.scale_variance.apply' = 'weights' is not allowed: expected one of 'gain', 'calibrated'"),
    ("characterize.scale_variance.max_ratio=0.5", "characterize.scale_variance.max_ratio = 0.5 is invalid; allowed"),
    ("calibrate.measurement.shape_min_sigma=-1", "calibrate.measurement.shape_min_sigma = -1.0 is invalid; allowed: "
                                                 "a sigma in pixels from 0"),
])
def test_bad_variance_and_moment_settings_are_one_line_exit_2(ztf_repo: Path, tmp_path: Path, capsys,
                                                              setting: str, expect: str) -> None:
    assert main(["process-ccd", str(ztf_repo), "--output", str(tmp_path / "o"), "-c", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_raws_refuse_header_sources() -> None:
    from types import SimpleNamespace

    from apfast.errors import CalibrationError
    from apfast.run.config import PipelineConfig, apply_overrides
    from apfast.run.pipeline import process_ccd

    cfg = apply_overrides(PipelineConfig(), ["calibrate.zero_point_source=header"])
    butler = SimpleNamespace(registry=SimpleNamespace(calibrated_row=lambda v, c: None))
    with pytest.raises(CalibrationError, match="is a raw: calibrate.astrometry_source and"):
        process_ccd(butler, {"visit": 1, "ccdnum": 2}, cfg)  # type: ignore[arg-type]


def test_ztf_process_ccd_without_refcat_is_a_clear_failure(ztf_repo: Path, capsys) -> None:
    """No Gaia/PS1 catalogues for this field are in the repository: calibrate stops at the refcat."""
    rc = main(["process-ccd", str(ztf_repo), "--output", str(ztf_repo.parent / "out")])
    assert rc == 1
    out = capsys.readouterr()
    assert "no reference catalogue 'gaia'" in out.out + out.err


# ----------------------------------------------------------------------------------- synthetic InstCal
@pytest.fixture(scope="module")
def instcal(sim_ccds: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """InstCal image, weight and DQ files of CCD 35 in both visits of conftest.py ``sim_ccds`` (read only)."""
    from synth_instcal import write_instcal

    d = tmp_path_factory.mktemp("instcal")
    s, sim = sim_ccds["summary"], sim_ccds["dir"] / "sim"
    files = []
    for raw in s.raw_files:
        visit = int(fits.getheader(raw, 0)["EXPNUM"])
        files += write_instcal(sim, raw, visit, 35, d / "in", crop=(1024, 3072, 0, 2048))
    repo = d / "repo"
    assert main(["-q", "ingest", str(repo), *[str(f) for f in files], "--calibrated", "--camera",
                 "decam-instcal"]) == 0
    assert main(["-q", "ingest-refcat", str(repo), "gaia", str(s.gaia_file)]) == 0
    assert main(["-q", "ingest-refcat", str(repo), "ps1", str(s.ps1_file)]) == 0
    return {"dir": d, "sim": sim, "repo": repo, "summary": s}


def test_instcal_process_ccd_matches_the_simulation(instcal: dict) -> None:
    from apfast.sim.simulate import load_truth
    from synth_instcal import BAD_COLUMN, SAT_BLOCK, ZERO_WEIGHT

    repo, s = instcal["repo"], instcal["summary"]
    visit = int(s.science_visits[0])
    assert main(["-q", "process-ccd", str(repo), "--id", f"visit={visit}", "--output", str(repo.parent / "out")]) == 0
    calexp = Butler(repo.parent / "out").get("calexp", visit=visit, ccdnum=35)
    truth = load_truth(instcal["sim"])
    meta = truth.ccd(visit, 35)
    assert calexp.metadata["CALINPUT"] is True
    # zero point in electrons, as for raws: the image became electrons with ARAWGAIN
    assert calexp.photo_calib.zero_point == pytest.approx(meta["zero_point_e"], abs=0.03)
    # the refit from the TPV header WCS against the true WCS (crop offset x0=0, y0=1024)
    gx, gy = np.meshgrid(np.linspace(0, 2047, 9), np.linspace(0, 2047, 9))
    r1, d1 = calexp.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    r2, d2 = truth.true_wcs(visit, 35).all_pix2world(gx.ravel(), gy.ravel() + 1024, 0)
    err = np.hypot((r1 - r2) * np.cos(np.radians(d1)), d1 - d2) * 3600.0
    assert float(np.sqrt(np.mean(err**2))) < 0.05
    # DQ values and zero weights became mask planes
    m = calexp.mask
    assert np.all(m[:, BAD_COLUMN] & bitmask("BAD"))
    assert np.all(m[SAT_BLOCK] & bitmask("SAT"))
    assert np.all(m[ZERO_WEIGHT] & bitmask("NO_DATA"))


def test_instcal_header_wcs_and_magzero_need_no_refcat(instcal: dict) -> None:
    """calibrate.astrometry_source = zero_point_source = 'header': the input WCS and MAGZERO (ADU) + 2.5 log10(gain)."""
    from apfast.exposure import wcs_from_header
    from apfast.sim.simulate import load_truth

    repo, s = instcal["repo"], instcal["summary"]
    visit = int(s.science_visits[0])
    out = repo.parent / "hdr"
    assert main(["-q", "process-ccd", str(repo), "--id", f"visit={visit}", "--output", str(out), "--doraise",
                 "-c", "calibrate.astrometry_source=header", "-c", "calibrate.zero_point_source=header"]) == 0
    calexp = Butler(out).get("calexp", visit=visit, ccdnum=35)
    image = next((repo / "calibrated").rglob(f"c4d_{visit}_ooi_*"))
    h0, h1 = fits.getheader(image, 0), fits.getheader(image, 1)
    zp = float(h0["MAGZERO"]) + 2.5 * np.log10(float(h0["ARAWGAIN"]))
    assert calexp.photo_calib.zero_point == pytest.approx(zp, abs=1e-9)
    assert zp == pytest.approx(load_truth(instcal["sim"]).ccd(visit, 35)["zero_point_e"], abs=1e-6)
    assert (calexp.metadata["ASTRSRC"], calexp.metadata["ZPSRC"]) == ("header", "header")
    assert "ASTR_RMS" not in calexp.metadata
    w = wcs_from_header(h1)
    gx, gy = np.meshgrid(np.linspace(0, 2047, 5), np.linspace(0, 2047, 5))
    r1, d1 = calexp.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    r2, d2 = w.all_pix2world(gx.ravel(), gy.ravel(), 0)
    assert np.allclose(r1, r2, rtol=0, atol=1e-10) and np.allclose(d1, d2, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_instcal_templates_difference_dia_end_to_end(instcal: dict) -> None:
    """make-templates and process on calibrated CCDs: transients of the simulation come out as DIA sources."""
    from apfast.sim.simulate import load_truth

    d, repo, s = instcal["dir"], instcal["repo"], instcal["summary"]
    tv = "^".join(str(v) for v in s.template_visits)
    sv = "^".join(str(v) for v in s.science_visits)
    assert main(["-q", "make-templates", str(repo), "--id", f"visit={tv}", "--output", str(d / "templates")]) == 0
    db = f"sqlite:///{d / 'apdb.db'}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={db}"]) == 0
    assert main(["-q", "process", str(repo), "--id", f"visit={sv}", "--template", str(d / "templates"),
                 "--output", str(d / "out"), "-c", f"apdb.db_url={db}"]) == 0
    butler = Butler(d / "out")
    visit = int(s.science_visits[0])
    dia = butler.get("deepDiff_diaSrc", visit=visit, ccdnum=35)
    truth = load_truth(instcal["sim"]).transients
    t = truth[(truth["visit"] == visit) & (truth["ccdnum"] == 35) & (truth["snr_expected"] > 20)]
    t = t[(t["y"] >= 1024) & (t["y"] < 3072)]
    assert len(t) > 3
    x, y = np.asarray(dia["x"], float), np.asarray(dia["y"], float)
    found = [np.min(np.hypot(x - tx, y - (ty - 1024))) < 2.0 for tx, ty in zip(t["x"], t["y"], strict=True)]
    assert np.mean(found) > 0.8
    shutil.rmtree(d / "out")
