"""Decorrelation afterburner (DMTN-021) on a full 2048x4096 DECam difference, steady state.

Budget (issue 4): <= 0.3 s of the 1.0 s per-CCD budget on 2 threads. In the same group: the full
``decorrelate`` with the pyfftw backend (cached plan, numba's thread count) and with numpy.fft, and,
as the library baseline, ``scipy.signal.fftconvolve`` of the image alone with the same kernel (no
mask, variance or PSF work).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from apfast.diffim.decorrelate import DecorrelationConfig, decorrelate, decorrelation_kernel
from apfast.exposure import Exposure
from apfast.masks import bitmask
from apfast.psf import GaussianPsf

SHAPE = (4096, 2048)
S_VAR, T_VAR = 100.0, 30.0


@pytest.fixture(scope="module")
def kernel() -> np.ndarray:
    """A 23x23 Gaussian matching kernel (sigma 1.8 px) with a photometric scale of 1.02."""
    y, x = np.mgrid[-11:12, -11:12]
    k = np.exp(-0.5 * (x * x + y * y) / 1.8**2)
    return 1.02 * k / k.sum()


@pytest.fixture(scope="module")
def difference() -> Exposure:
    """White noise with an EDGE border (where PSF matching left no data) and a few NO_DATA blocks."""
    rng = np.random.default_rng(7)
    img = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(np.sqrt(S_VAR + 3.0))
    mask = np.zeros(SHAPE, np.int32)
    edge = bitmask("EDGE")
    mask[:11], mask[-11:], mask[:, :11], mask[:, -11:] = edge, edge, edge, edge
    mask[1000:1040, 500:900] |= bitmask("NO_DATA")
    var = np.full(SHAPE, S_VAR + 3.0, np.float32)
    return Exposure(img, mask, var, psf=GaussianPsf(2.0, 31))


def _run(difference: Exposure, kernel: np.ndarray, backend: str) -> Exposure:
    cfg = DecorrelationConfig(fft_backend=backend)
    return decorrelate(
        difference,
        kernel,
        science_variance=S_VAR,
        template_variance=T_VAR,
        mode="convolveTemplate",
        config=cfg,
    )


@pytest.mark.benchmark(group="decorrelate-2048x4096")
@pytest.mark.parametrize("backend", ["pyfftw", "numpy"])
def test_apfast_decorrelate(benchmark, difference, kernel, backend):
    _run(difference, kernel, backend)  # compile the numba kernel and plan the FFTs outside the timing
    out = benchmark(_run, difference, kernel, backend)
    assert out.shape == SHAPE and out.metadata["DCRVMEAS"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.benchmark(group="decorrelate-2048x4096")
def test_baseline_scipy_fftconvolve(benchmark, difference, kernel):
    phi = decorrelation_kernel(kernel, S_VAR, T_VAR).astype(np.float32)
    out = benchmark(signal.fftconvolve, difference.image, phi, mode="same")
    assert out.shape == SHAPE
