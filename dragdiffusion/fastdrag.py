"""FastDrag's one-step drag (Zhao et al., NeurIPS 2024): a latent warp and a hole fill, pure tensor functions.

No LoRA, no optimization: the inverted latent z_t is warped once on the latent grid (1/8 of the working image),
the cells the warp left empty are filled, and the denoising takes the self-attention keys and values of the UNet's
up blocks from the inversion (``attention.InversionKV``). Everything here is vectorized tensor code: no per-cell
Python loop (but ``fill_sequential``, the reference's fill, kept for parity).

Geometry (``../docs``: methods.md, FastDrag), on the latent grid in (row, col) cells:

- the cells to move are the nonzero cells of the mask resized bilinearly to the latent size (an empty mask: every
  cell, see ``mask_cells``);
- the circle O around them: the centre of their bounding box, radius half its diagonal (it holds every cell);
- for a cell C and a handle A, P is the point where the ray from A through C LEAVES the circle and the stretch is
  lambda = 1 - |AC| / |AP|: 1 at the handle, 0 on the circle. With P = A + s (C - A), s is the larger root of
  |A + s (C - A) - O|^2 = R^2, so lambda = 1 - 1 / s. For C inside the circle s >= 1 whether A is inside or
  outside it, so a handle outside the circle is well defined (the reference takes a square root of a negative
  number there); C == A gives lambda = 1 (the reference divides 0 by 0);
- the displacement of C is sum_i w_i lambda_i (B_i - A_i), w_i proportional to 1 / (|C - A_i| + 1e-4), normalized;
  the destination is round(C + displacement) (half to even), clamped to the grid.

Write: the mask cells are zeroed, then every cell to move copies the ORIGINAL latent's channels at C to its
destination; when several cells claim one destination the first in row-major order keeps it (the reference's
sequential write); destinations outside the mask overwrite the background.

Fill: a cell that was a mask cell and was claimed by no source is a hole. ``fill_holes`` (the default) gives each
hole the 1/k-weighted mean of the nearest filled cell to its left, right, up and down (k = the distance in cells),
looking only at the cells filled before the fill (vectorized: cumulative maxima of indices). The reference fills
holes one at a time in raster order, in place, so a hole's left and upper neighbours are already filled holes (at
distance 1) when it is reached: a fill that smears from the top left. ``fill_sequential`` (``fastdrag.fill=
sequential``) does exactly that, with a loop over the holes (slower). A hole with no filled cell in any of the
four directions keeps the original latent's value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_EPS = 1e-4  # w_i = 1 / (|C - A_i| + eps)


def pixels_to_latent(points_xy, image_hw: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixels (x, y) of an H x W image -> latent (row, col), not rounded: y / H * h, x / W * w (the reference's
    pixel / 8 of the working image)."""
    pts = torch.as_tensor(points_xy, dtype=torch.float32).reshape(-1, 2)
    (h_img, w_img), (h, w) = image_hw, latent_hw
    return torch.stack([pts[:, 1] / h_img * h, pts[:, 0] / w_img * w], dim=1)


