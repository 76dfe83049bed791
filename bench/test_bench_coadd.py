"""Coadd of 5 full 2048x4096 DECam-like calexps onto one 4200x2400 patch, steady state.

apfast: warp (Lanczos-3) + zero-point scaling + per-pixel 3-sigma clipped weighted mean + coadd PSF
(:func:`apfast.diffim.coadd.make_coadd`). Baseline in the same group: the combine step alone done with numpy masked
arrays (median, then one 3-sigma clip against each input's noise, then the weighted mean) on the already
aligned stack, i.e. without warping; compare the apfast combine kernel alone (``test_apfast_combine``) with it.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from apfast import masks
from apfast.diffim.coadd import make_coadd
from apfast.diffim.skymap import make_skymap
from apfast.exposure import Exposure, PhotoCalib, VisitInfo
from apfast.kernels.coadd import combine_clipped
from apfast.psf import GaussianPsf
from synth import tract_offset_wcs

SHAPE = (4096, 2048)
N = 5
SKYMAP = make_skymap([(150.0, 2.0)], pixel_scale=0.2636, tract_size=4400, patch_size=4200, overlap=0)
NODATA = masks.bitmask("NO_DATA")


def _wcs(dx: float, dy: float, rot: float) -> WCS:
    return tract_offset_wcs(SKYMAP.tract_wcs(0), dx, dy, rot)


@pytest.fixture(scope="module")
def calexps():
    rng = np.random.default_rng(5)
    out = []
    for i in range(N):
        img = rng.normal(0.0, 5.0, SHAPE).astype(np.float32)
        out.append(Exposure(img, np.zeros(SHAPE, np.int32), np.full(SHAPE, 25.0, np.float32),
                            wcs=_wcs(50 + rng.uniform(0, 4), 50 + rng.uniform(0, 4), rng.uniform(-0.1, 0.1)),
                            psf=GaussianPsf(1.8, 21), photo_calib=PhotoCalib(30.0 + 0.1 * i),
                            visit_info=VisitInfo(visit=i, ccdnum=1, filter="g")))
    return out


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(6)
    img = rng.normal(0.0, 5.0, (N, *SHAPE)).astype(np.float32)
    var = np.full((N, *SHAPE), 25.0, np.float32)
    msk = np.zeros((N, *SHAPE), np.int32)
    return img, var, msk


@pytest.mark.slow
@pytest.mark.benchmark(group="coadd-5x2048x4096", warmup=True)
def test_apfast_make_coadd(benchmark, calexps):
    out = benchmark.pedantic(make_coadd, args=(calexps, 0, "0,0", SKYMAP), rounds=3, warmup_rounds=1)
    assert out.metadata["NINPUTS"] == N


@pytest.mark.benchmark(group="coadd-combine-5x2048x4096", warmup=True)
def test_apfast_combine(benchmark, stack):
    img, var, msk = stack
    outs = (np.empty(SHAPE, np.float32), np.empty(SHAPE, np.float32), np.empty(SHAPE, np.int32),
            np.empty(SHAPE, np.int16))
    scales = np.ones(N)
    benchmark(combine_clipped, img, var, msk, scales, scales, False, 1, 0, NODATA, 3.0, 2, 1, *outs)
    assert abs(float(outs[0].std()) - 5.0 / np.sqrt(N)) < 0.1


def numpy_clipped_mean(img, var, msk):
    data = np.ma.masked_array(img, mask=(msk & 1) != 0)
    med = np.ma.median(data, axis=0)
    clipped = np.ma.masked_where(np.abs(data - med) > 3.0 * np.sqrt(var), data)
    w = 1.0 / np.median(var, axis=(1, 2))
    return np.ma.average(clipped, axis=0, weights=np.broadcast_to(w[:, None, None], img.shape))


@pytest.mark.benchmark(group="coadd-combine-5x2048x4096", warmup=True)
def test_numpy_masked_clipped_mean(benchmark, stack):
    img, var, msk = stack
    out = benchmark.pedantic(numpy_clipped_mean, args=(img, var, msk), rounds=2)
    assert abs(float(out.std()) - 5.0 / np.sqrt(N)) < 0.1
