"""The APDB on real SQLite files and a real PostgreSQL server: schema, versioning, undo, atomicity, locks.

Every behavioural test runs twice, on SQLite and on PostgreSQL (``postgres``
marker; the server is started by :mod:`pgserver` once per session).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from apfast.dia import apdb as apdb_mod
from apfast.dia.apdb import Apdb, ApdbError, make_apdb
from apfast.dia.apdb_schema import COLUMN_KINDS, make_metadata
from apfast.dia.htm import htm_index, polygon_contains
from apfast.run.config import ApdbConfig
from pgserver import create_database

REFERENCE_SQL = Path(__file__).resolve().parents[1] / "data" / "rubin_apdb_schema_sqlite.sql"

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL where no APDB exists yet: a new SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/apdb/association.db"
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def apdb(db_url: str) -> Apdb:
    cfg = ApdbConfig(db_url=db_url, connection_timeout=5.0)
    make_apdb(cfg)
    a = Apdb(cfg)
    yield a
    a.close()


def _objects(
    rng: np.random.Generator, ids: np.ndarray, ra0: float = 150.0, dec0: float = 2.0, size: float = 0.1
):
    n = ids.size
    return {
        "diaObjectId": ids.astype(np.int64),
        "ra": ra0 + rng.uniform(0, size, n),
        "dec": dec0 + rng.uniform(0, size, n),
        "raErr": rng.uniform(0.01, 0.02, n).astype(np.float32),
        "g_psfFluxMean": np.where(rng.uniform(size=n) < 0.2, np.nan, rng.normal(1000, 100, n)),
        "g_psfFluxNdata": np.ones(n, dtype=np.int64),
        "nDiaSources": np.ones(n, dtype=np.int64),
    }


def _sources(rng: np.random.Generator, objs: dict, first_id: int):
    n = objs["ra"].size
    return {
        "diaSourceId": first_id + np.arange(n, dtype=np.int64),
        "diaObjectId": objs["diaObjectId"],
        "ra": objs["ra"],
        "dec": objs["dec"],
        "x": rng.uniform(0, 2048, n),
        "y": rng.uniform(0, 4096, n),
        "psfFlux": rng.normal(1000, 100, n),
        "psfFluxErr": np.full(n, 10.0),
        "isNegative": rng.uniform(size=n) < 0.5,
        "band": np.array(["g"] * n),
        "psfNdata": np.full(n, 25),
    }


def _forced(rng: np.random.Generator, objs: dict, first_id: int):
    n = objs["ra"].size
    return {
        "diaForcedSourceId": first_id + np.arange(n, dtype=np.int64),
        "diaObjectId": objs["diaObjectId"],
        "ra": objs["ra"],
        "dec": objs["dec"],
        "psfFlux": rng.normal(0, 10, n),
        "band": np.array(["g"] * n),
    }


# ---------------------------------------------------------------- schema and creation
def test_sqlite_schema_equals_rubin_ddl(tmp_path: Path) -> None:
    ref = tmp_path / "ref.db"
    with sqlite3.connect(ref) as c:
        c.executescript(REFERENCE_SQL.read_text())
    make_apdb(ApdbConfig(db_url=f"sqlite:///{tmp_path}/ours.db"))

    def describe(path: Path) -> dict:
        out = {}
        with sqlite3.connect(path) as c:
            for (t,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                out[t] = c.execute(f'PRAGMA table_info("{t}")').fetchall()  # name, type, notnull, default, pk
                out[t + " indexes"] = sorted(
                    (r[1], tuple(x[2] for x in c.execute(f'PRAGMA index_info("{r[1]}")')))
                    for r in c.execute(f'PRAGMA index_list("{t}")')
                    if not r[1].startswith("sqlite_autoindex")
                )
        return out

    ours, theirs = describe(tmp_path / "ours.db"), describe(ref)
    assert set(ours) - set(theirs) == {"apfast_ccd_visit", "apfast_ccd_visit indexes"}
    for key, value in theirs.items():
        assert ours[key] == value, key
    assert len(ours["DiaObject"]) == 84 and len(ours["DiaSource"]) == 104


def test_metadata_rows_and_creation(db_url: str) -> None:
    cfg = ApdbConfig(db_url=db_url)
    shown = make_apdb(cfg)
    assert shown == sa.make_url(db_url).render_as_string(hide_password=True)
    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        rows = dict(c.exec_driver_sql("SELECT name, value FROM metadata").fetchall())
        names = set(sa.inspect(c).get_table_names())
    eng.dispose()
    assert rows["version:schema"] == "10.0.0"
    assert rows["version:ApdbSql"] == "1.2.1"
    assert json.loads(rows["config:apdb-sql.json"]) == {
        "enable_replica": False,
        "dia_object_index": "baseline",
        "htm_level": 20,
        "htm_index_column": "pixelId",
        "ra_dec_columns": ["ra", "dec"],
    }
    assert rows["apfast:version"]
    assert names == set(make_metadata().tables)
    with pytest.raises(ApdbError, match=r"already holds an APDB \(schema 10\.0\.0\).*--drop"):
        make_apdb(cfg)


def test_postgres_column_types_and_nullability(apdb: Apdb) -> None:
    with apdb.engine.connect() as c:
        insp = sa.inspect(c)
        for table in ("DiaObject", "DiaSource", "DiaForcedSource"):
            cols = {col["name"]: col for col in insp.get_columns(table)}
            assert list(cols) == list(COLUMN_KINDS[table])
            for name, (_kind, nullable) in COLUMN_KINDS[table].items():
                assert cols[name]["nullable"] == nullable, (table, name)
                if name in ("ra", "dec", "midpointMjdTai"):
                    assert isinstance(cols[name]["type"], sa.Float)
                    assert getattr(cols[name]["type"], "precision", None) in (None, 53)
        idx = {i["name"] for i in insp.get_indexes("DiaSource")}
        assert {"IDX_DiaSource_visitDetector", "IDX_DiaSource_pixelId", "IDX_DiaSource_diaObjectId"} <= idx


def test_drop_replaces_an_apdb(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(10))
    with apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs)
    assert apdb.count("DiaObject") == 10
    apdb.close()
    make_apdb(apdb.config, drop=True)
    with Apdb(apdb.config) as fresh:
        assert fresh.count("DiaObject") == 0


def test_open_without_apdb_says_make_apdb(tmp_path: Path, db_url: str) -> None:
    missing = tmp_path / "nothing" / "a.db"
    with pytest.raises(ApdbError, match="run `apfast make-apdb -c apdb.db_url=sqlite:///"):
        Apdb(ApdbConfig(db_url=f"sqlite:///{missing}"))
    assert not missing.exists()  # opening must not create an empty file
    if db_url.startswith("sqlite"):
        path = Path(sa.make_url(db_url).database)
        path.parent.mkdir(parents=True)
        sqlite3.connect(path).close()  # an empty database file
    with pytest.raises(ApdbError, match="no metadata table.*apfast make-apdb"):
        Apdb(ApdbConfig(db_url=db_url))


def test_schema_version_mismatch(db_url: str) -> None:
    cfg = ApdbConfig(db_url=db_url)
    make_apdb(cfg)
    eng = sa.create_engine(db_url)
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE metadata SET value = '9.0.0' WHERE name = 'version:schema'")
    eng.dispose()
    with pytest.raises(ApdbError, match="schema version 9.0.0 but apfast writes 10.0.0"):
        Apdb(cfg)


def test_password_hidden_in_messages() -> None:
    cfg = ApdbConfig(db_url="postgresql+psycopg://alice:s3cret@127.0.0.1:1/apdb", connection_timeout=2.0)
    pytest.importorskip("psycopg")
    with pytest.raises(ApdbError) as info:
        Apdb(cfg)
    assert "s3cret" not in str(info.value)
    assert "127.0.0.1:1/apdb" in str(info.value)


# ---------------------------------------------------------------- store / read round trip
def test_store_round_trip(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(1000, 1050))
    srcs = _sources(rng, objs, 5000)
    frc = _forced(rng, objs, 9000)
    with apdb.ccd_visit(289400, 35, 60000.25) as tx:
        assert not tx.exists()
        tx.store(objects=objs, sources=srcs, forced_sources=frc, n_new_objects=50)
        assert tx.exists()
    assert apdb.ccd_visits() == [(289400, 35)]
    got = apdb.dia_objects()
    order = np.argsort(got["diaObjectId"])
    got = {k: v[order] for k, v in got.items()}
    assert np.array_equal(got["diaObjectId"], objs["diaObjectId"])
    assert np.array_equal(got["ra"], objs["ra"])  # DOUBLE: exact
    np.testing.assert_array_equal(got["raErr"].astype(np.float32), objs["raErr"])  # REAL keeps float32
    np.testing.assert_allclose(got["g_psfFluxMean"], objs["g_psfFluxMean"], rtol=1e-7, equal_nan=True)
    assert np.array_equal(np.isnan(got["g_psfFluxMean"]), np.isnan(objs["g_psfFluxMean"]))  # NaN <-> NULL
    assert np.array_equal(got["pixelId"], htm_index(objs["ra"], objs["dec"], 20))
    assert np.all(got["validityStartMjdTai"] == 60000.25) and np.all(np.isnan(got["validityEndMjdTai"]))
    assert np.all(got["r_psfFluxNdata"] == 0)  # NOT NULL column left out -> 0
    s = apdb.dia_sources(visit=289400, detector=35)
    order = np.argsort(s["diaSourceId"])
    s = {k: v[order] for k, v in s.items()}
    assert np.array_equal(s["diaSourceId"], srcs["diaSourceId"])
    assert np.array_equal(s["isNegative"], srcs["isNegative"]) and s["isNegative"].dtype == bool
    assert s["band"].tolist() == ["g"] * 50
    assert (
        np.all(s["visit"] == 289400)
        and np.all(s["detector"] == 35)
        and np.all(s["midpointMjdTai"] == 60000.25)
    )
    assert np.all(s["dipoleNdata"] == 0) and np.all(s["psfNdata"] == 25)
    assert s["ssObjectId"].dtype == object and all(v is None for v in s["ssObjectId"])
    assert np.all(np.abs(s["timeProcessedMjdTai"] - apdb_mod._now_mjd_tai()) < 0.01)
    assert len(apdb.dia_sources(visit=1)["diaSourceId"]) == 0
    assert apdb.count("DiaForcedSource") == 50
    f = apdb.forced_sources_for_objects(objs["diaObjectId"][:7])
    assert sorted(f["diaObjectId"].tolist()) == objs["diaObjectId"][:7].tolist()
    assert len(apdb.dia_sources_for_objects(objs["diaObjectId"][:3])["diaSourceId"]) == 3


def test_store_rejects_bad_rows(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(5))
    with (
        pytest.raises(ApdbError, match=r"unknown DiaObject column\(s\) \['bogus'\]"),
        apdb.ccd_visit(1, 1, 60000.0) as tx,
    ):
        tx.store(objects={**objs, "bogus": np.zeros(5)})
    with (
        pytest.raises(ApdbError, match=r"lack required column\(s\) \['x', 'y'\]"),
        apdb.ccd_visit(1, 1, 60000.0) as tx,
    ):
        tx.store(sources={"diaSourceId": np.arange(5), "ra": objs["ra"], "dec": objs["dec"]})
    with pytest.raises(ApdbError, match="detector values other than"), apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(sources={**_sources(rng, objs, 0), "detector": np.full(5, 2)})
    with pytest.raises(ApdbError, match="different lengths"), apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects={**objs, "raErr": np.zeros(4)})
    with pytest.raises(ApdbError, match="NOT NULL"), apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects={**objs, "ra": np.full(5, np.nan)})
    assert apdb.count("DiaObject") == 0 and apdb.count("DiaSource") == 0 and apdb.ccd_visits() == []
    with apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs)
    with pytest.raises(ApdbError, match="already stored.*undo"), apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs)


def test_exception_in_block_rolls_back(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(20))
    with pytest.raises(ZeroDivisionError), apdb.ccd_visit(7, 3, 60000.0) as tx:
        tx.store(objects=objs, sources=_sources(rng, objs, 0))
        1 / 0  # noqa: B018
    assert apdb.count("DiaObject") == 0 and apdb.count("DiaSource") == 0 and apdb.ccd_visits() == []


# ---------------------------------------------------------------- versioning and undo
def test_object_versioning(apdb: Apdb, rng: np.random.Generator) -> None:
    ids = np.arange(100, 110)
    objs = _objects(rng, ids)
    with apdb.ccd_visit(1, 35, 60000.0) as tx:
        tx.store(objects=objs)
    upd = {**objs, "nDiaSources": np.full(10, 2)}
    with apdb.ccd_visit(2, 35, 60001.0) as tx:
        tx.store(objects={k: v[:6] for k, v in upd.items()})
    allv = apdb.dia_objects(latest=False)
    assert allv["diaObjectId"].size == 16
    old = (allv["validityStartMjdTai"] == 60000.0) & np.isin(allv["diaObjectId"], ids[:6])
    assert np.all(allv["validityEndMjdTai"][old] == 60001.0)
    latest = apdb.dia_objects()
    assert latest["diaObjectId"].size == 10 and np.unique(latest["diaObjectId"]).size == 10
    assert sorted(latest["diaObjectId"][latest["nDiaSources"] == 2].tolist()) == ids[:6].tolist()
    # another CCD of visit 2 stores a version of object 100 at the same time: it replaces, not duplicates
    with apdb.ccd_visit(2, 36, 60001.0) as tx:
        tx.store(objects={k: v[:1] for k, v in {**upd, "nDiaSources": np.full(10, 3)}.items()})
    latest = apdb.dia_objects()
    assert latest["diaObjectId"].size == 10
    assert latest["nDiaSources"][latest["diaObjectId"] == 100].tolist() == [3]
    assert apdb.count("DiaObject") == 16


def _snapshot(apdb: Apdb) -> dict:
    def canon(cs: dict, key: list[str]) -> list:
        cols = [c for c in sorted(cs) if c != "timeProcessedMjdTai"]
        # NaN != NaN: compare NULLs as None
        rows = [
            tuple(None if isinstance(v, float) and np.isnan(v) else v for v in r)
            for r in zip(*(cs[c].tolist() for c in cols), strict=True)
        ]
        return sorted(rows, key=lambda r: tuple(r[cols.index(k)] for k in key))

    return {
        "obj": canon(apdb.dia_objects(latest=False), ["diaObjectId", "validityStartMjdTai"]),
        "src": canon(apdb.dia_sources(), ["diaSourceId"]),
        "frc": canon(apdb.forced_sources_for_objects(np.arange(0, 10**4)), ["diaForcedSourceId"]),
        "ccd": apdb.ccd_visits(),
    }


def test_undo_restores_previous_state(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(100, 120))
    with apdb.ccd_visit(1, 35, 60000.0) as tx:
        tx.store(objects=objs, sources=_sources(rng, objs, 1000), forced_sources=_forced(rng, objs, 1000))
    before = _snapshot(apdb)
    # visit 2: 8 old objects get a new source, 5 new objects appear
    new = _objects(rng, np.arange(2000, 2005))
    upd = {k: np.concatenate([objs[k][:8], new[k]]) for k in objs}
    upd["nDiaSources"] = np.concatenate([np.full(8, 2), np.ones(5, np.int64)])
    with apdb.ccd_visit(2, 35, 60001.0) as tx:
        tx.store(objects=upd, sources=_sources(rng, upd, 3000), forced_sources=_forced(rng, upd, 3000),
                 n_new_objects=5)  # fmt: skip
    assert _snapshot(apdb) != before
    with apdb.ccd_visit(2, 35, 60001.0) as tx:
        affected = tx.undo()
        assert not tx.exists()
    assert affected.tolist() == sorted(upd["diaObjectId"].tolist())
    assert _snapshot(apdb) == before  # new objects vanished, old versions re-opened
    # re-processing stores it once: no duplicates
    for _ in range(2):
        with apdb.ccd_visit(2, 35, 60001.0) as tx:
            tx.undo()
            tx.store(objects=upd, sources=_sources(rng, upd, 3000), forced_sources=_forced(rng, upd, 3000))
    assert apdb.count("DiaSource") == 33 and apdb.count("DiaForcedSource") == 33
    assert apdb.count("DiaObject") == 20 + 13
    assert apdb.dia_objects()["diaObjectId"].size == 25
    # undo with nothing stored is a no-op
    with apdb.ccd_visit(5, 1, 60005.0) as tx:
        assert tx.undo().size == 0


def test_undo_of_a_middle_visit_relinks_versions(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(10))
    for visit, t in ((1, 60000.0), (2, 60001.0), (3, 60002.0)):
        with apdb.ccd_visit(visit, 1, t) as tx:
            tx.store(objects=objs, sources=_sources(rng, objs, visit * 100))
    with apdb.ccd_visit(2, 1, 60001.0) as tx:
        tx.undo()
    allv = apdb.dia_objects(latest=False)
    first = allv["validityStartMjdTai"] == 60000.0
    assert np.all(allv["validityEndMjdTai"][first] == 60002.0)
    assert allv["diaObjectId"].size == 20


# ---------------------------------------------------------------- region load
def test_load_dia_objects_in_polygon(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(3000), ra0=149.5, dec0=1.5, size=1.0)
    with apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs)
    half = {k: v[:1500] for k, v in objs.items()}
    with apdb.ccd_visit(2, 1, 60001.0) as tx:  # second versions must not come back twice
        tx.store(objects=half)
    pra = np.array([149.8, 150.2, 150.25, 149.85])
    pdec = np.array([1.8, 1.75, 2.1, 2.15])
    want = np.sort(objs["diaObjectId"][polygon_contains(pra, pdec, objs["ra"], objs["dec"])])
    with apdb.ccd_visit(3, 1, 60002.0) as tx:
        got = tx.load_dia_objects(pra, pdec)
        hist = tx.load_dia_sources(got["diaObjectId"])
        fhist = tx.load_dia_forced_sources(got["diaObjectId"])
    assert want.size > 100
    assert np.array_equal(np.sort(got["diaObjectId"]), want)
    assert np.all(np.isnan(got["validityEndMjdTai"]))
    assert hist["diaSourceId"].size == 0 and fhist["diaForcedSourceId"].size == 0
    assert set(got) == set(COLUMN_KINDS["DiaObject"])


def test_load_sources_in_chunks(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(2500))
    with apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs, sources=_sources(rng, objs, 0), forced_sources=_forced(rng, objs, 0))
    with apdb.ccd_visit(2, 1, 60001.0) as tx:
        h = tx.load_dia_sources(np.arange(2500))
        f = tx.load_dia_forced_sources(np.arange(100, 2300))
    assert np.array_equal(np.sort(h["diaObjectId"]), np.arange(2500))
    assert np.array_equal(np.sort(f["diaObjectId"]), np.arange(100, 2300))


# ---------------------------------------------------------------- crash safety and locks
_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from apfast.dia import apdb as m
    from apfast.run.config import ApdbConfig

    def hook(table):
        if table == "DiaSource":
            os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        m._AFTER_INSERT_HOOK = hook
        url = sys.argv[1]
    a = m.Apdb(ApdbConfig(db_url=url))
    rng = np.random.default_rng(1)
    n = 2000
    ids = np.arange(n, dtype=np.int64) + 10_000
    ra, dec = 150 + rng.uniform(0, 0.1, n), 2 + rng.uniform(0, 0.1, n)
    with a.ccd_visit(9, 9, 60100.0) as tx:
        tx.undo()
        tx.store(
            objects={"diaObjectId": ids, "ra": ra, "dec": dec},
            sources={"diaSourceId": ids, "diaObjectId": ids, "ra": ra, "dec": dec, "x": ra, "y": dec},
            forced_sources={"diaForcedSourceId": ids, "diaObjectId": ids, "ra": ra, "dec": dec},
            n_new_objects=n,
        )
    a.close()
    """
)


