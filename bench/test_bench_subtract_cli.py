"""``apfast subtract`` (the CLI, whole command) against HOTPANTS on the full 2048x4096 pair of ``test_bench_psfmatch``.

Skipped unless ``APFAST_HOTPANTS`` names a HOTPANTS binary, as ``test_bench_hotpants``
(whose helpers and settings this reuses). The pair is written as FITS files with
one celestial TAN WCS (0.263"/px, the same on both, so the template warp is an
identity) plus variance files for apfast and noise (sigma) files for HOTPANTS.
Each tool runs as a child process:

* ``python -m apfast subtract SCI TMPL -o DIFF --science-variance .. --template-variance ..
  --mode convolveTemplate``: reads the files, subtracts each sky, measures both PSFs,
  warps, PSF-matches (kernel stars found on the images), subtracts, decorrelates,
  computes its quality numbers and writes IMAGE/MASK/VARIANCE/PSF HDUs;
* HOTPANTS with ``test_bench_hotpants``'s settings (``-c t -n i``, kernel order 1,
  apfast's basis sigmas, kernel half-width and stamp size, taken from an
  in-process run of the same chain).

Each command is run once untimed (the numba kernel cache is built or loaded, the
files are in the page cache) and then timed once: wall seconds of the whole command
(a fresh process: interpreter start, imports, kernel cache loading, FITS I/O), CPU
seconds and the peak RSS of that child alone (``os.wait4``; ``RUSAGE_CHILDREN``
would be the maximum over every child so far). The CLI overhead is the command's
wall time minus ``apfast.subtract_fits`` on the same files in this (warm) process.
Residual statistics as ``test_bench_hotpants``: at the isolated injected stars
(all static) the median reduced chi^2 within 1.5 science FWHM using each tool's own
noise (apfast: the decorrelated difference's VARIANCE plane it wrote; HOTPANTS:
its ``-oni`` image; and HOTPANTS with apfast's pre-decorrelation variance, one
noise model for both), the pooled residual RMS there, and the robust std and mean
of diff/sigma in star-free pixels. Numbers go to ``benchmark.extra_info`` and are
printed (run with ``-s``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import apfast
import test_bench_hotpants as hp
from apfast.run.subtract import subtract_fits

# the pair and its truth come from the psfmatch bench (same module-scoped fixture, same seed)
from test_bench_psfmatch import SHAPE, SIG_SCI, pair  # noqa: F401  (pair is a fixture)

pytestmark = hp.pytestmark
KERNEL_ORDER = 1  # apfast's default spatial kernel order (``test_bench_hotpants`` also runs 2)
TIMEOUT = 900.0


@dataclass(frozen=True, slots=True)
class Child:
    """One finished child process: exit code, wall and CPU seconds, its own peak RSS, its output."""

    returncode: int
    seconds: float
    cpu_seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str


# Runs argv[2:] as its own child and writes "wall cpu max_rss_kib" of that child to argv[1]. A child
# forked from this pytest process would report pytest's own peak RSS (~1.4 GB with the pair in memory):
# Linux keeps the pre-exec high-water mark in ru_maxrss. This wrapper (python -S, ~10 MB) is the floor.
_WRAPPER = """\
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str], log: Path, *, env: dict[str, str] | None = None) -> Child:
    """Run ``cmd`` through :data:`_WRAPPER`: wall, CPU and peak RSS of that command alone (``os.wait4``)."""
    out_path, err_path, usage = log.with_suffix(".out"), log.with_suffix(".err"), log.with_suffix(".rusage")
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, str(usage), *cmd], stdout=out, stderr=err,
                              env=env, timeout=TIMEOUT, check=False)
    wall, cpu, rss_kib = (float(v) for v in usage.read_text().split())
    return Child(proc.returncode, wall, cpu, rss_kib / 1024.0, out_path.read_text(), err_path.read_text())


