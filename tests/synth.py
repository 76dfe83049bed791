"""Synthetic inputs shared by tests/ and bench/ (both have this folder on ``sys.path``)."""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS, Sip


def make_wcs(
    shape: tuple[int, int],
    *,
    rot_deg: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    scale_arcsec: float = 0.263,
    sip: bool = False,
    crval: tuple[float, float] = (150.0, 2.2),
) -> WCS:
    """TAN(-SIP) WCS centred on the image; ``shift`` moves CRPIX (pixels), so dest = src shifted by +shift."""
    ny, nx = shape
    w = WCS(naxis=2)
    suffix = "-SIP" if sip else ""
    w.wcs.ctype = ["RA---TAN" + suffix, "DEC--TAN" + suffix]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [nx / 2 + 0.5 + shift[0], ny / 2 + 0.5 + shift[1]]
    s = scale_arcsec / 3600.0
    t = math.radians(rot_deg)
    w.wcs.cd = np.array([[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]])
    if sip:
        # DECam-like: 1-2 px of distortion at the corners of a 2048x4096 CCD
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[1, 1], a[0, 2], a[3, 0] = 1e-6, 3e-7, -2e-7, 2e-10
        b[0, 2], b[1, 1], b[2, 0], b[0, 3] = 2e-7, -4e-7, 3e-7, 1e-11
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def tract_offset_wcs(tract_wcs: WCS, dx: float, dy: float, rot: float = 0.0) -> WCS:
    """A TAN WCS sharing ``tract_wcs``'s tangent point and scale, whose pixel (0, 0) lies at tract pixel
    ``(dx, dy)``, rotated by ``rot`` degrees: an input exposure placed on a sky-map tract."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(tract_wcs.wcs.crval)
    c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))
    w.wcs.cd = tract_wcs.wcs.cd @ np.array([[c, -s], [s, c]])
    w.wcs.crpix = [tract_wcs.wcs.crpix[0] - dx, tract_wcs.wcs.crpix[1] - dy]
    w.wcs.set()
    return w
