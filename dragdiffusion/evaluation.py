"""DragBench evaluation as a Lightning validation run: Mean Distance and Image Fidelity over a results folder.

``python -m dragdiffusion.evaluate`` (evaluate.py) is the command line; ``evaluate(cfg)`` the function. Each process
evaluates its shard of the samples (sorted, unpadded); the metrics sum exactly across processes; rank 0 writes
``evaluation.json``, ``evaluation_samples.csv`` and ``evaluation_categories.csv`` and logs to the logger.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .backbone import load_backbone
from .batch import gather_rows, say
from .config import CONFIG_DIR, EvaluateConfig, load_config, to_container
from .data.datamodule import ShardSampler, as_list
from .data.readers import find_samples, read_sample
from .errors import ConfigError, DragError
from .io import save_json, save_text
from .loggers import close_logger, log_table, make_logger
from .images import as_image_tensor, resize_uint8
from .metrics import ImageFidelity, MeanDistance
from .outputs import check_writable
from .policy import DevicePolicy, distributed_trainer
from .sample import DEFAULT_LIMITS, ReadLimits, read_image

EVALUATE_YAML = CONFIG_DIR / "evaluate.yaml"
SAMPLE_COLUMNS = ("sample", "category", "status", "n_pairs", "mean_distance", "image_fidelity", "message")
CATEGORY_COLUMNS = ("category", "n_samples", "n_evaluated", "n_pairs", "mean_distance", "image_fidelity")
STATUSES = ("ok", "missing", "size_mismatch", "error")


# ----------------------------------------------------------------------------------------------- one sample

def category_of(name: str) -> str:
    """<category>/<sample> -> category; a sample at the top of the data folder -> ''."""
    parent = Path(name).parent.as_posix()
    return "" if parent == "." else parent


def new_row(name: str) -> dict:
    return {"sample": name, "category": category_of(name), "status": "ok", "message": "", "n_pairs": None,
            "mean_distance": None, "image_fidelity": None, "size": None, "pairs": []}


def load_item(name: str, folder: str | Path, results: str | Path, result_name: str,
              resize_mismatched: bool = False, limits: ReadLimits = DEFAULT_LIMITS) -> dict:
    """{row, sample, edited}: the sample, its edited image, and a row whose status says what is wrong
    (missing: no output; size_mismatch: an output of another size; error: unreadable). Never raises DragError."""
    row = new_row(name)
    item = {"row": row, "sample": None, "edited": None}
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
        name, folder = self.entries[i]
        return load_item(name, folder, self.results, self.result_name, self.resize_mismatched, self.limits)


# ----------------------------------------------------------------------------------------------- tables

def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def category_table(rows: list[dict]) -> list[dict]:
    """Per category (sorted): samples, evaluated samples, pairs, MD (mean over the pairs), IF (over images)."""
    table = []
    for cat in sorted({r["category"] for r in rows}):
        rs = [r for r in rows if r["category"] == cat]
        distances = [p["distance"] for r in rs if r["mean_distance"] is not None for p in r["pairs"]]
        table.append({"category": cat, "n_samples": len(rs), "n_evaluated": sum(r["status"] == "ok" for r in rs),
                      "n_pairs": len(distances), "mean_distance": _mean(distances),
                      "image_fidelity": _mean(r["image_fidelity"] for r in rs if r["image_fidelity"] is not None)})
    return table


def summary_line(summary: dict) -> str:
    """The DragBench summary line: MD, IF, number of pairs (and what was not evaluated)."""
    unit = " px" if summary["distance_unit"] == "px" else " (of the diagonal)"
    md = "n/a" if summary["mean_distance"] is None else f"{summary['mean_distance']:.4g}{unit}"
    fid = "n/a" if summary["image_fidelity"] is None else f"{summary['image_fidelity']:.4f}"
    counts = ", ".join(f"{summary['counts'][s]} {s}" for s in STATUSES[1:] if summary["counts"][s])
    return (f"DragBench: MD {md} | IF {fid} | {summary['n_pairs']} pairs | {summary['counts']['ok']}/"
            f"{summary['n_samples']} samples evaluated" + (f" ({counts})" if counts else ""))


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def make_report(rows: list[dict], mean_distance, image_fidelity, cfg: DictConfig) -> dict:
    rows = sorted(rows, key=lambda r: r["sample"])
    summary = {
        "mean_distance": _finite_or_none(mean_distance),
        "image_fidelity": None if image_fidelity is None else _finite_or_none(image_fidelity),
        "n_pairs": sum(len(r["pairs"]) for r in rows if r["mean_distance"] is not None),
        "n_samples": len(rows),
        "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "distance_unit": "px" if cfg.mean_distance.normalize == "none" else cfg.mean_distance.normalize,
    }
    return {"summary": summary, "line": summary_line(summary), "categories": category_table(rows), "samples": rows}


def _csv(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    return buf.getvalue()


def write_report(out: str | Path, report: dict, cfg: DictConfig | None = None) -> Path:
    out = Path(out)
    doc = {"summary": report["summary"], "line": report["line"], "categories": report["categories"],
           "samples": report["samples"]}
    if cfg is not None:
        doc["config"] = to_container(cfg)
    save_json(out / "evaluation.json", doc)
    save_text(out / "evaluation_samples.csv", _csv(report["samples"], SAMPLE_COLUMNS))
    overall = {"category": "all", "n_samples": report["summary"]["n_samples"],
               "n_evaluated": report["summary"]["counts"]["ok"], "n_pairs": report["summary"]["n_pairs"],
               "mean_distance": report["summary"]["mean_distance"], "image_fidelity": report["summary"]["image_fidelity"]}
    save_text(out / "evaluation_categories.csv", _csv(report["categories"] + [overall], CATEGORY_COLUMNS))
    return out


# ----------------------------------------------------------------------------------------------- Lightning

def build_mean_distance(cfg: DictConfig) -> MeanDistance:
    """The Mean Distance metric with its DIFT model loaded on the CPU in the policy's weight dtype; Lightning
    places it on each process's device once (the evaluation Trainer owns it)."""
    m = cfg.mean_distance
    policy = DevicePolicy.from_config(cfg)
    backbone = load_backbone(cfg.model, DevicePolicy(torch.device("cpu"), policy.precision, policy.weight_dtype))
    return MeanDistance(backbone=backbone, t=m.t, up_block=m.up_block, ensemble_size=m.ensemble_size, width=m.width,
                        search=m.search, normalize=m.normalize, seed=m.seed, chunk_rows=m.chunk_rows)


