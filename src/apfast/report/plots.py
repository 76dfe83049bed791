"""The pictures of ``apfast report``: PNG thumbnails, cutout triplets and matplotlib (Agg) figures.

Thumbnails and cutouts are written with ``matplotlib.image.imsave`` (no figure, a few ms
each); only the diagnostic plots build figures. Images are shown with ``y`` up (row 0 at
the bottom, as DS9 does), so markers are placed at ``(x / bin, (ny - y) / bin)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apfast._constants import MAD_TO_SIGMA

__all__ = [
    "bin_image",
    "ccd_diagnostics",
    "overview_figure",
    "save_cutout_triplet",
    "save_thumbnail",
    "sky_map",
    "stretch",
]

#: Mask planes whose pixels the pull histogram leaves out (every plane but the detections).
_PULL_SKIP = ("BAD", "SAT", "INTRP", "CR", "EDGE", "SUSPECT", "NO_DATA")
_CCD_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def bin_image(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor x factor`` blocks (NaNs ignored, a ragged edge cropped); float32."""
    a = np.asarray(a, dtype=np.float32)
    ny, nx = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    b = a[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    finite = np.isfinite(b)
    s = np.where(finite, b, 0.0).sum(axis=(1, 3), dtype=np.float64)
    n = finite.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s / n).astype(np.float32)


