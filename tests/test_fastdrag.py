"""FastDrag (method=fastdrag): the warp, the fill and the inversion's keys and values, with known answers; its
traps; and whole edits on the tiny model."""
from __future__ import annotations

import pytest
import torch

from conftest import editor_with
from dragdiffusion.attention import InversionKVProcessor, controlled_layer_names
from dragdiffusion.config import load_config
from dragdiffusion.demo import demo_sample
from dragdiffusion.fastdrag import (bounding_circle, displacement, fill_holes, fill_sequential, mask_cells, move_cells,
                                    pixels_to_latent, stretch_factor, warp_latent)
from dragdiffusion.sample import make_sample

FASTDRAG = ["method=fastdrag", "drag.width=64"]


# ------------------------------------------------------------------ the preset
def test_fastdrag_preset_holds_its_published_defaults_and_other_presets_reset_them():
    cfg = load_config(None, ["method=fastdrag"])
    assert str(cfg.method) == "fastdrag" and not cfg.lora.enabled
    assert (cfg.drag.num_inference_steps, cfg.drag.inversion_strength, cfg.drag.guidance_scale) == (10, 0.7, 1.0)
    assert str(cfg.fastdrag.fill) == "interpolation" and list(cfg.fastdrag.kv_layers) == ["up_blocks"]
    back = load_config(None, ["method=fastdrag", "method=dragdiffusion"])
    assert back.lora.enabled and back.drag.num_inference_steps == 50
    from dragdiffusion.config import MethodName
    from dragdiffusion.methods import METHODS
    assert {n: m.optimizes for n, m in METHODS.items()} == {m.value: m.optimizes for m in MethodName}


