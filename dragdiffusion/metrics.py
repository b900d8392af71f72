"""DragBench metrics as torchmetrics: MeanDistance (DIFT point matching) and ImageFidelity (1 - LPIPS).

The math is in pure functions that need no weights:
  bilinear_matrix      the weights of F.interpolate(bilinear, align_corners=False) as a matrix
  encode_latent, dift_features   DIFT: noised VAE latent at t, output of unet.up_blocks[i], mean over noises
  match_handles        for each handle, the cosine-similarity argmax over the edited image's features
  pair_distances       pixel L2 from each match to its target (optionally / the image diagonal)
The metric classes only load the model, prepare the images and accumulate sums (``dist_reduce_fx="sum"``).
The sums are kept in fixed point (integers in units of 2**-32) so that they do not depend on the order of
summation: a result is bit-identical on any number of processes.
"""
from __future__ import annotations

import importlib.util
import math
import zlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .backbone import encode_prompt, load_backbone
from .config import ModelConfig
from .errors import ModelLoadError, SampleError
from .features import FeatureCapture, StopForward
from .images import as_image_tensor, resize_tensor
from .policy import DevicePolicy
from .sample import working_size

DEFAULT_DIFT_MODEL = "stabilityai/stable-diffusion-2-1"
SEARCH_MODES = ("full", "mask")
FIXED_POINT = 2.0 ** 32  # metric sums are int64 in units of 1 / FIXED_POINT (order-independent, exact)
NORMALIZE_MODES = ("none", "diagonal")


# ------------------------------------------------------------------------------------------ pure functions

def bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bilinear resizing (align_corners=False, edges clamped), as F.interpolate."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m.float()


def sample_seed(name: str, seed: int = 0) -> int:
    """The noise seed of one sample: from its name (not its position), so order and devices do not matter."""
    return zlib.crc32(f"{int(seed)}:{name}".encode()) & 0x7FFFFFFF


