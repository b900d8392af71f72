"""A tiny Stable-Diffusion-1.5-topology model with random weights, built offline and deterministically.

Same block types and number of levels as SD 1.5 (4 UNet levels: 3 CrossAttnDownBlock2D + DownBlock2D,
UpBlock2D + 3 CrossAttnUpBlock2D; VAE factor 8; CLIP text encoder), so block indices such as
``up_blocks[2]`` mean the same thing as in the real model. Channels are small so it runs on a CPU.
The model is saved in the diffusers format and loaded back through the same code as a real checkpoint.

``tiny-v`` is the same model with Stable Diffusion 2.x traits: a v-prediction scheduler, ``upcast_attention`` and
linear projections in the UNet's transformers, and a number of attention heads per block (SD 2.x's
``attention_head_dim=[5, 10, 20, 20]``: a constant head size). It is written to its own cache folder.

``tiny-xl`` has the SDXL topology (``build_tiny_sdxl_pipeline``): 3 UNet levels (DownBlock2D, 2 x
CrossAttnDownBlock2D / 2 x CrossAttnUpBlock2D, UpBlock2D), transformer layers per block, the "text_time" added
conditioning (pooled text embedding + 6 time ids), two CLIP text encoders (the second with a projection: the pooled
embedding) whose penultimate hidden states are concatenated, and a VAE with SDXL's scaling factor and
``force_upcast``. It loads with ``StableDiffusionXLPipeline``; every entry point edits with it (``model=tiny_xl``).
``build_sdxl_random_pipeline`` is the full-size SDXL base configuration with random weights (benchmarks).
"""
from __future__ import annotations

from contextlib import contextmanager

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelLoadError

TINY_VERSION = "1"  # bump when the architecture below changes: the cache folder name follows it

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)
# The DDIM settings of the reference (algorithm.md, stage 2).
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    num_train_timesteps=1000,
)


# The SD 2.x-style tiny model (``model.name_or_path=tiny-v``): v-prediction, upcast attention, heads per block.
TINY_V_VERSION = "1"  # bump when the architecture below changes
TINY_V_UNET_CONFIG = dict(UNET_CONFIG, attention_head_dim=(4, 8, 8, 8), upcast_attention=True,
                          use_linear_projection=True)
TINY_V_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, prediction_type="v_prediction")

# The SDXL-topology tiny model (``model.name_or_path=tiny-xl``). SDXL's own values in the comments.
TINY_XL_VERSION = "1"  # bump when the architecture below changes
TINY_XL_TEXT_CONFIG = TEXT_CONFIG  # CLIP ViT-L: hidden 768
TINY_XL_TEXT_2_CONFIG = dict(TEXT_CONFIG, hidden_size=48, intermediate_size=96, projection_dim=40)  # bigG: 1280, 1280
TINY_XL_TIME_EMBED_DIM = 8  # 256
TINY_XL_UNET_CONFIG = dict(
    sample_size=16,  # 128
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),  # (320, 640, 1280)
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,  # 2
    transformer_layers_per_block=(1, 1, 2),  # (1, 2, 10)
    attention_head_dim=(2, 4, 4),  # (5, 10, 20): heads per block, a constant head size (64; here 16)
    use_linear_projection=True,
    cross_attention_dim=TINY_XL_TEXT_CONFIG["hidden_size"] + TINY_XL_TEXT_2_CONFIG["hidden_size"],  # 768 + 1280
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_XL_TIME_EMBED_DIM,
    # the pooled embedding (text_encoder_2's projection) + 6 time ids x addition_time_embed_dim: 1280 + 6 x 256
    projection_class_embeddings_input_dim=TINY_XL_TEXT_2_CONFIG["projection_dim"] + 6 * TINY_XL_TIME_EMBED_DIM,
    norm_num_groups=16,
)
TINY_XL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)

# name_or_path -> (cache folder name, pipeline class name, the scheduler's prediction type): the last two identify
# the variant on disk
TINY_MODELS = {
    "tiny": (f"tiny-sd15-v{TINY_VERSION}", "StableDiffusionPipeline", "epsilon"),
    "tiny-v": (f"tiny-sd2v-v{TINY_V_VERSION}", "StableDiffusionPipeline", "v_prediction"),
    "tiny-xl": (f"tiny-sdxl-v{TINY_XL_VERSION}", "StableDiffusionXLPipeline", "epsilon"),
}


def default_cache_dir(name: str = "tiny") -> Path:
    """The cache folder of the tiny model ``name`` (``tiny`` or ``tiny-v``)."""
    root = os.environ.get("DRAGDIFFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dragdiffusion")
    return Path(root) / TINY_MODELS[name][0]


def _bytes_to_unicode() -> dict[int, str]:
    """The printable-unicode alphabet of byte-level BPE (GPT-2/CLIP): every byte maps to one character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(folder: Path) -> None:
    """A character-level CLIP tokenizer: vocab of every byte character (plain and word-final) and no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


