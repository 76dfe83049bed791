"""Bad input, fuzzed: ``--id`` expressions, ``-c``/``-C`` config, FITS headers and raw pixels.

Every bad input must give a clear one-line error (exit status 2 for user errors through
the CLI) or a flagged result: never a traceback, a hang or a changed registry. Random
inputs come from hypothesis; the named cases are the ones the issue lists.
"""

from __future__ import annotations

import math
import os
import sqlite3
import tomllib
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apfast.camera import get_camera
from apfast.ccd.isr import amp_params_from_header, run_isr
from apfast.errors import ConfigError, DataIdError, InputError
from apfast.masks import bitmask
from apfast.repo.dataid import parse_ids
from apfast.repo.ingest import ingest_raws
from apfast.repo.registry import Registry
from apfast.run.cli import main
from apfast.run.config import config_fields, config_to_toml, load_config
from apfast.sim.testing import write_decam_raw

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one raw (visit 100, CCDs 35 and 36) ingested."""
    d = tmp_path_factory.mktemp("fuzz")
    raw = write_decam_raw(d / "in", visit=100, ccdnums=(35, 36))
    ingest_raws(d / "repo", [raw])
    return d / "repo"


def _registry_rows(repo: Path) -> list[tuple]:
    with sqlite3.connect(repo / "registry.sqlite3") as conn:
        return conn.execute("SELECT visit, ccdnum, filter, file FROM raw ORDER BY visit, ccdnum").fetchall()


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["-q", *args])
    err = capsys.readouterr().err
    return rc, err


def _assert_clean_error(err: str, *needles: str) -> None:
    """One ``apfast CMD: error: ...`` line naming the bad value, never a traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert ": error: " in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------------------------------- dataId
@pytest.mark.parametrize(
    ("words", "needle"),
    [
        (["visit=1..99999999999"], "more than the limit"),
        (["visit=99999999999999999999"], "64-bit"),
        (["visit=-99999999999999999999..1"], "64-bit"),
        (["visit=1..9:0"], "stride"),
        (["visit=1..9:-2"], "stride"),
        (["visit=9..1"], "ends before it starts"),
        (["visit="], "empty value"),
        (["visit=1^^2"], "empty value"),
        (["visit=1", "visit=2"], "given twice"),
        (["visit=1;DROP TABLE raw"], "'1;DROP TABLE raw' is not an integer"),
        (["visit=1e3"], "not an integer"),
        (["visit=١٠٠"], "not an integer"),  # Arabic-Indic digits are not dataId integers
        (["expTime=nan"], "not a finite number"),
        (["expTime=1e400"], "not a finite number"),
        (["visitt=1"], "did you mean 'visit'"),
        (["../../etc/passwd"], "no KEY= part"),
        (["=1"], "no KEY= part"),
        (["filter=' OR 1=1 --"], "matches no raw data"),
        (["filter=g; DROP TABLE raw"], "matches no raw data"),
        (["object=../../etc"], "matches no raw data"),
    ],
)
def test_bad_id_is_a_one_line_usage_error(repo: Path, capsys: pytest.CaptureFixture[str], words: list[str],
                                           needle: str) -> None:
    before = _registry_rows(repo)
    rc, err = _cli(["process-ccd", str(repo), "--show", "data", "--id", *words], capsys)
    assert rc == 2
    _assert_clean_error(err, needle)
    assert _registry_rows(repo) == before


