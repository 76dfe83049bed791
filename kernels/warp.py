"""Resampling of an image, its variance and its mask onto another pixel grid.

The driver (:mod:`apfast.diffim.warp`) computes, for every destination pixel, the
0-based source position ``(xmap, ymap)`` it samples; these kernels interpolate
there. Two pieces:

- :func:`interp_grid_cubic` expands exact source positions known on a coarse
  grid of destination nodes (every ``spacing`` pixels) to every destination
  pixel with separable cubic convolution (Keys 1981, ``a = -1/2``: Catmull-Rom).
- :func:`warp_lanczos3` / :func:`warp_bilinear` resample image, variance and
  mask at those positions, skipping bad source pixels and renormalising the
  remaining weights.
- :func:`warp_grid` does both at once: it expands the node grids one destination
  row at a time (bit-identical to :func:`interp_grid_cubic`), optionally scales by
  an interpolated pixel-area ratio, and resamples, with no full-size maps.
- :func:`mark_bad_footprints` precomputes which source pixels are bad and which
  interpolation windows contain one.

Conventions: pixel centres sit at integer coordinates; images are native
float32, maps float64, masks int32. No I/O, no globals.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit
from apfast.kernels.primitives import lanczos3_weights

__all__ = [
    "SNAP",
    "catmull_rom_weights",
    "grow_mask_or",
    "interp_grid_cubic",
    "lanczos3_taps",
    "mark_bad_footprints",
    "warp_bilinear",
    "warp_grid",
    "warp_lanczos3",
]

#: Fractional offsets closer than this (pixels) to an integer are treated as exactly integer, so an
#: identity or integer-shift mapping copies pixels bit for bit (WCS round trips leave ~1e-10 px).
SNAP = 1e-6


@jit
def catmull_rom_weights(f, out):
    """Fill the 4 cubic-convolution weights (Keys ``a = -1/2``) for nodes ``k-1, k, k+1, k+2``.

    For ``t = k + f`` with ``f`` in ``[0, 1)``:
    ``w = (-f^3 + 2f^2 - f, 3f^3 - 5f^2 + 2, -3f^3 + 4f^2 + f, f^3 - f^2) / 2``
    (Keys 1981, eq. 15). They sum to 1, interpolate the nodes exactly and
    reproduce quadratics, so the error is ``O(h^3)`` in the node spacing ``h``.

    Parameters
    ----------
    f : float
        Fractional position in ``[0, 1)``.
    out : ndarray (4,) float64
        Written in place.
    """
    f2 = f * f
    f3 = f2 * f
    out[0] = 0.5 * (-f3 + 2.0 * f2 - f)
    out[1] = 0.5 * (3.0 * f3 - 5.0 * f2 + 2.0)
    out[2] = 0.5 * (-3.0 * f3 + 4.0 * f2 + f)
    out[3] = 0.5 * (f3 - f2)


@pjit
def interp_grid_cubic(gx, gy, start, spacing, out_x, out_y):
    """Expand two coarse node grids to every pixel with separable cubic convolution.

    Node ``(p, q)`` sits at destination pixel ``(x, y) = (start + q spacing, start + p spacing)``.
    Pixel ``(i, j)`` gets ``sum_mn wy_m wx_n g[k_i - 1 + m, l_j - 1 + n]`` with the
    :func:`catmull_rom_weights` of ``t = (j - start) / spacing = l_j + f``.

    Parameters
    ----------
    gx, gy : ndarray (ncy, ncx) float64
        Source x and y at the nodes. The grid must reach one node beyond every
        pixel on each side: ``start <= -spacing`` and
        ``start + (ncx - 2) spacing >= nx - 1`` (same for y), else the output is garbage.
    start : float
        Destination coordinate of node 0 (same on both axes).
    spacing : float
        Node spacing in pixels (> 0).
    out_x, out_y : ndarray (ny, nx) float64
        Written in place.
    """
    ny, nx = out_x.shape
    ncx = gx.shape[1]
    lx = np.empty(nx, np.int64)
    wxs = np.empty((nx, 4))
    w = np.empty(4)
    for j in range(nx):
        t = (j - start) / spacing
        k = math.floor(t)
        catmull_rom_weights(t - k, w)
        lx[j] = k - 1
        for m in range(4):
            wxs[j, m] = w[m]
    for i in prange(ny):
        wy = np.empty(4)
        t = (i - start) / spacing
        k = math.floor(t)
        catmull_rom_weights(t - k, wy)
        rx = np.zeros(ncx)
        ry = np.zeros(ncx)
        for m in range(4):
            for q in range(ncx):
                rx[q] += wy[m] * gx[k - 1 + m, q]
                ry[q] += wy[m] * gy[k - 1 + m, q]
        for j in range(nx):
            sx = 0.0
            sy = 0.0
            l0 = lx[j]
            for n in range(4):
                sx += wxs[j, n] * rx[l0 + n]
                sy += wxs[j, n] * ry[l0 + n]
            out_x[i, j] = sx
            out_y[i, j] = sy


#: The Lanczos-3 weights (one shared kernel, :func:`apfast.kernels.primitives.lanczos3_weights`).
lanczos3_taps = lanczos3_weights


#: Rows of the Lanczos-3 weight table per pixel of fractional offset (see :func:`lanczos3_table`).
TABLE_STEPS = 4096


@jit
def lanczos3_table(nsteps, out):
    """Tabulate :func:`lanczos3_taps` at ``frac = m / nsteps`` for ``m = 0 .. nsteps``.

    Linear interpolation between rows (:func:`_table_taps`) reproduces the exact
    weights to ~2e-8 for ``nsteps = 4096`` (the weights' second derivative is
    below 3, error <= 3 / (8 nsteps^2)) at a fraction of the cost of the six trig
    calls per pixel, and keeps the sum 1 and the exact delta at ``frac = 0``.

    Parameters
    ----------
    nsteps : int
    out : ndarray (nsteps + 2, 6) float64
        Written in place; rows ``nsteps`` and ``nsteps + 1`` hold the delta at the next pixel
        (``frac -> 1``), the second as a guard.
    """
    w = np.empty(6)
    for m in range(nsteps):
        lanczos3_taps(m / nsteps, w)
        for j in range(6):
            out[m, j] = w[j]
    # frac -> 1 is the delta at the next pixel: weight 1 on tap 3
    for j in range(6):
        out[nsteps, j] = 0.0
        out[nsteps + 1, j] = 0.0
    out[nsteps, 3] = 1.0
    out[nsteps + 1, 3] = 1.0


@jit
def _table_taps(table, nsteps, frac, out):
    t = frac * nsteps
    m = int(t)
    if m >= nsteps:
        m = nsteps - 1
    u = t - m
    for j in range(6):
        out[j] = table[m, j] + u * (table[m + 1, j] - table[m, j])


@pjit
def mark_bad_footprints(src_img, src_var, src_mask, bad_bits, lo, hi, bad, anybad):
    """Mark unusable source pixels and, per pixel, whether any lies in its interpolation window.

    ``bad[r, c] = 1`` when ``src_mask & bad_bits`` or a non-finite image or variance;
    ``anybad[r, c] = 1`` when any ``bad`` pixel lies in rows ``r+lo .. r+hi`` and
    columns ``c+lo .. c+hi`` (clipped to the image): the window a sample with
    ``floor(position) = (c, r)`` reads, so clean windows take the fast path.

    Parameters
    ----------
    src_img, src_var : ndarray (ny, nx) float32
    src_mask : ndarray (ny, nx) int32
    bad_bits : int
    lo, hi : int
        Window offsets (-2, 3 for Lanczos-3; 0, 1 for bilinear).
    bad, anybad : ndarray (ny, nx) uint8
        Written in place.
    """
    ny, nx = src_img.shape
    rowany = np.empty((ny, nx), np.uint8)
    # pass 1: bad pixels, and each one spread over the columns whose window reaches it
    # (bad pixels are rare, so this costs one sweep); pass 2: OR over the window's rows
    for r in prange(ny):
        for c in range(nx):
            rowany[r, c] = 0
        for c in range(nx):
            b = (src_mask[r, c] & bad_bits) != 0
            b = b or not math.isfinite(src_img[r, c]) or not math.isfinite(src_var[r, c])
            if b:
                bad[r, c] = 1
                for d in range(max(0, c - hi), min(nx, c - lo + 1)):
                    rowany[r, d] = 1
            else:
                bad[r, c] = 0
    for r in prange(ny):
        r0 = max(0, r + lo)
        r1 = min(ny, r + hi + 1)
        for c in range(nx):
            anybad[r, c] = rowany[r0, c]
        for d in range(r0 + 1, r1):
            for c in range(nx):
                anybad[r, c] |= rowany[d, c]


@jit
def _bilinear_taps(frac, out):
    out[0] = 1.0 - frac
    out[1] = frac


@jit
def _dot6(w0, w1, w2, w3, w4, w5, a, r, c):
    """``sum_j w_j a[r, c + j]`` for ``j = 0..5`` as a pairwise tree (in the weights' precision)."""
    return (w0 * a[r, c] + w1 * a[r, c + 1]) + (w2 * a[r, c + 2] + w3 * a[r, c + 3]) + (
        w4 * a[r, c + 4] + w5 * a[r, c + 5]
    )


@jit
def _warp_pixel(
    x, y, ntap, off, table, src_img, src_var, src_mask, bad, anybad, nodata_bits, intrp_bits, min_good_weight,
    wx, wy,
):
    """Resample at source position ``(x, y)``; return ``(img, var, mask, status)``.

    ``status`` is 0 for a plain sample, 1 for NO_DATA, 2 for a renormalised sample.
    """
    ny, nx = src_img.shape
    if not (math.isfinite(x) and math.isfinite(y)) or abs(x) > 1e9 or abs(y) > 1e9:
        return 0.0, np.inf, nodata_bits, 1
    ix = math.floor(x)
    iy = math.floor(y)
    fx = x - ix
    fy = y - iy
    if fx < SNAP:
        fx = 0.0
    elif fx > 1.0 - SNAP:
        fx = 0.0
        ix += 1
    if fy < SNAP:
        fy = 0.0
    elif fy > 1.0 - SNAP:
        fy = 0.0
        iy += 1
    # taps with non-zero weight: the whole kernel, or only the centre on an exact integer
    if ntap == 6:
        cx = 2
    else:
        cx = 0
    ja, jb = (cx, cx) if fx == 0.0 else (0, ntap - 1)
    ka, kb = (cx, cx) if fy == 0.0 else (0, ntap - 1)
    if ix + off + ja < 0 or iy + off + ka < 0 or ix + off + jb >= nx or iy + off + kb >= ny:
        return 0.0, np.inf, nodata_bits, 1
    # mask: OR over the bilinear footprint (the 1, 2 or 4 nearest pixels with weight)
    m = src_mask[iy, ix]
    if fx != 0.0:
        m |= src_mask[iy, ix + 1]
    if fy != 0.0:
        m |= src_mask[iy + 1, ix]
        if fx != 0.0:
            m |= src_mask[iy + 1, ix + 1]
    if ntap == 6:
        _table_taps(table, table.shape[0] - 2, fx, wx)
        _table_taps(table, table.shape[0] - 2, fy, wy)
    else:
        _bilinear_taps(fx, wx)
        _bilinear_taps(fy, wy)
    clean = anybad[iy, ix] == 0
    if clean and ntap == 6 and fx != 0.0 and fy != 0.0:
        # the common case, written as independent partial sums: a serial += chain would be
        # bound by the floating-point add latency, not by the arithmetic
        x0, x1, x2, x3, x4, x5 = wx[0], wx[1], wx[2], wx[3], wx[4], wx[5]
        q0, q1, q2, q3, q4, q5 = x0 * x0, x1 * x1, x2 * x2, x3 * x3, x4 * x4, x5 * x5
        c = ix - 2
        r = iy - 2
        a0 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r, c)
        a1 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 1, c)
        a2 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 2, c)
        a3 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 3, c)
        a4 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 4, c)
        a5 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 5, c)
        v0 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r, c)
        v1 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 1, c)
        v2 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 2, c)
        v3 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 3, c)
        v4 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 4, c)
        v5 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 5, c)
        y0, y1, y2, y3, y4, y5 = wy[0], wy[1], wy[2], wy[3], wy[4], wy[5]
        s = (y0 * a0 + y1 * a1) + (y2 * a2 + y3 * a3) + (y4 * a4 + y5 * a5)
        sv = (y0 * y0 * v0 + y1 * y1 * v1) + (y2 * y2 * v2 + y3 * y3 * v3) + (y4 * y4 * v4 + y5 * y5 * v5)
        return s, sv, m, 0
    if clean:
        s = 0.0
        sv = 0.0
        for k in range(ka, kb + 1):
            r = iy + off + k
            a = 0.0
            av = 0.0
            for jj in range(ja, jb + 1):
                c = ix + off + jj
                a += wx[jj] * src_img[r, c]
                av += wx[jj] * wx[jj] * src_var[r, c]
            s += wy[k] * a
            sv += wy[k] * wy[k] * av
        return s, sv, m, 0
    # slow path: skip bad taps, renormalise over the good ones
    s = 0.0
    sv = 0.0
    wg = 0.0
    nbad = 0
    for k in range(ka, kb + 1):
        r = iy + off + k
        for jj in range(ja, jb + 1):
            c = ix + off + jj
            w = wy[k] * wx[jj]
            if bad[r, c] != 0:
                nbad += 1
                continue
            s += w * src_img[r, c]
            sv += w * w * src_var[r, c]
            wg += w
    if nbad == 0:
        return s, sv, m, 0
    if wg >= min_good_weight:
        return s / wg, sv / (wg * wg), m | intrp_bits, 2
    return 0.0, np.inf, m | nodata_bits, 1


