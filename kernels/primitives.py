"""Numeric primitives shared by several kernel modules: selection and Lanczos-3 weights.

They were once copied into each module that used them, because numba's own cache
did not notice when a callee in another module changed; the kernel cache of
:mod:`apfast._jit` is keyed on every kernel file, so one copy serves all.
"""

from __future__ import annotations

import math

import numpy as np

from apfast._jit import jit

__all__ = ["lanczos3_weights", "select_kth"]


@jit
def select_kth(buf, lo, hi, k):
    """Return the ``k``-th smallest of ``buf[lo:hi]`` (``k`` counted over the whole array), partially sorting it.

    Hoare quickselect with median-of-three pivots (Hoare 1961, "Algorithm 65: FIND"):
    expected O(n) instead of a sort. After return ``buf[lo:k] <= buf[k] <= buf[k+1:hi]``,
    the invariant medians and ranks of the callers rely on.

    Parameters
    ----------
    buf : ndarray, float32 or float64, shape (>= hi,)
        Finite values; reordered in place within ``[lo, hi)``.
    lo, hi : int
        The half-open range to select in.
    k : int
        Rank, ``lo <= k < hi``.

    Returns
    -------
    scalar
        ``buf[k]`` after partitioning.
    """
    hi = hi - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        # median of three to the middle
        if buf[mid] < buf[lo]:
            buf[mid], buf[lo] = buf[lo], buf[mid]
        if buf[hi] < buf[lo]:
            buf[hi], buf[lo] = buf[lo], buf[hi]
        if buf[hi] < buf[mid]:
            buf[hi], buf[mid] = buf[mid], buf[hi]
        pivot = buf[mid]
        i = lo
        j = hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return buf[k]


@jit
def lanczos3_weights(frac, out):
    """Fill the 6 Lanczos-3 weights at offsets ``-2 .. 3`` from ``floor(position)``.

    ``L(d) = sinc(d) sinc(d / 3)`` for ``|d| < 3`` at distances ``d_j = j - frac``,
    normalised to sum 1 so a constant image stays constant (Duchon 1979, eq. 9 with
    ``a = 3``). ``frac == 0`` gives the exact delta ``(0, 0, 1, 0, 0, 0)``
    (``sin(k pi)`` is not exactly 0 in floating point). Three trig calls instead of
    twelve: ``sin(pi (k - f)) = (-1)^(k+1) sin(pi f)`` and ``sin(pi (k - f) / 3)`` by
    angle addition.

    Parameters
    ----------
    frac : float
        ``position - floor(position)`` in ``[0, 1)``.
    out : ndarray (6,) float64
        Written in place.
    """
    if frac == 0.0:
        for j in range(6):
            out[j] = 0.0
        out[2] = 1.0
        return
    s1 = math.sin(math.pi * frac)
    s3 = math.sin(math.pi * frac / 3.0)
    c3 = math.cos(math.pi * frac / 3.0)
    h = 0.5 * math.sqrt(3.0)
    # sin(pi k / 3), cos(pi k / 3) for k = -2..3: (-h, -h, 0, h, h, 0), (-1/2, 1/2, 1, 1/2, -1/2, -1)
    p3 = 3.0 / (math.pi * math.pi)
    d = -2.0 - frac
    out[0] = p3 * s1 * (h * c3 - 0.5 * s3) / (d * d)
    d = -1.0 - frac
    out[1] = p3 * s1 * (-h * c3 - 0.5 * s3) / (d * d)
    d = -frac
    out[2] = p3 * s1 * s3 / (d * d)
    d = 1.0 - frac
    out[3] = p3 * s1 * (h * c3 - 0.5 * s3) / (d * d)
    d = 2.0 - frac
    out[4] = -p3 * s1 * (h * c3 + 0.5 * s3) / (d * d)
    d = 3.0 - frac
    out[5] = p3 * s1 * s3 / (d * d)
    total = out[0] + out[1] + out[2] + out[3] + out[4] + out[5]
    for j in range(6):
        out[j] /= total


def _warmup_cases():
    """Production signatures: float64 and float32 scratch for selection, float64 taps."""
    return [
        (select_kth, (np.arange(9, 0, -1, dtype=np.float64), 0, 9, 4)),
        (select_kth, (np.arange(9, 0, -1, dtype=np.float32), 0, 9, 4)),
        (lanczos3_weights, (0.25, np.empty(6))),
    ]
