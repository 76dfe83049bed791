"""The PSF-matching section of a CCD-visit page: the kernel at the corners and centre, and the stamp residuals.

Both figures come from ``deepDiff_psfMatch`` (:class:`apfast.psfmatch_diag.PsfMatchDiagnostics`),
which ``apfast process`` writes beside each difference. An output repository processed before that
dataset existed gets a note on the page instead of the figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from apfast.psfmatch_diag import KERNEL_LABELS, STAMP_STATUS, PsfMatchDiagnostics
from apfast.report.html import esc, fmt

__all__ = ["kernel_figure", "psfmatch_html", "read_psfmatch", "stamp_mosaic"]

log = logging.getLogger("apfast.report")

DATASET = "deepDiff_psfMatch"
#: Pull range of the stamp mosaic's grey scale (difference / sqrt(variance)).
STAMP_LIMIT = 5.0
_KEPT, _REJECTED = "#1b9e3a", "#d62728"
_REASON = {"residual": "own-fit residual", "kernel_sum": "kernel-sum outlier", "spatial": "spatial-fit residual"}


def _plt() -> Any:
    from apfast.report.plots import _plt as plt

    return plt()


def kernel_figure(path: Path, diag: PsfMatchDiagnostics) -> None:
    """Kernel at the 4 corners and the centre on one colour scale (top), each corner minus the centre (bottom).

    Titles give the position and the kernel sum; the last bottom panel lists the mode, the FWHMs and
    the fitted differential background at each position.
    """
    plt = _plt()
    k = diag.kernels.astype(np.float64)
    lim = float(np.abs(k).max()) or 1.0
    dk = k[:4] - k[4]
    dlim = float(np.abs(dk).max()) or lim * 1e-3
    fig, axes = plt.subplots(2, 5, figsize=(11.0, 4.9), dpi=90, gridspec_kw={"wspace": 0.06, "hspace": 0.3})
    im = dim = None
    for j, label in enumerate(KERNEL_LABELS):
        a = axes[0, j]
        im = a.imshow(k[j], origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        a.set_title(f"{label} ({diag.kernel_x[j]:.0f}, {diag.kernel_y[j]:.0f})\nsum {diag.kernel_sums[j]:.4f}",
                    fontsize=8)
        if j < 4:
            b = axes[1, j]
            dim = b.imshow(dk[j], origin="lower", cmap="PuOr_r", vmin=-dlim, vmax=dlim, interpolation="nearest")
            b.set_title(f"{label} - centre\nmax |diff| {np.abs(dk[j]).max() / lim:.1%} of peak", fontsize=8)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    t = axes[1, 4]
    t.axis("off")
    lines = [diag.mode, f"kernel {diag.kernel_size} px, order {diag.kernel_order}",
             f"FWHM sci {diag.fwhm_science:.2f}, tmpl {diag.fwhm_template:.2f} px",
             f"stamps {diag.n_used} of {diag.stamp_x.size}", "background b(x, y):"]
    lines += [f" {lab[:11]:<11} {b:+.3g}" for lab, b in zip(KERNEL_LABELS, diag.background, strict=True)]
    t.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=7.5, family="monospace", transform=t.transAxes)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), fraction=0.012, pad=0.01).ax.tick_params(labelsize=7)
    if dim is not None:
        fig.colorbar(dim, ax=list(axes[1]), fraction=0.012, pad=0.01).ax.tick_params(labelsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def stamp_mosaic(path: Path, diag: PsfMatchDiagnostics, *, columns: int = 10) -> dict[str, int]:
    """The stored residual stamps, ±:data:`STAMP_LIMIT` sigma grey scale, framed green (kept) or red (rejected).

    Returns
    -------
    dict
        ``shown``, ``kept_shown``, ``rejected_shown`` stamps in the mosaic and ``candidates`` in all.
    """
    plt = _plt()
    order = np.nonzero(diag.stamp_residual_index >= 0)[0]
    # rejected first: they are the ones to look at
    order = order[np.argsort(diag.kept[order], kind="stable")]
    n = order.size
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(0.95 * cols + 0.6, 1.15 * rows + 0.5), dpi=90, squeeze=False,
                             gridspec_kw={"wspace": 0.05, "hspace": 0.5})
    im = None
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
        a.set_visible(False)
    for slot, i in enumerate(order):
        a = axes.ravel()[slot]
        a.set_visible(True)
        stamp = diag.residuals[diag.stamp_residual_index[i]]
        im = a.imshow(stamp, origin="lower", cmap="gray", vmin=-STAMP_LIMIT, vmax=STAMP_LIMIT,
                      interpolation="nearest")
        kept = bool(diag.kept[i])
        colour = _KEPT if kept else _REJECTED
        for s in a.spines.values():
            s.set_edgecolor(colour)
            s.set_linewidth(2.0)
        why = "kept" if kept else _REASON.get(STAMP_STATUS[int(diag.stamp_status[i])], "rejected")
        a.set_title(f"{why}\n({diag.stamp_x[i]}, {diag.stamp_y[i]}) {diag.stamp_residual_std[i]:.2f}",
                    fontsize=5.5, color=colour)
    if n == 0:
        a = axes[0, 0]
        a.set_visible(True)
        a.text(0.5, 0.5, "no stamps", ha="center", va="center", transform=a.transAxes)
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes.ravel()), fraction=0.015, pad=0.01)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("difference / sqrt(variance)", fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    kept_shown = int(np.count_nonzero(diag.kept[order]))
    return {"shown": int(n), "kept_shown": kept_shown, "rejected_shown": int(n) - kept_shown,
            "candidates": int(diag.stamp_x.size)}


def read_psfmatch(butler: Any, did: dict[str, Any], img_dir: Path, stem: str) -> dict[str, Any]:
    """Draw the PSF-matching figures of one CCD-visit; return what :func:`psfmatch_html` shows.

    ``{"missing": reason}`` when ``deepDiff_psfMatch`` does not exist or cannot be read (an older run):
    the page says so, the report goes on.
    """
    from apfast.errors import ApfastError

    try:
        if not butler.datasetExists(DATASET, did):
            return {"missing": f"no {DATASET} in this output repository (processed before apfast wrote it; "
                               "re-run `apfast process --clobber-output` on this CCD-visit to get it)"}
        diag = butler.get(DATASET, did)
    except (ApfastError, OSError, ValueError, KeyError) as exc:
        log.warning("report: %s %s unreadable: %s", DATASET, did, exc)
        return {"missing": f"{DATASET} unreadable: {exc}"}
    kpath, spath = img_dir / f"{stem}_kernel.png", img_dir / f"{stem}_stamps.png"
    kernel_figure(kpath, diag)
    counts = stamp_mosaic(spath, diag)
    return {"kernel_png": f"img/{kpath.name}", "stamps_png": f"img/{spath.name}", "pngs": [kpath, spath],
            "counts": counts, "mode": diag.mode, "n_used": diag.n_used, "kernel_size": diag.kernel_size,
            "ksum_range": (float(diag.kernel_sums.min()), float(diag.kernel_sums.max()))}


def psfmatch_html(pm: dict[str, Any] | None) -> str:
    """The HTML of the section (``pm`` from :func:`read_psfmatch`; ``None``: no difference, nothing shown)."""
    if pm is None:
        return ""
    head = "<h2>PSF-matching kernel and stamps</h2>"
    if "missing" in pm:
        return f'{head}<p class="muted">Kernel and stamp residuals not available: {esc(pm["missing"])}.</p>'
    c = pm["counts"]
    lo, hi = pm["ksum_range"]
    return (
        f"{head}"
        f'<div class="card"><img src="../{esc(pm["kernel_png"])}" width="900" '
        f'alt="matching kernel at the corners and the centre"></div>'
        f'<p class="muted">Top: the {esc(pm["mode"])} kernel ({fmt(pm["kernel_size"])} px) at the 4 corners and '
        f"the centre on one colour scale, its sum (the photometric scaling, {lo:.4f} to {hi:.4f}) in each title; "
        "bottom: each corner minus the centre, i.e. how much the kernel varies over the CCD.</p>"
        f'<div class="card"><img src="../{esc(pm["stamps_png"])}" width="900" '
        f'alt="residual stamps of the kernel candidates"></div>'
        f'<p class="muted">{c["shown"]} of {c["candidates"]} kernel-candidate stamps ({pm["n_used"]} used in the '
        f"fit; shown: {c['rejected_shown']} rejected, red, then {c['kept_shown']} kept, green), each the "
        f"difference before decorrelation / sqrt(variance) on ±{STAMP_LIMIT:g}σ, titled with its position and "
        "residual std under the final model: kept stamps should look like noise (std ~1), a ring or dipole "
        "left on them means a poor kernel.</p>"
    )
