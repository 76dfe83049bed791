"""Tests of apfast.repo.dataid: Gen 2 --id parsing, expansion, tables and SQL."""

from __future__ import annotations

import pickle
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apfast.errors import DataIdError, InputError
from apfast.repo.dataid import (
    DEFAULT_KEY_TYPES,
    MAX_VALUES,
    DataIdExpr,
    expand,
    format_int_values,
    format_table,
    parse_id,
    parse_ids,
    to_sql_where,
)

SYNTAX = "expected KEY=V1^V2^... with integer ranges a..b and strides a..b:s"


# ------------------------------------------------------------------ parsing


def test_brief_examples() -> None:
    e = parse_id(["visit=123456^123457", "ccdnum=3^6..12", "filter=g"])
    assert dict(e) == {"visit": (123456, 123457), "ccdnum": (3, 6, 7, 8, 9, 10, 11, 12), "filter": ("g",)}
    assert list(e) == ["visit", "ccdnum", "filter"]
    assert parse_id(["ccdnum=1..9:3"])["ccdnum"] == (1, 4, 7)
    assert parse_id(["ccdnum=1..10:3"])["ccdnum"] == (1, 4, 7, 10)  # inclusive end when on the stride
    assert parse_id(["ccdnum=5..5"])["ccdnum"] == (5,)


def test_ints_sorted_unique_strings_ordered_unique() -> None:
    e = parse_id(["visit=9^3^5..7^6", "filter=r^g^r", "object=Blind15A_40", "date=2015-02-17"])
    assert e["visit"] == (3, 5, 6, 7, 9)
    assert e["filter"] == ("r", "g")
    assert e["object"] == ("Blind15A_40",) and e["date"] == ("2015-02-17",)
    assert all(type(v) is int for v in e["visit"])
    # a string key keeps "..": ranges are for integer keys only
    assert parse_id(["patch=1..3"])["patch"] == ("1..3",)
    assert parse_id(["patch=1,2"])["patch"] == ("1,2",)  # '=' split at the first only
    assert parse_id(["object=a=b"])["object"] == ("a=b",)


def test_float_key_and_quoted_whitespace_forms() -> None:
    assert parse_id(["expTime=30^60.5^30"])["expTime"] == (30.0, 60.5)
    # ap_verify style: one quoted word holding several terms
    assert parse_id(["visit=412518^412568 filter=g"]) == parse_id(["visit=412518^412568", "filter=g"])
    assert parse_id("visit=1  ccdnum=2") == DataIdExpr({"visit": (1,), "ccdnum": (2,)})
    assert parse_id([]) == DataIdExpr({}) and len(parse_id([])) == 0
    # spaces inside a value stay when not every piece is a KEY= term
    assert parse_id(["filter=VR DECam c0007 6300.0 2600.0"])["filter"] == ("VR DECam c0007 6300.0 2600.0",)


