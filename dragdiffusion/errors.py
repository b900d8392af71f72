"""The project's error types: one message that names the sample and the field, never a deep traceback.

Exit statuses of the command lines: 0 done, 1 a sample failed (``DragError``), 2 bad config or input
(``BadInput``: checked before any model loads where it can be), 3 a process of a multi-device batch was lost
(``PeerLost``: the finished samples are in the summary, the same command resumes), 128 + N stopped by signal N
(``Interrupted``: 130 for Ctrl-C, 143 for SIGTERM).
"""


class DragError(Exception):
    """Base class of every error this library raises on purpose."""


class BadInput(DragError):
    """The config or an input is wrong: fix the command, not the run (exit status 2)."""


class ConfigError(BadInput):
    """A config key is unknown or a value has the wrong type or range."""


class SampleError(BadInput):
    """A sample (image, points, mask, prompt) is not usable; the message names the sample and the field."""

    def __init__(self, field: str, message: str, sample: str | None = None):
        self.field = field
        self.sample = sample
        where = f"sample '{sample}': " if sample else ""
        super().__init__(f"{where}{field}: {message}")


class ModelLoadError(BadInput):
    """A backbone, VAE or LoRA file could not be found or does not fit."""


class UnsafePickleError(BadInput):
    """A pickle tried to load something other than plain data."""


class PeerLost(DragError):
    """A process of a multi-device batch died or stopped answering (exit status 3): the survivors wrote the summary
    of what finished; the same command again resumes."""

    exit_status = 3


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: the run stops at its next step (a BaseException, like KeyboardInterrupt, so that
    no per-sample ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by signal {self.signum}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def exit_status(exc: BaseException) -> int:
    """The command-line exit status of an error."""
    if isinstance(exc, (Interrupted, PeerLost)):
        return exc.exit_status
    return 2 if isinstance(exc, BadInput) else 1
