"""Difference-image noise kernels: tile-smoothed S/N samples and the scaled, floored variance plane.

**Smoothed S/N samples** (the input of the DIA variance rescaling, Rubin
``ScaleVarianceTask`` on the difference). On square tiles of the image, with
``g`` = 1 on good pixels (mask 0, finite image and variance) and 0 elsewhere::

    S = (g I) * G_sigma,     W = (g V) * G_{sigma/sqrt 2} / (4 pi sigma^2),     B = (1 - g) * G_sigma

where ``*`` is correlation with the normalised, truncated 1-D Gaussian applied
along both axes (``scipy.ndimage.gaussian_filter`` with ``mode="constant"``,
``truncate=4``). ``W`` is the predicted variance of ``S`` (for a slowly varying
``V``, ``sum G_sigma^2 V = V / (4 pi sigma^2)``, and ``G_sigma^2`` is a Gaussian of
width ``sigma / sqrt 2`` normalised to ``1 / (4 pi sigma^2)``). The sample is
``z = S / sqrt(W)`` at the pixels at least ``edge`` from the tile border with
``B <= bad_level`` (no bad pixel under the kernel) and ``W > 0``; its robust
scatter is the noise scale factor. Only those inner pixels are computed: with
``edge`` at least the kernel radius their windows lie inside the tile, so the
zero padding of ``mode="constant"`` never enters.

**Scaled variance with a subtraction floor**::

    out = V s^2 + (f max(T, 0))^2

in float32 with the template ``T``'s NaN read as 0 and ``+inf`` as the largest
float32 (``numpy.nan_to_num``), the operations in this order so the result is
bit-identical to the NumPy expression it replaces.

Pixel ``image[i, j]`` has its centre at ``(x, y) = (j, i)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = ["scaled_variance_with_floor", "select_ranks", "smoothed_snr_tiles"]


@pjit
def smoothed_snr_tiles(
    image, variance, mask, tile_y, tile_x, tile, k_img, k_var, edge, bad_level, var_norm, out, counts
):
    """Smoothed S/N samples ``z`` of every tile (module docstring; prange over tiles).

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
        Difference pixels and their variance (read only).
    mask : ndarray, int32, shape (ny, nx)
        Any non-zero bit makes a pixel bad.
    tile_y, tile_x : ndarray, int64, shape (n_tiles,)
        Lower-left corner (row, column) of each ``tile x tile`` tile; tiles lie inside the image.
    tile : int
        Tile side in pixels.
    k_img, k_var : ndarray, float64, shape (2 r + 1,)
        Symmetric normalised 1-D kernels of ``S`` / ``B`` and of ``W``; radii at most ``edge``.
    edge : int
        Pixels at each tile border that give no sample (``>=`` both kernel radii).
    bad_level : float
        A pixel is near a bad one when ``B > bad_level``.
    var_norm : float
        ``1 / (4 pi sigma^2)``, the factor of ``W``.
    out : ndarray, float32, shape (n_tiles, (tile - 2 edge)**2)
        Samples of tile ``t`` in ``out[t, :counts[t]]`` (row-major pixel order), written in place.
    counts : ndarray, int64, shape (n_tiles,)
        Number of samples per tile, written in place.
    """
    n_tiles = tile_y.shape[0]
    t = tile
    m = t - 2 * edge
    wi = k_img.astype(np.float32)
    wv = k_var.astype(np.float32)
    for q in prange(n_tiles):
        y0 = tile_y[q]
        x0 = tile_x[q]
        im = np.empty((t, t), dtype=np.float32)
        va = np.empty((t, t), dtype=np.float32)
        bd = np.empty((t, t), dtype=np.float32)
        any_bad = False
        for i in range(t):
            ri = image[y0 + i, x0 : x0 + t]
            rv = variance[y0 + i, x0 : x0 + t]
            rm = mask[y0 + i, x0 : x0 + t]
            oi = im[i]
            ov = va[i]
            ob = bd[i]
            for j in range(t):
                a = ri[j]
                v = rv[j]
                if rm[j] != 0 or not (math.isfinite(a) and math.isfinite(v)):
                    oi[j] = 0.0
                    ov[j] = 0.0
                    ob[j] = 1.0
                    any_bad = True
                else:
                    oi[j] = a
                    ov[j] = v
                    ob[j] = 0.0
        s_map = _smooth_inner(im, wi, edge)
        w_map = _smooth_inner(va, wv, edge)
        if any_bad:
            b_map = _smooth_inner(bd, wi, edge)
        else:
            b_map = np.zeros((m, m), dtype=np.float32)
        c = 0
        for i in range(m):
            for j in range(m):
                w = w_map[i, j] * var_norm
                if b_map[i, j] <= bad_level and w > 0.0:
                    out[q, c] = s_map[i, j] / math.sqrt(w)
                    c += 1
        counts[q] = c


@jit
def _smooth_inner(a, w, edge):
    """Separable correlation of ``a`` (t x t) with ``w`` on the inner ``(t - 2 edge)^2`` pixels.

    Axis 0 (columns) first, then axis 1, each folding the symmetric taps
    ``w[r - k] = w[r + k]``; float32 accumulation (relative rounding ~1e-7). The
    shifted rows are slices, so the inner loops carry no index wrap-around test and
    vectorise (8x faster than indexing ``row[j + edge - k]``).

    Parameters
    ----------
    a : ndarray, float32, shape (t, t)
    w : ndarray, float32, shape (2 r + 1,), ``r <= edge``
    edge : int

    Returns
    -------
    ndarray, float32, shape (t - 2 edge, t - 2 edge)
    """
    t = a.shape[0]
    m = t - 2 * edge
    r = w.shape[0] // 2
    w0 = w[r]
    vert = np.empty((m, t), dtype=np.float32)
    for i in range(m):
        c = i + edge
        o = vert[i]
        src = a[c]
        for j in range(t):
            o[j] = w0 * src[j]
        for k in range(1, r + 1):
            wk = w[r + k]
            lo = a[c - k]
            hi = a[c + k]
            for j in range(t):
                o[j] += wk * (lo[j] + hi[j])
    res = np.empty((m, m), dtype=np.float32)
    for i in range(m):
        o = res[i]
        src = vert[i, edge : edge + m]
        for j in range(m):
            o[j] = w0 * src[j]
        for k in range(1, r + 1):
            wk = w[r + k]
            lo = vert[i, edge - k : edge - k + m]
            hi = vert[i, edge + k : edge + k + m]
            for j in range(m):
                o[j] += wk * (lo[j] + hi[j])
    return res


@jit
def _rank_histogram(values, center, absolute, lo, hi, nbins, hist):
    """Histogram of ``u`` (see :func:`select_ranks`) into ``hist``; returns the count below ``lo``, -1 on non-finite."""
    n = values.shape[0]
    scale = nbins / (hi - lo)
    below = 0
    for i in range(n):
        u = float(values[i])
        if absolute:
            u = abs(u - center)
        if not math.isfinite(u):
            return -1
        if u < lo:
            below += 1
        elif u < hi:
            b = min(int((u - lo) * scale), nbins - 1)
            hist[b] += 1
    return below


@jit
def _gather_bins(values, center, absolute, lo, hi, nbins, b0, b1, cand):
    """Copy the ``u`` that fall into bins ``b0..b1`` into ``cand``; returns how many."""
    n = values.shape[0]
    scale = nbins / (hi - lo)
    j = 0
    for i in range(n):
        u = float(values[i])
        if absolute:
            u = abs(u - center)
        if lo <= u < hi:
            b = min(int((u - lo) * scale), nbins - 1)
            if b0 <= b <= b1:
                cand[j] = u
                j += 1
    return j


@jit
def select_ranks(values, center, absolute, k0, k1, lo, hi, nbins, out):
    """The ``k0``-th and ``k1``-th smallest (0-based, ``k0 <= k1``) of ``u = values`` or ``|values - center|``.

    Exact order statistics in O(n): a histogram of ``u`` on ``nbins`` equal bins over
    ``[lo, hi)`` locates the bins holding both ranks, their values are gathered and
    sorted. Returns False (``out`` untouched) when a rank falls outside ``[lo, hi)``
    or a value is not finite; the caller then falls back to a full partition.

    Parameters
    ----------
    values : ndarray, float32, shape (n,)
    center : float
    absolute : bool
    k0, k1 : int
    lo, hi : float
    nbins : int
    out : ndarray, float64, shape (2,)
        The two order statistics, written in place.
    """
    n = values.shape[0]
    if n == 0 or k0 < 0 or k1 >= n or k0 > k1:
        return False
    hist = np.zeros(nbins, dtype=np.int64)
    below = _rank_histogram(values, center, absolute, lo, hi, nbins, hist)
    if below < 0 or below > k0:
        return False
    cum = below
    b0 = -1
    b1 = -1
    c0 = 0
    for b in range(nbins):
        if b0 < 0 and cum + hist[b] > k0:
            b0 = b
            c0 = cum
        if cum + hist[b] > k1:
            b1 = b
            break
        cum += hist[b]
    if b0 < 0 or b1 < 0:
        return False
    m = 0
    for b in range(b0, b1 + 1):
        m += hist[b]
    cand = np.empty(m)
    j = _gather_bins(values, center, absolute, lo, hi, nbins, b0, b1, cand)
    srt = np.sort(cand[:j])
    out[0] = srt[k0 - c0]
    out[1] = srt[k1 - c0]
    return True


@pjit
def scaled_variance_with_floor(variance, template, scale2, frac, out):
    """``out = variance * scale2 + (frac * max(template, 0))**2`` in float32 (module docstring; prange over rows).

    Parameters
    ----------
    variance : ndarray, float32, shape (ny, nx)
    template : ndarray, float32, shape (ny, nx)
        PSF-matched template (NaN counts as 0, ``+inf`` as the largest float32).
    scale2 : float32
        Variance scale (the noise scale factor squared).
    frac : float32
        Subtraction floor as a fraction of the template; 0 gives ``variance * scale2``.
    out : ndarray, float32, shape (ny, nx)
        Written in place (may not alias the inputs).
    """
    ny, nx = variance.shape
    zero = np.float32(0.0)
    big = np.float32(3.4028234663852886e38)  # largest float32, what numpy.nan_to_num gives for +inf
    for i in prange(ny):
        for j in range(nx):
            tv = template[i, j]
            if math.isnan(tv):
                tv = zero
            elif tv > big:
                tv = big
            tv = max(tv, zero)
            tv = tv * frac
            out[i, j] = variance[i, j] * scale2 + tv * tv


def _warmup_cases():
    """Tiny calls with the production dtypes, for ``apfast warmup``."""
    ny, nx = 40, 40
    img = np.zeros((ny, nx), np.float32)
    var = np.ones((ny, nx), np.float32)
    k = np.array([0.25, 0.5, 0.25])
    return [
        (
            smoothed_snr_tiles,
            (img, var, np.zeros((ny, nx), np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64), 16, k, k, 2,
             1e-3, 0.1, np.zeros((1, 144), np.float32), np.zeros(1, np.int64)),
        ),
        (scaled_variance_with_floor, (var, img, np.float32(1.0), np.float32(0.02), np.empty_like(var))),
        (select_ranks, (np.arange(9, dtype=np.float32), 0.0, True, 4, 4, 0.0, 16.0, 32, np.zeros(2))),
    ]  # fmt: skip
