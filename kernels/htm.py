"""Hierarchical Triangular Mesh (HTM) indexing kernels.

The HTM (Kunszt, Szalay & Thakar 2001, "The Hierarchical Triangular Mesh";
Szalay et al. 2007, arXiv:cs/0701164) splits the sphere into 8 root triangles,
the octants of the unit sphere, and each triangle recursively into 4 children.
With the six octahedron vertices ``+x, +y, +z, -x, -y, -z`` the roots are,
listed counter-clockwise seen from outside the sphere (the same vertex order
as ``lsst.sphgeom.HtmPixelization``)::

    id  name  vertices            id  name  vertices
     8   S0   (+x, -z, +y)        12   N0   (+x, +z, -y)
     9   S1   (+y, -z, -x)        13   N1   (-y, +z, -x)
    10   S2   (-x, -z, -y)        14   N2   (-x, +z, +y)
    11   S3   (-y, -z, +x)        15   N3   (+y, +z, +x)

A triangle ``(v0, v1, v2)`` with edge midpoints ``w0 = |v1 + v2|``,
``w1 = |v0 + v2|``, ``w2 = |v0 + v1|`` (normalised) has the children
``4 id + 0 = (v0, w2, w1)``, ``4 id + 1 = (v1, w0, w2)``,
``4 id + 2 = (v2, w1, w0)`` and ``4 id + 3 = (w0, w1, w2)``. A point ``p`` is in
child 0 when it is on the inner side of the great circle through ``w2, w1``,
i.e. ``det(w2, w1, p) >= 0``, and likewise for children 1 and 2; otherwise it is
in the central child 3. Points with ``z == 0`` belong to the north, points on
the ``y == 0`` meridian plane to the triangle with ``x >= 0`` on that side.
"""

from __future__ import annotations

import math

import numpy as np

from apfast._jit import jit

__all__ = ["htm_index", "radec_to_xyz"]


@jit
def radec_to_xyz(ra_deg, dec_deg, out):
    """Unit vectors of sky positions.

    ``x = cos(dec) cos(ra)``, ``y = cos(dec) sin(ra)``, ``z = sin(dec)`` with the
    angles converted to radians by multiplying by ``pi / 180`` (as
    ``lsst.sphgeom.LonLat.fromDegrees`` does, so boundary points agree).

    Parameters
    ----------
    ra_deg, dec_deg : ndarray, float64, shape (n,)
        Right ascension and declination in degrees.
    out : ndarray, float64, shape (n, 3)
        Written in place with the unit vectors.
    """
    d2r = math.pi / 180.0
    for i in range(ra_deg.shape[0]):
        ra = ra_deg[i] * d2r
        dec = dec_deg[i] * d2r
        cd = math.cos(dec)
        out[i, 0] = cd * math.cos(ra)
        out[i, 1] = cd * math.sin(ra)
        out[i, 2] = math.sin(dec)


