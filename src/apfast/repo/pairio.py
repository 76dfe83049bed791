"""FITS input and output of ``apfast subtract``: any image FITS file in, apfast's exposure format out.

Reading (:func:`read_fits_image`, :func:`read_fits_plane`): the first HDU holding a
2-D image (the primary array, or the first image extension: tile-compressed
``.fits.fz`` included) or the HDU given by index or ``EXTNAME``; its WCS from that
HDU's header (TPV and SIP as astropy/wcslib read them; an extension without WCS
cards inherits the primary header's). Every problem a user can cause is an
:class:`apfast.errors.InputError` whose message names the file.

Writing (:func:`write_difference`, :func:`write_dia_table`): the difference as an
apfast exposure file (``IMAGE``, ``MASK``, ``VARIANCE`` and ``PSF_*`` HDUs, as
:func:`apfast.exposure.write_exposure`) with ``DIFF*`` cards saying how it was made;
DIA sources as a FITS binary table and a CSV file with the same columns.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from apfast.errors import InputError
from apfast.exposure import Exposure, write_exposure
from apfast.psf import ImagePsf
from apfast.repo.fitsutil import image_wcs

__all__ = [
    "FitsImage", "read_fits_image", "read_fits_plane", "read_psf_image", "write_dia_table", "write_difference",
]


@dataclass(frozen=True, slots=True, eq=False)
class FitsImage:
    """One image read from a FITS file.

    Attributes
    ----------
    data : ndarray (ny, nx) float32
        Native-endian pixels.
    header : astropy.io.fits.Header
        The image HDU's header (primary cards merged in for an extension).
    wcs : astropy.wcs.WCS or None
        Its celestial WCS (``None`` when it has none).
    path : Path
    hdu : int
        Index of the HDU read.
    """

    data: np.ndarray
    header: fits.Header
    wcs: WCS | None
    path: Path
    hdu: int

    def header_float(self, keys: tuple[str, ...] | list[str]) -> float | None:
        """The first of ``keys`` in the header that holds a finite number, else ``None``."""
        for key in keys:
            value = self.header.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                return float(value)
        return None


def _open(path: Path, what: str) -> fits.HDUList:
    if not path.exists():
        msg = f"{what} {path}: no such file"
        raise InputError(msg)
    if path.is_dir():
        msg = f"{what} {path} is a folder; give a FITS file"
        raise InputError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(path, memmap=False)
            hdul.verify("silentfix")
            len(hdul)  # reads every header: a damaged file fails here
    except (OSError, ValueError, TypeError) as exc:
        msg = f"{what} {path} is not a readable FITS file ({exc})"
        raise InputError(msg) from None
    return hdul


def _is_image(hdu: Any) -> bool:
    # a CompImageHDU's .header and .shape are those of the image it holds (astropy decompresses lazily)
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and len(hdu.shape) >= 2


def _pick(hdul: fits.HDUList, hdu: int | str | None, path: Path, what: str) -> int:
    if hdu is None:
        for i, h in enumerate(hdul):
            if _is_image(h):
                return i
        kinds = ", ".join(f"{i}: {type(h).__name__}" for i, h in enumerate(hdul))
        msg = f"{what} {path} has no image HDU ({kinds}); give a file with a 2-D image"
        raise InputError(msg)
    names = [h.name for h in hdul]
    if isinstance(hdu, str) and not hdu.lstrip("-").isdigit():
        if hdu.upper() not in names:
            msg = f"{what} {path} has no HDU named {hdu!r}; its HDUs are {names}"
            raise InputError(msg)
        idx = names.index(hdu.upper())
    else:
        idx = int(hdu)
        if not 0 <= idx < len(hdul):
            msg = f"{what} {path} has {len(hdul)} HDU(s) (0..{len(hdul) - 1}), not HDU {idx}"
            raise InputError(msg)
    if not _is_image(hdul[idx]):
        msg = f"{what} {path}: HDU {idx} ({hdul[idx].name}) holds no 2-D image"
        raise InputError(msg)
    return idx


def _data(hdul: fits.HDUList, idx: int, path: Path, what: str) -> np.ndarray:
    try:
        data = np.asarray(hdul[idx].data)
    except (OSError, ValueError, TypeError) as exc:
        msg = f"{what} {path}: HDU {idx} data cannot be read ({exc}); the file may be truncated"
        raise InputError(msg) from None
    if data.ndim > 2:
        data = data.reshape(data.shape[-2:]) if int(np.prod(data.shape[:-2])) == 1 else data
    if data.ndim != 2:
        msg = f"{what} {path}: HDU {idx} is {data.ndim}-D (shape {data.shape}); give a 2-D image"
        raise InputError(msg)
    return data


def read_fits_image(path: str | Path, *, hdu: int | str | None = None, what: str = "image",
                    need_wcs: bool = True) -> FitsImage:
    """Read the image, header and WCS of one FITS file.

    Parameters
    ----------
    path : str or Path
        A FITS file (``.fits``, ``.fits.fz``, ``.fits.gz``).
    hdu : int or str, optional
        HDU index or ``EXTNAME``; default the first HDU with a 2-D image.
    what : str
        How messages name the file, e.g. ``"science image"``.
    need_wcs : bool
        Raise when the header has no celestial WCS.

    Returns
    -------
    FitsImage

    Raises
    ------
    InputError
        Missing file, not FITS, no (such) image HDU, unreadable data, or no celestial WCS.
    """
    p = Path(path)
    with _open(p, what) as hdul:
        idx = _pick(hdul, hdu, p, what)
        data = np.array(_data(hdul, idx, p, what), dtype=np.float32)
        header = hdul[idx].header.copy()
        if idx > 0:
            # extension headers inherit the primary's cards (INHERIT convention), without overriding their own
            for card in hdul[0].header.cards:
                if card.keyword not in header and card.keyword not in ("SIMPLE", "EXTEND", "COMMENT", "HISTORY", ""):
                    header.append(card)
    wcs = image_wcs(header, data.shape)
    if wcs is None and need_wcs:
        ctype = (header.get("CTYPE1"), header.get("CTYPE2"))
        detail = "no CTYPE1/CTYPE2 cards" if ctype == (None, None) else f"CTYPE = {ctype} is not celestial"
        msg = (
            f"{what} {p}: HDU {idx} has no celestial WCS ({detail}); subtract aligns the images by their WCS, "
            "so each needs one (e.g. from astrometry.net)"
        )
        raise InputError(msg)
    return FitsImage(data=data, header=header, wcs=wcs, path=p, hdu=idx)


def read_fits_plane(path: str | Path, *, shape: tuple[int, int], hdu: int | str | None = None,
                    what: str = "variance") -> np.ndarray:
    """Read a variance, weight or mask image that must match an image of ``shape``.

    Raises
    ------
    InputError
        As :func:`read_fits_image`, or when the plane's shape is not ``shape``.
    """
    p = Path(path)
    with _open(p, what) as hdul:
        idx = _pick(hdul, hdu, p, what)
        data = np.array(_data(hdul, idx, p, what))
    if data.shape != tuple(shape):
        msg = f"{what} {p} has shape {data.shape} but the image has {tuple(shape)}; give a plane of the image's shape"
        raise InputError(msg)
    return data.astype(data.dtype.newbyteorder("=")) if not data.dtype.isnative else data


def read_psf_image(path: str | Path, *, max_size: int, what: str = "PSF") -> ImagePsf:
    """Read a PSF model image (e.g. WebbPSF at the image's pixel scale) as a constant :class:`ImagePsf`.

    The stamp is cut to an odd square centred on its peak, at most ``max_size`` pixels
    on a side, and normalised to sum 1.

    Raises
    ------
    InputError
        As :func:`read_fits_image`, or a stamp that is not 2-D, not finite or has no positive flux.
    """
    p = Path(path)
    with _open(p, what) as hdul:
        idx = _pick(hdul, None, p, what)
        data = np.array(_data(hdul, idx, p, what), dtype=np.float64)
    if data.ndim != 2 or not np.isfinite(data).all() or not data.sum() > 0:
        msg = f"{what} {p}: need a 2-D stamp of finite values with positive total flux (a PSF model image)"
        raise InputError(msg)
    py, px = np.unravel_index(int(np.argmax(data)), data.shape)
    half = min(py, px, data.shape[0] - 1 - py, data.shape[1] - 1 - px, max_size // 2)
    if half < 1:
        msg = f"{what} {p}: its peak at x={px}, y={py} is on the stamp's edge; give a PSF image centred on its peak"
        raise InputError(msg)
    return ImagePsf(data[py - half : py + half + 1, px - half : px + half + 1])


def write_difference(path: str | Path, difference: Exposure, cards: dict[str, tuple[Any, str]]) -> Path:
    """Write the difference exposure with ``cards`` (``KEY: (value, comment)``) in its primary header.

    Returns
    -------
    Path
        ``path`` (written atomically).
    """
    d = difference
    exp = Exposure(d.image, d.mask, d.variance, wcs=d.wcs, psf=d.psf, photo_calib=d.photo_calib,
                   visit_info=d.visit_info, metadata=d.metadata.copy(), xy0=d.xy0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for key, (value, comment) in cards.items():
        exp.metadata[key] = (value, comment)
    return write_exposure(path, exp)


def write_dia_table(fits_path: str | Path, csv_path: str | Path, table: dict[str, np.ndarray],
                    docs: dict[str, str], cards: dict[str, tuple[Any, str]] | None = None) -> tuple[Path, Path]:
    """Write a column table as a FITS binary table (column docs in ``TCOMMn``) and as CSV.

    Returns
    -------
    tuple of Path
        The FITS and CSV paths.
    """
    from apfast._fileio import atomic_path

    cols = []
    for name, values in table.items():
        arr = np.asarray(values)
        fmt = {"b": "L", "i": "K", "u": "K", "f": "D"}[arr.dtype.kind]
        cols.append(fits.Column(name=name, format=fmt, array=arr.astype(np.int64) if fmt == "K" else arr))
    hdu = fits.BinTableHDU.from_columns(cols, name="DIASRC")
    for i, name in enumerate(table, start=1):
        if name in docs:
            hdu.header[f"TCOMM{i}"] = docs[name][:68]
    primary = fits.PrimaryHDU()
    for key, (value, comment) in (cards or {}).items():
        primary.header[key] = (value, comment)
    fpath, cpath = Path(fits_path), Path(csv_path)
    with atomic_path(fpath, mode=0o644) as tmp:
        fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True)
    with atomic_path(cpath, mode=0o644) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(list(table))
        n = len(next(iter(table.values()))) if table else 0
        for i in range(n):
            row = []
            for values in table.values():
                v = values[i]
                if isinstance(v, (bool, np.bool_)):
                    row.append("true" if v else "false")
                elif isinstance(v, (float, np.floating)):
                    row.append(f"{float(v):.10g}")
                else:
                    row.append(str(v))
            w.writerow(row)
    return fpath, cpath
