"""``apfast warmup``: compile every numba kernel into the on-disk cache, once per machine.

Each module of :mod:`apfast.kernels` may define ``_warmup_cases()`` returning
``(kernel, args)`` pairs with tiny arrays of the production dtypes; calling
them compiles (or loads from the cache) the exact signatures a run uses.

:func:`build_kernel_cache` compiles them all into the cache of :mod:`apfast._jit`
under its build lock, in parallel worker processes (compilation is single
threaded), and marks the cache complete (``complete.json``). Processing commands
call :func:`ensure_kernel_cache` first: on a complete cache it returns at once and
every kernel loads from disk on first use (milliseconds); otherwise the first
process builds it (saying so, once) while any other waits for the lock, so ``-j N``
and Dask workers start only once the cache exists and never compile. Batch systems
point ``APFAST_CACHE_DIR`` at a node-local folder and run ``apfast warmup`` first.

It also makes the FFTW plans image differencing uses for a full CCD of the
camera (:func:`fftw_warmup_shapes`): with ``FFTW_MEASURE`` the first process on a
machine spends seconds per shape and saves the result to the wisdom cache of
:mod:`apfast.diffim.fftw` (``$APFAST_CACHE_DIR``), so later processes plan in
milliseconds.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "build_kernel_cache",
    "compile_counts",
    "ensure_kernel_cache",
    "fftw_warmup_shapes",
    "kernel_cache_status",
    "kernel_dispatchers",
    "kernel_modules",
    "warmup",
    "warmup_fftw",
    "write_compile_report",
]

log = logging.getLogger(__name__)

#: Written into the kernel cache folder once every warm-up case is in it.
MARKER = "complete.json"
#: The estimate a first build announces when no earlier build on this machine says better (seconds, 2 cores).
DEFAULT_BUILD_SECONDS = 60.0


def kernel_modules() -> list[str]:
    """Names of every module in :mod:`apfast.kernels`."""
    import apfast.kernels as pkg

    return sorted(f"apfast.kernels.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))


def kernel_dispatchers() -> dict[str, object]:
    """Every numba kernel defined in :mod:`apfast.kernels`, by ``"module.name"`` (e.g. to list their signatures)."""
    from numba.core.registry import CPUDispatcher

    out: dict[str, object] = {}
    for name in kernel_modules():
        mod = importlib.import_module(name)
        out.update({f"{name}.{attr}": obj for attr, obj in vars(mod).items()
                    if isinstance(obj, CPUDispatcher) and obj.__module__ == name})
    return out


def fftw_warmup_shapes(camera: str = "DECam") -> list[tuple[tuple[int, int], int, str]]:
    """FFTW plans ``(shape, threads, effort)`` image differencing makes for one full CCD of ``camera``.

    The PSF-matching convolution (:func:`apfast.diffim.subtract.fft_convolve_terms`,
    2 threads) pads to ``scipy.fft.next_fast_len`` and the decorrelation
    (:func:`apfast.diffim.decorrelate.convolve_fft`, ``FFT_THREADS`` threads) to
    :func:`apfast.diffim.decorrelate.next_fast_even`; both use the default planner
    efforts of :class:`~apfast.diffim.psfmatch.PsfMatchConfig` and
    :class:`~apfast.diffim.decorrelate.DecorrelationConfig`. For DECam (4096 x 2048)
    both grids are 4096 x 2048 with 2 threads: one plan pair.

    Examples
    --------
    >>> [(s, e) for s, _, e in fftw_warmup_shapes("DECam")][:1]
    [((4096, 2048), 'FFTW_MEASURE')]
    """
    import scipy.fft

    from apfast.camera import get_camera
    from apfast.diffim import subtract
    from apfast.diffim.decorrelate import FFT_THREADS, DecorrelationConfig, next_fast_even
    from apfast.diffim.psfmatch import PsfMatchConfig

    ny, nx = get_camera(camera).trimmed_shape
    plans = [
        (
            (scipy.fft.next_fast_len(ny, real=True), scipy.fft.next_fast_len(nx, real=True)),
            subtract._THREADS,
            PsfMatchConfig().fft_planner,
        )
    ]
    dcfg = DecorrelationConfig()
    if dcfg.fft_backend == "pyfftw":
        plans.append(
            ((next_fast_even(ny), next_fast_even(nx)), FFT_THREADS, dcfg.fft_planner)
        )
    return list(dict.fromkeys(plans))


def warmup_fftw(
    camera: str = "DECam", progress: Callable[[str], None] | None = None
) -> list[tuple[str, float]]:
    """Make (and save as wisdom) the FFTW plans of :func:`fftw_warmup_shapes`; ``(name, seconds)`` per plan."""
    import numpy as np

    from apfast.diffim.fftw import plan_records, rfft2_pair

    results: list[tuple[str, float]] = []
    for shape, threads, effort in fftw_warmup_shapes(camera):
        t0 = time.perf_counter()
        rfft2_pair(shape, np.float32, threads, effort)
        dt = time.perf_counter() - t0
        rec = [r for r in plan_records() if r.shape == shape and r.threads == threads and r.effort == effort]
        how = "from wisdom" if rec and rec[-1].from_wisdom else "planned"
        name = f"fftw.rfft2 {shape[0]}x{shape[1]} float32 threads={threads} {effort} ({how})"
        results.append((name, dt))
        if progress:
            progress(f"warmup {name}: {dt:.2f} s")
    return results


def warmup_cases() -> list[tuple[str, Any, tuple[Any, ...]]]:
    """Every ``(name, kernel, args)`` warm-up case of :mod:`apfast.kernels`, in a fixed order."""
    out = []
    for modname in kernel_modules():
        mod = importlib.import_module(modname)
        cases = getattr(mod, "_warmup_cases", None)
        if cases is None:
            continue
        for kernel, args in cases():
            out.append((f"{modname.rsplit('.', 1)[-1]}.{getattr(kernel, '__name__', str(kernel))}", kernel, args))
    return out


def _cache_stats(kind: str) -> dict[str, int]:
    """Per kernel of this process, numba's cache ``hits`` or ``misses`` (a miss is a compilation), if any."""
    out = {}
    for name, disp in kernel_dispatchers().items():
        stats = getattr(disp, "stats", None)  # absent with NUMBA_DISABLE_JIT=1
        n = sum(getattr(stats, f"cache_{kind}").values()) if stats is not None else 0
        if n:
            out[name] = int(n)
    return out


