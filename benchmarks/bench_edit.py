#!/usr/bin/env python
"""Time one drag edit stage by stage: DDIM inversion, seconds per drag iteration, denoising, peak memory.

For the tiny model and a full-size SD 1.5-config model with random weights (no download), on CPU and on
GPU when present, with fp32 and with bf16 autocast. Prints a Markdown table.

  python benchmarks/bench_edit.py                                  # tiny at 512 wide, 5 drag iterations
  python benchmarks/bench_edit.py --models tiny sd15 --iters 3 --steps 10
  python benchmarks/bench_edit.py --devices cpu cuda --precisions 32 bf16-mixed

``--steps`` sets num_inference_steps (strength 0.7 keeps 70% of them for inversion and denoising); the
table also projects inversion and denoising to the published 50 steps (per-step time x 35).
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

import numpy as np
import torch


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


def make_editor(model: str, device: str, precision: str, steps: int, iters: int, width: int, dtype: str = "auto"):
    from dragdiffusion.backbone import Backbone
    from dragdiffusion.config import load_config
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.policy import DevicePolicy
    from dragdiffusion.tiny import build_sd15_random_pipeline, build_tiny_pipeline
    cfg = load_config(None, ["lora.enabled=false", f"drag.width={width}", f"drag.n_pix_step={iters}",
                             f"drag.num_inference_steps={steps}", "drag.point_tracking=false",
                             f"trainer.precision={precision}", "quiet=true", f"model.device={device}",
                             f"model.dtype={dtype}"])
    policy = DevicePolicy.from_config(cfg)
    pipe = build_sd15_random_pipeline() if model == "sd15" else build_tiny_pipeline()
    return DragEditor(cfg, backbone=Backbone.from_pipeline(pipe, policy, model), policy=policy)


def run_one(model, device, precision, steps, iters, width):
    from dragdiffusion.demo import demo_sample
    editor = make_editor(model, device, precision, steps, iters, width)
    sample = demo_sample(width, width)  # square: 64x64 latents at 512
    editor.edit(sample)  # warm-up (allocations, kernels), same settings
    with PeakMemory(torch.device(device)) as mem:
        result = editor.edit(sample)
    s = result.seconds
    n_inv = int(steps * editor.cfg.drag.inversion_strength)
    iterations = max(1, result.trajectory["iterations"])
    return {
        "model": model, "device": device, "precision": precision, "size": f"{width}x{width}",
        "inversion_s": s["inversion"], "inversion_50_s": s["inversion"] / n_inv * 35,
        "drag_s_per_iter": s["drag"] / iterations, "iterations": iterations,
        "denoise_s": s["denoise"], "denoise_50_s": s["denoise"] / n_inv * 35, "peak_mb": mem.peak_mb,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "sd15"])
    p.add_argument("--devices", nargs="+", default=["cuda" if torch.cuda.is_available() else "cpu"])
    p.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps (published: 50)")
    p.add_argument("--iters", type=int, default=5, help="drag iterations to time (published max: 80)")
    p.add_argument("--width", type=int, default=512)
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        for device in args.devices:
            for precision in args.precisions:
                row = run_one(model, device, precision, args.steps, args.iters, args.width)
                rows.append(row)
                print(f"done: {row}", file=sys.stderr, flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, steps={args.steps}\n")
    print("| model | device | precision | size | inversion s (x35 steps) | drag s/iter | denoise s (x35 steps) | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['precision']} | {r['size']} | {r['inversion_s']:.2f} "
              f"({r['inversion_50_s']:.1f}) | {r['drag_s_per_iter']:.2f} | {r['denoise_s']:.2f} "
              f"({r['denoise_50_s']:.1f}) | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
