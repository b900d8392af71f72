"""SDXL as a backbone: the tiny SDXL-topology model (built, saved, reloaded with StableDiffusionXLPipeline), the
pipeline detection, both text encoders (prompt embeddings and pooled embedding, as diffusers computes them), the
added time ids, the fp32 VAE (force_upcast) under fp16 weights; the per-backbone defaults of the presets; the added
conditioning in every UNet call; every entry point on tiny-xl (edit with LoRA, generate, train with a stock SDXL
pipeline loading the LoRA, batch, evaluate, the app, GoodDrag) and gradient checkpointing."""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection

from conftest import REPO
from dragdiffusion.backbone import (encode_prompt_sdxl, load_backbone, pipeline_kind, sdxl_added_cond,
                                    sdxl_time_ids)
from dragdiffusion.config import load_config
from dragdiffusion.errors import ModelLoadError
from dragdiffusion.policy import DevicePolicy
from dragdiffusion.tiny import ensure_tiny_model

CPU = DevicePolicy.cpu()


def xl_cfg():
    return load_config(REPO / "configs" / "edit.yaml", ["model.name_or_path=tiny-xl",
                                                        "model.local_files_only=true"]).model


@pytest.fixture(scope="module")
def tiny_xl_dir():
    return ensure_tiny_model(name="tiny-xl")


@pytest.fixture(scope="module")
def xl_backbone(tiny_xl_dir):
    return load_backbone(xl_cfg(), CPU)


def test_tiny_sdxl_has_the_sdxl_topology_and_reloads(tiny_xl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir, add_watermarker=False)
    u = pipe.unet.config
    assert tuple(u.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(u.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert list(u.block_out_channels)[::-1][1] == pipe.unet.up_blocks[1].resnets[0].out_channels  # the middle width
    assert u.addition_embed_type == "text_time" and list(u.transformer_layers_per_block) == [1, 1, 2]
    assert len(pipe.unet.up_blocks[0].attentions[0].transformer_blocks) == 2
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert u.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert u.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                       + 6 * u.addition_time_embed_dim)
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast is True


def test_pipeline_kind(tiny_xl_dir, tiny_model_dir, tmp_path):
    assert pipeline_kind("tiny-xl") == "sdxl" and pipeline_kind("tiny") == "sd" and pipeline_kind("tiny-v") == "sd"
    assert pipeline_kind(str(tiny_xl_dir)) == "sdxl" and pipeline_kind(str(tiny_model_dir)) == "sd"
    xl, sd = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}, str(xl))
    save_file({"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1)}, str(sd))
    assert pipeline_kind(str(xl)) == "sdxl" and pipeline_kind(str(sd)) == "sd"
    assert pipeline_kind(str(sd), single_file_config=str(tiny_xl_dir)) == "sdxl"  # the layout's folder decides


def test_sdxl_loads_for_editing(xl_backbone):
    assert xl_backbone.is_sdxl and xl_backbone.vae.config.scaling_factor == 0.13025


def test_sdxl_prompt_pooled_and_time_ids_match_diffusers_and_drive_the_unet(xl_backbone, tiny_xl_dir):
    b = xl_backbone
    assert b.is_sdxl and b.tokenizer_2 is not None
    embeds, pooled = encode_prompt_sdxl(b, "a photo of a cat")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir, add_watermarker=False)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, b.unet.config.cross_attention_dim)
    assert pooled.shape == (1, b.text_encoder_2.config.projection_dim)
    assert torch.allclose(embeds, ref_embeds) and torch.allclose(pooled, ref_pooled)
    ref_ids = pipe._get_add_time_ids((96, 128), (0, 0), (96, 128), torch.float32,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(sdxl_time_ids((96, 128), (96, 128)), ref_ids)

    z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    added = sdxl_added_cond(b, pooled, (96, 128), (96, 128), batch=2)
    assert added["text_embeds"].shape == (2, pooled.shape[1]) and added["time_ids"].shape == (2, 6)
    with torch.no_grad():
        out = b.unet(z, 681, encoder_hidden_states=embeds.expand(2, -1, -1), added_cond_kwargs=added).sample
        other = b.unet(z, 681, encoder_hidden_states=embeds.expand(2, -1, -1),
                       added_cond_kwargs=sdxl_added_cond(b, pooled, (1024, 1024), (96, 128), batch=2)).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, other)  # the time ids reach the UNet
    with pytest.raises(ModelLoadError, match="projection_class_embeddings_input_dim"):
        sdxl_added_cond(b, pooled[:, :-1], (96, 128), (96, 128))


