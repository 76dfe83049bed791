"""Association benchmarks: matching in a 10^5-object region and DiaObject statistics.

- ``match-100-vs-1e5``: 100 DIA sources of one CCD-visit (half of them on existing
  objects) against 10^5 DiaObjects of the loaded region. apfast's :func:`match_sources`
  (dec pre-cut + cKDTree) vs a brute-force numpy distance matrix with the same greedy
  one-to-one step; both must give the same pairs.
- ``object-versions-1e4``: :func:`compute_object_versions` for 10^4 objects from 10^5
  history rows in 3 bands (target: < 50 ms), with a pandas ``groupby`` baseline that
  computes only part of the statistics (weighted flux mean, sigma, min, max, positions).

Run timed with ``python -m pytest bench/test_bench_association.py --benchmark-enable``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from apfast.dia.association import (
    _greedy_one_to_one,
    associate,
    compute_object_versions,
    dia_source_ids,
    match_sources,
    unit_vectors,
)

ARCSEC = 1.0 / 3600.0
N_OBJ, N_SRC = 100_000, 100
N_GROUPS, N_HIST = 10_000, 100_000


@pytest.fixture(scope="module")
def region():
    """10^5 objects in a 0.5 x 0.5 deg patch; 100 sources, 50 of them within 0.3" of an object."""
    rng = np.random.default_rng(7)
    ra0, dec0 = 150.0, 2.0
    cosd = math.cos(math.radians(dec0))
    ora = ra0 + rng.uniform(-0.25, 0.25, N_OBJ) / cosd
    odec = dec0 + rng.uniform(-0.25, 0.25, N_OBJ)
    pick = rng.choice(N_OBJ, N_SRC // 2, replace=False)
    sra = np.r_[ora[pick] + rng.normal(0, 0.2, N_SRC // 2) * ARCSEC / cosd,
                ra0 + rng.uniform(-0.07, 0.07, N_SRC // 2) / cosd]
    sdec = np.r_[odec[pick] + rng.normal(0, 0.2, N_SRC // 2) * ARCSEC, dec0 + rng.uniform(-0.15, 0.15, N_SRC // 2)]
    return sra, sdec, ora, odec


def _brute_force(sra, sdec, ora, odec, radius_arcsec):
    """All source-object separations from one (n, m) dot-product matrix, then the same greedy step."""
    dots = unit_vectors(sra, sdec) @ unit_vectors(ora, odec).T
    cos_r = math.cos(math.radians(radius_arcsec / 3600.0))
    si, oi = np.nonzero(dots >= cos_r)
    dist = np.degrees(np.arccos(np.minimum(dots[si, oi], 1.0))) * 3600.0
    keep = _greedy_one_to_one(si, oi, dist)
    order = np.argsort(si[keep])
    return si[keep][order], oi[keep][order], dist[keep][order]


@pytest.mark.benchmark(group="match-100-vs-1e5")
def test_bench_match_sources(benchmark, region):
    sra, sdec, ora, odec = region
    s, o, _d = benchmark(match_sources, sra, sdec, ora, odec, max_dist_arcsec=1.0)
    bs, bo, _ = _brute_force(sra, sdec, ora, odec, 1.0)
    assert np.array_equal(s, bs) and np.array_equal(o, bo)
    assert len(s) >= N_SRC // 2


@pytest.mark.benchmark(group="match-100-vs-1e5")
def test_bench_match_baseline_brute_force(benchmark, region):
    sra, sdec, ora, odec = region
    s, _, _ = benchmark(_brute_force, sra, sdec, ora, odec, 1.0)
    assert len(s) >= N_SRC // 2


@pytest.mark.benchmark(group="match-100-vs-1e5")
def test_bench_associate(benchmark, region):
    sra, sdec, ora, odec = region
    src = {"diaSourceId": dia_source_ids(289400, 35, N_SRC), "ra": sra, "dec": sdec}
    obj = {"diaObjectId": np.arange(N_OBJ, dtype=np.int64) + 10**12, "ra": ora, "dec": odec}
    res = benchmark(associate, src, obj, visit=289400, detector=35, max_dist_arcsec=1.0)
    assert res.n_matched + res.n_new == N_SRC and res.n_matched >= N_SRC // 2


@pytest.fixture(scope="module")
def history():
    rng = np.random.default_rng(11)
    ids = rng.permutation(np.arange(N_GROUPS, dtype=np.int64) * 7919 + (289400 << 20))
    which = rng.permutation(np.r_[np.arange(N_GROUPS), rng.integers(0, N_GROUPS, N_HIST - N_GROUPS)])
    ra_c = rng.uniform(0, 360, N_GROUPS)
    dec_c = rng.uniform(-70, 70, N_GROUPS)
    h = {
        "diaObjectId": ids[which],
        "ra": (ra_c[which] + rng.normal(0, 0.2, N_HIST) * ARCSEC) % 360,
        "dec": dec_c[which] + rng.normal(0, 0.2, N_HIST) * ARCSEC,
        "raErr": rng.uniform(0.02, 0.1, N_HIST) * ARCSEC,
        "decErr": rng.uniform(0.02, 0.1, N_HIST) * ARCSEC,
        "ra_dec_Cov": np.zeros(N_HIST),
        "midpointMjdTai": rng.uniform(60000, 60365, N_HIST),
        "band": rng.choice(np.array(["g", "r", "i"], dtype=object), N_HIST),
        "psfFlux": rng.normal(1000, 200, N_HIST),
        "psfFluxErr": rng.uniform(20, 80, N_HIST),
        "scienceFlux": rng.normal(5000, 200, N_HIST),
        "scienceFluxErr": rng.uniform(20, 80, N_HIST),
    }
    return ids, h


@pytest.mark.benchmark(group="object-versions-1e4")
def test_bench_compute_object_versions(benchmark, history):
    ids, h = history
    out = benchmark(compute_object_versions, ids, h, band="g", validity_start=60365.5)
    assert out["nDiaSources"].sum() == N_HIST
    assert np.all(out["g_psfFluxNdata"] <= out["nDiaSources"])


@pytest.mark.benchmark(group="object-versions-1e4")
def test_bench_object_versions_baseline_pandas(benchmark, history):
    pd = pytest.importorskip("pandas")
    _ids, h = history
    df = pd.DataFrame(h)

    def run():
        w = 1.0 / df["psfFluxErr"] ** 2
        g = df[df["band"] == "g"].assign(w=w, wf=w * df["psfFlux"]).groupby("diaObjectId")
        flux = g.agg(sw=("w", "sum"), swf=("wf", "sum"), sigma=("psfFlux", "std"), fmin=("psfFlux", "min"),
                     fmax=("psfFlux", "max"))
        pos = df.groupby("diaObjectId").agg(ra=("ra", "mean"), dec=("dec", "mean"), n=("ra", "size"),
                                            first=("midpointMjdTai", "min"), last=("midpointMjdTai", "max"))
        return flux.join(pos, how="right")

    res = benchmark(run)
    assert len(res) == N_GROUPS
