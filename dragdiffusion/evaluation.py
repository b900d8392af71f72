"""Drag-editing evaluation as a Lightning validation run over a results folder: Mean Distance (MD) and its masked
variant (m-MD) from one set of DIFT features, Image Fidelity (IF) and the Drag Accuracy Index (DAI, no model).

``python -m dragdiffusion.evaluate`` (evaluate.py) is the command line; ``evaluate(cfg)`` the function;
``check_evaluation(cfg)`` says what it needs that is missing (config keys, torchvision, the DIFT model) before
anything runs (``edit.py data=DIR evaluate=true`` calls it before the first edit). Each process evaluates its shard
of the samples (sorted, unpadded); the metrics sum exactly across processes; rank 0 writes ``evaluation.json``,
``evaluation_samples.csv``, ``evaluation_categories.csv``, ``evaluation_methods.csv``, ``evaluation_settings.csv``
and the paper tables and report of ``comparison/`` (``comparison.py``, ``report.py``), and logs to the logger.
The method of each result is its trajectory.json's method name (else its config.yaml's ``method``; no ``method``
key: an older DragDiffusion result); its result-shaping settings are read from the config.yaml an edit writes
beside it; its seconds and UNet passes from its trajectory.json. The dataset of a sample is its layout (DragBench,
Drag100, our folder format). A results folder holding one folder per method (``edit.py data=DIR methods=[...]``:
``<results>/<method>/<sample>/``) is evaluated as a whole: every method's results in one run, reported per
dataset and method.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .backbone import load_backbone
from .batch import gather_rows, say
from .comparison import (STATUSES, UNKNOWN_DATASET, aggregate, category_rows, category_tables, comparison_tables,
                         dai_key, dataset_title, group_table, to_csv, to_latex, to_markdown, wandb_rows)
from .config import (CONFIG_DIR, TEXT_SUFFIX, EvaluateConfig, load_config, method_label, split_method_name,
                     to_container)
from .data.datamodule import ShardSampler, as_list
from .data.readers import LAYOUTS_HELP, find_samples, read_sample, sample_layout
from .errors import ConfigError, DragError, ModelLoadError
from .inputs import model_missing
from .io import save_json, save_text
from .loggers import close_logger, log_table, make_logger
from .images import as_image_tensor, resize_uint8
from .metrics import DragAccuracyIndex, ImageFidelity, MeanDistance
from .outputs import EDIT_RESULT_KEYS, IGNORED, check_writable, saved_config, setting
from .policy import DevicePolicy, distributed_trainer
from .report import jpeg_thumbnail, render_report, report_cells
from .sample import DEFAULT_LIMITS, ReadLimits, check_file_size, draw_drag, read_image

EVALUATE_YAML = CONFIG_DIR / "evaluate.yaml"
SAMPLE_COLUMNS = ("sample", "dataset", "category", "method", "status", "n_pairs", "mean_distance",
                  "masked_mean_distance", "image_fidelity", "seconds", "unet_passes",
                  "message")  # + dai_<gamma> after image_fidelity (sample_columns)
FIGURE_COLUMNS = ("n_samples", "n_evaluated", "n_pairs", "mean_distance", "masked_mean_distance",
                  "image_fidelity")  # + dai_<gamma>, seconds, unet_passes (figure_columns)
METRIC_KEYS = ("mean_distance", "masked_mean_distance", "image_fidelity")  # + dai_<gamma>
COMPARISON_DIR = "comparison"  # <out>/comparison/: the paper tables and report.html
DEFAULT_METHOD = "dragdiffusion"  # a result config.yaml without a method key: made before methods existed
UNKNOWN_METHOD = "unknown"  # no config.yaml beside the result (another code base's output)
# the settings that shape a result, read from each result's config.yaml and reported per method
METHOD_RESULT_KEYS = ("method",) + tuple(k for k in EDIT_RESULT_KEYS if k != "method")
_ABSENT = object()


def sample_columns(gammas=()) -> tuple[str, ...]:
    i = SAMPLE_COLUMNS.index("image_fidelity") + 1
    return SAMPLE_COLUMNS[:i] + tuple(dai_key(g) for g in gammas) + SAMPLE_COLUMNS[i:]


def figure_columns(gammas=()) -> tuple[str, ...]:
    return FIGURE_COLUMNS + tuple(dai_key(g) for g in gammas) + ("seconds", "unet_passes")


# ----------------------------------------------------------------------------------------------- methods

def method_name(saved: DictConfig | None) -> str:
    """The method a result was made with: its config's ``method`` (a name, or a section with a ``name``);
    DEFAULT_METHOD when the key is absent; UNKNOWN_METHOD without a config."""
    if saved is None:
        return UNKNOWN_METHOD
    value = OmegaConf.select(saved, "method", default=None)
    if OmegaConf.is_config(value):
        value = value.get("name")
    return method_label(saved) if value else DEFAULT_METHOD  # "gooddrag+text" with DragText


def known_methods() -> set[str]:
    """The method names that have a preset (configs/method/<name>.yaml)."""
    return {p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")}


def result_settings(saved: DictConfig | None, keys=METHOD_RESULT_KEYS) -> dict:
    """The result-shaping settings of a result's config, flattened ({"drag.n_pix_step": 80, ...}): ``keys`` and
    the section named after its method (e.g. ``gooddrag.*``), not the sections of the other methods; per-sample
    paths (lora.path) left out."""
    if saved is None:
        return {}
    name = method_name(saved)
    others = known_methods() - {split_method_name(name)[0]}
    out = {}
    for key in dict.fromkeys(tuple(keys) + (split_method_name(name)[0],) + (("text",) if name.endswith(TEXT_SUFFIX)
                                                                              else ())):
        if key.split(".")[0] in others:
            continue
        value = setting(saved, key)
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flatten(value).items() if f"{key}.{k}" not in IGNORED})
        elif key not in IGNORED and OmegaConf.select(saved, key, default=_ABSENT) is not _ABSENT:
            out[key] = value
    out.setdefault("method", name)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------- one sample

def category_of(name: str) -> str:
    """<category>/<sample> -> category; a sample at the top of the data folder -> ''."""
    parent = Path(name).parent.as_posix()
    return "" if parent == "." else parent


def new_row(name: str, dataset: str = UNKNOWN_DATASET) -> dict:
    return {"sample": name, "dataset": dataset, "category": category_of(name), "method": None, "status": "ok",
            "message": "", "n_pairs": None, "mean_distance": None, "masked_mean_distance": None,
            "image_fidelity": None, "seconds": None, "unet_passes": None, "result": None, "size": None, "pairs": []}


def edit_record(folder: Path, limits: ReadLimits = DEFAULT_LIMITS) -> dict:
    """What the trajectory.json beside a result says about its edit: the method's name, the edit's seconds (LoRA,
    inversion, drag, denoising and decoding) and its UNet passes (every stage's forward calls; results made before
    they were counted: None). {} without a readable trajectory.json (another code base's result)."""
    path = folder / "trajectory.json"
    try:
        check_file_size(path, "trajectory.json", None, limits)
        t = json.loads(path.read_text())
    except (OSError, ValueError, DragError):
        return {}
    if not isinstance(t, dict):
        return {}
    method = t.get("method")
    return {"method": method.get("name") if isinstance(method, dict) else None,
            "seconds": _stage_total(t.get("seconds")), "unet_passes": _stage_total(t.get("unet_passes"))}


def _stage_total(stages) -> float | int | None:
    """The sum of a trajectory.json {stage: figure} record; None where there is none."""
    if not isinstance(stages, dict) or not stages:
        return None
    return sum(v for v in stages.values() if isinstance(v, (int, float)))


def load_item(name: str, folder: str | Path, results: str | Path, result_name: str,
              resize_mismatched: bool = False, limits: ReadLimits = DEFAULT_LIMITS) -> dict:
    """{row, sample, edited}: the sample, its edited image, and a row whose status says what is wrong
    (missing: no output; size_mismatch: an output of another size; error: unreadable). Never raises DragError."""
    row = new_row(name, sample_layout(folder) or UNKNOWN_DATASET)
    item = {"row": row, "sample": None, "edited": None}
    saved = saved_config(Path(results) / name)
    record = edit_record(Path(results) / name, limits)
    row["method"] = record.get("method") or method_name(saved)
    row["settings"] = result_settings(saved)  # for the summary
    row["seconds"], row["unet_passes"] = record.get("seconds"), record.get("unet_passes")
    row["result"] = str(Path(results) / name / result_name)
    try:
        sample = read_sample(folder, name, limits)
    except DragError as exc:
        row.update(status="error", message=f"sample: {exc}")
        return item
    row["n_pairs"] = len(sample.handles)
    row["size"] = [sample.width, sample.height]
    path = Path(results) / name / result_name
    if not path.is_file():
        row.update(status="missing", message=f"no {result_name} in {path.parent}")
        return item
    try:
        edited = read_image(path, "edited image", name, limits)
    except DragError as exc:
        row.update(status="error", message=str(exc))
        return item
    if edited.shape != sample.image.shape:
        got = f"{edited.shape[1]}x{edited.shape[0]}"
        if not resize_mismatched:
            row.update(status="size_mismatch", message=f"the edited image is {got} px but the source is "
                       f"{sample.width}x{sample.height}; resize_mismatched=true resizes it to the source's size")
            return item
        edited = resize_uint8(edited, (sample.height, sample.width))
        row["message"] = f"resized from {got}"
    item.update(sample=sample, edited=edited)
    return item


class EvaluationItems(Dataset):
    def __init__(self, entries: list[tuple[str, str]], results: str, result_name: str, resize_mismatched: bool,
                 limits: ReadLimits = DEFAULT_LIMITS):
        self.entries, self.results, self.limits = entries, results, limits
        self.result_name, self.resize_mismatched = result_name, resize_mismatched

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        name, folder, *root = self.entries[i]  # (name, folder[, the results folder of this entry])
        return load_item(name, folder, root[0] if root else self.results, self.result_name, self.resize_mismatched,
                         self.limits)


def is_method_folder(folder: Path) -> bool:
    """A folder of one method's batch: named after a method preset, or holding a batch summary.json that names
    its method (``edit.py data=DIR methods=[...]`` writes ``<out>/<method>/summary.json``)."""
    if not folder.is_dir():
        return False
    if folder.name in known_methods():
        return True
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and bool(summary.get("method"))


def result_roots(results: Path) -> list[Path]:
    """Where the results of each sample are: ``results`` itself, or, when it holds one folder per method (a batch
    with ``methods=[...]``: ``<results>/<method>/<sample>/``), each of those method folders."""
    per_method = sorted(f for f in results.iterdir() if is_method_folder(f)) if results.is_dir() else []
    return per_method or [results]


# ----------------------------------------------------------------------------------------------- tables

def method_table(rows: list[dict], gammas=()) -> list[dict]:
    """Per method (sorted): the figures as ``aggregate`` (over every dataset: the tables split them per dataset),
    ``settings`` = the result-shaping settings all its samples share (from their config.yaml) and ``varying`` = the
    setting keys whose values differ between them."""
    table = []
    for name in sorted({r.get("method") or UNKNOWN_METHOD for r in rows}):
        rs = [r for r in rows if (r.get("method") or UNKNOWN_METHOD) == name]
        settings = [r.get("settings") or {} for r in rs]
        keys = sorted(set().union(*settings))
        first = settings[0]
        common = {k: first[k] for k in keys if all(k in s and s[k] == first[k] for s in settings)}
        table.append({"method": name, **aggregate(rs, gammas), "settings": common,
                      "varying": [k for k in keys if k not in common]})
    return table


def _figure(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def summary_line(summary: dict, label: str) -> str:
    """MD, m-MD, IF, DAI at each gamma, pairs, samples evaluated (and what was not), seconds per edit, under
    ``label`` (a method on a dataset)."""
    unit = " px" if summary["distance_unit"] == "px" else " (of the diagonal)"
    gammas = list(summary.get("dai_gammas") or [])
    dai = "n/a"
    if gammas and any(summary.get(dai_key(g)) is not None for g in gammas):
        dai = "/".join(_figure(summary.get(dai_key(g)), ".4g") for g in gammas) + \
            f" (gamma {'/'.join(str(g) for g in gammas)})"
    counts = ", ".join(f"{summary['counts'][s]} {s}" for s in STATUSES[1:] if summary["counts"][s])
    seconds = f" | {summary['seconds']:.1f} s/edit" if summary.get("seconds") is not None else ""
    return (f"{label}: MD {_figure(summary['mean_distance'], '.4g', unit)} | "
            f"m-MD {_figure(summary.get('masked_mean_distance'), '.4g', unit)} | "
            f"IF {_figure(summary['image_fidelity'], '.4f')} | DAI {dai} | {summary['n_pairs']} pairs | "
            f"{summary['counts']['ok']}/{summary['n_samples']} samples evaluated" + (f" ({counts})" if counts else "")
            + seconds)


def group_label(group: dict) -> str:
    return f"{group['method']} on {dataset_title(group['dataset'])}"


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def make_report(rows: list[dict], mean_distance, image_fidelity, cfg: DictConfig, masked_mean_distance=None,
                dai: dict | None = None) -> dict:
    """The report: ``summary`` (figures over every result from the metrics' exact sums; ``groups``: one entry per
    dataset and method; ``methods``: one per method with its settings), ``lines`` (one summary line per dataset
    and method), ``line`` (the only such line, or the counts when there are several), ``categories`` (per
    dataset, method and category), ``samples``. ``dai``: {gamma: value} or None (DAI off)."""
    rows = sorted(rows, key=lambda r: (r["sample"], r.get("method") or ""))
    gammas = [int(g) for g in dai] if dai is not None else []
    methods = method_table(rows, gammas)
    rows = [{k: v for k, v in r.items() if k != "settings"} for r in rows]
    unit = "px" if cfg.mean_distance.normalize == "none" else cfg.mean_distance.normalize
    groups = group_table(rows, gammas)
    summary = {
        "groups": groups,
        "methods": methods,
        "mean_distance": _finite_or_none(mean_distance),
        "masked_mean_distance": _finite_or_none(masked_mean_distance),
        "image_fidelity": _finite_or_none(image_fidelity),
        **{dai_key(g): _finite_or_none(dai[g]) for g in gammas},
        "dai_gammas": gammas,
        "dai_reference_compat": bool(cfg.dai.reference_compat) if dai is not None else None,
        "n_pairs": sum(r["n_pairs"] or 0 for r in rows if r["status"] == "ok"),
        "n_samples": len(rows),
        "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "distance_unit": unit,
    }
    lines = [summary_line({**g, "distance_unit": unit, "dai_gammas": gammas}, group_label(g)) for g in groups]
    if len(lines) == 1:
        line = lines[0]
    else:
        datasets = [dataset_title(d) for d in sorted({g["dataset"] for g in groups})]
        datasets = ", ".join(datasets[:-1]) + " and " + datasets[-1] if len(datasets) > 1 else datasets[0]
        counts = ", ".join(f"{summary['counts'][s]} {s}" for s in STATUSES[1:] if summary["counts"][s])
        line = (f"{len(methods)} method(s) on {datasets}: {summary['counts']['ok']}/{len(rows)} "
                "results evaluated" + (f" ({counts})" if counts else "") + "; per method and dataset:")
    return {"summary": summary, "line": line, "lines": lines, "categories": category_rows(rows, gammas),
            "samples": rows}


def _csv(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    return buf.getvalue()


def settings_rows(methods: list[dict]) -> list[dict]:
    """evaluation_settings.csv: one row per method and setting its results share (lists and mappings as JSON
    text), then its varying keys with the value ``(varies)``."""
    out = []
    for m in methods:
        for key, value in sorted(m["settings"].items()):
            text = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
            out.append({"method": m["method"], "setting": key, "value": text})
        out += [{"method": m["method"], "setting": key, "value": "(varies)"} for key in m["varying"]]
    return out


def write_report(out: str | Path, report: dict, cfg: DictConfig | None = None, media: list[dict] | None = None
                 ) -> Path:
    """evaluation.json (raw figures), evaluation_samples.csv, evaluation_categories.csv (per dataset, method and
    category, and each method's ``all`` where a dataset has several categories), evaluation_methods.csv (per dataset
    and method), evaluation_settings.csv (per method), and the paper tables and report of ``comparison/``
    (``write_comparison``) in ``out``."""
    out = Path(out)
    summary = report["summary"]
    gammas = summary.get("dai_gammas") or []
    doc = {"summary": summary, "line": report["line"], "lines": report.get("lines", []),
           "categories": report["categories"], "samples": report["samples"]}
    if cfg is not None:
        doc["config"] = to_container(cfg)
    save_json(out / "evaluation.json", doc)
    save_text(out / "evaluation_samples.csv", _csv(report["samples"], sample_columns(gammas)))
    save_text(out / "evaluation_categories.csv",
              _csv(report["categories"], ("dataset", "method", "category") + figure_columns(gammas)))
    varying = {m["method"]: " ".join(m["varying"]) for m in summary["methods"]}
    groups = [{**g, "varying": varying.get(g["method"], "")} for g in summary["groups"]]
    save_text(out / "evaluation_methods.csv", _csv(groups, ("dataset", "method") + figure_columns(gammas)
                                                    + ("varying",)))
    save_text(out / "evaluation_settings.csv", _csv(settings_rows(summary["methods"]), ("method", "setting", "value")))
    write_comparison(out / COMPARISON_DIR, report, media)
    return out


def paper_tables(report: dict) -> tuple[dict, dict]:
    """({dataset: comparison Table}, {dataset: per-category Table}) of a report."""
    s = report["summary"]
    gammas = s.get("dai_gammas") or []
    return (comparison_tables(report["samples"], gammas, s["distance_unit"]),
            category_tables(report["samples"], gammas, s["distance_unit"]))


def write_comparison(folder: Path, report: dict, media: list[dict] | None = None) -> Path:
    """``<dataset>.csv|.md|.tex`` (one row per method) and ``<dataset>_categories.csv|.md|.tex`` (per method and
    category) for each dataset, and ``report.html`` (with ``media``: the samples' pictures) in ``folder``."""
    comparisons, categories = paper_tables(report)
    for name, tables in (("", comparisons), ("_categories", categories)):
        for dataset, table in tables.items():
            save_text(folder / f"{dataset}{name}.csv", to_csv(table))
            save_text(folder / f"{dataset}{name}.md", to_markdown(table))
            save_text(folder / f"{dataset}{name}.tex", to_latex(table))
    methods = sorted({r["method"] for r in report["samples"]})
    samples = [report_cells(m, folder) for m in media or []]
    page = render_report("Drag editing: comparison of methods", comparisons, categories, samples, methods,
                         [report["line"]] + (report["lines"] if len(report["lines"]) > 1 else []))
    save_text(folder / "report.html", page)
    return folder


# ----------------------------------------------------------------------------------------------- pictures

def collect_media(report: dict, data: str | Path, limits: ReadLimits = DEFAULT_LIMITS, size: int = 256
                  ) -> list[dict]:
    """Per sample (sorted): {sample, dataset, input, results: {method: {image, row}}}: the input with its drag
    drawn (handles, targets, the editable region) and each method's result, as JPEG thumbnails of at most
    ``size`` px (bytes; None where a picture cannot be read: its row says why)."""
    by_sample: dict[str, list[dict]] = {}
    for r in report["samples"]:
        by_sample.setdefault(r["sample"], []).append(r)
    media = []
    for name, rows in sorted(by_sample.items()):
        try:
            s = read_sample(Path(data) / name, name, limits)
            drawn = jpeg_thumbnail(draw_drag(s.image, s.handles, s.targets, s.mask), size)
        except DragError:
            drawn = None
        results = {}
        for r in rows:
            image = None
            if r.get("result") and Path(r["result"]).is_file():
                try:
                    image = jpeg_thumbnail(read_image(r["result"], "result", name, limits), size)
                except DragError:
                    image = None
            results[r["method"]] = {"image": image, "row": r}
        media.append({"sample": name, "dataset": rows[0]["dataset"], "input": drawn, "results": results})
    return media


def small_picture(jpeg: bytes | None, size: int = 128) -> Image.Image | None:
    """A ``collect_media`` thumbnail made smaller, for a logger's table."""
    if jpeg is None:
        return None
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    image.thumbnail((size, size), Image.BILINEAR)
    return image


# ----------------------------------------------------------------------------------------------- Lightning

def build_mean_distance(cfg: DictConfig) -> MeanDistance:
    """The Mean Distance metric with its DIFT model loaded on the CPU in the policy's weight dtype; Lightning
    places it on each process's device once (the evaluation Trainer owns it)."""
    m = cfg.mean_distance
    policy = DevicePolicy.from_config(cfg)
    try:
        backbone = load_backbone(cfg.model, DevicePolicy(torch.device("cpu"), policy.precision, policy.weight_dtype))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc} (mean_distance.enabled=false evaluates DAI and IF without the DIFT model)") \
            from None
    return MeanDistance(backbone=backbone, t=m.t, up_block=m.up_block, ensemble_size=m.ensemble_size, width=m.width,
                        search=m.search, normalize=m.normalize, seed=m.seed, chunk_rows=m.chunk_rows,
                        masked=m.masked)


def build_dai(cfg: DictConfig) -> DragAccuracyIndex:
    return DragAccuracyIndex(gammas=list(cfg.dai.gammas), reference_compat=cfg.dai.reference_compat)


class EvaluationModule(L.LightningModule):
    """Thin: reads its shard of the samples, updates the metrics (DAI, MD / m-MD, IF), gathers the per-sample rows.

    A metric given is used as it is; one not given is built from the config when its section is enabled."""

    def __init__(self, cfg: DictConfig, entries: list[tuple[str, str]], mean_distance: MeanDistance | None = None,
                 image_fidelity: ImageFidelity | None = None, dai: DragAccuracyIndex | None = None):
        super().__init__()
        self.cfg, self.entries = cfg, list(entries)
        if image_fidelity is None and cfg.image_fidelity.enabled:  # first: it fails fast where LPIPS is missing
            image_fidelity = ImageFidelity(net_type=cfg.image_fidelity.net, size=cfg.image_fidelity.size)
        self.image_fidelity = image_fidelity
        self.dai = dai if dai is not None else (build_dai(cfg) if cfg.dai.enabled else None)
        if mean_distance is None and cfg.mean_distance.enabled:
            mean_distance = build_mean_distance(cfg)
        self.mean_distance = mean_distance
        self.rows: list[dict] = []
        self.report: dict | None = None

    def val_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
        items = EvaluationItems(self.entries, str(self.cfg.results), self.cfg.result_name, self.cfg.resize_mismatched,
                                ReadLimits.from_config(self.cfg))
        return DataLoader(items, batch_size=1, sampler=ShardSampler(len(items), rank, world), collate_fn=as_list)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # numpy images; the metrics move what they need

    def on_validation_epoch_start(self) -> None:
        self.rows = []

    def validation_step(self, batch, batch_idx):
        for item in batch:
            self.rows.append(self.evaluate_item(item))

    def evaluate_item(self, item: dict) -> dict:
        row = item["row"]
        if row["status"] != "ok":
            return row
        s, edited = item["sample"], item["edited"]
        try:
            if self.dai is not None:  # first: in reference_compat mode it may refuse a sample (nothing counted yet)
                self.dai.update(s.image, edited, s.handles, s.targets, s.name)
                row.update({dai_key(g): float(v) for g, v in self.dai.last.items()})
            pairs = [{"handle": list(map(float, h)), "target": list(map(float, t))}
                     for h, t in zip(s.handles, s.targets)]
            if self.mean_distance is not None:
                self.mean_distance.update(s.image, edited, s.handles, s.targets, s.prompt, s.name, s.mask)
                last = self.mean_distance.last
                for p, m, d in zip(pairs, last["matches"], last["distances"]):
                    p.update(match=m.tolist(), distance=float(d))
                row["mean_distance"] = float(last["distances"].mean())
                if "masked_distances" in last:
                    for p, m, d in zip(pairs, last["masked_matches"], last["masked_distances"]):
                        p.update(masked_match=m.tolist(), masked_distance=float(d))
                    row["masked_mean_distance"] = float(last["masked_distances"].mean())
            row["pairs"] = pairs
            if self.image_fidelity is not None:
                self.image_fidelity.update(as_image_tensor(s.image), as_image_tensor(edited))
                row["image_fidelity"] = float(self.image_fidelity.last[0])
        except Exception as exc:  # noqa: BLE001 - one sample's failure is reported, the others go on
            row.update(status="error", message=f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return row

    def on_validation_epoch_end(self) -> None:
        rows = gather_rows(self.rows)
        with warnings.catch_warnings():  # a process without any evaluated sample: compute before update
            warnings.filterwarnings("ignore", ".*compute.*called before.*update.*")
            md = mmd = fid = dai = None
            if self.mean_distance is not None:
                md = self.mean_distance.compute()
                mmd = self.mean_distance.compute_masked() if self.mean_distance.masked else None
            if self.image_fidelity is not None:
                fid = self.image_fidelity.compute()
            if self.dai is not None:
                dai = self.dai.compute()
        self.report = make_report(rows, md, fid, self.cfg, masked_mean_distance=mmd, dai=dai)


def log_report(logger, report: dict, media: list[dict] | None = None) -> None:
    """To the logger (rank 0 only): the figures as metrics (``eval/<key>`` over every result,
    ``eval/<dataset>/<method>/<key>`` per dataset and method), the per-sample rows (``eval/samples``), the paper
    tables (``eval/comparison/<dataset>``, ``eval/categories/<dataset>``) and, with ``media``, every sample's input
    and each method's result side by side (``eval/side_by_side``: one row per sample, one image column per
    method)."""
    if not logger:
        return
    s = report["summary"]
    gammas = s.get("dai_gammas") or []
    metrics = {"eval/n_pairs": s["n_pairs"], "eval/n_evaluated": s["counts"]["ok"]}
    keys = METRIC_KEYS + tuple(dai_key(g) for g in gammas)
    metrics.update({f"eval/{key}": s[key] for key in keys if s.get(key) is not None})
    for g in s["groups"]:
        metrics.update({f"eval/{g['dataset']}/{g['method']}/{key}": g[key]
                        for key in keys + ("seconds", "unet_passes") if g.get(key) is not None})
    logger.log_metrics(metrics, step=0)
    columns = sample_columns(gammas)
    log_table(logger, "eval/samples", list(columns), [[r.get(k) for k in columns] for r in report["samples"]])
    comparisons, categories = paper_tables(report)
    for name, tables in (("comparison", comparisons), ("categories", categories)):
        for dataset, table in tables.items():
            headers, rows = wandb_rows(table)
            log_table(logger, f"eval/{name}/{dataset}", headers, rows)
    if media:
        methods = sorted({r["method"] for r in report["samples"]})
        rows = [[m["sample"], dataset_title(m["dataset"]), small_picture(m["input"])]
                + [small_picture(m["results"][k]["image"]) if k in m["results"] else None for k in methods]
                for m in media]
        log_table(logger, "eval/side_by_side", ["sample", "dataset", "input"] + methods, rows)


def evaluation_problems(cfg: DictConfig, mean_distance=None, image_fidelity=None, dai=None) -> list[str]:
    """What the evaluation needs and does not have, each a sentence naming it and how to fix it; found without
    loading a model: the metrics' switches, torchvision (Image Fidelity's LPIPS) and the DIFT model's files (MD)."""
    problems = []
    if cfg.image_fidelity.enabled and image_fidelity is None and importlib.util.find_spec("torchvision") is None:
        problems.append("image_fidelity: LPIPS needs torchvision, which is not installed: install the evaluation "
                        "extra where torch has a matching torchvision (pip install -e \".[eval]\"; it downloads "
                        "the ImageNet AlexNet weights once), or turn the metric off with "
                        "image_fidelity.enabled=false")
    if cfg.mean_distance.enabled and mean_distance is None:
        missing = model_missing(cfg.model)
        if missing:
            problems.append(f"mean_distance: the DIFT model is missing ({missing}): download it once where "
                            f"there is network (hf download {cfg.model.name_or_path}) or give a local copy with "
                            "model.name_or_path=/path/to/folder, or turn MD off with mean_distance.enabled=false "
                            "(DAI and IF need no DIFT model)")
    return problems


def check_evaluation(cfg: DictConfig, mean_distance=None, image_fidelity=None, dai=None, where: str = "") -> None:
    """A ConfigError when every metric is off; a ModelLoadError listing ``evaluation_problems``, if any (both exit
    status 2); ``where`` prefixes the message (``edit.py ... evaluate=true``: the keys go into
    ``evaluate_overrides``)."""
    if not (cfg.mean_distance.enabled or cfg.image_fidelity.enabled or cfg.dai.enabled or
            any(m is not None for m in (mean_distance, image_fidelity, dai))):
        raise ConfigError(f"{where}mean_distance.enabled, image_fidelity.enabled and dai.enabled are all false: "
                          "nothing to evaluate")
    problems = evaluation_problems(cfg, mean_distance, image_fidelity, dai)
    if problems:
        raise ModelLoadError(f"{where}the evaluation cannot run: " + "; ".join(problems))


def evaluate(cfg: DictConfig, mean_distance: MeanDistance | None = None,
             image_fidelity: ImageFidelity | None = None, dai: DragAccuracyIndex | None = None) -> dict:
    """Evaluate ``cfg.results`` against ``cfg.data``; returns the report on every process (rank 0 writes it).

    ``mean_distance`` / ``image_fidelity`` / ``dai``: metric instances to use instead of building them from the
    config (for example an ImageFidelity with another distance network)."""
    for key in ("results", "data"):
        if not cfg[key]:
            raise ConfigError(f"{key}=DIR is required (results: the edited images, data: the dataset)")
    if not Path(cfg.results).is_dir():
        raise ConfigError(f"results={cfg.results}: folder not found")
    check_writable(cfg.out or cfg.results, "out" if cfg.out else "results")  # the tables go there
    data = Path(cfg.data)
    folders = find_samples(data)
    if not folders:
        raise ConfigError(f"data={cfg.data}: no samples found (expected sample folders holding {LAYOUTS_HELP})")
    check_evaluation(cfg, mean_distance, image_fidelity, dai)  # torchvision, the DIFT model: before any model loads
    entries = [(f.relative_to(data).as_posix(), str(f), str(root)) for root in result_roots(Path(cfg.results))
               for f in folders]
    tic = time.perf_counter()
    module = EvaluationModule(cfg, entries, mean_distance, image_fidelity, dai)
    logger = make_logger(cfg.logger, config=cfg, quiet=cfg.quiet)
    trainer = distributed_trainer(cfg.trainer, quiet=cfg.quiet, logger=logger, inference_mode=False,
                                  use_distributed_sampler=False,  # our shards never repeat a sample
                                  enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available but not used|TPU available).*")
        trainer.validate(module, verbose=False)
    report = module.report
    report["summary"]["world_size"] = trainer.world_size
    report["summary"]["seconds"] = round(time.perf_counter() - tic, 3)
    if trainer.is_global_zero:
        media = collect_media(report, data, ReadLimits.from_config(cfg))
        write_report(cfg.out or cfg.results, report, cfg, media)
        log_report(logger, report, media)
    close_logger(logger)
    return report


def exit_status(report: dict) -> int:
    return 0 if report["summary"]["counts"]["ok"] == report["summary"]["n_samples"] else 1


# ----------------------------------------------------------------------------------------------- entry points

def config_from_edit(edit_cfg: DictConfig) -> DictConfig:
    """The evaluation config of ``edit.py data=DIR evaluate=true``: configs/evaluate.yaml, results = the batch's
    out, data = its data, the edit run's trainer and logger sections, then ``evaluate_overrides``."""
    overrides = list(edit_cfg.get("evaluate_overrides") or [])
    items = [f"results={json.dumps(str(edit_cfg.out))}", f"data={json.dumps(str(edit_cfg.data))}",
             f"quiet={json.dumps(bool(edit_cfg.quiet))}"]
    for section in ("trainer", "logger"):
        if any(o.split("=", 1)[0] == section for o in overrides):
            continue  # a preset named in the overrides wins over the edit run's section
        fields = set(OmegaConf.structured(EvaluateConfig)[section].keys())
        items += [f"{section}.{k}={json.dumps(v)}" for k, v in
                  to_container(edit_cfg[section]).items() if k in fields]
    return load_config(EVALUATE_YAML, items + overrides, schema=EvaluateConfig)


def evaluation_before_batch(edit_cfg: DictConfig) -> DictConfig:
    """``edit.py data=DIR evaluate=true``, before the first edit: the evaluation's config (a bad
    ``evaluate_overrides`` key is a ConfigError now, not after the batch) and what it needs (``check_evaluation``)."""
    try:
        cfg = config_from_edit(edit_cfg)
    except ConfigError as exc:
        raise ConfigError(f"evaluate_overrides: {exc}; nothing was edited") from None
    check_evaluation(cfg, where="evaluate=true: nothing was edited; ")
    return cfg


def evaluate_after_batch(edit_cfg: DictConfig) -> int:
    """``edit.py data=DIR evaluate=true``: evaluate the batch's outputs; the exit status of ``main``."""
    try:
        cfg = config_from_edit(edit_cfg)
        report = evaluate(cfg)
    except DragError as exc:
        print(f"error: evaluation: {exc}", file=sys.stderr)
        return 2
    return announce(report, cfg)


def announce(report: dict, cfg: DictConfig) -> int:
    say(report["line"])
    if len(report.get("lines") or []) > 1:
        for line in report["lines"]:
            say(f"  {line}")
    out = Path(cfg.out or cfg.results)
    say(f"tables: {out / COMPARISON_DIR}/ (<dataset>.csv|.md|.tex, <dataset>_categories.*, report.html); "
        f"raw: {out / 'evaluation.json'}, evaluation_samples.csv, evaluation_categories.csv, "
        "evaluation_methods.csv, evaluation_settings.csv")
    return exit_status(report)
