"""Reliability ("real/bogus") score of DIA sources: ``DiaSource.reliability`` in 0..1.

Rubin scores every DIA source with a classifier trained on injected sources and labelled
artefacts and sends alerts only above a threshold. apfast does the same with a small
gradient-boosted tree ensemble over features of each source: its measured columns (S/N,
flux relative to the template and science fluxes at its position, size and shape relative to
the PSF, aperture-to-PSF flux ratio, pixel flags) and of its difference-image cutout (the
reduced chi^2 of a PSF fit, the fraction of opposite-sign flux, the peak-to-total ratio and
the fraction of masked pixels). :data:`FEATURES` lists them; :func:`features` computes them.

The model ships in the package (``apfast/dia/data/reliability-<version>.npz``, a few hundred
kB): the trees of a scikit-learn ``HistGradientBoostingClassifier`` exported to plain arrays
by ``tools/train_reliability.py`` and evaluated here with numpy, so scoring needs neither
scikit-learn nor pickles (loads in milliseconds, scores a CCD's sources in a few ms). The
npz also carries its version (``DiaSource.reliabilityVersion``), the feature names it was
trained on, the training data it saw and its measured purity/completeness.

Limits (read the model's ``meta`` for its numbers): trained on simulated DECam g-band
data (point-source transients, hosted and hostless; variable stars; proper-motion stars;
artefacts of cosmic rays, bright-star residuals and noise) that apfast makes itself. Like
Rubin's early models it has seen no real artefact classes the simulator does not make
(satellite trails, ghosts, diffraction spikes): validate on your data with injected fakes
(``apfast verify``) before trusting a threshold.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast._constants import FWHM_PER_SIGMA
from apfast.exposure import Exposure
from apfast.masks import bitmask

__all__ = ["FEATURES", "MODEL_VERSION", "ReliabilityConfig", "ReliabilityModel", "features", "load_model",
           "score_sources"]

#: The model shipped with this version of apfast (file ``data/reliability-<MODEL_VERSION>.npz``).
MODEL_VERSION = "gbt-1"

#: Feature names, in the column order of :func:`features`.
FEATURES: tuple[str, ...] = (
    "snr", "log_flux_over_template", "log_flux_over_science", "ap_over_psf", "size_ratio", "ellipticity",
    "is_negative", "is_dipole", "flag_interpolated", "flag_cr", "flag_suspect", "flag_bad", "flag_saturated",
    "flag_edge", "bbox_size", "centroid_err", "psf_chi2", "opposite_frac", "peak_frac", "masked_frac",
)  # fmt: skip



@dataclass(frozen=True, slots=True, kw_only=True)
class ReliabilityConfig(ConfigSection):
    """Reliability ("real/bogus") score of every DIA source (``reliability``)."""

    _key_prefix: ClassVar[str] = "reliability."

    model: str = opt(
        MODEL_VERSION,
        "Shipped model scoring DiaSource.reliability (apfast/dia/data/reliability-<model>.npz); 'none' leaves "
        "reliability empty (NULL) and sends every alert.",
    )

    def _validate(self) -> None:
        if self.model != "none" and not (resources.files("apfast.dia") / "data" / f"reliability-{self.model}.npz"
                                          ).is_file():
            self._fail("model", self.model, f"use {MODEL_VERSION!r} (shipped) or 'none'")


_MASKED = ("BAD", "SAT", "INTRP", "CR", "SUSPECT", "NO_DATA", "EDGE")


def _col(cols: dict[str, np.ndarray], name: str, n: int, default: float = np.nan) -> np.ndarray:
    return np.asarray(cols[name], float) if name in cols else np.full(n, default)


def _stamp_features(diff: Exposure, x: np.ndarray, y: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Per source: PSF-fit reduced chi^2, opposite-sign flux fraction, peak fraction, masked fraction."""
    n = len(x)
    out = np.full((n, 4), np.nan)
    if n == 0:
        return out
    ny, nx = diff.shape
    psf = diff.psf
    fwhm = float(psf.fwhm(0.5 * (nx - 1), 0.5 * (ny - 1))) if psf is not None else 4.0
    sigma = max(fwhm / FWHM_PER_SIGMA, 0.5)
    r = int(math.ceil(2.0 * fwhm))
    bad = bitmask(_MASKED)
    img = diff.image
    var = diff.variance if diff.variance is not None else np.ones(diff.shape, np.float32)
    msk = diff.mask if diff.mask is not None else np.zeros(diff.shape, np.int32)
    for i in range(n):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        cx, cy = int(round(x[i])), int(round(y[i]))
        x0, x1, y0, y1 = max(cx - r, 0), min(cx + r + 1, nx), max(cy - r, 0), min(cy + r + 1, ny)
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        d = sign[i] * np.asarray(img[y0:y1, x0:x1], float)
        v = np.asarray(var[y0:y1, x0:x1], float)
        m = (np.asarray(msk[y0:y1, x0:x1]) & bad) != 0
        yy, xx = np.mgrid[y0:y1, x0:x1]
        good = np.isfinite(d) & np.isfinite(v) & (v > 0)
        out[i, 3] = float(m.mean())
        if good.sum() < 5:
            continue
        g = np.exp(-((xx - x[i]) ** 2 + (yy - y[i]) ** 2) / (2.0 * sigma * sigma))
        w = np.where(good, 1.0 / np.where(good, v, 1.0), 0.0)
        dz = np.where(good, d, 0.0)
        den = float((w * g * g).sum())
        amp = float((w * dz * g).sum()) / den if den > 0 else 0.0
        out[i, 0] = float((w * (dz - amp * g) ** 2).sum()) / max(int(good.sum()) - 1, 1)
        tot = float(np.abs(dz).sum())
        out[i, 1] = float(np.clip(-dz, 0, None).sum()) / tot if tot > 0 else np.nan
        s = np.where(good, dz / np.sqrt(np.where(good, v, 1.0)), 0.0)
        ssum = float(np.clip(s, 0, None).sum())
        out[i, 2] = float(s.max()) / ssum if ssum > 0 else np.nan
    return out


