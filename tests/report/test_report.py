"""``apfast report``: a static HTML report of a real processed run, checked on disk and in a browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from apfast.run.cli import main

CCD = 35


def _linked_copy(out: Path, dest: Path) -> Path:
    """A hard-linked copy of an output repository without its report (outputs are replaced, never edited)."""
    shutil.copytree(out, dest, copy_function=os.link, ignore=shutil.ignore_patterns("report"))
    return dest


@pytest.fixture(scope="module")
def run(dia_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``apfast report`` of the session's processed run (tests/conftest.py ``dia_run``: 3 science visits of
    CCD 35 with an SQLite APDB), written into a hard-linked copy of its rerun so the shared rerun stays as it is."""
    d = tmp_path_factory.mktemp("report")
    out = _linked_copy(dia_run["out"], d / "rep")
    assert main(["-q", "report", str(out)]) == 0  # the APDB URL comes from the stored config
    return {"out": out, "url": dia_run["url"], "db": dia_run["db"], "visits": list(dia_run["visits"]), "tmp": d}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.links.append(v)


def _links(page: Path) -> list[str]:
    p = _Links()
    p.feed(page.read_text(encoding="utf-8"))
    return p.links


def test_summary_json_has_one_record_per_ccd_visit(run: dict) -> None:
    doc = json.loads((run["out"] / "summary.json").read_text())
    recs = {(r["visit"], r["ccdnum"]): r for r in doc["ccd_visits"]}
    assert set(recs) == {(v, CCD) for v in run["visits"]}
    for r in recs.values():
        assert r["status"] == "ok" and r["timings"]["total"] > 0
        assert 0.5 < r["fwhm_arcsec"] < 3 and 25 < r["zero_point"] < 35
        assert r["n_src"] > 50 and r["n_dia"] >= 0


def test_report_pages_links_and_pngs(run: dict) -> None:
    rdir = run["out"] / "report"
    index = rdir / "index.html"
    text = index.read_text(encoding="utf-8")
    for v in run["visits"]:  # every CCD-visit in the summary table, with its own page
        assert f"ccd/v{v}_c{CCD:02d}.html" in text
        assert (rdir / "ccd" / f"v{v}_c{CCD:02d}.html").is_file()
    with sqlite3.connect(run["db"]) as con:
        n_obj = con.execute('SELECT COUNT(DISTINCT "diaObjectId") FROM "DiaSource"').fetchone()[0]
    shown = sorted(p.stem for p in (rdir / "obj").glob("*.html"))
    assert n_obj > 0 and len(shown) == min(n_obj, 200)
    for oid in shown:  # every shown DiaObject is linked from the overview
        assert f'href="obj/{oid}.html"' in text
    pages = [index, *(rdir / "ccd").glob("*.html"), *(rdir / "obj").glob("*.html")]
    for page in pages:
        html = page.read_text(encoding="utf-8")
        no_ns = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "<script" not in html and "http://" not in no_ns
        assert "https://" not in html
        for link in _links(page):
            target = (page.parent / unquote(urlparse(link).path)).resolve()
            assert target.is_file(), f"{page.name}: broken link {link}"
    from matplotlib.image import imread

    pngs = list((rdir / "img").glob("*.png"))
    assert len(pngs) >= 2 + 5 * len(run["visits"])
    for p in pngs:
        a = imread(p)
        assert a.ndim == 3 and min(a.shape[:2]) >= 10 and p.stat().st_size > 300, p.name
    assert imread(rdir / "img" / "overview.png").shape[1] > 600
    assert np.std(imread(rdir / "img" / f"v{run['visits'][0]}_c{CCD:02d}_diag.png")) > 0.05


def test_psfmatch_record_written_by_process(run: dict) -> None:
    """``process`` writes deepDiff_psfMatch beside each difference; it reads back through the Butler."""
    from astropy.io import fits

    from apfast import Butler
    from apfast.psfmatch_diag import PsfMatchDiagnostics

    butler = Butler(run["out"])
    for v in run["visits"]:
        d = butler.get("deepDiff_psfMatch", visit=v, ccdnum=CCD)
        assert isinstance(d, PsfMatchDiagnostics)
        path = Path(butler.getUri("deepDiff_psfMatch", visit=v, ccdnum=CCD))
        assert path.name == f"psfMatch-{CCD:02d}.fits" and path.stat().st_size < 400_000
        head = fits.getheader(butler.getUri("deepDiff_differenceExp", visit=v, ccdnum=CCD), 0)
        assert d.mode == head["DIFFMODE"] and d.n_used == head["DIFFNSTP"]
        assert d.kernel_sums[4] == pytest.approx(head["DIFFKSUM"], abs=2e-6)
        assert d.shape == (4096, 2048) and d.kernels.shape[0] == 5
        np.testing.assert_allclose(d.kernels.sum(axis=(1, 2)), d.kernel_sums, rtol=1e-4)
        assert 0 < d.residuals.shape[0] <= 50 and (d.stamp_residual_index >= 0).sum() == d.residuals.shape[0]
        assert np.median(d.stamp_residual_std[d.kept]) < 1.5


