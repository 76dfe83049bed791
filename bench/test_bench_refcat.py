"""Benchmark: a DECam-CCD-sized reference catalogue load from HEALPix shards vs one big FITS file.

The catalogue has 1e6 Gaia-like sources over 20 x 20 deg (2500 per deg^2, a high-latitude
Gaia density). ``apfast`` reads only the shards around the cone; the baseline reads the
whole catalogue from a single FITS file and filters it with numpy, as a pipeline without
sharding would. Both return the same sources (asserted). Run timed with
``python -m pytest bench/test_bench_refcat.py --benchmark-enable``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from apfast.repo.refcat import ingest_refcat, load_polygon, load_region

N_SOURCES = 1_000_000
RA, DEC, RADIUS = 150.3, 0.7, 0.3  # a DECam CCD is 0.15 x 0.30 deg; 0.3 deg circumscribes it


def _haversine(ra0, dec0, ra, dec):
    r0, d0, r, d = np.radians(ra0), np.radians(dec0), np.radians(ra), np.radians(dec)
    h = np.sin((d - d0) / 2) ** 2 + np.cos(d0) * np.cos(d) * np.sin((r - r0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


@pytest.fixture(scope="module")
def big_catalogue(tmp_path_factory):
    rng = np.random.default_rng(42)
    n = N_SOURCES
    t = Table({
        "source_id": np.arange(n, dtype=np.int64) * 7 + 11,
        "ra": rng.uniform(140.0, 160.0, n),
        "dec": np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10)), np.sin(np.radians(10)), n))),
        "ra_error": rng.uniform(0.01, 1.0, n), "dec_error": rng.uniform(0.01, 1.0, n),
        "pmra": rng.normal(0, 5, n), "pmdec": rng.normal(0, 5, n), "ref_epoch": np.full(n, 2016.0),
        "phot_g_mean_mag": rng.uniform(12, 21, n), "phot_bp_mean_mag": rng.uniform(12, 21.5, n),
        "phot_rp_mean_mag": rng.uniform(11.5, 20.5, n),
    })
    root = tmp_path_factory.mktemp("refcat_bench")
    path = root / "gaia_1e6.fits"
    t.write(path)
    t0 = time.perf_counter()
    report = ingest_refcat(root / "repo", "gaia", [path])
    ingest_s = time.perf_counter() - t0
    assert report.n_total == n
    return root / "repo", path, ingest_s, report


def _baseline(path):
    data = fits.getdata(path, 1)
    keep = _haversine(RA, DEC, data["ra"], data["dec"]) <= RADIUS
    return data[keep]


@pytest.mark.benchmark(group="refcat-load-0.3deg-of-1e6")
def test_bench_load_region_sharded(benchmark, big_catalogue):
    repo, _, ingest_s, report = big_catalogue
    benchmark.extra_info.update(ingest_s=round(ingest_s, 2), n_shards=len(report.shards_written))
    region = benchmark(load_region, repo, "gaia", ra=RA, dec=DEC, radius=RADIUS)
    assert 500 < len(region) < 1000 and len(region.shards_read) <= 4
    benchmark.extra_info["shards_read"] = len(region.shards_read)


@pytest.mark.benchmark(group="refcat-load-0.3deg-of-1e6")
def test_bench_load_region_baseline_one_fits(benchmark, big_catalogue):
    repo, path, _, _ = big_catalogue
    rows = benchmark(_baseline, path)
    region = load_region(repo, "gaia", ra=RA, dec=DEC, radius=RADIUS)
    assert sorted(rows["source_id"].tolist()) == sorted(region.sources["id"].tolist())


@pytest.mark.benchmark(group="refcat-load-0.3deg-of-1e6")
def test_bench_load_polygon_ccd(benchmark, big_catalogue):
    repo, _, _, _ = big_catalogue
    cos = np.cos(np.radians(DEC))
    ra = RA + np.array([-0.075, 0.075, 0.075, -0.075]) / cos
    dec = DEC + np.array([-0.15, -0.15, 0.15, 0.15])
    region = benchmark(load_polygon, repo, "gaia", corners_ra=ra, corners_dec=dec)
    assert 80 < len(region) < 150  # 0.045 deg^2 x 2500 / deg^2 ~ 112
