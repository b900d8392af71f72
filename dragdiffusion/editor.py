"""DragEditor: the one edit pipeline (used by edit.py, the batch runner, the app and notebooks).

    real image:       prepare_lora -> invert ------\\
                                                    >-- run: drag (Lightning Trainer) -> denoise -> decode
    generated image:  generate (the sampler's z_t) -/

Only the source of the starting latent differs (a ``DragStart``): inverted from an image, or kept from the
sampler. Every stage is a method of the editor; the device and precision of all of them come from one
``DevicePolicy``.
"""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .cache import (CACHE_VERSION, INVERSION_FILE, INVERSIONS, DiskCache, InversionRecord, cache_root, digest_bytes,
                    digest_tensor, key_hash, keyed_file, warn, write_key)
from .console import StageProgress, drag_label, quiet_lightning
from .attention import (InversionKV, StepWindow, classic_attention, controlled_layer_names, inversion_kv,
                        reference_control)
from .backbone import (Backbone, decode_latent, encode_condition, encode_image, load_backbone, model_identity,
                       prompt_token_mask,
                       unet_gradient_checkpointing)
from .conditioning import cond_cat, cond_chunk, unet_cond_kwargs
from .config import EditConfig, load_config, method_label, to_container, to_yaml
from .data.convert import write_folder_sample
from .ddim import ddim_denoise, ddim_invert, ddim_step, guided_eps, inversion_timesteps
from .drag import DragEditModule, TextOptimization, guided_eps_and_features
from .errors import ConfigError, ModelLoadError, SampleError
from .generated import GeneratedImage, sample_image
from .images import latent_mask, to_model_input, to_uint8
from .io import save_json, save_png, save_text
from .loggers import TrajectoryLogger, log_edit_result, log_lora_artifact, lora_callbacks
from .features import StepGatedBottleneck, UNetPasses, mid_block_output
from .methods import (DragDiffusionMethod, DragMethod, DragParts, DragStepContext, TransformInput, TransformStep,
                      UndraggedStep, make_method)
from .lora import (WEIGHT_NAME, has_identity_lora, identity_lora_key, identity_lora_of, load_identity_lora,
                   mark_identity_lora, remove_identity_lora, restore_identity_lora, save_lora, train_lora)
from .policy import DevicePolicy
from .geometry import grid_to_pixels, pixels_to_grid
from .sample import DragSample, draw_drag, grid_size, make_sample, working_size


@dataclass
class EditResult:
    image: np.ndarray  # H x W x 3 uint8, the input's size
    trajectory: dict
    sample: DragSample
    seconds: dict = field(default_factory=dict)
    z_t: torch.Tensor | None = None  # the starting latent (on the policy's device)
    z_edited: torch.Tensor | None = None  # the optimized latent (on the policy's device)

    def save(self, out_dir: str | Path, config: DictConfig | None = None) -> Path:
        """dragged_image.png, drag_input.png (the input with the drag drawn), trajectory.json, config.yaml."""
        out = Path(out_dir)
        s = self.sample
        paths = np.array(self.trajectory["handles"]).transpose(1, 0, 2) if self.trajectory["handles"] else None
        save_png(out / "drag_input.png", draw_drag(s.image, s.handles, s.targets, s.mask))
        save_png(out / "drag_paths.png", draw_drag(self.image, s.handles, s.targets, None, paths))
        save_json(out / "trajectory.json", self.trajectory)
        if config is not None:
            save_text(out / "config.yaml", to_yaml(config))
        save_png(out / "dragged_image.png", self.image)  # last: its presence marks a finished sample
        return out

    def save_replay(self, folder: str | Path, config: DictConfig) -> Path:
        """The edit as a sample folder of our format: image.png, mask.png, drag.json and config.yaml (the inputs
        cleared). ``python edit.py --config FOLDER/config.yaml sample=FOLDER`` runs it again to the same image."""
        folder = write_folder_sample(self.sample, folder)
        inputs_cleared = {"sample": None, "data": None, "image": None, "points": None, "mask": None}
        save_text(Path(folder) / "config.yaml", to_yaml(OmegaConf.merge(config, inputs_cleared)))
        return Path(folder)


@dataclass
class DragStart:
    """Where a drag starts: the latent ``z_t`` at timestep ``t`` of a ``steps``-step DDIM schedule, and what the
    drag and the denoising condition on."""
    z_t: torch.Tensor  # [1, 4, h, w] fp32 on the policy's device
    t: int
    timesteps: list[int]  # the denoising timesteps, t first (descending)
    steps: int  # DDIM steps of the whole schedule (the step size of every DDIM step)
    work_hw: tuple[int, int]  # the working image size (height, width) the latent stands for
    cond: torch.Tensor  # prompt embedding [1, 77, D], or a Conditioning (SDXL: + pooled embedding and time ids)
    uncond: torch.Tensor | None = None  # the negative / empty prompt's, when guidance > 1
    guidance_scale: float = 1.0  # classifier-free guidance of the denoising
    drag_guidance: float = 1.0  # guidance of the drag's features (a generated image's; 1 for real images)
    lora_file: str | None = None
    seconds: dict = field(default_factory=dict)
    kv: InversionKV | None = None  # the inversion's self-attention keys and values (FastDrag), freed after the edit
    unet_passes: dict = field(default_factory=dict)  # UNet forward calls of the stages before the drag
    sources: dict = field(default_factory=dict)  # how each stage got its result: {"lora": ..., "inversion": ...}

    @property
    def drag_cond(self) -> torch.Tensor:
        return cond_cat([self.uncond, self.cond]) if self.drag_guidance > 1 else self.cond


