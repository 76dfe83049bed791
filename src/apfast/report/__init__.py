"""``apfast report``: a static HTML report (pages and PNGs) of an output repository of ``apfast process``.

``build_report(OUT)`` writes ``OUT/report/index.html`` (the run summary, image-quality plots
and a sky map), one page per CCD-visit (thumbnails with DIA sources marked, PSF-matching
diagnostics) and one per shown DiaObject (alert cutouts, light curve from the APDB). The
folder needs no server and loads nothing from the internet. ``write_summary_json`` keeps
``OUT/summary.json``, the machine-readable run summary the report reads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "write_summary_json"]


def build_report(*args: Any, **kwargs: Any) -> Any:
    """See :func:`apfast.report.build.build_report` (imported lazily: matplotlib loads only when used)."""
    from apfast.report.build import build_report as _build

    return _build(*args, **kwargs)


def write_summary_json(*args: Any, **kwargs: Any) -> Any:
    """See :func:`apfast.report.summary.write_summary_json`."""
    from apfast.report.summary import write_summary_json as _write

    return _write(*args, **kwargs)
