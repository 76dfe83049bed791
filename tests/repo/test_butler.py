"""Repository chaining, config persistence and the Butler (apfast.repo.repository, apfast.repo.butler)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from apfast.errors import ConfigError, DataIdError, InputError, NoLocationsError
from apfast.exposure import Background, Exposure, PhotoCalib, read_exposure
from apfast.psf import GaussianPsf
from apfast.repo.butler import DATASET_TYPES, Butler, register_dataset_type
from apfast.repo.repository import Repository, create_output_repo, write_config

registry_mod = pytest.importorskip("apfast.repo.registry")
ingest_mod = pytest.importorskip("apfast.repo.ingest")
testing_mod = pytest.importorskip("apfast.sim.testing")

V1, V2 = 289401, 289402


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("raws")
    return [
        testing_mod.write_decam_raw(
            d, visit=V1, ccdnums=(35, 36), band="g", date_obs="2019-03-05T06:07:08.000", level=1234
        ),
        testing_mod.write_decam_raw(d, visit=V2, ccdnums=(35,), band="r", date_obs="2019-03-06T06:00:00.000"),
    ]


@pytest.fixture
def root(tmp_path, raw_files) -> Path:
    repo = tmp_path / "repo"
    ingest_mod.ingest_raws(repo, raw_files, mode="link")
    return repo


def small_exposure(value: float) -> Exposure:
    return Exposure(
        np.full((6, 5), value, dtype=np.float32), psf=GaussianPsf(1.5, 11), photo_calib=PhotoCalib(30.0)
    )


# ----------------------------------------------------------------------------- repositories
def test_rerun_chaining_put_and_get(root):
    Butler(root).put(small_exposure(1.0), "calexp", visit=V1, ccdnum=35)  # a root-level dataset
    out_a = create_output_repo(root, rerun="a")
    assert out_a == (root / "rerun" / "a").resolve()
    cfg = json.loads((out_a / "repositoryCfg.json").read_text())
    assert cfg["parents"] == [str(root.resolve())] and cfg["mode"] == "rerun"
    ba = Butler(out_a)
    assert ba.repo.chain == [out_a, root.resolve()] and ba.repo.root == root.resolve()
    # root-level dataset visible from the rerun
    assert ba.get("calexp", visit=V1, ccdnum=35).image[0, 0] == 1.0
    # a put into the rerun shadows it there, not in the root
    p = ba.put(small_exposure(2.0), "calexp", dict(visit=V1, ccdnum=35))
    assert p.parent.parent.parent == out_a
    assert ba.get("calexp", visit=V1, ccdnum=35).image[0, 0] == 2.0
    assert Butler(root).get("calexp", visit=V1, ccdnum=35).image[0, 0] == 1.0
    # IN:OUT chains b -> a -> root
    out_b = create_output_repo(root, rerun="a:b")
    bb = Butler(out_b)
    assert bb.repo.chain == [out_b, out_a, root.resolve()]
    assert bb.get("calexp", visit=V1, ccdnum=35).image[0, 0] == 2.0
    bb.put(small_exposure(3.0), "calexp", visit=V1, ccdnum=36)
    assert bb.datasetExists("calexp", visit=V1, ccdnum=36)
    assert not ba.datasetExists("calexp", visit=V1, ccdnum=36)
    assert bb.getUri("calexp", visit=V1, ccdnum=35) == str(out_a / "0289401/calexp/calexp-0289401_35.fits")
    # re-opening with the same parent is fine; with another parent is an error naming both
    assert create_output_repo(root, rerun="a:b") == out_b
    with pytest.raises(ConfigError) as err:
        create_output_repo(root, rerun="b")
    assert str(out_a) in str(err.value) and str(root.resolve()) in str(err.value)
    with pytest.raises(InputError, match="run --rerun nope first"):
        create_output_repo(root, rerun="nope:c")


def test_output_repo_standalone(root, tmp_path):
    out = create_output_repo(root, output=tmp_path / "elsewhere" / "out")
    b = Butler(out)
    assert b.repo.chain == [out, root.resolve()] and b.repo.write_root == out
    path = b.put(small_exposure(5.0), "postISRCCD", visit=V1, ccdnum=35)
    assert path == out / "0289401/postISRCCD/postISRCCD-0289401_35.fits"
    assert not (root / "0289401").exists()
    assert b.queryMetadata("raw", "visit") == [V1, V2]  # the root's registry is reached through the chain
    with pytest.raises(ConfigError, match="mutually exclusive"):
        create_output_repo(root, rerun="x", output=tmp_path / "y")
    with pytest.raises(ConfigError, match="not a valid name"):
        create_output_repo(root, rerun="../evil")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        create_output_repo(root, output=tmp_path / "junk")


def test_missing_parent_and_no_registry(root, tmp_path):
    out = create_output_repo(root, rerun="a")
    cfg = json.loads((out / "repositoryCfg.json").read_text())
    cfg["parents"] = [str(tmp_path / "gone")]
    (out / "repositoryCfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="gone"):
        Repository(out)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InputError, match="registry.sqlite3"):
        _ = Repository(plain).root
    with pytest.raises(InputError, match="does not exist"):
        Butler(tmp_path / "nothing")


def test_write_config(root):
    out = create_output_repo(root, rerun="cfg")
    text = "[isr]\ndo_bias = true\nsat = 44000\n\n[difference.psfmatch]\nkernel = 11\n"
    sha = write_config(out, text)
    assert (out / "config/apfast.toml").read_text() == text
    assert (out / "config/apfast.toml.sha256").read_text().strip() == sha and len(sha) == 64
    assert write_config(Repository(out), text) == sha  # same config: no-op
    changed = text.replace("kernel = 11", "kernel = 9").replace("do_bias = true", "do_bias = false")
    with pytest.raises(ConfigError, match="clobber-config") as err:
        write_config(out, changed)
    assert "difference.psfmatch.kernel 11 -> 9" in str(err.value) and "isr.do_bias true -> false" in str(err.value)
    assert "isr.sat" not in str(err.value)
    assert (out / "config/apfast.toml").read_text() == text
    sha2 = write_config(out, changed, clobber=True)
    assert sha2 != sha and (out / "config/apfast.toml").read_text() == changed
    # exposures put afterwards carry the config sha
    b = Butler(out)
    path = b.put(small_exposure(1.0), "calexp", visit=V1, ccdnum=35)
    assert fits.getheader(path)["CFGSHA"] == sha2
    assert b.get("config") == changed


def test_write_config_ignores_non_product_keys(root):
    out = create_output_repo(root, rerun="cfg_np")
    text = '[apdb]\ndb_url = "sqlite:///a.db"\n\n[process]\nn_threads = 0\n\n[difference.psfmatch]\nkernel_size = 21\n'
    write_config(out, text)
    other = text.replace("a.db", "b.db").replace("n_threads = 0", "n_threads = 4") + "[apdb.x]\ny = 1\n"
    sha = write_config(out, other)  # only apdb/process keys differ: no --clobber-config needed
    assert (out / "config/apfast.toml").read_text() == other  # the full config is stored
    assert (out / "config/apfast.toml.sha256").read_text().strip() == sha
    with pytest.raises(ConfigError) as err:
        write_config(out, other.replace("kernel_size = 21", "kernel_size = 25").replace("b.db", "c.db"))
    msg = str(err.value)
    assert "config/apfast.toml holds a different configuration: difference.psfmatch.kernel_size 21 -> 25;" in msg
    assert "pass --clobber-config" in msg and "apdb" not in msg


# ----------------------------------------------------------------------------- errors and safety
def test_no_locations_message(root):
    out = create_output_repo(root, rerun="a")
    b = Butler(out)
    with pytest.raises(NoLocationsError) as err:
        b.get("calexp", visit=V1, ccdnum=35)
    msg = str(err.value)
    assert msg.startswith("No locations for get:")
    assert "calexp" in msg and str(V1) in msg and "ccdnum" in msg
    for repo in (out, root.resolve()):
        assert str(repo / "0289401/calexp/calexp-0289401_35.fits") in msg
    assert not b.datasetExists("calexp", visit=V1, ccdnum=35)
    # the path put would write
    assert b.getUri("calexp", visit=V1, ccdnum=35) == str(out / "0289401/calexp/calexp-0289401_35.fits")
    with pytest.raises(NoLocationsError, match=r"^No locations for get: datasetType:raw .*registry\.sqlite3"):
        b.get("raw", visit=999, ccdnum=35)


def test_unknown_dataset_type_suggests(root):
    with pytest.raises(InputError) as err:
        Butler(root).get("calexpp", visit=V1, ccdnum=35)
    msg = str(err.value)
    assert "did you mean 'calexp'?" in msg
    listed = msg.split("known dataset types: ")[1].split(", ")
    assert listed[0] == "calexp" and set(listed) == set(DATASET_TYPES)


def test_missing_template_key(root):
    b = Butler(root)
    with pytest.raises(DataIdError, match="needs dataId key.*ccdnum"):
        b.get("calexp", visit=V1)
    with pytest.raises(DataIdError, match="patch"):
        b.get("deepCoadd", filter="g", tract=0)


@pytest.mark.parametrize("bad", ["../etc", "a/b", ".hidden", "x\x00y", "..", "", "a\\b"])
def test_path_traversal_rejected(root, bad):
    b = Butler(root)
    with pytest.raises(InputError, match=re.escape(f"filter={bad!r}")):
        b.get("deepCoadd", filter=bad, tract=0, patch="1,1")
    with pytest.raises(InputError, match="filter"):
        b.put(small_exposure(1.0), "deepCoadd", filter=bad, tract=0, patch="1,1")


def test_int_keys_are_formatted_as_ints(root):
    b = Butler(root)
    assert b.getUri("calexp", visit="289401", ccdnum=np.int64(7)).endswith(
        "0289401/calexp/calexp-0289401_07.fits"
    )
    for bad in ("../1", "1/2", 1.5, True, None):
        with pytest.raises(InputError, match="must be an integer"):
            b.getUri("calexp", visit=bad, ccdnum=7)
    with pytest.raises(InputError, match="must be an integer"):
        b.getUri("deepCoadd", filter="g", tract="../0", patch="1,1")


def test_put_type_checks_and_read_only_types(root):
    b = Butler(root)
    with pytest.raises(InputError, match="expected"):
        b.put(np.zeros((3, 3)), "calexp", visit=V1, ccdnum=35)
    with pytest.raises(InputError, match="ingest"):
        b.put(np.zeros((3, 3)), "raw", visit=V1, ccdnum=35)


# ----------------------------------------------------------------------------- storages
def test_catalog_background_json_round_trip(root, rng):
    b = Butler(create_output_repo(root, rerun="s"))
    t = Table(
        {
            "id": np.arange(5, dtype=np.int64),
            "flux": rng.normal(size=5).astype(np.float32),
            "ra": rng.uniform(0, 360, 5),
        }
    )
    t["ra"].unit = "deg"
    t.meta.update({"NSRC": 5, "THRESH": 5.0, "STAGE": "detect", "lower": 1, "matrix": [[1, 2], [3, 4]]})
    b.put(t, "src", visit=V1, ccdnum=35)
    back = b.get("src", visit=V1, ccdnum=35)
    assert back.colnames == ["id", "flux", "ra"] and back["flux"].dtype == np.float32
    assert all(back[c].dtype.isnative for c in back.colnames)
    assert all(np.array_equal(back[c], t[c]) for c in t.colnames)
    assert str(back["ra"].unit) == "deg"
    assert dict(back.meta) == t.meta
    bkg = Background(
        bin_size=128, values=np.arange(6, dtype=np.float32).reshape(2, 3), image_shape=(256, 384)
    )
    b.put(bkg, "calexpBackground", visit=V1, ccdnum=35)
    got = b.get("calexpBackground", visit=V1, ccdnum=35)
    assert np.array_equal(got.values, bkg.values) and got.bin_size == 128
    b.put({"visit": V1, "n": np.int64(3), "done": True}, "apdb_marker", visit=V1, ccdnum=35)
    assert b.get("apdb_marker", visit=V1, ccdnum=35) == {"visit": V1, "n": 3, "done": True}
    assert (b.repo.path / "apdb_marker/0289401_35.json").is_file()
    assert b.getUri("deepDiff_diaSrc", visit=V1, ccdnum=5).endswith("deepDiff/v289401/diaSrc-05.fits")


def test_template_repo(root, tmp_path):
    tmpl = tmp_path / "templates"
    tmpl.mkdir()
    Butler(tmpl).put(small_exposure(7.0), "deepCoadd", filter="g", tract=0, patch="3,4")
    Butler(tmpl).put({"tracts": 1}, "deepCoadd_skyMap")
    assert (tmpl / "deepCoadd/g/0/3,4.fits").is_file()
    b = Butler(create_output_repo(root, rerun="d"), template=tmpl)
    assert b.get("deepCoadd", filter="g", tract=0, patch="3,4").image[0, 0] == 7.0
    assert b.get("deepCoadd_skyMap") == {"tracts": 1}
    with pytest.raises(NoLocationsError, match=re.escape(str(tmpl.resolve() / "deepCoadd/r/0/3,4.fits"))):
        b.get("deepCoadd", filter="r", tract=0, patch="3,4")
    # a template-only repository (no registry) names a missing key instead of failing on the registry
    with pytest.raises(DataIdError, match="patch"):
        Butler(tmpl).get("deepCoadd", filter="g", tract=0, visit=V1)
    # without --template the chain is searched (and does not have it)
    with pytest.raises(NoLocationsError):
        Butler(root).get("deepCoadd", filter="g", tract=0, patch="3,4")


def test_register_dataset_type(root):
    register_dataset_type("testOnly_thing", "things/{visit:07d}-{filter}.json", "Json")
    register_dataset_type("testOnly_thing", "things/{visit:07d}-{filter}.json", "Json")  # same: fine
    with pytest.raises(InputError, match="already registered"):
        register_dataset_type("testOnly_thing", "other/{visit}.json", "Json")
    with pytest.raises(InputError, match="unknown storage"):
        register_dataset_type("testOnly_bad", "x.fits", "Nope")
    b = Butler(root)
    # filter is not in the dataId: taken from the raw registry row of the visit
    path = b.put({"a": 1}, "testOnly_thing", visit=V2, ccdnum=35)
    assert path.name == "0289402-r.json"
    del DATASET_TYPES["testOnly_thing"]


# ----------------------------------------------------------------------------- registries
def test_query_metadata(root):
    b = Butler(root)
    assert b.queryMetadata("raw", "visit") == [V1, V2]
    assert b.queryMetadata("raw", ["visit", "ccdnum"], dict(filter="g")) == [(V1, 35), (V1, 36)]
    assert b.queryMetadata("calexp", ("ccdnum", "filter"), visit=V2) == [(35, "r")]
    assert b.queryMetadata("raw", "filter") == ["g", "r"]
    assert b.queryMetadata("raw", "visit", filter="z") == []
    with pytest.raises(DataIdError, match="nope"):
        b.queryMetadata("raw", ["visit", "nope"])


def test_get_raw(root):
    exp = Butler(create_output_repo(root, rerun="r")).get("raw", visit=V1, ccdnum=36)
    assert exp.shape == (4146, 2160) and exp.image.dtype == np.float32 and exp.image.dtype.isnative
    assert np.all(exp.image == 1234.0)
    assert exp.metadata["EXPNUM"] == V1 and exp.metadata["CCDNUM"] == 36  # primary + extension merged
    assert exp.metadata["DETPOS"] == "N5" and "DATASECA" in exp.metadata
    vi = exp.visit_info
    assert (vi.visit, vi.ccdnum, vi.filter, vi.camera, vi.exptime) == (V1, 36, "g", "DECam", 90.0)
    assert exp.wcs is not None and exp.wcs.wcs.ctype[0] == "RA---TAN"
    with pytest.raises(DataIdError, match="matches 2 raw rows"):
        Butler(root).get("raw", visit=V1)


def test_get_calib_through_calib_registry(root, real_data):
    calibs = pytest.importorskip("apfast.repo.calibs")
    n4 = sorted((real_data / "decam_calib/defects/n4").glob("*.ecsv"))
    calibs.ingest_calibs(root / "calibs", n4)
    b = Butler(create_output_repo(root, rerun="c"))
    boxes = b.get("defects", visit=V1, ccdnum=35)
    assert boxes.dtype == np.int32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    ref = calibs.CalibRegistry(root / "calibs").lookup("defects", ccdnum=35, date="2019-03-05T06:07:08")
    assert b.getUri("defects", visit=V1, ccdnum=35) == str(ref.path)
    assert np.array_equal(boxes, calibs.read_calib(ref))
    assert b.datasetExists("defects", visit=V1, ccdnum=35)
    with pytest.raises(
        NoLocationsError, match=r"^No locations for get: datasetType:defects .*calibRegistry"
    ) as err:
        b.get("defects", visit=V1, ccdnum=36)  # no defects ingested for N5
    assert "ccdnum=36" in str(err.value)
    with pytest.raises(NoLocationsError, match="^No locations for get: datasetType:flat"):
        b.get("flat", visit=V1, ccdnum=35)
    assert not b.datasetExists("bias", visit=V1, ccdnum=35)


def test_round_trip_through_butler_keeps_exposure(root):
    b = Butler(create_output_repo(root, rerun="e"))
    exp = small_exposure(4.0)
    b.put(exp, "deepDiff_differenceExp", visit=V1, ccdnum=35)
    path = Path(b.getUri("deepDiff_differenceExp", visit=V1, ccdnum=35))
    assert path.relative_to(b.repo.path).as_posix() == "deepDiff/v289401/diffexp-35.fits"
    back = read_exposure(path)
    assert back.psf == exp.psf and back.photo_calib == exp.photo_calib
