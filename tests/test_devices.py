"""The device-and-precision policy, and no stage moving the backbone or the latents (caught on the CPU).

On a CPU a module moved to "the CPU" looks unmoved, so these tests record the calls instead: every ``.to()``,
``.cpu()``, ``.cuda()``, ``.half()``, ``.float()``, ``.bfloat16()`` and ``.type()`` applied to a module that is or
holds a part of the backbone, or to a LightningModule (it holds the optimized latent). The only allowed call is
Lightning's placement ``.to(<the policy's device>)``; anything else would, on a GPU, move 3.4 GB (or the latent).
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import lightning as L
from conftest import TwoStepModule, editor_with
from dragdiffusion.config import load_config
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import ConfigError
from dragdiffusion.policy import DevicePolicy, resolve_device, resolve_weight_dtype

MOVES = ("to", "cpu", "cuda", "half", "float", "bfloat16", "double", "type")


class MoveRecorder:
    """Wraps torch.nn.Module's moving methods; ``calls`` lists (module class, method, device, dtype) for modules
    that are or contain a watched module, and for every LightningModule."""

    def __init__(self, monkeypatch, watched):
        self.watched = list(watched)
        self.calls: list[tuple] = []
        for name in MOVES:
            original = getattr(torch.nn.Module, name)
            monkeypatch.setattr(torch.nn.Module, name, self._wrap(name, original))

    def _concerned(self, module) -> bool:
        if isinstance(module, L.LightningModule):
            return True
        return any(m is w for m in module.modules() for w in self.watched)

    def _wrap(self, name, original):
        recorder = self

        def method(module, *args, **kwargs):
            if recorder._concerned(module):
                device = dtype = None
                if name == "to":
                    device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
                recorder.calls.append((type(module).__name__, name, device, dtype))
            return original(module, *args, **kwargs)
        return method

    def moves(self, device: torch.device) -> list[tuple]:
        """Every recorded call except a placement on ``device`` (no dtype change)."""
        return [c for c in self.calls if not (c[1] == "to" and c[3] is None and c[2] is not None
                                               and torch.device(c[2]) == device)]


# ------------------------------------------------------------------------------------------------ the policy

def policy_of(*overrides) -> DevicePolicy:
    return DevicePolicy.from_config(load_config("configs/edit.yaml", list(overrides)))


def test_cpu_policy_defaults():
    p = policy_of("trainer=cpu")
    assert (p.device, p.precision, p.weight_dtype, p.grad_scaler) == (torch.device("cpu"), "32", torch.float32, False)
    p = policy_of("trainer=cpu", "trainer.precision=bf16-mixed")  # auto weights stay fp32 on the CPU
    assert p.autocast_dtype == torch.bfloat16 and p.weight_dtype == torch.float32 and not p.grad_scaler
    assert isinstance(p.autocast(), torch.autocast)  # fp32 weights under mixed precision: autocast outside Trainers
    p = policy_of("trainer=cpu", "trainer.precision=bf16-mixed", "model.dtype=bfloat16")
    assert p.weight_dtype == torch.bfloat16
    assert not isinstance(p.autocast(), torch.autocast)  # half weights run as they are, no re-cast per op


def test_precision_is_checked_once_with_every_accepted_value():
    for bad in ("16-true", "64", "fp16"):
        with pytest.raises(ConfigError, match=r"trainer.precision.*32, 16-mixed, bf16-mixed"):
            load_config("configs/edit.yaml", [f"trainer.precision={bad}"])
    assert policy_of("trainer=cpu", "trainer.precision=32-true").precision == "32"
    assert policy_of("trainer=cpu", "trainer.precision=bf16").precision == "bf16-mixed"


def test_weight_dtype_must_match_the_precision():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_weight_dtype("auto", "16-mixed", gpu) == torch.float16
    assert resolve_weight_dtype("auto", "bf16-mixed", gpu) == torch.bfloat16
    assert resolve_weight_dtype("auto", "32", gpu) == torch.float32
    assert resolve_weight_dtype("float32", "16-mixed", gpu) == torch.float32
    with pytest.raises(ConfigError, match="model.dtype=float16 needs trainer.precision=16-mixed"):
        resolve_weight_dtype("float16", "32", gpu)
    with pytest.raises(ConfigError, match="bf16-mixed"):
        resolve_weight_dtype("bfloat16", "16-mixed", gpu)
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_weight_dtype("float16", "16-mixed", cpu)
    with pytest.raises(ConfigError, match="16-mixed.*needs a GPU"):
        policy_of("trainer=cpu", "trainer.precision=16-mixed")


def test_device_settings_must_agree(monkeypatch):
    assert resolve_device("auto", "cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_device("cpu", "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("auto", "gpu")
    assert resolve_device("auto", "auto") == torch.device("cpu")


def test_single_device_trainer_leaves_the_module_where_it_is(monkeypatch):
    """Lightning's own teardown calls LightningModule.cpu() after fit; the policy's Trainer does not."""
    recorder = MoveRecorder(monkeypatch, [])
    DevicePolicy.cpu().trainer(2, quiet=True).fit(TwoStepModule())
    assert recorder.calls and recorder.moves(torch.device("cpu")) == []
    recorder.calls.clear()
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(TwoStepModule())
    assert ("TwoStepModule", "cpu", None, None) in recorder.calls  # what the recorder is there to catch


# ------------------------------------------------------------------------------------------------ whole edits

def test_no_stage_moves_the_backbone_or_the_latents(tiny_editor, monkeypatch):
    """A full edit with the identity LoRA (its Trainer owns the UNet), then a generated-image edit."""
    editor = editor_with(tiny_editor, ["lora.enabled=true", "lora.steps=2", "lora.resolution=64", "drag.width=64",
                                       "drag.n_pix_step=3", "generation.width=64", "generation.height=64",
                                       "generation.steps=6"])
    backbone = editor.backbone
    parts = (backbone.unet, backbone.vae, backbone.text_encoder)
    device, dtype = editor.policy.device, editor.policy.weight_dtype
    recorder = MoveRecorder(monkeypatch, parts)
    result = editor.edit(demo_sample(96, 64))
    generated = editor.generate("a ball")
    from_generated = editor.edit_generated(generated, [[20, 30], [40, 30]])
    assert len(recorder.calls) >= 2  # the LoRA and drag modules were placed (the recorder saw them)
    assert recorder.moves(device) == []
    for part in parts:
        assert {(p.device, p.dtype) for p in part.parameters() if not p.requires_grad} == {(device, dtype)}
    for r in (result, from_generated):
        assert r.z_t.device == device and r.z_edited.device == device and r.z_edited.dtype == torch.float32


def test_batch_job_keeps_one_backbone_on_its_device(tmp_path, tiny_model_dir, monkeypatch):
    """Two samples with the LoRA pipeline through the batch job: the backbone is loaded once and never moved."""
    from dragdiffusion.batch import EditJob
    from dragdiffusion.data.convert import write_folder_sample
    from dragdiffusion.data import read_sample
    cfg = load_config("configs/edit.yaml", ["model=tiny", "trainer=cpu", "quiet=true", "lora.steps=1",
                                            "lora.resolution=64", "drag.width=64", "drag.n_pix_step=2",
                                            f"out={tmp_path / 'out'}"])
    job = EditJob(cfg)
    job.setup(torch.device("cpu"))
    backbone = job.backbone
    recorder = MoveRecorder(monkeypatch, (backbone.unet, backbone.vae, backbone.text_encoder))
    for i in range(2):
        folder = write_folder_sample(demo_sample(80, 64, seed=i), tmp_path / "data" / f"s{i}")
        job.run(read_sample(folder), f"s{i}")
        assert job.backbone is backbone
    assert recorder.moves(torch.device("cpu")) == []
    assert (tmp_path / "out" / "s1" / "dragged_image.png").is_file()
    assert OmegaConf.select(cfg, "trainer.precision") == "32"
