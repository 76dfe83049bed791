"""Exposures (image, mask, variance, WCS, PSF, photometric calibration) and their FITS files.

An :class:`Exposure` is what every stage passes on: a float32 image with an
optional int32 mask (bits from :mod:`apfast.masks`), a float32 variance, an
astropy WCS (SIP supported), a :class:`apfast.psf.PsfModel`, a :class:`PhotoCalib`
and a :class:`VisitInfo`, plus free-form header ``metadata``.

File layout written by :func:`write_exposure` (astropy and ds9 open it):

==========  ===========================================================
HDU 0       primary, no data: ``APFTYPE='EXPOSURE'``, visit info, photo calib,
            ``CFGSHA`` (config sha256) and the ``metadata`` cards
``IMAGE``   float32 image with WCS cards, ``LTV1/LTV2`` = minus ``xy0``
``MASK``    int32 mask with WCS cards and ``MP_<PLANE>`` bit cards
``VARIANCE`` float32 variance with WCS cards
``PSF_*``   the PSF model extensions (``PSFTYPE`` in the first one)
==========  ===========================================================

With ``compression`` other than ``'none'`` the planes are FITS tile-compressed
image extensions (``ZIMAGE``; astropy, ds9 and funpack read them, and
:func:`read_exposure` returns the same :class:`Exposure`): see
:data:`COMPRESSIONS` for what each choice does to each plane.

Files are written to a temporary name in the target directory and moved into
place with ``os.replace``, so a crash never leaves a half-written file under
the final name. :class:`Background` (a binned sky mesh) lives here too, with
its own FITS I/O.

Examples
--------
>>> import numpy as np
>>> exp = Exposure(np.zeros((4, 6), dtype=">f4"))
>>> exp.image.dtype.isnative, exp.shape
(True, (4, 6))
>>> PhotoCalib(31.4).instflux_to_njy(1.0)
1.0
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.hdu.compressed import DITHER_SEED_CHECKSUM, SUBTRACTIVE_DITHER_2
from astropy.wcs import WCS, FITSFixedWarning

from apfast import masks
from apfast._fileio import atomic_path
from apfast.errors import InputError
from apfast.psf import PsfModel, psf_from_hdus

__all__ = [
    "COMPRESSIONS",
    "NJY_AB_ZERO_POINT",
    "Background",
    "Exposure",
    "PhotoCalib",
    "VisitInfo",
    "exposure_hdulist",
    "read_background",
    "read_exposure",
    "wcs_from_header",
    "write_background",
    "write_exposure",
    "write_hdulist",
]

log = logging.getLogger(__name__)

#: AB magnitude of a 1 nJy source: 8.9 + 22.5.
NJY_AB_ZERO_POINT: float = 31.4

#: Keywords owned by the FITS structure; never copied into or out of ``metadata``.
_STRUCTURAL = frozenset(
    {
        "SIMPLE",
        "BITPIX",
        "NAXIS",
        "NAXIS1",
        "NAXIS2",
        "NAXIS3",
        "EXTEND",
        "PCOUNT",
        "GCOUNT",
        "XTENSION",
        "EXTNAME",
        "EXTVER",
        "BSCALE",
        "BZERO",
        "CHECKSUM",
        "DATASUM",
        "END",
        "ZIMAGE",
        "ZBITPIX",
        "ZNAXIS",
        "ZNAXIS1",
        "ZNAXIS2",
        "ZTILE1",
        "ZTILE2",
        "ZCMPTYPE",
        "ZNAME1",
        "ZVAL1",
        "ZNAME2",
        "ZVAL2",
        "ZQUANTIZ",
        "ZSIMPLE",
        "ZEXTEND",
        "ZTENSION",
        "ZPCOUNT",
        "ZGCOUNT",
        "TFIELDS",
        "TTYPE1",
        "TFORM1",
    }
)
_MARKERS = ("APFTYPE", "APFVERS", "CFGSHA")

#: ``compression`` choices of :func:`write_exposure` and what each does to the planes. The mask is
#: always lossless (RICE_1 on int32 stores a mostly-zero 2048x4096 mask in ~0.1 MB instead of 33.5 MB).
COMPRESSIONS: dict[str, str] = {
    "none": "every plane uncompressed (streamed; memory-mappable, fastest to write)",
    "mask": "MASK tile-compressed losslessly (RICE_1); IMAGE and VARIANCE uncompressed (bit-exact)",
    "lossless": "MASK RICE_1, IMAGE and VARIANCE GZIP_2 without quantisation (bit-exact, slow to write)",
    "quantized": (
        "MASK RICE_1; IMAGE and VARIANCE RICE_1 quantised to quantize_level steps per noise sigma of "
        "each tile, with SUBTRACTIVE_DITHER_2 (zeros and NaNs stay exact; lossy, as the DECam Community "
        "Pipeline's fpacked products)"
    ),
}
#: Rows per compression tile: a cutout or ``read_exposure(bbox=...)`` decompresses only the row bands it
#: touches, and 16-row tiles write ~1.8x faster than astropy's 1-row default at the same size.
_TILE_ROWS = 16


# --------------------------------------------------------------------------- visit info
_VISIT_KEYS: tuple[tuple[str, str, type, str], ...] = (
    ("visit", "VISIT", int, "visit (exposure) number"),
    ("ccdnum", "CCDNUM", int, "detector number"),
    ("detector", "DETPOS", str, "detector name"),
    ("filter", "BAND", str, "filter band"),
    ("mjd", "MJD-OBS", float, "MJD at start of exposure (UTC)"),
    ("date_obs", "DATE-OBS", str, "start of exposure (ISO, UTC)"),
    ("exptime", "EXPTIME", float, "exposure time (s)"),
    ("airmass", "AIRMASS", float, "airmass"),
    ("ra", "BORE-RA", float, "telescope pointing RA (deg)"),
    ("dec", "BORE-DEC", float, "telescope pointing Dec (deg)"),
    ("object", "OBJECT", str, "target / field name"),
    ("camera", "INSTRUME", str, "camera name"),
)
_VISIT_CARDS = frozenset(k for _, k, _, _ in _VISIT_KEYS)
_PHOTO_CARDS = frozenset({"MAGZERO", "MAGZERR", "FLUXMAG0"})


@dataclass(frozen=True, slots=True, kw_only=True)
class VisitInfo:
    """Where, when and how a CCD image was taken; every field may be ``None`` if unknown.

    ``ra``/``dec`` are the telescope pointing in degrees, ``mjd`` and ``date_obs``
    the exposure start (UTC), ``filter`` the band (``'g'``), ``detector`` the
    detector name (``'N4'``), ``camera`` the camera name (``'DECam'``).
    Header keywords: VISIT, CCDNUM, DETPOS, BAND, MJD-OBS, DATE-OBS, EXPTIME,
    AIRMASS, BORE-RA, BORE-DEC, OBJECT, INSTRUME.
    """

    visit: int | None = None
    ccdnum: int | None = None
    detector: str | None = None
    filter: str | None = None
    mjd: float | None = None
    date_obs: str | None = None
    exptime: float | None = None
    airmass: float | None = None
    ra: float | None = None
    dec: float | None = None
    object: str | None = None
    camera: str | None = None

    def to_cards(self) -> list[tuple[str, Any, str]]:
        """``(keyword, value, comment)`` cards for the fields that are set (finite)."""
        cards = []
        for attr, key, kind, comment in _VISIT_KEYS:
            value = getattr(self, attr)
            if value is None or (kind is float and not math.isfinite(value)):
                continue
            cards.append((key, kind(value), comment))
        return cards

    @classmethod
    def from_header(cls, header: fits.Header) -> VisitInfo | None:
        """Build from header keywords; ``None`` when none of them is present."""
        values: dict[str, Any] = {}
        for attr, key, kind, _ in _VISIT_KEYS:
            value = header.get(key)
            if value is None or isinstance(value, fits.card.Undefined):
                continue
            try:
                values[attr] = kind(value)
            except (TypeError, ValueError):
                msg = f"header keyword {key}={value!r} cannot be read as {kind.__name__} for VisitInfo.{attr}"
                raise InputError(msg) from None
        return cls(**values) if values else None


# --------------------------------------------------------------------------- photometric calibration
def _scalar_or_array(x: Any) -> Any:
    return float(x) if np.ndim(x) == 0 else x


@dataclass(frozen=True, slots=True)
class PhotoCalib:
    """Photometric zero point: ``mag = -2.5 log10(instFlux) + zero_point`` (AB).

    Parameters
    ----------
    zero_point : float
        Magnitude of a source of instrumental flux 1 (counts in the image units).
    zero_point_err : float
        1-sigma uncertainty of ``zero_point`` (mag).

    Examples
    --------
    >>> pc = PhotoCalib(25.0, 0.01)
    >>> float(pc.instflux_to_mag(100.0))
    20.0
    >>> round(float(pc.njy_to_instflux(pc.instflux_to_njy(3.0))), 12)
    3.0
    """

    zero_point: float
    zero_point_err: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.zero_point) or not (
            math.isfinite(self.zero_point_err) and self.zero_point_err >= 0
        ):
            msg = (
                f"PhotoCalib needs a finite zero_point and a finite non-negative zero_point_err, got "
                f"{self.zero_point}, {self.zero_point_err}"
            )
            raise InputError(msg)

    @property
    def flux_mag0(self) -> float:
        """Instrumental flux of a magnitude-0 source, ``10**(0.4 zero_point)`` (FITS ``FLUXMAG0``)."""
        return 10.0 ** (0.4 * self.zero_point)

    @property
    def njy_per_instflux(self) -> float:
        """nJy per unit instrumental flux, ``10**(0.4 (31.4 - zero_point))``."""
        return 10.0 ** (0.4 * (NJY_AB_ZERO_POINT - self.zero_point))

    def instflux_to_njy(self, flux: Any, flux_err: Any = None) -> Any:
        """Convert instrumental flux to nJy; with ``flux_err`` return ``(njy, njy_err)``.

        The error adds the zero-point error in quadrature:
        ``err = |njy| sqrt((flux_err / flux)^2 + (0.4 ln 10 zero_point_err)^2)``.
        """
        scale = self.njy_per_instflux
        njy = _scalar_or_array(np.multiply(flux, scale))
        if flux_err is None:
            return njy
        rel_zp = 0.4 * math.log(10.0) * self.zero_point_err
        err = np.sqrt((np.multiply(flux_err, scale)) ** 2 + (np.abs(njy) * rel_zp) ** 2)
        return njy, _scalar_or_array(err)

    def njy_to_instflux(self, njy: Any) -> Any:
        """Convert nJy to instrumental flux (inverse of :meth:`instflux_to_njy`)."""
        return _scalar_or_array(np.divide(njy, self.njy_per_instflux))

    def instflux_to_mag(self, flux: Any) -> Any:
        """AB magnitude of an instrumental flux (NaN for flux <= 0, without a warning)."""
        f = np.asarray(flux, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = np.where(f > 0, -2.5 * np.log10(np.where(f > 0, f, 1.0)) + self.zero_point, np.nan)
        return mag if mag.ndim else float(mag)

    def to_cards(self) -> list[tuple[str, Any, str]]:
        """Header cards ``MAGZERO``, ``MAGZERR`` and the derived ``FLUXMAG0``."""
        return [
            ("MAGZERO", float(self.zero_point), "mag = -2.5 log10(instFlux) + MAGZERO (AB)"),
            ("MAGZERR", float(self.zero_point_err), "1-sigma error of MAGZERO (mag)"),
            ("FLUXMAG0", self.flux_mag0, "instFlux of a magnitude-0 source"),
        ]

    @classmethod
    def from_header(cls, header: fits.Header) -> PhotoCalib | None:
        """Build from ``MAGZERO``/``MAGZERR`` (or ``FLUXMAG0``); ``None`` if neither is present."""
        if "MAGZERO" in header:
            return cls(float(header["MAGZERO"]), float(header.get("MAGZERR", 0.0)))
        if "FLUXMAG0" in header and float(header["FLUXMAG0"]) > 0:
            return cls(2.5 * math.log10(float(header["FLUXMAG0"])), 0.0)
        return None


# --------------------------------------------------------------------------- WCS helpers
def wcs_from_header(header: fits.Header) -> WCS | None:
    """Return the celestial WCS of a header (SIP/TPV as astropy reads them), or ``None`` if it has none.

    astropy's "fixed a non-standard keyword" notices are silenced: they are
    informational, and the test suite turns warnings into errors.
    """
    if "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _exact_card(key: str, value: float) -> fits.Card:
    # astropy (and wcslib's to_header) print floats with at most 12-20 characters; a free-format
    # value with Python's shortest round-trip repr keeps every bit and is valid FITS.
    return fits.Card.fromstring(f"{key:<8}= {repr(float(value)).upper():>20}")


def _wcs_header(wcs: WCS | None) -> fits.Header:
    """``wcs.to_header(relax=True)`` with CRVAL/CRPIX/CDELT/PC/CD and SIP values written exactly."""
    if wcs is None:
        return fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        hdr = wcs.to_header(relax=True)
    w = wcs.wcs
    exact: dict[str, float] = {}
    n = int(w.naxis)
    pc, cdelt = w.get_pc(), w.get_cdelt()
    for i in range(n):
        exact[f"CRVAL{i + 1}"] = w.crval[i]
        exact[f"CRPIX{i + 1}"] = w.crpix[i]
        exact[f"CDELT{i + 1}"] = cdelt[i]
        for j in range(n):
            exact[f"PC{i + 1}_{j + 1}"] = pc[i, j]
            if w.has_cd():
                exact[f"CD{i + 1}_{j + 1}"] = w.cd[i, j]
    if wcs.sip is not None:
        for name, arr in (("A", wcs.sip.a), ("B", wcs.sip.b), ("AP", wcs.sip.ap), ("BP", wcs.sip.bp)):
            if arr is not None:
                for (p, q), v in np.ndenumerate(arr):
                    exact[f"{name}_{p}_{q}"] = v
    out = fits.Header()
    for card in hdr.cards:
        if card.keyword in exact and isinstance(card.value, float | int) and not isinstance(card.value, bool):
            out.append(_exact_card(card.keyword, exact[card.keyword]))
        else:
            out.append(card)
    return out


def _as_plane(a: Any, dtype: Any, name: str, shape: tuple[int, ...] | None) -> np.ndarray | None:
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.ndim != 2:
        msg = f"Exposure.{name} must be 2-D (ny, nx), got shape {arr.shape}"
        raise InputError(msg)
    if shape is not None and arr.shape != shape:
        msg = (
            f"Exposure.{name} has shape {arr.shape} but the image has {shape}; give planes of the same shape"
        )
        raise InputError(msg)
    if name == "mask" and arr.dtype.kind == "f":
        msg = (
            f"Exposure.mask must be an integer bit mask (int32), got {arr.dtype}; build it with "
            f"apfast.masks.bitmask"
        )
        raise InputError(msg)
    # asarray keeps views (subimages) when the dtype already matches; >f4 becomes native float32
    return np.asarray(arr, dtype=dtype)


# --------------------------------------------------------------------------- Exposure
@dataclass(eq=False)
class Exposure:
    """An image with its mask, variance, WCS, PSF, photometric calibration and visit info.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Pixels; converted to native-endian float32 (views are kept when already float32).
    mask : array_like of int32, shape (ny, nx), optional
        Bit mask (planes in :data:`apfast.masks.MASK_BITS`).
    variance : array_like, shape (ny, nx), optional
        Per-pixel variance, float32.
    wcs : astropy.wcs.WCS, optional
        Pixel -> sky mapping for the (0-based) pixels of ``image``.
    psf : PsfModel, optional
        The PSF, evaluated at parent-image coordinates (``local + xy0``).
    photo_calib : PhotoCalib, optional
    visit_info : VisitInfo, optional
    metadata : astropy.io.fits.Header
        Extra keywords (provenance, raw header cards ...), written to HDU 0.
    xy0 : tuple of int
        ``(x0, y0)`` of pixel ``[0, 0]`` in the parent image (non-zero for cutouts).
    """

    image: np.ndarray
    mask: np.ndarray | None = None
    variance: np.ndarray | None = None
    wcs: WCS | None = None
    psf: PsfModel | None = None
    photo_calib: PhotoCalib | None = None
    visit_info: VisitInfo | None = None
    metadata: fits.Header = field(default_factory=fits.Header)
    xy0: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.image = _as_plane(self.image, np.float32, "image", None)  # type: ignore[assignment]
        self.mask = _as_plane(self.mask, np.int32, "mask", self.image.shape)
        self.variance = _as_plane(self.variance, np.float32, "variance", self.image.shape)
        if self.psf is not None and not isinstance(self.psf, PsfModel):
            msg = f"Exposure.psf must be an apfast.psf.PsfModel, got {type(self.psf).__name__}"
            raise InputError(msg)
        if self.metadata is None:
            self.metadata = fits.Header()
        elif not isinstance(self.metadata, fits.Header):
            self.metadata = fits.Header(self.metadata)
        self.xy0 = (int(self.xy0[0]), int(self.xy0[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the image."""
        return self.image.shape

    def subimage(self, y0: int, y1: int, x0: int, x1: int) -> Exposure:
        """Return a cutout ``[y0:y1, x0:x1]`` sharing pixel memory with this exposure.

        The WCS is shifted so sky coordinates of a pixel are unchanged, and
        ``xy0`` records the offset so the PSF is evaluated at parent positions.

        Raises
        ------
        InputError
            If the box is empty or outside the image.

        Examples
        --------
        >>> e = Exposure(np.arange(20.0).reshape(4, 5))
        >>> s = e.subimage(1, 3, 2, 5)
        >>> s.image.tolist(), s.xy0
        ([[7.0, 8.0, 9.0], [12.0, 13.0, 14.0]], (2, 1))
        """
        ny, nx = self.shape
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            msg = f"subimage box y[{y0}:{y1}], x[{x0}:{x1}] is empty or outside the {ny}x{nx} image"
            raise InputError(msg)
        sl = (slice(y0, y1), slice(x0, x1))
        wcs = None
        if self.wcs is not None:
            wcs = self.wcs.slice(sl)
        return Exposure(
            self.image[sl],
            None if self.mask is None else self.mask[sl],
            None if self.variance is None else self.variance[sl],
            wcs=wcs,
            psf=self.psf,
            photo_calib=self.photo_calib,
            visit_info=self.visit_info,
            metadata=self.metadata.copy(),
            xy0=(self.xy0[0] + x0, self.xy0[1] + y0),
        )

    def copy(self) -> Exposure:
        """Return a deep copy of the pixel planes, WCS and metadata (PSF and calib are immutable)."""
        return Exposure(
            self.image.copy(),
            None if self.mask is None else self.mask.copy(),
            None if self.variance is None else self.variance.copy(),
            wcs=None if self.wcs is None else self.wcs.deepcopy(),
            psf=self.psf,
            photo_calib=self.photo_calib,
            visit_info=self.visit_info,
            metadata=self.metadata.copy(),
            xy0=self.xy0,
        )


