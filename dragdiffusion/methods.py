"""Drag methods on one denoising spine (``method=dragdiffusion|gooddrag|dragnoise|freedrag``).

The edit's denoising loop is the spine (``DragEditor.run``): at each denoising step i (timestep t_i) the method
may optimize the edited latent (one Lightning fit of a ``DragEditModule`` at t_i, a fresh optimizer each time);
while it drags, the original and the edited latent each take a plain DDIM step; from the first step at which the
method no longer drags, the rest is denoised: as the batch [original, edited] with reference control, or (a method
without control) the edited latent alone.

What a method says (no ``if method ==`` elsewhere):

- ``wants_drag(i)``: whether to drag at step i;
- ``drag_parts(ctx)``: that step's drag, one of two kinds: a fit (its optimizer-step budget, motion term,
  DragCallbacks, and the variable: the latent, or DragNoise's bottleneck), or a latent transform (``transform``:
  FastDrag's warp, no optimizer at all);
- ``after_drag(module)``: what the step's fit tells it;
- class flags: ``control_from_drag_step`` (the step that dragged is itself denoised with control, as in
  DragDiffusion, or first takes a plain step, as in GoodDrag: no control while dragging), ``needs_undragged``
  (the undragged branch's F0(t) and x_prev0(t) at each drag step: one no-grad forward of the original latent,
  which is also that branch's DDIM step), ``needs_bottleneck``, ``reference_control``, ``inversion_kv`` (the
  control of the denoising is the inversion's self-attention keys and values: FastDrag), ``optimizes`` (a fit:
  the DragText switch ``text.optimize`` applies);
- ``denoise_bottleneck`` / ``denoise_bottleneck_steps``: a bottleneck propagated through the denoising (DragNoise);
- ``settings()`` / ``trajectory_extra()``: what summaries and trajectory.json record; ``final_distance_of``: what its
  final handle distance measures (tracked handles; FreeDrag's planned template positions, FastDrag's planned warp
  destinations).

DragDiffusion: drag at step 0 only (up to ``drag.n_pix_step`` iterations, F0 from its first forward), control
from step 0: exactly the single-timestep pipeline. GoodDrag: drag at steps 0 .. ``gooddrag.drag_end_step - 1``
(30 optimizer steps at most each), information-preserving supervision and tracking against F0(t), control from
the first step without dragging. DragNoise: DragDiffusion's loop on the bottleneck, propagated, no control.
FreeDrag: one drag of template moves (freedrag.py), denoised as DragDiffusion. FastDrag: one latent warp at the
drag timestep (fastdrag.py), then the edited latent alone, with the inversion's keys and values in the up blocks'
self-attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .callbacks import DragStopState, GoodDragTracking, MaskRegularization, PointTracking
from .config import MethodName
from .drag import DragCallback
from .fastdrag import FILLS, mask_cells, pixels_to_latent, warp_latent
from .freedrag import FreeDragConstants, FreeDragMoves
from .motion import preserving_motion_loss


@dataclass
class UndraggedStep:
    """The original (undragged) latent at a drag step: its features on the supervision grid and its DDIM output."""
    features: torch.Tensor  # [C, gh, gw]
    x_prev: torch.Tensor  # [1, 4, h, w]: the original branch at the next step


@dataclass
class DragStepContext:
    """What a method gets to build one drag step."""
    index: int  # the denoising step (0 = the first, at the drag timestep)
    t: int
    undragged: UndraggedStep | None
    bottleneck: torch.Tensor | None = None  # the UNet's mid-block output for the latent (``needs_bottleneck``)


@dataclass
class TransformInput:
    """What a latent transform gets besides the latent: the drag in input pixels and its grids."""
    handles_xy: list  # input pixels (x, y)
    targets_xy: list
    mask: object  # H x W (1 = may change) or None
    image_hw: tuple[int, int]
    grid_hw: tuple[int, int]  # the supervision grid (the trajectory's coordinates)
    handles_rc: torch.Tensor  # the handles on that grid (row, col), as a fit starts from


@dataclass
class DragParts:
    """One drag step: a fit of at most ``max_steps`` optimizer steps with the motion term (None: DragDiffusion's)
    and the DragCallbacks (tracking, stop, extra terms); or, with ``transform``, a latent transform
    ``transform(z, TransformInput, t) -> TransformStep`` and no fit."""
    max_steps: int
    callbacks: list = field(default_factory=list)
    motion_loss: Callable | None = None
    bottleneck: torch.Tensor | None = None  # optimize this bottleneck instead of the latent (DragNoise)
    transform: Callable | None = None  # a drag that is a latent transform (FastDrag)


@dataclass
class TransformStep:
    """The record of a drag step that was a latent transform, with a drag module's record interface (``DragRun``
    reads it as it reads a ``DragEditModule``): no iterations; ``history["handles"]`` holds the handles before and
    after the transform (where it sent them, on the supervision grid)."""
    t: int
    z: torch.Tensor
    handles: torch.Tensor  # [N, 2] (row, col) on the supervision grid, after the transform
    grid_hw: tuple[int, int]
    history: dict
    record: dict = field(default_factory=dict)  # what trajectory.json keeps of the transform
    reached: bool = False
    stop_step: int | None = None
    step_offset: int = 0

    def edited_latent(self) -> torch.Tensor:
        return self.z.detach().clone()

    def edited_bottleneck(self) -> None:
        return None

    def edited_condition(self) -> None:
        return None


class DragMethod:
    """The base: a method that never drags (the spine then only denoises)."""
    name = "none"
    needs_undragged = False
    needs_bottleneck = False  # the drag step wants the latent's UNet bottleneck (``DragStepContext.bottleneck``)
    reference_control = True  # the denoising after the drag: [original, edited] with control, or the edited alone
    control_from_drag_step = False  # True: the step that dragged is denoised with control (DragDiffusion)
    inversion_kv = False  # the inversion records self-attention keys/values that the denoising uses (FastDrag)
    optimizes = True  # its drag is a fit: the DragText switch (text.optimize) applies
    # what trajectory.json's final_distance_px measures (summary.csv says it per sample): not comparable across
    # methods whose handles mean different things
    final_distance_of = "tracked handles"

    def __init__(self, cfg):
        self.cfg = cfg

    def wants_drag(self, i: int) -> bool:
        return False

    def drag_parts(self, ctx: DragStepContext) -> DragParts:
        raise NotImplementedError

    def after_drag(self, module) -> None:
        pass

    def settings(self) -> dict:
        """The method's own settings (for summaries and logs)."""
        return {}

    def denoise_bottleneck(self, modules) -> torch.Tensor | None:
        """A bottleneck that replaces the UNet's own during the denoising (DragNoise), else None."""
        return None

    def denoise_bottleneck_steps(self, n_steps: int) -> int:
        """How many of the ``n_steps`` remaining denoising steps use ``denoise_bottleneck`` (from the first)."""
        return 0

    def trajectory_extra(self) -> dict:
        """Method-specific records for trajectory.json (e.g. FreeDrag's moves)."""
        return {}


