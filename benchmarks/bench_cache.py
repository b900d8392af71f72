#!/usr/bin/env python
"""What the edit cache saves: a second drag of the same image, and a methods=[...] batch (README: Caching).

  python benchmarks/bench_cache.py --part drag                      # tiny, CPU: first vs second drag, 256 px
  python benchmarks/bench_cache.py --part batch                     # 3 methods over the 10 DragBench samples
  python benchmarks/bench_cache.py --part drag --models sd15 --devices cuda --precision 16-mixed --width 512 \\
      --lora-resolution 512                                         # the same on a GPU, SD 1.5 size, 512 px

``--part drag``: in one process, one DragBench sample (``--sample``) edited twice with the published schedule
(LoRA ``--lora-steps`` 80 + ``--iters`` 80 drag iterations, ``drag.stop_distance=0`` so that every iteration
runs both times) at ``--width`` px with the LoRA at ``--lora-resolution``: the first edit trains the LoRA and
inverts (a miss), the second reuses both (only the drag and the denoising remain). A warm-up edit of another
image (a short schedule) comes first, so neither timed edit pays the process's one-time costs. The two results
must be bit-identical (checked). Models: ``tiny`` or ``sd15`` (random weights, SD 1.5 size).

``--part batch``: ``edit.py data=DIR methods=[dragdiffusion,dragnoise,freedrag]`` twice in this process, first with
the cache off (``cache.lora=false cache.inversion=false``: every method trains its own LoRA), then on (a new empty
folder); each method's LoRA at its preset's steps and lr. Prints LoRAs trained / reused per method (from
summary.json) and the total time of each run. ``--batch-overrides`` adds key=value items (a smaller working width
or LoRA resolution on a slow machine: say which in a report).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dragbench-sample"
DEFAULT_SAMPLE = "animals/JH_2023-09-14-1838-08"


def build_editor(args, overrides: list[str], cache_dir: str):
    """A DragEditor on ``--models`` (tiny from its preset; sd15: a full-size random-weight pipeline, which gets a
    folder of its own as its identity in the cache keys)."""
    from dragdiffusion.backbone import Backbone
    from dragdiffusion.config import load_config
    from dragdiffusion.editor import DragEditor
    from dragdiffusion.policy import DevicePolicy
    overrides = ["model=tiny", f"trainer.precision={args.precision}", f"model.device={args.devices}", *overrides]
    if args.models == "tiny":
        return DragEditor(load_config(REPO / "configs" / "edit.yaml", overrides))
    from dragdiffusion.tiny import build_sd15_random_pipeline
    identity = Path(cache_dir) / "sd15-random"
    identity.mkdir(parents=True, exist_ok=True)
    (identity / "model_index.json").write_text("{}")
    cfg = load_config(REPO / "configs" / "edit.yaml", overrides + [f"model.name_or_path={identity}"])
    policy = DevicePolicy.from_config(cfg)
    return DragEditor(cfg, Backbone.from_pipeline(build_sd15_random_pipeline(), policy, "sd15"), policy)


def stages(seconds: dict) -> str:
    return " / ".join(str(seconds[k]) for k in ("lora", "inversion", "drag", "denoise"))


def timed_edit(editor, sample) -> tuple[float, object]:
    if editor.device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    result = editor.edit(sample)
    if editor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, result


def second_drag(args) -> dict:
    from omegaconf import OmegaConf
    from dragdiffusion.data import read_sample
    from dragdiffusion.editor import DragEditor
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        editor = build_editor(args, [f"drag.width={args.width}", f"lora.resolution={args.lora_resolution}",
                                     f"lora.steps={args.lora_steps}", f"drag.n_pix_step={args.iters}",
                                     "drag.stop_distance=0", "lora.enabled=true", "quiet=true",
                                     "trainer.enable_progress_bar=false", f"cache.dir={cache_dir}"], cache_dir)
        base = editor
        warm = DragEditor(OmegaConf.merge(editor.cfg, {"lora": {"steps": 2}, "drag": {"n_pix_step": 2}}),
                          backbone=editor.backbone, policy=editor.policy)
        warm.edit(read_sample(DATA / "art_work" / "PJC_2023-09-15-1516-15"))  # one-time costs, another image
        sample = read_sample(DATA / args.sample)
        first_s, first = timed_edit(editor, sample)
        second_s, second = timed_edit(editor, sample)
    same = bool(np.array_equal(first.image, second.image) and torch.equal(first.z_edited, second.z_edited))
    row = {"model": args.models, "device": str(base.device), "precision": args.precision, "width": args.width,
           "lora_resolution": args.lora_resolution, "lora_steps": args.lora_steps, "iters": args.iters,
           "first_s": round(first_s, 2), "second_s": round(second_s, 2), "speedup": round(first_s / second_s, 2),
           "first_stages": {k: round(v, 2) for k, v in first.seconds.items()},
           "second_stages": {k: round(v, 2) for k, v in second.seconds.items()},
           "second_sources": second.trajectory["sources"], "bit_identical": same,
           "iterations": [first.trajectory["iterations"], second.trajectory["iterations"]]}
    print(json.dumps(row, indent=1))
    print(f"\n| model | device | working px | LoRA px | first edit s (LoRA / inversion / drag / denoise) | "
          f"second edit s (same) | speed-up |\n|---|---|---|---|---|---|---|\n"
          f"| {args.models} | {base.device} {args.precision} | {args.width} | {args.lora_resolution} | "
          f"{first_s:.1f} ({stages(row['first_stages'])}) | {second_s:.1f} ({stages(row['second_stages'])}) | "
          f"{row['speedup']}x |")
    if not same:
        print("the second edit differs from the first: the cache broke bit-identity", file=sys.stderr)
    return row


def batch(args) -> dict:
    import edit as edit_cli
    torch.set_num_threads(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-batch-") as tmp:
        for mode, cache in (("off", ["cache.lora=false", "cache.inversion=false"]),
                            ("on", [f"cache.dir={Path(tmp) / 'cache'}"])):
            out = Path(tmp) / mode
            argv = ["--config", str(REPO / "configs" / "edit.yaml"), "model=tiny", "trainer=cpu", "quiet=true",
                    "trainer.enable_progress_bar=false", f"data={args.data}", f"out={out}",
                    f"methods=[{','.join(args.methods)}]", *cache, *args.batch_overrides]
            tic = time.perf_counter()
            status = edit_cli.main(argv)
            seconds = time.perf_counter() - tic
            per_method = {m: json.loads((out / m / "summary.json").read_text()) for m in args.methods}
            runs[mode] = {"status": status, "seconds": round(seconds, 1),
                          "lora": {m: s["lora"] for m, s in per_method.items()},
                          "ok": sum(s["counts"]["ok"] for s in per_method.values()),
                          "method_seconds": {m: s["seconds"] for m, s in per_method.items()}}
    print(json.dumps(runs, indent=1))
    print("\n| cache | LoRAs trained | LoRAs reused (per method: trained/reused) | samples ok | total s |\n"
          "|---|---|---|---|---|")
    for mode, r in runs.items():
        trained = sum(v["trained"] for v in r["lora"].values())
        reused = sum(v["reused"] for v in r["lora"].values())
        by_method = ", ".join(f"{m} {v['trained']}/{v['reused']}" for m, v in r["lora"].items())
        print(f"| {mode} | {trained} | {reused} ({by_method}) | {r['ok']} | {r['seconds']} |")
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["drag", "batch"], default="drag")
    p.add_argument("--models", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--devices", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", default="32")
    p.add_argument("--width", type=int, default=256, help="the drag's working width (published: 512)")
    p.add_argument("--lora-resolution", type=int, default=256, help="the LoRA's view size (published: 512)")
    p.add_argument("--lora-steps", type=int, default=80)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared CPU)")
    p.add_argument("--sample", default=DEFAULT_SAMPLE, help="a DragBench sample under the shared data")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--methods", nargs="+", default=["dragdiffusion", "dragnoise", "freedrag"])
    p.add_argument("--batch-overrides", nargs="*", default=[], help="key=value items for both batch runs")
    args = p.parse_args(argv)
    result = second_drag(args) if args.part == "drag" else batch(args)
    if args.part == "drag":
        return 0 if result["bit_identical"] else 1
    return max(r["status"] for r in result.values())


if __name__ == "__main__":
    sys.exit(main())
