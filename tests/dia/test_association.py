"""Tests of apfast.dia.association: ids, one-to-one matching, associate() and DiaObject statistics.

Every vectorised result is checked against a slow, obviously-correct per-pair or
per-object Python reference written here (haversine distances, planar means around
the first source, explicit loops).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apfast.dia.association import (
    BANDS,
    DIA_OBJECT_COLUMNS,
    AssociationConfig,
    associate,
    compute_object_versions,
    dia_forced_source_ids,
    dia_object_band_columns,
    dia_source_ids,
    match_sources,
)
from apfast.errors import ApfastError, ConfigError, InputError

ARCSEC = 1.0 / 3600.0
SCHEMA_SQL = Path(__file__).resolve().parents[1] / "data" / "rubin_apdb_schema_sqlite.sql"


# ------------------------------------------------------------------------------- naive references


def _haversine_arcsec(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def naive_match(sra, sdec, ora, odec, radius):
    """All pairs by brute force, then a plain greedy loop: nearest first, ties by (source, object)."""
    pairs = []
    ora, odec = np.asarray(ora, float), np.asarray(odec, float)
    for i in range(len(sra)):
        d_row = _haversine_arcsec(sra[i], sdec[i], ora, odec)  # this source to every object
        pairs += [(float(d_row[j]), i, int(j)) for j in np.flatnonzero(np.isfinite(d_row) & (d_row <= radius))]
    pairs.sort()
    used_s, used_o, out = set(), set(), {}
    for d, i, j in pairs:
        if i not in used_s and j not in used_o:
            used_s.add(i)
            used_o.add(j)
            out[i] = (j, d)
    return out


def _wmean(v, e):
    ok = np.isfinite(v) & np.isfinite(e) & (e > 0)
    if not ok.any():
        return np.nan, np.nan, 0
    w = 1 / e[ok] ** 2
    return float(np.sum(w * v[ok]) / np.sum(w)), float(np.sqrt(1 / np.sum(w))), int(ok.sum())


def naive_object(rows, band):
    """One object's statistics from its history rows (a dict of arrays), written the slow way."""
    ra, dec = rows["ra"], rows["dec"]
    out = {}
    ra0 = ra[0]
    dra = (ra - ra0 + 180.0) % 360.0 - 180.0
    for name, off, err in (("ra", dra, rows["raErr"]), ("dec", dec, rows["decErr"])):
        good = np.all(np.isfinite(err) & (err > 0))
        w = 1 / err**2 if good else np.ones(len(off))
        out[name] = float(np.sum(w * off) / np.sum(w))
        out[name + "Err"] = float(np.sqrt(1 / np.sum(w))) if good else np.nan
        out["_w" + name] = w if good else None
    out["ra"] = (ra0 + out["ra"]) % 360.0
    cov = rows["ra_dec_Cov"]
    if out["_wra"] is not None and out["_wdec"] is not None and np.all(np.isfinite(cov)):
        out["ra_dec_Cov"] = float(np.sum(out["_wra"] * out["_wdec"] * cov) / (np.sum(out["_wra"]) *
                                                                              np.sum(out["_wdec"])))
    else:
        out["ra_dec_Cov"] = np.nan
    del out["_wra"], out["_wdec"]
    out["nDiaSources"] = len(ra)
    out["firstDiaSourceMjdTai"] = float(np.min(rows["midpointMjdTai"]))
    out["lastDiaSourceMjdTai"] = float(np.max(rows["midpointMjdTai"]))
    sel = np.array([b == band for b in rows["band"]], dtype=bool)
    f, e, t = rows["psfFlux"][sel], rows["psfFluxErr"][sel], rows["midpointMjdTai"][sel]
    b = band
    out[f"{b}_psfFluxMean"], out[f"{b}_psfFluxMeanErr"], out[f"{b}_psfFluxNdata"] = _wmean(f, e)
    fin = f[np.isfinite(f)]
    out[f"{b}_psfFluxSigma"] = float(np.std(fin, ddof=1)) if len(fin) > 1 else np.nan
    out[f"{b}_psfFluxMin"] = float(np.min(fin)) if len(fin) else np.nan
    out[f"{b}_psfFluxMax"] = float(np.max(fin)) if len(fin) else np.nan
    ef = e[np.isfinite(e)]
    out[f"{b}_psfFluxErrMean"] = float(np.mean(ef)) if len(ef) else np.nan
    pts = sorted((float(tt), float(ff)) for tt, ff in zip(t, f, strict=True) if np.isfinite(ff) and np.isfinite(tt))
    slopes = [abs(f2 - f1) / (t2 - t1) for (t1, f1), (t2, f2) in itertools.pairwise(pts) if t2 > t1]
    out[f"{b}_psfFluxMaxSlope"] = max(slopes) if slopes else np.nan
    sf, se, _ = _wmean(rows["scienceFlux"][sel], rows["scienceFluxErr"][sel])
    out[f"{b}_scienceFluxMean"], out[f"{b}_scienceFluxMeanErr"] = sf, se
    return out


