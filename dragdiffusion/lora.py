"""The identity LoRA stage: fine-tune a LoRA on the UNet for one image so that the edit keeps its identity.

``LoraIdentityModule`` (a LightningModule) trains a peft LoRA on to_q/to_k/to_v/to_out.0 of every UNet
attention with the reference recipe (algorithm.md, stage 1); ``train_lora_for_sample`` runs it with a Lightning
Trainer and writes ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format (a stock
``StableDiffusionPipeline.load_lora_weights`` loads it); ``load_identity_lora`` puts a LoRA file into a UNet
(``DragEditor.prepare_lora`` chooses between the two for an edit).

Work that is never paid twice:
- the prompt is encoded once per LoRA (``on_fit_start``);
- the VAE encodes the resized image once (``ViewSampler`` with ``lora.cache_latents=true``): every view is a
  crop of that latent distribution (mean, std), sampled afresh. A square image has a single crop, so this is
  exactly the reference. For other images the crop offset lies on the latent grid (multiples of the VAE factor,
  8 px) and the latent near a crop edge has seen the pixels beyond it; we take that over one VAE pass per crop
  offset because (a) it costs one VAE pass whatever the aspect ratio, where caching per pixel offset would still
  encode most of the 4 x 80 views of a 512 x 683 image, and (b) the drag stage inverts the latent of the whole
  image, so the LoRA learns the latents it will later see. ``lora.cache_latents=false`` is the reference's
  way (every view's pixel crop encoded at every step), kept for comparison (benchmarks/bench_lora.py);
- the VAE and the text encoder run under ``no_grad``; the base UNet weights are frozen (only LoRA has grads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .backbone import Backbone, encode_condition, load_backbone
from .cache import CACHE_VERSION, digest_tensor
from .conditioning import cond_expand, unet_cond_kwargs
from .config import normalize_precision, runs_on_one_device, to_yaml
from .errors import ConfigError, DragError, ModelLoadError
from .data.datamodule import StepIndices
from .images import to_model_input
from .io import save_text
from .loggers import close_logger, log_lora_artifact, lora_callbacks, make_logger
from .policy import DevicePolicy, distributed_trainer

ADAPTER = "identity"  # the peft adapter name of the identity LoRA inside a UNet
IDENTITY_ATTR = "_dragdiffusion_identity_lora"  # on the UNet: what its identity adapter is (identity_lora_of)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_QUIET_WARNINGS = ".*(does not have many workers|GPU available but not used|TPU available|LitLogger|" \
                  "exists and is not empty|ended before the epoch ended|module\\(s\\) in eval mode).*"


# ----------------------------------------------------------------------------------------------- pure math

def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) after resizing the short side to ``short_side``; the long side is truncated (torchvision's Resize)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction, ``get_velocity``)."""
    prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ConfigError(f"scheduler prediction_type '{prediction_type}': expected epsilon or v_prediction")


def lora_loss(unet, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              cond: torch.Tensor) -> torch.Tensor:
    """MSE (in fp32) between the UNet's prediction on the noised latents (DDPM forward noising, the scheduler's
    ``add_noise``) and the diffusion target. ``cond``: the prompt embedding or a ``Conditioning`` (SDXL)."""
    noisy = scheduler.add_noise(x0, noise, t)
    cond = cond_expand(cond, x0.shape[0])
    pred = unet(noisy.to(unet.dtype), t, **unet_cond_kwargs(cond, unet.dtype)).sample
    return F.mse_loss(pred.float(), diffusion_target(scheduler, x0, noise, t).float(), reduction="mean")


# ----------------------------------------------------------------------------------------------- views

