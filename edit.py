#!/usr/bin/env python
"""Drag-edit one sample (or a dataset) with DragDiffusion, GoodDrag, DragNoise, FreeDrag or FastDrag (method=...).

  python edit.py model=tiny image=cat.png points='[[120,80],[160,80]]' prompt="a cat" out=outputs/cat
  python edit.py sample=path/to/dragbench/animals/JH_2023-09-14-1838-08 out=outputs/rabbit
  python edit.py --config configs/demo.yaml          # the built-in tiny model on the built-in demo sample

Inputs (one of): sample=DIR (DragBench layout, image.png + drag.json [+ mask.png], or Drag100's original.jpg +
points.json + mask.png); sample=demo (the built-in demo); image=PATH points=JSON [mask=PATH] [prompt=TEXT] (points as a list or its JSON text, [[x, y], ...],
alternating handle, target, in pixels of the image); data=DIR (a whole dataset: batch mode); generate=true.
Overrides are OmegaConf dotlist items (key=value); presets: model=sd15|sd21|sdxl|tiny|tiny_v|tiny_xl,
logger=none|csv|tensorboard|wandb, trainer=default|cpu|gpu, method=dragdiffusion|gooddrag|dragnoise|freedrag|fastdrag
(NAME+text: with DragText). --print-config shows every key.
Main keys (defaults are the published ones):
  width=512 the working width of every stage (height follows the image's aspect): drag.width (inversion, drag,
  denoising) and lora.resolution (the identity LoRA's views) follow it, and lora.resolution follows drag.width;
  a per-stage key given explicitly differs (width=256 lora.resolution=512). model=sd21|sdxl set 768|1024
  method=dragdiffusion|gooddrag|dragnoise|freedrag|fastdrag (a preset: its published LoRA, drag and schedule values;
  gooddrag.drag_end_step=7 gooddrag.track_per_step=10 gooddrag.max_drag_per_track=3 gooddrag.max_track_no_change=5
  gooddrag.beta=4 dragnoise.end_step=0 freedrag.max_step=300 freedrag.steps_per_move=5 freedrag.d_max=5
  fastdrag.fill=interpolation|sequential fastdrag.kv_layers=[up_blocks] ...); method=gooddrag+text or
  text.optimize=true (DragText, every method but fastdrag) text.lr=0.004 text.lam=0.1 text.mask_term=false
  model.unet=HUB_ID|DIR (another UNet, e.g. FastDrag's LCM one: SimianLuo/LCM_Dreamshaper_v7)
  drag.n_pix_step=80 drag.lr=0.01 drag.lam=0.1 drag.r_m=1 drag.r_p=3
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
data=DIR methods=[dragdiffusion,gooddrag,gooddrag+text,fastdrag,...]: the batch once per method into
<out>/<method>/ (each with its preset; evaluate=true then scores them all in one run).
data=DIR: every sample, split over trainer.devices x trainer.num_nodes processes (DDP, SLURM, torchrun);
writes <out>/<category>/<sample>/... and <out>/summary.json|csv; a rerun skips finished samples made with the
same settings (other settings: refused, or redone with overwrite=true); lora_dir=DIR reuses per-sample LoRAs.
generate=true prompt=TEXT points=JSON [mask=PATH]: sample the image (generation.seed, .guidance_scale, .steps,
.width, .height) and drag it without inversion (also writes generated_image.png); with sample=DIR the points,
mask and prompt come from that folder (a replay folder saved by the browser app).
With data=DIR, evaluate=true then scores out=DIR (MD, m-MD, IF, DAI: configs/evaluate.yaml with the run's
trainer and logger; more keys: evaluate_overrides='[model=tiny,mean_distance.ensemble_size=2]'), writing
evaluation*.csv|json and the paper tables and report.html of <out>/comparison/; its keys, torchvision (IF) and the
DIFT model (MD) are checked before the first edit (README: Compare methods).
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
    """The sample to edit, read and checked (files first) before torch or any model is imported (inputs.py)."""
    from dragdiffusion.inputs import load_input as read_input
    return read_input(cfg)


def early_stop_rule(cfg, sample) -> str:
    """The early-stop rule in the input's pixels ("every handle within 2 grid cells = 16 px of its target ...")."""
    from dragdiffusion.console import stop_rule
    from dragdiffusion.sample import grid_size, working_size
    d = cfg.drag
    work_w, work_h = (sample.width, sample.height) if cfg.generate else \
        working_size(sample.width, sample.height, int(d.width))
    return stop_rule(float(d.stop_distance), (sample.height, sample.width),
                     grid_size(work_w, work_h, float(d.sup_res_factor)))


def check_single_edit(cfg):
    """A single edit's inputs, model path and ``out``, checked with PIL, numpy and omegaconf only: a bad input is an
    error within seconds, before torch, Lightning and diffusers are imported (dragdiffusion/inputs.py)."""
    from dragdiffusion.inputs import check_model, input_notes
    from dragdiffusion.outputs import prepare_edit_folder
    sample = load_input(cfg)
    for line in input_notes(cfg, sample):
        print(f"note: {line}", file=sys.stderr)
    check_model(cfg.model)
    note = prepare_edit_folder(cfg.out, bool(cfg.overwrite))
    if note:
        print(note, file=sys.stderr)
    return sample


def edit_one(cfg, sample) -> int:
    """One sample (checked by ``check_single_edit``): the device policy, the LoRA file, the model, the edit, the
    files."""
    from dragdiffusion.console import stop_description
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.io import save_png
    from dragdiffusion.loggers import close_logger, make_logger
    from dragdiffusion.lora import check_lora_file
    from dragdiffusion.policy import DevicePolicy
    from dragdiffusion.signals import deferred_signals
    policy = DevicePolicy.from_config(cfg)  # precision, dtype and device, before any model loads
    if cfg.lora.path and not cfg.generate:
        check_lora_file(cfg.lora.path, cfg.lora.rank, sample.name)  # the header, before the model loads
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
    why = stop_description(t.get("stop_reason"), early_stop_rule(cfg, sample))
    stop = f"stopped early at iteration {t['stop_step']}: {why}" if t["stopped_early"] else "no early stop"
    drag = "one latent warp (fastdrag)" if "fastdrag" in t else f"{t['iterations']} drag iterations ({stop})"
    of = t.get("final_distance_of", "tracked handles")
    distance = "final distance (px)" if of == "tracked handles" else f"final distance (px, {of})"
    print(f"{sample.name}: {drag}, {distance}: {[round(d, 1) for d in t['final_distance_px']]}; "
          f"wrote {out}/dragged_image.png")
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
        if not cfg.data:
            return edit_one(cfg, check_single_edit(cfg))
        from dragdiffusion.inputs import check_data, check_model
        check_data(cfg.data)  # before the heavy imports; the samples are checked before any model loads
        check_model(cfg.model)
        if cfg.evaluate:  # the evaluation's config, models and dependencies, before the first edit
            from dragdiffusion.evaluation import evaluation_before_batch
            evaluation_before_batch(cfg)
        from dragdiffusion.batch import run_batch
        from dragdiffusion.policy import DevicePolicy
        DevicePolicy.from_config(cfg)  # precision, dtype and device, before any model loads
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
        batch = "cfg" in locals() and bool(cfg.data)  # a batch said how many samples finished (batch.summarize)
        print(f"stopped by signal {stop.signum}; " + ("no sample's files are half written; run the same command "
                                                      "again to resume" if batch else "no partial output was written"),
              file=sys.stderr)
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