def _metadata_cards(metadata: fits.Header, skip: frozenset[str]) -> list[fits.Card]:
    return [card for card in metadata.cards if card.keyword not in skip and card.keyword != ""]


def _plane_header(wcs: WCS | None, xy0: tuple[int, int]) -> fits.Header:
    hdr = _wcs_header(wcs)
    if xy0 != (0, 0):
        hdr["LTV1"] = (-xy0[0], "minus x0: parent x = this x - LTV1")
        hdr["LTV2"] = (-xy0[1], "minus y0: parent y = this y - LTV2")
    return hdr


def write_exposure(path: str | Path, exp: Exposure, *, config_sha: str | None = None,
                   compression: str = "none", quantize_level: float = 16.0) -> Path:
    """Write an exposure to a multi-extension FITS file, atomically.

    Parameters
    ----------
    path : str or Path
        Output file; its directory must exist. An existing file is replaced.
    exp : Exposure
        The exposure; only its planes that are not ``None`` are written.
    config_sha : str, optional
        sha256 of the pipeline config that made the exposure (keyword ``CFGSHA``).
    compression : {'none', 'mask', 'lossless', 'quantized'}
        FITS tile compression of the planes (:data:`COMPRESSIONS`). Keep ``'none'``
        for files read in boxes many times (deepCoadd patches): only uncompressed
        planes are memory-mapped.
    quantize_level : float
        With ``'quantized'``: quantisation steps per noise sigma (estimated by
        CFITSIO's method per tile). The rounding error is uniform over one step, so
        its rms is ``sigma / (quantize_level * sqrt(12))`` (``sigma / 55`` at 16).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        On an unknown ``compression`` or a ``quantize_level`` that is not finite and > 0.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> e = Exposure(np.ones((4, 6)), np.zeros((4, 6), np.int32), np.ones((4, 6)))
    >>> _ = write_exposure(d / "e.fits", e, compression="lossless")
    >>> bool((read_exposure(d / "e.fits").image == 1).all())
    True
    """
    return write_hdulist(path, exposure_hdulist(exp, config_sha=config_sha, compression=compression,
                                                quantize_level=quantize_level))


