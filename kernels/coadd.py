"""Per-pixel combination of warped, flux-scaled inputs into a coadd (sigma-clipped weighted mean).

Pure numba kernels: no I/O, no globals, native-endian C-contiguous arrays.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = ["combine_clipped", "median_small", "mosaic_add", "mosaic_finish"]


@jit
def median_small(values, n, scratch):
    """Median of ``values[:n]`` by insertion sort into ``scratch`` (small ``n``, e.g. the inputs of a pixel).

    Parameters
    ----------
    values : ndarray, float64, shape (>= n,)
        Values; not modified.
    n : int
        Number of values to use (>= 1).
    scratch : ndarray, float64, shape (>= n,)
        Work space, overwritten.

    Returns
    -------
    float
        The median (mean of the two middle values for even ``n``).
    """
    for i in range(n):
        v = values[i]
        j = i - 1
        while j >= 0 and scratch[j] > v:
            scratch[j + 1] = scratch[j]
            j -= 1
        scratch[j + 1] = v
    h = n // 2
    if n % 2 == 1:
        return scratch[h]
    return 0.5 * (scratch[h - 1] + scratch[h])


@pjit
def combine_clipped(
    images,
    variances,
    masks,
    scales,
    input_weights,
    use_ivar,
    bad_bits,
    drop_bits,
    nodata_bit,
    clip_sigma,
    n_iter,
    min_inputs,
    out_image,
    out_variance,
    out_mask,
    out_count,
):
    """Combine ``n`` aligned inputs pixel by pixel: flux scaling, sigma clipping, weighted mean.

    For every pixel, input ``i`` is *valid* when its mask has none of
    ``bad_bits``, its variance is finite and > 0 and its value finite. Valid
    values are scaled, ``x_i = s_i I_i`` and ``v_i = s_i^2 V_i``. With at least
    3 valid inputs and ``clip_sigma > 0``, ``n_iter`` rounds of clipping reject
    ``|x_i - c| > clip_sigma * max(sqrt(v_i), 1.4826 MAD)``, where ``c`` is the
    median of the survivors in the first round and their weighted mean after;
    the noise floor ``sqrt(v_i)`` lets a single outlier among few inputs be
    rejected (a sample standard deviation that includes the outlier never
    exceeds ``(n-1)/sqrt(n)`` sigma), and the MAD term keeps pixels where the
    inputs genuinely differ (star cores under different seeing) from being
    clipped. The surviving values are averaged with weights ``w_i``
    (``1 / v_i`` if ``use_ivar`` else ``input_weights[i]``)::

        out = sum w_i x_i / sum w_i,   var = sum w_i^2 v_i / (sum w_i)^2

    Fewer than ``min_inputs`` survivors: ``out_image = 0``, ``out_variance = inf``
    and ``nodata_bit`` set. The output mask is the OR of the masks of the
    inputs used, minus ``drop_bits``; where no input is used it is the OR of
    every covering input's mask (minus ``drop_bits`` and the NO_DATA bit of
    inputs that do not cover), plus ``nodata_bit``.

    Parameters
    ----------
    images, variances : ndarray, float32, shape (n, ny, nx)
        Warped inputs in their own units and their variances.
    masks : ndarray, int32, shape (n, ny, nx)
        Warped input masks; pixels an input does not cover carry ``nodata_bit``.
    scales : ndarray, float64, shape (n,)
        Flux scale of each input to the coadd's zero point.
    input_weights : ndarray, float64, shape (n,)
        Per-input weights used when ``use_ivar`` is False.
    use_ivar : bool
        Weight each pixel by its inverse (scaled) variance instead.
    bad_bits, drop_bits, nodata_bit : int
        Mask bits that exclude an input, bits never propagated, the NO_DATA bit.
    clip_sigma : float
        Clipping threshold in sigma; <= 0 disables clipping.
    n_iter : int
        Clipping rounds (>= 1 to clip).
    min_inputs : int
        Fewest surviving inputs for a pixel to get a value (>= 1).
    out_image, out_variance : ndarray, float32, shape (ny, nx)
        Written in place.
    out_mask : ndarray, int32, shape (ny, nx)
        Written in place.
    out_count : ndarray, int16, shape (ny, nx)
        Written in place: number of inputs used per pixel.
    """
    n, ny, nx = images.shape
    for y in prange(ny):
        xs = np.empty(n, dtype=np.float64)
        vs = np.empty(n, dtype=np.float64)
        ws = np.empty(n, dtype=np.float64)
        ms = np.empty(n, dtype=np.int64)
        keep = np.empty(n, dtype=np.bool_)
        tmp = np.empty(n, dtype=np.float64)
        tmp2 = np.empty(n, dtype=np.float64)
        for x in range(nx):
            nv = 0
            any_mask = 0
            for i in range(n):
                m = masks[i, y, x]
                if (m & nodata_bit) == 0:
                    any_mask |= m
                v = variances[i, y, x]
                val = images[i, y, x]
                if (m & bad_bits) != 0 or not (v > 0.0) or not np.isfinite(v) or not np.isfinite(val):
                    continue
                s = scales[i]
                xs[nv] = s * val
                vs[nv] = s * s * v
                ws[nv] = 1.0 / vs[nv] if use_ivar else input_weights[i]
                ms[nv] = m
                keep[nv] = True
                nv += 1
            nk = nv
            if nv >= 3 and clip_sigma > 0.0:
                centre = median_small(xs, nv, tmp)
                # fast path: the threshold is at least clip_sigma * sqrt(v_i), so if every value is within
                # that of the median nothing can be clipped and the MAD is not needed
                suspect = False
                for i in range(nv):
                    if abs(xs[i] - centre) > clip_sigma * np.sqrt(vs[i]):
                        suspect = True
                        break
                for _ in range(n_iter if suspect else 0):
                    # robust scatter of the current survivors around the centre
                    k = 0
                    for i in range(nv):
                        if keep[i]:
                            tmp2[k] = abs(xs[i] - centre)
                            k += 1
                    mad = 1.4826 * median_small(tmp2, k, tmp)
                    changed = False
                    for i in range(nv):
                        if keep[i]:
                            sig = max(np.sqrt(vs[i]), mad)
                            if abs(xs[i] - centre) > clip_sigma * sig and nk > 1:
                                keep[i] = False
                                nk -= 1
                                changed = True
                    if not changed:
                        break
                    sw = 0.0
                    swx = 0.0
                    for i in range(nv):
                        if keep[i]:
                            sw += ws[i]
                            swx += ws[i] * xs[i]
                    centre = swx / sw
            if nk < min_inputs or nk == 0:
                out_image[y, x] = 0.0
                out_variance[y, x] = np.inf
                out_mask[y, x] = (any_mask & ~drop_bits) | nodata_bit
                out_count[y, x] = 0
                continue
            sw = 0.0
            swx = 0.0
            sw2v = 0.0
            mm = 0
            for i in range(nv):
                if keep[i]:
                    sw += ws[i]
                    swx += ws[i] * xs[i]
                    sw2v += ws[i] * ws[i] * vs[i]
                    mm |= ms[i]
            out_image[y, x] = swx / sw
            out_variance[y, x] = sw2v / (sw * sw)
            out_mask[y, x] = mm & ~drop_bits
            out_count[y, x] = nk


@pjit
def mosaic_add(sum_img, sum_var, count, mask_or, image, variance, mask, y0, x0, nodata_bit):  # pragma: no cover
    """Add one warped patch (its pixels without ``nodata_bit``) into a running mosaic, in place.

    Parameters
    ----------
    sum_img, sum_var : ndarray, float32, shape (ny, nx)
        Running sums of pixel values and variances (in place). A pixel gets at
        most a few patches, so float32 sums add < 1e-7 relative rounding.
    count : ndarray, int16, shape (ny, nx)
        Number of patches with data per pixel (in place).
    mask_or : ndarray, int32, shape (ny, nx)
        OR of the mask bits of the contributing pixels (in place).
    image, variance : ndarray, float32, shape (h, w)
        The warped patch, placed at rows ``y0:y0+h`` and columns ``x0:x0+w``.
    mask : ndarray, int32, shape (h, w)
    y0, x0 : int
    nodata_bit : int
        Pixels with this bit carry no data and are skipped.

    Returns
    -------
    int
        Number of pixels the patch added.
    """
    h, w = image.shape
    n_added = 0
    for j in prange(h):
        y = y0 + j
        n_row = 0
        for i in range(w):
            m = mask[j, i]
            if m & nodata_bit:
                continue
            x = x0 + i
            sum_img[y, x] += image[j, i]
            sum_var[y, x] += variance[j, i]
            count[y, x] += 1
            mask_or[y, x] |= m
            n_row += 1
        n_added += n_row
    return n_added


@pjit
def mosaic_finish(sum_img, sum_var, count, mask_or, nodata_bit, out_image, out_variance, out_mask):  # pragma: no cover
    """Mean of overlapping patches (the mean's variance), NO_DATA where no patch has data.

    Equation: ``I = sum_k I_k / n``, ``V = sum_k V_k / n^2`` over the ``n = count`` patches
    with data at a pixel; where ``n = 0``: ``I = 0``, ``V = inf``, mask ``|= nodata_bit``.

    Parameters
    ----------
    sum_img, sum_var, count, mask_or : ndarray, shape (ny, nx)
        From :func:`mosaic_add` (float32, float32, int16, int32).
    nodata_bit : int
    out_image, out_variance : ndarray, float32, shape (ny, nx)
        Output, written in place.
    out_mask : ndarray, int32, shape (ny, nx)
        Output, written in place.
    """
    ny, nx = sum_img.shape
    for y in prange(ny):
        for x in range(nx):
            n = count[y, x]
            if n > 0:
                out_image[y, x] = sum_img[y, x] / n
                out_variance[y, x] = sum_var[y, x] / (n * n)
                out_mask[y, x] = mask_or[y, x]
            else:
                out_image[y, x] = 0.0
                out_variance[y, x] = np.inf
                out_mask[y, x] = mask_or[y, x] | nodata_bit


def _warmup_cases():
    """Tiny argument tuples that compile every kernel here (used by ``apfast warmup``)."""
    n, ny, nx = 3, 2, 3
    img = np.ones((n, ny, nx), dtype=np.float32)
    var = np.ones((n, ny, nx), dtype=np.float32)
    msk = np.zeros((n, ny, nx), dtype=np.int32)
    out = (
        np.empty((ny, nx), dtype=np.float32),
        np.empty((ny, nx), dtype=np.float32),
        np.empty((ny, nx), dtype=np.int32),
        np.empty((ny, nx), dtype=np.int16),
    )
    return [
        (
            combine_clipped,
            (img, var, msk, np.ones(n), np.ones(n), False, 1, 0, 256, 3.0, 2, 1, *out),
        ),
        (median_small, (np.ones(3), 3, np.empty(3))),
        (
            mosaic_add,
            (np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.int16),
             np.zeros((ny, nx), np.int32), img[0], var[0], msk[0], 0, 0, 256),
        ),
        (
            mosaic_finish,
            (np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.int16),
             np.zeros((ny, nx), np.int32), 256, out[0], out[1], out[2]),
        ),
    ]
