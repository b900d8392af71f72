"""Drag-editing evaluation as a Lightning validation run over a results folder: Mean Distance (MD) and its masked
variant (m-MD) from one set of DIFT features, Image Fidelity (IF) and the Drag Accuracy Index (DAI, no model).

``python -m dragdiffusion.evaluate`` (evaluate.py) is the command line; ``evaluate(cfg)`` the function. Each process
evaluates its shard of the samples (sorted, unpadded); the metrics sum exactly across processes; rank 0 writes
``evaluation.json``, ``evaluation_samples.csv``, ``evaluation_categories.csv`` and ``evaluation_methods.csv`` and
logs to the logger. The method of each result and its result-shaping settings are read from the
``<results>/<sample>/config.yaml`` an edit writes (no ``method`` key: an older DragDiffusion result). A results
folder holding one folder per method (``edit.py data=DIR methods=[...]``: ``<results>/<method>/<sample>/``) is
evaluated as a whole: every method's results in one run, reported per method.
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
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from .backbone import load_backbone
from .batch import gather_rows, say
from .config import (CONFIG_DIR, TEXT_SUFFIX, EvaluateConfig, load_config, method_label, split_method_name,
                     to_container)
from .data.datamodule import ShardSampler, as_list
from .data.readers import LAYOUTS_HELP, find_samples, read_sample
from .errors import ConfigError, DragError, ModelLoadError
from .io import save_json, save_text
from .loggers import close_logger, log_table, make_logger
from .images import as_image_tensor, resize_uint8
from .metrics import DragAccuracyIndex, ImageFidelity, MeanDistance
from .outputs import EDIT_RESULT_KEYS, IGNORED, check_writable, saved_config, setting
from .policy import DevicePolicy, distributed_trainer
from .sample import DEFAULT_LIMITS, ReadLimits, read_image

EVALUATE_YAML = CONFIG_DIR / "evaluate.yaml"
SAMPLE_COLUMNS = ("sample", "category", "method", "status", "n_pairs", "mean_distance", "masked_mean_distance",
                  "image_fidelity", "message")  # + dai_<gamma> before message (sample_columns)
CATEGORY_COLUMNS = ("category", "n_samples", "n_evaluated", "n_pairs", "mean_distance", "masked_mean_distance",
                    "image_fidelity")  # + dai_<gamma> (category_columns)
METRIC_KEYS = ("mean_distance", "masked_mean_distance", "image_fidelity")  # + dai_<gamma>
STATUSES = ("ok", "missing", "size_mismatch", "error")
DEFAULT_METHOD = "dragdiffusion"  # a result config.yaml without a method key: made before methods existed
UNKNOWN_METHOD = "unknown"  # no config.yaml beside the result (another code base's output)
# the settings that shape a result, read from each result's config.yaml and reported per method
METHOD_RESULT_KEYS = ("method",) + tuple(k for k in EDIT_RESULT_KEYS if k != "method")
_ABSENT = object()


def dai_key(gamma: int) -> str:
    return f"dai_{int(gamma)}"


def sample_columns(gammas=()) -> tuple[str, ...]:
    return SAMPLE_COLUMNS[:-1] + tuple(dai_key(g) for g in gammas) + SAMPLE_COLUMNS[-1:]


def category_columns(gammas=()) -> tuple[str, ...]:
    return CATEGORY_COLUMNS + tuple(dai_key(g) for g in gammas)


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


def new_row(name: str) -> dict:
    return {"sample": name, "category": category_of(name), "method": None, "status": "ok", "message": "",
            "n_pairs": None, "mean_distance": None, "masked_mean_distance": None, "image_fidelity": None,
            "size": None, "pairs": []}


def load_item(name: str, folder: str | Path, results: str | Path, result_name: str,
              resize_mismatched: bool = False, limits: ReadLimits = DEFAULT_LIMITS) -> dict:
    """{row, sample, edited}: the sample, its edited image, and a row whose status says what is wrong
    (missing: no output; size_mismatch: an output of another size; error: unreadable). Never raises DragError."""
    row = new_row(name)
    item = {"row": row, "sample": None, "edited": None}
    saved = saved_config(Path(results) / name)
    row["method"], row["settings"] = method_name(saved), result_settings(saved)  # settings: for the summary
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


def result_roots(results: Path) -> list[Path]:
    """Where the results of each sample are: ``results`` itself, or, when it holds one folder per method (a batch
    with ``methods=[...]``: ``<results>/<method>/<sample>/``), each of those method folders."""
    known = known_methods()
    per_method = sorted(p for p in results.iterdir() if p.is_dir() and split_method_name(p.name)[0] in known) \
        if results.is_dir() else []
    return per_method or [results]


# ----------------------------------------------------------------------------------------------- tables

def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def aggregate(rows: list[dict], gammas=()) -> dict:
    """The figures of a group of rows: status counts, samples, evaluated samples, pairs (of the evaluated ones),
    MD and m-MD (means over the pairs), IF and DAI at each gamma (means over the images)."""
    ok = [r for r in rows if r["status"] == "ok"]
    pairs = [p for r in ok for p in r["pairs"]]
    out = {"n_samples": len(rows), "n_evaluated": len(ok), "n_pairs": sum(r["n_pairs"] or 0 for r in ok),
           "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
           "mean_distance": _mean(p["distance"] for p in pairs if p.get("distance") is not None),
           "masked_mean_distance": _mean(p["masked_distance"] for p in pairs if p.get("masked_distance") is not None),
           "image_fidelity": _mean(r["image_fidelity"] for r in ok if r["image_fidelity"] is not None)}
    for g in gammas:
        out[dai_key(g)] = _mean(r[dai_key(g)] for r in ok if r.get(dai_key(g)) is not None)
    return out


def category_table(rows: list[dict], gammas=()) -> list[dict]:
    """Per category (sorted): samples, evaluated samples, pairs, MD / m-MD (means over the pairs), IF and DAI
    (means over the images)."""
    return [{"category": cat, **aggregate([r for r in rows if r["category"] == cat], gammas)}
            for cat in sorted({r["category"] for r in rows})]


def method_table(rows: list[dict], gammas=()) -> list[dict]:
    """Per method (sorted): the figures as ``aggregate``, ``settings`` = the result-shaping settings all its
    samples share (from their config.yaml) and ``varying`` = the setting keys whose values differ between them."""
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


def summary_line(summary: dict, label: str | None = None) -> str:
    """MD, m-MD, IF, DAI at each gamma, pairs, samples evaluated (and what was not), under the method's name."""
    unit = " px" if summary["distance_unit"] == "px" else " (of the diagonal)"
    gammas = list(summary.get("dai_gammas") or [])
    dai = "n/a"
    if gammas and any(summary.get(dai_key(g)) is not None for g in gammas):
        dai = "/".join(_figure(summary.get(dai_key(g)), ".4g") for g in gammas) + \
            f" (gamma {'/'.join(str(g) for g in gammas)})"
    if label is None:
        label = " + ".join(m["method"] for m in summary.get("methods") or []) or "results"
    counts = ", ".join(f"{summary['counts'][s]} {s}" for s in STATUSES[1:] if summary["counts"][s])
    return (f"{label}: MD {_figure(summary['mean_distance'], '.4g', unit)} | "
            f"m-MD {_figure(summary.get('masked_mean_distance'), '.4g', unit)} | "
            f"IF {_figure(summary['image_fidelity'], '.4f')} | DAI {dai} | {summary['n_pairs']} pairs | "
            f"{summary['counts']['ok']}/{summary['n_samples']} samples evaluated" + (f" ({counts})" if counts else ""))


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def make_report(rows: list[dict], mean_distance, image_fidelity, cfg: DictConfig, masked_mean_distance=None,
                dai: dict | None = None) -> dict:
    """The report: ``summary`` (overall figures from the metrics' exact sums; ``methods``: one entry per method
    with its settings and figures), ``line`` (+ ``method_lines`` when the results mix methods), ``categories``,
    ``samples``. ``dai``: {gamma: value} or None (DAI off)."""
    rows = sorted(rows, key=lambda r: r["sample"])
    gammas = [int(g) for g in dai] if dai is not None else []
    methods = method_table(rows, gammas)
    rows = [{k: v for k, v in r.items() if k != "settings"} for r in rows]
    summary = {
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
        "distance_unit": "px" if cfg.mean_distance.normalize == "none" else cfg.mean_distance.normalize,
    }
    report = {"summary": summary, "line": summary_line(summary), "method_lines": [],
              "categories": category_table(rows, gammas), "samples": rows}
    if len(methods) > 1:
        report["method_lines"] = [summary_line({**m, "distance_unit": summary["distance_unit"], "dai_gammas": gammas},
                                               m["method"]) for m in methods]
    return report