def _check_compression(compression: str, quantize_level: float) -> None:
    if compression not in COMPRESSIONS:
        msg = f"compression={compression!r} is not one of {', '.join(repr(k) for k in COMPRESSIONS)}"
        raise InputError(msg)
    if compression == "quantized" and not (math.isfinite(quantize_level) and quantize_level > 0):
        msg = f"quantize_level={quantize_level!r} must be a finite number > 0 (steps per noise sigma, e.g. 16)"
        raise InputError(msg)


def _plane_hdu(data: np.ndarray, header: fits.Header, name: str, compression: str,
               quantize_level: float) -> fits.ImageHDU:
    """One plane as an ImageHDU, or a CompImageHDU as ``compression`` asks (the mask always lossless)."""
    is_mask = name == "MASK"
    if compression == "none" or (compression == "mask" and not is_mask):
        return fits.ImageHDU(data, header=header, name=name)
    tile = (min(_TILE_ROWS, data.shape[0]), data.shape[1])
    if is_mask:
        return fits.CompImageHDU(data, header=header, name=name, compression_type="RICE_1", tile_shape=tile)
    if compression == "lossless":  # quantize_level=0: the float bytes themselves, shuffled and gzipped
        return fits.CompImageHDU(data, header=header, name=name, compression_type="GZIP_2",
                                 quantize_level=0.0, tile_shape=tile)
    # SUBTRACTIVE_DITHER_2 keeps exact zeros exact; a seed from the data's checksum (not the clock,
    # astropy's default) makes the same exposure give the same file
    return fits.CompImageHDU(data, header=header, name=name, compression_type="RICE_1",
                             quantize_level=float(quantize_level), quantize_method=SUBTRACTIVE_DITHER_2,
                             dither_seed=DITHER_SEED_CHECKSUM, tile_shape=tile)