# ------------------------------------------------------------------------------------ config, ids


def test_config_defaults_and_validation():
    cfg = AssociationConfig()
    assert cfg.max_dist_arcsec == 1.0 and cfg.pixel_margin == 300
    with pytest.raises(ConfigError, match="max_dist_arcsec"):
        AssociationConfig(max_dist_arcsec=0.0)
    with pytest.raises(ConfigError, match="max_dist_arcsec"):
        AssociationConfig(max_dist_arcsec=float("nan"))
    with pytest.raises(ConfigError, match="pixel_margin"):
        AssociationConfig(pixel_margin=-1)


def test_dia_source_ids_layout_and_uniqueness():
    ids = dia_source_ids(289400, 35, 5)
    assert ids.dtype == np.int64
    assert np.all(ids >> 20 == 289400 * 100 + 35)
    assert (ids & (2**20 - 1)).tolist() == [0, 1, 2, 3, 4]
    other = np.concatenate([dia_source_ids(289400, 36, 5), dia_source_ids(289401, 35, 5)])
    assert not np.intersect1d(ids, other).size
    assert np.array_equal(dia_forced_source_ids(289400, 35, 5), ids)
    full = dia_source_ids(1, 1, 2**20)  # the largest catalogue that fits
    assert full[-1] == (101 << 20) + 2**20 - 1
    assert dia_source_ids(3, 4, 0).shape == (0,)


@pytest.mark.parametrize(("visit", "detector", "n", "match"), [
    (1, 1, 2**20 + 1, "20-bit row field"),
    (1, 100, 1, "detector 100"),
    (-1, 1, 1, "visit -1"),
    (2**60, 1, 1, "64-bit"),
])
def test_dia_source_ids_rejects_what_does_not_fit(visit, detector, n, match):
    with pytest.raises(ApfastError, match=match):
        dia_source_ids(visit, detector, n)
    with pytest.raises(ApfastError, match=match):
        dia_forced_source_ids(visit, detector, n)


def test_dia_object_columns_are_the_apdb_schema_minus_pixel_id():
    text = SCHEMA_SQL.read_text()
    block = text[text.index('CREATE TABLE IF NOT EXISTS "DiaObject"'):]
    block = block[:block.index("PRIMARY KEY")]
    names = re.findall(r'^\s+"?([A-Za-z_]+)"? [A-Z]+', block, flags=re.MULTILINE)
    assert list(DIA_OBJECT_COLUMNS) == [n for n in names if n != "pixelId"]
    assert len(DIA_OBJECT_COLUMNS) == 83


# -------------------------------------------------------------------------------------- matching


def _field(rng, n_src, n_obj, ra_c, dec_c, half_arcsec):
    """Random sources and objects in a small box (dense enough for conflicts at 1")."""
    cosd = max(math.cos(math.radians(dec_c)), 1e-3)
    def pts(n):
        dec = dec_c + rng.uniform(-1, 1, n) * half_arcsec * ARCSEC
        ra = (ra_c + rng.uniform(-1, 1, n) * half_arcsec * ARCSEC / cosd) % 360.0
        return ra, np.clip(dec, -90, 90)
    return (*pts(n_src), *pts(n_obj))


