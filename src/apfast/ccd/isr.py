"""Instrument signature removal (ISR): Rubin's DECam ``IsrTask`` chain, fused into few passes.

:func:`run_isr` turns one raw CCD (all amplifiers, overscans included) into a
calibrated exposure: image (float32, calibrated ADU: electrons / gain / flat),
mask (int32, :mod:`apfast.masks` planes) and variance (float32, ADU^2). It does
no I/O. The step order follows Rubin's ``IsrTask.run`` (ip_isr) with the DECam
overrides of obs_decam:

1. serial overscan per amp (``MEDIAN_PER_ROW``, ``MEDIAN``, ``MEAN_CLIP`` or
   ``POLY``), then optionally the parallel-overscan rows per column;
2. linear intra-CCD crosstalk before assembly (victim -= coeff * source at the
   same readout pixel; CROSSTALK where the source is >= ``crosstalk_min_pixel``);
3. assembly and trim; bias; variance ``max(v, 0)/g + (sigma_read/g)^2`` (computed
   before linearity and the flat, as Rubin does); look-up-table linearity
   (``v + lut[row, trunc(v + offset)]``, as ip_isr's ``applyLookupTable``);
4. masks: SAT (raw >= amp saturation), NaN/inf -> BAD|NO_DATA, ``num_edge_suspect``
   px of every CCD edge -> SUSPECT (flagged, not trimmed), defects -> BAD,
   saturation grown by ``sat_grow`` px and bleed trails widened;
5. flat (pixels with flat <= 0 or non-finite -> BAD); variance / flat^2;
6. interpolation over BAD, SAT and NO_DATA (INTRP set, original bits kept).

Steps 1-5 except defects and trail widening run in a single pass of
:func:`apfast.kernels.isr.isr_fused`; defects, widening and interpolation only
visit the rows that need them.

Examples
--------
>>> import numpy as np
>>> from apfast.camera import Section
>>> amp = AmpParams(name="A", data_section=Section(2, 6, 0, 4), bias_section=Section(0, 2, 0, 4),
...                 parallel_overscan=None, trimmed_section=Section(0, 4, 0, 4),
...                 gain=2.0, read_noise=4.0, saturation=60000.0, flip_x=False)
>>> raw = np.full((4, 6), 1100, dtype=np.uint16); raw[:, :2] = 1000
>>> cfg = IsrConfig(do_crosstalk=False, do_bias=False, do_linearize=False, do_flat=False,
...                 do_defects=False, num_edge_suspect=0)
>>> res = run_isr(raw, [amp], config=cfg, trimmed_shape=(4, 4))
>>> float(res.image[0, 0]), float(res.variance[0, 0])
(100.0, 54.0)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from apfast._configbase import ConfigSection, opt, subsection
from apfast.camera import Camera, Section, parse_section
from apfast.ccd.isr_inputs import (
    check_section,
    crosstalk_matrix,
    linearizer_arrays,
    missing_calib,
    native_float32,
    prepare_raw,
    serial_overscan,
)
from apfast.errors import AlgorithmError, InputError
from apfast.kernels import isr as k
from apfast.kernels import isr_masks as km
from apfast.masks import MASK_PLANES, bitmask

__all__ = [
    "AmpParams",
    "IsrConfig",
    "IsrResult",
    "OverscanConfig",
    "amp_params_from_header",
    "run_isr",
]

log = logging.getLogger(__name__)

#: Fewest unmasked pixels (fraction of the CCD) ISR interpolates from; below it the CCD fails.
_MIN_GOOD_FRACTION = 0.01

FitType = Literal["MEDIAN_PER_ROW", "MEDIAN", "MEAN_CLIP", "POLY"]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OverscanConfig(ConfigSection):
    """Overscan correction: serial overscan fit per amplifier and the optional parallel overscan."""

    _key_prefix: ClassVar[str] = "isr.overscan."

    fit_type: FitType = opt(
        "MEDIAN_PER_ROW",
        "How the serial-overscan columns become the level subtracted from each row.",
        choices={
            "MEDIAN_PER_ROW": "median of the overscan columns of each row (follows row-to-row bias jumps)",
            "MEDIAN": "one constant per amp: median of the whole overscan region (Rubin's DECam default)",
            "MEAN_CLIP": "one constant per amp: sigma-clipped mean of the overscan region",
            "POLY": "polynomial of degree `order` in the row number, clipped fit to the per-row medians",
        },
    )
    order: int = opt(1, "Polynomial degree for fit_type POLY (0-10).")
    n_sigma_clip: float = opt(3.0, "Clipping threshold in standard deviations for MEAN_CLIP and POLY (> 0).")
    n_clip_iter: int = opt(3, "Clipping iterations for MEAN_CLIP and POLY (>= 1).")
    do_parallel_overscan: bool = opt(
        True,
        "After the serial correction, subtract the per-column median of the parallel-overscan rows "
        "(amps without a parallel overscan section are skipped).",
    )

    def _validate(self) -> None:
        if not 0 <= self.order <= 10:
            self._fail("order", self.order, "use a polynomial degree between 0 and 10")
        if not (math.isfinite(self.n_sigma_clip) and self.n_sigma_clip > 0):
            self._fail("n_sigma_clip", self.n_sigma_clip, "use a finite number of sigma > 0, e.g. 3")
        if self.n_clip_iter < 1:
            self._fail("n_clip_iter", self.n_clip_iter, "use at least 1 clipping iteration")


@dataclass(frozen=True, slots=True, kw_only=True)
class IsrConfig(ConfigSection):
    """Instrument signature removal (overscan, crosstalk, bias, linearity, masks, flat, interpolation)."""

    _key_prefix: ClassVar[str] = "isr."

    overscan: OverscanConfig = subsection(OverscanConfig)
    do_crosstalk: bool = opt(True, "Subtract intra-CCD linear crosstalk before assembly (needs a crosstalk).")
    crosstalk_min_pixel: float = opt(
        45000.0, "Source level (ADU, after overscan) from which the victim pixel gets the CROSSTALK mask."
    )
    do_bias: bool = opt(True, "Subtract the master bias (needs a bias).")
    do_linearize: bool = opt(True, "Apply the look-up-table linearizer (needs a linearizer).")
    do_defects: bool = opt(True, "Mask the defect boxes BAD (needs defects; an empty list is allowed).")
    do_saturation: bool = opt(True, "Mask SAT where the raw value reaches the amp's saturation level.")
    sat_grow: int = opt(1, "Grow the SAT footprint by this many pixels in every direction (0-50).")
    do_widen_saturation_trails: bool = opt(
        True,
        "Widen saturated runs along rows (bleed trails): a run of L px gets "
        "min(saturation_trail_max, L // saturation_trail_step) extra px each side.",
    )
    saturation_trail_step: int = opt(4, "Run length per extra pixel of trail widening (>= 1).")
    saturation_trail_max: int = opt(4, "Most extra pixels of trail widening each side (0-100).")
    num_edge_suspect: int = opt(35, "Pixels of every CCD edge flagged SUSPECT (not trimmed), as Rubin's DECam.")
    do_apply_gains: bool = opt(
        True,
        "Multiply each amp by its gain so the output is in electrons (as Rubin's IsrTaskLSST); turn off for "
        "flats made in ADU that already carry the amps' gain ratios.",
    )
    do_flat: bool = opt(True, "Divide by the master flat (needs a flat); flat <= 0 or NaN pixels become BAD.")
    do_interpolate: bool = opt(True, "Interpolate over the planes in interpolate_mask_planes and set INTRP.")
    interpolate_mask_planes: tuple[str, ...] = opt(
        ("BAD", "SAT", "NO_DATA"), "Mask planes whose pixels are interpolated over."
    )

    def _validate(self) -> None:
        if not math.isfinite(self.crosstalk_min_pixel):
            self._fail("crosstalk_min_pixel", self.crosstalk_min_pixel, "use a finite level in ADU, e.g. 45000")
        if not 0 <= self.sat_grow <= 50:
            self._fail("sat_grow", self.sat_grow, "use a number of pixels between 0 and 50")
        if self.saturation_trail_step < 1:
            self._fail("saturation_trail_step", self.saturation_trail_step, "use a run length >= 1")
        if not 0 <= self.saturation_trail_max <= 100:
            self._fail("saturation_trail_max", self.saturation_trail_max, "use 0-100 pixels")
        if self.num_edge_suspect < 0:
            self._fail("num_edge_suspect", self.num_edge_suspect, "use 0 (off) or a positive number of pixels")
        unknown = [p for p in self.interpolate_mask_planes if p not in MASK_PLANES]
        if unknown or not self.interpolate_mask_planes:
            self._fail(
                "interpolate_mask_planes",
                self.interpolate_mask_planes,
                f"give one or more of {', '.join(MASK_PLANES)}",
            )


# --------------------------------------------------------------------------------------------------
# Amplifiers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AmpParams:
    """One amplifier of a raw CCD: its sections (0-based, see :class:`apfast.camera.Section`) and electronics.

    Attributes
    ----------
    name : str
        Amp name (``'A'``, ``'B'``); matches crosstalk and linearizer amp names.
    data_section : Section
        Imaging pixels in the raw frame.
    bias_section : Section
        Serial-overscan columns in the raw frame.
    parallel_overscan : Section or None
        Parallel-overscan rows in the raw frame (DECam ``POSTSEC``), or None.
    trimmed_section : Section
        Where the data land in the trimmed CCD (same shape as ``data_section``).
    gain : float
        e-/ADU (> 0).
    read_noise : float
        Electrons (>= 0).
    saturation : float
        Raw ADU at which a pixel is SAT (NaN: never).
    flip_x, flip_y : bool
        The amp reads out from its right (top) edge: crosstalk pairs pixels in readout order.
    """

    name: str
    data_section: Section
    bias_section: Section
    parallel_overscan: Section | None
    trimmed_section: Section
    gain: float
    read_noise: float
    saturation: float
    flip_x: bool = False
    flip_y: bool = False


def amp_params_from_header(camera: Camera, header: Mapping[str, Any]) -> tuple[AmpParams, ...]:
    """Read every amplifier's sections and electronics from a raw CCD header.

    Each value comes from the camera description's keyword (``DATASECA``,
    ``GAINA`` ...) or its literal fallback.

    Parameters
    ----------
    camera : Camera
        E.g. ``apfast.camera.get_camera("DECam")``.
    header : mapping
        The CCD extension header (astropy ``Header`` or a dict).

    Returns
    -------
    tuple of AmpParams
        In the camera's amplifier order.

    Raises
    ------
    InputError
        If a section is malformed, the data and trimmed sections differ in shape,
        or a gain is not positive; the message names the keyword.

    Examples
    --------
    >>> from apfast.camera import get_camera
    >>> amps = amp_params_from_header(get_camera("DECam"), {"GAINA": 4.1, "GAINB": 3.9})
    >>> [(a.name, a.data_section.to_fits(), a.gain) for a in amps]
    [('A', '[1081:2104,51:4146]', 4.1), ('B', '[57:1080,51:4146]', 3.9)]
    """
    out = []
    for amp in camera.amplifiers:

        def section(spec: Any, what: str, amp_name: str = amp.name) -> Section:
            text = spec.resolve(header, what=f"amp {amp_name} {what}")
            try:
                return parse_section(str(text), what=f"amp {amp_name} {what} ({spec.key or 'camera literal'})")
            except ValueError as exc:
                msg = f"{exc}; fix the header keyword or the camera description {camera.name}"
                raise InputError(msg) from None

        def number(spec: Any, what: str, amp_name: str = amp.name) -> float:
            value = spec.resolve(header, what=f"amp {amp_name} {what}")
            try:
                return float(value)
            except (TypeError, ValueError):
                msg = (f"amp {amp_name} {what} ({spec.key or 'camera literal'}) = {value!r} is not a number; "
                       "fix the header")
                raise InputError(msg) from None

        data = section(amp.data_section, "data section")
        trimmed = section(amp.trimmed_section, "trimmed section")
        if data.shape != trimmed.shape:
            msg = (
                f"amp {amp.name}: data section {data.to_fits()} has shape {data.shape} but trimmed section "
                f"{trimmed.to_fits()} has {trimmed.shape}; fix the camera description {camera.name}"
            )
            raise InputError(msg)
        gain = number(amp.gain, "gain")
        if not (math.isfinite(gain) and gain > 0):
            msg = (f"amp {amp.name} gain ({amp.gain.key or 'camera literal'}) = {gain} must be > 0 e-/ADU; "
                   "fix the header")
            raise InputError(msg)
        out.append(
            AmpParams(
                name=amp.name,
                data_section=data,
                bias_section=section(amp.bias_section, "bias section"),
                parallel_overscan=(
                    section(amp.parallel_overscan, "parallel overscan") if amp.parallel_overscan else None
                ),
                trimmed_section=trimmed,
                gain=gain,
                read_noise=number(amp.read_noise, "read noise"),
                saturation=number(amp.saturation, "saturation"),
                flip_x=amp.readout_flip_x,
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IsrResult:
    """What :func:`run_isr` returns.

    Attributes
    ----------
    image : ndarray, float32, shape (ny, nx)
        Calibrated ADU (electrons / gain / flat).
    mask : ndarray, int32, shape (ny, nx)
        :mod:`apfast.masks` bits.
    variance : ndarray, float32, shape (ny, nx)
        ADU^2, on the same scale as ``image``.
    overscan_levels : ndarray, float64, shape (namp, ny_raw)
        Serial overscan level subtracted from each raw row, per amp.
    parallel_overscan_levels : ndarray, float64, shape (namp, max amp width)
        Per-column parallel overscan level subtracted (zeros when off).
    n_saturated : int
        SAT pixels after growth and trail widening.
    n_interpolated : int
        Pixels filled by interpolation.
    crosstalk_applied : bool
    metadata : dict
        Counts, overscan summaries and per-step timings (seconds).
    """

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    overscan_levels: np.ndarray
    parallel_overscan_levels: np.ndarray
    n_saturated: int
    n_interpolated: int
    crosstalk_applied: bool
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def run_isr(
    raw: np.ndarray,
    amps: Sequence[AmpParams],
    *,
    config: IsrConfig | None = None,
    bias: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    defects: np.ndarray | None = None,
    crosstalk: Any = None,
    linearizer: Any = None,
    trimmed_shape: tuple[int, int] = (4096, 2048),
) -> IsrResult:
    """Remove the instrument signature from one raw CCD (no I/O; inputs are never modified).

    Parameters
    ----------
    raw : ndarray, shape (ny_raw, nx_raw)
        The raw frame with overscans, any numeric dtype or byte order (``>u2``
        from FITS is fine). Native ``uint16`` and ``float32`` are used as they
        are; anything else is converted to native ``float32`` once.
    amps : sequence of AmpParams
        From :func:`amp_params_from_header`.
    config : IsrConfig, optional
        Default ``IsrConfig()`` (every step on: pass every calibration or turn its step off).
    bias : ndarray, shape ``trimmed_shape``, optional
        Master bias in ADU (after overscan), needed when ``do_bias``.
    flat : ndarray, shape ``trimmed_shape``, optional
        Master flat normalised to ~1, needed when ``do_flat``.
    defects : ndarray, int, shape (n, 4), optional
        Boxes ``x0, y0, width, height`` in 0-based trimmed pixels, needed when
        ``do_defects`` (an empty array means "no defects").
    crosstalk : ndarray (namp, namp) or apfast.repo.calib_formats.Crosstalk, optional
        ``[victim, source]`` coefficients in amp order (a ``Crosstalk`` is
        reordered by its ``amp_names``), needed when ``do_crosstalk``.
    linearizer : apfast.repo.calib_formats.Linearizer or (lut_rows, offsets), optional
        A ``Linearizer`` (its ``lut`` and each amp's ``row``/``offset``) or the
        simple form: ``lut_rows`` float (namp, ncol), one table row per amp in amp
        order, and ``offsets`` (namp,). Needed when ``do_linearize``.
    trimmed_shape : (int, int)
        ``(rows, columns)`` of the assembled CCD.

    Returns
    -------
    IsrResult

    Raises
    ------
    InputError
        A wrong shape, dtype or section (the message names the array and its shape).
    CalibrationError
        A calibration needed by a switched-on step is missing or malformed; the
        message names the config key that turns the step off.
    """
    cfg = config if config is not None else IsrConfig()
    timings: dict[str, float] = {}
    t0 = t_start = time.perf_counter()
    raw_a = prepare_raw(raw)
    amps = tuple(amps)
    tshape = (int(trimmed_shape[0]), int(trimmed_shape[1]))
    _check_amps(amps, raw_a.shape, tshape, cfg)
    cal = _prepare_calibs(
        amps, tshape, cfg, bias=bias, flat=flat, defects=defects, crosstalk=crosstalk, linearizer=linearizer
    )
    timings["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rowlevel, collevel = _measure_overscans(raw_a, amps, cfg)
    timings["overscan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    image, variance, mask, counts, geom = _fused_pass(raw_a, amps, tshape, cfg, cal, rowlevel, collevel)
    timings["fused"] = time.perf_counter() - t0
    row_sat, row_bad = _rows_with_sat_or_bad(amps, geom, counts, tshape)

    t0 = time.perf_counter()
    n_defect, n_sat_raw, n_saturated, row_sat = _mask_defects_and_saturation(
        mask, cal.boxes, counts, row_sat, row_bad, tshape, cfg
    )
    timings["masks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_interp, n_fallback = _interpolate(image, variance, mask, row_sat, row_bad, n_saturated, tshape, cfg)
    timings["interpolate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    metadata = _isr_metadata(
        amps, cfg, rowlevel, collevel, counts, timings,
        n_sat_raw=n_sat_raw, n_saturated=n_saturated, n_defect=n_defect, n_interp=n_interp, n_fallback=n_fallback,
    )  # fmt: skip
    log.debug("ISR done in %.3f s: %s", timings["total"], metadata)
    return IsrResult(
        image=image,
        mask=mask,
        variance=variance,
        overscan_levels=rowlevel,
        parallel_overscan_levels=collevel,
        n_saturated=n_saturated,
        n_interpolated=n_interp,
        crosstalk_applied=bool(cfg.do_crosstalk),
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------------
# The steps of run_isr
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _IsrCalibs:
    """The calibrations as the fused kernel takes them (1x1 dummies or zeros for steps that are off)."""

    bias: np.ndarray
    flat: np.ndarray
    crosstalk: np.ndarray
    lut: np.ndarray
    lut_row: np.ndarray
    lut_off: np.ndarray
    boxes: np.ndarray


def _check_amps(
    amps: tuple[AmpParams, ...], raw_shape: tuple[int, ...], tshape: tuple[int, int], cfg: IsrConfig
) -> None:
    """Raise InputError unless every amp's sections fit the raw frame and the trimmed CCD without overlap."""
    if not amps:
        msg = "amps is empty; pass the amplifiers of the CCD (amp_params_from_header(camera, header))"
        raise InputError(msg)
    rshape = (int(raw_shape[0]), int(raw_shape[1]))
    for a in amps:
        check_section(a, "data section", a.data_section, rshape, "raw frame")
        check_section(a, "bias section", a.bias_section, rshape, "raw frame")
        if a.parallel_overscan is not None and cfg.overscan.do_parallel_overscan:
            check_section(a, "parallel overscan", a.parallel_overscan, rshape, "raw frame")
        check_section(a, "trimmed section", a.trimmed_section, tshape, "trimmed CCD")
        if a.data_section.shape != a.trimmed_section.shape:
            msg = (
                f"amp {a.name} data section {a.data_section.to_fits()} and trimmed section "
                f"{a.trimmed_section.to_fits()} differ in shape; fix the amp geometry"
            )
            raise InputError(msg)
        if not (math.isfinite(a.gain) and a.gain > 0) or not (math.isfinite(a.read_noise) and a.read_noise >= 0):
            msg = f"amp {a.name} has gain {a.gain} and read noise {a.read_noise}; need gain > 0 and read noise >= 0"
            raise InputError(msg)
    for i, a in enumerate(amps):
        for b in amps[:i]:
            ta, tb = a.trimmed_section, b.trimmed_section
            if ta.x0 < tb.x1 and tb.x0 < ta.x1 and ta.y0 < tb.y1 and tb.y0 < ta.y1:
                msg = f"amps {b.name} and {a.name} have overlapping trimmed sections {tb.to_fits()}, {ta.to_fits()}"
                raise InputError(msg)


def _prepare_calibs(
    amps: tuple[AmpParams, ...],
    tshape: tuple[int, int],
    cfg: IsrConfig,
    *,
    bias: np.ndarray | None,
    flat: np.ndarray | None,
    defects: np.ndarray | None,
    crosstalk: Any,
    linearizer: Any,
) -> _IsrCalibs:
    """Check the calibration of every switched-on step and convert it to the kernel's arrays."""
    namp = len(amps)
    dummy = np.ones((1, 1), dtype=np.float32)
    bias_a = flat_a = dummy
    if cfg.do_bias:
        if bias is None:
            raise missing_calib("bias", "do_bias")
        bias_a = native_float32("bias", bias, tshape)
    if cfg.do_flat:
        if flat is None:
            raise missing_calib("flat", "do_flat")
        flat_a = native_float32("flat", flat, tshape)
    xt = np.zeros((namp, namp))
    if cfg.do_crosstalk:
        if crosstalk is None:
            raise missing_calib("crosstalk", "do_crosstalk")
        xt = crosstalk_matrix(crosstalk, amps)
        np.fill_diagonal(xt, 0.0)
        for v in range(namp):
            for s in range(namp):
                if xt[v, s] != 0.0 and amps[v].data_section.shape != amps[s].data_section.shape:
                    msg = (
                        f"crosstalk from amp {amps[s].name} to {amps[v].name} needs equal data shapes, got "
                        f"{amps[s].data_section.shape} and {amps[v].data_section.shape}; set isr.do_crosstalk=false"
                    )
                    raise InputError(msg)
    lut = dummy
    lut_row = np.zeros(namp, dtype=np.int64)
    lut_off = np.zeros(namp)
    if cfg.do_linearize:
        if linearizer is None:
            raise missing_calib("linearizer", "do_linearize")
        lut, lut_row, lut_off = linearizer_arrays(linearizer, amps)
    boxes = np.zeros((0, 4), dtype=np.int64)
    if cfg.do_defects:
        if defects is None:
            raise missing_calib("defects list", "do_defects", "defects")
        d = np.asarray(defects)
        if d.size == 0:
            d = d.reshape(0, 4)
        if d.ndim != 2 or d.shape[1] != 4 or d.dtype.kind not in "iu":
            msg = f"defects has shape {d.shape} and dtype {d.dtype}; expected integer (n, 4) x0, y0, width, height"
            raise InputError(msg)
        boxes = np.ascontiguousarray(d, dtype=np.int64)
    return _IsrCalibs(bias=bias_a, flat=flat_a, crosstalk=xt, lut=lut, lut_row=lut_row, lut_off=lut_off, boxes=boxes)


def _measure_overscans(raw_a: np.ndarray, amps: tuple[AmpParams, ...], cfg: IsrConfig) -> tuple[np.ndarray, np.ndarray]:
    """Serial overscan level per raw row (namp, ny_raw) and parallel level per column (namp, max width)."""
    namp = len(amps)
    ny_raw = raw_a.shape[0]
    wmax = max(a.data_section.shape[1] for a in amps)
    rowlevel = np.empty((namp, ny_raw))
    collevel = np.zeros((namp, wmax))
    for i, a in enumerate(amps):
        rowlevel[i] = serial_overscan(raw_a, a, cfg.overscan)
        p = a.parallel_overscan
        if cfg.overscan.do_parallel_overscan and p is not None:
            dsec = a.data_section
            k.parallel_overscan_columns(raw_a, rowlevel[i], p.y0, p.y1, dsec.x0, dsec.x1, collevel[i])
    return rowlevel, collevel


def _fused_pass(
    raw_a: np.ndarray,
    amps: tuple[AmpParams, ...],
    tshape: tuple[int, int],
    cfg: IsrConfig,
    cal: _IsrCalibs,
    rowlevel: np.ndarray,
    collevel: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run :func:`apfast.kernels.isr.isr_fused`: image, variance, mask, per-row counts and the amp geometry."""
    namp = len(amps)
    hmax = max(a.data_section.shape[0] for a in amps)
    geom = np.array(
        [
            [
                a.data_section.y0,
                a.data_section.x0,
                a.data_section.shape[0],
                a.data_section.shape[1],
                a.trimmed_section.y0,
                a.trimmed_section.x0,
                int(a.data_section.flip_x != a.trimmed_section.flip_x),
                int(a.data_section.flip_y != a.trimmed_section.flip_y),
                int(a.flip_x),
                int(a.flip_y),
            ]
            for a in amps
        ],
        dtype=np.int64,
    )
    elec = np.array(
        [[a.gain, a.read_noise, a.saturation, a.gain if cfg.do_apply_gains else 1.0] for a in amps], dtype=np.float64
    )
    bits = np.array([bitmask(n) for n in ("SAT", "BAD", "NO_DATA", "CROSSTALK", "SUSPECT")], dtype=np.int64)
    covered = sum(a.trimmed_section.shape[0] * a.trimmed_section.shape[1] for a in amps)
    if covered == tshape[0] * tshape[1]:
        image = np.empty(tshape, dtype=np.float32)  # the fused pass writes every pixel
        variance = np.empty(tshape, dtype=np.float32)
        mask = np.empty(tshape, dtype=np.int32)
    else:  # pixels no amp covers stay NaN with BAD|NO_DATA
        image = np.full(tshape, np.nan, dtype=np.float32)
        variance = np.full(tshape, np.nan, dtype=np.float32)
        mask = np.full(tshape, bitmask(["BAD", "NO_DATA"]), dtype=np.int32)
    counts = np.zeros((namp, hmax, 4), dtype=np.int64)
    k.isr_fused(
        raw_a, geom, elec, rowlevel, collevel, cal.crosstalk, float(cfg.crosstalk_min_pixel), bool(cfg.do_crosstalk),
        cal.bias, bool(cfg.do_bias), cal.flat, bool(cfg.do_flat), cal.lut, cal.lut_row, cal.lut_off,
        bool(cfg.do_linearize), bool(cfg.do_saturation), int(cfg.num_edge_suspect), bits, image, variance, mask,
        counts,
    )  # fmt: skip
    return image, variance, mask, counts, geom


def _rows_with_sat_or_bad(
    amps: tuple[AmpParams, ...], geom: np.ndarray, counts: np.ndarray, tshape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per trimmed row: did the fused pass find SAT (first) or non-finite (second) pixels there?"""
    row_sat = np.zeros(tshape[0], dtype=bool)
    row_bad = np.zeros(tshape[0], dtype=bool)
    for i, a in enumerate(amps):
        h = a.data_section.shape[0]
        ly = np.arange(h)
        ty = a.trimmed_section.y0 + (h - 1 - ly if geom[i, 7] else ly)
        row_sat[ty] |= counts[i, :h, 0] > 0
        row_bad[ty] |= counts[i, :h, 1] > 0
    return row_sat, row_bad


def _mask_defects_and_saturation(
    mask: np.ndarray,
    boxes: np.ndarray,
    counts: np.ndarray,
    row_sat: np.ndarray,
    row_bad: np.ndarray,
    tshape: tuple[int, int],
    cfg: IsrConfig,
) -> tuple[int, int, int, np.ndarray]:
    """Defects -> BAD, SAT grown and trails widened, in ``mask`` in place (``row_bad`` gains the defect rows).

    Returns the defect pixel count, the SAT counts before and after growth, and the rows with SAT after it.
    """
    n_defect = 0
    if boxes.shape[0]:
        n_defect = int(km.mask_boxes(mask, boxes, bitmask("BAD")))
        for _x0, y0, w, h in boxes:
            if w > 0 and h > 0:
                row_bad[max(y0, 0) : max(min(y0 + h, tshape[0]), 0)] = True
    n_sat_raw = int(counts[:, :, 0].sum())
    n_saturated = n_sat_raw
    sat_rows = np.flatnonzero(row_sat)
    trail_step = cfg.saturation_trail_step if cfg.do_widen_saturation_trails else 0
    if sat_rows.size and (cfg.sat_grow > 0 or trail_step > 0):
        scratch = np.empty((sat_rows.size, tshape[1]), dtype=np.uint8)
        sat_counts = np.zeros(tshape[0], dtype=np.int64)
        km.widen_saturation(
            mask, sat_rows.astype(np.int64), int(bitmask("SAT")), int(cfg.sat_grow), int(trail_step),
            int(cfg.saturation_trail_max), scratch, sat_counts,
        )  # fmt: skip
        n_saturated = int(sat_counts.sum())
        row_sat = sat_counts > 0
    return n_defect, n_sat_raw, n_saturated, row_sat


def _interpolate(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    row_sat: np.ndarray,
    row_bad: np.ndarray,
    n_saturated: int,
    tshape: tuple[int, int],
    cfg: IsrConfig,
) -> tuple[int, int]:
    """Fill the configured mask planes in place; return pixels interpolated and those filled with the median."""
    if not cfg.do_interpolate:
        return 0, 0
    planes = set(cfg.interpolate_mask_planes)
    interp_bits = bitmask(list(planes)) | bitmask("BAD")  # NaN pixels always carry BAD
    n_good = int(np.count_nonzero((mask & interp_bits) == 0))
    if n_good < _MIN_GOOD_FRACTION * mask.size:
        # nothing to interpolate from (and the gap searches would grow quadratically)
        msg = (
            f"ISR: only {n_good} of {mask.size} pixels are free of the {'/'.join(sorted(planes | {'BAD'}))} "
            f"mask planes (n_saturated={n_saturated}); the CCD is saturated, blank or bad everywhere: "
            f"check the exposure and its bias/flat, or set isr.do_interpolate=false"
        )
        raise AlgorithmError(msg, n_good=n_good, n_pixels=int(mask.size), n_saturated=int(n_saturated))
    if planes <= {"BAD", "SAT", "NO_DATA"}:
        need = np.zeros(tshape[0], dtype=bool)
        if planes & {"BAD", "NO_DATA"}:
            need |= row_bad
        if "SAT" in planes:
            need |= row_sat
        if "BAD" not in planes:
            need |= row_bad  # non-finite pixels must be filled in any case: be safe and visit them
        rows = np.flatnonzero(need).astype(np.int64)
    else:
        rows = np.arange(tshape[0], dtype=np.int64)
    icounts = np.zeros((rows.size, 2), dtype=np.int64)
    if rows.size:
        km.interpolate_masked(image, variance, mask, rows, int(interp_bits), int(bitmask("INTRP")), icounts)
    n_interp = int(icounts[:, 0].sum())
    n_fallback = int(icounts[:, 1].sum())
    if n_fallback:
        good = (mask & interp_bits) == 0
        if good.any():
            fill_i = float(np.median(image[good]))
            fill_v = float(np.median(variance[good]))
            left = ~np.isfinite(image) & ~good
            image[left] = fill_i
            variance[left] = fill_v
            mask[left] |= bitmask("INTRP")
            n_interp += int(left.sum())
        log.warning(
            "ISR: %d masked pixels had no unmasked neighbour in their row or column; filled with the "
            "image median",
            n_fallback,
        )
    return n_interp, n_fallback


def _isr_metadata(
    amps: tuple[AmpParams, ...],
    cfg: IsrConfig,
    rowlevel: np.ndarray,
    collevel: np.ndarray,
    counts: np.ndarray,
    timings: dict[str, float],
    *,
    n_sat_raw: int,
    n_saturated: int,
    n_defect: int,
    n_interp: int,
    n_fallback: int,
) -> dict[str, Any]:
    """``IsrResult.metadata``: overscan summaries per amp, pixel counts and the step timings."""
    data_rows = [rowlevel[i, a.data_section.y0 : a.data_section.y1] for i, a in enumerate(amps)]
    return {
        "overscan_fit_type": cfg.overscan.fit_type,
        "overscan_mean": {a.name: float(np.mean(r)) for a, r in zip(amps, data_rows, strict=True)},
        "overscan_std": {a.name: float(np.std(r)) for a, r in zip(amps, data_rows, strict=True)},
        "parallel_overscan_mean": {a.name: float(np.mean(collevel[i])) for i, a in enumerate(amps)},
        "n_saturated_raw": n_sat_raw,
        "n_saturated": n_saturated,
        "n_nonfinite_or_bad_flat": int(counts[:, :, 1].sum()),
        "n_linearity_out_of_range": int(counts[:, :, 2].sum()),
        "n_crosstalk_masked": int(counts[:, :, 3].sum()),
        "n_defect_pixels": n_defect,
        "n_interpolated": n_interp,
        "n_interpolation_fallback": n_fallback,
        "timings": timings,
    }