def mask_cells(mask: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The cells to move: [h, w] bool, the nonzero cells of the mask (H x W, 1 = may change) resized bilinearly to
    the latent size. No mask, or an all-zero one, means no region constraint (the project's rule for every method):
    every cell moves, the circle then surrounds the whole grid."""
    if mask is None or not bool(torch.as_tensor(mask).any()):
        return torch.ones(latent_hw, dtype=torch.bool)
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return F.interpolate(m, size=tuple(latent_hw), mode="bilinear", align_corners=False)[0, 0] > 0


def bounding_circle(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre (row, col), radius) of the circle around the True cells of ``cells`` [h, w]: the centre of their
    bounding box (in cell indices), radius half its diagonal."""
    rc = cells.nonzero().float()
    lo, hi = rc.min(dim=0).values, rc.max(dim=0).values
    return (lo + hi) / 2, (hi - lo).norm() / 2


def stretch_factor(cells_rc: torch.Tensor, handles: torch.Tensor, centre: torch.Tensor,
                   radius: torch.Tensor) -> torch.Tensor:
    """lambda [M, N] for cells [M, 2] and handles [N, 2]: 1 - |AC| / |AP| with P where the ray from the handle A
    through the cell C leaves the circle (1 at the handle, 0 on the circle, in [0, 1])."""
    d = cells_rc[:, None, :] - handles[None, :, :]  # C - A  [M, N, 2]
    a = (d * d).sum(-1)
    ao = handles[None, :, :] - centre  # A - O  [1, N, 2]
    b = 2 * (d * ao).sum(-1)
    c = (ao * ao).sum(-1) - radius ** 2
    disc = (b * b - 4 * a * c).clamp_min(0)
    s = (-b + disc.sqrt()) / (2 * a).clamp_min(1e-12)  # the larger root: where the ray leaves the circle
    lam = (1 - 1 / s.clamp_min(1.0)).clamp(0, 1)
    return torch.where(a > 0, lam, torch.ones_like(lam))  # C == A: the handle itself, lambda = 1


def displacement(cells_rc: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, centre: torch.Tensor,
                 radius: torch.Tensor) -> torch.Tensor:
    """[M, 2]: sum_i w_i lambda_i (B_i - A_i), w_i = 1 / (|C - A_i| + 1e-4) normalized over the handles."""
    lam = stretch_factor(cells_rc, handles, centre, radius)  # [M, N]
    w = 1.0 / ((cells_rc[:, None, :] - handles[None, :, :]).norm(dim=-1) + WEIGHT_EPS)
    w = w / w.sum(dim=1, keepdim=True)
    return ((w * lam)[:, :, None] * (targets - handles)[None, :, :]).sum(dim=1)


@dataclass
class LatentWarp:
    """The warp's result: the warped latent (holes zero) and what the fill and the records need."""
    z: torch.Tensor  # [1, C, h, w]
    holes: torch.Tensor  # [h, w] bool: mask cells claimed by no source
    handle_destinations: torch.Tensor  # [N, 2]: where the warp sends each handle (row, col), unrounded
    moved_cells: int
    centre: torch.Tensor
    radius: float


def move_cells(z: torch.Tensor, cells: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The write: ``z`` [B, C, h, w] with its ``cells`` [h, w] (bool) zeroed, then each cell (row-major order) copies
    the ORIGINAL values at itself to its destination ``dest`` [M, 2] (row, col, integer; one per True cell in
    row-major order); the first cell that claims a destination keeps it (a scatter of the smallest source index).
    Returns (the latent, claimed [h, w] bool)."""
    h, w = z.shape[-2:]
    src = cells.nonzero()
    src_index = src[:, 0] * w + src[:, 1]
    dest_index = dest[:, 0].long() * w + dest[:, 1].long()
    first = torch.full((h * w,), h * w, dtype=torch.long, device=z.device)  # the first claimer of each cell
    first = first.scatter_reduce(0, dest_index, src_index, reduce="amin")
    claimed = first < h * w
    flat = z.reshape(z.shape[0], z.shape[1], h * w)
    out = flat.clone()
    out[..., cells.reshape(-1)] = 0
    out[..., claimed] = flat[..., first[claimed]]
    return out.reshape(z.shape), claimed.reshape(h, w)


def warp_latent(z: torch.Tensor, cells: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor) -> LatentWarp:
    """FastDrag's latent warpage of ``z`` [1, C, h, w]: the ``cells`` [h, w] bool move by ``displacement`` to
    round(C + displacement) clamped to the grid (``move_cells``: the first source in row-major order keeps a
    destination claimed by several). Handles and targets: latent (row, col), unrounded."""
    h, w = z.shape[-2:]
    cells = cells.to(z.device)
    handles, targets = handles.to(z.device, torch.float32), targets.to(z.device, torch.float32)
    centre, radius = bounding_circle(cells)
    src_rc = cells.nonzero().float()  # row-major order
    dest = torch.round(src_rc + displacement(src_rc, handles, targets, centre, radius))
    dest = torch.stack([dest[:, 0].clamp(0, h - 1), dest[:, 1].clamp(0, w - 1)], dim=1).long()
    out, claimed = move_cells(z, cells, dest)
    moved = displacement(handles, handles, targets, centre, radius) + handles
    return LatentWarp(out, cells & ~claimed, moved, int(src_rc.shape[0]), centre, float(radius))


def _nearest_filled(filled: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """For each cell, the index along ``dim`` of the nearest filled cell before it (after it with ``reverse``),
    -1 when there is none. Filled cells give their own index."""
    n = filled.shape[dim]
    shape = [1, 1]
    shape[dim] = n
    idx = torch.arange(n, device=filled.device).reshape(shape).expand_as(filled)
    if not reverse:
        return torch.where(filled, idx, -1).cummax(dim=dim).values
    flipped = torch.where(filled, n - 1 - idx, -1).flip(dim).cummax(dim=dim).values.flip(dim)
    return torch.where(flipped >= 0, n - 1 - flipped, -1)


def fill_holes(z: torch.Tensor, holes: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Bilateral nearest-neighbour fill, vectorized: each hole gets the 1/k-weighted mean of the nearest cell to its
    left, right, up and down that was filled before the fill (k its distance in cells). ``fallback`` [1, C, h, w]:
    the value of a hole with no filled cell in any direction (default: it stays)."""
    filled = ~holes.to(z.device)
    rows = torch.arange(holes.shape[0], device=z.device)[:, None].expand_as(filled)
    cols = torch.arange(holes.shape[1], device=z.device)[None, :].expand_as(filled)
    total = torch.zeros_like(z)
    weight = torch.zeros(holes.shape, dtype=z.dtype, device=z.device)
    for dim, reverse in ((1, False), (1, True), (0, False), (0, True)):
        near = _nearest_filled(filled, dim, reverse)
        ok = near >= 0
        r = torch.where(ok, near, 0) if dim == 0 else rows
        c = torch.where(ok, near, 0) if dim == 1 else cols
        k = ((near - (rows if dim == 0 else cols)).abs()).to(z.dtype)
        wk = torch.where(ok, 1.0 / k.clamp_min(1), torch.zeros_like(k))
        total = total + wk * z[..., r, c]
        weight = weight + wk
    out = z.clone()
    fillable = holes.to(z.device) & (weight > 0)
    out[..., fillable] = (total / weight.clamp_min(1e-12))[..., fillable]
    if fallback is not None:
        lone = holes.to(z.device) & (weight == 0)
        out[..., lone] = fallback.to(z)[..., lone]
    return out


def fill_sequential(z: torch.Tensor, holes: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's fill: holes in raster order, in place (a filled hole feeds the next ones); a cell counts as
    empty while its channel 0 is exactly 0. One Python step per hole (``fastdrag.fill=sequential``, for parity)."""
    out = z.detach().to("cpu", torch.float64 if z.dtype == torch.float64 else torch.float32).clone()[0]
    h, w = out.shape[-2:]
    empty = lambda r, c: bool(out[0, r, c] == 0)  # noqa: E731 - the reference's test
    for r, c in holes.nonzero().tolist():
        if not empty(r, c):
            continue
        total, weight = torch.zeros(out.shape[0]), 0.0
        for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
            rr, cc, k = r + dr, c + dc, 1
            while 0 <= rr < h and 0 <= cc < w and empty(rr, cc):
                rr, cc, k = rr + dr, cc + dc, k + 1
            if 0 <= rr < h and 0 <= cc < w:
                total, weight = total + out[:, rr, cc] / k, weight + 1.0 / k
        if weight > 0:
            out[:, r, c] = total / weight
        elif fallback is not None:
            out[:, r, c] = fallback[0, :, r, c].to(out)
    return out[None].to(z)


FILLS = {"interpolation": fill_holes, "sequential": fill_sequential}
