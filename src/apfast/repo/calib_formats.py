"""Readers and header scanners for master and curated calibrations.

Every calibration format apfast ingests is described here, in two halves:

* *scanning* (``scan_calib_file``): what a file is, which CCDs and dates it
  covers, read from headers and metadata only (FITS headers by a block scan,
  never decompressing pixels; the YAML linearizer without its 65536-entry
  table). Ingest calls this and nothing else.
* *reading* (``read_image_hdu``, ``read_defects_*``, ``read_crosstalk_*``,
  ``read_linearizer_yaml``): the content, as native-endian numpy arrays and
  small frozen dataclasses. ``apfast.repo.calibs.read_calib`` dispatches here.

Formats (see the project's file-format contract):

=================  =================  =========================================
calib type         ``fmt``            file
=================  =================  =========================================
bias, flat         ``mef-image``      MEF FITS, OBSTYPE 'zero' / 'dome flat'
defects            ``fits-table``     MEF FITS, OBSTYPE 'defects', BINTABLEs
defects            ``ecsv``           Rubin curated ECSV (meta DETECTOR, ...)
crosstalk          ``xtalk-yaml``     Rubin curated YAML (``coeffs`` key)
crosstalk          ``xtalk-text``     DECam ``DECam_xtalk_YYYYMMDD.txt``
linearizer         ``linearizer-yaml`` Rubin curated YAML (``tableData``)
=================  =================  =========================================

Crosstalk orientation. ``Crosstalk.coeffs[v, s]`` is the fraction of the
*source* amp ``s`` (read out in the victim's readout order) that appears in
the *victim* amp ``v``, so the correction is ``victim -= coeffs[v, s] *
source``. The DECam text file lists ``victim source coeff``. Rubin's curated
DECam YAML (made from that text file by obs_decam's converter) stores the
intra-CCD ``coeffs`` transposed, i.e. ``[source, victim]`` (which is how
ip_isr's subtraction loop applies them: it transposes once more), while its
``interChip`` matrices are ``[victim, source]``. Checked on every CCD against
``DECam_xtalk_20130606.txt``: e.g. N4 (ccdnum 35) has ``ccd35B ccd35A 2.75e-4``
and the YAML ``coeffs`` ``[0, 2.75e-4, 3.16e-4, 0]``. The YAML reader therefore
transposes ``coeffs`` and keeps ``interChip`` as stored; amps are in the order
A, B (the header amp names).

Linearizer semantics (ip_isr ``LinearizeLookupTable``): for an amp with
``linearityCoeffs = [c0, c1]`` the corrected value is
``value + table[int(c0), int(value + c1)]``.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from apfast.errors import CalibrationError, IngestError
from apfast.repo.fitsutil import HeaderInfo, scan_headers

__all__ = [
    "CalibEntry",
    "Crosstalk",
    "Linearizer",
    "LinearizerAmp",
    "date_to_mjd",
    "mjd_to_iso",
    "normalise_date",
    "read_crosstalk_text",
    "read_crosstalk_yaml",
    "read_defects_ecsv",
    "read_defects_fits",
    "read_image_hdu",
    "read_linearizer_yaml",
    "scan_calib_file",
]

_MJD0 = _dt.datetime(1858, 11, 17)
_DEFECT_COLUMNS = ("x0", "y0", "width", "height")
_XTALK_AMP_RE = re.compile(r"^ccd(\d{1,2})([A-Za-z])$")


# --------------------------------------------------------------------------- dates


def _parse_iso(text: str) -> _dt.datetime:
    """Parse an ISO date or datetime string (also Rubin's ``20140117t0129``); naive UTC."""
    s = text.strip()
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})[tT](\d{2})(\d{2})(\d{2})?", s)
    if m:
        y, mo, d, h, mi, sec = m.groups()
        return _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec or 0))
    if s.endswith("Z"):
        s = s[:-1]
    value = _dt.datetime.fromisoformat(s)
    if value.tzinfo is not None:
        value = value.astimezone(_dt.UTC).replace(tzinfo=None)
    return value


