"""Amp-to-amp background offsets of an ISR-corrected CCD (Rubin's ``AmpOffsetTask``).

After ISR every amplifier of a CCD should sit on the same sky. A wrong bias or overscan
leaves an *additive* step at the boundary between two amps; a flat field made in ADU
(so it contains the amps' gain ratios) while ISR applies the gains leaves a
*multiplicative* one, a fixed fraction of the sky (about 6% for DECam's two amps). A step
the background model does not follow becomes a line of false DIA sources along the
boundary.

:func:`measure_amp_offsets` takes a strip of ``strip_width`` columns (or rows) on each
side of every shared amp boundary, drops masked pixels and sources (a ``n_sigma``
clip about the strip's median), and compares the two sides bin by bin along the
boundary (``bin_size`` pixels); the step is the median over the bins of the difference of
the two sides' medians, its error 1.25 x the bins' robust scatter / sqrt(bins). The
per-amp pedestals that remove the steps in the least-squares sense (their mean fixed at
zero) are the correction. A step larger than ``warn_fraction`` of the sky (or
``warn_sigma`` of its error) is reported, with the likely cause: multiplicative when the
step is a fixed fraction of the sky (the flat), additive otherwise (bias/overscan).

No I/O; the pipeline logs the warning and, with ``do_correct``, subtracts the pedestals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast._constants import MAD_TO_SIGMA
from apfast.camera import Section
from apfast.masks import bitmask

__all__ = ["AmpOffsetConfig", "AmpOffsetResult", "AmpStep", "measure_amp_offsets"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AmpOffsetConfig(ConfigSection):
    """Background steps between the amps of a CCD: measured, warned about, optionally removed (``amp_offset``)."""

    _key_prefix: ClassVar[str] = "amp_offset."

    do_measure: bool = opt(True, "Measure the background step at every boundary between two amps after ISR.")
    do_correct: bool = opt(
        True, "Subtract per-amp pedestals that remove the measured steps (additive; the sky then matches)."
    )
    strip_width: int = opt(40, "Columns (rows) on each side of a boundary used to compare the amps (>= 4).")
    bin_size: int = opt(128, "Length (pixels) of the bins along the boundary compared one by one (>= 8).")
    n_sigma: float = opt(3.0, "Pixels this many robust sigma from a strip's median (sources) are left out (> 0).")
    warn_fraction: float = opt(
        0.005, "Warn when a step exceeds this fraction of the sky level (0.005: 0.5%) and warn_sigma of its error."
    )
    warn_sigma: float = opt(5.0, "Warn only when a step is also this many times its measurement error.")

    def _validate(self) -> None:
        if self.strip_width < 4:
            self._fail("strip_width", self.strip_width, "use at least 4 columns, e.g. 40")
        if self.bin_size < 8:
            self._fail("bin_size", self.bin_size, "use at least 8 pixels, e.g. 128")
        for name in ("n_sigma", "warn_fraction", "warn_sigma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                self._fail(name, v, "use a finite number > 0")


@dataclass(frozen=True, slots=True)
class AmpStep:
    """The background step across one boundary: ``level(second) - level(first)`` in image units."""

    first: str
    second: str
    step: float
    error: float
    sky: float
    n_bins: int

    @property
    def fraction(self) -> float:
        """The step as a fraction of the sky at the boundary (NaN without sky)."""
        return self.step / self.sky if self.sky > 0 else math.nan


@dataclass(slots=True)
class AmpOffsetResult:
    """Steps at every shared boundary, per-amp pedestals that remove them, and the warnings to log."""

    steps: list[AmpStep] = field(default_factory=list)
    pedestals: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _row_medians(v: np.ndarray) -> np.ndarray:
    """Median of the finite values of each row (NaN where none); one sort, NaNs sort last."""
    srt = np.sort(v, axis=1)
    n = np.isfinite(srt).sum(axis=1)
    rows = np.arange(v.shape[0])
    lo, hi = np.maximum((n - 1) // 2, 0), np.maximum(n // 2, 0)
    out = 0.5 * (srt[rows, lo] + srt[rows, np.minimum(hi, v.shape[1] - 1)])
    out[n == 0] = np.nan
    return out


def _clipped_medians(v: np.ndarray, n_sigma: float) -> np.ndarray:
    """Per row of ``v`` (NaN = excluded): the median after one ``n_sigma`` clip about the median (NaN if < 8)."""
    with np.errstate(invalid="ignore"):
        med = _row_medians(v)
        dev = np.abs(v - med[:, None])
        sig = MAD_TO_SIGMA * _row_medians(dev)
        clipped = np.where((dev <= n_sigma * sig[:, None]) | ~(sig[:, None] > 0), v, np.nan)
        out = _row_medians(clipped)
    out[np.isfinite(v).sum(axis=1) < 8] = np.nan
    return out


def _boundary(a: Section, b: Section) -> tuple[str, int, int, int] | None:
    """``('x'|'y', position, start, stop)`` of the edge ``a`` and ``b`` share, or None."""
    if a.x1 == b.x0 or b.x1 == a.x0:
        lo, hi = max(a.y0, b.y0), min(a.y1, b.y1)
        if hi - lo > 0:
            return "x", a.x1 if a.x1 == b.x0 else a.x0, lo, hi
    if a.y1 == b.y0 or b.y1 == a.y0:
        lo, hi = max(a.x0, b.x0), min(a.x1, b.x1)
        if hi - lo > 0:
            return "y", a.y1 if a.y1 == b.y0 else a.y0, lo, hi
    return None


def _measure_step(image: np.ndarray, mask: np.ndarray, bad_bits: int, axis: str, pos: int, lo: int, hi: int,
                  a_first: bool, cfg: AmpOffsetConfig) -> tuple[float, float, float, int]:
    w = cfg.strip_width
    img = image if axis == "x" else image.T
    msk = mask if axis == "x" else mask.T
    nb = (hi - lo) // cfg.bin_size
    if nb < 1:
        return math.nan, math.nan, math.nan, 0
    stop = lo + nb * cfg.bin_size

    def side(c0: int, c1: int) -> np.ndarray:
        v = np.where((msk[lo:stop, c0:c1] & bad_bits) != 0, np.nan, img[lo:stop, c0:c1]).astype(np.float64)
        return _clipped_medians(v.reshape(nb, -1), cfg.n_sigma)

    ml, mr = side(max(pos - w, 0), pos), side(pos, pos + w)
    ok = np.isfinite(ml) & np.isfinite(mr)
    if not ok.any():
        return math.nan, math.nan, math.nan, 0
    d = (mr - ml)[ok]
    step = float(np.median(d))
    scatter = MAD_TO_SIGMA * float(np.median(np.abs(d - step))) if d.size > 2 else math.nan
    err = 1.2533 * scatter / math.sqrt(d.size) if d.size > 2 else math.nan
    sky = float(np.median(0.5 * (ml + mr)[ok]))
    # the boundary's left/lower side belongs to the amp listed first only if a_first
    return (step if a_first else -step), err, sky, int(d.size)


def measure_amp_offsets(
    image: np.ndarray,
    mask: np.ndarray,
    amps: dict[str, Section],
    *,
    config: AmpOffsetConfig | None = None,
) -> AmpOffsetResult:
    """Measure the background step at every boundary two amps share (see the module docstring).

    Parameters
    ----------
    image : ndarray, float32, shape (ny, nx)
        The ISR-corrected CCD, sky included (the sky level tells a multiplicative step from an
        additive one).
    mask : ndarray, int32, shape (ny, nx)
        Its mask; BAD, SAT, CR, INTRP, SUSPECT, NO_DATA, EDGE and DETECTED pixels are left out.
    amps : dict of str to Section
        Each amp's trimmed section (0-based, end-exclusive), in amp order.
    config : AmpOffsetConfig, optional

    Returns
    -------
    AmpOffsetResult
        ``pedestals[name]`` is what to subtract from that amp's pixels.
    """
    cfg = config if config is not None else AmpOffsetConfig()
    res = AmpOffsetResult(pedestals=dict.fromkeys(amps, 0.0))
    names = list(amps)
    if not cfg.do_measure or len(names) < 2:
        return res
    bad_bits = bitmask(["BAD", "SAT", "CR", "INTRP", "SUSPECT", "NO_DATA", "EDGE", "DETECTED"])
    rows: list[tuple[int, int, float]] = []
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            edge = _boundary(amps[a], amps[b])
            if edge is None:
                continue
            axis, pos, lo, hi = edge
            a_low = (amps[a].x0 < pos) if axis == "x" else (amps[a].y0 < pos)
            step, err, sky, nb = _measure_step(image, mask, bad_bits, axis, pos, lo, hi, a_low, cfg)
            if not math.isfinite(step):
                continue
            st = AmpStep(a, b, step, err, sky, nb)
            res.steps.append(st)
            rows.append((i, j, step))
            frac = st.fraction
            big = abs(step) > cfg.warn_sigma * (err if math.isfinite(err) else 0.0)
            if big and math.isfinite(frac) and abs(frac) > cfg.warn_fraction:
                cause = (
                    "the step is a fixed fraction of the sky, as a flat field that contains the amps' gain ratios "
                    "(made in ADU) leaves it when ISR also applies the gains: set isr.do_apply_gains=false, or "
                    "remake the flat from gain-corrected (electron) frames"
                    if abs(frac) > 0.02
                    else "a bias or overscan level differs between the amps: check the bias and the overscan fit"
                )
                nsig = abs(step) / err if err and math.isfinite(err) else math.inf
                res.warnings.append(
                    f"amps {a} and {b}: background step {step:+.2f} ({100 * frac:+.1f}% of the sky, "
                    f"{nsig:.0f} sigma); likely cause: {cause}"
                )
    if rows:
        # least-squares pedestals p: p[b] - p[a] = step for every boundary, mean(p) = 0
        m = np.zeros((len(rows) + 1, len(names)))
        rhs = np.zeros(len(rows) + 1)
        for k, (i, j, s) in enumerate(rows):
            m[k, j], m[k, i], rhs[k] = 1.0, -1.0, s
        m[-1, :] = 1.0
        p = np.linalg.lstsq(m, rhs, rcond=None)[0]
        res.pedestals = {n: float(v) for n, v in zip(names, p, strict=True)}
    return res
