"""`apfast process -c inject.*` and `apfast verify` end to end on one simulated full-size CCD-visit.

The first science visit of the shared ``dia_dataset`` is processed with 60 random fakes (15% also
injected into the template) in two steps: images only (``dia_pipe.do_dia = false``), then the DIA
stage alone, which reads the calexp back from disk and must re-inject the same fakes from the stored
``injected_catalog``. ``apfast verify`` then matches the DIA sources to the fakes and the truth.
That run takes 25-35 s on 2 cores, so the tests on it are ``slow``; the usage-error tests are not.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from apfast.masks import bitmask
from apfast.repo.butler import Butler
from apfast.run.cli import main

CCD = 35


@pytest.fixture(scope="module")
def injected(dia_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("verify")
    repo, visit = dia_dataset["repo"], dia_dataset["summary"].science_visits[0]
    db = d / "apdb.db"
    url = f"sqlite:///{db}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    args = ["-q", "process", str(repo), "--rerun", "inj", "--id", f"visit={visit}", f"ccdnum={CCD}",
            "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={url}",
            "-c", "inject.n_per_ccd=60", "-c", "inject.template_fraction=0.15", "-c", "inject.host_fraction=0.2",
            "-c", "inject.mag_range=[19.5, 24.0]"]
    assert main([*args, "-c", "dia_pipe.do_dia=false"]) == 0  # calexp, difference and injected_catalog only
    assert main([*args, "--clobber-config"]) == 0  # the DIA stage alone: reads the calexp back, re-injects
    out = repo / "rerun" / "inj"
    js = d / "verify.json"
    return {"out": out, "db": db, "url": url, "visit": visit, "json": js, "dir": dia_dataset["dir"],
            "rc": main(["-q", "verify", str(out), "-c", f"apdb.db_url={url}", "--json", str(js)])}


def _db(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


@pytest.mark.slow  # the injected run (~30 s)
def test_injected_catalog_dataset(injected: dict) -> None:
    cat = Butler(injected["out"]).get("injected_catalog", visit=injected["visit"], ccdnum=CCD)
    assert len(cat) == 60 and cat["injected"].sum() >= 58
    assert {"injection_id", "ra", "dec", "x", "y", "mag", "flux_nJy", "flux", "on_template", "host_id",
            "host_offset_arcsec", "injected"} <= set(cat.colnames)
    assert 3 <= cat["on_template"].sum() <= 20 and (cat["host_id"] >= 0).sum() >= 3
    # the calexp on disk is processCcd's; the difference carries the fakes and their mask plane
    diff = Butler(injected["out"]).get("deepDiff_differenceExp", visit=injected["visit"], ccdnum=CCD)
    ix, iy = np.round(cat["x"]).astype(int), np.round(cat["y"]).astype(int)
    assert ((diff.mask[iy, ix] & bitmask("INJECTED")) != 0)[cat["injected"]].all()


@pytest.mark.slow  # the injected run (~30 s)
def test_verify_recovers_bright_fakes(injected: dict) -> None:
    assert injected["rc"] == 0
    res = json.loads(injected["json"].read_text())
    (cv,) = res["ccd_visits"]
    bright = [b for b in res["fakes"]["by_snr"] if b["lo"] >= 10]
    n, found = sum(b["n"] for b in bright), sum(b["n_detected"] for b in bright)
    assert n >= 15 and found / n >= 0.9, res["fakes"]["by_snr"]
    assert cv["n_fakes_flagged"] == cv["n_fakes_matched"]  # every recovered fake has pixelFlags_injectedCenter
    assert cv["n_template_fakes_detected"] <= 1  # fakes in the template too vanish in the difference
    assert cv["n_truth"] > 0 and cv["n_truth_matched"] / cv["n_truth"] >= 0.7
    assert res["false_per_ccd_visit"]["max"] <= 10
    p = res["fakes"]["pulls"]
    assert p["n"] >= 20 and abs(p["median"]) < 1.0 and 0.5 < p["robust_sigma"] < 2.0


@pytest.mark.slow  # the injected run (~30 s)
def test_verify_counts_equal_the_apdb(injected: dict) -> None:
    res = json.loads(injected["json"].read_text())
    n_apdb = _db(injected["db"], f'SELECT COUNT(*) FROM "DiaSource" WHERE visit = {injected["visit"]}')[0][0]
    assert res["totals"]["n_dia"] == n_apdb > 0
    n_flag = _db(injected["db"], 'SELECT COUNT(*) FROM "DiaSource" WHERE "pixelFlags_injectedCenter" = 1')[0][0]
    assert n_flag >= res["totals"]["n_fakes_matched"]
    # the same numbers from deepDiff_diaSrc when no APDB is given
    out = injected["out"]
    src = Butler(out).get("deepDiff_diaSrc", visit=injected["visit"], ccdnum=CCD)
    assert int(np.sum(src["pixelFlags_injectedCenter"])) == n_flag
    assert "pixelFlags_injected_templateCenter" in src.colnames


@pytest.mark.slow  # the injected run (~30 s)
def test_dia_stage_reinjected_the_calexp(injected: dict) -> None:
    """The DIA stage ran apart from differencing: forced science fluxes at hostless fakes see the fakes."""
    cat = Butler(injected["out"]).get("injected_catalog", visit=injected["visit"], ccdnum=CCD)
    rows = _db(injected["db"], 'SELECT ra, dec, "scienceFlux", "pixelFlags_injectedCenter" FROM "DiaSource"')
    a = np.array(rows, float).reshape(-1, 4)
    from apfast.dia.truth_match import match_nearest

    ok = cat["injected"] & ~cat["on_template"] & (cat["host_id"] < 0) & (cat["mag"] < 22.0)
    idx = match_nearest(a[:, 0], a[:, 1], cat["ra"][ok], cat["dec"][ok], 1.0)
    assert (idx >= 0).sum() >= 5
    ratio = a[idx[idx >= 0], 2] / np.asarray(cat["flux_nJy"][ok])[idx >= 0]
    assert abs(np.median(ratio) - 1.0) < 0.15, ratio


@pytest.mark.slow  # the injected run (~30 s)
def test_verify_prints_tables(injected: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["-q", "verify", str(injected["out"]), "-c", f"apdb.db_url={injected['url']}",
                 "--truth", str(injected["dir"] / "sim")]) == 0
    text = capsys.readouterr().out
    for want in ("fakes: completeness vs magnitude", "fakes: completeness vs expected S/N",
                 "simulated transients: completeness vs expected S/N", "flux pulls of matched fakes",
                 "false detections (unexplained DIA sources) per CCD-visit"):
        assert want in text


def test_bad_catalogue_is_one_line_exit_2(dia_dataset: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "fakes.csv"
    bad.write_text("ra,dec,magnitude\n150.1,2.2,21.0\n")
    rc = main(["-q", "process", str(dia_dataset["repo"]), "--rerun", "bad", "--id", f"ccdnum={CCD}",
               "-c", f"inject.catalog={bad}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(bad) in err and "'mag'" in err
    assert not (dia_dataset["repo"] / "rerun" / "bad").exists()  # stopped before any work


def test_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert main(["verify", str(tmp_path), "--match-radius", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("apfast verify: error:") for e in err)