def compile_counts() -> dict[str, int]:
    """Signatures each kernel of this process compiled (numba's cache misses) instead of loading, if any."""
    return _cache_stats("misses")


def write_compile_report() -> None:
    """Diagnostics: with ``APFAST_COMPILE_REPORT=DIR`` set, write this process's numba dispatcher statistics.

    ``DIR/<pid>.json`` holds ``{"pid", "hits", "misses"}`` with the cache hits and misses per kernel
    (a miss is a compilation). Processing commands and ``-j N``/Dask workers call this after each
    CCD task, so a batch operator (and the tests) can check that nothing compiled.
    """
    folder = os.environ.get("APFAST_COMPILE_REPORT")
    if not folder:
        return
    hits, misses = _cache_stats("hits"), _cache_stats("misses")
    path = Path(folder) / f"{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "hits": hits, "misses": misses}))
    tmp.replace(path)


def kernel_cache_status() -> dict[str, Any]:
    """Where the kernel cache is, whether it is complete, its size and how long its build took.

    Returns
    -------
    dict
        ``enabled``, ``path``, ``complete``, ``size_bytes``, ``files`` and, once complete, the
        marker's ``build_seconds``, ``signatures``, ``built_at`` and versions.
    """
    from apfast._jit import CACHE, kernel_cache_dir

    path = kernel_cache_dir()
    files = [p for p in path.rglob("*.nb[ic]")] if path.is_dir() else []
    status: dict[str, Any] = {"enabled": CACHE, "path": str(path), "complete": False,
                              "size_bytes": sum(p.stat().st_size for p in files), "files": len(files)}
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return status
    status.update(marker)
    status["complete"] = True
    return status


