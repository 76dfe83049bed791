"""`apfast process` end to end on simulated DECam data: DIA sources, APDB, association, alerts vs truth.

One full-size CCD, two template visits coadded into a template, three science visits with
injected transients (hosted, hostless, variables, movers; ``truth/transients.csv`` gives
their positions, difference fluxes and expected S/N). Everything runs through the CLI into
a real SQLite APDB: the session's ``dia_run`` (tests/conftest.py), processed once and shared
with test_diffim_pipeline and test_report.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from apfast.dia.truth_match import explained_by_truth, match_nearest
from apfast.repo.butler import Butler
from apfast.run.cli import main

CCD = 35
MATCH_ARCSEC = 1.0


@pytest.fixture(scope="module")
def run(dia_run: dict) -> dict:
    """The session's processed run (tests/conftest.py ``dia_run``); the re-run tests here leave it as found."""
    return dia_run


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


def _sources(db: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(db) as con:
        cur = con.execute('SELECT visit, ra, dec, "psfFlux", "psfFluxErr", "diaObjectId", "diaSourceId" '
                          'FROM "DiaSource"')
        rows = cur.fetchall()
    a = np.array(rows, dtype=object).reshape(-1, 7)
    return {"visit": a[:, 0].astype(int), "ra": a[:, 1].astype(float), "dec": a[:, 2].astype(float),
            "psfFlux": a[:, 3].astype(float), "psfFluxErr": a[:, 4].astype(float),
            "diaObjectId": a[:, 5].astype(np.int64), "diaSourceId": a[:, 6].astype(np.int64)}


def _truth(run: dict) -> dict[str, np.ndarray]:
    t = run["truth"].transients
    keep = np.asarray(t["ccdnum"]).astype(int) == CCD
    return {k: np.asarray(t[k])[keep] for k in t.colnames}


def _match_truth(run: dict) -> tuple[dict, dict, np.ndarray]:
    """Nearest DIA source (same visit, within 1") of every injected transient; -1 if none."""
    src, tr = _sources(run["db"]), _truth(run)
    idx = np.full(len(tr["ra"]), -1)
    for v in np.unique(tr["visit"].astype(int)):
        same, rows = np.flatnonzero(src["visit"] == v), np.flatnonzero(tr["visit"].astype(int) == v)
        if same.size == 0:
            continue
        j = match_nearest(src["ra"][same], src["dec"][same], tr["ra"][rows].astype(float),
                          tr["dec"][rows].astype(float), MATCH_ARCSEC)
        idx[rows] = np.where(j >= 0, same[np.maximum(j, 0)], -1)
    return src, tr, idx


def test_completeness_vs_expected_snr(run: dict) -> None:
    _, tr, idx = _match_truth(run)
    snr = np.abs(tr["snr_expected"].astype(float))
    bright = snr >= 10
    assert bright.sum() >= 30
    assert (idx[bright] >= 0).mean() >= 0.95, f"completeness at S/N >= 10: {(idx[bright] >= 0).mean():.3f}"
    mid = (snr >= 4.5) & (snr < 6.5)
    if mid.sum() >= 8:
        assert (idx[mid] >= 0).mean() >= 0.5, f"completeness at S/N ~5.5: {(idx[mid] >= 0).mean():.3f}"


def _explained(run: dict, ra: np.ndarray, dec: np.ndarray, visit: int) -> np.ndarray:
    """DIA sources that a real change in the simulated sky explains: an injected transient of that visit,
    a variable star, or a star whose proper motion moved it by >= 20 mas between template and science."""
    src = run["truth"].sources
    return explained_by_truth(ra, dec, visit, _truth(run), {k: np.asarray(src[k]) for k in src.colnames})


def test_false_detections_per_ccd_visit(run: dict) -> None:
    src = _sources(run["db"])
    for v in run["visits"]:
        here = src["visit"] == v
        n_false = int((~_explained(run, src["ra"][here], src["dec"][here], v)).sum())
        assert n_false <= 10, f"visit {v}: {n_false} DIA sources match no injected transient, variable or mover"


def test_flux_accuracy_bright(run: dict) -> None:
    src, tr, idx = _match_truth(run)
    ok = (idx >= 0) & (np.abs(tr["snr_expected"].astype(float)) > 20)
    assert ok.sum() >= 10
    ratio = src["psfFlux"][idx[ok]] / tr["flux_njy"][ok].astype(float)
    assert np.median(np.abs(ratio - 1.0)) < 0.05, f"median |psfFlux/true - 1| = {np.median(np.abs(ratio - 1)):.3f}"


def test_one_object_per_static_transient(run: dict) -> None:
    src, tr, idx = _match_truth(run)
    nvis = len(run["visits"])
    static = np.array([k != "moving" for k in tr["kind"]])
    ids = np.unique(tr["id"][static])
    checked = 0
    for tid in ids:
        rows = np.flatnonzero((tr["id"] == tid) & static)
        if len(rows) != nvis or (idx[rows] < 0).any():
            continue
        objs = set(src["diaObjectId"][idx[rows]].tolist())
        assert len(objs) == 1, f"transient {tid}: {len(objs)} DiaObjects"
        (oid,) = objs
        n = _rows(run["db"], f'SELECT "nDiaSources" FROM "DiaObject" WHERE "diaObjectId" = {int(oid)} '
                             'AND "validityEndMjdTai" IS NULL')
        assert n == [(nvis,)]
        checked += 1
    assert checked >= 10


def test_apdb_consistency(run: dict) -> None:
    db = run["db"]
    # one open version per object; every DiaSource points at an existing object
    assert _rows(db, 'SELECT COUNT(*) FROM (SELECT "diaObjectId" FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL '
                     'GROUP BY "diaObjectId" HAVING COUNT(*) > 1)') == [(0,)]
    assert _rows(db, 'SELECT COUNT(*) FROM "DiaSource" s WHERE NOT EXISTS (SELECT 1 FROM "DiaObject" o '
                     'WHERE o."diaObjectId" = s."diaObjectId")') == [(0,)]
    # nDiaSources of the open version equals the number of its DiaSources
    bad = _rows(db, 'SELECT COUNT(*) FROM "DiaObject" o WHERE o."validityEndMjdTai" IS NULL AND o."nDiaSources" != '
                    '(SELECT COUNT(*) FROM "DiaSource" s WHERE s."diaObjectId" = o."diaObjectId")')
    assert bad == [(0,)]
    # forced photometry: each object on the CCD gets one forced source per processed visit after it appeared
    n_forced = _rows(db, 'SELECT COUNT(*) FROM "DiaForcedSource"')[0][0]
    assert n_forced >= _rows(db, 'SELECT COUNT(*) FROM "DiaSource"')[0][0]
    diasrc = Butler(run["out"]).get("deepDiff_diaSrc", visit=run["visits"][0], ccdnum=CCD)
    assert len(diasrc) == _rows(db, f'SELECT COUNT(*) FROM "DiaSource" WHERE visit = {run["visits"][0]}')[0][0]


def test_alerts_written_and_valid(run: dict) -> None:
    from apfast.dia.alerts import load_alert_schema, read_alerts

    fastavro = pytest.importorskip("fastavro")
    schema = load_alert_schema()
    v = run["visits"][-1]
    alerts = read_alerts(run["out"] / "alerts" / f"{v}_{CCD}.avro")
    n = _rows(run["db"], f'SELECT COUNT(*) FROM "DiaSource" WHERE visit = {v}')[0][0]
    rel = [r[0] for r in _rows(run["db"], f'SELECT reliability FROM "DiaSource" WHERE visit = {v}')]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in rel), rel
    assert {r[0] for r in _rows(run["db"], 'SELECT "reliabilityVersion" FROM "DiaSource"')} == {"gbt-1"}
    # alerts only for sources at or above alerts.min_reliability (0.5); the rest stay in the APDB
    assert len(alerts) == sum(r >= 0.5 for r in rel) > 0.8 * n > 0
    sql = f'SELECT "diaSourceId" FROM "DiaSource" WHERE visit = {v} AND reliability >= 0.5'
    assert {a["diaSource"]["diaSourceId"] for a in alerts} == {r[0] for r in _rows(run["db"], sql)}
    for a in alerts:
        assert fastavro.validation.validate(a, schema, raise_errors=True)
    # the last visit's alerts of a 3-visit object carry its 2 earlier sources
    assert max(len(a["prvDiaSources"] or []) for a in alerts) == len(run["visits"]) - 1


