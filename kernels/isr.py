"""Instrument signature removal (ISR) kernels: overscan, the fused per-pixel chain, masks, interpolation.

The stage driver is :func:`apfast.ccd.isr.run_isr`; it validates the inputs, computes
the overscan levels with the small kernels here, then calls :func:`isr_fused`,
which makes **one pass** over the raw pixels of every amplifier (Rubin's
``IsrTask`` makes roughly one pass per step):

``v = raw - overscan_row[y] - overscan_col[x] - sum_s c[v, s] * source_s(mirrored)
      - bias;  var = max(v, 0) / g + (sigma_read / g)^2;  v += lut[row, trunc(v + offset)];
      v /= flat, var /= flat^2``

with the SAT, CROSSTALK, BAD, NO_DATA and SUSPECT mask bits set on the way.
Three cheap passes follow, in :mod:`apfast.kernels.isr_masks`: defect boxes,
saturation growth and bleed-trail widening (only over rows that hold saturated
pixels) and interpolation over masked pixels (only over rows that need it).

Every kernel takes native-endian C-contiguous arrays (raw pixels ``uint16`` or
``float32``; calibrations ``float32``; masks ``int32``), writes only into the
output arrays it is given and reads no globals. Accumulators are float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit
from apfast.kernels.primitives import select_kth

__all__ = [
    "isr_fused",
    "median_inplace",
    "overscan_row_medians",
    "parallel_overscan_columns",
    "region_clipped_mean",
    "region_median",
]

#: Columns of the ``geom`` table passed to :func:`isr_fused` (documented there).
GEOM_COLUMNS = (
    "data_y0",
    "data_x0",
    "height",
    "width",
    "trim_y0",
    "trim_x0",
    "assembly_flip_x",
    "assembly_flip_y",
    "readout_flip_x",
    "readout_flip_y",
)


@jit
def median_inplace(buf, n):
    """Median of ``buf[:n]`` (mean of the two middle values when ``n`` is even); NaN when ``n == 0``.

    Expected O(n) selection instead of a sort: the overscan collapse calls this
    once per raw row (8292 times per DECam CCD).

    Parameters
    ----------
    buf : ndarray, float64, shape (>= n,)
        Finite values; reordered in place.
    n : int
        Number of leading values to use.

    Returns
    -------
    float
    """
    if n <= 0:
        return np.nan
    k = n // 2
    upper = select_kth(buf, 0, n, k)
    if n % 2 == 1:
        return upper
    lower = buf[0]
    for i in range(1, k):
        lower = max(lower, buf[i])
    return 0.5 * (lower + upper)


@pjit
def overscan_row_medians(raw, x0, x1, out):
    """Median of each raw row over the serial-overscan columns ``x0 <= x < x1``.

    ``out[y] = median_x raw[y, x]`` for every row ``y`` (non-finite values are
    skipped; a row with none left gives NaN). Parallel over blocks of 64 rows,
    each with its own scratch buffer.

    Parameters
    ----------
    raw : ndarray, uint16 or float32, shape (ny, nx)
        The raw amplifier frame (never modified).
    x0, x1 : int
        Column range of the overscan (0-based, ``x1`` exclusive).
    out : ndarray, float64, shape (ny,)
        Written in place.
    """
    ny = raw.shape[0]
    w = x1 - x0
    nblk = (ny + 63) // 64
    for b in prange(nblk):
        buf = np.empty(max(w, 1), np.float64)
        for y in range(b * 64, min(ny, (b + 1) * 64)):
            n = 0
            for x in range(x0, x1):
                v = np.float64(raw[y, x])
                if math.isfinite(v):
                    buf[n] = v
                    n += 1
            out[y] = median_inplace(buf, n)


@jit
def region_median(raw, y0, y1, x0, x1):
    """Median of the finite pixels of ``raw[y0:y1, x0:x1]`` (one overscan constant, fit type MEDIAN).

    Parameters
    ----------
    raw : ndarray, uint16 or float32, shape (ny, nx)
    y0, y1, x0, x1 : int
        The region (0-based, upper bounds exclusive).

    Returns
    -------
    float
        NaN when the region holds no finite pixel.
    """
    buf = np.empty(max((y1 - y0) * (x1 - x0), 1), np.float64)
    n = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            v = np.float64(raw[y, x])
            if math.isfinite(v):
                buf[n] = v
                n += 1
    return median_inplace(buf, n)


@jit
def region_clipped_mean(raw, y0, y1, x0, x1, n_sigma, n_iter):
    """Sigma-clipped mean of ``raw[y0:y1, x0:x1]`` (fit type MEAN_CLIP).

    Iteration ``i`` keeps the finite pixels within ``n_sigma`` standard
    deviations of the previous iteration's mean (the first iteration keeps
    every finite pixel) and recomputes mean and standard deviation; the loop
    stops after ``n_iter`` clipping rounds or when nothing changes.

    Parameters
    ----------
    raw : ndarray, uint16 or float32, shape (ny, nx)
    y0, y1, x0, x1 : int
        The region (0-based, upper bounds exclusive).
    n_sigma : float
        Clipping threshold in standard deviations.
    n_iter : int
        Number of clipping rounds.

    Returns
    -------
    float
        NaN when the region holds no finite pixel.
    """
    lo = -np.inf
    hi = np.inf
    mean = np.nan
    last_n = -1
    for _ in range(n_iter + 1):
        s = 0.0
        s2 = 0.0
        n = 0
        for y in range(y0, y1):
            for x in range(x0, x1):
                v = np.float64(raw[y, x])
                if math.isfinite(v) and lo <= v <= hi:
                    s += v
                    s2 += v * v
                    n += 1
        if n == 0:
            return mean
        mean = s / n
        var = max(s2 / n - mean * mean, 0.0)
        if n == last_n:
            break
        last_n = n
        sd = math.sqrt(var)
        lo = mean - n_sigma * sd
        hi = mean + n_sigma * sd
    return mean


@jit
def parallel_overscan_columns(raw, rowlevel, y0, y1, x0, x1, out):
    """Per-column median of the parallel-overscan rows after the serial correction.

    ``out[j] = median_{y0 <= y < y1} (raw[y, x0 + j] - rowlevel[y])`` for
    ``0 <= j < x1 - x0``. Serial: about 0.5 ms per DECam amp, less than a
    parallel launch costs on a busy machine.

    Parameters
    ----------
    raw : ndarray, uint16 or float32, shape (ny, nx)
    rowlevel : ndarray, float64, shape (ny,)
        Serial overscan level of every raw row.
    y0, y1 : int
        Rows of the parallel overscan (0-based, ``y1`` exclusive).
    x0, x1 : int
        Data columns of the amplifier.
    out : ndarray, float64, shape (>= x1 - x0,)
        Written in place.
    """
    w = x1 - x0
    h = y1 - y0
    buf = np.empty(max(h, 1), np.float64)
    for j in range(w):
        n = 0
        for y in range(y0, y1):
            v = np.float64(raw[y, x0 + j]) - rowlevel[y]
            if math.isfinite(v):
                buf[n] = v
                n += 1
        out[j] = median_inplace(buf, n) if n > 0 else 0.0


@pjit
def isr_fused(
    raw,
    geom,
    elec,
    rowlevel,
    collevel,
    xtalk,
    xtalk_min,
    do_xtalk,
    bias,
    do_bias,
    flat,
    do_flat,
    lut,
    lut_row,
    lut_offset,
    do_lut,
    do_sat,
    n_edge,
    bits,
    image,
    variance,
    mask,
    counts,
):
    """Overscan, crosstalk, assembly, bias, variance, linearity, flat and pixel masks in one pass.

    For amplifier ``a`` and its data pixel at amp-local ``(ly, lx)`` (raw pixel
    ``(data_y0 + ly, data_x0 + lx)``), landing at trimmed pixel ``(ty, tx)``
    (``trim_y0 + ly``, ``trim_x0 + lx``, mirrored when the assembly flips)::

        v   = raw - rowlevel[a, ry] - collevel[a, lx]                      # overscan
        v  -= sum_{s != a} xtalk[a, s] * (raw_s - rowlevel_s - collevel_s)  # crosstalk, same readout pixel
        v  -= bias[ty, tx]                                                  # bias (ADU)
        var = max(v, 0) / gain + (read_noise / gain)^2                      # ADU^2, Poisson + read
        v  += lut[lut_row[a], clip(trunc(v + lut_offset[a]), 0, ncol - 1)]  # linearity (ip_isr LookupTable)
        v  *= s / flat[ty, tx];  var *= (s / flat[ty, tx])^2              # output scale and flat

    The crosstalk source pixel has the victim's readout coordinates: amp-local
    column ``w - 1 - lx`` when exactly one of the two amps reads out from its
    right edge (``readout_flip_x``), so DECam's amp A column ``k`` pairs with
    amp B column ``1023 - k``. Masks (assigned, not OR-ed): SAT where the raw
    value ``>= saturation`` (before any subtraction); CROSSTALK where a source
    pixel after overscan is ``>= xtalk_min``; BAD|NO_DATA where the value is not
    finite; BAD where the flat is ``<= 0`` or not finite (image and variance
    NaN there, to be interpolated); SUSPECT within ``n_edge`` pixels of the
    trimmed CCD edges. Parallel over amp-local rows: iteration ``ly`` owns the
    ``ly``-th row of every amplifier, so no two threads write the same pixel.

    Parameters
    ----------
    raw : ndarray, uint16 or float32, shape (ny_raw, nx_raw)
        Never modified.
    geom : ndarray, int64, shape (namp, 10)
        Per amp, the columns of ``GEOM_COLUMNS``: data_y0, data_x0, height,
        width, trim_y0, trim_x0, assembly_flip_x, assembly_flip_y,
        readout_flip_x, readout_flip_y (flips 0 or 1).
    elec : ndarray, float64, shape (namp, 4)
        Gain (e-/ADU), read noise (e-), saturation (raw ADU; NaN disables) and the
        output scale ``s`` (1: ADU out; the gain: electrons out, Rubin's applyGains).
    rowlevel : ndarray, float64, shape (namp, ny_raw)
        Serial overscan level per amp and raw row.
    collevel : ndarray, float64, shape (namp, max width)
        Parallel overscan level per amp and amp-local column (zeros when off).
    xtalk : ndarray, float64, shape (namp, namp)
        ``xtalk[victim, source]``; crosstalk needs all amps to share one data shape.
    xtalk_min : float
        Source level (ADU after overscan) from which the victim gets CROSSTALK.
    do_xtalk, do_bias, do_flat, do_lut, do_sat : bool
        Step switches (a switched-off step's array may be a (1, 1) dummy).
    bias, flat : ndarray, float32, shape (ny, nx)
        Master bias (ADU) and flat (~1) on the trimmed grid.
    lut : ndarray, float32, shape (nrow, ncol)
        Linearity look-up table.
    lut_row : ndarray, int64, shape (namp,)
    lut_offset : ndarray, float64, shape (namp,)
    n_edge : int
        Width of the SUSPECT border (0 disables).
    bits : ndarray, int64, shape (5,)
        Mask values of SAT, BAD, NO_DATA, CROSSTALK, SUSPECT.
    image, variance : ndarray, float32, shape (ny, nx)
        Written in place (every pixel covered by an amp).
    mask : ndarray, int32, shape (ny, nx)
        Written in place (assigned).
    counts : ndarray, int64, shape (namp, max height, 4)
        Written in place: per amp and amp-local row, the number of SAT pixels,
        of non-finite (BAD) pixels, of linearity look-ups outside the table and
        of CROSSTALK pixels.
    """
    namp = geom.shape[0]
    ny = image.shape[0]
    nx = image.shape[1]
    hmax = 0
    wmax = 1
    for a in range(namp):
        hmax = max(hmax, geom[a, 2])
        wmax = max(wmax, geom[a, 3])
    ncol = lut.shape[1]
    sat_bit = np.int32(bits[0])
    bad_bit = np.int32(bits[1])
    nodata_bit = np.int32(bits[2])
    xt_bit = np.int32(bits[3])
    sus_bit = np.int32(bits[4])
    zero = np.int32(0)
    badnd = np.int32(bad_bit | nodata_bit)
    for lyp in prange(hmax):
        ly = np.int64(lyp)  # the prange index may be typed unsigned; int64 keeps index arithmetic integer
        vbuf = np.empty(wmax, np.float64)
        qbuf = np.empty(wmax, np.float64)
        mbuf = np.empty(wmax, np.int32)
        for a in range(namp):
            h = geom[a, 2]
            if ly >= h:
                continue
            w = geom[a, 3]
            ry = geom[a, 0] + ly
            dx0 = geom[a, 1]
            ty = geom[a, 4] + ly
            if geom[a, 7]:
                ty = geom[a, 4] + h - 1 - ly
            # trimmed column of amp-local column lx: tbase + tstep * lx
            tbase = geom[a, 5]
            tstep = 1
            if geom[a, 6]:
                tbase = geom[a, 5] + w - 1
                tstep = -1
            rly = ly
            if geom[a, 9]:
                rly = h - 1 - ly
            rl = rowlevel[a, ry]
            inv_gain = 1.0 / elec[a, 0]
            rn2 = (elec[a, 1] * inv_gain) ** 2
            sat = elec[a, 2]
            oscale = elec[a, 3]
            if not do_sat:
                sat = np.inf
            lrow = lut_row[a]
            loff = lut_offset[a]
            nsat = 0
            nbad = 0
            noor = 0
            nxt = 0
            # Simple loops over one row held in L1-resident buffers, so LLVM can vectorise each step.
            # 1. serial + parallel overscan, saturation on the raw value
            for lx in range(w):
                rv = np.float64(raw[ry, dx0 + lx])
                vbuf[lx] = rv - rl - collevel[a, lx]
                is_sat = rv >= sat
                mbuf[lx] = sat_bit if is_sat else zero
                nsat += is_sat
            # 2. crosstalk: the source pixel with the victim's readout coordinates
            if do_xtalk:
                for s in range(namp):
                    c = xtalk[a, s]
                    if s == a or c == 0.0:
                        continue
                    sly = rly
                    if geom[s, 9]:
                        sly = geom[s, 2] - 1 - rly
                    sry = geom[s, 0] + sly
                    sx0 = geom[s, 1]
                    rls = rowlevel[s, sry]
                    mirror = geom[s, 8] != geom[a, 8]
                    for lx in range(w):
                        slx = w - 1 - lx if mirror else lx
                        sv = np.float64(raw[sry, sx0 + slx]) - rls - collevel[s, slx]
                        vbuf[lx] -= c * sv
                        hit = sv >= xtalk_min
                        mbuf[lx] |= xt_bit if hit else zero
                        nxt += hit
            # 3. bias (ADU)
            if do_bias:
                if tstep == 1:
                    for lx in range(w):
                        vbuf[lx] -= bias[ty, tbase + lx]
                else:
                    for lx in range(w):
                        vbuf[lx] -= bias[ty, tbase - lx]
            # 4. variance before linearity and flat (Rubin's order)
            for lx in range(w):
                qbuf[lx] = max(vbuf[lx], 0.0) * inv_gain + rn2
            # 5. linearity look-up (ip_isr applyLookupTable: index trunc(v + offset), clipped)
            if do_lut:
                top = ncol - 1.0
                for lx in range(w):
                    t = vbuf[lx] + loff
                    noor += (t <= -1.0) | (t >= ncol)
                    t = max(0.0, t)  # NaN -> 0: its value stays NaN anyway
                    t = min(top, t)
                    vbuf[lx] += lut[lrow, int(t)]
            # 6. non-finite -> BAD|NO_DATA; flat (<= 0 or non-finite -> BAD); NaN marks what to interpolate
            for lx in range(w):
                v = vbuf[lx]
                fin = (v > -np.inf) & (v < np.inf)
                mbuf[lx] |= zero if fin else badnd
            if do_flat:
                if tstep == 1:
                    for lx in range(w):
                        f = np.float64(flat[ty, tbase + lx])
                        inv = oscale / f
                        vbuf[lx] *= inv
                        qbuf[lx] *= inv * inv
                        ok = (f > 0.0) & (f < np.inf)
                        mbuf[lx] |= zero if ok else bad_bit
                else:
                    for lx in range(w):
                        f = np.float64(flat[ty, tbase - lx])
                        inv = oscale / f
                        vbuf[lx] *= inv
                        qbuf[lx] *= inv * inv
                        ok = (f > 0.0) & (f < np.inf)
                        mbuf[lx] |= zero if ok else bad_bit
            elif oscale != 1.0:
                for lx in range(w):
                    vbuf[lx] *= oscale
                    qbuf[lx] *= oscale * oscale
            # 7. write the trimmed row; every BAD pixel gets NaN image and variance
            if tstep == 1:
                for lx in range(w):
                    b = (mbuf[lx] & bad_bit) != 0
                    image[ty, tbase + lx] = np.nan if b else vbuf[lx]
                    variance[ty, tbase + lx] = np.nan if b else qbuf[lx]
                    mask[ty, tbase + lx] = mbuf[lx]
                    nbad += b
            else:
                for lx in range(w):
                    b = (mbuf[lx] & bad_bit) != 0
                    image[ty, tbase - lx] = np.nan if b else vbuf[lx]
                    variance[ty, tbase - lx] = np.nan if b else qbuf[lx]
                    mask[ty, tbase - lx] = mbuf[lx]
                    nbad += b
            # 8. SUSPECT border (a few hundred pixels per row at most)
            if n_edge > 0:
                tmin = min(tbase, tbase + tstep * (w - 1))
                tmax = max(tbase, tbase + tstep * (w - 1))
                if ty < n_edge or ty >= ny - n_edge:
                    for tx in range(tmin, tmax + 1):
                        mask[ty, tx] |= sus_bit
                else:
                    for tx in range(tmin, min(tmax + 1, n_edge)):
                        mask[ty, tx] |= sus_bit
                    for tx in range(max(tmin, nx - n_edge), tmax + 1):
                        mask[ty, tx] |= sus_bit
            counts[a, ly, 0] = nsat
            counts[a, ly, 1] = nbad
            counts[a, ly, 2] = noor
            counts[a, ly, 3] = nxt


def _warmup_cases():
    """Tiny argument sets with the production dtypes, for ``apfast warmup``."""
    raw16 = np.full((6, 8), 1000, dtype=np.uint16)
    raw32 = raw16.astype(np.float32)
    geom = np.array([[1, 4, 5, 4, 0, 0, 0, 0, 0, 0], [1, 0, 5, 4, 0, 4, 0, 0, 1, 0]], dtype=np.int64)
    elec = np.array([[4.0, 7.0, 44000.0, 4.0], [4.0, 7.0, 44000.0, 4.0]])
    rowlevel = np.zeros((2, 6))
    collevel = np.zeros((2, 4))
    xt = np.zeros((2, 2))
    cal = np.ones((5, 8), dtype=np.float32)
    lut = np.zeros((1, 4), dtype=np.float32)
    bits = np.array([2, 1, 256, 512, 128], dtype=np.int64)
    img = np.empty((5, 8), dtype=np.float32)
    var = np.empty((5, 8), dtype=np.float32)
    msk = np.empty((5, 8), dtype=np.int32)
    cnt = np.empty((2, 5, 4), dtype=np.int64)
    cases = []
    for raw in (raw16, raw32):
        cases += [
            (overscan_row_medians, (raw, 0, 2, np.empty(6))),
            (region_median, (raw, 0, 6, 0, 2)),
            (region_clipped_mean, (raw, 0, 6, 0, 2, 3.0, 3)),
            (parallel_overscan_columns, (raw, np.zeros(6), 0, 1, 2, 6, np.empty(4))),
            (
                isr_fused,
                (raw, geom, elec, rowlevel, collevel, xt, 45000.0, True, cal, True, cal, True, lut,
                 np.zeros(2, np.int64), np.zeros(2), True, True, 1, bits, img, var, msk, cnt),
            ),
        ]
    return cases
