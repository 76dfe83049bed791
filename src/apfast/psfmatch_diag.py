"""The PSF-matching record of one difference image (``deepDiff_psfMatch``) and its FITS file.

A :class:`PsfMatchDiagnostics` holds what the report (and anyone judging a subtraction)
needs from the Alard-Lupton fit without re-running it: the spatially varying kernel
evaluated at the four corners and the centre of the CCD, its sum and the fitted
differential background there, the convolution mode, and every kernel-candidate stamp
offered to the fit (position, kept or why rejected, its single-stamp kernel sum and its
residual under the final model) with the normalised residual pixels of up to 50 of them.
:func:`apfast.diffim.diagnostics.psfmatch_diagnostics` makes one from a subtraction;
the Butler reads and writes it (``deepDiff_psfMatch``). Like :class:`apfast.exposure.Background`,
this module is only the container and its file: no stage logic.

File layout written by :func:`write_psfmatch_diagnostics` (about 10-250 kB; astropy and
ds9 open it):

=============  ================================================================
HDU 0          primary, no data: ``APFTYPE='PSFMATCH'``, ``MODE``
               (``convolveTemplate`` / ``convolveScience``), ``NX``, ``NY`` (CCD
               size), ``KSIZE``, ``KORDER`` (kernel spatial order), ``BGORDER``
               and ``BGCOEF<i>`` (the differential background polynomial; positions
               normalised as ``(x - BGXC) / BGXS``, ``(y - BGYC) / BGYS``),
               ``FWHMSCI`` / ``FWHMTMP`` (PSF FWHMs, pixels), ``BSIG<i>`` (basis
               sigmas), ``STMPHALF`` (half-size of the fitted stamps), ``RESHALF``
               (half-size of the stored residual stamps), ``NCAND``, ``NUSED``
``KERNELS``    float32 cube ``(5, k, k)``: the kernel at the rows of ``KERNPOS``
``KERNPOS``    table, 5 rows (lower left, lower right, upper left, upper right,
               centre): ``label``, ``x``, ``y`` (0-based pixels), ``kernel_sum``,
               ``background`` (the fitted differential background there)
``STAMPS``     table, one row per kernel candidate: ``x``, ``y``, ``status``
               (0 kept, 1 rejected by its own fit's residual, 2 kernel-sum
               outlier, 3 rejected by the spatial fit), ``kernel_sum`` (single-stamp
               fit), ``residual_std`` (normalised residual std under the final
               spatial model, ~1 for a good stamp), ``residual_index`` (plane of
               ``RESIDUALS``, -1 if not stored)
``RESIDUALS``  float32 cube ``(n, s, s)``, ``n <= 50``, ``s = 2 RESHALF + 1``: the
               difference before decorrelation divided by the square root of its
               variance, centred on the stamp (``science - matched template`` in
               noise units for either mode; NaN where the variance is not positive)
=============  ================================================================

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> d = PsfMatchDiagnostics(
...     mode="convolveTemplate", shape=(40, 30),
...     kernel_x=np.array([0.0, 29, 0, 29, 14.5]), kernel_y=np.array([0.0, 0, 39, 39, 19.5]),
...     kernels=np.zeros((5, 3, 3)), kernel_sums=np.ones(5), background=np.zeros(5),
...     background_coeffs=np.zeros(1), background_order=0, background_norm=(14.5, 19.5, 15.0, 20.0),
...     stamp_x=np.array([10]), stamp_y=np.array([12]), stamp_status=np.array([0]),
...     stamp_kernel_sum=np.array([1.0]), stamp_residual_std=np.array([1.02]),
...     stamp_residual_index=np.array([0]), residuals=np.zeros((1, 5, 5)))
>>> p = write_psfmatch_diagnostics(Path(tempfile.mkdtemp()) / "psfMatch.fits", d)
>>> r = read_psfmatch_diagnostics(p)
>>> r.mode, r.kernels.shape, r.kept.tolist(), r.residuals.shape
('convolveTemplate', (5, 3, 3), [True], (1, 5, 5))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from apfast._fileio import atomic_path
from apfast.errors import InputError

__all__ = [
    "KERNEL_LABELS",
    "STAMP_STATUS",
    "PsfMatchDiagnostics",
    "read_psfmatch_diagnostics",
    "write_psfmatch_diagnostics",
]

#: Where the kernel is evaluated, in the order of ``kernels`` (y up: row 0 is the bottom).
KERNEL_LABELS = ("lower left", "lower right", "upper left", "upper right", "centre")
#: ``stamp_status`` codes (the same as :data:`apfast.diffim.psfmatch.STAMP_STATUS`).
STAMP_STATUS = ("kept", "residual", "kernel_sum", "spatial")
_APFTYPE = "PSFMATCH"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PsfMatchDiagnostics:
    """The PSF-matching solution of one difference image, as stored in ``deepDiff_psfMatch``.

    Attributes
    ----------
    mode : str
        ``"convolveTemplate"`` or ``"convolveScience"``: which image the kernel convolved.
    shape : tuple of int
        ``(ny, nx)`` of the CCD.
    kernel_x, kernel_y : ndarray (5,) float64
        Where the kernel was evaluated: the corners and the centre (:data:`KERNEL_LABELS`), 0-based pixels.
    kernels : ndarray (5, k, k) float32
        The matching kernel there (not normalised: its sum is the photometric scaling).
    kernel_sums : ndarray (5,) float64
        The kernel sums there (from the spatial solution).
    background : ndarray (5,) float64
        The fitted differential background there (units of the image that was matched to).
    background_coeffs : ndarray float64
        Coefficients of the background polynomial, monomials ``1, xn, yn, xn^2, xn yn, yn^2``.
    background_order : int
        Its total degree.
    background_norm : tuple of float
        ``(x_center, y_center, x_scale, y_scale)``: ``xn = (x - x_center) / x_scale``.
    stamp_x, stamp_y : ndarray (n,) int64
        Centres of every kernel-candidate stamp offered to the fit.
    stamp_status : ndarray (n,) int8
        :data:`STAMP_STATUS` code of each (0 kept).
    stamp_kernel_sum : ndarray (n,) float64
        Kernel sum of each candidate's single-stamp fit.
    stamp_residual_std : ndarray (n,) float64
        Normalised residual std of each candidate under the final spatial model (~1 is good).
    stamp_residual_index : ndarray (n,) int32
        Plane of ``residuals`` holding the candidate, or -1.
    residuals : ndarray (m, s, s) float32
        Difference / sqrt(variance) around up to 50 of the candidates (NaN where the variance is not positive).
    fwhm_science, fwhm_template : float
        PSF FWHMs (pixels) at the centre.
    basis_sigmas : tuple of float
        Sigmas (pixels) of the Alard-Lupton basis Gaussians.
    kernel_order : int
        Spatial order of the kernel.
    stamp_half_size : int
        Half-size of the stamps the fit used.
    """

    mode: str
    shape: tuple[int, int]
    kernel_x: np.ndarray
    kernel_y: np.ndarray
    kernels: np.ndarray
    kernel_sums: np.ndarray
    background: np.ndarray
    background_coeffs: np.ndarray
    background_order: int
    background_norm: tuple[float, float, float, float]
    stamp_x: np.ndarray
    stamp_y: np.ndarray
    stamp_status: np.ndarray
    stamp_kernel_sum: np.ndarray
    stamp_residual_std: np.ndarray
    stamp_residual_index: np.ndarray
    residuals: np.ndarray
    fwhm_science: float = float("nan")
    fwhm_template: float = float("nan")
    basis_sigmas: tuple[float, ...] = field(default=())
    kernel_order: int = 0
    stamp_half_size: int = 0

    def __post_init__(self) -> None:
        arrays = {
            "kernel_x": np.float64, "kernel_y": np.float64, "kernel_sums": np.float64, "background": np.float64,
            "background_coeffs": np.float64, "stamp_x": np.int64, "stamp_y": np.int64, "stamp_status": np.int8,
            "stamp_kernel_sum": np.float64, "stamp_residual_std": np.float64, "stamp_residual_index": np.int32,
            "kernels": np.float32, "residuals": np.float32,
        }
        for name, dtype in arrays.items():
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        k = self.kernels
        if k.ndim != 3 or k.shape[0] != len(KERNEL_LABELS) or k.shape[1] != k.shape[2]:
            msg = f"PsfMatchDiagnostics.kernels must be ({len(KERNEL_LABELS)}, k, k), got shape {k.shape}"
            raise InputError(msg)
        for name in ("kernel_x", "kernel_y", "kernel_sums", "background"):
            shape = getattr(self, name).shape
            if shape != (len(KERNEL_LABELS),):
                msg = f"PsfMatchDiagnostics.{name} must have {len(KERNEL_LABELS)} values, got shape {shape}"
                raise InputError(msg)
        n = self.stamp_x.shape
        for name in ("stamp_y", "stamp_status", "stamp_kernel_sum", "stamp_residual_std", "stamp_residual_index"):
            if getattr(self, name).shape != n:
                msg = f"PsfMatchDiagnostics.{name} has shape {getattr(self, name).shape}, stamp_x has {n}"
                raise InputError(msg)
        r = self.residuals
        if r.ndim != 3 or r.shape[1] != r.shape[2] or r.shape[1] % 2 != 1:
            msg = f"PsfMatchDiagnostics.residuals must be (m, s, s) with s odd, got shape {r.shape}"
            raise InputError(msg)
        if self.stamp_residual_index.size and self.stamp_residual_index.max() >= r.shape[0]:
            msg = f"PsfMatchDiagnostics.stamp_residual_index points past the {r.shape[0]} residual stamps"
            raise InputError(msg)
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "background_norm", tuple(float(v) for v in self.background_norm))
        object.__setattr__(self, "basis_sigmas", tuple(float(v) for v in self.basis_sigmas))

    @property
    def kept(self) -> np.ndarray:
        """Whether each candidate stamp is in the final spatial fit (bool, ``stamp_status == 0``)."""
        return self.stamp_status == 0

    @property
    def n_used(self) -> int:
        """Stamps in the final spatial fit."""
        return int(np.count_nonzero(self.kept))

    @property
    def kernel_size(self) -> int:
        """Kernel side ``k`` in pixels."""
        return int(self.kernels.shape[1])

    def residual_stamp(self, i: int) -> np.ndarray | None:
        """The stored residual stamp of candidate ``i`` (``(s, s)`` float32), or ``None``."""
        j = int(self.stamp_residual_index[i])
        return self.residuals[j] if j >= 0 else None


def _native(a: Any, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def write_psfmatch_diagnostics(path: str | Path, diag: PsfMatchDiagnostics) -> Path:
    """Write a :class:`PsfMatchDiagnostics` atomically in the layout of the module docstring."""
    path = Path(path)
    primary = fits.PrimaryHDU()
    h = primary.header
    h["APFTYPE"] = (_APFTYPE, "apfast PSF-matching record (deepDiff_psfMatch)")
    h["MODE"] = (diag.mode, "image convolved by the matching kernel")
    h["NY"] = (diag.shape[0], "CCD rows")
    h["NX"] = (diag.shape[1], "CCD columns")
    h["KSIZE"] = (diag.kernel_size, "kernel side (pixels)")
    h["KORDER"] = (diag.kernel_order, "spatial order of the kernel")
    for key, v, what in (("FWHMSCI", diag.fwhm_science, "science"), ("FWHMTMP", diag.fwhm_template, "template")):
        if np.isfinite(v):  # FITS cards cannot hold NaN: a missing card reads back as NaN
            h[key] = (float(v), f"{what} PSF FWHM at the centre (pixels)")
    for i, s in enumerate(diag.basis_sigmas):
        h[f"BSIG{i}"] = (s, f"basis Gaussian {i} sigma (pixels)")
    h["STMPHALF"] = (diag.stamp_half_size, "half-size of the fitted stamps (pixels)")
    h["RESHALF"] = (diag.residuals.shape[1] // 2, "half-size of the stored residual stamps")
    h["NCAND"] = (int(diag.stamp_x.size), "kernel candidates offered to the fit")
    h["NUSED"] = (diag.n_used, "stamps in the final spatial fit")
    h["BGORDER"] = (diag.background_order, "order of the differential background polynomial")
    for key, v, what in zip(("BGXC", "BGYC", "BGXS", "BGYS"), diag.background_norm,
                            ("x centre", "y centre", "x scale", "y scale"), strict=True):
        h[key] = (v, f"background position normalisation: {what}")
    for i, c in enumerate(diag.background_coeffs):
        h[f"BGCOEF{i}"] = (float(c), f"background polynomial coefficient {i}")
    kpos = fits.BinTableHDU.from_columns([
        fits.Column("label", "16A", array=np.array(KERNEL_LABELS)),
        fits.Column("x", "D", array=diag.kernel_x),
        fits.Column("y", "D", array=diag.kernel_y),
        fits.Column("kernel_sum", "D", array=diag.kernel_sums),
        fits.Column("background", "D", array=diag.background),
    ], name="KERNPOS")
    stamps = fits.BinTableHDU.from_columns([
        fits.Column("x", "K", array=diag.stamp_x),
        fits.Column("y", "K", array=diag.stamp_y),
        fits.Column("status", "I", array=diag.stamp_status.astype(np.int16)),
        fits.Column("kernel_sum", "D", array=diag.stamp_kernel_sum),
        fits.Column("residual_std", "D", array=diag.stamp_residual_std),
        fits.Column("residual_index", "J", array=diag.stamp_residual_index),
    ], name="STAMPS")
    stamps.header["STATUS"] = (", ".join(f"{i} {s}" for i, s in enumerate(STAMP_STATUS)), "status codes")
    res = fits.ImageHDU(diag.residuals if diag.residuals.shape[0] else None, name="RESIDUALS")
    res.header["RESHALF"] = diag.residuals.shape[1] // 2
    hdul = fits.HDUList([primary, fits.ImageHDU(diag.kernels, name="KERNELS"), kpos, stamps, res])
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        hdul.writeto(tmp)
    return path


def read_psfmatch_diagnostics(path: str | Path) -> PsfMatchDiagnostics:
    """Read a file written by :func:`write_psfmatch_diagnostics`.

    Raises
    ------
    InputError
        If the file cannot be read or is not an apfast PSF-matching record.
    """
    path = Path(path)
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        msg = f"cannot read the PSF-matching record {path}: {exc}"
        raise InputError(msg) from None
    with hdul:
        h = hdul[0].header
        names = {x.name for x in hdul}
        missing = sorted({"KERNELS", "KERNPOS", "STAMPS", "RESIDUALS"} - names)
        if h.get("APFTYPE") != _APFTYPE or missing:
            msg = (f"{path} is not an apfast PSF-matching record (APFTYPE={h.get('APFTYPE')!r}, missing "
                   f"extensions {missing}); write it with write_psfmatch_diagnostics")
            raise InputError(msg)
        kp, st = hdul["KERNPOS"].data, hdul["STAMPS"].data
        rh = int(hdul["RESIDUALS"].header.get("RESHALF", h.get("RESHALF", 0)))
        rdata = hdul["RESIDUALS"].data
        residuals = _native(rdata, np.float32) if rdata is not None else np.zeros((0, 2 * rh + 1, 2 * rh + 1))
        n_sig = sum(1 for k in h if k.startswith("BSIG"))
        n_bg = sum(1 for k in h if k.startswith("BGCOEF"))
        return PsfMatchDiagnostics(
            mode=str(h["MODE"]), shape=(int(h["NY"]), int(h["NX"])),
            kernel_x=_native(kp["x"], np.float64), kernel_y=_native(kp["y"], np.float64),
            kernels=_native(hdul["KERNELS"].data, np.float32),
            kernel_sums=_native(kp["kernel_sum"], np.float64), background=_native(kp["background"], np.float64),
            background_coeffs=np.array([h[f"BGCOEF{i}"] for i in range(n_bg)], dtype=np.float64),
            background_order=int(h["BGORDER"]),
            background_norm=(float(h["BGXC"]), float(h["BGYC"]), float(h["BGXS"]), float(h["BGYS"])),
            stamp_x=_native(st["x"], np.int64), stamp_y=_native(st["y"], np.int64),
            stamp_status=_native(st["status"], np.int8), stamp_kernel_sum=_native(st["kernel_sum"], np.float64),
            stamp_residual_std=_native(st["residual_std"], np.float64),
            stamp_residual_index=_native(st["residual_index"], np.int32), residuals=residuals,
            fwhm_science=float(h.get("FWHMSCI", np.nan)), fwhm_template=float(h.get("FWHMTMP", np.nan)),
            basis_sigmas=tuple(float(h[f"BSIG{i}"]) for i in range(n_sig)),
            kernel_order=int(h["KORDER"]), stamp_half_size=int(h["STMPHALF"]),
        )