def test_rerun_skips_and_clobber_replaces(run: dict) -> None:
    db = run["db"]
    tables = ("DiaObject", "DiaSource", "DiaForcedSource")
    before = {t: _rows(db, f'SELECT COUNT(*) FROM "{t}"')[0][0] for t in tables}
    ids_before = sorted(r[0] for r in _rows(db, 'SELECT "diaSourceId" FROM "DiaSource"'))
    assert main(run["args"]) == 0  # everything exists: skipped
    assert {t: _rows(db, f'SELECT COUNT(*) FROM "{t}"')[0][0] for t in tables} == before
    # re-process the last visit: its rows are replaced, nothing duplicated, statistics still right
    args = [a for a in run["args"]]
    i = args.index("--id")
    args[i + 1] = f"visit={run['visits'][-1]}"
    assert main([*args, "--clobber-output"]) == 0
    after = {t: _rows(db, f'SELECT COUNT(*) FROM "{t}"')[0][0] for t in tables}
    assert after["DiaSource"] == before["DiaSource"]
    assert after["DiaForcedSource"] == before["DiaForcedSource"]
    assert sorted(r[0] for r in _rows(db, 'SELECT "diaSourceId" FROM "DiaSource"')) == ids_before
    test_apdb_consistency(run)


def _apdb_state(db: Path) -> dict:
    return {
        "counts": {t: _rows(db, f'SELECT COUNT(*) FROM "{t}"')[0][0]
                   for t in ("DiaObject", "DiaSource", "DiaForcedSource", "apfast_ccd_visit")},
        "links": sorted(_rows(db, 'SELECT "diaSourceId", "diaObjectId" FROM "DiaSource"')),
        "current": sorted(_rows(db, 'SELECT "diaObjectId", "nDiaSources" FROM "DiaObject" '
                                    'WHERE "validityEndMjdTai" IS NULL')),
        "versions": sorted(_rows(db, 'SELECT "diaObjectId", "validityStartMjdTai", "validityEndMjdTai" '
                                     'FROM "DiaObject"')),
    }


