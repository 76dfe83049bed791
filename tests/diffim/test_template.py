"""Templates: build deepCoadd patches on disk, retrieve them for science CCDs (full, half, no coverage)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from astropy.wcs import WCS

from apfast import masks
from apfast.diffim.skymap import make_skymap, read_skymap
from apfast.diffim.template import (
    TemplateConfig,
    build_templates,
    check_template_repository,
    get_template,
    patch_path,
)
from apfast.diffim.warp import WarpedPsf
from apfast.errors import ConfigError, MissingTemplateError, NoWorkFound
from apfast.exposure import Exposure, PhotoCalib, VisitInfo, read_exposure
from apfast.psf import GaussianPsf, PolynomialPixelPsf
from synth import tract_offset_wcs

SCALE = 0.2636
NODATA = masks.bitmask("NO_DATA")
SKYMAP = make_skymap([(150.0, 2.0)], pixel_scale=SCALE, tract_size=800, patch_size=250, overlap=15)
SIGMA = 2.0


def wcs_at(tx: float, ty: float, shape: tuple[int, int], rot: float = 0.0) -> WCS:
    """TAN WCS whose pixel (0, 0) is at tract pixel (tx, ty), rotated by ``rot`` degrees."""
    return tract_offset_wcs(SKYMAP.tract_wcs(0), tx, ty, rot)


def render(wcs, shape, stars, njy_per_count):
    ra, dec, flux = stars
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.zeros(shape)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        img += fi / njy_per_count / (2 * np.pi * SIGMA**2) * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * SIGMA**2))
    return img


@pytest.fixture(scope="module")
def field():
    """Three calexps covering tract pixels ~[150, 560] x [150, 560], built into a template repository."""
    rng = np.random.default_rng(11)
    tw = SKYMAP.tract_wcs(0)
    ra, dec = tw.all_pix2world(rng.uniform(160, 550, 25), rng.uniform(160, 550, 25), 0)
    stars = (ra, dec, rng.uniform(2e4, 1e5, 25))
    calexps = []
    shape = (410, 410)
    for i in range(3):
        w = wcs_at(150 + rng.uniform(0, 3), 150 + rng.uniform(0, 3), shape, rot=rng.uniform(-0.2, 0.2))
        pc = PhotoCalib(30.0 + 0.2 * i)
        img = render(w, shape, stars, pc.njy_per_instflux) + rng.normal(0, 3.0, shape)
        calexps.append(Exposure(img.astype(np.float32), np.zeros(shape, np.int32), np.full(shape, 9.0, np.float32),
                                wcs=w, psf=GaussianPsf(SIGMA, 21), photo_calib=pc,
                                visit_info=VisitInfo(visit=10 + i, ccdnum=3, filter="g")))
    return stars, calexps


@pytest.fixture(scope="module")
def repo(field, tmp_path_factory):
    _, calexps = field
    root = tmp_path_factory.mktemp("templates")
    messages = []
    written = build_templates({"g": calexps}, root, skymap=SKYMAP, progress=messages.append)
    return root, written, messages


def science(tx, ty, shape=(120, 200), visit=4242, ccdnum=17):
    w = wcs_at(tx, ty, shape, rot=0.37)
    return Exposure(np.zeros(shape, np.float32), wcs=w, psf=GaussianPsf(2.5, 21), photo_calib=PhotoCalib(30.0),
                    visit_info=VisitInfo(visit=visit, ccdnum=ccdnum, filter="g"))


def test_build_writes_skymap_and_patches(repo):
    root, written, messages = repo
    assert written[0] == root / "deepCoadd" / "skyMap.json"
    assert read_skymap(root) == SKYMAP
    # calexps cover tract 150..560: patches with index 0..2 on each axis reach it (outer boxes +-15)
    names = sorted(p.relative_to(root).as_posix() for p in written[1:])
    assert names == sorted(f"deepCoadd/g/0/{x},{y}.fits" for x in range(3) for y in range(3))
    assert len(messages) == 9 and "inputs" in messages[0]
    coadd = read_exposure(patch_path(root, "g", 0, "1,1"))
    assert isinstance(coadd.psf, PolynomialPixelPsf)
    assert coadd.photo_calib.zero_point == 31.4
    assert coadd.metadata["NINPUTS"] == 3


def test_fully_covered_ccd(repo, field):
    root, _, _ = repo
    stars, _ = field
    sci = science(230, 300)  # spans patches 0..1 in x and 1 in y: several patches, overlaps averaged
    tmpl = get_template(root, sci, filter="g")
    assert tmpl.shape == sci.shape and tmpl.wcs is sci.wcs
    assert not (tmpl.mask & NODATA).any()
    assert tmpl.metadata["TMPLCOV"] == 1.0
    assert "TMPLP01" in tmpl.metadata  # more than one patch used
    truth = render(sci.wcs, sci.shape, stars, 1.0)
    pull = (tmpl.image - truth) / np.sqrt(tmpl.variance)
    assert abs(pull.mean()) < 0.1
    assert 0.8 < pull.std() < 1.15  # two warps in a row correlate pixels; per-pixel variance stays right
    assert isinstance(tmpl.psf, WarpedPsf)
    st = tmpl.psf.compute_image(100.0, 60.0)
    r = st.shape[0] // 2
    d = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (d[:, None] ** 2 + d[None, :] ** 2) / SIGMA**2)
    np.testing.assert_allclose(st, g / g.sum(), atol=2e-3 * g.max() / g.sum())
    assert tmpl.photo_calib.zero_point == 31.4
    assert tmpl.visit_info.visit == 4242


def test_half_covered_ccd(repo):
    root, _, _ = repo
    # the coadd data end near tract x = 560 (calexps 150..563 minus the warp edge); the CCD spans 460..660
    sci = science(460, 300)
    tmpl = get_template(root, sci, filter="g")
    nod = (tmpl.mask & NODATA) != 0
    cov = tmpl.metadata["TMPLCOV"]
    assert 0.4 < cov < 0.6
    assert not nod[:, :80].any()
    assert nod[:, 120:].all()
    assert np.all(np.isinf(tmpl.variance[nod])) and np.all(tmpl.image[nod] == 0)
    with pytest.raises(NoWorkFound, match="below template.min_coverage=0.7"):
        get_template(root, sci, filter="g", config=TemplateConfig(min_coverage=0.7))


def test_not_covered_raises_no_work_found(repo):
    root, _, _ = repo
    far = science(5000, 5000, visit=99, ccdnum=42)
    with pytest.raises(NoWorkFound) as info:
        get_template(root, far, filter="g")
    msg = str(info.value)
    assert "visit 99 ccdnum 42" in msg and "'g'" in msg and str(root) in msg
    assert "g: 0/0,0" in msg  # lists what the repository has
    assert "looked for dataset deepCoadd, filter 'g', tract/patch" in msg
    with pytest.raises(NoWorkFound, match="filter 'r'.*none of the overlapping patch files"):
        get_template(root, science(230, 300), filter="r")


def test_missing_patch_file_warns_and_leaves_no_data(repo, tmp_path, caplog):
    root, _, _ = repo
    copy = tmp_path / "t"
    shutil.copytree(root, copy)
    (copy / "deepCoadd" / "g" / "0" / "0,1.fits").unlink()
    sci = science(200, 300)  # x 200..400 straddles patches 0 and 1 (inner edge at 250)
    with caplog.at_level(logging.WARNING, logger="apfast.diffim.template"):
        tmpl = get_template(copy, sci, filter="g")
    assert any("0,1.fits" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)
    nod = (tmpl.mask & NODATA) != 0
    assert nod.any() and not nod.all()
    assert not nod[:, 100:].any()  # patch 1,1 (outer from x 235) covers the right part


def test_config_validation():
    with pytest.raises(ConfigError, match="template.min_coverage"):
        TemplateConfig(min_coverage=1.5)
    with pytest.raises(ConfigError, match="template.template_border"):
        TemplateConfig(template_border=-1)


def test_check_template_repository(repo, tmp_path):
    root, _, _ = repo
    check_template_repository(root, ["g"])  # has g patches: fine
    with pytest.raises(MissingTemplateError) as info:
        check_template_repository(root, ["g", "r"])
    msg = str(info.value)
    assert f"--template {root} holds no deepCoadd patch for filter 'r'" in msg
    assert "deepCoadd/FILTER/TRACT/PATCH.fits" in msg and "it has filters g" in msg
    assert "--skip-missing-templates" in msg
    with pytest.raises(MissingTemplateError, match="no sky map .*deepCoadd/skyMap.json"):
        check_template_repository(tmp_path, ["g"])
    with pytest.raises(MissingTemplateError, match="no such folder"):
        check_template_repository(tmp_path / "nope", ["g"])
