"""Batch runs over a dataset, split across devices and nodes by Lightning: ``edit.py data=DIR``.

  python edit.py data=DragBench out=outputs/dragbench trainer.devices=4            # 4 GPUs, one node
  srun python edit.py data=DragBench trainer.devices=4 trainer.num_nodes=2         # SLURM; torchrun works too

How it runs:
- Every sample is checked up front (``data.validate``) and the report printed before any model loads. A
  meta_data.pkl that would run code refuses the whole dataset (exit 2, nothing runs); an invalid sample is
  reported as failed and the others go on.
- An outer Trainer ``predict`` (strategy, cluster environment and launcher from ``trainer.*``: DDP on N
  devices, SLURM or torchrun) gives each process its share of the samples (``DragDataModule``: no padding,
  each sample once). ``predict_step`` runs the per-sample job (``DragEditor.edit``, which drives its own
  single-device Trainer). Predict never wraps the model in DistributedDataParallel and the per-sample drag
  module lives on one device, so no gradient is ever averaged across ranks.
- Outputs mirror the input tree: ``<out>/<category>/<sample>/`` (``EditResult.save``: atomic writes,
  dragged_image.png last). Rows of all ranks are gathered to rank 0, which writes ``<out>/summary.json`` and
  ``summary.csv`` (sample, status ok/failed/skipped, iterations, final distance and what it measures, seconds,
  error).
- Resume: a sample whose dragged_image.png and trajectory.json exist is skipped if its config.yaml has this run's
  result-shaping settings (model, drag, lora, reference, seed, precision); finished samples made with other
  settings refuse the run (naming the keys) unless ``overwrite=true`` redoes them. The rest are (re)done. A
  skipped sample's row keeps the figures of the run that made it (its row in the earlier summary.json, else its
  trajectory.json).
- SIGINT / SIGTERM stop the run at its next step; a sample's files are written whole or not at all, the summary
  lists what finished and one line says how many and that the same command resumes (exit status 130 / 143).
- A failing sample (bad data, non-finite loss, out of memory) is recorded and the run goes on; the exit
  status is 1 when any sample failed.
- A process that dies: every process records its rows on disk as it goes (``peers.RowLog``); the survivors
  finish their own samples, write the summary from all rows on disk and end with ``PeerLost`` (exit status 3).

One sample per ``predict_step`` (batch size 1): samples have different sizes and drag iterations, so a
shared forward pass over several samples is not done.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import time
import uuid
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .backbone import load_backbone
from .config import method_label
from .data.datamodule import DragDataModule
from .data.validate import check_dataset, format_report
from .errors import ConfigError, DragError, Interrupted, PeerLost, UnsafePickleError
from .io import save_json, save_text
from .loggers import close_logger, edit_media, log_batch_results, make_logger
from .editor import DragEditor
from .lora import WEIGHT_NAME as LORA_WEIGHTS
from .lora import train_lora_for_sample
from .outputs import EDIT_RESULT_KEYS, LORA_RESULT_KEYS, changed_settings, check_writable, saved_config
from .peers import RowLog, is_peer_loss, read_logs, wait_for_peers, watch_processes
from .policy import DevicePolicy, distributed_trainer
from .sample import ReadLimits
from .signals import deferred_signals

# final_distance_of: what final_distance_px measures for the sample's method (the method's final_distance_of:
# "tracked handles"; FreeDrag's and FastDrag's planned positions are not comparable with them); lora: how the
# sample got its identity LoRA
SUMMARY_FIELDS = ("sample", "status", "iterations", "final_distance_px", "final_distance_of", "seconds", "error",
                  "rank", "lora")
LORA_SOURCES = ("trained", "reused", "loaded")  # how a sample got its identity LoRA (summary counts; "off": none)


class NonFiniteResultError(DragError):
    """The drag loss or the edited latent became NaN or infinite."""


# ----------------------------------------------------------------------------------------------- small pieces

def edit_finished(folder: Path) -> bool:
    """A finished edit: dragged_image.png (written last) and trajectory.json are both there."""
    return (folder / "dragged_image.png").is_file() and (folder / "trajectory.json").is_file()


def remove_stale_temp_files(folder: Path) -> None:
    """Temporary files of atomic writes that a killed run left behind (io.atomic_write_bytes names)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def check_finite(trajectory: dict, z_edited: torch.Tensor | None) -> None:
    """Raise NonFiniteResultError when a drag loss or the edited latent is NaN/inf."""
    for i, loss in enumerate(trajectory.get("loss", [])):
        if not math.isfinite(loss):
            raise NonFiniteResultError(f"drag loss is {loss} at iteration {i}; try a smaller drag.lr or "
                                       "trainer.precision=32")
    if z_edited is not None and not bool(torch.isfinite(z_edited).all()):
        raise NonFiniteResultError("the edited latent holds NaN/inf values")


