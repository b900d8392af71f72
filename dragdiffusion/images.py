"""Every conversion of pictures between numpy, PIL and tensors, in one place.

Conventions of the whole package:
- A picture at an interface is an H x W x 3 uint8 numpy array (RGB); a mask is H x W uint8 in {0, 1}
  (1 = may change). Point coordinates are pixels (x, y); everything else about size is (height, width):
  ``size_hw``, as torch orders it.
- A picture going into the VAE is a float tensor [B, 3, H, W] in [-1, 1]; ``decode_latent`` gives [B, 3, H, W]
  in [0, 1].
- Resampling follows the reference (DragDiffusion) where results depend on it: into the model, bilinear with
  antialias (the reference resizes with PIL's BILINEAR, which filters like an antialiased bilinear); out of the
  model, F.interpolate bilinear without antialias, clamped to [0, 1], then truncated to uint8
  (``(x * 255).astype(uint8)``, the reference's rule). Masks are resized nearest-neighbour.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def to_model_input(image: np.ndarray, size_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 H x W x 3 -> [1, 3, h, w] float in [-1, 1], bilinear (antialiased) to ``size_hw`` if given."""
    x = rearrange(torch.from_numpy(np.array(image, dtype=np.uint8)), "h w c -> 1 c h w").float() / 127.5 - 1
    if size_hw is not None and tuple(x.shape[-2:]) != tuple(size_hw):
        x = F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=True)
    return x


def to_uint8(x: torch.Tensor, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The first image of [B, 3, h, w] in [0, 1] -> H x W x 3 uint8, bilinear-resized to ``size_hw`` if given
    (no antialias), clamped, truncated as the reference does."""
    x = x[:1].float()
    if size_hw is not None and tuple(x.shape[-2:]) != tuple(size_hw):
        x = F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1)
    return (rearrange(x, "1 c h w -> h w c").cpu().numpy() * 255).astype(np.uint8)


def as_image_tensor(image) -> torch.Tensor:
    """uint8 H x W x 3 array, or a float tensor [3, H, W] / [B, 3, H, W] in [-1, 1] -> [B, 3, H, W] float."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
        return to_model_input(image)
    x = torch.as_tensor(image).float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an image tensor [B, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
    return x


def resize_tensor(x: torch.Tensor, size_hw: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W], bilinear (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size_hw):
        return x
    return F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=antialias)


def resize_uint8(image: np.ndarray, size_hw: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """An H x W (x C) uint8 picture resized with PIL (display, thumbnails, masks of the app)."""
    h, w = size_hw
    return np.asarray(Image.fromarray(np.asarray(image)).resize((int(w), max(int(h), 1)), RESAMPLE[resample]))


def to_unit_rgb(image) -> np.ndarray:
    """An H x W x 3 picture as float64 RGB in [0, 1] (pixel metrics such as DAI): uint8 is divided by 255 (as
    torchvision's ToTensor), a float array is taken as already in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


def thumbnail(image: np.ndarray, size: int = 128) -> np.ndarray:
    """A copy that fits in ``size`` x ``size`` (aspect kept)."""
    img = Image.fromarray(np.asarray(image))
    img.thumbnail((size, size), Image.BILINEAR)
    return np.asarray(img).copy()


def resize_mask(mask, size_hw: tuple[int, int]) -> torch.Tensor:
    """H x W {0, 1} mask (array or tensor) or [1, 1, H, W] -> [1, 1, h, w] float, nearest-resized."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    m = m if m.ndim == 4 else m[None, None]
    return F.interpolate(m, size=tuple(size_hw), mode="nearest")


def latent_mask(mask, grid_hw: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """The mask the mask term uses, resized as the reference does it: nearest to the supervision grid first, then
    nearest from there to the latent size. (Straight to the latent size differs in a few cells of most
    non-square images, and that changes the mask term from the first iteration.)"""
    return resize_mask(resize_mask(mask, grid_hw), latent_hw)
