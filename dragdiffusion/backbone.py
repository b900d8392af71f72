"""Load the diffusion backbone: a hub id, a local diffusers folder, a single-file checkpoint, or ``tiny``.

SD 1.5 / 2.x load as a ``StableDiffusionPipeline``; SDXL (detected by ``pipeline_kind``) as a
``StableDiffusionXLPipeline`` with both text encoders (``encode_prompt_sdxl``, ``sdxl_added_cond``).
``encode_condition`` is what every stage conditions the UNet on: the prompt embedding (a tensor) for SD 1.x / 2.x,
a ``Conditioning`` (prompt embeddings + SDXL's pooled embedding and time ids) for SDXL.

Optional separate VAE and LoRA weights; dtype and device from the config. Offline and missing gives one
clear ModelLoadError saying what was looked for and how to fix it.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch._dynamo
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import safe_open

from .cache import path_identity
from .conditioning import Conditioning
from .console import loading_line
from .errors import ModelLoadError
from .inputs import SINGLE_FILE_SUFFIXES, model_source, offline_setting
from .policy import DevicePolicy, resolve_device
from .tiny import SCHEDULER_CONFIG, TINY_MODELS, ensure_tiny_model

SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline")
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # the second (OpenCLIP bigG) text encoder of an SDXL base checkpoint


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
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (with projection: the pooled embedding)
    tokenizer_2: object = None
    gradient_checkpointing: bool = False  # model.gradient_checkpointing: UNet checkpointing in the drag and the LoRA

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pipeline(cls, pipe, policy: DevicePolicy, source: str = "") -> "Backbone":
        """Freeze the pipeline's parts, place them on the policy's device in its weight dtype (the one move),
        and attach the reference DDIM scheduler. SDXL: the second text encoder too, and the VAE stays in fp32 under
        fp16 weights when its config asks for it (``force_upcast``: the SDXL VAE overflows in fp16)."""
        text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        for module in (pipe.vae, pipe.text_encoder, pipe.unet, text_encoder_2):
            if module is None:
                continue
            module.requires_grad_(False)
            module.eval()
            dtype = policy.weight_dtype
            if (module is pipe.vae and text_encoder_2 is not None and dtype == torch.float16
                    and bool(pipe.vae.config.get("force_upcast", False))):
                dtype = torch.float32
            if module.dtype != dtype:  # a pipeline built in another dtype (benchmarks), an upcast VAE
                module.to(dtype=dtype)
            module.to(device=policy.device)
        return cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                   scheduler=make_ddim_scheduler(dict(pipe.scheduler.config)), source=source,
                   device=policy.device, dtype=policy.weight_dtype, text_encoder_2=text_encoder_2,
                   tokenizer_2=getattr(pipe, "tokenizer_2", None))


def make_ddim_scheduler(config: dict | None = None):
    """A DDIMScheduler with the reference settings (beta 0.00085..0.012 scaled_linear, offset 1, ...)."""
    settings = dict(config or {})
    settings.update(SCHEDULER_CONFIG)  # the reference's DDIM settings win over whatever the checkpoint had
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    prediction = (config or {}).get("prediction_type", "epsilon")
    return DDIMScheduler.from_config({**settings, "prediction_type": prediction})


def _hint(name: str) -> str:
    return (f"Could not load the model '{name}'. Looked for: a local diffusers folder (with model_index.json), "
            f"a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}), then the Hugging Face hub id"
            f"{' (offline: HF_HUB_OFFLINE=1 or model.local_files_only=true)' if offline_setting() else ''}. "
            "Fix: download it once and pass model.name_or_path=/path/to/folder, or use the built-in offline "
            "test model with model=tiny (or model=tiny_v: v-prediction).")


def _kind_of_class(class_name) -> str:
    return "sdxl" if str(class_name) in SDXL_PIPELINE_CLASSES else "sd"


def _kind_of_pipeline_id(name: str, local_only: bool) -> str:
    """"sd" or "sdxl" from a diffusers folder's or hub id's model_index.json ("sd" when it cannot be read: the
    load then says what is missing)."""
    folder = Path(os.path.expanduser(name))
    try:
        if folder.is_dir():
            return _kind_of_class(json.loads((folder / "model_index.json").read_text()).get("_class_name"))
        index = hf_hub_download(name, "model_index.json", local_files_only=local_only)
        return _kind_of_class(json.loads(Path(index).read_text()).get("_class_name"))
    except Exception:  # noqa: BLE001 - not found, offline, not a repo id: the load itself reports it
        return "sd"


def pipeline_kind(name: str, single_file_config: str | None = None, local_files_only: bool = False) -> str:
    """Which pipeline a ``model.name_or_path`` holds: ``"sdxl"`` (StableDiffusionXLPipeline) or ``"sd"``
    (StableDiffusionPipeline: SD 1.x / 2.x). Tiny models by name; a folder or hub id by its model_index.json
    ``_class_name``; a single file by ``single_file_config`` when given, else (.safetensors) by its keys (an SDXL
    base checkpoint has ``conditioner.embedders.1.*``: its second text encoder), else (.ckpt) "sd"."""
    name = str(name)
    if name in TINY_MODELS:
        return _kind_of_class(TINY_MODELS[name][1])
    path = Path(os.path.expanduser(name))
    if path.suffix in SINGLE_FILE_SUFFIXES and not path.is_dir():
        if single_file_config:
            return _kind_of_pipeline_id(str(single_file_config), local_files_only)
        if path.suffix == ".safetensors" and path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    return "sdxl" if any(k.startswith(SDXL_SINGLE_FILE_KEY) for k in f.keys()) else "sd"
            except Exception:  # noqa: BLE001 - not a readable safetensors file: the load reports it
                return "sd"
        return "sd"
    return _kind_of_pipeline_id(name, local_files_only)


def load_pipeline(model_cfg, dtype: torch.dtype = torch.float32):
    """Return a diffusers StableDiffusionPipeline (SD 1.x / 2.x) or StableDiffusionXLPipeline (SDXL, see
    ``pipeline_kind``) from the ``model`` config section in ``dtype`` (on the CPU)."""

    name = str(model_cfg.name_or_path)
    # missing files and folders, a hub id with no network and no cached copy: one ModelLoadError, before loading
    local_only = model_source(name, "model.name_or_path", bool(model_cfg.local_files_only))
    path = Path(os.path.expanduser(name))
    single_file_config = getattr(model_cfg, "single_file_config", None)
    if pipeline_kind(name, single_file_config, local_only) == "sdxl":
        pipeline_class, common = StableDiffusionXLPipeline, dict(dtype=dtype, add_watermarker=False)
    else:
        pipeline_class = StableDiffusionPipeline
        common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if name in TINY_MODELS:  # tiny (SD 1.5 topology), tiny-v (SD 2.x-style, v-prediction), tiny-xl (SDXL)
            folder = ensure_tiny_model(model_cfg.tiny_dir, name=name)
            pipe = pipeline_class.from_pretrained(folder, **common)
        elif path.is_dir():
            pipe = pipeline_class.from_pretrained(path, **common)
        elif path.suffix in SINGLE_FILE_SUFFIXES:
            extra = {"config": single_file_config} if single_file_config else {}
            pipe = pipeline_class.from_single_file(str(path), local_files_only=local_only, **extra, **common)
        else:
            pipe = pipeline_class.from_pretrained(name, local_files_only=local_only, **common)
        if pipeline_class is StableDiffusionXLPipeline and pipe.text_encoder is None:
            raise ModelLoadError(f"model.name_or_path: '{name}' is an SDXL refiner (one text encoder); expected an "
                                 "SDXL base model (two text encoders)")
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"{_hint(name)}\nUnderlying error: {exc.__class__.__name__}: {_first_line(exc)}") from None
    if model_cfg.vae:
        pipe.vae = load_vae(str(model_cfg.vae), dtype, local_only)
    if getattr(model_cfg, "unet", None):
        pipe.unet = load_unet(str(model_cfg.unet), dtype, local_only)
    return pipe


def load_unet(name: str, dtype, local_only: bool):
    """``model.unet``: a UNet (its own folder or hub id with config.json, or a pipeline's ``unet/`` subfolder) in place
    of the base model's, beside its text encoder(s) and VAE; the scheduler stays the reference DDIM (FastDrag's LCM
    benchmark: ``SimianLuo/LCM_Dreamshaper_v7``; no LCM w-conditioning is passed, ``timestep_cond`` stays None)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        subfolders = [None] if (path / "config.json").is_file() else ["unet"]
    else:
        subfolders = ["unet", None]  # a hub id: a pipeline repository (LCM_Dreamshaper_v7) or a UNet's own
    error = None
    for subfolder in subfolders:
        try:
            return UNet2DConditionModel.from_pretrained(name, subfolder=subfolder, dtype=dtype,
                                                        local_files_only=local_only)
        except (OSError, ValueError) as exc:
            error = exc
    raise ModelLoadError(f"model.unet: could not load the UNet '{name}' (a diffusers UNet2DConditionModel folder with "
                         "config.json, a pipeline folder with unet/, or a hub id of either was expected): "
                         f"{_first_line(error)}") from None
