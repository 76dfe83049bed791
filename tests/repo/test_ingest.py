"""Raw ingest: registry rows, footprints, re-ingest, modes, and every error path."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits

from apfast.camera import get_camera
from apfast.errors import IngestError
from apfast.repo.fitsutil import image_wcs, scan_headers
from apfast.repo.ingest import ingest_raws, read_raw_file
from apfast.repo.registry import Registry
from apfast.sim.testing import write_decam_raw


def _state(repo: Path) -> tuple[int, list[str]]:
    """Row count and the repository file listing: what must not change after a failed ingest."""
    n = 0
    if (repo / "registry.sqlite3").exists():
        with sqlite3.connect(repo / "registry.sqlite3") as c:
            n = c.execute("SELECT COUNT(*) FROM raw").fetchone()[0]
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) if repo.exists() else []
    return n, files


@pytest.fixture(scope="module")
def raws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("raws")
    return {
        "a": write_decam_raw(d, visit=289401, ccdnums=(34, 35, 36), date_obs="2019-03-05T06:07:08.000"),
        "b": write_decam_raw(d, visit=289402, ccdnums=(35, 36), date_obs="2019-03-05T06:09:10.000", band="r"),
        # a different file that claims visit 289401 ccdnum 35 again
        "dup": write_decam_raw(d / "other", visit=289401, ccdnums=(35,), date_obs="2019-03-05T06:07:08.000",
                               level=2100),
    }


def test_ingest_rows_and_footprint(tmp_path: Path, raws: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    rep = ingest_raws(repo, [raws["a"], raws["b"]])
    assert rep.n_rows == 5
    assert len(rep.ingested) == 2
    with Registry(repo) as reg:
        rows = reg.find({"visit": 289401})
        assert [r["ccdnum"] for r in rows] == [34, 35, 36]
        r = reg.find_one({"visit": 289401, "ccdnum": 35})
        assert r["filter"] == "g"
        assert r["detector"] == "N4"
        assert r["date"] == "2019-03-05"
        assert r["expTime"] == 90.0
        assert r["hdu"] == 2
        assert r["ra"] == pytest.approx(150.0, abs=1e-9)
        assert r["dec"] == pytest.approx(2.0, abs=1e-9)
        assert r["file"] == "raw/2019-03-05/g/" + raws["a"].name
        assert (repo / r["file"]).is_symlink()
        # The footprint matches the header WCS evaluated at the trimmed corners.
        info = scan_headers(raws["a"])[2]
        wcs = image_wcs(info.header, info.image_shape)
        ra, dec = wcs.all_pix2world([56, 2103, 2103, 56], [50, 50, 4145, 4145], 0)
        got_ra = [r[f"corner_ra_{i}"] for i in range(4)]
        got_dec = [r[f"corner_dec_{i}"] for i in range(4)]
        np.testing.assert_allclose(got_ra, ra, atol=1e-9)
        np.testing.assert_allclose(got_dec, dec, atol=1e-9)
        # a DECam CCD is 2048 x 4096 pixels of 0.2636": 0.15 x 0.30 deg
        assert abs(got_ra[1] - got_ra[0]) * np.cos(np.radians(2.0)) == pytest.approx(2047 * 0.2636 / 3600, rel=1e-3)
        assert reg.find({"visit": 289402})[0]["filter"] == "r"
        assert reg.distinct("filter") == ["g", "r"]
    assert (repo / "camera.toml").exists()


def test_reingest_same_file_is_noop(tmp_path: Path, raws: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    ingest_raws(repo, [raws["a"]])
    before = _state(repo)
    rep = ingest_raws(repo, [raws["a"]])
    assert rep.n_rows == 0
    assert rep.already_present == (raws["a"],)
    assert _state(repo) == before


def test_different_file_same_dataid_names_both(tmp_path: Path, raws: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    ingest_raws(repo, [raws["a"]])
    before = _state(repo)
    with pytest.raises(IngestError) as exc:
        ingest_raws(repo, [raws["dup"]])
    msg = str(exc.value)
    assert str(raws["dup"]) in msg
    assert str(raws["a"].resolve()) in msg
    assert "visit=289401 ccdnum=35" in msg
    assert _state(repo) == before


def test_two_files_in_one_call_claiming_one_dataid(tmp_path: Path, raws: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(IngestError, match="both claim visit=289401 ccdnum=35"):
        ingest_raws(repo, [raws["a"], raws["dup"]])
    assert _state(repo)[0] == 0


def test_truncated_file_leaves_registry_unchanged(tmp_path: Path, raws: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    ingest_raws(repo, [raws["b"]])
    before = _state(repo)
    bad = tmp_path / "c4d_190305_999999_ori.fits.fz"
    data = raws["a"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError) as exc:
        ingest_raws(repo, [raws["a"], bad])  # the good file must not land either
    assert str(bad) in str(exc.value)
    assert "truncated" in str(exc.value)
    assert _state(repo) == before


def test_not_fits(tmp_path: Path) -> None:
    bad = tmp_path / "notes.fits.fz"
    bad.write_bytes(b"hello world" * 400)
    with pytest.raises(IngestError, match="not a FITS file"):
        ingest_raws(tmp_path / "repo", [bad])


@pytest.mark.parametrize(
    ("where", "key"),
    [("primary", "EXPNUM"), ("primary", "FILTER"), ("primary", "DATE-OBS"), ("primary", "EXPTIME"),
     ("primary", "MJD-OBS"), ("extension", "CCDNUM")],
)
def test_missing_keyword_named(tmp_path: Path, where: str, key: str) -> None:
    over = {key: None}
    path = write_decam_raw(
        tmp_path, visit=1, ccdnums=(35,),
        primary_overrides=over if where == "primary" else None,
        extension_overrides=over if where == "extension" else None,
    )
    repo = tmp_path / "repo"
    with pytest.raises(IngestError) as exc:
        ingest_raws(repo, [path])
    assert str(path.name) in str(exc.value)
    assert key in str(exc.value)
    assert _state(repo)[0] == 0


def test_bad_keyword_value_named(tmp_path: Path) -> None:
    path = write_decam_raw(tmp_path, visit=1, primary_overrides={"EXPNUM": "abc"})
    with pytest.raises(IngestError, match=r"EXPNUM = 'abc' is not a valid visit number"):
        ingest_raws(tmp_path / "repo", [path])
    path = write_decam_raw(tmp_path, visit=1, primary_overrides={"DATE-OBS": "yesterday"})
    with pytest.raises(IngestError, match="DATE-OBS = 'yesterday' is not an ISO date"):
        ingest_raws(tmp_path / "repo", [path])


def test_bad_section_named(tmp_path: Path) -> None:
    path = write_decam_raw(tmp_path, visit=1, extension_overrides={"DATASECA": "[1081:2104,51:9999]"})
    with pytest.raises(IngestError, match="DATASECA|lies outside"):
        ingest_raws(tmp_path / "repo", [path])


def test_foreign_instrument(tmp_path: Path) -> None:
    path = write_decam_raw(tmp_path, visit=1, primary_overrides={"INSTRUME": "Mosaic3"})
    with pytest.raises(IngestError, match="not a DECam raw.*Mosaic3"):
        ingest_raws(tmp_path / "repo", [path])


def test_modes(tmp_path: Path) -> None:
    src = write_decam_raw(tmp_path / "in", visit=7, ccdnums=(1,))
    ingest_raws(tmp_path / "copy", [src], mode="copy")
    with Registry(tmp_path / "copy") as reg:
        dest = tmp_path / "copy" / reg.find_one({"visit": 7, "ccdnum": 1})["file"]
    assert dest.is_file() and not dest.is_symlink()
    assert dest.read_bytes() == src.read_bytes()
    ingest_raws(tmp_path / "move", [src], mode="move")
    assert not src.exists()
    with Registry(tmp_path / "move") as reg:
        moved = tmp_path / "move" / reg.find_one({"visit": 7, "ccdnum": 1})["file"]
    assert moved.is_file()


def test_guide_ccds_skipped(tmp_path: Path) -> None:
    path = write_decam_raw(tmp_path, visit=5, ccdnums=(35,))
    with fits.open(path) as hdul:
        guide = fits.CompImageHDU(data=np.zeros((4146, 2160), np.uint16), header=hdul[1].header.copy(),
                                  compression_type="RICE_1")
        guide.header["CCDNUM"] = 63
        guide.header["EXTNAME"] = "FS1"
        hdus = [hdul[0].copy(), fits.CompImageHDU(data=hdul[1].data, header=hdul[1].header), guide]
        fits.HDUList(hdus).writeto(tmp_path / "with_guide.fits.fz")
    rep = ingest_raws(tmp_path / "repo", [tmp_path / "with_guide.fits.fz"])
    assert rep.n_rows == 1
    assert len(rep.skipped_hdus) == 1 and "CCDNUM=63" in rep.skipped_hdus[0]


def test_read_raw_file_native_float32(tmp_path: Path) -> None:
    path = write_decam_raw(tmp_path, visit=3, ccdnums=(35,), level=1234)
    ingest_raws(tmp_path / "repo", [path])
    with Registry(tmp_path / "repo") as reg:
        row = reg.find_one({"visit": 3, "ccdnum": 35})
    img, primary, ext = read_raw_file(tmp_path / "repo", row)
    assert img.dtype == np.float32 and img.dtype.isnative and img.flags.c_contiguous
    assert img.shape == (4146, 2160)
    assert np.all(img == 1234)
    assert primary["EXPNUM"] == 3 and ext["CCDNUM"] == 35


def _real_header_file(real_data: Path, out: Path) -> Path:
    """A file carrying the real DECam raw header (primary and CCD cards) with flat pixels."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    with (real_data / "decam_calib" / "raw_header_example.yaml").open() as fh:
        cards = yaml.load(fh, Loader=Loader)  # a SafeLoader subclass
    primary, ext, in_ext = fits.Header(), fits.Header(), False
    skip = {"SIMPLE", "EXTEND", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT", "TFIELDS",
            "TTYPE1", "TFORM1", "CHECKSUM", "DATASUM", "BZERO", "BSCALE"}
    for k, v in cards.items():
        if k == "XTENSION":
            in_ext = True
        if k in skip or k.startswith("Z") or v is None or len(k) > 8:
            continue
        (ext if in_ext else primary)[k] = v
    data = np.full((4146, 2160), 3000, np.uint16)
    fits.HDUList([fits.PrimaryHDU(header=primary),
                  fits.CompImageHDU(data=data, header=ext, compression_type="RICE_1")]).writeto(out)
    return out


