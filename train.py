#!/usr/bin/env python
"""Train the identity LoRA of one image, or one LoRA per sample of a dataset (DragDiffusion stage 1).

  python train.py model=tiny image=cat.png prompt="a photo of a cat" out=outputs/lora/cat
  python train.py sample=Drag100/art_0 out=outputs/lora/art_0     # a sample folder (its image and prompt)
  python train.py --config configs/lora.yaml data=path/to/DragBench out=outputs/lora/dragbench
  python train.py --convert official/pytorch_lora_weights.safetensors loras/cat   # an official DragDiffusion LoRA

Writes <out>/pytorch_lora_weights.safetensors (diffusers LoRA format: a stock StableDiffusionPipeline loads it
with load_lora_weights) and <out>/config.yaml; with data=DIR, <out>/<sample path>/... per sample, skipping
samples that have one made with the same settings (other settings: refused, or retrained with overwrite=true;
trainer.devices=N trainer.num_nodes=M split the samples over processes; <out>/summary.json|csv list them).
Use it in an edit with edit.py lora.path=<out> (a file, a folder, or the dataset folder: each sample finds its
own). --convert IN OUT writes a LoRA of another key style (the official DragDiffusion code's doubled 'unet.'
prefix, attention-processor keys) in that format (also: python -m dragdiffusion.lora convert IN OUT).
Overrides are OmegaConf dotlist items (key=value); presets: model=sd15|sd21|sdxl|tiny|tiny_v|tiny_xl,
logger=none|csv|tensorboard|wandb, trainer=default|cpu|gpu, method=dragdiffusion|gooddrag|dragnoise|freedrag
(NAME+text: the same LoRA; fastdrag has none).
--print-config shows every key.
Main keys (defaults are the published ones):
  width=512 the working width: the LoRA's views (lora.resolution follows it; model=sd21|sdxl set 768|1024)
  method=dragdiffusion|gooddrag|dragnoise|freedrag (that method's LoRA settings: 80, 70, 200 or 200 steps)
  lora.rank=16 lora.alpha=16 lora.steps=80 lora.lr=0.0005 lora.batch_size=4 lora.seed=0
  lora.save_every=0 (N: snapshots and resumable checkpoints) ckpt_path=<out>/checkpoints/step-N.ckpt (resume)
  lora.cache_latents=true trainer.precision=32|16-mixed|bf16-mixed trainer.devices=N model.name_or_path=...
Exit status: 0 done, 1 a sample failed, 2 bad config or input (checked before any model loads), 3 a process
of a multi-device data=DIR run was lost (the summary lists what finished; the same command resumes),
130 / 143 stopped by Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import sys


def parse_args(argv=None):
    from dragdiffusion.config import cli_parser
    parser = cli_parser(__doc__, "configs/lora.yaml")
    parser.add_argument("--convert", nargs=2, metavar=("IN", "OUT"),
                        help="convert a LoRA file of another key style to this project's format, then exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # --help answers here, before torch is imported
    from dragdiffusion.config import LoraTrainConfig, load_config, to_yaml
    from dragdiffusion.errors import DragError, Interrupted, SampleError, exit_status
    from dragdiffusion.signals import stop_on_signals
    stop_on_signals()
    try:
        if args.convert:
            from dragdiffusion.lora import convert_lora_file
            print(f"wrote {convert_lora_file(*args.convert)}")
            return 0
        cfg = load_config(args.config, args.overrides, schema=LoraTrainConfig)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        # inputs, model path and out first, with PIL and omegaconf only: errors in seconds (dragdiffusion/inputs.py)
        from dragdiffusion.inputs import check_data, check_model, lora_input
        from dragdiffusion.outputs import check_writable
        if cfg.data:
            if cfg.image or cfg.sample:
                raise SampleError("data", "give either data=DIR or image=PATH / sample=DIR, not both")
            if cfg.ckpt_path:
                raise SampleError("ckpt_path", "resuming is for one image (image=PATH or sample=DIR); with data=DIR "
                                               "finished samples are skipped")
            check_data(cfg.data)
        else:
            sample = lora_input(cfg)
        check_model(cfg.model)
        check_writable(cfg.out)
        from dragdiffusion.policy import DevicePolicy
        DevicePolicy.from_config(cfg)  # precision, dtype and device, before any model loads
        if cfg.data:
            from dragdiffusion.batch import run_lora_batch
            return run_lora_batch(cfg)
        from dragdiffusion.lora import train_lora_for_sample
        file = train_lora_for_sample(cfg, sample, cfg.out)
    except Interrupted as stop:
        batch = "cfg" in locals() and bool(cfg.data)  # a batch said how many samples finished (batch.summarize)
        print(f"stopped by signal {stop.signum}; no partial LoRA file was written"
              + ("; run the same command again to resume" if batch else ""), file=sys.stderr)
        return stop.exit_status
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)
    print(f"{sample.name}: wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