def features(sources: dict[str, Any], difference: Exposure) -> np.ndarray:
    """The :data:`FEATURES` of every DIA source of one CCD-visit.

    Parameters
    ----------
    sources : dict of str to array
        DIA-source columns as :func:`apfast.dia.diasource.run_dia_detection` returns them
        (APDB names: ``x``, ``y``, ``snr``, ``psfFlux``, ``apFlux``, ``templateFlux``,
        ``scienceFlux``, ``ixx`` ..., ``pixelFlags_*``); missing columns give NaN features.
    difference : Exposure
        The difference image the sources were measured on.

    Returns
    -------
    ndarray, float64, shape (n, len(FEATURES))
    """
    cols = {k: np.asarray(v) for k, v in sources.items()}
    n = len(cols["x"]) if "x" in cols else 0
    psf_flux = _col(cols, "psfFlux", n)
    aflux = np.abs(psf_flux)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(_col(cols, "snr", n))
        tf = _col(cols, "templateFlux", n)
        sf = _col(cols, "scienceFlux", n)
        f_t = np.log10(np.clip(aflux, 1e-3, None) / np.clip(np.abs(tf), 1.0, None))
        f_s = np.log10(np.clip(aflux, 1e-3, None) / np.clip(np.abs(sf), 1.0, None))
        ap = _col(cols, "apFlux", n) / psf_flux
        ixx, iyy, ixy = _col(cols, "ixx", n), _col(cols, "iyy", n), _col(cols, "ixy", n)
        size = (ixx + iyy) / (_col(cols, "ixxPSF", n) + _col(cols, "iyyPSF", n))
        ell = np.sqrt((ixx - iyy) ** 2 + 4.0 * ixy**2) / (ixx + iyy)
        cerr = np.hypot(_col(cols, "xErr", n), _col(cols, "yErr", n))

    def flag(name: str) -> np.ndarray:
        return _col(cols, name, n, 0.0).astype(float)

    neg = flag("isNegative")
    sign = np.where(neg > 0, -1.0, 1.0)
    stamp = _stamp_features(difference, _col(cols, "x", n), _col(cols, "y", n), sign)
    table = [
        snr, f_t, f_s, ap, size, ell, neg, flag("isDipole"),
        flag("pixelFlags_interpolatedCenter"), flag("pixelFlags_crCenter"), flag("pixelFlags_suspectCenter"),
        flag("pixelFlags_bad"), flag("pixelFlags_saturatedCenter"), flag("pixelFlags_edge"),
        _col(cols, "bboxSize", n), cerr, stamp[:, 0], stamp[:, 1], stamp[:, 2], stamp[:, 3],
    ]  # fmt: skip
    out = np.column_stack(table) if n else np.zeros((0, len(FEATURES)))
    out[~np.isfinite(out)] = np.nan
    return out


