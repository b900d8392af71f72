"""The browser app's engine, without any UI: configs from the page's settings, the device jobs (edit, generate),
the job runner (one device job at a time, progress, cancel) and the downloadable outputs.

``app.py`` lays out the page and wires its events to these functions; scripts and tests (and
``benchmarks/gpu_check.py``) call them directly, without a browser or Gradio:

    cfg = page_config(None, ["model=tiny"], None, settings_changes(width=128, ...))
    result = run_to_end(edit_job(cfg, image, points, mask, "a cat"))
    png, zip_file = save_outputs(result, cfg)
"""
from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .callbacks import ProgressReporter
from .config import load_config, method_names, split_method_name, to_yaml, validate_config
from .editor import DragEditor, EditResult
from .errors import ConfigError
from .generated import GeneratedImage
from .sample import make_sample

CONFIG_MODEL = "as configured"  # the model preset choice that keeps the launch config's model

Job = Callable[[Callable, Callable[[], bool]], object]  # job(report, should_cancel) -> value


def settings_changes(width, seed, lora_on, lora_steps, n_pix_step, lam, strength, lr, blocks, drag_steps=None,
                     rounds=None, max_step=None) -> dict:
    """The config changes of the page's Settings panel; an empty or bad field is a ConfigError. ``drag_steps`` and
    ``rounds`` (GoodDrag: ``gooddrag.drag_end_step``, ``gooddrag.track_per_step``) and ``max_step`` (FreeDrag:
    ``freedrag.max_step``) are the drag budgets of the methods that do not count ``drag.n_pix_step``."""
    try:
        changes = {
            "seed": int(seed), "quiet": True,
            "lora": {"enabled": bool(lora_on), "steps": int(lora_steps)},
            "drag": {"width": int(width), "n_pix_step": int(n_pix_step), "lam": float(lam),
                     "inversion_strength": float(strength), "lr": float(lr),
                     "feature_blocks": sorted(int(b) for b in blocks or [])},
        }
        if drag_steps is not None or rounds is not None:
            changes["gooddrag"] = {k: int(v) for k, v in (("drag_end_step", drag_steps), ("track_per_step", rounds))
                                   if v is not None}
        if max_step is not None:
            changes["freedrag"] = {"max_step": int(max_step)}
        return changes
    except (TypeError, ValueError):
        raise ConfigError("settings: every field needs a number (one is empty)") from None


# the Settings fields of each method's drag budget (the other fields are every method's); a method not listed
# (FastDrag: no optimizer) shows none of them
BUDGET_FIELDS = {"dragdiffusion": ("n_pix_step",), "dragnoise": ("n_pix_step",),
                 "gooddrag": ("drag_steps", "rounds"), "freedrag": ("max_step",)}
ALL_BUDGET_FIELDS = ("n_pix_step", "drag_steps", "rounds", "max_step")


def budget_fields(method: str) -> tuple[str, ...]:
    """The drag budget fields of a method name (``gooddrag+text``: GoodDrag's)."""
    return BUDGET_FIELDS.get(split_method_name(str(method))[0], ())


def method_settings(base_path, base_overrides, method: str) -> dict:
    """The page's Settings fields that a method preset sets, with that method's values (its drag budget fields:
    ``budget_fields``; FastDrag turns the LoRA off)."""
    cfg = load_config(base_path, list(base_overrides) + [f"method={method}"])
    return {"lora_on": bool(cfg.lora.enabled), "lora_steps": int(cfg.lora.steps),
            "n_pix_step": int(cfg.drag.n_pix_step), "lam": float(cfg.drag.lam),
            "strength": float(cfg.drag.inversion_strength), "lr": float(cfg.drag.lr),
            "drag_steps": int(cfg.gooddrag.drag_end_step), "rounds": int(cfg.gooddrag.track_per_step),
            "max_step": int(cfg.freedrag.max_step)}


def timing_line(seconds: dict) -> str:
    """"in 1.4 s (inversion 0.3 s, drag 0.01 s, denoise 0.3 s)": an edit's time by stage (stages that ran)."""
    parts = [f"{k} {v:.2f} s" for k, v in seconds.items() if v >= 0.005]
    return f"in {sum(seconds.values()):.1f} s ({', '.join(parts)})"


def model_settings(base_path, base_overrides, model: str) -> dict:
    """The page's Settings fields that a model preset sets (its backbone's working width and feature blocks; SDXL:
    1024 and [1]), with that preset's values (the launch config's for CONFIG_MODEL)."""
    cfg = load_config(base_path, list(base_overrides) + ([f"model={model}"] if model and model != CONFIG_MODEL else []))
    return {"width": int(cfg.drag.width), "blocks": sorted(int(b) for b in cfg.drag.feature_blocks)}


def page_config(base_path, base_overrides, model: str | None, changes: dict, method: str | None = None) -> DictConfig:
    """The launch config + a model preset + a method preset + the page's changes (validated; errors name the
    key)."""
    overrides = list(base_overrides) + ([f"model={model}"] if model and model != CONFIG_MODEL else [])
    overrides += [f"method={method}"] if method else []
    cfg = load_config(base_path, overrides)
    try:
        cfg = OmegaConf.merge(cfg, changes)
    except Exception as exc:  # an OmegaConf type error: name the key
        raise ConfigError(f"settings: {str(exc).splitlines()[0]}") from None
    validate_config(cfg)
    return cfg


