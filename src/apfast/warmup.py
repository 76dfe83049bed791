"""``apfast warmup``: compile every numba kernel into the on-disk cache.

Each module of :mod:`apfast.kernels` may define ``_warmup_cases()`` returning
``(kernel, args)`` pairs with tiny arrays of the production dtypes; calling
them compiles (or loads from the cache) the exact signatures a run uses. Batch
jobs set a node-local ``NUMBA_CACHE_DIR`` and run this once per node first.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable

__all__ = ["kernel_modules", "warmup"]


def kernel_modules() -> list[str]:
    """Names of every module in :mod:`apfast.kernels`."""
    import apfast.kernels as pkg

    return sorted(f"apfast.kernels.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))


def warmup(progress: Callable[[str], None] | None = None) -> list[tuple[str, float]]:
    """Compile every kernel's warm-up signatures; return ``(name, seconds)`` per kernel call."""
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
    return results
