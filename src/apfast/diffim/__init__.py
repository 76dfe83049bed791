"""Differencing: Lanczos warping, the sky map, template coadds and their retrieval, Alard-Lupton PSF
matching, subtraction, DMTN-021 decorrelation and the FFTW plans they share (``stage`` runs them in order).

May import: the core, :mod:`apfast.kernels` and the single-CCD stages (:mod:`apfast.ccd`, for detection,
PSFs and background); template retrieval reads patches through :mod:`apfast.repo`. Never :mod:`apfast.run`
or :mod:`apfast.sim`.
"""
