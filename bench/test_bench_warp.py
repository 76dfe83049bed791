"""Warping a full 2048x4096 DECam-like exposure (image + variance + mask) between two TAN-SIP WCSs, steady state.

The WCSs differ by a sub-pixel shift and a 0.1 deg rotation and carry 1-2 px of SIP distortion.
Budget (issue 4): <= 0.3 s on 2 threads, compared by hand (the shared CI machine is too noisy to gate on).
Baseline in the same group: ``scipy.ndimage.map_coordinates(order=3)`` on the image alone with the same
pixel map (computed outside its timing).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy import ndimage

from apfast.diffim.warp import WarpConfig, pixel_map, warp_exposure
from apfast.exposure import Exposure
from synth import make_wcs

SHAPE = (4096, 2048)


def _wcs(rot_deg: float, shift: tuple[float, float]) -> WCS:
    return make_wcs(SHAPE, rot_deg=rot_deg, shift=shift, sip=True)


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
