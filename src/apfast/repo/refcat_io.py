"""Reference-catalogue file handling for :mod:`apfast.repo.refcat`: input tables and shard files.

Reads Gaia / Pan-STARRS / generic CSV and FITS exports, maps their columns to the standard
refcat columns (with unit conversions), validates them, and reads and writes the per-pixel
shard FITS files. No catalogue-folder logic lives here: :mod:`apfast.repo.refcat` owns that.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import ascii as astropy_ascii
from astropy.io import fits

from apfast.errors import InputError, RefcatError

__all__ = ["AB_NJY_ZEROPOINT", "mag_to_njy"]

#: AB magnitude of 1 nJy: ``flux_nJy = 10**(-0.4 * (mag - AB_NJY_ZEROPOINT))``.
AB_NJY_ZEROPOINT = 31.4

_MAS_TO_DEG = 1.0 / 3.6e6
_BASE_COLUMNS = ("id", "ra", "dec", "ra_err", "dec_err", "pm_ra", "pm_dec", "epoch")
_UNITS = {"ra": "deg", "dec": "deg", "ra_err": "deg", "dec_err": "deg", "pm_ra": "mas/yr",
          "pm_dec": "mas/yr", "epoch": "yr"}

# kind -> (bands, {standard name: (archive column, conversion, required)}).
# Conversions: "" none, "mas" mas -> deg, "arcsec" arcsec -> deg, "snr" flux_over_error -> mag error.
_KINDS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str, bool]]]] = {
    "gaia": (("G", "BP", "RP"), {
        "id": ("source_id", "", True), "ra": ("ra", "", True), "dec": ("dec", "", True),
        "ra_err": ("ra_error", "mas", True), "dec_err": ("dec_error", "mas", True),
        "pm_ra": ("pmra", "", True), "pm_dec": ("pmdec", "", True), "epoch": ("ref_epoch", "", True),
        "G_mag": ("phot_g_mean_mag", "", True), "BP_mag": ("phot_bp_mean_mag", "", True),
        "RP_mag": ("phot_rp_mean_mag", "", True),
        # The Gaia archive gives flux S/N rather than magnitude errors; used when exported.
        "G_magErr": ("phot_g_mean_flux_over_error", "snr", False),
        "BP_magErr": ("phot_bp_mean_flux_over_error", "snr", False),
        "RP_magErr": ("phot_rp_mean_flux_over_error", "snr", False),
    }),
    "ps1": (("g", "r", "i", "z"), {
        "id": ("obj_id", "", True), "ra": ("ra", "", True), "dec": ("dec", "", True),
        **{f"{b}_mag": (f"{b}_mean_psf_mag", "", True) for b in "griz"},
        **{f"{b}_magErr": (f"{b}_mean_psf_mag_error", "", True) for b in "griz"},
    }),
    "generic": ((), {"id": ("id", "", True), "ra": ("ra", "", True), "dec": ("dec", "", True)}),
}
# Units of ra_err / dec_err given through --column-map, per kind (Gaia mas, PS1 arcsec).
_ERR_CONVERSION = {"gaia": "mas", "ps1": "arcsec", "generic": ""}


def mag_to_njy(mag: np.ndarray, mag_err: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Convert AB magnitudes to fluxes in nJy, as Rubin reference catalogues store them.

    Parameters
    ----------
    mag : array_like
        Magnitudes (NaN allowed).
    mag_err : array_like, optional
        Magnitude errors; NaN flux errors if omitted.

    Returns
    -------
    flux, flux_err : numpy.ndarray
        ``10**(-0.4 * (mag - 31.4))`` and ``flux * mag_err * ln(10) / 2.5`` (float64, nJy).

    Examples
    --------
    >>> float(mag_to_njy(31.4)[0])
    1.0
    """
    mag = np.asarray(mag, dtype=np.float64)
    flux = 10.0 ** (-0.4 * (mag - AB_NJY_ZEROPOINT))
    if mag_err is None:
        return flux, np.full_like(flux, np.nan)
    return flux, flux * np.asarray(mag_err, dtype=np.float64) * (math.log(10.0) / 2.5)


