"""A run's inputs, read and checked before torch, Lightning or diffusers is imported (PIL, numpy, omegaconf only).

``edit.py`` and ``train.py`` call these first, so that a bad input (a missing or corrupt image, points outside it,
a mask of another size, a checkpoint file or folder that is not there, a hub id with no network and no cached
copy) is an error (exit status 2) within a couple of seconds, not after the 20-40 s that the heavy imports and the
model take. The checks are the library's own, not a copy: ``load_input`` builds the sample with
``sample.make_sample`` / ``data.read_sample`` (the editor validates the sample it gets the same way), and
``model_source`` is also what ``backbone.load_pipeline`` asks before it loads.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from .config import runs_on_one_device
from .data import read_sample, sample_layout
from .demo import demo_sample
from .errors import ModelLoadError, SampleError
from .sample import ALL_ZERO_MASK, DragSample, ReadLimits, make_sample, read_image

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TINY_NAMES = ("tiny", "tiny-v", "tiny-xl")  # the built-in offline models (dragdiffusion.tiny.TINY_MODELS)
MODEL_FORMS = ("model.name_or_path takes a hub id (org/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
               "a local diffusers folder (holding model_index.json), a single-file checkpoint (.safetensors or "
               ".ckpt; model.single_file_config names its layout), or tiny / tiny-v / tiny-xl (the built-in "
               "offline models: model=tiny|tiny_v|tiny_xl)")
HUB_TIMEOUT_S = 3.0  # how long the reachability probe of the hub waits for a connection
INPUT_FORMS = ("give one of sample=DIR (a DragBench, our or Drag100 sample folder), image=PATH points='[[x, y], "
               "...]' [mask=PATH], data=DIR (a dataset), generate=true prompt=TEXT points=..., or sample=demo (the "
               "built-in demo)")


# ----------------------------------------------------------------------------------------------- the sample

def load_input(cfg) -> DragSample:
    """The sample of a single edit (``edit.py`` without ``data=``), read and checked: files exist and decode within
    ``limits``, points paired and inside the image, the mask of the image's size."""
    limits = ReadLimits.from_config(cfg)
    if cfg.generate:  # the image comes from the prompt; points and mask from points=/mask= or sample=DIR
        return generation_inputs(cfg)
    if cfg.sample == "demo":
        return demo_sample()
    if cfg.sample:
        return read_sample(cfg.sample, limits=limits)
    if cfg.image is None:
        if cfg.points is not None or cfg.mask is not None:
            raise SampleError("image", "points or mask were given but no image=PATH")
        raise SampleError("input", f"nothing to edit; {INPUT_FORMS}")
    return make_sample(cfg.image, cfg.points, cfg.mask, cfg.prompt or "", Path(cfg.image).stem, limits)


def generation_inputs(cfg) -> DragSample:
    """The drag of a ``generate=true`` run, validated before any model loads: points and mask from
    ``sample=DIR`` (a replay folder: its image.png must have the generated size) or ``points=`` / ``mask=``,
    the prompt from ``prompt=`` or the folder. The image is a blank placeholder of the generated size."""
    g = cfg.generation
    limits = ReadLimits.from_config(cfg)
    blank = np.zeros((int(g.height), int(g.width), 3), np.uint8)
    if cfg.sample:
        folder = read_sample(cfg.sample, limits=limits)
        if (folder.width, folder.height) != (int(g.width), int(g.height)):
            raise SampleError("image", f"{cfg.sample}: the image is {folder.width}x{folder.height} px but "
                                       f"generation.width x height is {g.width}x{g.height}; expected the same size",
                              folder.name)
        prompt = folder.prompt if cfg.prompt is None else str(cfg.prompt)
        return make_sample(blank, folder.points, folder.mask, prompt, folder.name)
    if cfg.points is None:
        raise SampleError("points", "generate=true needs points='[[x, y], ...]' (alternating handle, target, in "
                                    "pixels of the generated image) or sample=DIR")
    return make_sample(blank, cfg.points, cfg.mask, "" if cfg.prompt is None else str(cfg.prompt), "generated", limits)


def check_data(data) -> None:
    """``data=DIR`` is a folder (its samples are read and checked by the batch, before any model loads)."""
    if not Path(data).is_dir():
        raise SampleError("data", f"folder not found: {data}" if not Path(data).exists() else
                                  f"{data} is a file; expected a dataset folder")


def lora_input(cfg) -> DragSample:
    """The image of ``train.py`` (one LoRA): ``sample=DIR`` (any layout; its prompt unless ``prompt=`` is given) or
    ``image=PATH [prompt=TEXT]``, read and checked. Named after its sample folder when the image is a sample
    folder's image file (every Drag100 image is ``original.jpg``), else after the file."""
    limits = ReadLimits.from_config(cfg)
    if cfg.sample and cfg.image:
        raise SampleError("sample", "give either sample=DIR or image=PATH, not both")
    if cfg.sample:
        sample = read_sample(cfg.sample, limits=limits)
        if cfg.prompt is not None:
            sample.prompt = str(cfg.prompt)
        return sample
    if not cfg.image:
        raise SampleError("image", "expected image=PATH [prompt=TEXT], sample=DIR (a sample folder) or data=DIR")
    image = read_image(cfg.image, limits=limits)
    return DragSample(image, [], [], None, cfg.prompt or "", image_name(cfg.image))


