"""Callbacks of the drag module: point tracking (with the early stop) and mask regularization."""
from __future__ import annotations

import lightning as L
import torch

from .motion import all_reached, mask_loss, track_points


class PointTracking(L.Callback):
    """Moves the handles after each step by nearest-feature search; stops the Trainer when all are reached."""

    def __init__(self, r_p: int = 3, stop_distance: float = 2.0):
        self.r_p = r_p
        self.stop_distance = stop_distance

    def setup(self, trainer, pl_module, stage):
        pl_module.point_tracking = self

    def track(self, module, feat: torch.Tensor) -> torch.Tensor:
        return track_points(module.feat0, feat, module.handles_init, module.handles, self.r_p)

    def reached(self, module) -> bool:
        return all_reached(module.handles, module.targets, self.stop_distance)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.reached:
            trainer.should_stop = True


class MaskRegularization(L.Callback):
    """Adds lam * sum |x_prev - x0_prev| * (1 - M) outside the editable mask; off for an empty mask."""

    def __init__(self, lam: float = 0.1):
        self.lam = lam

    def setup(self, trainer, pl_module, stage):
        pl_module.mask_regularization = self

    def active(self, module) -> bool:
        m = module.mask_latent
        return self.lam > 0 and m is not None and bool(m.any())

    def loss(self, module, x_prev: torch.Tensor) -> torch.Tensor:
        return mask_loss(x_prev, module.x0_prev, module.mask_latent, self.lam)
