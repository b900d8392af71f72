"""End to end on the tiny model: a 512-wide DragBench sample, odd sizes, determinism, mask term, early stop."""
import json

import numpy as np
import pytest
import torch

import edit as edit_cli
from conftest import TINY_EDIT, editor_with
from dragdiffusion.callbacks import PointTracking
from dragdiffusion.data import read_sample
from dragdiffusion.demo import demo_sample
from dragdiffusion.sample import DragSample

RABBIT = "animals/JH_2023-09-14-1838-08"


@pytest.fixture(scope="module")
def rabbit(dragbench_dir):
    return read_sample(dragbench_dir / RABBIT)


def test_cli_edit_of_a_dragbench_sample(tmp_path, dragbench_dir, tiny_model_dir):
    out = tmp_path / "out"
    rc = edit_cli.main(["--config", "configs/edit.yaml", *TINY_EDIT, f"sample={dragbench_dir / RABBIT}", f"out={out}"])
    assert rc == 0
    from PIL import Image
    src = Image.open(dragbench_dir / RABBIT / "original_image.png")
    assert src.size[0] == 512
    assert Image.open(out / "dragged_image.png").size == src.size
    assert Image.open(out / "drag_input.png").size == src.size
    traj = json.loads((out / "trajectory.json").read_text())
    n = traj["iterations"]
    assert 1 <= n <= 8
    assert len(traj["loss"]) == len(traj["motion_loss"]) == len(traj["mask_loss"]) == n
    assert len(traj["handles"]) == n + int(traj["stopped_early"])
    assert all(len(step) == 2 and all(len(p) == 2 for p in step) for step in traj["handles"])  # 2 handles, (x, y)
    # the first recorded positions are the input handles (to one grid cell = 4 px at width 128 / 512 px)
    sample = read_sample(dragbench_dir / RABBIT)
    assert np.abs(np.array(traj["handles"][0]) - np.array(sample.handles)).max() <= 4
    assert traj["targets"] == [list(map(float, t)) for t in sample.targets]
    assert (out / "config.yaml").exists() and "n_pix_step: 8" in (out / "config.yaml").read_text()


def test_edit_is_deterministic_for_a_fixed_seed(tiny_editor, rabbit):
    a = tiny_editor.edit(rabbit)
    b = tiny_editor.edit(rabbit)
    assert np.array_equal(a.image, b.image)
    assert a.trajectory["loss"] == b.trajectory["loss"]
    assert a.image.shape == rabbit.image.shape
    assert not np.array_equal(a.image, rabbit.image)


def test_mask_term_keeps_the_outside_closer(tiny_editor):
    s = demo_sample(256, 192)
    outside = []
    for on in (True, False):
        ed = editor_with(tiny_editor, [f"drag.mask_regularization={str(on).lower()}", "drag.n_pix_step=15",
                                       "drag.point_tracking=false", "drag.lam=1.0"])
        r = ed.edit(s)
        m = torch.nn.functional.interpolate(torch.from_numpy(s.mask).float()[None, None], r.z_t.shape[-2:])
        outside.append(((r.z_edited - r.z_t).abs() * (1 - m)).mean().item())
    assert outside[0] < outside[1]


def test_early_stop_ends_the_trainer(tiny_editor):
    s = demo_sample(128, 96)
    near = DragSample(s.image, [(40.0, 40.0)], [(42.0, 41.0)], None, "", "near")
    r = tiny_editor.edit(near)
    assert r.trajectory["stopped_early"] and r.trajectory["stop_step"] == 0 and r.trajectory["iterations"] == 0

    class StopAtThree(PointTracking):
        def reached(self, module, step):
            return step.index >= 3

    far = DragSample(s.image, [(20.0, 20.0)], [(100.0, 70.0)], None, "", "far")
    ed = editor_with(tiny_editor, ["drag.point_tracking=false", "drag.n_pix_step=20"])
    r = ed.edit(far, callbacks=[StopAtThree()])
    assert r.trajectory["stopped_early"] and r.trajectory["stop_step"] == 3 and r.trajectory["iterations"] == 3


def test_without_tracking_the_handles_stay(tiny_editor):
    s = demo_sample(128, 96)
    ed = editor_with(tiny_editor, ["drag.point_tracking=false", "drag.n_pix_step=3"])
    r = ed.edit(s)
    assert r.trajectory["iterations"] == 3 and not r.trajectory["stopped_early"]
    assert all(step == r.trajectory["handles"][0] for step in r.trajectory["handles"])
    # the UNet's forward calls per stage: 35 of 50 steps inverted and denoised, one per drag iteration
    assert r.trajectory["unet_passes"] == {"lora": 0, "inversion": 35, "drag": 3, "denoise": 35}


@pytest.mark.parametrize("height", [341, 433, 913])
def test_odd_heights(tiny_editor, height):
    rng = np.random.default_rng(height)
    img = (rng.random((height, 512, 3)) * 255).astype(np.uint8)
    mask = np.zeros((height, 512), np.uint8)
    mask[height // 4: height // 2, 100:300] = 1
    s = DragSample(img, [(150.0, height / 3)], [(250.0, height / 3)], mask, "odd", f"h{height}")
    ed = editor_with(tiny_editor, ["drag.n_pix_step=2"])
    r = ed.edit(s)
    assert r.image.shape == (height, 512, 3)
    assert r.trajectory["working_size"] == [128, int(128 * height / 512)]


def test_a_new_drag_callback_adds_a_loss_term(tiny_editor):
    """The drag module's extension point: a third term (here a pull toward the starting latent, in the manner of
    GoodDrag's consistency terms) is a new DragCallback; drag.py does not change."""
    from dragdiffusion.drag import DragCallback

    class StayClose(DragCallback):
        def __init__(self, weight):
            self.weight, self.calls = weight, 0

        def loss_terms(self, module, step):
            self.calls += 1
            return {"stay_close": self.weight * (step.z - module.z_t_original).pow(2).sum()}

    s = demo_sample(128, 96)
    ed = editor_with(tiny_editor, ["drag.n_pix_step=4", "drag.point_tracking=false", "drag.lr=0.05"])
    plain = ed.edit(s)
    term = StayClose(20.0)
    held = ed.edit(s, callbacks=[term])
    t = held.trajectory
    assert term.calls == 4 and len(t["stay_close"]) == 4
    assert t["stay_close"][0] == 0.0 and t["stay_close"][-1] > 0  # z starts at the original, then moves
    np.testing.assert_allclose(t["loss"], np.add(np.add(t["motion_loss"], t["mask_loss"]), t["stay_close"]),
                               rtol=1e-5)
    moved = lambda r: float((r.z_edited - r.z_t).abs().mean())
    assert moved(held) < moved(plain)
    assert "stay_close" not in plain.trajectory
