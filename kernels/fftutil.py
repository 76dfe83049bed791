"""Small numba helpers around FFT convolution: growing a bad-pixel mask by a box.

An FFT convolution with a ``(2r+1, 2r+1)`` kernel spreads every pixel into its
``r``-neighbourhood, so output pixels closer than ``r`` (Chebyshev distance) to a
pixel that held no data, or to the image boundary, are unreliable. The driver
(:mod:`apfast.diffim.decorrelate`) flags them ``EDGE`` with :func:`grow_mask_box`.

The FFTs themselves stay in the driver (FFTW via pyfftw is not callable from
numba).
"""

from __future__ import annotations

import numpy as np

from apfast._jit import jit

__all__ = ["grow_mask_box"]


@jit
def grow_mask_box(bad, r, border, out):
    """Dilate a boolean mask by a ``(2r+1) x (2r+1)`` box (Chebyshev distance ``<= r``).

    ``out[y, x] = 1`` when some ``bad[y', x']`` is set with ``|y - y'| <= r`` and
    ``|x - x'| <= r``; with ``border`` set, pixels within ``r`` of the image
    boundary (``y < r``, ``y >= ny - r``, likewise in x) are set too, as if the
    outside of the image were bad. The dilation is separable: a row pass keeps
    the distance to the nearest bad pixel on each side (two sweeps, O(nx) per
    row), then a column pass does the same with per-column "last bad row"
    trackers, sweeping rows in memory order. Cost O(ny nx) independent of ``r``.

    Parameters
    ----------
    bad : ndarray of uint8, shape (ny, nx), C-contiguous
        Non-zero where the input pixel is unusable.
    r : int
        Box half-width (>= 0); ``r = 0`` copies ``bad`` (plus nothing at the border).
    border : bool
        Treat the outside of the image as bad.
    out : ndarray of uint8, shape (ny, nx)
        Written in place: 1 inside the grown region, else 0.

    Returns
    -------
    int
        Number of pixels set in ``out``.
    """
    ny, nx = bad.shape
    far = ny + nx + 2 * r + 2
    # row pass: h[y, x] = any bad within |dx| <= r on row y
    h = np.zeros((ny, nx), dtype=np.uint8)
    for y in range(ny):
        last = -far
        for x in range(nx):
            if bad[y, x] != 0:
                last = x
            if x - last <= r:
                h[y, x] = 1
        nxt = far + nx
        for x in range(nx - 1, -1, -1):
            if bad[y, x] != 0:
                nxt = x
            if nxt - x <= r:
                h[y, x] = 1
    # column pass, forward then backward, in row-major order
    last_row = np.full(nx, -far, dtype=np.int64)
    for y in range(ny):
        for x in range(nx):
            if h[y, x] != 0:
                last_row[x] = y
            out[y, x] = 1 if y - last_row[x] <= r else 0
    next_row = np.full(nx, far + ny, dtype=np.int64)
    for y in range(ny - 1, -1, -1):
        for x in range(nx):
            if h[y, x] != 0:
                next_row[x] = y
            if next_row[x] - y <= r:
                out[y, x] = 1
    if border and r > 0:
        for y in range(ny):
            if y < r or y >= ny - r:
                for x in range(nx):
                    out[y, x] = 1
            else:
                for x in range(min(r, nx)):
                    out[y, x] = 1
                for x in range(max(nx - r, 0), nx):
                    out[y, x] = 1
    n = 0
    for y in range(ny):
        for x in range(nx):
            if out[y, x] != 0:
                n += 1
    return n


def _warmup_cases():
    """A tiny call with the decorrelation's dtypes (used by ``apfast warmup``)."""
    bad = np.zeros((8, 8), dtype=np.uint8)
    return [(grow_mask_box, (bad, 1, True, np.empty((8, 8), np.uint8)))]