@pytest.mark.parametrize(("ra_c", "dec_c", "half"), [
    (150.0, 2.0, 8.0),      # ordinary field
    (0.0, -30.0, 8.0),      # straddles ra = 0/360
    (359.9999, 45.0, 6.0),  # straddles the wrap at a higher dec
    (40.0, 89.9995, 5.0),   # 1.8" from the north pole: ra spans many degrees
    (200.0, -89.9998, 4.0), # south pole
])
def test_match_sources_equals_brute_force(rng, ra_c, dec_c, half):
    for _ in range(3):
        sra, sdec, ora, odec = _field(rng, 80, 120, ra_c, dec_c, half)
        sra[::17] = np.nan  # NaN positions never match
        odec[::23] = np.nan
        s, o, d = match_sources(sra, sdec, ora, odec, max_dist_arcsec=1.0)
        ref = naive_match(sra, sdec, ora, odec, 1.0)
        assert len(ref) > 20  # the field is dense enough to test conflicts
        assert s.tolist() == sorted(ref)
        assert o.tolist() == [ref[i][0] for i in sorted(ref)]
        np.testing.assert_allclose(d, [ref[i][1] for i in sorted(ref)], rtol=1e-7, atol=1e-9)
        assert len(set(o.tolist())) == len(o)  # one-to-one
        assert np.all(d <= 1.0)
        assert not np.isnan(sra[s]).any() and not np.isnan(odec[o]).any()


def test_match_sources_wide_field_and_radius(rng):
    """Spread sources over a CCD-sized region with many objects; a larger radius too."""
    n_obj = 3000
    ora = rng.uniform(10.0, 10.2, n_obj)
    odec = rng.uniform(-0.1, 0.1, n_obj)
    pick = rng.choice(n_obj, 150, replace=False)
    sra = ora[pick] + rng.normal(0, 0.5, 150) * ARCSEC
    sdec = odec[pick] + rng.normal(0, 0.5, 150) * ARCSEC
    for radius in (1.0, 20.0):
        s, o, _d = match_sources(sra, sdec, ora, odec, max_dist_arcsec=radius)
        ref = naive_match(sra, sdec, ora, odec, radius)
        assert s.tolist() == sorted(ref) and o.tolist() == [ref[i][0] for i in sorted(ref)]
    s1, o1, _ = match_sources(sra, sdec, ora, odec, max_dist_arcsec=1.0)
    assert np.mean(o1 == pick[s1]) > 0.9  # most sources find the object they were drawn from


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3)), min_size=0, max_size=12),
       st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3)), min_size=0, max_size=12),
       st.floats(0.2, 2.5))
def test_match_sources_property(src, obj, radius):
    """Small arbitrary configurations around (359.9995, 10): same answer as the brute force."""
    def conv(p):
        a = np.array(p, dtype=float).reshape(-1, 2)
        return (359.9995 + a[:, 0] * ARCSEC) % 360.0, 10.0 + a[:, 1] * ARCSEC
    sra, sdec = conv(src)
    ora, odec = conv(obj)
    s, o, _d = match_sources(sra, sdec, ora, odec, max_dist_arcsec=radius)
    ref = naive_match(sra, sdec, ora, odec, radius)
    # rounding may order near-equal distances, or one at the radius, differently: skip such draws
    all_d = np.array([_haversine_arcsec(sra[i], sdec[i], ora[j], odec[j])
                      for i in range(len(sra)) for j in range(len(ora))])
    if np.any(np.abs(all_d - radius) < 1e-6):
        return
    cand = np.unique(all_d[all_d <= radius])  # exact duplicates (identical points) tie-break alike
    if len(cand) > 1 and np.min(np.diff(cand)) < 1e-9:
        return
    assert s.tolist() == sorted(ref)
    assert o.tolist() == [ref[i][0] for i in sorted(ref)]