def test_huge_but_legal_ranges_select_by_between(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 10^6 ccdnums and 2*10^5 scattered visits: more values than SQLite allows as parameters
    rc = main(["-q", "process-ccd", str(repo), "--show", "data", "--id", "ccdnum=1..1000000"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 dataId(s)" in out
    visits = "^".join(["100", *(str(i) for i in range(200, 200_000, 2))])
    rc, err = _cli(["process-ccd", str(repo), "--show", "data", "--id", f"visit={visits}"], capsys)
    assert rc == 2
    _assert_clean_error(err, "SQL parameters")


_ID_ALPHABET = st.sampled_from(list("visitccdnumfilterexpTime=^..:0123456789-+ ;'\"/\\\x00é٣*%_gr\t"))


@FUZZ
@given(st.lists(st.text(_ID_ALPHABET, max_size=30), min_size=1, max_size=3))
def test_random_id_words_never_crash(words: list[str]) -> None:
    try:
        exprs = parse_ids([words])
    except DataIdError as exc:
        assert "\n" not in str(exc).replace("\\n", "")
        return
    assert all(isinstance(v, tuple) and v for e in exprs for v in e.values())


@FUZZ
@given(st.text(min_size=1, max_size=40))
def test_random_unicode_filter_selects_nothing_and_damages_nothing(repo: Path, value: str) -> None:
    before = _registry_rows(repo)
    with Registry(repo) as reg:
        rows = reg.find({"filter": value})
    assert all(r["filter"] == value for r in rows)
    assert _registry_rows(repo) == before


# ---------------------------------------------------------------------------------------- config
def _leaf_types() -> dict[str, typing.Any]:
    return {k: f.type for k, f in config_fields().items()}


def _is_number(tp: typing.Any, kind: type) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else (tp,)
    return kind in args


@pytest.mark.parametrize("value", ["nan", "+nan", "-nan"])
def test_nan_is_rejected_for_every_float_key(value: str) -> None:
    keys = [k for k, tp in _leaf_types().items() if _is_number(tp, float)]
    assert len(keys) > 20
    for key in keys:
        with pytest.raises(ConfigError, match=rf"'{key}'.*NaN"):
            load_config(overrides=[f"{key}={value}"])


def test_ints_beyond_64_bits_are_rejected_for_every_int_key() -> None:
    keys = [k for k, tp in _leaf_types().items() if _is_number(tp, int) and not _is_number(tp, float)]
    assert len(keys) > 10
    for key in keys:
        with pytest.raises(ConfigError, match=rf"'{key}'.*(64-bit|invalid)"):
            load_config(overrides=[f"{key}={2**70}"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("apdb.db_ur=x", "did you mean 'apdb.db_url'"),
        ("nosuch.key=1", "unknown config key"),
        ("apdb=1", "is a section"),
        ("apdb.db_url.x=1", "unknown config key"),
        ("a..b=1", "malformed"),
        ("=1", "malformed"),
        ("no_equals_sign", "malformed"),
        ("isr.do_flat=1", "expected true or false"),
        ('isr.do_flat="true"', "expected true or false"),
        ("process.n_threads=1.5", "expected an integer"),
        ("process.n_threads=[1]", "expected an integer"),
        ("process.n_threads={a=1}", "not a table"),
        ("process.n_threads=-1", "n_threads"),
        ("apdb.connection_timeout=inf", "connection_timeout"),
        ("apdb.connection_timeout=abc", "connection_timeout"),
        ("ünï.cøde=1", "unknown config key"),
        ("apdb.db_url=", "SQLAlchemy URL"),
        ("apdb.db_url=ünï://x", "SQLAlchemy URL"),
        ("apdb.db_url=/etc/passwd", "SQLAlchemy URL"),
        ("apdb.isolation_level=READ_COMMITTED; DROP TABLE x", "not allowed"),
    ],
)
def test_bad_override_is_a_one_line_config_error(capsys: pytest.CaptureFixture[str], override: str,
                                                 needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(overrides=[override])
    rc, err = _cli(["config", "show", "-c", override], capsys)
    assert rc == 2
    _assert_clean_error(err, needle)


_KEYS = st.sampled_from(sorted(config_fields()))
_VALUES = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "nan", "inf", "[1, 2]", "{a = 1}", '"x"', "none", "1e999", "0x10"]),
)


@FUZZ
@given(_KEYS, _VALUES)
def test_random_overrides_give_config_error_or_a_config_that_round_trips(key: str, value: str) -> None:
    try:
        cfg = load_config(overrides=[f"{key}={value}"])
    except ConfigError as exc:
        # shared sections (detection) name their key without the parent section; cross-field rules
        # name the other key too
        assert key.split(".")[-1] in str(exc) or "malformed" in str(exc)
        return
    text = config_to_toml(cfg)
    tomllib.loads(text)  # the stored config is valid TOML whatever was typed
    flat = {}
    for k in config_fields():
        obj = cfg
        for part in k.split("."):
            obj = getattr(obj, part)
        flat[k] = obj
    v = flat[key]
    for x in v if isinstance(v, tuple) else (v,):
        assert not (isinstance(x, float) and math.isnan(x))


@pytest.mark.parametrize("url", ["sqlite:///a\n[apdb]\ndb_url='postgresql://evil/db'", "sqlite:///a\x00b",
                                 "postgresql://h/db\rx", 'x"\n[foo]'])
def test_db_url_with_control_characters_is_a_one_line_config_error(capsys: pytest.CaptureFixture[str],
                                                                    url: str) -> None:
    rc, err = _cli(["config", "show", "-c", f"apdb.db_url={url}"], capsys)
    assert rc == 2
    _assert_clean_error(err, "db_url")
    with pytest.raises(ConfigError, match="db_url"):
        load_config(overrides=[f"apdb.db_url={url}"])


def test_toml_injection_in_a_string_value_stays_one_value(tmp_path: Path) -> None:
    # a quote and brackets (no newline) are legal in a string: they must round-trip as one value
    cfg = load_config(overrides=['calibrate.astrometry_refcat=x" [foo] = 1'])
    text = config_to_toml(cfg)
    path = tmp_path / "c.toml"
    path.write_text(text)
    again = load_config([path])
    assert again.calibrate.astrometry_refcat == 'x" [foo] = 1'
    assert "foo" not in tomllib.loads(text)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("this is not toml [[[", "c.toml"),
        ("[isr]\ndo_flat = 'yes'\n", "isr.do_flat"),
        ("[process]\nn_threads = 1.5\n", "process.n_threads"),
        ("[nosuch]\nx = 1\n", "nosuch"),
        ("isr = 3\n", "isr"),
        ("[apdb]\nconnection_timeout = nan\n", "NaN"),
        (b"\xff\xfe\x00garbage", "c.toml"),
    ],
)
def test_bad_config_file_is_a_one_line_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    content: str | bytes, needle: str) -> None:
    path = tmp_path / "c.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    rc, err = _cli(["config", "show", "-C", str(path)], capsys)
    assert rc == 2
    _assert_clean_error(err, needle)


