"""Reference-latent control ("mutual self-attention"): in chosen self-attention layers and steps, the edited
branch's queries attend to the keys and values of the original branch. Layers are chosen by module name.

The batch is laid out [original..., edited...] (first half original). Uses PyTorch's fused
``scaled_dot_product_attention``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from einops import rearrange


@dataclass
class StepWindow:
    """Which denoising steps (0-based) use the control; the denoise loop sets ``step``."""
    start_step: int = 0
    end_step: int | None = None
    step: int = 0

    @property
    def active(self) -> bool:
        return self.step >= self.start_step and (self.end_step is None or self.step < self.end_step)


class ReferenceAttnProcessor:
    """attn1 processor: when active, the edited half uses the original half's keys and values."""

    def __init__(self, window: StepWindow):
        self.window = window

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        batch, heads = q.shape[0], attn.heads
        q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
        if self.window.active and batch % 2 == 0:
            n = batch // 2
            k = torch.cat([k[:n], k[:n]])
            v = torch.cat([v[:n], v[:n]])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def classic_attention(unet, enabled: bool = True):
    """With ``enabled``: every attention layer on diffusers' classic processor (bmm, softmax, bmm: what the reference
    runs in its inversion and drag when no LoRA is loaded); the previous processors come back after."""
    if not enabled:
        yield
        return
    previous = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def controlled_layer_names(unet, prefixes: list[str]) -> list[str]:
    """Names of the attn1 (self-attention) processors under the given module-name prefixes."""
    names = [n for n in unet.attn_processors if ".attn1." in n]
    return [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]


@contextmanager
def reference_control(unet, prefixes: list[str], window: StepWindow):
    """Install the reference processor on the chosen attn1 layers; restore the previous processors after."""
    previous = dict(unet.attn_processors)
    chosen = set(controlled_layer_names(unet, prefixes))
    if prefixes and not chosen:
        raise ValueError(f"reference.layers {prefixes}: no self-attention layer matches; expected prefixes such as "
                         "'up_blocks.2' (see unet.attn_processors)")
    processor = ReferenceAttnProcessor(window)
    unet.set_attn_processor({n: (processor if n in chosen else p) for n, p in previous.items()})
    try:
        yield chosen
    finally:
        unet.set_attn_processor(previous)