class DragDiffusionMethod(DragMethod):
    """Drag once, at the drag timestep: up to ``drag.n_pix_step`` iterations (published: 80)."""
    name = MethodName.dragdiffusion.value
    control_from_drag_step = True

    def wants_drag(self, i: int) -> bool:
        return i == 0

    def drag_parts(self, ctx: DragStepContext) -> DragParts:
        d = self.cfg.drag
        cbs = []
        if d.point_tracking:
            cbs.append(PointTracking(d.r_p, d.stop_distance))
        if d.mask_regularization:
            cbs.append(MaskRegularization(d.lam))
        return DragParts(int(d.n_pix_step), cbs)

    def settings(self) -> dict:
        d = self.cfg.drag
        return {"n_pix_step": int(d.n_pix_step), "lr": float(d.lr), "r_m": int(d.r_m), "r_p": int(d.r_p),
                "lam": float(d.lam), "inversion_strength": float(d.inversion_strength)}


class GoodDragMethod(DragMethod):
    """Alternating drag and denoise (AlDD) over the first ``gooddrag.drag_end_step`` steps."""
    name = MethodName.gooddrag.value
    needs_undragged = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state = DragStopState()

    def wants_drag(self, i: int) -> bool:
        return i < int(self.cfg.gooddrag.drag_end_step) and self.state.stopped is None

    def drag_parts(self, ctx: DragStepContext) -> DragParts:
        d, g = self.cfg.drag, self.cfg.gooddrag
        feat0 = ctx.undragged.features
        cbs = [GoodDragTracking(feat0, self.state, d.r_p, d.stop_distance, g.max_drag_per_track,
                                g.max_track_no_change)]
        if d.mask_regularization:
            cbs.append(MaskRegularization(d.lam, x0_prev=ctx.undragged.x_prev))

        def motion(feat, handles, targets, handles_init):
            return preserving_motion_loss(feat, feat0, handles_init, handles, targets, int(d.r_m), float(g.beta),
                                          float(d.stop_distance))
        return DragParts(int(g.track_per_step) * int(g.max_drag_per_track), cbs, motion)

    def settings(self) -> dict:
        d, g = self.cfg.drag, self.cfg.gooddrag
        return {"drag_end_step": int(g.drag_end_step), "track_per_step": int(g.track_per_step),
                "max_drag_per_track": int(g.max_drag_per_track), "max_track_no_change": int(g.max_track_no_change),
                "beta": float(g.beta), "lr": float(d.lr), "r1": int(d.r_m), "r2": int(d.r_p), "lam": float(d.lam),
                "inversion_strength": float(d.inversion_strength)}


