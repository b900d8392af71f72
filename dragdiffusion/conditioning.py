"""The UNet's conditioning as one value, so that every UNet call gets all of it.

SD 1.x / 2.x condition the UNet on the prompt embedding alone: a plain tensor [B, 77, D], used as it always was.
SDXL also needs its added conditioning (``added_cond_kwargs``: the pooled text embedding [B, P] and the time ids
[B, 6]: original size, crop, target size); a ``Conditioning`` carries both, and batches, splits and casts them
together. The helpers below take either form, so code that expands, concatenates or chunks a condition (classifier-
free guidance, the [original, edited] denoising batch) is the same for both, and a plain tensor goes through
exactly the operations it went through before (SD 1.5's numbers are unchanged).

    cond = encode_condition(backbone, prompt, (height, width))      # backbone.py: a tensor or a Conditioning
    unet(z, t, **unet_cond_kwargs(cond_expand(cond, z.shape[0]), unet.dtype)).sample
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """The prompt embedding ``hidden`` [B, 77, D] and SDXL's ``added`` conditioning {"text_embeds": [B, P],
    "time_ids": [B, 6]} (``None``: none), with the tensor operations the pipeline applies to a condition."""
    hidden: torch.Tensor
    added: dict | None = None

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def _map(self, fn) -> "Conditioning":
        added = None if self.added is None else {k: fn(v) for k, v in self.added.items()}
        return Conditioning(fn(self.hidden), added)

    def expand(self, n: int, *_) -> "Conditioning":
        """``n`` rows (from one row, or ``n`` already); ``expand(n, -1, -1)`` as a tensor's is accepted."""
        return Conditioning(self.hidden.expand(n, -1, -1),
                            None if self.added is None else {k: v.expand(n, -1) for k, v in self.added.items()})

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda v: v.to(*args, **kwargs))

    def detach(self) -> "Conditioning":
        return self._map(torch.Tensor.detach)

    def clone(self) -> "Conditioning":
        return self._map(torch.Tensor.clone)

    def chunk(self, n: int) -> tuple["Conditioning", ...]:
        hidden = self.hidden.chunk(n)
        if self.added is None:
            return tuple(Conditioning(h) for h in hidden)
        parts = {k: v.chunk(n) for k, v in self.added.items()}
        return tuple(Conditioning(h, {k: p[i] for k, p in parts.items()}) for i, h in enumerate(hidden))

    @staticmethod
    def cat(items) -> "Conditioning":
        items = [c if isinstance(c, Conditioning) else Conditioning(c) for c in items]
        if any((c.added is None) != (items[0].added is None) for c in items):
            raise ValueError("Conditioning.cat: some conditions have added conditioning (SDXL) and some do not")
        added = None if items[0].added is None else {
            k: torch.cat([c.added[k] for c in items]) for k in items[0].added}
        return Conditioning(torch.cat([c.hidden for c in items]), added)

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """The UNet's conditioning keyword arguments, cast to ``dtype`` when given."""
        cast = (lambda v: v) if dtype is None else (lambda v: v.to(dtype))
        kwargs = {"encoder_hidden_states": cast(self.hidden)}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in self.added.items()}
        return kwargs


def cond_expand(cond, n: int):
    """``cond`` with ``n`` rows (a tensor: ``expand(n, -1, -1)``, as before)."""
    return cond.expand(n, -1, -1)


def cond_cat(items):
    """Concatenate conditions on the batch: plain tensors with ``torch.cat``, else a ``Conditioning``."""
    items = list(items)
    if all(isinstance(c, torch.Tensor) for c in items):
        return torch.cat(items)
    return Conditioning.cat(items)


def cond_chunk(cond, n: int):
    return cond.chunk(n)


def unet_cond_kwargs(cond, dtype: torch.dtype | None = None) -> dict:
    """The UNet's keyword arguments for ``cond`` (a tensor: ``encoder_hidden_states`` alone, cast to ``dtype`` when
    given; a ``Conditioning``: also ``added_cond_kwargs``)."""
    if isinstance(cond, Conditioning):
        return cond.unet_kwargs(dtype)
    return {"encoder_hidden_states": cond if dtype is None else cond.to(dtype)}
