"""ISR of one full DECam CCD (raw 4146x2160 uint16 -> 2048x4096): fused numba kernels vs a numpy pipeline.

Steady state only: ``run_isr`` is called once before timing so compilation is
excluded. The numpy baseline in the same group does the same steps one whole-array
pass at a time (per-row median overscan, crosstalk with a mirrored slice,
assembly by slicing, bias, variance, look-up table, flat, masks, row interpolation
of the masked pixels), which is how a straightforward Python ISR is written.
"""

from __future__ import annotations

import numpy as np
import pytest

from apfast.camera import get_camera
from apfast.ccd.isr import IsrConfig, amp_params_from_header, run_isr
from apfast.masks import bitmask

GROUP = "isr-full-decam-ccd"


@pytest.fixture(scope="module")
def ccd() -> dict:
    """A full-size synthetic DECam CCD with every calibration of the DECam chain."""
    rng = np.random.default_rng(7)
    amps = amp_params_from_header(get_camera("DECam"), {})
    raw = rng.normal(2500, 12, size=(4146, 2160))
    raw[2000:2040, 300:306] = 50000  # a saturated bleed trail in amp B
    return {
        "raw": np.clip(raw, 0, 65535).astype(np.uint16),
        "amps": amps,
        "bias": rng.normal(2, 1, (4096, 2048)).astype(np.float32),
        "flat": rng.normal(1, 0.02, (4096, 2048)).astype(np.float32),
        "defects": np.array([[100, 0, 1, 4096], [1500, 3000, 20, 10]], dtype=np.int32),
        "crosstalk": np.array([[0.0, 3.2e-4], [2.8e-4, 0.0]]),
        "linearizer": (rng.normal(0, 1, (2, 65536)).astype(np.float32), np.zeros(2)),
    }


def numpy_isr(c: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same chain with plain numpy, one pass per step."""
    raw = c["raw"].astype(np.float32)
    amps = c["amps"]
    sub = []
    for a in amps:
        b = a.bias_section
        level = np.median(raw[:, b.x0 : b.x1], axis=1)
        img = raw - level[:, None]
        d, p = a.data_section, a.parallel_overscan
        col = np.median(img[p.y0 : p.y1, d.x0 : d.x1], axis=0)
        sub.append(img[d.slices] - col[None, :])
    a_img, b_img = sub
    xt = c["crosstalk"]
    a_corr = a_img - xt[0, 1] * b_img[:, ::-1]
    b_corr = b_img - xt[1, 0] * a_img[:, ::-1]
    image = np.empty((4096, 2048), np.float32)
    image[amps[0].trimmed_section.slices] = a_corr
    image[amps[1].trimmed_section.slices] = b_corr
    mask = np.zeros((4096, 2048), np.int32)
    for a, src in zip(amps, (amps[1], amps[0]), strict=True):
        mask[a.trimmed_section.slices] |= np.where(raw[a.data_section.slices] >= a.saturation, bitmask("SAT"), 0)
        mask[a.trimmed_section.slices] |= np.where(raw[src.data_section.slices][:, ::-1] > 45000,
                                                   bitmask("CROSSTALK"), 0)
    image -= c["bias"]
    variance = np.empty_like(image)
    lut, off = c["linearizer"]
    for i, a in enumerate(amps):
        sl = a.trimmed_section.slices
        variance[sl] = np.maximum(image[sl], 0) / a.gain + (a.read_noise / a.gain) ** 2
        idx = np.clip(np.trunc(image[sl] + off[i]), 0, lut.shape[1] - 1).astype(np.int64)
        image[sl] += lut[i][idx]
    image /= c["flat"]
    variance /= c["flat"] ** 2
    for x0, y0, w, h in c["defects"]:
        mask[y0 : y0 + h, x0 : x0 + w] |= bitmask("BAD")
    mask[:35] |= bitmask("SUSPECT")
    mask[-35:] |= bitmask("SUSPECT")
    mask[:, :35] |= bitmask("SUSPECT")
    mask[:, -35:] |= bitmask("SUSPECT")
    bad = (mask & bitmask(["BAD", "SAT"])) != 0
    for y in np.flatnonzero(bad.any(axis=1)):
        good = ~bad[y]
        xs = np.arange(2048)
        image[y, ~good] = np.interp(xs[~good], xs[good], image[y, good])
        variance[y, ~good] = np.interp(xs[~good], xs[good], variance[y, good])
    return image, mask, variance


@pytest.mark.benchmark(group=GROUP)
def test_bench_run_isr(benchmark, ccd: dict) -> None:
    kw = {k: ccd[k] for k in ("bias", "flat", "defects", "crosstalk", "linearizer")}
    run_isr(ccd["raw"], ccd["amps"], config=IsrConfig(), **kw)  # compile outside the timing
    res = benchmark(run_isr, ccd["raw"], ccd["amps"], config=IsrConfig(), **kw)
    assert res.image.shape == (4096, 2048)
    assert np.all(np.isfinite(res.image))
    assert res.n_saturated > 240
    benchmark.extra_info.update({f"{k}_ms": round(1e3 * v, 2) for k, v in res.metadata["timings"].items()})


@pytest.mark.benchmark(group=GROUP)
def test_bench_numpy_baseline(benchmark, ccd: dict) -> None:
    image, _mask, _variance = benchmark(numpy_isr, ccd)
    assert image.shape == (4096, 2048)
    assert np.all(np.isfinite(image))
