#!/usr/bin/env python
"""How long a bad input takes to be refused: each case runs ``edit.py`` (or ``train.py``) in a fresh process and
times it to its exit (status 2), with the import of torch for comparison.

  python benchmarks/bench_input_errors.py            # every case, 3 runs each (the median is shown)
  python benchmarks/bench_input_errors.py --runs 1

The inputs are checked with PIL, numpy and omegaconf only (dragdiffusion/inputs.py), so the time is Python's start,
the config and the file reading; ``tests/test_fast_errors.py`` asserts that torch is not imported on these paths.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_files(folder: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((384, 512, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    buf = io.BytesIO()
    Image.fromarray((rng.random((384, 512, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    (folder / "corrupt.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(folder / "mask100.png")


def cases(f: Path) -> dict[str, list[str]]:
    good = [f"image={f}/a.png", "points=[[100,200],[150,200]]", f"out={f}/out"]
    return {
        "points outside the image": ["edit.py", *good, "points=[[100,200],[600,200]]"],
        "a corrupt JPEG": ["edit.py", *good, f"image={f}/corrupt.jpg"],
        "a missing image": ["edit.py", *good, f"image={f}/missing.png"],
        "a mask of another size": ["edit.py", *good, f"mask={f}/mask100.png"],
        "a missing checkpoint file": ["edit.py", *good, f"model.name_or_path={f}/missing.safetensors"],
        "a hub id, no network": ["edit.py", *good, "model.name_or_path=some-org/not-a-model"],
        "train.py: a corrupt JPEG": ["train.py", f"image={f}/corrupt.jpg", f"out={f}/lora"],
    }


def timed(argv: list[str], env: dict) -> tuple[float, int]:
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - tic, proc.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_files(folder)
        rows = [("`import torch, lightning, diffusers` (for comparison)",
                 ["-c", "import torch, lightning, diffusers"])] + list(cases(folder).items())
        print("| input | seconds to the error (median) | exit status |\n|---|---|---|")
        for name, command in rows:
            runs = [timed(command, env) for _ in range(args.runs)]
            print(f"| {name} | {statistics.median(t for t, _ in runs):.2f} | {runs[0][1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