def test_custom_key_types() -> None:
    e = parse_id(["exposure=1..3", "band=g"], key_types={"exposure": int, "band": str})
    assert dict(e) == {"exposure": (1, 2, 3), "band": ("g",)}
    with pytest.raises(
        InputError, match=r"key_types\['x'\] is <class 'bool'>; dataId keys must be int, float or str"
    ):
        parse_id(["x=1"], key_types={"x": bool})


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["visit"], "bad dataId term 'visit': it has no KEY= part; " + SYNTAX),
        (["=3"], "bad dataId term '=3': it has no KEY= part"),
        (["visit="], "bad dataId term 'visit=': empty value for 'visit'"),
        (["visit=1^^2"], "bad dataId term 'visit=1^^2': empty value for 'visit'"),
        (["filter=g^"], "empty value for 'filter'"),
        (
            ["visit=1", "visit=2"],
            "bad dataId term 'visit=2': key 'visit' is given twice in one --id; join the values with ^",
        ),
        (
            ["visit=abc"],
            "bad dataId term 'visit=abc': 'abc' is not an integer, a range a..b or a stride a..b:s",
        ),
        (["visit=1.5"], "'1.5' is not an integer"),
        (["ccdnum=1..x"], "'1..x' is not an integer"),
        (["ccdnum=1...3"], "'1...3' is not an integer"),
        (
            ["ccdnum=12..6"],
            "bad dataId term 'ccdnum=12..6': range '12..6' ends before it starts; write it as 6..12",
        ),
        (["ccdnum=1..9:0"], "bad dataId term 'ccdnum=1..9:0': stride in '1..9:0' must be a positive integer"),
        (["ccdnum=1..9:-2"], "stride in '1..9:-2' must be a positive integer"),
        (["expTime=fast"], "bad dataId term 'expTime=fast': 'fast' is not a number"),
        (["expTime=nan"], "'nan' is not a finite number"),
        (
            ["visit=0..1000000"],
            "'0..1000000' selects 1000001 values, more than the limit of 1000000; narrow the range",
        ),
        (["visit=0..600000^1000000..1500000"], "more than the limit of 1000000"),
    ],
)
def test_syntax_errors_name_token_and_syntax(tokens: list[str], expected: str) -> None:
    with pytest.raises(DataIdError, match=re.escape(expected)) as info:
        parse_id(tokens)
    assert SYNTAX in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(DataIdError) as info:
        parse_id(["vist=1"])
    msg = str(info.value)
    assert msg.startswith("unknown dataId key 'vist' in 'vist=1'; did you mean 'visit'? known keys are ")
    assert msg.endswith(", ".join(DEFAULT_KEY_TYPES))
    with pytest.raises(
        DataIdError, match=r"unknown dataId key 'zzz' in 'zzz=1'; known keys are visit, ccdnum"
    ):
        parse_id(["zzz=1"])


def test_huge_stride_within_limit_is_fine() -> None:
    e = parse_id(["visit=0..9999999:10"])  # exactly 1e6 values
    assert len(e["visit"]) == MAX_VALUES and e["visit"][-1] == 9999990


def test_parse_ids_union_dedup_and_error_position() -> None:
    exprs = parse_ids([["visit=1"], "visit=2 ccdnum=3", ["visit=1"]])
    assert exprs == [DataIdExpr({"visit": (1,)}), DataIdExpr({"visit": (2,), "ccdnum": (3,)})]
    assert parse_ids([]) == []
    with pytest.raises(DataIdError, match=r"^--id number 2: bad dataId term 'ccdnum=9\.\.1'"):
        parse_ids([["visit=1"], ["ccdnum=9..1"]])


# ------------------------------------------------------------------ DataIdExpr


def test_expr_is_a_frozen_hashable_mapping() -> None:
    e = parse_id(["visit=1^2", "filter=g"])
    with pytest.raises(AttributeError, match="immutable"):
        e.x = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        e["visit"] = (3,)  # type: ignore[index]
    assert (
        hash(e) == hash(parse_id(["visit=2^1", "filter=g"]))
        and len({e, parse_id(["visit=1^2 filter=g"])}) == 1
    )
    assert e == {"visit": (1, 2), "filter": ("g",)}
    assert pickle.loads(pickle.dumps(e)) == e
    assert repr(e) == "DataIdExpr(visit=(1, 2), filter=('g',))"
    assert e.n_combinations() == 2
    assert e.matches({"visit": 2, "filter": "g", "ccdnum": 1})
    assert not e.matches({"visit": 3, "filter": "g"})
    assert not e.matches({"visit": 1})  # missing key
    with pytest.raises(DataIdError, match="dataId key 'visit' has no values; give at least one"):
        DataIdExpr({"visit": ()})
    assert DataIdExpr({"visit": 5})["visit"] == (5,) and DataIdExpr({"f": "gr"})["f"] == ("gr",)


# ------------------------------------------------------------------ round trips (property based)