# ------------------------------------------------------------------ the stretch and the displacement
def test_stretch_factor_is_one_at_the_handle_and_zero_on_the_circle():
    centre, radius = torch.tensor([10.0, 10.0]), torch.tensor(5.0)
    handle = torch.tensor([[10.0, 10.0]])
    cells = torch.tensor([[10.0, 10.0], [10.0, 15.0], [13.0, 14.0], [10.0, 12.5]])  # handle, on the circle x2, half
    lam = stretch_factor(cells, handle, centre, radius)[:, 0]
    assert lam[0] == 1.0 and float(lam[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(lam[2]) == pytest.approx(0.0, abs=1e-6) and float(lam[3]) == pytest.approx(0.5)
    # a handle off-centre: still 1 at the handle, 0 on the circle, between in the middle
    off = torch.tensor([[8.0, 11.0]])
    lam = stretch_factor(torch.tensor([[8.0, 11.0], [10.0, 5.0], [9.0, 8.0]]), off, centre, radius)[:, 0]
    assert lam[0] == 1.0 and float(lam[1]) == pytest.approx(0.0, abs=1e-5) and 0 < float(lam[2]) < 1


def test_a_handle_outside_the_circle_and_a_handle_on_a_cell_are_defined():
    """The reference takes the square root of a negative number for a handle outside the circle and divides 0 by 0
    for a handle exactly on a cell: here the ray's exit point and lambda = 1 at the handle."""
    centre, radius = torch.tensor([10.0, 10.0]), torch.tensor(3.0)
    outside = torch.tensor([[10.0, 20.0]])
    cells = torch.tensor([[10.0, 12.0], [10.0, 8.0], [11.0, 10.0]])
    lam = stretch_factor(cells, outside, centre, radius)
    assert torch.isfinite(lam).all() and (lam >= 0).all() and (lam <= 1).all()
    # on the ray from (10, 20) through (10, 12) the circle is left at (10, 7): lambda = 1 - 8 / 13
    assert float(lam[0, 0]) == pytest.approx(1 - 8 / 13)
    on_cell = stretch_factor(torch.tensor([[10.0, 12.0]]), torch.tensor([[10.0, 12.0]]), centre, radius)
    assert on_cell.item() == 1.0
    d = displacement(torch.tensor([[10.0, 12.0]]), torch.tensor([[10.0, 12.0]]), torch.tensor([[10.0, 15.0]]),
                     centre, radius)
    assert torch.isfinite(d).all() and d.tolist() == [[0.0, 3.0]]  # the handle itself moves the whole drag


def test_a_single_handle_translates_its_neighbour_by_almost_the_full_drag():
    z = torch.arange(4 * 32 * 32, dtype=torch.float32).reshape(1, 4, 32, 32) + 1
    cells = torch.zeros(32, 32, dtype=torch.bool)
    cells[2:30, 2:30] = True  # a big region: the circle's radius is about 19.8 cells
    handle, target = torch.tensor([[16.0, 16.0]]), torch.tensor([[16.0, 20.0]])
    neighbour = torch.tensor([[16.0, 17.0]])
    centre, radius = bounding_circle(cells)
    d = displacement(neighbour, handle, target, centre, radius)
    assert float(d[0, 1]) == pytest.approx(4.0, rel=0.1) and float(d[0, 0]) == pytest.approx(0.0, abs=1e-6)
    warp = warp_latent(z, cells, handle, target)
    # the neighbour's original value lands 4 cells right of it (round(17 + 3.8) = 21)
    assert torch.equal(warp.z[0, :, 16, 21], z[0, :, 16, 17])
    assert torch.equal(warp.z[0, :, 16, 20], z[0, :, 16, 16])  # the handle's content is at the target
    assert warp.handle_destinations.tolist() == [[16.0, 20.0]]
    # outside the region nothing moves
    assert torch.equal(warp.z[..., 0, :], z[..., 0, :]) and torch.equal(warp.z[..., :, 31], z[..., :, 31])


def test_the_first_write_wins_on_a_collision():
    z = torch.arange(1 * 2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4) + 1
    cells = torch.zeros(4, 4, dtype=torch.bool)
    cells[1, 1] = cells[1, 2] = cells[2, 1] = True  # row-major: (1, 1), (1, 2), (2, 1)
    dest = torch.tensor([[3, 3], [3, 3], [0, 0]])  # (1, 1) and (1, 2) both claim (3, 3)
    out, claimed = move_cells(z, cells, dest)
    assert torch.equal(out[0, :, 3, 3], z[0, :, 1, 1])  # the first in row-major order keeps it
    assert torch.equal(out[0, :, 0, 0], z[0, :, 2, 1])  # a destination outside the cells overwrites the background
    assert (out[0, :, 1, 1] == 0).all() and (out[0, :, 1, 2] == 0).all()  # sources nobody claimed: holes
    assert claimed.nonzero().tolist() == [[0, 0], [3, 3]]


# ------------------------------------------------------------------ the fill
def test_a_one_cell_hole_gets_the_inverse_distance_weighted_mean_of_its_neighbours():
    z = torch.zeros(1, 1, 5, 5)
    z[0, 0, 2, 1], z[0, 0, 2, 3], z[0, 0, 1, 2], z[0, 0, 3, 2] = 1.0, 3.0, 5.0, 7.0
    z[0, 0, 0, 0] = 9.0  # other cells stay as they are
    holes = torch.zeros(5, 5, dtype=torch.bool)
    holes[2, 2] = True
    for fill in (fill_holes, fill_sequential):
        out = fill(z + 0, holes)
        assert float(out[0, 0, 2, 2]) == pytest.approx((1 + 3 + 5 + 7) / 4)
        assert torch.equal(out[..., ~holes], z[..., ~holes])
    # a wider hole: k = 1 on the left, 2 on the right, no cell above or below in the grid's edge rows
    z2 = torch.zeros(1, 1, 1, 4)
    z2[0, 0, 0, 0], z2[0, 0, 0, 3] = 2.0, 8.0
    holes2 = torch.tensor([[False, True, True, False]])
    out = fill_holes(z2, holes2)
    assert float(out[0, 0, 0, 1]) == pytest.approx((2 / 1 + 8 / 2) / (1 + 1 / 2))
    # the reference's sequential fill feeds the first filled hole into the next one (its left neighbour)
    seq = fill_sequential(z2 + 0, holes2)
    first = (2 / 1 + 8 / 2) / (1 + 1 / 2)
    assert float(seq[0, 0, 0, 2]) == pytest.approx((first / 1 + 8 / 1) / 2)
    assert float(out[0, 0, 0, 2]) == pytest.approx((2 / 2 + 8 / 1) / (1 / 2 + 1))  # vectorized: cells filled before


def test_a_hole_with_no_filled_cell_in_any_direction_takes_the_fallback():
    z = torch.zeros(1, 2, 3, 3)
    holes = torch.ones(3, 3, dtype=torch.bool)
    fallback = torch.full((1, 2, 3, 3), 4.0)
    assert torch.equal(fill_holes(z, holes, fallback), fallback)
    assert torch.equal(fill_sequential(z, holes, fallback), fallback)


# ------------------------------------------------------------------ the mask and the grid
def test_an_empty_mask_moves_the_whole_grid_and_points_map_to_latent_cells():
    assert mask_cells(None, (6, 8)).all() and mask_cells(torch.zeros(48, 64), (6, 8)).all()
    m = torch.zeros(48, 64)
    m[8:16, 16:24] = 1
    cells = mask_cells(m, (6, 8))
    assert cells[1, 2] and not cells[5, 7]
    assert pixels_to_latent([[32.0, 24.0]], (48, 64), (6, 8)).tolist() == [[3.0, 4.0]]  # pixel / 8


def test_points_near_the_border_stay_on_the_grid():
    z = torch.randn(1, 4, 8, 8)
    cells = torch.ones(8, 8, dtype=torch.bool)
    warp = warp_latent(z, cells, torch.tensor([[0.0, 0.0]]), torch.tensor([[7.9, 7.9]]))  # corner to corner
    out = fill_holes(warp.z, warp.holes, fallback=z)
    assert out.shape == z.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------ the inversion's keys and values
def test_fastdrag_edit_replays_the_inversions_keys_and_values_in_the_up_blocks_only(tiny_editor, monkeypatch):
    editor = editor_with(tiny_editor, FASTDRAG)
    unet = editor.backbone.unet
    starts, installed = [], []
    original_invert = editor.invert
    monkeypatch.setattr(editor, "invert", lambda sample: starts.append(original_invert(sample)) or starts[-1])

    def spy(module, args, kwargs):
        installed.append({n for n, p in unet.attn_processors.items() if isinstance(p, InversionKVProcessor)})
    hook = unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = editor.edit(demo_sample(64, 48))
    finally:
        hook.remove()
    start = starts[0]
    up_self = set(controlled_layer_names(unet, ["up_blocks"]))
    assert up_self and all(".attn1." in n and n.startswith("up_blocks.") for n in up_self)
    # 7 inversion forwards recording, 7 denoising forwards replaying: exactly the up blocks' self-attention
    assert len(installed) == 14 and all(s == up_self for s in installed)
    assert len(start.kv) == 0 and not start.kv.replayed  # freed after the edit
    assert result.trajectory["t"] == 601 and result.trajectory["iterations"] == 0
    assert result.trajectory["method"]["name"] == "fastdrag" and result.trajectory["lora"] is None
    assert result.image.shape == (48, 64, 3)


def test_replayed_keys_and_values_are_the_inversions_at_the_same_timestep(tiny_editor, monkeypatch):
    """The denoising's up-block self-attention uses, at timestep t, the keys and values recorded at t."""
    from dragdiffusion.attention import InversionKV
    editor = editor_with(tiny_editor, FASTDRAG)
    seen = []
    original_get = InversionKV.get

    def get(self, name, batch):
        k, v = original_get(self, name, batch)
        seen.append((self.t, name, k))
        return k, v
    recorded = {}
    original_put = InversionKV.put

    def put(self, name, k, v):
        recorded[(self.t, name)] = k.detach().clone()
        original_put(self, name, k, v)
    monkeypatch.setattr(InversionKV, "get", get)
    monkeypatch.setattr(InversionKV, "put", put)
    editor.edit(demo_sample(64, 48))
    timesteps = sorted({t for t, _ in recorded})
    assert timesteps == [1, 101, 201, 301, 401, 501, 601]
    assert [t for t, _, _ in seen][::len(seen) // 7] == [601, 501, 401, 301, 201, 101, 1]
    assert all(torch.equal(k, recorded[(t, name)]) for t, name, k in seen)


@pytest.mark.slow
def test_fastdrag_is_deterministic_and_moves_content_toward_the_target(tiny_editor):
    editor = editor_with(tiny_editor, ["method=fastdrag", "drag.width=128"])
    base = demo_sample(128, 96)
    sample = make_sample(base.image, [[40, 48], [80, 48]], None, "", "far")
    a, b = editor.edit(sample), editor.edit(sample)
    assert (a.image == b.image).all() and torch.equal(a.z_edited, b.z_edited)
    assert not torch.equal(a.z_edited, a.z_t)  # the warp changed the latent
    assert a.trajectory["fastdrag"]["whole_image"] and a.trajectory["final_distance_px"][0] < 8


def test_fastdrag_on_a_generated_image_takes_the_samplers_keys_and_values(tiny_editor):
    """No inversion for a generated image: its keys and values come from the sampler's own way down from z_t
    (guided: [uncond, cond] rows, the same batch as the edit's denoising)."""
    editor = editor_with(tiny_editor, ["method=fastdrag", "generation.width=96", "generation.height=64",
                                       "generation.steps=10"])
    generated = editor.generate("a red ball")
    a = editor.edit_generated(generated, [[20, 24], [40, 24]])
    b = editor.edit_generated(generated, [[20, 24], [40, 24]])
    assert (a.image == b.image).all() and a.trajectory["t"] == 601 and a.image.shape == (64, 96, 3)
    assert not (a.image == generated.image).all()


def test_a_missing_unet_is_named_before_anything_loads(tmp_path, tiny_model_dir):
    from dragdiffusion.config import ModelConfig
    from dragdiffusion.inputs import model_missing
    assert model_missing(ModelConfig(name_or_path="tiny", unet=str(tiny_model_dir))) is None  # a pipeline folder
    assert model_missing(ModelConfig(name_or_path="tiny", unet=str(tiny_model_dir / "unet"))) is None  # a UNet's
    assert "model.unet" in model_missing(ModelConfig(name_or_path="tiny", unet=str(tmp_path / "nope")))
    offline = model_missing(ModelConfig(name_or_path="tiny", unet="no-such-org/lcm-unet", local_files_only=True))
    assert "model.unet" in offline and "not in the Hugging Face cache" in offline


def test_fastdrag_inverts_for_its_own_keys_and_values_even_when_the_inversion_is_cached(tiny_editor):
    """The inversion cache keeps latents; FastDrag's inversion also records keys and values for its one edit, so it
    never takes a cached latent (nor leaves its own)."""
    sample = demo_sample(64, 48)
    plain = editor_with(tiny_editor, ["drag.width=64", "drag.num_inference_steps=10", "drag.n_pix_step=1"])
    assert plain.edit(sample).trajectory["sources"]["inversion"] == "computed"
    assert plain.edit(sample).trajectory["sources"]["inversion"] == "reused"
    fast = editor_with(tiny_editor, FASTDRAG)
    for _ in range(2):
        t = fast.edit(sample).trajectory
        assert t["sources"]["inversion"] == "computed" and t["unet_passes"]["inversion"] == 7
