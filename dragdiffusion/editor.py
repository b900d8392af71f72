"""DragEditor: the public API that runs the stages for one sample (used by edit.py, the app, notebooks).

sample -> backbone -> (LoRA) -> DDIM inversion -> drag optimization (Lightning Trainer) -> denoising with
reference-latent control -> image of the input's size + trajectory.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import quiet_lightning
from .attention import StepWindow, reference_control
from .backbone import Backbone, decode_latent, encode_image, encode_prompt, load_backbone
from .callbacks import MaskRegularization, PointTracking
from .config import EditConfig, load_config, to_yaml
from .errors import ConfigError
from .ddim import ddim_denoise, ddim_invert, inversion_timesteps
from .drag import DragEditModule
from .loggers import TrajectoryLogger, log_edit_result
from .io import save_json, save_png, save_text
from .motion import resize_mask
from .policy import DevicePolicy
from .sample import DragSample, draw_drag, grid_size, grid_to_pixels, pixels_to_grid, working_size


@dataclass
class EditResult:
    image: np.ndarray  # H x W x 3 uint8, the input's size
    trajectory: dict
    sample: DragSample
    seconds: dict = field(default_factory=dict)
    z_t: torch.Tensor | None = None
    z_edited: torch.Tensor | None = None

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
        from .data.convert import write_folder_sample
        folder = write_folder_sample(self.sample, folder)
        inputs_cleared = {"sample": None, "data": None, "image": None, "points": None, "mask": None}
        save_text(Path(folder) / "config.yaml", to_yaml(OmegaConf.merge(config, inputs_cleared)))
        return Path(folder)


def to_tensor_image(image: np.ndarray, size_wh: tuple[int, int]) -> torch.Tensor:
    """uint8 H x W x 3 -> [1, 3, h, w] in [-1, 1], bilinear-resized to ``size_wh``."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    w, h = size_wh
    if (x.shape[-1], x.shape[-2]) != (w, h):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x


