"""DIA sources on the difference of two images (``apfast subtract --detect``), and their compact table.

:func:`detect_pair_sources` runs :func:`apfast.dia.diasource.run_dia_detection` on a
:class:`apfast.diffim.pair.PairResult` (the difference, the science and the template on the
science grid: the matched template in ``convolveTemplate`` mode, the warped one otherwise) and
:func:`dia_table` reduces the APDB ``DiaSource`` columns to :data:`DIA_TABLE_COLUMNS`, the
columns ``apfast subtract`` writes to ``DIFF_diaSrc.fits`` and ``DIFF_diaSrc.csv``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from apfast.dia.pair_columns import DIA_TABLE_COLUMNS

if TYPE_CHECKING:
    from apfast.diffim.pair import PairResult
    from apfast.exposure import PhotoCalib

__all__ = ["DIA_TABLE_COLUMNS", "detect_pair_sources", "dia_table"]


def dia_table(sources: dict[str, np.ndarray], photo_calib: PhotoCalib | None) -> dict[str, np.ndarray]:
    """The compact table of :data:`DIA_TABLE_COLUMNS` from DIA source columns.

    Fluxes go back from nJy to science image units with ``photo_calib`` (the
    difference's); without one they already are in image units.
    """
    n = int(np.asarray(sources["x"]).shape[0])
    scale = photo_calib.njy_per_instflux if photo_calib is not None else 1.0
    flux = np.asarray(sources["psfFlux"], np.float64) / scale
    err = np.asarray(sources["psfFluxErr"], np.float64) / scale

    def col(name: str) -> np.ndarray:
        return np.asarray(sources[name], bool) if name in sources else np.zeros(n, bool)

    flags = np.zeros(n, np.int32)
    flags |= np.where(col("psfFlux_flag"), 1, 0).astype(np.int32)
    flags |= np.where(col("pixelFlags_edge") | col("pixelFlags_offimage") | col("psfFlux_flag_edge"), 2, 0
                      ).astype(np.int32)
    flags |= np.where(col("pixelFlags_bad") | col("pixelFlags_nodata"), 4, 0).astype(np.int32)
    flags |= np.where(col("pixelFlags_saturated"), 8, 0).astype(np.int32)
    flags |= np.where(col("pixelFlags_cr") | col("pixelFlags_interpolated"), 16, 0).astype(np.int32)
    flags |= np.where(col("pixelFlags_suspect"), 32, 0).astype(np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, flux / err, np.nan)
    return {
        "id": np.arange(1, n + 1, dtype=np.int64),
        "x": np.asarray(sources["x"], np.float64),
        "y": np.asarray(sources["y"], np.float64),
        "ra": np.asarray(sources.get("ra", np.full(n, np.nan)), np.float64),
        "dec": np.asarray(sources.get("dec", np.full(n, np.nan)), np.float64),
        "flux": flux,
        "flux_err": err,
        "snr": snr,
        "is_negative": col("isNegative"),
        "is_dipole": col("isDipole"),
        "flags": flags,
    }



def detect_pair_sources(result: PairResult, *, config: Any = None) -> PairResult:
    """Detect and measure DIA sources on a pair's difference; a new result with ``sources`` and ``table``.

    Parameters
    ----------
    result : PairResult
        From :func:`apfast.diffim.pair.subtract_pair` (not modified).
    config : DiaSourceConfig, optional

    Returns
    -------
    PairResult
        ``sources`` (APDB ``DiaSource`` columns, fluxes in nJy of the difference's PhotoCalib),
        ``table`` (:func:`dia_table`), ``stats["n_dia_sources"]`` and ``timings["dia"]`` filled.
    """
    from apfast.dia.diasource import DiaSourceConfig, run_dia_detection
    from apfast.dia.reliability import load_model, score_sources

    t = time.perf_counter()
    mode = result.stats["mode"]
    ref = result.template if mode == "convolveScience" else result.matched
    dres = run_dia_detection(result.difference, result.science, ref, config=config or DiaSourceConfig())
    table = dia_table(dres.sources, result.difference.photo_calib)
    table["reliability"] = score_sources(dres.sources, result.difference, load_model())
    stats = {**result.stats, "n_dia_sources": int(table["id"].size)}
    timings = {**result.timings, "dia": time.perf_counter() - t}
    return dataclasses.replace(result, sources=dres.sources, table=table, stats=stats, timings=timings)
