"""Pixel <-> grid conversion and working sizes, with known answers."""
import torch

from dragdiffusion.geometry import grid_to_pixels, pixels_to_grid
from dragdiffusion.sample import grid_size, working_size


def test_working_size_keeps_aspect_and_truncates_height():
    assert working_size(1024, 682, 512) == (512, 341)
    assert working_size(512, 913, 512) == (512, 913)
    assert working_size(800, 600, 128) == (128, 96)


def test_grid_is_half_the_working_image():
    assert grid_size(512, 341, 0.5) == (170, 256)
    assert grid_size(512, 512, 0.5) == (256, 256)


def test_pixels_to_grid_known_values():
    # (x, y) -> (row, col) = round(y/H*gh), round(x/W*gw)
    rc = pixels_to_grid([[100, 50], [511, 340]], (341, 512), (170, 256))
    assert rc.tolist() == [[round(50 / 341 * 170), 50.0], [round(340 / 341 * 170), round(511 / 512 * 256)]]


def test_grid_to_pixels_inverts_scale():
    px = torch.tensor([[40.0, 120.0], [300.0, 10.0]])
    rc = pixels_to_grid(px, (400, 600), (200, 300))
    back = grid_to_pixels(rc, (400, 600), (200, 300))
    # exact up to the rounding of one grid cell (2 px here)
    assert torch.all((back - px).abs() <= 1.0 + 1e-6)
    assert torch.allclose(grid_to_pixels(torch.tensor([[10.0, 20.0]]), (400, 600), (200, 300)),
                          torch.tensor([[40.0, 20.0]]))