def find_lora(name: str, lora_dir: str | None) -> Path | None:
    """The LoRA of sample ``name`` in ``lora_dir`` (train.py data=... layout), used as given. (A previous run's
    ``<out>/<sample>/lora/`` and the cache are found by key in ``DragEditor.prepare_lora``.)"""
    if not lora_dir:
        return None
    candidates = [Path(lora_dir) / name / LORA_WEIGHTS, Path(lora_dir) / name / "lora" / LORA_WEIGHTS]
    return next((c for c in candidates if c.is_file()), None)


def mean_or_none(values) -> float | None:
    values = [float(v) for v in values or []]
    return sum(values) / len(values) if values else None


def row(name: str, status: str, iterations=None, distance=None, seconds=None, error=None, rank=None,
        distance_of=None, lora=None) -> dict:
    """One line of the summary; ``final_distance_px`` is the mean over the sample's handles (``distance_of``: what
    those handles are, the method's ``final_distance_of``), ``rank`` the process, ``lora`` how the sample got its
    identity LoRA (trained, reused, loaded, off)."""
    return {"sample": name, "status": status, "iterations": iterations, "final_distance_px": distance,
            "final_distance_of": distance_of, "seconds": None if seconds is None else round(float(seconds), 3),
            "error": error, "rank": rank, "lora": lora}


@rank_zero_only
def say(message: str) -> None:
    print(message, flush=True)


