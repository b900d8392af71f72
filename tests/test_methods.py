"""Drag methods on one spine (``method=``): DragDiffusion unchanged, GoodDrag's pieces with known answers."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import editor_with
from dragdiffusion.attention import ReferenceAttnProcessor, StepWindow, reference_control
from dragdiffusion.backbone import decode_latent
from dragdiffusion.callbacks import DragStopState, GoodDragTracking, MaskRegularization, PointTracking
from dragdiffusion.config import load_config
from dragdiffusion.ddim import ddim_denoise, inversion_timesteps
from dragdiffusion.demo import demo_sample
from dragdiffusion.drag import DragCallback, DragEditModule
from dragdiffusion.images import to_uint8
from dragdiffusion.methods import DragStepContext, UndraggedStep, make_method
from dragdiffusion.motion import mask_loss, preserving_motion_loss, track_points
from dragdiffusion.sample import make_sample

GOODDRAG = ["method=gooddrag", "drag.width=64"]


# ------------------------------------------------------------------ the method as a config choice
def test_method_presets_hold_the_published_defaults_and_reset_each_other():
    dd = load_config(None, [])
    assert str(dd.method) == "dragdiffusion" and dd.lora.steps == 80 and dd.drag.lr == 0.01
    gd = load_config(None, ["method=gooddrag"])
    assert str(gd.method) == "gooddrag"
    assert (gd.lora.steps, gd.drag.lr, gd.drag.inversion_strength, gd.drag.r_m, gd.drag.r_p) == (70, 0.02, 0.75, 4, 12)
    assert (gd.gooddrag.drag_end_step, gd.gooddrag.track_per_step, gd.gooddrag.max_drag_per_track,
            gd.gooddrag.max_track_no_change, gd.gooddrag.beta) == (7, 10, 3, 5, 4.0)
    back = load_config(None, ["method=gooddrag", "method=dragdiffusion"])
    assert (back.lora.steps, back.drag.lr, back.drag.r_p) == (80, 0.01, 3)
    later = load_config(None, ["method=gooddrag", "lora.steps=5"])  # a key after the preset wins
    assert later.lora.steps == 5
    with pytest.raises(Exception, match="method=nope: no such method preset; expected one of"):
        load_config(None, ["method=nope"])


def test_gooddrag_schedule_known_answers(tiny_editor):
    cfg = load_config(None, ["method=gooddrag"])
    sched = tiny_editor.backbone.scheduler
    method = make_method(cfg)
    inv, denoise = inversion_timesteps(sched, cfg.drag.num_inference_steps, cfg.drag.inversion_strength)
    assert len(inv) == 38 and denoise[0] == 741
    assert denoise[:7] == [741, 721, 701, 681, 661, 641, 621]
    assert [method.wants_drag(i) for i in range(8)] == [True] * 7 + [False]
    ctx = DragStepContext(0, 741, UndraggedStep(torch.zeros(3, 8, 8), torch.zeros(1, 4, 4, 4)))
    parts = method.drag_parts(ctx)
    assert parts.max_steps == 30  # 10 tracking rounds x 3 optimizer steps
    tracking = [c for c in parts.callbacks if isinstance(c, GoodDragTracking)]
    assert len(tracking) == 1 and tracking[0].track_every == 3 and tracking[0].r_p == 12


# ------------------------------------------------------------------ GoodDrag's pieces
def test_information_preserving_target_is_the_undragged_features_at_the_original_handle():
    g = torch.Generator().manual_seed(0)
    feat0 = torch.randn(5, 32, 40, generator=g)
    init = torch.tensor([[12.0, 10.0]])
    handles = torch.tensor([[12.0, 14.0]])  # moved 4 cells right already
    targets = torch.tensor([[12.0, 30.0]])  # d = (0, 1); centre = handle + 4 d = (12, 18)
    # current features whose patch at (12, 18) equals F0's patch at the ORIGINAL handle (12, 10): loss 0
    feat = torch.randn(5, 32, 40, generator=g)
    feat[:, 8:17, 14:23] = feat0[:, 8:17, 6:15]
    loss = preserving_motion_loss(feat, feat0, init, handles, targets, r1=4, beta=4.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-3)  # grid_sample rounding only
    # ... and the weight is (2 r1)^2 = 64: every value 1 off gives 64
    assert float(preserving_motion_loss(feat + 1, feat0, init, handles, targets, 4, 4.0)) == pytest.approx(64.0)
    # the current handle's own patch is not the target (DragDiffusion's stop-gradient target would be)
    feat2 = feat0.clone()
    assert float(preserving_motion_loss(feat2, feat0, init, handles, targets, 4, 4.0)) > 0.1
    # a handle within 2 cells of its target adds nothing; beta caps the shift at the remaining distance
    near = torch.tensor([[12.0, 31.0]])
    assert float(preserving_motion_loss(feat + 1, feat0, init, near, targets, 4, 4.0)) == 0.0
    # the gradient reaches the current features only
    feat.requires_grad_(True)
    preserving_motion_loss(feat, feat0, init, handles, targets + torch.tensor([[3.0, 0.0]]), 4, 4.0).backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_tracking_window_is_clipped_at_the_border():
    feat0 = torch.zeros(2, 20, 20)
    feat0[:, 0, 0] = 5.0  # the reference feature sits in the top-left corner
    feat1 = torch.zeros(2, 20, 20)
    feat1[:, 0, 1] = 5.0  # ... and moved one cell right
    init = torch.tensor([[0.0, 0.0]])
    handle = torch.tensor([[2.0, 3.0]])  # a radius-12 window reaches far past the top and left edges
    moved = track_points(feat0, feat1, init, handle, r_p=12)
    assert moved.tolist() == [[0.0, 1.0]]
    handle_br = torch.tensor([[19.0, 18.0]])
    feat1b = torch.zeros(2, 20, 20)
    feat1b[:, 19, 19] = 5.0
    assert track_points(feat0, feat1b, init, handle_br, r_p=12).tolist() == [[19.0, 19.0]]


class FakeModule(SimpleNamespace):
    pass


def test_gooddrag_stop_rules():
    feat0 = torch.zeros(2, 16, 16)
    state = DragStopState()
    cb = GoodDragTracking(feat0, state, r_p=2, stop_distance=2.0, track_every=3, max_no_change=2)
    far = FakeModule(handles=torch.tensor([[4.0, 4.0]]), handles_init=torch.tensor([[4.0, 4.0]]),
                     targets=torch.tensor([[4.0, 12.0]]), global_step=0, reached=False)
    step = SimpleNamespace(index=1, features=torch.zeros(2, 16, 16), handles=far.handles)
    cb.track(far, step)
    assert not cb.reached(far, step)
    # rounds with no move: the features are flat, so the argmin is the window's first cell... make it the handle
    flat = torch.ones(2, 16, 16)
    flat[:, 4, 4] = 0.0
    cb.last_features = flat
    for updates in range(1, 7):
        far.global_step = updates
        cb.on_train_batch_end(None, far, None, None, 0)
    assert state.no_change == 2  # tracked after updates 3 and 6 only, neither moved
    assert cb.reached(far, step) and state.stopped == "no_change"
    # a move resets the counter
    state2 = DragStopState()
    cb2 = GoodDragTracking(feat0, state2, r_p=2, stop_distance=2.0, track_every=3, max_no_change=5)
    state2.no_change = 3
    moving = torch.ones(2, 16, 16)
    moving[:, 4, 5] = 0.0
    far2 = FakeModule(handles=torch.tensor([[4.0, 4.0]]), handles_init=torch.tensor([[4.0, 4.0]]),
                      targets=torch.tensor([[4.0, 12.0]]), global_step=3, reached=False)
    cb2.last_features = moving
    cb2.on_train_batch_end(None, far2, None, None, 0)
    assert state2.no_change == 0 and far2.handles.tolist() == [[4.0, 5.0]]
    # the other rule: every handle within stop_distance
    close = FakeModule(handles=torch.tensor([[4.0, 11.0]]), handles_init=torch.tensor([[4.0, 4.0]]),
                       targets=torch.tensor([[4.0, 12.0]]), global_step=0, reached=False)
    state3 = DragStopState()
    cb3 = GoodDragTracking(feat0, state3, 2, 2.0, 3, 5)
    assert cb3.reached(close, step) and state3.stopped == "reached"


class AttentionSpy:
    """Records, for every UNet forward, the batch size and whether the reference control was installed."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __enter__(self):
        def hook(module, args, kwargs):
            controlled = any(isinstance(p, ReferenceAttnProcessor) for p in module.attn_processors.values())
            self.calls.append((int(args[0].shape[0]), controlled))
        self.handle = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_gooddrag_runs_the_schedule_with_control_only_after_dragging(tiny_editor):
    # the stop rules off (stop_distance 0, no-change limit high), 2 tracking rounds of 3 steps: 6 updates a step
    editor = editor_with(tiny_editor, GOODDRAG + ["drag.stop_distance=0", "gooddrag.max_track_no_change=1000",
                                                  "gooddrag.track_per_step=2", "drag.num_inference_steps=20"])
    sample = demo_sample(64, 48)
    with AttentionSpy(editor.backbone.unet) as spy:
        result = editor.edit(sample)
    t = result.trajectory
    assert t["drag_timesteps"] == [701, 651, 601, 551, 501, 451, 401]  # 20 steps: 15 inverted, 7 drag steps
    assert t["control_from_step"] == 7
    per_step = {ts: t["timestep"].count(ts) for ts in t["drag_timesteps"]}
    assert set(per_step.values()) == {6}  # at most track_per_step x max_drag_per_track updates each
    assert t["iterations"] == 42 and not t["stopped_early"]
    # handles change only at a step's first forward or after every 3rd update
    hs = t["handles"]
    changed = [i for i in range(1, len(hs)) if hs[i] != hs[i - 1]]
    assert all(i % 3 == 0 for i in changed)
    # the reference control: never while dragging (single-latent forwards), on for the rest (batch 2)
    assert all(not controlled for batch, controlled in spy.calls if batch == 1)
    controlled = [c for b, c in spy.calls if b == 2]
    assert len(controlled) == 15 - 7 and all(controlled)
    assert result.image.shape == (48, 64, 3)


