"""Slow, obviously correct NumPy/Python versions of the ISR kernels (``apfast.kernels.isr``).

Each function does one step the plain way (whole-array numpy, or Python loops
over the few masked pixels) so the fused kernels can be compared with it.
"""

from __future__ import annotations

import numpy as np


def row_medians(raw, x0, x1):
    """``median`` of each row over columns ``x0:x1``."""
    return np.median(raw[:, x0:x1].astype(np.float64), axis=1)


def clipped_mean(region, n_sigma, n_iter):
    """Sigma-clipped mean: keep values within ``n_sigma`` std of the last mean, ``n_iter`` rounds."""
    vals = region.astype(np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    keep = vals
    mean = keep.mean()
    for _ in range(n_iter):
        sd = keep.std()
        new = vals[np.abs(vals - mean) <= n_sigma * sd]
        if new.size == keep.size:
            break
        keep = new
        mean = keep.mean()
    return mean


def parallel_columns(raw, rowlevel, y0, y1, x0, x1):
    """Per-column median of ``raw[y0:y1, x0:x1] - rowlevel[y0:y1]``."""
    return np.median(raw[y0:y1, x0:x1].astype(np.float64) - rowlevel[y0:y1, None], axis=0)


def isr_chain(raw, amps, rowlevel, collevel, xtalk, xtalk_min, bias, flat, lut, lut_row, lut_offset,
              *, do_sat=True, n_edge=0, trimmed_shape, bits):
    """The per-pixel ISR chain step by step on whole amp images.

    ``amps`` is a list of AmpParams; ``bits`` a dict of mask values by plane name.
    ``bias``/``flat``/``lut``/``xtalk`` may be None (step off). Returns image, variance, mask.
    """
    raw = raw.astype(np.float64)
    namp = len(amps)
    # 1. overscan-subtracted amp images in amp-local coordinates, and their readout-order views
    amp_img = []
    for i, a in enumerate(amps):
        d = a.data_section
        img = raw[d.y0:d.y1, d.x0:d.x1] - rowlevel[i, d.y0:d.y1, None] - collevel[i, None, : d.shape[1]]
        amp_img.append(img)

    def readout(img, a):
        out = img
        if a.flip_x:
            out = out[:, ::-1]
        if a.flip_y:
            out = out[::-1, :]
        return out

    corrected = [img.copy() for img in amp_img]
    xt_mask = [np.zeros(img.shape, dtype=bool) for img in amp_img]
    if xtalk is not None:
        for v in range(namp):
            for s in range(namp):
                if v == s or xtalk[v, s] == 0:
                    continue
                src = readout(amp_img[s], amps[s])  # source in readout order
                src_in_victim = readout(src, amps[v])  # readout order -> victim's amp-local order (involution)
                corrected[v] -= xtalk[v, s] * src_in_victim
                xt_mask[v] |= src_in_victim >= xtalk_min
    image = np.full(trimmed_shape, np.nan)
    variance = np.full(trimmed_shape, np.nan)
    mask = np.zeros(trimmed_shape, dtype=np.int64)
    for i, a in enumerate(amps):
        d, t = a.data_section, a.trimmed_section
        v = corrected[i]
        m = np.zeros(v.shape, dtype=np.int64)
        if do_sat:
            m[raw[d.y0:d.y1, d.x0:d.x1] >= a.saturation] |= bits["SAT"]
        m[xt_mask[i]] |= bits["CROSSTALK"]
        sl = t.slices
        if bias is not None:
            v = v - bias[sl]
        var = np.maximum(v, 0) / a.gain + (a.read_noise / a.gain) ** 2
        if lut is not None:
            idx = np.clip(np.trunc(np.nan_to_num(v + lut_offset[i], nan=0.0)), 0, lut.shape[1] - 1).astype(int)
            v = v + lut[lut_row[i], idx]
        nonfinite = ~np.isfinite(v)
        m[nonfinite] |= bits["BAD"] | bits["NO_DATA"]
        if flat is not None:
            f = flat[sl].astype(np.float64)
            badf = ~(np.isfinite(f) & (f > 0))
            with np.errstate(divide="ignore", invalid="ignore"):
                v = v / f
                var = var / f**2
            m[badf & ~nonfinite] |= bits["BAD"]
        isbad = (m & bits["BAD"]) != 0
        v[isbad] = np.nan
        var[isbad] = np.nan
        image[sl] = v
        variance[sl] = var
        mask[sl] = m
    if n_edge:
        edge = np.zeros(trimmed_shape, dtype=bool)
        edge[:n_edge, :] = edge[-n_edge:, :] = edge[:, :n_edge] = edge[:, -n_edge:] = True
        mask[edge] |= bits["SUSPECT"]
    return image.astype(np.float32), variance.astype(np.float32), mask.astype(np.int32)


def mask_boxes(mask, boxes, bit):
    """OR ``bit`` into each (x0, y0, width, height) box."""
    out = mask.copy()
    for x0, y0, w, h in boxes:
        out[max(y0, 0):max(y0 + h, 0), max(x0, 0):max(x0 + w, 0)] |= bit
    return out


def widen_saturation(mask, bit, grow, trail_step, trail_max):
    """Each SAT run of length L widened by grow + min(trail_max, L // trail_step) px; then rows dilated by grow."""
    ny, nx = mask.shape
    sat = (mask & bit) != 0
    wide = np.zeros_like(sat)
    for y in range(ny):
        x = 0
        while x < nx:
            if sat[y, x]:
                x0 = x
                while x < nx and sat[y, x]:
                    x += 1
                e = grow + (min(trail_max, (x - x0) // trail_step) if trail_step > 0 else 0)
                wide[y, max(0, x0 - e):min(nx, x + e)] = True
            else:
                x += 1
    out_sat = wide.copy()
    for dy in range(1, grow + 1):
        out_sat[dy:] |= wide[:-dy]
        out_sat[:-dy] |= wide[dy:]
    out = mask.copy()
    out[out_sat] |= bit
    return out


def interpolate(image, variance, mask, bad_bits, intrp_bit):
    """Fill each masked pixel from the shorter of its row and column gaps (ties: row), pixel by pixel."""
    img = image.astype(np.float64).copy()
    var = variance.astype(np.float64).copy()
    out_mask = mask.copy()
    good = (mask & bad_bits) == 0
    ny, nx = image.shape
    for y, x in zip(*np.nonzero(~good), strict=True):
        # row gap
        left = x - 1
        while left >= 0 and not good[y, left]:
            left -= 1
        right = x + 1
        while right < nx and not good[y, right]:
            right += 1
        row_len = right - left - 1
        up = y - 1
        while up >= 0 and not good[up, x]:
            up -= 1
        down = y + 1
        while down < ny and not good[down, x]:
            down += 1
        col_len = down - up - 1
        if up >= 0 and down < ny and col_len < row_len:
            wa = (down - y) / (down - up)
            img[y, x] = wa * image[up, x] + (1 - wa) * image[down, x]
            var[y, x] = wa * variance[up, x] + (1 - wa) * variance[down, x]
        elif left >= 0 and right < nx:
            t = (x - left) / (right - left)
            img[y, x] = (1 - t) * image[y, left] + t * image[y, right]
            var[y, x] = (1 - t) * variance[y, left] + t * variance[y, right]
        elif left >= 0 or right < nx:
            src = left if left >= 0 else right
            img[y, x] = image[y, src]
            var[y, x] = variance[y, src]
        elif up >= 0 or down < ny:
            if up >= 0 and down < ny:
                wa = (down - y) / (down - up)
                img[y, x] = wa * image[up, x] + (1 - wa) * image[down, x]
                var[y, x] = wa * variance[up, x] + (1 - wa) * variance[down, x]
            else:
                src = up if up >= 0 else down
                img[y, x] = image[src, x]
                var[y, x] = variance[src, x]
        else:
            img[y, x] = np.nan
            var[y, x] = np.nan
            continue
        out_mask[y, x] |= intrp_bit
    return img.astype(np.float32), var.astype(np.float32), out_mask
