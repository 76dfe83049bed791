"""Rescale the variance plane to the measured sky noise (Rubin's ``ScaleVarianceTask``; no I/O).

A variance plane built from a gain and a read noise (a calibrated image without a weight map,
such as a ZTF ``sciimg``) misses every noise source the two numbers leave out: flat-field
noise, resampling or compression (fpack quantisation), the calibration's own errors. On the ZTF
quadrant in ``tests/data/real`` the sky's robust variance is 1.22x what that variance says (noise
1.10x), so every S/N and flux error would be 10% too optimistic, and a variance-based 5-sigma
threshold on a difference image would really be 4.5 sigma.

:func:`measure_variance_scale` measures the ratio of the sky's robust variance to the
variance plane on background-subtracted pixels free of sources and bad pixels:
``ratio = (0.7413 IQR(image / sqrt(variance)))^2``, the squared robust width of the pulls
(Rubin's ``imageBased`` estimate; for a sky-limited image it equals its ``pixelBased``
``(0.7413 IQR(image))^2 / median(variance)``). The interquartile range ignores the faint
sources left in the sample and the cosmic rays not yet found. :func:`scale_variance` multiplies the
variance by the ratio when it is further than ``tolerance`` from 1 and within ``max_ratio``.

Which variance planes are rescaled is ``characterize.scale_variance.apply``:
:func:`apfast.ccd.characterize.run_characterize` is told where its variance came from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast.ccd.detection import validate_planes
from apfast.masks import bitmask

__all__ = ["VarianceScale", "ScaleVarianceConfig", "VarianceSource", "measure_variance_scale", "scale_variance"]

log = logging.getLogger(__name__)

#: Where a variance plane came from: ISR (raws), a calibrated image's weight map, or its gain and read noise.
VarianceSource = Literal["isr", "weight", "gain"]

#: ``sigma = IQR_TO_SIGMA * (q75 - q25)`` for a Gaussian.
IQR_TO_SIGMA = 0.7413


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleVarianceConfig(ConfigSection):
    """Rescaling of the variance plane to the measured sky noise (``characterize.scale_variance``)."""

    _key_prefix: ClassVar[str] = "characterize.scale_variance."

    apply: Literal["gain", "calibrated", "always", "never"] = opt(
        "gain",
        "Which variance planes are measured and rescaled.",
        choices={
            "gain": "calibrated images whose variance comes from the gain and read noise (no weight map), "
                    "which leave out flat-field and compression noise",
            "calibrated": "every calibrated image, weight-map variances too (a survey's weight map "
                          "usually comes from its measured sky noise already)",
            "always": "raws as well (ISR's variance from gain, read noise and the flat)",
            "never": "keep every variance plane as it was built",
        },
    )
    tolerance: float = opt(
        0.05, "Leave the variance alone when the measured ratio (sky variance / variance plane) is within 1 +- this."
    )
    max_ratio: float = opt(
        10.0,
        "A ratio above this or below its inverse is not applied (a warning instead): a wrong gain or units, "
        "not missing noise (Rubin's ScaleVarianceTask limit).",
    )
    mask_planes: tuple[str, ...] = opt(
        ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "CR", "INTRP", "EDGE", "SUSPECT", "NO_DATA"),
        "Pixels with any of these planes are left out of the measurement.",
    )
    min_pixels: int = opt(1000, "Fewest usable pixels to measure the ratio on; fewer: the variance is kept.")

    def _validate(self) -> None:
        self._check_ranges([
            ("tolerance", math.isfinite(self.tolerance) and 0 <= self.tolerance < 1, "a number in [0, 1)"),
            ("max_ratio", math.isfinite(self.max_ratio) and self.max_ratio > 1, "a number > 1 (Rubin: 10)"),
            ("min_pixels", self.min_pixels >= 10, "an integer >= 10"),
        ])
        validate_planes(self.mask_planes, f"{self._prefix}mask_planes")

    def applies_to(self, source: VarianceSource) -> bool:
        """Whether a variance plane from ``source`` is measured and rescaled under :attr:`apply`.

        Examples
        --------
        >>> cfg = ScaleVarianceConfig()
        >>> cfg.applies_to("gain"), cfg.applies_to("weight"), cfg.applies_to("isr")
        (True, False, False)
        """
        allowed = {"gain": ("gain",), "calibrated": ("gain", "weight"), "always": ("gain", "weight", "isr"),
                   "never": ()}[self.apply]
        return source in allowed


@dataclass(frozen=True, slots=True)
class VarianceScale:
    """The measured ratio, the factor applied to the variance (1 when not applied) and why."""

    ratio: float
    factor: float
    n_pixels: int
    reason: str

    @property
    def applied(self) -> bool:
        """True when the variance plane was multiplied by :attr:`factor`."""
        return self.factor != 1.0

    def header_cards(self) -> dict[str, tuple[float, str]]:
        """``VARRATIO`` (measured, omitted when not measurable) and ``VARSCALE`` (applied) calexp header cards."""
        cards: dict[str, tuple[float, str]] = {}
        if math.isfinite(self.ratio):
            cards["VARRATIO"] = (round(self.ratio, 5), "sky variance / variance plane, measured")
        cards["VARSCALE"] = (round(self.factor, 5), "variance plane multiplied by this")
        return cards


def measure_variance_scale(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *, config: ScaleVarianceConfig | None = None
) -> VarianceScale:
    """Measure the sky-to-variance ratio of a background-subtracted image; inputs are not modified.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted pixels and their variance (same units squared).
    mask : ndarray (ny, nx) of int
        Mask planes; pixels with ``config.mask_planes`` (sources, bad pixels) are left out, as are
        pixels with non-positive or non-finite variance.
    config : ScaleVarianceConfig, optional

    Returns
    -------
    VarianceScale
        ``factor`` is the ratio when it is outside ``1 +- tolerance`` and within ``max_ratio``,
        else 1 (``reason`` says which).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(0, 2.0, (200, 200)).astype(np.float32)  # sky noise 2, variance plane says 1
    >>> vs = measure_variance_scale(img, np.ones_like(img), np.zeros(img.shape, np.int32))
    >>> round(vs.ratio, 1), vs.factor == vs.ratio
    (4.0, True)
    """
    cfg = config or ScaleVarianceConfig()
    img = np.asarray(image)
    var = np.asarray(variance)
    bad = (np.asarray(mask) & bitmask(cfg.mask_planes)) != 0
    with np.errstate(invalid="ignore"):
        good = ~bad & (var > 0) & np.isfinite(var) & np.isfinite(img)
    n = int(np.count_nonzero(good))
    if n < cfg.min_pixels:
        return VarianceScale(math.nan, 1.0, n, f"only {n} usable sky pixels (need {cfg.min_pixels})")
    pull = img[good].astype(np.float64) / np.sqrt(var[good].astype(np.float64))
    q25, q75 = np.percentile(pull, [25.0, 75.0])
    ratio = float((IQR_TO_SIGMA * (q75 - q25)) ** 2)
    if not (math.isfinite(ratio) and 1.0 / cfg.max_ratio <= ratio <= cfg.max_ratio):
        return VarianceScale(ratio, 1.0, n, f"ratio {ratio:.4g} is beyond max_ratio = {cfg.max_ratio:g}; "
                                            "check the gain and the image units")
    if abs(ratio - 1.0) <= cfg.tolerance:
        return VarianceScale(ratio, 1.0, n, f"within the tolerance {cfg.tolerance:g}")
    return VarianceScale(ratio, ratio, n, "applied")


def scale_variance(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *, config: ScaleVarianceConfig | None = None
) -> tuple[np.ndarray, VarianceScale]:
    """:func:`measure_variance_scale`, then the variance multiplied by its factor (a new float32 array).

    Logs the ratio and what was done with it (a warning when it is beyond ``max_ratio`` or not measurable).

    Returns
    -------
    variance : ndarray (ny, nx) float32
        A rescaled copy, or ``variance`` itself when the factor is 1.
    scale : VarianceScale
    """
    cfg = config or ScaleVarianceConfig()
    vs = measure_variance_scale(image, variance, mask, config=cfg)
    if vs.applied:
        log.info("variance plane scaled by %.4f: the sky's robust variance (%d pixels) is %.4f x the "
                 "variance plane (characterize.scale_variance)", vs.factor, vs.n_pixels, vs.ratio)
        return (np.asarray(variance, dtype=np.float32) * np.float32(vs.factor)).astype(np.float32), vs
    if vs.reason.startswith(("ratio", "only")):
        log.warning("variance plane not scaled: %s (characterize.scale_variance)", vs.reason)
    else:
        log.info("variance plane not scaled: sky variance / variance = %.4f is %s", vs.ratio, vs.reason)
    return variance, vs