def to_uint8_image(x: torch.Tensor, size_wh: tuple[int, int]) -> np.ndarray:
    """[1, 3, h, w] in [0, 1] -> H x W x 3 uint8 resized to ``size_wh``."""
    w, h = size_wh
    if (x.shape[-1], x.shape[-2]) != (w, h):
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x[0].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


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

    # ---------------------------------------------------------------- stages
    def unet_fn(self):
        """eps(z, t, cond) in fp32 for the passes outside a Trainer (inversion, denoising, generation)."""
        unet = self.backbone.unet
        policy = self.policy

        def fn(z, t, c):
            with policy.autocast():
                return unet(z.to(unet.dtype), t, encoder_hidden_states=c.to(unet.dtype)).sample.float()
        return fn

    def prepare_lora(self, sample: DragSample, out_dir: Path | None = None, logger=False, callbacks=()) -> str | None:
        """Load ``lora.path``, or train the identity LoRA when ``lora.enabled``; returns the file used."""
        from . import lora as lora_lib  # the identity-LoRA stage (also removes a previous sample's LoRA)
        return lora_lib.prepare_for_edit(self, sample, out_dir, logger, callbacks)

    def invert(self, image: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None):
        """(z0, z_t, t, denoise timesteps) for a [1, 3, H, W] image in [-1, 1]."""
        d = self.cfg.drag
        sched = self.backbone.scheduler
        inv_ts, denoise_ts = inversion_timesteps(sched, d.num_inference_steps, d.inversion_strength)
        z0 = encode_image(self.backbone, image)
        # the inversion runs without guidance (guidance > 1 in inversion is a known source of failure)
        z_t = ddim_invert(self.unet_fn(), sched, z0, cond, inv_ts)
        return z0, z_t, denoise_ts[0], denoise_ts

    def drag_latent(self, z_t, t, cond, handles_rc, targets_rc, grid_hw, mask_latent=None, callbacks=(),
                    logger=False, guidance_scale: float = 1.0) -> DragEditModule:
        """Optimize z_t; ``guidance_scale`` > 1 (a generated image) needs ``cond`` = [uncond, cond]."""
        d = self.cfg.drag
        module = DragEditModule(self.backbone.unet, self.backbone.scheduler, z_t, t, cond, handles_rc, targets_rc,
                                grid_hw, d, mask_latent, guidance_scale=guidance_scale)
        cbs = list(callbacks)
        if d.point_tracking:
            cbs.append(PointTracking(d.r_p, d.stop_distance))
        if d.mask_regularization:
            cbs.append(MaskRegularization(d.lam))
        if d.n_pix_step > 0:
            tc = self.cfg.trainer
            trainer = self.policy.trainer(d.n_pix_step, cbs, logger, bool(self.cfg.quiet), bool(tc.enable_progress_bar),
                                          int(tc.log_every_n_steps))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available but not used|"
                                                  "`training_step` returned `None`|TPU available).*")
                trainer.fit(module)
        return module

    def denoise(self, z_t, z_edit, cond, timesteps, uncond=None, guidance_scale: float | None = None) -> torch.Tensor:
        """Denoise [z_t, z_edit] with reference control; guidance ``drag.guidance_scale`` unless given."""
        r = self.cfg.reference
        sched = self.backbone.scheduler
        scale = self.cfg.drag.guidance_scale if guidance_scale is None else guidance_scale
        z = torch.cat([z_t, z_edit]).float()
        window = StepWindow(r.start_step, r.end_step)
        prefixes = list(r.layers) if r.enabled else []

        def on_step(i, t):
            window.step = i

        unet_fn = self.unet_fn()
        if scale > 1 and uncond is not None:
            # guidance batches [uncond rows, cond rows]: run each half alone so every forward keeps the
            # [original, edited] layout that the reference control expects
            plain = unet_fn
            unet_fn = lambda z, t, c: torch.cat([plain(zz, t, cc) for zz, cc in zip(z.chunk(2), c.chunk(2))])
        with reference_control(self.backbone.unet, prefixes, window):
            z = ddim_denoise(unet_fn, sched, z, cond, timesteps, uncond, scale, on_step)
        return z

    # ---------------------------------------------------------------- generated images (generated.py)
    def generate(self, prompt: str | None = None):
        """Sample an image from ``prompt`` (``generation.*``), keeping the latent at the drag timestep."""
        from .generated import generate
        return generate(self, prompt)

    def edit_generated(self, generated, points, mask=None, callbacks=(), logger=False) -> "EditResult":
        """Drag a ``GeneratedImage`` without inversion (points: [[x, y], ...] alternating handle, target)."""
        from .generated import edit_generated
        return edit_generated(self, generated, points, mask, callbacks, logger)

    # ---------------------------------------------------------------- the whole edit
    def edit(self, sample: DragSample, callbacks=(), logger=False, out_dir: str | Path | None = None,
             lora_callbacks=()) -> EditResult:
        """``callbacks``: extra callbacks of the drag Trainer; ``lora_callbacks``: of the LoRA Trainer."""
        sample.validate()
        d = self.cfg.drag
        L.seed_everything(int(self.cfg.seed), verbose=False)
        seconds: dict[str, float] = {}
        work_w, work_h = working_size(sample.width, sample.height, d.width)
        grid_hw = grid_size(work_w, work_h, d.sup_res_factor)
        # pixels of the input -> grid: the scale is linear, so the input size maps straight to the grid
        handles_rc = pixels_to_grid(sample.handles, (sample.height, sample.width), grid_hw)
        targets_rc = pixels_to_grid(sample.targets, (sample.height, sample.width), grid_hw)

        backbone = self.backbone
        tic = time.perf_counter()
        lora_file = self.prepare_lora(sample, Path(out_dir) if out_dir else None, logger, lora_callbacks)
        seconds["lora"] = time.perf_counter() - tic
        cond = encode_prompt(backbone, sample.prompt)
        uncond = encode_prompt(backbone, "") if d.guidance_scale > 1 else None
        image = to_tensor_image(sample.image, (work_w, work_h)).to(self.device)

        tic = time.perf_counter()
        _, z_t, t, denoise_ts = self.invert(image, cond)
        seconds["inversion"] = time.perf_counter() - tic

        mask_latent = None
        if sample.has_mask:
            mask_latent = resize_mask(torch.from_numpy(sample.mask), tuple(z_t.shape[-2:])).to(self.device)
        tic = time.perf_counter()
        module = self.drag_latent(z_t, t, cond, handles_rc.to(self.device), targets_rc.to(self.device),
                                  grid_hw, mask_latent, self.logging_callbacks(sample, callbacks, logger),
                                  logger or False)
        seconds["drag"] = time.perf_counter() - tic

        tic = time.perf_counter()
        z = self.denoise(z_t, module.edited_latent(), cond, denoise_ts, uncond)
        edited = decode_latent(backbone, z[1:])
        seconds["denoise"] = time.perf_counter() - tic
        out_image = to_uint8_image(edited, (sample.width, sample.height))

        trajectory = edit_trajectory(module, sample, (work_w, work_h), grid_hw, t, lora_file, seconds)
        result = EditResult(out_image, trajectory, sample, seconds, z_t.detach(), module.edited_latent())
        log_edit_result(logger, result)  # before/after pair + trajectory table (nothing without a logger)
        return result

    def logging_callbacks(self, sample: DragSample, callbacks, logger) -> list:
        """``callbacks`` + a TrajectoryLogger (``logger.image_every``, ``logger.image_source``) when logging."""
        cbs = list(callbacks)
        if logger and not any(isinstance(c, TrajectoryLogger) for c in cbs):
            lg = self.cfg.logger
            decode = (lambda z: decode_latent(self.backbone, z)) if lg.image_source == "estimate" else None
            cbs.append(TrajectoryLogger(sample, lg.image_every, decode))
        return cbs


def edit_trajectory(module: DragEditModule, sample: DragSample, work_wh, grid_hw, t: int, lora_file, seconds) -> dict:
    """trajectory.json: handles in input-image pixels per iteration, the loss terms, the stop and timings."""
    to_px = lambda rc: grid_to_pixels(torch.tensor(rc), (sample.height, sample.width), grid_hw).tolist()
    return {
        "sample": sample.name,
        "image_size": [sample.width, sample.height],
        "working_size": list(work_wh),
        "grid_size": [grid_hw[1], grid_hw[0]],
        "t": int(t),
        "targets": [list(map(float, p)) for p in sample.targets],
        "handles": [to_px(h) for h in module.history["handles"]],
        "motion_loss": module.history["motion_loss"],
        "mask_loss": module.history["mask_loss"],
        "loss": module.history["loss"],
        "iterations": len(module.history["loss"]),
        "stopped_early": bool(module.reached),
        "stop_step": module.stop_step,
        "final_distance_px": _final_distance(module, sample, grid_hw),
        "lora": lora_file,
        "seconds": seconds,
    }


def _final_distance(module: DragEditModule, sample: DragSample, grid_hw) -> list[float]:
    h = grid_to_pixels(module.handles.cpu(), (sample.height, sample.width), grid_hw)
    t = torch.tensor(sample.targets, dtype=torch.float32)
    return (h - t).norm(dim=1).tolist()