class ViewSampler:
    """Random square views of one image as VAE latents: resize the short side to ``size``, crop ``size`` x ``size``.

    ``cache=True``: the VAE encodes the resized image once; a view is a crop of that latent distribution at a
    random offset on the latent grid, sampled (mean + std * noise) afresh. ``cache=False``: the reference's
    way, each view's pixel crop (any pixel offset) is encoded at every call. ``encodes`` counts VAE passes.
    """

    def __init__(self, vae, image: np.ndarray, size: int, cache: bool = True):
        self.vae = vae
        self.size = int(size)
        self.cache = bool(cache)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling = float(vae.config.scaling_factor)
        h, w = resized_size(image.shape[0], image.shape[1], self.size)
        self.pixels = to_model_input(image, (h, w)).to(vae.device, vae.dtype)
        self.encodes = 0
        self.mean = self.std = None
        if self.cache:
            self.mean, self.std = self.encode(self.pixels)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels).latent_dist
        self.encodes += 1
        return dist.mean.float(), dist.std.float()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, C, size/f, size/f] latents x scaling factor; every random draw comes from ``generator`` (CPU)."""
        if self.cache:
            s = self.size // self.factor
            source = torch.stack([self.mean[0], self.std[0]])  # [2, C, h, w]
        else:
            s = self.size
            source = self.pixels[0]  # [3, H, W]
        h, w = source.shape[-2:]
        ys = torch.randint(0, h - s + 1, (n,), generator=generator).tolist()
        xs = torch.randint(0, w - s + 1, (n,), generator=generator).tolist()
        crops = torch.stack([source[..., y:y + s, x:x + s] for y, x in zip(ys, xs)])
        if self.cache:
            mean, std = crops[:, 0], crops[:, 1]
        else:
            mean, std = self.encode(crops)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * eps) * self.scaling


# ----------------------------------------------------------------------------------------------- adapters

def lora_peft_config(lora_cfg):
    # gaussian init: A ~ N(0, 1/r), B = 0 (the reference's LoRA layers); the LoRA starts as the identity
    return PeftLoraConfig(r=int(lora_cfg.rank), lora_alpha=int(lora_cfg.alpha), init_lora_weights="gaussian",
                          target_modules=list(lora_cfg.target_modules))


def remove_identity_lora(unet) -> None:
    """Take the identity adapter out of ``unet`` (the UNet is then exactly what it was before)."""
    mark_identity_lora(unet, None)
    configs = getattr(unet, "peft_config", None) or {}
    if ADAPTER in configs:
        unet.delete_adapters(ADAPTER)
    if not getattr(unet, "peft_config", None) and any(hasattr(m, "base_layer") for m in unet.modules()):
        unet.unload_lora()  # no adapter left: restore the plain layers


def has_identity_lora(unet) -> bool:
    return ADAPTER in (getattr(unet, "peft_config", None) or {})


def identity_lora_of(unet) -> str | None:
    """What the UNet's identity adapter is, for keys that depend on it (the inversion's): "none" without one, else
    what ``mark_identity_lora`` recorded once it was trained, restored or loaded (``DragEditor.prepare_lora``: the
    LoRA's cache key or the loaded file's sha256); None when unknown (changed by other code since)."""
    if not has_identity_lora(unet):
        return "none"
    return getattr(unet, IDENTITY_ATTR, None)


def mark_identity_lora(unet, identity: str | None) -> None:
    """Record what the identity adapter now is; every change of the adapter in this module resets it to None."""
    setattr(unet, IDENTITY_ATTR, identity)


def identity_lora_layers(unet) -> list[LoraLayer]:
    """The UNet's LoRA layers holding the identity adapter, in module order (the order peft creates them in)."""
    return [m for _, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def reinit_identity_lora(unet, lora_cfg) -> bool:
    """Give an identity adapter of the same shape (rank, alpha, target modules) fresh initial weights in place,
    exactly the values a new ``add_adapter`` would draw, but without rebuilding 128 layers (0.3-0.5 s per sample
    of a batch). Follows peft's creation: per layer, nn.Linear's kaiming draws for A and B, then A ~ N(0, 1/r)
    and B = 0, on the CPU in fp32, then cast to the base layer's dtype. False when there is no such adapter."""
    config = (getattr(unet, "peft_config", None) or {}).get(ADAPTER)
    if config is None or (int(config.r), int(config.lora_alpha), sorted(config.target_modules)) != \
            (int(lora_cfg.rank), int(lora_cfg.alpha), sorted(lora_cfg.target_modules)) or \
            config.init_lora_weights != "gaussian":
        return False
    with torch.no_grad():
        for layer in identity_lora_layers(unet):
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            base_dtype = layer.get_base_layer().weight.dtype
            new_a, new_b = torch.empty(a.shape), torch.empty(b.shape)
            torch.nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))  # nn.Linear(in, r)'s own init
            torch.nn.init.kaiming_uniform_(new_b, a=math.sqrt(5))  # nn.Linear(r, out)'s own init
            torch.nn.init.normal_(new_a, std=1 / int(config.r))  # peft's "gaussian"
            a.copy_(new_a.to(base_dtype))
            b.zero_()
    return True


