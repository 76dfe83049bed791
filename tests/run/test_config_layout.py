"""One config style: every section a ConfigSection beside its stage, nested where its stage nests it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

from apfast._configbase import ConfigSection
from apfast.run.config import PipelineConfig, config_fields


def _sections() -> dict[str, type]:
    """Every section class of the pipeline by dotted prefix (``""`` is PipelineConfig itself)."""
    out: dict[str, type] = {}

    def walk(cls: type, prefix: str) -> None:
        out[prefix] = cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(PipelineConfig, "")
    return out


def test_every_section_is_a_config_section_living_beside_its_stage() -> None:
    sections = _sections()
    for prefix, cls in sections.items():
        assert issubclass(cls, ConfigSection), f"{prefix or 'PipelineConfig'}: {cls.__name__} is a plain dataclass"
        if cls.__name__ not in ("PipelineConfig", "ProcessConfig"):  # the run itself: apfast.run
            assert not cls.__module__.startswith("apfast.run"), f"{cls.__name__} lives in {cls.__module__}"
    expected = {
        "difference.": "apfast.diffim.stage",
        "difference.psfmatch.": "apfast.diffim.psfmatch",
        "difference.decorrelation.": "apfast.diffim.decorrelate",
        "dia.": "apfast.dia.diasource",
        "dia.detection.": "apfast.ccd.detection",
        "characterize.detection.": "apfast.ccd.detection",
        "calibrate.detection.": "apfast.ccd.detection",
        "characterize.": "apfast.ccd.characterize",
        "calibrate.": "apfast.ccd.calibrate",
        "apdb.": "apfast.dia.apdb",
    }
    assert {p: sections[p].__module__ for p in expected} == expected
    for gone in ("diffim.", "decorrelation.", "ingest.", "calibs.", "refcat."):
        assert gone not in sections
    assert not any(k.startswith(("dia.threshold", "dia.grow_footprint")) for k in config_fields())


def test_stage_modules_never_import_apfast_run() -> None:
    modules = sorted({cls.__module__ for cls in _sections().values()} - {"apfast.run.config"})
    code = (
        "import sys\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'apfast.run' or m.startswith('apfast.run.'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing the stage modules {modules} loaded {out.strip()}"