def earlier_rows(out_root: Path) -> dict[str, dict]:
    """The rows of the summary.json an earlier run wrote in ``out_root`` (finished samples only: ok or skipped), by
    sample; {} when there is none or it cannot be read."""
    try:
        rows = json.loads((out_root / "summary.json").read_text()).get("samples") or []
        return {r["sample"]: r for r in rows if isinstance(r, dict) and r.get("status") in ("ok", "skipped")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


# ----------------------------------------------------------------------------------------------- per-sample jobs

class Job:
    """What a batch does per sample; subclasses say what a finished sample is (``finished``) and run one (``run``).

    A finished sample counts as done only if the settings that shape its result (``result_keys``) are the ones it
    was made with (its saved config.yaml); ``redo`` holds finished samples to do again (``overwrite=true``)."""
    result_keys: tuple[str, ...] = ()

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out_root = Path(cfg.out)
        self.backbone = None
        self.policy: DevicePolicy | None = None
        self.redo: set[str] = set()
        self.rows: list[dict] = []  # this process's finished samples
        self.log: RowLog | None = None  # the same rows on disk (<out>/.rows/rank-<r>.json), set up by BatchModule
        self.earlier: dict[str, dict] = {}  # rows of an earlier run's summary (``earlier_rows``), for skipped samples

    def finished(self, name: str) -> bool:
        raise NotImplementedError

    def is_done(self, name: str) -> bool:
        return name not in self.redo and self.finished(name)

    def changed_settings(self, name: str) -> list[str]:
        """For a finished sample: the result-shaping settings it was made with that differ from this run's."""
        saved = saved_config(self.out_root / name)
        if saved is None:
            return ["config.yaml: missing or unreadable"]
        return changed_settings(saved, self.cfg, self.result_keys)

    def setup(self, device: torch.device) -> None:
        if self.backbone is None:
            self.policy = DevicePolicy.from_config(self.cfg, device)
            self.backbone = load_backbone(self.cfg.model, self.policy, quiet=bool(self.cfg.quiet))

    def finished_row(self, name: str) -> dict:
        """The row of a sample finished by an earlier run: ``skipped``, with that run's figures (its summary row;
        unknown figures stay empty)."""
        r = self.earlier.get(name, {})
        return row(name, "skipped", r.get("iterations"), r.get("final_distance_px"), r.get("seconds"),
                   rank=r.get("rank", 0))


class EditJob(Job):
    """One drag edit per sample with ``DragEditor.edit``; finished = dragged_image.png + trajectory.json."""
    result_keys = EDIT_RESULT_KEYS

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.media: dict[str, dict] = {}  # thumbnails + curves of this process's samples, for the logger's table

    def finished(self, name: str) -> bool:
        return edit_finished(self.out_root / name)

    def sample_config(self, name: str) -> DictConfig:
        """The run's config; in pipeline mode (lora.enabled) with the sample's LoRA in ``lora_dir``, that LoRA is
        loaded."""
        lora = find_lora(name, self.cfg.get("lora_dir")) if self.cfg.lora.enabled and \
            not self.cfg.lora.path and name not in self.redo else None
        return OmegaConf.merge(self.cfg, {"lora": {"path": str(lora)}}) if lora else self.cfg

    def run(self, sample, name: str) -> dict:
        out = self.out_root / name
        cfg = self.sample_config(name)
        editor = DragEditor(cfg, backbone=self.backbone, policy=self.policy)
        with torch.enable_grad():  # predict runs under no_grad; the drag optimization needs autograd
            result = editor.edit(sample, out_dir=out)
        check_finite(result.trajectory, result.z_edited)
        with deferred_signals():  # a sample's files are written whole or not at all
            remove_stale_temp_files(out)
            result.save(out, cfg)
        if cfg.logger.name != "none":
            self.media[name] = edit_media(result)
        t = result.trajectory
        return {"iterations": t["iterations"], "final_distance_px": mean_or_none(t["final_distance_px"]),
                "final_distance_of": t.get("final_distance_of"), "lora": editor.lora_stage.source}

    def finished_row(self, name: str) -> dict:
        """The row of a sample finished by an earlier run: its row in the earlier summary, else figures read back
        from its trajectory.json (seconds: the sum of its stages)."""
        if name in self.earlier:
            return super().finished_row(name)
        try:
            t = json.loads((self.out_root / name / "trajectory.json").read_text())
            seconds = sum(float(v) for v in (t.get("seconds") or {}).values()) or None
            return row(name, "skipped", t.get("iterations"), mean_or_none(t.get("final_distance_px")), seconds,
                       rank=0, distance_of=t.get("final_distance_of"))
        except (OSError, ValueError, TypeError, AttributeError):
            return super().finished_row(name)


class LoraJob(Job):
    """One identity LoRA per sample (``train.py data=DIR``): ``<out>/<sample>/pytorch_lora_weights.safetensors``."""
    result_keys = LORA_RESULT_KEYS

    def finished(self, name: str) -> bool:
        return (self.out_root / name / LORA_WEIGHTS).is_file()

    def run(self, sample, name: str) -> dict:
        with torch.enable_grad():
            # no run per sample: the job's one run (rank 0) gets the table of all samples
            cfg = OmegaConf.merge(self.cfg, {"logger": {"name": "none"}})
            train_lora_for_sample(cfg, sample, self.out_root / name, self.backbone, self.policy)
        return {}


def run_item(job, item: dict, rank: int = 0) -> dict:
    """Run ``job`` on one dataset item; any failure becomes a ``failed`` row instead of stopping the run."""
    tic = time.perf_counter()
    name = item["name"]
    if item["error"]:  # could not be read (it changed since validation)
        return row(name, "failed", seconds=0.0, error=item["error"], rank=rank)
    try:
        figures = job.run(item["sample"], name)
    except Exception as exc:  # noqa: BLE001 - isolate the sample: bad data, NaN, out of memory, ...
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        first_line = (str(exc).splitlines() or [""])[0]
        error = first_line if isinstance(exc, DragError) else f"{exc.__class__.__name__}: {first_line}"
        return row(name, "failed", seconds=time.perf_counter() - tic, error=error, rank=rank)
    return row(name, "ok", figures.get("iterations"), figures.get("final_distance_px"), time.perf_counter() - tic,
               rank=rank, distance_of=figures.get("final_distance_of"), lora=figures.get("lora"))


class BatchModule(L.LightningModule):
    """Thin: loads the job's model on this process's device, runs the job on each item of its shard."""

    def __init__(self, job):
        super().__init__()
        self.job = job  # not an nn.Module: nothing to broadcast, wrap or synchronize across ranks
        # fewer samples left than processes (a resumed run): a process with none just waits for the others
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def setup(self, stage: str) -> None:
        """Every process (also one with no sample to do) gets rank 0's run id and starts its row file."""
        run = self.trainer.strategy.broadcast(uuid.uuid4().hex if self.global_rank == 0 else None, src=0)
        pending = [n for n, _ in getattr(self.trainer.datamodule, "pending", [])]
        self.job.log = RowLog(self.job.out_root, self.global_rank, self.trainer.world_size, run, pending)

    def on_predict_start(self) -> None:
        self.job.setup(self.device)

    def predict_step(self, batch, batch_idx):
        rows = []
        for item in batch:
            r = run_item(self.job, item, self.global_rank)
            with deferred_signals():  # recorded before a signal can stop the run
                self.job.rows.append(r)  # what this process finished, also when the run is stopped by a signal
                if self.job.log is not None:
                    self.job.log.add([r])  # and on disk, for a process that dies
            rank = f"[rank {self.global_rank}] " if self.trainer.world_size > 1 else ""
            print(f"{rank}{r['sample']}: {r['status']}"
                  + (f" ({r['error']})" if r["error"] else "") + f" in {r['seconds']:.1f} s", flush=True)
            rows.append(r)
        die_for_test(self.global_rank, len(self.job.rows))
        return rows


def die_for_test(rank: int, finished: int) -> None:
    """Tests only: ``DRAGDIFFUSION_TEST_DIE_AFTER=RANK:COUNT`` SIGKILLs process RANK once it finished COUNT samples."""
    spec = os.environ.get("DRAGDIFFUSION_TEST_DIE_AFTER")
    if spec and spec.split(":") == [str(rank), str(finished)]:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------- the run

def make_batch_trainer(trainer_cfg, quiet: bool = False) -> L.Trainer:
    """The outer Trainer: only dispatches samples to processes (accelerator/devices/nodes/strategy from the config).

    It runs in 32-bit (``trainer.precision`` applies inside each sample's own Trainers) and with autograd on
    (the per-sample optimization runs inside ``predict_step``). Its progress bar counts samples (rank 0's): a
    ``StageProgressBar`` labelled "samples" (TQDM: the per-sample Trainers draw their bars inside it, and two Rich
    bars cannot nest)."""
    progress = bool(trainer_cfg.enable_progress_bar) and not quiet
    return watch_processes(distributed_trainer(  # a process that dies is reported by the others (peers.py)
        trainer_cfg, precision="32", quiet=quiet, stage="samples", inference_mode=False,
        use_distributed_sampler=False,  # DragDataModule shards unpadded: each sample once
        logger=False, enable_checkpointing=False, enable_progress_bar=progress))


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows on every rank (so rank 0 writes them all and every rank knows the exit status)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(rows)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(rows))
    return [r for part in parts for r in part]


