#!/usr/bin/env python
"""Time one whole drag edit stage by stage, count its UNet passes, and measure peak memory.

  python benchmarks/bench_edit.py                                         # tiny, CPU or GPU, short schedule
  python benchmarks/bench_edit.py --models sd15 --devices cuda --precisions 16-mixed bf16-mixed \\
      --dtypes auto float32 --lora-steps 80 --iters 80                     # the issue's GPU table (published run)
  python benchmarks/bench_edit.py --compile --channels-last                # the opt-in speed-ups

For the tiny model and a full-size SD 1.5-config model with random weights (no download), at ``--width``
(512 published) on a square demo image: 64 x 64 latents at 512. Stages: identity LoRA (``--lora-steps``, batch 4
at 512), DDIM inversion (35 of 50 steps), the drag (``--iters`` iterations; point tracking off so that random
weights never stop early), denoising with reference control plus the VAE decode. Each configuration runs one
warm-up edit (reported separately: allocator, kernels, torch.compile) and then the timed edit; on a GPU every
stage boundary synchronises. ``UNet passes``: full forward passes per stage, and partial ones (the drag's forward
stops after the last feature block when no callback needs the noise prediction). ``--steps`` scales the
schedule; inversion and denoising are then also projected to the published 35 steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

STAGES = ("prepare_lora", "invert", "drag", "denoise")


class PeakMemory:
    """Peak CUDA memory (allocator) or peak process RSS (sampled every 5 ms) while the block runs, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil
        proc = psutil.Process()
        self._stop = threading.Event()
        self._peak = proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, proc.memory_info().rss)
                time.sleep(0.005)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak / 2**20


class StageClock:
    """Wraps the editor's stage methods: seconds (synchronised on a GPU) and UNet passes per stage."""

    def __init__(self, editor):
        self.device = editor.device
        self.seconds = {s: 0.0 for s in STAGES}
        self.passes = {s: [0, 0] for s in STAGES}  # [started, finished]
        self.current = None
        unet = editor.backbone.unet
        unet.register_forward_pre_hook(lambda *a: self._count(0))
        unet.register_forward_hook(lambda *a: self._count(1))
        for stage in STAGES:
            setattr(editor, stage, self._wrap(stage, getattr(editor, stage)))

    def _count(self, i):
        if self.current:
            self.passes[self.current][i] += 1

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _wrap(self, stage, fn):
        def timed(*a, **k):
            self._sync()
            outer, self.current = self.current, stage
            tic = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._sync()
                self.seconds[stage] += time.perf_counter() - tic
                self.current = outer
        return timed

    def reset(self):
        self.seconds = {s: 0.0 for s in STAGES}
        self.passes = {s: [0, 0] for s in STAGES}


def make_editor(model: str, device: str, precision: str, dtype: str, args):
    from dragdiffusion.backbone import Backbone, apply_speedups
    from dragdiffusion.config import load_config
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.policy import DevicePolicy
    from dragdiffusion.tiny import build_sd15_random_pipeline, build_tiny_pipeline
    cfg = load_config(None, [
        f"lora.enabled={'true' if args.lora_steps else 'false'}", f"lora.steps={args.lora_steps}",
        f"lora.resolution={args.width}", f"drag.width={args.width}", f"drag.n_pix_step={args.iters}",
        f"drag.num_inference_steps={args.steps}", "drag.point_tracking=false", f"trainer.precision={precision}",
        "quiet=true", f"model.device={device}", f"model.dtype={dtype}", f"reference.exact={str(args.exact).lower()}"])
    policy = DevicePolicy.from_config(cfg)
    pipe = build_sd15_random_pipeline() if model == "sd15" else build_tiny_pipeline()
    backbone = Backbone.from_pipeline(pipe, policy, model)
    apply_speedups(backbone.unet, args.channels_last, args.compile)
    return DragEditor(cfg, backbone=backbone, policy=policy)


def run_one(model, device, precision, dtype, args) -> dict:
    from dragdiffusion.demo import demo_sample
    editor = make_editor(model, device, precision, dtype, args)
    clock = StageClock(editor)
    sample = demo_sample(args.width, args.width)  # square: 64x64 latents at 512
    tic = time.perf_counter()
    editor.edit(sample)  # warm-up (allocations, kernels, compilation), same settings
    warmup = time.perf_counter() - tic
    clock.reset()
    with PeakMemory(torch.device(device)) as mem:
        tic = time.perf_counter()
        result = editor.edit(sample)
        total = time.perf_counter() - tic
    s, n = clock.seconds, clock.passes
    n_inv = int(args.steps * editor.cfg.drag.inversion_strength)
    iterations = max(1, result.trajectory["iterations"])
    return {
        "model": model, "device": device, "policy": editor.policy.describe(), "size": f"{args.width}x{args.width}",
        "lora_s": s["prepare_lora"], "lora_s_per_step": s["prepare_lora"] / max(1, args.lora_steps),
        "inversion_s": s["invert"], "inversion_35": s["invert"] / n_inv * 35,
        "drag_s": s["drag"], "drag_s_per_iter": s["drag"] / iterations, "iterations": iterations,
        "denoise_s": s["denoise"], "denoise_35": s["denoise"] / n_inv * 35, "total_s": total, "warmup_s": warmup,
        "peak_mb": mem.peak_mb, "passes": {k: (v[1], v[0] - v[1]) for k, v in n.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "sd15"])
    p.add_argument("--devices", nargs="+", default=["cuda" if torch.cuda.is_available() else "cpu"])
    p.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    p.add_argument("--dtypes", nargs="+", default=["auto"], help="model.dtype values (auto: half under mixed on GPU)")
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps (published: 50)")
    p.add_argument("--iters", type=int, default=5, help="drag iterations (published max: 80)")
    p.add_argument("--lora-steps", type=int, default=0, help="identity LoRA steps (published: 80; 0 = no LoRA)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="model.compile=true (regional torch.compile)")
    p.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    p.add_argument("--exact", action="store_true", help="reference.exact=true")
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        for device in args.devices:
            for precision in args.precisions:
                for dtype in args.dtypes:
                    row = run_one(model, device, precision, dtype, args)
                    rows.append(row)
                    print(f"done: {row}", file=sys.stderr, flush=True)
    extras = " ".join(f"--{k.replace('_', '-')}" for k in ("compile", "channels_last", "exact") if getattr(args, k))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, steps={args.steps}, LoRA steps "
          f"{args.lora_steps}, drag iterations {args.iters} {extras}\n")
    print("| model | device | policy | whole edit s | LoRA s/step | inversion s (x35) | drag s/iter | "
          "denoise+decode s (x35) | warm-up s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['policy']} | {r['total_s']:.2f} | {r['lora_s_per_step']:.3f} | "
              f"{r['inversion_s']:.2f} ({r['inversion_35']:.2f}) | {r['drag_s_per_iter']:.3f} | "
              f"{r['denoise_s']:.2f} ({r['denoise_35']:.2f}) | {r['warmup_s']:.1f} | {r['peak_mb']:.0f} |")
    r = rows[-1]
    print("\nUNet passes of the timed edit (full, partial): " + ", ".join(
        f"{stage} {full}+{partial}" for stage, (full, partial) in r["passes"].items()))


if __name__ == "__main__":
    main()
