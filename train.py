#!/usr/bin/env python
"""Train the identity LoRA of one image, or one LoRA per sample of a dataset (DragDiffusion stage 1).

  python train.py --config configs/lora.yaml image=cat.png prompt="a photo of a cat" out=outputs/lora/cat
  python train.py --config configs/lora.yaml data=path/to/DragBench out=outputs/lora/dragbench

Writes <out>/pytorch_lora_weights.safetensors (diffusers LoRA format: a stock StableDiffusionPipeline loads it
with load_lora_weights) and <out>/config.yaml; with data=DIR, <out>/<sample path>/... per sample, skipping
samples that already have one (trainer.devices=N trainer.num_nodes=M split the samples over processes;
<out>/summary.json|csv list them). Use it in an edit with edit.py lora.path=<out> (a file, a folder, or the dataset
folder: each sample finds its own). Overrides are OmegaConf dotlist items (key=value); groups: model=sd15|tiny,
logger=none|csv|tensorboard|wandb, trainer=default|cpu|gpu. Main keys (defaults are the published ones):
  lora.rank=16 lora.alpha=16 lora.steps=80 lora.lr=0.0005 lora.batch_size=4 lora.resolution=512 lora.seed=0
  lora.save_every=0 (N: snapshots and resumable checkpoints) ckpt_path=<out>/checkpoints/step-N.ckpt (resume)
  lora.cache_latents=true trainer.precision=32|bf16-mixed|16-mixed trainer.devices=N model.name_or_path=...
Exit status: 0 done, 1 a sample failed, 2 bad config or input.
"""
from __future__ import annotations

import sys
from pathlib import Path


def parse_args(argv=None):
    from dragdiffusion.config import cli_parser
    return cli_parser(__doc__, "configs/lora.yaml").parse_args(argv)


def train_dataset(cfg) -> int:
    """One LoRA per sample of ``cfg.data``, split over trainer.devices x trainer.num_nodes processes by Lightning
    (``dragdiffusion.batch``): samples that have one are skipped, a failing sample is reported and the rest go
    on; <out>/summary.json and summary.csv list every sample."""
    from dragdiffusion.batch import run_lora_batch
    return run_lora_batch(cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dragdiffusion.config import LoraTrainConfig, load_config
    from dragdiffusion.errors import DragError, SampleError
    try:
        cfg = load_config(args.config, args.overrides, schema=LoraTrainConfig)
        if cfg.data:
            if cfg.image:
                raise SampleError("data", "give either data=DIR or image=PATH, not both")
            if cfg.ckpt_path:
                raise SampleError("ckpt_path", "resuming is for one image (image=PATH); with data=DIR finished "
                                               "samples are skipped")
            return train_dataset(cfg)
        if not cfg.image:
            raise SampleError("image", "expected image=PATH [prompt=TEXT] or data=DIR")
        from dragdiffusion.sample import DragSample, read_image
        sample = DragSample(read_image(cfg.image), [], [], None, cfg.prompt or "", Path(cfg.image).stem)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from dragdiffusion.lora import train_lora_for_sample
    try:
        file = train_lora_for_sample(cfg, sample, cfg.out)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{sample.name}: wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
