#!/usr/bin/env python
"""Run every entry point once against the real model loader, on a GPU (or, small, on the CPU in the tests).

  python benchmarks/gpu_check.py                      # a CUDA GPU: a full-size SD 1.5-config model, ~3 minutes
  python benchmarks/gpu_check.py --device cpu --quick # the tiny model at small sizes (what the test suite runs)

A model with random weights (full-size SD 1.5 configuration on a GPU, the tiny one with --quick) is written to a
temporary diffusers folder and loaded from there with ``model.name_or_path=DIR``, as a user's checkpoint would be.
Then, each in this process: ``edit.py`` with the identity LoRA on; ``edit.py generate=true``; ``train.py``;
``edit.py data=`` over 3 samples and the same command again (everything skipped: the resume);
``python -m dragdiffusion.evaluate`` (tiny DIFT); the app's edit function (``app_jobs``, no browser).
One line per entry point: PASS or FAIL, seconds, peak GPU memory. Exit status 0 when all pass.

Samples: 3 of ../shared/data/dragbench-sample when it is there, else 3 demo samples drawn here. On a CUDA machine
without diffusers / omegaconf, ../shared/tools/gpu-wheels.sh fetches the wheels and says how to install them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import torch

SHARED = REPO.parent / "shared" / "data" / "dragbench-sample"
SHARED_SAMPLES = ["human_head/SY_2023-09-15-1742-27", "building_city_view/YAN_2023-09-15-2236-24",
                  "animals/JH_2023-09-14-1838-08"]
# (edit settings, generation settings) per mode: the published schedule with short LoRA / drag on a GPU
SIZES = {
    "full": ["drag.width=512", "lora.steps=20", "lora.resolution=512", "drag.n_pix_step=20",
             "generation.width=512", "generation.height=512"],
    "quick": ["drag.width=64", "lora.steps=1", "lora.resolution=64", "lora.batch_size=1", "drag.n_pix_step=2",
              "drag.num_inference_steps=4", "generation.width=64", "generation.height=64", "generation.steps=4"],
}


def write_model(folder: Path, size: str) -> Path:
    from dragdiffusion.tiny import build_sd15_random_pipeline, build_tiny_pipeline
    pipe = build_sd15_random_pipeline() if size == "sd15" else build_tiny_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_samples(folder: Path) -> Path:
    """3 samples: links to the shared DragBench ones, or demo samples in our folder format."""
    from dragdiffusion.data.convert import write_folder_sample
    from dragdiffusion.demo import demo_sample
    for i, rel in enumerate(SHARED_SAMPLES):
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (SHARED / rel).is_dir():
            target.symlink_to(SHARED / rel, target_is_directory=True)
        else:
            write_folder_sample(demo_sample(512, 384 + 32 * i, seed=i), target)
    return folder


class Peak:
    """Peak CUDA memory allocated inside the block (GiB), or None on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.gib: float | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.gib = torch.cuda.max_memory_allocated() / 2 ** 30


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def entry_points(model: Path, data: Path, work: Path, common: list[str], quick: bool):
    """(name, function) pairs; each function raises on failure."""
    import edit
    import train
    from dragdiffusion import evaluate
    from dragdiffusion.app_jobs import edit_job, page_config, run_to_end, save_outputs
    from dragdiffusion.data import read_sample
    model_keys = [f"model.name_or_path={model}", "model.local_files_only=true"]
    args = model_keys + common
    first = data / SHARED_SAMPLES[0]

    def edit_with_lora():
        check(edit.main([*args, "lora.enabled=true", f"sample={first}", f"out={work / 'edit'}"]) == 0, "exit status")
        check((work / "edit" / "dragged_image.png").is_file() and (work / "edit" / "lora").is_dir(), "outputs")

    def edit_generated():
        size = 64 if quick else 512
        check(edit.main([*args, "generate=true", "prompt=a photo of a house",
                         f"points=[[{size // 4},{size // 2}],[{size // 2},{size // 2}]]",
                         f"out={work / 'generated'}"]) == 0, "exit status")
        check((work / "generated" / "generated_image.png").is_file(), "generated_image.png")

    def train_lora():
        image = next(p for p in (first / "original_image.png", first / "image.png") if p.is_file())
        lora_args = [a for a in args if a.split("=")[0].split(".")[0] in ("model", "lora", "trainer", "quiet")]
        check(train.main([*lora_args, f"image={image}", "prompt=a photo", f"out={work / 'lora'}"]) == 0, "exit status")
        check((work / "lora" / "pytorch_lora_weights.safetensors").is_file(), "LoRA file")

    def batch(expect: str):
        def run():
            check(edit.main([*args, "lora.enabled=true", f"data={data}", f"out={work / 'batch'}"]) == 0, "exit status")
            counts = json.loads((work / "batch" / "summary.json").read_text())["counts"]
            check(counts[expect] == 3, f"summary counts {counts}, expected 3 {expect}")
        return run

    def evaluation():
        rc = evaluate.main(["model=tiny", "trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu",
                            f"data={data}", f"results={work / 'batch'}", "image_fidelity.enabled=false",
                            "mean_distance.ensemble_size=2", "mean_distance.width=64", "quiet=true"])
        check(rc == 0, "exit status")
        check(json.loads((work / "batch" / "evaluation.json").read_text())["summary"]["n_pairs"] >= 3, "pairs")

    def app_edit():
        sample = read_sample(first)
        cfg = page_config(None, args + ["lora.enabled=true"], None, {"quiet": True})
        reports = []
        result = run_to_end(edit_job(cfg, sample.image, sample.points, sample.mask, sample.prompt),
                            on_progress=reports.append)
        png, archive = save_outputs(result, cfg)
        check(png.is_file() and archive.is_file() and result.image.shape == sample.image.shape, "outputs")
        check(any(r[0] == "drag" for r in reports), "progress reports")

    return [("edit.py (identity LoRA on)", edit_with_lora), ("edit.py generate=true", edit_generated),
            ("train.py", train_lora), ("edit.py data= (3 samples)", batch("ok")),
            ("edit.py data= again (resume)", batch("skipped")), ("python -m dragdiffusion.evaluate (tiny DIFT)", evaluation),
            ("app edit function (no browser)", app_edit)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--quick", action="store_true", help="the tiny model at small sizes (the CPU test)")
    p.add_argument("--precision", default=None, help="trainer.precision (default: 16-mixed on a GPU, 32 on the CPU)")
    p.add_argument("--dtype", default="auto", help="model.dtype (auto: half weights under mixed precision on a GPU)")
    p.add_argument("--work", default=None, help="keep the outputs here (default: a temporary folder)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    quick = args.quick or not cuda
    precision = args.precision or ("16-mixed" if cuda else "32")
    common = [f"trainer={'gpu' if cuda else 'cpu'}", f"trainer.precision={precision}", f"model.dtype={args.dtype}",
              "quiet=true", *SIZES["quick" if quick else "full"]]
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
    work = Path(args.work or tmp.name)
    tic = time.perf_counter()
    model = write_model(work / "model", "tiny" if quick else "sd15")
    data = write_samples(work / "data")
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; model "
          f"{'tiny' if quick else 'SD 1.5-size random'} written to {model} in {time.perf_counter() - tic:.1f} s; "
          f"{' '.join(common)}", flush=True)
    failures = 0
    for name, run in entry_points(model, data, work, common, quick):
        log = io.StringIO()
        tic = time.perf_counter()
        with Peak(args.device) as peak:
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    run()
                status, detail = "PASS", ""
            except BaseException as exc:  # noqa: BLE001 - a failing entry point is reported, the others run
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures += 1
                status = "FAIL"
                detail = f"  {exc.__class__.__name__}: {exc}\n" + "".join(
                    f"    | {line}\n" for line in (log.getvalue() + traceback.format_exc()).splitlines()[-25:])
        memory = f"peak {peak.gib:.2f} GiB" if peak.gib is not None else "peak n/a (CPU)"
        print(f"{status}  {name:<46} {time.perf_counter() - tic:7.1f} s   {memory}\n{detail}", end="", flush=True)
    print(f"{'all entry points pass' if not failures else f'{failures} entry point(s) failed'}")
    tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
