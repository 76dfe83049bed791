"""HTM indexing: equality with lsst.sphgeom, and range coverings that never miss a point."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apfast.dia.htm import htm_index, htm_ranges, polygon_contains
from apfast.errors import InputError


def _random_sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on the sphere, plus poles, ra = 0 / 360 and the equator."""
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    special_ra = [0, 360, 0, 90, 180, 270, 45, 0, 360, 0, 0, 0, 0, 359.9999999, 0, 0, 120, 300]
    special_dec = [90, -90, 0, 0, 0, 0, 90, -90, 0, 10, -10, 45, -45, 0, 1e-9, -1e-9, 89.9999999, -89.9999999]
    ra[: len(special_ra)] = special_ra
    dec[: len(special_dec)] = special_dec
    return ra, dec


def test_roots_are_octants() -> None:
    # one point in the middle of each octant: S0..S3 = 8..11, N0..N3 = 12..15
    ra = np.array([45, 135, 225, 315, 315, 225, 135, 45], dtype=float)
    dec = np.array([-30, -30, -30, -30, 30, 30, 30, 30], dtype=float)
    assert htm_index(ra, dec, 0).tolist() == list(range(8, 16))
    # children are id*4+k: the level-1 index's parent is the level-0 index
    assert np.array_equal(htm_index(ra, dec, 1) >> 2, htm_index(ra, dec, 0))


def test_index_matches_sphgeom(rng: np.random.Generator) -> None:
    sg = pytest.importorskip("lsst.sphgeom")
    ra, dec = _random_sky(rng, 10_000)
    for level in (0, 3, 10, 20):
        pix = sg.HtmPixelization(level)
        ref = np.array([pix.index(sg.UnitVector3d(sg.LonLat.fromDegrees(a, d))) for a, d in zip(ra, dec, strict=True)])
        got = htm_index(ra, dec, level)
        bad = np.nonzero(got != ref)[0]
        assert bad.size == 0, f"level {level}: {bad.size} differ, e.g. ra={ra[bad[:3]]} dec={dec[bad[:3]]}"


def test_index_nesting_and_range(rng: np.random.Generator) -> None:
    ra, dec = _random_sky(rng, 2000)
    h20 = htm_index(ra, dec, 20)
    h12 = htm_index(ra, dec, 12)
    assert np.array_equal(h20 >> 16, h12)
    assert np.all((h20 >= 8 * 4**20) & (h20 < 16 * 4**20))
    assert h20.dtype == np.int64


def test_index_accepts_big_endian_and_lists() -> None:
    ra = np.array([10.0, 200.0], dtype=">f8")
    dec = np.array([-5.0, 60.0], dtype=">f8")
    assert np.array_equal(htm_index(ra, dec), htm_index([10.0, 200.0], [-5.0, 60.0]))
    assert htm_index([], [], 20).shape == (0,)


@pytest.mark.parametrize(
    ("ra", "dec", "level", "text"),
    [
        ([1.0], [1.0], 25, "0..24"),
        ([1.0, 2.0], [1.0], 20, "one ra and one dec"),
        ([np.nan], [1.0], 20, "NaN"),
    ],
)
def test_index_errors(ra, dec, level, text) -> None:
    with pytest.raises(InputError, match=text):
        htm_index(ra, dec, level)


def _quad(ra0: float, dec0: float, half_w: float, half_h: float, angle: float):
    """Corners of a rotated rectangle on the tangent plane, as ra/dec (gnomonic)."""
    c, s = np.cos(angle), np.sin(angle)
    xy = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    xy = xy @ np.array([[c, -s], [s, c]]).T
    xi, eta = np.radians(xy[:, 0]), np.radians(xy[:, 1])
    a0, d0 = np.radians(ra0), np.radians(dec0)
    den = np.cos(d0) - eta * np.sin(d0)
    ra = a0 + np.arctan2(xi, den)
    dec = np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, den))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _in_ranges(h: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    i = np.searchsorted(ranges[:, 0], h, side="right") - 1
    ok = i >= 0
    ok[ok] = h[ok] <= ranges[i[ok], 1]
    return ok


@settings(max_examples=40, deadline=None)
@given(
    ra0=st.floats(0.0, 360.0),
    dec0=st.floats(-89.0, 89.0),
    half_w=st.floats(0.01, 2.0),
    half_h=st.floats(0.01, 2.0),
    angle=st.floats(0.0, np.pi),
    max_ranges=st.sampled_from([1, 8, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ranges_cover_every_inside_point(ra0, dec0, half_w, half_h, angle, max_ranges, seed) -> None:
    pra, pdec = _quad(ra0, dec0, half_w, half_h, angle)
    ranges = htm_ranges(pra, pdec, 20, max_ranges=max_ranges)
    assert 1 <= ranges.shape[0] <= max_ranges
    assert np.all(ranges[:, 0] <= ranges[:, 1])
    assert np.all(ranges[1:, 0] > ranges[:-1, 1] + 1)  # sorted, disjoint, not adjacent
    rng = np.random.default_rng(seed)
    r = max(half_w, half_h) * 1.5
    ra = (ra0 + rng.uniform(-r, r, 4000) / max(np.cos(np.radians(dec0)), 0.02)) % 360.0
    dec = np.clip(dec0 + rng.uniform(-r, r, 4000), -90, 90)
    inside = polygon_contains(pra, pdec, ra, dec)
    covered = _in_ranges(htm_index(ra, dec, 20), ranges)
    assert not np.any(inside & ~covered)


def test_ranges_are_tight_for_a_ccd() -> None:
    """A DECam-CCD-sized box: the covering is a small superset (not the whole sky)."""
    pra, pdec = _quad(150.0, 2.0, 0.15, 0.075, 0.3)
    ranges = htm_ranges(pra, pdec, 20, max_ranges=64)
    n_pix = int(np.sum(ranges[:, 1] - ranges[:, 0] + 1))
    # a level-20 trixel is ~0.1 arcsec^2... the box is 0.045 deg^2 = 5.8e5 arcsec^2 / ~0.086 arcsec^2
    box_pixels = 0.3 * 0.15 * 3600**2 / (4 * np.pi * (180 / np.pi * 3600) ** 2 / (8 * 4**20))
    assert box_pixels < n_pix < 3 * box_pixels


def test_polygon_contains_and_winding() -> None:
    ra = np.array([0.5, 2.0, 0.5, 359.9])
    dec = np.array([0.5, 0.5, 1.5, 0.5])
    box = ([0, 1, 1, 0], [0, 0, 1, 1])
    assert polygon_contains(*box, ra, dec).tolist() == [True, False, False, False]
    assert polygon_contains(box[0][::-1], box[1][::-1], ra, dec).tolist() == [True, False, False, False]
    # a box straddling ra = 0
    assert polygon_contains([359, 1, 1, 359], [-1, -1, 1, 1], [0.0, 359.5, 2.0], [0, 0, 0]).tolist() == [
        True, True, False,
    ]  # fmt: skip


def test_polygon_errors() -> None:
    with pytest.raises(InputError, match="not convex"):
        htm_ranges([0, 2, 1, 2, 0], [0, 0, 1, 2, 2], 20)
    with pytest.raises(InputError, match=">= 3 corners"):
        htm_ranges([0, 1], [0, 1], 20)
    with pytest.raises(InputError, match="max_ranges"):
        htm_ranges([0, 1, 1], [0, 0, 1], 20, max_ranges=0)
