"""``apfast warmup``: compile every numba kernel into the on-disk cache.

Each module of :mod:`apfast.kernels` may define ``_warmup_cases()`` returning
``(kernel, args)`` pairs with tiny arrays of the production dtypes; calling
them compiles (or loads from the cache) the exact signatures a run uses. Batch
jobs set a node-local ``NUMBA_CACHE_DIR`` and run this once per node first.

It also makes the FFTW plans image differencing uses for a full CCD of the
camera (:func:`fftw_warmup_shapes`): with ``FFTW_MEASURE`` the first process on a
machine spends seconds per shape and saves the result to the wisdom cache of
:mod:`apfast.fftw` (``$APFAST_CACHE_DIR``), so later processes plan in
milliseconds.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable

__all__ = ["fftw_warmup_shapes", "kernel_dispatchers", "kernel_modules", "warmup", "warmup_fftw"]


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

    The PSF-matching convolution (:func:`apfast.subtract.fft_convolve_terms`,
    2 threads) pads to ``scipy.fft.next_fast_len`` and the decorrelation
    (:func:`apfast.decorrelate.convolve_fft`, ``FFT_THREADS`` threads) to
    :func:`apfast.decorrelate.next_fast_even`; both use the default planner
    efforts of :class:`~apfast.psfmatch.PsfMatchConfig` and
    :class:`~apfast.decorrelate.DecorrelationConfig`. For DECam (4096 x 2048)
    both grids are 4096 x 2048 with 2 threads: one plan pair.

    Examples
    --------
    >>> [(s, e) for s, _, e in fftw_warmup_shapes("DECam")][:1]
    [((4096, 2048), 'FFTW_MEASURE')]
    """
    import scipy.fft

    from apfast import subtract
    from apfast.camera import get_camera
    from apfast.decorrelate import FFT_THREADS, DecorrelationConfig, next_fast_even
    from apfast.psfmatch import PsfMatchConfig

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

    from apfast.fftw import plan_records, rfft2_pair

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
    for modname in kernel_modules():
        mod = importlib.import_module(modname)
        cases = getattr(mod, "_warmup_cases", None)
        if cases is None:
            continue
        for kernel, args in cases():
            name = f"{modname.rsplit('.', 1)[-1]}.{getattr(kernel, '__name__', str(kernel))}"
            t0 = time.perf_counter()
            kernel(*args)
            dt = time.perf_counter() - t0
            results.append((name, dt))
            if progress:
                progress(f"warmup {name}: {dt:.2f} s")
    if fftw:
        results.extend(warmup_fftw(camera, progress))
    return results
