"""Safety: dataset names and dataId values never reach a path outside the repository or SQL text.

Butler paths are checked with hostile and random values (hypothesis); the registry is
queried with SQL metacharacters through ``--id``, ``Registry`` and ``Butler`` and must
select nothing and change nothing; the SQL-building code of the registry, calib registry
and refcat modules is scanned so that only fixed identifiers are ever formatted into SQL.
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apfast.errors import ApfastError, ConfigError, DataIdError, InputError
from apfast.exposure import Exposure
from apfast.repo.butler import Butler
from apfast.repo.ingest import ingest_raws
from apfast.repo.registry import SELECTABLE_KEYS, Registry
from apfast.repo.repository import create_output_repo
from apfast.run.cli import main
from apfast.sim.testing import write_decam_raw

SRC = Path(__file__).resolve().parents[2] / "src" / "apfast"
FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

HOSTILE = [
    "../../etc",
    "..",
    "/etc/passwd",
    "g/../../x",
    "g\\..\\x",
    "g\x00",
    ".hidden",
    "~root",
    "a" * 300,
    "é" * 200,  # 400 bytes in UTF-8
    "' OR 1=1 --",
    '"; DROP TABLE raw; --',
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("safety")
    raw = write_decam_raw(d / "in", visit=100, ccdnums=(35, 36))
    ingest_raws(d / "repo", [raw])
    return d / "repo"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _inside(path: str | Path, root: Path) -> bool:
    p = Path(os.path.normpath(path))
    return p == root or root in p.parents


# ---------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("key", ["filter", "patch"])
def test_hostile_string_dataid_values_never_leave_the_repository(repo: Path, tmp_path: Path, key: str,
                                                                value: str) -> None:
    out = create_output_repo(repo, output=tmp_path / "out")
    b = Butler(out)
    did = {"filter": "g", "tract": 0, "patch": "1,1", key: value}
    before = _tree(tmp_path)
    try:
        uri = b.getUri("deepCoadd", did)
    except InputError as exc:
        assert key in str(exc)
    else:
        assert _inside(uri, out), uri
    for call in (lambda: b.get("deepCoadd", did), lambda: b.datasetExists("deepCoadd", did),
                 lambda: b.put(Exposure(np.zeros((2, 2), np.float32)), "deepCoadd", did)):
        try:
            call()
        except ApfastError as exc:  # InputError for the value, NoLocationsError for a plain missing file
            assert "\n" not in str(exc)
    added = _tree(tmp_path) - before
    assert all(_inside(tmp_path / a, out) for a in added), added


@pytest.mark.parametrize("value", ["../1", "/etc", "1/..", "1\x00", "1.5", "one", True, None, 1e30])
def test_integer_dataid_keys_reject_non_integers(repo: Path, value: object) -> None:
    b = Butler(repo)
    with pytest.raises(InputError, match="visit"):
        b.getUri("calexp", visit=value, ccdnum=35)


def test_absolute_and_dotted_dataset_names_are_unknown_types(repo: Path) -> None:
    b = Butler(repo)
    for name in ["../calexp", "/etc/passwd", "calexp/../../x", "calexp\x00", "x" * 5000, ""]:
        with pytest.raises(InputError, match="unknown dataset type"):
            b.get(name, visit=100, ccdnum=35)
        with pytest.raises(InputError, match="unknown dataset type"):
            b.put(Table({"a": [1]}), name, visit=100, ccdnum=35)


@FUZZ
@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=20))
def test_random_dataid_text_gives_a_path_inside_the_repository_or_an_input_error(repo: Path, patch: str,
                                                                                 band: str) -> None:
    b = Butler(repo)
    try:
        uri = b.getUri("deepCoadd", filter=band, tract=3, patch=patch)
    except InputError:
        return
    assert _inside(uri, b.repo.path)
    assert "\x00" not in uri


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/abs", "..", ".hidden", "in:../out", "a:b:c", "x\x00"])
def test_rerun_names_cannot_escape_the_repository(repo: Path, capsys: pytest.CaptureFixture[str],
                                                  name: str) -> None:
    before = _tree(repo.parent)
    with pytest.raises((ConfigError, InputError)):
        create_output_repo(repo, rerun=name)
    rc = main(["-q", "process-ccd", str(repo), "--rerun", name, "--id", "visit=100"])
    err = capsys.readouterr().err
    assert rc == 2 or (rc == 1 and "does not exist" in err)
    assert "Traceback" not in err
    assert _tree(repo.parent) == before


# ---------------------------------------------------------------------------------------- SQL
INJECTIONS = ["' OR 1=1 --", "1 OR 1=1", "100; DROP TABLE raw", '" OR ""="', "%", "_", "*", "100) OR (1=1"]


def test_sql_metacharacters_select_nothing_through_every_key(repo: Path) -> None:
    reg_file = repo / "registry.sqlite3"
    before = _digest(reg_file)
    with Registry(repo) as reg:
        n = reg.count()
        for key in SELECTABLE_KEYS:
            for bad in INJECTIONS:
                assert reg.find({key: bad}) == [], (key, bad)
                assert reg.find({key: [bad, bad + "x"]}) == []
        assert reg.count() == n == 2
    assert _digest(reg_file) == before


def test_sql_metacharacters_in_column_names_are_rejected(repo: Path) -> None:
    with Registry(repo) as reg:
        for bad in ['visit" OR 1=1 --', "visit; DROP TABLE raw", "1=1 OR visit"]:
            with pytest.raises(DataIdError, match="not a registry column"):
                reg.find({bad: 1})
            with pytest.raises(DataIdError):
                reg.distinct(bad)
        assert reg.count() == 2


def test_injection_through_butler_dataids_finds_nothing(repo: Path) -> None:
    b = Butler(repo)
    before = _digest(repo / "registry.sqlite3")
    for bad in INJECTIONS:
        assert not b.datasetExists("raw", visit=bad, ccdnum=35)
        assert b.queryMetadata("raw", "visit", filter=bad) == []
    with pytest.raises(DataIdError):
        b.queryMetadata("raw", ["visit", "ccdnum FROM raw; --"], visit=100)
    assert _digest(repo / "registry.sqlite3") == before
    assert b.queryMetadata("raw", "ccdnum", visit=100) == [35, 36]


@pytest.mark.parametrize("words", [["filter=' OR 1=1 --"], ['object=" OR ""="'], ["filter=g'; DROP TABLE raw; --"],
                                   ["detector=S1' OR '1'='1"]])
def test_injection_through_cli_id_selects_nothing(repo: Path, capsys: pytest.CaptureFixture[str],
                                                  words: list[str]) -> None:
    before = _digest(repo / "registry.sqlite3")
    rc = main(["-q", "process-ccd", str(repo), "--show", "data", "--id", *words])
    err = capsys.readouterr().err
    if rc == 2:
        assert "matches no raw data" in err or "unknown dataId key" in err
    else:  # a key --id does not know: still no traceback
        raise AssertionError(err)
    assert "Traceback" not in err
    assert _digest(repo / "registry.sqlite3") == before


# Names that may be formatted into SQL text: fixed column lists, placeholders and WHERE
# fragments built by the same modules from validated identifiers.
_SAFE_SQL_NAMES = {
    "repo/registry.py": {"where", "key", "cols", "marks", "cal_names", "cal_marks"},
    "repo/calibs.py": set(),
    "repo/refcat.py": set(),
    "repo/refcat_io.py": set(),
    "repo/dataid.py": set(),
}


@pytest.mark.parametrize("module", sorted(_SAFE_SQL_NAMES))
def test_sql_text_only_formats_fixed_identifiers(module: str) -> None:
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    formatted: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"execute", "executemany", "executescript", "_query"} and node.args):
            continue
        sql = node.args[0]
        if isinstance(sql, ast.JoinedStr):
            for part in sql.values:
                if isinstance(part, ast.FormattedValue):
                    formatted.add(ast.unparse(part.value))
        elif not isinstance(sql, (ast.Constant, ast.Name)):
            formatted.add(ast.unparse(sql))  # concatenation or .format(): must be reviewed
    assert formatted <= _SAFE_SQL_NAMES[module], formatted - _SAFE_SQL_NAMES[module]


def test_registry_distinct_key_is_validated_before_formatting(repo: Path) -> None:
    # `key` is formatted into SELECT DISTINCT "{key}": it must be a known column first
    with Registry(repo) as reg:
        assert reg.distinct("ccdnum") == [35, 36]
        with pytest.raises(DataIdError):
            reg.distinct('ccdnum" FROM raw; DROP TABLE raw; --')
        assert reg.count() == 2
