"""APDB write speed: bulk stores into SQLite (vs lsst-dax-apdb) and one CCD-visit into a full APDB.

(a) 20,000 rows each of DiaObject, DiaSource and DiaForcedSource into a fresh
    SQLite APDB: apfast target <= 0.5 s; lsst-dax-apdb's ``store()`` of the same
    rows sits in the same group when installed (~1.1 s expected).
(b) one CCD-visit (region load of the CCD footprint + history of 100 objects,
    then 100 DiaSources, 100 DiaObject versions, 1000 DiaForcedSources) into an
    APDB already holding 10^5 DiaObjects over ~10 deg^2: target <= 50 ms.
"""

from __future__ import annotations

from itertools import count
from pathlib import Path

import numpy as np
import pytest

from apfast.dia.apdb import Apdb, make_apdb
from apfast.run.config import ApdbConfig

N_BULK = 20_000
T0 = 60000.0


def _bulk_rows(rng: np.random.Generator, n: int, visit: int, detector: int) -> tuple[dict, dict, dict]:
    """Realistic column sets (about 30 DiaObject, 35 DiaSource, 13 DiaForcedSource columns)."""
    ids = (np.int64(visit * 100 + detector) << 20) + np.arange(n, dtype=np.int64)
    ra = 150.0 + rng.uniform(0, 1, n)
    dec = 2.0 + rng.uniform(0, 1, n)
    flux = rng.normal(1000, 100, n)
    err = np.full(n, 50.0)
    t = np.full(n, T0)
    objects = {
        "diaObjectId": ids, "ra": ra, "dec": dec, "raErr": err / 1e4, "decErr": err / 1e4, "ra_dec_Cov": err / 1e9,
        "g_psfFluxMean": flux, "g_psfFluxMeanErr": err, "g_psfFluxSigma": err, "g_psfFluxMin": flux,
        "g_psfFluxMax": flux, "g_psfFluxErrMean": err, "g_scienceFluxMean": flux, "g_scienceFluxMeanErr": err,
        "nDiaSources": np.ones(n, np.int64), "firstDiaSourceMjdTai": t, "lastDiaSourceMjdTai": t,
        **{f"{b}_psfFluxNdata": np.zeros(n, np.int64) for b in "ugrizy"},
    }  # fmt: skip
    objects["g_psfFluxNdata"] = np.ones(n, np.int64)
    sources = {
        "diaSourceId": ids, "visit": np.full(n, visit, np.int64), "detector": np.full(n, detector, np.int64),
        "diaObjectId": ids, "midpointMjdTai": t, "ra": ra, "dec": dec, "raErr": err / 1e4, "decErr": err / 1e4,
        "x": rng.uniform(0, 2048, n), "y": rng.uniform(0, 4096, n), "xErr": err / 100, "yErr": err / 100,
        "psfFlux": flux, "psfFluxErr": err, "psfChi2": err, "psfNdata": np.full(n, 49, np.int64),
        "trailNdata": np.zeros(n, np.int64), "dipoleNdata": np.zeros(n, np.int64),
        "bboxSize": np.full(n, 15, np.int64), "apFlux": flux, "apFluxErr": err, "snr": flux / err,
        "scienceFlux": flux, "scienceFluxErr": err, "templateFlux": flux * 0, "templateFluxErr": err,
        "isNegative": flux < 0, "band": np.array(["g"] * n), "timeProcessedMjdTai": t,
        "pixelFlags": np.zeros(n, bool), "pixelFlags_edge": np.zeros(n, bool),
        "pixelFlags_saturated": np.zeros(n, bool), "pixelFlags_cr": np.zeros(n, bool),
    }  # fmt: skip
    forced = {
        "diaForcedSourceId": ids, "diaObjectId": ids, "ra": ra, "dec": dec,
        "visit": np.full(n, visit, np.int64), "detector": np.full(n, detector, np.int64),
        "psfFlux": flux, "psfFluxErr": err, "scienceFlux": flux, "scienceFluxErr": err, "midpointMjdTai": t,
        "band": np.array(["g"] * n), "timeProcessedMjdTai": t,
    }  # fmt: skip
    return objects, sources, forced


@pytest.fixture(scope="module")
def bulk_rows() -> tuple[dict, dict, dict]:
    return _bulk_rows(np.random.default_rng(5), N_BULK, 289400, 35)