def test_real_decam_header(tmp_path: Path, real_data: Path) -> None:
    path = _real_header_file(real_data, tmp_path / "c4d_130213_090140_ori.fits.fz")
    ingest_raws(tmp_path / "repo", [path])
    with Registry(tmp_path / "repo") as reg:
        r = reg.find_one({"visit": 177764})
    assert (r["ccdnum"], r["detector"], r["filter"], r["date"]) == (25, "S1", "g", "2013-02-13")
    assert r["expTime"] == 30.0
    assert r["object"] == "Trifid and Lagoon"
    assert r["airmass"] == pytest.approx(1.77)
    # TELRA 18:02:42.907 -> 270.679 deg; per its TPV header WCS, S1's centre lies ~0.93 deg (12,700 px) from
    # the tangent point at the boresight.
    assert r["ra"] == pytest.approx(270.67878, abs=1e-4)
    assert r["dec"] == pytest.approx(-23.78330, abs=1e-4)
    sep = np.hypot((r["ra_center"] - r["ra"]) * np.cos(np.radians(r["dec"])), r["dec_center"] - r["dec"])
    assert sep == pytest.approx(12728 * 0.2626 / 3600, rel=0.03)
    corners = np.array([[r[f"corner_ra_{i}"], r[f"corner_dec_{i}"]] for i in range(4)])
    span = np.ptp(corners, axis=0)
    # S1's long axis runs along RA on the sky (CD1_2, CD2_1 dominate): 0.30 x 0.15 deg, with TPV distortion.
    short, long = sorted((span * [np.cos(np.radians(-23.78)), 1]).tolist())
    assert short == pytest.approx(2047 * 0.2636 / 3600, rel=0.03)
    assert long == pytest.approx(4095 * 0.2636 / 3600, rel=0.03)


