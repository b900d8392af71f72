#!/usr/bin/env python
"""Drag-edit one sample (or a dataset) with DragDiffusion, GoodDrag, DragNoise or FreeDrag (method=...).

  python edit.py model=tiny image=cat.png points='[[120,80],[160,80]]' prompt="a cat" out=outputs/cat
  python edit.py sample=path/to/dragbench/animals/JH_2023-09-14-1838-08 out=outputs/rabbit
  python edit.py --config configs/demo.yaml          # the built-in tiny model on the built-in demo sample

Inputs (one of): sample=DIR (DragBench layout, image.png + drag.json [+ mask.png], or Drag100's original.jpg +
points.json + mask.png); sample=demo (the built-in demo); image=PATH points=JSON [mask=PATH] [prompt=TEXT] (points as a list or its JSON text, [[x, y], ...],
alternating handle, target, in pixels of the image); data=DIR (a whole dataset: batch mode); generate=true.
Overrides are OmegaConf dotlist items (key=value); presets: model=sd15|sd21|sdxl|tiny|tiny_v|tiny_xl,
logger=none|csv|tensorboard|wandb, trainer=default|cpu|gpu, method=dragdiffusion|gooddrag|dragnoise|freedrag.
--print-config shows every key.
Main keys (defaults are the published ones):
  method=dragdiffusion|gooddrag|dragnoise|freedrag (a preset: its published LoRA, drag and schedule values;
  gooddrag.drag_end_step=7 gooddrag.track_per_step=10 gooddrag.max_drag_per_track=3 gooddrag.max_track_no_change=5
  gooddrag.beta=4 dragnoise.end_step=0 freedrag.max_step=300 freedrag.steps_per_move=5 freedrag.d_max=5 ...)
  drag.width=512 drag.n_pix_step=80 drag.lr=0.01 drag.lam=0.1 drag.r_m=1 drag.r_p=3
  drag.inversion_strength=0.7 drag.num_inference_steps=50 drag.feature_blocks=[2] drag.guidance_scale=1.0
  lora.enabled=true lora.path=FILE lora.steps=80 reference.layers=[up_blocks.2,up_blocks.3] reference.exact=false
  trainer.precision=32|16-mixed|bf16-mixed model.dtype=auto|float32|float16|bfloat16 trainer.devices=N
  model.name_or_path=HUB_ID|DIR|FILE model.vae=...  limits.max_image_pixels=50000000 limits.max_file_bytes=...
  logger=wandb logger.mode=offline|online|disabled logger.project=NAME logger.run_name=NAME logger.tags=[a,b]
  logger.save_dir=logs logger.image_every=10 logger.image_source=input|estimate (README: Experiment tracking)
  cache.lora=true cache.inversion=true cache.inversion_disk=false cache.dir=DIR cache.max_bytes=4294967296: the
  identity LoRA and the inversion are reused when nothing they depend on changed (README: Caching;
  python -m dragdiffusion.cache list|info|clear)
Writes to out=DIR (default outputs): dragged_image.png, drag_input.png, drag_paths.png, trajectory.json,
config.yaml (and lora/ when the LoRA is trained). A folder holding other files is refused unless overwrite=true.
data=DIR methods=[dragdiffusion,gooddrag,dragnoise,freedrag]: the batch once per method into <out>/<method>/
(each with its preset; evaluate=true then scores them all in one run).
data=DIR: every sample, split over trainer.devices x trainer.num_nodes processes (DDP, SLURM, torchrun);
writes <out>/<category>/<sample>/... and <out>/summary.json|csv; a rerun skips finished samples made with the
same settings (other settings: refused, or redone with overwrite=true); lora_dir=DIR reuses per-sample LoRAs.
generate=true prompt=TEXT points=JSON [mask=PATH]: sample the image (generation.seed, .guidance_scale, .steps,
.width, .height) and drag it without inversion (also writes generated_image.png); with sample=DIR the points,
mask and prompt come from that folder (a replay folder saved by the browser app).
With data=DIR, evaluate=true then scores out=DIR as DragBench (MD / IF, configs/evaluate.yaml with the run's
trainer and logger; more keys: evaluate_overrides='[model=tiny,mean_distance.ensemble_size=2]').
Exit status: 0 done, 1 a sample failed, 2 bad config or input (checked before any model loads), 3 a process
of a multi-device batch was lost (the summary lists what finished; run the same command again to resume;
trainer.timeout_s=300: how long the others wait for a process that finishes no sample),
130 / 143 stopped by Ctrl-C / SIGTERM (no partial files are left).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def parse_args(argv=None):
    from dragdiffusion.config import cli_parser
    return cli_parser(__doc__, "configs/edit.yaml").parse_args(argv)


def load_input(cfg):
    """The sample to edit, read and checked (files first) before any model loads."""
    from dragdiffusion.data import read_sample
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.errors import SampleError
    from dragdiffusion.generated import generation_inputs
    from dragdiffusion.sample import ReadLimits, make_sample
    limits = ReadLimits.from_config(cfg)
    if cfg.generate:  # the image comes from the prompt; points and mask from points=/mask= or sample=DIR
        return generation_inputs(cfg)
    if cfg.sample == "demo":
        return demo_sample()
    if cfg.sample:
        return read_sample(cfg.sample, limits=limits)
    if cfg.image is None:
        if cfg.points is not None or cfg.mask is not None:
            raise SampleError("image", "points or mask were given but no image=PATH")
        raise SampleError("input", "nothing to edit; give one of sample=DIR (a DragBench, our or Drag100 sample folder), "
                                   "image=PATH points='[[x, y], ...]' [mask=PATH], data=DIR (a dataset), "
                                   "generate=true prompt=TEXT points=..., or sample=demo (the built-in demo)")
    return make_sample(cfg.image, cfg.points, cfg.mask, cfg.prompt or "", Path(cfg.image).stem, limits)


def early_stop_rule(cfg, sample) -> str:
    """The early-stop rule in the input's pixels ("every handle within 2 grid cells = 16 px of its target ...")."""
    from dragdiffusion.console import stop_rule
    from dragdiffusion.sample import grid_size, working_size
    d = cfg.drag
    work_w, work_h = (sample.width, sample.height) if cfg.generate else \
        working_size(sample.width, sample.height, int(d.width))
    return stop_rule(float(d.stop_distance), (sample.height, sample.width),
                     grid_size(work_w, work_h, float(d.sup_res_factor)))


