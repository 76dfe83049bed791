"""Warping a full 2048x4096 DECam-like exposure (image + variance + mask) between two TAN-SIP WCSs, steady state.

The WCSs differ by a sub-pixel shift and a 0.1 deg rotation and carry 1-2 px of SIP distortion.
Budget (issue 4): <= 0.3 s on 2 threads, compared by hand (the shared CI machine is too noisy to gate on).
Baseline in the same group: ``scipy.ndimage.map_coordinates(order=3)`` on the image alone with the same
pixel map (computed outside its timing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS, Sip
from scipy import ndimage

from apfast.diffim.warp import WarpConfig, pixel_map, warp_exposure
from apfast.exposure import Exposure

SHAPE = (4096, 2048)


def _wcs(rot_deg: float, shift: tuple[float, float]) -> WCS:
    ny, nx = SHAPE
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [150.0, 2.2]
    w.wcs.crpix = [nx / 2 + 0.5 + shift[0], ny / 2 + 0.5 + shift[1]]
    s = 0.263 / 3600.0
    t = math.radians(rot_deg)
    w.wcs.cd = np.array([[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]])
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 2], a[3, 0] = 1e-6, 3e-7, -2e-7, 2e-10
    b[0, 2], b[1, 1], b[2, 0], b[0, 3] = 2e-7, -4e-7, 3e-7, 1e-11
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


@pytest.fixture(scope="module")
def setup() -> tuple[Exposure, WCS]:
    rng = np.random.default_rng(7)
    img = rng.normal(1000.0, 30.0, SHAPE).astype(np.float32)
    var = np.full(SHAPE, 900.0, np.float32)
    msk = np.zeros(SHAPE, np.int32)
    msk[rng.integers(0, SHAPE[0], 3000), rng.integers(0, SHAPE[1], 3000)] = 1  # scattered BAD pixels
    return Exposure(img, msk, var, wcs=_wcs(0.0, (0.0, 0.0))), _wcs(0.1, (0.37, -0.21))


@pytest.mark.benchmark(group="warp-2048x4096")
def test_apfast_warp_exposure(benchmark, setup):
    src, dest_wcs = setup
    cfg = WarpConfig()
    warp_exposure(src, dest_wcs, SHAPE, config=cfg)  # compile outside the timing
    out = benchmark(warp_exposure, src, dest_wcs, SHAPE, config=cfg)
    assert out.shape == SHAPE
    assert np.isfinite(out.image).all() and np.mean(out.image[100:-100, 100:-100]) == pytest.approx(1000.0, rel=1e-3)


@pytest.mark.benchmark(group="warp-2048x4096")
def test_baseline_scipy_map_coordinates_order3(benchmark, setup):
    src, dest_wcs = setup
    xm, ym = pixel_map(src.wcs, dest_wcs, SHAPE)
    coords = np.stack([ym, xm])
    out = benchmark(ndimage.map_coordinates, src.image, coords, order=3, mode="constant", cval=0.0)
    assert out.shape == SHAPE
