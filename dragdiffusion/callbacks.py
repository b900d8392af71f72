"""Callbacks of the drag module: point tracking with the early stop, the mask term (both DragCallbacks, the
drag module's declared extension point), and progress reporting with cancel."""
from __future__ import annotations

import lightning as L
import torch

from .drag import DragCallback, DragEditModule, DragStep
from .errors import DragError
from .motion import all_reached, mask_loss, track_points
from .geometry import grid_to_pixels


class PointTracking(DragCallback):
    """Moves the handles from the second iteration on by nearest-feature search around each handle (window radius
    ``r_p``) against F0, the first iteration's features at the handle's original position; stops the drag when
    every handle is within ``stop_distance`` grid cells of its target."""

    def __init__(self, r_p: int = 3, stop_distance: float = 2.0):
        self.r_p = r_p
        self.stop_distance = stop_distance
        self.feat0: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module):
        self.feat0 = None

    def track(self, module: DragEditModule, step: DragStep) -> torch.Tensor | None:
        if step.index == 0 or self.feat0 is None:
            self.feat0 = step.features.detach()  # the original latent's features
            return None
        return track_points(self.feat0, step.features, module.handles_init, step.handles, self.r_p)

    def reached(self, module: DragEditModule, step: DragStep) -> bool:
        return all_reached(module.handles, module.targets, self.stop_distance)


class MaskRegularization(DragCallback):
    """Adds ``mask_loss`` = lam * sum |x_prev - x0_prev| * (1 - M) outside the editable mask (x_prev: the DDIM step
    of the current latent, x0_prev: of the original one); off for an empty mask or lam = 0.

    ``x0_prev``: the reference DDIM output when it is known beforehand (GoodDrag: the undragged trajectory's at
    this timestep); by default it is the DDIM step of the original latent, taken at the first iteration."""

    def __init__(self, lam: float = 0.1, x0_prev: torch.Tensor | None = None, reduction: str = "sum"):
        self.lam = lam
        self.reduction = reduction
        self.given_x0_prev = x0_prev
        self.x0_prev: torch.Tensor | None = x0_prev
        self.active: bool | None = None

    def on_train_start(self, trainer, pl_module):
        self.x0_prev, self.active = self.given_x0_prev, None

    def needs_eps(self, module: DragEditModule) -> bool:
        if self.active is None:  # once per fit: the mask does not change
            m = module.mask_latent
            self.active = self.lam > 0 and m is not None and bool(m.any())
        return self.active

    def loss_terms(self, module: DragEditModule, step: DragStep) -> dict[str, torch.Tensor]:
        if step.eps is None or not self.needs_eps(module):
            return {}
        if self.x0_prev is None:  # the first iteration: z is still the original latent
            self.x0_prev = module.x_prev(module.z_t_original, step.eps.detach())
        return {"mask_loss": mask_loss(module.x_prev(step.z, step.eps), self.x0_prev, module.mask_latent, self.lam,
                                       self.reduction)}


class DragStopState:
    """What a multi-timestep drag carries from one drag step to the next: the no-change counter and the stop."""

    def __init__(self):
        self.no_change = 0
        self.stopped: str | None = None  # None while dragging; "reached" or "no_change" once stopped for good


class GoodDragTracking(DragCallback):
    """GoodDrag's point tracking and stop rules inside one drag step (one fit at one timestep).

    Tracks at the step's first forward and after every ``track_every``-th optimizer step (with the features of
    the forward just before that update), by nearest-feature search in a window of radius ``r_p`` (clipped to the
    grid) against ``feat0`` (the UNDRAGGED features at this timestep) at each handle's ORIGINAL position. A round
    after an update in which no handle moved counts toward ``max_no_change``; a move resets the count; the count
    carries over between drag steps (``state``). Dragging stops for good, before the update, when every handle is
    within ``stop_distance`` of its target or the count reached ``max_no_change``."""

    def __init__(self, feat0: torch.Tensor, state: DragStopState, r_p: int = 12, stop_distance: float = 2.0,
                 track_every: int = 3, max_no_change: int = 5):
        self.feat0 = feat0
        self.state = state
        self.r_p, self.stop_distance = int(r_p), float(stop_distance)
        self.track_every, self.max_no_change = int(track_every), int(max_no_change)
        self.last_features: torch.Tensor | None = None

    def track(self, module: DragEditModule, step: DragStep) -> torch.Tensor | None:
        self.last_features = step.features.detach()
        if step.index == 0:
            return track_points(self.feat0, step.features, module.handles_init, step.handles, self.r_p)
        return None

    def reached(self, module: DragEditModule, step: DragStep) -> bool:
        if all_reached(module.handles, module.targets, self.stop_distance):
            self.state.stopped = "reached"
        elif self.state.no_change >= self.max_no_change:
            self.state.stopped = "no_change"
            module.stop_reason = f"no handle moved in {self.max_no_change} tracking rounds"
        return self.state.stopped is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        updates = pl_module.global_step  # optimizer steps taken in this fit
        if self.last_features is None or updates == 0 or updates % self.track_every or pl_module.reached:
            return
        moved = track_points(self.feat0, self.last_features, pl_module.handles_init, pl_module.handles, self.r_p)
        if bool((moved != pl_module.handles).any()):  # one host copy every track_every steps
            self.state.no_change = 0
        else:
            self.state.no_change += 1
        pl_module.handles.copy_(moved)


class EditCancelled(DragError):
    """The edit was cancelled (by the user, through ``ProgressReporter.should_cancel``)."""


class ProgressReporter(L.Callback):
    """Reports every step of every stage of an edit to ``report(stage, step, total, handles)`` and stops a
    cancelled edit.

    ``stage`` is the stage's label as its console bar shows it ("LoRA", "inversion", "drag" or, for a method that
    drags at several timesteps, "drag step 2/7 (t=721)", "denoise", "decode", "generation"); ``step`` of ``total``
    is counted as that bar counts (a drag fit: the optimizer steps taken of its budget). ``handles``: for a drag
    stage the current handles in pixels (x, y) of an image of ``image_hw``, else None. "lora_reused" (step 0 of
    0) when the editor reused the identity LoRA instead of training it (``handles``: {"file": ..., "seconds":
    ...}). The LoRA and drag Trainers call it as a Lightning callback, the loops outside a Trainer through
    ``stage_progress`` (``DragEditor`` hands them its edit's callbacks that have it). ``should_cancel()`` is asked
    before every step; when true the edit stops with EditCancelled. Used by the browser app for live progress and
    its cancel.
    """

    def __init__(self, report, image_hw: tuple[int, int] | None = None, should_cancel=None):
        self.report = report
        self.image_hw = image_hw
        self.should_cancel = should_cancel or (lambda: False)

    def stage_progress(self, stage: str, step: int, total: int, handles=None) -> None:
        if self.should_cancel():
            raise EditCancelled("cancelled")
        self.report(stage, step, total, handles)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.should_cancel():
            raise EditCancelled("cancelled")

    def on_lora_reused(self, file: str, seconds: float):
        """``DragEditor.prepare_lora`` reused the identity LoRA (no LoRA Trainer runs)."""
        self.report("lora_reused", 0, 0, {"file": file, "seconds": float(seconds)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stage = str(getattr(pl_module, "stage_label", None) or "LoRA")
        if not isinstance(pl_module, DragEditModule) or self.image_hw is None:
            self.report(stage, trainer.global_step, trainer.max_steps, None)
            return
        xy = grid_to_pixels(pl_module.handles.detach().cpu(), self.image_hw, pl_module.grid_hw)
        self.report(stage, len(pl_module.history["loss"]), trainer.max_steps, xy.tolist())