def date_to_mjd(value: str | float | int | _dt.datetime | _dt.date) -> float:
    """Convert an ISO date/datetime string, a datetime or an MJD number to MJD (UTC days).

    Parameters
    ----------
    value : str, float, int, datetime or date
        ``'2014-06-01'``, ``'2019-03-05T06:07:08.123456'``, ``'20140117t0129'``, or an MJD.

    Returns
    -------
    float
        The modified Julian date.

    Raises
    ------
    ValueError
        If ``value`` is not a date this function understands.

    Examples
    --------
    >>> date_to_mjd("1858-11-18")
    1.0
    >>> date_to_mjd(58000.5)
    58000.5
    """
    if isinstance(value, bool):
        msg = f"date {value!r} is a bool, not a date; give an ISO date string or an MJD"
        raise ValueError(msg)
    if isinstance(value, (int, float, np.integer, np.floating)):
        mjd = float(value)
        if not math.isfinite(mjd):
            msg = f"date {value!r} is not finite; give an ISO date string or an MJD"
            raise ValueError(msg)
        return mjd
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.UTC).replace(tzinfo=None)
        return (value - _MJD0).total_seconds() / 86400.0
    if isinstance(value, _dt.date):
        return float((value - _MJD0.date()).days)
    if isinstance(value, str):
        try:
            return date_to_mjd(_parse_iso(value))
        except ValueError:
            pass
        try:
            return date_to_mjd(float(value))
        except ValueError:
            pass
    msg = f"date {value!r} is neither an ISO date/datetime ('2014-06-01T00:00:00') nor an MJD number"
    raise ValueError(msg)


def mjd_to_iso(mjd: float) -> str:
    """Return the ISO datetime (seconds precision, UTC) of an MJD.

    Examples
    --------
    >>> mjd_to_iso(40587.0)
    '1970-01-01T00:00:00'
    """
    value = _MJD0 + _dt.timedelta(days=float(mjd))
    return value.replace(microsecond=0).isoformat() if value.microsecond < 500000 else (
        value + _dt.timedelta(seconds=1)
    ).replace(microsecond=0).isoformat()


def normalise_date(text: str) -> tuple[str, float]:
    """Return ``(iso, mjd)`` for a date string: ISO datetime with seconds, and its MJD.

    Raises
    ------
    ValueError
        If ``text`` is not an ISO date/datetime.
    """
    value = _parse_iso(str(text))
    iso = value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
    return iso, date_to_mjd(value)


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True, slots=True)
class CalibEntry:
    """One registry row-to-be found by scanning a file (header data only)."""

    calib_type: str
    ccdnum: int
    filter: str  # '' when the calib does not depend on the filter
    calib_date: str  # ISO
    calib_mjd: float
    fmt: str
    hdu: int | None = None
    extname: str | None = None
    detector: str | None = None  # detector name when the file is per-detector (ECSV/YAML)
    curated: bool = False  # valid until the next calib by default (True) or +-999 days (False)
    shape: tuple[int, int] | None = None


def _need(header: Any, key: str, path: Path, where: str, fix: str) -> Any:
    if key not in header or header[key] is None or (isinstance(header[key], str) and not header[key].strip()):
        msg = f"{path}: {where} lacks the keyword {key}; {fix}"
        raise IngestError(msg)
    return header[key]


def _file_date(header: Any, path: Path, where: str) -> tuple[str, float]:
    key = "DATE-OBS" if header.get("DATE-OBS") else "CALIBDATE"
    raw = _need(header, key, path, where, "add DATE-OBS (or CALIBDATE) with the date the calibration was taken")
    try:
        return normalise_date(str(raw))
    except ValueError:
        msg = f"{path}: {where} keyword {key}={raw!r} is not an ISO date like '2019-03-05T06:07:08'; fix the header"
        raise IngestError(msg) from None


def _ccdnum(value: Any, path: Path, where: str, camera: Any) -> int:
    try:
        ccd = int(value)
    except (TypeError, ValueError):
        msg = f"{path}: {where} has CCDNUM={value!r}, not an integer; fix the header"
        raise IngestError(msg) from None
    if not 1 <= ccd <= camera.max_detector:
        msg = f"{path}: {where} has CCDNUM={ccd}, outside 1..{camera.max_detector} for camera {camera.name}"
        raise IngestError(msg)
    return ccd


