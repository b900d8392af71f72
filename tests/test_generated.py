"""The generated-image path on the tiny model: guided feature mixing, the kept latent, the drag, edit.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import edit as edit_cli
from conftest import TINY_EDIT, editor_with
from dragdiffusion.backbone import encode_prompt
from dragdiffusion.ddim import inversion_timesteps
from dragdiffusion.drag import DragEditModule, cfg_feature_weight, mix_guided_features
from dragdiffusion.features import unet_eps_and_features

GENERATION = ["generate=true", "prompt=a red ball", "generation.width=128", "generation.height=96",
              "generation.steps=5"]
POINTS = [[40, 48], [70, 48]]


@pytest.fixture(scope="module")
def gen_editor(tiny_editor):
    return editor_with(tiny_editor, GENERATION)


@pytest.fixture(scope="module")
def generated(gen_editor):
    return gen_editor.generate()


def test_guided_feature_weights():
    assert cfg_feature_weight(1.0) == 1.0  # no guidance: the conditional features only
    assert cfg_feature_weight(7.5) == pytest.approx(7.5 / 14)
    assert cfg_feature_weight(1e6) == pytest.approx(0.5, abs=1e-6)  # strong guidance: both halves alike
    f_u, f_c = torch.randn(2, 3, 5, 6).unbind(0)
    mixed = mix_guided_features(f_u, f_c, 1.0)
    assert mixed.shape == (6, 5, 6)
    assert torch.equal(mixed[:3], torch.zeros(3, 5, 6)) and torch.equal(mixed[3:], f_c)
    c = 7.5 / 14
    assert torch.allclose(mix_guided_features(f_u, f_c, 7.5), torch.cat([(1 - c) * f_u, c * f_c]))


def test_guided_drag_module_equals_two_separate_passes(tiny_editor):
    bb = tiny_editor.backbone
    inversion_timesteps(bb.scheduler, 50, 0.7)
    cond, uncond = encode_prompt(bb, "a red ball"), encode_prompt(bb, "")
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(1, 2)
    drag = tiny_editor.cfg.drag
    module = DragEditModule(bb.unet, bb.scheduler, z, 681, torch.cat([uncond, cond]), none, none, (48, 64), drag,
                            guidance_scale=7.5)
    eps, feat = module.eps_and_features(z)
    eps_u, f_u = unet_eps_and_features(bb.unet, z, 681, uncond, list(drag.feature_blocks), (48, 64))
    eps_c, f_c = unet_eps_and_features(bb.unet, z, 681, cond, list(drag.feature_blocks), (48, 64))
    assert feat.shape[0] == 2 * f_c.shape[1]
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_c - eps_u), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feat, mix_guided_features(f_u[0], f_c[0], 7.5), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="uncond, cond"):
        DragEditModule(bb.unet, bb.scheduler, z, 681, cond, none, none, (48, 64), drag, guidance_scale=7.5)


def test_generation_keeps_the_latent_at_the_drag_timestep(gen_editor, generated):
    assert inversion_timesteps(gen_editor.backbone.scheduler, 50, 0.7)[1][0] == 681  # the published setting
    assert generated.image.shape == (96, 128, 3) and generated.z_t.shape == (1, 4, 12, 16)
    assert generated.t == 601 and generated.timesteps == [601, 401, 201, 1]  # 5 steps x 0.7 = 3.5: round() -> the last 4
    again = gen_editor.generate()
    assert np.array_equal(again.image, generated.image) and torch.equal(again.z_t, generated.z_t)
    other = editor_with(gen_editor, GENERATION + ["generation.seed=7"]).generate()
    assert np.abs(other.image.astype(int) - generated.image).mean() > 5
    # no drag: denoising the kept latent (with reference control, under guidance) gives the picture back
    still = editor_with(gen_editor, GENERATION + ["drag.n_pix_step=0"]).edit_generated(generated, POINTS)
    assert np.abs(still.image.astype(int) - generated.image).max() <= 1


def test_drag_of_a_generated_image(gen_editor, generated):
    editor = editor_with(gen_editor, GENERATION + ["drag.n_pix_step=4", "drag.point_tracking=false", "drag.lam=1.0"])
    mask = np.zeros((96, 128), np.uint8)
    mask[20:80, 20:100] = 1
    result = editor.edit_generated(generated, POINTS, mask)
    t = result.trajectory
    assert result.image.shape == (96, 128, 3) and t["iterations"] == 4 and t["t"] == 601
    assert t["motion_loss"][-1] < t["motion_loss"][0]
    assert max(t["mask_loss"]) > 0  # the mask term runs on the guided noise prediction
    assert t["generated"] == {"prompt": "a red ball", "negative_prompt": "", "seed": 42, "guidance_scale": 7.5}
    assert not torch.equal(result.z_edited, result.z_t)
    assert not np.array_equal(result.image, generated.image)


def test_edit_py_generate_and_replay(gen_editor, generated, tmp_path):
    args = ["--config", "configs/edit.yaml", *TINY_EDIT, *GENERATION]
    assert edit_cli.main(args + [f"out={tmp_path / 'x'}"]) == 2  # generate=true without points: refused early
    editor = editor_with(gen_editor, GENERATION + ["drag.n_pix_step=3"])
    result = editor.edit_generated(generated, POINTS)
    folder = result.save_replay(tmp_path / "replay", editor.cfg)
    assert edit_cli.main(["--config", str(folder / "config.yaml"), f"sample={folder}",
                          f"out={tmp_path / 'out'}"]) == 0
    replayed = np.asarray(Image.open(tmp_path / "out" / "dragged_image.png"))
    np.testing.assert_array_equal(replayed, result.image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "generated_image.png")), generated.image)