def test_killed_process_leaves_no_partial_ccd_visit(apdb: Apdb, rng: np.random.Generator) -> None:
    objs = _objects(rng, np.arange(10))
    with apdb.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs, sources=_sources(rng, objs, 0))
    url = apdb.config.db_url
    apdb.close()
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, url], capture_output=True, text=True,
                       timeout=120, check=False)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert apdb.count("DiaObject") == 10 and apdb.count("DiaSource") == 10
    assert apdb.count("DiaForcedSource") == 0 and apdb.ccd_visits() == [(1, 1)]
    for _ in range(2):  # a re-run (same code, in this process) stores it exactly once, even run twice
        exec(compile(_KILL_SCRIPT, "kill_script", "exec"), {"__name__": "rerun", "url": url})
    assert apdb.count("DiaObject") == 2010 and apdb.count("DiaSource") == 2010
    assert apdb.count("DiaForcedSource") == 2000 and apdb.ccd_visits() == [(1, 1), (9, 9)]


def test_sqlite_lock_is_retried_then_reported(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "a.db"
    cfg = ApdbConfig(db_url=f"sqlite:///{path}", connection_timeout=0.4)
    make_apdb(cfg)
    a = Apdb(cfg)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    t0 = time.monotonic()
    with (
        pytest.raises(ApdbError, match="locked by another writer for 0.4 s; raise apdb.connection_timeout"),
        a.ccd_visit(1, 1, 60000.0) as tx,
    ):
        tx.exists()
    waited = time.monotonic() - t0
    assert 0.35 < waited < 3.0
    # readers are not blocked by the writer (WAL)
    assert a.count("DiaObject") == 0
    # the lock is released after 0.3 s: a writer with a longer timeout gets it
    b = Apdb(ApdbConfig(db_url=f"sqlite:///{path}", connection_timeout=10.0))
    threading.Timer(0.3, blocker.execute, args=("COMMIT",)).start()
    objs = _objects(rng, np.arange(3))
    with b.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=objs)
    assert b.count("DiaObject") == 3
    blocker.close()
    a.close()
    b.close()
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_no_pool_and_read_uncommitted(tmp_path: Path, rng: np.random.Generator) -> None:
    cfg = ApdbConfig(
        db_url=f"sqlite:///{tmp_path}/a.db", connection_pool=False, isolation_level="READ_UNCOMMITTED"
    )
    make_apdb(cfg)
    a = Apdb(cfg)
    assert isinstance(a.engine.pool, sa.pool.NullPool)
    with a.ccd_visit(1, 1, 60000.0) as tx:
        tx.store(objects=_objects(rng, np.arange(4)))
    assert a.count("DiaObject") == 4
    a.close()