class BottleneckNorm(DragCallback):
    """Records (and logs, as ``drag/bottleneck_norm``) the L2 norm of DragNoise's optimized bottleneck per step."""

    def __init__(self):
        self.norms: list[torch.Tensor] = []

    def loss_terms(self, module, step):
        norm = module.bottleneck.detach().norm()
        self.norms.append(norm)
        if module.listening():
            module.log("drag/bottleneck_norm", norm, on_step=True)
        return {}


class DragNoiseMethod(DragDiffusionMethod):
    """DragNoise: DragDiffusion's loop on the UNet bottleneck (z_t fixed), then that bottleneck in the denoising
    (every step but the last ``dragnoise.end_step``), without reference control."""
    name = MethodName.dragnoise.value
    needs_bottleneck = True
    reference_control = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.norm = BottleneckNorm()

    def drag_parts(self, ctx: DragStepContext) -> DragParts:
        parts = super().drag_parts(ctx)
        parts.bottleneck = ctx.bottleneck
        parts.callbacks.append(self.norm)
        return parts

    def denoise_bottleneck(self, modules) -> torch.Tensor | None:
        return modules[-1].edited_bottleneck()

    def denoise_bottleneck_steps(self, n_steps: int) -> int:
        return max(0, n_steps - int(self.cfg.dragnoise.end_step))

    def settings(self) -> dict:
        return {**super().settings(), "end_step": int(self.cfg.dragnoise.end_step)}

    def trajectory_extra(self) -> dict:
        return {"bottleneck_norm": [float(v) for v in self.norm.norms]}


