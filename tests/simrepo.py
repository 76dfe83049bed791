"""One builder for the simulated repositories of tests/ and bench/ (both have tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path


def build_sim_repo(d: Path, *, ccdnums: Sequence[int], n_template: int, n_science: int, seed: int,
                   mode: str = "link", templates: bool = False) -> dict:
    """Simulate full-size DECam CCDs under ``d/sim`` and ingest raws, calibs and both refcats into ``d/repo``.

    With ``templates`` the template visits are coadded into ``d/templates`` (``apfast make-templates``).
    Returns ``dir``, ``repo``, ``summary``, ``visits`` (the science visits) and, with templates, ``templates``.
    """
    from apfast.repo.calibs import ingest_calibs
    from apfast.repo.ingest import ingest_raws
    from apfast.repo.refcat import ingest_refcat
    from apfast.run.cli import main
    from apfast.sim.simulate import simulate

    d = Path(d)
    summary = simulate(d / "sim", ccdnums=tuple(ccdnums), n_template=n_template, n_science=n_science, seed=seed)
    repo = d / "repo"
    ingest_raws(repo, summary.raw_files, mode=mode)
    ingest_calibs(repo / "calibs", summary.calib_files)
    ingest_refcat(repo, "gaia", [summary.gaia_file])
    ingest_refcat(repo, "ps1", [summary.ps1_file])
    out = {"dir": d, "repo": repo, "summary": summary, "visits": tuple(summary.science_visits)}
    if templates:
        tv = "^".join(str(v) for v in summary.template_visits)
        rc = main(["-q", "make-templates", str(repo), "--id", f"visit={tv}", "--output", str(d / "templates")])
        assert rc == 0, "make-templates failed on the simulated template visits"
        out["templates"] = d / "templates"
    return out


def linked_repo_copy(src: Path, dest: Path) -> Path:
    """A copy of a repository (or an output folder) with hard links for its FITS files.

    Cheap, and safe as long as a damaged FITS file is replaced, never edited (apfast writes its
    outputs atomically). Every other file is copied: SQLite edits its registries in place, so each
    copy needs its own.
    """

    def copy(s: str, d: str) -> None:
        if s.endswith((".fits", ".fits.fz")):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=copy)
    return dest