def test_match_sources_edge_cases():
    e = match_sources([], [], [1.0], [1.0], max_dist_arcsec=1.0)
    assert all(len(a) == 0 for a in e) and e[0].dtype == np.int64
    e = match_sources([1.0], [1.0], [], [], max_dist_arcsec=1.0)
    assert all(len(a) == 0 for a in e)
    e = match_sources([np.nan], [1.0], [np.nan], [1.0], max_dist_arcsec=1.0)
    assert all(len(a) == 0 for a in e)
    # exactly on top of each other
    s, o, d = match_sources([5.0], [5.0], [5.0], [5.0], max_dist_arcsec=1.0)
    assert s.tolist() == [0] and o.tolist() == [0] and d[0] == 0.0
    with pytest.raises(InputError, match="lengths differ"):
        match_sources([1.0, 2.0], [1.0], [1.0], [1.0], max_dist_arcsec=1.0)
    with pytest.raises(InputError, match="max_dist_arcsec"):
        match_sources([1.0], [1.0], [1.0], [1.0], max_dist_arcsec=-1.0)
    with pytest.raises(InputError, match="1-D"):
        match_sources(np.zeros((2, 2)), np.zeros((2, 2)), [1.0], [1.0], max_dist_arcsec=1.0)


# ------------------------------------------------------------------------------------- associate


def _sources(visit, detector, ra, dec, **extra):
    n = len(ra)
    cols = {"diaSourceId": dia_source_ids(visit, detector, n), "visit": np.full(n, visit),
            "detector": np.full(n, detector), "ra": np.asarray(ra, float), "dec": np.asarray(dec, float)}
    cols.update(extra)
    return cols


def test_two_sources_near_one_object_nearer_wins():
    obj = {"diaObjectId": np.array([777, 888]), "ra": np.array([30.0, 31.0]), "dec": np.array([-5.0, -5.0])}
    src = _sources(400, 12, [30.0 + 0.8 * ARCSEC / math.cos(math.radians(5)), 30.0],
                   [-5.0, -5.0 + 0.3 * ARCSEC])
    before = {k: v.copy() for k, v in src.items()}
    res = associate(src, obj, visit=400, detector=12, max_dist_arcsec=1.0)
    ids = src["diaSourceId"]
    assert res.sources["diaObjectId"].tolist() == [int(ids[0]), 777]
    assert res.matched_object_ids.tolist() == [777]
    assert res.new_object_ids.tolist() == [int(ids[0])]
    assert (res.n_matched, res.n_new, res.n_dropped) == (1, 1, 0)
    np.testing.assert_allclose(res.distance_arcsec, [np.nan, 0.3], rtol=1e-6)
    assert all(np.array_equal(before[k], src[k]) for k in before) and "diaObjectId" not in src  # not mutated


def test_associate_drops_nan_positions_and_reports_them(caplog):
    src = _sources(5, 7, [10.0, np.nan, 10.1, 10.2], [1.0, 1.0, np.nan, 1.0], psfFlux=np.arange(4.0))
    res = associate(src, None, visit=5, detector=7, max_dist_arcsec=1.0)
    ids = src["diaSourceId"]
    assert res.dropped_source_ids.tolist() == [int(ids[1]), int(ids[2])] and res.n_dropped == 2
    assert res.sources["psfFlux"].tolist() == [0.0, 3.0]
    assert res.sources["diaObjectId"].tolist() == [int(ids[0]), int(ids[3])]
    assert res.n_new == 2 and res.n_matched == 0
    assert "dropped 2 of 4" in caplog.text
    assert associate(src, {}, visit=5, detector=7, max_dist_arcsec=1.0).n_new == 2