def test_sdxl_vae_stays_fp32_under_fp16_weights(tiny_xl_dir):
    half = DevicePolicy(torch.device("cpu"), "32", torch.float16)  # placement only: no fp16 compute on the CPU
    b = load_backbone(xl_cfg(), half)
    assert b.unet.dtype == torch.float16 and b.text_encoder_2.dtype == torch.float16
    assert b.vae.dtype == torch.float32  # force_upcast
    sd = load_backbone(load_config(REPO / "configs" / "edit.yaml", ["model=tiny"]).model, half)
    assert sd.vae.dtype == torch.float16 and not sd.is_sdxl  # SD 1.5 unchanged


# ------------------------------------------------------------------------------------------ SDXL as a backbone

XL_EDIT = ["model=tiny_xl", "trainer=cpu", "quiet=true", "drag.width=96", "drag.n_pix_step=3",
           "drag.num_inference_steps=10", "lora.enabled=false", "lora.steps=2", "lora.resolution=64",
           "lora.batch_size=1", "generation.width=96", "generation.height=64", "generation.steps=10"]
SD15_DEFAULTS = (512, [2], ["up_blocks.2", "up_blocks.3"], 512)


def edit_cfg(*overrides):
    return load_config(REPO / "configs" / "edit.yaml", XL_EDIT + list(overrides))


@pytest.fixture(scope="module")
def xl_editor(tiny_xl_dir):
    from dragdiffusion.editor import DragEditor
    return DragEditor(edit_cfg())


def xl_editor_with(base, *overrides):
    from dragdiffusion.editor import DragEditor
    return DragEditor(edit_cfg(*overrides), backbone=base.backbone)


def defaults_of(cfg):
    return cfg.drag.width, list(cfg.drag.feature_blocks), list(cfg.reference.layers), cfg.lora.resolution


def test_model_presets_carry_the_per_backbone_defaults():
    from dragdiffusion.config import EvaluateConfig
    for preset in ("sdxl", "tiny_xl"):
        cfg = load_config(REPO / "configs" / "edit.yaml", [f"model={preset}"])
        assert defaults_of(cfg) == (1024, [1], ["up_blocks.0", "up_blocks.1"], 1024)
        assert (cfg.generation.width, cfg.generation.height) == (1024, 1024)
    assert load_config(None, ["model=sdxl"]).model.name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    for overrides in ([], ["model=sd15"], ["model=tiny"], ["model=sdxl", "model=sd15"], ["model=tiny_xl", "model=tiny"]):
        assert defaults_of(load_config(REPO / "configs" / "edit.yaml", overrides)) == SD15_DEFAULTS  # published
    assert load_config(None, ["model=sd21"]).drag.width == 768  # a 768-v model
    mine = load_config(None, ["drag.width=512", "model=sdxl", "drag.feature_blocks=[2]", "method=gooddrag"])
    assert defaults_of(mine)[:2] == (512, [2]) and mine.drag.lr == 0.02  # key=value wins; method presets compose
    evaluation = load_config(REPO / "configs" / "evaluate.yaml", ["model=tiny_xl"], schema=EvaluateConfig)
    assert evaluation.model.name_or_path == "tiny-xl"  # a schema without drag/reference skips those keys


