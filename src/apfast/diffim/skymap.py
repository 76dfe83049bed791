"""Sky maps: tracts (tangent-plane pixel grids) cut into overlapping patches (Rubin's ``deepCoadd_skyMap``).

apfast uses a *discrete* sky map, like Rubin's ``DiscreteSkyMap``: one tract per
given centre ``(ra, dec)``. Every tract is a square TAN (gnomonic) grid of
``tract_size`` x ``tract_size`` pixels of ``pixel_scale`` arcsec, north up and
east left, whose centre pixel ``((n - 1) / 2, (n - 1) / 2)`` sits on the tract
centre. A tract is cut into ``ceil(tract_size / patch_size)`` patches per axis.
A patch's *inner* box tiles the tract; its *outer* box (what is stored and what
:meth:`SkyMap.patch_bbox` returns) is the inner box grown by ``overlap`` pixels on
every side, clipped to the tract. Patches are named ``"x,y"`` (column index,
row index), as in Rubin's Gen 2 template repositories.

For a survey, :func:`skymap_for_calexps` builds one tract per field: CCD centres
closer than ``cluster_radius`` degrees are grouped, and each group gets a tract
centred on it that is large enough for all of its CCDs.

Files: ``<templates>/deepCoadd/skyMap.json`` (dataset type ``deepCoadd_skyMap``
of :mod:`apfast.repo.butler`); patches are ``deepCoadd/{filter}/{tract}/{patch}.fits``.

Examples
--------
>>> sm = make_skymap([(150.0, 2.0)], pixel_scale=0.2636, tract_size=1000, patch_size=400, overlap=20)
>>> sm.patch_names(0)
['0,0', '1,0', '2,0', '0,1', '1,1', '2,1', '0,2', '1,2', '2,2']
>>> sm.patch_bbox(0, "1,0")
(0, 420, 380, 820)
>>> SkyMap.from_json(sm.to_json()) == sm
True
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.wcs import WCS

from apfast._fileio import atomic_path
from apfast.errors import InputError

__all__ = [
    "SKYMAP_RELPATH",
    "SkyMap",
    "make_skymap",
    "overlap_bbox",
    "read_skymap",
    "skymap_for_calexps",
    "write_skymap",
]

log = logging.getLogger(__name__)

#: Where a template repository keeps its sky map (the Butler's ``deepCoadd_skyMap``).
SKYMAP_RELPATH = Path("deepCoadd") / "skyMap.json"
_JSON_TYPE = "apfast.DiscreteSkyMap"
_JSON_VERSION = 1
#: Sky points further than this from a tract centre are never projected onto it (TAN diverges at 90 deg).
_MAX_TRACT_ANGLE = 60.0


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _boundary_pixels(shape: tuple[int, int], border: float = 0.0, n_per_edge: int = 16) -> np.ndarray:
    """Return ``(m, 2)`` (x, y) points along the outer pixel edges of a ``(ny, nx)`` box, corners included."""
    ny, nx = shape
    x0, x1 = -0.5 - border, nx - 0.5 + border
    y0, y1 = -0.5 - border, ny - 0.5 + border
    t = np.linspace(0.0, 1.0, n_per_edge + 1)[:-1]
    bottom = np.stack([x0 + t * (x1 - x0), np.full_like(t, y0)], axis=1)
    right = np.stack([np.full_like(t, x1), y0 + t * (y1 - y0)], axis=1)
    top = np.stack([x1 - t * (x1 - x0), np.full_like(t, y1)], axis=1)
    left = np.stack([np.full_like(t, x0), y1 - t * (y1 - y0)], axis=1)
    return np.concatenate([bottom, right, top, left])


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull (monotone chain) of ``(m, 2)`` points."""
    pts = sorted({(float(p[0]), float(p[1])) for p in points})
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _polygon_hits_box(poly: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> bool:
    """Separating-axis test: does the convex polygon ``poly`` (ccw) intersect the box [x0,x1]x[y0,y1]?"""
    if poly[:, 0].max() < x0 or poly[:, 0].min() > x1 or poly[:, 1].max() < y0 or poly[:, 1].min() > y1:
        return False
    box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    edges = np.roll(poly, -1, axis=0) - poly
    for (ex, ey), p in zip(edges, poly, strict=True):
        normal = np.array([ey, -ex])  # outward for a ccw polygon
        if np.all((box - p) @ normal > 0):
            return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class SkyMap:
    """A discrete sky map: TAN tracts at given centres, cut into overlapping square patches.

    Parameters
    ----------
    centres : tuple of (float, float)
        ``(ra, dec)`` in degrees of each tract centre; tract ids are the indices.
    pixel_scale : float
        Pixel size in arcsec (DECam 0.2636).
    tract_size : int
        Side of every (square) tract in pixels.
    patch_size : int
        Side of a patch's inner box in pixels (the last row/column of patches may be smaller).
    overlap : int
        Pixels added on every side of the inner box to make the stored (outer) patch box.
    """

    centres: tuple[tuple[float, float], ...]
    pixel_scale: float
    tract_size: int
    patch_size: int = 4000
    overlap: int = 100

    def __post_init__(self) -> None:
        try:
            centres = tuple((float(ra) % 360.0, float(dec)) for ra, dec in self.centres)
        except (TypeError, ValueError):
            msg = f"SkyMap centres must be a sequence of (ra, dec) pairs in degrees, got {self.centres!r}"
            raise InputError(msg) from None
        if not centres or not all(math.isfinite(r) and -90.0 <= d <= 90.0 for r, d in centres):
            msg = f"SkyMap needs at least one finite (ra, dec) centre with |dec| <= 90 deg, got {self.centres!r}"
            raise InputError(msg)
        if not (math.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            msg = f"SkyMap pixel_scale must be a positive number of arcsec, got {self.pixel_scale}"
            raise InputError(msg)
        for name in ("tract_size", "patch_size"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                msg = f"SkyMap {name} must be a positive integer number of pixels, got {v}"
                raise InputError(msg)
        if int(self.overlap) != self.overlap or self.overlap < 0:
            msg = f"SkyMap overlap must be an integer >= 0 pixels, got {self.overlap}"
            raise InputError(msg)
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "pixel_scale", float(self.pixel_scale))
        object.__setattr__(self, "tract_size", int(self.tract_size))
        object.__setattr__(self, "patch_size", int(self.patch_size))
        object.__setattr__(self, "overlap", int(self.overlap))

    # ----------------------------------------------------------------- geometry
    @property
    def n_tracts(self) -> int:
        """Number of tracts."""
        return len(self.centres)

    @property
    def n_patches(self) -> int:
        """Patches per tract axis, ``ceil(tract_size / patch_size)``."""
        return -(-self.tract_size // self.patch_size)

    def _check_tract(self, tract: int) -> int:
        if isinstance(tract, bool) or int(tract) != tract or not 0 <= int(tract) < self.n_tracts:
            msg = f"tract {tract!r} is not in this sky map; valid tracts are 0..{self.n_tracts - 1}"
            raise InputError(msg)
        return int(tract)

    def _parse_patch(self, patch: str | tuple[int, int]) -> tuple[int, int]:
        try:
            if isinstance(patch, str):
                px, py = (int(p) for p in patch.split(","))
            else:
                px, py = (int(p) for p in patch)
        except (TypeError, ValueError):
            msg = f"patch {patch!r} is not a patch name; use 'x,y' with integer indices, e.g. '1,0'"
            raise InputError(msg) from None
        if not (0 <= px < self.n_patches and 0 <= py < self.n_patches):
            msg = f"patch {patch!r} is outside the tract; indices run 0..{self.n_patches - 1} on each axis"
            raise InputError(msg)
        return px, py

    def patch_names(self, tract: int) -> list[str]:
        """All patch names of ``tract``, row by row (``'0,0', '1,0', ...``)."""
        self._check_tract(tract)
        n = self.n_patches
        return [f"{px},{py}" for py in range(n) for px in range(n)]

    def tract_wcs(self, tract: int) -> WCS:
        """Return the TAN WCS of ``tract`` (0-based pixel centres; north up, east left).

        Examples
        --------
        >>> sm = make_skymap([(10.0, -30.0)], pixel_scale=1.0, tract_size=101)
        >>> [round(float(v), 9) for v in sm.tract_wcs(0).pixel_to_world_values(50, 50)]
        [10.0, -30.0]
        """
        t = self._check_tract(tract)
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = list(self.centres[t])
        c = (self.tract_size - 1) / 2.0 + 1.0  # FITS CRPIX is 1-based
        w.wcs.crpix = [c, c]
        s = self.pixel_scale / 3600.0
        w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
        w.wcs.set()
        return w

    def patch_inner_bbox(self, tract: int, patch: str | tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` (half-open, tract pixels) of the patch's inner box, without overlap."""
        self._check_tract(tract)
        px, py = self._parse_patch(patch)
        ps, n = self.patch_size, self.tract_size
        return py * ps, min((py + 1) * ps, n), px * ps, min((px + 1) * ps, n)

    def patch_bbox(self, tract: int, patch: str | tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` (half-open, tract pixels) of the stored patch: inner box + overlap, clipped."""
        y0, y1, x0, x1 = self.patch_inner_bbox(tract, patch)
        o, n = self.overlap, self.tract_size
        return max(0, y0 - o), min(n, y1 + o), max(0, x0 - o), min(n, x1 + o)

    def patch_wcs(self, tract: int, patch: str | tuple[int, int]) -> tuple[WCS, tuple[int, int]]:
        """Return the patch's WCS (pixel ``[0, 0]`` = its bbox corner) and its ``(ny, nx)`` shape."""
        y0, y1, x0, x1 = self.patch_bbox(tract, patch)
        w = self.tract_wcs(tract)
        w.wcs.crpix = [w.wcs.crpix[0] - x0, w.wcs.crpix[1] - y0]
        w.wcs.set()
        return w, (y1 - y0, x1 - x0)

    def tract_pixels(self, tract: int, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Project sky positions (deg) onto ``tract``: ``(x, y, ok)``; ``ok`` is False beyond 60 deg."""
        t = self._check_tract(tract)
        ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
        cen = _unit(np.array(self.centres[t][0]), np.array(self.centres[t][1]))
        ok = _unit(ra, dec) @ cen > math.cos(math.radians(_MAX_TRACT_ANGLE))
        x = np.full(ra.shape, np.nan)
        y = np.full(ra.shape, np.nan)
        if ok.any():
            x[ok], y[ok] = self.tract_wcs(t).all_world2pix(ra[ok], dec[ok], 0)
        return x, y, ok

    def find_tracts_patches(
        self, wcs: WCS, shape: tuple[int, int], *, border: float = 0.0
    ) -> list[tuple[int, str]]:
        """Every ``(tract, patch)`` whose stored (outer) box overlaps a CCD.

        The CCD outline (its outer pixel edges, 16 points per side including the
        corners, grown by ``border`` pixels) is mapped to the sky with ``wcs``,
        projected onto each tract and replaced by its convex hull; a patch is
        returned when that polygon intersects the patch box. Testing the whole
        outline, not only the centre or corners, keeps CCDs that straddle a patch
        or tract edge from losing a patch (Rubin DM-29703).

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            Pixel -> sky of the CCD (0-based pixel centres).
        shape : tuple of int
            ``(ny, nx)`` of the CCD.
        border : float
            Grow the CCD box by this many pixels on every side.

        Returns
        -------
        list of (int, str)
            Sorted by tract, then patch row, then column.
        """
        ny, nx = (int(s) for s in shape)
        pix = _boundary_pixels((ny, nx), border)
        ra, dec = wcs.all_pix2world(pix[:, 0], pix[:, 1], 0)
        out: list[tuple[int, str]] = []
        for t in range(self.n_tracts):
            x, y, ok = self.tract_pixels(t, ra, dec)
            if not ok.all():
                continue
            hull = _convex_hull(np.stack([x, y], axis=1))
            if len(hull) < 3:
                continue
            lo, hi = -0.5, self.tract_size - 0.5
            if not _polygon_hits_box(hull, lo, hi, lo, hi):
                continue
            # candidate patches from the hull's bounding box (outer boxes extend `overlap` beyond inner)
            ps, o, n = self.patch_size, self.overlap, self.n_patches
            pxs = range(max(0, int((hull[:, 0].min() - o) // ps)), min(n, int((hull[:, 0].max() + o) // ps) + 1))
            pys = range(max(0, int((hull[:, 1].min() - o) // ps)), min(n, int((hull[:, 1].max() + o) // ps) + 1))
            for py in pys:
                for px in pxs:
                    y0, y1, x0, x1 = self.patch_bbox(t, (px, py))
                    if _polygon_hits_box(hull, x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5):
                        out.append((t, f"{px},{py}"))
        return out

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (``type``, ``version`` and the constructor arguments)."""
        return {
            "type": _JSON_TYPE,
            "version": _JSON_VERSION,
            "centres": [list(c) for c in self.centres],
            "pixel_scale": self.pixel_scale,
            "tract_size": self.tract_size,
            "patch_size": self.patch_size,
            "overlap": self.overlap,
        }

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict` (floats keep every bit)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> SkyMap:
        """Rebuild from :meth:`to_dict` output; ``source`` names the file in errors."""
        if not isinstance(data, dict) or data.get("type") != _JSON_TYPE:
            kind = data.get("type") if isinstance(data, dict) else type(data).__name__
            msg = (
                f"{source} is not an apfast sky map (type {kind!r}, expected {_JSON_TYPE!r}); rebuild it with "
                f"apfast.diffim.template.build_templates"
            )
            raise InputError(msg)
        try:
            return cls(
                centres=tuple(tuple(c) for c in data["centres"]),
                pixel_scale=data["pixel_scale"],
                tract_size=data["tract_size"],
                patch_size=data["patch_size"],
                overlap=data["overlap"],
            )
        except KeyError as exc:
            msg = f"{source}: sky map lacks key {exc}; rebuild it with apfast.diffim.template.build_templates"
            raise InputError(msg) from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "<json>") -> SkyMap:
        """Rebuild from :meth:`to_json` text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"{source} is not valid JSON ({exc}); rebuild the sky map with apfast.diffim.template.build_templates"
            raise InputError(msg) from None
        return cls.from_dict(data, source=source)


def write_skymap(template_root: str | Path, skymap: SkyMap) -> Path:
    """Write ``skymap`` to ``<template_root>/deepCoadd/skyMap.json`` atomically and return the path."""
    path = Path(template_root) / SKYMAP_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        tmp.write_text(skymap.to_json(), encoding="utf-8")
    return path


def read_skymap(template_root: str | Path) -> SkyMap:
    """Read ``<template_root>/deepCoadd/skyMap.json``.

    Raises
    ------
    InputError
        If the file is missing or is not an apfast sky map.
    """
    path = Path(template_root) / SKYMAP_RELPATH
    if not path.is_file():
        msg = (
            f"no sky map at {path}: {template_root} is not a template repository; build one with "
            f"apfast.diffim.template.build_templates or point the template root at the right folder"
        )
        raise InputError(msg)
    return SkyMap.from_json(path.read_text(encoding="utf-8"), source=str(path))


def make_skymap(
    centres: Sequence[tuple[float, float]],
    *,
    pixel_scale: float,
    tract_size: int,
    patch_size: int = 4000,
    overlap: int = 100,
) -> SkyMap:
    """Build a discrete sky map with one ``tract_size``-pixel TAN tract per ``(ra, dec)`` centre (deg).

    Examples
    --------
    >>> make_skymap([(0.0, 0.0), (10.0, 0.0)], pixel_scale=0.2636, tract_size=20000).n_patches
    5
    """
    return SkyMap(
        centres=tuple((float(r), float(d)) for r, d in centres),
        pixel_scale=pixel_scale,
        tract_size=tract_size,
        patch_size=patch_size,
        overlap=overlap,
    )


def skymap_for_calexps(
    wcs_list: Sequence[WCS],
    shapes: Sequence[tuple[int, int]],
    *,
    pixel_scale: float | None = None,
    patch_size: int = 4000,
    overlap: int = 100,
    margin: int = 200,
    cluster_radius: float = 2.0,
) -> SkyMap:
    """Build a sky map with one tract per field covering the given CCDs.

    CCD centres within ``cluster_radius`` degrees of a group's first CCD join
    that group (greedy, in input order); each group becomes a tract centred on
    the mean direction of its CCD corners. All tracts share one size: the
    largest extent any group needs on its tangent plane, plus ``margin`` pixels
    on each side. (For a single pointing this is "one tract covering the
    CCDs".)

    Parameters
    ----------
    wcs_list : sequence of WCS
        The CCDs' WCSs.
    shapes : sequence of (ny, nx)
        The CCDs' shapes.
    pixel_scale : float, optional
        Arcsec per pixel; default: the mean pixel scale of the first WCS at its reference pixel.
    patch_size, overlap : int
        Patch geometry (pixels).
    margin : int
        Extra pixels around the CCDs on every tract side.
    cluster_radius : float
        Degrees; CCDs further apart start a new tract.

    Raises
    ------
    InputError
        If no CCDs are given or the lists differ in length.
    """
    if len(wcs_list) == 0 or len(wcs_list) != len(shapes):
        msg = (
            f"skymap_for_calexps needs one shape per WCS and at least one CCD, got {len(wcs_list)} WCSs and "
            f"{len(shapes)} shapes"
        )
        raise InputError(msg)
    if pixel_scale is None:
        scales = np.abs(np.linalg.eigvals(wcs_list[0].pixel_scale_matrix)) * 3600.0
        pixel_scale = float(np.sqrt(np.prod(scales)))
    corners_sky = []
    centres_sky = []
    for wcs, shape in zip(wcs_list, shapes, strict=True):
        pix = _boundary_pixels(shape, 0.0, 1)
        ra, dec = wcs.all_pix2world(pix[:, 0], pix[:, 1], 0)
        corners_sky.append(_unit(ra, dec))
        cra, cdec = wcs.all_pix2world([(shape[1] - 1) / 2.0], [(shape[0] - 1) / 2.0], 0)
        centres_sky.append(_unit(cra, cdec)[0])
    groups: list[list[int]] = []
    cos_r = math.cos(math.radians(cluster_radius))
    for i, c in enumerate(centres_sky):
        for g in groups:
            if float(c @ centres_sky[g[0]]) > cos_r:
                g.append(i)
                break
        else:
            groups.append([i])
    centres = []
    for g in groups:
        v = np.concatenate([corners_sky[i] for i in g]).mean(axis=0)
        v /= np.linalg.norm(v)
        centres.append((math.degrees(math.atan2(v[1], v[0])) % 360.0, math.degrees(math.asin(v[2]))))
    probe = make_skymap(centres, pixel_scale=pixel_scale, tract_size=1, patch_size=1, overlap=0)
    half = 0.0
    for t, g in enumerate(groups):
        for i in g:
            v = corners_sky[i]
            ra = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
            dec = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
            x, y, _ = probe.tract_pixels(t, ra, dec)
            half = max(half, float(np.nanmax(np.abs(x))), float(np.nanmax(np.abs(y))))
    tract_size = int(2 * math.ceil(half + margin) + 1)
    log.info("sky map: %d tract(s) of %d px at %.4f arcsec/px", len(centres), tract_size, pixel_scale)
    return make_skymap(
        centres, pixel_scale=pixel_scale, tract_size=tract_size, patch_size=patch_size, overlap=overlap
    )


def overlap_bbox(
    src_wcs: WCS, src_shape: tuple[int, int], dest_wcs: WCS, dest_shape: tuple[int, int], *, margin: int = 4
) -> tuple[int, int, int, int] | None:
    """Destination pixel box ``(y0, y1, x0, x1)`` covering the source image's outline, or ``None``.

    The source outline (16 points per side) is mapped to the destination
    pixels, its bounding box grown by ``margin`` and clipped to the
    destination; warping only into this box saves the work on pixels the
    source cannot reach.
    """
    pix = _boundary_pixels(src_shape, 0.0)
    ra, dec = src_wcs.all_pix2world(pix[:, 0], pix[:, 1], 0)
    x, y = dest_wcs.all_world2pix(ra, dec, 0)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return None
    ny, nx = dest_shape
    x0 = max(0, int(math.floor(x.min())) - margin)
    x1 = min(nx, int(math.ceil(x.max())) + margin + 1)
    y0 = max(0, int(math.floor(y.min())) - margin)
    y1 = min(ny, int(math.ceil(y.max())) + margin + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1
