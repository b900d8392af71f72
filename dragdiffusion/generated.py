"""The generated-image path: sample an image from a prompt and keep the latent at the drag timestep.

No inversion: the latent z_t the drag optimizes is the sampler's own intermediate latent at t (t = 681 with
50 steps and drag.inversion_strength 0.7). ``DragEditor.edit_generated`` drags it through the same pipeline as
a real image (``DragEditor.run``); with classifier-free guidance s the drag's features are
((1 - c) F_uncond, c F_cond) concatenated, c = s / (2s - 1), the mask term uses the guided noise prediction,
and the final denoising uses the same guidance, so an edit without drag iterations gives back the generated
image. The identity LoRA is not used: the image is the model's own.

    editor = DragEditor.from_config(None, ["model=tiny", "generation.width=128", ...])
    generated = editor.generate("a photo of a cat")          # GeneratedImage: .image, .z_t, .t
    result = editor.edit_generated(generated, [[40, 60], [70, 60]], mask=None)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .backbone import Backbone, decode_latent, encode_condition
from .ddim import ddim_denoise, inversion_timesteps
from .images import to_uint8


@dataclass
class GeneratedImage:
    image: np.ndarray  # H x W x 3 uint8: the generated picture (generation.width x generation.height)
    z_t: torch.Tensor  # [1, 4, h, w] fp32 (cpu): the sampler's latent at timestep t, the drag's starting point
    t: int
    timesteps: list[int]  # the remaining denoising timesteps, t first (descending)
    steps: int  # DDIM steps of the whole schedule (the step size of every DDIM step)
    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The sampler's starting noise, drawn on the CPU so a seed gives the same noise on every device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))


@torch.no_grad()
def sample_image(backbone: Backbone, unet_fn: Callable, generation, inversion_strength: float,
                 prompt: str, after_step: Callable[[], None] | None = None) -> GeneratedImage:
    """Sample an image from ``prompt`` with the ``generation`` settings (DDIM, eta 0, guidance
    ``generation.guidance_scale``) from pure noise; the latent at the first timestep of the last
    ``round(steps * inversion_strength)`` steps (``ddim.inverted_step_count``) is kept as ``z_t``.
    ``unet_fn(z, t, cond)`` predicts the noise; ``after_step()`` is called after each of the ``generation.steps``
    steps (progress)."""
    g = generation
    sched = backbone.scheduler
    _, denoise_ts = inversion_timesteps(sched, int(g.steps), float(inversion_strength))
    all_ts = [int(t) for t in sched.timesteps]
    before = all_ts[:len(all_ts) - len(denoise_ts)]
    size_hw = (int(g.height), int(g.width))
    cond = encode_condition(backbone, prompt, size_hw)
    uncond = encode_condition(backbone, str(g.negative_prompt), size_hw)
    f = backbone.vae_scale_factor
    channels = int(backbone.unet.config.in_channels)
    z = initial_noise(g.seed, (1, channels, int(g.height) // f, int(g.width) // f)).to(backbone.device)
    z = z * float(sched.init_noise_sigma)
    step = (lambda n: after_step()) if after_step is not None else None
    z_t = ddim_denoise(unet_fn, sched, z, cond, before, uncond, float(g.guidance_scale), after_step=step)
    z_0 = ddim_denoise(unet_fn, sched, z_t, cond, denoise_ts, uncond, float(g.guidance_scale), after_step=step)
    return GeneratedImage(to_uint8(decode_latent(backbone, z_0)), z_t.detach().float().cpu(), int(denoise_ts[0]),
                          list(denoise_ts), int(g.steps), prompt, str(g.negative_prompt), int(g.seed),
                          float(g.guidance_scale))
