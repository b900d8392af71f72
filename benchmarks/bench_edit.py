#!/usr/bin/env python
"""Time one whole drag edit stage by stage, count its UNet passes, and measure peak memory.

  python benchmarks/bench_edit.py                                         # tiny, CPU or GPU, short schedule
  python benchmarks/bench_edit.py --models sd15 --devices cuda --precisions 16-mixed bf16-mixed \\
      --dtypes auto float32 --lora-steps 80 --iters 80                     # the issue's GPU table (published run)
  python benchmarks/bench_edit.py --compile --channels-last                # the opt-in speed-ups
  python benchmarks/bench_edit.py --models tiny_xl --width 128 --lora-steps 2 --gradient-checkpointing off on
                                                                           # SDXL topology on the CPU, small
  python benchmarks/bench_edit.py --models sdxl --devices cuda --precisions 16-mixed --width 1024 --steps 50 \
      --iters 20 --lora-steps 10 --gradient-checkpointing off on            # full-size SDXL on a GPU: peak memory
  python benchmarks/bench_edit.py --methods dragdiffusion gooddrag --iters 80 --gd-rounds 10   # methods side by side
  python benchmarks/bench_edit.py --models sd15 --devices cuda --precisions 16-mixed --methods gooddrag \
      --lora-steps 70 --gd-rounds 10                                       # GoodDrag's published schedule on a GPU
  python benchmarks/bench_edit.py --precisions 32 --lora-steps 80 --iters 80 --methods dragdiffusion fastdrag
                                                                           # FastDrag vs DragDiffusion's defaults
  python benchmarks/bench_edit.py --models sd15 --devices cuda --precisions 16-mixed --methods fastdrag
                                                                           # FastDrag on a GPU (SD 1.5 size, 512 px)
  python benchmarks/bench_edit.py --precisions 32 --iters 20 --methods dragdiffusion dragdiffusion+text \
      gooddrag gooddrag+text --set text.mask_term=false                   # DragText's cost per optimizer step

For the tiny model and a full-size SD 1.5-config model with random weights (no download), at ``--width``
(512 published) on a square demo image: 64 x 64 latents at 512. Stages: identity LoRA (``--lora-steps``, batch 4
at 512), DDIM inversion (35 of 50 steps), the drag (``--iters`` iterations; point tracking off so that random
weights never stop early; GoodDrag: its stop rules off, ``--gd-rounds`` tracking rounds of 3 optimizer steps at
each of its 7 drag steps, 10 published, plus the undragged branch's and the edited branch's DDIM step between drag
steps), denoising with reference control plus the VAE decode. Each configuration runs one
warm-up edit (reported separately: allocator, kernels, torch.compile) and then the timed edit; on a GPU every
stage boundary synchronises. ``UNet passes``: full forward passes per stage, and partial ones (the drag's forward
stops after the last feature block when no callback needs the noise prediction). ``--steps`` scales the
schedule; inversion and denoising are then also projected to the published 35 steps. Peak memory: of the whole
edit and of the LoRA and drag stages (CUDA allocator on a GPU, process RSS on the CPU), and what was held before the
edit (the loaded model); ``--gradient-checkpointing off on`` measures both settings of model.gradient_checkpointing.
Models: ``tiny``, ``sd15`` (full-size SD 1.5 config), ``tiny_xl`` (SDXL topology), ``sdxl`` (full-size SDXL base
config: 2.6 B UNet parameters; a GPU), each with its model preset's feature block and control layers.
FastDrag keeps its preset's schedule (10 DDIM steps, 7 inverted, no LoRA: ``--steps`` and ``--lora-steps`` are the
other methods'); its drag is one warp (no UNet pass). ``NAME+text`` runs a method with DragText; ``--set KEY=VALUE``
passes more config overrides to every run.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dragdiffusion.config import method_names

STAGES = ("prepare_lora", "invert", "drag_along_spine", "denoise")  # the drag: every drag step of the method


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


def held_memory_mb(device: torch.device) -> float:
    """Memory held before the timed edit (MiB): CUDA allocated, or the process RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device) / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20


