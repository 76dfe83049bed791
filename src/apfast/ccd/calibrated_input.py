"""The ISR-free start of processCcd for calibrated images: image, mask and variance planes.

For a calibrated CCD (see :mod:`apfast.camera.calibrated`) ISR is skipped; this module turns the
files' pixels into the planes :func:`apfast.ccd.characterize.run_characterize` takes, in electrons
(like ISR's output) when ``to_electrons`` and a gain are given, else in the file's units:

- variance from the weight map (``inverse_variance``: 1/w, ``variance``: w, ``sigma``: w**2); a
  weight of 0 (or non-finite) is ``NO_DATA`` with variance 0 (what ISR writes for unusable pixels);
  without a weight map, ``max(image, 0) / gain + (read_noise / gain)**2`` (the image holds the sky),
  which leaves out flat-field and compression noise: characterize rescales such a variance to the
  measured sky noise (``variance_source = "gain"``, :mod:`apfast.ccd.scale_variance`);
- mask planes from the data-quality plane: ``bits`` mode sets the planes of each set bit,
  ``values`` mode the planes of the whole value (DECam CP: one code per pixel); non-finite image
  pixels are ``NO_DATA`` (set to 0), and pixels at or above ``saturation`` are ``SAT``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from apfast.errors import InputError
from apfast.masks import bitmask

__all__ = ["CalibratedPlanes", "mask_from_dq", "planes_from_calibrated"]


@dataclass(frozen=True, slots=True)
class CalibratedPlanes:
    """Image, mask and variance of one calibrated CCD (C-contiguous float32/int32/float32).

    ``variance_source`` says where the variance came from: ``"weight"`` (the weight map) or
    ``"gain"`` (Poisson + read noise from the gain).
    """

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    n_saturated: int
    variance_source: Literal["weight", "gain"] = "weight"


def mask_from_dq(dq: np.ndarray, *, mode: str, mapping: Mapping[int, Sequence[str]]) -> np.ndarray:
    """Map a data-quality plane to :mod:`apfast.masks` bits.

    Parameters
    ----------
    dq : ndarray of int, shape (ny, nx)
    mode : {"bits", "values"}
        ``bits``: ``mapping`` keys are bit numbers; ``values``: whole pixel values.
    mapping : mapping of int to sequence of str
        Mask planes set for each bit or value; unmapped bits/values set nothing.

    Returns
    -------
    ndarray of int32, shape (ny, nx)

    Examples
    --------
    >>> dq = np.array([[0, 1 << 8, (1 << 8) | 1]])
    >>> mask_from_dq(dq, mode="bits", mapping={8: ["SAT"], 0: ["BAD"]}).tolist()
    [[0, 2, 3]]
    >>> mask_from_dq(np.array([[0, 3, 5]]), mode="values", mapping={3: ["SAT"], 5: ["CR"]}).tolist()
    [[0, 2, 8]]
    """
    dq = np.asarray(dq).astype(np.int64, copy=False)
    out = np.zeros(dq.shape, dtype=np.int32)
    for key, planes in mapping.items():
        bits = np.int32(bitmask(list(planes)))
        hit = (dq & (np.int64(1) << np.int64(key))) != 0 if mode == "bits" else dq == key
        out[hit] |= bits
    return out


def planes_from_calibrated(
    image: np.ndarray, *, weight: np.ndarray | None = None, dq: np.ndarray | None = None,
    weight_kind: str = "inverse_variance", dq_mode: str = "bits", dq_map: Mapping[int, Sequence[str]] | None = None,
    gain: float | None = None, read_noise: float = 0.0, saturation: float | None = None, to_electrons: bool = False,
) -> CalibratedPlanes:
    """Build the characterize inputs of a calibrated CCD; inputs are not modified.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        The calibrated pixels, sky included, in the file's units.
    weight : ndarray, shape (ny, nx), optional
        The weight map, meaning ``weight_kind``.
    dq : ndarray of int, shape (ny, nx), optional
        The data-quality plane, decoded with ``dq_mode`` and ``dq_map``.
    gain : float, optional
        Electrons per image unit; needed when there is no weight map.
    read_noise : float
        Electrons; used with ``gain``.
    saturation : float, optional
        Level (file units) at and above which pixels are ``SAT``.
    to_electrons : bool
        Multiply the image by ``gain`` (and the variance by ``gain**2``): a zero point of the file's
        units then changes by ``2.5 log10(gain)``.

    Raises
    ------
    InputError
        Shapes differ, or neither a weight map nor a positive gain is given (or ``to_electrons``
        without a positive gain).
    """
    img = np.array(image, dtype=np.float32, order="C")
    for name, arr in (("weight", weight), ("mask", dq)):
        if arr is not None and arr.shape != img.shape:
            msg = f"the {name} plane has shape {arr.shape}, the image {img.shape}; pair the right files"
            raise InputError(msg)
    mask = (mask_from_dq(dq, mode=dq_mode, mapping=dq_map or {}) if dq is not None
            else np.zeros(img.shape, dtype=np.int32))
    no_data = np.int32(bitmask("NO_DATA"))
    bad_pix = ~np.isfinite(img)
    usable_gain = gain is not None and bool(np.isfinite(gain)) and gain > 0
    if to_electrons and not usable_gain:
        msg = f"cannot convert to electrons without a positive gain (got {gain!r}); set calibrated.gain"
        raise InputError(msg)
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        good = np.isfinite(w) & (w > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            if weight_kind == "inverse_variance":
                var = np.where(good, 1.0 / np.where(good, w, 1.0), 0.0)
            elif weight_kind == "variance":
                var = np.where(good, w, 0.0)
            else:
                var = np.where(good, w * w, 0.0)
        bad_pix |= ~good
    else:
        if not usable_gain:
            msg = (f"no weight map and no usable gain ({gain!r}) to derive the variance; give the weight file or "
                   "set calibrated.gain in the camera description")
            raise InputError(msg)
        assert gain is not None
        rn = float(read_noise) / float(gain)
        with np.errstate(invalid="ignore"):
            var = np.maximum(np.where(np.isfinite(img), img, 0.0), 0.0) / float(gain) + rn * rn
    mask[bad_pix] |= no_data
    img[bad_pix] = 0.0
    var = np.ascontiguousarray(np.where(bad_pix, 0.0, var), dtype=np.float32)
    if saturation is not None and np.isfinite(saturation):
        mask[img >= saturation] |= np.int32(bitmask("SAT"))
    if to_electrons:
        assert gain is not None
        img *= np.float32(gain)
        var *= np.float32(gain) ** 2
    n_sat = int(np.count_nonzero(mask & np.int32(bitmask("SAT"))))
    return CalibratedPlanes(img, mask, var, n_sat, "weight" if weight is not None else "gain")
