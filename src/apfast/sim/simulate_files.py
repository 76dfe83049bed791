"""File writers of the DECam simulator: raw MEF headers, master calibrations, refcats, truth tables.

Every writer goes through :func:`apfast._fileio.atomic_path` (files end up mode 0644), so a
reader never sees a half-written file. Formats are those of the real files: raws exactly as
NOIRLab serves them, masters like the DECam Community Pipeline's.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.coordinates import Angle
from astropy.io import fits

from apfast._fileio import atomic_path
from apfast.sim.simulate_scene import FILTER_STRINGS

__all__ = [
    "ccd_header",
    "primary_header",
    "write_crosstalk",
    "write_csv",
    "write_defects",
    "write_json",
    "write_master",
    "write_raw",
]


def primary_header(visit: Mapping[str, Any], nccd: int) -> fits.Header:
    """Primary header of a raw DECam exposure (no data)."""
    h = fits.Header()
    ra = Angle(visit["ra"], unit="deg").to_string(unit="hourangle", sep=":", precision=3, pad=True)
    dec = Angle(visit["dec"], unit="deg").to_string(unit="deg", sep=":", precision=2, alwayssign=True, pad=True)
    cards = [
        ("PROCTYPE", "RAW", "Data processing level"),
        ("PRODTYPE", "image", "Data product type"),
        ("TELESCOP", "CTIO 4.0-m telescope", ""),
        ("OBSERVAT", "CTIO", ""),
        ("INSTRUME", "DECam", ""),
        ("EXPREQ", float(visit["exptime"]), "[s] Requested exposure duration"),
        ("EXPTIME", float(visit["exptime"]), "[s] Exposure duration"),
        ("DATE-OBS", visit["date_obs"], "UTC epoch of shutter opening"),
        ("TIME-OBS", visit["date_obs"].split("T")[1], ""),
        ("MJD-OBS", float(visit["mjd"]), "MJD of observation start"),
        ("TIMESYS", "UTC", ""),
        ("EXPNUM", int(visit["visit"]), "DECam exposure number"),
        ("OBJECT", visit["object"], ""),
        ("OBSTYPE", "object", ""),
        ("PROPID", "2019A-0001", "Proposal identifier (simulated)"),
        ("FILTER", FILTER_STRINGS[visit["filter"]], "Unique filter identifier"),
        ("TELEQUIN", 2000.0, ""),
        ("TELRA", ra, "[HH:MM:SS] Telescope RA"),
        ("TELDEC", dec, "[DD:MM:SS] Telescope Dec"),
        ("RA", ra, ""),
        ("DEC", dec, ""),
        ("AIRMASS", round(float(visit["airmass"]), 3), ""),
        ("NEXTEND", int(nccd), "Number of extensions"),
        ("SIMULATE", True, "apfast simulate: synthetic data with truth"),
    ]
    for key, val, com in cards:
        h[key] = (val, com)
    return h


def ccd_header(ccdnum: int, detpos: str, amps: Mapping[str, Mapping[str, float]],
               wcs: Mapping[str, Any]) -> fits.Header:
    """Extension header of one raw CCD: sections, electronics and the approximate WCS (raw grid)."""
    h = fits.Header()
    cards: list[tuple[str, Any]] = [
        ("EXTNAME", detpos),
        ("BUNIT", "adu"),
        ("DETSIZE", "[1:29400,1:29050]"),
        ("TRIMSEC", "[57:2104,51:4146]"),
        ("DATASEC", "[57:2104,51:4146]"),
        ("CCDSEC", "[1:2048,1:4096]"),
        ("TRIMSECA", "[1081:2104,51:4146]"),
        ("CCDSECA", "[1025:2048,1:4096]"),
        ("AMPSECA", "[2048:1025,4096:1]"),
        ("DATASECA", "[1081:2104,51:4146]"),
        ("BIASSECA", "[2105:2154,51:4146]"),
        ("PRESECA", "[2155:2160,51:4146]"),
        ("POSTSECA", "[1081:2104,1:50]"),
        ("TRIMSECB", "[57:1080,51:4146]"),
        ("CCDSECB", "[1:1024,1:4096]"),
        ("AMPSECB", "[1:1024,4096:1]"),
        ("DATASECB", "[57:1080,51:4146]"),
        ("BIASSECB", "[7:56,51:4146]"),
        ("PRESECB", "[1:6,51:4146]"),
        ("POSTSECB", "[57:1080,1:50]"),
        ("DETECTOR", f"SIM-{ccdnum:02d}"),
        ("CCDNUM", int(ccdnum)),
        ("DETPOS", detpos),
        ("GAINA", float(amps["A"]["gain"])),
        ("RDNOISEA", float(amps["A"]["read_noise_e"])),
        ("SATURATA", float(amps["A"]["saturation_adu"])),
        ("GAINB", float(amps["B"]["gain"])),
        ("RDNOISEB", float(amps["B"]["read_noise_e"])),
        ("SATURATB", float(amps["B"]["saturation_adu"])),
        ("FPA", "DECAM_BKP1"),
        ("CCDBIN1", 1),
        ("CCDBIN2", 1),
        ("LTV1", 56.0),
        ("LTV2", 50.0),
        ("LTM1_1", 1.0),
        ("LTM2_2", 1.0),
        ("EQUINOX", 2000.0),
    ]
    for key, val in cards:
        h[key] = val
    for key, val in wcs.items():
        h[key] = val
    return h


def write_raw(path: Path, primary: fits.Header, ccds: Sequence[tuple[np.ndarray, fits.Header]]) -> None:
    """Write a tile-compressed (RICE_1) raw MEF: primary header plus one uint16 image per CCD."""
    hdus: list[Any] = [fits.PrimaryHDU(header=primary)]
    for data, hdr in ccds:
        hdus.append(fits.CompImageHDU(data=data, header=hdr, compression_type="RICE_1"))
    with atomic_path(path, mode=0o644) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


def _calib_primary(obstype: str, date_obs: str, mjd: float, filt: str | None) -> fits.Header:
    h = fits.Header()
    h["INSTRUME"] = "DECam"
    h["OBSTYPE"] = obstype
    h["PROCTYPE"] = "MasterCal"
    h["DATE-OBS"] = date_obs
    h["MJD-OBS"] = mjd
    if filt is not None:
        h["FILTER"] = FILTER_STRINGS[filt]
    h["SIMULATE"] = True
    return h


def write_master(path: Path, obstype: str, date_obs: str, mjd: float, ccds: Sequence[tuple[int, str, np.ndarray]],
                 *, filt: str | None = None) -> None:
    """Write a master bias (``obstype='zero'``) or dome flat: one float32 ImageHDU per CCD."""
    hdus: list[Any] = [fits.PrimaryHDU(header=_calib_primary(obstype, date_obs, mjd, filt))]
    for ccdnum, name, data in ccds:
        hdu = fits.ImageHDU(data=np.asarray(data, np.float32), name=name)
        hdu.header["CCDNUM"] = int(ccdnum)
        hdu.header["DETPOS"] = name
        hdus.append(hdu)
    with atomic_path(path, mode=0o644) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


def write_defects(path: Path, date_obs: str, mjd: float,
                  ccds: Sequence[tuple[int, str, np.ndarray | Sequence[Sequence[int]]]]) -> None:
    """Write the defects FITS: one binary table (x0, y0, width, height; int32, 0-based trimmed) per CCD."""
    hdus: list[Any] = [fits.PrimaryHDU(header=_calib_primary("defects", date_obs, mjd, None))]
    for ccdnum, name, boxes in ccds:
        b = np.asarray(boxes, np.int32).reshape(-1, 4)
        cols = [fits.Column(name=n, format="J", array=b[:, i]) for i, n in enumerate(("x0", "y0", "width", "height"))]
        hdu = fits.BinTableHDU.from_columns(cols, name=name)
        hdu.header["CCDNUM"] = int(ccdnum)
        hdu.header["DETPOS"] = name
        hdus.append(hdu)
    with atomic_path(path, mode=0o644) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


def write_crosstalk(path: Path, calib_date: str, coeffs: Mapping[int, Mapping[str, float]]) -> None:
    """Write a DECam-style crosstalk text file: ``victim source coeff`` per line, '#' comments.

    ``coeffs[ccdnum]`` maps ``'A<-B'`` and ``'B<-A'`` to the coefficient, so
    ``ccd35B ccd35A c`` means amp B of CCD 35 receives ``c`` times amp A's signal.
    """
    lines = [
        "# DECam crosstalk coefficients (apfast simulate)",
        f"# CALIBDATE {calib_date}",
        "# victim source coefficient",
    ]
    for ccd in sorted(coeffs):
        c = coeffs[ccd]
        lines.append(f"ccd{ccd:02d}A ccd{ccd:02d}B {c['A<-B']:.6e}")
        lines.append(f"ccd{ccd:02d}B ccd{ccd:02d}A {c['B<-A']:.6e}")
    with atomic_path(path, mode=0o644) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else repr(float(v))
    if isinstance(v, (np.integer,)):
        return str(int(v))
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    return str(v)


def write_csv(path: Path, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> None:
    """Write equal-length columns as CSV with a header row (NaN as an empty field)."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    with atomic_path(path, mode=0o644) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        cols = [list(columns[k]) for k in names]
        for i in range(n):
            w.writerow([_fmt(c[i]) for c in cols])


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    msg = f"cannot store {type(o).__name__} in a truth JSON file"
    raise TypeError(msg)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (numpy scalars and arrays converted)."""
    with atomic_path(path, mode=0o644) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