class StageClock:
    """Wraps the editor's stage methods: seconds (synchronised on a GPU), UNet passes and peak memory per stage."""

    def __init__(self, editor):
        self.device = editor.device
        self.peaks = {s: 0.0 for s in STAGES}  # MiB (CUDA allocator, or process RSS on the CPU)
        # MiB that autograd keeps for the backward of one UNet forward (the most of the stage's forwards): the
        # activations that gradient checkpointing recomputes instead (the frozen weights are not counted)
        self.saved = {s: 0.0 for s in STAGES}
        self.seconds = {s: 0.0 for s in STAGES}
        self.passes = {s: [0, 0] for s in STAGES}  # [started, finished]
        self.current = None
        unet = editor.backbone.unet
        self._weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        self._forward_stage, self._forward_bytes, self._forward_seen = None, 0, set()
        unet.register_forward_pre_hook(lambda *a: self._count(0))
        unet.register_forward_hook(lambda *a: self._count(1))
        for stage in STAGES:
            setattr(editor, stage, self._wrap(stage, getattr(editor, stage)))

    def _count(self, i):
        if self.current:
            self.passes[self.current][i] += 1
        if i == 0:
            self._end_forward()
            self._forward_stage = self.current

    def _end_forward(self):
        if self._forward_stage is not None:
            stage = self._forward_stage
            self.saved[stage] = max(self.saved[stage], self._forward_bytes / 2**20)
        self._forward_stage, self._forward_bytes, self._forward_seen = None, 0, set()

    def _pack(self, tensor):
        if self._forward_stage is not None:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._weights and ptr not in self._forward_seen:
                self._forward_seen.add(ptr)
                self._forward_bytes += storage.nbytes()
        return tensor

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _wrap(self, stage, fn):
        def timed(*a, **k):
            self._sync()
            outer, self.current = self.current, stage
            tic = time.perf_counter()
            mem = PeakMemory(self.device) if outer is None else contextlib.nullcontext()
            saved = (torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t) if outer is None
                     else contextlib.nullcontext())
            try:
                with mem, saved:
                    return fn(*a, **k)
            finally:
                self._sync()
                self.seconds[stage] += time.perf_counter() - tic
                if outer is None:
                    self._end_forward()
                    self.peaks[stage] = max(self.peaks[stage], mem.peak_mb)
                self.current = outer
        return timed

    def reset(self):
        self.peaks = {s: 0.0 for s in STAGES}
        self.saved = {s: 0.0 for s in STAGES}
        self.seconds = {s: 0.0 for s in STAGES}
        self.passes = {s: [0, 0] for s in STAGES}


def make_editor(model: str, device: str, precision: str, dtype: str, args, method: str = "dragdiffusion",
                checkpointing: bool = False):
    from dragdiffusion.backbone import Backbone, apply_speedups
    from dragdiffusion.config import load_config
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.policy import DevicePolicy
    from dragdiffusion import tiny
    builders = {"tiny": tiny.build_tiny_pipeline, "sd15": tiny.build_sd15_random_pipeline,
                "tiny_xl": tiny.build_tiny_sdxl_pipeline, "sdxl": tiny.build_sdxl_random_pipeline}
    method_keys = [f"method={method}"]
    method = method.split("+")[0]
    if method == "gooddrag":  # never stop early: the whole schedule is timed
        method_keys += [f"gooddrag.track_per_step={args.gd_rounds}", "drag.stop_distance=0",
                        "gooddrag.max_track_no_change=1000000"]
    if method == "freedrag":  # --iters Adam steps, never done early
        method_keys += [f"freedrag.max_step={args.iters}", "freedrag.l_expected=0.000001"]  # never "done"
    if method == "fastdrag":  # its own schedule (10 steps, no LoRA): the published comparison
        schedule = []
    else:
        schedule = [f"lora.enabled={'true' if args.lora_steps else 'false'}", f"lora.steps={args.lora_steps}",
                    f"drag.num_inference_steps={args.steps}"]
    preset = [f"model={model}"] if "xl" in model else []  # SDXL: its feature block and control layers
    cfg = load_config(None, preset + method_keys + schedule + [
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"lora.resolution={args.width}", f"drag.width={args.width}", f"drag.n_pix_step={args.iters}",
        "drag.point_tracking=false", f"trainer.precision={precision}",
        "quiet=true", f"model.device={device}", f"model.dtype={dtype}", f"reference.exact={str(args.exact).lower()}",
        *args.set])
    policy = DevicePolicy.from_config(cfg)
    pipe = builders[model]()
    backbone = Backbone.from_pipeline(pipe, policy, model)
    apply_speedups(backbone.unet, args.channels_last, args.compile)
    return DragEditor(cfg, backbone=backbone, policy=policy)


