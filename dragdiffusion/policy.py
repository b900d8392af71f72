"""One device-and-precision policy for every stage, and the Lightning Trainers built from it.

``DevicePolicy.from_config(cfg)`` reads ``model.device``, ``model.dtype``, ``trainer.accelerator`` and
``trainer.precision`` once and decides:

- ``device``: where the backbone (UNet, VAE, text encoder) lives for the whole run. It is placed there once,
  when it is loaded, and no stage moves it afterwards.
- ``weight_dtype``: the dtype of the frozen weights. ``model.dtype=auto`` (the default) picks float16 for
  ``16-mixed`` and bfloat16 for ``bf16-mixed`` on a GPU, float32 otherwise (on the CPU half weights are slower).
- ``autocast_dtype``: the dtype of mixed precision (None for ``32``). Inside a Trainer (LoRA, drag) Lightning's
  precision plugin applies it; outside (inversion, denoising, generation) ``autocast()`` does, and only while
  the frozen weights are fp32: half weights already run in half, without a re-cast per op.
- ``grad_scaler``: ``16-mixed`` trains with a GradScaler (Lightning's), ``bf16-mixed`` and ``32`` without.

What always stays fp32: the drag's latent z_t (its optimizer works on fp32), the LoRA parameters, the DDIM
arithmetic and the losses.

``policy.trainer(...)`` is the one factory of single-device Trainers (the LoRA stage of an edit, the drag, a
per-sample job of a batch). ``distributed_trainer(...)`` builds the Trainers that spread work over processes
(batch dispatch, evaluation, ``train.py`` on several devices). Single-device Trainers use
``KeepOnDeviceStrategy``: Lightning's own teardown moves the LightningModule to the CPU after ``fit``, which
would carry the UNet (owned by the LoRA module) and the optimized latent off the GPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import OmegaConf

from .console import StageProgressBar, quiet_lightning
from .config import normalize_precision
from .errors import ConfigError

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def resolve_device(model_device: str = "auto", accelerator: str = "auto") -> torch.device:
    """The device of a run from ``model.device`` (auto | cpu | cuda | cuda:N) and ``trainer.accelerator``
    (auto | cpu | gpu | cuda); a ConfigError when they disagree or the GPU asked for is not there."""
    accelerator = str(accelerator)
    model_device = str(model_device)
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"config key 'trainer.accelerator' = {accelerator!r}: expected auto, cpu, gpu or cuda")
    if model_device == "auto":
        if accelerator == "cpu":
            return torch.device("cpu")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA GPU is visible to this process; "
                              "use trainer=cpu (or trainer.accelerator=auto)")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(model_device)
    except RuntimeError:
        raise ConfigError(f"config key 'model.device' = {model_device!r}: expected auto, cpu, cuda or cuda:N") from None
    if accelerator == "cpu" and device.type != "cpu" or accelerator in ("gpu", "cuda") and device.type != "cuda":
        raise ConfigError(f"model.device={model_device} disagrees with trainer.accelerator={accelerator}; "
                          "set one of them to auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={model_device}: no CUDA GPU is visible to this process")
    return device


def resolve_weight_dtype(dtype: str, precision: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` (auto | float32 | float16 | bfloat16) checked against the precision and the device."""
    dtype = str(dtype)
    if dtype == "auto":
        if device.type == "cuda" and precision in AUTOCAST_DTYPES:
            return AUTOCAST_DTYPES[precision]
        return torch.float32
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"config key 'model.dtype' = {dtype!r}: expected auto, float32, float16 or bfloat16")
    wanted = WEIGHT_DTYPES[dtype]
    if wanted != torch.float32:
        matching = {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}[wanted]
        if precision != matching:
            raise ConfigError(f"model.dtype={dtype} needs trainer.precision={matching} (the trainable parts stay "
                              f"fp32 under mixed precision); got trainer.precision={precision}")
        if device.type == "cpu" and wanted == torch.float16:
            raise ConfigError("model.dtype=float16 needs a GPU; on the CPU use float32 or bfloat16")
    return wanted


