"""Callbacks of the drag module: point tracking (with the early stop) and mask regularization."""
from __future__ import annotations

import lightning as L
import torch

from .errors import DragError
from .motion import all_reached, mask_loss, track_points
from .sample import grid_to_pixels


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


class EditCancelled(DragError):
    """The edit was cancelled (by the user, through ``ProgressReporter.should_cancel``)."""


class ProgressReporter(L.Callback):
    """Reports every step of a fit to ``report(stage, step, total, handles)`` and stops a cancelled one.

    ``stage`` is "drag" for the drag module (``handles``: the current handles in pixels (x, y) of an image of
    ``image_hw``) and "lora" otherwise (``handles`` None). ``should_cancel()`` is asked before every step;
    when true the fit stops with EditCancelled. Used by the browser app for live progress and its cancel.
    """

    def __init__(self, report, image_hw: tuple[int, int] | None = None, should_cancel=None):
        self.report = report
        self.image_hw = image_hw
        self.should_cancel = should_cancel or (lambda: False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.should_cancel():
            raise EditCancelled("cancelled")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        handles = getattr(pl_module, "handles", None)
        if handles is None or self.image_hw is None:
            self.report("lora", trainer.global_step, trainer.max_steps, None)
            return
        xy = grid_to_pixels(handles.detach().cpu(), self.image_hw, pl_module.grid_hw)
        self.report("drag", len(pl_module.history["handles"]), trainer.max_steps, xy.tolist())
