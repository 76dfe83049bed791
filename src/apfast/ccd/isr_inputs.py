"""Input checks and the serial-overscan fit for :func:`apfast.ccd.isr.run_isr` (split out to keep modules small)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from apfast._constants import MAD_TO_SIGMA
from apfast.camera import Section
from apfast.errors import CalibrationError, InputError
from apfast.kernels import isr as k

if TYPE_CHECKING:
    from apfast.ccd.isr import AmpParams, OverscanConfig

__all__ = [
    "check_section",
    "crosstalk_matrix",
    "linearizer_arrays",
    "missing_calib",
    "native_float32",
    "prepare_raw",
    "serial_overscan",
]


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def native_float32(name: str, arr: Any, shape: tuple[int, int]) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != tuple(shape):
        msg = f"{name} has shape {a.shape} but the trimmed CCD is {tuple(shape)}; use the {name} of this detector"
        raise InputError(msg)
    if a.dtype.kind not in "fiu":
        msg = f"{name} has dtype {a.dtype}; give a numeric array (float32 preferred)"
        raise InputError(msg)
    return np.ascontiguousarray(a, dtype=np.float32)


def prepare_raw(raw: Any) -> np.ndarray:
    """Native uint16 or float32, C-contiguous; other dtypes and byte orders converted once."""
    a = np.asarray(raw)
    if a.ndim != 2:
        msg = f"raw has shape {a.shape}; give one 2-d CCD frame (rows, columns) including the overscans"
        raise InputError(msg)
    if a.dtype.kind not in "fiu":
        msg = f"raw has dtype {a.dtype}; give a numeric array (uint16 as read from the file is fine)"
        raise InputError(msg)
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        # uint16 (either byte order) stays integer: half the memory traffic of float32
        return np.ascontiguousarray(a, dtype=np.uint16)
    return np.ascontiguousarray(a, dtype=np.float32)


def check_section(amp: AmpParams, what: str, sec: Section, shape: tuple[int, int], where: str) -> None:
    if sec.y0 < 0 or sec.x0 < 0 or sec.y1 > shape[0] or sec.x1 > shape[1] or sec.y1 <= sec.y0 or sec.x1 <= sec.x0:
        msg = (
            f"amp {amp.name} {what} {sec.to_fits()} lies outside the {where} of shape {shape}; "
            "check the header sections against the array"
        )
        raise InputError(msg)


def crosstalk_matrix(crosstalk: Any, amps: Sequence[AmpParams]) -> np.ndarray:
    names = [a.name for a in amps]
    coeffs = getattr(crosstalk, "coeffs", crosstalk)
    m = np.asarray(coeffs, dtype=np.float64)
    amp_names = getattr(crosstalk, "amp_names", None)
    if amp_names is not None and m.ndim == 2:
        order = []
        for n in names:
            if n not in amp_names:
                msg = f"crosstalk has amps {tuple(amp_names)} but the raw has amp {n!r}; use this camera's crosstalk"
                raise CalibrationError(msg)
            order.append(list(amp_names).index(n))
        m = m[np.ix_(order, order)]
    if m.shape != (len(amps), len(amps)) or not np.all(np.isfinite(m)):
        msg = (
            f"crosstalk matrix has shape {m.shape} (or non-finite values); expected finite ({len(amps)}, "
            f"{len(amps)}) [victim, source] in amp order {names}"
        )
        raise CalibrationError(msg)
    return np.ascontiguousarray(m)


def linearizer_arrays(linearizer: Any, amps: Sequence[AmpParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(lut float32 (nrow, ncol), row int64 (namp,), offset float64 (namp,))``."""
    if hasattr(linearizer, "lut") and hasattr(linearizer, "amp"):
        lut = np.asarray(linearizer.lut)
        rows, offs = [], []
        for a in amps:
            try:
                la = linearizer.amp(a.name)
            except KeyError as exc:
                raise CalibrationError(str(exc.args[0])) from None
            if str(getattr(la, "linearity_type", "LookupTable")) not in ("LookupTable", "None"):
                msg = f"linearizer amp {a.name} has type {la.linearity_type!r}; only LookupTable is supported"
                raise CalibrationError(msg)
            rows.append(int(la.row))
            offs.append(float(la.offset))
    elif isinstance(linearizer, (tuple, list)) and len(linearizer) == 2:
        lut = np.asarray(linearizer[0])
        rows = list(range(len(amps)))
        offs = [float(x) for x in np.atleast_1d(np.asarray(linearizer[1], dtype=np.float64))]
        if lut.ndim != 2 or lut.shape[0] != len(amps) or len(offs) != len(amps):
            msg = (
                f"linearizer (lut_rows, offsets) has lut shape {lut.shape} and {len(offs)} offsets; "
                f"expected one table row and one offset per amp ({len(amps)})"
            )
            raise CalibrationError(msg)
    else:
        msg = (
            f"linearizer of type {type(linearizer).__name__} is not understood; give an apfast.repo.calib_formats."
            "Linearizer or a (lut_rows (namp, ncol), offsets (namp,)) tuple"
        )
        raise CalibrationError(msg)
    if lut.ndim != 2 or lut.shape[1] < 1 or not np.all(np.isfinite(lut)):
        msg = f"linearizer table has shape {lut.shape} or non-finite entries; expected a finite (nrow, ncol) table"
        raise CalibrationError(msg)
    row = np.asarray(rows, dtype=np.int64)
    if np.any(row < 0) or np.any(row >= lut.shape[0]):
        msg = f"linearizer amp rows {row.tolist()} are outside its table of {lut.shape[0]} rows; the file is corrupt"
        raise CalibrationError(msg)
    return np.ascontiguousarray(lut, dtype=np.float32), row, np.asarray(offs, dtype=np.float64)