@pytest.mark.benchmark(group="apdb-store-20000-rows-x3-sqlite")
def test_apfast_store_20000(benchmark, bulk_rows, tmp_path: Path) -> None:
    objects, sources, forced = bulk_rows
    n = count()

    def setup():
        cfg = ApdbConfig(db_url=f"sqlite:///{tmp_path}/a{next(n)}.db")
        make_apdb(cfg)
        return (Apdb(cfg),), {}

    def run(apdb: Apdb) -> Apdb:
        with apdb.ccd_visit(289400, 35, T0) as tx:
            tx.store(objects=objects, sources=sources, forced_sources=forced, n_new_objects=N_BULK)
        return apdb

    apdb = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert apdb.count("DiaObject") == N_BULK and apdb.count("DiaSource") == N_BULK
    assert apdb.count("DiaForcedSource") == N_BULK
    apdb.close()
    if benchmark.stats:
        assert benchmark.stats.stats.min < 0.5 * 2  # target 0.5 s; fail only when far off on a loaded box


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # raised inside lsst-dax-apdb with pandas 3
@pytest.mark.benchmark(group="apdb-store-20000-rows-x3-sqlite")
def test_lsst_dax_apdb_store_20000(benchmark, bulk_rows, tmp_path: Path) -> None:
    """The reference: Rubin's own client storing the same rows."""
    dax = pytest.importorskip("lsst.dax.apdb")
    pd = pytest.importorskip("pandas")
    from astropy.time import Time

    objects, sources, forced = bulk_rows
    dfs = [pd.DataFrame({k: (v.astype(object) if v.dtype.kind == "U" else v) for k, v in cs.items()})
           for cs in (objects, sources, forced)]  # fmt: skip
    t = Time(T0, format="mjd", scale="tai")
    n = count()

    def setup():
        cfg = dax.ApdbSql.init_database(db_url=f"sqlite:///{tmp_path}/r{next(n)}.db")
        return (dax.Apdb.from_config(cfg),), {}

    def run(apdb):
        apdb.store(t, dfs[0], dfs[1], dfs[2])
        return apdb

    apdb = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert len(apdb.getDiaObjects(_region_all())) == N_BULK


def _region_all():
    import lsst.sphgeom as sg

    return sg.Circle(sg.UnitVector3d(sg.LonLat.fromDegrees(150.5, 2.5)), sg.Angle.fromDegrees(2.0))


# ---------------------------------------------------------------- one CCD-visit into a full APDB
N_PREFILL = 100_000


@pytest.fixture(scope="module")
def full_apdb(tmp_path_factory: pytest.TempPathFactory) -> Apdb:
    """10^5 DiaObjects uniformly over 150..153.16 x 0..3.16 deg (~10 deg^2), stored in bulk."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("apdb_full")
    cfg = ApdbConfig(db_url=f"sqlite:///{d}/full.db")
    make_apdb(cfg)
    apdb = Apdb(cfg)
    objects, sources, _ = _bulk_rows(rng, N_PREFILL, 200000, 1)
    objects["ra"] = sources["ra"] = 150.0 + rng.uniform(0, 3.16, N_PREFILL)
    objects["dec"] = sources["dec"] = rng.uniform(0, 3.16, N_PREFILL)
    with apdb.ccd_visit(200000, 1, T0 - 10) as tx:
        tx.store(objects=objects, sources=sources)
    yield apdb
    apdb.close()


@pytest.mark.benchmark(group="apdb-one-ccd-visit-into-1e5-objects")
def test_store_one_ccd_visit(benchmark, full_apdb: Apdb) -> None:
    # a DECam CCD: 2048 x 4096 px of 0.263" = 0.15 x 0.30 deg, plus a 10" margin
    m = 10 / 3600
    pra = np.array([151.5 - m, 151.65 + m, 151.65 + m, 151.5 - m])
    pdec = np.array([1.5 - m, 1.5 - m, 1.8 + m, 1.8 + m])
    visits = count(300000)
    rng = np.random.default_rng(11)
    seen: list[int] = []

    def run() -> None:
        visit = next(visits)
        t = T0 + (visit - 300000) * 0.01
        with full_apdb.ccd_visit(visit, 35, t) as tx:
            objs = tx.load_dia_objects(pra, pdec)
            seen.append(objs["diaObjectId"].size)
            pick = rng.choice(objs["diaObjectId"].size, 100, replace=False)
            ids = objs["diaObjectId"][pick]
            tx.load_dia_sources(ids)
            tx.load_dia_forced_sources(ids)
            upd = {k: objs[k][pick] for k in ("diaObjectId", "ra", "dec", "g_psfFluxMean", "g_psfFluxNdata")}
            upd["nDiaSources"] = objs["nDiaSources"][pick].astype(np.int64) + 1
            base = np.int64(visit * 100 + 35) << 20
            src = {
                "diaSourceId": base + np.arange(100), "diaObjectId": ids, "ra": upd["ra"], "dec": upd["dec"],
                "x": rng.uniform(0, 2048, 100), "y": rng.uniform(0, 4096, 100), "psfFlux": rng.normal(0, 1, 100),
                "psfFluxErr": np.ones(100), "band": np.array(["g"] * 100),
            }  # fmt: skip
            fid = np.unique(np.concatenate([ids, objs["diaObjectId"]]))[:1000]
            frc = {
                "diaForcedSourceId": base + np.arange(fid.size), "diaObjectId": fid,
                "ra": np.full(fid.size, 151.6), "dec": np.full(fid.size, 1.6),
                "psfFlux": np.zeros(fid.size), "psfFluxErr": np.ones(fid.size),
            }  # fmt: skip
            tx.store(objects=upd, sources=src, forced_sources=frc)

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert 300 < seen[0] < 800  # ~1e4 per deg^2 over ~0.05 deg^2
    if benchmark.stats:
        assert benchmark.stats.stats.median < 0.05 * 3  # target 50 ms; fail only when far off