def image_name(path) -> str:
    """A sample's name from its image file: the folder's name when the folder is a sample (DragBench's
    original_image.png, Drag100's original.jpg, our image.png beside its marker file), else the file's stem."""
    path = Path(path)
    return path.parent.name if sample_layout(path.parent) is not None and path.parent.name else path.stem


def input_notes(cfg, sample: DragSample | None = None) -> list[str]:
    """What a single edit takes differently from what a reader may expect, one line each (printed, not refused):
    an all-zero mask (no region constraint), ``trainer.devices`` > 1 (a single edit runs on one device)."""
    notes = []
    if sample is not None and sample.all_zero_mask:
        notes.append(f"{sample.name}: {ALL_ZERO_MASK}")
    if not runs_on_one_device(cfg.trainer):
        notes.append(f"trainer.devices={cfg.trainer.devices} trainer.num_nodes={cfg.trainer.num_nodes}: a single "
                     "edit runs in one process on one device (several devices split the samples of a batch: data=DIR)")
    return notes


# ----------------------------------------------------------------------------------------------- the model

def looks_like_path(name: str) -> bool:
    """A name that can only be a file system path (absolute, ~, ./, ../, or more than one '/'), not a hub id."""
    return (name.startswith(("/", "~", "./", "../", ".\\")) or os.path.isabs(name) or name.count("/") > 1
            or "\\" in name)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) accepts a connection within
    ``timeout`` seconds. Behind a proxy (``HTTPS_PROXY`` ...) the proxy decides: taken as reachable."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_setting() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def model_source(name: str, field: str = "model.name_or_path", local_files_only: bool = False,
                 index_file: str = "model_index.json") -> bool:
    """Check where ``name`` (``model.name_or_path`` or ``model.vae``) loads from, before anything loads; returns
    whether the load must stay off the network (``local_files_only``). A ModelLoadError, with the forms the key
    takes, for: a single-file checkpoint or a folder that is not there, a folder without ``index_file``, or a hub
    id that is neither in the Hugging Face cache nor reachable (no network: one clear error in a few seconds
    instead of half a minute of retries; a cached one then loads from the cache)."""
    name = str(name)
    local_only = bool(local_files_only) or offline_setting()
    if name in TINY_NAMES:
        return True
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if index_file and not (path / index_file).is_file():
            raise ModelLoadError(f"{field}: the folder {path} has no {index_file}; expected a diffusers folder "
                                 f"(save_pretrained output). {MODEL_FORMS}")
        return local_only
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"{field}: checkpoint file not found: {path}. {MODEL_FORMS}")
        return local_only
    if path.exists():
        raise ModelLoadError(f"{field}: {path} is a file but not a {' or '.join(SINGLE_FILE_SUFFIXES)} checkpoint. "
                             f"{MODEL_FORMS}")
    if looks_like_path(name):
        raise ModelLoadError(f"{field}: folder not found: {path}. {MODEL_FORMS}")
    try:
        cached = try_to_load_from_cache(name, index_file or "config.json") is not None
    except HFValidationError:
        raise ModelLoadError(f"{field}: '{name}' is neither an existing file or folder nor a hub id. "
                             f"{MODEL_FORMS}") from None
    if cached:
        return local_only or not hub_reachable()  # no network: straight to the cached copy, without retries
    if local_only:
        raise ModelLoadError(f"{field}: '{name}' is a hub id that is not in the Hugging Face cache "
                             f"({hub_constants.HF_HUB_CACHE}) and downloads are off (HF_HUB_OFFLINE=1 or "
                             f"model.local_files_only=true). Fix: download it once where there is a network "
                             f"(`hf download {name}`) or pass {field}=/path/to/folder; the built-in offline model "
                             "is model=tiny.")
    if hub_reachable():
        return False
    raise ModelLoadError(
        f"{field}: '{name}' is a hub id, it is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and "
        f"{urlparse(hub_constants.ENDPOINT).hostname} cannot be reached from here (no network). Fix: download it "
        f"where there is a network (`hf download {name}`, then copy the cache or the folder here) and pass "
        f"{field}=/path/to/folder, or use the built-in offline model (model=tiny).")


def check_model(model_cfg) -> None:
    """``model.name_or_path``, ``model.vae`` and ``model.unet`` checked before torch is imported (``model_source``)."""
    model_source(str(model_cfg.name_or_path), "model.name_or_path", bool(model_cfg.local_files_only))
    if getattr(model_cfg, "vae", None):
        model_source(str(model_cfg.vae), "model.vae", bool(model_cfg.local_files_only), index_file="config.json")
    if getattr(model_cfg, "unet", None):  # a pipeline folder or repository (unet/config.json), or a UNet's own
        try:
            model_source(str(model_cfg.unet), "model.unet", bool(model_cfg.local_files_only),
                         index_file="unet/config.json")
        except ModelLoadError:
            model_source(str(model_cfg.unet), "model.unet", bool(model_cfg.local_files_only), index_file="config.json")


def model_missing(model_cfg) -> str | None:
    """Without loading anything: why the ``model`` section cannot be loaded (``check_model``'s error), or None."""
    try:
        check_model(model_cfg)
    except ModelLoadError as exc:
        return str(exc)
    return None