def test_gooddrag_stops_for_good_and_then_denoises_with_control(tiny_editor):
    """Reached at a drag step's FIRST forward: GoodDrag's code has entered that step, so it is denoised without
    control (a plain step of each branch) and the control starts at the next step."""
    editor = editor_with(tiny_editor, GOODDRAG + ["drag.stop_distance=100", "drag.num_inference_steps=10"])
    sample = demo_sample(64, 48)
    with AttentionSpy(editor.backbone.unet) as spy:
        result = editor.edit(sample)
    t = result.trajectory
    assert t["stopped_early"] and t["iterations"] == 0 and t["drag_timesteps"] == [701]  # round(7.5) = 8 inverted
    assert t["control_from_step"] == 1 and t["stop_step"] == 0
    after_inversion = spy.calls[8:]
    # the undragged forward (also the original branch's step), the drag's forward, the edited branch's plain
    # step: one latent each, no control; then the 7 remaining steps as [original, edited] with control
    assert after_inversion[:3] == [(1, False)] * 3
    assert after_inversion[3:] == [(2, True)] * 7


def test_gooddrag_control_starts_after_the_drag_step_whose_first_forward_finds_the_handles_reached(tiny_editor):
    """One tracking round per drag step: a later step whose first forward finds every handle reached is still
    denoised without control (GoodDrag's code enters it), the control starting one step later."""
    editor = editor_with(tiny_editor, GOODDRAG + ["gooddrag.track_per_step=1", "drag.num_inference_steps=10"])
    sample = make_sample(demo_sample(64, 48).image, [[10, 20], [60, 20]], None, "", "far")
    reached_at = {}
    original = editor.drag_step

    def drag_step(sample_, start, ctx, z, parts, *a, **k):
        if ctx.index == 2:  # the third drag step finds every handle "reached" at its first forward
            for c in parts.callbacks:
                if isinstance(c, GoodDragTracking):
                    c.stop_distance = 1000.0
        module = original(sample_, start, ctx, z, parts, *a, **k)
        reached_at[ctx.index] = (module.reached, len(module.history["loss"]))
        return module

    editor.drag_step = drag_step
    result = editor.edit(sample)
    t = result.trajectory
    assert reached_at == {0: (False, 3), 1: (False, 3), 2: (True, 0)}  # reached at the first forward of step 2
    assert t["drag_timesteps"] == [701, 601, 501] and t["control_from_step"] == 3


