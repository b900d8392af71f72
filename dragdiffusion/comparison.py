"""Paper tables from an evaluation's per-result rows (pure functions: no torch, no files).

A row is one (sample, method) result as the evaluator makes it: ``sample``, ``category``, ``dataset``, ``method``,
``status``, ``n_pairs``, ``pairs`` (each with its ``distance`` / ``masked_distance``), ``image_fidelity``,
``dai_<gamma>``, ``seconds`` and ``unet_passes`` (of the edit, from its trajectory.json).

- ``aggregate``: the figures of a group of rows (MD / m-MD over the pairs, IF / DAI / seconds / passes over the
  results), raw;
- ``comparison_tables``: one ``Table`` per dataset, one row per method; ``category_tables``: one per dataset, one
  row per (method, category) and each method's ``all``: a category row never mixes methods;
- ``to_csv``, ``to_markdown``, ``to_latex`` (booktabs), ``to_html``: the same table in each format, every figure
  rounded as papers print it (MD 2 decimals, IF 3, DAI 4, seconds 1, passes 0), each figure's column saying
  whether lower or higher is better; the best figure of a column bold in Markdown / LaTeX / HTML.

The dataset of a sample is its layout (its marker file, ``data.readers.sample_layout``): DragBench
(meta_data.pkl), Drag100 (points.json) or our folder format (drag.json). Raw values stay in evaluation.json.
"""
from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass

STATUSES = ("ok", "missing", "size_mismatch", "error")
DATASET_TITLES = {"dragbench": "DragBench", "drag100": "Drag100", "folder": "folder-format samples"}
UNKNOWN_DATASET = "unknown"  # a sample whose folder is no sample of any layout (its row is an error)
BETTER_WORDS = {"lower": "lower is better", "higher": "higher is better"}
ARROWS = {"lower": "↓", "higher": "↑"}
LATEX_ARROWS = {"lower": r"$\downarrow$", "higher": r"$\uparrow$"}
NOT_AVAILABLE = "n/a"


def dai_key(gamma: int) -> str:
    return f"dai_{int(gamma)}"


def dataset_title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def category_label(row: dict) -> str:
    """The category a table shows: the sample's folder below the data root, or, for a sample at the top (every
    Drag100 sample), its dataset's name."""
    return row.get("category") or dataset_title(row.get("dataset") or UNKNOWN_DATASET)


# ----------------------------------------------------------------------------------------------- figures

def mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(rows: list[dict], gammas=()) -> dict:
    """The figures of a group of rows: status counts, samples, evaluated samples, pairs (of the evaluated ones),
    MD and m-MD (means over the pairs), IF and DAI at each gamma (means over the images), seconds and UNet passes
    per edit (means over the evaluated results that recorded them)."""
    ok = [r for r in rows if r["status"] == "ok"]
    pairs = [p for r in ok for p in r.get("pairs") or []]
    out = {"n_samples": len(rows), "n_evaluated": len(ok), "n_pairs": sum(r["n_pairs"] or 0 for r in ok),
           "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
           "mean_distance": mean(p.get("distance") for p in pairs),
           "masked_mean_distance": mean(p.get("masked_distance") for p in pairs),
           "image_fidelity": mean(r.get("image_fidelity") for r in ok)}
    for g in gammas:
        out[dai_key(g)] = mean(r.get(dai_key(g)) for r in ok)
    out["seconds"] = mean(r.get("seconds") for r in ok)
    out["unet_passes"] = mean(r.get("unet_passes") for r in ok)
    return out


def _groups(rows: list[dict], *keys) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of ``keys`` (sorted)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) or "" for k in keys), []).append(r)
    return dict(sorted(groups.items()))


def datasets_of(rows: list[dict]) -> list[str]:
    return sorted({r.get("dataset") or UNKNOWN_DATASET for r in rows})


def group_table(rows: list[dict], gammas=()) -> list[dict]:
    """One entry per (dataset, method): the figures as ``aggregate``."""
    return [{"dataset": d, "method": m, **aggregate(rs, gammas)}
            for (d, m), rs in _groups(rows, "dataset", "method").items()]


def category_rows(rows: list[dict], gammas=()) -> list[dict]:
    """One entry per (dataset, method, category), sorted, the categories of each (dataset, method) followed by
    its ``all`` entry when it has more than one."""
    out = []
    for (d, m), rs in _groups(rows, "dataset", "method").items():
        categories = _groups([{**r, "category": category_label(r)} for r in rs], "category")
        for (c,), cs in categories.items():
            out.append({"dataset": d, "method": m, "category": c, **aggregate(cs, gammas)})
        if len(categories) > 1:
            out.append({"dataset": d, "method": m, "category": "all", **aggregate(rs, gammas)})
    return out


