#!/usr/bin/env python
"""The fixed costs around the UNet: what a sample of a batch pays besides its forward and backward passes.

  python benchmarks/bench_overhead.py                  # CPU, tiny and SD 1.5-size UNet
  python benchmarks/bench_overhead.py --device cuda --sizes sd15

- ``Trainer()``: constructing the policy's single-device Trainer (each LoRA and drag stage builds one);
- ``Lightning step``: per-step cost of ``Trainer.fit`` over a loop doing the same optimizer step by hand, for
  80 steps of a one-tensor "model" (the drag's shape: z_t and Adam), quiet (no logger, no progress bar);
- ``LoRA reset``: a fresh identity adapter for the next sample, rebuilt by peft or re-initialised in place
  (``add_identity_lora`` does the latter when the shape is the same: the batch's case);
- ``syncs``: host-device synchronisations of one drag iteration, counted with ``torch.cuda.set_sync_debug_mode``
  (CUDA only; on the CPU shown as n/a).
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch
from torch.utils.data import DataLoader


class OneTensor(L.LightningModule):
    def __init__(self, device):
        super().__init__()
        self.z = torch.nn.Parameter(torch.randn(1, 4, 64, 64, device=device))

    def training_step(self, batch, batch_idx):
        return (self.z ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam([self.z], lr=0.01)

    def train_dataloader(self):
        return DataLoader(range(80), batch_size=1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def lightning_overhead(policy, steps: int = 80) -> tuple[float, float]:
    """(seconds to build the Trainer, extra ms per step of fit over a hand-written loop)."""
    device = policy.device
    tic = time.perf_counter()
    trainer = policy.trainer(steps, quiet=True, progress_bar=False)
    build = time.perf_counter() - tic
    module = OneTensor(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync(device)
        tic = time.perf_counter()
        trainer.fit(module)
        sync(device)
        fit = time.perf_counter() - tic
    z = torch.nn.Parameter(torch.randn(1, 4, 64, 64, device=device))
    opt = torch.optim.Adam([z], lr=0.01)
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        (z ** 2).mean().backward()
        opt.step()
    sync(device)
    plain = time.perf_counter() - tic
    return build, (fit - plain) / steps * 1000


def lora_reset(size: str, policy, repeats: int = 3) -> tuple[float, float]:
    """(seconds to rebuild the adapter, seconds to re-initialise it in place: what a batch pays per sample)."""
    from omegaconf import OmegaConf
    from dragdiffusion.backbone import Backbone
    from dragdiffusion.config import LoraConfig
    from dragdiffusion.lora import add_identity_lora, remove_identity_lora
    from dragdiffusion.tiny import build_sd15_random_pipeline, build_tiny_pipeline
    pipe = build_sd15_random_pipeline() if size == "sd15" else build_tiny_pipeline()
    unet = Backbone.from_pipeline(pipe, policy).unet
    cfg = OmegaConf.structured(LoraConfig())
    add_identity_lora(unet, cfg, 0)
    times = {True: [], False: []}
    for i in range(repeats):
        for rebuild in (True, False):
            sync(policy.device)
            tic = time.perf_counter()
            if rebuild:
                remove_identity_lora(unet)
            add_identity_lora(unet, cfg, i)
            sync(policy.device)
            times[rebuild].append(time.perf_counter() - tic)
    return min(times[True]), min(times[False])


def drag_syncs(policy) -> str:
    """Synchronisations of drag iterations 2..4 of the tiny model (mask term on, tracking on)."""
    if policy.device.type != "cuda":
        return "n/a"
    from dragdiffusion.config import load_config
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.drag import DragCallback
    from dragdiffusion.editor import DragEditor
    counts = []

    class Count(DragCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                torch.cuda.set_sync_debug_mode("default")

    cfg = load_config(None, ["model=tiny", "lora.enabled=false", "drag.width=128", "drag.n_pix_step=4", "quiet=true",
                             f"model.device={policy.device}", f"trainer.precision={policy.precision}"])
    editor = DragEditor(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor.edit(demo_sample(128, 96), callbacks=[Count()])
    counts = [w for w in caught if "synchroniz" in str(w.message)]
    return f"{len(counts) / 3:.1f} per iteration"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    p.add_argument("--precision", default=None)
    args = p.parse_args(argv)
    from dragdiffusion.policy import DevicePolicy
    device = torch.device(args.device)
    precision = args.precision or ("16-mixed" if device.type == "cuda" else "32")
    weights = torch.float16 if precision == "16-mixed" else torch.float32
    policy = DevicePolicy(device, precision, weights)
    lightning_overhead(policy, 8)  # warm-up
    build, per_step = lightning_overhead(policy)
    print(f"\n{policy.describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| measure | value |\n|---|---|")
    print(f"| Trainer() construction | {build * 1000:.0f} ms |")
    print(f"| Lightning overhead per step (80-step fit vs a plain loop) | {per_step:.2f} ms |")
    for size in args.sizes:
        rebuild, in_place = lora_reset(size, policy)
        print(f"| LoRA reset ({size}): rebuilt / re-initialised in place (a batch's path) | {rebuild * 1000:.0f} ms / "
              f"{in_place * 1000:.0f} ms |")
    print(f"| host syncs per drag iteration (tiny) | {drag_syncs(policy)} |")


if __name__ == "__main__":
    main()
