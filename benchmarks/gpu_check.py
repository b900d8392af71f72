#!/usr/bin/env python
"""Run every entry point once against the real model loader, on a GPU (or, small, on the CPU in the tests).

  python benchmarks/gpu_check.py                      # a CUDA GPU: full-size SD 1.5- and SDXL-config models
  python benchmarks/gpu_check.py --models sdxl        # a CUDA GPU: the full-size SDXL-config model only (1024 px)
  python benchmarks/gpu_check.py --device cpu --quick # the tiny models at small sizes (what the test suite runs)

For each of ``--models`` (sd15, sdxl), a model with random weights (full-size SD 1.5 / SDXL base configuration on a
GPU, the tiny one / tiny-xl with --quick) is written to a temporary diffusers folder and loaded from there with
``model.name_or_path=DIR`` (SDXL with its preset: ``model=sdxl``), as a user's checkpoint would be.
Then, each in this process: ``edit.py`` with the identity LoRA on; ``edit.py generate=true``; ``train.py``;
``edit.py data=`` over 3 samples and the same command again (everything skipped: the resume);
``python -m dragdiffusion.evaluate`` (tiny DIFT); the app's edit function (``app_jobs``, no browser). Each other
method of ``--methods`` (default: gooddrag, dragnoise, freedrag, fastdrag and gooddrag+text: DragText) then runs an
edit (with its LoRA; FastDrag has none), a batch and the app's edit function (SDXL: the edit alone; SDXL's evaluation
computes DIFT on the SDXL model itself).
One line per entry point: PASS or FAIL, seconds, peak GPU memory. Exit status 0 when all pass.

Samples: 3 DragBench samples from a dragbench-sample folder beside the repository when it is there (the test
machines'), else 3 demo samples drawn here.
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

import torch

SHARED = REPO.parent / "shared" / "data" / "dragbench-sample"
SHARED_SAMPLES = ["human_head/SY_2023-09-15-1742-27", "building_city_view/YAN_2023-09-15-2236-24",
                  "animals/JH_2023-09-14-1838-08"]
# (edit settings, generation settings) per mode: the published schedule with short LoRA / drag on a GPU
SIZES = {
    "full": ["drag.width=512", "lora.steps=20", "lora.resolution=512", "drag.n_pix_step=20",
             "generation.width=512", "generation.height=512"],
    "quick": ["drag.width=64", "lora.steps=1", "lora.resolution=64", "lora.batch_size=1", "drag.n_pix_step=2",
              "drag.num_inference_steps=4", "generation.width=64", "generation.height=64", "generation.steps=4",
              "gooddrag.track_per_step=1", "freedrag.max_step=4"],
}
# SDXL on a GPU: at its own size (the preset's 1024 px), a shorter LoRA and drag
SIZES["full-sdxl"] = ["drag.width=1024", "lora.steps=10", "lora.resolution=1024", "drag.n_pix_step=10",
                      "generation.width=1024", "generation.height=1024", "gooddrag.track_per_step=2",
                      "freedrag.max_step=20"]
MODELS = ("sd15", "sdxl")


def write_model(folder: Path, size: str, kind: str = "sd15") -> Path:
    """A random-weight model of ``kind`` (sd15, sdxl), ``size`` full or tiny, in the diffusers format."""
    import dragdiffusion.tiny as tiny
    builders = {("sd15", "full"): tiny.build_sd15_random_pipeline, ("sd15", "tiny"): tiny.build_tiny_pipeline,
                ("sdxl", "full"): tiny.build_sdxl_random_pipeline, ("sdxl", "tiny"): tiny.build_tiny_sdxl_pipeline}
    pipe = builders[kind, "tiny" if size == "tiny" else "full"]()
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


def entry_points(model: Path, data: Path, work: Path, common: list[str], quick: bool, methods=(), kind: str = "sd15"):
    """(name, function) pairs; each function raises on failure. ``kind`` sdxl: the model with the SDXL preset
    (``model=sdxl``: its feature block and control layers), DIFT on it, the other methods' edit only."""
    import edit
    import train
    from dragdiffusion import evaluate
    from dragdiffusion.app_jobs import edit_job, page_config, run_to_end, save_outputs
    from dragdiffusion.config import MethodName, split_method_name
    from dragdiffusion.data import read_sample
    model_keys = (["model=sdxl"] if kind == "sdxl" else []) + [f"model.name_or_path={model}",
                                                               "model.local_files_only=true"]
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
        dift = ["model=tiny"] if kind == "sd15" else model_keys  # SDXL: DIFT on the SDXL model itself
        rc = evaluate.main([*dift, "trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu",
                            f"data={data}", f"results={work / 'batch'}", "image_fidelity.enabled=false",
                            "mean_distance.ensemble_size=2", "mean_distance.width=64", "quiet=true"])
        check(rc == 0, "exit status")
        check(json.loads((work / "batch" / "evaluation.json").read_text())["summary"]["n_pairs"] >= 3, "pairs")

    def lora_keys(method: str) -> list[str]:  # the identity LoRA on, but for a method without one (FastDrag)
        return ["lora.enabled=true"] if MethodName(split_method_name(method)[0]).optimizes else []

    def method_edit(method: str):
        def run():
            out = work / f"edit-{method}"
            check(edit.main([f"method={method}", *args, *lora_keys(method), f"sample={first}", f"out={out}"]) == 0,
                  "exit status")
            trajectory = json.loads((out / "trajectory.json").read_text())
            check(trajectory["method"]["name"] == method, f"trajectory method {trajectory['method']}")
        return run

    def method_batch(method: str):
        def run():
            out = work / f"batch-{method}"
            check(edit.main([f"method={method}", *args, *lora_keys(method), f"data={data}", f"out={out}"]) == 0,
                  "exit status")
            counts = json.loads((out / "summary.json").read_text())["counts"]
            check(counts["ok"] == 3, f"summary counts {counts}, expected 3 ok")
        return run

    def app_edit(method: str | None = None):
        sample = read_sample(first)
        keys = lora_keys(method or "dragdiffusion")
        cfg = page_config(None, args + keys, None, {"quiet": True}, method)
        reports = []
        result = run_to_end(edit_job(cfg, sample.image, sample.points, sample.mask, sample.prompt),
                            on_progress=reports.append)
        png, archive = save_outputs(result, cfg)
        check(png.is_file() and archive.is_file() and result.image.shape == sample.image.shape, "outputs")
        check(any(r[0].startswith("drag") for r in reports) or not keys, "progress reports")  # FastDrag: no fit

    points = [("edit.py (identity LoRA on)", edit_with_lora), ("edit.py generate=true", edit_generated),
              ("train.py", train_lora), ("edit.py data= (3 samples)", batch("ok")),
              ("edit.py data= again (resume)", batch("skipped")),
              ("python -m dragdiffusion.evaluate (tiny DIFT)", evaluation), ("app edit function (no browser)", app_edit)]
    if kind != "sd15":
        return [(f"{kind}: {name}", run) for name, run in points] + [
            (f"{kind}: edit.py method={m} (identity LoRA on)", method_edit(m)) for m in methods]
    for m in methods:
        points += [(f"edit.py method={m} (identity LoRA on)", method_edit(m)),
                   (f"edit.py method={m} data= (3 samples)", method_batch(m)),
                   (f"app edit function method={m}", lambda m=m: app_edit(m))]
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--quick", action="store_true", help="the tiny model at small sizes (the CPU test)")
    p.add_argument("--precision", default=None, help="trainer.precision (default: 16-mixed on a GPU, 32 on the CPU)")
    p.add_argument("--dtype", default="auto", help="model.dtype (auto: half weights under mixed precision on a GPU)")
    p.add_argument("--work", default=None, help="keep the outputs here (default: a temporary folder)")
    p.add_argument("--methods", nargs="*", default=["gooddrag", "dragnoise", "freedrag", "fastdrag", "gooddrag+text"],
                   help="drag methods checked besides dragdiffusion (edit, batch, app) (default: the four others and "
                        "gooddrag+text, DragText)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="backbones checked (default: sd15 sdxl); each gets its own random-weight model folder")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    quick = args.quick or not cuda
    precision = args.precision or ("16-mixed" if cuda else "32")
    base = [f"trainer={'gpu' if cuda else 'cpu'}", f"trainer.precision={precision}", f"model.dtype={args.dtype}",
            "quiet=true"]
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
    work = Path(args.work or tmp.name)
    data = write_samples(work / "data")
    points = []
    for kind in args.models:
        common = base + SIZES["quick" if quick else ("full" if kind == "sd15" else "full-sdxl")]
        tic = time.perf_counter()
        model = write_model(work / f"model-{kind}", "tiny" if quick else "full", kind)
        print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; model "
              f"{('tiny' if quick else 'full-size random') + ' ' + kind} written to {model} in "
              f"{time.perf_counter() - tic:.1f} s; {' '.join(common)}", flush=True)
        folder = work if kind == "sd15" else work / kind
        points += entry_points(model, data, folder, common, quick,
                               [m for m in args.methods if m != "dragdiffusion"], kind)
    failures = 0
    for name, run in points:
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
