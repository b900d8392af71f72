"""UNet feature capture with forward hooks, resized to the supervision grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def resize_and_concat(feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in feats], dim=1)


def unet_eps_and_features(unet, z, t, cond, blocks, size, need_eps: bool = True):
    """One UNet forward: (eps or None, features [B, C, h, w]). Without ``need_eps`` the forward stops early."""
    with FeatureCapture(unet, blocks) as cap:
        cap.stop_after_last = not need_eps
        eps = None
        try:
            eps = unet(z, t, encoder_hidden_states=cond).sample
        except StopForward:
            pass
        return eps, cap.features(size)
