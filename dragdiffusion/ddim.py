"""Deterministic DDIM step and DDIM inversion: pure functions on tensors plus the scheduler's alphas.

The UNet's output ("model output") is read by the scheduler's ``prediction_type``: the noise (``epsilon``, SD 1.5)
or the velocity (``v_prediction``, SD 2.x 768-v and many fine-tunes). ``eps_and_x0`` is the one place that turns it
into the noise and the clean latent; every DDIM step (inversion, drag, denoising, generation) goes through it.
"""
from __future__ import annotations

from typing import Callable

import torch

from .conditioning import cond_cat, cond_expand
from .errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def step_size(scheduler) -> int:
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def alpha_bar(scheduler, t: int) -> torch.Tensor:
    """Cumulative alpha at timestep t; t < 0 is the final alpha (alphas_cumprod[0] with set_alpha_to_one=False)."""
    t = int(t)
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def predict_x0(eps: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The clean latent from the NOISE ``eps`` (not a v prediction: see ``eps_and_x0``)."""
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def prediction_type(scheduler) -> str:
    """The scheduler's ``prediction_type``, checked: epsilon or v_prediction ("sample" and others are refused)."""
    value = str(scheduler.config.get("prediction_type", "epsilon"))
    if value not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler.prediction_type '{value}' (from the model's scheduler config) is not supported: "
                          f"expected one of {', '.join(PREDICTION_TYPES)}")
    return value


def eps_and_x0(scheduler, model_output: torch.Tensor, z: torch.Tensor,
               a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, clean latent) from the UNet's output on ``z``, a latent whose cumulative alpha is ``a``, by the
    scheduler's prediction type. epsilon: the output is the noise; v_prediction: v = sqrt(a) eps - sqrt(1-a) x0,
    so x0 = sqrt(a) z - sqrt(1-a) v and eps = sqrt(a) v + sqrt(1-a) z (diffusers' DDIM formulas)."""
    if prediction_type(scheduler) == "epsilon":
        return model_output, predict_x0(model_output, z, a)
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    return sqrt_a * model_output + sqrt_1ma * z, sqrt_a * z - sqrt_1ma * model_output


def predict_eps_x0(scheduler, model_output: torch.Tensor, t: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, clean latent) from the UNet's output on ``z`` at timestep ``t``."""
    return eps_and_x0(scheduler, model_output, z, alpha_bar(scheduler, t).to(z))


def ddim_step(scheduler, model_output: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): z_t -> z_{t - 1000/steps}. ``model_output``: the UNet's output at t (the noise or
    v, by the scheduler's prediction type). Differentiable in z and the output."""
    a_t = alpha_bar(scheduler, t).to(z)
    a_prev = alpha_bar(scheduler, int(t) - step_size(scheduler)).to(z)
    eps, x0 = eps_and_x0(scheduler, model_output, z, a_t)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def ddim_inversion_step(scheduler, model_output: torch.Tensor, t_next: int, z: torch.Tensor) -> torch.Tensor:
    """z at t_next - 1000/steps -> z at t_next, with the UNet's output evaluated at t_next (the reference's
    convention) and read against z's own alpha (as diffusers' ``DDIMInverseScheduler``)."""
    t_cur = min(int(t_next) - step_size(scheduler), scheduler.config.num_train_timesteps - 1)
    a_cur = alpha_bar(scheduler, t_cur).to(z)
    a_next = alpha_bar(scheduler, t_next).to(z)
    eps, x0 = eps_and_x0(scheduler, model_output, z, a_cur)
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def inverted_step_count(num_inference_steps: int, strength: float) -> int:
    """How many DDIM steps the inversion takes: ``round(steps x strength)``, Python's round (half to even), as the
    official codes of DragDiffusion, GoodDrag, DragNoise and FreeDrag compute it: 0.7 x 50 = 35, 0.75 x 50 = 37.5 ->
    38, 0.55 x 50 = 27.500000000000004 -> 28, 0.65 x 50 = 32.5 -> 32, 0.75 x 30 = 22.5 -> 22."""
    return int(round(num_inference_steps * strength))


def inversion_timesteps(scheduler, num_inference_steps: int, strength: float) -> tuple[list[int], list[int]]:
    """(inversion timesteps ascending, denoising timesteps descending) for ``strength``.

    With 50 steps and strength 0.7: inversion 1, 21, ..., 681 (35 steps); denoising 681, 661, ..., 1. Strength 0.75:
    38 steps, from t = 741. The number of inverted steps is ``inverted_step_count``.
    """
    scheduler.set_timesteps(num_inference_steps)
    n = inverted_step_count(num_inference_steps, strength)
    descending = [int(t) for t in scheduler.timesteps]
    denoise = descending[len(descending) - n:] if n > 0 else []
    return list(reversed(denoise)), denoise


def guided_eps(unet_fn: Callable, z: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance_scale: float) -> torch.Tensor:
    """The UNet's output (noise or v), with classifier-free guidance when ``guidance_scale`` > 1 and ``uncond`` is
    given (guidance is linear, so it applies to either prediction type as diffusers does). ``cond`` / ``uncond``: a
    prompt embedding or a ``Conditioning`` (SDXL), batched to match (``dragdiffusion.conditioning``)."""
    if guidance_scale <= 1.0 or uncond is None:
        return unet_fn(z, t, cond_expand(cond, z.shape[0]))
    n = z.shape[0]
    eps = unet_fn(torch.cat([z, z]), t, cond_cat([cond_expand(uncond, n), cond_expand(cond, n)]))
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


@torch.no_grad()
def ddim_invert(unet_fn: Callable, scheduler, z0: torch.Tensor, cond: torch.Tensor, timesteps: list[int],
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                on_step: Callable[[int, int], None] | None = None,
                after_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Invert the clean latent ``z0`` through ``timesteps`` (ascending); returns z at the last one. ``on_step(i, t)``
    is called before the UNet call of each step (t: the timestep the UNet is evaluated at), ``after_step(n)`` after
    each step (n steps done: progress)."""
    z = z0
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i, t)
        eps = guided_eps(unet_fn, z, t, cond, uncond, guidance_scale)
        z = ddim_inversion_step(scheduler, eps, t, z)
        if after_step is not None:
            after_step(i + 1)
    return z


@torch.no_grad()
def ddim_denoise(unet_fn: Callable, scheduler, z: torch.Tensor, cond: torch.Tensor, timesteps: list[int],
                 uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 on_step: Callable[[int, int], None] | None = None,
                 after_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Denoise ``z`` through ``timesteps`` (descending). ``on_step(i, t)`` is called before each step,
    ``after_step(n)`` after it (n steps done: progress)."""
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i, t)
        eps = guided_eps(unet_fn, z, t, cond, uncond, guidance_scale)
        z = ddim_step(scheduler, eps, t, z)
        if after_step is not None:
            after_step(i + 1)
    return z