def _first_line(exc: BaseException) -> str:
    """An underlying error's first line, without the hub client's pointer to a stack trace that is not shown."""
    text = (str(exc).splitlines() or [""])[0]
    return text.replace(" Please check out the root cause in the stacktrace above.", "")


def load_vae(name: str, dtype, local_only: bool):
    local_only = model_source(name, "model.vae", local_only, index_file="config.json")
    try:
        path = Path(os.path.expanduser(name))
        if path.suffix in SINGLE_FILE_SUFFIXES:
            return AutoencoderKL.from_single_file(str(path), dtype=dtype, local_files_only=local_only)
        return AutoencoderKL.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.vae: could not load the VAE '{name}' (a diffusers AutoencoderKL folder, "
                             f"hub id or single file was expected): {_first_line(exc)}") from None


def load_backbone(model_cfg, policy: DevicePolicy | None = None, quiet: bool = False) -> Backbone:
    """Load the pipeline in the policy's weight dtype, freeze it, put it on the policy's device (the one move)
    and attach the reference DDIM scheduler. Without a policy: ``model.device`` in fp32. SD 1.x / 2.x or SDXL
    (``pipeline_kind``). Says what loads where in one line on stderr (``console.loading_line``) unless ``quiet``."""
    if policy is None:
        policy = DevicePolicy(resolve_device(str(model_cfg.device)), "32", torch.float32)
    loading_line(str(model_cfg.name_or_path), policy.describe(), enabled=not quiet)
    pipe = load_pipeline(model_cfg, policy.weight_dtype)
    backbone = Backbone.from_pipeline(pipe, policy, source=str(model_cfg.name_or_path))
    backbone.gradient_checkpointing = bool(getattr(model_cfg, "gradient_checkpointing", False))
    apply_speedups(backbone.unet, bool(getattr(model_cfg, "channels_last", False)),
                   bool(getattr(model_cfg, "compile", False)))
    return backbone


