"""HOTPANTS side by side with apfast on the full 2048x4096 CCD pair of ``test_bench_psfmatch``.

Skipped unless ``APFAST_HOTPANTS`` names a HOTPANTS binary (github acbecker/hotpants,
built against cfitsio; it is not part of apfast). Both tools get the same pair
(science Gaussian PSF sigma 2.0 px, template sigma 1.5 px with 1.3x the flux,
background-free, per-pixel noise given as noise images) and equivalent settings:
three Gaussian basis functions with apfast's sigmas and degrees 4/2/2, kernel
half-width and stamp half-size from apfast's FWHM scaling, order-1 background,
convolve the template (``-c t``), difference in science units (``-n i``, as
apfast's ``science - K (x) template``); HOTPANTS's default noise propagation
convolves the template variance with ``K^2`` as apfast does (its ``-convvar``
would use ``K`` and overstate the noise). The kernel's spatial order is
parametrised: 1 is apfast's default, 2 HOTPANTS's.

Timing: HOTPANTS is run once (seconds; it includes reading and writing its FITS
files, ~0.1-0.3 s of the total); apfast's ``run_image_difference`` (kernel solve +
convolution + decorrelation, in memory) is compiled and planned first, then the
best of three runs is taken (wall and, less sensitive to other load, CPU seconds of
all threads). Quality: at isolated injected stars (all static) the median reduced
chi^2 of the difference within a PSF-sized aperture, using each tool's own
noise/variance image (and, for HOTPANTS, also apfast's variance plane: one noise
model for both), the pooled residual RMS in those apertures (science units), and
the robust std and mean of diff/sigma in star-free pixels (noise calibration).
All numbers go to ``benchmark.extra_info`` and are printed (run with ``-s``).
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from apfast.diffim.decorrelate import DecorrelationConfig
from apfast.diffim.psfmatch import PsfMatchConfig
from apfast.diffim.stage import DifferenceConfig, run_image_difference

# the pair and its truth come from the psfmatch bench (same module-scoped fixture, same seed)
from test_bench_psfmatch import SHAPE, SIG_SCI, pair  # noqa: F401  (pair is a fixture)

HOTPANTS = os.environ.get("APFAST_HOTPANTS", "")
pytestmark = pytest.mark.skipif(
    not (HOTPANTS and os.access(HOTPANTS, os.X_OK)),
    reason="set APFAST_HOTPANTS to a HOTPANTS binary (github acbecker/hotpants) to run the side-by-side",
)

FILL = 1.0e-30  # HOTPANTS -fi: value written to its bad output pixels
EDGE = 40  # ignore stars and pixels this close to the border (both tools flag the kernel-width edge)


def _write(path: Path, data: np.ndarray, header: fits.Header | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float32), header=header).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _hotpants_cmd(files: dict[str, Path], sigmas: list[float], r_kern: int, r_stamp: int,
                  kernel_order: int) -> list[str]:
    """The HOTPANTS command line with apfast's basis, kernel and stamp sizes (module docstring).

    ``files`` names ``sci``, ``tmpl``, ``sci_noise``, ``tmpl_noise`` (inputs) and
    ``diff``, ``diff_noise`` (outputs).
    """
    degrees = list(PsfMatchConfig().alard_deg_gauss)
    ng = [str(len(sigmas))] + [v for d, s in zip(degrees, sigmas, strict=True) for v in (str(d), f"{s:.4f}")]
    io = {"-inim": "sci", "-tmplim": "tmpl", "-outim": "diff", "-ini": "sci_noise", "-tni": "tmpl_noise",
          "-oni": "diff_noise"}  # fmt: skip
    opts = (
        f"-c t -n i -ko {kernel_order} -bgo 1 -r {r_kern} -rss {r_stamp} -nsx 10 -nsy 20 "
        f"-tl -1e6 -il -1e6 -tu 1e8 -iu 1e8 -fi {FILL} -v 0"
    ).split()
    return [HOTPANTS, *[v for k, n in io.items() for v in (k, str(files[n]))], *opts, "-ng", *ng]


def _star_apertures(cat: dict, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Isolated stars away from the edge: (x, y) and a (ny, nx) bool map of pixels far from every star."""
    x, y, snr = np.asarray(cat["x"]), np.asarray(cat["y"]), np.asarray(cat["snr"])
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    np.fill_diagonal(d2, np.inf)
    isolated = d2.min(axis=1) > (3 * radius) ** 2
    inside = (x > EDGE) & (x < SHAPE[1] - EDGE) & (y > EDGE) & (y < SHAPE[0] - EDGE)
    keep = isolated & inside & (snr > 20)
    far = np.ones(SHAPE, bool)
    r_far = 4 * radius
    yy, xx = np.mgrid[-int(r_far) : int(r_far) + 1, -int(r_far) : int(r_far) + 1]
    disk = xx**2 + yy**2 <= r_far**2
    for xi, yi in zip(x, y, strict=True):
        ix, iy = round(float(xi)), round(float(yi))
        y0, y1 = max(iy - int(r_far), 0), min(iy + int(r_far) + 1, SHAPE[0])
        x0, x1 = max(ix - int(r_far), 0), min(ix + int(r_far) + 1, SHAPE[1])
        far[y0:y1, x0:x1] &= ~disk[
            y0 - iy + int(r_far) : y1 - iy + int(r_far), x0 - ix + int(r_far) : x1 - ix + int(r_far)
        ]
    far[:EDGE] = far[-EDGE:] = False
    far[:, :EDGE] = far[:, -EDGE:] = False
    return x[keep], y[keep], far


