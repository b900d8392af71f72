"""UNet feature capture with forward hooks, resized to the supervision grid."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .conditioning import unet_cond_kwargs


class StopForward(Exception):
    """Raised by a hook to skip the rest of the UNet when only features are needed."""


class FeatureCapture:
    """Keeps the outputs of ``unet.up_blocks[i]`` for ``i`` in ``blocks`` during a forward pass."""

    def __init__(self, unet, blocks: list[int]):
        self.unet = unet
        self.blocks = list(blocks)
        self.outputs: dict[int, torch.Tensor] = {}
        self.stop_after_last = False
        self._handles = []

    def _hook(self, index):
        def hook(module, args, output):
            self.outputs[index] = output
            if self.stop_after_last and len(self.outputs) == len(self.blocks):
                raise StopForward
        return hook

    def __enter__(self) -> "FeatureCapture":
        for i in self.blocks:
            self._handles.append(self.unet.up_blocks[i].register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def features(self, size: tuple[int, int]) -> torch.Tensor:
        """Captured features, each bilinearly resized to ``size`` (h, w), concatenated on channels (fp32)."""
        return resize_and_concat([self.outputs[i] for i in self.blocks], size)


class UNetPasses:
    """Counts the UNet's forward calls while active (``with UNetPasses(unet) as passes: ...; passes.count``): full
    and partial forwards (one that stops after a feature block) alike, any batch size; gradient checkpointing's
    recomputation in the backward is not a call of the UNet and is not counted."""

    def __init__(self, unet):
        self.unet = unet
        self.count = 0
        self._handle = None

    def _add(self, module, args):
        self.count += 1

    def __enter__(self) -> "UNetPasses":
        self._handle = self.unet.register_forward_pre_hook(self._add)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def resize_and_concat(feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in feats], dim=1)


def unet_eps_and_features(unet, z, t, cond, blocks, size, need_eps: bool = True):
    """One UNet forward: (eps or None, features [B, C, h, w]). Without ``need_eps`` the forward stops early.
    ``cond``: the prompt embedding or a ``Conditioning`` (SDXL: with the added conditioning)."""
    with FeatureCapture(unet, blocks) as cap:
        cap.stop_after_last = not need_eps
        eps = None
        try:
            eps = unet(z, t, **unet_cond_kwargs(cond)).sample
        except StopForward:
            pass
        return eps, cap.features(size)


def replace_mid_block(unet, bottleneck: torch.Tensor | None):
    """While active, ``unet.mid_block``'s output is ``bottleneck`` (expanded to the batch, in the block's dtype):
    DragNoise's optimized bottleneck in a drag forward. ``None``: nothing is replaced."""
    return StepGatedBottleneck(bottleneck, 1, record=False).installed(unet)


class MidBlockCapture(FeatureCapture):
    """Keeps ``unet.mid_block``'s output during a forward and stops the forward there."""

    def __init__(self, unet):
        super().__init__(unet, [])
        self.output: torch.Tensor | None = None

    def __enter__(self) -> "MidBlockCapture":
        def hook(module, args, output):
            self.output = output
            raise StopForward
        self._handles.append(self.unet.mid_block.register_forward_hook(hook))
        return self


@torch.no_grad()
def mid_block_output(unet, z, t, cond) -> torch.Tensor:
    """The UNet bottleneck (``mid_block`` output) for latent ``z``: [B, C_mid, h/8, w/8] for SD 1.5's topology."""
    with MidBlockCapture(unet) as cap:
        try:
            unet(z, t, **unet_cond_kwargs(cond))
        except StopForward:
            pass
    return cap.output


class StepGatedBottleneck:
    """DragNoise's propagation: ``bottleneck`` replaces ``unet.mid_block``'s output in the denoising steps
    ``0 .. steps - 1`` (the loop sets ``step``); nothing when ``bottleneck`` is None or ``steps`` is 0."""

    def __init__(self, bottleneck: torch.Tensor | None, steps: int, record: bool = True):
        self.bottleneck, self.steps, self.step, self.record = bottleneck, int(steps), 0, record
        self.replaced: list[int] = []  # the steps in which it replaced the block's output (for tests and logs)

    @property
    def active(self) -> bool:
        return self.bottleneck is not None and self.step < self.steps

    @contextmanager
    def installed(self, unet):
        if self.bottleneck is None or self.steps == 0:
            yield self
            return

        def hook(module, args, output):
            if not self.active:
                return None
            if self.record:
                self.replaced.append(self.step)
            return self.bottleneck.to(output.dtype).expand_as(output)
        handle = unet.mid_block.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()
