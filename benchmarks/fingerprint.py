#!/usr/bin/env python
"""Fingerprints of the pipeline's outputs on the tiny model (CPU, fp32): a refactor must not change them.

  python benchmarks/fingerprint.py > before.json      # on the old code
  python benchmarks/fingerprint.py > after.json       # on the new code
  python benchmarks/fingerprint.py --compare before.json

Three runs, each hashed (sha256 of the raw bytes) and summarised: an edit of the demo sample with a trained
identity LoRA (image, edited latent, handle path, losses), a generated-image edit, and the LoRA weights alone;
then one short edit per other method (gooddrag, dragnoise, freedrag; no LoRA). ``--compare`` checks the keys of the
older file only, so a file from before a method existed still compares.
``--mask-free`` drops the demo's mask (for comparing across a change of the mask's resizing).
``--cache``: the LoRA and inversion cache ``miss`` (the default: on, in a new empty folder, so a warm user cache
never fools the comparison), ``off`` (cache.lora=false cache.inversion=false) or ``hit`` (the same edits run
twice in one process on one cache folder; the second run's outputs, every LoRA and inversion reused, are printed).
All three must print the same fingerprints.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

COMMON = ["model=tiny", "trainer=cpu", "quiet=true", "lora.steps=3", "lora.resolution=64"]
SETTINGS = COMMON + ["drag.width=128", "drag.n_pix_step=6", "generation.width=128", "generation.height=96",
                     "generation.steps=10"]
METHOD_SETTINGS = {"gooddrag": ["gooddrag.track_per_step=2", "gooddrag.drag_end_step=3"],
                   "dragnoise": ["drag.n_pix_step=6"], "freedrag": ["freedrag.max_step=6"]}


def digest(x) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


def edit_record(result) -> dict:
    t = result.trajectory
    return {"image": digest(result.image), "z_edited": digest(result.z_edited), "handles": digest(t["handles"]),
            "loss": digest(t["loss"]), "iterations": t["iterations"], "first_loss": t["loss"][:1]}


def fingerprints(mask_free: bool = False, cache: list[str] = (), sources: list | None = None) -> dict:
    """The fingerprints; ``sources`` (a list) gets each real-image edit's trajectory ``sources`` (cache use)."""
    from dragdiffusion.config import LoraTrainConfig, load_config
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.lora import train_lora_for_sample
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    sources = [] if sources is None else sources
    sample = demo_sample(160, 120)
    if mask_free:
        sample.mask = None
    editor = DragEditor.from_config(None, SETTINGS + list(cache) + ["lora.enabled=true"])
    result = editor.edit(sample)
    sources.append(result.trajectory["sources"])
    out = {"edit_with_lora": edit_record(result)}
    generated = editor.generate("a red ball")
    out["generated_image"] = digest(generated.image)
    result = editor.edit_generated(generated, [[40, 50], [70, 50]], None if mask_free else np.ones((96, 128)))
    out["generated_edit"] = edit_record(result)
    cfg = load_config(None, COMMON, schema=LoraTrainConfig)
    with tempfile.TemporaryDirectory() as tmp:
        file = train_lora_for_sample(cfg, sample, tmp, editor.backbone)
        weights = load_file(str(file))
        out["lora"] = {k: digest(weights[k]) for k in sorted(weights)[:4]}
        out["lora_all"] = digest([digest(weights[k]) for k in sorted(weights)])
    for method, keys in METHOD_SETTINGS.items():  # the other methods (no LoRA: their own code paths only)
        cfg = load_config(None, SETTINGS + list(cache) + [f"method={method}", "lora.enabled=false", *keys])
        result = DragEditor(cfg, backbone=editor.backbone).edit(sample)
        sources.append(result.trajectory["sources"])
        out[f"edit_{method}"] = edit_record(result)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", help="a JSON file written by an earlier run: exit 1 if anything differs")
    p.add_argument("--mask-free", action="store_true", help="edit the demo sample without its mask")
    p.add_argument("--cache", choices=["miss", "off", "hit"], default="miss",
                   help="the edit cache: on and empty (miss), off, or warm (hit: every edit run twice)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fingerprint-cache-") as folder:
        cache = ["cache.lora=false", "cache.inversion=false"] if args.cache == "off" else [f"cache.dir={folder}"]
        sources: list = []
        now = fingerprints(args.mask_free, cache, sources)
        if args.cache == "hit":
            sources.clear()
            now = fingerprints(args.mask_free, cache, sources)
    print(f"cache {args.cache}: " + "; ".join(f"lora {s['lora']}, inversion {s['inversion']}" for s in sources),
          file=sys.stderr)
    expected = {"hit": "reused", "off": "computed"}.get(args.cache)  # miss: FreeDrag reuses DragNoise's inversion
    if expected and any(s["inversion"] != expected for s in sources):
        print(f"the cache did not behave as --cache {args.cache} asks", file=sys.stderr)
        return 1
    print(json.dumps(now, indent=1))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diffs = [k for k in before if before[k] != now.get(k)]
        print("identical" if not diffs else f"DIFFERENT: {diffs}", file=sys.stderr)
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