def _robust(a: np.ndarray) -> tuple[float, float]:
    v = a[np.isfinite(a)]
    if v.size > 200_000:
        v = v[:: v.size // 200_000]
    if v.size == 0:
        return 0.0, 1.0
    med = float(np.median(v))
    sig = MAD_TO_SIGMA * float(np.median(np.abs(v - med)))
    if not sig > 0:
        sig = float(np.std(v)) or 1.0
    return med, sig


def stretch(a: np.ndarray, kind: str = "asinh") -> np.ndarray:
    """Grey levels in [0, 1]: ``asinh`` (sky at ~0.1, bright sources compressed) or ``diff`` (linear ±5σ).

    NaNs come out as 0.5 (``diff``) or 0 (``asinh``).
    """
    med, sig = _robust(a)
    with np.errstate(invalid="ignore"):
        if kind == "diff":
            g = 0.5 + (a - med) / (10.0 * sig)
            return np.clip(np.nan_to_num(g, nan=0.5), 0.0, 1.0)
        top = np.nanpercentile(a[np.isfinite(a)], 99.8) if np.isfinite(a).any() else med + sig
        lo = med - 3.0 * sig
        scale = 4.0 * sig
        g = np.arcsinh((a - lo) / scale) / max(np.arcsinh((top - lo) / scale), 1e-6)
    return np.clip(np.nan_to_num(g, nan=0.0), 0.0, 1.0)


def save_thumbnail(path: Path, image: np.ndarray, *, factor: int, kind: str) -> tuple[int, int]:
    """Write a binned, stretched grey PNG (y up); return its ``(height, width)`` in pixels."""
    from matplotlib.image import imsave

    b = bin_image(image, factor)
    g = stretch(b, kind)[::-1]
    imsave(path, g, cmap="gray", vmin=0.0, vmax=1.0)
    return g.shape


def save_cutout_triplet(
    path: Path, science: np.ndarray | None, template: np.ndarray | None, difference: np.ndarray | None
) -> bool:
    """Science | template | difference side by side in one PNG (y up, 2-pixel white gaps); False if none."""
    from matplotlib.image import imsave

    panels = [p for p in (science, template, difference) if p is not None and np.asarray(p).size]
    if not panels:
        return False
    h = max(np.asarray(p).shape[0] for p in panels)
    sky = [
        np.asarray(p, dtype=np.float32) for p in (science, template) if p is not None and np.asarray(p).size
    ]
    # science and template share one stretch so that a brightening shows; the difference its own ±5σ
    lo_hi = None
    if sky:
        allv = np.concatenate([s[np.isfinite(s)].ravel() for s in sky]) if sky else np.zeros(1)
        if allv.size:
            lo_hi = (float(np.percentile(allv, 1)), float(np.percentile(allv, 99.7)))
    cols: list[np.ndarray] = []
    for p, kind in ((science, "sky"), (template, "sky"), (difference, "diff")):
        if p is None or not np.asarray(p).size:
            g = np.full((h, h), 0.85, dtype=np.float32)
        else:
            p = np.asarray(p, dtype=np.float32)
            if kind == "diff":
                g = stretch(p, "diff")
            else:
                lo, hi = lo_hi if lo_hi else (0.0, 1.0)
                soft = max((hi - lo) / 20.0, 1e-6)
                g = np.arcsinh(np.clip(p - lo, 0, None) / soft) / max(np.arcsinh((hi - lo) / soft), 1e-6)
                g = np.clip(np.nan_to_num(g), 0.0, 1.0)
            g = np.pad(g[::-1], ((0, h - g.shape[0]), (0, 0)), constant_values=1.0)
        cols += [g, np.ones((h, 2), dtype=np.float32)]
    imsave(path, np.hstack(cols[:-1]), cmap="gray", vmin=0.0, vmax=1.0)
    return True


def _pull_pixels(diff: Any) -> np.ndarray:
    from apfast.masks import MASK_BITS

    img, var = diff.image, diff.variance
    if var is None:
        return np.zeros(0, dtype=np.float32)
    ok = np.isfinite(img) & (var > 0)
    if diff.mask is not None:
        bad = 0
        for name in _PULL_SKIP:
            if name in MASK_BITS:
                bad |= 1 << MASK_BITS[name]
        ok &= (diff.mask & bad) == 0
    return (img[ok] / np.sqrt(var[ok])).astype(np.float32)


def ccd_diagnostics(
    path: Path, diff: Any, *, science_psf: Any = None, matched_psf: Any = None, title: str = ""
) -> dict[str, float]:
    """Pull histogram of the difference against N(0, 1) and, where PSFs exist, PSFs at corners and centre.

    Parameters
    ----------
    path : Path
        The PNG to write.
    diff : Exposure
        The difference image (image, variance, mask).
    science_psf, matched_psf : PsfModel, optional
        The calexp PSF and the PSF to compare it with: the PSF-matched template's (``deepDiff_matchedExp``)
        when it differs from the science PSF, else the difference image's own (after decorrelation). Rows of
        science PSFs, the other PSFs and their residual at the 4 corners and the centre.

    Returns
    -------
    dict
        ``n_pix``, ``mean``, ``std``, ``robust_std`` of the pulls, and ``psf_resid`` (max |residual| /
        peak) when both PSFs were drawn.
    """
    plt = _plt()
    pull = _pull_pixels(diff)
    stats: dict[str, float] = {"n_pix": float(pull.size)}
    with_psf = science_psf is not None
    fig = plt.figure(figsize=(11.0, 4.2) if with_psf else (5.5, 4.2), dpi=90)
    gs = fig.add_gridspec(
        3,
        6 if with_psf else 1,
        width_ratios=[5, 1, 1, 1, 1, 1] if with_psf else [1],
        wspace=0.08,
        hspace=0.12,
    )
    ax = fig.add_subplot(gs[:, 0])
    if pull.size:
        core = pull[np.abs(pull) < 50]
        med = float(np.median(core))
        rstd = MAD_TO_SIGMA * float(np.median(np.abs(core - med)))
        stats.update(mean=float(np.mean(core)), std=float(np.std(core)), robust_std=rstd)
        edges = np.linspace(-6, 6, 121)
        h, _ = np.histogram(pull, bins=edges)
        centres = 0.5 * (edges[1:] + edges[:-1])
        ax.step(
            centres, np.maximum(h, 0.5), where="mid", color="k", lw=1.0, label="difference / sqrt(variance)"
        )
        gauss = pull.size * (edges[1] - edges[0]) * np.exp(-0.5 * centres**2) / np.sqrt(2 * np.pi)
        ax.plot(centres, gauss, color="#d62728", lw=1.2, label="N(0, 1)")
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(h.max(), 1) * 3)
        ax.text(
            0.02,
            0.97,
            f"{pull.size:,} unmasked pixels\nmean {stats['mean']:+.3f}\nstd {stats['std']:.3f}\n"
            f"robust std {rstd:.3f}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            family="monospace",
        )
        ax.legend(loc="lower center", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no variance plane", ha="center", transform=ax.transAxes)
    ax.set_xlabel("pull")
    ax.set_ylabel("pixels")
    ax.set_title(title or "difference pulls", fontsize=10)
    if with_psf:
        ny, nx = diff.shape
        m = 64
        pos = [
            ("lower left", m, m),
            ("upper left", m, ny - m),
            ("centre", nx / 2, ny / 2),
            ("lower right", nx - m, m),
            ("upper right", nx - m, ny - m),
        ]
        worst = 0.0
        for j, (name, x, y) in enumerate(pos):
            sp = np.asarray(science_psf.compute_image(x, y), dtype=np.float64)
            sp = sp / sp.sum()
            rows = [("science", sp)]
            other = matched_psf if matched_psf is not None else diff.psf
            if other is not None:
                mp = np.asarray(other.compute_image(x, y), dtype=np.float64)
                mp = mp / mp.sum()
                label = "matched tmpl" if other is matched_psf else "difference"
                if mp.shape == sp.shape:
                    res = sp - mp
                    worst = max(worst, float(np.abs(res).max() / sp.max()))
                    rows += [(label, mp), ("residual", res)]
                else:
                    rows += [(label, mp)]
            for i, (label, im) in enumerate(rows):
                a = fig.add_subplot(gs[i, j + 1])
                if label == "residual":
                    lim = float(sp.max()) * 0.1
                    a.imshow(im, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
                else:
                    a.imshow(im, origin="lower", cmap="viridis")
                a.set_xticks([])
                a.set_yticks([])
                if i == 0:
                    a.set_title(name, fontsize=8)
                if j == 0:
                    a.set_ylabel(label, fontsize=7)
        if matched_psf is not None or diff.psf is not None:
            stats["psf_resid"] = worst
            fig.text(
                0.99,
                0.01,
                f"residual = science - {'matched template' if matched_psf is not None else 'difference'}"
                f" PSF, colour scale ±10% of the peak; max |resid|/peak {worst:.3f}",
                ha="right",
                fontsize=7,
            )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return stats


def overview_figure(path: Path, ccds: Sequence[Any]) -> None:
    """FWHM, zero point, sky and DIA-source count against MJD (left) and against CCD number (right)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    rows = [
        ("fwhm_arcsec", 'PSF FWHM (")'),
        ("zero_point", "zero point (mag)"),
        ("sky", "sky (counts)"),
        ("n_dia", "DIA sources"),
    ]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 8), dpi=80, sharex="col")
    ccdnums = sorted({c.ccdnum for c in ccds})
    colour = {n: _CCD_COLORS[i % len(_CCD_COLORS)] for i, n in enumerate(ccdnums)}
    for i, (attr, label) in enumerate(rows):
        for n in ccdnums:
            pts = [
                (c.mjd, getattr(c, attr))
                for c in ccds
                if c.ccdnum == n and c.mjd is not None and getattr(c, attr) is not None
            ]
            if pts:
                t, v = zip(*sorted(pts), strict=True)
                axes[i, 0].plot(t, v, "o-", ms=4, lw=0.8, color=colour[n], label=f"ccd {n}")
            vals = [getattr(c, attr) for c in ccds if c.ccdnum == n and getattr(c, attr) is not None]
            if vals:
                axes[i, 1].plot([n] * len(vals), vals, "o", ms=4, color=colour[n], alpha=0.7)
        axes[i, 0].set_ylabel(label, fontsize=9)
        for a in axes[i]:
            a.grid(alpha=0.3)
            a.tick_params(labelsize=8)
            a.ticklabel_format(useOffset=False, axis="y", style="plain")
        axes[i, 0].xaxis.set_major_locator(MaxNLocator(5))
        axes[i, 1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("MJD (exposure start)")
    axes[-1, 1].set_xlabel("CCD number")
    axes[-1, 0].ticklabel_format(useOffset=False, axis="x")
    if ccdnums and len(ccdnums) <= 12:
        axes[0, 0].legend(fontsize=7, ncol=min(len(ccdnums), 6), loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sky_map(path: Path, ccds: Sequence[Any], objects: Sequence[dict[str, Any]]) -> None:
    """CCD footprints (from each calexp's WCS) and DiaObject positions; RA increases to the left."""
    plt = _plt()
    from matplotlib.patches import Polygon

    fig, ax = plt.subplots(figsize=(7.5, 6), dpi=80)
    ras: list[float] = []
    decs: list[float] = []
    seen: set[int] = set()
    for c in ccds:
        if len(c.corners) != 4:
            continue
        xy = np.array(c.corners)
        ax.add_patch(Polygon(xy, closed=True, fill=False, lw=0.8, ec="#555555"))
        if c.ccdnum not in seen:
            seen.add(c.ccdnum)
            ax.text(
                xy[:, 0].mean(),
                xy[:, 1].mean(),
                str(c.ccdnum),
                ha="center",
                va="center",
                fontsize=8,
                color="#555555",
            )
        ras += list(xy[:, 0])
        decs += list(xy[:, 1])
    if objects:
        ra = np.array([float(o["ra"]) for o in objects])
        dec = np.array([float(o["dec"]) for o in objects])
        n = np.array([int(o.get("nDiaSources") or 1) for o in objects])
        sc = ax.scatter(ra, dec, s=6 + 6 * np.minimum(n, 8), c=n, cmap="plasma", alpha=0.8, lw=0)
        fig.colorbar(sc, ax=ax, label="nDiaSources", shrink=0.8)
        ras += list(ra)
        decs += list(dec)
    if ras:
        pad = 0.02 + 0.05 * (max(ras) - min(ras))
        ax.set_xlim(max(ras) + pad, min(ras) - pad)
        pad = 0.02 + 0.05 * (max(decs) - min(decs))
        ax.set_ylim(min(decs) - pad, max(decs) + pad)
    ax.set_xlabel("RA (deg)")
    ax.set_ylabel("Dec (deg)")
    ax.set_title(f"{len(ccds)} CCD-visits, {len(objects)} DiaObjects", fontsize=10)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(useOffset=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
