"""apfast: fast alert production for time-domain astronomy.

Ingest raw exposures, calibrations and reference catalogues into a repository,
process CCDs into calexps, difference images, DIA sources and alerts, and read
every product back through :class:`apfast.Butler`.

Examples
--------
>>> import apfast
>>> butler = apfast.Butler("repo/rerun/processed")          # doctest: +SKIP
>>> calexp = butler.get("calexp", visit=289401, ccdnum=35)  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from apfast.butler import Butler
from apfast.exposure import Exposure, PhotoCalib, VisitInfo, read_exposure, write_exposure

__all__ = ["Butler", "Exposure", "PhotoCalib", "VisitInfo", "__version__", "read_exposure", "write_exposure"]