def lora_counts(rows: list[dict]) -> dict[str, int]:
    """How many samples of this run trained, reused (cache, earlier run) or loaded (lora.path, lora_dir) a LoRA."""
    return {s: sum(r.get("lora") == s for r in rows) for s in LORA_SOURCES}


def write_summary(out_root: Path, rows: list[dict], info: dict) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    save_json(out_root / "summary.json", {**info, "counts": counts, "lora": lora_counts(rows), "samples": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r[k] is None else r[k]) for k in SUMMARY_FIELDS} for r in rows)
    save_text(out_root / "summary.csv", buf.getvalue())


def check_finished_samples(job: Job, names: list[str], overwrite: bool) -> None:
    """Finished samples made with other result-shaping settings: refused (a ConfigError naming the keys), or
    redone with ``overwrite=true``."""
    stale = {n: changes for n in names if job.finished(n) and (changes := job.changed_settings(n))}
    if not stale:
        return
    first, changes = next(iter(stale.items()))
    if not overwrite:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise ConfigError(f"out={job.out_root}: {len(stale)} finished sample(s) were made with other settings "
                          f"(e.g. {first}: {shown}); use a new out=, or overwrite=true to redo them")
    job.redo = set(stale)
    say(f"overwrite=true: redoing {len(stale)} finished sample(s) made with other settings")