def test_generic_camera_saao(tmp_path: Path, real_data: Path) -> None:
    cam_toml = Path(get_camera.__module__.replace(".", "/"))  # noqa: F841 - documents where the example lives
    from apfast import camera as camera_pkg

    toml_path = Path(camera_pkg.__file__).parent / "generic_example.toml"
    raw = real_data / "raw_saao" / "a8280271.fits"
    repo = tmp_path / "saao"
    rep = ingest_raws(repo, [raw], camera=str(toml_path))
    assert rep.n_rows == 1
    with Registry(repo) as reg:
        assert reg.camera.name == "SAAO-STE3"
        r = reg.find_one({"visit": 8280271})
    assert (r["ccdnum"], r["filter"], r["date"], r["hdu"]) == (1, "48", "2013-07-13", 0)
    assert r["expTime"] == pytest.approx(150.04)
    assert r["airmass"] == pytest.approx(1.176)
    assert r["ra"] == pytest.approx(331.0334)
    assert r["ra_center"] is None  # no WCS in this header
    # a DECam raw cannot join the SAAO repository
    decam = write_decam_raw(tmp_path, visit=1)
    with pytest.raises(IngestError, match="not a SAAO-STE3 raw"):
        ingest_raws(repo, [decam])
    with pytest.raises(IngestError, match="cannot also take DECam"):
        ingest_raws(repo, [decam], camera="DECam")


