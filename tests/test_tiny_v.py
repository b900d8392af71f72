"""The tiny SD 2.x-style model (``model=tiny_v``): v-prediction scheduler, upcast attention, heads per block; it
edits end to end, its LoRA stage targets v, and attention in half precision stays finite where fp16 logits overflow."""
import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from conftest import REPO, TINY_EDIT
from dragdiffusion import lora as lora_module
from dragdiffusion.attention import ReferenceAttnProcessor, StepWindow
from dragdiffusion.backbone import load_backbone
from dragdiffusion.config import load_config
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import ModelLoadError
from dragdiffusion.policy import DevicePolicy
from dragdiffusion.tiny import default_cache_dir, ensure_tiny_model

TINY_V_EDIT = [o for o in TINY_EDIT if not o.startswith("model=")] + ["model=tiny_v"]


@pytest.fixture(scope="module")
def tiny_v_dir():
    return ensure_tiny_model(name="tiny-v")


def test_tiny_v_is_saved_in_its_own_folder_with_sd2_traits(tiny_v_dir):
    assert tiny_v_dir == default_cache_dir("tiny-v") and tiny_v_dir != default_cache_dir("tiny")
    assert json.loads((tiny_v_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    cfg = load_config(REPO / "configs" / "edit.yaml", ["model=tiny_v"]).model
    b = load_backbone(cfg, DevicePolicy.cpu())
    assert b.scheduler.config.prediction_type == "v_prediction"
    u = b.unet.config
    assert u.upcast_attention is True and u.use_linear_projection is True
    assert list(u.attention_head_dim) == [4, 8, 8, 8]
    attn = b.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.upcast_attention and attn.heads == 8


def test_a_tiny_dir_holding_the_other_variant_is_refused(tiny_v_dir, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="tiny_dir"):
        ensure_tiny_model(tiny_model_dir, name="tiny-v")


def test_tiny_v_edits_end_to_end_and_its_lora_targets_v(tiny_v_dir, monkeypatch):
    from dragdiffusion.editor import DragEditor
    seen = []
    original = lora_module.diffusion_target

    def spy(scheduler, x0, noise, t):
        target = original(scheduler, x0, noise, t)
        seen.append(torch.allclose(target, scheduler.get_velocity(x0, noise, t)) and
                    not torch.allclose(target, noise))
        return target

    monkeypatch.setattr(lora_module, "diffusion_target", spy)
    editor = DragEditor.from_config(REPO / "configs" / "edit.yaml",
                                    TINY_V_EDIT + ["lora.enabled=true", "lora.steps=2", "lora.resolution=64",
                                                   "lora.batch_size=1", "drag.n_pix_step=3"])
    assert editor.backbone.scheduler.config.prediction_type == "v_prediction"
    sample = demo_sample(160, 120)
    result = editor.edit(sample)
    assert result.image.shape == (120, 160, 3) and result.image.dtype == np.uint8
    assert torch.isfinite(result.z_edited).all() and torch.isfinite(result.z_t).all()
    assert len(result.trajectory["handles"]) >= 1
    assert seen and all(seen)  # every LoRA step's target was the velocity


@pytest.mark.parametrize("processor", ["classic", "reference_off", "reference_on"])
def test_half_precision_attention_stays_finite_where_fp16_logits_overflow(processor):
    """SD 2.x sets upcast_attention because q.k overflows fp16. diffusers' classic processor honours the flag (fp32
    scores); our reference processor, like diffusers' SDPA one, ignores it and relies on scaled_dot_product_attention
    accumulating in fp32: both give the fp32 result here, where classic attention without the upcast gives NaN."""
    torch.manual_seed(0)
    attn = Attention(64, heads=1, dim_head=64, upcast_attention=True)
    with torch.no_grad():
        for layer in (attn.to_q, attn.to_k, attn.to_v):
            layer.weight.copy_(torch.eye(64))
    x = torch.randn(2, 16, 64) * 120  # q.k / 8 reaches about 1e5 > 65504
    attn.set_processor(AttnProcessor())
    with torch.no_grad():
        ref = attn(x)
    attn.half()
    attn.set_processor({"classic": AttnProcessor(), "reference_off": ReferenceAttnProcessor(StepWindow(end_step=0)),
                        "reference_on": ReferenceAttnProcessor(StepWindow())}[processor])
    with torch.no_grad():
        out = attn(x.half()).float()
    if processor == "reference_on":  # the edited half attends to the original half's keys and values
        attn.float().set_processor(AttnProcessor())
        with torch.no_grad():
            k_v = attn.to_k(x[:1]), attn.to_v(x[:1])
            q = attn.to_q(x[1:])
            w = torch.softmax(q @ k_v[0].transpose(1, 2) / 8, -1)
            ref = torch.cat([ref[:1], attn.to_out[0](w @ k_v[1])])
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.5  # fp16 rounding of values about 300