def test_the_preset_layers_are_the_ones_the_issue_names(xl_backbone):
    """SDXL's up_blocks[1] is the middle-width (SDXL: 640-channel) block whose output is at the latent's size, as
    SD 1.5's up_blocks[2]; the reference control covers the self-attention of exactly the up blocks with attention."""
    from dragdiffusion.attention import controlled_layer_names
    from dragdiffusion.features import FeatureCapture
    unet, cfg = xl_backbone.unet, load_config(None, ["model=tiny_xl"])
    z = torch.randn(1, 4, 12, 16)
    embeds, pooled = encode_prompt_sdxl(xl_backbone, "x")
    with torch.no_grad(), FeatureCapture(unet, list(cfg.drag.feature_blocks)) as cap:
        unet(z, 500, encoder_hidden_states=embeds, added_cond_kwargs=sdxl_added_cond(xl_backbone, pooled, (96, 128),
                                                                                     (96, 128)))
    feature = cap.outputs[1]
    assert feature.shape[1] == list(unet.config.block_out_channels)[1] and feature.shape[-2:] == z.shape[-2:]
    with_attention = [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)]
    assert with_attention == list(cfg.reference.layers) == ["up_blocks.0", "up_blocks.1"]
    every_up_attn1 = [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n]
    assert sorted(controlled_layer_names(unet, list(cfg.reference.layers))) == sorted(every_up_attn1)


def test_sd15_layers_on_an_sdxl_model_are_refused_with_the_preset_named(xl_editor):
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.errors import ConfigError
    for key in ("drag.feature_blocks=[2,3]", "reference.layers=[up_blocks.2,up_blocks.3]"):
        with pytest.raises(ConfigError, match="model=sdxl"):
            xl_editor_with(xl_editor, key).edit(demo_sample(96, 64))


def test_conditioning_batches_like_a_tensor_and_a_tensor_is_unchanged():
    from dragdiffusion.conditioning import Conditioning, cond_cat, cond_chunk, cond_expand, unet_cond_kwargs
    g = torch.Generator().manual_seed(0)
    h, pooled, ids = torch.randn(1, 77, 8, generator=g), torch.randn(1, 5, generator=g), torch.randn(1, 6, generator=g)
    c = Conditioning(h, {"text_embeds": pooled, "time_ids": ids})
    u = Conditioning(-h, {"text_embeds": -pooled, "time_ids": ids})
    both = cond_cat([cond_expand(u, 2), cond_expand(c, 2)])
    assert both.shape[0] == 4 and both.added["text_embeds"].shape == (4, 5) and both.added["time_ids"].shape == (4, 6)
    first, second = cond_chunk(both, 2)
    assert torch.equal(second.hidden[1], h[0]) and torch.equal(first.added["text_embeds"][0], -pooled[0])
    kwargs = unet_cond_kwargs(c, torch.float16)
    assert kwargs["encoder_hidden_states"].dtype == kwargs["added_cond_kwargs"]["time_ids"].dtype == torch.float16
    assert torch.equal(cond_cat([h, -h]), torch.cat([h, -h])) and cond_expand(h, 3).shape == (3, 77, 8)
    assert unet_cond_kwargs(h).keys() == {"encoder_hidden_states"} and unet_cond_kwargs(h)["encoder_hidden_states"] is h
    with pytest.raises(ValueError, match="added"):
        cond_cat([h, c])


def test_sdxl_edit_with_lora_gives_every_unet_call_the_added_conditioning(xl_editor, tmp_path):
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.lora import WEIGHT_NAME
    editor = xl_editor_with(xl_editor, "lora.enabled=true")
    calls = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].shape[0],
                      added.get("text_embeds", torch.zeros(0)).shape[0], added.get("time_ids", torch.zeros(0)).shape[0],
                      tuple(added["time_ids"][0].tolist()) if "time_ids" in added else None))
    handle = editor.backbone.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = editor.edit(demo_sample(128, 96), out_dir=tmp_path)
    finally:
        handle.remove()
    assert result.image.shape == (96, 128, 3) and torch.isfinite(result.z_edited).all()
    assert (tmp_path / "lora" / WEIGHT_NAME).is_file() and result.trajectory["lora"]
    assert calls and all(z == e == p == i for z, e, p, i, _ in calls), calls  # every call, its own batch size
    assert {z for z, *_ in calls} == {1, 2}  # LoRA (batch 1 here), inversion and drag (1), denoising (2)
    assert {ids for *_, ids in calls} == {(64.0, 64.0, 0.0, 0.0, 64.0, 64.0), (72.0, 96.0, 0.0, 0.0, 72.0, 96.0)}


