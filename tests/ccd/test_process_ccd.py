"""processCcd end to end on simulated DECam data, checked against the simulator's truth.

The session's simulation (2 CCDs x 2 visits, full size; conftest.py ``sim_ccds``) is
processed through the real CLI in a copy of its repository; every tolerance is the issue's
(ISR residual and pull from the noise, astrometry 0.03", zero point 0.02 mag, PSF FWHM 3%,
background 0.5% of sky).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from apfast.ccd.background import BackgroundModel
from apfast.ccd.isr import amp_params_from_header, run_isr
from apfast.ccd.psf_determiner import halfmax_fwhm
from apfast.masks import bitmask
from apfast.repo.butler import Butler
from apfast.repo.calibs import ingest_calibs
from apfast.repo.ingest import ingest_raws
from apfast.repo.refcat import ingest_refcat
from apfast.run.cli import main
from apfast.run.config import load_config
from apfast.sim.simulate import load_truth, psf_fwhm, truth_image
from simrepo import linked_repo_copy

CCDS = (35, 36)


@pytest.fixture(scope="module")
def sim(sim_ccds: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """process-ccd of every CCD-visit of the session's simulation (conftest.py ``sim_ccds``), in a repository copy."""
    assert tuple(sim_ccds["ccds"]) == CCDS
    d, summary = sim_ccds["dir"], sim_ccds["summary"]
    repo = linked_repo_copy(sim_ccds["repo"], tmp_path_factory.mktemp("pccd") / "repo")
    visits = "^".join(str(v) for v in summary.visits)
    rc = main(["-q", "process-ccd", str(repo), "--rerun", "t", "--id", f"visit={visits}"])
    assert rc == 0
    return {"dir": d, "summary": summary, "repo": repo, "truth": load_truth(d / "sim"),
            "butler": Butler(repo / "rerun" / "t")}


def _gain_image(meta: dict) -> np.ndarray:
    g = np.empty((4096, 2048), np.float32)
    g[:, :1024] = meta["amps"]["B"]["gain"]
    g[:, 1024:] = meta["amps"]["A"]["gain"]
    return g


def _cases(sim: dict) -> list[tuple[int, int]]:
    return [(v, c) for v in sim["summary"].visits for c in CCDS]


def test_isr_matches_truth_within_noise(sim: dict) -> None:
    butler, truth = sim["butler"], sim["truth"]
    v, c = sim["summary"].science_visits[0], CCDS[0]
    did = {"visit": v, "ccdnum": c}
    raw = butler.get("raw", did)
    amps = amp_params_from_header(butler.registry.camera, raw.metadata)
    cal = {k: butler.get(k, did) for k in ("bias", "flat", "defects", "crosstalk")}
    cfg = dataclasses.replace(load_config().isr, do_linearize=False)  # the simulation has no non-linearity
    res = run_isr(raw.image, amps, config=cfg, bias=cal["bias"], flat=cal["flat"], defects=cal["defects"],
                  crosstalk=cal["crosstalk"])
    meta = truth.ccd(v, c)
    gain = _gain_image(meta)
    full = truth_image(sim["dir"] / "sim", v, c) * gain  # electrons, as the ISR output
    sky = truth_image(sim["dir"] / "sim", v, c, sources=False) * gain
    masks = truth.masks(v, c)
    clean = (res.mask == 0) & ((full - sky) < 0.01 * np.sqrt(sky)) & ~masks["cr"] & ~masks["saturated"]
    assert clean.sum() > 2_000_000
    resid = (res.image - full)[clean]
    pull = resid / np.sqrt(res.variance[clean])
    assert abs(float(np.mean(resid / gain[clean]))) < 0.1  # ADU
    assert float(np.std(pull)) == pytest.approx(1.0, abs=0.05)
    # every listed defect pixel is masked BAD
    bad = bitmask("BAD")
    for x0, y0, w, h in cal["defects"]:
        assert np.all(res.mask[y0 : y0 + h, x0 : x0 + w] & bad)
    # crosstalk ghosts: the correction removes them to < 2% of their amplitude
    off = run_isr(raw.image, amps, config=dataclasses.replace(cfg, do_crosstalk=False), bias=cal["bias"],
                  flat=cal["flat"], defects=cal["defects"])
    ghost = off.image - res.image
    sel = (ghost > 20 * np.sqrt(res.variance)) & (res.mask & bad == 0)
    assert sel.sum() > 50  # bright saturated stars leave strong ghosts in the other amp
    amplitude = float(np.mean(ghost[sel]))
    left = float(np.mean((res.image - full)[sel]))
    assert abs(left) < 0.02 * amplitude