def exposure_hdulist(exp: Exposure, *, config_sha: str | None = None, compression: str = "none",
                     quantize_level: float = 16.0) -> fits.HDUList:
    """The FITS form of an exposure, as :func:`write_exposure` writes it.

    The HDUs hold ``exp``'s own native planes (no copies): write the list with
    :func:`write_hdulist`, which converts them in byte-swapped chunks and never
    swaps them in place (astropy's own writer swaps native arrays in place and
    back, which a thread still reading them must not see). Compressed planes
    (``compression``, see :func:`write_exposure`) are ``CompImageHDU`` HDUs; astropy
    compresses them from copies of each tile, never changing the plane.
    """
    from apfast import __version__

    _check_compression(compression, quantize_level)

    reserved = _STRUCTURAL | _VISIT_CARDS | _PHOTO_CARDS | frozenset(_MARKERS)
    primary = fits.PrimaryHDU()
    hdr = primary.header
    hdr["APFTYPE"] = ("EXPOSURE", "apfast exposure file")
    hdr["APFVERS"] = (__version__, "apfast version that wrote the file")
    if config_sha is not None:
        hdr["CFGSHA"] = str(config_sha)  # 64 hex characters leave no room for a comment
    if exp.visit_info is not None:
        for key, value, comment in exp.visit_info.to_cards():
            hdr[key] = (value, comment)
    if exp.photo_calib is not None:
        for key, value, comment in exp.photo_calib.to_cards():
            hdr[key] = (value, comment)
    hdr.extend(_metadata_cards(exp.metadata, reserved))

    hdus: list[Any] = [primary]
    plane_hdr = _plane_header(exp.wcs, exp.xy0)
    cq = (compression, quantize_level)
    hdus.append(_plane_hdu(np.ascontiguousarray(exp.image), plane_hdr.copy(), "IMAGE", *cq))
    if exp.mask is not None:
        mhdr = plane_hdr.copy()
        for key, bit, comment in masks.header_cards():
            # names longer than 8 characters need HIERARCH cards (as Rubin's afw writes them)
            mhdr[key if len(key) <= 8 else f"HIERARCH {key}"] = (bit, comment)
        hdus.append(_plane_hdu(np.ascontiguousarray(exp.mask), mhdr, "MASK", *cq))
    if exp.variance is not None:
        hdus.append(_plane_hdu(np.ascontiguousarray(exp.variance), plane_hdr.copy(), "VARIANCE", *cq))
    if exp.psf is not None:
        psf_hdus = exp.psf.to_hdus()
        for h in psf_hdus:
            if not h.name.startswith("PSF_"):
                msg = (
                    f"{type(exp.psf).__name__}.to_hdus returned extension {h.name!r}; PSF extensions must be "
                    f"named PSF_*"
                )
                raise InputError(msg)
        hdus.extend(psf_hdus)
    return fits.HDUList(hdus)


