"""Self-attention controls of the denoising, chosen by layer name (both use PyTorch's fused
``scaled_dot_product_attention``; one processor, ``SelfAttentionProcessor``, whose keys and values a control may
replace):

- reference-latent control ("mutual self-attention", DragDiffusion, GoodDrag, FreeDrag): in chosen self-attention
  layers and steps the edited branch's queries attend to the keys and values of the original branch; the batch is
  laid out [original..., edited...] (first half original);
- keys and values from the inversion (FastDrag): ``InversionKV`` records the keys and values of chosen
  self-attention layers at every timestep of the inversion, and the denoising of the edited latent uses them
  instead of its own at the same timestep. The record belongs to one edit (``InversionKV.clear``).
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


class SelfAttentionProcessor:
    """diffusers' attention computed with SDPA, whose keys and values (``[batch, heads, tokens, head_dim]``) pass
    through ``keys_values`` before the attention: the hook of the controls below (this base leaves them)."""

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

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
        heads = attn.heads
        q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
        k, v = self.keys_values(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ReferenceAttnProcessor(SelfAttentionProcessor):
    """attn1 processor: when active, the edited half uses the original half's keys and values."""

    def __init__(self, window: StepWindow):
        self.window = window

    def keys_values(self, k, v):
        batch = k.shape[0]
        if self.window.active and batch % 2 == 0:
            n = batch // 2
            k = torch.cat([k[:n], k[:n]])
            v = torch.cat([v[:n], v[:n]])
        return k, v


class InversionKV:
    """The keys and values of chosen self-attention layers, per timestep, recorded while the inversion runs and
    replayed in the denoising (FastDrag's consistency: the edited latent attends with the inversion's keys and
    values of the same timestep). ``at(t)`` sets the timestep of the next UNet call; ``recording`` says which way.
    One record per edit: ``clear()`` frees it."""

    def __init__(self):
        self.entries: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.t: int | None = None
        self.recording = True
        self.replayed: list[tuple[int, str]] = []  # (timestep, layer) of every replacement (tests, records)

    def at(self, t: int) -> None:
        self.t = int(t)

    def put(self, name: str, k: torch.Tensor, v: torch.Tensor) -> None:
        self.entries[(self.t, name)] = (k.detach().clone(), v.detach().clone())

    def get(self, name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.t, name)
        if key not in self.entries:
            raise RuntimeError(f"InversionKV: no keys/values recorded for layer {name} at timestep {self.t}; "
                               f"recorded timesteps: {self.timesteps()}")
        k, v = self.entries[key]
        if k.shape[0] != batch:
            raise RuntimeError(f"InversionKV: recorded with batch {k.shape[0]}, replayed with batch {batch}")
        self.replayed.append(key)
        return k, v

    def timesteps(self) -> list[int]:
        return sorted({t for t, _ in self.entries})

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()
        self.replayed.clear()

    def __len__(self) -> int:
        return len(self.entries)


class InversionKVProcessor(SelfAttentionProcessor):
    """attn1 processor of one layer: records its keys and values into an ``InversionKV`` (inversion) or takes them
    from it in place of its own (denoising)."""

    def __init__(self, store: InversionKV, name: str):
        self.store, self.name = store, name

    def keys_values(self, k, v):
        if self.store.recording:
            self.store.put(self.name, k, v)
            return k, v
        return self.store.get(self.name, k.shape[0])


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


@contextmanager
def inversion_kv(unet, prefixes: list[str], store: InversionKV, recording: bool):
    """Install ``InversionKVProcessor`` on the self-attention layers under ``prefixes`` (recording the inversion's
    keys and values, or replaying them); restore the previous processors after."""
    previous = dict(unet.attn_processors)
    chosen = set(controlled_layer_names(unet, prefixes))
    if not chosen:
        raise ValueError(f"fastdrag.kv_layers {prefixes}: no self-attention layer matches; expected prefixes such as "
                         "'up_blocks' (see unet.attn_processors)")
    store.recording = recording
    unet.set_attn_processor({n: (InversionKVProcessor(store, n) if n in chosen else p) for n, p in previous.items()})
    try:
        yield chosen
    finally:
        unet.set_attn_processor(previous)
