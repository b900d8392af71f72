#!/usr/bin/env python
"""How far ``reference.exact=true`` moves an edit from the default mode: per-iteration handle agreement.

  python benchmarks/compare_exact.py                          # the two shared samples, tiny model, width 256
  python benchmarks/compare_exact.py --width 512 --lora-steps 10

Three runs per sample, same seed and settings: the default (fused SDPA attention everywhere, grid_sample patch
sampling), ``exact`` (the classic attention for inversion and drag when no LoRA is loaded, and the reference's
patch interpolation) and ``exact-attention`` (the classic attention only). Prints, for each pair of runs, the
first iteration where the handles differ, the largest handle difference (grid cells), the stop steps, and the
mean and largest difference of the edited images (of 255). CPU, fp32, random tiny weights: this measures the
numerical effect of each switch, not edit quality.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

SAMPLES = ["human_head/SY_2023-09-15-1742-27", "building_city_view/YAN_2023-09-15-2236-24"]


def run(editor, sample, patch_as_reference: bool | None = None):
    import dragdiffusion.editor as editor_module
    original = editor_module.DragEditModule
    if patch_as_reference is not None:
        class Forced(original):
            def __init__(self, *a, **k):
                k["patch_as_reference"] = patch_as_reference
                super().__init__(*a, **k)
        editor_module.DragEditModule = Forced
    try:
        return editor.edit(sample)
    finally:
        editor_module.DragEditModule = original


def compare(name: str, a, b) -> str:
    ha, hb = a.trajectory["handles"], b.trajectory["handles"]
    n = min(len(ha), len(hb))
    diff = [float(np.abs(np.array(ha[i]) - np.array(hb[i])).max()) for i in range(n)]
    first = next((i for i, d in enumerate(diff) if d > 0), None)
    img = np.abs(a.image.astype(int) - b.image.astype(int))
    return (f"| {name} | {first if first is not None else 'never'} | {max(diff) if diff else 0:.1f} | "
            f"{a.trajectory['stop_step']} / {b.trajectory['stop_step']} | {img.mean():.2f} | {img.max()} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dragbench-sample"))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--lora-steps", type=int, default=0, help="0: no LoRA (where exact mode changes the attention)")
    args = p.parse_args(argv)
    from dragdiffusion.config import load_config
    from dragdiffusion.data import read_sample
    from dragdiffusion.editor import DragEditor
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = ["model=tiny", "trainer=cpu", "quiet=true", f"drag.width={args.width}", f"drag.n_pix_step={args.iters}",
            f"lora.enabled={'true' if args.lora_steps else 'false'}", f"lora.steps={args.lora_steps}",
            "lora.resolution=256"]
    default = DragEditor(load_config(None, base))
    exact = DragEditor(load_config(None, base + ["reference.exact=true"]), backbone=default.backbone)
    print(f"tiny model, width {args.width}, {args.iters} iterations, LoRA steps {args.lora_steps}\n")
    print("| sample: runs | handles differ from iteration | max handle diff (input px) | stop step a / b | "
          "image mean diff | image max diff |")
    print("|---|---|---|---|---|---|")
    for rel in SAMPLES:
        sample = read_sample(Path(args.data) / rel)
        d = run(default, sample)
        e = run(exact, sample)
        ea = run(exact, sample, patch_as_reference=False)
        short = rel.split("/")[0]
        print(compare(f"{short}: default vs exact", d, e))
        print(compare(f"{short}: default vs exact-attention", d, ea))
        print(compare(f"{short}: exact-attention vs exact", ea, e), flush=True)


if __name__ == "__main__":
    main()