@jit
def _two_sum(a, b):
    """Knuth's error-free sum: ``a + b = s + e`` exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@jit
def _two_prod(a, b):
    """Dekker's error-free product (Veltkamp split): ``a * b = p + e`` exactly."""
    p = a * b
    c = 134217729.0 * a
    ah = c - (c - a)
    al = a - ah
    c = 134217729.0 * b
    bh = c - (c - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


@jit
def _triple(a, b, c, s, e):
    """Add ``a * b * c`` to the double-double accumulator ``(s, e)``; return the new one."""
    p, pe = _two_prod(a, b)
    q, qe = _two_prod(p, c)
    s, se = _two_sum(s, q)
    return s, e + se + qe + pe * c


@jit
def _det(ax, ay, az, bx, by, bz, px, py, pz):
    """Sign-reliable triple product ``(a x b) . p`` (>= 0: ``p`` left of the great circle a -> b).

    Plain double precision first; when the result is within the rounding error
    bound (points within ~1e-13 rad of an edge) it is recomputed with
    error-free transformations in double-double precision (Ogita, Rump & Oishi
    2005, "Accurate sum and dot product", Sum2), so that near-boundary points
    are assigned like sphgeom's exact orientation predicate does.
    """
    d = (ay * bz - az * by) * px + (az * bx - ax * bz) * py + (ax * by - ay * bx) * pz
    if abs(d) > 1e-13:
        return d
    s = 0.0
    e = 0.0
    s, e = _triple(ay, bz, px, s, e)
    s, e = _triple(-az, by, px, s, e)
    s, e = _triple(az, bx, py, s, e)
    s, e = _triple(-ax, bz, py, s, e)
    s, e = _triple(ax, by, pz, s, e)
    s, e = _triple(-ay, bx, pz, s, e)
    return s + e


@jit
def _root_triangle(x, y, z):
    """Root triangle number 0..7 (S0..S3, N0..N3) of the unit vector (x, y, z)."""
    if z < 0.0:
        if y > 0.0:
            return 0 if x > 0.0 else 1
        if y == 0.0:
            return 0 if x >= 0.0 else 2
        return 2 if x < 0.0 else 3
    if y > 0.0:
        return 7 if x > 0.0 else 6
    if y == 0.0:
        return 7 if x >= 0.0 else 5
    return 5 if x < 0.0 else 4


@jit
def htm_index_xyz(xyz, level, roots, out):
    """HTM index at ``level`` of each unit vector (module docstring for the numbering).

    Parameters
    ----------
    xyz : ndarray, float64, shape (n, 3)
        Unit vectors (need not be exactly normalised; only signs of triple products matter).
    level : int
        Subdivision level, 0..24.
    roots : ndarray, float64, shape (8, 3, 3)
        Root triangle vertices ``roots[r, k]`` for r = S0..N3, k = 0..2.
    out : ndarray, int64, shape (n,)
        Written in place with ``id`` in ``[8 * 4**level, 16 * 4**level)``.
    """
    for i in range(xyz.shape[0]):
        px = xyz[i, 0]
        py = xyz[i, 1]
        pz = xyz[i, 2]
        r = _root_triangle(px, py, pz)
        v0x = roots[r, 0, 0]
        v0y = roots[r, 0, 1]
        v0z = roots[r, 0, 2]
        v1x = roots[r, 1, 0]
        v1y = roots[r, 1, 1]
        v1z = roots[r, 1, 2]
        v2x = roots[r, 2, 0]
        v2y = roots[r, 2, 1]
        v2z = roots[r, 2, 2]
        idx = np.int64(r + 8)
        for _ in range(level):
            # midpoints; normalised so the vertices stay well scaled at deep levels
            w0x = v1x + v2x
            w0y = v1y + v2y
            w0z = v1z + v2z
            n = math.sqrt(w0x * w0x + w0y * w0y + w0z * w0z)
            w0x /= n
            w0y /= n
            w0z /= n
            w1x = v0x + v2x
            w1y = v0y + v2y
            w1z = v0z + v2z
            n = math.sqrt(w1x * w1x + w1y * w1y + w1z * w1z)
            w1x /= n
            w1y /= n
            w1z /= n
            w2x = v0x + v1x
            w2y = v0y + v1y
            w2z = v0z + v1z
            n = math.sqrt(w2x * w2x + w2y * w2y + w2z * w2z)
            w2x /= n
            w2y /= n
            w2z /= n
            if _det(w2x, w2y, w2z, w1x, w1y, w1z, px, py, pz) >= 0.0:
                idx = idx * 4
                v1x, v1y, v1z = w2x, w2y, w2z
                v2x, v2y, v2z = w1x, w1y, w1z
            elif _det(w0x, w0y, w0z, w2x, w2y, w2z, px, py, pz) >= 0.0:
                idx = idx * 4 + 1
                v0x, v0y, v0z = v1x, v1y, v1z
                v1x, v1y, v1z = w0x, w0y, w0z
                v2x, v2y, v2z = w2x, w2y, w2z
            elif _det(w1x, w1y, w1z, w0x, w0y, w0z, px, py, pz) >= 0.0:
                idx = idx * 4 + 2
                v0x, v0y, v0z = v2x, v2y, v2z
                v1x, v1y, v1z = w1x, w1y, w1z
                v2x, v2y, v2z = w0x, w0y, w0z
            else:
                idx = idx * 4 + 3
                v0x, v0y, v0z = w0x, w0y, w0z
                v1x, v1y, v1z = w1x, w1y, w1z
                v2x, v2y, v2z = w2x, w2y, w2z
        out[i] = idx


def root_vertices() -> np.ndarray:
    """The 8 root triangles' vertices, shape (8, 3, 3) float64 (module docstring table)."""
    px, py, pz = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    mx, my, mz = (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)
    return np.array(
        [
            (px, mz, py),
            (py, mz, mx),
            (mx, mz, my),
            (my, mz, px),
            (px, pz, my),
            (my, pz, mx),
            (mx, pz, py),
            (py, pz, px),
        ],
        dtype=np.float64,
    )


def htm_index(ra_deg, dec_deg, level):
    """HTM index at ``level`` of sky positions (plain-Python entry; the work is in kernels).

    Parameters
    ----------
    ra_deg, dec_deg : array_like, float, shape (n,)
        Positions in degrees.
    level : int
        Subdivision level 0..24 (Rubin's APDB uses 20).

    Returns
    -------
    ndarray, int64, shape (n,)
        Trixel ids, equal to ``lsst.sphgeom.HtmPixelization(level).index(...)``.
    """
    ra = np.ascontiguousarray(ra_deg, dtype=np.float64).reshape(-1)
    dec = np.ascontiguousarray(dec_deg, dtype=np.float64).reshape(-1)
    xyz = np.empty((ra.shape[0], 3), dtype=np.float64)
    radec_to_xyz(ra, dec, xyz)
    out = np.empty(ra.shape[0], dtype=np.int64)
    htm_index_xyz(xyz, int(level), _ROOTS, out)
    return out


_ROOTS = root_vertices()


def _warmup_cases():
    """Tiny calls with the APDB's dtypes (used by ``apfast warmup``)."""
    ra = np.array([10.0, 200.0])
    dec = np.array([-30.0, 5.0])
    xyz = np.empty((2, 3), dtype=np.float64)
    return [(radec_to_xyz, (ra, dec, xyz)), (htm_index_xyz, (xyz, 20, _ROOTS, np.empty(2, np.int64)))]
