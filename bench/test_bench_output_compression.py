"""Write time, file size and read time of one exposure file for each ``output.compression`` choice.

The exposure is a calexp-like 2048x4096 DECam CCD (the full size is ``slow``; 512x512 runs by default):
sky noise of a 1000 e- background (sigma ~32 e-), ~3000 Gaussian stars (FWHM 1.1"), a variance plane
computed from the noisy image (as ISR makes it), a mask with BAD columns, SAT cores, CRs and DETECTED
footprints, a TAN WCS and a Gaussian PSF. Every choice is written with :func:`apfast.write_exposure`
(the path ``Butler.put`` and the background writer take) into the page cache of the bench's tmp
folder, so times are CPU (compression) plus the copy, not the disk.

Baseline in the same group and run: ``none`` (the streamed uncompressed write). Each test records
``bytes``, ``MB``, ``size_vs_none``, ``write_s`` (best of the timed rounds), ``read_s`` (best of two
``read_exposure`` calls) and, for ``quantized``, the rounding error rms in units of the noise; the table
is printed past pytest's capture. A CCD-visit writes three such files (calexp, difference, matched
template; two with ``output.write_matched = false``).

Run the numbers: ``pytest bench/test_bench_output_compression.py --benchmark-enable -m 'slow or not slow'``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from astropy.wcs import WCS

from apfast import masks
from apfast.exposure import COMPRESSIONS, Exposure, PhotoCalib, VisitInfo, read_exposure, write_exposure
from apfast.psf import GaussianPsf

SKY, READ_NOISE, FWHM_PX = 1000.0, 7.0, 4.2
_RESULTS: dict[tuple[str, str], dict[str, float]] = {}  # (size, compression) -> numbers, for the ratios


def make_calexp(shape: tuple[int, int], seed: int = 3) -> Exposure:
    """A background-subtracted calexp-like exposure (electrons) with truth-free but realistic statistics."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    model = np.zeros(shape, np.float32)
    sig = FWHM_PX / 2.3548
    yy, xx = np.mgrid[-12:13, -12:13].astype(np.float32)
    n_stars = int(3000 * ny * nx / (4096 * 2048)) + 5
    for _ in range(n_stars):
        x, y = rng.uniform(12, nx - 13), rng.uniform(12, ny - 13)
        ix, iy = int(x), int(y)
        flux = 10 ** rng.uniform(2.5, 6.0)
        stamp = np.exp(-((xx - (x - ix)) ** 2 + (yy - (y - iy)) ** 2) / (2 * sig**2))
        model[iy - 12:iy + 13, ix - 12:ix + 13] += (flux / (2 * np.pi * sig**2)) * stamp
    variance = (model + SKY + READ_NOISE**2).astype(np.float32)
    image = (model + rng.standard_normal(shape, dtype=np.float32) * np.sqrt(variance)).astype(np.float32)
    variance = np.maximum(image + SKY, 0).astype(np.float32) + np.float32(READ_NOISE**2)  # ISR: from the data
    mask = np.zeros(shape, np.int32)
    mask[image > 5 * np.sqrt(SKY)] |= masks.bitmask("DETECTED")
    mask[image > 60000] |= masks.bitmask("SAT")
    mask[:, rng.integers(0, nx, 3)] |= masks.bitmask("BAD")
    mask[rng.random(shape) < 2e-4] |= masks.bitmask("CR")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [nx / 2, ny / 2]
    w.wcs.cd = np.array([[-0.2637, 0.0], [0.0, 0.2637]]) / 3600.0
    return Exposure(image, mask, variance, wcs=w, psf=GaussianPsf(sig, 25), photo_calib=PhotoCalib(31.2),
                    visit_info=VisitInfo(visit=289401, ccdnum=35, filter="g", exptime=90.0))


def _report(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's output capture (the numbers belong in the CI log)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(text)


def _measure(request: pytest.FixtureRequest, benchmark, exp: Exposure, size: str, compression: str,
             tmp_path: Path) -> None:
    path = tmp_path / f"{compression}.fits"
    writes: list[float] = []

    def write() -> None:
        t = time.perf_counter()
        write_exposure(path, exp, compression=compression)
        writes.append(time.perf_counter() - t)

    benchmark.pedantic(write, rounds=3, iterations=1)
    reads = []
    for _ in range(2):
        t = time.perf_counter()
        back = read_exposure(path)
        reads.append(time.perf_counter() - t)
    assert np.array_equal(back.mask, exp.mask)
    r = {"bytes": path.stat().st_size, "write_s": min(writes), "read_s": min(reads)}
    if compression == "quantized":
        d = (back.image.astype(np.float64) - exp.image) / np.sqrt(exp.variance)
        r["err_rms_sigma"] = float(d.std())
        assert r["err_rms_sigma"] < 1 / 16
    else:
        assert back.image.tobytes() == exp.image.tobytes() and back.variance.tobytes() == exp.variance.tobytes()
    _RESULTS[(size, compression)] = r
    base = _RESULTS.get((size, "none"))
    info = {"bytes": r["bytes"], "MB": round(r["bytes"] / 1e6, 2), "write_s": round(r["write_s"], 3),
            "read_s": round(r["read_s"], 3)}
    if base is not None:
        info["size_vs_none"] = round(r["bytes"] / base["bytes"], 3)
        info["write_vs_none"] = round(r["write_s"] / base["write_s"], 2)
    if "err_rms_sigma" in r:
        info["err_rms_sigma"] = round(r["err_rms_sigma"], 4)
    benchmark.extra_info.update(info)
    _report(request, f"\noutput compression {size} {compression:>9}: {info}")
    path.unlink()


@pytest.fixture(scope="module")
def small() -> Exposure:
    return make_calexp((512, 512))


@pytest.fixture(scope="module")
def full() -> Exposure:
    return make_calexp((4096, 2048))


@pytest.mark.parametrize("compression", list(COMPRESSIONS))  # "none" first: the baseline of the ratios
@pytest.mark.benchmark(group="output-compression-512x512")
def test_write_exposure_512(request, benchmark, small, compression, tmp_path):
    _measure(request, benchmark, small, "512x512", compression, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("compression", list(COMPRESSIONS))
@pytest.mark.benchmark(group="output-compression-2048x4096")
def test_write_exposure_full_ccd(request, benchmark, full, compression, tmp_path):
    _measure(request, benchmark, full, "2048x4096", compression, tmp_path)
