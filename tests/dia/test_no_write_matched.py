"""`apfast process --no-write-matched` with quantized outputs, end to end on one simulated CCD-visit.

The matched template is not written, the DIA stage still gets it in memory (DIA sources, APDB rows and
alerts are made), the outputs are tile-compressed and read back through the Butler, a re-run skips,
and a DIA stage that would need the missing file says so and how to fix it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from astropy.io import fits

from apfast.repo.butler import Butler
from apfast.run.cli import main

CCD = 35


@pytest.fixture(scope="module")
def run(dia_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("nomatched")
    repo, summary = dia_dataset["repo"], dia_dataset["summary"]
    url = f"sqlite:///{d / 'apdb.db'}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    visit = summary.science_visits[0]
    args = ["-q", "process", str(repo), "--rerun", "nomatched", "--id", f"visit={visit}", f"ccdnum={CCD}",
            "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={url}",
            "-c", "output.compression=quantized", "--no-write-matched"]
    assert main(args) == 0
    return {"args": args, "db": d / "apdb.db", "did": {"visit": visit, "ccdnum": CCD},
            "out": repo / "rerun" / "nomatched"}


def test_matched_template_not_written_and_dia_still_runs(run: dict) -> None:
    b = Butler(run["out"])
    did = run["did"]
    assert not b.datasetExists("deepDiff_matchedExp", did)
    assert not list(run["out"].rglob("matchexp-*"))
    for name in ("calexp", "deepDiff_differenceExp", "deepDiff_diaSrc", "alerts"):
        assert b.datasetExists(name, did), name
    with sqlite3.connect(run["db"]) as con:
        assert con.execute('SELECT COUNT(*) FROM "DiaSource"').fetchone()[0] > 0
    assert "write_matched = false" in (run["out"] / "config" / "apfast.toml").read_text()
    # quantized, tile-compressed planes; the Butler reads them back transparently
    for name in ("calexp", "deepDiff_differenceExp"):
        with fits.open(b.getUri(name, did)) as hdul:
            assert all(isinstance(hdul[e], fits.CompImageHDU) for e in ("IMAGE", "MASK", "VARIANCE"))
        exp = b.get(name, did)
        assert exp.shape == (4096, 2048) and exp.psf is not None and exp.wcs is not None


def test_rerun_skips_and_a_dia_redo_says_the_matched_template_is_missing(run: dict, capsys) -> None:
    assert main(run["args"]) == 0  # every output this config writes exists: skipped, no matched needed
    capsys.readouterr()
    Path(Butler(run["out"]).getUri("deepDiff_diaSrc", run["did"])).unlink()  # the DIA stage must redo
    assert main(run["args"]) == 1
    err = capsys.readouterr().err
    assert "deepDiff_matchedExp was not written" in err and "--clobber-output" in err


@pytest.mark.slow  # re-processes the full-size CCD-visit (~8 s); the module's run checks the same hand-over
def test_clobber_redo_hands_the_matched_template_over_in_memory_again(run: dict) -> None:
    """The fix the message above suggests: --clobber-output redoes differencing, which hands it to DIA again."""
    assert main([*run["args"], "--clobber-output"]) == 0
    b = Butler(run["out"])
    assert b.datasetExists("deepDiff_diaSrc", run["did"]) and not b.datasetExists("deepDiff_matchedExp", run["did"])


def test_no_write_matched_refuses_parallel_runs(run: dict, capsys) -> None:
    assert main([*run["args"], "-j", "2"]) == 2
    assert "needs a serial run" in capsys.readouterr().err