class EvaluationModule(L.LightningModule):
    """Thin: reads its shard of the samples, updates the two metrics, gathers the per-sample rows."""

    def __init__(self, cfg: DictConfig, entries: list[tuple[str, str]], mean_distance: MeanDistance | None = None,
                 image_fidelity: ImageFidelity | None = None):
        super().__init__()
        self.cfg, self.entries = cfg, list(entries)
        if image_fidelity is None and cfg.image_fidelity.enabled:  # first: it fails fast where LPIPS is missing
            image_fidelity = ImageFidelity(net_type=cfg.image_fidelity.net, size=cfg.image_fidelity.size)
        self.image_fidelity = image_fidelity
        self.mean_distance = mean_distance if mean_distance is not None else build_mean_distance(cfg)
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
            self.mean_distance.update(s.image, edited, s.handles, s.targets, s.prompt, s.name, s.mask)
            last = self.mean_distance.last
            row["pairs"] = [{"handle": list(map(float, h)), "target": list(map(float, t)), "match": m.tolist(),
                             "distance": float(d)} for h, t, m, d in zip(s.handles, s.targets, last["matches"],
                                                                           last["distances"])]
            row["mean_distance"] = float(last["distances"].mean())
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
            md = self.mean_distance.compute()
            fid = self.image_fidelity.compute() if self.image_fidelity is not None else None
        self.report = make_report(rows, md, fid, self.cfg)


def log_report(logger, report: dict) -> None:
    """The summary and per-category figures as metrics, the per-sample rows as a table (rank 0 only)."""
    if not logger:
        return
    s = report["summary"]
    metrics = {"eval/n_pairs": s["n_pairs"], "eval/n_evaluated": s["counts"]["ok"]}
    for key in ("mean_distance", "image_fidelity"):
        if s[key] is not None:
            metrics[f"eval/{key}"] = s[key]
        for c in report["categories"]:
            if c[key] is not None:
                metrics[f"eval/{c['category'] or 'uncategorized'}/{key}"] = c[key]
    logger.log_metrics(metrics, step=0)
    log_table(logger, "eval/samples", list(SAMPLE_COLUMNS), [[r[k] for k in SAMPLE_COLUMNS] for r in report["samples"]])


def evaluate(cfg: DictConfig, mean_distance: MeanDistance | None = None,
             image_fidelity: ImageFidelity | None = None) -> dict:
    """Evaluate ``cfg.results`` against ``cfg.data``; returns the report on every process (rank 0 writes it).

    ``mean_distance`` / ``image_fidelity``: metric instances to use instead of building them from the config
    (for example an ImageFidelity with another distance network)."""
    for key in ("results", "data"):
        if not cfg[key]:
            raise ConfigError(f"{key}=DIR is required (results: the edited images, data: the dataset)")
    if not Path(cfg.results).is_dir():
        raise ConfigError(f"results={cfg.results}: folder not found")
    check_writable(cfg.out or cfg.results, "out" if cfg.out else "results")  # the tables go there
    data = Path(cfg.data)
    folders = find_samples(data)
    if not folders:
        raise ConfigError(f"data={cfg.data}: no samples found (expected <category>/<sample>/meta_data.pkl or "
                          "<sample>/drag.json)")
    entries = [(f.relative_to(data).as_posix(), str(f)) for f in folders]
    tic = time.perf_counter()
    module = EvaluationModule(cfg, entries, mean_distance, image_fidelity)
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
        write_report(cfg.out or cfg.results, report, cfg)
        log_report(logger, report)
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
    say(f"tables: {Path(cfg.out or cfg.results) / 'evaluation_samples.csv'}, evaluation_categories.csv, "
        "evaluation.json")
    return exit_status(report)
