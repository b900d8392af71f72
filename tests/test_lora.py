"""The identity LoRA stage on the tiny model: math, caching, training, diffusers round trip, checkpoints, CLIs."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dragdiffusion.config import LoraTrainConfig, load_config
from dragdiffusion.errors import ModelLoadError
from dragdiffusion import lora as lora_lib

REPO = Path(__file__).resolve().parents[1]
FAST = ["model=tiny", "trainer=cpu", "lora.resolution=64", "lora.steps=3", "quiet=true"]


def lora_cfg(*overrides: str):
    return load_config(REPO / "configs" / "lora.yaml", FAST + list(overrides), schema=LoraTrainConfig)


def test_image(h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth, structured picture (a disc on a gradient): something a LoRA can learn."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([255 * xx / w, 255 * yy / h, np.full((h, w), 120.0)], axis=-1)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2] = (220, 40, 40)
    return img.astype(np.uint8)


test_image.__test__ = False




@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    from dragdiffusion.backbone import load_backbone
    from dragdiffusion.policy import DevicePolicy
    return load_backbone(lora_cfg().model, DevicePolicy.cpu())


def stock_pipeline(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([10, 700]), encoder_hidden_states=c).sample


def count_calls(module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *a: calls.append(1))  # a pre-hook also sees recomputations
    return calls


# ------------------------------------------------------------------------------------------ pure functions

def test_diffusion_target_follows_the_prediction_type():
    from diffusers import DDIMScheduler
    from dragdiffusion.errors import ConfigError
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 500, 999])
    eps = DDIMScheduler(beta_schedule="scaled_linear")
    assert lora_lib.diffusion_target(eps, x0, noise, t) is noise
    v = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(lora_lib.diffusion_target(v, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    with pytest.raises(ConfigError, match="prediction_type"):
        lora_lib.diffusion_target(DDIMScheduler(prediction_type="sample"), x0, noise, t)


def test_resized_size_short_side():
    assert lora_lib.resized_size(96, 128, 64) == (64, 85)  # landscape: height -> 64, width truncated
    assert lora_lib.resized_size(300, 200, 512) == (768, 512)
    assert lora_lib.resized_size(50, 50, 64) == (64, 64)


# ------------------------------------------------------------------------------------------ views: VAE once

def test_view_sampler_encodes_each_distinct_crop_once(backbone):
    vae = backbone.vae
    encoder_calls = count_calls(vae.encoder)
    g = torch.Generator().manual_seed(0)
    square = lora_lib.ViewSampler(vae, test_image(64, 64), 64)
    views = [square.sample(4, g) for _ in range(3)]
    assert views[0].shape == (4, 4, 8, 8) and len(encoder_calls) == 1 and square.encodes == 1
    assert not torch.equal(views[0], views[1])  # a fresh sample of the latent distribution each time
    # a square image has one crop: the cached latent is exactly the VAE of that crop
    with torch.no_grad():
        direct = vae.encode(square.pixels).latent_dist
    torch.testing.assert_close(square.mean, direct.mean)

    wide = lora_lib.ViewSampler(vae, test_image(64, 160), 64)  # 64 x 160: latent 8 x 20, 13 crop offsets
    crops = wide.sample(16, g)
    assert crops.shape == (16, 4, 8, 8) and wide.encodes == 1
    assert len({tuple(c.flatten()[:4].tolist()) for c in crops}) > 1
    naive = lora_lib.ViewSampler(vae, test_image(64, 160), 64, cache=False)
    for _ in range(3):
        assert naive.sample(4, g).shape == (4, 4, 8, 8)
    assert naive.encodes == 3  # the reference's way: the VAE at every step


def test_training_encodes_prompt_and_image_once(backbone):
    cfg = lora_cfg("lora.steps=3")
    text_calls, vae_calls = count_calls(backbone.text_encoder), count_calls(backbone.vae.encoder)
    module = lora_lib.train_lora(backbone, test_image(64, 96), "a disc", cfg.lora, cfg.trainer, None, quiet=True)
    assert len(module.losses) == 3
    assert len(text_calls) == 1 and len(vae_calls) == 1
    assert not any(p.requires_grad for p in backbone.unet.parameters())  # frozen again for the drag


# ------------------------------------------------------------------------------------------ training

def test_lora_loss_goes_down_on_a_fixed_image(backbone):
    cfg = lora_cfg("lora.steps=40", "lora.lr=0.01")
    image = test_image()
    g = torch.Generator().manual_seed(123)
    views = lora_lib.ViewSampler(backbone.vae, image, 64)
    x0 = (views.mean * views.scaling).expand(16, -1, -1, -1)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (16,), generator=g)
    from dragdiffusion.backbone import encode_prompt
    cond = encode_prompt(backbone, "a disc")

    def eval_loss():
        with torch.no_grad():
            return float(lora_lib.lora_loss(backbone.unet, backbone.scheduler, x0, noise, t, cond))

    lora_lib.remove_identity_lora(backbone.unet)
    before = eval_loss()
    module = lora_lib.train_lora(backbone, image, "a disc", cfg.lora, cfg.trainer, None, quiet=True)
    after = eval_loss()
    assert len(module.losses) == 40
    assert after < 0.85 * before, (before, after)  # seeded: about 1.17 -> 0.84


def test_round_trip_into_stock_pipeline_and_base_unchanged(backbone, tiny_model_dir, tmp_path):
    # rank 4, alpha 8: the scale (alpha / rank = 2) must survive the file, or the outputs differ
    cfg = lora_cfg("lora.steps=3", "lora.lr=0.02", "lora.rank=4", "lora.alpha=8")
    lora_lib.train_lora(backbone, test_image(), "a disc", cfg.lora, cfg.trainer, tmp_path, quiet=True)
    file = tmp_path / lora_lib.WEIGHT_NAME
    assert file.exists()
    trained = unet_out(backbone.unet)

    pipe = stock_pipeline(tiny_model_dir)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(unet_out(pipe.unet), trained, atol=1e-5, rtol=1e-5)
    assert (trained - base).abs().max() > 1e-3  # the LoRA does change the UNet

    lora_lib.remove_identity_lora(backbone.unet)
    fresh = stock_pipeline(tiny_model_dir).unet.state_dict()
    now = backbone.unet.state_dict()
    assert set(now) == set(fresh) and all(torch.equal(now[k], fresh[k]) for k in fresh)


def test_checkpoint_is_lora_sized_and_resume_continues(backbone, tmp_path):
    cfg = lora_cfg("lora.steps=4", "lora.save_every=2", "lora.lr=0.01")
    full = lora_lib.train_lora(backbone, test_image(), "a disc", cfg.lora, cfg.trainer, tmp_path / "full", quiet=True)
    ckpt = tmp_path / "full" / "checkpoints" / "step-00002.ckpt"
    assert ckpt.exists() and (tmp_path / "full" / "step-00002" / lora_lib.WEIGHT_NAME).exists()
    lora_params = {n: p for n, p in full.named_parameters() if ".lora_" in n}
    lora_bytes = sum(p.numel() * 4 for p in lora_params.values())
    unet_bytes = sum(p.numel() * 4 for p in backbone.unet.parameters())
    state = torch.load(ckpt, weights_only=True)
    assert set(state["state_dict"]) == set(lora_params)
    # LoRA weights + two Adam moments (+ small bookkeeping), far from the whole model
    assert ckpt.stat().st_size < 3 * lora_bytes + 200_000 and ckpt.stat().st_size < unet_bytes / 2

    resumed = lora_lib.train_lora(backbone, test_image(), "a disc", cfg.lora, cfg.trainer, tmp_path / "resumed",
                                  ckpt_path=str(ckpt), quiet=True)
    assert len(resumed.losses) == 2  # steps 3 and 4 only
    assert resumed.losses == full.losses[2:]  # same views, noise and optimizer state as the uninterrupted run
    a = lora_lib.read_lora_file(tmp_path / "full" / lora_lib.WEIGHT_NAME)[0]
    b = lora_lib.read_lora_file(tmp_path / "resumed" / lora_lib.WEIGHT_NAME)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    params = lora_lib.add_identity_lora(backbone.unet, lora_cfg().lora, 0)
    for p in params:  # B = 0 at init: give the LoRA a value so that every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x0, noise, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    grads, resnet_calls = [], count_calls(backbone.unet.up_blocks[1].resnets[0])
    backbone.unet.train()
    for checkpointing in (False, True):
        if checkpointing:
            backbone.unet.enable_gradient_checkpointing()
        for p in params:
            p.grad = None
        lora_lib.lora_loss(backbone.unet, backbone.scheduler, x0, noise, torch.tensor([3, 800]), cond).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        resnet_calls.append("step")
    backbone.unet.disable_gradient_checkpointing()
    backbone.unet.eval()
    lora_lib.remove_identity_lora(backbone.unet)
    assert resnet_calls == [1, "step", 1, 1, "step"]  # checkpointing recomputes the block in the backward
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ loading files

def test_bad_lora_files_give_clear_errors(backbone, tmp_path):
    from diffusers import UNet2DConditionModel
    from dragdiffusion.tiny import UNET_CONFIG
    unet = backbone.unet
    cfg = lora_cfg("lora.rank=4")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match="corrupt.safetensors.*not a readable"):
        lora_lib.load_identity_lora(unet, corrupt, 4)
    with pytest.raises(ModelLoadError, match="no LoRA file found"):
        lora_lib.load_identity_lora(unet, tmp_path / "missing", 4)

    lora_lib.add_identity_lora(unet, cfg.lora, 0)
    rank4 = lora_lib.save_lora(unet, tmp_path / "rank4")
    with pytest.raises(ModelLoadError, match=r"rank4.*rank 4, but lora.rank is 16"):
        lora_lib.load_identity_lora(unet, rank4, 16)

    other = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (32, 64, 64, 128), "cross_attention_dim": 48})
    lora_lib.add_identity_lora(other, cfg.lora, 0)
    foreign = lora_lib.save_lora(other, tmp_path / "other_model")
    lora_lib.remove_identity_lora(unet)
    with pytest.raises(ModelLoadError, match=r"other_model.*another base model"):
        lora_lib.load_identity_lora(unet, foreign, 4)
    assert not getattr(unet, "peft_config", None)  # nothing half-loaded


def test_official_dragdiffusion_lora_files_load_and_convert(backbone, tiny_model_dir, tmp_path):
    """A file as the official code writes it (diffusers 0.24: 'unet.unet.<layer>.lora.down.weight', no alphas, no
    metadata; scale 1) loads as it is, converts to today's format, and gives a stock pipeline the same UNet."""
    from safetensors.torch import load_file, save_file
    cfg = lora_cfg("lora.rank=4", "lora.alpha=4")  # alpha = rank: scale 1, as the official files' (no alpha)
    lora_lib.add_identity_lora(backbone.unet, cfg.lora, 0)
    for name, p in backbone.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    ours = load_file(str(lora_lib.save_lora(backbone.unet, tmp_path / "ours")))
    official = tmp_path / "official" / lora_lib.WEIGHT_NAME
    official.parent.mkdir()
    save_file({"unet." + k: v for k, v in ours.items()}, str(official), metadata={"format": "pt"})
    assert next(iter(load_file(str(official)))).startswith("unet.unet.down_blocks.")
    assert lora_lib.key_style(load_file(str(official))) == "dragdiffusion-official"
    assert lora_lib.check_lora_file(official.parent, 4) == official  # the header check accepts it
    lora_lib.remove_identity_lora(backbone.unet)
    lora_lib.load_identity_lora(backbone.unet, official, 4)
    loaded = unet_out(backbone.unet)
    converted = lora_lib.convert_lora_file(official, tmp_path / "converted")
    assert set(load_file(str(converted))) == set(ours)
    pipe = stock_pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(converted.parent))
    torch.testing.assert_close(loaded, unet_out(pipe.unet), atol=1e-5, rtol=1e-5)
    import train as train_cli  # the same conversion from the command line
    assert train_cli.main(["--convert", str(official), str(tmp_path / "cli")]) == 0
    assert load_file(str(tmp_path / "cli" / lora_lib.WEIGHT_NAME)).keys() == ours.keys()
    # a truly foreign file: the first missing layer and the file's key style are named
    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.mid_block.no_such_layer.to_q.lora.down.weight": torch.zeros(4, 32),
               "unet.mid_block.no_such_layer.to_q.lora.up.weight": torch.zeros(32, 4)}, str(foreign))
    with pytest.raises(ModelLoadError, match=r"layer 'mid_block.no_such_layer.to_q' does not exist.*style diffusers"):
        lora_lib.load_identity_lora(backbone.unet, foreign, 4)
    lora_lib.remove_identity_lora(backbone.unet)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reinitialised_adapter_equals_a_fresh_one(tiny_model_dir, dtype):
    """A batch re-initialises the identity adapter in place between samples: the values must be those of a new
    adapter, bit for bit (for half models too: peft rounds the init through the base layer's dtype)."""
    from dragdiffusion.backbone import load_backbone
    from dragdiffusion.policy import DevicePolicy
    backbone = load_backbone(lora_cfg().model, DevicePolicy(torch.device("cpu"), "bf16-mixed" if dtype != torch.float32
                                                            else "32", dtype))
    cfg = lora_cfg("lora.rank=4").lora
    unet = backbone.unet
    fresh = [p.detach().clone() for p in lora_lib.add_identity_lora(unet, cfg, 7)]  # built from scratch
    for p in lora_lib.add_identity_lora(unet, cfg, 1):
        p.data.normal_()  # as if trained
    assert lora_lib.reinit_identity_lora(unet, cfg)  # same shape: re-initialised in place
    again = lora_lib.add_identity_lora(unet, cfg, 7)
    assert len(again) == len(fresh) and all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(again, fresh))
    assert not lora_lib.reinit_identity_lora(unet, lora_cfg("lora.rank=8").lora)  # another rank: rebuilt instead


