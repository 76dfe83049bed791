"""Sky map geometry: patch tiling and overlap, patches of a CCD (corners and edges), tracts, JSON."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from apfast.diffim.skymap import (
    SkyMap,
    make_skymap,
    overlap_bbox,
    read_skymap,
    skymap_for_calexps,
    write_skymap,
)
from apfast.errors import InputError

SCALE = 0.2636


def ccd_wcs(ra: float, dec: float, shape: tuple[int, int], *, rot: float = 0.0) -> WCS:
    """TAN WCS centred on (ra, dec) at the CCD centre, DECam pixel scale, rotated by ``rot`` degrees."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(shape[1] - 1) / 2 + 1, (shape[0] - 1) / 2 + 1]
    s = SCALE / 3600
    c, sn = np.cos(np.radians(rot)), np.sin(np.radians(rot))
    w.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
    w.wcs.set()
    return w


def brute_patches(sm: SkyMap, wcs: WCS, shape: tuple[int, int]) -> set[tuple[int, str]]:
    """Patches containing any of a dense set of CCD pixel-edge points (the slow, obvious answer)."""
    ny, nx = shape
    xs = np.arange(-0.5, nx, 1.0)
    ys = np.arange(-0.5, ny, 1.0)
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    out = set()
    for t in range(sm.n_tracts):
        x, y, ok = sm.tract_pixels(t, ra, dec)
        for name in sm.patch_names(t):
            y0, y1, x0, x1 = sm.patch_bbox(t, name)
            inside = ok & (x >= x0 - 0.5) & (x <= x1 - 0.5) & (y >= y0 - 0.5) & (y <= y1 - 0.5)
            if inside.any():
                out.add((t, name))
    return out


def test_patches_tile_the_tract_and_overlap():
    sm = make_skymap([(150.0, 2.0)], pixel_scale=SCALE, tract_size=1050, patch_size=400, overlap=30)
    assert sm.n_patches == 3
    cover = np.zeros((1050, 1050), int)
    for name in sm.patch_names(0):
        y0, y1, x0, x1 = sm.patch_inner_bbox(0, name)
        cover[y0:y1, x0:x1] += 1
    assert np.all(cover == 1)  # inner boxes tile the tract exactly once
    assert sm.patch_bbox(0, "1,1") == (370, 830, 370, 830)
    assert sm.patch_bbox(0, "0,0") == (0, 430, 0, 430)  # clipped at the tract edge
    assert sm.patch_bbox(0, "2,2") == (770, 1050, 770, 1050)
    # neighbours share 2 * overlap columns
    a, b = sm.patch_bbox(0, "0,1"), sm.patch_bbox(0, "1,1")
    assert a[3] - b[2] == 60


def test_patch_wcs_matches_tract_wcs():
    sm = make_skymap([(150.0, 2.0)], pixel_scale=SCALE, tract_size=1000, patch_size=400, overlap=20)
    tw = sm.tract_wcs(0)
    pw, shape = sm.patch_wcs(0, "2,1")
    y0, y1, x0, x1 = sm.patch_bbox(0, "2,1")
    assert shape == (y1 - y0, x1 - x0)
    a = np.array(pw.pixel_to_world_values([0.0, 17.5], [0.0, 3.0]))
    b = np.array(tw.pixel_to_world_values([x0, x0 + 17.5], [y0, y0 + 3.0]))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # the tract centre pixel is the tract centre; the pixel scale is the requested one
    np.testing.assert_allclose(tw.pixel_to_world_values(499.5, 499.5), (150.0, 2.0), atol=1e-12)
    np.testing.assert_allclose(np.abs(np.diag(tw.pixel_scale_matrix)) * 3600, SCALE, rtol=1e-12)


@pytest.mark.parametrize(
    ("dx", "dy", "rot", "expected_n"),
    [
        (0, 0, 0.0, 1),  # well inside patch 1,1
        (-200, -200, 0.0, 4),  # centred on a patch corner
        (-200, 0, 30.0, 2),  # rotated, straddling a vertical patch edge
        (-290, -290, 45.0, None),  # only a corner pokes into the neighbours
    ],
)
def test_find_patches_matches_brute_force(dx, dy, rot, expected_n):
    sm = make_skymap([(150.0, 2.0)], pixel_scale=SCALE, tract_size=1200, patch_size=400, overlap=10)
    tw = sm.tract_wcs(0)
    ra, dec = tw.pixel_to_world_values(600 + dx, 600 + dy)
    shape = (120, 60)
    w = ccd_wcs(float(ra), float(dec), shape, rot=rot)
    found = sm.find_tracts_patches(w, shape)
    assert set(found) == brute_patches(sm, w, shape)
    if expected_n is not None:
        assert len(found) == expected_n