# ----------------------------------------------------------------------------------------------- tables

@dataclass(frozen=True)
class Column:
    """A table column: ``key`` in the rows, its header as plain text (CSV), Unicode (Markdown, HTML) and LaTeX,
    ``better`` (lower / higher / None for labels and counts) and the decimals of its figures (None: text)."""
    key: str
    text: str
    better: str | None = None
    decimals: int | None = None
    unicode: str | None = None
    latex: str | None = None

    def header(self, fmt: str) -> str:
        if fmt == "csv":
            return self.text + (f" [{BETTER_WORDS[self.better]}]" if self.better else "")
        if fmt == "latex":
            label = self.latex or latex_escape(self.text)
            return label + (f" {LATEX_ARROWS[self.better]}" if self.better else "")
        label = self.unicode or self.text
        return label + (f" {ARROWS[self.better]}" if self.better else "")


@dataclass
class Table:
    """A titled table: ``columns`` (labels first, then figures) over ``rows`` (dicts keyed by column key);
    ``notes``: what the figures are, printed under it in Markdown, LaTeX (a comment) and HTML."""
    title: str
    columns: list[Column]
    rows: list[dict]
    notes: str = ""
    mark_best: bool = True


def metric_columns(gammas=(), distance_unit: str = "px") -> list[Column]:
    """The figure columns: MD, m-MD, IF, DAI at each gamma, seconds and UNet passes per edit, samples."""
    unit = "px" if distance_unit == "px" else "/ diagonal"
    md_decimals = 2 if distance_unit == "px" else 4
    cols = [Column("mean_distance", f"MD ({unit})", "lower", md_decimals),
            Column("masked_mean_distance", f"m-MD ({unit})", "lower", md_decimals),
            Column("image_fidelity", "IF", "higher", 3)]
    cols += [Column(dai_key(g), f"DAI gamma={g}", "lower", 4, unicode=f"DAI γ={g}", latex=f"DAI $\\gamma{{=}}{g}$")
             for g in gammas]
    cols += [Column("seconds", "s / edit", "lower", 1, latex="s\\,/\\,edit"),
             Column("unet_passes", "UNet passes", "lower", 0),
             Column("samples", "samples")]
    return cols


def _samples_cell(entry: dict) -> str:
    n, ok = entry["n_samples"], entry["n_evaluated"]
    return str(ok) if ok == n else f"{ok} of {n}"


def _with_values(columns: list[Column], rows: list[dict]) -> list[Column]:
    """The columns, without figure columns that no row has a value for (a metric turned off, no timings)."""
    return [c for c in columns if c.decimals is None or any(r.get(c.key) is not None for r in rows)]


TABLE_NOTES = ("MD / m-MD: mean distance of the DIFT matches to the targets over all pairs; IF: 1 - LPIPS; DAI: "
               "Drag Accuracy Index at patch radius gamma; s / edit: the edit's seconds (LoRA, inversion, drag, "
               "denoising and decoding; model loading excluded); UNet passes: the UNet's forward calls per edit "
               "(LoRA steps, inversion, drag, denoising); samples: results evaluated.")


def comparison_tables(rows: list[dict], gammas=(), distance_unit: str = "px") -> dict[str, Table]:
    """{dataset: Table}: one row per method (sorted), the figure columns that have a value."""
    tables = {}
    for d in datasets_of(rows):
        entries = [{**g, "samples": _samples_cell(g)} for g in group_table(rows, gammas) if g["dataset"] == d]
        columns = _with_values([Column("method", "method")] + metric_columns(gammas, distance_unit), entries)
        n = len({r["sample"] for r in rows if (r.get("dataset") or UNKNOWN_DATASET) == d})
        tables[d] = Table(f"{dataset_title(d)}: {len(entries)} method(s), {n} sample(s)", columns, entries,
                          TABLE_NOTES)
    return tables


def category_tables(rows: list[dict], gammas=(), distance_unit: str = "px") -> dict[str, Table]:
    """{dataset: Table}: one row per (method, category), each method's categories then its ``all`` row (when it
    has several)."""
    tables = {}
    for d in datasets_of(rows):
        entries = [{**c, "samples": _samples_cell(c)} for c in category_rows(rows, gammas) if c["dataset"] == d]
        columns = _with_values([Column("method", "method"), Column("category", "category")]
                               + metric_columns(gammas, distance_unit), entries)
        tables[d] = Table(f"{dataset_title(d)} per category", columns, entries, TABLE_NOTES, mark_best=False)
    return tables