def test_sdxl_generate_then_drag_the_generated_image(xl_editor):
    generated = xl_editor.generate("a red ball")  # guidance 7.5: [uncond, cond] batches
    assert generated.image.shape == (64, 96, 3) and tuple(generated.z_t.shape[-2:]) == (8, 12)
    result = xl_editor.edit_generated(generated, [[30, 30], [50, 30]])
    assert result.image.shape == (64, 96, 3) and result.trajectory["generated"]["guidance_scale"] == 7.5


def _unet_probe(unet):
    g = torch.Generator().manual_seed(1)
    c = unet.config
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), 500,
                    encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(1, c.projection_class_embeddings_input_dim
                                                                  - 6 * c.addition_time_embed_dim, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}).sample


def test_sdxl_train_py_lora_loads_into_a_stock_sdxl_pipeline(tiny_xl_dir, tmp_path):
    import train
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.io import save_png
    from dragdiffusion.lora import WEIGHT_NAME, load_identity_lora
    image = tmp_path / "image.png"
    save_png(image, demo_sample(64, 64).image)
    out = tmp_path / "lora"
    assert train.main(["model=tiny_xl", "trainer=cpu", "quiet=true", "lora.steps=3", "lora.lr=0.02",
                       "lora.resolution=64", "lora.batch_size=1", f"image={image}", "prompt=a disc", f"out={out}"]) == 0
    assert (out / WEIGHT_NAME).is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir, add_watermarker=False)
    base = _unet_probe(pipe.unet)
    pipe.load_lora_weights(str(out))
    stock = _unet_probe(pipe.unet)
    assert (stock - base).abs().max() > 1e-4  # the LoRA changes the stock pipeline's UNet
    ours = load_backbone(xl_cfg(), CPU)
    load_identity_lora(ours.unet, out, 16)
    torch.testing.assert_close(_unet_probe(ours.unet), stock, atol=1e-5, rtol=1e-5)  # the same LoRA both ways


@pytest.fixture(scope="module")
def xl_batch(tiny_xl_dir, tmp_path_factory):
    import edit
    from dragdiffusion.data.convert import write_folder_sample
    from dragdiffusion.demo import demo_sample
    root = tmp_path_factory.mktemp("xl-batch")
    data, out = root / "data", root / "out"
    for i in range(2):
        write_folder_sample(demo_sample(96, 64 + 8 * i, seed=i), data / f"s{i}")
    rc = edit.main(XL_EDIT + ["drag.n_pix_step=2", f"data={data}", f"out={out}"])
    return rc, data, out


def test_sdxl_batch(xl_batch):
    import json
    rc, _, out = xl_batch
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 2
    assert all((out / f"s{i}" / "dragged_image.png").is_file() for i in range(2))


def test_sdxl_evaluate_with_dift_on_tiny_xl(xl_batch):
    import json
    from dragdiffusion import evaluate
    _, data, out = xl_batch
    assert evaluate.main(["model=tiny_xl", "trainer=cpu", f"data={data}", f"results={out}",
                          "image_fidelity.enabled=false", "mean_distance.ensemble_size=2", "mean_distance.width=64",
                          "quiet=true"]) == 0
    summary = json.loads((out / "evaluation.json").read_text())["summary"]
    assert summary["n_pairs"] >= 2


