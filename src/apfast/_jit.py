"""The only place numba decorators are configured.

``jit`` is for serial kernels (cached on disk, GIL released, numpy error model
so ``1/0`` gives ``inf`` instead of raising). ``pjit`` is for ``prange`` kernels:
never cached, because cached parallel kernels have segfaulted (pynndescent #175).
Set ``APFAST_NUMBA_CACHE=0`` to turn the on-disk cache off; batch jobs set a
node-local ``NUMBA_CACHE_DIR`` and run ``apfast warmup`` first.
"""

from __future__ import annotations

import functools
import os

import numba

CACHE: bool = os.environ.get("APFAST_NUMBA_CACHE", "1") not in ("0", "false", "no", "off")

jit = functools.partial(numba.njit, cache=CACHE, nogil=True, error_model="numpy")
pjit = functools.partial(numba.njit, parallel=True, cache=False, nogil=True, error_model="numpy")

__all__ = ["CACHE", "jit", "pjit"]