def add_identity_lora(unet, lora_cfg, seed: int) -> list[torch.nn.Parameter]:
    """A fresh trainable identity adapter (replacing a previous one); returns its parameters (fp32). An adapter of
    the same shape is re-initialised in place (``reinit_identity_lora``: the same values, far faster)."""
    unet.requires_grad_(False)
    mark_identity_lora(unet, None)  # unknown until the caller says what it trained or restored
    with torch.random.fork_rng(devices=[]):  # the LoRA's init follows lora.seed, the global RNG is untouched
        torch.manual_seed(int(seed))
        if not reinit_identity_lora(unet, lora_cfg):
            remove_identity_lora(unet)
            unet.add_adapter(lora_peft_config(lora_cfg), adapter_name=ADAPTER)
    params = []
    for name, p in unet.named_parameters():
        trainable = f".{ADAPTER}." in name and "lora_" in name
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    cast_training_params(unet, dtype=torch.float32)  # trainable weights in fp32 even when the model is half
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The identity adapter's weights in the diffusers LoRA format (without the ``unet.`` prefix)."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(unet, folder: str | Path) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers format + peft config metadata), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[ADAPTER]
    metadata = {"r": int(config.r), "lora_alpha": int(config.lora_alpha),
                "target_modules": sorted(config.target_modules), "init_lora_weights": config.init_lora_weights}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=lora_state_dict(unet),
                                                         unet_lora_adapter_metadata=metadata, safe_serialization=True)
        os.chmod(Path(tmp) / WEIGHT_NAME, 0o644)  # readable like any model file (the temp file is private)
        os.replace(Path(tmp) / WEIGHT_NAME, folder / WEIGHT_NAME)
    return folder / WEIGHT_NAME


def resolve_lora_file(path: str | Path, sample_name: str | None = None) -> Path:
    """``lora.path``: a .safetensors file, a folder holding pytorch_lora_weights.safetensors, or a folder of
    per-sample LoRAs as train.py data=... writes them (<path>/<sample name>/pytorch_lora_weights.safetensors)."""
    p = Path(os.path.expanduser(str(path)))
    candidates = [p] if p.suffix else [p / WEIGHT_NAME] + ([p / sample_name / WEIGHT_NAME] if sample_name else [])
    for c in candidates:
        if c.is_file():
            if c.suffix != ".safetensors":
                raise ModelLoadError(f"lora.path: {c}: expected a .safetensors file (pickled .bin/.ckpt LoRAs are "
                                     "not loaded: they could execute code)")
            return c
    raise ModelLoadError(f"lora.path: no LoRA file found; looked for {', '.join(str(c) for c in candidates)}")


# ----------------------------------------------------------------------------------------------- LoRA files

KEY_STYLES = {
    "diffusers": "diffusers ('unet.<layer>.lora.down.weight', as train.py writes)",
    "peft": "peft ('unet.<layer>.lora_A.weight')",
    "dragdiffusion-official": "the official DragDiffusion code's (diffusers 0.24: 'unet.unet.<layer>.lora.down.weight')",
    "attn-processor": "diffusers attention processors ('unet.<attention>.processor.to_q_lora.down.weight')",
    "kohya": "kohya / sd-scripts ('lora_unet_...'), not supported",
    "unknown": "unknown",
}


def key_style(keys) -> str:
    """Which LoRA file layout ``keys`` follow (a KEY_STYLES name)."""
    keys = [k for k in keys if not k.endswith(".alpha")]
    if not keys:
        return "unknown"
    if all(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(k.startswith("unet.unet.") for k in keys):
        return "dragdiffusion-official"
    if any(".processor." in k and "_lora." in k for k in keys):
        return "attn-processor"
    if any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys):
        return "peft"
    if any(k.endswith(("lora.down.weight", "lora.up.weight")) for k in keys):
        return "diffusers"
    return "unknown"


def to_diffusers_key(key: str) -> str:
    """A key of any supported style as today's diffusers key ('unet.<layer>.lora.down.weight'): the official
    DragDiffusion files' doubled 'unet.' prefix goes, attention-processor names become layer names."""
    while key.startswith("unet.unet."):
        key = key[len("unet."):]
    if ".processor." in key:
        key = key.replace(".processor.", ".")
        for name in ("to_q", "to_k", "to_v"):
            key = key.replace(f".{name}_lora.", f".{name}.lora.")
        key = key.replace(".to_out_lora.", ".to_out.0.lora.")
    return key