@pytest.mark.parametrize("steps,strength,count", [(50, 0.7, 35), (50, 0.75, 38), (50, 0.55, 28), (50, 0.65, 32),
                                                  (50, 0.85, 42), (30, 0.75, 22), (10, 0.7, 7), (5, 0.7, 4)])
def test_inverted_step_count_is_pythons_round_for_every_method(tiny_editor, steps, strength, count):
    """All four codes compute round(strength x steps) (half to even): one rule for every method."""
    from dragdiffusion.ddim import inverted_step_count
    assert inverted_step_count(steps, strength) == count
    sched = tiny_editor.backbone.scheduler
    for method in ("dragdiffusion", "gooddrag", "dragnoise", "freedrag"):
        cfg = load_config(None, [f"method={method}", f"drag.num_inference_steps={steps}",
                                 f"drag.inversion_strength={strength}"])
        inv, denoise = inversion_timesteps(sched, cfg.drag.num_inference_steps, cfg.drag.inversion_strength)
        assert len(inv) == count and denoise[0] == inv[-1]
    if (steps, strength) == (50, 0.75):
        assert denoise[0] == 741  # not 721 (int() would invert 37 steps)


def test_gooddrag_moves_the_handle_toward_its_target(tiny_editor):
    editor = editor_with(tiny_editor, ["method=gooddrag", "drag.width=128"])
    base = demo_sample(128, 96)
    sample = make_sample(base.image, [[30, 50], [100, 50]], None, "", "far")
    result = editor.edit(sample)
    t = result.trajectory
    start = torch.tensor(t["handles"][0])
    end = torch.tensor(t["handles"][-1])
    target = torch.tensor(t["targets"])
    assert (end - target).norm(dim=1) < (start - target).norm(dim=1)
    assert len(t["drag_timesteps"]) >= 2  # it went on at later timesteps
    assert t["method"]["name"] == "gooddrag" and t["method"]["r2"] == 12