def edit_one(cfg, policy) -> int:
    """One sample: inputs, LoRA file and out checked first, then the model, the edit, the files."""
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.io import save_png
    from dragdiffusion.loggers import close_logger, make_logger
    from dragdiffusion.lora import check_lora_file
    from dragdiffusion.outputs import prepare_edit_folder
    from dragdiffusion.signals import deferred_signals
    sample = load_input(cfg)
    if cfg.lora.path and not cfg.generate:
        check_lora_file(cfg.lora.path, cfg.lora.rank, sample.name)  # the header, before the model loads
    note = prepare_edit_folder(cfg.out, bool(cfg.overwrite))
    if note:
        print(note)
    logger = make_logger(cfg.logger, config=cfg, quiet=cfg.quiet)  # False for logger=none
    failed = True
    try:
        editor = DragEditor(cfg, policy=policy)
        if cfg.generate:
            generated = editor.generate(sample.prompt)
            result = editor.edit_generated(generated, sample.points, sample.mask, logger=logger)
        else:
            result = editor.edit(sample, logger=logger, out_dir=cfg.out)
        with deferred_signals():  # the output folder is written whole
            if cfg.generate:
                save_png(Path(cfg.out) / "generated_image.png", generated.image)
            out = result.save(cfg.out, cfg)
        failed = False
    finally:
        close_logger(logger, failed)
    t = result.trajectory
    stop = f"stopped early at iteration {t['stop_step']}: {early_stop_rule(cfg, sample)}" if t["stopped_early"] \
        else "no early stop"
    print(f"{sample.name}: {t['iterations']} drag iterations ({stop}), final distance (px): "
          f"{[round(d, 1) for d in t['final_distance_px']]}; wrote {out}/dragged_image.png")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)  # --help answers here, before torch is imported
    from dragdiffusion.config import load_config, to_yaml
    from dragdiffusion.errors import DragError, Interrupted, exit_status
    from dragdiffusion.signals import stop_on_signals
    stop_on_signals()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        from dragdiffusion.policy import DevicePolicy
        policy = DevicePolicy.from_config(cfg)  # precision, dtype and device, before any model loads
        if not cfg.data:
            return edit_one(cfg, policy)
        from dragdiffusion.batch import run_batch
        if cfg.methods:  # one batch per method, <out>/<method>/, then one evaluation over all of them
            status = 0
            for method in cfg.methods:
                print(f"method {method}: data={cfg.data} -> {Path(cfg.out) / method}", flush=True)
                sub = load_config(args.config, list(args.overrides) + [f"method={method}",
                                                                       f"out={Path(cfg.out) / method}"])
                status = max(status, run_batch(sub))
        else:
            status = run_batch(cfg)
        if cfg.evaluate:  # DragBench MD / IF of the batch's outputs (python -m dragdiffusion.evaluate --help)
            from dragdiffusion.evaluation import evaluate_after_batch
            status = max(status, evaluate_after_batch(cfg))
        return status
    except Interrupted as stop:
        print(f"stopped by signal {stop.signum}; no partial output was written", file=sys.stderr)
        return stop.exit_status
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback (DRAGDIFFUSION_DEBUG=1 shows it)
        if os.environ.get("DRAGDIFFUSION_DEBUG"):
            raise
        first = (str(exc).splitlines() or [""])[0]
        print(f"error: {exc.__class__.__name__}: {first} (DRAGDIFFUSION_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