class FreeDragMethod(DragMethod):
    """FreeDrag: one drag at the drag timestep made of moves (templates, line search, roll-back; no tracking),
    at most ``freedrag.max_step`` Adam steps; denoising as DragDiffusion's."""
    name = MethodName.freedrag.value
    control_from_drag_step = True
    final_distance_of = "planned template positions, not tracked"

    def __init__(self, cfg):
        super().__init__(cfg)
        f = cfg.freedrag
        self.moves = FreeDragMoves(FreeDragConstants(float(f.l_expected), float(f.threshold_d), float(f.d_max),
                                                     int(f.candidates)), int(f.win_r), int(f.steps_per_move))

    def wants_drag(self, i: int) -> bool:
        return i == 0

    def drag_parts(self, ctx: DragStepContext) -> DragParts:
        d = self.cfg.drag
        cbs = [self.moves]
        if d.mask_regularization:
            cbs.append(MaskRegularization(d.lam, reduction="mean"))
        return DragParts(int(self.cfg.freedrag.max_step), cbs, self.moves.motion_loss)

    def settings(self) -> dict:
        f, d = self.cfg.freedrag, self.cfg.drag
        return {"win_r": int(f.win_r), "l_expected": float(f.l_expected), "threshold_d": float(f.threshold_d),
                "d_max": float(f.d_max), "candidates": int(f.candidates), "steps_per_move": int(f.steps_per_move),
                "max_step": int(f.max_step), "lr": float(d.lr), "lam": float(d.lam),
                "inversion_strength": float(d.inversion_strength)}

    def trajectory_extra(self) -> dict:
        return {"freedrag_moves": self.moves.state.moves}


class FastDragMethod(DragMethod):
    """FastDrag: one latent warp at the drag timestep (no LoRA, no optimizer: ``fastdrag.py``), then the edited latent
    alone through the denoising, the up blocks' self-attention taking its keys and values from the inversion at the
    same timestep (``attention.InversionKV``)."""
    name = MethodName.fastdrag.value
    control_from_drag_step = True
    reference_control = False
    inversion_kv = True
    optimizes = False
    final_distance_of = "planned warp destinations, not tracked"

    def wants_drag(self, i: int) -> bool:
        return i == 0

    def drag_parts(self, ctx: DragStepContext) -> DragParts:
        return DragParts(0, transform=self.warp)

    def warp(self, z: torch.Tensor, given: TransformInput, t: int) -> TransformStep:
        latent_hw = tuple(z.shape[-2:])
        handles = pixels_to_latent(given.handles_xy, given.image_hw, latent_hw)
        targets = pixels_to_latent(given.targets_xy, given.image_hw, latent_hw)
        mask = None if given.mask is None else torch.as_tensor(given.mask)
        whole_image = mask is None or not bool(mask.any())
        cells = mask_cells(None if whole_image else mask, latent_hw)
        warp = warp_latent(z.float(), cells, handles, targets)
        fill = FILLS[str(self.cfg.fastdrag.fill)]
        z_new = fill(warp.z, warp.holes, fallback=z.float())
        scale = torch.tensor([given.grid_hw[0] / latent_hw[0], given.grid_hw[1] / latent_hw[1]])
        moved = warp.handle_destinations.cpu() * scale
        record = {"moved_cells": warp.moved_cells, "holes": int(warp.holes.sum()),
                  "circle": {"centre_rc": [float(v) for v in warp.centre], "radius": warp.radius},
                  "whole_image": whole_image}
        history = {"handles": [given.handles_rc.cpu().tolist(), moved.tolist()], "motion_loss": [], "mask_loss": [],
                   "loss": []}
        return TransformStep(t, z_new, moved.to(given.handles_rc.device), tuple(given.grid_hw), history, record)

    def after_drag(self, module) -> None:
        self.record = module.record

    def settings(self) -> dict:
        d, f = self.cfg.drag, self.cfg.fastdrag
        return {"fill": str(f.fill), "kv_layers": list(f.kv_layers), "num_inference_steps": int(d.num_inference_steps),
                "inversion_strength": float(d.inversion_strength)}

    def trajectory_extra(self) -> dict:
        return {"fastdrag": getattr(self, "record", {})}


METHODS: dict[str, type[DragMethod]] = {m.name: m for m in (DragDiffusionMethod, GoodDragMethod, DragNoiseMethod,
                                                            FreeDragMethod, FastDragMethod)}


def make_method(cfg) -> DragMethod:
    """A fresh method object for one edit (it may keep state across the edit's drag steps)."""
    return METHODS[str(cfg.get("method", MethodName.dragdiffusion))](cfg)