# ------------------------------------------------------------------ DragDiffusion unchanged
def test_dragdiffusion_on_the_spine_equals_the_single_timestep_pipeline(tiny_editor):
    """The spine's DragDiffusion (method default) gives the same bits as the pipeline built by hand from its
    pieces: invert, one drag fit with PointTracking + MaskRegularization, batch denoising with control, decode."""
    editor = editor_with(tiny_editor, ["drag.n_pix_step=4"])
    sample = demo_sample(160, 120)
    result = editor.edit(sample)

    L.seed_everything(int(editor.cfg.seed), verbose=False)
    start = editor.invert(sample)
    d = editor.cfg.drag
    grid_hw, handles, targets, mask = editor.drag_geometry(sample, start)
    editor.backbone.scheduler.set_timesteps(start.steps)
    module = DragEditModule(editor.backbone.unet, editor.backbone.scheduler, start.z_t, start.t, start.cond, handles,
                            targets, grid_hw, d, mask)
    trainer = editor.policy.trainer(d.n_pix_step, [PointTracking(d.r_p, d.stop_distance), MaskRegularization(d.lam)],
                                    False, True, False, 1, stage="drag")
    trainer.fit(module)
    z = torch.cat([start.z_t, module.edited_latent()])
    with torch.no_grad(), reference_control(editor.backbone.unet, list(editor.cfg.reference.layers), window := StepWindow()):
        z = ddim_denoise(editor.unet_fn(), editor.backbone.scheduler, z, start.cond, start.timesteps,
                         on_step=lambda i, t: setattr(window, "step", i))
    image = to_uint8(decode_latent(editor.backbone, z[1:]), (sample.height, sample.width))
    assert torch.equal(result.z_edited, module.edited_latent())
    assert (result.image == image).all()
    assert result.trajectory["drag_timesteps"] == [start.t] and result.trajectory["control_from_step"] == 0


# ------------------------------------------------------------------ DragNoise
def test_dragnoise_optimizes_the_sd15_bottleneck_shape():
    """For the SD 1.5 topology the optimized tensor is the mid-block output [1, 1280, H/64, W/64] (shapes only: the
    full-size UNet on the meta device)."""
    from diffusers import UNet2DConditionModel
    from dragdiffusion.features import mid_block_output
    from dragdiffusion.tiny import SD15_UNET_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        out = mid_block_output(unet, torch.zeros(1, 4, 64, 48), 681, torch.zeros(1, 77, 768))
    assert tuple(out.shape) == (1, 1280, 8, 6)  # a 512 x 384 image


