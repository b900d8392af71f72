"""A tiny Stable-Diffusion-1.5-topology model with random weights, built offline and deterministically.

Same block types and number of levels as SD 1.5 (4 UNet levels: 3 CrossAttnDownBlock2D + DownBlock2D,
UpBlock2D + 3 CrossAttnUpBlock2D; VAE factor 8; CLIP text encoder), so block indices such as
``up_blocks[2]`` mean the same thing as in the real model. Channels are small so it runs on a CPU.
The model is saved in the diffusers format and loaded back through the same code as a real checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def default_cache_dir() -> Path:
    root = os.environ.get("DRAGDIFFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dragdiffusion")
    return Path(root) / f"tiny-sd15-v{TINY_VERSION}"


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


def build_tiny_pipeline(seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None,
                        text_config: dict | None = None):
    """Build the tiny pipeline (or another size) in memory with weights drawn from ``seed``."""

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG))
        vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                                    **(text_config or TEXT_CONFIG)))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def ensure_tiny_model(folder: str | Path | None = None, seed: int = 0) -> Path:
    """Create the tiny model in the diffusers format at ``folder`` (default: the user cache) unless it is there."""
    folder = Path(folder) if folder else default_cache_dir()
    if (folder / "model_index.json").exists():
        return folder
    pipe = build_tiny_pipeline(seed)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
