"""Plain HTML + inline CSS + inline SVG for ``apfast report``: no JavaScript, no external resources.

Every string that comes from data goes through :func:`esc`. Light curves and the
source markers over thumbnails are inline SVG (vector, drawn by the browser, no
scripting), so a page of 200 objects costs no plotting time.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["BAND_COLORS", "esc", "fmt", "light_curve_svg", "page", "table", "thumbnail_svg"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d2a44;color:#fff;padding:10px 20px}
header a{color:#cfe0ff}
header h1{font-size:20px;margin:0 0 2px 0}
header .sub{font-size:12px;color:#c8d0e0}
main{padding:12px 20px;max-width:1240px}
h2{font-size:16px;margin:18px 0 6px 0;border-bottom:1px solid #d5d9e0;padding-bottom:3px}
table{border-collapse:collapse;font-size:12px;background:#fff}
th,td{border:1px solid #d5d9e0;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#e9edf3;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.failed td{background:#fde8e8}
tr.skipped td{background:#fff7e0}
.scroll{max-height:460px;max-width:100%;overflow:auto;display:inline-block;border:1px solid #d5d9e0}
.hscroll{max-width:100%;overflow-x:auto}
.wrap{white-space:normal;max-width:420px;text-align:left}
.flex{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.card{background:#fff;border:1px solid #d5d9e0;padding:6px}
.card .cap{font-size:12px;color:#444;margin-top:3px}
.card img{max-width:100%;height:auto}
img.pix{image-rendering:pixelated}
.legend span{display:inline-block;margin-right:12px;font-size:12px}
.kv td{text-align:left}
.muted{color:#777;font-size:12px}
a{color:#1a56b5}
"""

BAND_COLORS = {"u": "#6a3d9a", "g": "#1b9e3a", "r": "#d62728", "i": "#ff7f0e", "z": "#8c564b", "y": "#444444"}


def esc(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes too)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = "") -> str:
    """``format(value, spec)`` escaped; ``-`` for None/NaN."""
    if value is None:
        return "-"
    try:
        if isinstance(value, float) and not math.isfinite(value):
            return "-"
        return esc(format(value, spec))
    except (TypeError, ValueError):
        return esc(value)


def page(title: str, subtitle: str, body: str, *, home: str | None = None) -> str:
    """A whole HTML document: header (title, subtitle, link home), then ``body`` (already HTML)."""
    nav = f'<a href="{esc(home)}">&larr; overview</a> &middot; ' if home else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><div class="sub">{nav}{subtitle}</div></header>'
        f"<main>{body}</main></body></html>\n"
    )


def table(
    head: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    left: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
    scroll: bool = False,
) -> str:
    """An HTML table; ``head`` is escaped, cells are HTML already (use :func:`fmt`/:func:`esc`).

    The table sits in its own container that scrolls sideways when the table is wider than the
    page (so the page itself never does); with ``scroll`` the container also scrolls vertically
    beyond 460 px.
    """
    th = "".join(
        f'<th class="l">{esc(h)}</th>' if i in left else f"<th>{esc(h)}</th>" for i, h in enumerate(head)
    )
    body = []
    for k, r in enumerate(rows):
        cls = f' class="{esc(row_classes[k])}"' if row_classes and row_classes[k] else ""
        tds = "".join(f'<td class="l">{c}</td>' if i in left else f"<td>{c}</td>" for i, c in enumerate(r))
        body.append(f"<tr{cls}>{tds}</tr>")
    t = f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="{"scroll" if scroll else "hscroll"}">{t}</div>'


#: Marker styles over thumbnails: kind -> (stroke colour, label)
MARKERS = {
    "positive": ("#00c853", "positive"),
    "negative": ("#ff1744", "negative"),
    "dipole": ("#ffd600", "dipole"),
    "flagged": ("#2979ff", "flagged (pixel flags)"),
    "filtered": ("#9e9e9e", "filtered before association (artefact rules)"),
}


def thumbnail_svg(
    src: str, width: int, height: int, marks: Sequence[tuple[float, float, str, str]], *, scale: float = 1.0
) -> str:
    """An inline SVG: the PNG ``src`` with circles at ``(px, py, kind, tooltip)`` (in thumbnail pixels)."""
    w, h = width * scale, height * scale
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
        f'viewBox="0 0 {width} {height}" role="img">',
        f'<image href="{esc(src)}" x="0" y="0" width="{width}" height="{height}" '
        'style="image-rendering:pixelated"/>',
    ]
    for px, py, kind, tip in marks:
        colour = MARKERS.get(kind, ("#ffffff", ""))[0]
        dash = ' stroke-dasharray="2,1.5"' if kind in ("flagged", "filtered") else ""
        out.append(
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="none" stroke="{colour}" '
            f'stroke-width="1.2"{dash}><title>{esc(tip)}</title></circle>'
        )
    out.append("</svg>")
    return "".join(out)