def write_hdulist(path: str | Path, hdul: fits.HDUList) -> Path:
    """Write an HDU list atomically (temporary name beside ``path``, then rename).

    A primary HDU without data followed by image HDUs of plain numeric arrays (what
    :func:`exposure_hdulist` makes) is streamed: each header as astropy formats it,
    each array converted to big-endian in 2 MB chunks through one reused buffer
    (the arrays are only read; no full-size copy, no page faults for one).
    Tile-compressed HDUs among them are compressed by astropy into memory (it
    compresses copies of the tiles) and their bytes written in turn. Anything
    else goes through astropy's writer.
    """
    path = Path(path)
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        if _streamable(hdul):
            with open(tmp, "wb") as f:
                for hdu in hdul:
                    if isinstance(hdu, fits.CompImageHDU):
                        _write_comp_hdu(f, hdu)
                    elif hdu.data is None:
                        f.write(hdu.header.tostring().encode("ascii"))
                    else:
                        _write_image_hdu(f, hdu)
        else:
            hdul.writeto(tmp)
    log.debug("wrote %s (%d HDUs)", path, len(hdul))
    return path


_STREAM_KINDS = frozenset({"f4", "f8", "i2", "i4", "i8", "u1"})


def _streamable(hdul: fits.HDUList) -> bool:
    if not hdul or not isinstance(hdul[0], fits.PrimaryHDU) or hdul[0].data is not None:
        return False
    for hdu in hdul[1:]:
        if type(hdu) is fits.CompImageHDU and hdu.data is not None:
            continue
        if type(hdu) is not fits.ImageHDU or hdu.data is None:
            return False
        d = hdu.data
        if f"{d.dtype.kind}{d.dtype.itemsize}" not in _STREAM_KINDS or d.ndim < 1 or d.size == 0:
            return False
        if any(k in hdu.header for k in ("BSCALE", "BZERO", "BLANK")):
            return False
    return True


