"""FreeDrag's point moves: feature templates, the adaptive template update, line search and roll-back.

Pure functions on tensors (points are (row, col) on the supervision grid; features [C, H, W]) plus
``FreeDragMoves``, the DragCallback that runs them inside the drag module's loop (no point tracking).

The constants follow the paper's code: l = ``l_expected``, a point has moved well when its template distance is
about l; threshold_l = l / 2; a = ln 9 / (0.6 l), b = 0.2 l in the template weight w = 1 / (1 + exp(a (loss - b))).
Every window and every position is kept inside the grid (the reference's windows are not clipped and its
roll-back can leave the image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .drag import DragCallback, DragEditModule, DragStep
from .motion import bilinear_sample, patch_offsets


@dataclass(frozen=True)
class FreeDragConstants:
    l: float = 1.0  # noqa: E741 - the paper's name
    threshold_d: float = 2.0
    d_max: float = 5.0
    candidates: int = 10

    @property
    def threshold_l(self) -> float:
        return 0.5 * self.l

    @property
    def a(self) -> float:
        return math.log(9.0) / (0.6 * self.l)

    @property
    def b(self) -> float:
        return 0.2 * self.l


def clip_points(points: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(row, col) points kept inside the grid: [0, H - 1] x [0, W - 1]."""
    h, w = grid_hw
    return torch.stack([points[..., 0].clamp(0, h - 1), points[..., 1].clamp(0, w - 1)], dim=-1)


def windows(feat: torch.Tensor, points: torch.Tensor, win_r: int) -> torch.Tensor:
    """Features bilinearly sampled on the (2 win_r + 1)^2 offsets around each point: [N, K, C] (differentiable;
    offsets off the grid take the border value)."""
    offsets = patch_offsets(win_r, feat.device)
    return bilinear_sample(feat, points.float()[:, None, :] + offsets[None])


