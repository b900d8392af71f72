"""Load the diffusion backbone: a hub id, a local diffusers folder, a single-file checkpoint, or ``tiny``.

Optional separate VAE and LoRA weights; dtype and device from the config. Offline and missing gives one
clear ModelLoadError saying what was looked for and how to fix it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from .errors import ModelLoadError
from .policy import DevicePolicy, resolve_device
from .tiny import SCHEDULER_CONFIG, ensure_tiny_model

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Backbone:
    """The parts of a Stable Diffusion pipeline this project uses, frozen, on one device (``device``).

    The device and the weights' dtype are decided by the ``DevicePolicy`` when the backbone is built; the parts
    are placed there once and no stage moves them afterwards."""
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object  # a DDIMScheduler with the reference settings
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pipeline(cls, pipe, policy: DevicePolicy, source: str = "") -> "Backbone":
        """Freeze the pipeline's parts, place them on the policy's device in its weight dtype (the one move),
        and attach the reference DDIM scheduler."""
        for module in (pipe.vae, pipe.text_encoder, pipe.unet):
            module.requires_grad_(False)
            module.eval()
            if module.dtype != policy.weight_dtype:  # a pipeline built in another dtype (benchmarks)
                module.to(dtype=policy.weight_dtype)
            module.to(device=policy.device)
        return cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                   scheduler=make_ddim_scheduler(dict(pipe.scheduler.config)), source=source,
                   device=policy.device, dtype=policy.weight_dtype)


def make_ddim_scheduler(config: dict | None = None):
    """A DDIMScheduler with the reference settings (beta 0.00085..0.012 scaled_linear, offset 1, ...)."""
    settings = dict(config or {})
    settings.update(SCHEDULER_CONFIG)  # the reference's DDIM settings win over whatever the checkpoint had
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    prediction = (config or {}).get("prediction_type", "epsilon")
    return DDIMScheduler.from_config({**settings, "prediction_type": prediction})


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hint(name: str) -> str:
    return (f"Could not load the model '{name}'. Looked for: a local diffusers folder (with model_index.json), "
            f"a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}), then the Hugging Face hub id"
            f"{' (offline: HF_HUB_OFFLINE=1 or model.local_files_only=true)' if _offline() else ''}. "
            "Fix: download it once and pass model.name_or_path=/path/to/folder, or use the built-in offline "
            "test model with model=tiny.")


def load_pipeline(model_cfg, dtype: torch.dtype = torch.float32):
    """Return a diffusers StableDiffusionPipeline from the ``model`` config section in ``dtype`` (on the CPU)."""

    name = str(model_cfg.name_or_path)
    local_only = bool(model_cfg.local_files_only) or _offline()
    path = Path(os.path.expanduser(name))
    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if name == "tiny":
            folder = ensure_tiny_model(model_cfg.tiny_dir)
            pipe = StableDiffusionPipeline.from_pretrained(folder, **common)
        elif path.is_dir():
            if not (path / "model_index.json").exists():
                raise ModelLoadError(f"model.name_or_path: the folder {path} has no model_index.json; expected a "
                                     "diffusers pipeline folder (save_pretrained output) or a single-file checkpoint")
            pipe = StableDiffusionPipeline.from_pretrained(path, **common)
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            if not path.exists():
                raise ModelLoadError(f"model.name_or_path: checkpoint file not found: {path}")
            extra = {"config": model_cfg.single_file_config} if model_cfg.single_file_config else {}
            pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=local_only, **extra, **common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(name, local_files_only=local_only, **common)
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"{_hint(name)}\nUnderlying error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    if model_cfg.vae:
        pipe.vae = load_vae(str(model_cfg.vae), dtype, local_only)
    return pipe


def load_vae(name: str, dtype, local_only: bool):
    try:
        path = Path(os.path.expanduser(name))
        if path.suffix in SINGLE_FILE_SUFFIXES:
            return AutoencoderKL.from_single_file(str(path), dtype=dtype, local_files_only=local_only)
        return AutoencoderKL.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.vae: could not load the VAE '{name}' (a diffusers AutoencoderKL folder, "
                             f"hub id or single file was expected): {str(exc).splitlines()[0]}") from None


def load_backbone(model_cfg, policy: DevicePolicy | None = None) -> Backbone:
    """Load the pipeline in the policy's weight dtype, freeze it, put it on the policy's device (the one move)
    and attach the reference DDIM scheduler. Without a policy: ``model.device`` in fp32."""
    if policy is None:
        policy = DevicePolicy(resolve_device(str(model_cfg.device)), "32", torch.float32)
    pipe = load_pipeline(model_cfg, policy.weight_dtype)
    backbone = Backbone.from_pipeline(pipe, policy, source=str(model_cfg.name_or_path))
    apply_speedups(backbone.unet, bool(getattr(model_cfg, "channels_last", False)),
                   bool(getattr(model_cfg, "compile", False)))
    return backbone


def apply_speedups(unet, channels_last: bool = False, compile_blocks: bool = False) -> None:
    """Opt-in UNet speed-ups (``model.channels_last``, ``model.compile``); the numbers stay those of eager fp32 up
    to rounding. Compilation is regional (the repeated transformer blocks) and falls back to eager code where
    torch.compile fails; its warm-up is paid on the first pass of each new shape."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_blocks:
        torch._dynamo.config.suppress_errors = True  # a block that cannot compile runs eagerly
        # every block instance and attention processor (reference control, LoRA) is its own guard
        torch._dynamo.config.recompile_limit = max(int(torch._dynamo.config.recompile_limit), 256)
        unet.compile_repeated_blocks()


@torch.no_grad()
def encode_prompt(backbone: Backbone, prompt: str, device: torch.device | None = None) -> torch.Tensor:
    """CLIP embedding of the prompt, padded/truncated to the tokenizer's 77 tokens; warns when truncated.
    ``device``: where the text encoder is, when that is not ``backbone.device`` (a DDP process's device)."""
    tok = backbone.tokenizer
    n_tokens = len(tok(prompt, truncation=False).input_ids)
    if n_tokens > tok.model_max_length:
        warnings.warn(f"prompt: {n_tokens} tokens, more than {tok.model_max_length}; it was truncated", stacklevel=2)
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device or backbone.device)
    return backbone.text_encoder(ids)[0]


@torch.no_grad()
def encode_image(backbone: Backbone, image: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> latent mean x scaling factor (deterministic, as the inversion needs)."""
    vae = backbone.vae
    latent = vae.encode(image.to(device=backbone.device, dtype=vae.dtype)).latent_dist.mean
    return latent.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latent(backbone: Backbone, latent: torch.Tensor) -> torch.Tensor:
    """Latent -> image [B, 3, h, w] in [0, 1] (clamped)."""
    vae = backbone.vae
    image = vae.decode((latent / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (image / 2 + 0.5).clamp(0, 1)
