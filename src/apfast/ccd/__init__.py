"""Single-CCD stages (Rubin's processCcd): ISR, characterize (background, cosmic rays, detection,
measurement, PSF) and calibrate (astrometry, photometric zero point). Pure functions of arrays and
Exposures that validate, call kernels and return results; no I/O.

May import: the core (:mod:`apfast.errors`, :mod:`apfast.exposure`, :mod:`apfast.masks`,
:mod:`apfast._configbase`, :mod:`apfast.camera`) and :mod:`apfast.kernels`. Never :mod:`apfast.run`,
:mod:`apfast.sim` or the repository (:mod:`apfast.repo`).
"""
