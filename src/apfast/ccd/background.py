"""Sky background: a binned, clipped mesh interpolated by a smooth spline (Rubin ``binSize=128``, MEANCLIP, Akima).

:func:`measure_background` cuts the image into ``bin_size`` cells, takes a
3-sigma clipped mean (or the median) of the good pixels of every cell, fills
cells with fewer than ``min_good_fraction`` good pixels from their neighbours
and returns a :class:`BackgroundModel`. :meth:`BackgroundModel.image` expands
the mesh to full resolution with a separable Akima spline (natural cubic or
linear on request) through the cell centres; :func:`subtract_background` does
both and returns ``image - model``.

Cell layout: ``n_cells = max(1, n // bin_size)`` along each axis; every cell is
``bin_size`` pixels wide except the last, which also takes the remainder
(``bin_size .. 2 * bin_size - 1`` pixels), so no cell is a thin sliver.

The numba kernels are in :mod:`apfast.kernels.background`.

Examples
--------
>>> import numpy as np
>>> img = np.full((256, 384), 100.0, dtype=np.float32)
>>> model = measure_background(img, config=BackgroundConfig())
>>> model.values.shape, float(model.image()[10, 10])
((2, 3), 100.0)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast.errors import AlgorithmError, InputError
from apfast.kernels import background as kb
from apfast.masks import MASK_BITS, MASK_PLANES, bitmask

__all__ = [
    "BackgroundConfig",
    "BackgroundModel",
    "NoGoodBackgroundPixelsError",
    "cell_edges",
    "measure_background",
    "subtract_background",
]

log = logging.getLogger(__name__)

_STATS = {"MEANCLIP": kb.STAT_MEANCLIP, "MEDIAN": kb.STAT_MEDIAN}
_METHODS = {"AKIMA": kb.METHOD_AKIMA, "CUBIC": kb.METHOD_CUBIC, "LINEAR": kb.METHOD_LINEAR}


@dataclass(frozen=True, slots=True, kw_only=True)
class BackgroundConfig(ConfigSection):
    """Sky background: mesh of clipped cell statistics interpolated by a spline."""

    _key_prefix: ClassVar[str] = "background."

    bin_size: int = opt(128, "Side of a mesh cell in pixels (>= 4); the last cell per axis takes the remainder.")
    statistic: Literal["MEANCLIP", "MEDIAN"] = opt(
        "MEANCLIP",
        "Robust statistic of the good pixels of a cell.",
        choices={
            "MEANCLIP": "mean after n_iter rounds of n_sigma clipping about median/IQR start values (Rubin)",
            "MEDIAN": "median (slower to converge on faint sources, insensitive to outliers)",
        },
    )
    n_sigma: float = opt(3.0, "Clipping half-width in standard deviations for MEANCLIP (> 0).")
    n_iter: int = opt(3, "Clipping iterations for MEANCLIP (>= 1).")
    ignored_mask_planes: tuple[str, ...] = opt(
        ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA", "SAT", "CR"),
        "Mask planes whose pixels are left out of the cell statistics.",
    )
    interpolation: Literal["AKIMA", "CUBIC", "LINEAR"] = opt(
        "AKIMA",
        "How the mesh is expanded to full resolution (separably, x then y, through the cell centres).",
        choices={
            "AKIMA": "Akima spline: C1, no overshoot near steps, exact for quadratic skies (Rubin AKIMA_SPLINE)",
            "CUBIC": "natural cubic spline: C2, may overshoot near sharp changes",
            "LINEAR": "piecewise linear: continuous only",
        },
    )
    min_good_fraction: float = opt(
        0.1, "Cells with fewer good pixels than this fraction of their area are filled from neighbours."
    )

    def _validate(self) -> None:
        if self.bin_size < 4:
            self._fail("bin_size", self.bin_size, "use an integer >= 4, e.g. 128")
        if not (np.isfinite(self.n_sigma) and self.n_sigma > 0):
            self._fail("n_sigma", self.n_sigma, "use a finite number > 0, e.g. 3.0")
        if self.n_iter < 1:
            self._fail("n_iter", self.n_iter, "use an integer >= 1, e.g. 3")
        unknown = [p for p in self.ignored_mask_planes if p not in MASK_BITS]
        if unknown:
            self._fail(
                "ignored_mask_planes", self.ignored_mask_planes,
                f"unknown plane(s) {unknown}; known planes are {', '.join(MASK_PLANES)}",
            )
        if not (0.0 < self.min_good_fraction <= 1.0):
            self._fail("min_good_fraction", self.min_good_fraction, "use a fraction in (0, 1], e.g. 0.1")


class NoGoodBackgroundPixelsError(AlgorithmError):
    """Every mesh cell had too few good pixels, so no sky level can be measured."""


def cell_edges(n: int, bin_size: int) -> np.ndarray:
    """Boundaries of the mesh cells along one axis of ``n`` pixels.

    Parameters
    ----------
    n : int
        Image size along the axis.
    bin_size : int
        Nominal cell size.

    Returns
    -------
    ndarray, int64, shape (n_cells + 1,)
        ``0, b, 2b, ..., n``; the last cell takes the remainder.

    Examples
    --------
    >>> cell_edges(300, 128).tolist()
    [0, 128, 300]
    >>> cell_edges(50, 128).tolist()
    [0, 50]
    """
    ncell = max(1, n // bin_size)
    edges = np.arange(ncell + 1, dtype=np.int64) * bin_size
    edges[-1] = n
    return edges


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class BackgroundModel:
    """A measured sky mesh and how to expand it (plain arrays and scalars, for FITS storage).

    Attributes
    ----------
    bin_size : int
        Nominal cell size in pixels.
    image_shape : tuple of int
        ``(ny, nx)`` of the image measured.
    values : ndarray, float32, shape (ny_cells, nx_cells)
        Sky level per cell (filled cells carry the neighbour average).
    stds : ndarray, float32, shape (ny_cells, nx_cells)
        Clipped standard deviation of the pixels of each cell.
    counts : ndarray, int32, shape (ny_cells, nx_cells)
        Good (unmasked, finite) pixels per cell before clipping.
    filled : ndarray, bool, shape (ny_cells, nx_cells)
        True where the cell had too few good pixels and was filled from neighbours.
    interpolation : str
        ``'AKIMA'``, ``'CUBIC'`` or ``'LINEAR'``.
    statistic : str
        The cell statistic used (``'MEANCLIP'`` or ``'MEDIAN'``).
    """

    bin_size: int
    image_shape: tuple[int, int]
    values: np.ndarray
    stds: np.ndarray
    counts: np.ndarray
    filled: np.ndarray
    interpolation: str = "AKIMA"
    statistic: str = "MEANCLIP"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) != 2 or min(shape) < 1:
            msg = f"BackgroundModel image_shape must be (ny, nx) with positive sizes, got {self.image_shape}"
            raise InputError(msg)
        interp = str(self.interpolation).upper()
        if interp not in _METHODS:
            msg = f"BackgroundModel interpolation {self.interpolation!r} is unknown; use one of {sorted(_METHODS)}"
            raise InputError(msg)
        bs = int(self.bin_size)
        mesh_shape = (len(cell_edges(shape[0], bs)) - 1, len(cell_edges(shape[1], bs)) - 1)
        arrays = {}
        for name, dtype in (("values", np.float32), ("stds", np.float32), ("counts", np.int32), ("filled", bool)):
            a = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            if a.shape != mesh_shape:
                msg = (
                    f"BackgroundModel {name} has shape {a.shape}, but bin_size={bs} on an image of shape "
                    f"{shape} needs a mesh of shape {mesh_shape}"
                )
                raise InputError(msg)
            a.setflags(write=False)
            arrays[name] = a
        if not np.all(np.isfinite(arrays["values"])):
            msg = "BackgroundModel values must all be finite (fill empty cells before building the model)"
            raise InputError(msg)
        object.__setattr__(self, "bin_size", bs)
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "interpolation", interp)
        object.__setattr__(self, "statistic", str(self.statistic).upper())
        for name, a in arrays.items():
            object.__setattr__(self, name, a)

    @property
    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """``(yc, xc)``: float64 pixel coordinates of the cell centres along y and x."""
        ye = cell_edges(self.image_shape[0], self.bin_size)
        xe = cell_edges(self.image_shape[1], self.bin_size)
        return 0.5 * (ye[:-1] + ye[1:] - 1.0), 0.5 * (xe[:-1] + xe[1:] - 1.0)

    def image(self) -> np.ndarray:
        """Evaluate the smooth model at every pixel.

        Returns
        -------
        ndarray, float32, shape ``image_shape``
            The sky model; equals the mesh value at every cell centre.
        """
        yc, xc = self.cell_centres
        out = np.empty(self.image_shape, dtype=np.float32)
        kb.interpolate_mesh(self.values, xc, yc, _METHODS[self.interpolation], out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain arrays and scalars (copies) for storage; :meth:`from_dict` rebuilds the model."""
        return {
            "bin_size": self.bin_size,
            "image_shape": tuple(self.image_shape),
            "values": self.values.copy(),
            "stds": self.stds.copy(),
            "counts": self.counts.copy(),
            "filled": self.filled.copy(),
            "interpolation": self.interpolation,
            "statistic": self.statistic,
        }

    def to_container(self) -> Any:
        """The :class:`apfast.exposure.Background` stored as ``calexpBackground`` (variance = stds^2)."""
        from apfast.exposure import Background

        return Background(bin_size=self.bin_size, values=self.values, image_shape=self.image_shape,
                          interpolation=self.interpolation.lower(), variance=self.stds.astype(np.float32) ** 2)

    @classmethod
    def from_container(cls, bk: Any) -> BackgroundModel:
        """Rebuild an evaluable model from a stored :class:`apfast.exposure.Background`.

        The cell standard deviations come from its variance.
        """
        values = np.asarray(bk.values)
        stds = np.sqrt(np.asarray(bk.variance, np.float32)) if bk.variance is not None else np.zeros(values.shape)
        return cls(bin_size=bk.bin_size, image_shape=tuple(bk.image_shape), values=values, stds=stds,
                   counts=np.zeros(values.shape, np.int32), filled=np.zeros(values.shape, bool),
                   interpolation=bk.interpolation)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackgroundModel:
        """Rebuild a model from :meth:`to_dict` output (``stds``/``counts``/``filled`` may be absent)."""
        values = np.asarray(d["values"])
        return cls(
            bin_size=d["bin_size"],
            image_shape=tuple(d["image_shape"]),
            values=values,
            stds=d.get("stds", np.zeros(values.shape, np.float32)),
            counts=d.get("counts", np.zeros(values.shape, np.int32)),
            filled=d.get("filled", np.zeros(values.shape, bool)),
            interpolation=d.get("interpolation", "AKIMA"),
            statistic=d.get("statistic", "MEANCLIP"),
        )