def _estimate_build_seconds() -> float:
    """The last build time recorded on this machine (any kernel version), else the default."""
    from apfast._jit import cache_root

    times = []
    for m in (cache_root() / "kernels").glob(f"*/{MARKER}"):
        try:
            times.append((m.stat().st_mtime, float(json.loads(m.read_text())["build_seconds"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(times)[1] if times else DEFAULT_BUILD_SECONDS


_CHILD = "import sys; from apfast.run.warmup import _compile_queue; _compile_queue(sys.argv[1])"
#: Per warm-up case, the compile seconds of the last build on this machine (orders the next build's queue).
TIMES = "build-times.json"


def _queue_order() -> list[int]:
    """Warm-up case indices, slowest to compile first (the last build's times, else parallel kernels first)."""
    from apfast._jit import cache_root

    try:
        last = json.loads((cache_root() / "kernels" / TIMES).read_text())
    except (OSError, ValueError):
        last = {}
    keys = []
    for i, (name, kernel, _args) in enumerate(warmup_cases()):
        parallel = bool(getattr(kernel, "targetoptions", {}).get("parallel"))
        keys.append((-float(last.get(name, 4.0 if parallel else 1.0)) if isinstance(last, dict) else 0.0, i))
    return [i for _, i in sorted(keys)]


def _compile_queue(queue: str) -> None:
    """In a build's child process: take the next case off the shared queue file until it is empty.

    ``queue`` holds one JSON object ``{"order": [...], "next": k}``; each claim happens under a
    file lock, so every case is compiled by exactly one child and a child that finishes early
    takes more (a fixed split leaves one core idle while the other compiles the slow kernels).
    Each child appends ``name seconds`` lines to ``queue + ".times"``.
    """
    import fcntl

    cases = warmup_cases()
    with open(queue, "r+") as fq, open(queue + ".times", "a") as ft:
        while True:
            fcntl.flock(fq, fcntl.LOCK_EX)
            try:
                fq.seek(0)
                state = json.loads(fq.read())
                k = state["next"]
                if k >= len(state["order"]):
                    return
                fq.seek(0)
                fq.truncate()
                fq.write(json.dumps({**state, "next": k + 1}))
                fq.flush()
            finally:
                fcntl.flock(fq, fcntl.LOCK_UN)
            name, kernel, args = cases[state["order"][k]]
            t0 = time.perf_counter()
            kernel(*args)
            ft.write(f"{name} {time.perf_counter() - t0:.3f}\n")
            ft.flush()


def build_kernel_cache(
    progress: Callable[[str], None] | None = None, *, jobs: int | None = None
) -> dict[str, Any]:
    """Compile every warm-up case into the kernel cache and mark it complete (under the build lock).

    Parameters
    ----------
    progress : callable, optional
        Called with one line per step.
    jobs : int, optional
        Processes compiling at once (default: the number of cores, at most 4). Each compiles a
        share of the cases; saves are serialised by the cache's write lock. This process then
        loads every case from the cache, which checks the build and leaves it warm.

    Returns
    -------
    dict
        :func:`kernel_cache_status` after the build.
    """
    from apfast._jit import CACHE, build_lock, kernel_cache_dir

    if not CACHE:
        msg = "the kernel cache is off (APFAST_NUMBA_CACHE=0): nothing to build"
        raise RuntimeError(msg)
    try:
        with build_lock():
            _build_locked(progress, jobs)
    except OSError as exc:
        from apfast.errors import ConfigError

        msg = (f"cannot build the kernel cache in {kernel_cache_dir()}: {exc}; set APFAST_CACHE_DIR to a writable "
               "folder")
        raise ConfigError(msg) from None
    return kernel_cache_status()


def _build_locked(progress: Callable[[str], None] | None, jobs: int | None) -> None:
    """:func:`build_kernel_cache`'s body; the caller holds the build lock."""
    from apfast._jit import kernel_cache_dir

    jobs = max(1, int(jobs if jobs is not None else min(os.cpu_count() or 1, 4)))
    t0 = time.perf_counter()
    if jobs > 1:
        env = {**os.environ, "APFAST_COMPILE_REPORT": ""}
        queue = kernel_cache_dir() / ".build-queue.json"
        queue.write_text(json.dumps({"order": _queue_order(), "next": 0}))
        times = Path(str(queue) + ".times")
        times.unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(queue)], env=env) for _ in range(jobs)]
        codes = [p.wait() for p in procs]
        if any(codes):
            log.warning("kernel cache build: %d of %d compile processes failed (exit %s); this process "
                        "compiles what is missing", sum(c != 0 for c in codes), jobs, codes)
        _save_times(times)
        queue.unlink(missing_ok=True)
    n = len(warmup(progress, fftw=False))  # loads what the children saved; compiles anything they missed
    marker = {
        "build_seconds": round(time.perf_counter() - t0, 2), "signatures": n, "jobs": jobs,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_versions(),
    }
    path = kernel_cache_dir() / MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    tmp.replace(path)


def _save_times(times: Path) -> None:
    """Merge the children's per-case compile seconds into the machine's ``build-times.json``."""
    from apfast._jit import cache_root

    path = cache_root() / "kernels" / TIMES
    try:
        seen: dict[str, float] = {}
        for line in times.read_text().splitlines():
            name, sec = line.rsplit(" ", 1)
            seen[name] = max(seen.get(name, 0.0), float(sec))  # a kernel with two signatures: its slower one
        times.unlink()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except (OSError, ValueError):  # only the next build's order depends on it
        pass


def _versions() -> dict[str, str]:
    import llvmlite
    import numba
    import numpy

    from apfast._jit import kernel_source_key

    return {"key": kernel_source_key(), "numba": numba.__version__, "llvmlite": llvmlite.__version__,
            "numpy": numpy.__version__, "python": sys.version.split()[0]}


def ensure_kernel_cache() -> bool:
    """Make sure the kernel cache is complete before a run; True if this process built it.

    A complete cache costs one ``stat``. Otherwise the process takes the build lock (waiting,
    with a log line, while another process builds), says once that it compiles and for about
    how long, and runs :func:`build_kernel_cache`. With the cache off it does nothing.
    """
    from apfast._jit import CACHE, build_lock, kernel_cache_dir

    if not CACHE or (kernel_cache_dir() / MARKER).exists():
        return False
    try:
        with build_lock(blocking=False) as free:
            pass
    except OSError as exc:  # a read-only cache folder someone else has to build
        log.warning("cannot build the kernel cache in %s (%s); kernels compile on first use in this process: "
                    "run `apfast warmup` where the folder is writable or set APFAST_CACHE_DIR", kernel_cache_dir(), exc)
        return False
    if not free:
        log.info("waiting for another apfast process to finish compiling the kernels into %s", kernel_cache_dir())
    with build_lock():
        if (kernel_cache_dir() / MARKER).exists():
            return False
        log.info("compiling kernels for this machine, once: ~%.0f s (cache %s; `apfast warmup` does it ahead)",
                 _estimate_build_seconds(), kernel_cache_dir())
        try:
            _build_locked(None, None)
        except Exception:  # kernels then compile on first use, with the dataId in any error
            log.warning("building the kernel cache failed; kernels compile on first use", exc_info=True)
            return False
    return True


def warmup(
    progress: Callable[[str], None] | None = None, *, fftw: bool = True, camera: str = "DECam"
) -> list[tuple[str, float]]:
    """Compile every kernel's warm-up signatures and make the CCD's FFTW plans.

    Parameters
    ----------
    progress : callable, optional
        Called with one line per step.
    fftw : bool
        Also run :func:`warmup_fftw` for ``camera`` (plans saved to the FFTW wisdom cache).
    camera : str
        Camera whose trimmed CCD shape sets the FFT plan shapes.

    Returns
    -------
    list of (str, float)
        ``(name, seconds)`` per kernel call and per FFTW plan pair (names start with ``fftw.``).
    """
    results: list[tuple[str, float]] = []
    for name, kernel, args in warmup_cases():
        t0 = time.perf_counter()
        kernel(*args)
        dt = time.perf_counter() - t0
        results.append((name, dt))
        if progress:
            progress(f"warmup {name}: {dt:.2f} s")
    if fftw:
        results.extend(warmup_fftw(camera, progress))
    return results
