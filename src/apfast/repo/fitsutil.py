"""Small FITS helpers: a header-only scanner and WCS from headers.

The scanner walks a FITS file block by block, parsing each header and
skipping each data unit by its declared size, so ingest never decompresses
pixels: registering a 62-CCD DECam raw costs a few milliseconds. It also
catches truncated files (a data unit that runs past the end of the file) and
garbage (no ``END`` card), naming the file and the HDU.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from apfast.errors import IngestError

__all__ = ["HeaderInfo", "image_wcs", "scan_headers"]

_BLOCK = 2880
_CARD = 80

#: Keywords that make up a celestial WCS (copied into a clean image header).
_WCS_PREFIXES = (
    "CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_", "PV1_", "PV2_",
    "A_", "B_", "AP_", "BP_",
)
_WCS_KEYS = ("RADESYS", "RADECSYS", "EQUINOX", "WCSAXES", "LONPOLE", "LATPOLE", "MJDREF", "A_ORDER", "B_ORDER")


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """One HDU as the scanner saw it: its header, index, byte offsets and raw header bytes."""

    index: int
    header: fits.Header
    header_offset: int
    data_offset: int
    data_size: int
    raw: bytes

    @property
    def compressed(self) -> bool:
        """Whether this is a tile-compressed image stored as a binary table."""
        return bool(self.header.get("ZIMAGE", False))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Image shape ``(rows, columns)`` (numpy order), also for compressed HDUs; ``()`` if none."""
        prefix = "ZNAXIS" if self.compressed else "NAXIS"
        if self.header.get("XTENSION", "IMAGE").strip() == "BINTABLE" and not self.compressed:
            return ()
        n = int(self.header.get(prefix, 0))
        return tuple(int(self.header.get(f"{prefix}{i}", 0)) for i in range(n, 0, -1))


def _data_size(h: fits.Header) -> int:
    naxis = int(h.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = 1
    for i in range(1, naxis + 1):
        n *= int(h[f"NAXIS{i}"])
    bits = abs(int(h["BITPIX"]))
    size = bits // 8 * int(h.get("GCOUNT", 1)) * (int(h.get("PCOUNT", 0)) + n)
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def scan_headers(path: str | Path) -> list[HeaderInfo]:
    """Read every header of a FITS file without reading any data unit.

    Parameters
    ----------
    path : str or Path
        A FITS file (``.fits`` or tile-compressed ``.fits.fz``).

    Returns
    -------
    list of HeaderInfo
        One per HDU, in file order.

    Raises
    ------
    IngestError
        If the file cannot be read, is not FITS, has a header without ``END``, or is
        truncated (a data unit extends past the end of the file). The message names
        the file and the HDU.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except OSError as exc:
        msg = f"{path}: cannot read the file ({exc.strerror})"
        raise IngestError(msg) from None
    out: list[HeaderInfo] = []
    with fh:
        offset = 0
        while offset < size:
            fh.seek(offset)
            chunks = []
            pos = offset
            if out:
                head = fh.read(9)
                fh.seek(offset)
                if head != b"XTENSION=":
                    # Trailing padding or garbage after the last HDU: stop, as cfitsio does.
                    break
            while True:
                block = fh.read(_BLOCK)
                if not out and pos == 0 and not block.startswith(b"SIMPLE  ="):
                    msg = f"{path}: not a FITS file (it does not start with a SIMPLE card)"
                    raise IngestError(msg)
                if len(block) < _BLOCK:
                    msg = (
                        f"{path}: HDU {len(out)} header is truncated at byte {pos} "
                        "(no END card); the file is corrupt or was cut short, download it again"
                    )
                    raise IngestError(msg)
                chunks.append(block)
                pos += _BLOCK
                if _has_end(block):
                    break
            raw = b"".join(chunks)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    header = fits.Header.fromstring(raw.decode("ascii", errors="replace"))
                dsize = _data_size(header)
            except (ValueError, KeyError) as exc:
                msg = f"{path}: HDU {len(out)} has an unreadable header ({exc})"
                raise IngestError(msg) from None
            data_offset = pos
            if data_offset + dsize > size:
                msg = (
                    f"{path}: HDU {len(out)} is truncated: its data needs {dsize} bytes from byte "
                    f"{data_offset} but the file ends at byte {size}; the file is corrupt or was cut short"
                )
                raise IngestError(msg)
            out.append(HeaderInfo(len(out), header, offset, data_offset, dsize, raw))
            offset = data_offset + dsize
    if not out:
        msg = f"{path}: empty file, not FITS"
        raise IngestError(msg)
    return out


def _has_end(block: bytes) -> bool:
    for i in range(0, _BLOCK, _CARD):
        if block[i : i + 8] == b"END     ":
            return True
    return False


def fingerprint(infos: list[HeaderInfo]) -> str:
    """A sha1 of every header's bytes: identifies a file without reading its pixels.

    Headers carry ``CHECKSUM``/``DATASUM`` cards in real archive files, so two
    different exposures never share a fingerprint.
    """
    h = hashlib.sha1(usedforsecurity=False)
    for info in infos:
        h.update(info.raw)
    return h.hexdigest()


def image_wcs(header: fits.Header, shape: tuple[int, int] | None = None) -> WCS | None:
    """Build a celestial WCS from the WCS cards of ``header`` (also a compressed-HDU header).

    Only WCS keywords are copied into a clean two-axis header, so table keywords of
    a tile-compressed HDU do not confuse astropy. Returns ``None`` when the header
    has no celestial WCS.
    """
    if "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    clean = fits.Header()
    clean["NAXIS"] = 2
    if shape is not None:
        clean["NAXIS1"] = shape[1]
        clean["NAXIS2"] = shape[0]
    for card in header.cards:
        key = card.keyword
        if key.startswith(_WCS_PREFIXES) or key in _WCS_KEYS:
            clean[key] = card.value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(clean)
        except Exception:  # astropy raises many types for bad WCS cards
            return None
    return wcs if wcs.has_celestial else None
