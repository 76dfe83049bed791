"""Test helpers: format-exact DECam raw files with cheap pixels, for ingest tests and benchmarks.

:func:`write_decam_raw` writes what NOIRLab serves (an empty primary HDU with the
exposure keywords, one RICE tile-compressed uint16 extension per CCD with the
real section, gain, read-noise, saturation and WCS keywords) but with flat
pixels, so a 62-CCD file takes a second to make. Science-grade synthetic data
with truth comes from :mod:`apfast.sim.simulate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time

from apfast.camera import get_camera

__all__ = ["FILTER_STRINGS", "decam_raw_name", "write_decam_raw"]

FILTER_STRINGS = {
    "g": "g DECam SDSS c0001 4720.0 1520.0",
    "r": "r DECam SDSS c0002 6415.0 1480.0",
    "i": "i DECam SDSS c0003 7835.0 1470.0",
    "z": "z DECam SDSS c0004 9260.0 1520.0",
}


def decam_raw_name(date_obs: str) -> str:
    """NOIRLab's raw file name for an exposure: ``c4d_YYMMDD_HHMMSS_ori.fits.fz``."""
    t = Time(date_obs, scale="utc").datetime
    return f"c4d_{t:%y%m%d_%H%M%S}_ori.fits.fz"


def _sexagesimal(value: float, *, hours: bool) -> str:
    v = value / 15.0 if hours else value
    sign = "-" if v < 0 else ("" if hours else "+")
    v = abs(v)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60) * 3600
    return f"{sign}{d:02d}:{m:02d}:{s:06.3f}"


def write_decam_raw(
    directory: str | Path,
    *,
    visit: int,
    ccdnums: Sequence[int] = (35,),
    date_obs: str = "2019-03-05T06:07:08.000",
    band: str = "g",
    exptime: float = 90.0,
    ra: float = 150.0,
    dec: float = 2.0,
    obstype: str = "object",
    level: int = 2000,
    primary_overrides: Mapping[str, Any] | None = None,
    extension_overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write a DECam raw file in NOIRLab's format with flat pixels; return its path.

    Parameters
    ----------
    directory : path
        Where to write (created if needed).
    visit : int
        EXPNUM.
    ccdnums : sequence of int
        The CCDs (1-62) to include, one extension each, 2160x4146 uint16.
    date_obs, band, exptime, ra, dec, obstype : exposure keywords
        ``ra``/``dec`` in degrees (the pointing, written as sexagesimal TELRA/TELDEC).
    level : int
        The constant raw pixel value (ADU).
    primary_overrides, extension_overrides : mapping, optional
        Keywords to set (value) or delete (value ``None``) in every header.
    name : str, optional
        File name; default NOIRLab's ``c4d_YYMMDD_HHMMSS_ori.fits.fz``.
    """
    cam = get_camera("DECam")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or decam_raw_name(date_obs))
    ph = fits.Header()
    ph["INSTRUME"] = "DECam"
    ph["PROCTYPE"] = "RAW"
    ph["OBSTYPE"] = obstype
    ph["EXPNUM"] = int(visit)
    ph["FILTER"] = FILTER_STRINGS.get(band, band)
    ph["DATE-OBS"] = date_obs
    ph["MJD-OBS"] = float(Time(date_obs, scale="utc").mjd)
    ph["EXPTIME"] = float(exptime)
    ph["OBJECT"] = "apfast test field"
    ph["TELRA"] = _sexagesimal(ra, hours=True)
    ph["TELDEC"] = _sexagesimal(dec, hours=False)
    ph["AIRMASS"] = 1.2
    ph["PROPID"] = "2019A-0000"
    ph["NEXTEND"] = len(ccdnums)
    for k, v in (primary_overrides or {}).items():
        if v is None:
            ph.remove(k, ignore_missing=True)
        else:
            ph[k] = v
    hdus: list[Any] = [fits.PrimaryHDU(header=ph)]
    data = np.full((4146, 2160), level, dtype=np.uint16)
    scale = 0.2636 / 3600.0
    for ccdnum in ccdnums:
        info = cam.detectors[int(ccdnum)]
        fx, fy = info.get("focal_plane", (0.0, 0.0))
        h = fits.Header()
        h["EXTNAME"] = info["name"]
        h["CCDNUM"] = int(ccdnum)
        h["DETPOS"] = info["name"]
        h["DATASEC"] = "[57:2104,51:4146]"
        h["TRIMSEC"] = "[57:2104,51:4146]"
        for amp in cam.amplifiers:
            h[f"DATASEC{amp.name}"] = amp.data_section.value
            h[f"BIASSEC{amp.name}"] = amp.bias_section.value
            if amp.parallel_overscan is not None:
                h[f"POSTSEC{amp.name}"] = amp.parallel_overscan.value
            h[f"GAIN{amp.name}"] = 4.0
            h[f"RDNOISE{amp.name}"] = 7.0
            h[f"SATURAT{amp.name}"] = 44000.0
        h["FPA"] = "DECAM_BKP1"
        h["LTV1"] = 56.0
        h["LTV2"] = 50.0
        # A TAN WCS on the raw pixel grid: the CCD centre sits at its focal-plane offset
        # from the pointing; DECam's x axis runs along -RA.
        h["CTYPE1"] = "RA---TAN"
        h["CTYPE2"] = "DEC--TAN"
        h["CRVAL1"] = float(ra)
        h["CRVAL2"] = float(dec)
        h["CRPIX1"] = 56 + 1024.5 - fx
        h["CRPIX2"] = 50 + 2048.5 - fy
        h["CD1_1"] = -scale
        h["CD1_2"] = 0.0
        h["CD2_1"] = 0.0
        h["CD2_2"] = scale
        h["RADESYS"] = "ICRS"
        h["EQUINOX"] = 2000.0
        for k, v in (extension_overrides or {}).items():
            if v is None:
                h.remove(k, ignore_missing=True)
            else:
                h[k] = v
        hdus.append(fits.CompImageHDU(data=data, header=h, compression_type="RICE_1"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def cos_dec(dec: float) -> float:
    """``cos(dec)`` for a declination in degrees (a helper for offsets in tests)."""
    return math.cos(math.radians(dec))
