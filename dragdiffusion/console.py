"""Console output: quiet mode for scripts (Lightning's info lines, model-loading progress bars)."""
from __future__ import annotations

import logging

import diffusers.utils.logging as diffusers_logging
import transformers.utils.logging as transformers_logging


def quiet_lightning(quiet: bool) -> None:
    """In quiet mode, drop Lightning's info lines ("GPU available: ...", tips) and the model-loading progress bars
    of diffusers and transformers; warnings and errors stay."""
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