def test_dragnoise_moves_only_the_bottleneck_and_propagates_it(tiny_editor, monkeypatch):
    import dragdiffusion.editor as editor_module
    from dragdiffusion.features import StepGatedBottleneck
    gates = []

    class Recording(StepGatedBottleneck):
        def __init__(self, *a):
            super().__init__(*a)
            gates.append(self)
    monkeypatch.setattr(editor_module, "StepGatedBottleneck", Recording)
    editor = editor_with(tiny_editor, ["method=dragnoise", "drag.width=64", "drag.n_pix_step=3",
                                       "drag.num_inference_steps=10", "dragnoise.end_step=2"])
    sample = demo_sample(64, 48)
    modules = []
    original = editor.drag_step
    monkeypatch.setattr(editor, "drag_step", lambda *a, **k: modules.append(original(*a, **k)) or modules[-1])
    with AttentionSpy(editor.backbone.unet) as spy:
        result = editor.edit(sample)
    module = modules[0]
    unet = editor.backbone.unet
    mid_channels = unet.config.block_out_channels[-1]
    assert tuple(module.bottleneck.shape) == (1, mid_channels, 1, 1)  # 8 x 6 latent -> /8 rounded up by the UNet
    assert not module.z_t.requires_grad and module.z_t.grad is None  # z_t receives no gradient
    assert torch.equal(module.z_t, module.z_t_original) and torch.equal(result.z_edited, result.z_t)
    start = editor.bottleneck_of(editor.invert(sample), module.t, result.z_t)
    assert not torch.equal(module.bottleneck.detach(), start)  # the bottleneck moved
    assert [name for name, p in module.named_parameters()] == ["bottleneck"]
    # propagation: 7 denoising steps, the optimized bottleneck in all but the last end_step = 2, no control
    assert gates[-1].replaced == [0, 1, 2, 3, 4]
    assert all(batch == 1 and not controlled for batch, controlled in spy.calls)
    assert len(result.trajectory["bottleneck_norm"]) == 3


# ------------------------------------------------------------------ FreeDrag
def test_freedrag_template_weight_is_one_half_at_b():
    from dragdiffusion.freedrag import FreeDragConstants, template_weight
    k = FreeDragConstants(l=1.0)
    assert k.b == pytest.approx(0.2) and k.a == pytest.approx(torch.log(torch.tensor(9.0)).item() / 0.6)
    assert float(template_weight(torch.tensor(k.b), k)) == pytest.approx(0.5)
    assert float(template_weight(torch.tensor(0.0), k)) > 0.5 > float(template_weight(torch.tensor(0.8), k))


def line_features(values: list[float]) -> torch.Tensor:
    """A 1-channel 20 x 20 map whose column c holds values[c] (rows alike): distances along a row are known."""
    feat = torch.zeros(1, 20, 20)
    for c, v in enumerate(values):
        feat[0, :, c] = v
    return feat


def test_freedrag_line_search_picks_the_candidate_closest_to_l():
    from dragdiffusion.freedrag import FreeDragConstants, plan_moves
    k = FreeDragConstants(l=1.0, d_max=5.0, candidates=5)  # candidates 1, 2, 3, 4, 5 cells ahead
    # template 0; column c's value is its distance: closest to l = 1 is column 10 + 2 (value 0.9) not 10 + 5 (1.0 + 0.3)
    values = [0.0] * 20
    for c, v in zip(range(11, 16), [0.2, 0.9, 1.3, 1.5, 0.95]):
        values[c] = v
    feat = line_features(values)
    template = torch.zeros(1, 1, 1)
    points, targets = torch.tensor([[10.0, 10.0]]), torch.tensor([[10.0, 19.0]])
    zero = torch.zeros(1)
    new, choices = plan_moves(feat, template, points, targets, zero, zero, torch.zeros(1, dtype=torch.bool), k, 0,
                              (20, 20))
    assert choices == ["search"] and new.tolist() == [[10.0, 15.0]]  # 0.95 is the closest to 1 (0.9 is 0.1 off)


