"""DragText (text.optimize=true): the prompt's embedding optimized beside each method's variable, with sound
gradients; off by default and then without any effect."""
from __future__ import annotations

import pytest
import torch

from conftest import editor_with
from dragdiffusion.backbone import prompt_token_mask
from dragdiffusion.config import load_config, method_label
from dragdiffusion.demo import demo_sample
from dragdiffusion.drag import DragCallback, DragEditModule, TextOptimization
from dragdiffusion.errors import ConfigError
from dragdiffusion.freedrag import FreeDragMoves
from dragdiffusion.sample import make_sample

SMALL = ["drag.width=64", "drag.num_inference_steps=10", "drag.n_pix_step=3", "freedrag.max_step=6",
         "gooddrag.drag_end_step=2", "gooddrag.track_per_step=1", "drag.stop_distance=0",
         "gooddrag.max_track_no_change=100"]


def far_sample():
    return make_sample(demo_sample(64, 48).image, [[10, 20], [60, 20]], demo_sample(64, 48).mask, "a red ball", "far")


# ------------------------------------------------------------------ the switch and the names
def test_text_switch_names_and_presets():
    assert not load_config(None, []).text.optimize  # off by default
    cfg = load_config(None, ["method=gooddrag+text"])
    assert str(cfg.method) == "gooddrag" and cfg.text.optimize and method_label(cfg) == "gooddrag+text"
    assert not load_config(None, ["method=gooddrag+text", "method=gooddrag"]).text.optimize  # a method resets it
    assert method_label(load_config(None, ["method=fastdrag", "text.optimize=true"])) == "fastdrag"  # no optimizer
    with pytest.raises(ConfigError, match="fastdrag has no optimizer"):
        load_config(None, ["method=fastdrag+text"])
    ok = load_config(None, ["data=x", "methods=[gooddrag,gooddrag+text,fastdrag]"])
    assert list(ok.methods) == ["gooddrag", "gooddrag+text", "fastdrag"]
    with pytest.raises(ConfigError, match="config key 'methods'"):
        load_config(None, ["data=x", "methods=[fastdrag+text]"])


def test_the_regularizer_covers_exactly_the_start_and_prompt_tokens(tiny_editor):
    bb = tiny_editor.backbone
    n_prompt = len(bb.tokenizer("a red ball").input_ids) - 2  # without the start and end tokens
    mask = prompt_token_mask(bb, "a red ball")
    assert mask.shape == (77,) and mask.tolist() == [True] * (1 + n_prompt) + [False] * (76 - n_prompt)
    assert prompt_token_mask(bb, "").tolist() == [True] + [False] * 76  # Drag100: the start token alone
    long = prompt_token_mask(bb, " ".join(["red"] * 75))  # no room for padding: still an end token after 76
    assert int(long.sum()) == 76 and not long[-1]
    # in the module: lam x sum |c - c_orig| over those tokens only
    cond = torch.zeros(1, 77, 8)
    module = DragEditModule(bb.unet, bb.scheduler, torch.zeros(1, 4, 8, 8), 601, cond, torch.zeros(1, 2),
                            torch.ones(1, 2), (16, 16), tiny_editor.cfg.drag,
                            text=TextOptimization(0.004, 0.1, mask))
    with torch.no_grad():
        module.text_embedding += 1.0
    diff = (module.text_embedding - module.text_original).detach()
    assert float(0.1 * (diff.abs() * module.text_tokens).sum()) == pytest.approx(0.1 * (1 + n_prompt) * 8)


# ------------------------------------------------------------------ off: no effect at all
@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag", "dragnoise", "freedrag"])
def test_text_off_ignores_the_text_settings(tiny_editor, method):
    sample = far_sample()
    a = editor_with(tiny_editor, [f"method={method}", *SMALL]).edit(sample)
    b = editor_with(tiny_editor, [f"method={method}", *SMALL, "text.lr=0.5", "text.lam=3", "text.mask_term=true"]
                    ).edit(sample)
    assert (a.image == b.image).all() and torch.equal(a.z_edited, b.z_edited)
    assert "text_shift" not in a.trajectory and "text" not in a.trajectory["method"]


# ------------------------------------------------------------------ on: the embedding moves, soundly
class Grads(DragCallback):
    """The gradients of the drag variable and of the text embedding just before each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        variable = module.z_t if module.bottleneck is None else module.bottleneck
        text = None if module.text_embedding is None or module.text_embedding.grad is None \
            else module.text_embedding.grad.clone()
        self.steps.append((variable.grad.clone(), text))


@pytest.mark.parametrize("method", ["dragdiffusion", "dragnoise"])
def test_the_drag_variables_gradient_is_its_own_loss_alone(tiny_editor, method):
    """At the first iteration the embedding is still the original, so the drag variable's gradient with DragText is
    exactly the one without it (the reference's DragDiffusion and DragNoise copies leave the text backward's
    gradient in the latent's for the next step); the embedding's gradient is the motion term's (+ 0 from the
    regularizer at c = c_orig), not the mask term's."""
    sample = far_sample()
    runs = {}
    for text in ("false", "true"):
        spy = Grads()
        editor_with(tiny_editor, [f"method={method}", *SMALL, "drag.n_pix_step=2", f"text.optimize={text}"]
                    ).edit(sample, callbacks=[spy])
        runs[text] = spy.steps
    assert torch.equal(runs["false"][0][0], runs["true"][0][0])
    assert runs["false"][0][1] is None and runs["true"][0][1] is not None and runs["true"][0][1].abs().sum() > 0


