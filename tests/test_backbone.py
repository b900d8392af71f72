"""Backbone loading: tiny (built, saved, reloaded), local diffusers folder, single file, separate VAE, dtype."""
import pytest
import torch

from dragdiffusion.backbone import load_backbone
from dragdiffusion.config import load_config
from dragdiffusion.policy import DevicePolicy
from dragdiffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline, ensure_tiny_model
from ldm_format import save_single_file


CPU = DevicePolicy.cpu()


def model_cfg(*overrides):
    return load_config("configs/edit.yaml", list(overrides)).model


def unet_out(backbone):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 77, backbone.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return backbone.unet(z.to(backbone.unet.dtype), 500, encoder_hidden_states=c.to(backbone.unet.dtype)).sample


def test_tiny_has_sd15_topology(tiny_model_dir):
    b = load_backbone(model_cfg("model=tiny"), CPU)
    cfg = b.unet.config
    assert tuple(cfg.down_block_types) == SD15_UNET_CONFIG["down_block_types"]
    assert tuple(cfg.up_block_types) == SD15_UNET_CONFIG["up_block_types"]
    assert len(b.unet.up_blocks) == 4 and b.vae_scale_factor == 8
    assert all(not p.requires_grad for p in b.unet.parameters())
    assert b.scheduler.config.steps_offset == 1 and b.scheduler.config.beta_schedule == "scaled_linear"


def test_tiny_is_deterministic_and_reloads_through_the_loader(tmp_path, tiny_model_dir):
    folder = ensure_tiny_model(tmp_path / "tiny")
    assert (folder / "model_index.json").exists() and (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    a = load_backbone(model_cfg("model=tiny", f"model.tiny_dir={folder}"), CPU)
    b = load_backbone(model_cfg(f"model.name_or_path={tiny_model_dir}"), CPU)  # a local diffusers folder
    assert torch.equal(unet_out(a), unet_out(b))
    fresh = build_tiny_pipeline(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(fresh.unet.parameters(), a.unet.parameters()))


def test_single_file_checkpoint_loads_to_the_same_model(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ckpt = tmp_path / "tiny-sd15.safetensors"
    save_single_file(pipe, ckpt)
    single = load_backbone(model_cfg(f"model.name_or_path={ckpt}", f"model.single_file_config={tiny_model_dir}",
                                     "model.local_files_only=true"), CPU)
    folder = load_backbone(model_cfg(f"model.name_or_path={tiny_model_dir}"), CPU)
    assert torch.allclose(unet_out(single), unet_out(folder), atol=1e-5)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(single.vae.encode(x).latent_dist.mean, folder.vae.encode(x).latent_dist.mean, atol=1e-5)


def test_separate_vae_and_dtype(tmp_path, tiny_model_dir):
    from diffusers import AutoencoderKL
    other = AutoencoderKL(**{**AutoencoderKL.load_config(tiny_model_dir / "vae")})  # fresh random weights
    other.save_pretrained(tmp_path / "vae")
    cfg = load_config("configs/edit.yaml", ["model=tiny", f"model.vae={tmp_path / 'vae'}", "model.dtype=bfloat16",
                                            "trainer=cpu", "trainer.precision=bf16-mixed"])
    b = load_backbone(cfg.model, DevicePolicy.from_config(cfg))
    assert b.unet.dtype == torch.bfloat16 and b.vae.dtype == torch.bfloat16
    assert torch.equal(b.vae.decoder.conv_out.weight.float(), other.decoder.conv_out.weight.to(torch.bfloat16).float())


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    from dragdiffusion.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_backbone(model_cfg(f"model.name_or_path={tmp_path}"), CPU)
    with pytest.raises(ModelLoadError, match="model.vae"):
        load_backbone(model_cfg("model=tiny", f"model.vae={tmp_path / 'missing-vae'}"), CPU)


def test_a_unet_from_another_folder_replaces_the_base_models(tmp_path, tiny_model_dir):
    """model.unet: FastDrag's LCM benchmark runs an LCM-distilled UNet beside SD 1.5's text encoder and VAE; a UNet
    folder (its config.json) or a pipeline folder (its unet/) is taken, the rest stays the base model's."""
    from diffusers import UNet2DConditionModel
    base = load_backbone(model_cfg("model=tiny"), CPU)
    other = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(tmp_path / "my-unet")
    swapped = load_backbone(model_cfg("model=tiny", f"model.unet={tmp_path / 'my-unet'}"), CPU)
    assert not torch.equal(unet_out(swapped), unet_out(base))
    assert torch.equal(unet_out(swapped), unet_out(swapped))
    w = "conv_in.weight"
    assert torch.equal(swapped.unet.state_dict()[w], other.state_dict()[w])
    assert torch.equal(swapped.vae.state_dict()["encoder.conv_in.weight"], base.vae.state_dict()["encoder.conv_in.weight"])
    assert swapped.scheduler.config.steps_offset == 1  # the reference DDIM scheduler stays
    from_pipeline_folder = load_backbone(model_cfg("model=tiny", f"model.unet={tiny_model_dir}"), CPU)
    assert torch.equal(unet_out(from_pipeline_folder), unet_out(base))
    from dragdiffusion.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="model.unet"):
        load_backbone(model_cfg("model=tiny", f"model.unet={tmp_path / 'missing'}", "model.local_files_only=true"), CPU)
