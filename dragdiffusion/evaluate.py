"""Evaluate drag-editing results: Mean Distance (MD, m-MD), Image Fidelity (IF = 1 - LPIPS), Drag Accuracy Index (DAI).

  python -m dragdiffusion.evaluate results=outputs/dragbench data=DragBench
  python -m dragdiffusion.evaluate results=DIR data=DIR model=tiny mean_distance.ensemble_size=2 \\
      mean_distance.width=128 image_fidelity.enabled=false trainer=cpu        # offline smoke run
  python -m dragdiffusion.evaluate results=DIR data=DIR trainer.devices=4 trainer.strategy=ddp
  python -m dragdiffusion.evaluate results=DIR data=Drag100 mean_distance.enabled=false \\
      image_fidelity.enabled=false                                            # DAI only: no model at all

Works on any method's results laid out as the data: <results>/<category>/<sample>/dragged_image.png beside
<data>/<category>/<sample>/ (DragBench layout, ours, Drag100's <name>/ folders, or a mix), or one such folder per
method (edit.py data=DIR methods=[...]: <results>/<method>/...). The method comes from each result's
trajectory.json or config.yaml (no method key: dragdiffusion; no file: unknown), its settings from config.yaml,
its seconds and UNet passes per edit from trajectory.json; the dataset of a sample is its layout (DragBench,
Drag100, our folder format). Figures are reported per dataset and method. Samples are taken in sorted order and
each one's DIFT noise is seeded from its name, so the numbers do not depend on file order or on the number of
processes. Overrides are OmegaConf dotlist items (key=value); groups: model=sd15|sd21|sdxl|tiny|tiny_v|tiny_xl
(the DIFT model; default stabilityai/stable-diffusion-2-1), trainer=default|cpu|gpu,
logger=none|csv|tensorboard|wandb. Main keys (defaults are DragBench's):
  model.name_or_path=stabilityai/stable-diffusion-2-1 (DIFT model: hub id, folder or single file)
  mean_distance.t=261 mean_distance.up_block=1 mean_distance.ensemble_size=8 mean_distance.seed=0
  mean_distance.width=null (each image's own size) mean_distance.search=full|mask (m-MD)
  mean_distance.normalize=none|diagonal   mean_distance.masked=true (m-MD from the same features)
  mean_distance.enabled=true (false: no DIFT model, no MD)   image_fidelity.enabled=true image_fidelity.net=alex
  image_fidelity.size=224   dai.enabled=true dai.gammas=[1,5,10,20] dai.reference_compat=false (GoodDrag's script)
  result_name=dragged_image.png   resize_mismatched=false   out=DIR (default: results)
Writes to out: comparison/<dataset>.csv|.md|.tex (paper tables: one row per method, MD, m-MD, IF, DAI, seconds
and UNet passes per edit, each column's better direction, rounded), comparison/<dataset>_categories.* (per method
and category), comparison/report.html (self-contained: tables, MD against seconds, every sample's input and
results); raw figures: evaluation.json (summary per dataset and method, settings, categories, samples with every
pair's match), evaluation_samples.csv, evaluation_categories.csv, evaluation_methods.csv (per dataset and method),
evaluation_settings.csv; prints one summary line per dataset and method; logs the figures, the tables and the
samples side by side to the configured logger.
Needs: IF torchvision (pip install -e ".[eval]"), MD the DIFT model on disk or downloadable; both are checked before
anything runs (image_fidelity.enabled=false / mean_distance.enabled=false turn them off).
Exit status: 0 every sample evaluated, 1 some sample missing/mismatched/failed, 2 bad config, data or model.
"""
from __future__ import annotations

import sys

from .config import CONFIG_DIR, EvaluateConfig, cli_parser, load_config, to_yaml
from .errors import DragError

EVALUATE_YAML = CONFIG_DIR / "evaluate.yaml"


def parse_args(argv=None):
    return cli_parser(__doc__, str(EVALUATE_YAML), prog="python -m dragdiffusion.evaluate").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # --help answers here, before torch and the models are imported
    from .console import quiet_lightning
    from .evaluation import announce, evaluate
    try:
        cfg = load_config(args.config, args.overrides, schema=EvaluateConfig)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        quiet_lightning(bool(cfg.quiet))
        report = evaluate(cfg)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return announce(report, cfg)


if __name__ == "__main__":
    sys.exit(main())