def test_associate_rejects_wiring_errors():
    src = _sources(5, 7, [10.0], [1.0])
    with pytest.raises(InputError, match="dia_source_ids"):
        associate(src, None, visit=5, detector=8, max_dist_arcsec=1.0)
    bad = dict(src, visit=np.array([6]))
    bad["diaSourceId"] = dia_source_ids(5, 7, 1)
    with pytest.raises(InputError, match="column 'visit'"):
        associate(bad, None, visit=5, detector=7, max_dist_arcsec=1.0)
    with pytest.raises(InputError, match="lacks the column"):
        associate({"ra": np.zeros(1), "dec": np.zeros(1)}, None, visit=5, detector=7, max_dist_arcsec=1.0)
    # two versions of one object, each matching a source: the caller passed closed versions too
    dup = {"diaObjectId": np.array([1, 1]), "ra": np.array([10.0, 10.01]), "dec": np.array([1.0, 1.0])}
    two = _sources(5, 7, [10.0, 10.01], [1.0, 1.0])
    with pytest.raises(InputError, match="current version"):
        associate(two, dup, visit=5, detector=7, max_dist_arcsec=1.0)
    with pytest.raises(InputError, match="different lengths"):
        associate(dict(src, ra=np.zeros(2)), None, visit=5, detector=7, max_dist_arcsec=1.0)


# ----------------------------------------------------------------------------- object statistics


def _random_history(rng, n_obj=80):
    ids = rng.choice(np.arange(10**6, 10**7), n_obj, replace=False).astype(np.int64) << 20
    parts = []
    for k, oid in enumerate(ids):
        n = 1 if k % 7 == 0 else int(rng.integers(2, 9))
        ra0 = 359.9999 if k == 3 else rng.uniform(0, 360)  # object 3 straddles ra = 0
        dec0 = rng.uniform(-60, 60)
        cosd = math.cos(math.radians(dec0))
        ra = (ra0 + rng.normal(0, 0.3, n) * ARCSEC / cosd) % 360.0
        dec = dec0 + rng.normal(0, 0.3, n) * ARCSEC
        ra_err = rng.uniform(0.02, 0.2, n) * ARCSEC
        dec_err = rng.uniform(0.02, 0.2, n) * ARCSEC
        if k % 5 == 1:
            ra_err[0] = np.nan  # -> unweighted in ra for this object
        if k % 6 == 2:
            dec_err[-1] = 0.0
        cov = rng.uniform(-0.5, 0.5, n) * ra_err * dec_err
        if k % 4 == 3:
            cov[0] = np.nan
        band = rng.choice(np.array(["g", "r", "i"], dtype=object), n)
        if k == 10:
            band[:] = "r"  # no g data at all
        t = np.sort(rng.uniform(60000, 60100, n))
        if k % 9 == 4 and n > 2:
            t[1] = t[2]  # two points at the same time: that pair has no slope
        flux = rng.normal(2000, 500, n)
        err = rng.uniform(20, 200, n)
        flux[rng.random(n) < 0.08] = np.nan
        err[rng.random(n) < 0.08] = np.nan
        err[rng.random(n) < 0.05] = 0.0  # zero errors are unusable for weights
        sflux = rng.normal(5000, 300, n)
        serr = rng.uniform(20, 200, n)
        serr[rng.random(n) < 0.1] = np.nan
        parts.append({"diaObjectId": np.full(n, oid), "ra": ra, "dec": dec, "raErr": ra_err, "decErr": dec_err,
                      "ra_dec_Cov": cov, "band": band, "midpointMjdTai": t, "psfFlux": flux, "psfFluxErr": err,
                      "scienceFlux": sflux, "scienceFluxErr": serr})
    hist = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    perm = rng.permutation(len(hist["ra"]))  # history rows come in any order
    return ids, {k: v[perm] for k, v in hist.items()}


def _prior(rng, ids):
    """A previous version for every other object, with random values in every band column."""
    keep = ids[::2]
    cols = {"diaObjectId": keep, "validityStartMjdTai": np.full(len(keep), 59000.0)}
    for b in BANDS:
        for c in dia_object_band_columns(b):
            cols[c] = (rng.integers(0, 50, len(keep)) if c.endswith("Ndata") else rng.normal(0, 100, len(keep)))
    return cols


