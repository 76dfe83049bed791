"""Tests of apfast.repo.refcat: HEALPix-sharded reference catalogues, region and polygon loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy_healpix import HEALPix

from apfast.errors import InputError, RefcatError
from apfast.repo.refcat import (
    apply_proper_motion,
    ingest_refcat,
    list_refcats,
    load_polygon,
    load_region,
    mag_to_njy,
    shards_for_region,
)


def gaia_table(rng, n=6000, ra=(149.0, 151.0), dec=(1.0, 3.0), id0=1):
    """A Gaia-archive-like table (archive column names) uniform over an ra/dec box."""
    sin_lo, sin_hi = np.sin(np.radians(dec))
    return Table({
        "source_id": np.arange(id0, id0 + n, dtype=np.int64) * 1_000_003,
        "ra": rng.uniform(*ra, n) % 360.0,
        "dec": np.degrees(np.arcsin(rng.uniform(sin_lo, sin_hi, n))),
        "ra_error": rng.uniform(0.01, 1.0, n),
        "dec_error": rng.uniform(0.01, 1.0, n),
        "pmra": rng.normal(0.0, 20.0, n),
        "pmdec": rng.normal(0.0, 20.0, n),
        "ref_epoch": np.full(n, 2016.0),
        "phot_g_mean_mag": rng.uniform(12.0, 21.0, n),
        "phot_bp_mean_mag": rng.uniform(12.0, 21.5, n),
        "phot_rp_mean_mag": rng.uniform(11.5, 20.5, n),
    })


def ps1_table(rng, n=5000, ra=(149.0, 151.0), dec=(1.0, 3.0)):
    t = Table({"obj_id": rng.choice(10**17, n, replace=False).astype(np.int64),
               "ra": rng.uniform(*ra, n), "dec": rng.uniform(*dec, n)})
    for b in "griz":
        t[f"{b}_mean_psf_mag"] = rng.uniform(14.0, 22.0, n)
        t[f"{b}_mean_psf_mag_error"] = rng.uniform(0.001, 0.2, n)
    return t


def brute_cone(t, ra, dec, radius):
    sep = SkyCoord(t["ra"], t["dec"], unit="deg").separation(SkyCoord(ra, dec, unit="deg")).deg
    return sep <= radius


def shard_bytes(catdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(catdir.iterdir())}


@pytest.fixture
def gaia_repo(tmp_path, rng):
    t = gaia_table(rng)
    t["pmra"][:50] = np.nan  # sources without a proper motion
    t.write(tmp_path / "gaia.csv")
    repo = tmp_path / "repo"
    report = ingest_refcat(repo, "gaia", [tmp_path / "gaia.csv"])
    return repo, t, report


# ----------------------------------------------------------------------------------------------
# Ingest and loads
# ----------------------------------------------------------------------------------------------

def test_gaia_csv_region_matches_brute_force(gaia_repo):
    repo, t, report = gaia_repo
    assert report.kind == "gaia" and report.n_added == len(t) == report.n_total
    assert list_refcats(repo) == ["gaia"]
    region = load_region(repo, "gaia", ra=150.2, dec=2.1, radius=0.3)
    truth = brute_cone(t, 150.2, 2.1, 0.3)
    assert truth.sum() > 100
    assert sorted(region.sources["id"].tolist()) == sorted(t["source_id"][truth].tolist())
    # Values: converted units and derived fluxes, row by row.
    s = np.sort(region.sources, order="id")
    ref = t[truth]
    ref = ref[np.argsort(ref["source_id"])]
    np.testing.assert_array_equal(s["ra"], ref["ra"])
    np.testing.assert_allclose(s["ra_err"], ref["ra_error"] / 3.6e6, rtol=1e-12)
    np.testing.assert_allclose(s["G_mag"], ref["phot_g_mean_mag"], rtol=0)
    np.testing.assert_allclose(s["G_flux"], 10 ** (-0.4 * (ref["phot_g_mean_mag"] - 31.4)), rtol=1e-12)
    assert np.all(np.isnan(s["G_magErr"]))  # no flux_over_error column in this export
    assert s.dtype.isnative and s.dtype["id"] == np.int64
    assert region.bands == ("G", "BP", "RP") and region.kind == "gaia"


def test_nan_proper_motion_kept(gaia_repo):
    repo, t, _ = gaia_repo
    region = load_region(repo, "gaia", ra=150.0, dec=2.0, radius=2.0)
    nan_ids = set(t["source_id"][:50].tolist())
    got = region.sources[np.isin(region.sources["id"], list(nan_ids))]
    assert len(got) > 0 and np.all(np.isnan(got["pm_ra"])) and np.all(np.isfinite(got["pm_dec"]))


def test_shards_read_are_a_small_sufficient_subset(gaia_repo):
    repo, t, report = gaia_repo
    config = json.loads((repo / "ref_cats/gaia/config.json").read_text())
    all_shards = sorted(int(p) for p in config["shards"])
    assert len(all_shards) >= 4 and all_shards == sorted(report.shards_written)
    region = load_region(repo, "gaia", ra=150.2, dec=2.1, radius=0.3)
    assert list(region.shards_read) == shards_for_region(repo, "gaia", ra=150.2, dec=2.1, radius=0.3)
    assert len(region.shards_read) < len(all_shards)
    # Every shard holding a source of the cone was read.
    hp = HEALPix(nside=config["nside"], order="nested")
    truth = brute_cone(t, 150.2, 2.1, 0.3)
    needed = set(hp.lonlat_to_healpix(t["ra"][truth] * u.deg, t["dec"][truth] * u.deg).tolist())
    assert needed <= set(region.shards_read)


def test_ps1_fits_ingest_and_load(tmp_path, rng):
    t = ps1_table(rng)
    t.write(tmp_path / "ps1.fits")
    report = ingest_refcat(tmp_path / "repo", "ps1", [tmp_path / "ps1.fits"], nside=64)
    assert report.kind == "ps1" and report.nside == 64
    region = load_region(tmp_path / "repo", "ps1", ra=149.6, dec=1.4, radius=0.25)
    truth = brute_cone(t, 149.6, 1.4, 0.25)
    assert sorted(region.sources["id"].tolist()) == sorted(t["obj_id"][truth].tolist())
    s = np.sort(region.sources, order="id")
    ref = t[truth]
    ref = ref[np.argsort(ref["obj_id"])]
    flux, err = mag_to_njy(ref["r_mean_psf_mag"], ref["r_mean_psf_mag_error"])
    np.testing.assert_allclose(s["r_flux"], flux, rtol=1e-12)
    np.testing.assert_allclose(s["r_fluxErr"], err, rtol=1e-12)
    np.testing.assert_allclose(s["z_magErr"], ref["z_mean_psf_mag_error"], rtol=0)
    assert np.all(np.isnan(s["pm_ra"])) and np.all(np.isnan(s["epoch"]))
    assert region.bands == ("g", "r", "i", "z")


def test_polygon_load_matches_gnomonic_brute_force(gaia_repo):
    repo, t, _ = gaia_repo
    # A rotated CCD-like quadrilateral, corners given out of order.
    c_ra, c_dec = 150.4, 1.8
    corners = np.array([[-0.15, -0.08], [0.15, 0.08], [0.14, -0.09], [-0.14, 0.09]])
    cra = c_ra + corners[:, 0] / math.cos(math.radians(c_dec))
    cdec = c_dec + corners[:, 1]
    region = load_polygon(repo, "gaia", corners_ra=cra, corners_dec=cdec)
    # Independent check: great circles are straight lines in the gnomonic projection.
    frame = SkyCoord(c_ra, c_dec, unit="deg").skyoffset_frame()

    def project(ra, dec):
        off = SkyCoord(ra, dec, unit="deg").transform_to(frame)
        lon, lat = off.lon.rad, off.lat.rad
        return np.tan(lon), np.tan(lat) / np.cos(lon)

    px, py = project(t["ra"], t["dec"])
    qx, qy = project(cra, cdec)
    order = np.argsort(np.arctan2(qy, qx))
    qx, qy = qx[order], qy[order]
    cross = [(qx[(i + 1) % 4] - qx[i]) * (py - qy[i]) - (qy[(i + 1) % 4] - qy[i]) * (px - qx[i]) for i in range(4)]
    inside = np.all(np.array(cross) >= 0, axis=0)
    assert inside.sum() > 50
    assert sorted(region.sources["id"].tolist()) == sorted(t["source_id"][inside].tolist())
    # A margin adds exactly the sources near the edges.
    wide = load_polygon(repo, "gaia", corners_ra=cra, corners_dec=cdec, margin=0.05)
    extra = wide.sources[~np.isin(wide.sources["id"], region.sources["id"])]
    assert set(region.sources["id"].tolist()) <= set(wide.sources["id"].tolist()) and len(extra) > 0
    # Dense boundary samples bound each extra source's distance to the polygon.
    edge = []
    for i in range(4):
        a = SkyCoord(cra[order][i], cdec[order][i], unit="deg")
        b = SkyCoord(cra[order][(i + 1) % 4], cdec[order][(i + 1) % 4], unit="deg")
        f = np.linspace(0, 1, 400)[:, None]
        va, vb = a.cartesian.xyz.value, b.cartesian.xyz.value
        edge.append(va * (1 - f) + vb * f)
    e = np.concatenate(edge)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    xs = SkyCoord(extra["ra"], extra["dec"], unit="deg").cartesian.xyz.value.T
    dmin = np.degrees(np.arccos(np.clip(xs @ e.T, -1, 1))).min(axis=1)
    assert np.all(dmin <= 0.05 + 1e-4)


def test_ra_wraparound(tmp_path, rng):
    t = gaia_table(rng, n=4000, ra=(359.0, 361.0), dec=(-1.0, 1.0))
    t.write(tmp_path / "wrap.fits")
    repo = tmp_path / "repo"
    ingest_refcat(repo, "gaia", [tmp_path / "wrap.fits"])
    for ra in (0.05, 359.95, 360.0 - 1e-9):
        region = load_region(repo, "gaia", ra=ra, dec=0.1, radius=0.4)
        truth = brute_cone(t, ra, 0.1, 0.4)
        assert truth.sum() > 100
        assert sorted(region.sources["id"].tolist()) == sorted(t["source_id"][truth].tolist())
        assert np.any(region.sources["ra"] > 359) and np.any(region.sources["ra"] < 1)
    poly = load_polygon(repo, "gaia", corners_ra=[359.9, 0.1, 0.1, 359.9], corners_dec=[-0.1, -0.1, 0.1, 0.1])
    assert np.all((poly.sources["ra"] > 359.89) | (poly.sources["ra"] < 0.11)) and len(poly) > 10


def test_region_around_pole(tmp_path, rng):
    t = gaia_table(rng, n=4000, ra=(0.0, 360.0), dec=(88.0, 90.0))
    t.write(tmp_path / "pole.csv")
    repo = tmp_path / "repo"
    ingest_refcat(repo, "gaia", [tmp_path / "pole.csv"])
    region = load_region(repo, "gaia", ra=200.0, dec=89.7, radius=0.6)
    truth = brute_cone(t, 200.0, 89.7, 0.6)
    assert truth.sum() > 200
    assert sorted(region.sources["id"].tolist()) == sorted(t["source_id"][truth].tolist())
    assert np.ptp(region.sources["ra"]) > 300  # the cone contains the pole: every ra


def test_merge_second_file_and_reingest_is_noop(tmp_path, rng):
    a = gaia_table(rng, n=3000, ra=(149.0, 150.0), id0=1)
    b = gaia_table(rng, n=3000, ra=(150.0, 151.0), id0=10_000)
    a.write(tmp_path / "a.csv")
    b.write(tmp_path / "b.fits")
    repo = tmp_path / "repo"
    ingest_refcat(repo, "gaia", [tmp_path / "a.csv"])
    calls = []
    report = ingest_refcat(repo, "gaia", [tmp_path / "b.fits"], progress=lambda *a: calls.append(a))
    n_written = len(report.shards_written)
    assert calls[0] == (f"read {tmp_path / 'b.fits'} (1/1): 3000 sources",)
    assert calls[-1] == (f"wrote shard {report.shards_written[-1]} ({n_written}/{n_written})",)
    assert report.n_added == 3000 and report.n_total == 6000
    region = load_region(repo, "gaia", ra=150.0, dec=2.0, radius=0.5)
    both = Table(np.concatenate([a.as_array(), b.as_array()]))
    truth = brute_cone(both, 150.0, 2.0, 0.5)
    assert sorted(region.sources["id"].tolist()) == sorted(both["source_id"][truth].tolist())
    before = shard_bytes(repo / "ref_cats/gaia")
    again = ingest_refcat(repo, "gaia", [tmp_path / "a.csv", tmp_path / "b.fits"])
    assert again.n_added == 0 and len(again.files_skipped) == 2 and again.n_total == 6000
    assert shard_bytes(repo / "ref_cats/gaia") == before
    config = json.loads((repo / "ref_cats/gaia/config.json").read_text())
    assert [f["n_sources"] for f in config["files"]] == [3000, 3000] and config["n_sources"] == 6000


def test_column_map_override_and_generic_kind(tmp_path, rng):
    t = gaia_table(rng, n=2000)
    t.rename_columns(["source_id", "ra", "dec", "phot_g_mean_mag"], ["SOURCE", "RA_ICRS", "DE_ICRS", "Gmag"])
    t.write(tmp_path / "vizier.csv")
    repo = tmp_path / "repo"
    cmap = {"id": "SOURCE", "ra": "RA_ICRS", "dec": "DE_ICRS", "G_mag": "Gmag", "BP_mag": ""}
    ingest_refcat(repo, "gaia", [tmp_path / "vizier.csv"], kind="gaia", column_map=cmap)
    region = load_region(repo, "gaia", ra=150.0, dec=2.0, radius=0.4)
    truth = brute_cone(Table({"ra": t["RA_ICRS"], "dec": t["DE_ICRS"]}), 150.0, 2.0, 0.4)
    assert sorted(region.sources["id"].tolist()) == sorted(t["SOURCE"][truth].tolist())
    assert np.all(np.isnan(region.sources["BP_mag"])) and np.all(np.isfinite(region.sources["G_mag"]))
    # Upper-case archive names (as some FITS exports have) are matched case-insensitively.
    up = gaia_table(rng, n=300, id0=70_000)
    up.rename_columns(up.colnames, [c.upper() for c in up.colnames])
    up.write(tmp_path / "upper.fits")
    assert ingest_refcat(repo, "upper", [tmp_path / "upper.fits"]).kind == "gaia"
    # Generic: bands come from the map; errors are already in degrees.
    g = Table({"ID": np.arange(500), "RA": rng.uniform(10, 11, 500), "DEC": rng.uniform(-5, -4, 500),
               "V": rng.uniform(12, 18, 500), "eV": np.full(500, 0.02), "e_ra": np.full(500, 1e-5)})
    g.write(tmp_path / "generic.csv")
    ingest_refcat(repo, "mine", [tmp_path / "generic.csv"], kind="generic",
                  column_map={"id": "ID", "ra": "RA", "dec": "DEC", "V_mag": "V", "V_magErr": "eV", "ra_err": "e_ra"})
    mine = load_region(repo, "mine", ra=10.5, dec=-4.5, radius=1.0)
    assert len(mine) == 500 and mine.bands == ("V",)
    np.testing.assert_allclose(mine.sources["ra_err"], 1e-5)
    np.testing.assert_allclose(mine.sources["V_fluxErr"], mine.sources["V_flux"] * 0.02 * math.log(10) / 2.5)


def test_csv_empty_fields_become_nan(tmp_path):
    text = ("source_id,ra,dec,ra_error,dec_error,pmra,pmdec,ref_epoch,phot_g_mean_mag,phot_bp_mean_mag,"
            "phot_rp_mean_mag\n1,10.0,20.0,0.1,0.1,,,2016.0,15.0,,14.0\n2,10.01,20.0,0.1,0.1,1.0,2.0,2016.0,16.0,16.5,15.5\n")
    (tmp_path / "g.csv").write_text(text)
    ingest_refcat(tmp_path / "repo", "g", [tmp_path / "g.csv"])
    s = np.sort(load_region(tmp_path / "repo", "g", ra=10.0, dec=20.0, radius=0.1).sources, order="id")
    assert np.isnan(s["pm_ra"][0]) and np.isnan(s["BP_mag"][0]) and s["pm_dec"][1] == 2.0
    assert np.isnan(s["BP_flux"][0]) and s["RP_mag"][0] == 14.0


# ----------------------------------------------------------------------------------------------
# Proper motion
# ----------------------------------------------------------------------------------------------

def test_proper_motion_matches_formula_and_handles_nan(rng):
    n = 200
    cat = {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-60, 60, n), "pm_ra": rng.normal(0, 100, n),
           "pm_dec": rng.normal(0, 100, n), "epoch": np.full(n, 2016.0)}
    cat["pm_ra"][:5] = np.nan
    cat["epoch"][5:10] = np.nan
    ra, dec = apply_proper_motion(cat, 2019.5)
    dt = 3.5
    exp_ra = cat["ra"] + cat["pm_ra"] * dt / 3.6e6 / np.cos(np.radians(cat["dec"]))
    exp_dec = cat["dec"] + cat["pm_dec"] * dt / 3.6e6
    # The formula is first order: for a move theta <~ 2 arcsec (1e-5 rad) the on-sky difference is
    # ~theta**2 * tan(dec) < 2e-10 rad = 4e-5 arcsec at |dec| <= 60.
    on_sky_dra = (((ra - exp_ra) + 180) % 360 - 180) * np.cos(np.radians(cat["dec"]))
    np.testing.assert_allclose(on_sky_dra[10:] * 3600, 0, atol=1e-4)
    np.testing.assert_allclose((dec - exp_dec)[10:] * 3600, 0, atol=1e-4)
    assert np.max(np.abs(exp_dec - cat["dec"])[10:]) * 3600 > 0.5  # the motion itself is well above that
    np.testing.assert_array_equal(ra[:10], cat["ra"][:10])
    np.testing.assert_array_equal(dec[:10], cat["dec"][:10])
    assert cat["ra"].shape == (n,) and np.isnan(cat["pm_ra"][0])  # input untouched


def test_proper_motion_near_pole_moves_by_the_right_angle():
    cat = {"ra": np.array([45.0]), "dec": np.array([89.99999]), "pm_ra": np.array([3000.0]),
           "pm_dec": np.array([4000.0]), "epoch": np.array([2000.0])}
    ra, dec = apply_proper_motion(cat, 2010.0)
    sep = SkyCoord(45.0, 89.99999, unit="deg").separation(SkyCoord(ra[0], dec[0], unit="deg")).arcsec
    assert np.isfinite(ra[0]) and abs(sep - 50.0) < 1e-6  # |pm| = 5000 mas/yr over 10 yr


def test_proper_motion_on_loaded_region(gaia_repo):
    repo, _, _ = gaia_repo
    region = load_region(repo, "gaia", ra=150.0, dec=2.0, radius=0.2)
    ra, dec = apply_proper_motion(region, 2016.0)
    np.testing.assert_allclose(ra, region.sources["ra"], atol=1e-12)
    ra, dec = apply_proper_motion(region, 2026.0)
    moved = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(region.sources["ra"], region.sources["dec"],
                                                              unit="deg")).to_value(u.mas)
    total = np.hypot(region.sources["pm_ra"], region.sources["pm_dec"]) * 10
    ok = np.isfinite(total)
    np.testing.assert_allclose(moved[ok], total[ok], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def test_missing_column_error_names_file_column_and_fix(tmp_path, rng):
    t = gaia_table(rng, n=100)
    t.remove_column("pmdec")
    t.write(tmp_path / "nopm.csv")
    with pytest.raises(RefcatError) as err:
        ingest_refcat(tmp_path / "repo", "gaia", [tmp_path / "nopm.csv"])
    msg = str(err.value)
    assert "nopm.csv" in msg and "'pmdec'" in msg and "pm_dec" in msg and "--column-map" in msg
    assert "phot_g_mean_mag" in msg  # the columns found
    assert not (tmp_path / "repo" / "ref_cats" / "gaia").exists()


def test_bad_coordinates_error_names_file_and_count(tmp_path, rng):
    t = gaia_table(rng, n=100)
    t["ra"][3] = np.nan
    t["dec"][7] = 95.0
    t.write(tmp_path / "bad.fits")
    with pytest.raises(RefcatError, match=r"bad\.fits: 2 of 100 rows .* first bad data rows \[4, 8\]"):
        ingest_refcat(tmp_path / "repo", "gaia", [tmp_path / "bad.fits"])


def test_unknown_kind_and_unknown_map_key(tmp_path, rng):
    Table({"x": [1.0], "y": [2.0]}).write(tmp_path / "xy.csv")
    with pytest.raises(RefcatError, match=r"xy\.csv: cannot tell the catalogue kind.*--kind.*--column-map"):
        ingest_refcat(tmp_path / "repo", "c", [tmp_path / "xy.csv"])
    gaia_table(rng, n=10).write(tmp_path / "g.csv")
    with pytest.raises(InputError, match=r"'G_flux' is not a standard column"):
        ingest_refcat(tmp_path / "repo", "c", [tmp_path / "g.csv"], column_map={"G_flux": "x"})
    with pytest.raises(InputError, match="nside=48 is not a power of two"):
        ingest_refcat(tmp_path / "repo", "c", [tmp_path / "g.csv"], nside=48)
    with pytest.raises(RefcatError, match="does not exist"):
        ingest_refcat(tmp_path / "repo", "c", [tmp_path / "nope.csv"])
    gaia_table(rng, n=10)[:0].write(tmp_path / "empty.fits")
    with pytest.raises(RefcatError, match=r"empty\.fits: the table has no rows"):
        ingest_refcat(tmp_path / "repo", "c", [tmp_path / "empty.fits"])
    (tmp_path / "junk.csv").write_bytes(b"\x00\x01garbage\n1,2\n3\n")
    with pytest.raises(RefcatError, match=r"junk\.csv: cannot read"):
        ingest_refcat(tmp_path / "repo", "c", [tmp_path / "junk.csv"])
    assert list_refcats(tmp_path / "repo") == []


def test_missing_catalogue_lists_present(gaia_repo):
    repo, _, _ = gaia_repo
    with pytest.raises(RefcatError, match=r"no reference catalogue 'ps1'.*\['gaia'\].*ingest-refcat"):
        load_region(repo, "ps1", ra=150.0, dec=2.0, radius=0.1)


def test_region_without_shards_or_sources(gaia_repo):
    repo, t, _ = gaia_repo
    with pytest.raises(RefcatError, match=r"'gaia' has no shards overlapping the cone ra=10\.0+ .*ingest"):
        load_region(repo, "gaia", ra=10.0, dec=-40.0, radius=0.3)
    assert shards_for_region(repo, "gaia", ra=10.0, dec=-40.0, radius=0.3) == []
    # A tiny cone inside the covered patch, away from every source.
    sep = SkyCoord(t["ra"], t["dec"], unit="deg").separation(SkyCoord(150.0, 2.0, unit="deg")).deg
    radius = 0.5 * sep.min()
    with pytest.raises(RefcatError, match=r"has no sources in the cone .*shards read: \[\d+"):
        load_region(repo, "gaia", ra=150.0, dec=2.0, radius=radius)
    with pytest.raises(InputError, match="radius=-1"):
        load_region(repo, "gaia", ra=150.0, dec=2.0, radius=-1)
    with pytest.raises(InputError, match=">= 3 finite corners"):
        load_polygon(repo, "gaia", corners_ra=[150.0, 150.1], corners_dec=[2.0, 2.0])
    # A dart (concave quadrilateral), even where the catalogue has no shards.
    with pytest.raises(InputError, match="not convex"):
        load_polygon(repo, "gaia", corners_ra=[10.0, 10.2, 10.1, 10.1], corners_dec=[0.0, 0.0, 0.05, 0.3])


def test_failed_ingest_leaves_catalogue_unchanged(gaia_repo, tmp_path, rng):
    repo, t, _ = gaia_repo
    catdir = repo / "ref_cats" / "gaia"
    before = shard_bytes(catdir)
    good = gaia_table(rng, n=500, id0=50_000)
    good.write(tmp_path / "good.csv")
    bad = gaia_table(rng, n=500, id0=60_000)
    bad["dec"][0] = np.inf
    bad.write(tmp_path / "bad.csv")
    with pytest.raises(RefcatError, match=r"bad\.csv: 1 of 500 rows"):
        ingest_refcat(repo, "gaia", [tmp_path / "good.csv", tmp_path / "bad.csv"])
    assert shard_bytes(catdir) == before
    # Ids already stored (from another file): detected under the lock, nothing written.
    clash = gaia_table(rng, n=300, id0=1)
    clash.write(tmp_path / "clash.fits")
    with pytest.raises(RefcatError, match=r"300 source ids of the input are already in catalogue 'gaia'"):
        ingest_refcat(repo, "gaia", [tmp_path / "clash.fits"])
    assert shard_bytes(catdir) == before  # no temp or lock files left either
    good.write(tmp_path / "good.fits")  # same sources, different bytes
    with pytest.raises(RefcatError, match=r"appear in more than one of the input files"):
        ingest_refcat(repo, "gaia", [tmp_path / "good.csv", tmp_path / "good.fits"])
    with pytest.raises(RefcatError, match="has nside=32 but nside=64"):
        ingest_refcat(repo, "gaia", [tmp_path / "good.csv"], nside=64)
    ps1_table(rng, n=20).write(tmp_path / "ps1.csv")
    with pytest.raises(RefcatError, match=r"ps1 catalogue with bands .* cannot merge into 'gaia'"):
        ingest_refcat(repo, "gaia", [tmp_path / "ps1.csv"], kind="ps1")
    assert shard_bytes(catdir) == before
    # The good file still goes in afterwards.
    assert ingest_refcat(repo, "gaia", [tmp_path / "good.csv"]).n_total == len(t) + 500


def test_stale_lock_is_reported(gaia_repo, tmp_path, rng):
    repo, _, _ = gaia_repo
    (repo / "ref_cats/gaia/ingest.lock").touch()
    gaia_table(rng, n=10, id0=90_000).write(tmp_path / "more.csv")
    with pytest.raises(RefcatError, match=r"ingest\.lock exists.*delete it"):
        ingest_refcat(repo, "gaia", [tmp_path / "more.csv"])


def test_shard_selection_never_misses_over_the_sky(tmp_path, rng):
    # Full-sky catalogue; random cones of many sizes, including near poles and ra = 0.
    n = 30000
    t = Table({"id": np.arange(n), "ra": rng.uniform(0, 360, n),
               "dec": np.degrees(np.arcsin(rng.uniform(-1, 1, n)))})
    t.write(tmp_path / "sky.fits")
    ingest_refcat(tmp_path / "repo", "sky", [tmp_path / "sky.fits"], nside=16)
    hp = HEALPix(nside=16, order="nested")
    pix = hp.lonlat_to_healpix(t["ra"] * u.deg, t["dec"] * u.deg)
    xyz = SkyCoord(t["ra"], t["dec"], unit="deg").cartesian.xyz.value.T
    n_read = []
    for ra, dec, radius in zip(rng.uniform(0, 360, 150), rng.uniform(-90, 90, 150),
                               10 ** rng.uniform(-1.5, 1, 150), strict=True):
        c = SkyCoord(ra, dec, unit="deg").cartesian.xyz.value
        inside = np.degrees(np.arccos(np.clip(xyz @ c, -1, 1))) <= radius
        got = shards_for_region(tmp_path / "repo", "sky", ra=ra, dec=dec, radius=radius)
        assert set(pix[inside].tolist()) <= set(got)
        n_read.append(len(got))
    assert np.median(n_read) < 12  # out of 3072 shards


def test_shard_files_are_valid_fits_readable_by_astropy(gaia_repo):
    repo, t, _ = gaia_repo
    catdir = repo / "ref_cats" / "gaia"
    config = json.loads((catdir / "config.json").read_text())
    total = 0
    for pix, info in config["shards"].items():
        with fits.open(catdir / f"{pix}.fits") as hdul:
            hdul.verify("exception")
            data, header = hdul[1].data, hdul[1].header
            assert header["HPXPIX"] == int(pix) and header["HPXNSIDE"] == 32 and header["HPXORDER"] == "NESTED"
            assert len(data) == info["n"] and header["TUNIT2"] == "deg"
            hp = HEALPix(nside=32, order="nested")
            assert np.all(hp.lonlat_to_healpix(data["ra"] * u.deg, data["dec"] * u.deg) == int(pix))
            total += len(data)
            # The fast reader agrees with astropy on every column.
            region_rows = load_region(repo, "gaia", ra=float(data["ra"][0]), dec=float(data["dec"][0]),
                                      radius=1e-7).sources
            assert region_rows["id"][0] == data["id"][0]
            for name in data.columns.names:
                np.testing.assert_array_equal(region_rows[name][0], data[name][0])
    assert total == len(t) == config["n_sources"]
    assert [c["name"] for c in config["columns"]][:8] == ["id", "ra", "dec", "ra_err", "dec_err", "pm_ra",
                                                          "pm_dec", "epoch"]