def test_sdxl_app_edit_job_with_the_tiny_xl_preset(tiny_xl_dir):
    from dragdiffusion.app import AppEvents
    from dragdiffusion.app_jobs import (EditorCache, edit_job, model_settings, page_config, run_to_end,
                                        settings_changes)
    from dragdiffusion.demo import demo_sample
    assert model_settings(None, [], "tiny_xl") == {"width": 1024, "blocks": [1]}  # what the page's fields get
    assert AppEvents(None, []).model_chosen("tiny") == (512, [2])
    changes = settings_changes(96, 0, False, 1, 2, 0.1, 0.7, 0.01, [1])
    cfg = page_config(REPO / "configs" / "edit.yaml", ["trainer=cpu", "drag.num_inference_steps=10"], "tiny_xl",
                      changes)
    assert cfg.model.name_or_path == "tiny-xl" and list(cfg.reference.layers) == ["up_blocks.0", "up_blocks.1"]
    sample = demo_sample(96, 64)
    reports = []
    result = run_to_end(edit_job(cfg, sample.image, sample.points, sample.mask, "a cat", editors=EditorCache()),
                        on_progress=reports.append)
    assert result.image.shape == (64, 96, 3) and any(r[0] == "drag" for r in reports)


def test_gooddrag_on_sdxl(xl_editor):
    from dragdiffusion.demo import demo_sample
    editor = xl_editor_with(xl_editor, "method=gooddrag", "gooddrag.drag_end_step=2", "gooddrag.track_per_step=1",
                            "drag.stop_distance=0")
    result = editor.edit(demo_sample(96, 64))
    assert result.trajectory["method"]["name"] == "gooddrag" and len(result.trajectory["drag_timesteps"]) == 2
    assert result.image.shape == (64, 96, 3)


def test_gradient_checkpointing_in_the_drag_and_the_lora_stage(xl_editor):
    from dragdiffusion.demo import demo_sample
    sample = demo_sample(96, 64)
    seen = []

    def hook(module, args):
        if torch.is_grad_enabled():
            seen.append(module.is_gradient_checkpointing)
    unet = xl_editor.backbone.unet
    results = {}
    for flag in ("false", "true"):
        seen.clear()
        handle = unet.register_forward_pre_hook(hook)
        try:
            results[flag] = xl_editor_with(xl_editor, "lora.enabled=true",
                                           f"model.gradient_checkpointing={flag}").edit(sample)
        finally:
            handle.remove()
        assert len(seen) == 2 + 3 and set(seen) == {flag == "true"}  # 2 LoRA steps + 3 drag iterations
    assert not unet.is_gradient_checkpointing  # off again after the edit
    torch.testing.assert_close(results["true"].z_edited, results["false"].z_edited, atol=1e-5, rtol=1e-5)
    assert results["true"].trajectory["handles"] == results["false"].trajectory["handles"]


def test_the_full_size_sdxl_config_is_sdxl_base():
    """``build_sdxl_random_pipeline``'s configuration (benchmarks, gpu_check on a GPU), checked on the meta device:
    SDXL base's parameter counts and added-conditioning sizes, without allocating its 3.5 B parameters."""
    from diffusers import UNet2DConditionModel
    from dragdiffusion.tiny import SDXL_TEXT_2_CONFIG, SDXL_UNET_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57  # SDXL base: 2.567 B
    assert [b.resnets[0].out_channels for b in unet.up_blocks] == [1280, 640, 320]
    assert unet.config.projection_class_embeddings_input_dim == SDXL_TEXT_2_CONFIG["projection_dim"] + 6 * 256


def test_fastdrag_on_sdxl_with_a_dragbench_and_a_drag100_sample(xl_editor, dragbench_dir):
    from dragdiffusion.data import read_sample
    drag100 = REPO.parent / "shared" / "data" / "drag100-sample" / "cat_2"
    editor = xl_editor_with(xl_editor, "method=fastdrag")
    for folder in (dragbench_dir / "animals" / "JH_2023-09-14-1838-08", drag100):
        if not folder.is_dir():
            pytest.skip(f"{folder} is not there")
        sample = read_sample(folder)
        result = editor.edit(sample)
        t = result.trajectory
        assert t["method"]["name"] == "fastdrag" and t["iterations"] == 0 and t["t"] == 601
        assert result.image.shape == (sample.height, sample.width, 3)
        assert t["fastdrag"]["moved_cells"] > 0
