"""Experiment tracking: a Lightning logger from the ``logger`` config section, and what the stages log to it.

- ``make_logger(cfg.logger, config=cfg)``: WandbLogger (online / offline / disabled), TensorBoardLogger,
  CSVLogger, or ``False`` for ``logger.name=none`` (what ``Trainer(logger=...)`` expects); the resolved
  config is logged as hyperparameters. ``close_logger`` finishes the run.
- ``TrajectoryLogger``: a callback of the drag Trainer: each handle's distance to its target in input pixels
  per step, and every ``image_every`` steps (and at the end) an image of the handles' paths.
- ``log_edit_result``: the before/after pair and the trajectory table of one finished edit.
- ``log_lora_artifact``, ``lora_callbacks``: the LoRA file as a W&B artifact; the learning rate per step.
- ``edit_media`` + ``log_batch_results``: a batch run's table of every sample and per-sample curves.

Images go to W&B / TensorBoard as images; a logger without image support (CSV) gets PNG files in its log
dir, and tables become CSV files there. Every function is a no-op for ``logger=False`` and off rank 0.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from PIL import Image

from .ddim import predict_eps_x0
from .config import to_container
from .errors import ConfigError
from .images import resize_uint8, thumbnail, to_uint8
from .io import save_png, save_text
from .geometry import grid_to_pixels
from .sample import DragSample, draw_drag

TRAJECTORY_COLUMNS = ["step", "handle", "x", "y", "target_x", "target_y", "distance_px", "motion_loss",
                      "mask_loss", "loss"]
BATCH_COLUMNS = ["sample", "before", "after", "status", "iterations", "final_distance_px", "seconds", "error"]


# ------------------------------------------------------------------------------------------- the logger

def make_logger(cfg: DictConfig, config: DictConfig | None = None, quiet: bool = False,
                run_name: str | None = None) -> Logger | bool:
    """The Lightning logger named by ``cfg.name`` (a ``logger`` config section), or False for ``none``.

    ``config`` (the whole resolved config) is logged as hyperparameters. ``run_name``: the run's name (CSV /
    TensorBoard: version folder) when ``cfg.run_name`` is not set. ``quiet``: no W&B console output.
    """
    name = cfg.name
    run_name = cfg.run_name or run_name
    if name == "none":
        return False
    save_dir = Path(cfg.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if name == "wandb":
        import wandb
        settings = wandb.Settings(silent=bool(quiet), x_save_requirements=False)
        logger = WandbLogger(name=run_name, project=cfg.project, save_dir=str(save_dir), entity=cfg.entity,
                             tags=list(cfg.tags) or None, mode=str(cfg.mode), settings=settings)
    elif name == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package: run `pip install tensorboard` "
                              "(or `pip install -e .[test]`), or choose logger=csv, wandb or none")
        logger = TensorBoardLogger(str(save_dir), name=cfg.project, version=run_name, default_hp_metric=False)
    elif name == "csv":
        logger = CSVLogger(str(save_dir), name=cfg.project, version=run_name)
    else:
        raise ConfigError(f"config key 'logger.name' = {name!r}: expected one of none, wandb, tensorboard, csv")
    if config is not None:
        logger.log_hyperparams(to_container(config))
    if isinstance(logger, WandbLogger):
        # each stage its own x axis: the LoRA's and the drag's Trainers both count global_step from 0
        run = logger.experiment
        for stage, also in (("lora", ("lr-*",)), ("drag", ())):
            run.define_metric(f"{stage}/step")
            for pattern in (f"{stage}/*",) + also:
                run.define_metric(pattern, step_metric=f"{stage}/step")
    return logger


@rank_zero_only
def close_logger(logger: Logger | bool, failed: bool = False) -> None:
    """Finish the run: W&B writes its summary (an offline run can then be synced); others flush files."""
    if not logger:
        return
    if isinstance(logger, WandbLogger):
        logger.experiment.finish(exit_code=1 if failed else 0)
    else:
        logger.finalize("failed" if failed else "success")


def log_dir(logger: Logger) -> Path:
    """Where PNGs and CSV tables go for a logger without image/table support."""
    return Path(getattr(logger, "log_dir", None) or logger.save_dir or ".")


# ------------------------------------------------------------------------------------------- media

def _file_key(key: str) -> str:
    return key.replace("/", "-")


@rank_zero_only
def log_images(logger: Logger | bool, key: str, images: Sequence, step: int | None = None,
               captions: Sequence[str] | None = None) -> list[Path]:
    """Log uint8 H x W x 3 arrays or PIL images; PNG files in the log dir when the logger has no images."""
    if not logger:
        return []
    images = [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)) for img in images]
    if isinstance(logger, WandbLogger):
        logger.log_image(key, images, step=step, **({"caption": list(captions)} if captions else {}))
        return []
    if isinstance(logger, TensorBoardLogger):
        for i, img in enumerate(images):
            tag = f"{key}/{captions[i]}" if captions else (key if len(images) == 1 else f"{key}/{i}")
            logger.experiment.add_image(tag, np.asarray(img), step or 0, dataformats="HWC")
        return []
    out = []
    for i, img in enumerate(images):
        suffix = f"_{captions[i]}" if captions else ("" if len(images) == 1 else f"_{i}")
        name = f"{_file_key(key)}{suffix}" + (f"_step{step:05d}" if step is not None else "") + ".png"
        out.append(save_png(log_dir(logger) / "images" / name, img))
    return out


@rank_zero_only
def log_table(logger: Logger | bool, key: str, columns: list[str], rows: list[list], step: int | None = None):
    """A W&B Table (image cells: PIL images); for other loggers a CSV file (image cells -> PNG paths)."""
    if not logger:
        return None
    if isinstance(logger, WandbLogger):
        import wandb
        data = [[wandb.Image(c) if isinstance(c, Image.Image) else c for c in row] for row in rows]
        logger.log_table(key, columns=columns, data=data, step=step)
        return None
    folder = log_dir(logger)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r, row in enumerate(rows):
        cells = []
        for c, cell in zip(columns, row):
            if isinstance(cell, Image.Image):
                cell = save_png(folder / "images" / f"{_file_key(key)}_{r:04d}_{c}.png", cell).relative_to(folder)
            cells.append(cell)
        writer.writerow(cells)
    return save_text(folder / f"{_file_key(key)}.csv", buf.getvalue())


# ------------------------------------------------------------------------------------------- drag

def trajectory_image(background: np.ndarray, handles_px: list, targets_px: list) -> Image.Image:
    """The image with each handle's path (yellow) from start to current position, current handles (red)
    and targets (blue). ``handles_px[i][k]`` = handle k at step i, pixels (x, y) of ``background``."""
    paths = np.asarray(handles_px, dtype=np.float64).transpose(1, 0, 2) if len(handles_px) else None
    current = handles_px[-1] if len(handles_px) else []
    return draw_drag(background, current, targets_px, None, paths)


class TrajectoryLogger(L.Callback):
    """Logs the drag of a ``DragEditModule`` to the Trainer's logger.

    Per step: ``drag/distance_px_k``, handle k's distance to its target in input pixels. Every
    ``image_every`` steps and at the end: ``drag/trajectory``, the paths drawn on the input image, or on
    the decoded x0 estimate of the current latent when ``decode`` (latent -> image in [0, 1]) is given.
    """

    def __init__(self, sample: DragSample, image_every: int = 10,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, key: str = "drag"):
        self.sample = sample
        self.image_every = int(image_every)
        self.decode = decode
        self.key = key

    def _pixels(self, module, handles_rc) -> list:
        hw = (self.sample.height, self.sample.width)
        return grid_to_pixels(torch.as_tensor(handles_rc, dtype=torch.float32).cpu(), hw, module.grid_hw).tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not pl_module.history["handles"]:
            return
        step = len(pl_module.history["handles"]) - 1
        handles = torch.tensor(self._pixels(pl_module, pl_module.history["handles"][-1]))
        distances = (handles - torch.tensor(self.sample.targets, dtype=torch.float32)).norm(dim=1)
        pl_module.log_dict({f"{self.key}/distance_px_{k}": float(d) for k, d in enumerate(distances)},
                           on_step=True, on_epoch=False)
        if self.image_every > 0 and step % self.image_every == 0:
            self.log_image(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        if pl_module.history["handles"]:
            self.log_image(trainer, pl_module, len(pl_module.history["handles"]) - 1)

    def background(self, module) -> np.ndarray:
        if self.decode is None:
            return self.sample.image
        with torch.no_grad():
            output, _ = module.eps_and_features(module.z_t, need_eps=True)  # noise or v: read by prediction type
            _, x0 = predict_eps_x0(module.scheduler, output, module.t, module.z_t)
            image = to_uint8(self.decode(x0))
        return resize_uint8(image, (self.sample.height, self.sample.width))

    def log_image(self, trainer, module, step: int) -> None:
        if not trainer.loggers:
            return  # (drawing costs; off rank 0 ``log_images`` does nothing)
        handles = [self._pixels(module, h) for h in module.history["handles"]]
        image = trajectory_image(self.background(module), handles, self.sample.targets)
        for logger in trainer.loggers:
            log_images(logger, f"{self.key}/trajectory", [image], step=step)


def trajectory_rows(trajectory: dict) -> list[list]:
    """One row per (step, handle) of a ``trajectory.json`` dict, in ``TRAJECTORY_COLUMNS`` order."""
    rows = []
    targets = trajectory["targets"]
    for step, handles in enumerate(trajectory["handles"]):
        losses = [trajectory[k][step] if step < len(trajectory[k]) else None
                  for k in ("motion_loss", "mask_loss", "loss")]
        for k, (x, y) in enumerate(handles):
            tx, ty = targets[k]
            rows.append([step, k, x, y, tx, ty, math.hypot(x - tx, y - ty), *losses])
    return rows


@rank_zero_only
def log_edit_result(logger: Logger | bool, result, key: str = "edit") -> None:
    """After an edit: the before/after pair, the trajectory table and the final numbers."""
    if not logger:
        return
    t = result.trajectory
    log_images(logger, f"{key}/before_after", [result.sample.image, result.image], captions=["before", "after"])
    log_table(logger, f"{key}/trajectory", TRAJECTORY_COLUMNS, trajectory_rows(t))
    finals = {f"{key}/iterations": t["iterations"], f"{key}/stopped_early": int(t["stopped_early"]),
              f"{key}/final_distance_px": float(np.mean(t["final_distance_px"]))}
    logger.log_metrics(finals, step=max(len(t["handles"]) - 1, 0))


# ------------------------------------------------------------------------------------------- LoRA

def lora_callbacks(logger: Logger | bool) -> list[L.Callback]:
    """Callbacks of the LoRA Trainer: the learning rate per step (``lr-<Optimizer>``) when a logger is set."""
    return [LearningRateMonitor(logging_interval="step")] if logger else []


@rank_zero_only
def log_lora_artifact(logger: Logger | bool, path: str | Path, name: str = "lora") -> None:
    """The final LoRA file (or folder) as a W&B artifact of type ``lora`` (kept in an offline run, synced
    later with ``wandb sync``). Other loggers keep only the path, as a hyperparameter."""
    if not logger:
        return
    path = Path(path)
    if isinstance(logger, WandbLogger):
        import wandb
        artifact = wandb.Artifact(_artifact_name(name), type="lora")
        (artifact.add_dir if path.is_dir() else artifact.add_file)(str(path))
        logger.experiment.log_artifact(artifact)
    else:
        logger.log_hyperparams({"lora_file": str(path)})


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


# ------------------------------------------------------------------------------------------- batch

def edit_media(result, thumb: int = 128) -> dict:
    """What the batch table and curves need of one finished edit, as small plain data (cheap to gather across
    processes): before/after thumbnails and the per-step loss and mean handle distance (input pixels)."""
    t = result.trajectory
    return {"before": thumbnail(result.sample.image, thumb), "after": thumbnail(result.image, thumb),
            "loss": list(t["loss"]), "distance_px": [float(np.mean(d)) for d in _distances(t)],
            "timestep": [int(v) for v in t.get("timestep", [])]}


def _distances(t: dict) -> list[list[float]]:
    return [[math.hypot(x - tx, y - ty) for (x, y), (tx, ty) in zip(hs, t["targets"])] for hs in t["handles"]]


def _section(name: str) -> str:
    """A sample id as one W&B panel section (a '/' would nest it)."""
    return name.replace("/", "-")


@rank_zero_only
def log_batch_results(logger: Logger | bool, rows: list[dict], media: dict[str, dict] | None = None,
                      key: str = "batch") -> None:
    """One table with every sample and per-sample curves, logged once by rank 0 after the run.

    ``rows``: one dict per sample with sample, status, iterations, final_distance_px, seconds (and error);
    ``media``: ``edit_media`` of the finished samples by name (thumbnails and curves; missing = none). Curves:
    ``<sample>/loss``, ``<sample>/distance_px`` and ``<sample>/timestep`` (the denoising timestep each drag
    iteration ran at: one value for DragDiffusion, GoodDrag's drag steps) against the drag step, one panel
    section per sample.
    """
    if not logger:
        return
    media = media or {}
    table = []
    for r in rows:
        m = media.get(r["sample"], {})
        images = [Image.fromarray(m[k]) if m.get(k) is not None else None for k in ("before", "after")]
        table.append([r["sample"], *images, r["status"], r.get("iterations"), r.get("final_distance_px"),
                      r.get("seconds"), r.get("error")])
    log_table(logger, f"{key}/samples", BATCH_COLUMNS, table)
    for name, m in media.items():
        section = _section(name)
        for step, dist in enumerate(m["distance_px"]):  # the early-stop step has a distance but no loss
            metrics = {f"{section}/distance_px": dist}
            if step < len(m.get("timestep", [])):
                metrics[f"{section}/timestep"] = float(m["timestep"][step])
            if step < len(m["loss"]):
                metrics[f"{section}/loss"] = m["loss"][step]
            logger.log_metrics(metrics, step=step)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    done = [r["final_distance_px"] for r in rows if r["status"] != "failed" and r.get("final_distance_px") is not None]
    logger.log_metrics({f"{key}/samples": len(rows), **{f"{key}/{s}": n for s, n in counts.items()},
                        f"{key}/mean_final_distance_px": float(np.mean(done)) if done else float("nan")})
