"""Sub-pixel stamp extraction with Lanczos-3 interpolation.

Used by the PSF determiner to cut star stamps centred exactly on each star's
centroid, and reusable wherever a shifted cutout is needed (forced photometry,
alert cutouts). Pure numba over native float32 images.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import pjit
from apfast.kernels.primitives import lanczos3_weights

__all__ = ["lanczos3_weights", "extract_stamps_lanczos3"]


@pjit
def extract_stamps_lanczos3(image, bad, xs, ys, half, out, flags):
    """Cut ``(2 half + 1)^2`` stamps centred on sub-pixel positions, by Lanczos-3 interpolation.

    ``out[i, a, b] = sum_jk Wy_j Wx_k image[floor(y_i) + a - half + j - 2, floor(x_i) + b - half + k - 2]``
    with the Lanczos-3 weights of the fractional parts of ``(y_i, x_i)``: stamp pixel
    ``(half, half)`` is exactly the position ``(y_i, x_i)``.

    Parameters
    ----------
    image : ndarray (ny, nx) float32
    bad : ndarray (ny, nx) uint8
        Nonzero where a pixel must not be used (masked); a stamp touching one is flagged.
    xs, ys : ndarray (n,) float64
        Positions (0-based pixel coordinates, pixel centres at integers).
    half : int
        Stamp half-size.
    out : ndarray (n, 2 half + 1, 2 half + 1) float32
        Written in place.
    flags : ndarray (n,) int32
        Written in place: bit 0 = stamp (with its interpolation taps) leaves the image,
        bit 1 = a tap touches a ``bad`` pixel.
    """
    ny, nx = image.shape
    n = xs.shape[0]
    k = 2 * half + 1
    for i in prange(n):
        wx = np.empty(6)
        wy = np.empty(6)
        fx = math.floor(xs[i])
        fy = math.floor(ys[i])
        lanczos3_weights(xs[i] - fx, wx)
        lanczos3_weights(ys[i] - fy, wy)
        x0 = int(fx) - half - 2
        y0 = int(fy) - half - 2
        flag = 0
        if x0 < 0 or y0 < 0 or x0 + k + 5 > nx or y0 + k + 5 > ny:
            flags[i] = 1
            for a in range(k):
                for b in range(k):
                    out[i, a, b] = np.nan
            continue
        for a in range(k + 5):
            for b in range(k + 5):
                if bad[y0 + a, x0 + b] != 0:
                    flag |= 2
        # separable: first along x for the k + 5 rows needed, then along y
        tmp = np.empty((k + 5, k))
        for a in range(k + 5):
            for b in range(k):
                s = 0.0
                for j in range(6):
                    s += wx[j] * image[y0 + a, x0 + b + j]
                tmp[a, b] = s
        for a in range(k):
            for b in range(k):
                s = 0.0
                for j in range(6):
                    s += wy[j] * tmp[a + j, b]
                out[i, a, b] = s
        flags[i] = flag


def _warmup_cases():
    img = np.zeros((40, 40), np.float32)
    bad = np.zeros((40, 40), np.uint8)
    xs = np.array([20.3])
    ys = np.array([19.7])
    out = np.empty((1, 5, 5), np.float32)
    flags = np.empty(1, np.int32)
    return [(extract_stamps_lanczos3, (img, bad, xs, ys, 2, out, flags)), (lanczos3_weights, (0.25, np.empty(6)))]
