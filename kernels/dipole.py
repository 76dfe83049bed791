"""Dipole fit kernel: a positive and a negative PSF plus a constant, fitted by Levenberg-Marquardt.

The model of difference-image pixel ``i`` at ``(x_i, y_i)`` (Rubin ``DipoleFit``
on the difference alone; Rubin also fits the pre-subtraction images, which this
kernel does not)::

    m_i = F+ P(x_i - x+, y_i - y+) - F- P(x_i - x-, y_i - y-) + b

with parameters ``p = (x+, y+, x-, y-, F+, F-, b)``. ``P`` is the PSF stamp (sum 1)
shifted to each lobe's sub-pixel position by separable, normalised Lanczos-3
interpolation (:func:`apfast.kernels.forced.shift_stamp`), so the real,
non-Gaussian PSF shape is used. Derivatives with respect to the lobe positions are
central differences of the interpolated stamp (step ``1e-3`` px); those with
respect to ``F+``, ``F-`` and ``b`` are exact.

The chi-square ``sum_i (d_i - m_i)^2 / V_i`` over the usable footprint pixels is
minimised by Levenberg-Marquardt (Marquardt 1963; Press et al., *Numerical
Recipes*, 3rd ed., section 15.5.2): solve ``(A + lambda diag(A)) delta = g`` with
``A = J^T W J`` and ``g = J^T W r``, accept the step when chi2 decreases
(``lambda /= 10``) and otherwise retry with ``lambda *= 10``. Each lobe is kept
within ``max_sep`` pixels of its starting peak (Rubin's ``maxSeparation`` bound).
The fluxes are started by the linear least-squares solution at the starting
positions. The parameter covariance is ``A^-1`` at the solution.

Pixel ``image[i, j]`` has its centre at ``(x, y) = (j, i)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit
from apfast.kernels.forced import assemble_psf, shift_stamp
from apfast.kernels.measure import usable

__all__ = [
    "FLAG_AT_BOUND",
    "FLAG_FAILED",
    "FLAG_NOT_CONVERGED",
    "NPAR",
    "cholesky_solve",
    "dipole_model",
    "fit_dipoles",
]

#: Number of model parameters ``(x+, y+, x-, y-, F+, F-, b)``.
NPAR = 7
#: Flag bit: the fit failed (too few usable pixels or a singular normal matrix); outputs NaN.
FLAG_FAILED = 1
#: Flag bit: the iteration limit was reached before chi2 stopped decreasing.
FLAG_NOT_CONVERGED = 2
#: Flag bit: a lobe ended on its ``max_sep`` position bound.
FLAG_AT_BOUND = 4

_EPS = 1e-3


@jit
def cholesky_solve(a, b, out, work):
    """Solve ``a out = b`` for a symmetric positive-definite ``a`` by Cholesky; return success.

    Parameters
    ----------
    a : ndarray, float64, shape (m, m)
        Read only.
    b : ndarray, float64, shape (m,)
    out : ndarray, float64, shape (m,)
        Solution, written in place.
    work : ndarray, float64, shape (m, m)
        Scratch for the factor ``L`` (``a = L L^T``), overwritten.

    Returns
    -------
    bool
        False when ``a`` is not positive definite (``out`` undefined).
    """
    m = a.shape[0]
    for i in range(m):
        for j in range(i + 1):
            s = a[i, j]
            for k in range(j):
                s -= work[i, k] * work[j, k]
            if i == j:
                if not s > 0.0:
                    return False
                work[i, i] = math.sqrt(s)
            else:
                work[i, j] = s / work[j, j]
    for i in range(m):
        s = b[i]
        for k in range(i):
            s -= work[i, k] * out[k]
        out[i] = s / work[i, i]
    for i in range(m - 1, -1, -1):
        s = out[i]
        for k in range(i + 1, m):
            s -= work[k, i] * out[k]
        out[i] = s / work[i, i]
    return True


@jit
def _lobe(stamp, xc, yc, px, py, npix, val, dx, dy, with_jac, sh):
    """PSF of one lobe at ``(xc, yc)`` sampled at the pixels ``(px, py)``; derivatives if ``with_jac``.

    ``val[i] = P(px_i - xc, py_i - yc)`` and ``dx[i], dy[i]`` its derivatives with
    respect to ``xc, yc`` (central differences of the Lanczos-shifted stamp).
    ``sh`` is a (k, k) scratch stamp.
    """
    k = stamp.shape[0]
    pad = np.zeros((k + 6, k + 6))
    tmp = np.zeros((k + 6, k))
    h = k // 2
    ix = int(math.floor(xc + 0.5))
    iy = int(math.floor(yc + 0.5))
    fx = xc - ix
    fy = yc - iy
    nshift = 5 if with_jac else 1
    for t in range(nshift):
        ox = 0.0
        oy = 0.0
        if t == 1:
            ox = _EPS
        elif t == 2:
            ox = -_EPS
        elif t == 3:
            oy = _EPS
        elif t == 4:
            oy = -_EPS
        shift_stamp(stamp, fx + ox, fy + oy, pad, tmp, sh)
        for i in range(npix):
            a = py[i] - iy + h
            b = px[i] - ix + h
            v = sh[a, b] if (0 <= a < k and 0 <= b < k) else 0.0
            if t == 0:
                val[i] = v
            elif t == 1:
                dx[i] = v
            elif t == 2:
                dx[i] = (dx[i] - v) / (2.0 * _EPS)
            elif t == 3:
                dy[i] = v
            else:
                dy[i] = (dy[i] - v) / (2.0 * _EPS)


@jit
def dipole_model(p, stamp, px, py, npix, model, jac, with_jac, vp, vn, dxp, dyp, dxn, dyn, sh):
    """Evaluate the dipole model (module docstring) and, if ``with_jac``, its Jacobian.

    Parameters
    ----------
    p : ndarray, float64, shape (7,)
        ``(x+, y+, x-, y-, F+, F-, b)``.
    stamp : ndarray, float64, shape (k, k)
        Centred PSF stamp summing to 1.
    px, py : ndarray, int64, shape (>= npix,)
        Pixel coordinates of the fitted pixels.
    npix : int
    model : ndarray, float64, shape (>= npix,)
        Written in place.
    jac : ndarray, float64, shape (>= npix, 7)
        Written in place when ``with_jac``.
    with_jac : bool
    vp, vn, dxp, dyp, dxn, dyn : ndarray, float64, shape (>= npix,)
        Scratch: lobe profiles and their position derivatives.
    sh : ndarray, float64, shape (k, k)
        Scratch stamp.
    """
    _lobe(stamp, p[0], p[1], px, py, npix, vp, dxp, dyp, with_jac, sh)
    _lobe(stamp, p[2], p[3], px, py, npix, vn, dxn, dyn, with_jac, sh)
    fp = p[4]
    fn = p[5]
    for i in range(npix):
        model[i] = fp * vp[i] - fn * vn[i] + p[6]
    if with_jac:
        for i in range(npix):
            jac[i, 0] = fp * dxp[i]
            jac[i, 1] = fp * dyp[i]
            jac[i, 2] = -fn * dxn[i]
            jac[i, 3] = -fn * dyn[i]
            jac[i, 4] = vp[i]
            jac[i, 5] = -vn[i]
            jac[i, 6] = 1.0


@jit
def _normal(jac, data, model, ivar, npix, a, g):
    """``a = J^T W J``, ``g = J^T W (d - m)``; return chi2 = ``sum W (d - m)^2``."""
    m = a.shape[0]
    for u in range(m):
        g[u] = 0.0
        for v in range(m):
            a[u, v] = 0.0
    chi2 = 0.0
    for i in range(npix):
        w = ivar[i]
        r = data[i] - model[i]
        chi2 += w * r * r
        for u in range(m):
            ju = jac[i, u] * w
            g[u] += ju * r
            for v in range(u + 1):
                a[u, v] += ju * jac[i, v]
    for u in range(m):
        for v in range(u + 1, m):
            a[u, v] = a[v, u]
    return chi2


@jit
def _chi2(data, model, ivar, npix):
    c = 0.0
    for i in range(npix):
        r = data[i] - model[i]
        c += ivar[i] * r * r
    return c


@jit
def _clip_positions(p, start, max_sep):
    """Keep each lobe inside the box of half-width ``max_sep`` around its start; return True if clipped."""
    hit = False
    for q in range(4):
        lo = start[q] - max_sep
        hi = start[q] + max_sep
        if p[q] < lo:
            p[q] = lo
            hit = True
        elif p[q] > hi:
            p[q] = hi
            hit = True
    return hit


@jit
def fit_one_dipole(data, ivar, px, py, npix, stamp, start, max_sep, max_iter, p, cov):
    """Levenberg-Marquardt dipole fit of ``npix`` pixels (module docstring); serial.

    Parameters
    ----------
    data, ivar : ndarray, float64, shape (>= npix,)
        Pixel values and inverse variances.
    px, py : ndarray, int64, shape (>= npix,)
        Pixel coordinates.
    npix : int
    stamp : ndarray, float64, shape (k, k)
        PSF stamp (sum 1).
    start : ndarray, float64, shape (4,)
        Starting ``(x+, y+, x-, y-)``.
    max_sep : float
        Position bound (pixels) around each start.
    max_iter : int
    p : ndarray, float64, shape (7,)
        Best-fit parameters, written in place.
    cov : ndarray, float64, shape (7, 7)
        Covariance ``A^-1`` at the solution, written in place (NaN on failure).

    Returns
    -------
    chi2 : float
    flags : int
        ``FLAG_FAILED``, ``FLAG_NOT_CONVERGED``, ``FLAG_AT_BOUND`` bits.
    """
    k = stamp.shape[0]
    n = NPAR
    model = np.empty(npix)
    trial = np.empty(npix)
    jac = np.empty((npix, n))
    vp = np.empty(npix)
    vn = np.empty(npix)
    dxp = np.empty(npix)
    dyp = np.empty(npix)
    dxn = np.empty(npix)
    dyn = np.empty(npix)
    sh = np.empty((k, k))
    a = np.empty((n, n))
    damped = np.empty((n, n))
    work = np.empty((n, n))
    g = np.empty(n)
    step = np.empty(n)
    pt = np.empty(n)
    for u in range(n):
        p[u] = math.nan
        for v in range(n):
            cov[u, v] = math.nan
    if npix < 2 * n:
        return math.nan, FLAG_FAILED
    # linear start for (F+, F-, b) at the starting positions
    for q in range(4):
        p[q] = start[q]
    p[4] = 1.0
    p[5] = 1.0
    p[6] = 0.0
    dipole_model(p, stamp, px, py, npix, model, jac, False, vp, vn, dxp, dyp, dxn, dyn, sh)
    a3 = np.zeros((3, 3))
    g3 = np.zeros(3)
    x3 = np.empty(3)
    w3 = np.empty((3, 3))
    col = np.empty(3)
    for i in range(npix):
        col[0] = vp[i]
        col[1] = -vn[i]
        col[2] = 1.0
        for u in range(3):
            g3[u] += col[u] * ivar[i] * data[i]
            for v in range(3):
                a3[u, v] += col[u] * ivar[i] * col[v]
    if not cholesky_solve(a3, g3, x3, w3):
        return math.nan, FLAG_FAILED
    scale = max(abs(x3[0]), abs(x3[1]), 1e-12)
    p[4] = max(0.001 * scale, x3[0])
    p[5] = max(0.001 * scale, x3[1])
    p[6] = x3[2]

    dipole_model(p, stamp, px, py, npix, model, jac, True, vp, vn, dxp, dyp, dxn, dyn, sh)
    chi2 = _normal(jac, data, model, ivar, npix, a, g)
    lam = 1e-3
    converged = False
    at_bound = False
    for _ in range(max_iter):
        accepted = False
        new_chi2 = chi2
        bound_hit = False
        for _try in range(12):
            for u in range(n):
                for v in range(n):
                    damped[u, v] = a[u, v]
                d = a[u, u]
                damped[u, u] = d + lam * (d if d > 0.0 else 1.0)
            if not cholesky_solve(damped, g, step, work):
                lam *= 10.0
                continue
            for u in range(n):
                pt[u] = p[u] + step[u]
            bound_hit = _clip_positions(pt, start, max_sep)
            dipole_model(pt, stamp, px, py, npix, trial, jac, False, vp, vn, dxp, dyp, dxn, dyn, sh)
            new_chi2 = _chi2(data, trial, ivar, npix)
            if new_chi2 < chi2:
                accepted = True
                break
            lam *= 10.0
        if not accepted:
            converged = True  # no step lowers chi2 any more: at the minimum to numerical precision
            break
        for u in range(n):
            p[u] = pt[u]
        at_bound = bound_hit
        lam = max(lam * 0.1, 1e-9)
        done = chi2 - new_chi2 < 1e-9 * chi2 + 1e-9
        dipole_model(p, stamp, px, py, npix, model, jac, True, vp, vn, dxp, dyp, dxn, dyn, sh)
        chi2 = _normal(jac, data, model, ivar, npix, a, g)
        if done:
            converged = True
            break
    flags = 0
    if not converged:
        flags |= FLAG_NOT_CONVERGED
    if at_bound:
        flags |= FLAG_AT_BOUND
    # covariance: columns of A^-1
    e = np.zeros(n)
    colv = np.empty(n)
    for u in range(n):
        for v in range(n):
            e[v] = 0.0
        e[u] = 1.0
        if not cholesky_solve(a, e, colv, work):
            for w in range(n):
                for v in range(n):
                    cov[w, v] = math.nan
            return chi2, flags | FLAG_FAILED
        for v in range(n):
            cov[v, u] = colv[v]
    return chi2, flags


@pjit
def fit_dipoles(
    image, variance, mask, labels, ids, bbox, basis, weights, per_source, start, bad_bits, max_sep, max_iter,
    params, cov, chi2, ndata, flags,
):  # fmt: skip
    """Fit the dipole model to every candidate footprint (prange over candidates).

    The fitted pixels of candidate ``s`` are the usable pixels (finite, positive
    finite variance, no ``bad_bits``) of footprint ``ids[s]`` inside ``bbox[s]``;
    the PSF stamp is basis position ``s`` (:func:`apfast.kernels.forced.assemble_psf`).

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    labels : ndarray, int32, shape (ny, nx)
        Footprint label image.
    ids : ndarray, int32, shape (n,)
        Footprint id of each candidate.
    bbox : ndarray, int32, shape (n, 4)
        ``(y0, y1, x0, x1)`` half-open footprint boxes.
    basis : ndarray, float64, shape (nb, k, k)
    weights : ndarray, float64, shape (n, nb)
    per_source : bool
    start : ndarray, float64, shape (n, 4)
        Starting ``(x+, y+, x-, y-)`` (the brightest positive and negative peaks).
    bad_bits : int
    max_sep : float
        Position bound in pixels around each start.
    max_iter : int
    params : ndarray, float64, shape (n, 7)
        ``(x+, y+, x-, y-, F+, F-, b)``, written in place (image units; ``F-`` > 0
        for a negative lobe).
    cov : ndarray, float64, shape (n, 7, 7)
        Parameter covariance, written in place.
    chi2 : ndarray, float64, shape (n,)
    ndata : ndarray, int32, shape (n,)
        Pixels fitted.
    flags : ndarray, int32, shape (n,)
        ``FLAG_*`` bits, written in place.
    """
    n = ids.shape[0]
    k = basis.shape[1]
    for s in prange(n):
        y0 = bbox[s, 0]
        y1 = bbox[s, 1]
        x0 = bbox[s, 2]
        x1 = bbox[s, 3]
        cap = (y1 - y0) * (x1 - x0)
        data = np.empty(cap)
        ivar = np.empty(cap)
        px = np.empty(cap, dtype=np.int64)
        py = np.empty(cap, dtype=np.int64)
        npix = 0
        lab = ids[s]
        for yy in range(y0, y1):
            for xx in range(x0, x1):
                if labels[yy, xx] == lab and usable(image, variance, mask, bad_bits, yy, xx):
                    data[npix] = image[yy, xx]
                    ivar[npix] = 1.0 / variance[yy, xx]
                    px[npix] = xx
                    py[npix] = yy
                    npix += 1
        ndata[s] = npix
        stamp = np.empty((k, k))
        total = assemble_psf(basis, weights, per_source, s, stamp)
        p = np.empty(NPAR)
        c = np.empty((NPAR, NPAR))
        if not total > 0.0:
            for u in range(NPAR):
                params[s, u] = math.nan
                for v in range(NPAR):
                    cov[s, u, v] = math.nan
            chi2[s] = math.nan
            flags[s] = FLAG_FAILED
            continue
        st = np.empty(4)
        for q in range(4):
            st[q] = start[s, q]
        ch, fl = fit_one_dipole(data, ivar, px, py, npix, stamp, st, max_sep, max_iter, p, c)
        for u in range(NPAR):
            params[s, u] = p[u]
            for v in range(NPAR):
                cov[s, u, v] = c[u, v]
        chi2[s] = ch
        flags[s] = fl


def _warmup_cases():
    """Tiny call with the production dtypes, for ``apfast warmup``."""
    ny, nx = 25, 25
    yy, xx = np.mgrid[:ny, :nx]
    img = (
        np.exp(-((xx - 13.0) ** 2 + (yy - 12.0) ** 2) / 8.0) - np.exp(-((xx - 10.0) ** 2 + (yy - 12.0) ** 2) / 8.0)
    ).astype(np.float32)
    var = np.full((ny, nx), 1e-4, np.float32)
    d = np.arange(-5, 6)
    gs = np.exp(-0.5 * (d / 2.0) ** 2)
    basis = (np.outer(gs, gs) / np.outer(gs, gs).sum())[None]
    n = 1
    return [
        (
            fit_dipoles,
            (img, var, np.zeros((ny, nx), np.int32), np.ones((ny, nx), np.int32), np.ones(n, np.int32),
             np.array([[0, ny, 0, nx]], np.int32), basis, np.ones((n, 1)), False, np.array([[13.0, 12.0, 10.0, 12.0]]),
             1, 10.0, 50, np.zeros((n, NPAR)), np.zeros((n, NPAR, NPAR)), np.zeros(n), np.zeros(n, np.int32),
             np.zeros(n, np.int32)),
        ),
    ]  # fmt: skip
