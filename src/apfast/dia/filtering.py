"""Reject DIA sources that are artefacts before association (Rubin's DIA-source filtering).

Rubin's prompt processing drops detections on flagged pixels, on diffraction spikes of
bright stars and on known satellites before they reach the APDB; the rest are scored by
a reliability model. :func:`filter_dia_sources` does the same here, per CCD-visit, with
each rule counted and every rejected source kept (the caller writes them as
``deepDiff_diaSrcRejected`` with the reason), never silently lost:

``flags``
    The source centre sits on a pixel that cannot hold a trustworthy difference: a
    cosmic ray, a saturated or no-data pixel of the difference, an interpolated or
    suspect (ISR's edge band, non-linear or defect-adjacent) pixel of the *science*
    image, the CCD edge (``EDGE`` plane or a footprint touching the border) or off the
    image. The template's ``INTRP`` and ``SUSPECT`` are left out on purpose: coadding
    ORs them in from any input (the edge bands of every dithered template visit) and
    warping spreads them, so they cover real transients (on simulated DECam data they
    rejected 4% of bright injected fakes while removing ~0.3 false sources per CCD-visit).
``static``
    The residual of a bright static source: the template holds a source brighter than
    ``static_min_flux`` at the position and the difference flux is a small fraction
    (``static_fraction``) of it. PSF-matching leaves residuals of a few percent at
    bright stars and galaxy cores, which are the largest class of false detections on
    simulated DECam data; the price is that a variable star changing by less than that
    fraction is not kept (measured: 8 of 949 simulated transients, all variable stars of
    the smallest amplitudes).
``spike``
    On a diffraction spike or bleed trail of a reference-catalogue star brighter than
    ``spike_mag_limit``: a cross of half-length ``spike_length_px`` x 10^(-0.4 (m - m0))^0.5
    along the detector axes (DECam's spider vanes), and the star's column (bleed) where
    the star is saturated. Off unless a reference catalogue is passed.

Noise peaks whose shape is inconsistent with the PSF are left to the reliability score
(:mod:`apfast.dia.reliability`, whose PSF-fit chi^2 and peak-fraction features see the pixels): a hard
rule on the adaptive moments was measured and dropped, since at S/N < 7 the moments are too noisy
(on simulated DECam data, size ratio outside 0.35-3.5 rejected 5 real sources for 3 false ones).

All rules read columns :func:`apfast.dia.diasource.run_dia_detection` writes plus the
difference and science masks; nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast.exposure import Exposure
from apfast.masks import bitmask

__all__ = ["REASONS", "DiaFilterConfig", "FilterResult", "filter_dia_sources"]

#: Rejection reasons in the order they are tested (a source gets the first that applies).
REASONS: tuple[str, ...] = ("flags", "static", "spike")

Columns = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True, kw_only=True)
class DiaFilterConfig(ConfigSection):
    """DIA-source filtering before association: flagged pixels, static-source residuals, spikes (``dia_filter``)."""

    _key_prefix: ClassVar[str] = "dia_filter."

    do_filter: bool = opt(True, "Reject artefacts before association (each rule counted; rejects kept in "
                                "deepDiff_diaSrcRejected).")
    centre_planes: tuple[str, ...] = opt(
        ("CR", "SAT", "NO_DATA", "EDGE"),
        "Mask planes of the difference that reject a source whose centre pixel carries them.",
    )
    science_centre_planes: tuple[str, ...] = opt(
        ("INTRP", "SUSPECT"),
        "Mask planes of the science image (calexp) that reject a source whose centre pixel carries them "
        "(the template's INTRP/SUSPECT are not used: coadding and warping spread them over real transients).",
    )
    reject_border: bool = opt(True, "Reject sources whose footprint touches the CCD border or lies off the image.")
    static_fraction: float = opt(
        0.03,
        "Reject a source whose |difference flux| is below this fraction of the template flux at its position "
        "(residual of a bright static source); 0 turns the rule off.",
    )
    static_min_flux: float = opt(
        3.0e4, "Template flux (nJy) above which the static-residual rule applies (3e4 nJy: AB 20.2)."
    )
    spike_mag_limit: float = opt(
        14.0, "Reference stars brighter than this (AB, the band's magnitude) get spike and bleed masks."
    )
    spike_length_px: float = opt(
        60.0, "Half-length (pixels) of the spike cross of a star at spike_mag_limit; scales as flux^0.5."
    )
    spike_width_px: float = opt(4.0, "Half-width (pixels) of the spike and bleed masks.")

    def _validate(self) -> None:
        from apfast.masks import MASK_BITS

        for name in ("centre_planes", "science_centre_planes"):
            unknown = [p for p in getattr(self, name) if p not in MASK_BITS]
            if unknown:
                self._fail(name, getattr(self, name), f"unknown mask planes {unknown}; known: {tuple(MASK_BITS)}")
        if not (0.0 <= self.static_fraction < 1.0):
            self._fail("static_fraction", self.static_fraction, "use a fraction in [0, 1), e.g. 0.03 (0 = off)")
        for name in ("static_min_flux", "spike_length_px", "spike_width_px"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                self._fail(name, v, "use a finite number >= 0")
        if not math.isfinite(self.spike_mag_limit):
            self._fail("spike_mag_limit", self.spike_mag_limit, "use a finite AB magnitude, e.g. 14")


@dataclass(slots=True)
class FilterResult:
    """What :func:`filter_dia_sources` kept and rejected.

    Attributes
    ----------
    keep : ndarray, bool, shape (n,)
        Sources that go on to association.
    reason : ndarray, str, shape (n,)
        ``''`` for kept sources, else the first rule of :data:`REASONS` that rejected it.
    counts : dict of str to int
        Rejected sources per rule (every rule present, zeros included).
    """

    keep: np.ndarray
    reason: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_rejected(self) -> int:
        return int((~self.keep).sum())


def _centre_bits(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask value at the nearest pixel of each position (0 off the image)."""
    ny, nx = mask.shape
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    out = np.zeros(len(x), np.int64)
    out[on] = mask[iy[on], ix[on]]
    return out