def template_distance(window: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Mean L1 between windows [N, K, C] (or [M, N, K, C]) and templates [N, K, C]: [N] (or [M, N])."""
    return (window - template).abs().mean(dim=(-2, -1))


def template_weight(loss_end: torch.Tensor, k: FreeDragConstants) -> torch.Tensor:
    """w = 1 / (1 + exp(a (loss_end - b))): 0.5 at loss_end = b, toward 1 for a small distance."""
    return 1.0 / (1.0 + torch.exp(k.a * (loss_end - k.b)))


def candidates_along(start: torch.Tensor, target: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """n points from ``start`` toward ``target`` at fractions 1/n ... 1 of ``length``: [n, N, 2]."""
    delta = target - start
    unit = delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    fractions = torch.arange(1, n + 1, device=start.device, dtype=start.dtype) / n
    return start[None] + fractions[:, None, None] * length[None, :, None] * unit[None]


def search(feat: torch.Tensor, template: torch.Tensor, cands: torch.Tensor, win_r: int,
           closest_to: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate [n, N, 2] per point whose window's template distance is closest to ``closest_to`` (or the
    smallest, with None): (points [N, 2], their scores [N])."""
    n, npts, _ = cands.shape
    scores = template_distance(windows(feat, cands.reshape(-1, 2), win_r).reshape(n, npts, -1, feat.shape[0]),
                               template[None])  # [n, N]
    key = scores if closest_to is None else (scores - closest_to).abs()
    best = key.argmin(dim=0)  # [N]: the first on ties (the nearest fraction)
    idx = torch.arange(npts, device=cands.device)
    return cands[best, idx], scores[best, idx]


SEARCH, STAY, ROLL_BACK, DONE = "search", "stay", "roll_back", "done"


def plan_moves(feat: torch.Tensor, template: torch.Tensor, points: torch.Tensor, targets: torch.Tensor,
               loss_end: torch.Tensor, loss_ini: torch.Tensor, done: torch.Tensor, k: FreeDragConstants,
               win_r: int, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """One move's new positions [N, 2] and each point's choice:

    - done: stays;
    - loss_end < l / 2: line search toward the target over min(d_max, remaining), the candidate whose distance is
      closest to l;
    - else loss_end < loss_ini: stays;
    - else roll back min(d_max, remaining) away from the target, then search min(2 d_max, new remaining) toward
      it, the candidate with the smallest distance.
    Every position stays inside the grid."""
    remaining = (targets - points).norm(dim=-1)
    ahead, _ = search(feat, template, candidates_along(points, targets, torch.clamp(remaining, max=k.d_max),
                                                       k.candidates), win_r, k.l)
    away = points - (targets - points) / remaining[:, None].clamp_min(1e-8) * torch.clamp(remaining, max=k.d_max)[:, None]
    back = clip_points(away, grid_hw)
    back_remaining = (targets - back).norm(dim=-1)
    rolled, _ = search(feat, template, candidates_along(back, targets, torch.clamp(back_remaining, max=2 * k.d_max),
                                                        k.candidates), win_r, None)
    new, choices = points.clone(), []
    for i in range(points.shape[0]):  # a handful of points: the decisions on the host
        if bool(done[i]):
            choices.append(DONE)
        elif float(loss_end[i]) < k.threshold_l:
            new[i] = ahead[i]
            choices.append(SEARCH)
        elif float(loss_end[i]) < float(loss_ini[i]):
            choices.append(STAY)
        else:
            new[i] = rolled[i]
            choices.append(ROLL_BACK)
    return clip_points(new, grid_hw), choices


@dataclass
class FreeDragState:
    template: torch.Tensor | None = None  # [N, K, C]
    loss_end: torch.Tensor | None = None  # [N]
    loss_ini: torch.Tensor | None = None  # [N]
    done: torch.Tensor | None = None  # [N] bool
    per_point: torch.Tensor | None = None  # [N]: the motion term's per-point distances of the last step
    steps_in_move: int = 0
    move_ends: bool = True  # the next forward starts a move
    moves: list = field(default_factory=list)  # per move: iteration, choices, template weights, loss_end


class FreeDragMoves(DragCallback):
    """FreeDrag's loop around the drag module's Adam steps. At the forward that starts a move (the first, and
    each one after a move ended), with that forward's features: the previous move's ``loss_end`` per point, which
    points are done (closer than ``threshold_d`` to the target, strictly, as FreeDrag's code, and loss_end <= l / 2),
    the template update T = w window + (1 - w) T (w = 1 for done points); stop when every point is done; else
    ``plan_moves``. A move ends after ``steps_per_move`` Adam steps, or after the step at which the largest
    per-point distance fell below l / 2. ``motion_loss`` is the differentiable term: sum over points of mean L1(window at the point, template).
    The Adam budget (``max_step``) is the Trainer's ``max_steps``."""

    def __init__(self, k: FreeDragConstants, win_r: int = 4, steps_per_move: int = 5):
        self.k, self.win_r, self.steps_per_move = k, int(win_r), int(steps_per_move)
        self.state = FreeDragState()

    def motion_loss(self, feat, handles, targets, handles_init):
        s = self.state
        per_point = template_distance(windows(feat, handles, self.win_r), s.template.detach())
        s.per_point = per_point.detach()
        return per_point.sum()

    def track(self, module: DragEditModule, step: DragStep) -> torch.Tensor | None:
        s, k = self.state, self.k
        if not s.move_ends:
            return None
        feat = step.features.detach()
        current = windows(feat, step.handles, self.win_r)
        n = step.handles.shape[0]
        if s.template is None:  # the first forward: z is the original latent
            s.template = current
            zeros = torch.zeros(n, device=feat.device)
            s.loss_end, s.loss_ini, s.done = zeros, zeros.clone(), torch.zeros(n, dtype=torch.bool, device=feat.device)
            w = torch.ones(n, device=feat.device)
        else:
            s.loss_end = template_distance(current, s.template)
            close = (module.targets - step.handles).norm(dim=-1) < k.threshold_d  # FreeDrag's code: <
            s.done = close & (s.loss_end <= k.threshold_l)
            w = torch.where(s.done, torch.ones_like(s.loss_end), template_weight(s.loss_end, k))
            s.template = w[:, None, None] * current + (1 - w[:, None, None]) * s.template
        s.steps_in_move, s.move_ends = 0, False
        if bool(s.done.all()):
            s.moves.append({"iteration": step.index, "choices": [DONE] * n, "template_weight": w.tolist(),
                            "loss_end": s.loss_end.tolist()})
            return None
        new, choices = plan_moves(feat, s.template, step.handles, module.targets, s.loss_end, s.loss_ini, s.done, k,
                                  self.win_r, module.grid_hw)
        s.moves.append({"iteration": step.index, "choices": choices, "template_weight": w.tolist(),
                        "loss_end": s.loss_end.tolist(), "to": new.tolist()})
        if module.listening():
            module.log_dict({f"drag/template_weight_{i}": float(v) for i, v in enumerate(w.tolist())}
                            | {f"drag/move_{i}": float([SEARCH, STAY, ROLL_BACK, DONE].index(c))
                               for i, c in enumerate(choices)}, on_step=True)
        return new

    def reached(self, module: DragEditModule, step: DragStep) -> bool:
        return self.state.done is not None and bool(self.state.done.all())

    def wants_text_step(self, module: DragEditModule, step: DragStep) -> bool:
        """DragText's FreeDrag: a text step only at the step whose largest per-point distance fell below l / 2 (the
        step that ends the move: so at most once a move), and only when some point of the move was not rolled
        back."""
        s = self.state
        return (s.per_point is not None and bool(s.moves) and float(s.per_point.max()) < self.k.threshold_l
                and any(c != ROLL_BACK for c in s.moves[-1]["choices"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = self.state
        if pl_module.reached or s.per_point is None:
            return
        s.steps_in_move += 1
        if s.steps_in_move == 1:
            s.loss_ini = s.per_point.clone()
        if s.steps_in_move >= self.steps_per_move or float(s.per_point.max()) < self.k.threshold_l:
            s.move_ends = True
