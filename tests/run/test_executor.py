"""Scale-out: the CCD dependency graph, -j N worker processes, concurrent APDB writers, a Dask LocalCluster.

The parallel runs process the same simulated CCD-visits as a serial run, into their own reruns and
APDBs, and must give the same APDB contents (same ids, same associations, fluxes equal to float32
precision). Concurrent writers on one APDB (SQLite and a real PostgreSQL server) must never give
one transient two DiaObjects.
"""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from apfast.dia.apdb import Apdb, make_apdb
from apfast.run.cli import main
from apfast.run.config import ApdbConfig
from apfast.run.executor import ccd_dependencies


# ------------------------------------------------------------------------------------ dependencies
def _row(ra: float, dec: float, half: float = 0.1) -> dict:
    r = {"ra_center": ra, "dec_center": dec}
    for k, (dx, dy) in enumerate(((-1, -1), (1, -1), (1, 1), (-1, 1))):
        r[f"corner_ra_{k}"] = ra + dx * half / 2
        r[f"corner_dec_{k}"] = dec + dy * half
    return r


def test_dependencies_follow_sky_overlap() -> None:
    rows = [_row(150.0, 2.0), _row(150.5, 2.0), _row(150.0, 2.01), _row(150.5, 2.0), _row(10.0, -30.0)]
    deps = ccd_dependencies(rows, margin_deg=0.01)
    assert deps == [[], [], [0], [1], []]
    rows.append({"ra_center": None})  # no footprint: waits for everything before it
    assert ccd_dependencies(rows, margin_deg=0.01)[-1] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------ concurrent writers
def _writer(url: str, detector: int, n_visits: int, seed: int) -> None:
    """One 'CCD' storing a source of the same transient in every visit (what two workers race on)."""
    from apfast.dia.apdb_schema import concat_column_sets
    from apfast.dia.association import associate, compute_object_versions, dia_source_ids

    rng = np.random.default_rng(seed)
    apdb = Apdb(ApdbConfig(db_url=url, connection_timeout=60.0))
    ra0, dec0 = 150.0, 2.0
    box_ra = np.array([149.99, 150.01, 150.01, 149.99])
    box_dec = np.array([1.99, 1.99, 2.01, 2.01])
    for k in range(n_visits):
        visit, t = 1000 + k, 60000.0 + k
        src = {"diaSourceId": dia_source_ids(visit, detector, 1),
               "ra": np.array([ra0 + rng.normal(0, 0.1 / 3600)]), "dec": np.array([dec0 + rng.normal(0, 0.1 / 3600)]),
               "raErr": np.array([1e-5]), "decErr": np.array([1e-5]), "x": np.array([10.0]), "y": np.array([10.0]),
               "psfFlux": np.array([1000.0 + k]), "psfFluxErr": np.array([10.0]),
               "midpointMjdTai": np.array([t]), "band": np.array(["g"], dtype=object),
               "visit": np.array([visit]), "detector": np.array([detector])}
        with apdb.ccd_visit(visit, detector, t) as tx:
            objs = tx.load_dia_objects(box_ra, box_dec)
            a = associate(src, objs, visit=visit, detector=detector, max_dist_arcsec=1.0)
            hist = tx.load_dia_sources(a.matched_object_ids) if a.n_matched else {}
            ids = np.union1d(a.matched_object_ids, a.new_object_ids).astype(np.int64)
            n = len(objs.get("diaObjectId", ()))
            prior = {c: v[np.isin(objs["diaObjectId"], ids)] for c, v in objs.items()} if n else None
            versions = compute_object_versions(ids, concat_column_sets([hist, a.sources]), band="g", validity_start=t,
                                               prior=prior)
            tx.store(objects=versions, sources=a.sources, n_new_objects=a.n_new)
    apdb.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_writers_never_duplicate_objects(backend: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'apdb.db'}"
    else:
        from pgserver import create_database

        url = create_database(request.getfixturevalue("postgres_url"))
    make_apdb(ApdbConfig(db_url=url))
    n_visits = 15
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, det, n_visits, det)) for det in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    with Apdb(ApdbConfig(db_url=url)) as apdb:
        latest = apdb.dia_objects(latest=True)
        n_src = apdb.count("DiaSource")
        srcs = apdb.dia_sources()
    assert len(latest["diaObjectId"]) == 1, "one transient, two concurrent writers: must be ONE DiaObject"
    assert int(latest["nDiaSources"][0]) == 2 * n_visits
    assert n_src == 2 * n_visits
    assert set(np.asarray(srcs["diaObjectId"]).tolist()) == {int(latest["diaObjectId"][0])}