def _spike_hits(x: np.ndarray, y: np.ndarray, stars: Columns, cfg: DiaFilterConfig) -> np.ndarray:
    """Sources on the spike cross or bleed column of a bright star (pixel positions in ``stars``)."""
    hit = np.zeros(len(x), bool)
    sx = np.asarray(stars.get("x", []), float)
    sy = np.asarray(stars.get("y", []), float)
    mag = np.asarray(stars.get("mag", []), float)
    if len(x) == 0 or sx.size == 0:
        return hit
    bright = np.isfinite(mag) & (mag < cfg.spike_mag_limit)
    w = cfg.spike_width_px
    for xs, ys, m in zip(sx[bright], sy[bright], mag[bright], strict=True):
        half = cfg.spike_length_px * 10.0 ** (-0.2 * (m - cfg.spike_mag_limit))
        dx, dy = x - xs, y - ys
        on_h = (np.abs(dy) <= w) & (np.abs(dx) <= half)
        on_v = (np.abs(dx) <= w) & (np.abs(dy) <= 2.0 * half)  # spike plus the bleed along the columns
        hit |= on_h | on_v
    return hit


def filter_dia_sources(
    sources: Columns,
    difference: Exposure,
    science: Exposure,
    *,
    config: DiaFilterConfig | None = None,
    stars: Columns | None = None,
) -> FilterResult:
    """Decide which DIA sources of one CCD-visit are artefacts (see the module docstring).

    Parameters
    ----------
    sources : dict of str to ndarray
        DIA-source columns with at least ``x``, ``y``, ``psfFlux`` and ``templateFlux`` (nJy),
        ``pixelFlags_edge`` and ``pixelFlags_offimage``.
    difference, science : Exposure
        The difference image and the calexp it was made from (masks are read, not changed).
    config : DiaFilterConfig, optional
    stars : dict of str to ndarray, optional
        Reference stars on this CCD: ``x``, ``y`` (difference pixels) and ``mag`` (AB, this band).
        Without it the spike rule does nothing.

    Returns
    -------
    FilterResult
    """
    cfg = config if config is not None else DiaFilterConfig()
    n = len(np.asarray(sources.get("x", [])))
    reason = np.full(n, "", dtype=object)
    counts = dict.fromkeys(REASONS, 0)
    if not cfg.do_filter or n == 0:
        return FilterResult(np.ones(n, bool), reason.astype(str), counts)
    x = np.asarray(sources["x"], float)
    y = np.asarray(sources["y"], float)

    flagged = np.zeros(n, bool)
    if cfg.centre_planes and difference.mask is not None:
        flagged |= (_centre_bits(difference.mask, x, y) & bitmask(cfg.centre_planes)) != 0
    if cfg.science_centre_planes and science.mask is not None:
        flagged |= (_centre_bits(science.mask, x, y) & bitmask(cfg.science_centre_planes)) != 0
    if cfg.reject_border:
        for col in ("pixelFlags_edge", "pixelFlags_offimage"):
            if col in sources:
                flagged |= np.asarray(sources[col], bool)

    static = np.zeros(n, bool)
    if cfg.static_fraction > 0 and "templateFlux" in sources:
        tf = np.asarray(sources["templateFlux"], float)
        df = np.abs(np.asarray(sources["psfFlux"], float))
        with np.errstate(invalid="ignore"):
            static = np.isfinite(tf) & (tf > cfg.static_min_flux) & (df < cfg.static_fraction * tf)

    spike = _spike_hits(x, y, stars, cfg) if stars is not None else np.zeros(n, bool)

    for name, hit in zip(REASONS, (flagged, static, spike), strict=True):
        new = hit & (reason == "")
        reason[new] = name
        counts[name] = int(new.sum())
    return FilterResult(reason == "", reason.astype(str), counts)
