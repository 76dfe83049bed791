"""Tests of calibration ingest, date lookup and readers (apfast.repo.calibs, apfast.repo.calib_formats)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.table import Table

from apfast.camera import get_camera
from apfast.errors import CalibrationError, IngestError, InputError
from apfast.repo.calib_formats import _TolerantLoader, date_to_mjd
from apfast.repo.calibs import (
    CALIB_TYPES,
    CalibRegistry,
    _ranges,
    ingest_calibs,
    read_calib,
)

SMALL = dataclasses.replace(get_camera("DECam"), trimmed_shape=(64, 32))
G = "g DECam SDSS c0001 4720.0 1520.0"
R = "r DECam SDSS c0002 6415.0 1480.0"


# --------------------------------------------------------------------------- helpers


def write_master(path: Path, obstype: str, date: str, ccds: dict[int, np.ndarray], *, filt: str | None = None,
                 drop: tuple[str, ...] = (), fz: bool = False) -> Path:
    """Write a CP-style master MEF: data-less primary, one float32 image per CCD."""
    cam = get_camera("DECam")
    primary = fits.PrimaryHDU()
    cards = {"INSTRUME": "DECam", "OBSTYPE": obstype, "PROCTYPE": "MasterCal", "DATE-OBS": date,
             "MJD-OBS": date_to_mjd(date)}
    if filt:
        cards["FILTER"] = filt
    for k, v in cards.items():
        if k not in drop:
            primary.header[k] = v
    hdus = [primary]
    for ccd, data in ccds.items():
        h = fits.Header()
        h["EXTNAME"] = cam.detector_name(ccd)
        if "CCDNUM" not in drop:
            h["CCDNUM"] = ccd
        if fz:
            hdus.append(fits.CompImageHDU(data.astype(np.float32), h, compression_type="GZIP_2"))
        else:
            hdus.append(fits.ImageHDU(data.astype(np.float32), h))
    fits.HDUList(hdus).writeto(path)
    return path


def write_defects_fits(path: Path, date: str, boxes: dict[int, np.ndarray]) -> Path:
    cam = get_camera("DECam")
    primary = fits.PrimaryHDU()
    primary.header["OBSTYPE"] = "defects"
    primary.header["INSTRUME"] = "DECam"
    primary.header["DATE-OBS"] = date
    hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [primary]
    for ccd, b in boxes.items():
        cols = [fits.Column(name=n, format="J", array=b[:, j]) for j, n in enumerate(("x0", "y0", "width", "height"))]
        t = fits.BinTableHDU.from_columns(cols)
        t.header["EXTNAME"] = cam.detector_name(ccd)
        t.header["CCDNUM"] = ccd
        hdus.append(t)
    fits.HDUList(hdus).writeto(path)
    return path


def snapshot(root: Path) -> tuple[int, list[str]]:
    """(row count, sorted file listing) of a calib folder; (-1, []) when it does not exist."""
    if not root.exists():
        return (-1, [])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    n = len(CalibRegistry(root)) if (root / "calibRegistry.sqlite3").exists() else -1
    return (n, files)


def noise(rng: np.random.Generator, shape: tuple[int, int], level: float, sigma: float) -> np.ndarray:
    return (level + sigma * rng.standard_normal(shape)).astype(np.float32)


# --------------------------------------------------------------------------- real curated files


def test_real_defects_two_detectors(tmp_path, real_data):
    files = sorted((real_data / "decam_calib/defects/n4").glob("*.ecsv"))
    files += sorted((real_data / "decam_calib/defects/s1").glob("*.ecsv"))
    report = ingest_calibs(tmp_path / "calibs", files)
    assert report.n_added == len(files) == 12
    reg = CalibRegistry(tmp_path / "calibs")
    # Files with date-only names land in per-detector folders: no collisions.
    assert len({r.path for r in reg.list("defects")}) == 12
    assert all(r.path.is_file() for r in reg.list())

    ref = reg.lookup("defects", ccdnum=35, date="2014-06-01")
    assert ref.path.name == "20140117t0129.ecsv" and ref.filter is None
    assert ref.calib_date == "2014-01-17T01:29:00"
    assert reg.lookup("defects", ccdnum=25, date="2014-06-01").path.parent.name == "s1"
    # Curated calibs are valid from their CALIBDATE until the next one.
    assert reg.lookup("defects", ccdnum=35, date="2014-01-17T01:28:59").path.name == "20130916t0926.ecsv"
    assert reg.lookup("defects", ccdnum=35, date="2014-01-17T01:29:01").path.name == "20140117t0129.ecsv"
    # Before all dated ones the 1970 entry applies; after the last one it is open-ended.
    assert reg.lookup("defects", ccdnum=35, date="2001-01-01").path.name == "19700101T0000.ecsv"
    assert reg.lookup("defects", ccdnum=35, date=70000.0).path.name == "20150105t0115.ecsv"
    with pytest.raises(CalibrationError, match=r"1970-01-01T00:00:00.*2015-01-05T01:15:00.*--validity"):
        reg.lookup("defects", ccdnum=35, date="1965-01-01")

    boxes = read_calib(ref)
    table = Table.read(ref.path, format="ascii.ecsv")
    expect = np.stack([np.asarray(table[c]) for c in ("x0", "y0", "width", "height")], axis=1)
    assert boxes.dtype == np.int32 and boxes.shape == expect.shape and boxes.flags.c_contiguous
    np.testing.assert_array_equal(boxes, expect)


def test_real_crosstalk_and_linearizer(tmp_path, real_data):
    xt = real_data / "decam_calib/crosstalk/n4/1970-01-01T00:00:00.yaml"
    lin = real_data / "decam_calib/linearizer_n4/1970-01-01T00:00:00.yaml"
    report = ingest_calibs(tmp_path / "c", [xt, lin])
    assert sorted(r.calib_type for r in report.added) == ["crosstalk", "linearizer"]
    reg = CalibRegistry(tmp_path / "c")

    ref = reg.lookup("crosstalk", ccdnum=35, date="2019-03-05")
    assert ref.fmt == "xtalk-yaml" and ref.valid_end is None
    ct = read_calib(ref)
    raw = yaml.load(xt.read_text(), Loader=_TolerantLoader)
    assert ct.ccdnum == 35 and ct.amp_names == ("A", "B")
    # Rubin's DECam YAML stores [source, victim]; we return [victim, source]. DECam_xtalk_20130606.txt
    # says 'ccd35A ccd35B 3.16e-04' (victim A, source B) and 'ccd35B ccd35A 2.75e-04'.
    np.testing.assert_array_equal(ct.coeffs, np.reshape(raw["coeffs"], (2, 2)).T)
    assert ct.coeffs[0, 1] == pytest.approx(3.16e-4) and ct.coeffs[1, 0] == pytest.approx(2.75e-4)
    # 'ccd35A ccd36B 6.69e-05': victim N4 amp A, source N5 amp B; interChip is stored [victim, source].
    assert set(ct.interchip) == {"N5"} and ct.interchip["N5"][0, 1] == pytest.approx(6.69e-5)
    assert np.count_nonzero(ct.interchip["N5"]) == 1

    lref = reg.lookup("linearizer", ccdnum=35, date=58000.0)
    lz = read_calib(lref)
    full = yaml.load(lin.read_text(), Loader=_TolerantLoader)
    table = np.asarray(full["tableData"], dtype=np.float64)
    assert lz.lut.shape == table.shape == (2, 65536) and lz.lut.dtype == np.float32
    np.testing.assert_array_equal(lz.lut, table.astype(np.float32))
    assert [(a.name, a.row, a.offset) for a in lz.amps] == [("A", 0, 0.0), ("B", 1, 0.0)]
    assert lz.amp("A").bbox == (0, 0, 1023, 4095) and lz.amp("B").linearity_type == "LookupTable"
    # corrected = value + table[row, int(value + offset)]
    v = np.array([0.0, 1.7, 1000.2, 65535.9])
    np.testing.assert_allclose(lz.correct(v, "B"), v + table[1, [0, 1, 1000, 65535]], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- FITS masters


def test_bias_flat_mef_rows_and_readback(tmp_path, rng):
    shape = SMALL.trimmed_shape
    bias = {35: noise(rng, shape, 3.0, 2.0), 25: noise(rng, shape, -1.0, 2.0)}
    flat_g = {35: noise(rng, shape, 1.0, 0.01), 25: noise(rng, shape, 1.0, 0.01)}
    flat_r = {35: noise(rng, shape, 0.9, 0.01)}
    files = [
        write_master(tmp_path / "zci.fits", "zero", "2015-02-17T23:01:02", bias),
        write_master(tmp_path / "fci_g.fits", "dome flat", "2015-02-17T23:30:00", flat_g, filt=G),
        write_master(tmp_path / "fci_r.fits.fz", "dome flat", "2015-02-17T23:40:00", flat_r, filt=R, fz=True),
    ]
    lines: list[str] = []
    report = ingest_calibs(tmp_path / "calibs", files, camera=SMALL, progress=lines.append)
    assert report.n_added == 5 and len(lines) == 3 and len(report.files) == 3
    reg = CalibRegistry(tmp_path / "calibs")
    refs = reg.list("bias")
    assert [(r.ccdnum, r.hdu, r.extname) for r in refs] == [(25, 2, "S1"), (35, 1, "N4")]
    # FITS masters default to +-999 days.
    assert refs[0].valid_start.startswith("2012-05-24") and refs[0].valid_end.startswith("2017-11-12")
    assert refs[0].path == (tmp_path / "calibs/bias/2015-02-17/none/zci.fits").absolute()

    for ccd in (25, 35):
        got = read_calib(reg.lookup("bias", ccdnum=ccd, date="2015-03-01"))
        assert got.dtype == np.float32 and got.dtype.isnative and got.flags.c_contiguous
        np.testing.assert_array_equal(got, bias[ccd])
    g = reg.lookup("flat", ccdnum=35, date="2015-03-01", filter=G)
    r = reg.lookup("flat", ccdnum=35, date="2015-03-01", filter="r")
    assert (g.filter, r.filter) == ("g", "r") and g.path.parent.name == "g"
    np.testing.assert_array_equal(read_calib(g), flat_g[35])
    # Tile compression quantises floats in steps of about sigma/16 (astropy's default quantize_level).
    np.testing.assert_allclose(read_calib(r), flat_r[35], rtol=0, atol=2 * 0.01 / 16)
    assert abs(float(read_calib(r).mean()) - 0.9) < 5 * 0.01 / np.sqrt(flat_r[35].size)
    with pytest.raises(CalibrationError, match=r"filter=r.*none has been ingested.*filters available.*r"):
        reg.lookup("flat", ccdnum=25, date="2015-03-01", filter="r")
    with pytest.raises(CalibrationError, match="needs a filter"):
        reg.lookup("flat", ccdnum=35, date="2015-03-01")
    # The reader checks the shape against the camera's trimmed CCD; the message names file, hdu, shape.
    with pytest.raises(CalibrationError, match=r"zci\.fits\[1\].*\(64, 32\).*\(4096, 2048\)"):
        read_calib(reg.lookup("bias", ccdnum=35, date="2015-03-01"), camera=get_camera("DECam"))


def test_full_size_decam_bias(tmp_path, rng):
    data = {37: noise(rng, (4096, 2048), 0.0, 1.5)}
    f = write_master(tmp_path / "bias.fits", "zero", "2019-03-05T06:07:08", data)
    ingest_calibs(tmp_path / "c", [f], mode="link")
    ref = CalibRegistry(tmp_path / "c").lookup("bias", ccdnum=37, date="2019-03-06")
    assert ref.path.is_symlink() and ref.shape == (4096, 2048)
    np.testing.assert_array_equal(read_calib(ref), data[37])
    with pytest.raises(IngestError, match=r"shape \(64, 32\).*\(4096, 2048\)"):
        ingest_calibs(tmp_path / "c2", [write_master(tmp_path / "small.fits", "zero", "2019-03-05",
                                                      {1: np.zeros((64, 32))})])


def test_validity_splitting(tmp_path, rng):
    shape = SMALL.trimmed_shape
    d0 = date_to_mjd("2015-01-01")
    f1 = write_master(tmp_path / "b1.fits", "zero", "2015-01-01T00:00:00", {35: noise(rng, shape, 1, 1)})
    f2 = write_master(tmp_path / "b2.fits", "zero", "2015-01-11T00:00:00", {35: noise(rng, shape, 2, 1)})
    f3 = write_master(tmp_path / "b3.fits", "zero", "2015-01-05T00:00:00", {35: noise(rng, shape, 3, 1)})
    root = tmp_path / "c"
    ingest_calibs(root, [f1, f2], validity_days=30, camera=SMALL)
    reg = CalibRegistry(root)
    a, b = reg.list("bias")
    assert (a.valid_start, a.valid_end) == ("2014-12-02T00:00:00", "2015-01-06T00:00:00")
    assert (b.valid_start, b.valid_end) == ("2015-01-06T00:00:00", "2015-02-10T00:00:00")
    assert reg.lookup("bias", ccdnum=35, date=d0 + 4.9).path.name == "b1.fits"
    assert reg.lookup("bias", ccdnum=35, date=d0 + 5.1).path.name == "b2.fits"
    assert reg.lookup("bias", ccdnum=35, date=d0 - 29.9).path.name == "b1.fits"
    with pytest.raises(CalibrationError, match=r"valid at .*2015-01-01T00:00:00 valid 2014-12-02.*--validity"):
        reg.lookup("bias", ccdnum=35, date=d0 + 40.5)
    # A calib joining the group re-cuts every range at the new midpoints.
    ingest_calibs(root, [f3], validity_days=30, camera=SMALL)
    ranges = [(r.path.name, r.valid_start[:10], r.valid_end[:10]) for r in reg.list("bias")]
    assert ranges == [("b1.fits", "2014-12-02", "2015-01-03"), ("b3.fits", "2015-01-03", "2015-01-08"),
                      ("b2.fits", "2015-01-08", "2015-02-10")]
    assert reg.lookup("bias", ccdnum=35, date="2015-01-07").path.name == "b3.fits"


def test_ranges_never_overlap(rng):
    for _ in range(200):
        n = int(rng.integers(1, 8))
        mjds = np.sort(rng.uniform(50000, 50100, n))
        rows = [(float(m), None if rng.random() < 0.3 else float(rng.uniform(0, 60))) for m in mjds]
        out = _ranges(rows)
        for (m, _), (s, e) in zip(rows, out, strict=True):
            assert (s is None or s <= m) and (e is None or m <= e)  # each calib covers its own date
        for (_s0, e0), (s1, _e1) in zip(out[:-1], out[1:], strict=True):
            assert e0 is not None and s1 is not None and e0 <= s1 + 1e-9


# --------------------------------------------------------------------------- other formats


def test_decam_crosstalk_text(tmp_path):
    text = (
        "# victim source  x   x_err    src_nl      poly_coeff\n"
        "ccd25B   ccd25A      1.34e-04   1.13e-05    4.078154e+04  1.537540e-04  -6.980507e-08  5.963848e-12\n"
        "ccd25A   ccd25B      3.16e-04   9.32e-06    4.038128e+04  8.826313e-04  -1.619436e-07  9.457412e-12\n"
        "ccd26A   ccd25B      3.90e-05   3.28e-06    1.000000e+10  0.000000e+00  0.000000e+00  0.000000e+00\n"
        "ccd25B   ccd27B      -1.73e-05   5.30e-06   1.000000e+10  0\n"
        "\n"
    )
    f = tmp_path / "DECam_xtalk_20130606.txt"
    f.write_text(text)
    report = ingest_calibs(tmp_path / "c", [f])
    assert sorted(r.ccdnum for r in report.added) == [25, 26]
    assert {r.calib_date for r in report.added} == {"2013-06-06T00:00:00"} and len(report.files) == 1
    reg = CalibRegistry(tmp_path / "c")
    ct = read_calib(reg.lookup("crosstalk", ccdnum=25, date="2015-01-01"))
    assert ct.amp_names == ("A", "B")
    np.testing.assert_array_equal(ct.coeffs, [[0.0, 3.16e-4], [1.34e-4, 0.0]])  # [victim, source]
    assert set(ct.interchip) == {"S3"}  # ccdnum 27
    np.testing.assert_array_equal(ct.interchip["S3"], [[0.0, 0.0], [0.0, -1.73e-5]])
    ct26 = read_calib(reg.lookup("crosstalk", ccdnum=26, date="2015-01-01"))
    assert not ct26.coeffs.any() and ct26.interchip["S1"][0, 1] == pytest.approx(3.9e-5)
    with pytest.raises(CalibrationError, match="2013-06-06"):
        reg.lookup("crosstalk", ccdnum=26, date="2013-06-05")


def test_defects_fits_table(tmp_path, rng):
    boxes = {35: rng.integers(0, 1000, (7, 4)).astype(np.int32) + 1, 36: np.zeros((0, 4), dtype=np.int32)}
    f = write_defects_fits(tmp_path / "defects.fits", "2016-01-01T00:00:00", boxes)
    report = ingest_calibs(tmp_path / "c", [f])
    assert [(r.ccdnum, r.fmt, r.hdu) for r in report.added] == [(35, "fits-table", 1), (36, "fits-table", 2)]
    reg = CalibRegistry(tmp_path / "c")
    got = read_calib(reg.lookup("defects", ccdnum=35, date="2016-06-01"))
    assert got.dtype == np.int32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, boxes[35])
    assert read_calib(reg.lookup("defects", ccdnum=36, date="2016-06-01")).shape == (0, 4)


def test_reingest_noop_and_move(tmp_path, rng):
    shape = SMALL.trimmed_shape
    f = write_master(tmp_path / "b.fits", "zero", "2015-01-01", {35: noise(rng, shape, 1, 1)})
    root = tmp_path / "c"
    ingest_calibs(root, [f], camera=SMALL)
    before = snapshot(root)
    again = ingest_calibs(root, [f, f], camera=SMALL)
    assert again.n_added == 0 and again.skipped == (str(f),) and snapshot(root) == before
    # A copy of the same content under another name is also a no-op.
    (tmp_path / "copy.fits").write_bytes(f.read_bytes())
    assert ingest_calibs(root, [tmp_path / "copy.fits"], camera=SMALL).n_added == 0
    g = write_master(tmp_path / "moved.fits", "zero", "2016-01-01", {35: noise(rng, shape, 1, 1)})
    rep = ingest_calibs(root, [g], mode="move", camera=SMALL)
    assert not g.exists() and rep.added[0].path.is_file() and not rep.added[0].path.is_symlink()


# --------------------------------------------------------------------------- errors


def test_error_paths_leave_registry_unchanged(tmp_path, rng, real_data):
    shape = SMALL.trimmed_shape
    root = tmp_path / "calibs"
    good = write_master(tmp_path / "good.fits", "zero", "2015-01-01T00:00:00", {35: noise(rng, shape, 1, 1)})
    # A failed first ingest creates nothing at all.
    bad0 = write_master(tmp_path / "noobstype.fits", "zero", "2015-01-02", {35: np.zeros(shape)}, drop=("OBSTYPE",))
    with pytest.raises(IngestError, match=r"noobstype\.fits.*OBSTYPE"):
        ingest_calibs(root, [good, bad0], camera=SMALL)
    assert not root.exists()
    ingest_calibs(root, [good], camera=SMALL)
    before = snapshot(root)
    assert before[0] == 1

    nodate = write_master(tmp_path / "nodate.fits", "zero", "2015-01-02", {35: np.zeros(shape)}, drop=("DATE-OBS",))
    noccd = write_master(tmp_path / "noccd.fits", "zero", "2015-01-02", {35: np.zeros(shape)}, drop=("CCDNUM",))
    noflt = write_master(tmp_path / "noflt.fits", "dome flat", "2015-01-02", {35: np.zeros(shape)})
    full = write_master(tmp_path / "trunc.fits", "zero", "2015-01-03", {35: np.zeros(shape), 36: np.zeros(shape)})
    trunc = tmp_path / "trunc_half.fits"
    trunc.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    unknown = tmp_path / "notes.dat"
    unknown.write_text("hello\n")
    obj = write_master(tmp_path / "object.fits", "object", "2015-01-02", {35: np.zeros(shape)})
    badyaml = tmp_path / "bad.yaml"
    badyaml.write_text("coeffs: [0.0, 1.0\n")
    ecsv = (real_data / "decam_calib/defects/n4/20130115t0130.ecsv").read_text()
    noecsvdate = tmp_path / "nodate.ecsv"
    noecsvdate.write_text(ecsv.replace("# - CALIBDATE: '2013-01-15T01:30:00'\n", ""))
    cases = [
        (nodate, r"nodate\.fits.*DATE-OBS"),
        (noccd, r"noccd\.fits.*HDU 1.*CCDNUM"),
        (noflt, r"noflt\.fits.*FILTER"),
        (trunc, r"trunc_half\.fits.*truncated"),
        (unknown, r"notes\.dat.*unknown calibration file kind"),
        (obj, r"object\.fits.*OBSTYPE='object'"),
        (badyaml, r"bad\.yaml.*not valid YAML"),
        (noecsvdate, r"nodate\.ecsv.*CALIBDATE"),
        (tmp_path / "missing.fits", r"missing\.fits.*no such file"),
    ]
    fresh = write_master(tmp_path / "fresh.fits", "zero", "2016-01-01", {35: np.zeros(shape)})
    for bad, pattern in cases:
        with pytest.raises(IngestError, match=pattern):
            ingest_calibs(root, [fresh, bad], camera=SMALL)  # the good file must not be ingested either
        assert snapshot(root) == before, bad

    # Same (type, ccdnum, filter, date) from a different file: the message names both files.
    dup = write_master(tmp_path / "dup.fits", "zero", "2015-01-01T00:00:00", {35: noise(rng, shape, 9, 1)})
    with pytest.raises(IngestError, match=r"dup\.fits.*good\.fits"):
        ingest_calibs(root, [dup], camera=SMALL)
    other = write_master(tmp_path / "dup2.fits", "zero", "2015-01-01T00:00:00", {35: noise(rng, shape, 5, 1)})
    with pytest.raises(IngestError, match=r"dup2\.fits.*dup\.fits|dup\.fits.*dup2\.fits"):
        ingest_calibs(tmp_path / "elsewhere", [dup, other], camera=SMALL)
    assert snapshot(root) == before and not (tmp_path / "elsewhere").exists()

    with pytest.raises(InputError, match="mode"):
        ingest_calibs(root, [fresh], mode="symlink")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="validity"):
        ingest_calibs(root, [fresh], validity_days=-1)
    assert snapshot(root) == before


def test_registry_errors(tmp_path):
    with pytest.raises(CalibrationError, match="ingest-calibs"):
        CalibRegistry(tmp_path / "nowhere")
    ingest_calibs(tmp_path / "c", [])
    assert not (tmp_path / "c" / "calibRegistry.sqlite3").exists()
    assert CALIB_TYPES == ("bias", "flat", "defects", "crosstalk", "linearizer")


def test_date_parsing():
    assert date_to_mjd("1858-11-17") == 0.0
    assert date_to_mjd("2019-03-05T06:00:00") == pytest.approx(58547.25)
    assert date_to_mjd("20140117t0129") == pytest.approx(date_to_mjd("2014-01-17T01:29:00"))
    assert date_to_mjd(np.float64(58000.5)) == 58000.5
    with pytest.raises(ValueError, match="ISO"):
        date_to_mjd("yesterday")


def test_failed_transaction_rolls_back_files(tmp_path, rng, monkeypatch):
    """A registry write that fails after the files were placed removes them again (fault injected)."""
    import sqlite3

    import apfast.repo.calibs as calibs

    shape = SMALL.trimmed_shape
    root = tmp_path / "c"
    ingest_calibs(root, [write_master(tmp_path / "a.fits", "zero", "2015-01-01", {35: noise(rng, shape, 1, 1)})],
                  camera=SMALL)
    before = snapshot(root)
    b = write_master(tmp_path / "b.fits", "zero", "2015-06-01", {35: noise(rng, shape, 1, 1)})

    def fail(conn, group):
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(calibs, "_recompute_group", fail)
    with pytest.raises(IngestError, match=r"calibRegistry\.sqlite3.*injected.*nothing was ingested"):
        ingest_calibs(root, [b], camera=SMALL)
    assert snapshot(root) == before and b.exists()
    with pytest.raises(IngestError, match="injected"):
        ingest_calibs(tmp_path / "fresh", [b], camera=SMALL, mode="move")
    assert not (tmp_path / "fresh").exists() and b.exists()
