"""Pixel (x, y) <-> supervision-grid (row, col) coordinates as tensors (the drag's math works on the grid).

The sizes themselves (``working_size``, ``grid_size``) are plain numbers in ``sample.py``, which needs no torch.
"""
from __future__ import annotations

import torch


def pixels_to_grid(points_xy, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Pixels (x, y) of an H x W image -> grid (row, col) = round(y/H*gh), round(x/W*gw), as float tensor."""
    pts = torch.as_tensor(points_xy, dtype=torch.float32).reshape(-1, 2)
    (h, w), (gh, gw) = image_hw, grid_hw
    rows = torch.round(pts[:, 1] / h * gh)
    cols = torch.round(pts[:, 0] / w * gw)
    return torch.stack([rows, cols], dim=1)


def grid_to_pixels(points_rc, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Grid (row, col) -> pixels (x, y) of an H x W image: the inverse scale of ``pixels_to_grid``."""
    pts = torch.as_tensor(points_rc, dtype=torch.float32).reshape(-1, 2)
    (h, w), (gh, gw) = image_hw, grid_hw
    return torch.stack([pts[:, 1] * w / gw, pts[:, 0] * h / gh], dim=1)