def hub_revision(repo_id: str) -> str | None:
    """The commit of ``repo_id``'s snapshot in the local Hugging Face cache (what ``from_pretrained`` loads
    offline); None when there is none."""
    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache, not a repo id
        return None
    return Path(folder).name


@lru_cache(maxsize=32)
def _source_identity(name: str) -> dict | None:
    """A model source's identity (``model_identity``)."""
    if name in TINY_MODELS:
        return {"tiny": TINY_MODELS[name][0]}  # built from a fixed seed: its name and version identify it
    local = Path(os.path.expanduser(name))
    if local.exists():
        return path_identity(local)
    revision = hub_revision(name)
    return {"hub": name, "revision": revision} if revision else None


def model_identity(model_cfg) -> dict | None:
    """What identifies the base model of ``model_cfg`` in the keys of the edit caches (``dragdiffusion.cache``):
    a tiny model by its name and version; a hub id by its revision (the commit of its snapshot in the Hugging Face
    cache); a local folder or single file by its files (``cache.path_identity``: the content of the small ones,
    configs and tokenizer files up to 1 MiB, and the size and modification time of the large ones, so no weight
    file is read; a copy without the times, ``cp`` without ``-p``, or a touched weight file is a new identity: the
    cache then misses, never wrongly hits); the same for a separate VAE, a separate UNet (``model.unet``) and
    ``single_file_config``; and the options
    that change the UNet's numbers (``compile``, ``channels_last``). None when it cannot be told (a hub id that is
    not in the local cache): nothing is then cached for it. Computed once per process and source."""
    parts = {"name_or_path": _source_identity(str(model_cfg.name_or_path))}
    for key in ("vae", "unet", "single_file_config"):
        value = model_cfg.get(key)
        parts[key] = None if value is None else _source_identity(str(value))
        if value is not None and parts[key] is None:
            return None
    if parts["name_or_path"] is None:
        return None
    # options that change the UNet's numbers
    parts["compile"] = bool(model_cfg.get("compile", False))
    parts["channels_last"] = bool(model_cfg.get("channels_last", False))
    return parts


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


@contextmanager
def unet_gradient_checkpointing(unet, enabled: bool = True):
    """While active (``enabled``), the UNet recomputes its blocks' activations in the backward pass instead of
    keeping them (``model.gradient_checkpointing``): far less memory for a forward with gradients, about one more
    forward of time. The previous setting comes back after."""
    if not enabled or unet.is_gradient_checkpointing:
        yield
        return
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


def _prompt_ids(tok, prompt: str, device) -> torch.Tensor:
    """Token ids [1, 77] padded/truncated to the tokenizer's length; warns (at the caller's caller) when truncated."""
    n_tokens = len(tok(prompt, truncation=False).input_ids)
    if n_tokens > tok.model_max_length:
        warnings.warn(f"prompt: {n_tokens} tokens, more than {tok.model_max_length}; it was truncated", stacklevel=4)
    return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def prompt_token_mask(backbone: Backbone, prompt: str) -> torch.Tensor:
    """[77] bool: the start token and the prompt's tokens, the positions before the first end-of-text token of the
    tokenized (truncated) prompt (DragText's regularized tokens: not the end and padding tokens). A prompt that
    fills all 77 positions still ends with its end token after truncation, so the span is always defined (with the
    empty prompt: the start token alone). SDXL's two encoders tokenize alike: the first tokenizer decides."""
    tok = backbone.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids[0]
    ends = (ids == tok.eos_token_id).nonzero()
    first_end = int(ends[0]) if len(ends) else len(ids)
    return torch.arange(len(ids)) < first_end


