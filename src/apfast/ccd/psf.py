"""The PSF models under their old name: they live in the core module :mod:`apfast.psf`.

An :class:`apfast.exposure.Exposure` holds a PSF model and reads it from its FITS file, so the
models are core, importable without any stage; this module re-exports them for code that
imports ``apfast.ccd.psf`` (``apfast.kernels.api`` among it).
"""

from __future__ import annotations

from apfast.psf import (
    FWHM_PER_SIGMA,
    PSF_TYPES,
    GaussianPsf,
    ImagePsf,
    PolynomialPixelPsf,
    PsfModel,
    moments_fwhm,
    poly_terms,
    psf_from_hdus,
)

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