def test_freedrag_rolls_back_when_the_loss_rose_and_stays_inside_the_grid():
    from dragdiffusion.freedrag import FreeDragConstants, plan_moves
    k = FreeDragConstants(l=1.0, d_max=5.0, candidates=10)
    feat = line_features([abs(c - 6) / 10 for c in range(20)])  # the smallest distance at column 6
    template = torch.zeros(1, 1, 1)
    points, targets = torch.tensor([[10.0, 9.0]]), torch.tensor([[10.0, 19.0]])
    high = torch.tensor([0.9])  # >= l / 2 ...
    # ... and not below loss_ini: roll back 5 cells (to column 4), then search 10 cells toward the target
    new, choices = plan_moves(feat, template, points, targets, high, torch.tensor([0.8]),
                              torch.zeros(1, dtype=torch.bool), k, 0, (20, 20))
    assert choices == ["roll_back"] and new.tolist() == [[10.0, 6.0]]  # the smallest score, not the closest to l
    # below loss_ini: stay
    new, choices = plan_moves(feat, template, points, targets, high, torch.tensor([1.2]),
                              torch.zeros(1, dtype=torch.bool), k, 0, (20, 20))
    assert choices == ["stay"] and new.tolist() == [[10.0, 9.0]]
    # a roll-back at the edge stays on the grid (the reference's can leave the image)
    edge, target = torch.tensor([[0.0, 1.0]]), torch.tensor([[19.0, 19.0]])
    new, choices = plan_moves(feat, template, edge, target, high, torch.tensor([0.5]),
                              torch.zeros(1, dtype=torch.bool), k, 4, (20, 20))
    assert choices == ["roll_back"] and (new >= 0).all() and (new <= 19).all()


def test_freedrag_edit_respects_the_budget_and_records_its_moves(tiny_editor):
    editor = editor_with(tiny_editor, ["method=freedrag", "drag.width=64", "freedrag.max_step=7",
                                       "freedrag.l_expected=0.05", "drag.num_inference_steps=10"])
    base = demo_sample(64, 48)
    sample = make_sample(base.image, [[10, 20], [60, 20]], None, "", "far")
    result = editor.edit(sample)
    t = result.trajectory
    assert t["iterations"] <= 7 and t["method"]["name"] == "freedrag"
    moves = t["freedrag_moves"]
    assert moves and all(set(m["choices"]) <= {"search", "stay", "roll_back", "done"} for m in moves)
    grid_w, grid_h = t["grid_size"]
    for m in moves:
        for r, c in m.get("to", []):
            assert 0 <= r <= grid_h - 1 and 0 <= c <= grid_w - 1
    assert all(0 <= x <= 63 and 0 <= y <= 47 for hs in t["handles"] for x, y in hs)
    assert t["control_from_step"] == 0


