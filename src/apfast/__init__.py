"""apfast: fast alert production for time-domain astronomy.

Ingest raw exposures, calibrations and reference catalogues into a repository,
process CCDs into calexps, difference images, DIA sources and alerts, and read
every product back through :class:`apfast.Butler`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