# --------------------------------------------------------------------------- -j 2 vs serial vs dask
def _process(dia_dataset: dict, d: Path, name: str, extra: list[str]) -> Path:
    db = d / f"{name}.db"
    url = f"sqlite:///{db}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    sv = "^".join(str(v) for v in dia_dataset["summary"].science_visits)
    assert main(["-q", "process", str(dia_dataset["repo"]), "--rerun", name, "--id", f"visit={sv}",
                 "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={url}", *extra]) == 0
    return db


def _table(db: Path, table: str, key: str, cols: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(f'SELECT {cols} FROM "{table}" ORDER BY {key}').fetchall()


def _same_apdb(a: Path, b: Path) -> None:
    for table, key, ints, floats in (
        ("DiaSource", '"diaSourceId"', '"diaSourceId", "diaObjectId", visit, detector', '"psfFlux", ra, dec'),
        ("DiaObject", '"diaObjectId", "validityStartMjdTai"', '"diaObjectId", "nDiaSources", "g_psfFluxNdata"',
         '"validityStartMjdTai", "g_psfFluxMean", ra'),
        ("DiaForcedSource", '"diaObjectId", visit, detector', '"diaObjectId", visit, detector', '"psfFlux"'),
    ):
        ra, rb = _table(a, table, key, ints), _table(b, table, key, ints)
        assert ra == rb, f"{table}: ids differ"
        fa = np.array(_table(a, table, key, floats), dtype=float)
        fb = np.array(_table(b, table, key, floats), dtype=float)
        np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-3, err_msg=table)


@pytest.fixture(scope="module")
def serial_db(dia_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _process(dia_dataset, tmp_path_factory.mktemp("serial"), "serial", [])


@pytest.mark.slow  # full-size -j 2 run (~70 s on 2 cores): CI runs the slow marker once
def test_two_workers_equal_serial(dia_dataset: dict, serial_db: Path, tmp_path: Path) -> None:
    db = _process(dia_dataset, tmp_path, "j2", ["-j", "2"])
    _same_apdb(serial_db, db)


@pytest.mark.slow
def test_dask_local_cluster_equals_serial(dia_dataset: dict, serial_db: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    db = _process(dia_dataset, tmp_path, "dask", ["--executor", "dask", "--workers", "2"])
    _same_apdb(serial_db, db)


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(dia_dataset: dict, serial_db: Path, tmp_path: Path) -> None:
    """SIGKILL a `-j 2` run (workers and all) once it has stored a CCD-visit; the APDB holds only whole
    CCD-visits; re-running the same command completes it and equals the serial run exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "killed.db"
    url = f"sqlite:///{db}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    sv = "^".join(str(v) for v in dia_dataset["summary"].science_visits)
    args = ["-q", "process", str(dia_dataset["repo"]), "--rerun", "killed", "--id", f"visit={sv}",
            "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={url}", "-j", "2"]
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from apfast.run.cli import main; sys.exit(main(sys.argv[1:]))", *args],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        with sqlite3.connect(db) as con:
            stored = con.execute("SELECT COUNT(*) FROM apfast_ccd_visit").fetchone()[0]
        if stored >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None and stored >= 1, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    with sqlite3.connect(db) as con:
        partial = con.execute('SELECT COUNT(*) FROM "DiaSource" s WHERE NOT EXISTS (SELECT 1 FROM apfast_ccd_visit c '
                              'WHERE c.visit = s.visit AND c.detector = s.detector)').fetchone()[0]
        done = con.execute("SELECT COUNT(*) FROM apfast_ccd_visit").fetchone()[0]
    assert partial == 0
    assert done < len(dia_dataset["summary"].science_visits)
    assert main(args) == 0
    _same_apdb(serial_db, db)
