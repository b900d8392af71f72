"""Console output: a labelled progress bar for every stage on stderr, quiet mode for scripts, the early-stop rule.

Every stage that takes seconds has a labelled bar on stderr, so a redirected stdout holds the result lines only:
the model loading is one line (what loads, on which device, in which precision: ``loading_line``, in place of
Lightning's "GPU available" lines and the libraries' loading bars), then "LoRA", "inversion", "drag" (a method
that drags at several timesteps has one bar per drag step, "drag step 2/7 (t=721)", each counting to that step's
own budget), "denoise", "decode", and in a batch or an evaluation "samples". The Trainer stages use
``StageProgressBar`` (the LightningModule names its stage: ``stage_label``), the loops outside a Trainer
``StageProgress``. Both hand each step to the edit's listeners (the app's ``ProgressReporter``:
``stage_progress(label, step, total, handles)``), counted the same way as the bar.
"""
from __future__ import annotations

import logging
import sys

import diffusers.utils.logging as diffusers_logging
import transformers.utils.logging as transformers_logging
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

BAR_FORMAT = TQDMProgressBar.BAR_FORMAT


def quiet_lightning(quiet: bool) -> None:
    """In quiet mode, drop Lightning's info lines (tips, "LOCAL_RANK ...") and the model-loading progress bars of
    diffusers and transformers; warnings and errors stay."""
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        disable_library_bars()


def disable_library_bars() -> None:
    """diffusers' and transformers' model-loading bars off: nested, they leave cursor-up codes ("[A") in a log and
    say nothing a reader needs; ``loading_line`` says what loads."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def loading_line(name: str, where: str, enabled: bool = True) -> None:
    """The model-loading stage in one line on stderr: ``model: loading NAME (device cpu, precision 32, ...)``."""
    disable_library_bars()
    if enabled:
        print(f"model: loading {name} ({where})", file=sys.stderr, flush=True)


def stop_description(reason: str | None, rule: str) -> str:
    """Why a drag stopped early: the stop rule when the handles reached their targets (``reason`` "reached"),
    else the reason a callback gave ("no handle moved in 5 tracking rounds")."""
    return rule if reason in (None, "reached") else str(reason)


def drag_label(index: int, planned: int, t: int) -> str:
    """The stage label of a drag step: "drag" for a method that drags once, "drag step 2/7 (t=721)" for one that
    drags at ``planned`` denoising steps (``index`` 0-based)."""
    return "drag" if planned <= 1 else f"drag step {index + 1}/{planned} (t={int(t)})"


class StageProgress:
    """The progress of one stage outside a Trainer (inversion, denoising, decode, sampling): a labelled bar on
    stderr (when ``enabled``) and each step handed to ``listeners`` (``stage_progress(label, step, total, None)``).
    ``step`` takes any arguments, so it serves as a loop's per-step callback."""

    def __init__(self, label: str, total: int, enabled: bool = True, listeners=()):
        self.label, self.total, self.n = label, int(total), 0
        self.listeners = list(listeners)
        # position 0, as the Trainers' bars: inside a batch's "samples" bar tqdm would otherwise place it below and
        # move the cursor back up ("[A" codes in a log)
        self.bar = Tqdm(desc=label, total=self.total, disable=not enabled, leave=True, dynamic_ncols=True,
                        file=sys.stderr, smoothing=0, bar_format=BAR_FORMAT, position=0)

    def step(self, *_) -> None:
        self.n += 1
        self.bar.update(1)
        for listener in self.listeners:
            listener.stage_progress(self.label, self.n, self.total, None)

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def stop_rule(stop_distance: float, image_hw: tuple[int, int] | None = None,
              grid_hw: tuple[int, int] | None = None) -> str:
    """The early-stop rule as a reader can check it: handles are tracked on the supervision grid, so "reached"
    means within ``stop_distance`` grid cells, which at a small working width is many input pixels (a 512-px
    input on a 64-cell grid: 2 cells = 16 px). In input pixels when the sizes are known."""
    if not image_hw or not grid_hw:
        return f"every handle within {stop_distance:g} grid cells of its target"
    cell = max(image_hw[0] / max(grid_hw[0], 1), image_hw[1] / max(grid_hw[1], 1))
    px = stop_distance * cell
    return (f"every handle within {stop_distance:g} grid cells = {px:.0f} px of its target at this working size"
            if px >= 10 else f"every handle within {stop_distance:g} grid cells = {px:.1f} px of its target")


class StageProgressBar(TQDMProgressBar):
    """A progress bar on stderr labelled with its stage, counted in steps (not epochs), made once with its total
    (no empty "Training: 0/?" or "Predicting: 0/?" bar). Training: the LightningModule's ``stage_label`` ("LoRA",
    "drag step 2/7 (t=721)"; else ``stage``), the total is the fit's budget; a drag that stops early says so, with
    the iteration counted over the whole edit, and ends at the optimizer steps it took. Predict and validation (a
    batch's or an evaluation's samples): ``stage``."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    @property
    def train_description(self) -> str:
        return self.stage

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number is not a figure of the stage
        return metrics

    def bar(self, label: str, total) -> Tqdm:
        return Tqdm(desc=label, total=convert_inf(total), position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, pl_module):
        pass  # the bar is made at the epoch start, with its stage and total: no empty "Training: 0/?" bar

    def on_train_epoch_start(self, trainer, pl_module):
        # Lightning's shows "Training: 0/?", then "Epoch 0: 0/N", then this bar's label: made once, labelled
        self.stage = str(getattr(pl_module, "stage_label", None) or self.stage)
        self.train_progress_bar = self.bar(self.stage, self.total_train_batches)

    def on_train_end(self, trainer, pl_module):
        if getattr(pl_module, "reached", False) and self.train_progress_bar is not None:
            rule = stop_rule(float(getattr(getattr(pl_module, "drag", None), "stop_distance", 2.0)),
                             getattr(pl_module, "image_hw", None), getattr(pl_module, "grid_hw", None))
            iteration = int(getattr(pl_module, "step_offset", 0)) + int(pl_module.stop_step)
            why = stop_description(getattr(pl_module, "stop_reason", None), rule)
            self.train_progress_bar.set_description(f"{self.stage}: stopped early at iteration {iteration} ({why})")
            self.train_progress_bar.n = len(getattr(pl_module, "history", {}).get("loss", []))  # updates taken
            self.train_progress_bar.refresh()
        super().on_train_end(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module):
        pass  # made at the first sample: a run with nothing left to do shows no bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.has_dataloader_changed(dataloader_idx) and self._predict_progress_bar is None:
            self.predict_progress_bar = self.bar(self.stage, self.total_predict_batches_current_dataloader)

    def on_predict_end(self, trainer, pl_module):
        if self._predict_progress_bar is not None:
            self.predict_progress_bar.close()

    def on_validation_start(self, trainer, pl_module):
        pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.has_dataloader_changed(dataloader_idx) and self._val_progress_bar is None:
            self.val_progress_bar = self.bar(self.stage, self.total_val_batches_current_dataloader)

    def on_validation_end(self, trainer, pl_module):
        if self._val_progress_bar is not None:
            self.val_progress_bar.close()
