"""Faults through ``apfast ingest`` / ``process-ccd`` / ``process`` on simulated DECam data.

A corrupt or truncated raw among several, a missing calib, a missing refcat shard, a
template repository without coverage, and degenerate frames (constant, zero-exposure,
fully saturated): the affected CCD fails (or is skipped) with a one-line message naming
the file or dataId and what was searched, the others succeed, and the exit status says so.
Never a traceback, never a half-ingested registry.

The session's simulation (2 CCDs x 2 visits, conftest.py ``sim_ccds``) is ingested once; each
test works on a copy of that repository (FITS files hard-linked, registries copied: an ingest into
the copy edits its own registry) and replaces (never edits) the files it damages.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

from apfast.repo.ingest import ingest_raws
from apfast.repo.registry import Registry
from apfast.run.cli import main
from apfast.sim.testing import write_decam_raw
from simrepo import linked_repo_copy

CCDS = (35, 36)


@pytest.fixture(scope="module")
def sim(sim_ccds: dict) -> dict:
    """The session's simulation (conftest.py ``sim_ccds``): read only here, every test damages a copy."""
    assert tuple(sim_ccds["ccds"]) == CCDS
    with Registry(sim_ccds["repo"]) as reg:
        rows = reg.find({})
    return {"dir": sim_ccds["dir"], "summary": sim_ccds["summary"], "repo": sim_ccds["repo"], "rows": rows,
            "visits": sorted({r["visit"] for r in rows})}