def _dtype(bands: Sequence[str]) -> np.dtype:
    fields = [("id", "<i8")] + [(c, "<f8") for c in _BASE_COLUMNS[1:]]
    for b in bands:
        fields += [(f"{b}_{s}", "<f8") for s in ("mag", "magErr", "flux", "fluxErr")]
    return np.dtype(fields)


def _unit(col: str) -> str:
    if col.endswith(("_flux", "_fluxErr")):
        return "nJy"
    if col.endswith(("_mag", "_magErr")):
        return "mag"
    return _UNITS.get(col, "")


# ----------------------------------------------------------------------------------------------
# Reading and validating input files (no writes)
# ----------------------------------------------------------------------------------------------

def _is_fits(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as fh:
            head = fh.read(6)
    return head == b"SIMPLE"


def _read_input(path: Path) -> dict[str, np.ndarray]:
    """Read a CSV or FITS table into {column name: ndarray}; masked/null values become NaN."""
    out: dict[str, np.ndarray] = {}
    try:
        if _is_fits(path):
            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU | fits.TableHDU)), None)
                if hdu is None:
                    msg = f"{path}: no FITS table extension found; give a FITS binary table or a CSV file"
                    raise RefcatError(msg)
                for name in hdu.columns.names:
                    out[name] = np.asarray(hdu.data[name])
        else:
            # astropy's C CSV reader; empty fields come back masked.
            table = astropy_ascii.read(str(path), format="csv", guess=False, fast_reader=True)
            for name in table.colnames:
                col = table[name]
                if getattr(col, "mask", None) is not None and np.any(col.mask):
                    if col.dtype.kind in "iuf":
                        out[name] = np.ma.filled(col.astype(np.float64), np.nan)
                    else:
                        out[name] = np.ma.filled(col, "")
                else:
                    out[name] = np.asarray(col)
    except (OSError, ValueError, astropy_ascii.InconsistentTableError) as exc:
        msg = f"{path}: cannot read as a CSV (comma, header row) or FITS table: {exc}"
        raise RefcatError(msg) from exc
    return out


def _detect_kind(columns: Sequence[str], path: Path) -> str:
    lower = {c.lower() for c in columns}
    if "source_id" in lower and "phot_g_mean_mag" in lower:
        return "gaia"
    if "obj_id" in lower or any(c.endswith("_mean_psf_mag") for c in lower):
        return "ps1"
    if {"id", "ra", "dec"} <= lower:
        return "generic"
    msg = (f"{path}: cannot tell the catalogue kind from its columns {sorted(columns)}; "
           f"pass --kind gaia|ps1|generic and, for other column names, "
           f"--column-map id=<col>,ra=<col>,dec=<col>,g_mag=<col>,...")
    raise RefcatError(msg)


def _resolve_map(kind: str, column_map: Mapping[str, str] | None) -> tuple[tuple[str, ...], dict]:
    """Return (bands, {standard: (column or '', conversion, required)}) for kind + overrides."""
    bands, base = _KINDS[kind]
    spec = dict(base)
    allowed = set(spec) | set(_BASE_COLUMNS)
    for std, col in (column_map or {}).items():
        is_band = std.endswith(("_mag", "_magErr")) and len(std.split("_")[0]) > 0
        if std not in allowed and not (kind == "generic" and is_band):
            msg = (f"column map key {std!r} is not a standard column of a {kind} catalogue; "
                   f"use one of {sorted(allowed)} (bands: <band>_mag, <band>_magErr for generic)")
            raise InputError(msg)
        if std in ("id", "ra", "dec") and not col:
            msg = f"column map {std}= is empty; {std} is required: give the input column name"
            raise InputError(msg)
        conv = spec.get(std, ("", "", False))[1]
        if std in ("ra_err", "dec_err"):
            conv = _ERR_CONVERSION[kind]
        if std.endswith("_magErr"):
            conv = ""  # a mapped column holds a magnitude error, not a flux S/N
        spec[std] = (col or "", conv, bool(col))
    if kind == "generic":
        bands = tuple(dict.fromkeys(s[:-4] for s in spec if s.endswith("_mag")))
        orphans = [s for s in spec if s.endswith("_magErr") and s[:-7] not in bands]
        if orphans:
            msg = f"column map gives {orphans} without the matching <band>_mag; add e.g. {orphans[0][:-7]}_mag=<col>"
            raise InputError(msg)
    return bands, spec