def test_astrometry_zero_point_psf_background_vs_truth(sim: dict) -> None:
    butler, truth = sim["butler"], sim["truth"]
    visits = {int(r["visit"]): r for r in truth.visits}
    gx, gy = np.meshgrid(np.linspace(0, 2047, 17), np.linspace(0, 4095, 33))
    for v, c in _cases(sim):
        calexp = butler.get("calexp", visit=v, ccdnum=c)
        meta = truth.ccd(v, c)
        # astrometry: the fitted WCS against the true (distorted) WCS over the whole CCD, corners included
        true_wcs = truth.true_wcs(v, c)
        r1, d1 = calexp.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
        r2, d2 = true_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
        err = np.hypot((r1 - r2) * np.cos(np.radians(d1)), d1 - d2) * 3600.0
        assert float(np.sqrt(np.mean(err**2))) < 0.03, (v, c)
        # zero point (electrons) against the simulator's
        zp_true = float(visits[v]["zero_point_e"])
        assert calexp.photo_calib.zero_point == pytest.approx(zp_true, abs=0.02), (v, c)
        # PSF FWHM at the centre and the corners
        for x, y in [(1024, 2048), (60, 60), (1987, 60), (60, 4035), (1987, 4035)]:
            got = halfmax_fwhm(calexp.psf.compute_image(x, y))
            assert got == pytest.approx(float(psf_fwhm(meta, x, y)), rel=0.03), (v, c, x, y)
        # background model against the true sky (electrons)
        model = BackgroundModel.from_container(butler.get("calexpBackground", visit=v, ccdnum=c)).image()
        sky = truth_image(sim["dir"] / "sim", v, c, sources=False) * _gain_image(meta)
        frac = np.abs(model - sky) / sky
        assert float(np.percentile(frac, 99)) < 0.005, (v, c)


def test_outputs_and_catalogue(sim: dict) -> None:
    butler = sim["butler"]
    v, c = sim["summary"].science_visits[0], CCDS[1]
    src = butler.get("src", visit=v, ccdnum=c)
    assert len(src) > 300
    for col in ("coord_ra", "coord_dec", "psfFlux", "psfFlux_nJy", "apCorr", "calib_astrometry_used",
                "calib_photometry_used", "pixelFlags_saturated"):
        assert col in src.colnames
    assert src["calib_photometry_used"].sum() >= 20
    calexp = butler.get("calexp", visit=v, ccdnum=c)
    assert calexp.mask.dtype == np.int32 and calexp.variance.shape == (4096, 2048)
    assert calexp.visit_info.visit == v and calexp.metadata["N_SRC"] == len(src)
    assert (sim["repo"] / "rerun" / "t" / "config" / "apfast.toml").exists()


def test_rerun_skips_and_failed_ccd_does_not_stop_the_run(sim: dict, tmp_path: Path, capsys) -> None:
    """A CCD without reference stars fails with a message naming it; the others still run; exit 1."""
    summary = sim["summary"]
    repo = tmp_path / "repo"
    ingest_raws(repo, summary.raw_files)
    ingest_calibs(repo / "calibs", summary.calib_files)
    # a Gaia catalogue that covers CCD 35 only
    with Butler(sim["repo"]).registry as reg:
        row = reg.find_one({"visit": summary.science_visits[0], "ccdnum": 35})
    ra_lo = min(row[f"corner_ra_{i}"] for i in range(4)) - 0.005
    ra_hi = max(row[f"corner_ra_{i}"] for i in range(4)) + 0.005
    dec_lo = min(row[f"corner_dec_{i}"] for i in range(4)) - 0.005
    dec_hi = max(row[f"corner_dec_{i}"] for i in range(4)) + 0.005
    part = tmp_path / "gaia_part.csv"
    with open(summary.gaia_file) as fin, open(part, "w", newline="") as fout:
        rd = csv.DictReader(fin)
        wr = csv.DictWriter(fout, fieldnames=rd.fieldnames)
        wr.writeheader()
        for r in rd:
            if ra_lo < float(r["ra"]) < ra_hi and dec_lo < float(r["dec"]) < dec_hi:
                wr.writerow(r)
    ingest_refcat(repo, "gaia", [part])
    ingest_refcat(repo, "ps1", [summary.ps1_file])
    v = summary.science_visits[0]
    capsys.readouterr()
    rc = main(["-q", "process-ccd", str(repo), "--rerun", "f", "--id", f"visit={v}", "ccdnum=35^36"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"FAILED visit={v} ccdnum=36" in out
    assert "1 ok, 1 failed" in out
    # --doraise stops at the failure with the error's own exit status
    assert main(["-q", "process-ccd", str(repo), "--rerun", "f", "--id", f"visit={v}", "ccdnum=36",
                 "--doraise"]) != 0
    # re-running skips the CCD that succeeded
    capsys.readouterr()
    main(["-q", "process-ccd", str(repo), "--rerun", "f", "--id", f"visit={v}", "ccdnum=35"])
    assert "skipped" in capsys.readouterr().out