def _quality(diff: np.ndarray, sigma: np.ndarray, valid: np.ndarray, xs, ys, far, radius: float) -> dict:
    """Median reduced chi^2 and pooled RMS in star apertures; std of diff/sigma in star-free pixels."""
    r = math.ceil(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    ap = xx**2 + yy**2 <= radius**2
    chi2, sq, npix = [], 0.0, 0
    for xi, yi in zip(xs, ys, strict=True):
        ix, iy = round(float(xi)), round(float(yi))
        sl = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        m = ap & valid[sl]
        if m.sum() < 0.8 * ap.sum():
            continue
        d, s = diff[sl][m].astype(np.float64), sigma[sl][m].astype(np.float64)
        chi2.append(float(np.mean((d / s) ** 2)))
        sq += float(np.sum(d * d))
        npix += int(m.sum())
    pull = (diff[far & valid] / sigma[far & valid]).astype(np.float64)
    q75, q25 = np.percentile(pull, [75, 25])
    return {
        "n_stars": len(chi2),
        "median_chi2": float(np.median(chi2)),
        "residual_rms": math.sqrt(sq / max(npix, 1)),
        "bkg_pull_std_robust": float((q75 - q25) / 1.349),
        "bkg_pull_mean": float(np.mean(pull)),
    }


@pytest.mark.benchmark(group="hotpants-full-ccd")
@pytest.mark.parametrize("kernel_order", [1, 2])
def test_hotpants_vs_apfast(benchmark, pair, tmp_path, kernel_order):  # noqa: F811
    sci, tmp, cat = pair
    # ---- apfast: compile + plan first (wisdom cache makes the plan cheap), then best of three
    pcfg = PsfMatchConfig(fft_planner="FFTW_MEASURE", spatial_kernel_order=kernel_order)
    dcfg = DecorrelationConfig(fft_planner="FFTW_MEASURE")

    def run():
        return run_image_difference(
            sci, tmp, sources=cat, psfmatch=pcfg, decorrelation=dcfg, config=DifferenceConfig()
        )

    res = run()
    t_apfast = cpu_apfast = math.inf
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        res = run()
        t_apfast = min(t_apfast, time.perf_counter() - t0)
        cpu_apfast = min(cpu_apfast, time.process_time() - c0)
    meta = res.subtraction.metadata
    sigmas = [float(s) for s in meta["basis_sigmas"]]
    r_kern = int(meta["kernel_size"]) // 2
    r_stamp = max(int(meta["stamp_half_size"]), r_kern + 3)

    # ---- HOTPANTS on the same pixels
    files = {
        n: tmp_path / f"{n}.fits" for n in ("sci", "tmpl", "sci_noise", "tmpl_noise", "diff", "diff_noise")
    }
    _write(files["sci"], sci.image)
    _write(files["tmpl"], tmp.image)
    _write(files["sci_noise"], np.sqrt(sci.variance))
    _write(files["tmpl_noise"], np.sqrt(tmp.variance))
    cmd = _hotpants_cmd(files, sigmas, r_kern, r_stamp, kernel_order)

    def hotpants():
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return proc, time.perf_counter() - t0, cpu

    proc, t_hp, cpu_hp = benchmark.pedantic(hotpants, rounds=1, iterations=1)
    assert proc.returncode == 0, f"HOTPANTS failed ({proc.returncode}): {proc.stderr[-2000:]}"
    d_hp = fits.getdata(files["diff"]).astype(np.float32)
    s_hp = fits.getdata(files["diff_noise"]).astype(np.float32)
    assert d_hp.shape == SHAPE

    # ---- quality at the injected (static) stars
    radius = 1.5 * 2.3548 * SIG_SCI  # 1.5 FWHM of the science PSF
    xs, ys, far = _star_apertures(cat, radius)
    ok_hp = (d_hp != FILL) & np.isfinite(d_hp) & (s_hp > 0)
    sub = res.subtraction.difference
    dec = res.difference
    ok_ap = np.isfinite(sub.image) & (sub.variance > 0) & (sub.mask == 0)
    ok_dec = np.isfinite(dec.image) & (dec.variance > 0) & (dec.mask == 0)
    q_hp = _quality(d_hp, s_hp, ok_hp, xs, ys, far, radius)
    q_sub = _quality(sub.image, np.sqrt(sub.variance), ok_ap, xs, ys, far, radius)
    q_dec = _quality(dec.image, np.sqrt(dec.variance), ok_dec, xs, ys, far, radius)
    # the same noise model for both (apfast's var_S + K_c^2 (x) var_T; the kernels match the same PSFs)
    q_hp_common = _quality(d_hp, np.sqrt(sub.variance), ok_hp & ok_ap, xs, ys, far, radius)

    info = {
        "kernel_order": kernel_order,
        "hotpants_seconds": round(t_hp, 3),
        "apfast_seconds": round(t_apfast, 3),
        "speedup": round(t_hp / t_apfast, 2),
        # CPU seconds (all threads) are less sensitive to other load on the machine than wall time
        "hotpants_cpu_seconds": round(cpu_hp, 3),
        "apfast_cpu_seconds": round(cpu_apfast, 3),
        "cpu_ratio": round(cpu_hp / cpu_apfast, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "hotpants_cmd": " ".join(cmd[1:]),
        **{f"hotpants_{k}": v for k, v in q_hp.items()},
        **{f"hotpants_apfast_variance_{k}": v for k, v in q_hp_common.items()},
        **{f"apfast_sub_{k}": v for k, v in q_sub.items()},
        **{f"apfast_decorr_{k}": v for k, v in q_dec.items()},
    }
    benchmark.extra_info.update(info)
    print(
        f"\nHOTPANTS vs apfast (kernel order {kernel_order}): {t_hp:.2f} s vs {t_apfast:.3f} s "
        f"= {t_hp / t_apfast:.1f}x; CPU {cpu_hp:.2f} s vs {cpu_apfast:.2f} s = {cpu_hp / cpu_apfast:.1f}x "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    for name, q in (
        ("hotpants", q_hp),
        ("hotpants, apfast var", q_hp_common),
        ("apfast subtract", q_sub),
        ("apfast decorrelated", q_dec),
    ):
        print(
            f"  {name:20s} stars {q['n_stars']:4d}  median chi2 {q['median_chi2']:.3f}  "
            f"rms {q['residual_rms']:.2f}  bkg pull std {q['bkg_pull_std_robust']:.3f} "
            f"mean {q['bkg_pull_mean']:+.3f}"
        )
    assert q_hp["n_stars"] > 100 and q_sub["n_stars"] > 100
    assert math.isfinite(q_hp["median_chi2"])
    assert q_sub["median_chi2"] < 1.5  # the bar for apfast
