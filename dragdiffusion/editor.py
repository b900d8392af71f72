"""DragEditor: the one edit pipeline (used by edit.py, the batch runner, the app and notebooks).

    real image:       prepare_lora -> invert ------\\
                                                    >-- run: drag (Lightning Trainer) -> denoise -> decode
    generated image:  generate (the sampler's z_t) -/

Only the source of the starting latent differs (a ``DragStart``): inverted from an image, or kept from the
sampler. Every stage is a method of the editor; the device and precision of all of them come from one
``DevicePolicy``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .console import quiet_lightning
from .attention import StepWindow, classic_attention, reference_control
from .backbone import Backbone, decode_latent, encode_image, encode_prompt, load_backbone
from .callbacks import MaskRegularization, PointTracking
from .config import EditConfig, load_config, to_yaml
from .data.convert import write_folder_sample
from .ddim import ddim_denoise, ddim_invert, inversion_timesteps
from .drag import DragEditModule
from .errors import ConfigError, SampleError
from .generated import GeneratedImage, sample_image
from .images import latent_mask, to_model_input, to_uint8
from .io import save_json, save_png, save_text
from .loggers import TrajectoryLogger, log_edit_result, log_lora_artifact, lora_callbacks
from .lora import WEIGHT_NAME, has_identity_lora, load_identity_lora, remove_identity_lora, train_lora
from .policy import DevicePolicy
from .sample import DragSample, draw_drag, grid_size, grid_to_pixels, make_sample, pixels_to_grid, working_size


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
    cond: torch.Tensor  # prompt embedding [1, 77, D]
    uncond: torch.Tensor | None = None  # the negative / empty prompt's, when guidance > 1
    guidance_scale: float = 1.0  # classifier-free guidance of the denoising
    drag_guidance: float = 1.0  # guidance of the drag's features (a generated image's; 1 for real images)
    lora_file: str | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def drag_cond(self) -> torch.Tensor:
        return torch.cat([self.uncond, self.cond]) if self.drag_guidance > 1 else self.cond


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

    @classmethod
    def from_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, **kw) -> "DragEditor":
        return cls(load_config(path, overrides), **kw)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            quiet_lightning(bool(self.cfg.get("quiet", False)))
            self._backbone = load_backbone(self.cfg.model, self.policy)
        return self._backbone

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def unet_fn(self):
        """eps(z, t, cond) in fp32 for the passes outside a Trainer (inversion, denoising, generation)."""
        unet = self.backbone.unet
        policy = self.policy

        def fn(z, t, c):
            with policy.autocast():
                return unet(z.to(unet.dtype), t, encoder_hidden_states=c.to(unet.dtype)).sample.float()
        return fn

    # ---------------------------------------------------------------- stage 1: the identity LoRA
    def prepare_lora(self, sample: DragSample, out_dir: str | Path | None = None, logger=False,
                     callbacks=()) -> str | None:
        """Put the sample's identity LoRA into the UNet; returns the file used (None: none, or trained unsaved).

        ``lora.path`` set: load it (a file, a folder with pytorch_lora_weights.safetensors, or a per-sample folder
        from ``train.py data=...``). Otherwise train it (``lora.enabled``) and, with ``out_dir``, write
        ``out_dir/lora/``. A previous sample's identity LoRA is replaced, never stacked. ``logger``: the edit's
        Lightning logger; ``callbacks``: more callbacks of the LoRA Trainer (the app's progress reporter)."""
        cfg, unet = self.cfg, self.backbone.unet
        if cfg.lora.path:
            return str(load_identity_lora(unet, cfg.lora.path, cfg.lora.rank, sample.name))
        if not cfg.lora.enabled:
            remove_identity_lora(unet)
            return None
        lora_dir = Path(out_dir) / "lora" if out_dir is not None else None
        train_lora(self.backbone, sample.image, sample.prompt, cfg.lora, cfg.trainer, lora_dir, logger=logger or False,
                   quiet=bool(cfg.get("quiet", False)), policy=self.policy,
                   callbacks=lora_callbacks(logger) + list(callbacks))
        if lora_dir is None:
            return None
        save_text(lora_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create({"lora": cfg.lora, "model": cfg.model})))
        log_lora_artifact(logger, lora_dir / WEIGHT_NAME, name="lora-" + str(sample.name))
        return str(lora_dir / WEIGHT_NAME)

    # ---------------------------------------------------------------- stage 2: where the drag starts
    def invert(self, sample: DragSample) -> DragStart:
        """DDIM inversion of the sample's image at the working size (no guidance, with the prompt)."""
        d = self.cfg.drag
        work_hw = working_size(sample.width, sample.height, d.width)[::-1]
        sched = self.backbone.scheduler
        inv_ts, denoise_ts = inversion_timesteps(sched, d.num_inference_steps, d.inversion_strength)
        cond = encode_prompt(self.backbone, sample.prompt)
        uncond = encode_prompt(self.backbone, "") if d.guidance_scale > 1 else None
        z0 = encode_image(self.backbone, to_model_input(sample.image, work_hw).to(self.device))
        # the inversion runs without guidance (guidance > 1 in inversion is a known source of failure)
        with classic_attention(self.backbone.unet, self.classic_attention_needed()):
            z_t = ddim_invert(self.unet_fn(), sched, z0, cond, inv_ts)
        return DragStart(z_t, int(denoise_ts[0]), list(denoise_ts), int(d.num_inference_steps), tuple(work_hw),
                         cond, uncond, float(d.guidance_scale))

    def generate(self, prompt: str | None = None) -> GeneratedImage:
        """Sample an image from ``prompt`` (``generation.*``), keeping the latent at the drag timestep."""
        prompt = self.cfg.prompt if prompt is None else prompt
        remove_identity_lora(self.backbone.unet)  # the image is the model's own
        return sample_image(self.backbone, self.unet_fn(), self.cfg.generation, float(self.cfg.drag.inversion_strength),
                            "" if prompt is None else str(prompt))

    def start_from_generated(self, generated: GeneratedImage) -> DragStart:
        latent_hw = (generated.height // self.backbone.vae_scale_factor, generated.width // self.backbone.vae_scale_factor)
        if tuple(generated.z_t.shape[-2:]) != latent_hw:
            raise SampleError("image", f"the generated image is {generated.width}x{generated.height} px but its latent "
                                       f"is {tuple(generated.z_t.shape[-2:])}; expected {latent_hw}", "generated")
        cond = encode_prompt(self.backbone, generated.prompt)
        uncond = encode_prompt(self.backbone, generated.negative_prompt)
        s = float(generated.guidance_scale)
        return DragStart(generated.z_t.to(self.device), generated.t, list(generated.timesteps), generated.steps,
                         (generated.height, generated.width), cond, uncond if s > 1 else None, s, s)

    # ---------------------------------------------------------------- stage 3: the drag
    def drag(self, sample: DragSample, start: DragStart, callbacks=(), logger=False) -> DragEditModule:
        """Optimize ``start.z_t`` so that the content at the sample's handles moves to its targets."""
        d = self.cfg.drag
        grid_hw = grid_size(start.work_hw[1], start.work_hw[0], d.sup_res_factor)
        # pixels of the input -> grid: the scale is linear, so the input size maps straight to the grid
        handles_rc = pixels_to_grid(sample.handles, (sample.height, sample.width), grid_hw).to(self.device)
        targets_rc = pixels_to_grid(sample.targets, (sample.height, sample.width), grid_hw).to(self.device)
        mask_latent = None
        if sample.has_mask:
            mask_latent = latent_mask(sample.mask, grid_hw, tuple(start.z_t.shape[-2:])).to(self.device)
        self.backbone.scheduler.set_timesteps(start.steps)  # the DDIM step size of the drag's x_prev
        module = DragEditModule(self.backbone.unet, self.backbone.scheduler, start.z_t, start.t, start.drag_cond,
                                handles_rc, targets_rc, grid_hw, d, mask_latent, guidance_scale=start.drag_guidance,
                                patch_as_reference=bool(self.cfg.reference.exact))
        cbs = self.logging_callbacks(sample, callbacks, logger)
        if d.point_tracking:
            cbs.append(PointTracking(d.r_p, d.stop_distance))
        if d.mask_regularization:
            cbs.append(MaskRegularization(d.lam))
        if d.n_pix_step > 0:
            tc = self.cfg.trainer
            trainer = self.policy.trainer(d.n_pix_step, cbs, logger or False, bool(self.cfg.quiet),
                                          bool(tc.enable_progress_bar), int(tc.log_every_n_steps), stage="drag")
            with warnings.catch_warnings(), classic_attention(self.backbone.unet, self.classic_attention_needed()):
                warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available but not used|"
                                                  "`training_step` returned `None`|TPU available).*")
                trainer.fit(module)
        return module

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
    def denoise(self, start: DragStart, z_edit: torch.Tensor) -> torch.Tensor:
        """Denoise [z_t, z_edit] from t with reference-latent control (and the start's guidance)."""
        r = self.cfg.reference
        z = torch.cat([start.z_t, z_edit]).float()
        window = StepWindow(r.start_step, r.end_step)
        prefixes = list(r.layers) if r.enabled else []

        def on_step(i, t):
            window.step = i

        unet_fn = self.unet_fn()
        if start.guidance_scale > 1 and start.uncond is not None:
            # guidance batches [uncond rows, cond rows]: run each half alone so every forward keeps the
            # [original, edited] layout that the reference control expects
            plain = unet_fn
            unet_fn = lambda z, t, c: torch.cat([plain(zz, t, cc) for zz, cc in zip(z.chunk(2), c.chunk(2))])
        with reference_control(self.backbone.unet, prefixes, window):
            return ddim_denoise(unet_fn, self.backbone.scheduler, z, start.cond, start.timesteps, start.uncond,
                                start.guidance_scale, on_step)

    # ---------------------------------------------------------------- the whole edit
    def run(self, sample: DragSample, start: DragStart, callbacks=(), logger=False) -> EditResult:
        """Drag from ``start``, denoise, decode at the input's size: the shared end of every edit."""
        seconds = dict(start.seconds)
        tic = time.perf_counter()
        module = self.drag(sample, start, callbacks, logger)
        seconds["drag"] = time.perf_counter() - tic
        tic = time.perf_counter()
        z = self.denoise(start, module.edited_latent())
        image = to_uint8(decode_latent(self.backbone, z[1:]), (sample.height, sample.width))
        seconds["denoise"] = time.perf_counter() - tic
        trajectory = edit_trajectory(module, sample, start, seconds)
        result = EditResult(image, trajectory, sample, seconds, start.z_t.detach(), module.edited_latent())
        log_edit_result(logger, result)  # before/after pair + trajectory table (nothing without a logger)
        return result

    def edit(self, sample: DragSample, callbacks=(), logger=False, out_dir: str | Path | None = None,
             lora_callbacks=()) -> EditResult:
        """Edit a real image. ``callbacks``: extra callbacks of the drag Trainer (a ``DragCallback`` adds to the
        drag itself); ``lora_callbacks``: of the LoRA Trainer."""
        sample.validate()
        L.seed_everything(int(self.cfg.seed), verbose=False)
        tic = time.perf_counter()
        lora_file = self.prepare_lora(sample, out_dir, logger, lora_callbacks)
        lora_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        start = self.invert(sample)
        start.lora_file = lora_file
        start.seconds = {"lora": lora_seconds, "inversion": time.perf_counter() - tic}
        return self.run(sample, start, callbacks, logger)

    def edit_generated(self, generated: GeneratedImage, points, mask=None, callbacks=(), logger=False) -> EditResult:
        """Drag a ``GeneratedImage`` without inversion (points: [[x, y], ...] alternating handle, target, in pixels
        of the generated image; mask: H x W, 1 = may change, or None)."""
        sample = make_sample(generated.image, points, mask, generated.prompt, "generated")
        L.seed_everything(int(self.cfg.seed), verbose=False)
        remove_identity_lora(self.backbone.unet)  # a previous real-image edit may have left its LoRA
        start = self.start_from_generated(generated)
        start.seconds = {"lora": 0.0, "inversion": 0.0}
        result = self.run(sample, start, callbacks, logger)
        result.trajectory["generated"] = {"prompt": generated.prompt, "negative_prompt": generated.negative_prompt,
                                          "seed": generated.seed, "guidance_scale": float(generated.guidance_scale)}
        return result


