"""DragDiffusion point-based image editing as PyTorch Lightning modules."""
import logging

__version__ = "0.1.0"


def quiet_lightning(quiet: bool) -> None:
    """In quiet mode, drop Lightning's info lines ("GPU available: ...", tips) and the model-loading progress bars
    of diffusers and transformers; warnings and errors stay."""
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            import diffusers.utils.logging as diffusers_logging
            import transformers.utils.logging as transformers_logging
            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - both are dependencies
            pass