def missing_calib(calib: str, key: str, arg: str | None = None) -> CalibrationError:
    msg = f"ISR needs a {calib} but none was given; pass {arg or calib}= or set isr.{key}=false to skip the step"
    return CalibrationError(msg)


# --------------------------------------------------------------------------------------------------
# Overscan
# --------------------------------------------------------------------------------------------------


def _clipped_polyfit(y: np.ndarray, values: np.ndarray, order: int, n_sigma: float, n_iter: int) -> np.ndarray:
    """Coefficients of a polynomial in ``y`` fitted to ``values``, rejecting > n_sigma robust-sigma outliers."""
    good = np.isfinite(values)
    coef = np.zeros(order + 1)
    for _ in range(n_iter + 1):
        if good.sum() <= order:
            msg = f"overscan POLY fit has {int(good.sum())} usable rows for degree {order}; lower isr.overscan.order"
            raise CalibrationError(msg)
        coef = np.polynomial.polynomial.polyfit(y[good], values[good], order)
        resid = values - np.polynomial.polynomial.polyval(y, coef)
        sigma = MAD_TO_SIGMA * np.median(np.abs(resid[good]))
        if not sigma > 0:
            break
        new = np.isfinite(values) & (np.abs(resid) <= n_sigma * sigma)
        if np.array_equal(new, good):
            break
        good = new
    return coef


def serial_overscan(raw: np.ndarray, amp: AmpParams, cfg: OverscanConfig) -> np.ndarray:
    """Level (ADU) to subtract from every raw row of ``amp``, float64 shape (ny_raw,)."""
    ny = raw.shape[0]
    b = amp.bias_section
    fit = cfg.fit_type
    if fit in ("MEDIAN_PER_ROW", "POLY"):
        rows = np.empty(ny, dtype=np.float64)
        k.overscan_row_medians(raw, b.x0, b.x1, rows)
        if fit == "POLY":
            y = (np.arange(ny, dtype=np.float64) - 0.5 * (b.y0 + b.y1)) / max(b.y1 - b.y0, 1)
            coef = _clipped_polyfit(y[b.y0 : b.y1], rows[b.y0 : b.y1], cfg.order, cfg.n_sigma_clip, cfg.n_clip_iter)
            rows = np.polynomial.polynomial.polyval(y, coef)
    elif fit == "MEDIAN":
        rows = np.full(ny, k.region_median(raw, b.y0, b.y1, b.x0, b.x1))
    else:  # MEAN_CLIP
        rows = np.full(ny, k.region_clipped_mean(raw, b.y0, b.y1, b.x0, b.x1, cfg.n_sigma_clip, cfg.n_clip_iter))
    bad = ~np.isfinite(rows)
    if bad.all():
        msg = f"amp {amp.name}: the overscan {b.to_fits()} has no finite pixel; check the raw file and BIASSEC"
        raise InputError(msg)
    if bad.any():
        rows[bad] = np.median(rows[~bad])
    return rows