def test_missing_config_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(["config", "show", "-C", str(tmp_path / "nope.toml")], capsys)
    assert rc == 2
    _assert_clean_error(err, "nope.toml")


# ---------------------------------------------------------------------------------------- FITS headers
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"primary_overrides": {"EXPTIME": "abc"}}, "EXPTIME"),
        ({"primary_overrides": {"EXPTIME": -5.0}}, "EXPTIME"),
        ({"primary_overrides": {"MJD-OBS": None}}, "MJD-OBS"),
        ({"primary_overrides": {"MJD-OBS": "abc"}}, "MJD-OBS"),
        ({"primary_overrides": {"EXPNUM": "abc"}}, "EXPNUM"),
        ({"primary_overrides": {"EXPNUM": -1}}, "EXPNUM"),
        ({"primary_overrides": {"EXPNUM": 2**70}}, "EXPNUM"),
        ({"primary_overrides": {"DATE-OBS": "yesterday"}}, "DATE-OBS"),
        ({"primary_overrides": {"DATE-OBS": "../../x"}}, "DATE-OBS"),
        ({"primary_overrides": {"FILTER": None}}, "FILTER"),
        ({"primary_overrides": {"FILTER": ""}}, "FILTER"),
        ({"primary_overrides": {"TELRA": "garbage"}}, "TELRA"),
        ({"primary_overrides": {"AIRMASS": "abc"}}, "AIRMASS"),
        ({"extension_overrides": {"CCDNUM": 3.7}}, "CCDNUM"),
        ({"extension_overrides": {"CCDNUM": "x"}}, "CCDNUM"),
        ({"extension_overrides": {"CCDNUM": 999}}, "CCDNUM"),
        ({"extension_overrides": {"DATASECA": "garbage"}}, "DATASECA"),
        ({"extension_overrides": {"DATASECA": "[1:99999,1:5]"}}, "outside the image"),
    ],
)
def test_bad_header_fails_ingest_naming_file_and_keyword(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         overrides: dict, needle: str) -> None:
    raw = write_decam_raw(tmp_path / "in", visit=7, name="bad.fits", **overrides)
    good = write_decam_raw(tmp_path / "in", visit=8, name="good.fits")
    rc, err = _cli(["ingest", str(tmp_path / "repo"), str(good), str(raw)], capsys)
    assert rc == 1
    _assert_clean_error(err, "bad.fits", needle)
    # one transaction per call: nothing registered, nothing linked
    assert not (tmp_path / "repo" / "registry.sqlite3").exists() or _registry_rows(tmp_path / "repo") == []
    assert not list((tmp_path / "repo").rglob("*.fits"))


