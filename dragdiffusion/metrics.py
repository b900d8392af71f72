"""Drag-editing metrics as torchmetrics: MeanDistance (DIFT point matching; MD and m-MD), ImageFidelity
(1 - LPIPS) and DragAccuracyIndex (DAI, GoodDrag's pixel metric of Drag100; no model).

The math is in pure functions that need no weights:
  bilinear_matrix      the weights of F.interpolate(bilinear, align_corners=False) as a matrix
  encode_latent, dift_features   DIFT: noised VAE latent at t, output of unet.up_blocks[i], mean over noises
  handle_similarities, best_matches (match_handles = both)   for each handle, the cosine-similarity argmax over
                       the edited image's features, anywhere or inside a search mask
  pair_distances       pixel L2 from each match to its target (optionally / the image diagonal)
  dai_pairs, drag_accuracy_index   DAI: source patch at the handle vs edited patch at the target
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
from torchmetrics import Metric

from .backbone import encode_condition, load_backbone
from .conditioning import cond_expand, unet_cond_kwargs
from .config import ModelConfig
from .errors import ModelLoadError, SampleError
from .features import FeatureCapture, StopForward
from .images import as_image_tensor, resize_tensor, to_unit_rgb
from .policy import DevicePolicy
from .sample import working_size

DEFAULT_DIFT_MODEL = "stabilityai/stable-diffusion-2-1"
SEARCH_MODES = ("full", "mask")
FIXED_POINT = 2.0 ** 32  # metric sums are int64 in units of 1 / FIXED_POINT (order-independent, exact)
NORMALIZE_MODES = ("none", "diagonal")
DAI_GAMMAS = (1, 5, 10, 20)  # GoodDrag's patch radii


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
            unet(z_t.to(dtype), t, **unet_cond_kwargs(cond_expand(cond.to(dtype), len(noise))))
        except StopForward:
            pass
        return cap.outputs[up_block].float().mean(0)


def _rounded_points(points_xy: torch.Tensor, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image_hw
    xs = points_xy[:, 0].round().long().clamp(0, w - 1)
    ys = points_xy[:, 1].round().long().clamp(0, h - 1)
    return xs, ys


def handle_similarities(source_feat: torch.Tensor, edited_feat: torch.Tensor, handles_xy,
                        image_hw: tuple[int, int], chunk_rows: int = 64) -> torch.Tensor:
    """[N, H, W]: for each handle (x, y) of an H x W image, the cosine similarity of the source feature at the
    handle to the edited image's feature at every pixel. Features [C, h, w] are bilinearly upsampled to H x W
    (as F.interpolate, align_corners=False), ``chunk_rows`` image rows at a time; handles are rounded to the
    nearest pixel."""
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
    return sims


def best_matches(sims: torch.Tensor, search_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax pixel (x, y) of each handle's similarities [N, H, W] (left unchanged). ``search_mask`` (H x W,
    nonzero = allowed) restricts the search; empty or None = everywhere. Ties go to the first pixel in row-major
    order. Returns [N, 2] long (x, y)."""
    H, W = sims.shape[-2:]
    if search_mask is not None:
        allowed = torch.as_tensor(search_mask, device=sims.device).bool()
        if allowed.shape != (H, W):
            raise ValueError(f"search_mask is {tuple(allowed.shape)}, expected the image's ({H}, {W})")
        if allowed.any():
            sims = sims.masked_fill(~allowed, -torch.inf)
    idx = sims.flatten(1).argmax(dim=1).cpu()
    return torch.stack([idx % W, idx // W], dim=1)


def match_handles(source_feat: torch.Tensor, edited_feat: torch.Tensor, handles_xy, image_hw: tuple[int, int],
                  search_mask: torch.Tensor | None = None, chunk_rows: int = 64) -> torch.Tensor:
    """For each handle (x, y) of an H x W image: the pixel (x, y) of the edited image whose feature is most
    cosine-similar to the source feature at the handle (``handle_similarities`` then ``best_matches``).
    ``search_mask`` (H x W, nonzero = allowed) restricts the search; empty or None = everywhere.
    Ties go to the first pixel in row-major order. Returns [N, 2] long (x, y)."""
    return best_matches(handle_similarities(source_feat, edited_feat, handles_xy, image_hw, chunk_rows), search_mask)


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
    distances. Variants: ``search="mask"`` (m-MD), ``normalize="diagonal"``. ``masked=True`` also computes m-MD
    (matches searched inside the sample's mask) from the same features: ``last["masked_matches"]``,
    ``last["masked_distances"]`` and ``compute_masked()``; it costs one more argmax, no UNet pass.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, model=DEFAULT_DIFT_MODEL, t: int = 261, up_block: int = 1, ensemble_size: int = 8,
                 width: int | None = None, search: str = "full", normalize: str = "none", seed: int = 0,
                 chunk_rows: int = 64, backbone=None, masked: bool = False, **kwargs):
        super().__init__(**kwargs)
        if search not in SEARCH_MODES:
            raise ValueError(f"search: expected one of {SEARCH_MODES}, got {search!r}")
        distance_normalizer(normalize, (1, 1))  # validates the mode
        if backbone is None:
            backbone = load_backbone(_model_config(model), DevicePolicy.cpu())
        self.backbone = backbone
        self.unet, self.vae, self.text_encoder = backbone.unet, backbone.vae, backbone.text_encoder
        if backbone.text_encoder_2 is not None:  # an SDXL DIFT model: placed with the others
            self.text_encoder_2 = backbone.text_encoder_2
        n_train = len(backbone.scheduler.alphas_cumprod)
        if not 0 <= t < n_train:
            raise ValueError(f"t: expected a timestep in 0..{n_train - 1}, got {t}")
        self.t, self.up_block, self.ensemble_size = int(t), int(up_block), int(ensemble_size)
        self.width, self.search, self.normalize = width, search, normalize
        self.seed, self.chunk_rows = int(seed), int(chunk_rows)
        self.masked = bool(masked)
        self.last: dict = {}
        self.add_state("distance_sum", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("masked_distance_sum", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("masked_n_pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

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
        # where Lightning put the metric; SDXL: the time ids of the working size
        cond = encode_condition(self.backbone, prompt, (work_h, work_w), self.text_encoder.device)
        seed = sample_seed(name, self.seed)
        feats = [self.features(resize_tensor(x, (work_h, work_w)), cond, seed) for x in (src, edt)]
        sample_mask = None if mask is None else torch.as_tensor(np.asarray(mask)) > 0
        sims = handle_similarities(feats[0], feats[1], handles, (H, W), self.chunk_rows)
        matches = best_matches(sims, sample_mask if self.search == "mask" else None)
        normalizer = distance_normalizer(self.normalize, (H, W))
        dist = pair_distances(matches, targets, normalizer)
        self.last = {"matches": matches, "distances": dist}
        if self.masked:
            if self.search == "mask" or sample_mask is None or not bool(sample_mask.any()):
                masked_matches, masked_dist = matches, dist  # the same search
            else:
                masked_matches = best_matches(sims, sample_mask)
                masked_dist = pair_distances(masked_matches, targets, normalizer)
            self.last.update(masked_matches=masked_matches, masked_distances=masked_dist)
            self.masked_distance_sum += to_fixed_point(masked_dist).to(self.masked_distance_sum.device)
            self.masked_n_pairs += len(masked_dist)
        self.distance_sum += to_fixed_point(dist).to(self.distance_sum.device)
        self.n_pairs += len(dist)

    @staticmethod
    def _mean(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if n == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return total.double() / FIXED_POINT / n

    def compute(self) -> torch.Tensor:
        return self._mean(self.distance_sum, self.n_pairs)

    def compute_masked(self) -> torch.Tensor:
        """m-MD (``masked=True``): the mean distance of the matches searched inside each sample's mask (a sample
        without a mask: everywhere), synced across processes as ``compute`` is."""
        with self.sync_context():
            return self._mean(self.masked_distance_sum, self.masked_n_pairs)


# ------------------------------------------------------------------------------------------ Image Fidelity

LPIPS_BACKBONES = {"alex": "AlexNet", "vgg": "VGG16", "squeeze": "SqueezeNet"}
LPIPS_MISSING = ("image_fidelity: LPIPS ({net}) needs {missing}. Install torchvision built for your torch "
                 "(pip install -e \".[eval]\", or pip install torchvision) and let it download the ImageNet {net} "
                 "weights once (into "
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


# ------------------------------------------------------------------------------------------ Drag Accuracy Index

def _pixel_points(points_xy, image_hw: tuple[int, int], kind: str, name: str | None) -> list[tuple[int, int]]:
    """Points (x, y) rounded to the nearest pixel (half to even, as MD's matching), checked inside the image."""
    h, w = image_hw
    out = []
    for i, (x, y) in enumerate(torch.as_tensor(points_xy, dtype=torch.float64).reshape(-1, 2).tolist()):
        px, py = round(x), round(y)
        if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= px < w and 0 <= py < h):
            raise SampleError("points", f"{kind} {i} at (x={x}, y={y}) is outside the {w}x{h} image", name)
        out.append((int(px), int(py)))
    return out


def _dai_inputs(source, edited, handles_xy, targets_xy, gamma: int, name: str | None):
    src, edt = to_unit_rgb(source), to_unit_rgb(edited)
    if int(gamma) != gamma or gamma < 0:
        raise ValueError(f"gamma: expected a patch radius >= 0, got {gamma!r}")
    handles = _pixel_points(handles_xy, src.shape[:2], "handle", name)
    targets = _pixel_points(targets_xy, edt.shape[:2], "target", name)
    if len(handles) != len(targets) or not handles:
        raise SampleError("points", f"expected as many targets as handles, at least one pair; got {len(handles)} "
                                    f"and {len(targets)}", name)
    return src, edt, handles, targets, int(gamma)


def dai_pairs(source, edited, handles_xy, targets_xy, gamma: int, name: str | None = None) -> np.ndarray:
    """Per pair [N] (float64): the squared difference, summed over the 3 channels, between the source's patch of
    radius ``gamma`` at the handle and the edited image's patch at the target, averaged over the patch's offsets.

    Images: H x W x 3 uint8 (divided by 255) or float in [0, 1]. Points (x, y) are rounded to the nearest pixel.
    A patch crossing the border: only the offsets (dx, dy) where BOTH the handle's and the target's pixel are
    inside their images count, and the sum is divided by the number of those offsets (two same-size patches;
    inside the image that number is the patch area (2 gamma + 1)^2)."""
    src, edt, handles, targets, g = _dai_inputs(source, edited, handles_xy, targets_xy, gamma, name)
    (hs, ws), (he, we) = src.shape[:2], edt.shape[:2]
    values = np.empty(len(handles), dtype=np.float64)
    for i, ((hx, hy), (tx, ty)) in enumerate(zip(handles, targets)):
        y0, y1 = max(-g, -hy, -ty), min(g, hs - 1 - hy, he - 1 - ty)
        x0, x1 = max(-g, -hx, -tx), min(g, ws - 1 - hx, we - 1 - tx)
        a = src[hy + y0:hy + y1 + 1, hx + x0:hx + x1 + 1]
        b = edt[ty + y0:ty + y1 + 1, tx + x0:tx + x1 + 1]
        values[i] = np.square(a - b).sum() / ((y1 - y0 + 1) * (x1 - x0 + 1))
    return values


def _reference_patch(image: np.ndarray, x: int, y: int, r: int) -> np.ndarray:
    """GoodDrag's patch: a plain slice, so a start above or left of the image wraps around (mostly an empty
    patch) and an end past the bottom or right edge is cut."""
    return image[y - r:y + r + 1, x - r:x + r + 1]


def drag_accuracy_index(source, edited, handles_xy, targets_xy, gamma: int, reference_compat: bool = False,
                        name: str | None = None) -> float:
    """DAI of one image (lower is better): the mean over its pairs of ``dai_pairs`` (the per-pair sum of squared
    differences divided by the patch area).

    ``reference_compat=True`` reproduces GoodDrag's evaluation script: the pairs' sums divided by the number of
    pairs TWICE and by (2 gamma + 1)^2, with its border cut (``_reference_patch``; the divisor stays the full
    area). Its script fails when that cut leaves the two patches of shapes numpy cannot subtract: that is a
    SampleError here (two empty patches, both above or left of the image, add 0)."""
    if not reference_compat:
        return float(dai_pairs(source, edited, handles_xy, targets_xy, gamma, name).mean())
    src, edt, handles, targets, g = _dai_inputs(source, edited, handles_xy, targets_xy, gamma, name)
    total = 0.0
    for i, ((hx, hy), (tx, ty)) in enumerate(zip(handles, targets)):
        a, b = _reference_patch(src, hx, hy, g), _reference_patch(edt, tx, ty, g)
        try:
            total += float(np.square(a - b).sum())
        except ValueError:
            raise SampleError("dai", f"reference_compat: at gamma {g} GoodDrag's border cut leaves the patch at "
                                     f"handle {i} (x={hx}, y={hy}) {a.shape[1]}x{a.shape[0]} px and the one at its "
                                     f"target (x={tx}, y={ty}) {b.shape[1]}x{b.shape[0]} px: its script fails here "
                                     "(dai.reference_compat=false counts the offsets inside both images)",
                              name) from None
    n = len(handles)
    return total / n / (2 * g + 1) ** 2 / n


class DragAccuracyIndex(Metric):
    """Drag Accuracy Index (GoodDrag, Drag100; lower is better) at each patch radius of ``gammas``: the mean over
    images of ``drag_accuracy_index``. Pure pixel math: no model. ``update(source, edited, handles, targets,
    name)`` takes one sample; ``last`` = {gamma: DAI} of the latest one; ``compute()`` = {gamma: DAI} (float64
    tensors). Sums are exact (fixed point), so any number of processes gives the same numbers."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, gammas=DAI_GAMMAS, reference_compat: bool = False, **kwargs):
        super().__init__(**kwargs)
        gammas = tuple(int(g) for g in gammas)
        if not gammas or any(g < 0 for g in gammas) or len(set(gammas)) != len(gammas):
            raise ValueError(f"gammas: expected distinct patch radii >= 0, got {list(gammas)}")
        self.gammas, self.reference_compat = gammas, bool(reference_compat)
        self.last: dict[int, float] = {}
        self.add_state("dai_sum", default=torch.zeros(len(gammas), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def values(self, source, edited, handles, targets, name: str | None = None) -> dict[int, float]:
        """{gamma: DAI} of one sample, without updating the state."""
        return {g: drag_accuracy_index(source, edited, handles, targets, g, self.reference_compat, name)
                for g in self.gammas}

    @torch.no_grad()
    def update(self, source, edited, handles, targets, name: str | None = None) -> None:
        last = self.values(source, edited, handles, targets, name)
        v = torch.tensor([last[g] for g in self.gammas], dtype=torch.float64)
        self.last = last
        self.dai_sum += torch.round(v * FIXED_POINT).long().to(self.dai_sum.device)
        self.n_images += 1

    def compute(self) -> dict[int, torch.Tensor]:
        if self.n_images == 0:
            return {g: torch.tensor(float("nan"), dtype=torch.float64) for g in self.gammas}
        values = self.dai_sum.double() / FIXED_POINT / self.n_images
        return {g: values[i] for i, g in enumerate(self.gammas)}