def _check_against_naive(out, ids, hist, band, prior=None):
    ref_rows = []
    for oid in ids:
        sel = hist["diaObjectId"] == oid
        ref_rows.append(naive_object({k: v[sel] for k, v in hist.items()}, band))
    assert out["diaObjectId"].tolist() == ids.tolist()
    for col in ref_rows[0]:
        ref = np.array([r[col] for r in ref_rows], dtype=float)
        got = out[col]
        if col == "ra":
            dra = (got - ref + 180.0) % 360.0 - 180.0
            np.testing.assert_allclose(dra * np.cos(np.radians(out["dec"])), 0, atol=1e-9, err_msg=col)
            assert np.all((got >= 0) & (got < 360))
        elif col == "dec":
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9, err_msg=col)
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.nanmax(np.abs(ref), initial=1),
                                       equal_nan=True, err_msg=col)
    for col in DIA_OBJECT_COLUMNS:
        assert len(out[col]) == len(ids)
        if col in ("diaObjectId", "nDiaSources") or col.endswith("Ndata"):
            assert out[col].dtype == np.int64, col
        else:
            assert out[col].dtype == np.float64, col
    # other bands: from prior, else NULL
    pid = {} if prior is None else {int(v): k for k, v in enumerate(prior["diaObjectId"])}
    for b in BANDS:
        if b == band:
            continue
        for c in dia_object_band_columns(b):
            for i, oid in enumerate(ids.tolist()):
                if oid in pid:
                    assert out[c][i] == prior[c][pid[oid]], c
                elif c.endswith("Ndata"):
                    assert out[c][i] == 0
                else:
                    assert np.isnan(out[c][i]), c


@pytest.mark.parametrize("band_dtype", [object, "U1"])
def test_object_versions_equal_naive_reference(rng, band_dtype):
    ids, hist = _random_history(rng)
    hist["band"] = hist["band"].astype(band_dtype)
    prior = _prior(rng, ids)
    # rows of objects that are not asked for must be ignored
    extra = {k: v[:5].copy() for k, v in hist.items()}
    extra["diaObjectId"] = np.full(5, 12345, np.int64)
    extra["psfFlux"] = np.full(5, 1e9)
    full = {k: np.concatenate([hist[k], extra[k]]) for k in hist}
    out = compute_object_versions(ids, full, band="g", validity_start=60100.5, prior=prior)
    _check_against_naive(out, ids, hist, "g", prior)
    assert np.all(out["validityStartMjdTai"] == 60100.5) and np.all(np.isnan(out["validityEndMjdTai"]))
    # the cases the data were built to contain really occurred
    assert np.sum(out["nDiaSources"] == 1) >= 5
    assert np.isnan(out["raErr"]).sum() >= 5 and np.isnan(out["ra_dec_Cov"]).sum() >= 10
    k10 = 10
    assert out["g_psfFluxNdata"][k10] == 0 and np.isnan(out["g_psfFluxMean"][k10])
    assert np.isfinite(out["g_psfFluxMaxSlope"]).sum() > 20
    # fp stats of the current band come from prior when there is no forced history
    assert out["g_fpFluxMean"][0] == prior["g_fpFluxMean"][0]
    # another band of the same history: only that band's columns change
    out_r = compute_object_versions(ids, full, band="r", validity_start=60100.5, prior=prior)
    _check_against_naive(out_r, ids, hist, "r", prior)


def test_object_versions_forced_history_and_null_objects(rng):
    ids, hist = _random_history(rng, n_obj=30)
    n = 200
    fh = {"diaObjectId": rng.choice(ids, n), "band": rng.choice(np.array(["g", "r"], dtype=object), n),
          "psfFlux": rng.normal(100, 30, n), "psfFluxErr": rng.uniform(5, 20, n)}
    fh["psfFluxErr"][::13] = np.nan
    # object arrays with None for NULL, as concatenated APDB reads produce
    hist_obj = dict(hist)
    hist_obj["psfFluxErr"] = np.array([None if not np.isfinite(v) else v for v in hist["psfFluxErr"]], dtype=object)
    out = compute_object_versions(ids, hist_obj, band="g", validity_start=60200.0, forced_history=fh)
    _check_against_naive(out, ids, hist, "g")
    for i, oid in enumerate(ids):
        sel = (fh["diaObjectId"] == oid) & (fh["band"] == "g")
        m, e, _ = _wmean(fh["psfFlux"][sel], fh["psfFluxErr"][sel])
        np.testing.assert_allclose([out["g_fpFluxMean"][i], out["g_fpFluxMeanErr"][i]], [m, e], rtol=1e-12,
                                   equal_nan=True)
    assert np.all(np.isnan(out["r_fpFluxMean"]))  # other band, no prior


