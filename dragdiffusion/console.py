"""Console output: quiet mode for scripts (Lightning's info lines, model-loading progress bars)."""
from __future__ import annotations

import logging
import sys

import diffusers.utils.logging as diffusers_logging
import transformers.utils.logging as transformers_logging
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf


def quiet_lightning(quiet: bool) -> None:
    """In quiet mode, drop Lightning's info lines ("GPU available: ...", tips) and the model-loading progress bars
    of diffusers and transformers; warnings and errors stay."""
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


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
    """A progress bar labelled with its stage ("LoRA", "drag") and counted in steps, not epochs; a drag that stops
    early says so instead of ending at, say, 24/40."""

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

    def on_train_start(self, trainer, pl_module):
        pass  # the bar is made at the epoch start, with its stage and total: no empty "Training: 0/?" bar

    def on_train_epoch_start(self, trainer, pl_module):
        # Lightning's shows "Training: 0/?", then "Epoch 0: 0/N", then this bar's label: made once, labelled
        self.train_progress_bar = Tqdm(desc=self.stage, total=convert_inf(self.total_train_batches),
                                       position=2 * self.process_position, disable=self.is_disabled, leave=True,
                                       dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_end(self, trainer, pl_module):
        if getattr(pl_module, "reached", False) and self.train_progress_bar is not None:
            rule = stop_rule(float(getattr(getattr(pl_module, "drag", None), "stop_distance", 2.0)),
                             getattr(pl_module, "image_hw", None), getattr(pl_module, "grid_hw", None))
            self.train_progress_bar.set_description(
                f"{self.stage}: stopped early at iteration {pl_module.stop_step} ({rule})")
            self.train_progress_bar.refresh()
        super().on_train_end(trainer, pl_module)