def _random_int_spec(draw: st.DrawFn) -> tuple[str, set[int]]:
    """Draw a ^-joined mix of singles, ranges and strides, and the set it means (independent of the code)."""
    terms: list[str] = []
    truth: set[int] = set()
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["single", "range", "stride"]))
        a = draw(st.integers(0, 10**7))
        if kind == "single":
            terms.append(str(a))
            truth.add(a)
            continue
        n = draw(st.integers(0, 50))
        s = 1 if kind == "range" else draw(st.integers(1, 1000))
        b = a + n * s + (draw(st.integers(0, s - 1)) if s > 1 else 0)  # end need not be on the stride
        terms.append(f"{a}..{b}" if kind == "range" else f"{a}..{b}:{s}")
        truth.update(range(a, b + 1, s))
    return "^".join(terms), truth


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_int_specs_parse_to_their_set(data: st.DataObject) -> None:
    spec, truth = data.draw(st.composite(lambda draw: _random_int_spec(draw))())
    e = parse_id([f"visit={spec}"])
    assert e["visit"] == tuple(sorted(truth))
    # and the canonical formatter round-trips the same set
    assert parse_id([f"visit={format_int_values(truth)}"])["visit"] == tuple(sorted(truth))
    assert parse_id(e.to_string()) == e


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(-(10**6), 10**9), min_size=1, max_size=60))
def test_property_format_int_values_round_trip_and_is_compact(values: set[int]) -> None:
    text = format_int_values(values)
    assert parse_id([f"ccd={text}"])["ccd"] == tuple(sorted(values))
    assert len(text.split("^")) <= len(values)


_word = st.text(
    st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters="^"),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_word, min_size=1, max_size=8))
def test_property_string_values_round_trip(words: list[str]) -> None:
    words = [w for w in words if not any(c.isspace() for c in w)] or ["g"]
    e = parse_id(["object=" + "^".join(words)])
    assert e["object"] == tuple(dict.fromkeys(words))
    assert parse_id(e.to_string()) == e


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=5))
def test_property_float_values_round_trip(values: list[float]) -> None:
    e = parse_id(["expTime=" + "^".join(repr(v) for v in values)])
    assert e["expTime"] == tuple(dict.fromkeys(values))
    assert parse_id(e.to_string()) == e


# ------------------------------------------------------------------ expand and table


def test_expand_is_the_cartesian_product() -> None:
    rows = expand(parse_id(["visit=1^2", "ccdnum=5^7", "filter=g"]))
    assert rows == [
        {"visit": 1, "ccdnum": 5, "filter": "g"},
        {"visit": 1, "ccdnum": 7, "filter": "g"},
        {"visit": 2, "ccdnum": 5, "filter": "g"},
        {"visit": 2, "ccdnum": 7, "filter": "g"},
    ]
    assert expand(parse_id([])) == [{}]
    assert len(expand(parse_id(["visit=1..1000", "ccdnum=1..62"]))) == 62000
    with pytest.raises(
        DataIdError, match=r"selects 62000000 combinations \(visit:1000000 x ccdnum:62\), more than"
    ):
        expand(parse_id(["visit=1..1000000", "ccdnum=1..62"]))


def test_format_table_aligns_and_handles_missing_and_newlines() -> None:
    rows = [
        {"visit": 411420, "ccdnum": 5, "filter": "g", "expTime": 86.0},
        {"visit": 7, "ccdnum": 10, "filter": "VR DECam c0007 6300.0 2600.0"},
        {"visit": 8, "ccdnum": 60, "filter": "bad\nname"},
    ]
    text = format_table(rows, ["visit", "ccdnum", "filter", "expTime"])
    lines = text.split("\n")
    assert len(lines) == 5 and not text.endswith("\n")
    assert lines[0] == " visit  ccdnum  filter                        expTime"
    assert lines[1] == "------  ------  ----------------------------  -------"
    assert lines[2] == "411420       5  g                                86.0"
    assert lines[3] == "     7      10  VR DECam c0007 6300.0 2600.0        -"
    assert lines[4] == "     8      60  bad\\nname                           -"
    assert len({len(line) for line in lines[:3]}) == 1
    assert format_table([], ["visit"]) == "visit\n-----"
    with pytest.raises(InputError, match="at least one column key"):
        format_table(rows, [])


# ------------------------------------------------------------------ SQL