def _csv(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    return buf.getvalue()


def write_report(out: str | Path, report: dict, cfg: DictConfig | None = None) -> Path:
    """evaluation.json, evaluation_samples.csv, evaluation_categories.csv (with an ``all`` row) and
    evaluation_methods.csv (settings as JSON text) in ``out``."""
    out = Path(out)
    summary = report["summary"]
    gammas = summary.get("dai_gammas") or []
    doc = {"summary": summary, "line": report["line"], "method_lines": report.get("method_lines", []),
           "categories": report["categories"], "samples": report["samples"]}
    if cfg is not None:
        doc["config"] = to_container(cfg)
    save_json(out / "evaluation.json", doc)
    save_text(out / "evaluation_samples.csv", _csv(report["samples"], sample_columns(gammas)))
    overall = {**summary, "category": "all", "n_evaluated": summary["counts"]["ok"]}
    save_text(out / "evaluation_categories.csv", _csv(report["categories"] + [overall], category_columns(gammas)))
    methods = [{**m, "settings": json.dumps(m["settings"], sort_keys=True), "varying": " ".join(m["varying"])}
               for m in summary["methods"]]
    columns = ("method",) + category_columns(gammas)[1:] + ("varying", "settings")
    save_text(out / "evaluation_methods.csv", _csv(methods, columns))
    return out


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


def log_report(logger, report: dict) -> None:
    """The summary, per-category (and, when the results mix methods, per-method) figures as metrics, the
    per-sample rows as a table (rank 0 only)."""
    if not logger:
        return
    s = report["summary"]
    gammas = s.get("dai_gammas") or []
    metrics = {"eval/n_pairs": s["n_pairs"], "eval/n_evaluated": s["counts"]["ok"]}
    groups = [(c["category"] or "uncategorized", c) for c in report["categories"]]
    if len(s["methods"]) > 1:
        groups += [(f"method/{m['method']}", m) for m in s["methods"]]
    for key in METRIC_KEYS + tuple(dai_key(g) for g in gammas):
        if s.get(key) is not None:
            metrics[f"eval/{key}"] = s[key]
        for name, group in groups:
            if group.get(key) is not None:
                metrics[f"eval/{name}/{key}"] = group[key]
    logger.log_metrics(metrics, step=0)
    columns = sample_columns(gammas)
    log_table(logger, "eval/samples", list(columns), [[r.get(k) for k in columns] for r in report["samples"]])


def evaluate(cfg: DictConfig, mean_distance: MeanDistance | None = None,
             image_fidelity: ImageFidelity | None = None, dai: DragAccuracyIndex | None = None) -> dict:
    """Evaluate ``cfg.results`` against ``cfg.data``; returns the report on every process (rank 0 writes it).

    ``mean_distance`` / ``image_fidelity`` / ``dai``: metric instances to use instead of building them from the
    config (for example an ImageFidelity with another distance network)."""
    for key in ("results", "data"):
        if not cfg[key]:
            raise ConfigError(f"{key}=DIR is required (results: the edited images, data: the dataset)")
    given = (mean_distance, image_fidelity, dai)
    if not (cfg.mean_distance.enabled or cfg.image_fidelity.enabled or cfg.dai.enabled or
            any(m is not None for m in given)):
        raise ConfigError("mean_distance.enabled, image_fidelity.enabled and dai.enabled are all false: nothing "
                          "to evaluate")
    if not Path(cfg.results).is_dir():
        raise ConfigError(f"results={cfg.results}: folder not found")
    check_writable(cfg.out or cfg.results, "out" if cfg.out else "results")  # the tables go there
    data = Path(cfg.data)
    folders = find_samples(data)
    if not folders:
        raise ConfigError(f"data={cfg.data}: no samples found (expected sample folders holding {LAYOUTS_HELP})")
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
    for line in report.get("method_lines") or []:
        say(f"  {line}")
    say(f"tables: {Path(cfg.out or cfg.results) / 'evaluation_samples.csv'}, evaluation_categories.csv, "
        "evaluation_methods.csv, evaluation.json")
    return exit_status(report)