@torch.no_grad()
def encode_prompt(backbone: Backbone, prompt: str, device: torch.device | None = None) -> torch.Tensor:
    """CLIP embedding of the prompt, padded/truncated to the tokenizer's 77 tokens; warns when truncated.
    ``device``: where the text encoder is, when that is not ``backbone.device`` (a DDP process's device)."""
    return backbone.text_encoder(_prompt_ids(backbone.tokenizer, prompt, device or backbone.device))[0]


@torch.no_grad()
def encode_prompt_sdxl(backbone: Backbone, prompt: str,
                       device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` (no clip_skip): (prompt_embeds
    [1, 77, D1 + D2]: the penultimate hidden states of both text encoders concatenated, 768 + 1280 = 2048 for SDXL;
    pooled [1, P]: the second encoder's projected pooled embedding, 1280). Each tokenizer pads/truncates to 77 tokens
    (a warning when truncated). An empty negative prompt is encoded like any other; diffusers uses zeros instead when
    no negative prompt is given (``force_zeros_for_empty_prompt``)."""
    if not backbone.is_sdxl:
        raise ValueError("encode_prompt_sdxl: the backbone has no second text encoder (not an SDXL model)")
    device = device or backbone.device
    hidden = []
    for tok, encoder in ((backbone.tokenizer, backbone.text_encoder), (backbone.tokenizer_2, backbone.text_encoder_2)):
        hidden.append(encoder(_prompt_ids(tok, prompt, device), output_hidden_states=True).hidden_states[-2])
    pooled = backbone.text_encoder_2(_prompt_ids(backbone.tokenizer_2, prompt, device)).text_embeds
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_size: tuple[int, int], target_size: tuple[int, int],
                  crop_top_left: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's size conditioning [1, 6] (fp32): original (height, width), crop (top, left), target (height, width),
    in pixels (for an edit: the working size for both, crop (0, 0), as the SDXL pipeline's defaults)."""
    return torch.tensor([[*map(float, original_size), *map(float, crop_top_left), *map(float, target_size)]])


def sdxl_added_cond(backbone: Backbone, pooled: torch.Tensor, original_size: tuple[int, int],
                    target_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                    batch: int | None = None) -> dict:
    """The UNet's ``added_cond_kwargs`` for SDXL: {"text_embeds": pooled [B, P], "time_ids": [B, 6]} on pooled's
    device and dtype, ``batch`` rows (default: pooled's). Checked against the UNet's config (6 x
    addition_time_embed_dim + P == projection_class_embeddings_input_dim), as diffusers does."""
    config = backbone.unet.config
    time_ids = sdxl_time_ids(original_size, target_size, crop_top_left)
    passed = int(config.addition_time_embed_dim) * time_ids.shape[-1] + int(pooled.shape[-1])
    expected = int(config.projection_class_embeddings_input_dim)
    if passed != expected:
        raise ModelLoadError(f"SDXL added conditioning: the UNet expects {expected} values "
                             f"(projection_class_embeddings_input_dim) but the pooled embedding ({pooled.shape[-1]}) "
                             f"and 6 time ids x "
                             f"{config.addition_time_embed_dim} give {passed}; the text encoder and UNet do not match")
    n = int(batch or pooled.shape[0])
    return {"text_embeds": pooled.expand(n, -1), "time_ids": time_ids.to(pooled).expand(n, -1)}


@torch.no_grad()
def encode_condition(backbone: Backbone, prompt: str, size_hw: tuple[int, int], device: torch.device | None = None):
    """What the UNet is conditioned on for ``prompt`` at the image size ``size_hw`` (height, width, pixels): the
    prompt embedding [1, 77, D] (``encode_prompt``, a tensor) for SD 1.x / 2.x; for SDXL a ``Conditioning`` of the
    prompt embeddings and the added conditioning (pooled embedding, time ids: original size = target size =
    ``size_hw``, crop (0, 0))."""
    if not backbone.is_sdxl:
        return encode_prompt(backbone, prompt, device)
    embeds, pooled = encode_prompt_sdxl(backbone, prompt, device)
    size = (int(size_hw[0]), int(size_hw[1]))
    return Conditioning(embeds, sdxl_added_cond(backbone, pooled, size, size))


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