def _scan_fits(path: Path, camera: Any) -> list[CalibEntry]:
    infos = scan_headers(path)
    primary = infos[0].header
    where0 = "the primary header (HDU 0)"
    obstype = str(_need(primary, "OBSTYPE", path, where0, "set OBSTYPE to 'zero', 'dome flat' or 'defects'"))
    kind = obstype.strip().lower()
    if kind in ("zero", "bias"):
        calib_type = "bias"
    elif kind in ("dome flat", "flat", "domeflat", "sky flat", "twilight flat"):
        calib_type = "flat"
    elif kind == "defects":
        calib_type = "defects"
    else:
        msg = (
            f"{path}: OBSTYPE={obstype!r} is not a master calibration this ingest knows; expected "
            "'zero' (bias), 'dome flat' (flat) or 'defects'. Raw exposures go through 'apfast ingest'"
        )
        raise IngestError(msg)
    instrume = primary.get("INSTRUME")
    want = camera.match.get("INSTRUME")
    if instrume is not None and want is not None and str(instrume).strip().lower() != str(want).strip().lower():
        msg = f"{path}: INSTRUME={instrume!r} but the calib repository is for camera {camera.name} ({want!r})"
        raise IngestError(msg)
    date_iso, mjd = _file_date(primary, path, where0)
    filt = ""
    if calib_type == "flat":
        raw_filter = str(_need(primary, "FILTER", path, where0,
                               "a flat needs FILTER (e.g. 'g DECam SDSS c0001 4720.0 1520.0')"))
        filt = raw_filter.split()[0] if raw_filter.split() else ""
        if not filt:
            msg = f"{path}: FILTER is blank in {where0}; a flat needs its filter"
            raise IngestError(msg)
    out: list[CalibEntry] = []
    seen: dict[int, int] = {}
    exts: list[HeaderInfo] = infos[1:] if len(infos) > 1 else infos
    for info in exts:
        h = info.header
        where = f"HDU {info.index}"
        if calib_type == "defects":
            if info.index == 0:
                continue
            if str(h.get("XTENSION", "")).strip() != "BINTABLE":
                msg = f"{path}: {where} is not a binary table; a defects file has one BINTABLE per CCD"
                raise IngestError(msg)
            names = {str(h.get(f"TTYPE{i}", "")).strip().lower() for i in range(1, int(h.get("TFIELDS", 0)) + 1)}
            missing = [c for c in _DEFECT_COLUMNS if c not in names]
            if missing:
                msg = f"{path}: {where} lacks the defect column(s) {', '.join(missing)} (need x0, y0, width, height)"
                raise IngestError(msg)
            shape = None
            fmt = "fits-table"
        else:
            shape_t = info.image_shape
            if len(shape_t) == 0:
                if info.index == 0:
                    continue  # the data-less primary of an MEF
                msg = f"{path}: {where} has no image data; a {calib_type} master has one image per CCD"
                raise IngestError(msg)
            if len(shape_t) != 2 or tuple(shape_t) != tuple(camera.trimmed_shape):
                msg = (
                    f"{path}: {where} image has shape {tuple(shape_t)} but a trimmed {camera.name} CCD is "
                    f"{tuple(camera.trimmed_shape)} (rows, columns); masters must be overscan-trimmed CCDs"
                )
                raise IngestError(msg)
            shape = (int(shape_t[0]), int(shape_t[1]))
            fmt = "mef-image"
        ccd = _ccdnum(_need(h, "CCDNUM", path, where, "every CCD extension needs CCDNUM"), path, where, camera)
        if ccd in seen:
            msg = f"{path}: HDUs {seen[ccd]} and {info.index} both have CCDNUM={ccd}; each CCD may appear once"
            raise IngestError(msg)
        seen[ccd] = info.index
        extname = h.get("EXTNAME")
        out.append(
            CalibEntry(
                calib_type, ccd, filt, date_iso, mjd, fmt, hdu=info.index,
                extname=str(extname).strip() if extname is not None else None, shape=shape,
            )
        )
    if not out:
        msg = f"{path}: no CCD extensions found (OBSTYPE={obstype!r}); the file has only a primary header"
        raise IngestError(msg)
    return out


class _TolerantLoader(yaml.SafeLoader if not hasattr(yaml, "CSafeLoader") else yaml.CSafeLoader):  # type: ignore[misc]
    """Safe YAML loader that reads unknown tags (``!!python/tuple``, LSST classes) as plain data."""


