"""The project's error types: one message that names the sample and the field, never a deep traceback."""


class DragError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(DragError):
    """A config key is unknown or a value has the wrong type or range."""


class SampleError(DragError):
    """A sample (image, points, mask, prompt) is not usable; the message names the sample and the field."""

    def __init__(self, field: str, message: str, sample: str | None = None):
        self.field = field
        self.sample = sample
        where = f"sample '{sample}': " if sample else ""
        super().__init__(f"{where}{field}: {message}")


class ModelLoadError(DragError):
    """A backbone, VAE or LoRA file could not be found or does not fit."""


class UnsafePickleError(DragError):
    """A pickle tried to load something other than plain data."""
