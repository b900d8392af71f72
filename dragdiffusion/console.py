"""Console output: quiet mode for scripts (Lightning's info lines, model-loading progress bars)."""
from __future__ import annotations

import logging

import diffusers.utils.logging as diffusers_logging
import transformers.utils.logging as transformers_logging
from lightning.pytorch.callbacks import TQDMProgressBar


def quiet_lightning(quiet: bool) -> None:
    """In quiet mode, drop Lightning's info lines ("GPU available: ...", tips) and the model-loading progress bars
    of diffusers and transformers; warnings and errors stay."""
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


class StageProgressBar(TQDMProgressBar):
    """A progress bar labelled with its stage ("LoRA", "drag") and counted in steps, not epochs; a drag that stops
    early says so instead of ending at, say, 24/40."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(self.stage)

    def on_train_end(self, trainer, pl_module):
        if getattr(pl_module, "reached", False) and self.train_progress_bar is not None:
            self.train_progress_bar.set_description(
                f"{self.stage}: stopped early at iteration {pl_module.stop_step} (every handle reached its target)")
            self.train_progress_bar.refresh()
        super().on_train_end(trainer, pl_module)