def _as_image(image: Any, name: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 2 or a.size == 0:
        msg = f"{name} must be a non-empty 2-D array (ny, nx), got shape {a.shape}"
        raise InputError(msg)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        msg = f"{name} must hold real numbers, got dtype {a.dtype}; convert with .astype(np.float32)"
        raise InputError(msg)
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=np.int32)
    m = np.asarray(mask)
    if m.shape != shape:
        msg = f"mask shape {m.shape} differs from the image shape {shape}; pass the mask plane of the same image"
        raise InputError(msg)
    if not np.issubdtype(m.dtype, np.integer):
        msg = f"mask must be an integer bit-plane array, got dtype {m.dtype}"
        raise InputError(msg)
    return np.ascontiguousarray(m, dtype=np.int32)


def measure_background(image: Any, mask: Any = None, *, config: BackgroundConfig) -> BackgroundModel:
    """Measure the sky mesh of an image.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Pixels (any real dtype or byte order; converted to native float32). Not modified.
    mask : array_like of int, shape (ny, nx), optional
        Mask bit planes (:mod:`apfast.masks`); pixels with any of
        ``config.ignored_mask_planes`` set, and non-finite pixels, are left out.
    config : BackgroundConfig
        Cell size, statistic, clipping and interpolation.

    Returns
    -------
    BackgroundModel
        Mesh values, stds, counts and fill flags; ``.image()`` gives the smooth model.

    Raises
    ------
    InputError
        If the image is not 2-D real numbers or the mask does not match it.
    NoGoodBackgroundPixelsError
        If no cell has at least ``min_good_fraction`` good pixels.

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[0:512, 0:512]
    >>> sky = (100 + 0.01 * x + 0.02 * y).astype(np.float32)
    >>> model = measure_background(sky, config=BackgroundConfig())
    >>> bool(np.abs(model.image() - sky).max() < 1e-3)
    True
    """
    img = _as_image(image)
    msk = _as_mask(mask, img.shape)
    ny, nx = img.shape
    bs = config.bin_size
    ye = cell_edges(ny, bs)
    xe = cell_edges(nx, bs)
    shape = (len(ye) - 1, len(xe) - 1)
    values = np.empty(shape, dtype=np.float32)
    stds = np.empty(shape, dtype=np.float32)
    counts = np.empty(shape, dtype=np.int32)
    kb.mesh_statistics(
        img, msk, bitmask(config.ignored_mask_planes), xe, ye,
        _STATS[config.statistic], float(config.n_sigma), int(config.n_iter), values, stds, counts,
    )
    area = np.diff(ye)[:, None] * np.diff(xe)[None, :]
    good = (counts >= np.maximum(1, np.ceil(config.min_good_fraction * area))) & np.isfinite(values)
    filled = np.zeros(shape, dtype=bool)
    ngood = kb.fill_mesh_holes(values, stds, good, filled)
    if ngood == 0:
        msg = (
            f"no background cell of the {ny}x{nx} image has {config.min_good_fraction:.0%} good pixels "
            f"({int(counts.sum())} good pixels in total): check the mask (planes ignored: "
            f"{', '.join(config.ignored_mask_planes)}) or lower background.min_good_fraction / "
            f"raise background.bin_size"
        )
        raise NoGoodBackgroundPixelsError(msg, n_good_pixels=int(counts.sum()), n_cells=int(values.size))
    if filled.any():
        log.debug("background: filled %d of %d cells from neighbours", int(filled.sum()), filled.size)
    return BackgroundModel(
        bin_size=bs, image_shape=(ny, nx), values=values, stds=stds, counts=counts, filled=filled,
        interpolation=config.interpolation, statistic=config.statistic,
    )


def subtract_background(
    image: Any, mask: Any = None, *, config: BackgroundConfig
) -> tuple[np.ndarray, BackgroundModel]:
    """Measure the background and return ``(image - model, model)`` without touching the inputs.

    Parameters
    ----------
    image, mask, config :
        As :func:`measure_background`.

    Returns
    -------
    image_minus_bkg : ndarray, float32, shape (ny, nx)
        A new array.
    model : BackgroundModel

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((128, 128), 50.0, dtype=np.float32)
    >>> sub, model = subtract_background(img, config=BackgroundConfig(bin_size=64))
    >>> float(np.abs(sub).max())
    0.0
    """
    model = measure_background(image, mask, config=config)
    out = model.image()
    np.subtract(_as_image(image), out, out=out)
    return out, model