def test_train_py_takes_the_methods_lora_settings(capsys):
    import train
    assert train.main(["method=freedrag", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "method: freedrag" in out and "steps: 200" in out and "lr: 0.0002" in out
    assert train.main(["method=gooddrag", "--print-config"]) == 0
    assert "steps: 70" in capsys.readouterr().out


def test_methods_list_needs_a_dataset_and_known_names():
    from dragdiffusion.errors import ConfigError
    with pytest.raises(ConfigError, match="methods=\\[...\\] only with a batch run"):
        load_config(None, ["methods=[gooddrag]"])
    with pytest.raises(ConfigError, match="config key 'methods'"):
        load_config(None, ["methods=[gooddrag,nope]", "data=x"])
    assert list(load_config(None, ["methods=[gooddrag,freedrag]", "data=x"]).methods) == ["gooddrag", "freedrag"]


# ------------------------------------------------------------------ the same attention for every forward of a drag
class FirstMaskGradient(DragCallback):
    """At the first iteration: |x_prev - x_prev0| (x_prev0 from the MaskRegularization of the fit) and the mask
    term's gradient with respect to the optimized variable."""

    def __init__(self):
        self.records = []

    def needs_eps(self, module):
        return True

    def loss_terms(self, module, step):
        if step.index == 0 and not self.records:
            mask_cb = next(c for c in module.trainer.callbacks if isinstance(c, MaskRegularization))
            x0_prev = mask_cb.x0_prev
            if x0_prev is None:  # DragDiffusion's rule: the first forward's own DDIM step of the original latent
                x0_prev = module.x_prev(module.z_t_original, step.eps.detach())
            term = mask_loss(module.x_prev(step.z, step.eps), x0_prev, module.mask_latent, mask_cb.lam)
            variable = module.z_t if module.bottleneck is None else module.bottleneck
            grad, = torch.autograd.grad(term, variable, retain_graph=True)
            self.records.append((float(term.detach()), float(grad.abs().max())))
        return {}


@pytest.mark.parametrize("method", ["gooddrag", "dragdiffusion", "dragnoise", "freedrag"])
def test_exact_mode_first_iteration_mask_term_and_gradient_are_zero(tiny_editor, method):
    """With ``reference.exact`` every forward of the drag steps runs the classic attention: GoodDrag's undragged
    x_prev0(t) is bit for bit the drag's first x_prev (its code gives a mask term of exactly 0 there; a float-noise
    term would give lam x sign(noise) as the gradient), and DragNoise's starting bottleneck is the UNet's own."""
    editor = editor_with(tiny_editor, [f"method={method}", "reference.exact=true", "drag.width=64",
                                       "drag.num_inference_steps=10", "drag.n_pix_step=2", "freedrag.max_step=2",
                                       "gooddrag.drag_end_step=1", "gooddrag.track_per_step=1",
                                       "drag.point_tracking=false"])
    spy = FirstMaskGradient()
    result = editor.edit(demo_sample(64, 48), callbacks=[spy])
    term, grad = spy.records[0]
    assert term == 0.0 and grad == 0.0
    assert result.trajectory["mask_loss"][0] == 0.0


def test_a_drag_fit_runs_to_its_own_budget_above_n_pix_step(tiny_editor):
    """FreeDrag's budget (``freedrag.max_step``) is the fit's: not capped at ``drag.n_pix_step``."""
    editor = editor_with(tiny_editor, ["method=freedrag", "drag.width=64", "drag.n_pix_step=80", "freedrag.max_step=84",
                                       "freedrag.l_expected=0.001", "drag.num_inference_steps=10"])
    base = demo_sample(64, 48)
    sample = make_sample(base.image, [[10, 20], [60, 20]], None, "", "far")
    result = editor.edit(sample)
    assert result.trajectory["iterations"] == 84 and not result.trajectory["stopped_early"]


def test_freedrag_point_at_exactly_threshold_d_is_not_done():
    """FreeDrag's code: a point is done when its distance is BELOW threshold_d (2 cells), not at it."""
    from dragdiffusion.freedrag import FreeDragConstants, FreeDragMoves
    moves = FreeDragMoves(FreeDragConstants(l=1.0, threshold_d=2.0), win_r=1)
    feat = torch.zeros(3, 12, 12)
    module = FakeModule(targets=torch.tensor([[5.0, 7.0], [5.0, 5.0]]), grid_hw=(12, 12),
                        listening=lambda: False)
    handles = torch.tensor([[5.0, 5.0], [5.0, 3.5]])  # 2.0 and 1.5 cells from their targets
    moves.track(module, SimpleNamespace(index=0, features=feat, handles=handles))  # the first forward: templates
    moves.state.move_ends = True
    moves.track(module, SimpleNamespace(index=1, features=feat, handles=handles))  # loss_end 0 <= l / 2 for both
    assert moves.state.done.tolist() == [False, True]


def test_exact_mode_dragnoise_starts_from_the_bottleneck_of_the_classic_attention(tiny_editor, monkeypatch):
    """DragNoise's starting bottleneck comes from a forward on the same attention as its drag (classic, in exact
    mode): the first drag forward then equals the UNet's own forward of z_t bit for bit."""
    from dragdiffusion.attention import classic_attention
    from dragdiffusion.features import mid_block_output
    editor = editor_with(tiny_editor, ["method=dragnoise", "reference.exact=true", "drag.width=64",
                                       "drag.num_inference_steps=10", "drag.n_pix_step=1"])
    seen = []
    original = editor.bottleneck_of
    monkeypatch.setattr(editor, "bottleneck_of", lambda start, t, z: seen.append((start, t, z, original(start, t, z)))
                        or seen[-1][-1])
    editor.edit(demo_sample(64, 48))
    start, t, z, bottleneck = seen[0]
    unet = editor.backbone.unet
    with torch.no_grad(), classic_attention(unet):
        classic = mid_block_output(unet, z, t, start.drag_cond).float()
    assert torch.equal(bottleneck, classic)