@jit
def _warp_row(
    i, ntap, off, table, src_img, src_var, src_mask, bad, anybad, xmap, ymap, out_img, out_var, out_mask,
    nodata_bits, intrp_bits, min_good_weight, wx, wy,
):
    """Resample destination row ``i`` at ``(xmap[i], ymap[i])``; return ``(n_nodata, n_renormalised)``."""
    nxo = out_img.shape[1]
    n_nodata = 0
    n_renorm = 0
    for j in range(nxo):
        v, vv, m, st = _warp_pixel(
            xmap[i, j], ymap[i, j], ntap, off, table, src_img, src_var, src_mask, bad, anybad,
            nodata_bits, intrp_bits, min_good_weight, wx, wy,
        )
        out_img[i, j] = v
        out_var[i, j] = vv
        out_mask[i, j] = m
        if st == 1:
            n_nodata += 1
        elif st == 2:
            n_renorm += 1
    return n_nodata, n_renorm


@pjit
def warp_lanczos3(
    src_img, src_var, src_mask, bad, anybad, xmap, ymap, out_img, out_var, out_mask,
    nodata_bits, intrp_bits, min_good_weight, counts,
):
    """Resample image, variance and mask at source positions with a Lanczos-3 kernel.

    For destination pixel ``(i, j)`` at source position ``(x, y) = (xmap[i, j], ymap[i, j])``
    with ``x = ix + fx``, ``y = iy + fy`` (``fx, fy`` in ``[0, 1)``; within :data:`SNAP`
    of an integer counts as integer):

    - ``img = sum_kl w_k w_l I[iy+k, ix+l] / W``, ``var = sum_kl (w_k w_l)^2 V[iy+k, ix+l] / W^2``
      over the taps ``k, l = -2 .. 3`` with non-zero Lanczos-3 weight (only the centre tap
      on an exact integer) whose source pixel is good, ``W`` the sum of their weights
      (1 when all are good). The variance ignores the covariance the interpolation
      creates between neighbouring output pixels.
    - ``mask`` = OR of the source mask over the bilinear footprint (pixels ``ix, ix+1`` x
      ``iy, iy+1`` that have non-zero weight), plus ``intrp_bits`` when bad taps were
      skipped and the rest renormalised.
    - NO_DATA (``img = 0``, ``var = inf``, ``mask |= nodata_bits``) when a tap falls outside
      the source, the position is not finite, or ``W < min_good_weight``.

    Parameters
    ----------
    src_img, src_var : ndarray (ny, nx) float32
    src_mask : ndarray (ny, nx) int32
    bad, anybad : ndarray (ny, nx) uint8
        From :func:`mark_bad_footprints` with ``lo, hi = -2, 3``.
    xmap, ymap : ndarray (nyo, nxo) float64
        Source positions of every destination pixel (0-based).
    out_img, out_var : ndarray (nyo, nxo) float32
        Written in place.
    out_mask : ndarray (nyo, nxo) int32
        Written in place.
    nodata_bits, intrp_bits : int
        Mask values OR-ed in for no-data and renormalised pixels.
    min_good_weight : float
        Smallest acceptable good-weight sum ``W`` (e.g. 0.5).
    counts : ndarray (nyo, 2) int64
        Written in place: per destination row, the number of NO_DATA and renormalised pixels.
    """
    table = np.empty((TABLE_STEPS + 2, 6))
    lanczos3_table(TABLE_STEPS, table)
    for i in prange(out_img.shape[0]):
        wx = np.empty(6)
        wy = np.empty(6)
        nd, nr = _warp_row(
            i, 6, -2, table, src_img, src_var, src_mask, bad, anybad, xmap, ymap, out_img, out_var, out_mask,
            nodata_bits, intrp_bits, min_good_weight, wx, wy,
        )
        counts[i, 0] = nd
        counts[i, 1] = nr


