"""DragEditModule: the latent z_t is the optimized parameter; one training step = one drag iteration.

The module orchestrates the pure functions of motion.py / ddim.py / features.py. Point tracking and the
mask term are supplied by the PointTracking and MaskRegularization callbacks (callbacks.py): without them
the handles stay where they started and no mask term is added.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from .ddim import ddim_step
from .data.datamodule import StepIndices
from .features import unet_eps_and_features
from .motion import handle_distances, motion_supervision_loss


def cfg_feature_weight(guidance_scale: float) -> float:
    """c = s / (2s - 1): the weight of the conditional features under classifier-free guidance s."""
    return guidance_scale / (2 * guidance_scale - 1)


def mix_guided_features(f_uncond: torch.Tensor, f_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Features of a guided forward: ((1 - c) F_uncond, c F_cond) concatenated on channels (dim -3)."""
    c = cfg_feature_weight(guidance_scale)
    return torch.cat([(1 - c) * f_uncond, c * f_cond], dim=-3)


class DragEditModule(L.LightningModule):
    """Optimizes z_t so that the UNet features at each handle move toward its target.

    Args:
        unet: the (frozen) UNet; kept outside the module's parameters and state_dict.
        scheduler: DDIM scheduler with ``set_timesteps`` already called.
        z_t: inverted latent [1, 4, h, w] at timestep ``t``.
        cond: prompt embedding [1, 77, D] (or [2, 77, D] uncond+cond with ``guidance_scale`` > 1).
        handles, targets: (row, col) on the supervision grid, [N, 2].
        drag: the ``drag`` config section.
        guidance_scale: classifier-free guidance s of a generated image (cond then holds uncond, cond):
            features are ``mix_guided_features`` of both halves, eps is the guided prediction.
    """

    def __init__(self, unet, scheduler, z_t: torch.Tensor, t: int, cond: torch.Tensor, handles: torch.Tensor,
                 targets: torch.Tensor, grid_hw: tuple[int, int], drag, mask_latent: torch.Tensor | None = None,
                 guidance_scale: float = 1.0):
        super().__init__()
        if guidance_scale > 1 and cond.shape[0] != 2:
            raise ValueError("guidance_scale > 1 needs cond = [uncond, cond] (2 rows), got "
                             f"{cond.shape[0]} row(s)")
        self.guidance_scale = float(guidance_scale)
        object.__setattr__(self, "unet", unet)  # not a submodule: frozen, not saved, not wrapped
        self.scheduler = scheduler
        self.t = int(t)
        self.drag = drag
        self.grid_hw = tuple(grid_hw)
        self.z_t = torch.nn.Parameter(z_t.detach().clone().float())
        self.register_buffer("z_t_original", z_t.detach().clone().float(), persistent=False)
        self.register_buffer("cond", cond.detach().clone(), persistent=False)
        self.register_buffer("handles_init", handles.detach().clone().float(), persistent=False)
        self.register_buffer("handles", handles.detach().clone().float(), persistent=False)
        self.register_buffer("targets", targets.detach().clone().float(), persistent=False)
        self.register_buffer("mask_latent", None if mask_latent is None else mask_latent.float(), persistent=False)
        self.feat0: torch.Tensor | None = None
        self.x0_prev: torch.Tensor | None = None
        self.point_tracking = None  # set by the PointTracking callback
        self.mask_regularization = None  # set by the MaskRegularization callback
        self.reached = False
        self.stop_step: int | None = None
        self.history: dict[str, list] = {"handles": [], "motion_loss": [], "mask_loss": [], "loss": []}

    # ------------------------------------------------------------------ the UNet as a function of z
    def eps_and_features(self, z: torch.Tensor, need_eps: bool = True):
        """(eps, features [C, gh, gw]) for one latent; the feature grid of the configured up_blocks."""
        cond = self.cond
        guided = self.guidance_scale > 1
        if guided:
            z = torch.cat([z, z])
        eps, feats = unet_eps_and_features(self.unet, z.to(self.unet.dtype), self.t, cond, list(self.drag.feature_blocks),
                                           self.grid_hw, need_eps=need_eps)
        eps = None if eps is None else eps.float()
        if not guided:
            return eps, feats[0]
        if eps is not None:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        return eps, mix_guided_features(feats[0], feats[1], self.guidance_scale)

    def x_prev(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return ddim_step(self.scheduler, eps, self.t, z)

    @property
    def uses_mask_term(self) -> bool:
        return self.mask_regularization is not None and self.mask_regularization.active(self)

    # ------------------------------------------------------------------ Lightning hooks
    def remember_original(self, eps: torch.Tensor | None, feat: torch.Tensor) -> None:
        """Keep F0 and x0_prev of the original z_t (no grad)."""
        self.feat0 = feat.detach()
        self.x0_prev = self.x_prev(self.z_t_original, eps.detach()) if eps is not None else None

    def training_step(self, batch, batch_idx):
        step = self.global_step
        eps, feat = self.eps_and_features(self.z_t, need_eps=self.uses_mask_term)
        if self.feat0 is None:  # step 0's forward is the original z_t's: no separate UNet pass for F0, x0_prev
            if step == 0:
                self.remember_original(eps, feat)
            else:  # a fit that starts past step 0
                with torch.no_grad():
                    self.remember_original(*self.eps_and_features(self.z_t_original, self.uses_mask_term))
        if self.point_tracking is not None and step > 0:
            self.handles.copy_(self.point_tracking.track(self, feat))
        self.history["handles"].append(self.handles.tolist())
        distances = handle_distances(self.handles, self.targets)
        for i, d in enumerate(distances.tolist()):
            self.log(f"drag/distance_{i}", d, on_step=True, prog_bar=False)
        if self.point_tracking is not None and self.point_tracking.reached(self):
            self.reached = True
            self.stop_step = step
            return None  # no update at this step; PointTracking stops the Trainer
        motion = motion_supervision_loss(feat, self.handles, self.targets, self.drag.r_m)
        mask = self.mask_regularization.loss(self, self.x_prev(self.z_t, eps)) if self.uses_mask_term \
            else motion.new_zeros(())
        loss = motion + mask
        self.history["motion_loss"].append(float(motion.detach()))
        self.history["mask_loss"].append(float(mask.detach()))
        self.history["loss"].append(float(loss.detach()))
        self.log_dict({"drag/motion_loss": motion, "drag/mask_loss": mask, "drag/loss": loss}, on_step=True,
                      prog_bar=True)
        return loss

    def configure_optimizers(self):
        name = self.drag.optimizer
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        return cls([self.z_t], lr=self.drag.lr)

    def train_dataloader(self):
        return DataLoader(StepIndices(max(1, self.drag.n_pix_step)), batch_size=1)

    # ------------------------------------------------------------------ results
    def edited_latent(self) -> torch.Tensor:
        return self.z_t.detach().clone()