@dataclass
class LoraStage:
    """How ``prepare_lora`` put the identity LoRA in: ``source`` "trained", "reused" (a keyed earlier one: the cache
    or an earlier run's ``<out>/lora/``), "loaded" (``lora.path``) or "off"; ``file``: the file used or written
    (None: none, or trained without a folder); ``key``: the LoRA's cache key hash (None: not keyed)."""
    source: str
    file: str | None = None
    key: str | None = None

    @property
    def label(self) -> str | None:
        """trajectory.json's ``lora``: the file, or "reused <file>"."""
        return f"reused {self.file}" if self.source == "reused" else self.file


class DragEditor:
    """Drag-edit samples with one loaded backbone.

    >>> editor = DragEditor.from_config("configs/edit.yaml", ["model=tiny", "drag.width=128"])
    >>> result = editor.edit(sample)           # EditResult: .image, .trajectory
    >>> result.save("outputs/my_edit", editor.cfg)
    """

    def __init__(self, cfg: DictConfig | None = None, backbone: Backbone | None = None,
                 policy: DevicePolicy | None = None):
        self.cfg = cfg if cfg is not None else OmegaConf.structured(EditConfig)
        # the device and precision of every stage (checked here, before any model loads)
        self.policy = policy or DevicePolicy.from_config(self.cfg, backbone.device if backbone is not None else None)
        if backbone is not None and backbone.device != self.policy.device:
            raise ConfigError(f"the backbone is on {backbone.device} but the policy says {self.policy.device}")
        self._backbone = backbone
        self.listeners: list = []  # during an edit: its callbacks with ``stage_progress`` (the app's reporter)
        self.lora_stage = LoraStage("off")  # set by every prepare_lora

    @classmethod
    def from_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, **kw) -> "DragEditor":
        return cls(load_config(path, overrides), **kw)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            quiet_lightning(bool(self.cfg.get("quiet", False)))
            self._backbone = load_backbone(self.cfg.model, self.policy, quiet=bool(self.cfg.get("quiet", False)))
        return self._backbone

    def progress(self, stage: str, total: int) -> StageProgress:
        """The progress of a stage outside a Trainer: a labelled bar on stderr (``trainer.enable_progress_bar``,
        not ``quiet``) and the edit's listeners, counted alike (console.py)."""
        enabled = bool(self.cfg.trainer.enable_progress_bar) and not bool(self.cfg.get("quiet", False))
        return StageProgress(stage, total, enabled, self.listeners)

    @contextmanager
    def listening(self, *callback_lists):
        """During an edit, its callbacks that follow every stage (``stage_progress``) also hear the stages
        outside a Trainer (inversion, denoising, decode)."""
        listeners = []
        for c in (c for callbacks in callback_lists for c in callbacks):
            if hasattr(c, "stage_progress") and c not in listeners:
                listeners.append(c)
        self.listeners = listeners
        try:
            yield
        finally:
            self.listeners = []

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def unet_fn(self):
        """eps(z, t, cond) in fp32 for the passes outside a Trainer (inversion, denoising, generation)."""
        unet = self.backbone.unet
        policy = self.policy

        def fn(z, t, c):
            with policy.autocast():
                return unet(z.to(unet.dtype), t, **unet_cond_kwargs(c, unet.dtype)).sample.float()
        return fn

    # ---------------------------------------------------------------- stage 1: the identity LoRA
    def prepare_lora(self, sample: DragSample, out_dir: str | Path | None = None, logger=False,
                     callbacks=()) -> str | None:
        """Put the sample's identity LoRA into the UNet; returns the file used (None: none, or trained unsaved);
        ``self.lora_stage`` says how (``LoraStage``).

        The one lookup order (README: Caching): ``lora.path`` set: load it (a file, a folder with
        pytorch_lora_weights.safetensors, or a per-sample folder from ``train.py data=...``; a batch sets it from
        ``lora_dir``). Otherwise (``lora.enabled``) reuse the same LoRA made before (``cache.lora``: same key, see
        ``identity_lora_key``), from ``out_dir/lora/`` of an earlier run, then from the cache
        (``<cache.dir>/lora/<key>/``), restored bit for bit; else train it and write it to ``out_dir/lora/`` (with
        its key.json) and to the cache. A previous sample's identity LoRA is replaced, never stacked. ``logger``:
        the edit's Lightning logger; ``callbacks``: more callbacks of the LoRA Trainer (the app's progress reporter;
        one with ``on_lora_reused(file, seconds)`` hears of a reuse)."""
        cfg, unet = self.cfg, self.backbone.unet
        if cfg.lora.path:
            file = load_identity_lora(unet, cfg.lora.path, cfg.lora.rank, sample.name)
            mark_identity_lora(unet, "file:" + digest_bytes(file.read_bytes()))
            self.lora_stage = LoraStage("loaded", str(file))
            return str(file)
        if not cfg.lora.enabled:
            remove_identity_lora(unet)
            self.lora_stage = LoraStage("off")
            return None
        lora_dir = Path(out_dir) / "lora" if out_dir is not None else None
        lora_cfg = cfg.lora  # model.gradient_checkpointing: the LoRA stage's too
        if self.gradient_checkpointing() and not cfg.lora.gradient_checkpointing:  # resolved: lora.resolution follows
            lora_cfg = OmegaConf.merge(to_container(cfg.lora), {"gradient_checkpointing": True})  # drag.width
        key = self.lora_key(sample, lora_cfg)
        reused = self.reuse_lora(key, lora_cfg, lora_dir, callbacks) if key is not None and cfg.cache.lora else None
        if reused is not None:
            return reused
        train_lora(self.backbone, sample.image, sample.prompt, lora_cfg, cfg.trainer, lora_dir, logger=logger or False,
                   quiet=bool(cfg.get("quiet", False)), policy=self.policy,
                   callbacks=lora_callbacks(logger) + list(callbacks))
        mark_identity_lora(unet, None if key is None else "lora:" + key_hash(key))
        if key is not None and cfg.cache.lora:
            self.disk_cache().store("lora", key, lambda folder: save_lora(unet, folder))
        self.lora_stage = LoraStage("trained", None if lora_dir is None else str(lora_dir / WEIGHT_NAME),
                                    None if key is None else key_hash(key))
        if lora_dir is None:
            return None
        save_text(lora_dir / "config.yaml", to_yaml(OmegaConf.create({"lora": to_container(cfg.lora),
                                                                       "model": to_container(cfg.model)})))
        if key is not None:
            write_key(lora_dir, key)  # a later run with out=... finds it by its key
        log_lora_artifact(logger, lora_dir / WEIGHT_NAME, name="lora-" + str(sample.name))
        return str(lora_dir / WEIGHT_NAME)

    def lora_key(self, sample: DragSample, lora_cfg) -> dict | None:
        """The cache key of the sample's identity LoRA (``identity_lora_key``); None when the base model has no
        identity (a hub id not in the local cache)."""
        model = model_identity(self.cfg.model)
        if model is None:
            return None
        checkpointing = bool(lora_cfg.gradient_checkpointing) or self.backbone.gradient_checkpointing
        return identity_lora_key(sample.image, sample.prompt, lora_cfg, model, self.policy, checkpointing)

    def reuse_lora(self, key: dict, lora_cfg, lora_dir: Path | None, callbacks=()) -> str | None:
        """The LoRA of ``key`` made before, restored into the UNet: from ``lora_dir`` (an earlier run's, if its
        key.json is this key), else from the cache; the file, or None (nothing there, or what is there does not
        load: warned, and trained again)."""
        tic = time.perf_counter()
        cache = self.disk_cache()
        places = [lambda: keyed_file(lora_dir, key, WEIGHT_NAME, foreign_warns=False) if lora_dir else None,
                  lambda: cache.find("lora", key, WEIGHT_NAME)]
        for place in places:
            file = place()
            if file is None:
                continue
            try:
                restore_identity_lora(self.backbone.unet, lora_cfg, file)
            except ModelLoadError as exc:  # truncated, foreign: never used, made again
                if file.parent == cache.folder("lora", key):
                    cache.reject(file, str(exc))
                else:
                    warn(f"ignoring {file} ({exc}); the identity LoRA is trained again")
                continue
            mark_identity_lora(self.backbone.unet, "lora:" + key_hash(key))
            seconds = time.perf_counter() - tic
            self.lora_stage = LoraStage("reused", str(file), key_hash(key))
            self.say(f"reusing the identity LoRA of this image: {file} ({seconds:.2f} s)")
            for callback in callbacks:
                if hasattr(callback, "on_lora_reused"):
                    callback.on_lora_reused(str(file), seconds)
            return str(file)
        return None

    def disk_cache(self) -> DiskCache:
        """The on-disk cache of this config (``cache.dir``, ``cache.max_bytes``)."""
        return DiskCache(cache_root(self.cfg.cache.dir), int(self.cfg.cache.max_bytes))

    def say(self, line: str) -> None:
        """A line about a stage on the console (stderr, with the stage bars: stdout keeps the result lines), unless
        ``quiet``."""
        if not bool(self.cfg.get("quiet", False)):
            print(line, file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- stage 2: where the drag starts
    def invert(self, sample: DragSample) -> DragStart:
        """DDIM inversion of the sample's image at the working size (no guidance, with the prompt)."""
        d = self.cfg.drag
        work_hw = working_size(sample.width, sample.height, d.width)[::-1]
        sched = self.backbone.scheduler
        inv_ts, denoise_ts = inversion_timesteps(sched, d.num_inference_steps, d.inversion_strength)
        cond = encode_condition(self.backbone, sample.prompt, work_hw)
        uncond = encode_condition(self.backbone, "", work_hw) if d.guidance_scale > 1 else None
        kv = InversionKV() if make_method(self.cfg).inversion_kv else None
        record, source = self.inverted(sample, tuple(work_hw), cond, inv_ts, kv)
        return DragStart(record.z_t.clone(), int(denoise_ts[0]), list(denoise_ts), int(d.num_inference_steps),
                         tuple(work_hw), cond, uncond, float(d.guidance_scale), kv=kv, sources={"inversion": source})

    def inverted(self, sample: DragSample, work_hw: tuple[int, int], cond, inv_ts,
                 kv: InversionKV | None = None) -> tuple[InversionRecord, str]:
        """(the inversion's record, "computed" or "reused"): the same inversion done before (same
        ``inversion_key``) from this process's memory or (``cache.inversion_disk``) the disk, else the DDIM
        inversion of the image at the working size, kept for next time (``cache.inversion``). ``kv``: record the
        self-attention keys and values into it (FastDrag); such an inversion is never reused nor kept, its keys and
        values belong to one edit."""
        pixels = to_model_input(sample.image, work_hw)
        classic = self.classic_attention_needed()
        key = self.inversion_key(sample, pixels, inv_ts, classic) if self.cfg.cache.inversion and kv is None else None
        record = self.cached_inversion(key, work_hw) if key is not None else None
        if record is not None:
            self.say("reusing the inversion of this image")
            return record, "reused"
        z0 = encode_image(self.backbone, pixels.to(self.device))
        at = None if kv is None else (lambda i, t: kv.at(t))
        # without guidance (guidance > 1 in inversion is a known source of failure), on the attention of the drag
        with self.drag_attention(), self.recording_kv(kv), self.progress("inversion", len(inv_ts)) as progress:
            z_t = ddim_invert(self.unet_fn(), self.backbone.scheduler, z0, cond, inv_ts, on_step=at,
                              after_step=progress.step)
        record = InversionRecord(z_t)
        if key is not None:
            INVERSIONS.put(key, record, int(self.cfg.cache.memory_bytes))
            if self.cfg.cache.inversion_disk:
                self.disk_cache().store("inversion", key, lambda folder: record.save(folder / INVERSION_FILE))
        return record, "computed"

    def recording_kv(self, kv: InversionKV | None):
        """Record the self-attention keys and values of ``fastdrag.kv_layers`` into ``kv`` (nothing when None)."""
        if kv is None:
            return nullcontext()
        return inversion_kv(self.backbone.unet, list(self.cfg.fastdrag.kv_layers), kv, recording=True)
    def inversion_key(self, sample: DragSample, pixels: torch.Tensor, inv_ts, classic: bool) -> dict | None:
        """Everything the inverted latent depends on: the UNet (base model, its identity LoRA, precision, weights'
        dtype, device type), the image's pixels at the working size, the prompt, the inversion timesteps as
        resolved (a change of their rounding is a change of key) and the DDIM step size, the attention
        (``reference.exact``'s classic attention) and the extras a method records (none yet: see
        ``InversionRecord``). Not the guidance: the inversion runs without it. None when the base model or the
        UNet's LoRA cannot be identified (nothing is then cached)."""
        model, lora = model_identity(self.cfg.model), identity_lora_of(self.backbone.unet)
        if model is None or lora is None:
            return None
        return {"kind": "inversion", "version": CACHE_VERSION, "model": model, "lora": lora,
                "image": digest_tensor(pixels), "working_size": [int(v) for v in pixels.shape[-2:]],
                "prompt": sample.prompt, "inversion_timesteps": [int(t) for t in inv_ts],
                "num_inference_steps": int(self.cfg.drag.num_inference_steps), "classic_attention": bool(classic),
                "precision": str(self.policy.precision),
                "weight_dtype": str(self.policy.weight_dtype).replace("torch.", ""),
                "device": self.policy.device.type, "extras": []}

    def cached_inversion(self, key: dict, work_hw: tuple[int, int]) -> InversionRecord | None:
        """``key``'s record from memory, else (``cache.inversion_disk``) from the disk (checked: the latent's
        shape for this working size; anything else is warned about and inverted again)."""
        record = INVERSIONS.get(key)
        if record is not None or not self.cfg.cache.inversion_disk:
            return record
        cache = self.disk_cache()
        file = cache.find("inversion", key, INVERSION_FILE)
        if file is None:
            return None
        f = self.backbone.vae_scale_factor
        shape = (1, int(self.backbone.vae.config.latent_channels), work_hw[0] // f, work_hw[1] // f)
        try:
            record = InversionRecord.load(file, self.device)
            if tuple(record.z_t.shape) != shape or record.z_t.dtype != torch.float32:
                raise ValueError(f"a latent of shape {tuple(record.z_t.shape)}, expected {shape}")
        except Exception as exc:  # noqa: BLE001 - truncated, not safetensors, another shape: made again
            cache.reject(file, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        INVERSIONS.put(key, record, int(self.cfg.cache.memory_bytes))
        return record

    def generate(self, prompt: str | None = None) -> GeneratedImage:
        """Sample an image from ``prompt`` (``generation.*``), keeping the latent at the drag timestep."""
        prompt = self.cfg.prompt if prompt is None else prompt
        remove_identity_lora(self.backbone.unet)  # the image is the model's own
        with self.progress("generation", int(self.cfg.generation.steps)) as progress:
            return sample_image(self.backbone, self.unet_fn(), self.cfg.generation,
                                float(self.cfg.drag.inversion_strength), "" if prompt is None else str(prompt),
                                after_step=progress.step)

    def start_from_generated(self, generated: GeneratedImage) -> DragStart:
        latent_hw = (generated.height // self.backbone.vae_scale_factor, generated.width // self.backbone.vae_scale_factor)
        if tuple(generated.z_t.shape[-2:]) != latent_hw:
            raise SampleError("image", f"the generated image is {generated.width}x{generated.height} px but its latent "
                                       f"is {tuple(generated.z_t.shape[-2:])}; expected {latent_hw}", "generated")
        size_hw = (generated.height, generated.width)
        cond = encode_condition(self.backbone, generated.prompt, size_hw)
        uncond = encode_condition(self.backbone, generated.negative_prompt, size_hw)
        s = float(generated.guidance_scale)
        start = DragStart(generated.z_t.to(self.device), generated.t, list(generated.timesteps), generated.steps,
                          (generated.height, generated.width), cond, uncond if s > 1 else None, s, s)
        if make_method(self.cfg).inversion_kv:  # no inversion: the sampler's own way from z_t down gives them
            start.kv = InversionKV()
            with torch.no_grad(), self.recording_kv(start.kv):
                self.backbone.scheduler.set_timesteps(start.steps)
                ddim_denoise(self.unet_fn(), self.backbone.scheduler, start.z_t.float(), cond, start.timesteps,
                             start.uncond, s, lambda i, t: start.kv.at(t))
        return start

    # ---------------------------------------------------------------- stage 3: the drag
    def drag(self, sample: DragSample, start: DragStart, callbacks=(), logger=False) -> DragEditModule:
        """DragDiffusion's drag: optimize ``start.z_t`` at ``start.t`` (the method's first drag step)."""
        method = DragDiffusionMethod(self.cfg)
        ctx = DragStepContext(0, start.t, None)
        with self.drag_attention():
            return self.drag_step(sample, start, ctx, start.z_t, method.drag_parts(ctx), callbacks, logger,
                                  label="drag")

    def drag_geometry(self, sample: DragSample, start: DragStart):
        """(grid size, handles, targets (row, col) on the grid, the mask at the latent size or None)."""
        d = self.cfg.drag
        grid_hw = grid_size(start.work_hw[1], start.work_hw[0], d.sup_res_factor)
        # pixels of the input -> grid: the scale is linear, so the input size maps straight to the grid
        handles_rc = pixels_to_grid(sample.handles, (sample.height, sample.width), grid_hw).to(self.device)
        targets_rc = pixels_to_grid(sample.targets, (sample.height, sample.width), grid_hw).to(self.device)
        mask_latent = None
        if sample.has_mask:
            mask_latent = latent_mask(sample.mask, grid_hw, tuple(start.z_t.shape[-2:])).to(self.device)
        return grid_hw, handles_rc, targets_rc, mask_latent

    def drag_step(self, sample: DragSample, start: DragStart, ctx: DragStepContext, z: torch.Tensor,
                  parts: DragParts, callbacks=(), logger=False, previous: DragEditModule | None = None,
                  label: str = "drag") -> DragEditModule:
        """One drag step: a Lightning fit of a ``DragEditModule`` that optimizes ``z`` at ``ctx.t`` (a fresh
        optimizer), with the method's ``parts`` (its budget ``parts.max_steps`` is the fit's length);
        ``previous``: the module of the edit's previous drag step (its handles go on from where they were);
        ``label``: the stage's name on the console and to the listeners ("drag step 2/7 (t=721)")."""
        d = self.cfg.drag
        grid_hw, handles_rc, targets_rc, mask_latent = self.drag_geometry(sample, start)
        handles = handles_rc if previous is None else previous.handles
        offset = 0 if previous is None else previous.step_offset + len(previous.history["loss"]) + int(previous.reached)
        self.backbone.scheduler.set_timesteps(start.steps)  # the DDIM step size of the drag's x_prev
        module = DragEditModule(self.backbone.unet, self.backbone.scheduler, z, ctx.t, start.drag_cond,
                                handles, targets_rc, grid_hw, d, mask_latent, guidance_scale=start.drag_guidance,
                                patch_as_reference=bool(self.cfg.reference.exact), handles_init=handles_rc,
                                motion_loss=parts.motion_loss, step_offset=offset, bottleneck=parts.bottleneck,
                                max_steps=parts.max_steps, text=self.text_optimization(sample))
        module.image_hw = (sample.height, sample.width)  # input pixels: the early-stop line (console.stop_rule)
        module.stage_label = label
        cbs = self.logging_callbacks(sample, callbacks, logger) + list(parts.callbacks)
        if parts.max_steps > 0:
            tc = self.cfg.trainer
            trainer = self.policy.trainer(parts.max_steps, cbs, logger or False, bool(self.cfg.quiet),
                                          bool(tc.enable_progress_bar), int(tc.log_every_n_steps), stage=label)
            with warnings.catch_warnings(), \
                    unet_gradient_checkpointing(self.backbone.unet, self.gradient_checkpointing()):
                warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available but not used|"
                                                  "`training_step` returned `None`|TPU available).*")
                trainer.fit(module)
        return module

    def text_optimization(self, sample: DragSample) -> TextOptimization | None:
        """DragText's settings for a fit (``text.optimize``), or None (off, the default: the fit is the method's
        own). Every fit starts from the original embedding (GoodDrag's code re-makes it at every drag step)."""
        t = self.cfg.get("text")
        if t is None or not bool(t.optimize):
            return None
        return TextOptimization(float(t.lr), float(t.lam), prompt_token_mask(self.backbone, sample.prompt),
                                bool(t.mask_term))

    @torch.no_grad()
    def undragged_step(self, start: DragStart, t: int, z_orig: torch.Tensor) -> UndraggedStep:
        """The original branch at a drag step: one forward gives its features F0(t) and its DDIM output."""
        d = self.cfg.drag
        grid_hw = grid_size(start.work_hw[1], start.work_hw[0], d.sup_res_factor)
        self.backbone.scheduler.set_timesteps(start.steps)
        with self.policy.autocast():
            eps, feat = guided_eps_and_features(self.backbone.unet, z_orig.float(), t, start.drag_cond,
                                                list(d.feature_blocks), grid_hw, start.drag_guidance)
        return UndraggedStep(feat.float(), ddim_step(self.backbone.scheduler, eps, t, z_orig.float()))

    @torch.no_grad()
    def bottleneck_of(self, start: DragStart, t: int, z: torch.Tensor) -> torch.Tensor:
        """The UNet's bottleneck (``mid_block`` output) for ``z`` at ``t``, fp32 (DragNoise's starting point)."""
        unet = self.backbone.unet
        cond = start.drag_cond
        zz = torch.cat([z] * cond.shape[0]) if cond.shape[0] > 1 else z
        with self.policy.autocast():
            out = mid_block_output(unet, zz.to(unet.dtype), t, cond.to(unet.dtype)).float()
        return out[-1:]  # with guidance: the conditional row (the same tensor replaces both rows)

    @torch.no_grad()
    def plain_step(self, start: DragStart, t: int, z: torch.Tensor, cond=None) -> torch.Tensor:
        """One DDIM step of one latent without control (the edited branch between two drag steps), conditioned on
        ``cond`` (DragText's edited embedding) or the start's."""
        cond = start.cond if cond is None else cond
        eps = guided_eps(self.unet_fn(), z.float(), t, cond, start.uncond, start.guidance_scale)
        return ddim_step(self.backbone.scheduler, eps, t, z.float())

    def drag_along_spine(self, sample: DragSample, start: DragStart, callbacks=(), logger=False):
        """The method's drag steps along the denoising loop: (the original and the edited latent at the first step
        without dragging, that step's index, the drag modules in order)."""
        method = make_method(self.cfg)
        planned = sum(method.wants_drag(j) for j in range(len(start.timesteps)))  # drag steps, none stopped early
        z_orig, z_edit = start.z_t, start.z_t
        modules: list[DragEditModule] = []
        i = 0
        with self.drag_attention():  # every forward of the drag steps on one attention (reference.exact)
            while i < len(start.timesteps) and method.wants_drag(i):
                t = int(start.timesteps[i])
                undragged = self.undragged_step(start, t, z_orig) if method.needs_undragged else None
                bottleneck = self.bottleneck_of(start, t, z_edit) if method.needs_bottleneck else None
                ctx = DragStepContext(i, t, undragged, bottleneck)
                parts = method.drag_parts(ctx)
                if parts.transform is not None:  # a drag that is a latent transform (FastDrag), no fit
                    module = self.transform_step(sample, start, ctx, z_edit, parts)
                else:
                    module = self.drag_step(sample, start, ctx, z_edit, parts, callbacks, logger,
                                            previous=modules[-1] if modules else None, label=drag_label(i, planned, t))
                modules.append(module)
                method.after_drag(module)
                z_edit = module.edited_latent()
                if method.control_from_drag_step:
                    break  # the denoising goes on from this step with control
                # a step that was entered to drag (even one that stopped at its first forward, as GoodDrag's code):
                # both branches take a plain DDIM step, no control; the control starts at the next step
                self.backbone.scheduler.set_timesteps(start.steps)
                z_orig = undragged.x_prev if undragged is not None else self.plain_step(start, t, z_orig)
                z_edit = self.plain_step(start, t, z_edit, module.edited_condition())
                i += 1
        return z_orig, z_edit, i, modules, method

    def transform_step(self, sample: DragSample, start: DragStart, ctx: DragStepContext, z: torch.Tensor,
                       parts: DragParts) -> TransformStep:
        """One drag step that is a latent transform (``parts.transform``: FastDrag's warp): no Trainer, no gradient."""
        grid_hw, handles_rc, _, _ = self.drag_geometry(sample, start)
        given = TransformInput(sample.handles, sample.targets, sample.mask if sample.has_mask else None,
                               (sample.height, sample.width), grid_hw, handles_rc)
        with torch.no_grad():
            return parts.transform(z, given, ctx.t)

    def drag_attention(self):
        """The attention of every forward of the drag steps (the drag, the undragged branch, the plain steps, the
        bottleneck): diffusers' classic processor with ``reference.exact`` and no LoRA, as the inversion; else the
        backbone's own. Two forwards that must agree (GoodDrag's undragged x_prev0(t) and the drag's first x_prev)
        then run the same kernels and give the same bits."""
        return classic_attention(self.backbone.unet, self.classic_attention_needed())

    def gradient_checkpointing(self) -> bool:
        """``model.gradient_checkpointing``: the UNet recomputes activations in the drag's (and the LoRA's) backward."""
        return bool(self.cfg.model.get("gradient_checkpointing", False)) or self.backbone.gradient_checkpointing

    def classic_attention_needed(self) -> bool:
        """``reference.exact`` without a LoRA: the reference's inversion and drag use the classic attention."""
        return bool(self.cfg.reference.exact) and not has_identity_lora(self.backbone.unet)

    def logging_callbacks(self, sample: DragSample, callbacks, logger) -> list:
        """``callbacks`` + a TrajectoryLogger (``logger.image_every``, ``logger.image_source``) when logging."""
        cbs = list(callbacks)
        if logger and not any(isinstance(c, TrajectoryLogger) for c in cbs):
            lg = self.cfg.logger
            decode = (lambda z: decode_latent(self.backbone, z)) if lg.image_source == "estimate" else None
            cbs.append(TrajectoryLogger(sample, lg.image_every, decode))
        return cbs

    # ---------------------------------------------------------------- stage 4: denoising
    def denoise(self, start: DragStart, z_edit: torch.Tensor, z_orig: torch.Tensor | None = None,
                from_step: int = 0, method: DragMethod | None = None, modules=()) -> torch.Tensor:
        """Denoise [z_orig, z_edit] (default z_orig: ``start.z_t``) from denoising step ``from_step`` to the end
        with reference-latent control (its steps counted from ``from_step``) and the start's guidance. A method
        without reference control (DragNoise) denoises the edited latent alone, with its bottleneck in the UNet
        for the steps it says. Returns the batch; the edited latent is the last row."""
        method = method or DragDiffusionMethod(self.cfg)
        r = self.cfg.reference
        timesteps = start.timesteps[from_step:]
        edited_cond = modules[-1].edited_condition() if modules else None  # DragText: the edited branch's own
        cond = start.cond
        if method.reference_control:
            z = torch.cat([start.z_t if z_orig is None else z_orig, z_edit]).float()
            if edited_cond is not None:  # [original, edited] conditioned on [c_orig, c_optimized]
                cond = cond_cat([start.cond, edited_cond])
        else:
            z = z_edit.float()
            cond = start.cond if edited_cond is None else edited_cond
        window = StepWindow(r.start_step, r.end_step)
        prefixes = list(r.layers) if r.enabled and method.reference_control else []
        gate = StepGatedBottleneck(method.denoise_bottleneck(list(modules)),
                                   method.denoise_bottleneck_steps(len(timesteps)))
        kv = start.kv if method.inversion_kv else None
        if method.inversion_kv and kv is None:
            raise ValueError(f"method {method.name}: the denoising needs the inversion's keys and values "
                             "(DragStart.kv), and this start has none")

        def on_step(i, t):
            window.step = i
            gate.step = i
            if kv is not None:
                kv.at(t)

        unet_fn = self.unet_fn()
        if start.guidance_scale > 1 and start.uncond is not None and kv is None:
            # guidance batches [uncond rows, cond rows]: run each half alone so every forward keeps the
            # [original, edited] layout that the reference control expects
            plain = unet_fn
            unet_fn = lambda z, t, c: torch.cat([plain(zz, t, cc) for zz, cc in zip(z.chunk(2), cond_chunk(c, 2))])
        replaying = nullcontext() if kv is None else inversion_kv(self.backbone.unet, list(self.cfg.fastdrag.kv_layers),
                                                                   kv, recording=False)
        with reference_control(self.backbone.unet, prefixes, window), gate.installed(self.backbone.unet), replaying, \
                self.progress("denoise", len(timesteps)) as progress:
            self.backbone.scheduler.set_timesteps(start.steps)
            return ddim_denoise(unet_fn, self.backbone.scheduler, z, cond, timesteps, start.uncond,
                                start.guidance_scale, on_step, after_step=progress.step)

    # ---------------------------------------------------------------- the whole edit
    def run(self, sample: DragSample, start: DragStart, callbacks=(), logger=False) -> EditResult:
        """Drag from ``start``, denoise, decode at the input's size: the shared end of every edit."""
        seconds = dict(start.seconds)
        try:
            tic = time.perf_counter()
            with UNetPasses(self.backbone.unet) as drag_passes:
                z_orig, z_edit, from_step, modules, method = self.drag_along_spine(sample, start, callbacks, logger)
            seconds["drag"] = time.perf_counter() - tic
            tic = time.perf_counter()
            with UNetPasses(self.backbone.unet) as denoise_passes:
                z = self.denoise(start, z_edit, z_orig, from_step, method, modules)
            with self.progress("decode", 1) as progress:
                image = to_uint8(decode_latent(self.backbone, z[-1:]), (sample.height, sample.width))
                progress.step()
            seconds["denoise"] = time.perf_counter() - tic
        finally:
            if start.kv is not None:  # the inversion's keys and values belong to this edit only
                start.kv.clear()
        run = DragRun.of(modules, start, from_step)
        trajectory = edit_trajectory(run, sample, start, seconds)
        trajectory["unet_passes"] = {**start.unet_passes, "drag": drag_passes.count, "denoise": denoise_passes.count}
        trajectory["method"] = {"name": method_label(self.cfg), **method.settings(), **text_settings(self.cfg, method)}
        trajectory["final_distance_of"] = method.final_distance_of
        trajectory.update(method.trajectory_extra())
        result = EditResult(image, trajectory, sample, seconds, start.z_t.detach(), z_edit.detach().clone())
        log_edit_result(logger, result)  # before/after pair + trajectory table (nothing without a logger)
        return result

    def edit(self, sample: DragSample, callbacks=(), logger=False, out_dir: str | Path | None = None,
             lora_callbacks=()) -> EditResult:
        """Edit a real image. ``callbacks``: extra callbacks of the drag Trainer (a ``DragCallback`` adds to the
        drag itself); ``lora_callbacks``: of the LoRA Trainer."""
        sample.validate()
        check_backbone_layers(self.cfg, self.backbone.unet)
        # seeded before each stage: a stage reused from the cache (which draws nothing) leaves the next stage the
        # random state that running it would have left
        L.seed_everything(int(self.cfg.seed), verbose=False)
        with self.listening(callbacks, lora_callbacks):
            tic = time.perf_counter()
            with UNetPasses(self.backbone.unet) as lora_passes:
                self.prepare_lora(sample, out_dir, logger, lora_callbacks)
            lora_seconds = time.perf_counter() - tic
            L.seed_everything(int(self.cfg.seed), verbose=False)
            tic = time.perf_counter()
            with UNetPasses(self.backbone.unet) as inversion_passes:
                start = self.invert(sample)
            start.lora_file = self.lora_stage.label
            start.seconds = {"lora": lora_seconds, "inversion": time.perf_counter() - tic}
            start.unet_passes = {"lora": lora_passes.count, "inversion": inversion_passes.count}
            start.sources["lora"] = self.lora_stage.source
            L.seed_everything(int(self.cfg.seed), verbose=False)
            return self.run(sample, start, callbacks, logger)

    def edit_generated(self, generated: GeneratedImage, points, mask=None, callbacks=(), logger=False) -> EditResult:
        """Drag a ``GeneratedImage`` without inversion (points: [[x, y], ...] alternating handle, target, in pixels
        of the generated image; mask: H x W, 1 = may change, or None)."""
        sample = make_sample(generated.image, points, mask, generated.prompt, "generated")
        L.seed_everything(int(self.cfg.seed), verbose=False)
        check_backbone_layers(self.cfg, self.backbone.unet)
        remove_identity_lora(self.backbone.unet)  # a previous real-image edit may have left its LoRA
        start = self.start_from_generated(generated)
        start.seconds = {"lora": 0.0, "inversion": 0.0}
        start.unet_passes = {"lora": 0, "inversion": 0}
        start.sources = {"lora": "off", "inversion": "generated"}
        with self.listening(callbacks):
            result = self.run(sample, start, callbacks, logger)
        result.trajectory["generated"] = {"prompt": generated.prompt, "negative_prompt": generated.negative_prompt,
                                          "seed": generated.seed, "guidance_scale": float(generated.guidance_scale)}
        return result


def text_settings(cfg, method: DragMethod) -> dict:
    """DragText's settings for the trajectory (``{"text": {...}}`` when it optimized the embedding, else none)."""
    t = cfg.get("text")
    if t is None or not bool(t.optimize) or not method.optimizes:
        return {}
    return {"text": {"lr": float(t.lr), "lam": float(t.lam), "mask_term": bool(t.mask_term)}}


def check_backbone_layers(cfg, unet) -> None:
    """``drag.feature_blocks`` and ``reference.layers`` exist in this UNet (SDXL has 3 up blocks and no attention in
    ``up_blocks.2``: SD 1.5's defaults do not fit it); a ConfigError naming the key and the model preset otherwise."""
    n_up = len(unet.up_blocks)
    hint = ("; an SDXL model takes its defaults from the preset: model=sdxl model.name_or_path=..."
            if n_up == 3 else "")
    blocks = [int(b) for b in cfg.drag.feature_blocks]
    if any(b >= n_up for b in blocks):
        raise ConfigError(f"config key 'drag.feature_blocks' = {blocks}: this UNet has {n_up} up blocks; expected "
                          f"indices in 0..{n_up - 1}{hint}")
    layers = list(cfg.reference.layers)
    if cfg.reference.enabled and layers and not controlled_layer_names(unet, layers):
        with_attention = sorted({".".join(n.split(".")[:2]) for n in unet.attn_processors
                                 if n.startswith("up_blocks.") and ".attn1." in n})
        raise ConfigError(f"config key 'reference.layers' = {layers}: no self-attention layer of this UNet matches; "
                          f"its up blocks with attention are {with_attention}{hint}")


@dataclass
class DragRun:
    """The drag steps of one edit as one record: the history of every step's module in order (with the timestep
    of each iteration), the final handles, whether and when (iteration of the whole run) dragging stopped."""
    history: dict
    handles: torch.Tensor  # final (row, col) [N, 2]
    grid_hw: tuple[int, int]
    reached: bool
    stop_step: int | None
    drag_timesteps: list[int]  # the timestep of each drag step
    control_from_step: int  # the first denoising step with reference control
    stop_reason: str | None = None  # "reached", or what stopped it (GoodDrag: no handle moved in N rounds)

    @classmethod
    def of(cls, modules: list[DragEditModule], start: DragStart, from_step: int) -> "DragRun":
        first = modules[0]
        history: dict[str, list] = {}
        stop_step, stop_reason = None, None
        for m in modules:
            n = len(m.history["handles"])
            for key, values in m.history.items():
                history.setdefault(key, []).extend(values)
            history.setdefault("timestep", []).extend([m.t] * n)
            if m.stop_step is not None:
                stop_step, stop_reason = m.step_offset + m.stop_step, m.stop_reason
        return cls(history, modules[-1].handles, first.grid_hw, any(m.reached for m in modules), stop_step,
                   [m.t for m in modules], int(from_step), stop_reason)


def edit_trajectory(module: DragEditModule | DragRun, sample: DragSample, start: DragStart, seconds: dict) -> dict:
    """trajectory.json: handles in input-image pixels per iteration, the loss terms, the stop and timings."""
    grid_hw = module.grid_hw
    to_px = lambda rc: grid_to_pixels(torch.tensor(rc), (sample.height, sample.width), grid_hw).tolist()
    terms = {k: v for k, v in module.history.items() if k != "handles"}
    extra = {}
    if isinstance(module, DragRun):
        extra = {"drag_timesteps": module.drag_timesteps, "control_from_step": module.control_from_step}
    return {
        "sample": sample.name,
        "image_size": [sample.width, sample.height],
        "working_size": [start.work_hw[1], start.work_hw[0]],
        "grid_size": [grid_hw[1], grid_hw[0]],
        "t": int(start.t),
        **extra,
        "targets": [list(map(float, p)) for p in sample.targets],
        "handles": [to_px(h) for h in module.history["handles"]],
        **terms,  # motion_loss, mask_loss, loss, timestep (and any term a DragCallback added)
        "iterations": len(module.history["loss"]),
        "stopped_early": bool(module.reached),
        "stop_step": module.stop_step,
        "stop_reason": module.stop_reason,
        "final_distance_px": final_distance(module, sample),
        "lora": start.lora_file,
        "sources": dict(start.sources),  # lora: trained | reused | loaded | off; inversion: computed | reused
        "seconds": seconds,
    }


def final_distance(module: DragEditModule | DragRun, sample: DragSample) -> list[float]:
    h = grid_to_pixels(module.handles.cpu(), (sample.height, sample.width), module.grid_hw)
    t = torch.tensor(sample.targets, dtype=torch.float32)
    return (h - t).norm(dim=1).tolist()
