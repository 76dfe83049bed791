"""FITS cutouts for alerts, in the layout of Rubin's alert cutouts, built without astropy.io.fits.

Like Rubin's cutouts (astropy ``CCDData`` written to FITS): a primary HDU with the
calibrated image in nJy (``BUNIT='nJy'``) and an ``UNCERT`` HDU with the variance in nJy²
(``UTYPE='VarianceUncertainty'``), so ``astropy.nddata.CCDData.read`` opens them. Rubin
passes its mask as ``flags``, which ``CCDData`` does not write, so by default there is no
mask HDU; ``mask=True`` adds an int32 ``MASK`` HDU with the apfast bit planes. The WCS is a
local gnomonic (TAN) approximation at the source (``CRVAL`` = the sky position of the
source pixel position, ``CRPIX`` = that position in the cutout, ``CD`` = the local Jacobian
of the image WCS), as Rubin builds it; unlike Rubin's cutouts it also carries
``CTYPE = RA---TAN/DEC--TAN`` so any FITS reader sees a celestial WCS. The bytes are built
from a header template without ``astropy.io.fits`` (about 40x faster).

Examples
--------
>>> from apfast.exposure import Exposure
>>> b = cutout_fits_bytes(Exposure(np.ones((40, 40))), 20.0, 20.0)
>>> len(b) % 2880, b[:6]
(0, b'SIMPLE')
"""

from __future__ import annotations

from typing import Any

import numpy as np

from apfast import masks
from apfast.errors import InputError

__all__ = ["cutout_fits_bytes", "cutouts_at"]


def _card(key: str, value: Any, comment: str = "") -> str:
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20d}"
    elif isinstance(value, float):
        text = f"{repr(value).upper():>20}"
    else:
        s = str(value).replace("'", "''")
        text = f"'{s:<8}'"
        text = f"{text:<20}"
    card = f"{key:<8}= {text}"
    if comment:
        card = f"{card} / {comment}"
    return f"{card[:80]:<80}"


def _header_block(cards: list[str]) -> bytes:
    text = "".join(cards) + f"{'END':<80}"
    pad = (-len(text)) % 2880
    return (text + " " * pad).encode("ascii")


def _data_block(arr: np.ndarray, dtype: str) -> bytes:
    raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    return raw + b"\0" * ((-len(raw)) % 2880)


