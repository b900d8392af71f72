"""Library messages that are never about the user's input or settings, dropped from every run (quiet or not).

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and the same for
  SiglipImageProcessor): printed when diffusers imports the pipelines; the PIL processors it falls back to are
  the ones this project uses, torchvision is optional here.
- Lightning: "`isinstance(treespec, LeafSpec)` is deprecated" (a FutureWarning from Lightning's own code on
  newer torch, once per Trainer), its "Tip: ... litlogger" advertisement (once per Trainer with a logger) and
  "`Trainer.fit` stopped: `max_steps=N` reached" (every LoRA stage: its bar ends at N/N; a drag that stops early
  ends its one epoch, "`max_epochs=1` reached", which console.py says better), its "GPU available: ..., used: ..."
  / "TPU available: ..." lines and "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]" (once per Trainer, 2-4 per edit;
  the device, precision and weights are said once, when the model loads: ``console.loading_line``).

Installed when the package is imported (before diffusers or transformers are), with the standard library only.
Real warnings (about the user's input, settings, devices) are untouched; ``console.quiet_lightning`` quiets
Lightning's info lines for ``quiet=true``.
"""
from __future__ import annotations

import logging
import re
import warnings

DROPPED = (
    ("transformers.utils.import_utils", re.compile(r"requires torchvision \(not installed\); falling back to")),
    ("lightning.pytorch.utilities.rank_zero", re.compile(r"Tip: For seamless cloud logging .*litlogger")),
    # every LoRA stage ends at its max_steps: the bar shows it (the drag's early stop is said by console.py)
    ("lightning.pytorch.utilities.rank_zero", re.compile(r"`Trainer.fit` stopped: `max_(steps|epochs)=\d+` reached")),
    # once per Trainer: the run's device is said once, when the model loads (console.loading_line)
    ("lightning.pytorch.utilities.rank_zero", re.compile(r"^(GPU|TPU|HPU|IPU) available: ")),
    ("lightning.pytorch.accelerators.cuda", re.compile(r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES")),
    ("lightning.fabric.utilities.rank_zero", re.compile(r"Tip: For seamless cloud logging .*litlogger")),
)
LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to drop
            return True


def drop_library_noise() -> None:
    """Install the filters (idempotent)."""
    for name, pattern in DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    warnings.filterwarnings("ignore", message=LEAFSPEC, category=FutureWarning)
