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

Convolution convention (everywhere in apfast.diffim.psfmatch / subtract):
``(R (x) B)[y, x] = sum_{v,u} B[v + r, u + r] R[y - v, x - u]`` for offsets
``-r <= u, v <= r`` (true convolution, as ``scipy.signal.convolve``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = ["delta_stamp_normal_equations", "solve_symmetric_batch", "stamp_normal_equations"]


@jit
def _filter_parity(filt):
    """Return the tap symmetry of each 1-D filter: 1 even, -1 odd, 0 neither.

    Parameters
    ----------
    filt : ndarray (n, k) float64
        Filters with ``k = 2 r + 1`` taps centred on tap ``r``.

    Returns
    -------
    ndarray (n,) int64
        1 if ``filt[f, r + d] == filt[f, r - d]`` for every ``d``, -1 if
        ``filt[f, r + d] == -filt[f, r - d]`` (and the centre tap is 0), else 0.
        Comparisons are exact, so folding is used only when it is exact.
    """
    n = filt.shape[0]
    r = (filt.shape[1] - 1) // 2
    par = np.zeros(n, dtype=np.int64)
    for f in range(n):
        even = True
        odd = filt[f, r] == 0.0
        for d in range(1, r + 1):
            a = filt[f, r + d]
            b = filt[f, r - d]
            if a != b:
                even = False
            if a != -b:
                odd = False
        if even:
            par[f] = 1
        elif odd:
            par[f] = -1
    return par


@jit
def _fold_line(src, off, r, s, need_even, need_odd, psum, pdif):
    """Write ``psum[d, i] = src[off - d + i] + src[off + d + i]`` and ``pdif`` (the difference), ``d = 1..r``.

    ``src`` is any 1-D float64 view; only the sums/differences asked for are formed.
    Row ``0`` of ``psum`` / ``pdif`` is unused.
    """
    for d in range(1, r + 1):
        lo = off - d
        hi = off + d
        if need_even:
            for i in range(s):
                psum[d, i] = src[lo + i] + src[hi + i]
        if need_odd:
            for i in range(s):
                pdif[d, i] = src[lo + i] - src[hi + i]


@jit
def _row_pass_line(wrow, row_filt, rpar, used_f, need_even, need_odd, r, s, psum, pdif, ring, slot):
    """Filter one window row with every used row filter: ``ring[f, slot, i] = sum_u row_filt[f, u] wrow[2r - u + i]``.

    Even / odd filters use the folded taps ``row_filt[f, r + d] (wrow[r-d+i] +- wrow[r+d+i])``;
    other filters use all taps.
    """
    k = 2 * r + 1
    _fold_line(wrow, r, r, s, need_even, need_odd, psum, pdif)
    for f in range(row_filt.shape[0]):
        if not used_f[f]:
            continue
        out = ring[f, slot]
        c = row_filt[f, r]
        for i in range(s):
            out[i] = c * wrow[r + i]
        p = rpar[f]
        if p == 1:
            for d in range(1, r + 1):
                wf = row_filt[f, r + d]
                for i in range(s):
                    out[i] += wf * psum[d, i]
        elif p == -1:
            for d in range(1, r + 1):
                wf = row_filt[f, r + d]
                for i in range(s):
                    out[i] += wf * pdif[d, i]
        else:
            for uu in range(k):
                if uu == r:
                    continue
                wf = row_filt[f, uu]
                xo = 2 * r - uu
                for i in range(s):
                    out[i] += wf * wrow[xo + i]


@jit
def _accumulate_outer(ct, wch, npc, ne, macc):
    """Add ``(wch[p] ct[p, a]) ct[p, c]`` to ``macc[a, c]`` for every pixel ``p < npc`` of a chunk.

    Only ``a < ne`` and ``c < 4 (a // 4 + 1)`` (the lower triangle rounded up to
    multiples of 4, so the contiguous inner loop over ``c`` vectorises cleanly) are
    updated. Pixels are added in order, so every element sums in the same order as a
    plain pixel loop; ``ct`` must have at least ``4 ceil(ne / 4)`` columns.
    """
    for p in range(npc):
        wp = wch[p]
        cp = ct[p]
        for a in range(ne):
            wa = wp * cp[a]
            lim = 4 * (a // 4 + 1)
            mr = macc[a]
            for c in range(lim):
                mr[c] += wa * cp[c]


@jit
def _basis_plan(row_filt, col_filt, pairs):
    """Filter symmetries and which row filters / folded sums the bases need.

    Returns
    -------
    rpar, cpar : ndarray (nr,), (nc,) int64
        :func:`_filter_parity` of the row and column factors.
    used_f, ce_f, co_f : ndarray (nr,) bool
        Row filter ``f`` is used by a basis / by one with an even / odd column factor.
    row_fold : ndarray (2,) bool
        Some used row filter is even / odd.
    """
    nr = row_filt.shape[0]
    nb = pairs.shape[0]
    rpar = _filter_parity(row_filt)
    cpar = _filter_parity(col_filt)
    used_f = np.zeros(nr, dtype=np.bool_)
    ce_f = np.zeros(nr, dtype=np.bool_)
    co_f = np.zeros(nr, dtype=np.bool_)
    row_even = False
    row_odd = False
    for bi in range(nb):
        f = pairs[bi, 0]
        g = pairs[bi, 1]
        used_f[f] = True
        if cpar[g] == 1:
            ce_f[f] = True
        elif cpar[g] == -1:
            co_f[f] = True
        if rpar[f] == 1:
            row_even = True
        elif rpar[f] == -1:
            row_odd = True
    row_fold = np.zeros(2, dtype=np.bool_)
    row_fold[0] = row_even
    row_fold[1] = row_odd
    return rpar, cpar, used_f, ce_f, co_f, row_fold


@jit
def _stamp_equations(ref, tgt, wgt, var_ref, x0, y0, half, row_filt, col_filt, pairs, with_bg,
                     rpar, cpar, used_f, ce_f, co_f, row_even, row_odd, m_out, b_out):
    """Normal equations of the stamp with corner ``(x0, y0)`` (steps 1-3 of :func:`stamp_normal_equations`).

    Writes ``m_out`` (nu, nu) and ``b_out`` (nu,) and returns ``(sws, wvr, npix)``;
    the plan arguments come from :func:`_basis_plan`. Serial and disk-cached, so the
    parallel driver stays small and compiles quickly.
    """
    nb = pairs.shape[0]
    nr = row_filt.shape[0]
    k = row_filt.shape[1]
    r = (k - 1) // 2
    s = 2 * half + 1
    h = s + 2 * r
    nu = nb + (1 if with_bg else 0)
    ne = nu + 1  # extended vector (I, C_0 .. C_{nu-1})
    npad = 4 * ((ne + 3) // 4)
    # rows per accumulation chunk: keep the pixel-major chunk (cr * s * npad doubles) near L1 size
    cr = max(1, 96 // s)
    ring = np.empty((nr, k, s))
    wrow = np.empty(h)
    psum = np.empty((r + 1, s))
    pdif = np.empty((r + 1, s))
    crow = np.empty(s)
    ct = np.zeros((cr * s, npad))
    wch = np.empty(cr * s)
    macc = np.zeros((npad, npad))
    if with_bg:
        for p in range(cr * s):
            ct[p, 1 + nb] = 1.0
    wvr = 0.0
    npix = 0
    # prime the ring with window rows 0 .. 2r - 1 (image rows y0 - r ..)
    for yy in range(2 * r):
        for xx in range(h):
            wrow[xx] = ref[y0 - r + yy, x0 - r + xx]
        _row_pass_line(wrow, row_filt, rpar, used_f, row_even, row_odd, r, s, psum, pdif, ring, yy % k)
    q = 0  # rows in the current chunk
    for j in range(s):
        yy = j + 2 * r
        for xx in range(h):
            wrow[xx] = ref[y0 - r + yy, x0 - r + xx]
        _row_pass_line(wrow, row_filt, rpar, used_f, row_even, row_odd, r, s, psum, pdif, ring, yy % k)
        base = q * s
        # column pass: output row j uses window rows j .. j + 2r; tap v = r + d reads row j + r - d
        cslot = (j + r) % k
        for f in range(nr):
            if not used_f[f]:
                continue
            tf = ring[f]
            for d in range(1, r + 1):
                lo = (j + r - d) % k
                hi = (j + r + d) % k
                if ce_f[f]:
                    for i in range(s):
                        psum[d, i] = tf[lo, i] + tf[hi, i]
                if co_f[f]:
                    for i in range(s):
                        pdif[d, i] = tf[lo, i] - tf[hi, i]
            for bi in range(nb):
                if pairs[bi, 0] != f:
                    continue
                g = pairs[bi, 1]
                c = col_filt[g, r]
                for i in range(s):
                    crow[i] = c * tf[cslot, i]
                p = cpar[g]
                if p == 1:
                    for d in range(1, r + 1):
                        wg = col_filt[g, r + d]
                        for i in range(s):
                            crow[i] += wg * psum[d, i]
                elif p == -1:
                    for d in range(1, r + 1):
                        wg = col_filt[g, r + d]
                        for i in range(s):
                            crow[i] += wg * pdif[d, i]
                else:
                    for vv in range(k):
                        if vv == r:
                            continue
                        wg = col_filt[g, vv]
                        tr = (j + 2 * r - vv) % k
                        for i in range(s):
                            crow[i] += wg * tf[tr, i]
                for i in range(s):
                    ct[base + i, 1 + bi] = crow[i]
        for i in range(s):
            wp = wgt[y0 + j, x0 + i]
            if wp <= 0.0:
                wp = 0.0
            else:
                npix += 1
            wch[base + i] = wp
            ct[base + i, 0] = tgt[y0 + j, x0 + i]
            wvr += wp * var_ref[y0 + j, x0 + i]
        q += 1
        if q == cr or j == s - 1:
            _accumulate_outer(ct, wch, q * s, ne, macc)
            q = 0
    for a in range(nu):
        b_out[a] = macc[1 + a, 0]
        for c in range(a + 1):
            m_out[a, c] = macc[1 + a, 1 + c]
            m_out[c, a] = macc[1 + a, 1 + c]
    return macc[0, 0], wvr, npix


@pjit
def stamp_normal_equations(ref, tgt, wgt, var_ref, cx, cy, half, row_filt, col_filt, pairs, with_bg,
                           m_out, b_out, sws_out, wvr_out, npix_out):
    """Accumulate the weighted normal equations of every stamp (parallel over stamps).

    Implements Alard & Lupton (1998) eq. 2-3 per stamp, ``M_jk = sum_pix w C_j C_k``,
    ``b_j = sum_pix w I C_j``, with ``C_j = R (x) B_j`` (module docstring). Per stamp
    and output row, in one streaming pass (the full ``C`` is never stored):

    1. row pass: each window row of ``R`` is filtered by every used row factor into a
       ring buffer of the last ``k`` filtered rows; symmetric / antisymmetric filters
       (exact check of the taps) use folded taps ``f[r+d] (x[-d] +- x[+d])``, others all taps;
    2. column pass: the ``k`` buffered rows give one output row of every basis column
       ``C_j``, again with folded taps for (anti)symmetric column factors;
    3. the row's pixels are stored pixel-major as ``e = (I, C_0 .. C_{nb-1}[, 1])`` and,
       every few rows, ``sum_p (w_p e_a) e_c`` is accumulated for ``c <= a`` with
       a pixel-major rank-1 update vectorised over ``c``, giving ``sws`` (``a = c = 0``), ``b`` (``c = 0``) and ``M``
       in one float64 accumulation (pixels summed in image order).

    Parameters
    ----------
    ref : ndarray (ny, nx) float32
        Image that gets convolved (template in ``convolveTemplate`` mode).
    tgt : ndarray (ny, nx) float32
        Image the convolved reference is fitted to.
    wgt : ndarray (ny, nx) float32
        Per-pixel weight of the target (``1 / variance``; 0 excludes a pixel; values <= 0 count as 0).
    var_ref : ndarray (ny, nx) float32
        Variance of the reference, summed as ``sum w var_ref`` for the expected chi^2.
    cx, cy : ndarray (ns,) int64
        Stamp centres. The driver guarantees ``[cy - half - r, cy + half + r]`` and the
        same in x lie inside the image (``r = (k - 1) // 2``).
    half : int
        Stamp half-size; a stamp has ``S = 2 half + 1`` pixels per side.
    row_filt : ndarray (nr, k) float64
        Distinct 1-D x factors of the basis (odd ``k``).
    col_filt : ndarray (nc, k) float64
        Distinct 1-D y factors of the basis.
    pairs : ndarray (nb, 2) int64
        ``(row index, col index)`` of each basis function.
    with_bg : bool
        Append a constant column (differential background) as unknown ``nb``.
    m_out : ndarray (ns, nu, nu) float64
        Written: normal matrices, ``nu = nb + with_bg`` (exactly symmetric).
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
    rpar, cpar, used_f, ce_f, co_f, row_fold = _basis_plan(row_filt, col_filt, pairs)
    for si in prange(ns):
        sws, wvr, npix = _stamp_equations(ref, tgt, wgt, var_ref, cx[si] - half, cy[si] - half, half, row_filt,
                                          col_filt, pairs, with_bg, rpar, cpar, used_f, ce_f, co_f, row_fold[0],
                                          row_fold[1], m_out[si], b_out[si])
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


@jit
def _summed_area(img, cum, sat):
    """Fill ``sat`` (h + 1, h + 1) with the summed-area table of the square ``img`` (h, h); ``cum`` (h,) scratch.

    ``sat[a, c]`` is the sum of ``img[:a, :c]`` in float64, so any box sum is four look-ups.
    """
    h = img.shape[0]
    for c in range(h):
        cum[c] = 0.0
    for a in range(h + 1):
        run = 0.0
        sat[a, 0] = 0.0
        for c in range(h):
            run += cum[c]
            sat[a, c + 1] = run
        if a < h:
            for c in range(h):
                cum[c] += img[a, c]


@jit
def _delta_stamp(ref, tgt, var_ref, rho, x0, y0, s, r, win, cum, sat, vbox, m_out, b_out):
    """Unweighted delta-basis normal equations of the stamp with corner ``(x0, y0)``.

    Writes ``m_out`` (nk + 1, nk + 1) and ``b_out`` (nk + 1,) (``nk = (2r + 1)^2``,
    last unknown the constant background) and returns ``sum T^2``. ``win`` (h, h),
    ``cum`` (h,), ``sat`` (h + 1, h + 1) and ``vbox`` (nk,) are float64 scratch,
    ``h = s + 2 r``. See
    :func:`delta_stamp_normal_equations` for the method.
    """
    k = 2 * r + 1
    nk = k * k
    h = s + 2 * r
    # reference variance summed over each shifted stamp box (the errors-in-variables term)
    _summed_area(var_ref[y0 - r : y0 - r + h, x0 - r : x0 - r + h], cum, sat)
    for v in range(-r, r + 1):
        for u in range(-r, r + 1):
            a0 = r - v
            c0 = r - u
            box = sat[a0 + s, c0 + s] - sat[a0, c0 + s] - sat[a0 + s, c0] + sat[a0, c0]
            vbox[(v + r) * k + (u + r)] = np.sqrt(max(box, 0.0))
    for a in range(h):
        for c in range(h):
            win[a, c] = ref[y0 - r + a, x0 - r + c]
    # lag products: M[(v, u), (v + dv, u + du)] is the sum of P_d(w) = W(w) W(w - d) over the
    # s x s box at window row r - v, column r - u. Column sums of P_d are accumulated row by
    # row; the summed-area table is only formed at the rows a box starts or ends on
    # (0 .. 2r and s .. s + 2r).
    for dv in range(0, 2 * r + 1):
        for du in range(-2 * r, 2 * r + 1):
            if dv == 0 and du < 0:
                continue
            c_lo = max(0, du)
            c_hi = min(h, h + du)
            for c in range(h):
                cum[c] = 0.0
            for a in range(h + 1):
                if a <= 2 * r or a >= s:
                    run = 0.0
                    sat[a, 0] = 0.0
                    for c in range(h):
                        run += cum[c]
                        sat[a, c + 1] = run
                if a < h and a >= dv:
                    for c in range(c_lo, c_hi):
                        cum[c] += win[a, c] * win[a - dv, c - du]
            for v in range(-r, r + 1 - dv):
                v2 = v + dv
                a0 = r - v
                for u in range(max(-r, -r - du), min(r, r - du) + 1):
                    u2 = u + du
                    c0 = r - u
                    box = sat[a0 + s, c0 + s] - sat[a0, c0 + s] - sat[a0 + s, c0] + sat[a0, c0]
                    i = (v + r) * k + (u + r)
                    j = (v2 + r) * k + (u2 + r)
                    box -= rho[dv + 2 * r, du + 2 * r] * vbox[i] * vbox[j]
                    m_out[i, j] = box
                    m_out[j, i] = box
    # background column (sum of each shifted stamp) and the target products
    _summed_area(win, cum, sat)
    sws = 0.0
    bsum = 0.0
    for a in range(s):
        for c in range(s):
            t = np.float64(tgt[y0 + a, x0 + c])
            sws += t * t
            bsum += t
    for v in range(-r, r + 1):
        for u in range(-r, r + 1):
            a0 = r - v
            c0 = r - u
            i = (v + r) * k + (u + r)
            box = sat[a0 + s, c0 + s] - sat[a0, c0 + s] - sat[a0 + s, c0] + sat[a0, c0]
            m_out[i, nk] = box
            m_out[nk, i] = box
            acc = 0.0
            for a in range(s):
                for c in range(s):
                    acc += np.float64(tgt[y0 + a, x0 + c]) * win[a0 + a, c0 + c]
            b_out[i] = acc
    m_out[nk, nk] = float(s * s)
    b_out[nk] = bsum
    return sws


@pjit
def delta_stamp_normal_equations(ref, tgt, var_ref, rho, cx, cy, half, r, m_out, b_out, sws_out):
    """Normal equations of a delta-function (pixel) kernel basis on stamps, unit weights.

    The kernel is ``K = sum_j k_j delta_j`` over the ``(2r + 1)^2`` pixels ``j = (v, u)``,
    ``|u|, |v| <= r`` (Bramich 2008 eq. 3-4; Becker et al. 2012 sect. 2.2), plus a constant
    background. Its basis columns are shifted references, ``C_j(p) = R(p - j)``, so the
    normal matrix of one stamp, ``M_jk = sum_p R(p - j) R(p - k)``, depends on the lag
    ``d = k - j`` through the product image ``P_d(w) = R(w) R(w - d)`` summed over the
    stamp box shifted by ``j``: one summed-area table per lag gives every entry of that
    lag in four look-ups. That costs ``O((4r + 1)^2 (S + 2r)^2 / 2)`` per stamp instead of
    the ``O(S^2 (2r + 1)^4 / 2)`` of accumulating outer products. Weights are one per stamp
    (the caller multiplies), which is what makes the lag structure exact.

    Errors in variables: the reference's own noise adds ``rho(d) sqrt(V_j V_k)`` to the
    expected ``M_jk`` (``V_j = sum_p var_ref(p - j)``, ``rho`` the noise's correlation
    coefficient at lag ``d``), which biases a least-squares kernel towards smoothing that
    noise away; it is subtracted (corrected least squares, e.g. Fuller 1987 ch. 2). Pass
    ``rho = 0`` for the plain normal equations.

    Parameters
    ----------
    ref : ndarray (ny, nx) float32
        Image that gets convolved.
    tgt : ndarray (ny, nx) float32
        Image the convolved reference is fitted to.
    var_ref : ndarray (ny, nx) float32
        Variance of ``ref``.
    rho : ndarray (4r + 1, 4r + 1) float64
        Correlation coefficient of the reference noise at lag ``(dv, du)``, index ``(dv + 2r, du + 2r)``
        (1 at the centre, 0 elsewhere for white noise; all 0 for no correction).
    cx, cy : ndarray (ns,) int64
        Stamp centres; ``[c - half - r, c + half + r]`` must lie inside the image on both axes.
    half : int
        Stamp half-size (stamps are ``S = 2 half + 1`` pixels square).
    r : int
        Kernel half-size.
    m_out : ndarray (ns, nk + 1, nk + 1) float64
        Written: ``M`` per stamp, pixel ``(v, u)`` at index ``(v + r) (2r + 1) + (u + r)``,
        the background last (``M[nk, nk] = S^2``).
    b_out : ndarray (ns, nk + 1) float64
        Written: ``b_j = sum_p T(p) R(p - j)`` and ``sum_p T(p)``.
    sws_out : ndarray (ns,) float64
        Written: ``sum_p T(p)^2``.
    """
    ns = cx.shape[0]
    s = 2 * half + 1
    h = s + 2 * r
    for si in prange(ns):
        win = np.empty((h, h))
        cum = np.empty(h)
        sat = np.empty((h + 1, h + 1))
        vbox = np.empty((2 * r + 1) ** 2)
        sws_out[si] = _delta_stamp(ref, tgt, var_ref, rho, cx[si] - half, cy[si] - half, s, r, win, cum, sat, vbox,
                                   m_out[si], b_out[si])


def _warmup_cases():
    """Tiny calls with the PSF matching's dtypes (used by ``apfast warmup``).

    One stamp (half-size 3) of a 16 x 16 image, a basis of one even and one odd
    3-tap factor (so both folded paths compile), with the background column.
    """
    n = 16
    img = np.ones((n, n), dtype=np.float32)
    filt = np.array([[0.25, 0.5, 0.25], [-0.5, 0.0, 0.5]])
    pairs = np.array([[0, 0], [1, 0], [0, 1]], dtype=np.int64)
    nu = pairs.shape[0] + 1
    c = np.array([8], dtype=np.int64)
    m = np.eye(nu)[None, :, :].copy()
    return [
        (stamp_normal_equations, (img, img, img, img, c, c, 3, filt, filt, pairs, True, np.zeros((1, nu, nu)),
                                  np.zeros((1, nu)), np.zeros(1), np.zeros(1), np.zeros(1, np.int64))),
        (solve_symmetric_batch, (m, np.ones((1, nu)), 1e8, np.empty((1, nu)))),
        (delta_stamp_normal_equations, (img, img, img, np.zeros((5, 5)), c, c, 3, 1, np.zeros((1, 10, 10)),
                                        np.zeros((1, 10)), np.zeros(1))),
    ]
