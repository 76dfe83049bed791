"""Numerical constants shared by the stage drivers, defined once (core: imports nothing of apfast)."""

from __future__ import annotations

import math

__all__ = ["FWHM_PER_SIGMA", "MAD_TO_SIGMA"]

#: FWHM of a Gaussian in units of its sigma, ``2 sqrt(2 ln 2)``.
FWHM_PER_SIGMA: float = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Sigma of a Gaussian per median absolute deviation, ``1 / Phi^-1(3/4)`` to 5 digits: a robust
#: sigma is ``MAD_TO_SIGMA * median(|x - median(x)|)``.
MAD_TO_SIGMA: float = 1.4826
