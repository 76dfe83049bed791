"""Avro alerts: schema validity, round trips, APDB column sets from a real SQLite file, FITS cutouts."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import time

import fastavro
import fastavro.validation
import numpy as np
import pytest
import sqlalchemy as sa
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.wcs import WCS

from apfast import masks
from apfast.dia import alerts as A
from apfast.dia.apdb_schema import COLUMN_KINDS, make_metadata
from apfast.errors import ConfigError, InputError
from apfast.exposure import Exposure, PhotoCalib

VISIT0, DETECTOR = 289400, 35
NY, NX = 300, 200
RA0, DEC0 = 150.1, 2.2


# --------------------------------------------------------------------------- helpers
def _ccd_visit_id(visit: int, detector: int = DETECTOR) -> int:
    return visit * 100 + detector


def _source_id(visit: int, n: int) -> int:
    return (_ccd_visit_id(visit) << 20) | n


def _table_columns(
    table: str, n: int, rng: np.random.Generator, null_frac: float = 0.2
) -> dict[str, np.ndarray]:
    """All APDB columns of ``table`` with plausible random values; nullable ones NULL at ``null_frac``.

    NULL follows the shared convention: NaN in float columns (ints and bools that may be NULL are
    float with NaN), None in object (text) columns.
    """
    cols: dict[str, np.ndarray] = {}
    for name, (kind, nullable) in COLUMN_KINDS[table].items():
        if kind == "f":
            v = rng.normal(1000.0, 300.0, n)
            if "Err" in name or "Sigma" in name:
                v = np.abs(v) / 10.0
        elif kind == "i":
            v = rng.integers(0, 50, n).astype(np.int64)
        elif kind == "b":
            v = rng.random(n) < 0.3
        else:
            v = np.array(["g"] * n, dtype=object)
        if nullable:
            null = rng.random(n) < null_frac
            if kind == "s":
                v[null] = None
            elif null.any():
                v = v.astype(float)
                v[null] = np.nan
        cols[name] = v
    if "reliabilityVersion" in cols:
        cols["reliabilityVersion"] = np.where(rng.random(n) < 0.5, "v1.0", None).astype(object)
    return cols


def _sources(visits: list[int], object_ids: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(visits)
    c = _table_columns("DiaSource", n, rng)
    rows = np.arange(n)
    c["diaSourceId"] = np.array([_source_id(v, r) for v, r in zip(visits, rows, strict=True)], np.int64)
    c["visit"] = np.asarray(visits, np.int64)
    c["detector"] = np.full(n, DETECTOR, np.int64)
    c["diaObjectId"] = np.asarray(object_ids, float)  # nullable BIGINT read back as float with NaN
    c["midpointMjdTai"] = 58909.0 + (np.asarray(visits) - VISIT0) * 0.01
    c["x"] = rng.uniform(20, NX - 20, n)
    c["y"] = rng.uniform(20, NY - 20, n)
    c["ra"] = RA0 + rng.normal(0, 0.01, n)
    c["dec"] = DEC0 + rng.normal(0, 0.01, n)
    c["band"] = np.array(["g"] * n, dtype=object)
    c["timeProcessedMjdTai"] = np.full(n, 61000.5)
    c["pixelId"] = rng.integers(2**40, 2**41, n)
    return c


def _objects(ids: list[int], starts: list[float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = _table_columns("DiaObject", len(ids), rng)
    c["diaObjectId"] = np.asarray(ids, np.int64)
    c["validityStartMjdTai"] = np.asarray(starts, float)
    c["validityEndMjdTai"] = np.full(len(ids), np.nan)
    c["ra"] = RA0 + rng.normal(0, 0.01, len(ids))
    c["dec"] = DEC0 + rng.normal(0, 0.01, len(ids))
    return c


def _forced(object_ids: list[int], visits: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(object_ids)
    c = _table_columns("DiaForcedSource", n, rng)
    c["diaForcedSourceId"] = np.array([_source_id(v, 500 + i) for i, v in enumerate(visits)], np.int64)
    c["diaObjectId"] = np.asarray(object_ids, np.int64)
    c["visit"] = np.asarray(visits, np.int64)
    c["detector"] = np.full(n, DETECTOR, np.int64)
    c["midpointMjdTai"] = 58909.0 + (np.asarray(visits) - VISIT0) * 0.01
    return c


def _rows(cols: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(cols.values())))
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _exposure(rng: np.random.Generator, *, sip: bool = True, zp: float = 30.8) -> Exposure:
    """A noisy 300x200 exposure with a rotated TAN(-SIP) WCS, mask, variance and zero point."""
    img = rng.normal(0.0, 5.0, (NY, NX)).astype(np.float32)
    var = np.full((NY, NX), 25.0, np.float32) + rng.uniform(0, 1, (NY, NX)).astype(np.float32)
    mask = np.zeros((NY, NX), np.int32)
    mask[100:110, 50:60] = masks.bitmask("SAT")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [NX / 2, NY / 2]
    s, th = 0.263 / 3600, math.radians(30.0)
    w.wcs.cd = s * np.array([[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]])
    if sip:
        from astropy.wcs import Sip

        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[3, 0] = 2e-5, -1e-5, 3e-8
        b[1, 1], b[0, 3] = 1.5e-5, -2e-8
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return Exposure(img, mask, var, wcs=w, photo_calib=PhotoCalib(zp))


def _same(a, b, path="alert"):
    """Recursive equality of a written and a read-back record; floats compared at float32 precision."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float), path
        assert (math.isnan(a) and math.isnan(b)) or np.float32(a) == np.float32(b), (path, a, b)
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def _python_types_only(x, path="alert"):
    if isinstance(x, dict):
        for k, v in x.items():
            _python_types_only(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _python_types_only(v, f"{path}[{i}]")
    else:
        assert x is None or type(x) in (int, float, bool, str, bytes), (path, type(x))


@pytest.fixture(scope="module")
def schema():
    return A.load_alert_schema()


# --------------------------------------------------------------------------- schema
def test_schema_latest_cached_and_versions(schema):
    versions = A.available_schema_versions()
    assert "11.1" in versions and "10.0" in versions
    assert versions == tuple(sorted(versions, key=lambda v: tuple(map(int, v.split(".")))))
    assert schema["name"] == f"lsst.v{versions[-1].replace('.', '_')}.alert"
    assert A.load_alert_schema() is schema
    assert A.load_alert_schema("10.0")["name"] == "lsst.v10_0.alert"


def test_unknown_schema_version_names_the_choices():
    with pytest.raises(InputError, match=r"'99\.9' is not installed.*11\.1"):
        A.load_alert_schema("99.9")


def test_missing_alert_packet_says_pip_install(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "lsst.alert.packet" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(A.MissingDependencyError, match="pip install lsst-alert-packet"):
        A.available_schema_versions()


def test_config_section_validates():
    assert A.AlertsConfig().cutout_size == 30
    with pytest.raises(ConfigError, match="cutout_size"):
        A.AlertsConfig(cutout_size=0)
    with pytest.raises(ConfigError, match="schema_version"):
        A.AlertsConfig(schema_version="1.0")


# --------------------------------------------------------------------------- make_alert
def test_make_alert_validates_round_trips_and_uses_python_types(schema, rng, tmp_path):
    exp = _exposure(rng)
    cur = _sources([VISIT0 + 3], [77], rng)
    prv = _sources([VISIT0, VISIT0 + 1, VISIT0 + 2], [77, 77, 77], rng)
    forced = _forced([77, 77], [VISIT0, VISIT0 + 1], rng)
    obj = _objects([77], [58909.03], rng)
    src_row = _rows(cur)[0]
    before = copy.deepcopy(src_row)
    cut = A.cutout_fits_bytes(exp, float(cur["x"][0]), float(cur["y"][0]))
    alert = A.make_alert(
        int(cur["diaSourceId"][0]),
        src_row,
        _rows(prv),
        _rows(forced),
        _rows(obj)[0],
        {"cutoutDifference": cut, "cutoutScience": cut, "cutoutTemplate": None},
    )
    assert fastavro.validation.validate(alert, schema, raise_errors=True)
    _python_types_only(alert)
    assert alert["diaSourceId"] == int(cur["diaSourceId"][0])
    assert len(alert["prvDiaSources"]) == 3 and len(alert["prvDiaForcedSources"]) == 2
    assert alert["diaObject"]["diaObjectId"] == 77
    assert "pixelId" not in alert["diaSource"] and "validityEndMjdTai" not in alert["diaObject"]
    assert alert["cutoutTemplate"] is None and alert["cutoutDifference"] == cut
    # every schema field is present, values equal the APDB row's (NaN -> None)
    src = alert["diaSource"]
    for name, value in src.items():
        if name in src_row:
            v = src_row[name]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                assert value is None, name
            elif isinstance(v, (str, bytes, bool)):
                assert value == v, name
            else:
                assert value == pytest.approx(v, rel=1e-12), name
    assert src_row.keys() == before.keys()
    for k, v in before.items():  # the input row is not modified
        assert src_row[k] is v or src_row[k] == v or (np.isnan(src_row[k]) and np.isnan(v)), k
    path = A.write_alerts(tmp_path / "alerts" / "a.avro", [alert])
    back = A.read_alerts(path)
    assert len(back) == 1
    _same(alert, back[0])


def test_nan_none_and_missing_optional_fields_become_null(schema):
    row = {
        "diaSourceId": np.int64(5),
        "visit": np.int64(1),
        "detector": np.int16(2),
        "midpointMjdTai": np.float64(60000.25),
        "ra": 10.0,
        "dec": -5.0,
        "x": np.float32(1.5),
        "y": 2.0,
        "psfFlux": np.float32(np.nan),
        "apFlux": None,
        "snr": np.float32(7.25),
        "isNegative": np.bool_(True),
        "diaObjectId": np.nan,
        "band": b"r",
        "psfNdata": np.nan,
    }
    alert = A.make_alert(5, row, [], [], None, {})
    s = alert["diaSource"]
    assert s["psfFlux"] is None and s["apFlux"] is None and s["diaObjectId"] is None
    assert s["trailFlux"] is None  # not given at all
    assert s["snr"] == 7.25 and s["isNegative"] is True and s["band"] == "r" and s["detector"] == 2
    assert s["x"] == 1.5 and type(s["visit"]) is int
    assert s["psfNdata"] == 0 and s["bboxSize"] == 0  # documented defaults of required counts
    now = time.time() / 86400 + 40587
    assert abs(s["timeProcessedMjdTai"] - now) < 1.0 / 1440  # "now", MJD TAI
    # empty history: Rubin's convention
    assert alert["prvDiaSources"] is None and alert["prvDiaForcedSources"] == []
    assert alert["diaObject"] is None and alert["ssSource"] is None and alert["observation_reason"] is None
    assert alert["cutoutDifference"] is None
    assert fastavro.validation.validate(alert, schema, raise_errors=True)


def test_missing_required_field_is_an_input_error():
    row = {"diaSourceId": 5, "visit": 1, "detector": 2, "midpointMjdTai": 6e4, "dec": 0.0, "x": 1.0, "y": 1.0}
    with pytest.raises(InputError, match=r"required alert field 'ra'"):
        A.make_alert(5, row, [], [], None, {})
    row["ra"] = None
    with pytest.raises(InputError, match="'ra'"):
        A.make_alert(5, row, [], [], None, {})
    row["ra"] = 1.0
    with pytest.raises(InputError, match="cutoutScienze"):
        A.make_alert(5, row, [], [], None, {"cutoutScienze": None})


def test_older_schema_renamed_fields(rng):
    cur = _sources([VISIT0], [9], rng)
    obj = _objects([9], [58909.5], rng)
    alert = A.make_alert(1, _rows(cur)[0], [], [], _rows(obj)[0], {}, schema_version="8.0")
    micros = round(((58909.5 - 40587.0) * 86400.0 - 37.0) * 1e6)  # MJD TAI -> UTC microseconds
    assert alert["diaObject"]["validityStart"] == micros
    assert alert["diaSource"]["time_processed"] == round(((61000.5 - 40587.0) * 86400.0 - 37.0) * 1e6)
    assert fastavro.validation.validate(alert, A.load_alert_schema("8.0"), raise_errors=True)


def test_write_alerts_rejects_bad_records_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.avro"
    with pytest.raises(InputError, match="alert #0"):
        A.write_alerts(path, [{"diaSourceId": "not a number"}])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="does not exist"):
        A.read_alerts(path)


# --------------------------------------------------------------------------- column sets from SQLite
def _store_and_read(tmp_path, tables: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Insert column sets into a real SQLite APDB (apfast's schema) and read them back as column sets."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'apdb.db'}")
    md = make_metadata()
    md.create_all(engine)

    def py(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    with engine.begin() as conn:
        for name, cols in tables.items():
            keys = list(cols)
            rows = [
                dict(zip(keys, map(py, vals), strict=True))
                for vals in zip(*(cols[k].tolist() for k in keys), strict=True)
            ]
            conn.execute(md.tables[name].insert(), rows)
    out = {}
    with engine.connect() as conn:
        for name in tables:
            res = conn.execute(sa.select(md.tables[name]))
            keys = list(res.keys())
            data = res.fetchall()
            cols = {}
            for j, k in enumerate(keys):
                vals = [r[j] for r in data]
                kind = COLUMN_KINDS[name][k][0]
                if kind == "s" or any(v is None for v in vals) and kind == "b":
                    cols[k] = np.array(vals, dtype=object)
                elif any(v is None for v in vals):
                    cols[k] = np.array([np.nan if v is None else v for v in vals], dtype=float)
                else:
                    cols[k] = np.array(vals)
            out[name] = cols
    engine.dispose()
    return out


def test_build_ccd_alerts_from_apdb_column_sets(schema, rng, tmp_path):
    visit = VISIT0 + 3
    # 3 objects with history; object 30 has two versions; source 3 has no object row; source 4 a NULL id
    hist = _sources([VISIT0 + 2, VISIT0, VISIT0 + 1, VISIT0, VISIT0 + 1], [10, 10, 10, 20, 30], rng)
    hist["diaSourceId"] = np.arange(5, dtype=np.int64) + _source_id(VISIT0, 100)
    forced = _forced(
        [10, 10, 20, 30, 30, 30], [VISIT0 + 1, VISIT0, VISIT0, VISIT0, VISIT0 + 1, VISIT0 + 2], rng
    )
    objs = _objects([10, 20, 30, 30, 40], [58909.03, 58909.03, 58909.01, 58909.03, 58909.03], rng)
    cur = _sources([visit] * 5, [10, 20, 30, 999, 0], rng)
    cur["diaObjectId"][4] = np.nan
    objs["diaObjectId"][4] = cur["diaSourceId"][4] + 12345  # an object no source points at
    db = _store_and_read(tmp_path, {"DiaSource": hist, "DiaForcedSource": forced, "DiaObject": objs})
    assert db["DiaSource"]["diaObjectId"].dtype.kind in "if"
    diff, sci, tmpl = _exposure(rng), _exposure(rng), _exposure(rng)
    cur_copy = {k: v.copy() for k, v in cur.items()}
    alerts = A.build_ccd_alerts(
        cur,
        db["DiaObject"],
        db["DiaSource"],
        db["DiaForcedSource"],
        difference=diff,
        science=sci,
        template=tmpl,
    )
    assert all(np.array_equal(cur[k], cur_copy[k]) or cur[k].dtype.kind in "fO" for k in cur)
    assert np.array_equal(cur["x"], cur_copy["x"])
    assert [a["diaSourceId"] for a in alerts] == cur["diaSourceId"].tolist()
    for a in alerts:
        assert fastavro.validation.validate(a, schema, raise_errors=True)
        _python_types_only(a)
    a10, a20, a30, a999, anull = alerts
    assert [s["midpointMjdTai"] for s in a10["prvDiaSources"]] == sorted(
        s["midpointMjdTai"] for s in a10["prvDiaSources"]
    )
    assert (
        len(a10["prvDiaSources"]) == 3 and len(a20["prvDiaSources"]) == 1 and len(a30["prvDiaSources"]) == 1
    )
    assert {s["diaObjectId"] for s in a10["prvDiaSources"]} == {10}
    assert [f["visit"] for f in a30["prvDiaForcedSources"]] == [VISIT0, VISIT0 + 1, VISIT0 + 2]
    assert len(a10["prvDiaForcedSources"]) == 2
    assert a30["diaObject"]["validityStartMjdTai"] == 58909.03  # the newest version
    ref = int(np.flatnonzero((objs["diaObjectId"] == 30) & (objs["validityStartMjdTai"] == 58909.03))[0])
    assert a30["diaObject"]["ra"] == objs["ra"][ref]
    assert a999["diaObject"] is None and a999["prvDiaSources"] is None and a999["prvDiaForcedSources"] == []
    assert anull["diaObject"] is None and anull["diaSource"]["diaObjectId"] is None
    for key in ("cutoutDifference", "cutoutScience", "cutoutTemplate"):
        assert all(a[key][:6] == b"SIMPLE" for a in alerts)
    back = A.read_alerts(A.write_alerts(tmp_path / "alerts" / f"{visit}_{DETECTOR}.avro", alerts))
    assert len(back) == len(alerts)
    for a, b in zip(alerts, back, strict=True):
        _same(a, b)


def test_history_excludes_the_alerts_own_source(rng):
    cur = _sources([VISIT0 + 1], [5], rng)
    hist = _sources([VISIT0, VISIT0 + 1], [5, 5], rng)
    hist["diaSourceId"][1] = cur["diaSourceId"][0]  # the APDB history already holds the current source
    alerts = A.build_ccd_alerts(cur, None, hist, None, difference=_exposure(rng))
    assert [s["diaSourceId"] for s in alerts[0]["prvDiaSources"]] == [int(hist["diaSourceId"][0])]
    assert alerts[0]["cutoutScience"] is None


def test_build_ccd_alerts_empty_and_grid_mismatch(rng):
    diff = _exposure(rng)
    assert A.build_ccd_alerts({}, None, None, None, difference=diff) == []
    cur = _sources([VISIT0], [1], rng)
    small = Exposure(np.zeros((10, 10), np.float32))
    with pytest.raises(InputError, match="pixel grid"):
        A.build_ccd_alerts(cur, None, None, None, difference=diff, template=small)
    bad = dict(cur)
    bad["psfFlux"] = bad["psfFlux"][:0]
    with pytest.raises(InputError, match="'psfFlux' has 0 values"):
        A.build_ccd_alerts(bad, None, None, None, difference=diff)


# --------------------------------------------------------------------------- cutouts
def test_cutout_layout_values_and_wcs(rng):
    exp = _exposure(rng)
    x, y = 83.37, 151.81
    data = A.cutout_fits_bytes(exp, x, y)
    with fits.open(io.BytesIO(data)) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "UNCERT"]
        img, hdr, var = hdul[0].data, hdul[0].header, hdul[1].data
        assert img.shape == (30, 30) and var.shape == (30, 30)
        assert hdr["BUNIT"] == "nJy" and hdul[1].header["UTYPE"] == "VarianceUncertainty"
        scale = exp.photo_calib.njy_per_instflux
        ix, iy = round(x), round(y)
        # the pixel containing (x, y) sits at [15, 15]; the whole box matches the image
        assert img[15, 15] == pytest.approx(exp.image[iy, ix] * scale, rel=1e-6)
        np.testing.assert_allclose(img, exp.image[iy - 15 : iy + 15, ix - 15 : ix + 15] * scale, rtol=1e-6)
        np.testing.assert_allclose(
            var, exp.variance[iy - 15 : iy + 15, ix - 15 : ix + 15] * scale**2, rtol=1e-6
        )
        assert hdr["CUTMINX"] + 1 == ix - 15 and hdr["CUTMINY"] + 1 == iy - 15
        w = WCS(hdr)
    ra, dec = exp.wcs.all_pix2world([[x, y]], 0)[0]
    cra, cdec = w.all_pix2world([[hdr["CRPIX1"] - 1, hdr["CRPIX2"] - 1]], 0)[0]
    cosd = math.cos(math.radians(dec))
    assert abs((cra - ra) * cosd) * 3600 < 0.01 and abs(cdec - dec) * 3600 < 0.01
    # the local TAN approximation holds over the whole cutout (corners) to 0.01 arcsec despite SIP
    for dx, dy in [(-15, -15), (14, 14), (-15, 14), (14, -15)]:
        ra1, dec1 = exp.wcs.all_pix2world([[ix + dx, iy + dy]], 0)[0]
        ra2, dec2 = w.all_pix2world([[15 + dx, 15 + dy]], 0)[0]
        assert abs((ra2 - ra1) * cosd) * 3600 < 0.01 and abs(dec2 - dec1) * 3600 < 0.01
    # astropy's CCDData (what Rubin writes cutouts with) opens it
    ccd = CCDData.read(io.BytesIO(data), format="fits")
    assert str(ccd.unit) == "nJy" and type(ccd.uncertainty).__name__ == "VarianceUncertainty"


def test_cutout_nan_padding_at_corner_and_mask_hdu(rng):
    exp = _exposure(rng, sip=False)
    x, y = 1.2, 2.7  # pixel (1, 3): 14 columns and 12 rows of the box fall off the image
    data = A.cutout_fits_bytes(exp, x, y, mask=True)
    with fits.open(io.BytesIO(data)) as hdul:
        hdul.verify("exception")
        img, msk = hdul[0].data, hdul["MASK"].data
    off = np.zeros((30, 30), bool)
    off[:12, :] = True
    off[:, :14] = True
    assert np.array_equal(np.isnan(img), off)
    assert img[15, 15] == pytest.approx(exp.image[3, 1] * exp.photo_calib.njy_per_instflux, rel=1e-6)
    assert np.all(msk[off] == masks.bitmask("NO_DATA"))
    np.testing.assert_array_equal(msk[12:, 14:], exp.mask[:18, :16])
    # outside the image, or not finite: no cutout (as Rubin)
    assert A.cutout_fits_bytes(exp, -0.6, 10.0) is None
    assert A.cutout_fits_bytes(exp, 10.0, np.nan) is None
    with pytest.raises(InputError, match="positive integer"):
        A.cutout_fits_bytes(exp, 10.0, 10.0, size=0)


def test_cutout_of_subimage_uses_parent_coordinates(rng):
    exp = _exposure(rng)
    sub = exp.subimage(50, 250, 40, 180)
    x, y = 100.4, 120.6
    a, b = A.cutout_fits_bytes(exp, x, y, size=11), A.cutout_fits_bytes(sub, x, y, size=11)
    ha, hb = fits.getheader(io.BytesIO(a)), fits.getheader(io.BytesIO(b))
    np.testing.assert_array_equal(fits.getdata(io.BytesIO(a)), fits.getdata(io.BytesIO(b)))
    assert ha["CUTMINX"] == hb["CUTMINX"] and ha["CRVAL1"] == pytest.approx(hb["CRVAL1"], abs=1e-10)
    assert hb["LTV1"] == -(round(x) - 5)


def test_cutout_without_calibration_or_wcs_is_instrumental():
    exp = Exposure(np.arange(64.0).reshape(8, 8))
    data = A.cutout_fits_bytes(exp, 4.0, 4.0, size=4, variance=False)
    with fits.open(io.BytesIO(data)) as hdul:
        assert len(hdul) == 1 and "BUNIT" not in hdul[0].header and "CTYPE1" not in hdul[0].header
        np.testing.assert_array_equal(hdul[0].data, exp.image[2:6, 2:6])