# Stable Diffusion 1.5's own sizes, for benchmarks with random weights (no download).
SD15_UNET_CONFIG = dict(UNET_CONFIG, sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                       sample_size=512)
SD15_TEXT_CONFIG = dict(TEXT_CONFIG, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")


def build_sd15_random_pipeline(seed: int = 0):
    """A full-size SD 1.5-config pipeline with random weights (benchmarks only; about 1 B parameters)."""
    return build_tiny_pipeline(seed, SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG)


def build_tiny_v_pipeline(seed: int = 0):
    """The SD 2.x-style tiny pipeline (v-prediction, upcast attention) in memory, weights drawn from ``seed``."""
    return build_tiny_pipeline(seed, TINY_V_UNET_CONFIG, scheduler_config=TINY_V_SCHEDULER_CONFIG)


def _tiny_tokenizer(**kwargs):
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, **kwargs)


def _text_config(tokenizer, config: dict) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)


# SDXL base 1.0's own configuration (stabilityai/stable-diffusion-xl-base-1.0), for a full-size random model
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_VAE_CONFIG = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_CONFIG = dict(SD15_TEXT_CONFIG)  # CLIP ViT-L/14
SDXL_TEXT_2_CONFIG = dict(TEXT_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, projection_dim=1280, hidden_act="gelu")  # OpenCLIP ViT-bigG/14


def build_sdxl_random_pipeline(seed: int = 0):
    """A full-size SDXL-config pipeline with random weights (benchmarks and gpu_check only; about 3.5 B
    parameters: UNet 2.6 B, text encoders 0.8 B)."""
    return build_tiny_sdxl_pipeline(seed, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_TEXT_CONFIG, SDXL_TEXT_2_CONFIG)


@contextmanager
def seeded(seed: int):
    """Draw from ``seed`` inside the block; the caller's random state comes back after it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def build_tiny_sdxl_pipeline(seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None,
                             text_config: dict | None = None, text_2_config: dict | None = None):
    """The SDXL-topology tiny pipeline (``StableDiffusionXLPipeline``) in memory, weights drawn from ``seed``; the
    scheduler is the reference DDIM (SDXL's betas are SD 1.5's)."""
    tokenizer = _tiny_tokenizer()
    tokenizer_2 = _tiny_tokenizer(pad_token="!")  # as SDXL's second tokenizer
    with seeded(seed):
        unet = UNet2DConditionModel(**(unet_config or TINY_XL_UNET_CONFIG))
        vae = AutoencoderKL(**(vae_config or TINY_XL_VAE_CONFIG))
        text_encoder = CLIPTextModel(_text_config(tokenizer, text_config or TINY_XL_TEXT_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, text_2_config or TINY_XL_TEXT_2_CONFIG))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=DDIMScheduler(**SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)


def build_tiny_pipeline(seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None,
                        text_config: dict | None = None, scheduler_config: dict | None = None):
    """Build the tiny pipeline (or another size) in memory with weights drawn from ``seed``."""
    tokenizer = _tiny_tokenizer()
    with seeded(seed):
        unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG))
        vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
        text_encoder = CLIPTextModel(_text_config(tokenizer, text_config or TEXT_CONFIG))
    scheduler = DDIMScheduler(**(scheduler_config or SCHEDULER_CONFIG))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _variant_on_disk(folder: Path) -> tuple[str, str]:
    """(pipeline class name, scheduler prediction type) of a saved pipeline folder."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return "unknown", "unknown"
    return str(index.get("_class_name")), str(config.get("prediction_type", "epsilon"))


def ensure_tiny_model(folder: str | Path | None = None, seed: int = 0, name: str = "tiny") -> Path:
    """Create the tiny model ``name`` (``tiny``: SD 1.5 topology; ``tiny-v``: SD 2.x-style, v-prediction;
    ``tiny-xl``: SDXL topology) in the diffusers format at ``folder`` (default: its folder in the user cache) unless
    it is there. A folder that holds another variant is refused (``model.tiny_dir`` names one folder per variant)."""
    if name not in TINY_MODELS:
        raise ValueError(f"tiny model '{name}': expected one of {', '.join(TINY_MODELS)}")
    folder = Path(folder) if folder else default_cache_dir(name)
    if (folder / "model_index.json").exists():
        expected, found = TINY_MODELS[name][1:], _variant_on_disk(folder)
        if found != expected:
            raise ModelLoadError(f"model.tiny_dir: {folder} holds a {found[0]} with prediction_type '{found[1]}', not "
                                 f"the '{name}' model ({expected[0]}, {expected[1]}); give each tiny model its own "
                                 "model.tiny_dir")
        return folder
    builders = {"tiny": build_tiny_pipeline, "tiny-v": build_tiny_v_pipeline, "tiny-xl": build_tiny_sdxl_pipeline}
    pipe = builders[name](seed)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