def test_object_positions_at_wrap_and_pole():
    hist = {"diaObjectId": np.array([1, 1, 2, 2, 2, 2]),
            "ra": np.array([359.99999, 0.00001, 0.0, 90.0, 180.0, 270.0]),
            "dec": np.array([10.0, 10.0, 89.99999, 89.99999, 89.99999, 89.99999]),
            "midpointMjdTai": np.arange(6.0) + 60000, "band": np.array(["g"] * 6),
            "psfFlux": np.ones(6), "psfFluxErr": np.ones(6)}
    out = compute_object_versions([1, 2], hist, band="g", validity_start=60010.0)
    assert abs(((out["ra"][0] + 180) % 360) - 180) < 1e-9 and abs(out["dec"][0] - 10.0) < 1e-9
    assert np.all((out["ra"] >= 0) & (out["ra"] < 360))
    assert abs(out["dec"][1] - 90.0) < 1e-9  # mean of four points around the pole is the pole
    assert np.all(np.isnan(out["raErr"]))  # no errors given -> unweighted, error unknown
    # weighted: the precise source pulls the mean
    hist2 = dict(hist, raErr=np.array([1e-6, 1e-4, 1, 1, 1, 1]), decErr=np.full(6, 1e-5))
    out2 = compute_object_versions([1], hist2, band="g", validity_start=60010.0)
    expect = (359.99999 * 1e12 + 360.00001 * 1e8) / (1e12 + 1e8) - 360
    assert abs(((out2["ra"][0] + 180) % 360) - 180 - expect) < 1e-10
    np.testing.assert_allclose(out2["raErr"][0], 1 / math.sqrt(1e12 + 1e8), rtol=1e-12)
    np.testing.assert_allclose(out2["decErr"][0], 1e-5 / math.sqrt(2), rtol=1e-12)


def test_object_versions_errors():
    hist = {"diaObjectId": np.array([1]), "ra": np.array([1.0]), "dec": np.array([1.0]),
            "midpointMjdTai": np.array([6e4]), "band": np.array(["g"]), "psfFlux": np.ones(1),
            "psfFluxErr": np.ones(1)}
    with pytest.raises(InputError, match="no DiaSource"):
        compute_object_versions([1, 2], hist, band="g", validity_start=6e4)
    with pytest.raises(InputError, match="more than once"):
        compute_object_versions([1, 1], hist, band="g", validity_start=6e4)
    with pytest.raises(InputError, match="band 'q'"):
        compute_object_versions([1], hist, band="q", validity_start=6e4)
    with pytest.raises(InputError, match="finite MJD"):
        compute_object_versions([1], hist, band="g", validity_start=float("nan"))
    with pytest.raises(InputError, match="lacks the column"):
        compute_object_versions([1], {k: v for k, v in hist.items() if k != "band"}, band="g", validity_start=6e4)
    empty = compute_object_versions([], hist, band="g", validity_start=6e4)
    assert set(empty) == set(DIA_OBJECT_COLUMNS) and all(len(v) == 0 for v in empty.values())


# ------------------------------------------------------------------------ visit-by-visit scenario


def _concat(*sets):
    sets = [s for s in sets if s]
    return {k: np.concatenate([np.asarray(s[k]) for s in sets]) for k in sets[0]}