def test_ccd_pages_show_the_kernel_and_the_stamp_residuals(run: dict) -> None:
    from matplotlib.image import imread

    rdir = run["out"] / "report"
    for v in run["visits"]:
        html = (rdir / "ccd" / f"v{v}_c{CCD:02d}.html").read_text(encoding="utf-8")
        assert "PSF-matching kernel and stamps" in html and "not available" not in html
        for kind, min_width in (("kernel", 700), ("stamps", 300)):
            name = f"v{v}_c{CCD:02d}_{kind}.png"
            assert f'src="../img/{name}"' in html
            a = imread(rdir / "img" / name)  # a valid PNG, not blank
            assert a.ndim == 3 and a.shape[1] >= min_width and np.std(a[..., :3]) > 0.05, name


def test_report_of_a_run_without_psfmatch_records(run: dict, tmp_path: Path) -> None:
    """An output repository written before deepDiff_psfMatch existed still gets its report, with a note."""
    old = tmp_path / "old"  # hard links: no copy of the images
    shutil.copytree(run["out"], old, copy_function=os.link,
                    ignore=shutil.ignore_patterns("psfMatch-*.fits", "report"))
    v = run["visits"][0]
    assert main(["-q", "report", str(old), "--id", f"visit={v}", "--max-objects", "1"]) == 0
    html = (old / "report" / "ccd" / f"v{v}_c{CCD:02d}.html").read_text(encoding="utf-8")
    assert "Kernel and stamp residuals not available: no deepDiff_psfMatch" in html
    assert "_kernel.png" not in html and "_diag.png" in html  # the rest of the diagnostics are there
    assert not list((old / "report" / "img").glob("*_kernel.png"))


def test_report_options_and_errors(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _linked_copy(run["out"], tmp_path / "rep")  # the module's full report stays for the browser tests
    assert main(["-q", "report", str(out), "--max-objects", "3", "--id", f"visit={run['visits'][0]}",
                 "-c", f"apdb.db_url={run['url']}"]) == 0
    assert len(list((out / "report" / "obj").glob("*.html"))) == 3
    assert len(list((out / "report" / "ccd").glob("*.html"))) == 1
    capsys.readouterr()
    assert main(["-q", "report", str(tmp_path / "nowhere")]) == 2
    assert main(["-q", "report", str(out), "-c", f"apdb.db_url=sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err
    assert "no APDB at" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("apfast report: error:")]) == 2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _browse(page: Path, tmp: Path, *extra: str, size: tuple[int, int] = (1280, 900)) -> subprocess.CompletedProcess:
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH or at /usr/bin/chromium: install Debian's chromium to render pages")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={size[0]},{size[1]}", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("which", ["index", "object"])
def test_report_renders_in_headless_chromium(run: dict, which: str, tmp_path: Path) -> None:
    from matplotlib.image import imread

    rdir = run["out"] / "report"
    page = rdir / "index.html" if which == "index" else sorted((rdir / "obj").glob("*.html"))[0]
    shot = tmp_path / "shot.png"
    r = _browse(page, tmp_path, f"--screenshot={shot}")
    assert shot.is_file(), r.stderr[-2000:]
    a = imread(shot)
    assert a.shape[:2] == (900, 1280)
    grey = a[..., :3].mean(axis=2)
    assert grey.std() > 0.05 and len(np.unique(a[..., :3].reshape(-1, 3), axis=0)) > 50  # not blank
    dom = _browse(page, tmp_path, "--dump-dom").stdout
    if which == "index":
        assert "Run summary" in dom and "FWHM" in dom and "n_dia" in dom
        assert all(str(v) in dom for v in run["visits"])
    else:
        assert re.search(r"DiaObject \d+", dom) and "Light curve" in dom and "nDiaSources" in dom


def _page_widths(page: Path, tmp: Path, width: int) -> dict[str, int]:
    """``scrollWidth`` and ``clientWidth`` of the document and the widest table, in a ``width``-px chromium window.

    The report has no JavaScript, so a copy of the page with a measuring script (and a ``<base>``
    pointing at the original folder, for the images) is rendered with ``--dump-dom``.
    """
    probe = (
        "<script>window.addEventListener('load', () => {const d = document.documentElement;"
        "const t = Math.max(0, ...[...document.querySelectorAll('table')].map(e => e.scrollWidth));"
        "const p = document.createElement('pre'); p.id = 'probe';"
        "p.textContent = JSON.stringify({scroll: d.scrollWidth, client: d.clientWidth, table: t});"
        "document.body.appendChild(p);});</script>"
    )
    html = page.read_text(encoding="utf-8")
    html = html.replace("<head>", f'<head><base href="{page.parent.as_uri()}/">', 1)
    html = html.replace("</body>", probe + "</body>")
    copy = tmp / f"probe-{page.name}"
    copy.write_text(html, encoding="utf-8")
    dom = _browse(copy, tmp, "--dump-dom", "--virtual-time-budget=5000", size=(width, 768)).stdout
    m = re.search(r'<pre id="probe">(\{.*?\})</pre>', dom)
    assert m, f"no probe output from chromium: {dom[-500:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


@pytest.mark.parametrize("which", ["index", "ccd"])
def test_report_pages_do_not_scroll_sideways_on_a_laptop(run: dict, which: str, tmp_path: Path) -> None:
    """At 1366 px the page itself never scrolls sideways: a wide table scrolls inside its own container."""
    rdir = run["out"] / "report"
    page = rdir / "index.html" if which == "index" else sorted((rdir / "ccd").glob("*.html"))[0]
    for width in (1366, 1024):
        w = _page_widths(page, tmp_path, width)
        assert w["client"] > 0.8 * width
        assert w["scroll"] <= w["client"], f"{page.name} at {width} px: {w}"