def read_lora_header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict | None]:
    """(shape of every tensor, adapter metadata) from a safetensors file's header only, without the tensors."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            header = handle.metadata() or {}
    except Exception as exc:  # truncated, not safetensors, unreadable header...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"lora.path: {file}: not a readable LoRA safetensors file "
                             f"({exc.__class__.__name__}: {first})") from None
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise ModelLoadError(f"lora.path: {file}: its '{LORA_ADAPTER_METADATA_KEY}' header is not JSON") from None
    return shapes, metadata


def lora_pairs(names) -> dict[str, tuple[str, str]]:
    """{layer: (down key, up key)} of diffusers-style keys ('<layer>.lora.down.weight' / 'lora_A.weight')."""
    layers: dict[str, dict[str, str]] = {}
    for key in names:
        for part, suffixes in (("down", ("lora.down.weight", "lora_A.weight")), ("up", ("lora.up.weight", "lora_B.weight"))):
            for suffix in suffixes:
                if key.endswith("." + suffix):
                    layers.setdefault(key[:-len(suffix) - 1], {})[part] = key
    return {layer: (d.get("down"), d.get("up")) for layer, d in layers.items()}


def check_lora_file(path: str | Path, rank: int, sample_name: str | None = None) -> Path:
    """Check ``lora.path`` from its header alone, before any model loads: the file is there and readable, holds
    UNet LoRA weights of a supported key style, and its rank is ``lora.rank``. Returns the file."""
    file = resolve_lora_file(path, sample_name)
    shapes, _ = read_lora_header(file)
    style = key_style(shapes)
    if style in ("kohya", "unknown"):
        first = next(iter(shapes), "(none)")
        raise ModelLoadError(f"lora.path: {file}: LoRA keys in the style {KEY_STYLES[style]} (first key '{first}'); "
                             "expected a diffusers LoRA (train.py), a peft one, or the official DragDiffusion code's")
    check_lora_pairs({to_diffusers_key(k)[len("unet."):]: v for k, v in shapes.items() if k.startswith("unet.")},
                     rank, file)
    return file


def check_lora_pairs(unet_shapes: dict[str, tuple[int, ...]], rank: int, file: Path) -> dict[str, tuple[str, str]]:
    """The {layer: (down key, up key)} pairs of a LoRA's UNet part (diffusers keys without 'unet.', with their
    shapes); a ModelLoadError naming ``file`` when there are none, a layer lacks one of its two matrices, or the
    rank is not ``lora.rank``."""
    pairs = lora_pairs(unet_shapes)
    if not pairs:
        raise ModelLoadError(f"lora.path: {file}: holds no UNet LoRA weights (keys starting with 'unet.'); "
                             "expected a diffusers-format LoRA such as train.py writes")
    for layer, (down, up) in pairs.items():
        if down is None or up is None:
            raise ModelLoadError(f"lora.path: {file}: layer '{layer}' has only one of its two LoRA matrices")
        for file_rank in (unet_shapes[down][0], unet_shapes[up][-1]):  # down [r, in], up [out, r]
            if file_rank != int(rank):
                raise ModelLoadError(f"lora.path: {file}: LoRA rank {file_rank}, but lora.rank is {rank}; "
                                     f"set lora.rank={file_rank} or train a new LoRA")
    return pairs


def read_lora_file(file: Path) -> tuple[dict, dict | None, dict | None, str]:
    """(state dict with diffusers 'unet.' keys, network alphas, adapter metadata, key style) of a LoRA file, any
    supported key style converted on read."""
    _, metadata = read_lora_header(file)
    try:
        raw = load_file(str(file))
    except Exception as exc:
        raise ModelLoadError(f"lora.path: {file}: not a readable LoRA safetensors file "
                             f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    style = key_style(raw)
    state = {to_diffusers_key(k): v for k, v in raw.items() if not k.endswith(".alpha")}
    alphas = {to_diffusers_key(k): float(v) for k, v in raw.items() if k.endswith(".alpha")} or None
    return state, alphas, metadata, style


def check_lora_fits(state: dict, unet, rank: int, file: Path, style: str = "diffusers") -> dict[str, torch.Tensor]:
    """The UNet part of ``state`` (``unet.`` prefix removed); a ModelLoadError naming ``file``, the first layer
    that does not fit and the file's key style if it was made for another UNet, or has another rank than
    ``lora.rank``."""
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    pairs = check_lora_pairs({k: tuple(v.shape) for k, v in unet_state.items()}, rank, file)
    for module_name, (down, up) in pairs.items():
        try:
            layer = unet.get_submodule(module_name)
        except AttributeError:
            raise ModelLoadError(f"lora.path: {file}: layer '{module_name}' does not exist in this UNet (first "
                                 f"missing layer; the file's keys are in the style {KEY_STYLES[style]}); the "
                                 "LoRA was made for another base model (model.name_or_path)") from None
        layer = getattr(layer, "base_layer", layer)
        for key, is_down in ((down, True), (up, False)):
            value = unet_state[key]
            if not isinstance(layer, torch.nn.Linear) or value.ndim != 2:
                raise ModelLoadError(f"lora.path: {file}: '{key}' does not fit layer '{module_name}' of this UNet; "
                                     "the LoRA was made for another base model")
            features = value.shape[1] if is_down else value.shape[0]
            expected = layer.in_features if is_down else layer.out_features
            if features != expected:
                raise ModelLoadError(f"lora.path: {file}: '{key}' has shape {tuple(value.shape)} but layer "
                                     f"'{module_name}' has {expected} {'input' if is_down else 'output'} features; "
                                     "the LoRA was made for another base model (model.name_or_path)")
    return unet_state


def convert_lora_file(source: str | Path, target: str | Path) -> Path:
    """Write a LoRA of any supported key style (e.g. the official DragDiffusion code's) in today's diffusers format:
    ``target`` is a .safetensors file or a folder (which gets pytorch_lora_weights.safetensors). The weights are
    copied as they are; a file without alphas or metadata keeps the scale 1 (alpha = rank)."""
    file = resolve_lora_file(source)
    state, alphas, metadata, _ = read_lora_file(file)
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    if not lora_pairs(unet_state):
        raise ModelLoadError(f"lora convert: {file}: holds no UNet LoRA weights")
    target = Path(target)
    folder, name = (target.parent, target.name) if target.suffix == ".safetensors" else (target, WEIGHT_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in unet_state.items()}
    if alphas:
        tensors.update({k: torch.tensor(v) for k, v in alphas.items()})
    header = {"format": "pt"}
    if metadata:
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, folder / name)
    return folder / name


def load_identity_lora(unet, path: str | Path, rank: int, sample_name: str | None = None) -> Path:
    """Load a LoRA file into ``unet`` as the identity adapter (replacing a previous one, never stacking)."""
    file = resolve_lora_file(path, sample_name)
    state, alphas, metadata, style = read_lora_file(file)
    check_lora_fits(state, unet, int(rank), file, style)
    remove_identity_lora(unet)  # (its identity: unknown until the caller marks it)
    if alphas and metadata:
        metadata = None  # diffusers takes one of the two; the alphas hold the scale
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*(text_encoder|No LoRA keys).*")
            unet.load_lora_adapter({k: v for k, v in state.items() if k.startswith("unet.")}, prefix="unet",
                                   network_alphas=alphas, metadata=metadata, adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError) as exc:
        remove_identity_lora(unet)
        raise ModelLoadError(f"lora.path: {file}: could not load it into this UNet ({str(exc).splitlines()[0]})") from None
    unet.requires_grad_(False)
    unet.eval()
    return file


def restore_identity_lora(unet, lora_cfg, file: str | Path) -> Path:
    """Put an identity LoRA that ``save_lora`` wrote for these ``lora`` settings back into ``unet`` exactly as its
    training left it: the same adapter as ``add_identity_lora`` makes (rank, alpha, target modules, fp32 weights
    whatever the UNet's dtype), the file's weights copied bit for bit, frozen, in eval mode. (``load_identity_lora``
    goes through diffusers' loader instead, which casts to the UNet's dtype: right for any LoRA file, not bit for
    bit the trained adapter under half weights.) A file that is not exactly this adapter's tensors (truncated,
    another rank, foreign) raises ModelLoadError and leaves no adapter."""
    file = Path(file)
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors ...
        raise ModelLoadError(f"{file}: not a readable safetensors file ({exc.__class__.__name__})") from None
    add_identity_lora(unet, lora_cfg, lora_cfg.seed)
    params = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            params[f"unet.{name}.lora.down.weight"] = layer.lora_A[ADAPTER].weight
            params[f"unet.{name}.lora.up.weight"] = layer.lora_B[ADAPTER].weight
    wrong = sorted(set(params) ^ set(tensors)) or sorted(
        k for k, p in params.items() if tuple(tensors[k].shape) != tuple(p.shape) or tensors[k].dtype != p.dtype)
    if wrong:
        remove_identity_lora(unet)
        raise ModelLoadError(f"{file}: not this identity LoRA's weights (first mismatch: '{wrong[0]}')")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    unet.requires_grad_(False)
    unet.eval()
    return file


def identity_lora_key(image: np.ndarray, prompt: str | None, lora_cfg, model: dict, policy: DevicePolicy,
                      gradient_checkpointing: bool) -> dict:
    """The cache key of an identity LoRA: everything its trained weights depend on. The pixels the stage sees
    (the image after orientation, its short side resized to ``lora.resolution``), the prompt, the base model
    (``backbone.model_identity``), every ``lora.*`` setting that changes the training (not ``save_every``, ``path``,
    ``enabled``), the precision, the weights' dtype, the device type and gradient checkpointing (a recomputed
    forward may round differently on a GPU). ``seed`` is ``lora.seed``: the stage draws from it alone."""
    h, w = resized_size(image.shape[0], image.shape[1], int(lora_cfg.resolution))
    c = lora_cfg
    return {
        "kind": "lora", "version": CACHE_VERSION,
        "image": digest_tensor(to_model_input(image, (h, w))), "image_size": [h, w],
        "prompt": prompt or "", "model": model,
        "lora": {"rank": int(c.rank), "alpha": int(c.alpha), "target_modules": sorted(str(m) for m in c.target_modules),
                 "steps": int(c.steps), "lr": float(c.lr), "betas": [float(b) for b in c.betas],
                 "weight_decay": float(c.weight_decay), "eps": float(c.eps), "batch_size": int(c.batch_size),
                 "resolution": int(c.resolution), "seed": int(c.seed), "cache_latents": bool(c.cache_latents),
                 "gradient_checkpointing": bool(gradient_checkpointing)},
        "precision": str(policy.precision), "weight_dtype": str(policy.weight_dtype).replace("torch.", ""),
        "device": policy.device.type,
    }


# ----------------------------------------------------------------------------------------------- the module

class LoraIdentityModule(L.LightningModule):
    """Trains the identity LoRA of one image; one training step = one batch of ``lora.batch_size`` random views.

    The UNet is a submodule (so Lightning places it and DDP averages the LoRA gradients), but checkpoints hold
    only the trainable LoRA weights, the optimizer and the view generator's state. The VAE and the text encoder
    are used once, in ``on_fit_start``, without autograd.

    Args:
        backbone: the frozen model; the identity adapter is added to ``backbone.unet`` (replacing a previous one).
        image: H x W x 3 uint8. prompt: the image's prompt. lora: the ``lora`` config section.
    """

    def __init__(self, backbone: Backbone, image: np.ndarray, prompt: str, lora):
        super().__init__()
        self.lora = lora
        # submodules, so that DDP (several devices) places them; checkpoints keep only the LoRA weights, and the
        # single-device Trainer (KeepOnDeviceStrategy) never moves them
        self.unet = backbone.unet
        self.vae = backbone.vae
        self.text_encoder = backbone.text_encoder
        if backbone.text_encoder_2 is not None:  # SDXL's second text encoder (placed with the others under DDP)
            self.text_encoder_2 = backbone.text_encoder_2
        self.backbone = backbone  # a plain dataclass (tokenizer, scheduler)
        self.image = image
        self.prompt = prompt or ""
        add_identity_lora(self.unet, lora, lora.seed)
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        self.scheduler = backbone.scheduler
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.generator = torch.Generator().manual_seed(int(lora.seed))
        self.views_per_device = int(lora.batch_size)
        self.views: ViewSampler | None = None
        self.cond: torch.Tensor | None = None
        self.losses: list[float] = []

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str):
        world = int(self.trainer.world_size)
        if self.lora.batch_size % world:
            raise ConfigError(f"config key 'lora.batch_size' = {self.lora.batch_size}: expected a multiple of the "
                              f"number of devices ({world}); the batch of views is split over them")
        self.views_per_device = self.lora.batch_size // world
        self.generator.manual_seed(int(self.lora.seed) + int(self.global_rank))  # restored later on resume

    def on_fit_start(self):
        size = int(self.lora.resolution)  # SDXL: the views' size is the time ids' original and target size
        self.cond = encode_condition(self.backbone, self.prompt, (size, size), self.device)  # once
        self.unet.train()  # as the reference (SD's UNet has no dropout: the numbers are the same)
        if self.lora.gradient_checkpointing or self.backbone.gradient_checkpointing:  # or model.gradient_checkpointing
            self.unet.enable_gradient_checkpointing()
        self.views = ViewSampler(self.vae, self.image, self.lora.resolution, self.lora.cache_latents)

    def training_step(self, batch, batch_idx):
        x0 = self.views.sample(self.views_per_device, self.generator).to(self.device)
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=self.generator).to(self.device)
        loss = lora_loss(self.unet, self.scheduler, x0, noise, t, self.cond)
        self.losses.append(loss.detach())
        if self.trainer.loggers or self.trainer.progress_bar_callback is not None:  # a host sync per step
            self.log("lora/loss", loss, on_step=True, prog_bar=True)
            self.log("lora/step", float(self.global_step), on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        c = self.lora
        params = [p for p in self.parameters() if p.requires_grad]
        # constant learning rate: no scheduler; on a GPU the fused AdamW (one kernel for the 256 LoRA tensors)
        fused = {"fused": True} if params and params[0].is_cuda else {}
        return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, eps=c.eps,
                                 **fused)

    def train_dataloader(self):
        return DataLoader(StepIndices(max(1, int(self.lora.steps))), batch_size=1)

    def on_train_end(self):
        if self.losses and isinstance(self.losses[0], torch.Tensor):  # kept on the device during the fit
            self.losses = torch.stack(self.losses).tolist()
        if self.unet.is_gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()  # the drag stage chooses its own
        self.unet.requires_grad_(False)
        self.unet.eval()

    def on_save_checkpoint(self, checkpoint: dict):
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lora_generator_state"] = self.generator.get_state()
        checkpoint["lora_rank"] = int(self.lora.rank)

    def on_load_checkpoint(self, checkpoint: dict):
        expected = {n: p.shape for n, p in self.named_parameters() if p.requires_grad}
        got = checkpoint.get("state_dict", {})
        if set(got) != set(expected) or any(tuple(got[k].shape) != tuple(expected[k]) for k in expected):
            raise ModelLoadError(f"ckpt_path: the checkpoint's LoRA (rank {checkpoint.get('lora_rank')}, "
                                 f"{len(got)} tensors) does not fit this model and lora config (rank "
                                 f"{self.lora.rank}, {len(expected)} tensors)")
        if "lora_generator_state" in checkpoint:
            self.generator.set_state(checkpoint["lora_generator_state"])


class SaveLoraEvery(L.Callback):
    """Write ``<folder>/step-NNNNN/pytorch_lora_weights.safetensors`` every ``every`` steps (before the last)."""

    def __init__(self, every: int, folder: str | Path):
        self.every = int(every)
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step < trainer.max_steps and trainer.is_global_zero:
            save_lora(pl_module.unet, self.folder / f"step-{step:05d}")


# ----------------------------------------------------------------------------------------------- running it

def train_lora(backbone: Backbone, image: np.ndarray, prompt: str, lora_cfg, trainer_cfg, out_dir: str | Path | None,
               logger=False, ckpt_path: str | None = None, quiet: bool = False, policy: DevicePolicy | None = None,
               callbacks=()) -> LoraIdentityModule:
    """Train the identity LoRA into ``backbone.unet`` (it stays there, active and frozen afterwards).

    With ``out_dir``: writes ``out_dir/pytorch_lora_weights.safetensors``, with ``lora.save_every`` = N > 0 also
    ``out_dir/step-NNNNN/`` LoRA snapshots and resumable Lightning checkpoints ``out_dir/checkpoints/``.
    ``policy``: train on its one device (an edit, a per-sample job; the backbone is already there). Without it
    and with one device in ``trainer_cfg``, the backbone's device; otherwise the Trainer spreads the views over
    ``trainer.devices`` x ``trainer.num_nodes`` processes (DDP).
    """
    module = LoraIdentityModule(backbone, image, prompt, lora_cfg)
    callbacks = list(callbacks)
    if out_dir is not None and lora_cfg.save_every > 0:
        callbacks.append(SaveLoraEvery(lora_cfg.save_every, out_dir))
        callbacks.append(ModelCheckpoint(dirpath=Path(out_dir) / "checkpoints", filename="step-{step:05d}",
                                         auto_insert_metric_name=False, every_n_train_steps=int(lora_cfg.save_every),
                                         save_top_k=-1, save_last=False, enable_version_counter=False))
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    steps = int(lora_cfg.steps)
    if policy is None and runs_on_one_device(trainer_cfg):  # one device: the backbone's, in its dtype
        policy = DevicePolicy(backbone.device, normalize_precision(trainer_cfg.precision), backbone.dtype)
    if policy is not None:
        trainer = policy.trainer(steps, callbacks, logger, quiet, bool(trainer_cfg.enable_progress_bar),
                                 int(trainer_cfg.log_every_n_steps), enable_checkpointing=checkpointing, stage="LoRA")
    else:
        trainer = distributed_trainer(trainer_cfg, quiet=quiet, stage="LoRA", max_steps=steps, max_epochs=1,
                                      callbacks=callbacks, logger=logger, enable_checkpointing=checkpointing)
    if steps > 0:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _QUIET_WARNINGS)
            trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    module.on_train_end()
    if out_dir is not None and trainer.is_global_zero:
        save_lora(backbone.unet, out_dir)
    return module


def train_lora_for_sample(cfg: DictConfig, sample, out_dir: str | Path, backbone: Backbone | None = None,
                          policy: DevicePolicy | None = None) -> Path:
    """Train one sample's identity LoRA (``cfg`` a LoraTrainConfig); writes ``out_dir/pytorch_lora_weights.safetensors``
    and ``out_dir/config.yaml``; returns the weights file. Only ``sample.image``, ``.prompt`` and ``.name`` are used.

    With ``backbone`` (already on its device; ``policy`` says which) it trains there; the adapter stays in
    ``backbone.unet`` until the next call replaces it. Without, the model is loaded: on the policy's device for one
    device, or on the CPU for Lightning to place on each process's device (``trainer.devices`` > 1).
    """
    out_dir = Path(out_dir)
    if backbone is not None:
        policy = policy or DevicePolicy.from_config(cfg, backbone.device)
    else:
        policy = DevicePolicy.from_config(cfg)  # checks the precision and dtype before the model loads
        if runs_on_one_device(cfg.trainer):
            backbone = load_backbone(cfg.model, policy, quiet=bool(cfg.quiet))
        else:
            backbone = load_backbone(cfg.model, DevicePolicy(torch.device("cpu"), policy.precision,
                                                             policy.weight_dtype), quiet=bool(cfg.quiet))
            policy = None
    run_name = "lora-" + str(sample.name).replace("/", "__")
    logger = make_logger(cfg.logger, config=cfg, quiet=bool(cfg.quiet), run_name=run_name)
    failed = True
    try:
        train_lora(backbone, sample.image, sample.prompt, cfg.lora, cfg.trainer, out_dir, logger,
                   ckpt_path=cfg.get("ckpt_path"), quiet=bool(cfg.quiet), policy=policy,
                   callbacks=lora_callbacks(logger))
        save_text(out_dir / "config.yaml", to_yaml(cfg))
        log_lora_artifact(logger, out_dir / WEIGHT_NAME, name=run_name)
        failed = False
    finally:
        close_logger(logger, failed)
    return out_dir / WEIGHT_NAME


def main(argv=None) -> int:
    """``python -m dragdiffusion.lora convert IN OUT``: a LoRA of another key style in today's format."""
    parser = argparse.ArgumentParser(prog="python -m dragdiffusion.lora",
                                     description="LoRA file tools. convert: write a LoRA of another key style "
                                                 "(the official DragDiffusion code's, attention-processor keys) in "
                                                 "the diffusers format that train.py writes and stock pipelines load.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert IN (file or folder) to OUT (file or folder)")
    convert.add_argument("source")
    convert.add_argument("target")
    args = parser.parse_args(argv)
    try:
        out = convert_lora_file(args.source, args.target)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
