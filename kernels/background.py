"""Background (sky) kernels: clipped mesh statistics, hole filling and separable spline interpolation.

The sky model follows the usual binned approach (Rubin afw ``BackgroundMI``,
SExtractor): the image is cut into ``bin_size`` cells, each cell gets a robust
statistic of its unmasked pixels, cells with too few good pixels are filled
from their neighbours, and the mesh is interpolated back to full resolution
through the cell centres.

Interpolation is separable: the mesh is first interpolated along x for every
mesh row (giving a ``(ny_cells, nx)`` array), then along y for every column.
Three one-dimensional schemes share one piecewise-cubic representation
``f(x) = a + b t + c t^2 + d t^3`` with ``t = x - x_k``:

- ``METHOD_AKIMA`` (0): along x, Akima (1970, J. ACM 17, 589) slopes
  ``s_i = (w1 m_{i-1} + w2 m_i) / (w1 + w2)``, ``w1 = |m_{i+1} - m_i|``,
  ``w2 = |m_{i-1} - m_{i-2}|`` with the ends extended by
  ``m_{-1} = 2 m_0 - m_1``, ``m_{-2} = 3 m_0 - 2 m_1`` (Akima eq. 8); a tiny
  ``eps`` is added to both weights so the slope is a continuous function of the
  data (no 0/0 switch). Along y the same Hermite form is used, but the
  weights ``w1 / (w1 + w2)`` come from the mesh columns and are carried to
  every pixel column by a natural cubic spline in x (see
  :func:`interpolate_mesh`), which keeps the surface C1 in x. Reproduces
  quadratics exactly on a uniform grid (all weights are then 1/2).
- ``METHOD_CUBIC`` (1): natural cubic spline (zero second derivative at the
  ends), C2 continuous.
- ``METHOD_LINEAR`` (2): piecewise linear.

Outside the outermost centres the end polynomial is continued (a straight line
for ``METHOD_LINEAR``), so the model is C1 everywhere for AKIMA/CUBIC.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit
from apfast.kernels.primitives import select_kth

__all__ = [
    "METHOD_AKIMA",
    "METHOD_CUBIC",
    "METHOD_LINEAR",
    "STAT_MEANCLIP",
    "STAT_MEDIAN",
    "clipped_stats",
    "mesh_statistics",
    "fill_mesh_holes",
    "akima_alpha",
    "hermite_from_alpha",
    "spline_coefficients",
    "pixel_intervals",
    "interpolate_mesh",
]

STAT_MEANCLIP = 0
STAT_MEDIAN = 1
METHOD_AKIMA = 0
METHOD_CUBIC = 1
METHOD_LINEAR = 2

# MEANCLIP start values come from every stride-th value when there are more than _START_SAMPLE_MAX
_START_SAMPLE = 2048
_START_SAMPLE_MAX = 4096
# IQR -> sigma for a Gaussian: 1 / (2 * 0.6744897501960817)
_IQR_TO_SIGMA = 0.7413011092528009


@jit
def _rank_after_median(buf, n, k, r):
    """Order statistic ``r`` of ``buf[:n]`` once ``buf`` is partitioned about rank ``k``."""
    if r == k:
        return float(buf[k])
    if r < k:
        return float(select_kth(buf, 0, k, r))
    return float(select_kth(buf, k + 1, n, r))


@jit
def _median_iqr(buf, n):
    """Median and IQR-sigma of ``buf[:n]`` (n >= 1, reordered in place); std if the IQR is 0."""
    k = n // 2
    med = float(select_kth(buf, 0, n, k))
    if n % 2 == 0:
        lower = buf[0]
        for i in range(1, k):
            if buf[i] > lower:
                lower = buf[i]
        med = 0.5 * (med + float(lower))
    r25 = (n - 1) // 4
    r75 = (3 * (n - 1)) // 4
    # buf[:k] <= buf[k] <= buf[k+1:], so each quartile is found on its side of the median rank
    q25 = _rank_after_median(buf, n, k, r25)
    q75 = _rank_after_median(buf, n, k, r75)
    sig = _IQR_TO_SIGMA * (q75 - q25)
    if not sig > 0.0:
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            s1 += buf[i]
        mean = s1 / n
        for i in range(n):
            d = buf[i] - mean
            s2 += d * d
        sig = math.sqrt(s2 / n)
    return med, sig


@jit
def clipped_stats(buf, n, statistic, n_sigma, n_iter):
    """Robust location and scale of ``buf[:n]`` (reordered in place).

    The median is ``buf`` order statistic ``n // 2`` (mean of ranks
    ``n//2 - 1`` and ``n//2`` for even ``n``); the quartiles are the order
    statistics of ranks ``(n - 1) // 4`` and ``(3 * (n - 1)) // 4`` and give
    ``sigma0 = 0.7413 * (q75 - q25)`` (the std of those values if that is 0).
    For MEANCLIP with ``n > 4096`` these start values are computed from
    ``buf[0 : n : n // 2048]`` only (the clipping then uses every value).

    - ``STAT_MEDIAN``: returns ``(median, sigma0)``.
    - ``STAT_MEANCLIP``: starting from ``(c, s) = (median, sigma0)``, ``n_iter``
      times keep the values with ``|x - c| <= n_sigma * s`` and set ``c``, ``s``
      to their mean and standard deviation (ddof=0); stops early if ``s`` becomes
      0 or no value is kept. Returns ``(c, s)``.

    Parameters
    ----------
    buf : ndarray, float32, shape (>= n,)
        Finite values; reordered in place.
    n : int
        Number of values used.
    statistic : int
        ``STAT_MEANCLIP`` (0) or ``STAT_MEDIAN`` (1).
    n_sigma : float
        Clipping half-width in units of ``s``.
    n_iter : int
        Clipping iterations (>= 1).

    Returns
    -------
    value, sigma : float
        NaN, NaN when ``n == 0``.
    """
    if n == 0:
        return np.nan, np.nan
    if statistic == STAT_MEANCLIP and n > _START_SAMPLE_MAX:
        # the start values only need to be robust: every stride-th value keeps ~2048 of them (4x faster)
        stride = n // _START_SAMPLE
        ns = (n + stride - 1) // stride
        sub = np.empty(ns, dtype=buf.dtype)
        for t in range(ns):
            sub[t] = buf[t * stride]
        med, sig = _median_iqr(sub, ns)
    else:
        med, sig = _median_iqr(buf, n)
    if statistic == STAT_MEDIAN:
        return med, sig
    c = med
    for _ in range(n_iter):
        if not sig > 0.0:
            break
        lim = n_sigma * sig
        # one pass: sums of (x - c) and (x - c)^2 over the kept values (shifted, so no cancellation)
        s1 = 0.0
        s2 = 0.0
        m = 0
        for i in range(n):
            d = buf[i] - c
            if abs(d) <= lim:
                s1 += d
                s2 += d * d
                m += 1
        if m == 0:
            break
        mu = s1 / m
        c = c + mu
        sig = math.sqrt(max(s2 / m - mu * mu, 0.0))
    return c, sig


@pjit
def mesh_statistics(image, mask, ignore_bits, xedges, yedges, statistic, n_sigma, n_iter, values, stds, counts):
    """Robust statistic of the good pixels of every mesh cell, parallel over cells.

    Cell ``(p, q)`` covers rows ``yedges[p]:yedges[p+1]`` and columns
    ``xedges[q]:xedges[q+1]``. A pixel is good when it is finite and
    ``mask & ignore_bits == 0``. See :func:`clipped_stats` for the statistic.

    Parameters
    ----------
    image : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    ignore_bits : int
        Mask bits that exclude a pixel.
    xedges, yedges : ndarray, int64, shape (nx_cells + 1,), (ny_cells + 1,)
        Cell boundaries, increasing, from 0 to nx / ny.
    statistic, n_sigma, n_iter :
        As :func:`clipped_stats`.
    values, stds : ndarray, float32, shape (ny_cells, nx_cells)
        Written in place (NaN for cells without good pixels).
    counts : ndarray, int32, shape (ny_cells, nx_cells)
        Written in place: number of good pixels per cell (before clipping).
    """
    nyc = yedges.shape[0] - 1
    nxc = xedges.shape[0] - 1
    maxw = 0
    for q in range(nxc):
        maxw = max(maxw, xedges[q + 1] - xedges[q])
    maxh = 0
    for p in range(nyc):
        maxh = max(maxh, yedges[p + 1] - yedges[p])
    for cell in prange(nyc * nxc):
        p = cell // nxc
        q = cell - p * nxc
        buf = np.empty(maxw * maxh, dtype=np.float32)
        n = 0
        for i in range(yedges[p], yedges[p + 1]):
            for j in range(xedges[q], xedges[q + 1]):
                v = image[i, j]
                if (mask[i, j] & ignore_bits) == 0 and math.isfinite(v):
                    buf[n] = v
                    n += 1
        val, sig = clipped_stats(buf, n, statistic, n_sigma, n_iter)
        values[p, q] = val
        stds[p, q] = sig
        counts[p, q] = n


@jit
def fill_mesh_holes(values, stds, good, filled):
    """Fill cells that are not ``good`` with the mean of their filled 8-neighbours, growing outwards.

    Each pass fills every empty cell that touches at least one cell that was
    good or filled before the pass (so the result does not depend on scan
    order); passes repeat until every cell is filled.

    Parameters
    ----------
    values, stds : ndarray, float32, shape (ny_cells, nx_cells)
        Written in place for the cells that are not good.
    good : ndarray, bool, shape (ny_cells, nx_cells)
        Cells whose statistics are trusted.
    filled : ndarray, bool, shape (ny_cells, nx_cells)
        Written in place: True for the cells this function filled.

    Returns
    -------
    int
        Number of good cells; 0 means nothing could be filled.
    """
    nyc, nxc = values.shape
    have = good.copy()
    ngood = 0
    for p in range(nyc):
        for q in range(nxc):
            filled[p, q] = False
            if good[p, q]:
                ngood += 1
    if ngood == 0:
        return 0
    remaining = nyc * nxc - ngood
    new = np.zeros((nyc, nxc), dtype=np.bool_)
    while remaining > 0:
        for p in range(nyc):
            for q in range(nxc):
                if have[p, q]:
                    continue
                sv = 0.0
                ss = 0.0
                m = 0
                for dp in range(-1, 2):
                    for dq in range(-1, 2):
                        pp = p + dp
                        qq = q + dq
                        if 0 <= pp < nyc and 0 <= qq < nxc and have[pp, qq]:
                            sv += values[pp, qq]
                            ss += stds[pp, qq]
                            m += 1
                if m > 0:
                    values[p, q] = sv / m
                    stds[p, q] = ss / m
                    new[p, q] = True
        for p in range(nyc):
            for q in range(nxc):
                if new[p, q]:
                    new[p, q] = False
                    have[p, q] = True
                    filled[p, q] = True
                    remaining -= 1
    return ngood


@jit
def _akima_ghosts(m, nm):
    """Extend the secants ``m[2 : nm + 2]`` by two ghost slopes each side (Akima 1970 eq. 8)."""
    m[1] = 2.0 * m[2] - m[3]
    m[0] = 2.0 * m[1] - m[2]
    m[nm + 2] = 2.0 * m[nm + 1] - m[nm]
    m[nm + 3] = 2.0 * m[nm + 2] - m[nm + 1]


@jit
def _akima_alpha(m, i):
    """Akima weight ``w1 / (w1 + w2)`` of the left secant at knot ``i`` (``m`` with ghosts), regularised."""
    scale = max(max(abs(m[i]), abs(m[i + 1])), max(abs(m[i + 2]), abs(m[i + 3])))
    eps = 1e-9 * scale + 1e-300
    w1 = abs(m[i + 3] - m[i + 2]) + eps
    w2 = abs(m[i + 1] - m[i]) + eps
    return w1 / (w1 + w2)


@jit
def akima_alpha(xk, yk, alpha, scratch):
    """Akima weights ``alpha_i`` of the data ``(xk, yk)``: slope ``s_i = alpha_i m_{i-1} + (1 - alpha_i) m_i``.

    Parameters
    ----------
    xk, yk : ndarray, float64, shape (n,), n >= 3
    alpha : ndarray, float64, shape (n,)
        Written in place.
    scratch : ndarray, float64, shape (>= n + 3,)
    """
    n = xk.shape[0]
    nm = n - 1
    m = scratch[: nm + 4]
    for k in range(nm):
        m[k + 2] = (yk[k + 1] - yk[k]) / (xk[k + 1] - xk[k])
    _akima_ghosts(m, nm)
    for i in range(n):
        alpha[i] = _akima_alpha(m, i)


@jit
def hermite_from_alpha(xk, yk, alpha, coef, scratch):
    """Piecewise-cubic coefficients (as :func:`spline_coefficients`) with Akima slopes of given weights.

    Slopes ``s_i = alpha_i m_{i-1} + (1 - alpha_i) m_i`` from the secants ``m``
    of ``yk`` (with Akima's ghost secants at the ends). The result is linear in
    ``yk`` for fixed ``alpha``.

    Parameters
    ----------
    xk, yk, alpha : ndarray, float64, shape (n,), n >= 3
    coef : ndarray, float64, shape (n - 1, 4)
        Written in place.
    scratch : ndarray, float64, shape (>= 2 n + 3,)
    """
    n = xk.shape[0]
    nm = n - 1
    m = scratch[: nm + 4]
    s = scratch[nm + 4 : nm + 4 + n]
    for k in range(nm):
        m[k + 2] = (yk[k + 1] - yk[k]) / (xk[k + 1] - xk[k])
    _akima_ghosts(m, nm)
    for i in range(n):
        s[i] = alpha[i] * m[i + 1] + (1.0 - alpha[i]) * m[i + 2]
    for k in range(nm):
        h = xk[k + 1] - xk[k]
        mk = m[k + 2]
        coef[k, 0] = yk[k]
        coef[k, 1] = s[k]
        coef[k, 2] = (3.0 * mk - 2.0 * s[k] - s[k + 1]) / h
        coef[k, 3] = (s[k] + s[k + 1] - 2.0 * mk) / (h * h)


@jit
def spline_coefficients(xk, yk, method, coef, scratch):
    """Piecewise-cubic coefficients of a 1-D interpolant through ``(xk, yk)``.

    Interval ``k`` (``xk[k] <= x < xk[k+1]``, also used to extrapolate from the
    first and last interval) evaluates as ``coef[k, 0] + t * (coef[k, 1] + t *
    (coef[k, 2] + t * coef[k, 3]))`` with ``t = x - xk[k]``. For the Hermite
    form with slopes ``s``: ``c = (3 m_k - 2 s_k - s_{k+1}) / h``,
    ``d = (s_k + s_{k+1} - 2 m_k) / h^2`` with ``m_k`` the secant slope and
    ``h`` the interval width.

    Parameters
    ----------
    xk : ndarray, float64, shape (n,)
        Strictly increasing knots.
    yk : ndarray, float64, shape (n,)
        Values.
    method : int
        ``METHOD_AKIMA``, ``METHOD_CUBIC`` or ``METHOD_LINEAR``.
    coef : ndarray, float64, shape (max(n - 1, 1), 4)
        Written in place. With ``n == 1`` the single row is the constant.
    scratch : ndarray, float64, shape (>= 3 n + 4,)
        Work space.
    """
    n = xk.shape[0]
    if n == 1:
        coef[0, 0] = yk[0]
        coef[0, 1] = 0.0
        coef[0, 2] = 0.0
        coef[0, 3] = 0.0
        return
    nm = n - 1
    # m[k + 2] is the secant slope of interval k; two ghost slopes each side
    m = scratch[: nm + 4]
    s = scratch[nm + 4 : nm + 4 + n]
    for k in range(nm):
        m[k + 2] = (yk[k + 1] - yk[k]) / (xk[k + 1] - xk[k])
    if method == METHOD_LINEAR or n == 2:
        for k in range(nm):
            coef[k, 0] = yk[k]
            coef[k, 1] = m[k + 2]
            coef[k, 2] = 0.0
            coef[k, 3] = 0.0
        return
    if method == METHOD_AKIMA:
        _akima_ghosts(m, nm)
        for i in range(n):
            a = _akima_alpha(m, i)
            s[i] = a * m[i + 1] + (1.0 - a) * m[i + 2]
    else:
        # natural cubic spline: solve for the slopes s_i (tridiagonal, Thomas algorithm)
        cp = scratch[nm + 4 + n : nm + 4 + 2 * n]
        h0 = xk[1] - xk[0]
        b = 2.0 / h0
        c = 1.0 / h0
        d = 3.0 * m[2] / h0
        cp[0] = c / b
        s[0] = d / b
        for i in range(1, n):
            hl = xk[i] - xk[i - 1]
            a = 1.0 / hl
            if i < nm:
                hr = xk[i + 1] - xk[i]
                b = 2.0 / hl + 2.0 / hr
                c = 1.0 / hr
                d = 3.0 * (m[i + 1] / hl + m[i + 2] / hr)
            else:
                b = 2.0 / hl
                c = 0.0
                d = 3.0 * m[i + 1] / hl
            den = b - a * cp[i - 1]
            cp[i] = c / den
            s[i] = (d - a * s[i - 1]) / den
        for i in range(n - 2, -1, -1):
            s[i] -= cp[i] * s[i + 1]
    for k in range(nm):
        h = xk[k + 1] - xk[k]
        mk = m[k + 2]
        coef[k, 0] = yk[k]
        coef[k, 1] = s[k]
        coef[k, 2] = (3.0 * mk - 2.0 * s[k] - s[k + 1]) / h
        coef[k, 3] = (s[k] + s[k + 1] - 2.0 * mk) / (h * h)


@jit
def pixel_intervals(xk, npix, idx, dt):
    """For every pixel centre ``x = 0 .. npix-1``: its interval ``k`` in ``xk`` and ``t = x - xk[k]``.

    Parameters
    ----------
    xk : ndarray, float64, shape (n,)
        Increasing knots.
    npix : int
    idx : ndarray, int64, shape (npix,)
        Written in place: ``k`` clipped to ``[0, max(n - 2, 0)]``.
    dt : ndarray, float64, shape (npix,)
        Written in place.
    """
    n = xk.shape[0]
    last = max(n - 2, 0)
    k = 0
    for x in range(npix):
        while k < last and x >= xk[k + 1]:
            k += 1
        idx[x] = k
        dt[x] = x - xk[k]


@pjit
def interpolate_mesh(mesh, xc, yc, method, out):
    """Evaluate the separable interpolant of a mesh at every pixel (in place into ``out``).

    Step 1 interpolates each mesh row along x to every column; step 2 builds,
    for every column, the 1-D interpolant along y through the cell centres and
    evaluates it at every row (parallel over columns for the coefficients and
    over rows for the evaluation). See the module docstring for the schemes.

    Parameters
    ----------
    mesh : ndarray, float32, shape (ny_cells, nx_cells)
        Finite cell values.
    xc, yc : ndarray, float64, shape (nx_cells,), (ny_cells,)
        Cell centres in pixel coordinates (pixel ``j`` has its centre at ``x = j``).
    method : int
        ``METHOD_AKIMA``, ``METHOD_CUBIC`` or ``METHOD_LINEAR``.
    out : ndarray, float32, shape (ny, nx)
        Written in place with the smooth model.
    """
    ny, nx = out.shape
    nyc, nxc = mesh.shape
    xi = np.empty(nx, dtype=np.int64)
    xt = np.empty(nx, dtype=np.float64)
    pixel_intervals(xc, nx, xi, xt)
    yi = np.empty(ny, dtype=np.int64)
    yt = np.empty(ny, dtype=np.float64)
    pixel_intervals(yc, ny, yi, yt)
    # step 1: every mesh row to every column
    tmp = np.empty((nyc, nx), dtype=np.float64)
    for p in prange(nyc):
        cx = np.empty((max(nxc - 1, 1), 4), dtype=np.float64)
        sc = np.empty(3 * nxc + 4, dtype=np.float64)
        row = np.empty(nxc, dtype=np.float64)
        for q in range(nxc):
            row[q] = mesh[p, q]
        spline_coefficients(xc, row, method, cx, sc)
        for j in range(nx):
            k = xi[j]
            t = xt[j]
            tmp[p, j] = cx[k, 0] + t * (cx[k, 1] + t * (cx[k, 2] + t * cx[k, 3]))
    # step 2: per-column coefficients along y, stored (interval, power, column) for row-wise evaluation
    nseg = max(nyc - 1, 1)
    cy = np.empty((nseg, 4, nx), dtype=np.float64)
    # Along y, Akima's weights are taken from the mesh columns and carried to every pixel column by a
    # natural cubic spline in x: the y-interpolant is then linear in the x-interpolated data with weights
    # that vary smoothly in x, so the model stays C1 in x too (per-column Akima weights, |.| of data
    # differences, would put kinks along x wherever two secants cross).
    akima_y = method == METHOD_AKIMA and nyc >= 3
    alpha = np.empty((nyc, nx), dtype=np.float64)
    if akima_y:
        acol = np.empty((nxc, nyc), dtype=np.float64)
        for q in prange(nxc):
            col = np.empty(nyc, dtype=np.float64)
            sc = np.empty(3 * nyc + 4, dtype=np.float64)
            a = np.empty(nyc, dtype=np.float64)
            for p in range(nyc):
                col[p] = mesh[p, q]
            akima_alpha(yc, col, a, sc)
            for p in range(nyc):
                acol[q, p] = a[p]
        for p in prange(nyc):
            cx = np.empty((max(nxc - 1, 1), 4), dtype=np.float64)
            sc = np.empty(3 * nxc + 4, dtype=np.float64)
            row = np.empty(nxc, dtype=np.float64)
            for q in range(nxc):
                row[q] = acol[q, p]
            spline_coefficients(xc, row, METHOD_CUBIC, cx, sc)
            for j in range(nx):
                k = xi[j]
                t = xt[j]
                alpha[p, j] = cx[k, 0] + t * (cx[k, 1] + t * (cx[k, 2] + t * cx[k, 3]))
    nchunk = 64
    nblk = (nx + nchunk - 1) // nchunk
    for blk in prange(nblk):
        col = np.empty(nyc, dtype=np.float64)
        al = np.empty(nyc, dtype=np.float64)
        cc = np.empty((nseg, 4), dtype=np.float64)
        sc = np.empty(3 * nyc + 4, dtype=np.float64)
        for j in range(blk * nchunk, min(nx, (blk + 1) * nchunk)):
            for p in range(nyc):
                col[p] = tmp[p, j]
            if akima_y:
                for p in range(nyc):
                    al[p] = alpha[p, j]
                hermite_from_alpha(yc, col, al, cc, sc)
            else:
                spline_coefficients(yc, col, method, cc, sc)
            for k in range(nseg):
                for w in range(4):
                    cy[k, w, j] = cc[k, w]
    for i in prange(ny):
        k = yi[i]
        t = yt[i]
        for j in range(nx):
            out[i, j] = cy[k, 0, j] + t * (cy[k, 1, j] + t * (cy[k, 2, j] + t * cy[k, 3, j]))


def _warmup_cases():
    """Tiny calls with the production dtypes, for ``apfast warmup``."""
    img = np.zeros((8, 8), dtype=np.float32)
    msk = np.zeros((8, 8), dtype=np.int32)
    xe = np.array([0, 4, 8], dtype=np.int64)
    vals = np.zeros((2, 2), dtype=np.float32)
    stds = np.zeros((2, 2), dtype=np.float32)
    cnts = np.zeros((2, 2), dtype=np.int32)
    good = np.ones((2, 2), dtype=np.bool_)
    filled = np.zeros((2, 2), dtype=np.bool_)
    xc = np.array([1.5, 5.5], dtype=np.float64)
    model_values = vals.copy()
    model_values.setflags(write=False)  # BackgroundModel keeps its mesh read-only (a separate signature)
    return [
        (mesh_statistics, (img, msk, 1, xe, xe, STAT_MEANCLIP, 3.0, 3, vals, stds, cnts)),
        (fill_mesh_holes, (vals, stds, good, filled)),
        (interpolate_mesh, (model_values, xc, xc, METHOD_AKIMA, img)),
    ]