@pytest.mark.slow  # re-processes three full-size CCD-visits twice (~30 s)
def test_redo_older_visits_keeps_history(run: dict, capsys: pytest.CaptureFixture) -> None:
    """Re-processing older CCD-visits must give the same APDB as the first run, or refuse with a fix."""
    db = run["db"]
    before = _apdb_state(db)
    assert before["counts"]["DiaObject"] > len(before["current"])  # objects seen in several visits
    args = list(run["args"])
    i = args.index("--id")
    # the middle visit alone: later visits hold versions of its DiaObjects -> refused, nothing changed
    args[i + 1] = f"visit={run['visits'][1]}"
    assert main([*args, "--clobber-output"]) == 1
    err = capsys.readouterr().err
    assert f"visit={run['visits'][-1]}" in err and "--clobber-output" in err
    assert _apdb_state(db) == before
    # every visit again: undone latest first, associated again in time order -> the same APDB
    args[i + 1] = "visit=" + "^".join(str(v) for v in run["visits"])
    assert main([*args, "--clobber-output"]) == 0
    assert _apdb_state(db) == before


def test_process_without_apdb_says_make_apdb(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'none.db'}"
    args = [a if not a.startswith("apdb.db_url=") else f"apdb.db_url={url}" for a in run["args"]]
    assert main(args) == 2
    assert "apfast make-apdb" in capsys.readouterr().err