def test_sql_where_forms() -> None:
    assert to_sql_where(parse_id(["visit=123456^123457", "filter=g"]), ["visit", "filter"]) == (
        "visit IN (?, ?) AND filter IN (?)",
        [123456, 123457, "g"],
    )
    assert to_sql_where(parse_id([]), ["visit"]) == ("1 = 1", [])
    sql, params = to_sql_where(parse_id(["ccdnum=1..62"]), {"ccdnum": "ccdnum"})
    assert (sql, params) == ("ccdnum BETWEEN ? AND ?", [1, 62])
    sql, params = to_sql_where(parse_id(["visit=1..2500:2"]), ["visit"])
    assert sql.count("IN (") == 2 and len(params) == 1250  # IN lists chunked at 1000
    # numpy scalars are bound as Python scalars
    _, params = to_sql_where(DataIdExpr({"visit": (np.int64(3), np.int64(9))}), ["visit"])
    assert params == [3, 9] and all(type(p) is int for p in params)


def test_sql_where_rejects_unknown_keys_bad_columns_and_too_many_params() -> None:
    with pytest.raises(
        DataIdError, match=r"dataId key 'tract' cannot select this dataset; use only the keys visit, filter"
    ):
        to_sql_where(parse_id(["tract=1"]), ["visit", "filter"])
    with pytest.raises(
        InputError, match=r"column name 'visit; DROP TABLE raw' .* not a plain SQL identifier"
    ):
        to_sql_where(parse_id(["visit=1"]), {"visit": "visit; DROP TABLE raw"})
    with pytest.raises(DataIdError, match=r"more than 30000 SQL parameters \(key 'visit'\)"):
        to_sql_where(parse_id(["visit=0..200000:2"]), ["visit"])


def _make_registry(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE raw (visit INTEGER, ccdnum INTEGER, filter TEXT, expTime REAL)")
    rows = [(v, c, f, 30.0 + v % 2) for v in range(100, 130) for c in range(1, 63) for f in ("g",) if c % 7]
    rows += [(200, 1, "g'; DROP TABLE raw;--", 30.0)]
    con.executemany("INSERT INTO raw VALUES (?, ?, ?, ?)", rows)
    con.commit()
    return con


def _select(con: sqlite3.Connection, expr: DataIdExpr) -> set[tuple[int, int, str]]:
    sql, params = to_sql_where(expr, ["visit", "ccdnum", "filter", "expTime"])
    return set(con.execute(f"SELECT visit, ccdnum, filter FROM raw WHERE {sql}", params).fetchall())


def test_sql_matches_python_filtering_on_real_sqlite(tmp_path: Path) -> None:
    con = _make_registry(tmp_path / "registry.sqlite3")
    all_rows = con.execute("SELECT visit, ccdnum, filter, expTime FROM raw").fetchall()
    for spec in (
        ["visit=100^105..111^120..129:3", "ccdnum=3^6..12^40..62:5", "filter=g"],
        ["visit=101..129:2", "expTime=31.0"],
        ["ccdnum=7^14"],  # excluded ccds: none
        [],
    ):
        expr = parse_id(spec)
        truth = {
            (v, c, f)
            for v, c, f, t in all_rows
            if expr.matches({"visit": v, "ccdnum": c, "filter": f, "expTime": t})
        }
        assert _select(con, expr) == truth
    assert _select(con, parse_id(["ccdnum=7^14"])) == set()
    con.close()


def test_sql_injection_stays_a_bound_parameter(tmp_path: Path) -> None:
    con = _make_registry(tmp_path / "registry.sqlite3")
    evil = "g'; DROP TABLE raw;--"
    expr = parse_id([f"filter={evil}^r"])
    sql, params = to_sql_where(expr, ["filter"])
    assert sql == "filter IN (?, ?)" and params == [evil, "r"]
    assert "DROP" not in sql and "'" not in sql
    n_before = con.execute("SELECT COUNT(*) FROM raw").fetchone()[0]
    # the only row whose filter is literally the evil text is found; nothing else; the table survives
    rows = con.execute(f"SELECT visit FROM raw WHERE {sql}", params).fetchall()
    assert rows == [(200,)]
    sql2, params2 = to_sql_where(parse_id(["filter=x'; DROP TABLE raw;--"]), ["filter"])
    assert params2 == ["x'; DROP TABLE raw;--"]
    assert con.execute(f"SELECT visit FROM raw WHERE {sql2}", params2).fetchall() == []
    assert con.execute("SELECT COUNT(*) FROM raw").fetchone()[0] == n_before
    assert con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall() == [("raw",)]
    con.close()
