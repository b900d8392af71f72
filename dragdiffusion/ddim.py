"""Deterministic DDIM step and DDIM inversion: pure functions on tensors plus the scheduler's alphas."""
from __future__ import annotations

from typing import Callable

import torch


def step_size(scheduler) -> int:
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def alpha_bar(scheduler, t: int) -> torch.Tensor:
    """Cumulative alpha at timestep t; t < 0 is the final alpha (alphas_cumprod[0] with set_alpha_to_one=False)."""
    t = int(t)
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def predict_x0(eps: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(scheduler, eps: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): z_t -> z_{t - 1000/steps}. Differentiable in z and eps."""
    a_t = alpha_bar(scheduler, t).to(z)
    a_prev = alpha_bar(scheduler, int(t) - step_size(scheduler)).to(z)
    x0 = predict_x0(eps, z, a_t)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def ddim_inversion_step(scheduler, eps: torch.Tensor, t_next: int, z: torch.Tensor) -> torch.Tensor:
    """z at t_next - 1000/steps -> z at t_next, with eps evaluated at t_next (the reference's convention)."""
    t_cur = min(int(t_next) - step_size(scheduler), scheduler.config.num_train_timesteps - 1)
    a_cur = alpha_bar(scheduler, t_cur).to(z)
    a_next = alpha_bar(scheduler, t_next).to(z)
    x0 = predict_x0(eps, z, a_cur)
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def inversion_timesteps(scheduler, num_inference_steps: int, strength: float) -> tuple[list[int], list[int]]:
    """(inversion timesteps ascending, denoising timesteps descending) for ``strength``.

    With 50 steps and strength 0.7: inversion 1, 21, ..., 681 (35 steps); denoising 681, 661, ..., 1.
    """
    scheduler.set_timesteps(num_inference_steps)
    n = int(num_inference_steps * strength)
    descending = [int(t) for t in scheduler.timesteps]
    denoise = descending[len(descending) - n:]
    return list(reversed(denoise)), denoise


def guided_eps(unet_fn: Callable, z: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance_scale: float) -> torch.Tensor:
    """Noise prediction, with classifier-free guidance when ``guidance_scale`` > 1 and ``uncond`` is given."""
    if guidance_scale <= 1.0 or uncond is None:
        return unet_fn(z, t, cond.expand(z.shape[0], -1, -1))
    n = z.shape[0]
    eps = unet_fn(torch.cat([z, z]), t, torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)]))
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


@torch.no_grad()
def ddim_invert(unet_fn: Callable, scheduler, z0: torch.Tensor, cond: torch.Tensor, timesteps: list[int],
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Invert the clean latent ``z0`` through ``timesteps`` (ascending); returns z at the last one."""
    z = z0
    for t in timesteps:
        eps = guided_eps(unet_fn, z, t, cond, uncond, guidance_scale)
        z = ddim_inversion_step(scheduler, eps, t, z)
    return z


@torch.no_grad()
def ddim_denoise(unet_fn: Callable, scheduler, z: torch.Tensor, cond: torch.Tensor, timesteps: list[int],
                 uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Denoise ``z`` through ``timesteps`` (descending). ``on_step(i, t)`` is called before each step."""
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i, t)
        eps = guided_eps(unet_fn, z, t, cond, uncond, guidance_scale)
        z = ddim_step(scheduler, eps, t, z)
    return z