def edit_trajectory(module: DragEditModule, sample: DragSample, start: DragStart, seconds: dict) -> dict:
    """trajectory.json: handles in input-image pixels per iteration, the loss terms, the stop and timings."""
    grid_hw = module.grid_hw
    to_px = lambda rc: grid_to_pixels(torch.tensor(rc), (sample.height, sample.width), grid_hw).tolist()
    terms = {k: v for k, v in module.history.items() if k != "handles"}
    return {
        "sample": sample.name,
        "image_size": [sample.width, sample.height],
        "working_size": [start.work_hw[1], start.work_hw[0]],
        "grid_size": [grid_hw[1], grid_hw[0]],
        "t": int(start.t),
        "targets": [list(map(float, p)) for p in sample.targets],
        "handles": [to_px(h) for h in module.history["handles"]],
        **terms,  # motion_loss, mask_loss, loss (and any term a DragCallback added)
        "iterations": len(module.history["loss"]),
        "stopped_early": bool(module.reached),
        "stop_step": module.stop_step,
        "final_distance_px": final_distance(module, sample),
        "lora": start.lora_file,
        "seconds": seconds,
    }


def final_distance(module: DragEditModule, sample: DragSample) -> list[float]:
    h = grid_to_pixels(module.handles.cpu(), (sample.height, sample.width), module.grid_hw)
    t = torch.tensor(sample.targets, dtype=torch.float32)
    return (h - t).norm(dim=1).tolist()