@dataclass(slots=True)
class _Input:
    path: Path
    sha256: str
    rows: np.ndarray  # structured, _dtype(bands)
    pix: np.ndarray   # int64 HEALPix nested pixel per row


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(path: Path, data: dict[str, np.ndarray], bands: Sequence[str], spec: dict
             ) -> tuple[np.ndarray, dict[str, str]]:
    """Map, unit-convert and validate one input table; also return {standard: column used}."""
    by_lower = {c.lower(): c for c in data}
    missing = [(std, col) for std, (col, _, req) in spec.items()
               if req and col not in data and col.lower() not in by_lower]
    if missing:
        wanted = ", ".join(f"{std} <- {col!r}" for std, col in missing)
        example = ",".join(f"{std}=<your column>" for std, _ in missing[:3])
        msg = (f"{path}: missing column(s) {wanted}; columns found: {sorted(data)}; "
               f"pass --column-map {example} (column_map={{standard: input column}}) "
               f"or --kind for another catalogue kind")
        raise RefcatError(msg)
    n = len(next(iter(data.values()))) if data else 0
    if n == 0:
        msg = f"{path}: the table has no rows; give a catalogue file with sources"
        raise RefcatError(msg)
    rows = np.empty(n, dtype=_dtype(bands))
    for name in rows.dtype.names:
        rows[name] = np.nan if name != "id" else 0
    used: dict[str, str] = {}
    for std, (col, conv, _) in spec.items():
        if not col or (col not in data and col.lower() not in by_lower):
            continue
        used[std] = col if col in data else by_lower[col.lower()]
        values = data[used[std]]
        if std == "id":
            if values.dtype.kind not in "iu":
                msg = (f"{path}: id column {col!r} has type {values.dtype}, not integer; "
                       f"map id to an integer column with --column-map id=<col>")
                raise RefcatError(msg)
            rows["id"] = values
            continue
        try:
            v = np.asarray(values, dtype=np.float64)
        except ValueError as exc:
            msg = f"{path}: column {col!r} (for {std}) is not numeric: {exc}"
            raise RefcatError(msg) from exc
        if conv == "mas":
            v = v * _MAS_TO_DEG
        elif conv == "arcsec":
            v = v / 3600.0
        elif conv == "snr":
            with np.errstate(divide="ignore", invalid="ignore"):
                v = (2.5 / math.log(10.0)) / v
        rows[std] = v
    ra, dec = rows["ra"], rows["dec"]
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (ra >= 0) & (ra <= 360) & (np.abs(dec) <= 90))
    if bad.any():
        first = (np.flatnonzero(bad)[:5] + 1).tolist()
        msg = (f"{path}: {int(bad.sum())} of {n} rows have non-finite or out-of-range ra/dec "
               f"(need 0 <= ra <= 360, -90 <= dec <= 90 deg; first bad data rows {first}); "
               f"fix or drop those rows and ingest again")
        raise RefcatError(msg)
    rows["ra"] = np.where(ra == 360.0, 0.0, ra)
    ids = np.sort(rows["id"])
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.size:
        msg = f"{path}: {dup.size} duplicate source ids (e.g. {int(dup[0])}); each id must appear once"
        raise RefcatError(msg)
    for b in bands:
        rows[f"{b}_flux"], rows[f"{b}_fluxErr"] = mag_to_njy(rows[f"{b}_mag"], rows[f"{b}_magErr"])
    return rows, used


_TFORM = {"K": ">i8", "D": ">f8", "J": ">i4", "E": ">f4"}