def _write_image_hdu(f: Any, hdu: fits.ImageHDU) -> None:
    """Header (as astropy would write it) + the data in big-endian chunks + zero padding to 2880 bytes."""
    data = np.ascontiguousarray(hdu.data)
    hdu.update_header()  # BITPIX / NAXISn from the data, in the mandatory order
    f.write(hdu.header.tostring().encode("ascii"))
    rows2d = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
    be = rows2d.dtype.newbyteorder(">")
    step = max(1, (2 << 20) // max(1, rows2d.shape[1] * rows2d.itemsize))
    buf = np.empty((min(step, rows2d.shape[0]), rows2d.shape[1]), dtype=be)
    for y0 in range(0, rows2d.shape[0], step):
        blk = rows2d[y0 : y0 + step]
        out = buf[: blk.shape[0]]
        np.copyto(out, blk)
        out.tofile(f)
    pad = -data.nbytes % 2880
    if pad:
        f.write(b"\0" * pad)


_EMPTY_PRIMARY_BYTES = len(fits.PrimaryHDU().header.tostring())  # 2880


def _write_comp_hdu(f: Any, hdu: fits.CompImageHDU) -> None:
    """A tile-compressed HDU's bytes: astropy writes it after an empty primary HDU, which is skipped."""
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    f.write(buf.getbuffer()[_EMPTY_PRIMARY_BYTES:])


def _native(data: Any, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(data, dtype=dtype)


def _box(hdu: Any, sl: tuple[slice, slice]) -> np.ndarray:
    """Pixels ``sl`` of a plane: a slice of the memory map, or for a tile-compressed plane only the
    tiles (16-row bands) that overlap the box, decompressed (``.data`` would decompress them all)."""
    if isinstance(hdu, fits.CompImageHDU):
        return hdu.section[sl]
    return hdu.data[sl]


def read_exposure(path: str | Path, *, bbox: tuple[int, int, int, int] | None = None) -> Exposure:
    """Read a file written by :func:`write_exposure`.

    Arrays come back native-endian and C-contiguous (float32 image and
    variance, int32 mask). ``metadata`` holds the primary cards that are not
    visit info, photo calib or apfast markers. With ``bbox = (y0, y1, x0, x1)``
    only that box of the planes is read (as :meth:`Exposure.subimage` of the whole).
    Tile-compressed planes (``write_exposure(compression=...)``) are decompressed
    transparently; with ``bbox`` only their tiles that overlap the box.

    Raises
    ------
    InputError
        If the file does not exist, is not FITS, or has no ``IMAGE`` extension.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"exposure file {path} does not exist"
        raise InputError(msg)
    try:
        hdul = fits.open(path, memmap=bbox is not None)
    except OSError as exc:
        msg = f"{path} is not a readable FITS file ({exc}); it is not an apfast exposure"
        raise InputError(msg) from None
    with hdul:
        names = [h.name for h in hdul]
        if "IMAGE" not in names:
            msg = (
                f"{path} is not an apfast exposure: it has no 'IMAGE' extension (extensions: {names}); "
                "write it with apfast.exposure.write_exposure"
            )
            raise InputError(msg)
        primary = hdul[0].header
        img_hdu = hdul["IMAGE"]
        if img_hdu.data is None or img_hdu.data.ndim != 2:
            msg = f"{path}: the IMAGE extension holds no 2-D image"
            raise InputError(msg)
        wcs = wcs_from_header(img_hdu.header)
        xy0 = (-int(img_hdu.header.get("LTV1", 0)), -int(img_hdu.header.get("LTV2", 0)))
        if bbox is None:
            image = _native(img_hdu.data, np.float32)
            mask = _native(hdul["MASK"].data, np.int32) if "MASK" in names else None
            variance = _native(hdul["VARIANCE"].data, np.float32) if "VARIANCE" in names else None
        else:  # read only the rows/columns asked for (section access: the rest never leaves the disk)
            ny, nx = img_hdu.shape
            y0, y1, x0, x1 = (int(v) for v in bbox)
            if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
                msg = f"{path}: box y[{y0}:{y1}], x[{x0}:{x1}] is empty or outside the {ny}x{nx} image"
                raise InputError(msg)
            sl = (slice(y0, y1), slice(x0, x1))
            image = _native(_box(img_hdu, sl), np.float32)  # memory-mapped: only these rows are read
            mask = _native(_box(hdul["MASK"], sl), np.int32) if "MASK" in names else None
            variance = _native(_box(hdul["VARIANCE"], sl), np.float32) if "VARIANCE" in names else None
            wcs = wcs.slice(sl) if wcs is not None else None
            xy0 = (xy0[0] + x0, xy0[1] + y0)
        psf_hdus = [h for h in hdul if h.name.startswith("PSF_")]
        psf = psf_from_hdus(psf_hdus, source=str(path)) if psf_hdus else None
        reserved = _STRUCTURAL | _VISIT_CARDS | _PHOTO_CARDS | frozenset(_MARKERS)
        metadata = fits.Header(_metadata_cards(primary, reserved))
        return Exposure(
            image,
            mask,
            variance,
            wcs=wcs,
            psf=psf,
            photo_calib=PhotoCalib.from_header(primary),
            visit_info=VisitInfo.from_header(primary),
            metadata=metadata,
            xy0=xy0,
        )


# --------------------------------------------------------------------------- Background
@dataclass(frozen=True, eq=False, kw_only=True)
class Background:
    """A binned sky model: mesh values on a grid of ``bin_size`` boxes over an image.

    This is only the container and its FITS I/O; the smooth interpolation of
    the mesh to full resolution is done by the background stage.

    Parameters
    ----------
    bin_size : int
        Side of a mesh box in pixels.
    values : ndarray, shape (my, mx)
        Sky level per box (image units), float32.
    image_shape : tuple of int
        ``(ny, nx)`` of the image the mesh covers.
    interpolation : str
        Name of the interpolation used to expand the mesh (e.g. ``'akima'``).
    variance : ndarray, shape (my, mx), optional
        Variance of each mesh value.
    metadata : astropy.io.fits.Header
        Extra keywords.
    """

    bin_size: int
    values: np.ndarray
    image_shape: tuple[int, int]
    interpolation: str = "akima"
    variance: np.ndarray | None = None
    metadata: fits.Header = field(default_factory=fits.Header)

    def __post_init__(self) -> None:
        if int(self.bin_size) != self.bin_size or self.bin_size < 1:
            msg = f"Background bin_size must be a positive integer, got {self.bin_size}"
            raise InputError(msg)
        vals = np.ascontiguousarray(self.values, dtype=np.float32)
        if vals.ndim != 2 or vals.size == 0:
            msg = f"Background values must be a non-empty 2-D mesh (my, mx), got shape {vals.shape}"
            raise InputError(msg)
        var = None
        if self.variance is not None:
            var = np.ascontiguousarray(self.variance, dtype=np.float32)
            if var.shape != vals.shape:
                msg = f"Background variance shape {var.shape} differs from the mesh shape {vals.shape}"
                raise InputError(msg)
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) != 2 or min(shape) < 1:
            msg = f"Background image_shape must be (ny, nx) with positive sizes, got {self.image_shape}"
            raise InputError(msg)
        object.__setattr__(self, "bin_size", int(self.bin_size))
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "variance", var)
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "interpolation", str(self.interpolation))


def write_background(path: str | Path, bkg: Background) -> Path:
    """Write a :class:`Background` atomically: HDU 0 keywords, ``BKG_MESH`` and optional ``BKG_VAR``."""
    path = Path(path)
    primary = fits.PrimaryHDU()
    hdr = primary.header
    hdr["APFTYPE"] = ("BACKGROUND", "apfast background mesh")
    hdr["BKGBIN"] = (bkg.bin_size, "mesh box side (pixels)")
    hdr["BKGNY"] = (bkg.image_shape[0], "rows of the image covered")
    hdr["BKGNX"] = (bkg.image_shape[1], "columns of the image covered")
    hdr["BKGINTRP"] = (bkg.interpolation, "mesh interpolation")
    reserved = _STRUCTURAL | frozenset({"APFTYPE", "BKGBIN", "BKGNY", "BKGNX", "BKGINTRP"})
    hdr.extend(_metadata_cards(bkg.metadata, reserved))
    hdus: list[Any] = [primary, fits.ImageHDU(bkg.values, name="BKG_MESH")]
    if bkg.variance is not None:
        hdus.append(fits.ImageHDU(bkg.variance, name="BKG_VAR"))
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return path


def read_background(path: str | Path) -> Background:
    """Read a file written by :func:`write_background`.

    Raises
    ------
    InputError
        If the file is missing, not FITS, or lacks ``BKG_MESH`` or the ``BKG*`` keywords.
    """
    path = Path(path)
    try:
        hdul = fits.open(path, memmap=False)
    except (OSError, FileNotFoundError) as exc:
        msg = f"cannot read background file {path}: {exc}"
        raise InputError(msg) from None
    with hdul:
        names = [h.name for h in hdul]
        hdr = hdul[0].header
        missing = [k for k in ("BKGBIN", "BKGNY", "BKGNX") if k not in hdr]
        if "BKG_MESH" not in names or missing:
            msg = (
                f"{path} is not an apfast background: needs a BKG_MESH extension and keywords BKGBIN, BKGNY, "
                f"BKGNX (missing: {missing + ([] if 'BKG_MESH' in names else ['BKG_MESH'])})"
            )
            raise InputError(msg)
        reserved = _STRUCTURAL | frozenset({"APFTYPE", "BKGBIN", "BKGNY", "BKGNX", "BKGINTRP"})
        return Background(
            bin_size=int(hdr["BKGBIN"]),
            values=_native(hdul["BKG_MESH"].data, np.float32),
            image_shape=(int(hdr["BKGNY"]), int(hdr["BKGNX"])),
            interpolation=str(hdr.get("BKGINTRP", "akima")),
            variance=_native(hdul["BKG_VAR"].data, np.float32) if "BKG_VAR" in names else None,
            metadata=fits.Header(_metadata_cards(hdr, reserved)),
        )
