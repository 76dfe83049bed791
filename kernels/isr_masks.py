"""ISR mask kernels: defect boxes, saturation growth and bleed-trail widening, interpolation.

Called by :func:`apfast.ccd.isr.run_isr` after :func:`apfast.kernels.isr.isr_fused`,
each only over the rows that need it. Same contract as every kernel module:
native-endian C-contiguous arrays, outputs written in place, no globals.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = ["interpolate_masked", "mask_boxes", "widen_saturation"]


@jit
def mask_boxes(mask, boxes, bit):
    """OR ``bit`` into every pixel of each box (defects), clipped to the image.

    Parameters
    ----------
    mask : ndarray, int32, shape (ny, nx)
        Modified in place.
    boxes : ndarray, int64, shape (n, 4)
        Columns x0, y0, width, height (0-based trimmed pixels).
    bit : int
        Mask value to set.

    Returns
    -------
    int
        Number of pixels inside the (clipped) boxes, overlaps counted once per box.
    """
    ny, nx = mask.shape
    total = 0
    for k in range(boxes.shape[0]):
        x0 = max(boxes[k, 0], 0)
        y0 = max(boxes[k, 1], 0)
        x1 = min(boxes[k, 0] + boxes[k, 2], nx)
        y1 = min(boxes[k, 1] + boxes[k, 3], ny)
        for y in range(y0, y1):
            for x in range(x0, x1):
                mask[y, x] |= bit
        if x1 > x0 and y1 > y0:
            total += (x1 - x0) * (y1 - y0)
    return total


@pjit
def widen_saturation(mask, rows, sat_bit, grow, trail_step, trail_max, scratch, row_counts):
    """Grow the SAT footprint by ``grow`` pixels and widen bleed trails, over the listed rows.

    Step 1 (parallel over ``rows``): every run of ``L`` consecutive SAT pixels
    in a row is extended by ``e = grow + min(trail_max, L // trail_step)``
    pixels on both sides (a wide saturated run is the core of a bleed trail whose
    halo of not-quite-saturated, nonlinear charge is wider too;
    ``trail_step <= 0`` disables the trail term). Step 2 (parallel over output
    rows): each row gets the OR of the step-1 runs of the rows within ``grow``
    of it, so the footprint grows by a ``(2 grow + 1)``-pixel square as well.

    Parameters
    ----------
    mask : ndarray, int32, shape (ny, nx)
        Modified in place.
    rows : ndarray, int64, shape (nr,)
        Distinct rows that hold SAT pixels.
    sat_bit : int
    grow : int
        Square dilation half-width (>= 0).
    trail_step, trail_max : int
        Trail widening rule, see above.
    scratch : ndarray, uint8, shape (nr, nx)
        Overwritten.
    row_counts : ndarray, int64, shape (ny,)
        Written in place: SAT pixels per row after widening (0 for rows not touched).

    Returns
    -------
    None
    """
    ny, nx = mask.shape
    nr = rows.shape[0]
    for k in prange(nr):
        r = rows[k]
        for x in range(nx):
            scratch[k, x] = 0
        x = 0
        while x < nx:
            if mask[r, x] & sat_bit:
                x0 = x
                while x < nx and (mask[r, x] & sat_bit):
                    x += 1
                run = x - x0
                e = grow
                if trail_step > 0:
                    e += min(trail_max, run // trail_step)
                for xx in range(max(0, x0 - e), min(nx, x + e)):
                    scratch[k, xx] = 1
            else:
                x += 1
    rowpos = np.full(ny, -1, np.int64)
    for k in range(nr):
        rowpos[rows[k]] = k
    for o in prange(ny):
        n = 0
        touched = False
        for r in range(max(0, o - grow), min(ny, o + grow + 1)):
            k = rowpos[r]
            if k >= 0:
                touched = True
                for x in range(nx):
                    if scratch[k, x]:
                        mask[o, x] |= sat_bit
        if touched:
            for x in range(nx):
                if mask[o, x] & sat_bit:
                    n += 1
        row_counts[o] = n


@pjit
def interpolate_masked(image, variance, mask, rows, bad_bits, intrp_bit, counts):
    """Fill masked pixels by linear interpolation across the shorter of the row and column gaps.

    A pixel is *masked* when ``mask & bad_bits != 0`` (the driver guarantees
    every non-finite pixel is masked). For a masked pixel in a run of ``L``
    masked pixels along its row, if the masked run along its column is shorter
    than ``L`` and has good pixels at both ends (``r - du`` and ``r + dd``), it
    gets ``(dd I[r - du] + du I[r + dd]) / (du + dd)`` (bad rows, wide defects);
    otherwise the row gap is used: linear between the good pixels either side of
    the run (bad columns, bleed trails), or a copy of the one good neighbour at
    an image edge. A row with no good pixel falls back to the nearest good
    pixels along the column at any distance. Variance is interpolated with the
    same weights; INTRP is OR-ed into the mask. Only good pixels are read and
    only masked ones written, so rows can be processed in parallel (other rows
    see only the INTRP bit change, which is not in ``bad_bits``).

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
        Modified in place at masked pixels.
    mask : ndarray, int32, shape (ny, nx)
        INTRP OR-ed in place at filled pixels.
    rows : ndarray, int64, shape (nr,)
        Distinct rows to process (rows without masked pixels may be listed).
    bad_bits : int
        Mask planes to interpolate over.
    intrp_bit : int
    counts : ndarray, int64, shape (nr, 2)
        Written in place: pixels filled and pixels left unfilled (NaN) per listed row.
    """
    ny, nx = image.shape
    for k in prange(rows.shape[0]):
        r = rows[k]
        nfill = 0
        nfail = 0
        x = 0
        while x < nx:
            if (mask[r, x] & bad_bits) == 0:
                x += 1
                continue
            x0 = x
            while x < nx and (mask[r, x] & bad_bits):
                x += 1
            hl = x - x0
            left = x0 - 1
            right = x
            for xx in range(x0, x):
                # vertical gap, searched only as far as it could still beat the row gap
                du = 0
                for d in range(1, hl):
                    rr = r - d
                    if rr < 0:
                        break
                    if (mask[rr, xx] & bad_bits) == 0:
                        du = d
                        break
                dd = 0
                if du > 0:
                    for d in range(1, hl - du + 1):
                        rr = r + d
                        if rr >= ny:
                            break
                        if (mask[rr, xx] & bad_bits) == 0:
                            dd = d
                            break
                if du > 0 and dd > 0:
                    wa = dd / (du + dd)
                    wb = du / (du + dd)
                    iv = wa * image[r - du, xx] + wb * image[r + dd, xx]
                    vv = wa * variance[r - du, xx] + wb * variance[r + dd, xx]
                elif left >= 0 and right < nx:
                    t = (xx - left) / (right - left)
                    iv = (1.0 - t) * image[r, left] + t * image[r, right]
                    vv = (1.0 - t) * variance[r, left] + t * variance[r, right]
                elif left >= 0:
                    iv = image[r, left]
                    vv = variance[r, left]
                elif right < nx:
                    iv = image[r, right]
                    vv = variance[r, right]
                else:
                    # the whole row is masked: nearest good pixels along the column, any distance
                    up = -1
                    for rr in range(r - 1, -1, -1):
                        if (mask[rr, xx] & bad_bits) == 0:
                            up = rr
                            break
                    dn = -1
                    for rr in range(r + 1, ny):
                        if (mask[rr, xx] & bad_bits) == 0:
                            dn = rr
                            break
                    if up >= 0 and dn >= 0:
                        wa = (dn - r) / (dn - up)
                        iv = wa * image[up, xx] + (1.0 - wa) * image[dn, xx]
                        vv = wa * variance[up, xx] + (1.0 - wa) * variance[dn, xx]
                    elif up >= 0:
                        iv = image[up, xx]
                        vv = variance[up, xx]
                    elif dn >= 0:
                        iv = image[dn, xx]
                        vv = variance[dn, xx]
                    else:
                        image[r, xx] = np.nan
                        variance[r, xx] = np.nan
                        nfail += 1
                        continue
                image[r, xx] = iv
                variance[r, xx] = vv
                mask[r, xx] |= intrp_bit
                nfill += 1
        counts[k, 0] = nfill
        counts[k, 1] = nfail


def _warmup_cases():
    """Tiny argument sets with the production dtypes, for ``apfast warmup``."""
    img = np.zeros((5, 8), dtype=np.float32)
    var = np.ones((5, 8), dtype=np.float32)
    msk = np.zeros((5, 8), dtype=np.int32)
    rows = np.arange(5, dtype=np.int64)
    return [
        (mask_boxes, (msk, np.array([[1, 1, 2, 2]], dtype=np.int64), 1)),
        (widen_saturation, (msk, rows, 2, 1, 4, 4, np.empty((5, 8), np.uint8), np.empty(5, np.int64))),
        (interpolate_masked, (img, var, msk, rows, 3, 4, np.empty((5, 2), np.int64))),
    ]
