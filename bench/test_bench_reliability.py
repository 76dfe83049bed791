"""Filtering and reliability scoring of one full CCD's DIA sources (target: < 50 ms, model load < 0.2 s).

Uses the full-size difference of ``test_bench_diasource`` (106 sources). The baseline in the
same group is the stage these steps follow, DIA detection + measurement of the same CCD, so the
numbers read as "what filtering and scoring add to it". The model load is timed from its file
(the per-process cache cleared each round).
"""

from __future__ import annotations

import pytest

from apfast.dia.diasource import run_dia_detection
from apfast.dia.filtering import filter_dia_sources
from apfast.dia.reliability import load_model, score_sources
from test_bench_diasource import ccd  # noqa: F401  (the module fixture)

GROUP = "dia-filter-and-reliability-full-ccd"


@pytest.fixture(scope="module")
def measured(ccd):  # noqa: F811
    diff, sci, tpl = ccd
    return diff, sci, dict(run_dia_detection(diff, sci, tpl).sources)


@pytest.mark.benchmark(group=GROUP)
def test_filter_and_score(benchmark, measured) -> None:
    diff, sci, src = measured
    model = load_model()

    def run():
        keep = filter_dia_sources(src, diff, sci).keep
        return keep, score_sources(src, diff, model)

    keep, p = benchmark(run)
    assert len(p) == len(src["x"]) > 90 and keep.sum() > 80
    assert (p > 0.5).mean() > 0.8  # injected PSF sources at S/N 10-100 score as real


@pytest.mark.benchmark(group=GROUP)
def test_baseline_dia_detection(benchmark, ccd) -> None:  # noqa: F811
    diff, sci, tpl = ccd
    res = benchmark.pedantic(run_dia_detection, args=(diff, sci, tpl), rounds=3, iterations=1)
    assert len(res.sources["x"]) > 90


@pytest.mark.benchmark(group="reliability-model-load")
def test_model_load(benchmark) -> None:
    def load():
        load_model.cache_clear()
        return load_model()

    m = benchmark(load)
    assert len(m.roots) > 10
