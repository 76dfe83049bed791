"""The command line as a user meets it: exit codes, messages, --show data, config show."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pytest

from apfast.run.cli import build_parser, main
from apfast.sim.testing import write_decam_raw


def _help(command: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*command, "--help"]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    raws = [
        write_decam_raw(d / "raw", visit=289401, ccdnums=(34, 35, 36), date_obs="2019-03-05T06:07:08.000"),
        write_decam_raw(d / "raw", visit=289402, ccdnums=(35, 36), date_obs="2019-03-05T06:09:10.000"),
        write_decam_raw(d / "raw", visit=289403, ccdnums=(35,), date_obs="2019-03-06T06:09:10.000", band="r"),
    ]
    assert main(["-q", "ingest", str(d / "repo"), *map(str, raws)]) == 0
    return d / "repo"


def test_ingest_output_and_reingest(repo: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    raw = write_decam_raw(tmp_path / "in", visit=5, ccdnums=(1, 2))
    assert main(["ingest", str(tmp_path / "r"), str(raw)]) == 0
    out = capsys.readouterr().out
    assert "ingested 1 file(s), 2 CCD row(s)" in out
    assert main(["ingest", str(tmp_path / "r"), str(tmp_path / "in")]) == 0  # a folder: its raws, already present
    assert "1 already present" in capsys.readouterr().out


def test_show_data_table(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["process", str(repo), "--id", "visit=289401^289402", "ccdnum=35..36", "filter=g", "--show", "data"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert "visit" in lines[0] and "ccdnum" in lines[0]
    assert sum("289401" in ln for ln in lines) == 2
    assert sum("289402" in ln for ln in lines) == 2
    assert "4 dataId(s)" in out


def test_repeated_id_is_a_union(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["process", str(repo), "--id", "visit=289401", "ccdnum=34", "--id", "visit=289403", "--show", "data"])
    assert rc == 0
    assert "2 dataId(s)" in capsys.readouterr().out


def test_no_match_lists_available_values(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["process", str(repo), "--id", "visit=289401", "ccdnum=3^6..12", "--show", "data"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "matches no raw data" in err
    assert "available ccdnum: 34, 35, 36" in err
    rc = main(["process", str(repo), "--id", "visit=289403", "filter=g", "--show", "data"])
    assert rc == 2
    assert "available filter: r" in capsys.readouterr().err


def test_bad_id_syntax_exit_2(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["process", str(repo), "--id", "visit=12..3", "--show", "data"]) == 2
    assert "visit=12..3" in capsys.readouterr().err
    assert main(["process", str(repo), "--id", "colour=blue", "--show", "data"]) == 2


def test_config_show_and_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "show", "-c", "apdb.isolation_level=READ_UNCOMMITTED",
                 "-c", "apdb.db_url=sqlite:///apdb/association.db"]) == 0
    out = capsys.readouterr().out
    assert 'isolation_level = "READ_UNCOMMITTED"' in out
    assert 'db_url = "sqlite:///apdb/association.db"' in out
    f = tmp_path / "c.toml"
    f.write_text('[apdb]\nconnection_timeout = 240\n')
    assert main(["config", "show", "-C", str(f), "-c", "apdb.connection_timeout=30"]) == 0
    assert "connection_timeout = 30.0" in capsys.readouterr().out  # later settings win


def test_config_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "-c", "apdb.db_ur=x"]) == 2
    assert "did you mean 'apdb.db_url'" in capsys.readouterr().err
    assert main(["config", "show", "-c", "apdb.connection_timeout"]) == 2
    assert main(["config", "show", "-c", "apdb.connection_timeout=-1"]) == 2


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["--version"]) == 0
    assert "apfast" in capsys.readouterr().out


def test_ingest_error_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c4d_bad.fits.fz"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    assert main(["ingest", str(tmp_path / "repo"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "apfast ingest: error:" in err and str(bad) in err
    assert main(["process", str(tmp_path / "nowhere"), "--show", "data"]) == 1
    assert "apfast ingest" in capsys.readouterr().err  # says how to create a repository


def test_process_refuses_zero_workers(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["process", str(repo), "--rerun", "x", "--id", "visit=289401", "-j", "0"]) == 2
    assert "-j 0: give a number of worker processes >= 1" in capsys.readouterr().err
    assert not (repo / "rerun" / "x").exists()


def test_process_needs_an_output(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["process", str(repo), "--id", "visit=289401"])
    assert rc == 2
    assert "--rerun NAME" in capsys.readouterr().err


def test_process_after_process_ccd_with_other_apdb_keys(repo: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # the README workflow: process-ccd, then process into the same rerun with apdb settings added
    # (the CCD fails for want of calibs, exit 1, but the stored config is accepted)
    sel = ["--rerun", "cfgchange", "--id", "visit=289403"]
    assert main(["-q", "process-ccd", str(repo), *sel]) == 1
    url = f"sqlite:///{tmp_path}/apdb.db"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    capsys.readouterr()
    sel = [*sel, "--skip-missing-templates"]  # the test repository has no templates
    rc = main(["-q", "process", str(repo), *sel, "-c", "apdb.isolation_level=READ_UNCOMMITTED",
               "-c", f"apdb.db_url={url}", "-c", "process.n_threads=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "different configuration" not in err
    out_repo = repo / "rerun" / "cfgchange"
    assert "visit" in (out_repo / "summary.txt").read_text()  # the wide per-CCD table of the last run
    stored = (out_repo / "config" / "apfast.toml").read_text()
    assert 'isolation_level = "READ_UNCOMMITTED"' in stored  # the full config is stored
    # a product-affecting change is refused, naming the keys with old and new values; the old
    # spellings diffim.* (now difference.psfmatch.*) and dia.threshold still work on the command line
    rc = main(["-q", "process", str(repo), *sel, "-c", f"apdb.db_url={url}", "-c", "diffim.kernel_size=25",
               "-c", "dia.threshold=6"])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("rerun/cfgchange/config/apfast.toml holds a different configuration: "
            "dia.detection.threshold 5.0 -> 6.0; difference.psfmatch.kernel_size 21 -> 25; "
            "pass --clobber-config") in err
    assert "apdb." not in err and "Traceback" not in err


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite://apdb.db", ("puts 'apdb.db' where a server name goes, but SQLite has no server: a file path "
                          "needs three slashes, sqlite:///apdb.db")),
    ("mysql://user@host/apdb", "database 'mysql' is not supported; use sqlite:///"),
    ("sqlite://", "is an in-memory SQLite database"),
])
def test_make_apdb_and_process_bad_urls_exit_2(repo: Path, url: str, expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-apdb", "-c", f"apdb.db_url={url}"]) == 2
    err = capsys.readouterr().err
    assert f"apfast make-apdb: error: apdb.db_url={url}" in err and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["process", str(repo), "--rerun", "badurl", "--id", "visit=289403",
                 "-c", f"apdb.db_url={url}"]) == 2
    err = capsys.readouterr().err
    assert f"apfast process: error: apdb.db_url={url}" in err and expected in err


def test_make_apdb_unusable_folder_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    url = f"sqlite:///{tmp_path}/afile/apdb.db"  # the folder would have to replace a file
    assert main(["make-apdb", "-c", f"apdb.db_url={url}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot create the folder {tmp_path}/afile for the APDB file" in err
    assert "choose a path in a writable folder" in err and "Traceback" not in err
    # a missing folder is created; the hint gives the absolute URL
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url=sqlite:///{tmp_path}/new/dir/apdb.db"]) == 0
    assert f"-c apdb.db_url=sqlite:///{tmp_path}/new/dir/apdb.db" in capsys.readouterr().out
    # a second make-apdb at the same URL refuses to replace it
    assert main(["make-apdb", "-c", f"apdb.db_url=sqlite:///{tmp_path}/new/dir/apdb.db"]) == 1
    assert "already holds an APDB" in capsys.readouterr().err


def test_process_without_templates_is_an_error(repo: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    sel = ["--rerun", "notemplates", "--id", "visit=289403", "-c", "dia_pipe.do_dia=false"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["process", str(repo), *sel, "--template", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"apfast process: error: --template {empty} holds no templates: no sky map " in err
    assert "(dataset deepCoadd_skyMap)" in err and "--skip-missing-templates" in err
    assert main(["process", str(repo), *sel, "--template", str(tmp_path / "typo")]) == 1
    err = capsys.readouterr().err
    assert f"--template {tmp_path / 'typo'}: no such folder" in err and "ingest raws" not in err
    assert main(["process", str(repo), *sel]) == 1  # the default: templates in REPO
    assert "template repository (no --template given, so REPO)" in capsys.readouterr().err
    assert not (repo / "rerun" / "notemplates").exists()  # nothing was started
    assert "--skip-missing-templates" in _help(["process"])


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)subcommand parser by its command line, e.g. 'config show'."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return out


def test_every_subcommand_help_has_a_description_and_explains_positionals() -> None:
    subs = _subcommands()
    assert {"process", "process-ccd", "make-templates", "simulate", "demo", "config show"} <= set(subs)
    for name, parser in subs.items():
        assert parser.description and len(parser.description) > 20, name
        for action in parser._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"apfast {name}: positional {action.dest} has no help"
        text = _help(name.split())
        assert parser.description.splitlines()[0] in text


def test_options_that_do_nothing_are_not_offered() -> None:
    ccd, templates, process = _help(["process-ccd"]), _help(["make-templates"]), _help(["process"])
    for opt in ("--template ", "--templateId", "--processes", "--executor", "--skip-missing-templates"):
        assert opt not in ccd and opt not in templates, opt
        assert opt in process, opt
    assert "--clobber-output" in ccd and "--clobber-output" not in templates
    assert main(["process-ccd", "REPO", "--template", "x"]) == 2  # argparse: unrecognized argument


def test_default_summary_fits_120_columns() -> None:
    from apfast.run.pipeline import CcdOutcome, format_summary

    stages = ["read", "isr", "characterize", "refcat", "calibrate", "write", "template", "psfmatch",
              "decorrelate", "difference", "dia_detect", "association", "alerts", "dia", "total"]
    stats = {"PSF_FWHM_ARCSEC": 1.23, "ZP": 31.234, "ASTR_RMS": 0.012, "N_SRC": 12345, "N_DIA": 123,
             "N_NEW_OBJ": 45, "N_UPD_OBJ": 67}
    outcomes = [CcdOutcome(1234567, 35, "ok", timings={s: 123.45 for s in stages}, stats=stats),
                CcdOutcome(1234568, 36, "failed", "difference: " + "a reason with /some/long/path " * 12)]
    text = format_summary(outcomes)
    assert all(len(line) <= 120 for line in text.splitlines()), text
    assert "1 ok, 1 failed" in text and "FAILED visit=1234568 ccdnum=36" in text
    wide = format_summary(outcomes, wide=True)
    assert "psfmatch" in wide and "association" in wide and max(map(len, wide.splitlines())) > 120


def test_simulate_report_is_readable(tmp_path: Path) -> None:
    from apfast.run.cli import simulation_report
    from apfast.sim.simulate import SimulationSummary

    out = tmp_path / "sim"
    s = SimulationSummary(
        out=out, raw_files=(out / "raw" / "a.fits.fz",) * 5, bias_file=out / "calib" / "bias.fits",
        flat_files={"g": out / "calib" / "flat_g.fits"}, defects_file=out / "calib" / "d.ecsv",
        crosstalk_file=out / "calib" / "x.yaml", gaia_file=out / "refcat" / "gaia.csv",
        ps1_file=out / "refcat" / "ps1.csv", truth_dir=out / "truth", template_visits=(1, 2),
        science_visits=(3, 4, 5), ccdnums=(35, 36), filters=("g",), seed=0, elapsed_s=12.0)
    lines = simulation_report(s)
    text = "\n".join(lines)
    assert 3 <= len(lines) <= 8 and "SimulationSummary(" not in text
    assert "simulated 5 DECam visits x 2 CCD(s)" in lines[0]
    assert f"apfast ingest REPO {out / 'raw'}" in text
    assert f"apfast ingest-calibs REPO/calibs {out / 'calib'}" in text


def test_demo_refuses_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "precious.txt").write_text("not the demo's")
    assert main(["demo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds repo, which apfast demo did not write" in err and "new folder" in err
    assert (tmp_path / "repo" / "precious.txt").exists()


@pytest.mark.slow
def test_demo_runs_again_in_the_same_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "demo", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["-q", "demo", str(tmp_path)]) == 0  # was: "build_templates got no calexps"
    out = capsys.readouterr().out
    assert "reusing the complete simulation" in out and "already processed by an earlier demo run" in out
