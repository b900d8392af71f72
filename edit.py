#!/usr/bin/env python
"""Drag-edit one sample (or a dataset) with DragDiffusion.

  python edit.py --config configs/edit.yaml model=tiny image=cat.png points='[[120,80],[160,80]]' prompt="a cat"
  python edit.py --config configs/edit.yaml sample=path/to/dragbench/animals/JH_2023-09-14-1838-08
  python edit.py --config configs/demo.yaml          # the built-in tiny model on the built-in demo sample

Inputs (one of): sample=DIR (DragBench layout or image.png + drag.json [+ mask.png]);
image=PATH points=JSON [mask=PATH] [prompt=TEXT]; data=DIR (a whole dataset: batch mode); nothing (demo).
Overrides are OmegaConf dotlist items (key=value); groups: model=sd15|tiny, logger=none|csv|tensorboard|wandb,
trainer=default|cpu|gpu. Main keys (defaults are the published ones):
  drag.width=512 drag.n_pix_step=80 drag.lr=0.01 drag.lam=0.1 drag.r_m=1 drag.r_p=3
  drag.inversion_strength=0.7 drag.num_inference_steps=50 drag.feature_blocks=[2] drag.guidance_scale=1.0
  lora.enabled=true lora.path=FILE lora.steps=80 reference.layers=[up_blocks.2,up_blocks.3]
  trainer.precision=32|bf16-mixed|16-mixed trainer.devices=N model.name_or_path=HUB_ID|DIR|FILE model.vae=...
  logger=wandb logger.mode=offline|online|disabled logger.project=NAME logger.run_name=NAME logger.tags=[a,b]
  logger.save_dir=logs logger.image_every=10 logger.image_source=input|estimate (README: Experiment tracking)
Writes to out=DIR: dragged_image.png, drag_input.png, drag_paths.png, trajectory.json, config.yaml.
data=DIR: every sample, split over trainer.devices x trainer.num_nodes processes (DDP, SLURM, torchrun);
writes <out>/<category>/<sample>/... and <out>/summary.json|csv; a rerun skips finished samples;
lora_dir=DIR reuses per-sample LoRAs (else trained into <out>/<sample>/lora/ when lora.enabled).
generate=true prompt=TEXT points=JSON [mask=PATH]: sample the image (generation.seed, .guidance_scale, .steps,
.width, .height) and drag it without inversion (also writes generated_image.png); with sample=DIR the points,
mask and prompt come from that folder (a replay folder saved by the browser app).
With data=DIR, evaluate=true then scores out=DIR as DragBench (MD / IF, configs/evaluate.yaml with the run's
trainer and logger; more keys: evaluate_overrides='[model=tiny,mean_distance.ensemble_size=2]').
Exit status: 0 done, 1 a sample failed, 2 bad config or input.
"""
from __future__ import annotations

import sys


def parse_args(argv=None):
    from dragdiffusion.config import cli_parser
    return cli_parser(__doc__, "configs/edit.yaml").parse_args(argv)


def load_input(cfg):
    from dragdiffusion.data import read_sample
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.sample import make_sample
    if cfg.generate:  # the image comes from the prompt; points and mask from points=/mask= or sample=DIR
        from dragdiffusion.generated import generation_inputs
        return generation_inputs(cfg)
    if cfg.sample:
        return read_sample(cfg.sample)
    if cfg.image is not None or cfg.points is not None:
        from dragdiffusion.errors import SampleError
        if cfg.image is None:
            raise SampleError("image", "points were given but no image=PATH")
        if cfg.points is None:
            raise SampleError("points", "expected points='[[x, y], ...]' (alternating handle, target)")
        from pathlib import Path
        return make_sample(cfg.image, cfg.points, cfg.mask, cfg.prompt or "", Path(cfg.image).stem)
    return demo_sample()


def main(argv=None) -> int:
    args = parse_args(argv)
    from dragdiffusion.config import load_config
    from dragdiffusion.errors import DragError
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data:
            from dragdiffusion.batch import run_batch
            status = run_batch(cfg)
            if cfg.evaluate:  # DragBench MD / IF of the batch's outputs (python -m dragdiffusion.evaluate --help)
                from dragdiffusion.evaluation import evaluate_after_batch
                status = max(status, evaluate_after_batch(cfg))
            return status
        sample = load_input(cfg)  # validated before any model loads
        from dragdiffusion.loggers import close_logger, make_logger
        logger = make_logger(cfg.logger, config=cfg, quiet=cfg.quiet)  # False for logger=none
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pathlib import Path
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.io import save_png
    editor = DragEditor(cfg)
    try:
        if cfg.generate:
            generated = editor.generate(sample.prompt)
            result = editor.edit_generated(generated, sample.points, sample.mask, logger=logger)
            save_png(Path(cfg.out) / "generated_image.png", generated.image)
        else:
            result = editor.edit(sample, logger=logger, out_dir=cfg.out)
    except DragError as exc:
        close_logger(logger, failed=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = result.save(cfg.out, cfg)
    close_logger(logger)
    t = result.trajectory
    print(f"{sample.name}: {t['iterations']} drag iterations, stopped early: {t['stopped_early']}, "
          f"final distance (px): {[round(d, 1) for d in t['final_distance_px']]}; wrote {out}/dragged_image.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