def test_the_text_gradient_is_the_motion_terms_unless_mask_term(tiny_editor):
    """text.mask_term=false (DragText's code): the embedding's gradient comes from the motion term + regularizer
    alone; true: the mask term's gradient is added (one backward). They differ once the mask term is nonzero (the
    second iteration), and the drag variable's gradient is the same in both."""
    sample = far_sample()
    steps = {}
    for mask_term in ("false", "true"):
        spy = Grads()
        editor = editor_with(tiny_editor, ["method=dragdiffusion", *SMALL, "drag.n_pix_step=2", "text.optimize=true",
                                           f"text.mask_term={mask_term}", "drag.lam=50"])
        editor.edit(sample, callbacks=[spy])
        steps[mask_term] = spy.steps
    assert torch.equal(steps["false"][0][1], steps["true"][0][1])  # iteration 0: the mask term is exactly 0
    assert torch.equal(steps["false"][1][0], steps["true"][1][0])  # the latent's gradient: its own loss only
    assert not torch.allclose(steps["false"][1][1], steps["true"][1][1])  # the embedding's: with or without it


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag", "dragnoise", "freedrag"])
def test_text_on_moves_the_embedding_and_denoises_the_edited_branch_with_it(tiny_editor, method):
    editor = editor_with(tiny_editor, [f"method={method}+text", *SMALL, "freedrag.l_expected=0.001"
                                       if method != "freedrag" else "freedrag.l_expected=1000"])
    unet = editor.backbone.unet
    conds = []

    def spy(module, args, kwargs):
        conds.append(kwargs["encoder_hidden_states"].detach().clone())
    hook = unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = editor.edit(far_sample())
    finally:
        hook.remove()
    t = result.trajectory
    assert t["method"]["name"] == f"{method}+text" and t["method"]["text"]["lr"] == 0.004
    assert len(t["text_shift"]) == len(t["loss"]) and max(t["text_shift"]) > 0
    original = editor.invert(far_sample()).cond
    last = conds[-1]
    if method == "dragnoise":  # the edited latent alone, with the optimized embedding
        assert last.shape[0] == 1 and not torch.equal(last[0], original[0])
    else:  # [original, edited]: the original branch keeps the original embedding
        assert last.shape[0] == 2 and torch.equal(last[0], original[0]) and not torch.equal(last[1], original[0])
    if method == "gooddrag":  # every drag step starts again from the original embedding
        starts = [i for i in range(len(t["timestep"])) if i == 0 or t["timestep"][i] != t["timestep"][i - 1]]
        assert len(starts) == 2 and all(t["text_shift"][i] == 0.0 for i in starts)


def test_a_drag_callback_can_refuse_the_text_step(tiny_editor, monkeypatch):
    """FreeDrag takes a text step only when the move's largest distance fell below l / 2 and some point was not
    rolled back: a callback that says no leaves the embedding where it was."""
    monkeypatch.setattr(FreeDragMoves, "wants_text_step", lambda self, module, step: False)
    editor = editor_with(tiny_editor, ["method=freedrag+text", *SMALL])
    t = editor.edit(far_sample()).trajectory
    assert t["iterations"] > 1 and set(t["text_shift"]) == {0.0}
    monkeypatch.setattr(FreeDragMoves, "wants_text_step", lambda self, module, step: True)
    t = editor.edit(far_sample()).trajectory
    assert t["text_shift"][-1] > 0


def test_sdxl_optimizes_both_encoders_hidden_states_not_the_pooled_embedding(tmp_path):
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.tiny import ensure_tiny_model
    ensure_tiny_model(name="tiny-xl")
    editor = DragEditor(load_config(None, ["model=tiny_xl", "trainer=cpu", "quiet=true", "drag.width=96",
                                           "drag.n_pix_step=2", "drag.num_inference_steps=10", "lora.enabled=false",
                                           "method=dragdiffusion+text"]))
    modules = []
    original = editor.drag_step
    editor.drag_step = lambda *a, **k: modules.append(original(*a, **k)) or modules[-1]
    result = editor.edit(demo_sample(96, 64))
    module = modules[0]
    width = editor.backbone.text_encoder.config.hidden_size + editor.backbone.text_encoder_2.config.hidden_size
    assert tuple(module.text_embedding.shape) == (1, 77, width)
    edited = module.edited_condition()
    assert not torch.equal(edited.hidden, module.cond.hidden)
    assert all(torch.equal(edited.added[k], module.cond.added[k]) for k in edited.added)  # pooled, time ids fixed
    assert result.trajectory["method"]["name"] == "dragdiffusion+text"


def test_dragtext_on_a_generated_image_with_guidance(tiny_editor):
    """With guidance the condition is [uncond, cond]: the prompt's row is optimized, the negative prompt's stays."""
    editor = editor_with(tiny_editor, ["method=dragdiffusion+text", "drag.n_pix_step=3", "drag.stop_distance=0",
                                       "generation.width=96", "generation.height=64", "generation.steps=10"])
    generated = editor.generate("a red ball")
    modules = []
    original = editor.drag_step
    editor.drag_step = lambda *a, **k: modules.append(original(*a, **k)) or modules[-1]
    result = editor.edit_generated(generated, [[20, 24], [60, 24]])
    module = modules[0]
    assert module.cond.shape[0] == 2 and tuple(module.text_embedding.shape) == (1, *module.cond.shape[1:])
    assert torch.equal(module.condition()[0], module.cond[0])  # the negative prompt's row is not optimized
    assert max(result.trajectory["text_shift"]) > 0 and result.image.shape == (64, 96, 3)
