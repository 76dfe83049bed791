"""Cosmic-ray kernels: a PSF-sharpness test (Lupton & Shimasaku's rule, as in SDSS photo and Rubin), grouping,
neighbour growth and directional interpolation.

All kernels work on a background-subtracted image ``work`` (float32). A pixel
``v = work[i, j]`` with variance ``var = variance[i, j]`` and the means of its
opposite neighbours along the four directions ``m_ns, m_we, m_swne, m_nwse``
(each with standard deviation ``dm = sqrt(var_a + var_b) / 2``) is a
cosmic-ray candidate when

1. ``v > 0`` and ``var > 0`` and the pixel has none of the ``bad_bits``;
2. ``v >= m_dir + min_sigma * sqrt(var)`` for at least one direction (it is a
   local peak well above the noise);
3. ``thres_dir * (v - c3 * sqrt(var)) > m_dir + c3 * dm_dir`` for at least one
   direction, where ``thres_dir = cond3_fac2 * PSF(1 px) / PSF(0)`` along the
   axes and ``cond3_fac2 * PSF(sqrt 2 px) / PSF(0)`` along the diagonals: the
   neighbours fall off faster than any star allows, i.e. the peak is sharper
   than the PSF.

Candidates are grouped into 8-connected footprints and a footprint is kept
only if its summed flux is at least ``min_dn`` (condition "1" of the original
description). Then, ``n_iter`` times, the kept pixels are provisionally
replaced by interpolation and their 3x3 neighbours are re-tested with
``min_sigma / 2`` and ``c3 = 0`` to pick up the fainter wings of each track.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = [
    "is_cr_pixel",
    "find_cr_candidates",
    "group_candidates",
    "directional_estimate",
    "grow_candidates",
    "dilate_pixels",
    "interpolate_pixels",
    "count_groups",
    "restore_background",
]


@jit
def is_cr_pixel(work, variance, i, j, min_sigma, thres_h, thres_v, thres_d, c3):
    """Conditions 2 and 3 of the module docstring for interior pixel ``(i, j)``.

    Parameters
    ----------
    work : ndarray, float32, shape (ny, nx)
        Background-subtracted pixels.
    variance : ndarray, float32, shape (ny, nx)
    i, j : int
        Row and column, ``1 <= i < ny - 1``, ``1 <= j < nx - 1``.
    min_sigma : float
        Condition 2 threshold in units of the pixel's sigma.
    thres_h, thres_v, thres_d : float
        Condition 3 factors along x, along y and along the diagonals.
    c3 : float
        Noise fudge of condition 3 (``cond3_fac``).

    Returns
    -------
    bool
    """
    v = work[i, j]
    if not v > 0.0:
        return False
    var0 = variance[i, j]
    if not var0 > 0.0:
        return False
    m_we = 0.5 * (work[i, j - 1] + work[i, j + 1])
    m_ns = 0.5 * (work[i - 1, j] + work[i + 1, j])
    m_swne = 0.5 * (work[i - 1, j - 1] + work[i + 1, j + 1])
    m_nwse = 0.5 * (work[i + 1, j - 1] + work[i - 1, j + 1])
    lo = min(min(m_we, m_ns), min(m_swne, m_nwse))
    diff = v - lo
    # condition 2 against the lowest mean, squared to avoid the sqrt for most pixels
    if not (diff > 0.0 and diff * diff >= min_sigma * min_sigma * var0):
        return False
    sig0 = math.sqrt(var0)
    peak = v - c3 * sig0
    thr = min_sigma * sig0
    if v >= m_ns + thr:
        dm = 0.5 * math.sqrt(variance[i - 1, j] + variance[i + 1, j])
        if thres_v * peak > m_ns + c3 * dm:
            return True
    if v >= m_we + thr:
        dm = 0.5 * math.sqrt(variance[i, j - 1] + variance[i, j + 1])
        if thres_h * peak > m_we + c3 * dm:
            return True
    if v >= m_swne + thr:
        dm = 0.5 * math.sqrt(variance[i - 1, j - 1] + variance[i + 1, j + 1])
        if thres_d * peak > m_swne + c3 * dm:
            return True
    if v >= m_nwse + thr:
        dm = 0.5 * math.sqrt(variance[i + 1, j - 1] + variance[i - 1, j + 1])
        if thres_d * peak > m_nwse + c3 * dm:
            return True
    return False


@pjit
def find_cr_candidates(work, variance, mask, bad_bits, min_sigma, thres_h, thres_v, thres_d, c3, cand):
    """Flag every interior pixel that passes :func:`is_cr_pixel` (parallel over rows).

    Parameters
    ----------
    work, variance : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
        Pixels with any of these bits are never candidates (condition 4).
    min_sigma, thres_h, thres_v, thres_d, c3 : float
        See :func:`is_cr_pixel`.
    cand : ndarray, uint8, shape (ny, nx)
        Written in place: 1 for candidates, 0 elsewhere (the outer ring is 0).

    Returns
    -------
    int
        Number of candidates.
    """
    ny, nx = work.shape
    counts = np.zeros(ny, dtype=np.int64)
    for i in prange(ny):
        c = 0
        for j in range(nx):
            cand[i, j] = 0
        if i == 0 or i == ny - 1:
            continue
        for j in range(1, nx - 1):
            if (mask[i, j] & bad_bits) == 0:
                if is_cr_pixel(work, variance, i, j, min_sigma, thres_h, thres_v, thres_d, c3):
                    cand[i, j] = 1
                    c += 1
        counts[i] = c
    return counts.sum()


@jit
def group_candidates(cand, work, n_cand, min_dn, crmask):
    """Group candidates into 8-connected footprints and keep those with summed flux >= ``min_dn``.

    Parameters
    ----------
    cand : ndarray, uint8, shape (ny, nx)
        Candidate map from :func:`find_cr_candidates`; visited pixels are set to 2 (in place).
    work : ndarray, float32, shape (ny, nx)
        Background-subtracted pixels (the flux of a footprint is their sum).
    n_cand : int
        Number of candidates (upper bound of the output length).
    min_dn : float
        Minimum summed flux of a kept footprint.
    crmask : ndarray, uint8, shape (ny, nx)
        Set to 1 (in place) on the kept pixels.

    Returns
    -------
    n_cr : int
        Number of kept footprints.
    ys, xs : ndarray, int64, shape (n_kept,)
        Kept pixels.
    """
    ny, nx = cand.shape
    qy = np.empty(max(n_cand, 1), dtype=np.int64)
    qx = np.empty(max(n_cand, 1), dtype=np.int64)
    ys = np.empty(max(n_cand, 1), dtype=np.int64)
    xs = np.empty(max(n_cand, 1), dtype=np.int64)
    nkeep = 0
    n_cr = 0
    for i0 in range(ny):
        for j0 in range(nx):
            if cand[i0, j0] != 1:
                continue
            cand[i0, j0] = 2
            qy[0] = i0
            qx[0] = j0
            head = 0
            tail = 1
            flux = 0.0
            while head < tail:
                i = qy[head]
                j = qx[head]
                head += 1
                flux += work[i, j]
                for di in range(-1, 2):
                    ii = i + di
                    if ii < 0 or ii >= ny:
                        continue
                    for dj in range(-1, 2):
                        jj = j + dj
                        if 0 <= jj < nx and cand[ii, jj] == 1:
                            cand[ii, jj] = 2
                            qy[tail] = ii
                            qx[tail] = jj
                            tail += 1
            if flux >= min_dn:
                n_cr += 1
                for k in range(tail):
                    crmask[qy[k], qx[k]] = 1
                    ys[nkeep] = qy[k]
                    xs[nkeep] = qx[k]
                    nkeep += 1
    return n_cr, ys[:nkeep].copy(), xs[:nkeep].copy()


@jit
def directional_estimate(work, variance, crmask, mask, bad_bits, i, j, use_min, max_dist):
    """Interpolated value at ``(i, j)`` from usable pixels along four directions.

    A pixel is usable when ``crmask == 0`` and it has none of ``bad_bits``
    (``(i, j)`` itself is never read). Along each of the directions (0,1),
    (1,0), (1,1), (1,-1) the nearest usable pixel on each side within
    ``max_dist`` steps gives the linear interpolant ``(v1 d2 + v2 d1) / (d1 + d2)``.
    With ``use_min`` the smallest estimate above ``-2 sqrt(var)`` is returned
    (robust against unflagged charge next to a track, as in SDSS photo);
    otherwise the estimates with the shortest gap (in pixels, diagonals times
    sqrt 2) are averaged.

    Returns
    -------
    value : float
    ok : bool
        False when no direction had usable pixels on both sides (value is 0).
    """
    ny, nx = work.shape
    best = np.inf
    best_gap = np.inf
    acc = 0.0
    nacc = 0
    floor = -2.0 * math.sqrt(max(variance[i, j], 0.0))
    for dirn in range(4):
        if dirn == 0:
            di, dj, step = 0, 1, 1.0
        elif dirn == 1:
            di, dj, step = 1, 0, 1.0
        elif dirn == 2:
            di, dj, step = 1, 1, 1.4142135623730951
        else:
            di, dj, step = 1, -1, 1.4142135623730951
        d1 = 0
        v1 = 0.0
        for d in range(1, max_dist + 1):
            ii = i - d * di
            jj = j - d * dj
            if ii < 0 or ii >= ny or jj < 0 or jj >= nx:
                break
            if crmask[ii, jj] == 0 and (mask[ii, jj] & bad_bits) == 0:
                d1 = d
                v1 = work[ii, jj]
                break
        if d1 == 0:
            continue
        d2 = 0
        v2 = 0.0
        for d in range(1, max_dist + 1):
            ii = i + d * di
            jj = j + d * dj
            if ii < 0 or ii >= ny or jj < 0 or jj >= nx:
                break
            if crmask[ii, jj] == 0 and (mask[ii, jj] & bad_bits) == 0:
                d2 = d
                v2 = work[ii, jj]
                break
        if d2 == 0:
            continue
        est = (v1 * d2 + v2 * d1) / (d1 + d2)
        if use_min:
            if est > floor and est < best:
                best = est
        else:
            gap = (d1 + d2) * step
            if gap < best_gap - 1e-9:
                best_gap = gap
                acc = est
                nacc = 1
            elif gap < best_gap + 1e-9:
                acc += est
                nacc += 1
    if use_min:
        if best < np.inf:
            return best, True
        return 0.0, False
    if nacc > 0:
        return acc / nacc, True
    return 0.0, False


@jit
def grow_candidates(
    work, variance, mask, bad_bits, crmask, ys, xs, min_sigma, thres_h, thres_v, thres_d, max_dist, capacity
):
    """Flood outwards from the flagged pixels, adding neighbours that are still sharper than the PSF.

    Breadth-first from every listed pixel: each unflagged, non-bad 8-neighbour
    (outside the outer two rows/columns) is added when either

    - :func:`is_cr_pixel` passes with the reduced ``min_sigma`` and ``c3 = 0``
      (``work`` should hold provisional repairs of the flagged pixels, so the
      neighbour is compared with the sky, not with the track next to it), or
    - with ``e`` the :func:`directional_estimate` (minimum, flagged pixels
      skipped): ``v - e >= min_sigma * sqrt(var)`` and
      ``min(thres_h, thres_v) * v > e``, i.e. the pixel stands out of the
      interpolated surroundings more sharply than a PSF could. This catches
      the interior of wide tracks whose every neighbour is charged.

    Added pixels are queued in turn, so a whole track is followed in one call.

    Parameters
    ----------
    work, variance : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
    crmask : ndarray, uint8, shape (ny, nx)
        Flagged pixels (1); new ones are set to 1 in place.
    ys, xs : ndarray, int64, shape (n,)
        Flagged pixels (seeds).
    min_sigma, thres_h, thres_v, thres_d : float
        See :func:`is_cr_pixel` (``min_sigma`` is the reduced threshold).
    max_dist : int
        Search distance of :func:`directional_estimate`.
    capacity : int
        Stop after adding this many pixels.

    Returns
    -------
    ys_new, xs_new : ndarray, int64
        The added pixels.
    overflow : bool
        True if ``capacity`` was reached.
    """
    ny, nx = work.shape
    n = ys.shape[0]
    cap = max(capacity, 1)
    qy = np.empty(n + cap, dtype=np.int64)
    qx = np.empty(n + cap, dtype=np.int64)
    for k in range(n):
        qy[k] = ys[k]
        qx[k] = xs[k]
    head = 0
    tail = n
    overflow = False
    thr_ax = min(thres_h, thres_v)
    while head < tail and not overflow:
        i0 = qy[head]
        j0 = qx[head]
        head += 1
        for di in range(-1, 2):
            i = i0 + di
            if i < 2 or i >= ny - 2:
                continue
            for dj in range(-1, 2):
                j = j0 + dj
                if j < 2 or j >= nx - 2 or crmask[i, j] != 0 or (mask[i, j] & bad_bits) != 0:
                    continue
                hit = is_cr_pixel(work, variance, i, j, min_sigma, thres_h, thres_v, thres_d, 0.0)
                if not hit:
                    v = work[i, j]
                    var0 = variance[i, j]
                    if v > 0.0 and var0 > 0.0:
                        e, ok = directional_estimate(work, variance, crmask, mask, bad_bits, i, j, True, max_dist)
                        if ok and thr_ax * v > e and v - e >= min_sigma * math.sqrt(var0):
                            hit = True
                if hit:
                    if tail - n >= cap:
                        overflow = True
                        break
                    crmask[i, j] = 1
                    qy[tail] = i
                    qx[tail] = j
                    tail += 1
            if overflow:
                break
    return qy[n:tail].copy(), qx[n:tail].copy(), overflow


@jit
def dilate_pixels(crmask, mask, bad_bits, ys, xs, grow):
    """Add every pixel within ``grow`` (Chebyshev distance) of a flagged pixel, except ``bad_bits`` pixels.

    Parameters
    ----------
    crmask : ndarray, uint8, shape (ny, nx)
        Flagged pixels (1); new ones set to 1 in place.
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
    ys, xs : ndarray, int64, shape (n,)
    grow : int
        Radius in pixels (>= 0).

    Returns
    -------
    ys_all, xs_all : ndarray, int64
        The flagged pixels followed by the added ones.
    """
    ny, nx = crmask.shape
    n = ys.shape[0]
    w = 2 * grow + 1
    oy = np.empty(n * w * w + 1, dtype=np.int64)
    ox = np.empty(n * w * w + 1, dtype=np.int64)
    m = 0
    for k in range(n):
        oy[m] = ys[k]
        ox[m] = xs[k]
        m += 1
    for k in range(n):
        for di in range(-grow, grow + 1):
            i = ys[k] + di
            if i < 0 or i >= ny:
                continue
            for dj in range(-grow, grow + 1):
                j = xs[k] + dj
                if 0 <= j < nx and crmask[i, j] == 0 and (mask[i, j] & bad_bits) == 0:
                    crmask[i, j] = 1
                    oy[m] = i
                    ox[m] = j
                    m += 1
    return oy[:m].copy(), ox[:m].copy()


@pjit
def interpolate_pixels(work, variance, crmask, mask, bad_bits, ys, xs, use_min, max_dist):
    """Replace the listed pixels by interpolation from usable pixels along four directions (in place).

    Each pixel gets :func:`directional_estimate` (the minimum estimate with
    ``use_min``, else the shortest-gap average); without any estimate it
    becomes 0 (the background). Reads only usable pixels and writes only
    listed ones, so the parallel loop is race-free.

    Parameters
    ----------
    work : ndarray, float32, shape (ny, nx)
        Background-subtracted pixels, written in place at the listed pixels.
    variance : ndarray, float32, shape (ny, nx)
    crmask : ndarray, uint8, shape (ny, nx)
        Non-zero on every listed pixel.
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
    ys, xs : ndarray, int64, shape (n,)
    use_min : bool
    max_dist : int
        Furthest step searched on each side.
    """
    n = ys.shape[0]
    for k in prange(n):
        i = ys[k]
        j = xs[k]
        e, ok = directional_estimate(work, variance, crmask, mask, bad_bits, i, j, use_min, max_dist)
        work[i, j] = e


@jit
def count_groups(crmask, ys, xs):
    """Number of 8-connected groups formed by the listed pixels.

    Only the listed pixels take part: other non-zero ``crmask`` pixels (e.g. left
    by an earlier pass) are ignored, so the BFS queue never holds more than ``n``
    entries. (An earlier version followed every ``crmask == 1`` pixel with an
    ``n``-sized queue and wrote past its end when unlisted pixels were set.)

    Parameters
    ----------
    crmask : ndarray, uint8, shape (ny, nx)
        Listed pixels are marked 3, then 2 when visited, in place; every listed pixel
        is set to 1 on return, other pixels are left unchanged.
    ys, xs : ndarray, int64, shape (n,)

    Returns
    -------
    int
    """
    ny, nx = crmask.shape
    n = ys.shape[0]
    for k in range(n):
        crmask[ys[k], xs[k]] = 3
    qy = np.empty(max(n, 1), dtype=np.int64)
    qx = np.empty(max(n, 1), dtype=np.int64)
    groups = 0
    for k in range(n):
        if crmask[ys[k], xs[k]] != 3:
            continue
        groups += 1
        crmask[ys[k], xs[k]] = 2
        qy[0] = ys[k]
        qx[0] = xs[k]
        head = 0
        tail = 1
        while head < tail:
            i = qy[head]
            j = qx[head]
            head += 1
            for ii in range(max(i - 1, 0), min(i + 2, ny)):
                for jj in range(max(j - 1, 0), min(j + 2, nx)):
                    if crmask[ii, jj] == 3:
                        crmask[ii, jj] = 2
                        qy[tail] = ii
                        qx[tail] = jj
                        tail += 1
    for k in range(n):
        crmask[ys[k], xs[k]] = 1
    return groups


@jit
def restore_background(out, work, bkg, ys, xs):
    """Write ``work + bkg`` into ``out`` at the listed pixels (in place).

    Parameters
    ----------
    out : ndarray, float32, shape (ny, nx)
    work : ndarray, float32, shape (ny, nx)
    bkg : ndarray, float32, shape (ny, nx) or (1, 1)
        Full background image, or one value for every pixel.
    ys, xs : ndarray, int64, shape (n,)
    """
    scalar = bkg.shape[0] == 1 and bkg.shape[1] == 1
    for k in range(ys.shape[0]):
        i = ys[k]
        j = xs[k]
        b = bkg[0, 0] if scalar else bkg[i, j]
        out[i, j] = work[i, j] + b


def _warmup_cases():
    """Tiny calls with the production dtypes, for ``apfast warmup``."""
    w = np.zeros((8, 8), dtype=np.float32)
    var = np.ones((8, 8), dtype=np.float32)
    msk = np.zeros((8, 8), dtype=np.int32)
    cand = np.zeros((8, 8), dtype=np.uint8)
    crm = np.zeros((8, 8), dtype=np.uint8)
    ys = np.array([4], dtype=np.int64)
    xs = np.array([4], dtype=np.int64)
    b = np.zeros((1, 1), dtype=np.float32)
    return [
        (find_cr_candidates, (w, var, msk, 1, 6.0, 0.4, 0.4, 0.2, 2.5, cand)),
        (group_candidates, (cand, w, 0, 150.0, crm)),
        (grow_candidates, (w, var, msk, 1, crm, ys, xs, 3.0, 0.4, 0.4, 0.2, 8, 10)),
        (dilate_pixels, (crm, msk, 1, ys, xs, 1)),
        (interpolate_pixels, (w, var, crm, msk, 1, ys, xs, True, 8)),
        (count_groups, (crm, ys, xs)),
        (restore_background, (w.copy(), w, b, ys, xs)),
    ]