# ----------------------------------------------------------------------------------------------- cells

def figure(value, decimals: int | None) -> str:
    """A cell as printed: a figure rounded to ``decimals`` (n/a when missing), or the text."""
    if value is None:
        return NOT_AVAILABLE
    if decimals is None:
        return str(value)
    return f"{float(value):.{decimals}f}"


def best_cells(table: Table) -> set[tuple[int, str]]:
    """(row index, column key) of each column's best printed figure (ties: all), when two rows or more have one."""
    best = set()
    if not table.mark_best:
        return best
    for c in table.columns:
        if not c.better:
            continue
        printed = [(i, float(figure(r.get(c.key), c.decimals))) for i, r in enumerate(table.rows)
                   if r.get(c.key) is not None]
        if len(printed) < 2:
            continue
        target = (min if c.better == "lower" else max)(v for _, v in printed)
        best |= {(i, c.key) for i, v in printed if v == target}
    return best


def latex_escape(text: str) -> str:
    """Text safe in LaTeX: its ten special characters written as commands."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in str(text))


def markdown_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


# ----------------------------------------------------------------------------------------------- writers

def to_csv(table: Table) -> str:
    """Headers with their direction (``MD (px) [lower is better]``), rounded figures, no title."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.header("csv") for c in table.columns])
    for r in table.rows:
        writer.writerow([figure(r.get(c.key), c.decimals) for c in table.columns])
    return buf.getvalue()


def to_markdown(table: Table) -> str:
    """A GitHub table under a ``###`` title (figures right-aligned, the best bold), the notes under it."""
    best = best_cells(table)
    lines = [f"### {markdown_escape(table.title)}", "",
             "| " + " | ".join(markdown_escape(c.header("markdown")) for c in table.columns) + " |",
             "|" + "|".join("---:" if c.decimals is not None else ":---" for c in table.columns) + "|"]
    for i, r in enumerate(table.rows):
        cells = []
        for c in table.columns:
            cell = markdown_escape(figure(r.get(c.key), c.decimals))
            cells.append(f"**{cell}**" if (i, c.key) in best else cell)
        lines.append("| " + " | ".join(cells) + " |")
    legend = "↓ lower is better, ↑ higher is better; bold: the best of a column. " if best else \
        "↓ lower is better, ↑ higher is better. "
    return "\n".join(lines + ["", legend + table.notes, ""])


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``), text escaped, the best figure of a column bold; the
    title and notes as comments above it."""
    best = best_cells(table)
    spec = "".join("r" if c.decimals is not None else "l" for c in table.columns)
    lines = [f"% {table.title}", f"% {table.notes}", "% needs \\usepackage{booktabs}",
             f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(c.header("latex") for c in table.columns) + " \\\\", "\\midrule"]
    for i, r in enumerate(table.rows):
        cells = []
        for c in table.columns:
            cell = latex_escape(figure(r.get(c.key), c.decimals))
            cells.append(f"\\textbf{{{cell}}}" if (i, c.key) in best else cell)
        lines.append(" & ".join(cells) + " \\\\")
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}", ""])


def to_html(table: Table) -> str:
    """A ``<table>`` with a caption (the title), the best figure of a column in ``<b>``."""
    best = best_cells(table)
    esc = html.escape
    head = "".join(f"<th>{esc(c.header('html'))}</th>" for c in table.columns)
    body = []
    for i, r in enumerate(table.rows):
        cells = []
        for c in table.columns:
            cell = esc(figure(r.get(c.key), c.decimals))
            cls = ' class="num"' if c.decimals is not None else ""
            cells.append(f"<td{cls}>" + (f"<b>{cell}</b>" if (i, c.key) in best else cell) + "</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><caption>{esc(table.title)}</caption><thead><tr>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def wandb_rows(table: Table) -> tuple[list[str], list[list]]:
    """(headers, rows) for a logger table: headers with their arrow, figures rounded as printed (numbers; None
    where missing), labels as text."""
    rows = []
    for r in table.rows:
        row = []
        for c in table.columns:
            value = r.get(c.key)
            row.append(None if value is None else (round(float(value), c.decimals) if c.decimals is not None
                                                   else str(value)))
        rows.append(row)
    return [c.header("markdown") for c in table.columns], rows
