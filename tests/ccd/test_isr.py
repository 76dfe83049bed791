"""Tests of the ISR kernels (against tests/naive/isr.py) and of run_isr on synthetic raws with known truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from apfast.camera import Section, get_camera
from apfast.ccd.isr import AmpParams, IsrConfig, OverscanConfig, amp_params_from_header, run_isr
from apfast.errors import CalibrationError, ConfigError, InputError
from apfast.kernels import isr as k
from apfast.kernels import isr_masks as km
from apfast.masks import bitmask
from naive import isr as naive

BITS = {n: bitmask(n) for n in ("SAT", "BAD", "NO_DATA", "CROSSTALK", "SUSPECT", "INTRP")}
BITS_ARR = np.array([BITS[n] for n in ("SAT", "BAD", "NO_DATA", "CROSSTALK", "SUSPECT")], dtype=np.int64)
OFF = {"do_crosstalk": False, "do_bias": False, "do_linearize": False, "do_flat": False, "do_defects": False,
       "do_apply_gains": False}  # ADU out: the truths below are in ADU


def mini_amps(h=96, w=64, ob=12, npar=8, gain=(4.0, 3.5), rn=(7.0, 6.0), sat=(40000.0, 41000.0)):
    """A DECam-shaped two-amp CCD, small: [pre 4 | bias B | data B | data A | bias A], parallel rows below."""
    xb = 4 + ob
    a = AmpParams(
        name="A", data_section=Section(xb + w, xb + 2 * w, npar, npar + h),
        bias_section=Section(xb + 2 * w, xb + 2 * w + ob, npar, npar + h),
        parallel_overscan=Section(xb + w, xb + 2 * w, 0, npar), trimmed_section=Section(w, 2 * w, 0, h),
        gain=gain[0], read_noise=rn[0], saturation=sat[0], flip_x=True,
    )  # fmt: skip
    b = AmpParams(
        name="B", data_section=Section(xb, xb + w, npar, npar + h), bias_section=Section(4, xb, npar, npar + h),
        parallel_overscan=Section(xb, xb + w, 0, npar), trimmed_section=Section(0, w, 0, h),
        gain=gain[1], read_noise=rn[1], saturation=sat[1], flip_x=False,
    )  # fmt: skip
    raw_shape = (npar + h, xb + 2 * w + ob)
    return (a, b), raw_shape, (h, 2 * w)


# ------------------------------------------------------------------------------------------ kernels vs naive


def test_median_inplace_matches_numpy(rng):
    for n in [1, 2, 3, 4, 5, 10, 49, 50, 51, 200]:
        for _ in range(20):
            vals = rng.integers(0, 6, size=n).astype(np.float64) if rng.random() < 0.5 else rng.normal(size=n)
            buf = vals.copy()
            assert k.median_inplace(buf, n) == np.median(vals)
    assert np.isnan(k.median_inplace(np.empty(3), 0))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_overscan_kernels_match_naive(rng, dtype):
    raw = rng.normal(3000, 30, size=(70, 40)).astype(dtype)
    out = np.empty(70)
    k.overscan_row_medians(raw, 5, 17, out)
    np.testing.assert_array_equal(out, naive.row_medians(raw, 5, 17))
    assert k.region_median(raw, 3, 60, 5, 17) == np.median(raw[3:60, 5:17].astype(np.float64))
    raw2 = raw.copy()
    raw2[10, 6] = 60000  # an outlier the clip must reject
    got = k.region_clipped_mean(raw2, 0, 70, 5, 17, 3.0, 5)
    assert got == pytest.approx(naive.clipped_mean(raw2[:, 5:17], 3.0, 5), rel=1e-12)
    assert abs(got - raw[:, 5:17].astype(np.float64).mean()) < 3 * 30 / np.sqrt(70 * 12)
    col = np.empty(20)
    k.parallel_overscan_columns(raw, out, 2, 9, 20, 40, col)
    np.testing.assert_allclose(col, naive.parallel_columns(raw, out, 2, 9, 20, 40), rtol=0, atol=1e-9)


def _fused_inputs(rng, amps, raw_shape, tshape):
    raw = rng.normal(2000, 8, size=raw_shape)
    # bright source in amp A (crosses the crosstalk threshold), saturated pixels in amp B
    a, b = amps
    raw[a.data_section.y0 + 5 : a.data_section.y0 + 9, a.data_section.x0 + 3 : a.data_section.x0 + 6] = 52000
    raw[b.data_section.y0 + 20, b.data_section.x0 + 10 : b.data_section.x0 + 14] = 60000
    raw = raw.astype(np.uint16)
    rowlevel = rng.normal(2000, 2, size=(2, raw_shape[0]))
    collevel = rng.normal(0, 1, size=(2, amps[0].data_section.shape[1]))
    xt = np.array([[0.0, 3e-3], [2e-3, 0.0]])
    bias = rng.normal(5, 1, size=tshape).astype(np.float32)
    bias[7, 70] = np.nan
    flat = rng.normal(1, 0.05, size=tshape).astype(np.float32)
    flat[30, 3] = 0.0
    flat[31, 100] = -1.0
    lut = rng.normal(0, 3, size=(3, 60000)).astype(np.float32)
    return raw, rowlevel, collevel, xt, bias, flat, lut


@pytest.mark.parametrize("all_on", [True, False])
def test_isr_fused_matches_naive(rng, all_on):
    amps, raw_shape, tshape = mini_amps()
    raw, rowlevel, collevel, xt, bias, flat, lut = _fused_inputs(rng, amps, raw_shape, tshape)
    lut_row = np.array([2, 0], dtype=np.int64)
    lut_off = np.array([0.5, -3.0])
    geom = np.array(
        [[a.data_section.y0, a.data_section.x0, *a.data_section.shape, a.trimmed_section.y0,
          a.trimmed_section.x0, 0, 0, int(a.flip_x), 0] for a in amps], dtype=np.int64,
    )  # fmt: skip
    elec = np.array([[a.gain, a.read_noise, a.saturation, 1.0] for a in amps])  # ADU out, as the naive chain
    img = np.empty(tshape, np.float32)
    var = np.empty(tshape, np.float32)
    msk = np.empty(tshape, np.int32)
    counts = np.empty((2, tshape[0], 4), np.int64)
    k.isr_fused(
        raw, geom, elec, rowlevel, collevel, xt, 45000.0, all_on, bias, all_on, flat, all_on, lut, lut_row,
        lut_off, all_on, all_on, 5 if all_on else 0, BITS_ARR, img, var, msk, counts,
    )  # fmt: skip
    on = (lambda x: x) if all_on else (lambda x: None)
    n_img, n_var, n_msk = naive.isr_chain(
        raw, amps, rowlevel, collevel, on(xt), 45000.0, on(bias), on(flat), on(lut), lut_row, lut_off,
        do_sat=all_on, n_edge=5 if all_on else 0, trimmed_shape=tshape, bits=BITS,
    )  # fmt: skip
    np.testing.assert_array_equal(msk, n_msk)
    np.testing.assert_allclose(img, n_img, rtol=2e-6, atol=1e-3, equal_nan=True)
    np.testing.assert_allclose(var, n_var, rtol=2e-6, atol=1e-4, equal_nan=True)
    if all_on:
        assert counts[:, :, 0].sum() == 16  # 12 bright source pixels (52000) + 4 at 60000
        assert counts[:, :, 3].sum() == 16  # victims of the 12 bright A pixels and of the 4 at 60000 in B
        assert counts[:, :, 1].sum() == 3  # NaN bias + two bad flat pixels
        assert np.isnan(img[7, 70]) and msk[7, 70] & BITS["NO_DATA"]
        assert msk[30, 3] & BITS["BAD"] and not msk[30, 3] & BITS["NO_DATA"]


def test_mask_boxes_and_widen_match_naive(rng):
    mask = (rng.random((60, 80)) < 0.01).astype(np.int32) * BITS["SAT"]
    mask[10:40, 30:42] = BITS["SAT"]  # a 12-px-wide bleed trail
    boxes = np.array([[5, 5, 3, 10], [70, 50, 20, 20], [-2, -2, 4, 4]], dtype=np.int64)
    got = mask.copy()
    km.mask_boxes(got, boxes, BITS["BAD"])
    np.testing.assert_array_equal(got, naive.mask_boxes(mask, boxes, BITS["BAD"]))
    for grow, step in [(1, 4), (0, 4), (2, 0), (1, 3)]:
        rows = np.flatnonzero((mask & BITS["SAT"]).any(axis=1)).astype(np.int64)
        got = mask.copy()
        counts = np.zeros(60, np.int64)
        km.widen_saturation(got, rows, BITS["SAT"], grow, step, 4, np.empty((rows.size, 80), np.uint8), counts)
        want = naive.widen_saturation(mask, BITS["SAT"], grow, step, 4)
        np.testing.assert_array_equal(got, want)
        assert counts.sum() == ((want & BITS["SAT"]) != 0).sum()


def test_interpolate_matches_naive(rng):
    image = rng.normal(100, 5, size=(50, 60)).astype(np.float32)
    variance = rng.uniform(20, 30, size=(50, 60)).astype(np.float32)
    mask = np.zeros((50, 60), np.int32)
    mask[:, 7] = BITS["BAD"]  # bad column -> row interpolation
    mask[20, 10:40] = BITS["BAD"]  # bad row segment -> column interpolation
    mask[30:36, 0:5] = BITS["SAT"]  # touches the left edge
    mask[44, :] = BITS["BAD"]  # a whole row
    mask[rng.random((50, 60)) < 0.02] |= BITS["NO_DATA"]
    image[(mask & BITS["BAD"]) != 0] = np.nan
    bad = BITS["BAD"] | BITS["SAT"] | BITS["NO_DATA"]
    got_i, got_v, got_m = image.copy(), variance.copy(), mask.copy()
    counts = np.zeros((50, 2), np.int64)
    km.interpolate_masked(got_i, got_v, got_m, np.arange(50, dtype=np.int64), bad, BITS["INTRP"], counts)
    want_i, want_v, want_m = naive.interpolate(image, variance, mask, bad, BITS["INTRP"])
    np.testing.assert_array_equal(got_m, want_m)
    np.testing.assert_allclose(got_i, want_i, rtol=1e-6)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-6)
    # (44, 7) sits where the bad row crosses the bad column: no good pixel in its row or column
    assert counts[:, 1].sum() == 1 and np.isnan(got_i[44, 7]) and not got_m[44, 7] & BITS["INTRP"]
    assert counts[:, 0].sum() == ((mask & bad) != 0).sum() - 1
    # a bad column is filled from its row neighbours, a bad row from its column neighbours
    assert got_i[3, 7] == pytest.approx(0.5 * (image[3, 6] + image[3, 8]), rel=1e-6)
    assert got_i[20, 25] == pytest.approx(0.5 * (image[19, 25] + image[21, 25]), rel=1e-6)


def test_warmup_cases_run():
    for kernel, args in [*k._warmup_cases(), *km._warmup_cases()]:
        kernel(*args)


# ------------------------------------------------------------------------------------------ run_isr


def _synthetic(rng, amps, raw_shape, tshape, *, sky_e=400.0, row_bias=None, col_bias=None, stars=True):
    """Raw uint16 with known truth: returns raw, truth (ADU, before flat), bias, flat."""
    h, w2 = tshape
    yy, xx = np.mgrid[0:h, 0:w2]
    truth_e = np.full(tshape, sky_e)
    star_mask = np.zeros(tshape, dtype=bool)
    if stars:
        for x0, y0, f in [(20, 30, 5e4), (100, 60, 8e4), (70, 15, 3e4)]:
            prof = f * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 1.5**2) / (2 * np.pi * 1.5**2)
            truth_e += prof
            star_mask |= (xx - x0) ** 2 + (yy - y0) ** 2 < 12**2
    bias = (3 + 0.5 * np.sin(xx / 7.0) + rng.normal(0, 0.3, tshape)).astype(np.float32)
    flat = (1 + 0.1 * (xx - w2 / 2) / w2 + rng.normal(0, 0.01, tshape)).astype(np.float32)
    raw = np.zeros(raw_shape)
    gains = np.zeros(tshape)
    for i, a in enumerate(amps):
        t, d = a.trimmed_section.slices, a.data_section.slices
        gains[t] = a.gain
        electrons = rng.poisson(truth_e[t] * flat[t]).astype(np.float64)
        raw[d] = electrons / a.gain + bias[t]
        rb = np.zeros(raw_shape[0]) if row_bias is None else row_bias[i]
        raw[:, a.data_section.x0 : a.data_section.x1] += 1500 + rb[:, None]
        raw[:, a.bias_section.x0 : a.bias_section.x1] += 1500 + rb[:, None]
        if col_bias is not None:
            raw[: a.data_section.y1, a.data_section.x0 : a.data_section.x1] += col_bias[i][None, :]
        raw[:, a.data_section.x0 : a.data_section.x1] += rng.normal(0, a.read_noise / a.gain,
                                                                    (raw_shape[0], a.data_section.shape[1]))
        raw[:, a.bias_section.x0 : a.bias_section.x1] += rng.normal(0, a.read_noise / a.gain,
                                                                    (raw_shape[0], a.bias_section.shape[1]))
    raw = np.clip(np.round(raw), 0, 65535).astype(np.uint16)
    return raw, truth_e / gains, bias, flat, star_mask


@pytest.mark.parametrize("fit_type", ["MEDIAN_PER_ROW", "MEDIAN", "MEAN_CLIP", "POLY"])
def test_overscan_types_recover_injected_bias(rng, fit_type):
    amps, raw_shape, tshape = mini_amps(h=400, w=64, ob=40)
    y = np.arange(raw_shape[0])
    if fit_type == "MEDIAN_PER_ROW":
        rb = [20 * (y % 7 == 0) + 0.05 * y, 10 * (y % 5 == 0)]  # row-to-row structure
    elif fit_type == "POLY":
        rb = [0.08 * y, -0.05 * y + 3]  # a linear ramp
    else:
        rb = [np.full(raw_shape[0], 7.0), np.full(raw_shape[0], -4.0)]
    raw, *_ = _synthetic(rng, amps, raw_shape, tshape, row_bias=rb, stars=False)
    cfg = IsrConfig(overscan=OverscanConfig(fit_type=fit_type, order=1), **OFF)
    res = run_isr(raw, amps, config=cfg, trimmed_shape=tshape)
    for i, a in enumerate(amps):
        sigma = a.read_noise / a.gain
        got = res.overscan_levels[i, a.data_section.y0 : a.data_section.y1]
        err = got - (1500 + rb[i][a.data_section.y0 : a.data_section.y1])
        per_row = 1.253 * sigma / np.sqrt(40)  # std of a median of 40 values
        tol = 5 * per_row if fit_type == "MEDIAN_PER_ROW" else 5 * per_row / np.sqrt(50) + 0.3  # 0.3: rounding
        assert np.abs(err).max() < tol + 0.5, (fit_type, np.abs(err).max())
        assert abs(err.mean()) < 0.2
    assert res.metadata["overscan_fit_type"] == fit_type


def test_parallel_overscan_removes_column_pattern(rng):
    amps, raw_shape, tshape = mini_amps(h=200, w=64, npar=40)
    plain, *_ = _synthetic(rng, amps, raw_shape, tshape, stars=False)
    cb = [rng.integers(-40, 40, 64), rng.integers(-40, 40, 64)]
    with_cb = plain.astype(np.int64)
    for a, c in zip(amps, cb, strict=True):  # column pattern in the parallel-overscan and data rows
        with_cb[: a.data_section.y1, a.data_section.x0 : a.data_section.x1] += c[None, :]
    with_cb = with_cb.astype(np.uint16)
    base = dict(**OFF, num_edge_suspect=0, do_saturation=False)
    off_cfg = IsrConfig(overscan=OverscanConfig(do_parallel_overscan=False), **base)
    on = [run_isr(r, amps, config=IsrConfig(**base), trimmed_shape=tshape) for r in (plain, with_cb)]
    off = [run_isr(r, amps, config=off_cfg, trimmed_shape=tshape) for r in (plain, with_cb)]
    # without the parallel overscan the pattern stays in full; with it, only the noise of a 40-row median
    d_off = np.mean(off[1].image - off[0].image, axis=0)
    d_on = np.mean(on[1].image - on[0].image, axis=0)
    np.testing.assert_allclose(d_off[:64], cb[1], atol=1e-3)
    median_noise = 1.253 * np.sqrt(2) * max(a.read_noise / a.gain for a in amps) / np.sqrt(40)
    assert np.std(d_on) < 1.5 * median_noise
    assert np.abs(d_on).max() < 5 * median_noise
    np.testing.assert_allclose(on[1].parallel_overscan_levels[1] - on[0].parallel_overscan_levels[1], cb[1],
                               atol=5 * median_noise)  # fmt: skip


def test_crosstalk_ghost_removed_and_masked(rng):
    amps, raw_shape, tshape = mini_amps(h=100, w=64)
    raw, truth, *_ = _synthetic(rng, amps, raw_shape, tshape, stars=False, sky_e=100)
    raw = raw.astype(np.float64)
    a, b = amps
    coeff = 2e-3
    # bright source in amp A, amp-local columns 10..13, rows 40..49; its ghost in B at the mirrored columns
    ys = slice(a.data_section.y0 + 40, a.data_section.y0 + 50)
    raw[ys, a.data_section.x0 + 10 : a.data_section.x0 + 14] += 48000
    w = a.data_section.shape[1]
    ghost_cols = [b.data_section.x0 + (w - 1 - lx) for lx in range(10, 14)]
    raw[ys, ghost_cols] += coeff * 48000  # ~96 ADU ghost
    xt = np.array([[0.0, 0.0], [coeff, 0.0]])  # [victim B=1, source A=0]
    cfg = IsrConfig(**{**OFF, "do_crosstalk": True}, num_edge_suspect=0, sat_grow=0)
    res = run_isr(raw.astype(np.uint16), amps, config=cfg, crosstalk=xt, trimmed_shape=tshape)
    ty = slice(40, 50)
    tx = [b.trimmed_section.x0 + (w - 1 - lx) for lx in range(10, 14)]
    resid = (res.image[ty][:, tx] - truth[ty][:, tx]).mean()
    noise = np.sqrt(100 / b.gain**2 + (b.read_noise / b.gain) ** 2) / np.sqrt(40)
    assert abs(resid - 3.0) < 0.02 * coeff * 48000 + 5 * noise  # 3.0 = the master-bias level left in
    assert np.all(res.mask[ty][:, tx] & BITS["CROSSTALK"])
    assert (res.mask & BITS["CROSSTALK"] != 0).sum() == 40
    assert res.crosstalk_applied and res.metadata["n_crosstalk_masked"] == 40
    # without the correction the ghost stays
    res0 = run_isr(raw.astype(np.uint16), amps, config=IsrConfig(**OFF, num_edge_suspect=0), trimmed_shape=tshape)
    assert (res0.image[ty][:, tx] - truth[ty][:, tx]).mean() > 0.9 * coeff * 48000


def test_end_to_end_truth(rng):
    amps, raw_shape, tshape = mini_amps(h=512, w=256, ob=40, npar=20)
    raw, truth, bias, flat, star_mask = _synthetic(rng, amps, raw_shape, tshape)
    raw = raw.astype(np.float64)
    # a saturated star with a bleed trail in amp B (trimmed x 200..203 -> amp B is trimmed x 0..255)
    b = amps[1]
    raw[b.data_section.y0 + 300 : b.data_section.y0 + 340, b.data_section.x0 + 200 : b.data_section.x0 + 204] = 45000
    raw = raw.astype(np.uint16)
    defects = np.array([[50, 0, 1, 512], [400, 100, 30, 6]], dtype=np.int32)
    lut = (np.zeros((2, 50000), np.float32), np.zeros(2))  # identity linearizer
    raw_before = raw.copy()
    bias_before = bias.copy()
    cfg = IsrConfig(do_crosstalk=False, do_apply_gains=False)
    res = run_isr(raw, amps, config=cfg, bias=bias, flat=flat, defects=defects, linearizer=lut, trimmed_shape=tshape)
    np.testing.assert_array_equal(raw, raw_before)
    np.testing.assert_array_equal(bias, bias_before)
    assert res.image.dtype == np.float32 and res.variance.dtype == np.float32 and res.mask.dtype == np.int32
    # truth after the flat: ISR output is electrons / gain / flat == truth (ADU of the unflattened scene)
    resid = res.image.astype(np.float64) - truth
    clean = ~star_mask & (res.mask == 0)
    clean[:40, :] = clean[-40:, :] = clean[:, :40] = clean[:, -40:] = False
    clean[280:360, :] = False
    n = clean.sum()
    sigma = np.sqrt(np.mean(res.variance[clean]))
    assert abs(resid[clean].mean()) < max(0.1, 5 * sigma / np.sqrt(n))
    pull = resid[clean] / np.sqrt(res.variance[clean])
    assert abs(pull.std() - 1.0) < 0.05
    # the variance plane matches the empirical variance of the residual
    assert resid[clean].var() == pytest.approx(np.mean(res.variance[clean]), rel=0.05)
    # masks: defects BAD + INTRP, saturation SAT + INTRP, 35-px edge SUSPECT
    for x0, y0, w, h in defects:
        box = res.mask[y0 : y0 + h, x0 : x0 + w]
        assert np.all(box & BITS["BAD"]) and np.all(box & BITS["INTRP"])
    sat = res.mask[300:340, 200:204]
    assert np.all(sat & BITS["SAT"]) and np.all(sat & BITS["INTRP"])
    assert np.all(res.mask[300:340, 199] & BITS["SAT"])  # grown by sat_grow=1 (+1 for the 4-px-wide run)
    assert np.all(np.isfinite(res.image)) and np.all(np.isfinite(res.variance))
    edge = np.zeros(tshape, dtype=bool)
    edge[:35, :] = edge[-35:, :] = edge[:, :35] = edge[:, -35:] = True
    assert np.array_equal((res.mask & BITS["SUSPECT"]) != 0, edge)
    # interpolated pixels inside the 1-px defect column are close to the truth (smooth sky there)
    col = res.image[100:400, 50] - truth[100:400, 50]
    assert abs(col.mean()) < 5 * sigma / np.sqrt(300) * np.sqrt(2)
    assert res.n_interpolated == ((res.mask & BITS["INTRP"]) != 0).sum()
    assert res.n_saturated == ((res.mask & BITS["SAT"]) != 0).sum()


def test_big_endian_inputs_give_same_result(rng):
    amps, raw_shape, tshape = mini_amps()
    raw, _truth, bias, flat, _ = _synthetic(rng, amps, raw_shape, tshape, stars=False)
    cfg = IsrConfig(do_crosstalk=False, do_linearize=False)
    kw = {"config": cfg, "defects": np.zeros((0, 4), int), "trimmed_shape": tshape}
    ref = run_isr(raw, amps, bias=bias, flat=flat, **kw)
    for r, b_, f_ in [(raw.astype(">u2"), bias.astype(">f4"), flat.astype(">f4")),
                      (raw.astype(">f4"), bias.astype(np.float64), flat.astype(">f8")),
                      (raw.astype(np.int32)[::1, :], bias, np.asfortranarray(flat))]:  # fmt: skip
        before = (r.copy(), b_.copy())
        got = run_isr(r, amps, bias=b_, flat=f_, **kw)
        np.testing.assert_array_equal(got.image, ref.image)
        np.testing.assert_array_equal(got.mask, ref.mask)
        np.testing.assert_array_equal(r, before[0])
        np.testing.assert_array_equal(b_, before[1])


def test_errors_name_array_shape_and_key(rng):
    amps, raw_shape, tshape = mini_amps()
    raw = np.full(raw_shape, 1000, np.uint16)
    full = {"bias": np.zeros(tshape, np.float32), "flat": np.ones(tshape, np.float32), "defects": np.zeros((0, 4), int),
                "crosstalk": np.zeros((2, 2)), "linearizer": (np.zeros((2, 10), np.float32), np.zeros(2))}  # fmt: skip
    with pytest.raises(InputError, match=r"bias has shape \(10, 10\)"):
        run_isr(raw, amps, **{**full, "bias": np.zeros((10, 10))}, trimmed_shape=tshape)
    with pytest.raises(InputError, match=r"raw has shape \(2, 3, 4\)"):
        run_isr(np.zeros((2, 3, 4)), amps, **full, trimmed_shape=tshape)
    with pytest.raises(InputError, match="lies outside the raw frame"):
        run_isr(raw[:, :50], amps, **full, trimmed_shape=tshape)
    with pytest.raises(InputError, match=r"defects has shape \(3,\)"):
        run_isr(raw, amps, **{**full, "defects": np.array([1, 2, 3])}, trimmed_shape=tshape)
    for name, key in [("bias", "do_bias"), ("flat", "do_flat"), ("crosstalk", "do_crosstalk"),
                      ("linearizer", "do_linearize"), ("defects", "do_defects")]:  # fmt: skip
        with pytest.raises(CalibrationError, match=f"isr.{key}=false"):
            run_isr(raw, amps, **{**full, name: None}, trimmed_shape=tshape)
    with pytest.raises(CalibrationError, match=r"crosstalk matrix has shape \(3, 3\)"):
        run_isr(raw, amps, **{**full, "crosstalk": np.zeros((3, 3))}, trimmed_shape=tshape)
    with pytest.raises(ConfigError, match="'isr.sat_grow'"):
        IsrConfig(sat_grow=-1)
    with pytest.raises(ConfigError, match="'isr.overscan.order'"):
        OverscanConfig(order=20)
    with pytest.raises(ConfigError, match="'isr.overscan.fit_type'"):
        OverscanConfig(fit_type="SPLINE")
    with pytest.raises(ConfigError, match="'isr.interpolate_mask_planes'"):
        IsrConfig(interpolate_mask_planes=("NOPE",))


def test_amp_params_from_real_decam_header(real_data):
    header = yaml.load((real_data / "decam_calib" / "raw_header_example.yaml").read_text(), Loader=yaml.SafeLoader)
    amps = amp_params_from_header(get_camera("DECam"), header)
    a, b = amps
    assert a.name == "A" and a.flip_x and not b.flip_x
    assert a.data_section.slices == (slice(50, 4146), slice(1080, 2104))
    assert b.bias_section.slices == (slice(50, 4146), slice(6, 56))
    assert a.trimmed_section.slices == (slice(0, 4096), slice(1024, 2048))
    assert a.parallel_overscan is not None and a.parallel_overscan.shape == (50, 1024)
    assert a.gain == header["GAINA"] and b.read_noise == header["RDNOISEB"] and a.saturation == header["SATURATA"]
    with pytest.raises(InputError, match="DATASECA"):
        amp_params_from_header(get_camera("DECam"), {**header, "DATASECA": "[1:2,3]"})
    bad = dataclasses.replace(a, gain=0.0)
    with pytest.raises(InputError, match="gain 0.0"):
        run_isr(np.zeros((4146, 2160), np.uint16), [bad], config=IsrConfig(**OFF))


def test_linearizer_object_and_real_crosstalk(rng, real_data):
    from apfast.repo.calib_formats import Linearizer, LinearizerAmp, read_crosstalk_yaml

    amps, raw_shape, tshape = mini_amps()
    raw = rng.normal(3000, 200, raw_shape).astype(np.uint16)
    lut = rng.normal(0, 5, (3, 5000)).astype(np.float32)
    lin = Linearizer(35, "N4", (LinearizerAmp("B", "LookupTable", 2, 1.5, None),
                                LinearizerAmp("A", "LookupTable", 0, -2.0, None)), lut)  # fmt: skip
    cfg = IsrConfig(**{**OFF, "do_linearize": True}, num_edge_suspect=0)
    got = run_isr(raw, amps, config=cfg, linearizer=lin, trimmed_shape=tshape)
    simple = run_isr(raw, amps, config=cfg, linearizer=(lut[[0, 2]], np.array([-2.0, 1.5])), trimmed_shape=tshape)
    np.testing.assert_array_equal(got.image, simple.image)
    plain = run_isr(raw, amps, config=IsrConfig(**OFF, num_edge_suspect=0), trimmed_shape=tshape)
    for a in amps:
        sl = a.trimmed_section.slices
        np.testing.assert_allclose(got.image[sl], lin.correct(plain.image[sl], a.name), rtol=1e-6, atol=1e-3)
    xt = read_crosstalk_yaml(next((real_data / "decam_calib" / "crosstalk" / "n4").glob("*.yaml")), ("A", "B"))
    xcfg = IsrConfig(**{**OFF, "do_crosstalk": True})
    r1 = run_isr(raw, amps, config=xcfg, crosstalk=xt, trimmed_shape=tshape)
    r2 = run_isr(raw, amps[::-1], config=xcfg, crosstalk=xt, trimmed_shape=tshape)  # reordered by amp name
    np.testing.assert_array_equal(r1.image, r2.image)
    assert not np.array_equal(r1.image, plain.image)


def test_apply_gains_gives_electrons(rng):
    """do_apply_gains multiplies each amp by its gain (variance by gain^2): the output is in electrons."""
    amps, raw_shape, tshape = mini_amps()
    raw = _synthetic(rng, amps, raw_shape, tshape)[0]
    kw = dict(trimmed_shape=tshape)
    adu = run_isr(raw, amps, config=IsrConfig(**OFF), **kw)
    ele = run_isr(raw, amps, config=IsrConfig(**{**OFF, "do_apply_gains": True}), **kw)
    for a in amps:
        sl = a.trimmed_section.slices
        np.testing.assert_allclose(ele.image[sl], adu.image[sl] * a.gain, rtol=1e-6)
        np.testing.assert_allclose(ele.variance[sl], adu.variance[sl] * a.gain**2, rtol=1e-6)