def test_registry_select_and_messages(tmp_path: Path, raws: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    ingest_raws(repo, [raws["a"], raws["b"]])
    with Registry(repo) as reg:
        rows = reg.select([{"visit": [289401, 289402], "ccdnum": [35, 36]}, {"visit": [289401], "ccdnum": [34]}])
        assert [(r["visit"], r["ccdnum"]) for r in rows] == [(289401, 34), (289401, 35), (289401, 36),
                                                           (289402, 35), (289402, 36)]
        from apfast.errors import DataIdError

        with pytest.raises(DataIdError) as exc:
            reg.select([{"visit": [289402], "ccdnum": [34]}])
        assert "ccdnum=34" in str(exc.value) and "available ccdnum: 35, 36" in str(exc.value)
        with pytest.raises(DataIdError, match="available filter: g, r"):
            reg.select([{"filter": ["z"]}])
        with pytest.raises(DataIdError, match="not a registry column"):
            reg.find({"visit; DROP TABLE raw": [1]})
        # a hostile value is a bound parameter: no match, and the table survives
        with pytest.raises(DataIdError):
            reg.select([{"filter": ["g'; DROP TABLE raw;--"]}])
        assert reg.count() == 5


def test_missing_registry_message(tmp_path: Path) -> None:
    from apfast.errors import InputError

    with pytest.raises(InputError, match="apfast ingest"):
        Registry(tmp_path / "nothing")


def test_copy_failure_rolls_back(tmp_path: Path, raws: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """If placing the second file fails, the first placed file is removed and no rows land."""
    repo = tmp_path / "repo"
    import apfast.repo.ingest as ingest_mod

    calls = {"n": 0}
    real = shutil.copyfile

    def flaky(src: str, dst: str, *a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ingest_mod.shutil, "copyfile", flaky)
    with pytest.raises(OSError, match="No space"):
        ingest_raws(repo, [raws["a"], raws["b"]], mode="copy")
    n, files = _state(repo)
    assert n == 0
    assert not [f for f in files if f.endswith(".fz")]
