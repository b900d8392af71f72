"""Motion supervision, point tracking and the mask term: pure functions on tensors.

Points here are (row, col) on the supervision grid; features are [C, H, W].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bilinear_sample(feat: torch.Tensor, points_rc: torch.Tensor) -> torch.Tensor:
    """Sample ``feat`` [C, H, W] at float (row, col) points [..., 2] -> [..., C].

    Coordinates are clamped to the grid (border values), so patches at the bottom/right edge are valid.
    """
    c, h, w = feat.shape
    shape = points_rc.shape[:-1]
    pts = points_rc.reshape(-1, 2).to(feat.dtype)
    rows = pts[:, 0].clamp(0, h - 1)
    cols = pts[:, 1].clamp(0, w - 1)
    grid = torch.stack([cols / max(w - 1, 1) * 2 - 1, rows / max(h - 1, 1) * 2 - 1], dim=-1)
    out = F.grid_sample(feat[None], grid[None, None], mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0].t().reshape(*shape, c)


def patch_coords(center_rc: torch.Tensor, radius: int, grid_hw: tuple[int, int],
                 device: torch.device | None = None) -> torch.Tensor:
    """Integer (row, col) of the square patch of ``radius`` around int(center), clipped to the grid: [N, 2], on
    ``device`` (default: the center's)."""
    h, w = grid_hw
    r0, c0 = int(center_rc[0]), int(center_rc[1])
    device = center_rc.device if device is None else device
    rows = torch.arange(max(0, r0 - radius), min(h, r0 + radius + 1), device=device)
    cols = torch.arange(max(0, c0 - radius), min(w, c0 + radius + 1), device=device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1).float()


def shifted_patch_as_reference(feat: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
                               d: torch.Tensor) -> torch.Tensor | None:
    """The patch ``feat[:, r1:r2, c1:c2]`` shifted by the fractional offset ``d`` (rows, cols), interpolated the way
    the reference does it: one set of four bilinear weights for the whole patch, applied to four shifted slices.
    None when a slice would leave the grid (the reference breaks there; the caller falls back to
    ``bilinear_sample``, which clamps to the border)."""
    (r1, r2), (c1, c2) = rows, cols
    _, h, w = feat.shape
    y1, x1 = r1 + d[0], c1 + d[1]
    y0, x0 = torch.floor(y1), torch.floor(x1)
    top, left = int(y0), int(x0)
    if top < 0 or left < 0 or top + 1 + (r2 - r1) > h or left + 1 + (c2 - c1) > w:
        return None
    wa = (x0 + 1 - x1) * (y0 + 1 - y1)
    wb = (x0 + 1 - x1) * (y1 - y0)
    wc = (x1 - x0) * (y0 + 1 - y1)
    wd = (x1 - x0) * (y1 - y0)
    n, m = r2 - r1, c2 - c1
    return (feat[:, top:top + n, left:left + m] * wa + feat[:, top + 1:top + 1 + n, left:left + m] * wb
            + feat[:, top:top + n, left + 1:left + 1 + m] * wc + feat[:, top + 1:top + 1 + n, left + 1:left + 1 + m] * wd)


def motion_supervision_loss(feat: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, r_m: int,
                            min_distance: float = 2.0, as_reference: bool = False) -> torch.Tensor:
    """sum over handles with |t - p| >= min_distance of (2 r_m + 1)^2 * mean L1(sg(F[q]), F[q + d]).

    ``feat`` [C, H, W] is the current features (with grad); the stop-gradient is on the current features
    at the patch itself, so the gradient pulls the content one step along d = (t - p)/|t - p|.
    ``as_reference``: F[q + d] by ``shifted_patch_as_reference`` (the same values up to rounding, summed in the
    reference's order) where the shifted patch stays inside the grid.
    The patch positions and the skip decisions are Python numbers: one host copy of the handles and their
    distances per call, however many handles.
    """
    loss = feat.new_zeros(())
    grid_hw = feat.shape[-2:]
    deltas = (targets - handles).to(feat.dtype)
    dists = deltas.norm(dim=-1)
    on_host = torch.cat([handles.detach().to(dists.dtype), dists.detach()[:, None]], dim=1).cpu()  # [N, 3]
    for i, (r, c, dist) in enumerate(on_host.tolist()):
        if dist < min_distance:
            continue
        d = deltas[i] / dists[i]
        p = on_host[i, :2]
        if as_reference:
            r0, c0 = int(r), int(c)
            rows = (max(0, r0 - r_m), min(grid_hw[0], r0 + r_m + 1))
            cols = (max(0, c0 - r_m), min(grid_hw[1], c0 + r_m + 1))
            moved = shifted_patch_as_reference(feat, rows, cols, d)
            if moved is not None:
                source = feat[:, rows[0]:rows[1], cols[0]:cols[1]].detach()
                loss = loss + (2 * r_m + 1) ** 2 * F.l1_loss(source, moved)
                continue
        q = patch_coords(p, r_m, grid_hw, feat.device)
        source = feat[:, q[:, 0].long(), q[:, 1].long()].t().detach()  # [N, C]
        moved = bilinear_sample(feat, q + d)  # [N, C]
        loss = loss + (2 * r_m + 1) ** 2 * F.l1_loss(source, moved)
    return loss


@torch.no_grad()
def track_points(feat0: torch.Tensor, feat1: torch.Tensor, handles_init: torch.Tensor, handles: torch.Tensor,
                 r_p: int) -> torch.Tensor:
    """Move each handle to the argmin, over a (2 r_p + 1)^2 window around it (clipped to the grid), of the L1
    distance between ``feat1`` there and ``feat0`` at the handle's original position. Returns new (row, col)
    [N, 2]. All handles at once, on the features' device, without a host sync: positions outside the grid get an
    infinite distance, so the argmin (first minimum in row-major order) is that of the clipped window."""
    _, h, w = feat1.shape
    init = handles_init.long()  # handles are non-negative: truncation is int()
    ref = feat0[:, init[:, 0], init[:, 1]]  # [C, N]
    offsets = torch.arange(-r_p, r_p + 1, device=feat1.device)
    rows = handles[:, 0].long()[:, None, None] + offsets[None, :, None]  # [N, k, 1]
    cols = handles[:, 1].long()[:, None, None] + offsets[None, None, :]  # [N, 1, k]
    rows, cols = torch.broadcast_tensors(rows, cols)  # [N, k, k]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    window = feat1[:, rows.clamp(0, h - 1), cols.clamp(0, w - 1)]  # [C, N, k, k]
    dist = (window - ref[:, :, None, None]).abs().sum(0).masked_fill(~inside, float("inf"))  # [N, k, k]
    best = dist.flatten(1).argmin(dim=1)  # [N]
    picked = torch.stack([rows.flatten(1).gather(1, best[:, None])[:, 0], cols.flatten(1).gather(1, best[:, None])[:, 0]],
                         dim=1)
    return picked.to(handles.dtype)


def handle_distances(handles: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (targets.float() - handles.float()).norm(dim=-1)


def all_reached(handles: torch.Tensor, targets: torch.Tensor, stop_distance: float) -> bool:
    """True when every handle is within ``stop_distance`` grid cells of its target."""
    return bool((handle_distances(handles, targets) < stop_distance).all())


def mask_loss(x_prev: torch.Tensor, x0_prev: torch.Tensor, mask_latent: torch.Tensor, lam: float,
              reduction: str = "sum") -> torch.Tensor:
    """lam * sum |x_prev - x0_prev| * (1 - M): a sum, not a mean (``reduction="mean"``: FreeDrag's mean over every
    latent element). M = 1 where the image may change."""
    diff = (x_prev - x0_prev).abs() * (1.0 - mask_latent)
    return lam * (diff.mean() if reduction == "mean" else diff.sum())


def patch_offsets(radius: int, device=None) -> torch.Tensor:
    """The (2 radius + 1)^2 integer offsets (row, col) of a square patch, row-major: [K, 2] float."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    rr, cc = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)


def preserving_motion_loss(feat: torch.Tensor, feat0: torch.Tensor, handles_init: torch.Tensor,
                           handles: torch.Tensor, targets: torch.Tensor, r1: int = 4, beta: float = 4.0,
                           min_distance: float = 2.0) -> torch.Tensor:
    """GoodDrag's information-preserving motion supervision.

    For each handle p at least ``min_distance`` cells from its target t: the target patch is ``feat0`` (the
    undragged features at this timestep) on the (2 r1 + 1)^2 integer offsets around the handle's ORIGINAL position,
    detached; the prediction is ``feat`` bilinearly sampled on the same offsets around p + min(beta, |t - p|) d,
    d = (t - p) / |t - p|; term = (2 r1)^2 x mean L1 (GoodDrag's weight: 64 for r1 = 4, not 81). Offsets that fall
    off the grid take the border value in both patches (the same size always). All handles at once, no host sync:
    a handle that is close enough contributes 0.
    """
    offsets = patch_offsets(r1, feat.device)  # [K, 2]
    deltas = (targets - handles).float()
    dists = deltas.norm(dim=-1, keepdim=True)  # [N, 1]
    unit = deltas / dists.clamp_min(1e-8)
    centre = handles.float() + torch.minimum(dists, torch.full_like(dists, float(beta))) * unit  # [N, 2]
    source = bilinear_sample(feat0.detach(), handles_init.float()[:, None, :] + offsets[None]).detach()  # [N, K, C]
    moved = bilinear_sample(feat, centre[:, None, :] + offsets[None])  # [N, K, C]
    per_handle = (moved - source).abs().flatten(1).mean(dim=1)  # [N]
    active = (dists[:, 0] >= min_distance).to(per_handle.dtype)
    return (2 * r1) ** 2 * (per_handle * active).sum()