def summarize(cfg: DictConfig, rows: list[dict], world_size: int, seconds: float, interrupted: int | None = None,
              not_run: int = 0):
    """Write summary.json / summary.csv, print the counts and the failures (rank 0); stopped by a signal, how many
    samples finished, how many did not run, and that the same command resumes."""
    rows.sort(key=lambda r: r["sample"])
    out = Path(cfg.out)
    info = {"data": str(cfg.data), "out": str(out), "world_size": world_size, "seconds": round(seconds, 3)}
    if "method" in cfg:  # edits (a LoRA-only batch has no method)
        info["method"] = method_label(cfg)
    if interrupted is not None:
        info["interrupted_by_signal"] = interrupted
    write_summary(out, rows, info)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    loras = lora_counts(rows)
    lora_line = f"; identity LoRAs: {', '.join(f'{n} {s}' for s, n in loras.items() if n)}" if any(loras.values()) \
        else ""
    if interrupted is not None:
        say(f"stopped by signal {interrupted}: {counts['ok'] + counts['skipped']} sample(s) finished ({counts['ok']} "
            f"in this run, {counts['skipped']} before), {counts['failed']} failed, {not_run} not run{lora_line}; "
            f"summary: {out / 'summary.csv'}. The same command resumes: finished samples are skipped.")
    else:
        say(f"{counts['ok']} done, {counts['skipped']} skipped (finished before), {counts['failed']} failed"
            f"{lora_line}; summary: {out / 'summary.csv'}")
    for r in rows:
        if r["status"] == "failed":
            print(f"failed: {r['sample']}: {r['error']}", file=sys.stderr)