@pjit
def warp_bilinear(
    src_img, src_var, src_mask, bad, anybad, xmap, ymap, out_img, out_var, out_mask,
    nodata_bits, intrp_bits, min_good_weight, counts,
):
    """Same as :func:`warp_lanczos3` with bilinear weights ``(1 - f, f)`` on the 2x2 footprint.

    ``bad, anybad`` come from :func:`mark_bad_footprints` with ``lo, hi = 0, 1``.
    """
    table = np.empty((2, 6))
    for i in prange(out_img.shape[0]):
        wx = np.empty(6)
        wy = np.empty(6)
        nd, nr = _warp_row(
            i, 2, 0, table, src_img, src_var, src_mask, bad, anybad, xmap, ymap, out_img, out_var, out_mask,
            nodata_bits, intrp_bits, min_good_weight, wx, wy,
        )
        counts[i, 0] = nd
        counts[i, 1] = nr


@pjit
def warp_grid(
    ntap, off, src_img, src_var, src_mask, bad, anybad, gx, gy, garea, start, spacing,
    out_img, out_var, out_mask, nodata_bits, intrp_bits, min_good_weight, counts,
):
    """:func:`warp_lanczos3` / :func:`warp_bilinear` with the pixel map computed on the fly.

    The source position of destination pixel ``(i, j)`` is the cubic-convolution
    interpolation of the node grids ``gx, gy`` exactly as :func:`interp_grid_cubic`
    computes it (bit for bit), one destination row at a time, so no full-size
    position maps are materialised. Samples whose 6x6 Lanczos-3 window is clean and
    inside the source, with both offsets fractional (nearly all), take a fast path that
    accumulates in float32 (weights rounded to float32; results agree with the float64
    sums of :func:`warp_lanczos3` to a few float32 ulps of the window's ``sum |w I|``);
    all others go through the same per-pixel code as :func:`warp_lanczos3`.
    When ``garea`` has nodes, the image of every
    sample (not NO_DATA) is multiplied by ``a``, the same interpolation of
    ``garea`` (the pixel-area ratio), and the variance by ``a^2``.

    Parameters
    ----------
    ntap, off : int
        ``6, -2`` for Lanczos-3, ``2, 0`` for bilinear.
    src_img, src_var : ndarray (ny, nx) float32
    src_mask : ndarray (ny, nx) int32
    bad, anybad : ndarray (ny, nx) uint8
        From :func:`mark_bad_footprints` with ``lo, hi = off, off + ntap - 1``.
    gx, gy : ndarray (ncy, ncx) float64
        Source x and y at the nodes (grid requirements as in :func:`interp_grid_cubic`).
    garea : ndarray (ncy, ncx) or (0, 0) float64
        Pixel-area ratio at the nodes, or an empty array for no flux scaling.
    start, spacing : float
        Destination coordinate of node 0 and node spacing (see :func:`interp_grid_cubic`).
    out_img, out_var : ndarray (nyo, nxo) float32
        Written in place.
    out_mask : ndarray (nyo, nxo) int32
        Written in place.
    nodata_bits, intrp_bits : int
    min_good_weight : float
    counts : ndarray (nyo, 2) int64
        Written in place: per destination row, the number of NO_DATA and renormalised pixels.
    """
    nyo, nxo = out_img.shape
    nys, nxs = src_img.shape
    ncx = gx.shape[1]
    use_area = garea.shape[0] > 0
    if ntap == 6:
        table = np.empty((TABLE_STEPS + 2, 6))
        lanczos3_table(TABLE_STEPS, table)
    else:
        table = np.empty((2, 6))
    nst = table.shape[0] - 2
    f32 = np.float32
    lx = np.empty(nxo, np.int64)
    wxs = np.empty((nxo, 4))
    w = np.empty(4)
    for j in range(nxo):
        t = (j - start) / spacing
        k = math.floor(t)
        catmull_rom_weights(t - k, w)
        lx[j] = k - 1
        for m in range(4):
            wxs[j, m] = w[m]
    for i in prange(nyo):
        wx = np.empty(6)
        wy = np.empty(6)
        wr = np.empty(4)
        t = (i - start) / spacing
        k = math.floor(t)
        catmull_rom_weights(t - k, wr)
        rx = np.zeros(ncx)
        ry = np.zeros(ncx)
        ra = np.zeros(ncx)
        xs = np.empty(nxo)
        ys = np.empty(nxo)
        ixs = np.empty(nxo, np.int64)
        iys = np.empty(nxo, np.int64)
        fast = np.empty(nxo, np.uint8)
        tx = np.empty((nxo, 6))
        ty = np.empty((nxo, 6))
        for m in range(4):
            for q in range(ncx):
                rx[q] += wr[m] * gx[k - 1 + m, q]
                ry[q] += wr[m] * gy[k - 1 + m, q]
        if use_area:
            for m in range(4):
                for q in range(ncx):
                    ra[q] += wr[m] * garea[k - 1 + m, q]
        # pass 1: source positions of the row; flag the common case (Lanczos-3, both offsets
        # fractional, window inside the source and clean) and fill its taps, so the loop of
        # pass 2 is plain arithmetic on contiguous row buffers
        for j in range(nxo):
            x = 0.0
            y = 0.0
            l0 = lx[j]
            for n in range(4):
                x += wxs[j, n] * rx[l0 + n]
                y += wxs[j, n] * ry[l0 + n]
            xs[j] = x
            ys[j] = y
            fast[j] = 0
            if ntap != 6 or not (x >= 2.0 and y >= 2.0 and x < nxs - 4.0 and y < nys - 4.0):
                continue
            ix = int(x)
            iy = int(y)
            fx = x - ix
            fy = y - iy
            if fx < SNAP or fx > 1.0 - SNAP or fy < SNAP or fy > 1.0 - SNAP or anybad[iy, ix] != 0:
                continue
            fast[j] = 1
            ixs[j] = ix
            iys[j] = iy
            t = fx * nst
            mt = min(int(t), nst - 1)
            u = t - mt
            for n in range(6):
                tx[j, n] = table[mt, n] + u * (table[mt + 1, n] - table[mt, n])
            t = fy * nst
            mt = min(int(t), nst - 1)
            u = t - mt
            for n in range(6):
                ty[j, n] = table[mt, n] + u * (table[mt + 1, n] - table[mt, n])
        n_nodata = 0
        n_renorm = 0
        for j in range(nxo):
            if fast[j] != 0:
                ix = ixs[j]
                iy = iys[j]
                x0, x1, x2 = f32(tx[j, 0]), f32(tx[j, 1]), f32(tx[j, 2])
                x3, x4, x5 = f32(tx[j, 3]), f32(tx[j, 4]), f32(tx[j, 5])
                q0, q1, q2, q3, q4, q5 = x0 * x0, x1 * x1, x2 * x2, x3 * x3, x4 * x4, x5 * x5
                c = ix - 2
                r = iy - 2
                a0 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r, c)
                a1 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 1, c)
                a2 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 2, c)
                a3 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 3, c)
                a4 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 4, c)
                a5 = _dot6(x0, x1, x2, x3, x4, x5, src_img, r + 5, c)
                v0 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r, c)
                v1 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 1, c)
                v2 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 2, c)
                v3 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 3, c)
                v4 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 4, c)
                v5 = _dot6(q0, q1, q2, q3, q4, q5, src_var, r + 5, c)
                y0, y1, y2 = f32(ty[j, 0]), f32(ty[j, 1]), f32(ty[j, 2])
                y3, y4, y5 = f32(ty[j, 3]), f32(ty[j, 4]), f32(ty[j, 5])
                v = (y0 * a0 + y1 * a1) + (y2 * a2 + y3 * a3) + (y4 * a4 + y5 * a5)
                vv = (y0 * y0 * v0 + y1 * y1 * v1) + (y2 * y2 * v2 + y3 * y3 * v3) + (
                    y4 * y4 * v4 + y5 * y5 * v5
                )
                msk = src_mask[iy, ix] | src_mask[iy, ix + 1]
                msk |= src_mask[iy + 1, ix] | src_mask[iy + 1, ix + 1]
                st = 0
            else:
                v, vv, msk, st = _warp_pixel(
                    xs[j], ys[j], ntap, off, table, src_img, src_var, src_mask, bad, anybad,
                    nodata_bits, intrp_bits, min_good_weight, wx, wy,
                )
            if st == 1:
                n_nodata += 1
            else:
                if st == 2:
                    n_renorm += 1
                if use_area:
                    l0 = lx[j]
                    a = 0.0
                    for n in range(4):
                        a += wxs[j, n] * ra[l0 + n]
                    v *= a
                    vv *= a * a
            out_img[i, j] = v
            out_var[i, j] = vv
            out_mask[i, j] = msk
        counts[i, 0] = n_nodata
        counts[i, 1] = n_renorm