def test_transient_seen_in_n_visits_becomes_one_object(rng):
    """Feed visits one by one; objects of the previous visit are the loaded (current) versions."""
    n_visits, detector = 8, 35
    ra_t, dec_t = 149.9999, -4.5
    cosd = math.cos(math.radians(dec_t))
    objects: dict[str, np.ndarray] = {}
    history: dict[str, np.ndarray] = {}
    transient_ids = []
    bands = ["g", "g", "r", "g", "r", "g", "g", "r"]
    for k in range(n_visits):
        visit, band, t_mid = 1000 + k, bands[k], 60000.0 + 0.9 * k
        n_bg = 20
        # unrelated sources, none within 10" of the transient, and never twice at the same place
        bg_ra = ra_t + rng.uniform(20, 300, n_bg) * ARCSEC / cosd * rng.choice([-1, 1], n_bg)
        bg_dec = dec_t + rng.uniform(-300, 300, n_bg) * ARCSEC
        ra = np.r_[ra_t + rng.normal(0, 0.15) * ARCSEC / cosd, bg_ra]
        dec = np.r_[dec_t + rng.normal(0, 0.15) * ARCSEC, bg_dec]
        n = len(ra)
        flux = np.r_[1000.0 * (k + 1), rng.normal(300, 50, n_bg)]
        src = _sources(visit, detector, ra, dec, midpointMjdTai=np.full(n, t_mid),
                       band=np.full(n, band, dtype=object), psfFlux=flux, psfFluxErr=np.full(n, 50.0),
                       raErr=np.full(n, 0.05 * ARCSEC), decErr=np.full(n, 0.05 * ARCSEC))
        res = associate(src, objects or None, visit=visit, detector=detector, max_dist_arcsec=1.0)
        if k == 0:
            assert res.n_matched == 0
        else:
            assert res.n_matched == 1 and res.matched_object_ids.tolist() == [transient_ids[0]]
        transient_ids.append(int(res.sources["diaObjectId"][0]))
        history = _concat(history, res.sources)
        touched = np.union1d(res.matched_object_ids, res.new_object_ids)
        prior = None
        if objects:
            keep = np.isin(objects["diaObjectId"], touched)
            prior = {c: v[keep] for c, v in objects.items()}
        versions = compute_object_versions(touched, history, band=band, validity_start=t_mid, prior=prior)
        if objects:  # close the old versions, add the new ones (what the APDB does)
            stay = ~np.isin(objects["diaObjectId"], touched)
            objects = _concat({c: v[stay] for c, v in objects.items()}, versions)
        else:
            objects = versions
    assert len(set(transient_ids)) == 1
    i = int(np.flatnonzero(objects["diaObjectId"] == transient_ids[0])[0])
    assert objects["nDiaSources"][i] == n_visits
    assert len(objects["diaObjectId"]) == 1 + 20 * n_visits  # every other source is its own object
    assert np.sum(objects["nDiaSources"] == 1) == 20 * n_visits
    # g statistics from the g visits, r statistics carried over from the last r visit's version
    g_flux = 1000.0 * (np.flatnonzero(np.array(bands) == "g") + 1)
    r_flux = 1000.0 * (np.flatnonzero(np.array(bands) == "r") + 1)
    assert objects["g_psfFluxNdata"][i] == len(g_flux) and objects["r_psfFluxNdata"][i] == len(r_flux)
    np.testing.assert_allclose(objects["g_psfFluxMean"][i], g_flux.mean(), rtol=1e-12)
    np.testing.assert_allclose(objects["r_psfFluxMean"][i], r_flux.mean(), rtol=1e-12)
    np.testing.assert_allclose(objects["g_psfFluxSigma"][i], np.std(g_flux, ddof=1), rtol=1e-12)
    assert objects["r_psfFluxMax"][i] == r_flux.max() and objects["g_psfFluxMin"][i] == g_flux.min()
    assert objects["firstDiaSourceMjdTai"][i] == 60000.0
    np.testing.assert_allclose(objects["lastDiaSourceMjdTai"][i], 60000.0 + 0.9 * (n_visits - 1))
    # the mean position is within a few sigma of the truth (0.15"/sqrt(8) per coordinate)
    sep = math.hypot((objects["ra"][i] - ra_t) * cosd, objects["dec"][i] - dec_t) / ARCSEC
    assert sep < 5 * 0.15 / math.sqrt(n_visits) * math.sqrt(2)
    assert np.all(np.isnan(objects["i_psfFluxMean"])) and np.all(objects["i_psfFluxNdata"] == 0)