def test_loading_replaces_the_previous_lora(backbone, tiny_model_dir, tmp_path):
    cfg = lora_cfg("lora.rank=4")
    files = []
    for seed in (1, 2):
        lora_lib.add_identity_lora(backbone.unet, cfg.lora, seed)
        for name, p in backbone.unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(seed))
        files.append(lora_lib.save_lora(backbone.unet, tmp_path / f"s{seed}"))
    # a dataset folder as train.py data=... writes it: each sample finds its own
    assert lora_lib.resolve_lora_file(tmp_path, "s2") == files[1]
    # one editor, several samples in a row: lora.path of sample 1, then sample 2, then no LoRA at all
    from dragdiffusion.editor import DragEditor
    editor = DragEditor(load_config(REPO / "configs/edit.yaml", ["model=tiny", "lora.rank=4", "trainer=cpu"]),
                        backbone=backbone)
    editor.cfg.lora.path = str(files[0])
    assert editor.prepare_lora(SimpleNamespace(name="s1")) == str(files[0])
    editor.cfg.lora.path = str(tmp_path)
    assert editor.prepare_lora(SimpleNamespace(name="s2")) == str(files[1])
    assert list(backbone.unet.peft_config) == [lora_lib.ADAPTER]
    pipe = stock_pipeline(tiny_model_dir)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(str(files[1].parent))
    torch.testing.assert_close(unet_out(backbone.unet), unet_out(pipe.unet), atol=1e-5, rtol=1e-5)
    editor.cfg.lora.path, editor.cfg.lora.enabled = None, False
    assert editor.prepare_lora(SimpleNamespace(name="s3")) is None
    torch.testing.assert_close(unet_out(backbone.unet), base, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ command lines

def test_edit_cli_trains_then_reuses_the_lora(tmp_path, tiny_model_dir):
    import edit
    common = ["model=tiny", "trainer=cpu", "drag.width=128", "drag.n_pix_step=2", "quiet=true", "sample=demo",
              "lora.resolution=64"]
    assert edit.main(["--config", str(REPO / "configs/edit.yaml"), *common, "lora.enabled=true", "lora.steps=2",
                      f"out={tmp_path / 'a'}"]) == 0
    file = tmp_path / "a" / "lora" / lora_lib.WEIGHT_NAME
    assert file.exists() and (tmp_path / "a" / "dragged_image.png").exists()
    assert json.loads((tmp_path / "a" / "trajectory.json").read_text())["lora"] == str(file)
    assert edit.main(["--config", str(REPO / "configs/edit.yaml"), *common, f"lora.path={file.parent}",
                      f"out={tmp_path / 'b'}"]) == 0
    assert json.loads((tmp_path / "b" / "trajectory.json").read_text())["lora"] == str(file)
    assert not (tmp_path / "b" / "lora").exists()  # loaded, not trained again


def test_train_cli_dataset_skips_done_and_reports_failures(tmp_path, tiny_model_dir, capsys):
    import train
    data = tmp_path / "data"
    for name in ("cat/one", "cat/two", "dog/broken"):
        folder = data / name
        folder.mkdir(parents=True)
        (folder / "drag.json").write_text(json.dumps({"prompt": "a disc", "handles": [[10, 10]], "targets": [[20, 20]]}))
        if name == "dog/broken":
            (folder / "image.png").write_bytes(b"not a png")
        else:
            Image.fromarray(test_image(48, 64)).save(folder / "image.png")
    out = tmp_path / "loras"
    args = ["--config", str(REPO / "configs/lora.yaml"), *FAST, "lora.steps=2", f"data={data}", f"out={out}"]
    assert train.main(args) == 1  # one sample failed, the others were trained
    err = capsys.readouterr().err
    assert "dog/broken" in err and "image" in err
    done = [out / "cat" / n / lora_lib.WEIGHT_NAME for n in ("one", "two")]
    assert all(f.exists() for f in done) and (out / "cat" / "one" / "config.yaml").exists()
    mtimes = [f.stat().st_mtime_ns for f in done]
    assert train.main(args) == 1
    assert "cat/one: skipped" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in done] == mtimes

    assert train.main(["--config", str(REPO / "configs/lora.yaml"), *FAST, f"image={tmp_path / 'nope.png'}"]) == 2
    assert "nope.png" in capsys.readouterr().err