class EditorCache:
    """One loaded backbone (by its model config and device policy), shared by the editors of the page's jobs."""

    def __init__(self):
        self.key: str | None = None
        self.editor: DragEditor | None = None

    def editor_for(self, cfg: DictConfig) -> DragEditor:
        key = to_yaml(cfg.model) + to_yaml(cfg.trainer)
        if key != self.key:
            self.key, self.editor = None, None  # drop the old model before loading the next
            self.editor = DragEditor(cfg)
            self.editor.backbone  # load now, inside the job
            self.key = key
        return DragEditor(cfg, backbone=self.editor.backbone, policy=self.editor.policy)


EDITORS = EditorCache()


def edit_job(cfg: DictConfig, image: np.ndarray, points, mask, prompt: str,
             generated: GeneratedImage | None = None, editors: EditorCache = EDITORS) -> Job:
    """The device job of *Run*: drag ``image`` (or the ``generated`` image, without inversion) by ``points``
    (pixels of the image, alternating handle, target) inside ``mask`` (H x W, 1 = may change, or None).
    Reports every stage's steps as the console counts them (``ProgressReporter``: "LoRA", "inversion", "drag" or
    "drag step 2/7 (t=721)" with the handles in image pixels, "denoise", "decode") as it goes."""
    sample = make_sample(image, points, mask, generated.prompt if generated is not None else prompt, "edit")

    def job(report, should_cancel):
        editor = editors.editor_for(cfg)
        progress = ProgressReporter(report, (sample.height, sample.width), should_cancel)
        if generated is not None:
            return editor.edit_generated(generated, sample.points, sample.mask, callbacks=[progress])
        return editor.edit(sample, callbacks=[progress], lora_callbacks=[progress])
    return job


def reuse_note(trajectory: dict) -> str:
    """What an edit reused instead of computing, for the page's status line ("" when nothing):
    "; reused the identity LoRA of this image (0.04 s) and its inversion"."""
    sources, seconds = trajectory.get("sources", {}), trajectory.get("seconds", {})
    parts = []
    if sources.get("lora") == "reused":
        parts.append(f"the identity LoRA of this image ({seconds.get('lora', 0.0):.2f} s)")
    if sources.get("inversion") == "reused":
        parts.append("its inversion" if parts else "the inversion of this image")
    return "; reused " + " and ".join(parts) if parts else ""


def generate_job(cfg: DictConfig, editors: EditorCache = EDITORS) -> Job:
    """The device job of *Generate*: sample ``cfg.prompt`` with ``cfg.generation``."""
    return lambda report, should_cancel: editors.editor_for(cfg).generate(cfg.prompt)


def save_outputs(result: EditResult, cfg: DictConfig) -> tuple[Path, Path]:
    """(dragged_image.png, replay zip) in a new temporary folder: the result and the edit as a sample folder
    that ``python edit.py --config DIR/config.yaml sample=DIR`` runs again to the same image."""
    out = Path(tempfile.mkdtemp(prefix="dragdiffusion-app-"))
    result.save(out / "result", cfg)
    replay = result.save_replay(out / "replay" / "drag_edit", cfg)
    archive = shutil.make_archive(str(out / "drag_edit"), "zip", root_dir=replay.parent, base_dir=replay.name)
    return out / "result" / "dragged_image.png", Path(archive)


@dataclass
class JobRunner:
    """Runs device jobs in a worker thread, one at a time (a lock held also while a cancelled job winds down),
    with a cancel flag per page session."""
    device_lock: threading.Lock = field(default_factory=threading.Lock)
    cancels: dict[str, threading.Event] = field(default_factory=dict)

    def run(self, job: Job, session: str = "local") -> Iterator:
        """Yield the job's progress reports (the latest only, when several wait); return its value or raise its
        error. Closing the generator early (the page went away) cancels the job at its next step."""
        cancel = threading.Event()
        self.cancels[session] = cancel
        updates: queue.Queue = queue.Queue()

        def worker():
            try:
                with self.device_lock:
                    updates.put(("done", job(lambda *a: updates.put(("progress", a)), cancel.is_set)))
            except BaseException as exc:  # handed to the caller
                updates.put(("error", exc))

        threading.Thread(target=worker, daemon=True).start()
        finished = False
        try:
            while True:
                kind, payload = updates.get()
                while kind == "progress" and not updates.empty():
                    kind, payload = updates.get()
                if kind == "progress":
                    yield payload
                    continue
                finished = True
                if kind == "error":
                    raise payload
                return payload
        finally:
            if not finished:
                cancel.set()
            if self.cancels.get(session) is cancel:
                del self.cancels[session]

    def cancel(self, session: str = "local") -> bool:
        event = self.cancels.get(session)
        if event is None:
            return False
        event.set()
        return True


RUNNER = JobRunner()


def run_to_end(job: Job, runner: JobRunner = RUNNER, session: str = "local", on_progress=None):
    """Run a job through the runner and wait for its value (``on_progress(report)`` sees each report)."""
    jobs = runner.run(job, session)
    while True:
        try:
            report = next(jobs)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(report)
