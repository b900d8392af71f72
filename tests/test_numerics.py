"""Same numbers as the reference: the mask's two-step resize, truncated output, and ``reference.exact``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import editor_with
from dragdiffusion.backbone import encode_prompt
from dragdiffusion.data import read_sample
from dragdiffusion.demo import demo_sample
from dragdiffusion.drag import DragCallback
from dragdiffusion.editor import DragStart
from dragdiffusion.images import resize_mask, to_uint8
from dragdiffusion.motion import bilinear_sample, motion_supervision_loss, patch_coords, shifted_patch_as_reference

BUILDING = "building_city_view/YAN_2023-09-15-2236-24"  # 512 x 341: not square, not a multiple of 8 high


class MaskSpy(DragCallback):
    """Keeps the mask the drag module's loss terms see."""

    def loss_terms(self, module, step):
        self.mask = module.mask_latent.clone()
        return {}


def test_the_mask_that_reaches_the_loss_is_the_reference_two_step_resize(tiny_editor, dragbench_dir):
    sample = read_sample(dragbench_dir / BUILDING)
    assert (sample.width, sample.height) == (512, 341)
    editor = editor_with(tiny_editor, ["drag.width=512", "drag.n_pix_step=1"])
    latent_hw = (42, 64)
    start = DragStart(torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(0)), 681, [681], 50,
                      (341, 512), encode_prompt(editor.backbone, sample.prompt))
    spy = MaskSpy()
    module = editor.drag(sample, start, callbacks=[spy])
    assert module.history["mask_loss"] == [0.0]  # the mask term ran (z is still the original at step 0)
    # the reference (run_drag_diffusion.py, drag_utils.py): nearest to sup_res = int(0.5 * H) x int(0.5 * W),
    # then nearest to the latent size
    m = torch.from_numpy(sample.mask).float()[None, None]
    reference = F.interpolate(F.interpolate(m, (int(0.5 * 341), int(0.5 * 512)), mode="nearest"), latent_hw,
                              mode="nearest")
    assert torch.equal(spy.mask, reference)
    one_step = resize_mask(sample.mask, latent_hw)
    assert int((one_step != reference).sum()) == 5  # of 2688 cells: what the straight resize got wrong


def test_output_pixels_are_truncated_as_the_reference():
    k = torch.arange(256, dtype=torch.float32)
    x = ((k + 0.9) / 255).clamp(max=1).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    out = to_uint8(x)
    assert out.shape == (1, 256, 3) and out.dtype == np.uint8
    assert out[0, :255, 0].tolist() == list(range(255))  # k + 0.9 -> k (rounding would give k + 1)
    assert out[0, 255, 0] == 255
    # resized back with bilinear, no antialias, after the clamp (the reference's F.interpolate)
    y = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(y, size=(5, 7), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(to_uint8(y, (5, 7)), (expected[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def record_processors(unet, names):
    """Per call of each named attention module: the class name of its processor at that moment."""
    calls = {n: [] for n in names}
    for name in names:
        module = unet.get_submodule(name)
        module.register_forward_pre_hook(lambda m, a, k, n=name: calls[n].append(type(m.processor).__name__),
                                         with_kwargs=True)
    return calls


@pytest.mark.parametrize("exact,lora", [(True, False), (False, False), (True, True)])
def test_exact_mode_selects_the_classic_attention_for_inversion_and_drag(tiny_editor, exact, lora):
    editor = editor_with(tiny_editor, [f"reference.exact={str(exact).lower()}", f"lora.enabled={str(lora).lower()}",
                                       "lora.steps=1", "lora.resolution=64", "drag.num_inference_steps=5",
                                       "drag.n_pix_step=2", "drag.width=64", "drag.point_tracking=false"])
    unet = editor.backbone.unet
    plain, controlled = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                         "up_blocks.2.attentions.0.transformer_blocks.0.attn1")
    handles = []
    try:
        calls = record_processors(unet, [plain, controlled])
        handles = [unet.get_submodule(n)._forward_pre_hooks for n in (plain, controlled)]
        editor.edit(demo_sample(80, 64))
    finally:
        for hooks in handles:
            hooks.clear()
    last = calls[plain][-(4 + 2 + 4):]  # after the LoRA step: round(5 x 0.7) = 4 inversion steps, 2 drag
    inversion_and_drag, denoise = last[:4 + 2], last[4 + 2:]  # iterations, 4 denoising steps
    classic = exact and not lora
    assert set(inversion_and_drag) == {"AttnProcessor" if classic else "AttnProcessor2_0"}
    assert denoise == ["AttnProcessor2_0"] * 4  # the reference's denoising runs SDPA (its own forward)
    assert calls[controlled][-4:] == ["ReferenceAttnProcessor"] * 4
    assert "AttnProcessor" not in {type(p).__name__ for p in unet.attn_processors.values()}  # restored


def test_reference_patch_sampling_equals_bilinear_inside_and_falls_back_at_edges():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(6, 12, 16, generator=g)
    d = torch.tensor([0.6, -0.8])
    rows, cols = (4, 7), (5, 8)
    ours = bilinear_sample(feat, patch_coords(torch.tensor([5.0, 6.0]), 1, (12, 16)) + d)  # [9, C]
    theirs = shifted_patch_as_reference(feat, rows, cols, d)  # [C, 3, 3]
    torch.testing.assert_close(theirs.reshape(6, 9).t(), ours, atol=1e-5, rtol=1e-5)  # the same up to rounding
    assert shifted_patch_as_reference(feat, (10, 12), (13, 16), torch.tensor([0.6, 0.8])) is None  # off the grid
    handles, targets = torch.tensor([[5.0, 6.0], [11.0, 15.0]]), torch.tensor([[9.0, 3.0], [11.0, 2.0]])
    a = motion_supervision_loss(feat, handles, targets, 1)
    b = motion_supervision_loss(feat, handles, targets, 1, as_reference=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # the same loss up to summation order
