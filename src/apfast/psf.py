"""Point-spread-function models attached to an :class:`apfast.exposure.Exposure` (core: imports no stage).

Three containers share one small interface, :class:`PsfModel`:

- :class:`GaussianPsf`: a circular Gaussian of fixed ``sigma`` (pixels).
- :class:`ImagePsf`: one constant pixel stamp.
- :class:`PolynomialPixelPsf`: a spatially varying stamp, a sum of basis stamps
  weighted by 2-D polynomials of the position (what the PSF determiner fills).

Conventions shared by every model:

- ``compute_image(x, y)`` returns a float64 ``(k, k)`` stamp, ``k`` odd, that sums
  to 1 and is centred on the central pixel ``(k // 2, k // 2)``. The position only
  selects the spatial variation; no sub-pixel phase shift is applied (callers that
  need one shift the stamp themselves).
- Stamps are point-sampled (the model value at pixel centres), not integrated over
  the pixel area.
- ``x`` and ``y`` are 0-based pixel coordinates of the parent image (column, row).
- ``fwhm(x, y)`` is in pixels. :class:`GaussianPsf` returns the analytic
  ``2 sqrt(2 ln 2) sigma``; the other models use the second moments of the stamp
  (negative pixels clipped to zero), which gives the same value for a
  point-sampled Gaussian stamp with sigma >= 1.2 pixels up to truncation at the
  stamp edge (relative error below 1e-6 when the stamp half-width exceeds 5
  sigma); below 1 pixel, sampling biases the moments by ~1e-5 or more.
- ``to_hdus()`` returns FITS extensions named ``PSF_*``; the first carries a
  ``PSFTYPE`` keyword, which :func:`psf_from_hdus` uses to rebuild the right
  class. New models register themselves by subclassing with ``psftype="NAME"``.

Examples
--------
>>> psf = GaussianPsf(2.0, 25)
>>> stamp = psf.compute_image(100.0, 200.0)
>>> stamp.shape, round(float(stamp.sum()), 12)
((25, 25), 1.0)
>>> round(psf.fwhm(0, 0), 6)
4.70964
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from astropy.io import fits

from apfast._constants import FWHM_PER_SIGMA
from apfast.errors import AlgorithmError, InputError

__all__ = [
    "FWHM_PER_SIGMA",
    "PSF_TYPES",
    "GaussianPsf",
    "ImagePsf",
    "PolynomialPixelPsf",
    "PsfModel",
    "moments_fwhm",
    "poly_terms",
    "psf_from_hdus",
]

#: Modules defining PsfModel subclasses (WarpedPsf, ConvolvedPsf), imported by name only when a file
#: holds a PSFTYPE not registered yet: a plug-in look-up, not a dependency of the core on diffim.
_STAGE_PSF_MODULES = ("apfast.diffim.warp", "apfast.diffim.decorrelate")

#: ``PSFTYPE`` keyword value -> model class; filled by ``PsfModel.__init_subclass__``.
PSF_TYPES: dict[str, type[PsfModel]] = {}


def moments_fwhm(stamp: np.ndarray) -> float:
    """FWHM (pixels) of a stamp from its second moments, ``2 sqrt(2 ln 2) sqrt((Ixx + Iyy) / 2)``.

    Negative pixels are clipped to zero first so noisy wings cannot make the
    variance negative. Exact for a Gaussian sampled at pixel centres, up to the
    flux lost beyond the stamp edge.

    Parameters
    ----------
    stamp : ndarray, shape (k, k)
        The PSF image (any normalisation).

    Returns
    -------
    float
        The FWHM in pixels.

    Raises
    ------
    AlgorithmError
        If the stamp has no positive flux.
    """
    w = np.clip(np.asarray(stamp, dtype=np.float64), 0.0, None)
    total = w.sum()
    if not total > 0:
        msg = "PSF stamp has no positive flux, so its FWHM is undefined; check the PSF model coefficients"
        raise AlgorithmError(msg, total=float(total))
    yy, xx = np.indices(w.shape, dtype=np.float64)
    xc = (w * xx).sum() / total
    yc = (w * yy).sum() / total
    ixx = (w * (xx - xc) ** 2).sum() / total
    iyy = (w * (yy - yc) ** 2).sum() / total
    return float(FWHM_PER_SIGMA * math.sqrt(0.5 * (ixx + iyy)))


def poly_terms(xn: float, yn: float, order: int) -> np.ndarray:
    """Monomials of total degree <= ``order`` at normalised position ``(xn, yn)``.

    The order is by total degree, then by decreasing power of x:
    ``1, x, y, x^2, x y, y^2, x^3, x^2 y, x y^2, y^3, ...``; there are
    ``(order + 1) (order + 2) / 2`` terms.

    Examples
    --------
    >>> poly_terms(2.0, 3.0, 2).tolist()
    [1.0, 2.0, 3.0, 4.0, 6.0, 9.0]
    """
    out = np.empty((order + 1) * (order + 2) // 2, dtype=np.float64)
    i = 0
    for degree in range(order + 1):
        for j in range(degree + 1):
            out[i] = xn ** (degree - j) * yn**j
            i += 1
    return out


def _check_stamp(image: Any, what: str) -> np.ndarray:
    arr = np.array(image, dtype=np.float64, order="C", copy=True)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] % 2 == 0:
        msg = (
            f"{what} must be a square stamp of odd size, got shape {arr.shape}; crop or pad it to (2r+1, "
            f"2r+1)"
        )
        raise InputError(msg)
    if not np.all(np.isfinite(arr)):
        msg = (
            f"{what} contains {int(np.count_nonzero(~np.isfinite(arr)))} non-finite pixels; replace them "
            f"(e.g. by 0)"
        )
        raise InputError(msg)
    return arr


class PsfModel(ABC):
    """Abstract PSF model; subclasses set ``psftype`` via ``class X(PsfModel, psftype="X")``."""

    psftype: ClassVar[str] = ""

    def __init_subclass__(cls, *, psftype: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if psftype is not None:
            if psftype in PSF_TYPES and PSF_TYPES[psftype] is not cls:
                msg = (
                    f"PSFTYPE {psftype!r} is already used by {PSF_TYPES[psftype].__qualname__}; choose "
                    f"another name"
                )
                raise InputError(msg)
            cls.psftype = psftype
            PSF_TYPES[psftype] = cls

    @property
    @abstractmethod
    def size(self) -> int:
        """Side ``k`` (odd) of the stamps returned by :meth:`compute_image`."""

    @abstractmethod
    def compute_image(self, x: float, y: float) -> np.ndarray:
        """Return the float64 ``(k, k)`` PSF stamp at pixel ``(x, y)``, summing to 1, centred."""

    def fwhm(self, x: float, y: float) -> float:
        """FWHM in pixels at ``(x, y)`` from the second moments of the stamp."""
        return moments_fwhm(self.compute_image(x, y))

    @abstractmethod
    def to_hdus(self) -> list[fits.ImageHDU]:
        """FITS extensions (``EXTNAME`` ``PSF_*``; the first has ``PSFTYPE``) describing the model."""

    @classmethod
    @abstractmethod
    def from_hdus(cls, hdus: Sequence[Any]) -> PsfModel:
        """Rebuild the model from the extensions :meth:`to_hdus` wrote."""

    def _header(self) -> fits.Header:
        hdr = fits.Header()
        hdr["PSFTYPE"] = (self.psftype, "apfast PSF model class")
        return hdr


class GaussianPsf(PsfModel, psftype="GAUSSIAN"):
    """A circular Gaussian PSF.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels (> 0).
    size : int
        Odd stamp side in pixels. Choose ``size >= 10 sigma`` to keep the
        truncated flux negligible.
    """

    def __init__(self, sigma: float, size: int) -> None:
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            msg = f"GaussianPsf sigma must be a positive finite number of pixels, got {sigma}"
            raise InputError(msg)
        if int(size) != size or size < 1 or size % 2 == 0:
            msg = (
                f"GaussianPsf size must be a positive odd integer, got {size}; try "
                f"{2 * int(math.ceil(5 * sigma)) + 1}"
            )
            raise InputError(msg)
        self.sigma = sigma
        self._size = int(size)

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"GaussianPsf(sigma={self.sigma!r}, size={self._size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GaussianPsf) and other.sigma == self.sigma and other.size == self.size

    __hash__ = None  # type: ignore[assignment]

    def compute_image(self, x: float, y: float) -> np.ndarray:
        """Return the point-sampled Gaussian stamp (independent of ``x``, ``y``), summing to 1."""
        r = self._size // 2
        d = np.arange(-r, r + 1, dtype=np.float64)
        g = np.exp(-0.5 * (d / self.sigma) ** 2)
        img = np.outer(g, g)
        return img / img.sum()

    def fwhm(self, x: float, y: float) -> float:
        """Analytic FWHM ``2 sqrt(2 ln 2) sigma`` in pixels."""
        return FWHM_PER_SIGMA * self.sigma

    def to_hdus(self) -> list[fits.ImageHDU]:
        """One ``PSF_GAUSSIAN`` extension: the stamp (for viewing) plus ``PSFSIGMA``/``PSFSIZE`` keywords."""
        hdr = self._header()
        hdr["PSFSIGMA"] = (self.sigma, "Gaussian sigma (pixels)")
        hdr["PSFSIZE"] = (self._size, "stamp side (pixels)")
        return [fits.ImageHDU(self.compute_image(0.0, 0.0), header=hdr, name="PSF_GAUSSIAN")]

    @classmethod
    def from_hdus(cls, hdus: Sequence[Any]) -> GaussianPsf:
        hdr = hdus[0].header
        return cls(float(hdr["PSFSIGMA"]), int(hdr["PSFSIZE"]))


class ImagePsf(PsfModel, psftype="IMAGE"):
    """A constant PSF given by one stamp.

    Parameters
    ----------
    image : array_like, shape (k, k)
        Odd-size square stamp; it is copied to float64 and normalised to sum 1.
    """

    def __init__(self, image: Any) -> None:
        arr = _check_stamp(image, "ImagePsf image")
        total = arr.sum()
        if not total > 0:
            msg = f"ImagePsf image sums to {total}; a PSF stamp needs positive total flux"
            raise InputError(msg)
        self.image = arr / total
        self.image.flags.writeable = False

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def __repr__(self) -> str:
        return f"ImagePsf(<{self.size}x{self.size} stamp>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImagePsf) and np.array_equal(other.image, self.image)

    __hash__ = None  # type: ignore[assignment]

    def compute_image(self, x: float, y: float) -> np.ndarray:
        """Return a copy of the stamp (independent of position)."""
        return self.image.copy()

    def to_hdus(self) -> list[fits.ImageHDU]:
        """One ``PSF_IMAGE`` extension holding the float64 stamp."""
        return [fits.ImageHDU(self.image, header=self._header(), name="PSF_IMAGE")]

    @classmethod
    def from_hdus(cls, hdus: Sequence[Any]) -> ImagePsf:
        psf = cls(np.asarray(hdus[0].data, dtype=np.float64))
        # the stored stamp is already normalised: keep its exact bits (re-dividing by a sum
        # of 1 +- 1 ulp would change them)
        exact = np.array(hdus[0].data, dtype=np.float64, order="C", copy=True)
        exact.flags.writeable = False
        psf.image = exact
        return psf


class PolynomialPixelPsf(PsfModel, psftype="POLYPIX"):
    """A spatially varying PSF: basis stamps weighted by polynomials of position.

    ``image(x, y) = N * sum_b (sum_t coeffs[b, t] * term_t(xn, yn)) * basis[b]`` with
    ``xn = (x - x_center) / x_scale``, ``yn = (y - y_center) / y_scale``, the terms
    of :func:`poly_terms` (``1, x, y, x^2, x y, y^2, ...``, total degree <= ``order``)
    and ``N`` chosen so the stamp sums to 1.

    Parameters
    ----------
    basis : array_like, shape (nb, k, k)
        Basis stamps (``k`` odd), e.g. principal components of star stamps.
    coeffs : array_like, shape (nb, ncoef)
        Polynomial coefficients per basis stamp, ``ncoef = (order+1)(order+2)/2``.
    order : int
        Total polynomial degree (>= 0).
    x_center, y_center : float
        Position (pixels) mapped to ``xn = yn = 0``, usually the image centre.
    x_scale, y_scale : float
        Positive scales (pixels), usually half the image size, so ``|xn| <= 1``.

    Raises
    ------
    InputError
        On inconsistent shapes, an even stamp size or non-finite values.
    """

    def __init__(
        self,
        basis: Any,
        coeffs: Any,
        order: int,
        x_center: float,
        y_center: float,
        x_scale: float,
        y_scale: float,
    ) -> None:
        b = np.array(basis, dtype=np.float64, order="C", copy=True)
        c = np.array(coeffs, dtype=np.float64, order="C", copy=True)
        if int(order) != order or order < 0:
            msg = f"PolynomialPixelPsf order must be a non-negative integer, got {order}"
            raise InputError(msg)
        order = int(order)
        ncoef = (order + 1) * (order + 2) // 2
        if b.ndim != 3 or b.shape[1] != b.shape[2] or b.shape[1] % 2 == 0 or b.shape[0] < 1:
            msg = f"PolynomialPixelPsf basis must have shape (nb, k, k) with k odd, got {b.shape}"
            raise InputError(msg)
        if c.shape != (b.shape[0], ncoef):
            msg = (
                f"PolynomialPixelPsf coeffs must have shape (nb, ncoef) = ({b.shape[0]}, {ncoef}) for "
                f"{b.shape[0]} basis stamps and order {order}, got {c.shape}"
            )
            raise InputError(msg)
        if not (np.all(np.isfinite(b)) and np.all(np.isfinite(c))):
            msg = "PolynomialPixelPsf basis and coeffs must be finite; the PSF fit produced NaN or inf"
            raise InputError(msg)
        scalars = {"x_center": x_center, "y_center": y_center, "x_scale": x_scale, "y_scale": y_scale}
        for name, value in scalars.items():
            if not math.isfinite(float(value)):
                msg = f"PolynomialPixelPsf {name} must be finite, got {value}"
                raise InputError(msg)
        if not (float(x_scale) > 0 and float(y_scale) > 0):
            msg = f"PolynomialPixelPsf x_scale and y_scale must be positive, got {x_scale}, {y_scale}"
            raise InputError(msg)
        b.flags.writeable = False
        c.flags.writeable = False
        self.basis, self.coeffs, self.order = b, c, order
        self.x_center, self.y_center = float(x_center), float(y_center)
        self.x_scale, self.y_scale = float(x_scale), float(y_scale)

    @property
    def size(self) -> int:
        return int(self.basis.shape[1])

    def __repr__(self) -> str:
        return f"PolynomialPixelPsf(nb={self.basis.shape[0]}, k={self.size}, order={self.order})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PolynomialPixelPsf)
            and np.array_equal(other.basis, self.basis)
            and np.array_equal(other.coeffs, self.coeffs)
            and (other.order, other.x_center, other.y_center, other.x_scale, other.y_scale)
            == (self.order, self.x_center, self.y_center, self.x_scale, self.y_scale)
        )

    __hash__ = None  # type: ignore[assignment]

    def weights(self, x: float, y: float) -> np.ndarray:
        """Return the float64 ``(nb,)`` basis weights (before normalisation) at ``(x, y)``."""
        terms = poly_terms((x - self.x_center) / self.x_scale, (y - self.y_center) / self.y_scale, self.order)
        return self.coeffs @ terms

    def compute_image(self, x: float, y: float) -> np.ndarray:
        """Return the stamp at ``(x, y)`` normalised to sum 1.

        Raises
        ------
        AlgorithmError
            If the weighted sum of the basis has zero or negative total flux there
            (the polynomial is being extrapolated far outside the fitted area).
        """
        img = np.tensordot(self.weights(x, y), self.basis, axes=1)
        total = img.sum()
        if not total > 0:
            msg = (
                f"PolynomialPixelPsf has total flux {total:.3g} at (x={x}, y={y}); the position is probably "
                f"outside the area the PSF was fitted on (centre {self.x_center}, {self.y_center}, scale "
                f"{self.x_scale}, {self.y_scale})"
            )
            raise AlgorithmError(msg, x=x, y=y, total=float(total))
        return img / total

    def to_hdus(self) -> list[fits.ImageHDU]:
        """Extensions ``PSF_BASIS`` (float64 (nb, k, k), with the keywords) and ``PSF_COEFFS`` (nb, ncoef)."""
        hdr = self._header()
        hdr["PSFORDER"] = (self.order, "total polynomial degree")
        hdr["PSFXCEN"] = (self.x_center, "x (pixels) where xn = 0")
        hdr["PSFYCEN"] = (self.y_center, "y (pixels) where yn = 0")
        hdr["PSFXSCL"] = (self.x_scale, "xn = (x - PSFXCEN) / PSFXSCL")
        hdr["PSFYSCL"] = (self.y_scale, "yn = (y - PSFYCEN) / PSFYSCL")
        hdr["PSFTERMS"] = ("1,x,y,x2,xy,y2,...", "polynomial term order")
        return [
            fits.ImageHDU(self.basis, header=hdr, name="PSF_BASIS"),
            fits.ImageHDU(self.coeffs, name="PSF_COEFFS"),
        ]

    @classmethod
    def from_hdus(cls, hdus: Sequence[Any]) -> PolynomialPixelPsf:
        by_name = {h.name: h for h in hdus}
        if "PSF_BASIS" not in by_name or "PSF_COEFFS" not in by_name:
            msg = f"POLYPIX PSF needs extensions PSF_BASIS and PSF_COEFFS, found {sorted(by_name)}"
            raise InputError(msg)
        hdr = by_name["PSF_BASIS"].header
        return cls(
            np.asarray(by_name["PSF_BASIS"].data, dtype=np.float64),
            np.asarray(by_name["PSF_COEFFS"].data, dtype=np.float64),
            int(hdr["PSFORDER"]),
            float(hdr["PSFXCEN"]),
            float(hdr["PSFYCEN"]),
            float(hdr["PSFXSCL"]),
            float(hdr["PSFYSCL"]),
        )


def psf_from_hdus(hdus: Sequence[Any], *, source: str = "<hdus>") -> PsfModel:
    """Rebuild a PSF model from its ``PSF_*`` extensions using the ``PSFTYPE`` of the first one.

    Parameters
    ----------
    hdus : sequence of HDU
        The extensions written by ``PsfModel.to_hdus``, in order.
    source : str
        File name used in error messages.

    Raises
    ------
    InputError
        If there are no extensions, ``PSFTYPE`` is missing or names no known model,
        or a required keyword is absent.
    """
    if not hdus:
        msg = f"{source}: no PSF_* extensions to rebuild a PSF from"
        raise InputError(msg)
    psftype = hdus[0].header.get("PSFTYPE")
    if psftype not in PSF_TYPES:
        # PSF models defined by later stages register themselves on import
        import importlib

        for mod in _STAGE_PSF_MODULES:
            importlib.import_module(mod)
    if psftype not in PSF_TYPES:
        msg = (
            f"{source}: extension {hdus[0].name} has PSFTYPE={psftype!r}, not one of {sorted(PSF_TYPES)}; "
            "import the module that defines that PSF model before reading"
        )
        raise InputError(msg)
    try:
        return PSF_TYPES[psftype].from_hdus(hdus)
    except KeyError as exc:
        msg = f"{source}: PSF extension {hdus[0].name} (PSFTYPE={psftype}) lacks keyword {exc}"
        raise InputError(msg) from None
