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
Writes to out=DIR: dragged_image.png, drag_input.png, drag_paths.png, trajectory.json, config.yaml.
Exit status: 0 done, 1 a sample failed, 2 bad config or input.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog="\n".join(__doc__.split("\n")[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/edit.yaml", help="YAML config (default: configs/edit.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (OmegaConf dotlist)")
    return parser.parse_args(argv)


def load_input(cfg):
    from dragdiffusion.data import read_sample
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.sample import make_sample
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
            return run_batch(cfg)
        sample = load_input(cfg)  # validated before any model loads
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from dragdiffusion.editor import DragEditor
    editor = DragEditor(cfg)
    try:
        result = editor.edit(sample, out_dir=cfg.out)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = result.save(cfg.out, cfg)
    t = result.trajectory
    print(f"{sample.name}: {t['iterations']} drag iterations, stopped early: {t['stopped_early']}, "
          f"final distance (px): {[round(d, 1) for d in t['final_distance_px']]}; wrote {out}/dragged_image.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