class KeepOnDeviceStrategy(SingleDeviceStrategy):
    """A single-device strategy whose teardown leaves the LightningModule (and the backbone it may own) where it
    is. Lightning's teardown moves the module to the CPU and empties the CUDA cache; the next stage would then
    find the UNet or the optimized latent on the CPU, and a batch would copy the backbone twice per sample."""

    strategy_name = "keep_on_device"

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.checkpoint_io.teardown()


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    precision: str  # one of PRECISIONS
    weight_dtype: torch.dtype

    @classmethod
    def from_config(cls, cfg, device: torch.device | str | None = None) -> "DevicePolicy":
        """From a config with ``model`` and ``trainer`` sections; ``device`` (a batch worker's) wins if given."""
        precision = normalize_precision(cfg.trainer.precision)
        if device is None:
            device = resolve_device(cfg.model.device, cfg.trainer.accelerator)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if precision == "16-mixed" and device.type == "cpu":
            raise ConfigError("trainer.precision=16-mixed (fp16 autocast) needs a GPU; on the CPU use "
                              "bf16-mixed or 32")
        return cls(device, precision, resolve_weight_dtype(cfg.model.dtype, precision, device))

    @classmethod
    def cpu(cls) -> "DevicePolicy":
        return cls(torch.device("cpu"), "32", torch.float32)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    @property
    def grad_scaler(self) -> bool:
        """Whether training steps use a GradScaler (fp16 gradients can underflow; Lightning's plugin owns it)."""
        return self.precision == "16-mixed"

    @property
    def lightning_precision(self) -> str:
        return "32-true" if self.precision == "32" else self.precision

    def autocast(self):
        """Autocast for forward passes outside a Trainer: only with fp32 frozen weights and mixed precision."""
        if self.autocast_dtype is None or self.weight_dtype != torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        return (f"device {self.device}, precision {self.precision}, weights {str(self.weight_dtype).split('.')[-1]}"
                f"{', GradScaler' if self.grad_scaler else ''}")

    def trainer(self, max_steps: int, callbacks=(), logger=False, quiet: bool = False, progress_bar: bool = True,
                log_every_n_steps: int = 1, enable_checkpointing: bool = False, stage: str = "steps") -> L.Trainer:
        """A Trainer on this policy's one device and precision (gradients are never shared with other processes).

        It may run inside a process of a multi-device job (a batch on DDP, torchrun, SLURM): the explicit
        ``LightningEnvironment`` keeps it out of that cluster (no SLURM signal handlers of its own), and
        ``KeepOnDeviceStrategy`` leaves the model on the device after ``fit``."""
        quiet_lightning(quiet)
        progress_bar = progress_bar and not quiet
        callbacks = list(callbacks) + ([StageProgressBar(stage)] if progress_bar else [])
        accelerator = "gpu" if self.device.type == "cuda" else self.device.type
        devices = [self.device.index or 0] if self.device.type == "cuda" else 1
        return L.Trainer(
            accelerator=accelerator, devices=devices, strategy=KeepOnDeviceStrategy(self.device),
            plugins=[LightningEnvironment()], num_nodes=1, precision=self.lightning_precision,
            max_steps=int(max_steps), max_epochs=1, callbacks=callbacks, logger=logger,
            enable_checkpointing=enable_checkpointing, enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=int(log_every_n_steps), enable_progress_bar=progress_bar)


def distributed_trainer(trainer_cfg, precision: str | None = None, quiet: bool = False, stage: str = "samples",
                        **kwargs) -> L.Trainer:
    """A Trainer that spreads work over ``trainer.devices`` x ``trainer.num_nodes`` processes with the configured
    strategy (DDP, SLURM, torchrun); ``precision`` defaults to ``trainer.precision``; its progress bar (rank 0's)
    is a ``StageProgressBar`` labelled ``stage`` (a fit: the module's own label). A ConfigError for settings
    Lightning refuses."""
    quiet_lightning(quiet)
    devices = trainer_cfg.devices
    if OmegaConf.is_list(devices):
        devices = list(devices)
    precision = normalize_precision(trainer_cfg.precision if precision is None else precision)
    kwargs.setdefault("enable_progress_bar", bool(trainer_cfg.enable_progress_bar) and not quiet)
    if kwargs["enable_progress_bar"]:
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [StageProgressBar(stage)]
    # the process-group timeout (trainer.timeout_s; Lightning's default is 30 min): how long a collective waits
    timeout = timedelta(seconds=float(getattr(trainer_cfg, "timeout_s", 300.0)))
    strategy = str(trainer_cfg.strategy)
    try:
        trainer = L.Trainer(accelerator=str(trainer_cfg.accelerator), devices=devices,
                            num_nodes=int(trainer_cfg.num_nodes),
                            strategy=DDPStrategy(timeout=timeout) if strategy == "ddp" else strategy,
                            precision="32-true" if precision == "32" else precision,
                            log_every_n_steps=int(trainer_cfg.log_every_n_steps), enable_model_summary=False,
                            num_sanity_val_steps=0, **kwargs)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"trainer.*: {str(exc).splitlines()[0]}") from None
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._timeout = timeout  # also when strategy=auto resolved to DDP (no public setter)
    return trainer