def _table_layout(buf: bytes) -> tuple[np.dtype, int, int]:
    """(on-disk dtype, row count, data offset) of the first extension of a shard we wrote.

    Raises ValueError for anything outside the simple layout ``_write_shard`` produces (no
    scaling, no heap, K/D/J/E columns); the caller then falls back to astropy.
    """
    offset = 0
    cards: dict[str, str] = {}
    for hdu in range(2):
        cards = {}
        while True:
            if offset + 2880 > len(buf):
                raise ValueError("truncated header")
            block = buf[offset:offset + 2880].decode("ascii")
            offset += 2880
            for i in range(0, 2880, 80):
                key, val = block[i:i + 8].strip(), block[i + 10:i + 80].split("/")[0].strip()
                if key == "END":
                    break
                if block[i + 8:i + 10] == "= ":
                    cards[key] = val.strip("' ")
            else:
                continue
            break
        if hdu == 0 and cards.get("NAXIS") != "0":
            raise ValueError("primary HDU has data")
    if cards.get("XTENSION") != "BINTABLE" or cards.get("PCOUNT", "0") != "0":
        raise ValueError("not a plain binary table")
    if any(k.startswith(("TSCAL", "TZERO")) for k in cards):
        raise ValueError("scaled columns")
    fields = [(cards[f"TTYPE{i}"], _TFORM[cards[f"TFORM{i}"].lstrip("1")])
              for i in range(1, int(cards["TFIELDS"]) + 1)]
    disk = np.dtype(fields)
    if disk.itemsize != int(cards["NAXIS1"]):
        raise ValueError("row size mismatch")
    return disk, int(cards["NAXIS2"]), offset


def _read_shard(path: Path, dtype: np.dtype, select: Callable | None = None) -> np.ndarray:
    """Read the fields of ``dtype`` from a shard into a native-endian structured array.

    ``select(ra, dec) -> bool mask``, if given, keeps only those rows (applied before the copy).

    Shards are small and many, and astropy's generic reader costs ~5 ms per file, so the
    layout ``_write_shard`` produces is parsed directly; anything else goes through astropy.
    """
    names = dtype.names
    assert names is not None  # a structured dtype
    buf = path.read_bytes()
    try:
        disk, n, offset = _table_layout(buf)
        if not set(names) <= set(disk.names or ()) or offset + n * disk.itemsize > len(buf):
            raise ValueError("columns differ")
        data = np.frombuffer(buf, dtype=disk, count=n, offset=offset)
    except (ValueError, KeyError, UnicodeDecodeError):
        with fits.open(path, memmap=False) as hdul:
            data = hdul[1].data
            if select is not None:
                data = data[select(np.asarray(data["ra"]), np.asarray(data["dec"]))]
            out = np.empty(len(data), dtype=dtype)
            for name in names:
                out[name] = data[name]
        return out
    if select is not None:
        data = data[select(data["ra"], data["dec"])]
        n = len(data)
    out = np.empty(n, dtype=dtype)
    for name in names:
        out[name] = data[name]
    return out


_HEADERS: dict[tuple, str] = {}


def _write_shard(path: Path, rows: np.ndarray, *, name: str, kind: str, nside: int, pix: int) -> None:
    """Write one shard: an empty primary HDU and a binary table (big-endian rows).

    The header text is built once per column set with astropy and only the NAXIS2 and
    HPXPIX cards change per shard (an astropy HDU per shard cost ~5 ms of a ~6 ms write).
    """
    key = (rows.dtype, name, kind, nside)
    text = _HEADERS.get(key)
    if text is None:
        header = fits.BinTableHDU(data=np.empty(0, dtype=rows.dtype), name="REFCAT").header
        for i, col in enumerate(rows.dtype.names or (), start=1):
            if _unit(col):
                header[f"TUNIT{i}"] = _unit(col)
        header["REFCAT"] = (name, "apfast reference catalogue name")
        header["REFKIND"] = (kind, "catalogue kind")
        header["HPXNSIDE"] = (nside, "HEALPix nside")
        header["HPXORDER"] = ("NESTED", "HEALPix ordering")
        header["HPXPIX"] = (0, "HEALPix pixel of this shard")
        text = fits.PrimaryHDU().header.tostring() + header.tostring()
        _HEADERS[key] = text
    for card in (fits.Card("NAXIS2", 0, "length of dimension 2"),
                 fits.Card("HPXPIX", 0, "HEALPix pixel of this shard")):
        new = fits.Card(card.keyword, len(rows) if card.keyword == "NAXIS2" else int(pix), card.comment)
        text = text.replace(card.image, new.image, 1)
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as fh:
        fh.write(text.encode("ascii"))
        fh.write(data + b"\0" * (-len(data) % 2880))