def run_dataset(cfg: DictConfig, job: Job) -> int:
    """Validate, shard, run ``job`` per sample, write the summary; 0 all done, 1 some sample failed.

    Everything that can be checked is checked before any model loads: the device policy, ``out`` is writable, every
    sample reads (within ``limits``), finished samples were made with these settings. A SIGINT / SIGTERM stops the
    run at its next step; the summary then lists the samples that finished."""
    tic = time.perf_counter()
    DevicePolicy.from_config(cfg)  # precision, dtype and device are checked before anything runs
    check_writable(cfg.out)
    checks = check_dataset(cfg.data, ReadLimits.from_config(cfg))
    say(format_report(checks))
    unsafe = [c.name for c in checks if c.unsafe]
    if unsafe:
        raise UnsafePickleError(f"data={cfg.data}: refusing the dataset, {len(unsafe)} meta_data.pkl would run code "
                                f"when unpickled ({', '.join(unsafe)}); nothing was run")
    check_finished_samples(job, [c.name for c in checks if c.ok], bool(cfg.get("overwrite", False)))
    job.earlier = earlier_rows(job.out_root)  # the figures of samples an earlier run finished
    invalid = [row(c.name, "failed", seconds=0.0, error=c.error, rank=0) for c in checks if not c.ok]
    logger = make_logger(cfg.logger, config=cfg, quiet=cfg.quiet)  # one run per job: only rank 0 creates it
    trainer = make_batch_trainer(cfg.trainer, bool(cfg.quiet))
    datamodule = DragDataModule([(c.name, c.path) for c in checks if c.ok], job.is_done,
                                limits=ReadLimits.from_config(cfg))
    job.rows, job.log = [], None
    try:
        with warnings.catch_warnings():  # nothing left to do / one sample per step are expected here
            warnings.filterwarnings("ignore", ".*(Total length of `DataLoader` across ranks is zero|does not have "
                                              "many workers).*")
            predictions = trainer.predict(BatchModule(job), datamodule=datamodule) or []
    except Interrupted as stop:
        if trainer.is_global_zero:  # the finished samples of every process (their row files)
            logs = read_logs(job.out_root, job.log.run) if job.log is not None else {}
            logs[trainer.global_rank] = {"rows": job.rows}
            done = [r for rank in sorted(logs) for r in logs[rank]["rows"]]
            recorded = {r["sample"] for r in done}
            # written whole just before the signal came, not yet recorded: finished all the same
            done += [{**job.finished_row(n), "status": "ok"} for n, _ in datamodule.pending
                     if n not in recorded and job.finished(n)]
            summarize(cfg, done + invalid + [job.finished_row(n) for n in datamodule.skipped],
                      trainer.world_size, time.perf_counter() - tic, stop.signum,
                      not_run=max(0, len(datamodule.pending) - len(done)))
        close_logger(logger, failed=True)
        raise
    except RuntimeError as exc:  # a collective of the start failed: a process died before any sample
        if trainer.world_size == 1 or job.log is None or not is_peer_loss(exc):
            raise
        peers_lost(cfg, job, trainer, invalid, datamodule.skipped, [], f"({str(exc).splitlines()[0][:80]})", tic,
                   logger)
    lost, why = [], ""
    if trainer.world_size > 1 and job.log is not None:
        job.log.finish()  # this process's share is done; wait for the others' before the gather (peers.py)
        lost, why = wait_for_peers(job.log, float(cfg.trainer.timeout_s))
    try:
        if lost:
            raise PeerLost(why)
        rows = gather_rows([r for batch in predictions for r in batch]) + invalid
        media = {k: v for part in gather_rows([getattr(job, "media", {})]) for k, v in part.items()}
    except (PeerLost, RuntimeError) as exc:  # a process died (or died between its last sample and the gather)
        if not isinstance(exc, PeerLost) and not is_peer_loss(exc):
            raise
        peers_lost(cfg, job, trainer, invalid, datamodule.skipped, lost,
                   why or f"({str(exc).splitlines()[0][:80]})", tic, logger)
    if job.log is not None:
        job.log.remove()  # the summary lists the rows now
    if trainer.is_global_zero:
        for name in datamodule.skipped:
            say(f"{name}: skipped (finished before)")
            rows.append(job.finished_row(name))
        summarize(cfg, rows, trainer.world_size, time.perf_counter() - tic)
        log_batch_results(logger, rows, media)  # every rank's samples, gathered above
    close_logger(logger)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def peers_lost(cfg: DictConfig, job: Job, trainer, invalid: list[dict], skipped: list[str], lost: list[int],
               why: str, tic: float, logger) -> None:
    """A process of the job is gone: the first surviving process writes the summary from every process's rows on
    disk (``<out>/.rows``), each survivor says so in one sentence, and the run ends with exit status 3."""
    logs = read_logs(job.out_root, job.log.run)
    logs[job.log.rank] = {"rows": job.log.rows, "done": True}
    rows = [r for rank in sorted(logs) for r in logs[rank]["rows"]]
    finished = {r["sample"] for r in rows}
    not_finished = sorted(n for n in job.log.pending if n not in finished)
    lost = lost or sorted(r for r in range(trainer.world_size) if not logs.get(r, {}).get("done"))
    out = Path(cfg.out)
    survivors = [r for r in range(trainer.world_size) if r not in lost]
    if not survivors or job.log.rank == survivors[0]:
        rows = rows + invalid + [job.finished_row(n) for n in skipped]
        rows.sort(key=lambda r: r["sample"])
        info = {"data": str(cfg.data), "out": str(out), "world_size": trainer.world_size,
                "seconds": round(time.perf_counter() - tic, 3)}
        if "method" in cfg:
            info["method"] = method_label(cfg)
        write_summary(out, rows, {**info, "lost_ranks": lost, "lost_reason": why, "not_finished": not_finished})
    close_logger(logger, failed=True)
    who = (f"process rank {', '.join(map(str, lost))}" if lost else "a process") + " of this batch was lost"
    done, failed = (sum(r["status"] == s and r["sample"] in finished for r in rows) for s in ("ok", "failed"))
    raise PeerLost(f"{who} {why}: {done} sample(s) done, {failed} failed, {len(skipped)} finished before and "
                   f"{len(not_finished)} not run (summary: {out / 'summary.csv'}); run the same command again to "
                   "resume")


def run_batch(cfg: DictConfig) -> int:
    """``edit.py data=DIR``: drag-edit every sample of the dataset (pipeline mode with ``lora.enabled``)."""
    return run_dataset(cfg, EditJob(cfg))


def run_lora_batch(cfg: DictConfig) -> int:
    """``train.py data=DIR``: one identity LoRA per sample, sharded the same way."""
    return run_dataset(cfg, LoraJob(cfg))