def _tan_header() -> fits.Header:
    """A DECam-like TAN WCS (0.263"/px) centred on the 2048x4096 CCD; both images get it."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [(SHAPE[1] + 1) / 2.0, (SHAPE[0] + 1) / 2.0]
    scale = 0.263 / 3600.0
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    return w.to_header()


@pytest.mark.benchmark(group="subtract-cli-full-ccd")
def test_subtract_cli_vs_hotpants(benchmark, pair, tmp_path):  # noqa: F811
    sci, tmp, cat = pair
    names = ("sci", "tmpl", "sci_var", "tmpl_var", "sci_noise", "tmpl_noise", "diff", "diff_noise", "apfast_diff")
    files = {n: tmp_path / f"{n}.fits" for n in names}
    header = _tan_header()
    hp._write(files["sci"], sci.image, header)
    hp._write(files["tmpl"], tmp.image, header)
    hp._write(files["sci_var"], sci.variance, header)
    hp._write(files["tmpl_var"], tmp.variance, header)
    hp._write(files["sci_noise"], np.sqrt(sci.variance))
    hp._write(files["tmpl_noise"], np.sqrt(tmp.variance))

    # ---- apfast in this process (warm): the same chain and files, no interpreter start or imports
    kwargs = {"science_variance": files["sci_var"], "template_variance": files["tmpl_var"],
              "mode": "convolveTemplate"}  # fmt: skip
    subtract_fits(files["sci"], files["tmpl"], **kwargs)  # loads the kernels and their caches
    t0, c0 = time.perf_counter(), time.process_time()
    inproc = subtract_fits(files["sci"], files["tmpl"], output=tmp_path / "inproc_diff.fits", **kwargs)
    t_inproc, cpu_inproc = time.perf_counter() - t0, time.process_time() - c0
    timings = inproc.pair.timings
    meta = inproc.pair.diffim.subtraction.metadata
    sigmas = [float(s) for s in meta["basis_sigmas"]]
    r_kern = int(meta["kernel_size"]) // 2
    r_stamp = max(int(meta["stamp_half_size"]), r_kern + 3)

    # ---- the two commands: each once untimed, then timed
    env = dict(os.environ)
    src = str(Path(apfast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    cli = [sys.executable, "-m", "apfast", "subtract", str(files["sci"]), str(files["tmpl"]),
           "-o", str(files["apfast_diff"]), "--science-variance", str(files["sci_var"]),
           "--template-variance", str(files["tmpl_var"]), "--mode", "convolveTemplate"]  # fmt: skip
    hcmd = hp._hotpants_cmd(files, sigmas, r_kern, r_stamp, KERNEL_ORDER)
    for cmd, what in ((cli, "apfast_warm"), (hcmd, "hotpants_warm")):
        warm = run_child(cmd, tmp_path / what, env=env)
        assert warm.returncode == 0, f"{what} failed ({warm.returncode}): {warm.stderr[-2000:]}"
    imports = run_child([sys.executable, "-c", "import apfast.run.subtract, apfast.diffim.pair, apfast.repo.pairio"],
                        tmp_path / "imports", env=env)
    r_ap = benchmark.pedantic(lambda: run_child(cli, tmp_path / "apfast", env=env), rounds=1, iterations=1)
    r_hp = run_child(hcmd, tmp_path / "hotpants", env=env)
    assert r_ap.returncode == 0, f"apfast subtract failed ({r_ap.returncode}): {r_ap.stderr[-2000:]}"
    assert r_hp.returncode == 0, f"HOTPANTS failed ({r_hp.returncode}): {r_hp.stderr[-2000:]}"

    # ---- quality at the injected (static) stars
    with fits.open(files["apfast_diff"]) as hdul:
        d_ap = hdul["IMAGE"].data.astype(np.float32)
        v_ap = hdul["VARIANCE"].data.astype(np.float32)
        m_ap = hdul["MASK"].data
        card = {k: hdul[0].header.get(k) for k in ("DIFFMODE", "DIFFKSUM", "DIFFNSTP", "DIFFPSTD")}
    d_hp = fits.getdata(files["diff"]).astype(np.float32)
    s_hp = fits.getdata(files["diff_noise"]).astype(np.float32)
    assert d_ap.shape == d_hp.shape == SHAPE
    radius = 1.5 * 2.3548 * SIG_SCI  # 1.5 FWHM of the science PSF
    xs, ys, far = hp._star_apertures(cat, radius)
    ok_ap = np.isfinite(d_ap) & (v_ap > 0) & (m_ap == 0)
    ok_hp = (d_hp != hp.FILL) & np.isfinite(d_hp) & (s_hp > 0)
    sub = inproc.pair.diffim.subtraction.difference  # before decorrelation: HOTPANTS's difference is not whitened
    ok_sub = np.isfinite(sub.image) & (sub.variance > 0) & (sub.mask == 0)
    q_ap = hp._quality(d_ap, np.sqrt(v_ap), ok_ap, xs, ys, far, radius)
    q_hp = hp._quality(d_hp, s_hp, ok_hp, xs, ys, far, radius)
    q_hp_common = hp._quality(d_hp, np.sqrt(sub.variance), ok_hp & ok_sub, xs, ys, far, radius)
    q_sub = hp._quality(sub.image, np.sqrt(sub.variance), ok_sub, xs, ys, far, radius)

    info = {
        "apfast_cli_seconds": round(r_ap.seconds, 3),
        "hotpants_seconds": round(r_hp.seconds, 3),
        "speedup": round(r_hp.seconds / r_ap.seconds, 2),
        "apfast_cli_cpu_seconds": round(r_ap.cpu_seconds, 3),
        "hotpants_cpu_seconds": round(r_hp.cpu_seconds, 3),
        "apfast_cli_max_rss_mb": round(r_ap.max_rss_mb, 1),
        "hotpants_max_rss_mb": round(r_hp.max_rss_mb, 1),
        "apfast_inprocess_seconds": round(t_inproc, 3),
        "apfast_inprocess_cpu_seconds": round(cpu_inproc, 3),
        "apfast_cli_overhead_seconds": round(r_ap.seconds - t_inproc, 3),
        "apfast_import_seconds": round(imports.seconds, 3),
        **{f"apfast_step_{k}_seconds": round(v, 3) for k, v in timings.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "apfast_cmd": " ".join(cli[2:]),
        "hotpants_cmd": " ".join(hcmd[1:]),
        **{f"apfast_header_{k}": v for k, v in card.items()},
        **{f"apfast_cli_{k}": v for k, v in q_ap.items()},
        **{f"apfast_sub_{k}": v for k, v in q_sub.items()},
        **{f"hotpants_{k}": v for k, v in q_hp.items()},
        **{f"hotpants_apfast_variance_{k}": v for k, v in q_hp_common.items()},
    }
    benchmark.extra_info.update(info)
    print(
        f"\napfast subtract (CLI) vs HOTPANTS, {SHAPE[1]}x{SHAPE[0]}: wall {r_ap.seconds:.2f} s vs "
        f"{r_hp.seconds:.2f} s "
        f"= {r_hp.seconds / r_ap.seconds:.2f}x; CPU {r_ap.cpu_seconds:.2f} s vs {r_hp.cpu_seconds:.2f} s; "
        f"peak RSS {r_ap.max_rss_mb:.0f} MB vs {r_hp.max_rss_mb:.0f} MB (load average {os.getloadavg()[0]:.1f})\n"
        f"  apfast in-process subtract_fits {t_inproc:.2f} s (CPU {cpu_inproc:.2f} s): CLI overhead "
        f"{r_ap.seconds - t_inproc:.2f} s (imports alone {imports.seconds:.2f} s); steps "
        + ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
    )
    for name, q in (
        ("apfast CLI (decorr)", q_ap),
        ("apfast, not decorr", q_sub),
        ("hotpants", q_hp),
        ("hotpants, apfast var", q_hp_common),
    ):
        print(
            f"  {name:20s} stars {q['n_stars']:4d}  median chi2 {q['median_chi2']:.3f}  "
            f"rms {q['residual_rms']:.2f}  bkg pull std {q['bkg_pull_std_robust']:.3f} "
            f"mean {q['bkg_pull_mean']:+.3f}"
        )
    assert card["DIFFMODE"] == "convolveTemplate"
    assert q_ap["n_stars"] > 100 and q_hp["n_stars"] > 100
    assert math.isfinite(q_hp["median_chi2"])
    assert q_ap["median_chi2"] < 1.5  # the bar for apfast
