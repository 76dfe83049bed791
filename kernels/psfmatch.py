"""Numba kernels for Alard-Lupton PSF matching: per-stamp normal equations.

The Alard & Lupton (1998) kernel is a linear combination of basis functions
``B_i(u, v) = exp(-(u^2 + v^2) / 2 sigma^2) u^p v^q``. Each is *separable*:
``B_i = outer(col_i, row_i)`` with ``row_i(u) = exp(-u^2/2 sigma^2) u^p`` and
``col_i(v) = exp(-v^2/2 sigma^2) v^q``. The kernels here convolve a stamp of the
reference image with every basis function using two 1-D passes (a row pass
shared by every basis with the same ``(sigma, p)``) and accumulate the weighted
normal equations of Alard & Lupton (1998) eq. 2-3,
``M_jk = sum_pix w C_j C_k``, ``b_j = sum_pix w I C_j``, where ``C_j = R (x) B_j``
and ``I`` the target image. A constant (differential background) column is
appended when asked. The driver maps raw basis columns to the zero-sum basis
with a linear transform afterwards (``M' = T^T M T``), so the kernels never need
the non-separable zero-sum functions.

Convolution convention (everywhere in apfast.psfmatch / subtract):
``(R (x) B)[y, x] = sum_{v,u} B[v + r, u + r] R[y - v, x - u]`` for offsets
``-r <= u, v <= r`` (true convolution, as ``scipy.signal.convolve``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = ["solve_symmetric_batch", "stamp_normal_equations"]


@pjit
def stamp_normal_equations(ref, tgt, wgt, var_ref, cx, cy, half, row_filt, col_filt, pairs, with_bg,
                           m_out, b_out, sws_out, wvr_out, npix_out):
    """Accumulate the weighted normal equations of every stamp (parallel over stamps).

    Parameters
    ----------
    ref : ndarray (ny, nx) float32
        Image that gets convolved (template in ``convolveTemplate`` mode).
    tgt : ndarray (ny, nx) float32
        Image the convolved reference is fitted to.
    wgt : ndarray (ny, nx) float32
        Per-pixel weight of the target (``1 / variance``; 0 excludes a pixel).
    var_ref : ndarray (ny, nx) float32
        Variance of the reference, summed as ``sum w var_ref`` for the expected chi^2.
    cx, cy : ndarray (ns,) int64
        Stamp centres. The driver guarantees ``[cy - half - r, cy + half + r]`` and the
        same in x lie inside the image (``r = (k - 1) // 2``).
    half : int
        Stamp half-size; a stamp has ``S = 2 half + 1`` pixels per side.
    row_filt : ndarray (nr, k) float64
        Distinct 1-D x factors of the basis.
    col_filt : ndarray (nc, k) float64
        Distinct 1-D y factors of the basis.
    pairs : ndarray (nb, 2) int64
        ``(row index, col index)`` of each basis function.
    with_bg : bool
        Append a constant column (differential background) as unknown ``nb``.
    m_out : ndarray (ns, nu, nu) float64
        Written: normal matrices, ``nu = nb + with_bg``.
    b_out : ndarray (ns, nu) float64
        Written: right-hand sides.
    sws_out : ndarray (ns,) float64
        Written: ``sum w I^2`` (so chi^2 = sws - 2 c.b + c.M.c).
    wvr_out : ndarray (ns,) float64
        Written: ``sum w var_ref``.
    npix_out : ndarray (ns,) int64
        Written: pixels with non-zero weight.
    """
    ns = cx.shape[0]
    nb = pairs.shape[0]
    nr = row_filt.shape[0]
    k = row_filt.shape[1]
    r = (k - 1) // 2
    s = 2 * half + 1
    nu = nb + (1 if with_bg else 0)
    for si in prange(ns):
        x0 = cx[si] - half
        y0 = cy[si] - half
        # row pass: tmp[f, yy, i] over window rows y0 - r .. y0 + s - 1 + r (inner loops contiguous in i)
        h = s + 2 * r
        tmp = np.zeros((nr, h, s))
        for f in range(nr):
            for yy in range(h):
                yimg = y0 - r + yy
                for uu in range(k):
                    wf = row_filt[f, uu]
                    xo = x0 + r - uu
                    for i in range(s):
                        tmp[f, yy, i] += wf * ref[yimg, xo + i]
        cols = np.zeros((nu, s * s))
        for bi in range(nb):
            f = pairs[bi, 0]
            g = pairs[bi, 1]
            for j in range(s):
                # output row j (image y0 + j) takes input row y0 + j - (vv - r) = tmp row j + 2r - vv
                for vv in range(k):
                    wg = col_filt[g, vv]
                    tr = j + 2 * r - vv
                    for i in range(s):
                        cols[bi, j * s + i] += wg * tmp[f, tr, i]
        if with_bg:
            for p in range(s * s):
                cols[nb, p] = 1.0
        w = np.empty(s * s)
        t = np.empty(s * s)
        sws = 0.0
        wvr = 0.0
        npix = 0
        for j in range(s):
            for i in range(s):
                p = j * s + i
                wp = wgt[y0 + j, x0 + i]
                if wp <= 0.0:
                    wp = 0.0
                else:
                    npix += 1
                w[p] = wp
                t[p] = tgt[y0 + j, x0 + i]
                sws += wp * t[p] * t[p]
                wvr += wp * var_ref[y0 + j, x0 + i]
        # M = C W C^T, b = C W t with contiguous inner loops (no BLAS: it would oversubscribe the threads)
        npx = s * s
        wcol = np.empty(npx)
        m = np.empty((nu, nu))
        b = np.empty(nu)
        for a in range(nu):
            acc_b = 0.0
            for p in range(npx):
                wcol[p] = w[p] * cols[a, p]
                acc_b += wcol[p] * t[p]
            b[a] = acc_b
            for c in range(a + 1):
                acc = 0.0
                for p in range(npx):
                    acc += wcol[p] * cols[c, p]
                m[a, c] = acc
                m[c, a] = acc
        for a in range(nu):
            b_out[si, a] = b[a]
            for c in range(nu):
                m_out[si, a, c] = m[a, c]
        sws_out[si] = sws
        wvr_out[si] = wvr
        npix_out[si] = npix


@jit
def _jacobi_eigh(a, v):
    """Cyclic Jacobi eigen-decomposition of the symmetric ``a`` (n, n), in place.

    On return the diagonal of ``a`` holds the eigenvalues and the columns of ``v``
    (n, n, written) the eigenvectors. Rotations follow Numerical Recipes
    (``cot 2 phi = (a_qq - a_pp) / 2 a_pq``); sweeps stop when the off-diagonal
    norm is below ``1e-13`` of the diagonal norm.
    """
    n = a.shape[0]
    for i in range(n):
        for j in range(n):
            v[i, j] = 1.0 if i == j else 0.0
    for _sweep in range(60):
        off = 0.0
        diag = 0.0
        for i in range(n):
            diag += a[i, i] * a[i, i]
            for j in range(i + 1, n):
                off += a[i, j] * a[i, j]
        if off <= 1e-26 * diag or off == 0.0:
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                apq = a[p, q]
                if apq == 0.0:
                    continue
                theta = (a[q, q] - a[p, p]) / (2.0 * apq)
                t = 1.0 / (abs(theta) + np.sqrt(theta * theta + 1.0))
                if theta < 0.0:
                    t = -t
                c = 1.0 / np.sqrt(t * t + 1.0)
                s = t * c
                for k in range(n):
                    akp = a[k, p]
                    akq = a[k, q]
                    a[k, p] = c * akp - s * akq
                    a[k, q] = s * akp + c * akq
                for k in range(n):
                    apk = a[p, k]
                    aqk = a[q, k]
                    a[p, k] = c * apk - s * aqk
                    a[q, k] = s * apk + c * aqk
                for k in range(n):
                    vkp = v[k, p]
                    vkq = v[k, q]
                    v[k, p] = c * vkp - s * vkq
                    v[k, q] = s * vkp + c * vkq


@pjit
def solve_symmetric_batch(m, b, max_cond, out):
    """Solve ``m[i] x = b[i]`` for symmetric positive semi-definite systems, truncating small eigenvalues.

    Each system is Jacobi-scaled (``D^-1/2 M D^-1/2``, ``D = diag(M)``), decomposed
    by :func:`_jacobi_eigh` and solved with eigenvalues below ``lambda_max / max_cond``
    dropped: Rubin ip_diffim's EIGENVALUE regularisation of the Alard-Lupton normal
    equations. Written without BLAS/LAPACK so parallel stamps do not fight BLAS threads.

    Parameters
    ----------
    m : ndarray (ns, n, n) float64
        Normal matrices (not modified).
    b : ndarray (ns, n) float64
        Right-hand sides.
    max_cond : float
        Largest eigenvalue ratio kept.
    out : ndarray (ns, n) float64
        Written: the solutions.
    """
    ns = m.shape[0]
    n = m.shape[1]
    for i in prange(ns):
        d = np.empty(n)
        for j in range(n):
            dj = m[i, j, j]
            d[j] = np.sqrt(dj) if dj > 0.0 else 1.0
        a = np.empty((n, n))
        for j in range(n):
            for k in range(n):
                a[j, k] = m[i, j, k] / (d[j] * d[k])
        v = np.empty((n, n))
        _jacobi_eigh(a, v)
        lam_max = 0.0
        for j in range(n):
            lam_max = max(lam_max, a[j, j])
        cut = lam_max / max_cond
        x = np.zeros(n)
        for j in range(n):
            lam = a[j, j]
            if lam <= cut or lam <= 0.0:
                continue
            proj = 0.0
            for k in range(n):
                proj += v[k, j] * b[i, k] / d[k]
            proj /= lam
            for k in range(n):
                x[k] += proj * v[k, j]
        for k in range(n):
            out[i, k] = x[k] / d[k]