def test_corner_only_overlap_is_found():
    """A rotated CCD whose centre patch is 1,1 but whose corner crosses into 0,0 (DM-29703)."""
    sm = make_skymap([(150.0, 2.0)], pixel_scale=SCALE, tract_size=1200, patch_size=400, overlap=0)
    tw = sm.tract_wcs(0)
    shape = (100, 100)
    # centre 60 px from both edges of patch 1,1's lower-left corner; rotated 45 deg the half-diagonal is 70.7 px
    ra, dec = tw.pixel_to_world_values(460.0, 460.0)
    w = ccd_wcs(float(ra), float(dec), shape, rot=45.0)
    found = set(sm.find_tracts_patches(w, shape))
    assert (0, "1,1") in found
    assert found == brute_patches(sm, w, shape)
    assert {(0, "0,1"), (0, "1,0")} <= found
    # the diamond's bounding box reaches patch 0,0, the CCD itself does not
    assert (0, "0,0") not in found


def test_ccd_straddling_two_tracts():
    # two tracts 1000 px (at 0.2636") apart in RA at the equator, each 1100 px wide: they overlap by 100 px
    sep = 1000 * SCALE / 3600
    sm = make_skymap([(30.0, 0.0), (30.0 + sep, 0.0)], pixel_scale=SCALE, tract_size=1100, patch_size=400, overlap=10)
    shape = (100, 300)
    w = ccd_wcs(30.0 + sep / 2, 0.0, shape)
    found = sm.find_tracts_patches(w, shape)
    assert {t for t, _ in found} == {0, 1}
    assert set(found) == brute_patches(sm, w, shape)
    far = ccd_wcs(40.0, 0.0, shape)
    assert sm.find_tracts_patches(far, shape) == []


def test_json_round_trip(tmp_path):
    sm = make_skymap([(150.0, 2.0), (10.123456789012345, -45.5)], pixel_scale=SCALE, tract_size=9001,
                     patch_size=4000, overlap=100)
    again = SkyMap.from_json(sm.to_json())
    assert again == sm
    path = write_skymap(tmp_path, sm)
    assert path == tmp_path / "deepCoadd" / "skyMap.json"
    assert read_skymap(tmp_path) == sm
    assert read_skymap(tmp_path).tract_wcs(1).wcs.crval[0] == 10.123456789012345
    with pytest.raises(InputError, match="not an apfast sky map"):
        SkyMap.from_json('{"type": "other"}')
    with pytest.raises(InputError, match="build_templates"):
        read_skymap(tmp_path / "nowhere")
    with pytest.raises(InputError, match="valid tracts are 0..1"):
        sm.tract_wcs(2)
    with pytest.raises(InputError, match="'x,y'"):
        sm.patch_bbox(0, "a")


def test_skymap_for_calexps_covers_ccds_and_splits_fields():
    shape = (400, 200)
    near = [ccd_wcs(150.0 + 0.02 * i, 2.0 + 0.01 * i, shape, rot=5.0 * i) for i in range(3)]
    far = [ccd_wcs(20.0, -30.0, shape)]
    sm = skymap_for_calexps(near + far, [shape] * 4, patch_size=300, overlap=10, margin=20)
    assert sm.n_tracts == 2
    assert sm.pixel_scale == pytest.approx(SCALE, rel=1e-9)
    for w in near:
        corners = np.array([[-0.5, -0.5], [199.5, -0.5], [199.5, 399.5], [-0.5, 399.5]])
        ra, dec = w.all_pix2world(corners[:, 0], corners[:, 1], 0)
        x, y, ok = sm.tract_pixels(0, ra, dec)
        assert ok.all()
        assert np.all((x > 19) & (x < sm.tract_size - 20) & (y > 19) & (y < sm.tract_size - 20))
    assert {t for t, _ in sm.find_tracts_patches(far[0], shape)} == {1}


def test_overlap_bbox():
    shape = (100, 100)
    a = ccd_wcs(150.0, 2.0, shape)
    b = a.deepcopy()
    b.wcs.crpix = [b.wcs.crpix[0] + 30, b.wcs.crpix[1] - 10]  # dest = src shifted by (+30, -10)
    b.wcs.set()
    # src rows -0.5..99.5 -> -10.5..89.5, +2 margin
    assert overlap_bbox(a, shape, b, shape, margin=2) == (0, 93, 27, 100)
    assert overlap_bbox(a, shape, ccd_wcs(151.0, 2.0, shape), shape) is None
