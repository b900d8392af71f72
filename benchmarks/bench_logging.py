#!/usr/bin/env python
"""Seconds per drag iteration with and without experiment tracking (the TrajectoryLogger callback + a logger).

  python benchmarks/bench_logging.py                                  # tiny model, width 128, 40 iterations
  python benchmarks/bench_logging.py --width 256 --steps 80 --repeats 5 --modes none,wandb

Modes: ``none`` (no logger, no callback), ``csv`` (CSVLogger: metrics.csv + PNG files), ``tensorboard``,
``wandb`` (offline run under a temporary folder), ``wandb-estimate`` (W&B, trajectory images drawn on the
decoded x0 estimate: one more UNet and VAE call per image). Each edit is ``DragEditor.edit`` on the demo
sample with the tiny model, no early stop (drag.stop_distance=0). Columns (medians over ``--repeats`` runs,
modes interleaved so that machine load hits them alike):
- ``s/iter``: the drag stage's seconds / its iterations (images every ``--image-every`` steps and at the end
  included); on a shared machine this varies with the load more than with the mode;
- ``CPU s/iter``: the same in CPU seconds of this process (all its threads; W&B's own writer process is not
  counted), much less sensitive to other processes' load;
- ``tracking s/iter``: seconds spent inside the TrajectoryLogger hooks and the logger's ``log_metrics`` /
  ``log_image`` calls / iterations, timed inside the same run: the overhead itself, robust to load.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {"none": ["logger=none"], "csv": ["logger=csv"], "tensorboard": ["logger=tensorboard"],
         "wandb": ["logger=wandb"], "wandb-estimate": ["logger=wandb", "logger.image_source=estimate"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="drag iterations per edit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-every", type=int, default=10)
    p.add_argument("--modes", default="none,csv,wandb,wandb-estimate", help=f"comma-separated: {', '.join(MODES)}")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; expected some of {list(MODES)}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-logging-"))
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_CACHE_DIR=str(tmp / "cache"),
                      WANDB_DATA_DIR=str(tmp / "data"), WANDB_CONFIG_DIR=str(tmp / "config"), WANDB_SILENT="true")
    import torch
    from dragdiffusion.backbone import decode_latent
    from dragdiffusion.config import load_config
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.loggers import TrajectoryLogger, close_logger, make_logger

    clock = {"s": 0.0}

    def timed(fn):
        def wrapper(*a, **kw):
            tic = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock["s"] += time.perf_counter() - tic
        return wrapper

    class TimedTrajectoryLogger(TrajectoryLogger):
        on_train_batch_end = timed(TrajectoryLogger.on_train_batch_end)

        def on_train_end(self, trainer, pl_module):
            timed(super().on_train_end)(trainer, pl_module)
            clock["drag"] = clock["s"]  # the end-of-edit pair and table are not drag iterations

    base = ["model=tiny", "lora.enabled=false", "trainer=cpu", "quiet=true", f"drag.width={args.width}",
            f"drag.n_pix_step={args.steps}", "drag.stop_distance=0", "drag.num_inference_steps=10",
            f"logger.image_every={args.image_every}", f"logger.save_dir={tmp / 'logs'}"]
    editor = DragEditor.from_config(REPO / "configs" / "edit.yaml", base)
    sample = demo_sample()
    editor.edit(sample)  # warm-up: model load, first-call allocations
    per_iter: dict[str, list[float]] = {m: [] for m in modes}
    tracking: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            ed = DragEditor(load_config(REPO / "configs" / "edit.yaml", base + MODES[mode]), backbone=editor.backbone)
            logger = make_logger(ed.cfg.logger, config=ed.cfg, quiet=True)
            callbacks = []
            if logger:
                decode = (lambda z: decode_latent(ed.backbone, z)) if ed.cfg.logger.image_source == "estimate" else None
                callbacks = [TimedTrajectoryLogger(sample, args.image_every, decode)]
                for name in ("log_metrics", "log_image"):
                    if hasattr(logger, name):
                        setattr(logger, name, timed(getattr(logger, name)))
            clock.update(s=0.0, drag=0.0)
            drag = ed.drag

            def cpu_timed_drag(*a, drag=drag, **kw):
                c0 = time.process_time()
                module = drag(*a, **kw)
                clock["cpu"] = time.process_time() - c0
                return module

            ed.drag = cpu_timed_drag
            result = ed.edit(sample, callbacks=callbacks, logger=logger)
            n = max(1, len(result.trajectory["handles"]))
            cpu[mode].append(clock["cpu"] / n)
            tracking[mode].append(clock["drag"] / n)
            close_logger(logger)
            per_iter[mode].append(result.seconds["drag"] / n)

    shutil.rmtree(tmp, ignore_errors=True)
    ref, ref_cpu = statistics.median(per_iter[modes[0]]), statistics.median(cpu[modes[0]])
    print(f"drag iterations: width {args.width}, {args.steps} iterations, image every {args.image_every} steps, "
          f"median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| mode | s/iter | vs {modes[0]} | CPU s/iter | vs {modes[0]} | tracking s/iter | tracking share |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        s, c, t = (statistics.median(x[mode]) for x in (per_iter, cpu, tracking))
        print(f"| {mode} | {s:.4f} | {100 * (s / ref - 1):+.1f}% | {c:.4f} | {100 * (c / ref_cpu - 1):+.1f}% "
              f"| {t:.4f} | {100 * t / s:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