def _construct_unknown(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("", _construct_unknown)


def _yaml_load(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_TolerantLoader)  # a safe loader subclass
    except yaml.YAMLError as exc:
        msg = f"{path}: not valid YAML ({str(exc).splitlines()[0]}); the file is corrupt or not a calibration"
        raise IngestError(msg) from None


def _metadata_dict(meta: Any) -> dict[str, Any]:
    """Turn Rubin's PropertyList dump (``[[key, type, value, comment], ...]``) or a mapping into a dict."""
    if isinstance(meta, dict):
        return dict(meta)
    out: dict[str, Any] = {}
    if isinstance(meta, list):
        for item in meta:
            if isinstance(item, (list, tuple)) and len(item) >= 3:
                out[str(item[0])] = item[2]
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out[str(item[0])] = item[1]
            elif isinstance(item, dict):
                out.update(item)
    return out


def _split_table_block(text: str) -> tuple[str, str | None]:
    """Cut the top-level ``tableData:`` block out of a linearizer YAML text.

    Returns the text without the block and the block body (``None`` if absent),
    so ingest can parse the small metadata part without the 2 MB table.
    """
    start = re.search(r"^tableData:[ \t]*\n", text, flags=re.MULTILINE)
    if start is None:
        return text, None
    end = re.search(r"^[^\s\-#]", text[start.end() :], flags=re.MULTILINE)
    stop = start.end() + end.start() if end else len(text)
    return text[: start.start()] + text[stop:], text[start.end() : stop]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read the file as text ({exc}); the file is corrupt or not a calibration"
        raise IngestError(msg) from None


def _scan_yaml(path: Path, camera: Any) -> list[CalibEntry]:
    head, block = _split_table_block(_read_text(path))
    doc = _yaml_load(head, path)
    if not isinstance(doc, dict):
        msg = f"{path}: the YAML is not a mapping; expected a Rubin crosstalk (coeffs) or linearizer (tableData) file"
        raise IngestError(msg)
    meta = _metadata_dict(doc.get("metadata", {}))
    amps = doc.get("amplifiers")
    is_lin = (
        block is not None or "linearityType" in str(amps) or str(meta.get("OBSTYPE", "")).upper() == "LINEARIZER"
    )
    if "coeffs" in doc:
        calib_type, fmt = "crosstalk", "xtalk-yaml"
    elif is_lin:
        calib_type, fmt = "linearizer", "linearizer-yaml"
    else:
        msg = (
            f"{path}: YAML file is neither crosstalk (no 'coeffs' key) nor a linearizer (no "
            "'linearityType'/'tableData'); apfast ingests only those curated YAML calibrations"
        )
        raise IngestError(msg)
    det = doc.get("detectorId", meta.get("DETECTOR"))
    if det is None:
        msg = f"{path}: the {calib_type} YAML lacks DETECTOR (metadata) / detectorId; add the ccdnum"
        raise IngestError(msg)
    ccd = _ccdnum(det, path, "the metadata", camera)
    raw_date = meta.get("CALIBDATE")
    if raw_date is None:
        msg = f"{path}: the {calib_type} YAML metadata lacks CALIBDATE; add the date it is valid from"
        raise IngestError(msg)
    try:
        iso, mjd = normalise_date(str(raw_date))
    except ValueError:
        msg = f"{path}: CALIBDATE={raw_date!r} is not an ISO datetime like '1970-01-01T00:00:00'"
        raise IngestError(msg) from None
    name = doc.get("detectorName", meta.get("DETECTOR_NAME", meta.get("DET_NAME"))) or camera.detector_name(ccd)
    return [CalibEntry(calib_type, ccd, "", iso, mjd, fmt, detector=str(name), curated=True)]


def _ecsv_parts(path: Path) -> tuple[dict[str, Any], list[str], list[str], str]:
    """Split an ECSV file into (header YAML dict, column names, data lines, delimiter)."""
    text = _read_text(path)
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# %ECSV"):
        msg = f"{path}: not an ECSV file (first line is not '# %ECSV ...')"
        raise IngestError(msg)
    header_lines = []
    i = 1
    while i < len(lines) and lines[i].startswith("#"):
        header_lines.append(lines[i][2:] if lines[i].startswith("# ") else lines[i][1:])
        i += 1
    head = _yaml_load("\n".join(header_lines), path)
    if not isinstance(head, dict):
        msg = f"{path}: the ECSV header is not a YAML mapping; the file is corrupt"
        raise IngestError(msg)
    delimiter = str(head.get("delimiter", " "))
    if i >= len(lines):
        msg = f"{path}: the ECSV file has no column-name line; the file is corrupt or was cut short"
        raise IngestError(msg)
    names = [n.strip() for n in (lines[i].split(delimiter) if delimiter != " " else lines[i].split())]
    data = [ln for ln in lines[i + 1 :] if ln.strip()]
    return head, names, data, delimiter


def _scan_ecsv(path: Path, camera: Any) -> list[CalibEntry]:
    head, names, _, _ = _ecsv_parts(path)
    raw_meta = head.get("meta", {})
    meta: dict[str, Any] = {}
    if isinstance(raw_meta, dict):
        meta = dict(raw_meta)
    elif isinstance(raw_meta, list):  # !!omap loads as a list of (key, value) pairs
        for item in raw_meta:
            if isinstance(item, (tuple, list)) and len(item) == 2:
                meta[str(item[0])] = item[1]
            elif isinstance(item, dict):
                meta.update(item)
    where = "the ECSV meta"
    obstype = str(_need(meta, "OBSTYPE", path, where, "curated defects need OBSTYPE: defects"))
    if obstype.strip().lower() != "defects":
        msg = f"{path}: ECSV OBSTYPE={obstype!r}; apfast ingests only defects ECSV files (OBSTYPE: defects)"
        raise IngestError(msg)
    ccd = _ccdnum(_need(meta, "DETECTOR", path, where, "add DETECTOR (the ccdnum)"), path, where, camera)
    raw_date = _need(meta, "CALIBDATE", path, where, "add CALIBDATE (the date the defects are valid from)")
    try:
        iso, mjd = normalise_date(str(raw_date))
    except ValueError:
        msg = f"{path}: CALIBDATE={raw_date!r} is not an ISO datetime like '2014-01-17T01:29:00'"
        raise IngestError(msg) from None
    missing = [c for c in _DEFECT_COLUMNS if c not in names]
    if missing:
        msg = f"{path}: the ECSV lacks the column(s) {', '.join(missing)} (need x0, y0, width, height)"
        raise IngestError(msg)
    return [CalibEntry("defects", ccd, "", iso, mjd, "ecsv", detector=camera.detector_name(ccd), curated=True)]


def _parse_xtalk_lines(path: Path, text: str) -> list[tuple[int, str, int, str, float]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        mv = _XTALK_AMP_RE.match(parts[0]) if parts else None
        ms = _XTALK_AMP_RE.match(parts[1]) if len(parts) > 1 else None
        try:
            coeff = float(parts[2]) if len(parts) > 2 else math.nan
        except ValueError:
            coeff = math.nan
        if mv is None or ms is None or not math.isfinite(coeff):
            msg = (
                f"{path}: line {lineno} {s[:60]!r} is not 'victim source coeff' "
                "(e.g. 'ccd35B ccd35A 2.75e-04'); fix or remove the line"
            )
            raise IngestError(msg)
        rows.append((int(mv.group(1)), mv.group(2).upper(), int(ms.group(1)), ms.group(2).upper(), coeff))
    return rows


def _scan_xtalk_text(path: Path, camera: Any) -> list[CalibEntry]:
    text = _read_text(path)
    rows = _parse_xtalk_lines(path, text)
    if not rows:
        msg = f"{path}: no crosstalk lines ('ccdNNA ccdNNB coeff'); is this a DECam crosstalk file?"
        raise IngestError(msg)
    m = re.search(r"CALIBDATE\s*[:=]\s*(\S+)", text) or re.search(r"(\d{8})(?!\d)", path.name)
    if m is None:
        msg = (
            f"{path}: no date for the crosstalk file; name it like DECam_xtalk_YYYYMMDD.txt "
            "or add a comment '# CALIBDATE: YYYY-MM-DD'"
        )
        raise IngestError(msg)
    raw = m.group(1)
    if re.fullmatch(r"\d{8}", raw):
        raw = f"{raw[:4]}-{raw[4:6]}-{raw[6:]}"
    try:
        iso, mjd = normalise_date(raw)
    except ValueError:
        msg = f"{path}: crosstalk date {m.group(1)!r} is not a valid date (YYYYMMDD or ISO)"
        raise IngestError(msg) from None
    victims = sorted({r[0] for r in rows})
    for v in victims:
        _ccdnum(v, path, f"victim ccd{v:02d}", camera)
    return [CalibEntry("crosstalk", v, "", iso, mjd, "xtalk-text", curated=True) for v in victims]


def scan_calib_file(path: str | Path, camera: Any) -> list[CalibEntry]:
    """Identify a calibration file and list the registry entries it provides.

    Reads headers/metadata only. FITS files are told apart by the primary
    OBSTYPE, ``.ecsv`` files are curated defects, ``.yaml`` files are crosstalk
    (``coeffs`` key) or linearizers (``linearityType``/``tableData``), ``.txt``
    files are DECam crosstalk tables.

    Parameters
    ----------
    path : str or Path
        The file.
    camera : apfast.camera.Camera
        Gives the trimmed CCD shape, the detector numbering and names.

    Returns
    -------
    list of CalibEntry
        One per CCD the file covers.

    Raises
    ------
    IngestError
        If the file is missing, unreadable, truncated, of an unknown kind, or lacks
        a required keyword; the message names the file and the keyword.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such file; check the path given to ingest-calibs"
        raise IngestError(msg)
    name = path.name.lower()
    if name.endswith((".fits", ".fits.fz", ".fit", ".fz", ".fits.gz")):
        return _scan_fits(path, camera)
    if name.endswith(".ecsv"):
        return _scan_ecsv(path, camera)
    if name.endswith((".yaml", ".yml")):
        return _scan_yaml(path, camera)
    if name.endswith(".txt"):
        return _scan_xtalk_text(path, camera)
    msg = (
        f"{path}: unknown calibration file kind (suffix {path.suffix!r}); ingest-calibs takes FITS masters "
        "(.fits/.fits.fz), defects .ecsv, crosstalk/linearizer .yaml and DECam crosstalk .txt files"
    )
    raise IngestError(msg)


# --------------------------------------------------------------------------- readers


def read_image_hdu(path: str | Path, hdu: int, expected_shape: tuple[int, int] | None) -> np.ndarray:
    """Read one image HDU as a native-endian, C-contiguous float32 array.

    Raises
    ------
    CalibrationError
        If the file or HDU cannot be read, or the shape differs from ``expected_shape``.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            data = hdul[hdu].data
            arr = None if data is None else np.ascontiguousarray(data, dtype=np.float32)
    except (OSError, IndexError, ValueError, TypeError) as exc:
        msg = f"{path}[{hdu}]: cannot read the calibration image ({exc}); re-ingest a good copy of the file"
        raise CalibrationError(msg) from None
    if arr is None or arr.ndim != 2:
        msg = f"{path}[{hdu}]: no 2-d image in this HDU; the registry points at the wrong HDU, re-ingest the file"
        raise CalibrationError(msg)
    if expected_shape is not None and arr.shape != tuple(expected_shape):
        msg = (
            f"{path}[{hdu}]: image shape {arr.shape} differs from the trimmed CCD shape {tuple(expected_shape)}; "
            "masters must be overscan-trimmed CCDs of this camera"
        )
        raise CalibrationError(msg)
    return arr


def _defects_array(cols: dict[str, np.ndarray], where: str) -> np.ndarray:
    out = np.empty((len(cols["x0"]), 4), dtype=np.int32)
    for j, c in enumerate(_DEFECT_COLUMNS):
        out[:, j] = np.asarray(cols[c]).astype(np.int64)
    if out.size and (out[:, 2:] <= 0).any():
        msg = f"{where}: a defect box has width or height <= 0; fix the defects file"
        raise CalibrationError(msg)
    return np.ascontiguousarray(out)


def read_defects_fits(path: str | Path, hdu: int) -> np.ndarray:
    """Read the defect boxes of one BINTABLE HDU as int32 ``(N, 4)``: x0, y0, width, height."""
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            data = hdul[hdu].data
            cols = {c: np.array(data[c]) for c in _DEFECT_COLUMNS} if data is not None else None
    except (OSError, IndexError, KeyError, ValueError) as exc:
        msg = f"{path}[{hdu}]: cannot read the defects table ({exc}); re-ingest a good copy of the file"
        raise CalibrationError(msg) from None
    if cols is None:
        return np.zeros((0, 4), dtype=np.int32)
    return _defects_array(cols, f"{path}[{hdu}]")


def read_defects_ecsv(path: str | Path) -> np.ndarray:
    """Read a Rubin curated defects ECSV as int32 ``(N, 4)``: x0, y0, width, height."""
    path = Path(path)
    try:
        _, names, data, delimiter = _ecsv_parts(path)
    except IngestError as exc:
        raise CalibrationError(str(exc)) from None
    idx = [names.index(c) for c in _DEFECT_COLUMNS]
    rows = []
    for k, line in enumerate(data):
        parts = line.split(delimiter) if delimiter != " " else line.split()
        try:
            rows.append([int(parts[i]) for i in idx])
        except (IndexError, ValueError):
            msg = f"{path}: data row {k + 1} {line!r} is not four integers x0 y0 width height; fix the file"
            raise CalibrationError(msg) from None
    arr = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return _defects_array({c: arr[:, j] for j, c in enumerate(_DEFECT_COLUMNS)}, str(path))


@dataclass(frozen=True)
class Crosstalk:
    """Crosstalk coefficients for one victim CCD.

    Attributes
    ----------
    ccdnum : int
        The victim CCD.
    amp_names : tuple of str
        Amp order of the matrices (``('A', 'B')`` for DECam).
    coeffs : ndarray, float64, shape (namp, namp)
        ``coeffs[v, s]``: victim amp ``v`` gets ``coeffs[v, s]`` times source amp ``s``
        (mirrored to the victim's readout order); correct with ``victim -= coeffs[v, s] * source``.
    interchip : dict of str to ndarray (namp, namp)
        Same, with the source amp on another CCD, keyed by that CCD's detector name.
    """

    ccdnum: int
    amp_names: tuple[str, ...]
    coeffs: np.ndarray
    interchip: dict[str, np.ndarray] = field(default_factory=dict)


def read_crosstalk_yaml(path: str | Path, amp_names: tuple[str, ...] = ("A", "B")) -> Crosstalk:
    """Read a Rubin curated crosstalk YAML (see the module notes on its orientation)."""
    path = Path(path)
    try:
        doc = _yaml_load(_read_text(path), path)
    except IngestError as exc:
        raise CalibrationError(str(exc)) from None
    meta = _metadata_dict(doc.get("metadata", {}))
    namp = int(doc.get("nAmp", meta.get("NAMP", len(amp_names))))
    try:
        stored = np.asarray(doc["coeffs"], dtype=np.float64).reshape(namp, namp)
        inter = {
            str(k): np.ascontiguousarray(np.asarray(v, dtype=np.float64).reshape(namp, namp))
            for k, v in (doc.get("interChip") or {}).items()
        }
    except (KeyError, ValueError, TypeError) as exc:
        msg = f"{path}: crosstalk coeffs are not {namp}x{namp} numbers ({exc}); the file is corrupt"
        raise CalibrationError(msg) from None
    names = tuple(amp_names) if len(amp_names) == namp else tuple(str(i) for i in range(namp))
    ccd = int(doc.get("detectorId", meta.get("DETECTOR", 0)))
    # Rubin's curated DECam files store the intra-CCD matrix as [source, victim].
    return Crosstalk(ccd, names, np.ascontiguousarray(stored.T), inter)


def read_crosstalk_text(path: str | Path, ccdnum: int, camera: Any) -> Crosstalk:
    """Read the coefficients with victim ``ccdnum`` from a DECam crosstalk text file."""
    path = Path(path)
    try:
        rows = _parse_xtalk_lines(path, _read_text(path))
    except IngestError as exc:
        raise CalibrationError(str(exc)) from None
    names = tuple(a.name.upper() for a in camera.amplifiers) or ("A", "B")
    index = {n: i for i, n in enumerate(names)}
    namp = len(names)
    coeffs = np.zeros((namp, namp), dtype=np.float64)
    inter: dict[str, np.ndarray] = {}
    for victim, vamp, source, samp, coeff in rows:
        if victim != ccdnum:
            continue
        if vamp not in index or samp not in index:
            msg = f"{path}: amp {vamp if vamp not in index else samp!r} is not one of the camera amps {names}"
            raise CalibrationError(msg)
        if source == victim:
            coeffs[index[vamp], index[samp]] = coeff
        else:
            key = camera.detector_name(source)
            inter.setdefault(key, np.zeros((namp, namp), dtype=np.float64))[index[vamp], index[samp]] = coeff
    return Crosstalk(int(ccdnum), names, coeffs, inter)


@dataclass(frozen=True)
class LinearizerAmp:
    """One amp of a lookup-table linearizer.

    ``row`` selects the table row, ``offset`` is added to the pixel value before
    truncation to a column index; ``bbox`` is ``(x0, y0, x1, y1)``, 0-based inclusive
    corners in the trimmed CCD as written in the file (Rubin camGeom convention).
    """

    name: str
    linearity_type: str
    row: int
    offset: float
    bbox: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Linearizer:
    """A lookup-table linearizer for one CCD: ``corrected = value + lut[row, int(value + offset)]``.

    Attributes
    ----------
    ccdnum : int
    detector_name : str
    amps : tuple of LinearizerAmp
    lut : ndarray, float32, shape (nrows, ncols)
    """

    ccdnum: int
    detector_name: str
    amps: tuple[LinearizerAmp, ...]
    lut: np.ndarray

    def amp(self, name: str) -> LinearizerAmp:
        """Return the amp called ``name``."""
        for a in self.amps:
            if a.name == name:
                return a
        msg = f"linearizer for ccdnum {self.ccdnum} has no amp {name!r}; amps: {[a.name for a in self.amps]}"
        raise KeyError(msg)

    def correct(self, values: np.ndarray, amp: str) -> np.ndarray:
        """Reference (slow, NumPy) correction of ``values`` for one amp; indices clipped to the table.

        Examples
        --------
        >>> lin = Linearizer(1, "S29", (LinearizerAmp("A", "LookupTable", 0, 0.0, None),),
        ...                  np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
        >>> lin.correct(np.array([1.2, 2.0]), "A").tolist()
        [1.7, 3.0]
        """
        a = self.amp(amp)
        v = np.asarray(values, dtype=np.float64)
        idx = np.clip(np.trunc(v + a.offset), 0, self.lut.shape[1] - 1).astype(np.int64)
        return v + self.lut[a.row, idx].astype(np.float64)


def _fast_table(block: str) -> np.ndarray | None:
    """Parse a block-style YAML list of lists of floats (``- - v`` / ``  - v``) quickly, or None."""
    lines = [ln for ln in block.splitlines() if ln.strip()]
    if not lines:
        return None
    starts = []
    values = []
    for i, ln in enumerate(lines):
        if ln.startswith("- - "):
            starts.append(i)
            values.append(ln[4:])
        elif ln.startswith("  - "):
            values.append(ln[4:])
        else:
            return None
    if not starts or starts[0] != 0:
        return None
    try:
        flat = np.array(values, dtype=np.float64)
    except ValueError:
        return None
    bounds = starts + [len(values)]
    lengths = {bounds[k + 1] - bounds[k] for k in range(len(starts))}
    if len(lengths) != 1:
        return None
    return flat.reshape(len(starts), lengths.pop())


def read_linearizer_yaml(path: str | Path) -> Linearizer:
    """Read a Rubin curated lookup-table linearizer YAML."""
    path = Path(path)
    try:
        text = _read_text(path)
        head, block = _split_table_block(text)
        table = _fast_table(block) if block is not None else None
        doc = _yaml_load(head if table is not None else text, path)
    except IngestError as exc:
        raise CalibrationError(str(exc)) from None
    if table is None:
        raw = doc.get("tableData") if isinstance(doc, dict) else None
        if raw is None:
            msg = f"{path}: the linearizer has no tableData; only LookupTable linearizers are supported"
            raise CalibrationError(msg)
        try:
            table = np.asarray(raw, dtype=np.float64)
        except ValueError:
            msg = f"{path}: tableData rows have different lengths; the file is corrupt"
            raise CalibrationError(msg) from None
    if table.ndim != 2:
        msg = f"{path}: tableData must be a 2-d table (rows x values), found {table.ndim} dimension(s)"
        raise CalibrationError(msg)
    meta = _metadata_dict(doc.get("metadata", {}))
    amps = []
    for name, spec in (doc.get("amplifiers") or {}).items():
        ltype = str(spec.get("linearityType", ""))
        if ltype != "LookupTable":
            msg = f"{path}: amp {name} has linearityType {ltype!r}; apfast supports only 'LookupTable'"
            raise CalibrationError(msg)
        coeffs = list(spec.get("linearityCoeffs") or [])
        if len(coeffs) < 2:
            msg = f"{path}: amp {name} linearityCoeffs {coeffs} needs [row, offset]"
            raise CalibrationError(msg)
        row = int(coeffs[0])
        if not 0 <= row < table.shape[0]:
            msg = f"{path}: amp {name} table row {row} is outside the {table.shape[0]} rows of tableData"
            raise CalibrationError(msg)
        box = spec.get("linearityBBox")
        bbox = None
        if isinstance(box, list) and len(box) == 2 and all(isinstance(p, list) and len(p) == 2 for p in box):
            bbox = (int(box[0][0]), int(box[0][1]), int(box[1][0]), int(box[1][1]))
        amps.append(LinearizerAmp(str(name), ltype, row, float(coeffs[1]), bbox))
    ccd = int(doc.get("detectorId", meta.get("DETECTOR", 0)))
    name = str(doc.get("detectorName", meta.get("DET_NAME", "")))
    return Linearizer(ccd, name, tuple(amps), np.ascontiguousarray(table, dtype=np.float32))