def _replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["-q", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _failed_lines(out: str) -> list[str]:
    """The summary's FAILED messages, each joined from its wrapped lines (continuations indented by 4)."""
    failed: list[str] = []
    in_failed = False
    for ln in out.splitlines():
        if ln.startswith("FAILED "):
            failed.append(ln)
            in_failed = True
        elif in_failed and ln.startswith("    "):
            failed[-1] += " " + ln.strip()
        else:
            in_failed = False
    return failed


# ---------------------------------------------------------------------------------------- ingest
def test_truncated_raw_among_many_fails_ingest_naming_the_file(sim: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    good = list(sim["summary"].raw_files)
    bad = write_decam_raw(tmp_path / "in", visit=999, name="c4d_truncated_ori.fits.fz")
    _replace_bytes(bad, bad.read_bytes()[: bad.stat().st_size // 2])
    repo = tmp_path / "repo"
    rc, _out, err = _run(["ingest", str(repo), *map(str, good), str(bad)], capsys)
    assert rc == 1
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "c4d_truncated_ori.fits.fz" in lines[0], err
    # one transaction per call: nothing from the good files either, and a rerun without the bad file works
    with sqlite3.connect(repo / "registry.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM raw").fetchone()[0] == 0
    assert not list(repo.rglob("*.fits.fz"))
    rc, out, _ = _run(["ingest", str(repo), *map(str, good)], capsys)
    assert rc == 0 and f"{len(good) * len(CCDS)} CCD row(s)" in out


def test_non_fits_file_among_many_fails_ingest_naming_the_file(sim: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "c4d_junk_ori.fits.fz"
    junk.write_bytes(b"SIMPLE  =                    T" + b"\x00" * 100)
    rc, _out, err = _run(["ingest", str(tmp_path / "repo"), str(sim["summary"].raw_files[0]), str(junk)], capsys)
    assert rc == 1
    assert "Traceback" not in err and "c4d_junk_ori.fits.fz" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------- process-ccd
def test_truncated_raw_after_ingest_fails_that_ccd_only(sim: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    repo = linked_repo_copy(sim["repo"], tmp_path / "repo")
    v_bad, v_good = sim["visits"]
    row = next(r for r in sim["rows"] if r["visit"] == v_bad)
    raw = repo / row["file"]
    _replace_bytes(raw, raw.read_bytes()[: raw.stat().st_size // 3])
    rc, out, err = _run(["process-ccd", str(repo), "--rerun", "c", "--id", f"visit={v_bad}^{v_good}",
                         "ccdnum=35"], capsys)
    assert rc == 1
    assert "Traceback" not in err
    failed = _failed_lines(out)
    assert len(failed) == 1, out
    assert f"visit={v_bad} ccdnum=35" in failed[0] and str(raw) in failed[0] and "truncated or corrupt" in failed[0]
    assert "1 ok, 1 failed" in out
    assert (repo / "rerun" / "c" / f"{v_good:07d}" / "calexp" / f"calexp-{v_good:07d}_35.fits").is_file()
    assert not (repo / "rerun" / "c" / f"{v_bad:07d}").exists()

    # the template repository has no deepCoadd: an error before any work, naming the folder, unless
    # --skip-missing-templates, which skips the difference naming the dataId and the search
    empty = tmp_path / "no_templates"
    empty.mkdir()
    args = ["process", str(repo), "--rerun", "c", "--id", f"visit={v_good}", "ccdnum=35",
            "--template", str(empty), "-c", "dia_pipe.do_dia=false", "--clobber-config"]
    assert main(args) == 1
    cap = capsys.readouterr()
    assert f"--template {empty} holds no templates" in cap.err and "Traceback" not in cap.err
    caplog_rc = main([*args, "--skip-missing-templates"])
    cap = capsys.readouterr()
    assert caplog_rc == 0
    assert "Traceback" not in cap.err
    assert "skipped" in cap.out


def test_missing_template_coverage_names_dataid_and_search(sim: dict, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # processCcd outputs come from a fresh rerun; only the diffim step is looked at here
    repo = linked_repo_copy(sim["repo"], tmp_path / "repo")
    v = sim["visits"][1]
    assert main(["-q", "process-ccd", str(repo), "--rerun", "t", "--id", f"visit={v}", "ccdnum=36",
                 "-c", "dia_pipe.do_dia=false"]) == 0
    capsys.readouterr()
    empty = tmp_path / "no_templates"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger="apfast"):
        rc = main(["process", str(repo), "--rerun", "t", "--id", f"visit={v}", "ccdnum=36",
                   "--template", str(empty), "-c", "dia_pipe.do_dia=false", "--skip-missing-templates"])
    assert rc == 0  # asked for: no template is a skip, not a failure
    text = " ".join(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert f"visit={v}" in text and "ccdnum=36" in text, text
    assert str(empty) in text, text
    assert "Traceback" not in capsys.readouterr().err


def test_missing_flat_file_fails_with_the_path(sim: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    repo = linked_repo_copy(sim["repo"], tmp_path / "repo")
    flats = sorted((repo / "calibs" / "flat").rglob("*.fits*"))
    assert flats
    for f in flats:
        f.unlink()
    v = sim["visits"][1]
    rc, out, err = _run(["process-ccd", str(repo), "--rerun", "f", "--id", f"visit={v}", "ccdnum=35"], capsys)
    assert rc == 1 and "Traceback" not in err
    (failed,) = _failed_lines(out)
    assert f"visit={v} ccdnum=35" in failed and "flat" in failed and str(repo / "calibs" / "flat") in failed


def test_empty_calib_repository_names_dataid_and_registry(sim: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = linked_repo_copy(sim["repo"], tmp_path / "repo")
    no_calibs = tmp_path / "no_calibs"
    no_calibs.mkdir()
    v = sim["visits"][1]
    rc, out, err = _run(["process-ccd", str(repo), "--rerun", "f", "--calib", str(no_calibs), "--id",
                         f"visit={v}", "ccdnum=35"], capsys)
    assert rc == 1 and "Traceback" not in err
    (failed,) = _failed_lines(out)
    assert "No locations for get" in failed and "bias" in failed, failed
    assert f"'visit': {v}" in failed and str(no_calibs / "calibRegistry.sqlite3") in failed


def test_missing_refcat_shard_names_dataid_and_catalogue(sim: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    repo = linked_repo_copy(sim["repo"], tmp_path / "repo")
    shards = sorted((repo / "ref_cats" / "gaia").glob("*.fits"))
    assert shards
    for s in shards:
        s.unlink()
    v = sim["visits"][1]
    rc, out, err = _run(["process-ccd", str(repo), "--rerun", "r", "--id", f"visit={v}", "ccdnum=35"], capsys)
    assert rc == 1 and "Traceback" not in err
    (failed,) = _failed_lines(out)
    assert f"visit={v} ccdnum=35" in failed and "gaia" in failed
    assert str(shards[0]) in failed, failed


def test_degenerate_frames_fail_cleanly(sim: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A constant frame, a zero-second frame and a fully saturated frame: clear per-CCD failures."""
    repo = linked_repo_copy(sim["repo"], tmp_path / "repo")
    ref = next(r for r in sim["rows"] if r["visit"] == sim["visits"][1] and r["ccdnum"] == 35)
    common = {"ccdnums": (35,), "date_obs": ref["taiObs"], "ra": ref["ra"], "dec": ref["dec"], "band": "g"}
    files = [
        write_decam_raw(tmp_path / "in", visit=900, level=2000, name="constant.fits", **common),
        write_decam_raw(tmp_path / "in", visit=901, level=1000, exptime=0.0, name="zero.fits", **common),
        write_decam_raw(tmp_path / "in", visit=902, level=65000, name="saturated.fits", **common),
    ]
    ingest_raws(repo, files, mode="copy")
    rc, out, err = _run(["process-ccd", str(repo), "--rerun", "d", "--id", "visit=900..902"], capsys)
    assert rc == 1
    assert "Traceback" not in err and "unexpected error" not in err
    failed = _failed_lines(out)
    assert len(failed) == 3, out
    for line, visit in zip(failed, (900, 901, 902), strict=True):
        assert f"visit={visit} ccdnum=35" in line
        assert "Error:" in line and len(line) < 600
