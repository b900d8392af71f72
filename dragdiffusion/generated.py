"""The generated-image path: sample an image from a prompt, keep the latent at the drag timestep, drag it.

No inversion: the latent z_t the drag optimizes is the sampler's own intermediate latent at t (t = 681 with
50 steps and drag.inversion_strength 0.7). With classifier-free guidance s the drag's features are
((1 - c) F_uncond, c F_cond) concatenated, c = s / (2s - 1), and the mask term uses the guided noise
prediction (DragEditModule with ``guidance_scale``); the final denoising uses the same guidance, so an edit
without drag iterations gives back the generated image. The identity LoRA is not used: the image is the
model's own.

    editor = DragEditor.from_config("configs/edit.yaml", ["model=tiny", "generation.width=128", ...])
    generated = editor.generate("a photo of a cat")          # GeneratedImage: .image, .z_t, .t
    result = editor.edit_generated(generated, [[40, 60], [70, 60]], mask=None)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from .backbone import decode_latent, encode_prompt
from .ddim import ddim_denoise, inversion_timesteps
from .errors import SampleError
from .loggers import log_edit_result
from .motion import resize_mask
from .sample import DragSample, grid_size, make_sample, pixels_to_grid


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


def _remove_identity_lora(editor) -> None:
    """A previous real-image edit may have left its identity LoRA in the shared UNet: take it out."""
    from .lora import remove_identity_lora
    remove_identity_lora(editor.backbone.unet)


def _prompt_embeddings(editor, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = editor.backbone
    return encode_prompt(backbone, prompt), encode_prompt(backbone, negative_prompt)


@torch.no_grad()
def generate(editor, prompt: str | None = None) -> GeneratedImage:
    """Sample an image from ``prompt`` (default: the config's ``prompt``) with the ``generation`` settings.

    The DDIM sampler (eta 0, guidance ``generation.guidance_scale``) runs from pure noise; the latent at the
    first timestep of the last ``int(steps * drag.inversion_strength)`` steps is kept as ``z_t``.
    """
    cfg = editor.cfg
    g = cfg.generation
    prompt = cfg.prompt if prompt is None else prompt
    prompt = "" if prompt is None else str(prompt)
    backbone = editor.backbone
    _remove_identity_lora(editor)
    sched = backbone.scheduler
    _, denoise_ts = inversion_timesteps(sched, int(g.steps), float(cfg.drag.inversion_strength))
    all_ts = [int(t) for t in sched.timesteps]
    before = all_ts[:len(all_ts) - len(denoise_ts)]
    cond, uncond = _prompt_embeddings(editor, prompt, g.negative_prompt)
    f = backbone.vae_scale_factor
    channels = int(backbone.unet.config.in_channels)
    z = initial_noise(g.seed, (1, channels, int(g.height) // f, int(g.width) // f)).to(backbone.device)
    z = z * float(sched.init_noise_sigma)
    unet_fn = editor.unet_fn()
    z_t = ddim_denoise(unet_fn, sched, z, cond, before, uncond, float(g.guidance_scale))
    z_0 = ddim_denoise(unet_fn, sched, z_t, cond, denoise_ts, uncond, float(g.guidance_scale))
    image = _to_uint8(decode_latent(backbone, z_0))
    return GeneratedImage(image, z_t.detach().float().cpu(), int(denoise_ts[0]), list(denoise_ts), int(g.steps),
                          prompt, str(g.negative_prompt), int(g.seed), float(g.guidance_scale))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def edit_generated(editor, generated: GeneratedImage, points, mask=None, callbacks=(), logger=False):
    """Drag ``generated`` (no inversion): returns an EditResult of the generated image's size.

    ``points``: [[x, y], ...] alternating handle, target, in pixels of the generated image; ``mask``: H x W
    (1 = may change) or None.
    """
    from .editor import EditResult, edit_trajectory

    sample = make_sample(generated.image, points, mask, generated.prompt, "generated")
    cfg = editor.cfg
    L.seed_everything(int(cfg.seed), verbose=False)
    backbone = editor.backbone
    _remove_identity_lora(editor)
    backbone.scheduler.set_timesteps(generated.steps)  # the DDIM step size of the generation's schedule
    seconds: dict[str, float] = {"lora": 0.0, "inversion": 0.0}
    work_wh = (sample.width, sample.height)
    grid_hw = grid_size(sample.width, sample.height, cfg.drag.sup_res_factor)
    handles_rc = pixels_to_grid(sample.handles, (sample.height, sample.width), grid_hw).to(backbone.device)
    targets_rc = pixels_to_grid(sample.targets, (sample.height, sample.width), grid_hw).to(backbone.device)
    z_t = generated.z_t.to(backbone.device)
    latent_hw = (sample.height // backbone.vae_scale_factor, sample.width // backbone.vae_scale_factor)
    if tuple(z_t.shape[-2:]) != latent_hw:
        raise SampleError("image", f"the generated image is {sample.width}x{sample.height} px but its latent is "
                                   f"{tuple(z_t.shape[-2:])}; expected {latent_hw}", sample.name)
    cond, uncond = _prompt_embeddings(editor, generated.prompt, generated.negative_prompt)
    s = float(generated.guidance_scale)
    drag_cond = torch.cat([uncond, cond]) if s > 1 else cond
    mask_latent = None
    if sample.has_mask:
        mask_latent = resize_mask(torch.from_numpy(sample.mask), tuple(z_t.shape[-2:])).to(backbone.device)

    tic = time.perf_counter()
    callbacks = editor.logging_callbacks(sample, callbacks, logger)
    module = editor.drag_latent(z_t, generated.t, drag_cond, handles_rc, targets_rc, grid_hw, mask_latent,
                                callbacks, logger or False, guidance_scale=s)
    seconds["drag"] = time.perf_counter() - tic
    tic = time.perf_counter()
    z = editor.denoise(z_t, module.edited_latent(), cond, generated.timesteps, uncond if s > 1 else None,
                       guidance_scale=s)
    edited = _to_uint8(decode_latent(backbone, z[1:]))
    seconds["denoise"] = time.perf_counter() - tic
    trajectory = edit_trajectory(module, sample, work_wh, grid_hw, generated.t, None, seconds)
    trajectory["generated"] = {"prompt": generated.prompt, "negative_prompt": generated.negative_prompt,
                               "seed": generated.seed, "guidance_scale": s}
    result = EditResult(edited, trajectory, sample, seconds, z_t.detach().cpu(), module.edited_latent().cpu())
    log_edit_result(logger, result)
    return result


def generation_inputs(cfg) -> DragSample:
    """The drag of a ``generate=true`` run, validated before any model loads: points and mask from
    ``sample=DIR`` (a replay folder: its image.png must have the generated size) or ``points=`` / ``mask=``,
    the prompt from ``prompt=`` or the folder. The image is a blank placeholder of the generated size."""
    g = cfg.generation
    blank = np.zeros((int(g.height), int(g.width), 3), np.uint8)
    if cfg.sample:
        from .data import read_sample
        folder = read_sample(cfg.sample)
        if (folder.width, folder.height) != (int(g.width), int(g.height)):
            raise SampleError("image", f"{cfg.sample}: the image is {folder.width}x{folder.height} px but "
                                       f"generation.width x height is {g.width}x{g.height}; expected the same size",
                              folder.name)
        prompt = folder.prompt if cfg.prompt is None else str(cfg.prompt)
        return make_sample(blank, folder.points, folder.mask, prompt, folder.name)
    if cfg.points is None:
        raise SampleError("points", "generate=true needs points='[[x, y], ...]' (alternating handle, target, in "
                                    "pixels of the generated image) or sample=DIR")
    return make_sample(blank, cfg.points, cfg.mask, "" if cfg.prompt is None else str(cfg.prompt), "generated")