def _local_wcs(wcs: Any, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sky position and local TAN CD matrix (deg/pixel) of a WCS at pixel positions (0-based).

    The Jacobian comes from central differences at +-0.5 px projected onto the tangent
    plane of each position, which is exact for a TAN WCS and good to ~1e-9 relative for SIP.
    """
    n = len(xs)
    h = 0.5
    px = np.concatenate([xs, xs + h, xs - h, xs, xs])
    py = np.concatenate([ys, ys, ys, ys + h, ys - h])
    ra, dec = wcs.all_pix2world(px, py, 0)
    ra = np.radians(np.asarray(ra, float)).reshape(5, n)
    dec = np.radians(np.asarray(dec, float)).reshape(5, n)
    ra0, dec0 = ra[0], dec[0]
    # gnomonic projection of the four neighbours onto the tangent plane at (ra0, dec0)
    dra = ra[1:] - ra0
    cosc = np.sin(dec0) * np.sin(dec[1:]) + np.cos(dec0) * np.cos(dec[1:]) * np.cos(dra)
    xi = np.cos(dec[1:]) * np.sin(dra) / cosc
    eta = (np.cos(dec0) * np.sin(dec[1:]) - np.sin(dec0) * np.cos(dec[1:]) * np.cos(dra)) / cosc
    xi, eta = np.degrees(xi), np.degrees(eta)
    cd = np.empty((n, 2, 2))
    cd[:, 0, 0] = (xi[0] - xi[1]) / (2 * h)
    cd[:, 0, 1] = (xi[2] - xi[3]) / (2 * h)
    cd[:, 1, 0] = (eta[0] - eta[1]) / (2 * h)
    cd[:, 1, 1] = (eta[2] - eta[3]) / (2 * h)
    return np.degrees(ra0) % 360.0, np.degrees(dec0), cd


def cutouts_at(
    exposure: Any,
    xs: np.ndarray,
    ys: np.ndarray,
    size: int = 30,
    *,
    variance: bool = True,
    mask: bool = False,
) -> list[bytes | None]:
    """Return :func:`cutout_fits_bytes` for many positions of one exposure (one WCS call for all).

    Parameters
    ----------
    exposure : apfast.exposure.Exposure
        The image.
    xs, ys : ndarray of float, shape (n,)
        Positions in the parent pixel frame (0-based).
    size : int
        Cutout side in pixels.
    variance, mask : bool
        Add the ``UNCERT`` / ``MASK`` HDUs.

    Returns
    -------
    list of bytes or None
        One FITS file per position (``None`` where the position is off the image or not finite).
    """
    with_variance, with_mask = variance, mask
    image = exposure.image
    ny, nx = image.shape
    x0p, y0p = exposure.xy0
    lx = np.asarray(xs, float) - x0p  # local (array) coordinates
    ly = np.asarray(ys, float) - y0p
    n = len(lx)
    out: list[bytes | None] = [None] * n
    ok = np.isfinite(lx) & np.isfinite(ly)
    ix = np.where(ok, np.floor(lx + 0.5), -1).astype(np.int64)
    iy = np.where(ok, np.floor(ly + 0.5), -1).astype(np.int64)
    ok &= (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return out
    scale = 1.0
    unit = None
    if exposure.photo_calib is not None:
        scale = float(exposure.photo_calib.njy_per_instflux)
        unit = "nJy"
    wcs_parts = None
    if exposure.wcs is not None:
        wcs_parts = _local_wcs(exposure.wcs, lx[idx], ly[idx])
    half = size // 2
    var_plane = exposure.variance if with_variance else None
    mask_plane = exposure.mask if with_mask else None
    nodata = int(masks.bitmask("NO_DATA")) if mask_plane is not None else 0
    # Everything but the per-cutout position cards is the same for all cutouts: format it once.
    dims = [_card("NAXIS", 2), _card("NAXIS1", size), _card("NAXIS2", size)]
    primary = [_card("SIMPLE", True, "conforms to FITS standard"), _card("BITPIX", -32), *dims]
    primary.append(_card("EXTEND", True))
    if unit:
        primary.append(_card("BUNIT", unit))
    ext = [_card("XTENSION", "IMAGE"), "", *dims, _card("PCOUNT", 0), _card("GCOUNT", 1)]
    ext[1] = _card("BITPIX", -32)
    var_cards = [*ext, _card("EXTNAME", "UNCERT"), _card("UTYPE", "VarianceUncertainty")]
    if unit:
        var_cards.append(_card("BUNIT", "nJy2"))
    ext[1] = _card("BITPIX", 32)
    mask_cards = [*ext, _card("EXTNAME", "MASK")]
    heads = ["".join(primary), "".join(var_cards), "".join(mask_cards)]
    wcs_static = "".join(
        [
            _card("WCSAXES", 2),
            _card("CTYPE1", "RA---TAN", "local gnomonic approximation at the source"),
            _card("CTYPE2", "DEC--TAN"),
            _card("CUNIT1", "deg"),
            _card("CUNIT2", "deg"),
            _card("RADESYS", "ICRS"),
        ]
    )
    for k, i in enumerate(idx):
        bx, by = int(ix[i]) - half, int(iy[i]) - half  # local index of cutout pixel [0, 0]
        sx0, sx1 = max(bx, 0), min(bx + size, nx)
        sy0, sy1 = max(by, 0), min(by + size, ny)
        inside = (slice(sy0 - by, sy1 - by), slice(sx0 - bx, sx1 - bx))
        src = (slice(sy0, sy1), slice(sx0, sx1))
        img = np.full((size, size), np.nan, dtype=np.float32)
        img[inside] = image[src] * np.float32(scale) if unit else image[src]
        common = [
            _card("CUTMINX", int(bx + x0p - 1), "parent x (0-based) = FITS cutout x + CUTMINX"),
            _card("CUTMINY", int(by + y0p - 1), "parent y (0-based) = FITS cutout y + CUTMINY"),
            _card("LTV1", int(-(bx + x0p)), "parent x = cutout x - LTV1 (0-based)"),
            _card("LTV2", int(-(by + y0p)), "parent y = cutout y - LTV2 (0-based)"),
        ]
        if wcs_parts is not None:
            ra0, dec0, cd = wcs_parts
            common += [
                wcs_static,
                _card("CRPIX1", float(lx[i] - bx + 1.0), "source position in the cutout"),
                _card("CRPIX2", float(ly[i] - by + 1.0)),
                _card("CRVAL1", float(ra0[k]), "[deg] sky position of the source"),
                _card("CRVAL2", float(dec0[k])),
                _card("CD1_1", float(cd[k, 0, 0])),
                _card("CD1_2", float(cd[k, 0, 1])),
                _card("CD2_1", float(cd[k, 1, 0])),
                _card("CD2_2", float(cd[k, 1, 1])),
            ]
        common_text = "".join(common)
        parts = [_header_block([heads[0], common_text]), _data_block(img, ">f4")]
        if var_plane is not None:
            var = np.full((size, size), np.nan, dtype=np.float32)
            var[inside] = var_plane[src] * np.float32(scale * scale) if unit else var_plane[src]
            parts += [_header_block([heads[1], common_text]), _data_block(var, ">f4")]
        if mask_plane is not None:
            msk = np.full((size, size), nodata, dtype=np.int32)
            msk[inside] = mask_plane[src]
            parts += [_header_block([heads[2], common_text]), _data_block(msk, ">i4")]
        out[i] = b"".join(parts)
    return out


def cutout_fits_bytes(
    exposure: Any, x: float, y: float, size: int = 30, *, variance: bool = True, mask: bool = False
) -> bytes | None:
    """Return a ``size`` x ``size`` cutout around (x, y) as the bytes of a FITS file.

    Pixel ``[size // 2, size // 2]`` (0-based, numpy order ``[y, x]``) of the cutout is the
    pixel that contains (x, y); parts of the box outside the image are NaN (mask: NO_DATA).
    The HDUs, units and WCS are described in the module docstring (Rubin's layout).

    Parameters
    ----------
    exposure : apfast.exposure.Exposure
        The image (difference, calexp or matched template).
    x, y : float
        Position in the exposure's parent pixel frame (0-based; ``local + xy0``), e.g. a
        DiaSource ``x``, ``y``.
    size : int
        Side in pixels (Rubin: 30).
    variance : bool
        Add the ``UNCERT`` variance HDU (Rubin does).
    mask : bool
        Add an int32 ``MASK`` HDU (Rubin's cutouts have none).

    Returns
    -------
    bytes or None
        The FITS file, or ``None`` when (x, y) is not finite or falls outside the image
        (Rubin's ``PackageAlertsTask`` returns no cutout then).

    Raises
    ------
    InputError
        If ``size`` is not a positive integer.

    Examples
    --------
    >>> import io
    >>> from astropy.io import fits
    >>> from apfast.exposure import Exposure
    >>> b = cutout_fits_bytes(Exposure(np.arange(100.0).reshape(10, 10)), 0.2, 8.9, size=4)
    >>> d = fits.getdata(io.BytesIO(b))
    >>> float(d[2, 2]), int(np.isnan(d).sum())
    (90.0, 10)
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        msg = f"cutout size must be a positive integer number of pixels, got {size!r}; Rubin uses 30"
        raise InputError(msg)
    return cutouts_at(
        exposure, np.array([x], float), np.array([y], float), int(size), variance=variance, mask=mask
    )[0]
