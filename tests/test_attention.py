"""Reference-latent control: chosen by module name; the edited branch attends to the original's K/V."""
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dragdiffusion.attention import StepWindow, controlled_layer_names, reference_control


def test_layers_are_chosen_by_name(tiny_editor):
    unet = tiny_editor.backbone.unet
    names = controlled_layer_names(unet, ["up_blocks.2", "up_blocks.3"])
    assert names and all(".attn1." in n and n.split(".")[1] in ("2", "3") for n in names)
    assert not any(".attn2." in n for n in names)


def test_unknown_layer_prefix_is_an_error(tiny_editor):
    import pytest
    with pytest.raises(ValueError, match="reference.layers"):
        with reference_control(tiny_editor.backbone.unet, ["up_blocks.9"], StepWindow()):
            pass


def run(unet, z, cond, window=None, prefixes=()):
    if window is None:
        return unet(z, 681, encoder_hidden_states=cond).sample
    with reference_control(unet, list(prefixes), window):
        return unet(z, 681, encoder_hidden_states=cond).sample


def test_control_keeps_original_branch_and_edits_only_the_second_half(tiny_editor):
    unet = tiny_editor.backbone.unet
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 12)
    cond = torch.randn(2, 77, 32)
    cond[1] = cond[0]
    plain = run(unet, z, cond)
    ctrl = run(unet, z, cond, StepWindow(), ["up_blocks.2", "up_blocks.3"])
    assert torch.allclose(ctrl[0], plain[0], atol=1e-5)  # the original branch is untouched
    assert not torch.allclose(ctrl[1], plain[1], atol=1e-4)  # the edited branch now sees the original's K/V
    # identical branches: attending to the other's K/V changes nothing
    same = torch.cat([z[:1], z[:1]])
    out = run(unet, same, cond, StepWindow(), ["up_blocks.2", "up_blocks.3"])
    assert torch.allclose(out[0], out[1], atol=1e-5)
    # processors are restored afterwards
    assert not any(type(p).__name__ == "ReferenceAttnProcessor" for p in unet.attn_processors.values())


def test_inactive_steps_match_the_stock_processor(tiny_editor):
    unet = tiny_editor.backbone.unet
    z = torch.randn(2, 4, 8, 12)
    cond = torch.randn(2, 77, 32)
    window = StepWindow(start_step=5, step=0)  # not active at step 0
    ours = run(unet, z, cond, window, ["up_blocks.2", "up_blocks.3"])
    unet.set_attn_processor(AttnProcessor2_0())
    stock = run(unet, z, cond)
    assert torch.allclose(ours, stock, atol=1e-5)