@torch.no_grad()
def encode_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] -> mean of the VAE latent distribution x scaling factor (fp32)."""
    z = vae.encode(image.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return z.float() * vae.config.scaling_factor


@torch.no_grad()
def dift_features(unet, scheduler, latent: torch.Tensor, cond: torch.Tensor, t: int, noise: torch.Tensor,
                  up_block: int = 1) -> torch.Tensor:
    """DIFT features [C, h, w] (fp32): the latent noised to ``t`` with each of the ``noise`` [E, 4, h, w]
    (DDPM forward noising: the scheduler's ``add_noise``), one UNet pass with the prompt embedding ``cond`` [1, 77, D], output of
    ``unet.up_blocks[up_block]`` averaged over the E noises. The UNet stops after that block."""
    noise = noise.to(device=latent.device, dtype=torch.float32)
    z_t = scheduler.add_noise(latent.float().expand(len(noise), -1, -1, -1), noise,
                              torch.full((len(noise),), int(t), dtype=torch.long, device=latent.device))
    dtype = unet.dtype
    with FeatureCapture(unet, [up_block]) as cap:
        cap.stop_after_last = True
        try:
            unet(z_t.to(dtype), t, encoder_hidden_states=cond.to(dtype).expand(len(noise), -1, -1))
        except StopForward:
            pass
        return cap.outputs[up_block].float().mean(0)


def _rounded_points(points_xy: torch.Tensor, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image_hw
    xs = points_xy[:, 0].round().long().clamp(0, w - 1)
    ys = points_xy[:, 1].round().long().clamp(0, h - 1)
    return xs, ys


def match_handles(source_feat: torch.Tensor, edited_feat: torch.Tensor, handles_xy, image_hw: tuple[int, int],
                  search_mask: torch.Tensor | None = None, chunk_rows: int = 64) -> torch.Tensor:
    """For each handle (x, y) of an H x W image: the pixel (x, y) of the edited image whose feature is most
    cosine-similar to the source feature at the handle. Features [C, h, w] are bilinearly upsampled to H x W
    (as F.interpolate, align_corners=False), ``chunk_rows`` image rows at a time; handles are rounded to the
    nearest pixel. ``search_mask`` (H x W, nonzero = allowed) restricts the search; empty or None = everywhere.
    Ties go to the first pixel in row-major order. Returns [N, 2] long (x, y)."""
    H, W = image_hw
    handles = torch.as_tensor(handles_xy, dtype=torch.float32).reshape(-1, 2)
    device = edited_feat.device
    src, edt = source_feat.float(), edited_feat.float()
    xs, ys = _rounded_points(handles, image_hw)
    ah_s, aw_s = bilinear_matrix(H, src.shape[1]).to(device), bilinear_matrix(W, src.shape[2]).to(device)
    vec = torch.einsum("nh,chw,nw->nc", ah_s[ys.to(device)], src, aw_s[xs.to(device)])
    vec = vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ah, aw = bilinear_matrix(H, edt.shape[1]).to(device), bilinear_matrix(W, edt.shape[2]).to(device)
    sims = torch.empty(len(handles), H, W, device=device)
    for r0 in range(0, H, chunk_rows):
        up = torch.einsum("yh,chw,xw->cyx", ah[r0:r0 + chunk_rows], edt, aw)
        up = up / up.norm(dim=0, keepdim=True).clamp_min(1e-12)
        sims[:, r0:r0 + chunk_rows] = torch.einsum("nc,cyx->nyx", vec, up)
    if search_mask is not None:
        allowed = torch.as_tensor(search_mask, device=device).bool()
        if allowed.shape != (H, W):
            raise ValueError(f"search_mask is {tuple(allowed.shape)}, expected the image's ({H}, {W})")
        if allowed.any():
            sims[:, ~allowed] = -torch.inf
    idx = sims.flatten(1).argmax(dim=1).cpu()
    return torch.stack([idx % W, idx // W], dim=1)


def distance_normalizer(mode: str, image_hw: tuple[int, int]) -> float:
    """The divisor of the pixel distances: 1 (none) or the image diagonal (diagonal)."""
    if mode == "none":
        return 1.0
    if mode == "diagonal":
        return math.hypot(*image_hw)
    raise ValueError(f"normalize: expected one of {NORMALIZE_MODES}, got {mode!r}")


def pair_distances(matches_xy, targets_xy, normalizer: float = 1.0) -> torch.Tensor:
    """L2 distance [N] (float64) from each match to its target, divided by ``normalizer``."""
    m = torch.as_tensor(matches_xy, dtype=torch.float64).reshape(-1, 2)
    t = torch.as_tensor(targets_xy, dtype=torch.float64).reshape(-1, 2)
    return (m - t).norm(dim=1) / normalizer


def to_fixed_point(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` as an int64 in units of 1 / FIXED_POINT: integer sums are associative."""
    return torch.round(values.double() * FIXED_POINT).long().sum()


# ------------------------------------------------------------------------------------------ Mean Distance

def _model_config(model):
    """A model section (config/dataclass with name_or_path) or a plain name -> a ModelConfig-like object."""
    if hasattr(model, "name_or_path"):
        return model
    return ModelConfig(name_or_path=str(model), local_files_only=str(model) == "tiny")


class MeanDistance(Metric):
    """DragBench Mean Distance (lower is better): for each handle, the best DIFT-feature match in the edited
    image; the mean pixel L2 distance of the matches to their targets over all pairs of all samples.

    ``update(source, edited, handles, targets, prompt, name, mask)`` takes one sample (images of the same size:
    H x W x 3 uint8 or [1, 3, H, W] in [-1, 1]; points (x, y) in its pixels). The same seeded noises (from
    ``name``) are used for the source and the edited image. ``last`` holds the latest sample's matches and
    distances. Variants: ``search="mask"`` (m-MD), ``normalize="diagonal"``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, model=DEFAULT_DIFT_MODEL, t: int = 261, up_block: int = 1, ensemble_size: int = 8,
                 width: int | None = None, search: str = "full", normalize: str = "none", seed: int = 0,
                 chunk_rows: int = 64, backbone=None, **kwargs):
        super().__init__(**kwargs)
        if search not in SEARCH_MODES:
            raise ValueError(f"search: expected one of {SEARCH_MODES}, got {search!r}")
        distance_normalizer(normalize, (1, 1))  # validates the mode
        if backbone is None:
            backbone = load_backbone(_model_config(model), DevicePolicy.cpu())
        self.backbone = backbone
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        n_train = len(backbone.scheduler.alphas_cumprod)
        if not 0 <= t < n_train:
            raise ValueError(f"t: expected a timestep in 0..{n_train - 1}, got {t}")
        self.t, self.up_block, self.ensemble_size = int(t), int(up_block), int(ensemble_size)
        self.width, self.search, self.normalize = width, search, normalize
        self.seed, self.chunk_rows = int(seed), int(chunk_rows)
        self.last: dict = {}
        self.add_state("distance_sum", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def features(self, image: torch.Tensor, cond: torch.Tensor, noise_seed: int) -> torch.Tensor:
        latent = encode_latent(self.vae, image)
        generator = torch.Generator().manual_seed(noise_seed)  # on the CPU: the same noise on every device
        noise = torch.randn((self.ensemble_size, *latent.shape[1:]), generator=generator)
        return dift_features(self.unet, self.backbone.scheduler, latent, cond, self.t, noise, self.up_block)

    @torch.no_grad()
    def update(self, source, edited, handles, targets, prompt: str = "", name: str = "", mask=None) -> None:
        src, edt = as_image_tensor(source), as_image_tensor(edited)
        H, W = src.shape[-2:]
        if edt.shape[-2:] != src.shape[-2:]:
            raise SampleError("edited image", f"{edt.shape[-1]}x{edt.shape[-2]} px, but the source is {W}x{H}; "
                                              "expected the same size", name or None)
        handles = torch.as_tensor(handles, dtype=torch.float32).reshape(-1, 2)
        targets = torch.as_tensor(targets, dtype=torch.float32).reshape(-1, 2)
        if len(handles) != len(targets) or len(handles) == 0:
            raise SampleError("points", f"expected as many targets as handles, got {len(handles)} and "
                                        f"{len(targets)}", name or None)
        work_w, work_h = (W, H) if self.width is None else working_size(W, H, int(self.width))
        cond = encode_prompt(self.backbone, prompt, self.text_encoder.device)  # where Lightning put the metric
        seed = sample_seed(name, self.seed)
        feats = [self.features(resize_tensor(x, (work_h, work_w)), cond, seed) for x in (src, edt)]
        search_mask = None
        if self.search == "mask" and mask is not None:
            search_mask = torch.as_tensor(np.asarray(mask)) > 0
        matches = match_handles(feats[0], feats[1], handles, (H, W), search_mask, self.chunk_rows)
        dist = pair_distances(matches, targets, distance_normalizer(self.normalize, (H, W)))
        self.last = {"matches": matches, "distances": dist}
        self.distance_sum += to_fixed_point(dist).to(self.distance_sum.device)
        self.n_pairs += len(dist)

    def compute(self) -> torch.Tensor:
        if self.n_pairs == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.distance_sum.double() / FIXED_POINT / self.n_pairs


# ------------------------------------------------------------------------------------------ Image Fidelity

LPIPS_BACKBONES = {"alex": "AlexNet", "vgg": "VGG16", "squeeze": "SqueezeNet"}
LPIPS_MISSING = ("image_fidelity: LPIPS ({net}) needs {missing}. Install torchvision built for your torch "
                 "(pip install torchvision) and let it download the ImageNet {net} weights once (into "
                 "~/.cache/torch/hub/checkpoints), or pass ImageFidelity(net=callable) with a callable "
                 "(x, y) -> per-sample distance, or turn the metric off with image_fidelity.enabled=false.")


def lpips_network(net_type: str = "alex") -> torch.nn.Module:
    """torchmetrics' LPIPS network as a callable (x, y) -> per-sample distance; ModelLoadError where missing."""
    net = LPIPS_BACKBONES.get(net_type, net_type)
    if importlib.util.find_spec("torchvision") is None:
        raise ModelLoadError(LPIPS_MISSING.format(net=net, missing="torchvision, which is not installed"))
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        lpips = LearnedPerceptualImagePatchSimilarity(net_type=net_type)
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        missing = f"its pretrained weights, which could not be loaded ({exc.__class__.__name__}: {exc})"
        raise ModelLoadError(LPIPS_MISSING.format(net=net, missing=missing)) from None
    return _LpipsDistance(lpips.net)


class _LpipsDistance(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y).reshape(len(x))


class ImageFidelity(Metric):
    """DragBench Image Fidelity (higher is better): mean over images of 1 - LPIPS(source, edited), both resized
    (bilinear) to ``size`` x ``size``, inputs in [-1, 1]. ``net`` is any callable (x, y) -> per-sample
    distance; default torchmetrics' LPIPS with ``net_type`` (AlexNet). ``last``: the latest update's values."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, net: Callable | None = None, net_type: str = "alex", size: int = 224, **kwargs):
        super().__init__(**kwargs)
        self.net = net if net is not None else lpips_network(net_type)
        self.size = int(size)
        self.last = torch.empty(0)
        self.add_state("fidelity_sum", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, source, edited) -> None:
        x, y = as_image_tensor(source), as_image_tensor(edited)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"expected as many edited images as sources, got {y.shape[0]} and {x.shape[0]}")
        device = self.fidelity_sum.device
        size = (self.size, self.size)
        x = resize_tensor(x.to(device), size, antialias=False)
        y = resize_tensor(y.to(device), size, antialias=False)
        fidelity = 1 - torch.as_tensor(self.net(x, y)).reshape(len(x)).double()
        self.last = fidelity.cpu()
        self.fidelity_sum += to_fixed_point(fidelity).to(device)
        self.n_images += len(fidelity)

    def compute(self) -> torch.Tensor:
        if self.n_images == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.fidelity_sum.double() / FIXED_POINT / self.n_images
