"""Test helper: write a diffusers SD pipeline as one original-layout (LDM) checkpoint file, so that the
single-file loading path can be tested offline on the tiny model. Key layout: the published SD 1.x format."""
from __future__ import annotations


RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _unet_key(key: str, n: int, has_attn_up: list[bool]) -> str:
    """Map one diffusers UNet key to its LDM name (``n`` = layers_per_block)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for a, b in fixed.items():
        if key.startswith(a + "."):
            return b + key[len(a):]
    parts = key.split(".")
    rest = None
    if parts[0] == "down_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (n + 1)}.0.op." + ".".join(parts[5:])
        prefix = f"input_blocks.{i * (n + 1) + j + 1}.{0 if kind == 'resnets' else 1}."
        rest = ".".join(parts[4:])
    elif parts[0] == "up_blocks":
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if kind == "upsamplers":
            return f"output_blocks.{i * (n + 1) + n}.{2 if has_attn_up[i] else 1}." + ".".join(parts[4:])
        prefix = f"output_blocks.{i * (n + 1) + j}.{0 if kind == 'resnets' else 1}."
        rest = ".".join(parts[4:])
    elif parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        prefix = f"middle_block.{2 * j if kind == 'resnets' else 1}."
        rest = ".".join(parts[3:])
    else:
        raise KeyError(key)
    if ".resnets." in key or key.startswith("mid_block.resnets"):
        for a, b in RESNET:
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
                break
    return prefix + rest


def unet_to_ldm(unet) -> dict:
    n = unet.config.layers_per_block
    has_attn_up = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    return {"model.diffusion_model." + _unet_key(k, n, has_attn_up): v for k, v in unet.state_dict().items()}


def _vae_key(key: str, levels: int) -> str:
    renames = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out")]
    parts = key.split(".")
    side = parts[0]
    if parts[1] in ("down_blocks", "up_blocks"):
        i = int(parts[2])
        level = i if parts[1] == "down_blocks" else levels - 1 - i
        node = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] == "resnets":
            key = f"{side}.{node}.{level}.block.{parts[4]}." + ".".join(parts[5:])
        else:  # downsamplers.0.conv / upsamplers.0.conv
            key = f"{side}.{node}.{level}.{'downsample' if node == 'down' else 'upsample'}." + ".".join(parts[5:])
    elif parts[1] == "mid_block":
        if parts[2] == "resnets":
            key = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        else:
            attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            sub = parts[4]
            tail = parts[6:] if sub == "to_out" else parts[5:]
            key = f"{side}.mid.attn_1.{attn[sub]}." + ".".join(tail)
    for a, b in renames:
        key = key.replace(a, b)
    return key


def vae_to_ldm(vae) -> dict:
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        nk = _vae_key(k, levels)
        if ".mid.attn_1." in nk and nk.split(".")[-2] in ("q", "k", "v", "proj_out") and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + nk] = v
    return out


def text_to_ldm(text_encoder) -> dict:
    # the original layout nests everything under text_model. (transformers >= 5.6 flattened CLIPTextModel)
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def save_single_file(pipe, path) -> None:
    from safetensors.torch import save_file
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **text_to_ldm(pipe.text_encoder)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