# ---------------------------------------------------------------- Rubin's client reads our rows
def test_rubin_client_reads_apfast_rows(db_url: str, tmp_path: Path, rng: np.random.Generator) -> None:
    """lsst-dax-apdb reads our rows (SQLite, and PostgreSQL via psycopg 3: reads work there, writes don't)."""
    dax = pytest.importorskip("lsst.dax.apdb")
    sg = pytest.importorskip("lsst.sphgeom")
    from astropy.time import Time

    url = db_url
    cfg = ApdbConfig(db_url=url)
    make_apdb(cfg)
    a = Apdb(cfg)
    objs = _objects(rng, np.arange(500, 540), ra0=150.0, dec0=2.0, size=0.1)
    with a.ccd_visit(289400, 35, 60000.0) as tx:
        tx.store(objects=objs, sources=_sources(rng, objs, 7000), forced_sources=_forced(rng, objs, 8000))
    with a.ccd_visit(289401, 35, 60000.5) as tx:  # second versions: Rubin must return only the latest
        tx.store(objects={**objs, "nDiaSources": np.full(40, 2)}, sources=_sources(rng, objs, 9000))
    a.close()
    yaml = tmp_path / "apdb.yaml"
    yaml.write_text(f"db_url: {url}\nimplementation_type: sql\n")
    rubin = dax.Apdb.from_uri(str(yaml))
    region = sg.Circle(sg.UnitVector3d(sg.LonLat.fromDegrees(150.05, 2.05)), sg.Angle.fromDegrees(0.2))
    df = rubin.getDiaObjects(region)
    assert sorted(df["diaObjectId"].tolist()) == objs["diaObjectId"].tolist()
    assert set(df["nDiaSources"].tolist()) == {2}
    t = Time(60001.0, format="mjd", scale="tai")
    src = rubin.getDiaSources(region, objs["diaObjectId"].tolist(), t)
    assert src is not None and len(src) == 80
    assert sorted(src["diaSourceId"].tolist()) == list(range(7000, 7040)) + list(range(9000, 9040))
    np.testing.assert_allclose(np.sort(src["ra"].to_numpy()), np.sort(np.tile(objs["ra"], 2)), rtol=0, atol=0)
    frc = rubin.getDiaForcedSources(region, objs["diaObjectId"].tolist(), t)
    assert frc is not None and sorted(frc["diaForcedSourceId"].tolist()) == list(range(8000, 8040))
    engine = getattr(rubin, "_engine", None)
    if engine is not None:
        engine.dispose()
