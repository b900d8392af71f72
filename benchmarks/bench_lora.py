#!/usr/bin/env python
"""Seconds per identity-LoRA step and peak memory: cached latents (ours) vs the naive VAE pass per view.

  python benchmarks/bench_lora.py --sizes tiny --steps 5                 # quick, on the CPU
  python benchmarks/bench_lora.py --sizes sd15 --steps 1 --grad-ckpt     # full-size SD 1.5 UNet/VAE, random weights
  python benchmarks/bench_lora.py --sizes tiny,sd15 --steps 10 --device cuda --precision 16-mixed

``tiny`` is the project's test model; ``sd15`` builds the real SD 1.5 UNet, VAE and CLIP text encoder
configurations with random weights (no download). Each (size, variant) runs in its own process, so the peak
memory is that run's own: CUDA ``max_memory_allocated``, or the process's peak resident size (ru_maxrss, which
includes the weights) on the CPU. ``setup`` is the prompt encoding plus, for the cached variant, the one VAE
pass; ``s/step`` is the mean over the timed steps (the first step is a warm-up when --steps > 1);
``80 steps`` = setup + 80 x s/step, the published LoRA length. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def build_backbone(size: str, policy):
    """The tiny model or a full-size SD 1.5-config model with random weights, placed by the policy."""
    from dragdiffusion.backbone import Backbone
    from dragdiffusion.tiny import build_sd15_random_pipeline, build_tiny_pipeline
    pipe = build_sd15_random_pipeline() if size == "sd15" else build_tiny_pipeline()
    return Backbone.from_pipeline(pipe, policy, source=f"{size}-random")


def child(args) -> dict:
    """One measurement in this process: build, train ``warmup + steps`` steps, report timings and peak memory."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf
    from dragdiffusion.config import LoraConfig, ModelConfig, TrainerConfig
    from dragdiffusion.policy import DevicePolicy
    from dragdiffusion.demo import demo_sample
    from dragdiffusion import lora as lora_lib

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_limit_gb:
        limit = int(args.mem_limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    cuda = device.startswith("cuda")
    precision = args.precision or ("16-mixed" if cuda else "32")
    policy = DevicePolicy.from_config(OmegaConf.create({"model": ModelConfig(device=device, dtype=args.dtype),
                                                        "trainer": TrainerConfig(precision=precision)}))
    backbone = build_backbone(args.size, policy)
    warmup = 1 if args.steps > 1 else 0
    lora = OmegaConf.structured(LoraConfig(steps=args.steps + warmup, batch_size=args.batch, resolution=args.resolution,
                                           cache_latents=args.variant == "cached",
                                           gradient_checkpointing=args.grad_ckpt))
    w, h = (int(v) for v in args.image.split("x"))
    image = demo_sample(w, h).image

    marks: dict[str, list[float]] = {"start": [], "end": []}

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            if cuda:
                torch.cuda.synchronize()
            marks["start"].append(time.perf_counter())

        def on_train_batch_end(self, *a):
            if cuda:
                torch.cuda.synchronize()
            marks["end"].append(time.perf_counter())

        def on_fit_start(self, trainer, pl_module):
            marks["fit_start"] = [time.perf_counter()]

    module = lora_lib.LoraIdentityModule(backbone, image, "a photo", lora)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = policy.trainer(lora.steps, [Clock()], quiet=True, progress_bar=False)
    trainer.fit(module)
    steps = [e - s for s, e in zip(marks["start"], marks["end"])][warmup:]
    setup = marks["start"][0] - marks["fit_start"][0]  # the module's on_fit_start runs after the callback's
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": args.size, "variant": args.variant, "device": device, "precision": policy.describe(),
            "s_per_step": sum(steps) / len(steps), "setup_s": setup, "steps": len(steps), "peak_mb": peak,
            "vae_passes": module.views.encodes, "threads": torch.get_num_threads()}


def run_child(size: str, variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--size", size, "--variant", variant, "--steps", str(args.steps),
           "--batch", str(args.batch), "--resolution", str(args.resolution), "--image", args.image,
           "--device", args.device, "--dtype", args.dtype, "--mem-limit-gb", str(args.mem_limit_gb), "--threads", str(args.threads)]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.grad_ckpt:
        cmd.append("--grad-ckpt")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"size": size, "variant": variant, "error": tail[:120]}


def table(rows: list[dict], args) -> str:
    out = [f"LoRA stage, batch {args.batch} at {args.resolution}, image {args.image} (W x H), "
           f"{args.steps} timed step(s), gradient checkpointing {'on' if args.grad_ckpt else 'off'}", "",
           "| model | variant | device | precision | VAE passes | setup (s) | s/step | 80 steps (s) | peak memory (MB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        total = r["setup_s"] + 80 * r["s_per_step"]
        out.append(f"| {r['size']} | {r['variant']} | {r['device']} ({r['threads']} thr) | {r['precision']} | "
                   f"{r['vae_passes']} | {r['setup_s']:.2f} | {r['s_per_step']:.3f} | {total:.1f} | {r['peak_mb']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny", help="comma list of tiny, sd15 (default: tiny)")
    parser.add_argument("--variants", default="cached,naive", help="comma list of cached, naive")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (one more as warm-up when > 1)")
    parser.add_argument("--batch", type=int, default=4, help="views per step (published: 4)")
    parser.add_argument("--resolution", type=int, default=512, help="view size (published: 512)")
    parser.add_argument("--image", default="512x683", help="W x H of the synthetic input image (default 512x683)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="model.dtype of the frozen weights: auto | float32 | "
                                                        "float16 | bfloat16 (auto: half on a GPU with mixed precision)")
    parser.add_argument("--precision", default=None, help="32 | bf16-mixed | 16-mixed (default: 16-mixed on CUDA, else 32)")
    parser.add_argument("--mem-limit-gb", type=float, default=0, help="address-space cap of each run (CPU; 0 = none)")
    parser.add_argument("--grad-ckpt", action="store_true", help="lora.gradient_checkpointing=true (less memory)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import warnings
        warnings.filterwarnings("ignore")
        print(json.dumps(child(args)))
        return 0
    rows = []
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            rows.append(run_child(size.strip(), variant.strip(), args))
            print(f"done: {size} {variant}", file=sys.stderr)
    print(table(rows, args))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
