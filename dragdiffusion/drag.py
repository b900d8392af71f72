"""DragEditModule: the latent z_t is the optimized parameter; one training step = one drag iteration.

The module runs the UNet on z_t and computes the motion-supervision loss (motion.py). Everything else an
iteration may do goes through one declared extension point, ``DragCallback`` (a Lightning Callback found in
``trainer.callbacks``). After the forward the module hands each DragCallback a ``DragStep`` (the features, the
noise prediction if asked for, the current handles) and asks it, in this order:

1. ``track(module, step)``: new handle positions (row, col) [N, 2], or None to leave them;
2. ``reached(module, step)``: True to stop before this step's update (the early stop);
3. ``loss_terms(module, step)``: extra loss terms {name: scalar tensor}, added to the motion loss and
   recorded and logged under their names (``drag/<name>``).

``needs_eps(module)`` says whether a callback needs the noise prediction; when none does, the UNet forward stops
after the last feature block. PointTracking (steps 1-2) and MaskRegularization (step 3) in callbacks.py
implement it; a new term (for example a GoodDrag-style consistency term) is a new DragCallback, with no change
here.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from .conditioning import Conditioning
from .data.datamodule import StepIndices
from .ddim import ddim_step
from .features import replace_mid_block, unet_eps_and_features
from .motion import handle_distances, motion_supervision_loss


TEXT_SERIES = ("text_loss", "text_shift")  # DragText's per-iteration records (not loss terms of the drag variable)


def prompt_hidden(cond) -> torch.Tensor:
    """The prompt embedding rows of a condition (a tensor, or a ``Conditioning``'s ``hidden``)."""
    return cond.hidden if isinstance(cond, Conditioning) else cond


def cfg_feature_weight(guidance_scale: float) -> float:
    """c = s / (2s - 1): the weight of the conditional features under classifier-free guidance s."""
    return guidance_scale / (2 * guidance_scale - 1)


def mix_guided_features(f_uncond: torch.Tensor, f_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Features of a guided forward: ((1 - c) F_uncond, c F_cond) concatenated on channels (dim -3)."""
    c = cfg_feature_weight(guidance_scale)
    return torch.cat([(1 - c) * f_uncond, c * f_cond], dim=-3)


def guided_eps_and_features(unet, z: torch.Tensor, t: int, cond, blocks: list[int], grid_hw: tuple[int, int],
                            guidance_scale: float = 1.0, bottleneck: torch.Tensor | None = None,
                            need_eps: bool = True):
    """One UNet forward of one latent: (the model output in fp32 or None, features [C, gh, gw] of ``blocks`` on
    the grid). With ``guidance_scale`` > 1 (``cond`` = [uncond, cond]) the output is the guided one and the
    features are ``mix_guided_features``; ``bottleneck`` replaces the mid block's output (DragNoise)."""
    guided = guidance_scale > 1
    if guided:
        z = torch.cat([z, z])
    with replace_mid_block(unet, bottleneck):
        eps, feats = unet_eps_and_features(unet, z.to(unet.dtype), t, cond, blocks, grid_hw, need_eps=need_eps)
    eps = None if eps is None else eps.float()
    if not guided:
        return eps, feats[0]
    if eps is not None:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
    return eps, mix_guided_features(feats[0], feats[1], guidance_scale)


@dataclass
class DragStep:
    """What one drag iteration's forward gives the callbacks.

    ``index`` 0 is the first iteration, where ``z`` still equals the starting latent (callbacks keep what they
    need of the original there: F0, x0_prev). ``features`` [C, gh, gw] and ``eps`` carry gradients."""
    index: int
    z: torch.Tensor  # the optimized latent [1, 4, h, w] (fp32 parameter)
    features: torch.Tensor  # UNet features on the supervision grid, fp32
    eps: torch.Tensor | None  # the noise prediction when a callback asked for it (``needs_eps``)
    handles: torch.Tensor  # current handle positions (row, col) [N, 2]


class DragCallback(L.Callback):
    """The drag module's extension point (see the module docstring); override what you need."""

    def needs_eps(self, module: "DragEditModule") -> bool:
        return False

    def track(self, module: "DragEditModule", step: DragStep) -> torch.Tensor | None:
        return None

    def reached(self, module: "DragEditModule", step: DragStep) -> bool:
        return False

    def loss_terms(self, module: "DragEditModule", step: DragStep) -> dict[str, torch.Tensor]:
        return {}

    def wants_text_step(self, module: "DragEditModule", step: DragStep) -> bool:
        """With DragText on: whether this iteration also updates the text embedding (FreeDrag: not always)."""
        return True


@dataclass
class TextOptimization:
    """DragText for one fit (``text.*``): the prompt's embedding is a second parameter (its own Adam learning rate,
    a parameter group beside the drag variable's), regularized by ``lam`` x sum |c - c_orig| over ``tokens`` (the
    start token and the prompt's tokens, [77] bool); its gradient is the motion term's + the regularizer's (and the
    mask term's with ``mask_term``)."""
    lr: float
    lam: float
    tokens: torch.Tensor
    mask_term: bool = False


@dataclass
class PendingTextStep:
    """What ``backward`` needs for the text embedding's part of one iteration."""
    regularizer: torch.Tensor
    text_loss: torch.Tensor  # motion term + regularizer (+ mask term with text.mask_term)
    together: bool  # one backward of (loss + regularizer) gives both gradients (no other term in the loss)


class DragEditModule(L.LightningModule):
    """Optimizes z_t so that the UNet features at each handle move toward its target.

    Args:
        unet: the (frozen) UNet; kept outside the module's parameters and state_dict.
        scheduler: DDIM scheduler with ``set_timesteps`` already called.
        z_t: the starting latent [1, 4, h, w] at timestep ``t``.
        cond: prompt embedding [1, 77, D] (or [2, 77, D] uncond+cond with ``guidance_scale`` > 1), or a
            ``Conditioning`` of as many rows (SDXL: with the pooled embedding and time ids).
        handles, targets: (row, col) on the supervision grid, [N, 2].
        drag: the ``drag`` config section.
        mask_latent: [1, 1, h, w] (1 = may change) or None.
        guidance_scale: classifier-free guidance s of a generated image (cond then holds uncond, cond):
            features are ``mix_guided_features`` of both halves, eps is the guided prediction.
        patch_as_reference: sample the shifted motion patch as the reference does (``reference.exact``).
        handles_init: the handles' ORIGINAL positions (default: ``handles``), when a drag continues an earlier one
            (GoodDrag drags at several timesteps: one module per timestep).
        motion_loss: ``fn(features, handles, targets, handles_init) -> loss``, the motion term (default: DragDiffusion's motion
            supervision with ``drag.r_m``).
        step_offset: added to the logged ``drag/step`` (iterations of earlier drag modules of the same edit).
        bottleneck: optimize the UNet's bottleneck instead of the latent (DragNoise): this tensor, the output of
            ``unet.mid_block`` for ``z_t``, replaces the mid block's output in every forward and is the only
            parameter; ``z_t`` stays fixed (the down path and the skip connections are z_t's).
        max_steps: this fit's optimizer-step budget (the method's ``DragParts.max_steps``; default
            ``drag.n_pix_step``): the length of its one epoch, so a Trainer with ``max_steps`` above
            ``drag.n_pix_step`` (FreeDrag's 300) runs to its budget and its progress bar counts to it.
        text: DragText (``TextOptimization``): the prompt's embedding (the conditional row of ``cond``, starting
            from it at every fit) is optimized too; its gradient never reaches the drag variable's and the drag
            variable's never reaches it (``backward``). None (default): the fit is exactly the method's own.
    """
    stage_label = "drag"  # the progress bar's label; the editor names each drag step ("drag step 2/7 (t=721)")

    def __init__(self, unet, scheduler, z_t: torch.Tensor, t: int, cond: torch.Tensor, handles: torch.Tensor,
                 targets: torch.Tensor, grid_hw: tuple[int, int], drag, mask_latent: torch.Tensor | None = None,
                 guidance_scale: float = 1.0, patch_as_reference: bool = False,
                 handles_init: torch.Tensor | None = None, motion_loss=None, step_offset: int = 0,
                 bottleneck: torch.Tensor | None = None, max_steps: int | None = None,
                 text: TextOptimization | None = None):
        super().__init__()
        if guidance_scale > 1 and cond.shape[0] != 2:
            raise ValueError("guidance_scale > 1 needs cond = [uncond, cond] (2 rows), got "
                             f"{cond.shape[0]} row(s)")
        self.guidance_scale = float(guidance_scale)
        self.patch_as_reference = bool(patch_as_reference)
        object.__setattr__(self, "unet", unet)  # not a submodule: frozen, not saved, not wrapped
        self.scheduler = scheduler
        self.t = int(t)
        self.drag = drag
        self.grid_hw = tuple(grid_hw)
        if bottleneck is None:
            self.z_t = torch.nn.Parameter(z_t.detach().clone().float())
            self.bottleneck = None
        else:  # DragNoise: the latent is fixed, the bottleneck is optimized
            self.register_buffer("z_t", z_t.detach().clone().float(), persistent=False)
            self.bottleneck = torch.nn.Parameter(bottleneck.detach().clone().float())
        self.register_buffer("z_t_original", z_t.detach().clone().float(), persistent=False)
        if isinstance(cond, torch.Tensor):
            self.register_buffer("cond", cond.detach().clone(), persistent=False)
        else:  # a Conditioning (SDXL: with the added conditioning); the module is never moved
            self.cond = cond.detach().clone()
        init = handles if handles_init is None else handles_init
        self.register_buffer("handles_init", init.detach().clone().float(), persistent=False)
        self.register_buffer("handles", handles.detach().clone().float(), persistent=False)
        self.register_buffer("targets", targets.detach().clone().float(), persistent=False)
        self.register_buffer("mask_latent", None if mask_latent is None else mask_latent.float(), persistent=False)
        self.text = text
        self.text_embedding = None
        self._pending_text: PendingTextStep | None = None
        if text is not None:  # the conditional row (the last: guidance puts [uncond, cond])
            hidden = prompt_hidden(cond)
            self.text_embedding = torch.nn.Parameter(hidden[-1:].detach().clone().float())
            self.register_buffer("text_original", hidden[-1:].detach().clone().float(), persistent=False)
            self.register_buffer("text_tokens", text.tokens.to(hidden.device).float()[None, :, None],
                                 persistent=False)
        self.motion_loss = motion_loss
        self.step_offset = int(step_offset)
        self.max_steps = int(drag.n_pix_step if max_steps is None else max_steps)
        self.reached = False
        self.stop_step: int | None = None
        self.stop_reason: str | None = None  # "reached", or what a DragCallback set when it stopped the drag
        # per iteration (tensors during the fit, numbers after it): handles (row, col) and every loss term
        self.history: dict[str, list] = {"handles": [], "motion_loss": [], "mask_loss": [], "loss": []}
        if text is not None:
            self.history.update({name: [] for name in TEXT_SERIES})

    # ------------------------------------------------------------------ the UNet as a function of z
    def eps_and_features(self, z: torch.Tensor, need_eps: bool = True):
        """(eps, features [C, gh, gw]) for one latent; the feature grid of the configured up_blocks."""
        return guided_eps_and_features(self.unet, z, self.t, self.condition(), list(self.drag.feature_blocks),
                                       self.grid_hw, self.guidance_scale, self.bottleneck, need_eps)

    def condition(self):
        """What the UNet is conditioned on: ``cond``, or with DragText ``cond`` whose conditional row is the
        optimized embedding (in the embedding's dtype, with its gradient)."""
        if self.text_embedding is None:
            return self.cond
        hidden = prompt_hidden(self.cond)
        c = self.text_embedding.to(hidden.dtype)
        if hidden.shape[0] > 1:
            c = torch.cat([hidden[:-1], c])
        return Conditioning(c, self.cond.added) if isinstance(self.cond, Conditioning) else c

    def x_prev(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM step z_t -> z_{t - 1000/steps}."""
        return ddim_step(self.scheduler, eps, self.t, z)

    def drag_callbacks(self) -> list[DragCallback]:
        return [c for c in self.trainer.callbacks if isinstance(c, DragCallback)]

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_idx):
        callbacks = self.drag_callbacks()
        eps, feat = self.eps_and_features(self.z_t, need_eps=any(c.needs_eps(self) for c in callbacks))
        step = DragStep(self.global_step, self.z_t, feat, eps, self.handles)
        for callback in callbacks:
            moved = callback.track(self, step)
            if moved is not None:
                self.handles.copy_(moved)
        self.history["handles"].append(self.handles.clone())
        listening = self.listening()
        if listening:
            distances = {f"drag/distance_{i}": d for i, d in enumerate(handle_distances(self.handles, self.targets))}
            self.log_dict({"drag/step": float(self.step_offset + step.index), "drag/timestep": float(self.t),
                           **distances}, on_step=True, prog_bar=False)
        if any(callback.reached(self, step) for callback in callbacks):
            self.reached = True
            self.stop_step = step.index
            self.stop_reason = self.stop_reason or "reached"
            self.trainer.should_stop = True
            return None  # no update at this step
        if self.motion_loss is None:
            motion = motion_supervision_loss(feat, self.handles, self.targets, self.drag.r_m,
                                             as_reference=self.patch_as_reference)
        else:
            motion = self.motion_loss(feat, self.handles, self.targets, self.handles_init)
        terms = {"motion_loss": motion}
        for callback in callbacks:
            terms.update(callback.loss_terms(self, step))
        loss = sum(terms.values())
        if self.text_embedding is not None:
            self.text_step(step, callbacks, motion, loss, together=self.text.mask_term or set(terms) == {"motion_loss"})
        for name in set(self.history) - {"handles", "loss", *TEXT_SERIES} - set(terms):
            terms[name] = loss.new_zeros(())  # a term that is off this run (e.g. no mask) is recorded as 0
        for name, value in terms.items():
            self.history.setdefault(name, []).append(value.detach())
        self.history["loss"].append(loss.detach())
        if listening:
            self.log_dict({f"drag/{name}": value for name, value in terms.items()} | {"drag/loss": loss},
                          on_step=True, prog_bar=True)
        return loss

    def text_step(self, step: DragStep, callbacks, motion: torch.Tensor, loss: torch.Tensor, together: bool) -> None:
        """DragText's part of an iteration: the regularizer lam x sum |c - c_orig| over the start and prompt tokens,
        recorded (``text_loss``, and ``text_shift`` = |c - c_orig|, L2) and, when every DragCallback wants a text step
        now, kept for ``backward``."""
        diff = self.text_embedding - self.text_original
        regularizer = self.text.lam * (diff.abs() * self.text_tokens).sum()
        shift = diff.detach().norm()
        self.history["text_loss"].append(regularizer.detach())
        self.history["text_shift"].append(shift)
        if self.listening():
            self.log_dict({"drag/text_loss": regularizer.detach(), "drag/text_shift": shift}, on_step=True)
        if all(c.wants_text_step(self, step) for c in callbacks):
            text_loss = (loss if self.text.mask_term else motion) + regularizer
            self._pending_text = PendingTextStep(regularizer, text_loss, together)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Lightning's backward (``loss`` already scaled under fp16). With DragText: the drag variable's gradient is
        the loss's alone and the text embedding's that of motion + regularizer (one backward when the loss has no
        other term, else two over the same graph, never mixing); no text step: the embedding gets no gradient."""
        pending, self._pending_text = self._pending_text, None
        if self.text_embedding is None:
            return super().backward(loss, *args, **kwargs)
        variable = self.z_t if self.bottleneck is None else self.bottleneck
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = (lambda x: x) if scaler is None else scaler.scale  # the latent's GradScaler, shared
        if pending is None:
            loss.backward(*args, inputs=[variable], **kwargs)
        elif pending.together:
            (loss + scale(pending.regularizer)).backward(*args, **kwargs)
        else:
            loss.backward(*args, inputs=[variable], retain_graph=True, **kwargs)
            scale(pending.text_loss).backward(inputs=[self.text_embedding])

    def listening(self) -> bool:
        """Whether a logger or a progress bar reads the logged values (logging then costs a host sync per step;
        without them an iteration syncs twice: the early-stop check, and one copy of the handle positions that
        place the motion patches)."""
        return bool(self.trainer.loggers) or self.trainer.progress_bar_callback is not None

    def on_train_end(self):
        """The history (kept as device tensors during the loop) as plain numbers, in one copy per series."""
        self.history = {k: torch.stack(v).tolist() if v and isinstance(v[0], torch.Tensor) else list(v)
                        for k, v in self.history.items()}

    def configure_optimizers(self):
        name = str(self.drag.optimizer)
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        variable = self.z_t if self.bottleneck is None else self.bottleneck
        fused = {"fused": True} if variable.is_cuda and name != "sgd" else {}  # one kernel per step on a GPU
        if self.text_embedding is None:
            return cls([variable], lr=self.drag.lr, **fused)
        # DragText: the embedding is its own parameter group (Adam is per parameter: the same as its own optimizer)
        return cls([{"params": [variable]}, {"params": [self.text_embedding], "lr": float(self.text.lr)}],
                   lr=self.drag.lr, **fused)

    def train_dataloader(self):
        return DataLoader(StepIndices(max(1, self.max_steps)), batch_size=1)  # one epoch = the fit's whole budget

    # ------------------------------------------------------------------ results
    def edited_latent(self) -> torch.Tensor:
        return self.z_t.detach().clone()

    def edited_bottleneck(self) -> torch.Tensor | None:
        return None if self.bottleneck is None else self.bottleneck.detach().clone()

    def edited_condition(self):
        """DragText's optimized condition for the edited branch (one row, as ``cond``'s conditional row: a tensor,
        or a ``Conditioning`` with the same added conditioning), or None without DragText."""
        if self.text_embedding is None:
            return None
        c = self.text_embedding.detach().clone().to(prompt_hidden(self.cond).dtype)
        if isinstance(self.cond, Conditioning):
            return Conditioning(c, self.cond.chunk(self.cond.shape[0])[-1].added)
        return c