def marker_legend() -> str:
    """The colour key of :func:`thumbnail_svg` markers."""
    spans = "".join(
        f'<span><svg width="14" height="14"><circle cx="7" cy="7" r="5" fill="#333" '
        f'stroke="{c}" stroke-width="2"/></svg> {esc(label)}</span>'
        for c, label in MARKERS.values()
    )
    return f'<div class="legend">{spans}</div>'


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def light_curve_svg(points: Sequence[dict[str, Any]], *, width: int = 720, height: int = 300) -> str:
    """Flux (nJy) against MJD with 1σ error bars, one colour per band.

    ``points``: dicts with ``mjd``, ``flux``, ``err``, ``band``, ``kind`` (``'dia'`` filled circle,
    ``'forced'`` open square) and ``tip`` (tooltip text).
    """
    pts = [
        p
        for p in points
        if p.get("flux") is not None and math.isfinite(float(p["flux"])) and p.get("mjd") is not None
    ]
    if not pts:
        return '<p class="muted">no photometry in the APDB for this object</p>'
    left, right, top, bottom = 70, 110, 14, 40
    pw, ph = width - left - right, height - top - bottom
    t = [float(p["mjd"]) for p in pts]
    lo_v = [float(p["flux"]) - float(p.get("err") or 0.0) for p in pts] + [0.0]
    hi_v = [float(p["flux"]) + float(p.get("err") or 0.0) for p in pts] + [0.0]
    t0, t1 = min(t), max(t)
    if t1 - t0 < 1e-3:
        t0, t1 = t0 - 0.5, t1 + 0.5
    pad = 0.05 * (t1 - t0)
    t0, t1 = t0 - pad, t1 + pad
    v0, v1 = min(lo_v), max(hi_v)
    pad = 0.08 * (v1 - v0 or 1.0)
    v0, v1 = v0 - pad, v1 + pad

    def X(x: float) -> float:
        return left + (x - t0) / (t1 - t0) * pw

    def Y(y: float) -> float:
        return top + (v1 - y) / (v1 - v0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'style="background:#fff;border:1px solid #d5d9e0;font-family:sans-serif">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    for v in _nice_ticks(v0, v1):
        y = Y(v)
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 5}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>'
        )
    for x in _nice_ticks(t0, t1, 5):
        px = X(x)
        out.append(
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{px:.1f}" y="{top + ph + 15}" font-size="11" text-anchor="middle">{x:.6g}</text>'
        )
    out.append(
        f'<line x1="{left}" x2="{left + pw}" y1="{Y(0):.1f}" y2="{Y(0):.1f}" stroke="#999" '
        'stroke-dasharray="4,3"/>'
    )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" font-size="12" text-anchor="middle">MJD (TAI)</text>'
    )
    out.append(
        f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2})">flux (nJy)</text>'
    )
    # forced points first, so a DiaSource at the same epoch and flux is drawn on top, not hidden
    for p in sorted(pts, key=lambda p: p.get("kind") != "forced"):
        x, y = X(float(p["mjd"])), Y(float(p["flux"]))
        e = float(p.get("err") or 0.0)
        c = BAND_COLORS.get(str(p.get("band") or ""), "#333")
        out.append(f"<g><title>{esc(p.get('tip', ''))}</title>")
        if e > 0 and math.isfinite(e):
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(float(p["flux"]) - e):.1f}" '
                f'y2="{Y(float(p["flux"]) + e):.1f}" stroke="{c}" stroke-width="1.2"/>'
            )
        if p.get("kind") == "forced":
            out.append(
                f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#fff" stroke="{c}" '
                'stroke-width="1.5"/>'
            )
        else:
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{c}" stroke="#000" stroke-width="0.5"/>'
            )
        out.append("</g>")
    ly = top + 6
    bands = sorted({str(p.get("band") or "") for p in pts})
    for b in bands:
        c = BAND_COLORS.get(b, "#333")
        ly += 16
        out.append(
            f'<circle cx="{left + pw + 16}" cy="{ly - 4}" r="4.5" fill="{c}"/>'
            f'<text x="{left + pw + 26}" y="{ly}" font-size="12">{esc(b or "?")} band</text>'
        )
    ly += 22
    out.append(
        f'<circle cx="{left + pw + 16}" cy="{ly - 4}" r="4.5" fill="#888"/>'
        f'<text x="{left + pw + 26}" y="{ly}" font-size="11">DiaSource</text>'
    )
    ly += 16
    out.append(
        f'<rect x="{left + pw + 12}" y="{ly - 8}" width="8" height="8" fill="#fff" stroke="#888"/>'
        f'<text x="{left + pw + 26}" y="{ly}" font-size="11">forced</text>'
    )
    out.append("</svg>")
    return "".join(out)