@pjit
def grow_mask_or(mask, radius, out):
    """OR every mask value into the ``(2 radius + 1)^2`` box around it (separable dilation of bits).

    Parameters
    ----------
    mask : ndarray (ny, nx) int32
    radius : int
        Box half-size (>= 0).
    out : ndarray (ny, nx) int32
        Written in place (must not alias ``mask``).
    """
    ny, nx = mask.shape
    tmp = np.empty((ny, nx), np.int32)
    for r in prange(ny):
        for c in range(nx):
            a = 0
            for d in range(max(0, c - radius), min(nx, c + radius + 1)):
                a |= mask[r, d]
            tmp[r, c] = a
    for r in prange(ny):
        for c in range(nx):
            a = 0
            for d in range(max(0, r - radius), min(ny, r + radius + 1)):
                a |= tmp[d, c]
            out[r, c] = a


def _warmup_cases():
    n = 16
    img = np.ones((n, n), np.float32)
    var = np.ones((n, n), np.float32)
    msk = np.zeros((n, n), np.int32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    xm = np.ascontiguousarray(xx + 0.3)
    ym = np.ascontiguousarray(yy - 0.2)
    planes = (np.empty((n, n), np.float32), np.empty((n, n), np.float32), np.empty((n, n), np.int32))
    counts = np.empty((n, 2), np.int64)
    g = np.zeros((6, 6))
    bad = np.zeros((n, n), np.uint8)
    args = (img, var, msk, bad, bad, xm, ym, *planes, 256, 4, 0.5, counts)
    grid = (-8.0, 8.0)
    srcs = (img, var, msk, bad, bad)
    bits = (256, 4, 0.5)
    return [
        (mark_bad_footprints, (img, var, msk, 1, -2, 3, np.empty((n, n), np.uint8), np.empty((n, n), np.uint8))),
        (warp_lanczos3, args),
        (warp_bilinear, args),
        (warp_grid, (6, -2, *srcs, g + 3.0, g + 4.0, g + 1.0, *grid, *planes, *bits, counts)),
        (warp_grid, (2, 0, *srcs, g + 3.0, g + 4.0, np.empty((0, 0)), *grid, *planes, *bits, counts)),
        (interp_grid_cubic, (g, g, -8.0, 8.0, np.empty((n, n)), np.empty((n, n)))),
        (grow_mask_or, (msk, 1, np.empty((n, n), np.int32))),
    ]