@dataclass(frozen=True)
class ReliabilityModel:
    """A boosted tree ensemble as flat arrays (see ``tools/train_reliability.py``).

    Node ``k`` of the ensemble tests ``X[:, feature[k]] <= threshold[k]`` (NaN goes left when
    ``missing_left[k]``) and continues at ``left[k]``/``right[k]`` (indices into the same
    arrays), until ``is_leaf[k]``, whose ``value[k]`` is added to the raw score. The
    probability of "real" is ``1 / (1 + exp(-(baseline + sum of leaf values)))``.
    """

    version: str
    feature_names: tuple[str, ...]
    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    missing_left: np.ndarray
    value: np.ndarray
    baseline: float
    meta: dict[str, Any]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Probability that each row of ``X`` (n, len(feature_names)) is a real source."""
        X = np.asarray(X, float)
        n = X.shape[0]
        raw = np.full(n, self.baseline)
        if n == 0:
            return raw
        rows = np.arange(n)
        for root in self.roots:
            node = np.full(n, int(root), dtype=np.int64)
            active = ~self.is_leaf[node]
            while active.any():
                k = node[active]
                xv = X[rows[active], self.feature[k]]
                go_left = np.where(np.isnan(xv), self.missing_left[k], xv <= self.threshold[k])
                node[active] = np.where(go_left, self.left[k], self.right[k])
                active = ~self.is_leaf[node]
            raw += self.value[node]
        return 1.0 / (1.0 + np.exp(-raw))


@functools.cache
def load_model(version: str = MODEL_VERSION) -> ReliabilityModel:
    """Load a shipped reliability model (cached per process)."""
    from apfast.errors import ConfigError

    ref = resources.files("apfast.dia") / "data" / f"reliability-{version}.npz"
    try:
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        msg = f"no reliability model {version!r} in the apfast package ({ref}); use dia_reliability.model = none"
        raise ConfigError(msg) from None
    meta = json.loads(str(arrays["meta"]))
    names = tuple(meta["features"])
    return ReliabilityModel(
        version=str(meta["version"]), feature_names=names, roots=arrays["roots"].astype(np.int64),
        feature=arrays["feature"].astype(np.int64), threshold=arrays["threshold"].astype(float),
        left=arrays["left"].astype(np.int64), right=arrays["right"].astype(np.int64),
        is_leaf=arrays["is_leaf"].astype(bool), missing_left=arrays["missing_left"].astype(bool),
        value=arrays["value"].astype(float), baseline=float(meta["baseline"]), meta=meta,
    )


def score_sources(sources: dict[str, Any], difference: Exposure, model: ReliabilityModel) -> np.ndarray:
    """``reliability`` (0..1) of every DIA source of one CCD-visit with ``model``."""
    X = features(sources, difference)
    if model.feature_names != FEATURES:
        index = [FEATURES.index(f) for f in model.feature_names]
        X = X[:, index]
    return model.predict(X)
