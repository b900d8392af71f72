"""A self-contained HTML report of a comparison (``report.html``): opened from disk, no server, no script.

- ``jpeg_thumbnail``, ``data_uri``: a thumbnail as JPEG bytes and as a ``data:image/jpeg;base64`` URI (the page
  holds its pictures itself; each links to the full-size result by a relative path);
- ``scatter_svg``: MD against seconds per edit, one point per method, as inline SVG drawn here (no plotting
  dependency);
- ``report_cells``: one sample's pictures as the page's cells;
- ``render_report``: the page: the comparison tables, one plot per dataset, one row per sample with the input and
  its drag drawn and every method's result (its MD or why there is none), the per-category tables.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .comparison import Table, dataset_title, to_html

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples td { text-align: center; font-size: 0.85em; }
.samples img { display: block; max-width: 256px; max-height: 256px; margin: 0 auto 0.2em; }
.notes { color: #555; font-size: 0.85em; max-width: 70em; }
svg text { font-size: 12px; font-family: system-ui, sans-serif; }
"""


def jpeg_thumbnail(image: np.ndarray | Image.Image, size: int = 256, quality: int = 85) -> bytes:
    """The image fitted into ``size`` x ``size`` (aspect kept) as JPEG bytes (a few tens of KB)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    img.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    """JPEG bytes as a ``data:image/jpeg;base64`` URI: the page holds its pictures itself."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    count = int(math.ceil((hi - first) / step - 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(count)]


def scatter_svg(points: list[tuple[str, float, float]], x_label: str, y_label: str, width: int = 520,
                height: int = 340) -> str:
    """Inline SVG: one labelled point (circle) per (label, x, y), round ticks on both axes from 0 or below."""
    left, right, top, bottom = 64, 130, 16, 48
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x_ticks = nice_ticks(min(0.0, *xs), max(xs))
    y_ticks = nice_ticks(min(0.0, *ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    pw, ph = width - left - right, height - top - bottom
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * pw
    py = lambda y: top + ph - (y - y0) / ((y1 - y0) or 1) * ph
    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(y_label)} against {esc(x_label)}">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 4}" stroke="#999"/>'
                     f'<text x="{px(t):.1f}" y="{top + ph + 17}" text-anchor="middle">{t:g}</text>')
    for t in y_ticks:
        parts.append(f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left}" y2="{py(t):.1f}" stroke="#999"/>'
                     f'<text x="{left - 7}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">{esc(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
                 f'{esc(y_label)}</text>')
    for i, (label, x, y) in enumerate(points):
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{color}"><title>{esc(label)}: '
                     f'{y:.2f} at {x:.1f} s</title></circle>'
                     f'<text x="{px(x) + 8:.1f}" y="{py(y) + 4:.1f}" fill="{color}">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plot(dataset: str, table: Table) -> str:
    points = [(r["method"], float(r["seconds"]), float(r["mean_distance"])) for r in table.rows
              if r.get("seconds") is not None and r.get("mean_distance") is not None]
    title = f"<h3>{html.escape(dataset_title(dataset))}: MD against seconds per edit</h3>"
    if not points:
        return title + ('<p class="notes">No point to plot: MD (mean_distance.enabled) or the edits\' timings '
                        '(trajectory.json) are missing.</p>')
    md = next(c for c in table.columns if c.key == "mean_distance")  # "MD (px)" or "MD (/ diagonal)"
    return title + scatter_svg(points, "seconds per edit (lower is better)", f"{md.text}, lower is better")


def _cell(result: dict | None) -> str:
    if result is None:
        return "<td>no result</td>"
    esc = html.escape
    picture = f'<img src="{result["src"]}" alt="{esc(result["alt"])}">' if result.get("src") else ""
    if picture and result.get("href"):
        picture = f'<a href="{esc(result["href"])}">{picture}</a>'
    return f"<td>{picture}{esc(result.get('caption', ''))}</td>"


def _caption(row: dict) -> str:
    """Under a result: its MD, else its first DAI, else its status and why."""
    if row["status"] != "ok":
        return f"{row['status']}: {row['message']}" if row.get("message") else row["status"]
    if row.get("mean_distance") is not None:
        return f"MD {row['mean_distance']:.2f}"
    dai = next((k for k in row if k.startswith("dai_") and row[k] is not None), None)
    return f"DAI γ={dai[4:]} {row[dai]:.4f}" if dai else "ok"


def report_cells(sample: dict, folder: Path) -> dict:
    """One sample's pictures ({sample, dataset, input: JPEG bytes, results: {method: {image: JPEG bytes, row}}},
    the evaluator's ``collect_media``) as report.html cells: data URIs, links to the full-size results relative to
    ``folder`` (where report.html is), captions (MD, else DAI, else why there is no result)."""
    results = {}
    for method, m in sample["results"].items():
        row = m["row"]
        href = os.path.relpath(row["result"], folder) if row.get("result") and Path(row["result"]).is_file() else None
        results[method] = {"src": data_uri(m["image"]) if m["image"] is not None else None,
                           "alt": f"{method}: {sample['sample']}", "href": href, "caption": _caption(row)}
    drawn = sample["input"]
    return {"sample": sample["sample"], "dataset": sample["dataset"], "results": results,
            "input": None if drawn is None else {"src": data_uri(drawn), "alt": f"input: {sample['sample']}",
                                                 "caption": ""}}


def samples_table(samples: list[dict], methods: list[str]) -> str:
    """One row per sample: its name (dataset, category), the input with its drag, each method's result."""
    esc = html.escape
    head = "<th>sample</th><th>input (drag)</th>" + "".join(f"<th>{esc(m)}</th>" for m in methods)
    rows = []
    for s in samples:
        name = f"<td><b>{esc(s['sample'])}</b><br>{esc(dataset_title(s['dataset']))}</td>"
        cells = [_cell(s.get("input"))] + [_cell(s["results"].get(m)) for m in methods]
        rows.append("<tr>" + name + "".join(cells) + "</tr>")
    return (f'<table class="samples"><caption>Every sample: the input with its drag (handles red, targets blue, '
            f'the editable region tinted) and each method\'s result</caption><thead><tr>{head}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def render_report(title: str, comparisons: dict[str, Table], categories: dict[str, Table], samples: list[dict],
                  methods: list[str], lines: list[str] = ()) -> str:
    """The whole page as one string. ``samples``: [{sample, dataset, input, results: {method: cell}}], a cell
    {src (data URI), alt, href (relative path to the full image, optional), caption}."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if lines:
        parts.append("<pre>" + esc("\n".join(lines)) + "</pre>")
    for dataset, table in comparisons.items():
        parts.append(f"<h2>{esc(dataset_title(dataset))}</h2>")
        parts.append(to_html(table))
        parts.append(_plot(dataset, table))
    notes = next(iter(comparisons.values())).notes if comparisons else ""
    parts.append(f'<p class="notes">↓ lower is better, ↑ higher is better; bold: the best of a column. {esc(notes)}'
                 "</p>")
    parts.append("<h2>Samples</h2>")
    parts.append(samples_table(samples, methods))
    parts.append("<h2>Per category</h2>")
    parts += [to_html(t) for t in categories.values()]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