def test_hostile_header_strings_are_stored_verbatim_not_as_sql_or_paths(tmp_path: Path) -> None:
    raw = write_decam_raw(tmp_path / "in", visit=9, primary_overrides={
        "OBJECT": "'; DROP TABLE raw; --", "FILTER": "../../etc"})
    ingest_raws(tmp_path / "repo", [raw])
    rows = Registry(tmp_path / "repo").find({})
    assert [r["object"] for r in rows] == ["'; DROP TABLE raw; --"]
    assert rows[0]["filter"] == "../../etc"
    placed = Path(os.path.normpath(tmp_path / "repo" / rows[0]["file"]))
    assert placed.is_symlink()
    assert tmp_path / "repo" / "raw" in placed.parents


@pytest.mark.parametrize(("key", "value"), [("GAINA", "abc"), ("GAINB", -4.0), ("RDNOISEA", "x"),
                                            ("BIASSECA", "[1:2")])
def test_bad_amp_keyword_is_an_input_error_at_isr(key: str, value: object) -> None:
    cam = get_camera("DECam")
    hdr = {f"GAIN{a.name}": 4.0 for a in cam.amplifiers} | {key: value}
    with pytest.raises(InputError, match=key):
        amp_params_from_header(cam, hdr)


# ---------------------------------------------------------------------------------------- pixels
def test_nan_and_inf_pixels_are_flagged_by_isr(rng: np.random.Generator) -> None:
    cam = get_camera("DECam")
    amps = amp_params_from_header(cam, {})
    raw = rng.normal(2000.0, 5.0, size=(4146, 2160)).astype(np.float32)
    bad = [(100, 200), (3000, 1500), (2000, 60)]  # data pixels of amp B, amp A, and amp B's first column
    raw[bad[0]] = np.nan
    raw[bad[1]] = np.inf
    raw[bad[2]] = -np.inf
    raw[500, 10] = np.nan  # in the serial overscan: must not poison the amp's bias level
    res = run_isr(raw, amps, config=load_config(overrides=["isr.do_bias=false", "isr.do_flat=false",
                                                           "isr.do_defects=false", "isr.do_crosstalk=false",
                                                           "isr.do_linearize=false"]).isr)
    bad_bit = bitmask(["BAD"]) | bitmask(["SAT"]) | bitmask(["NO_DATA"])
    for y, x in bad:
        ty, tx = y - 50, x - 56  # the trimmed image starts at raw (51, 57), 1-based
        assert res.mask[ty, tx] & bad_bit, (y, x, res.mask[ty, tx])
    good = (res.mask & bad_bit) == 0
    assert np.isfinite(res.image[good]).all() and np.isfinite(res.variance[good]).all()
    assert good.mean() > 0.99


@pytest.mark.parametrize("fill", [60000.0, np.nan])
def test_all_masked_ccd_fails_isr_quickly_with_a_clear_message(fill: float) -> None:
    """All pixels saturated (or non-finite): an AlgorithmError, not minutes of gap searches."""
    import time

    from apfast.errors import AlgorithmError

    cam = get_camera("DECam")
    amps = amp_params_from_header(cam, {})
    raw = np.full((4146, 2160), 2000.0, dtype=np.float32)
    raw[50:, 56:2104] = fill  # every data pixel; the overscans stay sane
    cfg = load_config(overrides=["isr.do_bias=false", "isr.do_flat=false", "isr.do_defects=false",
                                 "isr.do_crosstalk=false", "isr.do_linearize=false"]).isr
    t0 = time.perf_counter()
    with pytest.raises(AlgorithmError, match=r"only \d+ of 8388608 pixels") as info:
        run_isr(raw, amps, config=cfg)
    assert time.perf_counter() - t0 < 20.0
    assert info.value.metadata["n_good"] < 0.01 * 8388608
