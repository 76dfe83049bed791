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

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Lazy: ``import apfast.kernels.detect`` (other codes using the compiled core) and ``apfast --help`` must not
# pay for astropy, SQLAlchemy and the Butler; the names below load their module on first use.
_LAZY = {
    "Butler": "apfast.repo.butler",
    "Exposure": "apfast.exposure",
    "PhotoCalib": "apfast.exposure",
    "VisitInfo": "apfast.exposure",
    "read_exposure": "apfast.exposure",
    "subtract_fits": "apfast.run.subtract",
    "write_exposure": "apfast.exposure",
}

if TYPE_CHECKING:
    from apfast.exposure import Exposure, PhotoCalib, VisitInfo, read_exposure, write_exposure
    from apfast.repo.butler import Butler
    from apfast.run.subtract import subtract_fits

__all__ = [
    "Butler", "Exposure", "PhotoCalib", "VisitInfo", "__version__", "read_exposure", "subtract_fits", "write_exposure",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'apfast' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
