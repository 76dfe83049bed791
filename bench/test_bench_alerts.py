"""Alerts of one CCD-visit: 200 DIA sources with history, 3 cutouts each, built and written (target < 0.3 s).

The baseline in the same group builds the cutouts the way Rubin's ``PackageAlertsTask`` does
(astropy ``CCDData`` written to an in-memory FITS file) for the same 600 cutouts.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from astropy.wcs import WCS

from apfast.dia import alerts as A
from apfast.dia.apdb_schema import COLUMN_KINDS
from apfast.exposure import Exposure, PhotoCalib

N_ALERTS = 200
SHAPE = (4096, 2048)


def _columns(table: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cols = {}
    for name, (kind, _nullable) in COLUMN_KINDS[table].items():
        if kind == "f":
            cols[name] = rng.normal(1000.0, 300.0, n)
        elif kind == "i":
            cols[name] = rng.integers(0, 50, n)
        elif kind == "b":
            cols[name] = rng.random(n) < 0.3
        else:
            cols[name] = np.array(["g"] * n, dtype=object)
    return cols


@pytest.fixture(scope="module")
def ccd_visit():
    """A full DECam-size exposure triple and APDB column sets: 200 sources, 5 earlier sources + 10 forced each."""
    rng = np.random.default_rng(5)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.2]
    w.wcs.crpix = [1024.5, 2048.5]
    w.wcs.cd = np.array([[0.0, 7.3e-5], [-7.3e-5, 0.0]])
    img = rng.normal(0, 10, SHAPE).astype(np.float32)
    exp = Exposure(
        img, np.zeros(SHAPE, np.int32), np.full(SHAPE, 100.0, np.float32), wcs=w, photo_calib=PhotoCalib(30.8)
    )
    n = N_ALERTS
    src = _columns("DiaSource", n, rng)
    ids = (np.int64(28940035) << 20) + np.arange(n)
    src.update(
        diaSourceId=ids,
        diaObjectId=ids,
        x=rng.uniform(0, SHAPE[1], n),
        y=rng.uniform(0, SHAPE[0], n),
        midpointMjdTai=np.full(n, 58909.2),
    )
    obj = _columns("DiaObject", n, rng)
    obj["diaObjectId"] = ids
    hist = _columns("DiaSource", 5 * n, rng)
    hist["diaObjectId"] = np.repeat(ids, 5)
    hist["diaSourceId"] = np.arange(5 * n, dtype=np.int64)
    forced = _columns("DiaForcedSource", 10 * n, rng)
    forced["diaObjectId"] = np.repeat(ids, 10)
    A.load_alert_schema()
    return exp, src, obj, hist, forced


@pytest.mark.benchmark(group="alerts-200")
@pytest.mark.parametrize("history", ["new-objects", "5src-10forced"])
@pytest.mark.parametrize("codec", ["null", "deflate"])
def test_bench_build_and_write_alerts(benchmark, ccd_visit, tmp_path, codec, history):
    exp, src, obj, hist, forced = ccd_visit
    if history == "new-objects":
        hist = forced = None

    def run():
        alerts = A.build_ccd_alerts(src, obj, hist, forced, difference=exp, science=exp, template=exp)
        return A.write_alerts(tmp_path / f"{codec}.avro", alerts, codec=codec)

    path = benchmark(run)
    assert len(A.read_alerts(path)) == N_ALERTS


@pytest.mark.benchmark(group="alerts-200")
def test_bench_rubin_style_ccddata_cutouts(benchmark, ccd_visit):
    """Baseline: 600 cutouts through astropy CCDData.write (Rubin's serialisation path)."""
    import astropy.units as u
    from astropy.nddata import CCDData, VarianceUncertainty

    exp, src, *_ = ccd_visit
    xs, ys = src["x"], src["y"]

    def run():
        out = []
        for _ in range(3):
            for x, y in zip(xs, ys, strict=True):
                ix, iy = min(max(int(x), 15), SHAPE[1] - 15), min(max(int(y), 15), SHAPE[0] - 15)
                w = WCS(naxis=2)
                w.wcs.crpix = [x - ix + 16, y - iy + 16]
                w.wcs.crval = [150.0, 2.2]
                w.wcs.cd = exp.wcs.wcs.cd
                c = CCDData(
                    exp.image[iy - 15 : iy + 15, ix - 15 : ix + 15] * 1.0,
                    uncertainty=VarianceUncertainty(exp.variance[iy - 15 : iy + 15, ix - 15 : ix + 15]),
                    wcs=w,
                    unit=u.nJy,
                )
                b = io.BytesIO()
                c.write(b, format="fits")
                out.append(b.getvalue())
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(out) == 3 * N_ALERTS and math.isfinite(len(out[0]))