def run_one(model, device, precision, dtype, args, method: str = "dragdiffusion", checkpointing: bool = False) -> dict:
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.ddim import inversion_timesteps
    editor = make_editor(model, device, precision, dtype, args, method, checkpointing)
    clock = StageClock(editor)
    sample = demo_sample(args.width, args.width)  # square: 64x64 latents at 512
    tic = time.perf_counter()
    editor.edit(sample)  # warm-up (allocations, kernels, compilation), same settings
    warmup = time.perf_counter() - tic
    clock.reset()
    held_mb = held_memory_mb(torch.device(device))  # the loaded model (and, on the CPU, the process)
    with PeakMemory(torch.device(device)) as mem:
        tic = time.perf_counter()
        result = editor.edit(sample)
        total = time.perf_counter() - tic
    s, n = clock.seconds, clock.passes
    n_inv = len(inversion_timesteps(editor.backbone.scheduler, editor.cfg.drag.num_inference_steps,
                                    editor.cfg.drag.inversion_strength)[0])
    iterations = max(1, result.trajectory["iterations"])
    return {
        "method": method, "drag_steps": len(result.trajectory["drag_timesteps"]),
        "model": model, "device": device, "policy": editor.policy.describe(), "size": f"{args.width}x{args.width}",
        "lora_s": s["prepare_lora"], "lora_s_per_step": s["prepare_lora"] / max(1, args.lora_steps),
        "inversion_s": s["invert"], "inversion_35": s["invert"] / n_inv * 35,
        "drag_s": s["drag_along_spine"], "drag_s_per_iter": s["drag_along_spine"] / iterations,
        "iterations": iterations,
        "denoise_s": s["denoise"], "denoise_35": s["denoise"] / n_inv * 35, "total_s": total, "warmup_s": warmup,
        "peak_mb": max(mem.peak_mb, *clock.peaks.values()), "lora_peak_mb": clock.peaks["prepare_lora"],
        "drag_peak_mb": clock.peaks["drag_along_spine"], "held_mb": held_mb,
        "lora_saved_mb": clock.saved["prepare_lora"], "drag_saved_mb": clock.saved["drag_along_spine"], "checkpointing": "on" if checkpointing else "off",
        "passes": {k: (v[1], v[0] - v[1]) for k, v in n.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "sd15", "tiny_xl", "sdxl"],
                   help="random-weight models: tiny, full-size SD 1.5, tiny SDXL topology, full-size SDXL base")
    p.add_argument("--gradient-checkpointing", nargs="+", default=["off"], choices=["off", "on"],
                   help="model.gradient_checkpointing (the drag and the LoRA stage); 'off on' measures both")
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
    p.add_argument("--methods", "--method", nargs="+", default=["dragdiffusion"], choices=method_names(),
                   help="drag methods (method=), each with its preset; NAME+text: with DragText")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run")
    p.add_argument("--gd-rounds", type=int, default=10,
                   help="GoodDrag: tracking rounds (of 3 optimizer steps) per drag step (published: 10)")
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        for device in args.devices:
            for precision in args.precisions:
                for dtype in args.dtypes:
                    for method in args.methods:
                        for checkpointing in args.gradient_checkpointing:
                            row = run_one(model, device, precision, dtype, args, method, checkpointing == "on")
                            rows.append(row)
                    print(f"done: {row}", file=sys.stderr, flush=True)
    extras = " ".join(f"--{k.replace('_', '-')}" for k in ("compile", "channels_last", "exact") if getattr(args, k))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, steps={args.steps}, LoRA steps "
          f"{args.lora_steps}, drag iterations {args.iters} {extras}\n")
    print("| method | model | device | policy | whole edit s | LoRA s/step | inversion s (x35) | drag s "
          "(iterations, drag steps) | drag s/iter | denoise+decode s (x35) | warm-up s | peak MiB | gradient "
          "checkpointing | LoRA peak MiB | drag peak MiB | held before MiB | kept for backward MiB: LoRA step / "
          "drag iteration |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['model']} | {r['device']} | {r['policy']} | {r['total_s']:.2f} | "
              f"{r['lora_s_per_step']:.3f} | {r['inversion_s']:.2f} ({r['inversion_35']:.2f}) | {r['drag_s']:.2f} "
              f"({r['iterations']}, {r['drag_steps']}) | {r['drag_s_per_iter']:.3f} | "
              f"{r['denoise_s']:.2f} ({r['denoise_35']:.2f}) | {r['warmup_s']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['checkpointing']} | {r['lora_peak_mb']:.0f} | {r['drag_peak_mb']:.0f} | {r['held_mb']:.0f} | "
              f"{r['lora_saved_mb']:.0f} / {r['drag_saved_mb']:.0f} |")
    published = [r for r in rows if r["method"] == "dragdiffusion"]
    for r in published:  # the per-step costs of this run at DragDiffusion's published schedule
        r["published_s"] = r["lora_s_per_step"] * 80 + r["inversion_35"] + r["drag_s_per_iter"] * 80 + r["denoise_35"]
        print(f"\ndragdiffusion {r['model']} {r['policy']} at its published schedule (LoRA 80 steps + inversion 35 + "
              f"drag 80 iterations + denoise 35, from this run's per-step seconds): {r['published_s']:.1f} s")
        for other in rows:
            if other["method"] == "fastdrag" and other["model"] == r["model"] and other["policy"] == r["policy"]:
                print(f"fastdrag (its published schedule, measured): {other['total_s']:.2f} s: "
                      f"{r['published_s'] / other['total_s']:.1f}x faster")
    print("\nUNet passes of the timed edit (full, partial):")
    for r in rows:
        print(f"  {r['method']} {r['model']} {r['policy']}: " + ", ".join(
            f"{stage.replace('drag_along_spine', 'drag')} {full}+{partial}" for stage, (full, partial) in r["passes"].items()))


if __name__ == "__main__":
    main()
