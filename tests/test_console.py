"""What a run prints: no library noise (quiet or not), labelled stage bars only (on stderr: stdout keeps the result
line), real warnings kept; bars count each method's real budget; the early-stop rule said in input pixels."""
import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

import edit as edit_cli
from conftest import REPO
from dragdiffusion.config import load_config
from dragdiffusion.console import StageProgressBar, stop_rule
from dragdiffusion.data.convert import write_folder_sample
from dragdiffusion.demo import demo_sample
from dragdiffusion.sample import make_sample

NOISE = ("requires torchvision (not installed)", "falling back to", "LeafSpec", "litlogger", "Tip:",
         "Training:", "Epoch 0", "v_num", "`Trainer.fit` stopped", "TPU available", "GPU available", "LOCAL_RANK",
         "\x1b[A", "Loading pipeline components", "Loading weights", "Predicting", "DataLoader 0", "[rank 0]")
FAST_DEMO = ["lora.steps=2", "lora.resolution=64", "drag.width=64", "drag.n_pix_step=3",
             "drag.num_inference_steps=10"]


@pytest.fixture(scope="module")
def long_prompt_sample(tmp_path_factory, tiny_model_dir):
    """The demo drawing with a prompt longer than the text encoder takes: a warning about the user's input."""
    sample = demo_sample()
    sample.prompt = " ".join(["a photo of a cat"] * 30)
    folder = tmp_path_factory.mktemp("noisy") / "sample"
    write_folder_sample(sample, folder)
    return folder


@pytest.mark.parametrize("quiet, early", [(True, False), (False, False), (False, True)])
def test_a_demo_run_prints_stages_results_and_real_warnings_only(long_prompt_sample, tmp_path, quiet, early):
    proc = subprocess.run([sys.executable, "edit.py", "--config", "configs/demo.yaml", f"sample={long_prompt_sample}",
                           f"out={tmp_path / 'out'}", f"logger.save_dir={tmp_path / 'logs'}", f"quiet={str(quiet).lower()}",
                           *FAST_DEMO, *(["drag.stop_distance=100"] if early else [])], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} printed:\n{text}"
    assert "more than 77; it was truncated" in text  # the user's input: still said
    # stdout: the result line only (a redirected stdout stays clean); bars, notes and warnings go to stderr
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if line.startswith("sample: ")]
    assert f"wrote {tmp_path / 'out'}/dragged_image.png" in proc.stdout
    if quiet:
        assert "LoRA:" not in text and "drag:" not in text and "model: loading" not in text
    elif early:  # a drag that stops early says why, and nothing else does
        assert "drag: stopped early at iteration 0 (every handle within 100 grid cells" in proc.stderr
    else:
        assert "model: loading tiny (device cpu, precision 32, weights float32)" in proc.stderr  # once, with the device
        for stage, total in (("LoRA", 2), ("inversion", 7), ("drag", 3), ("denoise", 7), ("decode", 1)):
            assert f"{stage}: 100%" in proc.stderr and f"{stage}:   0%|          | 0/{total}" in proc.stderr, stage


def final_bars(stderr: str) -> dict[str, tuple[str | None, int, int]]:
    """{drag bar label: (its stop text or None, its last count, its total)} from the tqdm output."""
    bars = {}
    for line in re.split(r"[\r\n]", stderr):
        m = re.match(r"(drag(?: step \d+/\d+ \(t=\d+\))?)(?:: (stopped early at iteration \d+) \([^)]*\))?:"
                     r"\s+\d+%\|[^|]*\|\s+(\d+)/(\d+)", line)
        if m:
            bars[m[1]] = (m[2], int(m[3]), int(m[4]))
    return bars


@pytest.mark.parametrize("method, settings, budget", [
    ("gooddrag", ["gooddrag.drag_end_step=3", "gooddrag.track_per_step=2", "gooddrag.max_drag_per_track=2"], 4),
    ("freedrag", ["freedrag.max_step=5"], 5)])
def test_drag_bars_count_the_methods_budget_and_agree_with_the_last_line(tmp_path, method, settings, budget):
    """GoodDrag: one bar per drag step, labelled with the step and its timestep, each counting to the step's budget
    (track_per_step x max_drag_per_track); FreeDrag: one bar to freedrag.max_step (not drag.n_pix_step). The bars'
    counts add up to the iterations of the last line, and a stop is said at the same iteration."""
    proc = subprocess.run([sys.executable, "edit.py", "--config", "configs/demo.yaml", f"method={method}",
                           f"out={tmp_path / 'out'}", "logger=none", "lora.enabled=false", "drag.width=64",
                           "drag.num_inference_steps=10", "drag.n_pix_step=80", *settings], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    bars = final_bars(proc.stderr)
    last = re.search(r"(\d+) drag iterations \((stopped early at iteration \d+|no early stop)", proc.stdout)
    assert bars and last, proc.stdout + proc.stderr[-3000:]
    if method == "gooddrag":  # drag steps at t = 701, 601, 501 (10 steps, strength 0.75: the 8th from the end)
        labels = [f"drag step {k}/3 (t={t})" for k, t in ((1, 701), (2, 601), (3, 501))]
        assert list(bars) == labels[:len(bars)]
    else:
        assert list(bars) == ["drag"]
    assert all(total == budget for _, _, total in bars.values()), bars
    assert sum(count for _, count, _ in bars.values()) == int(last[1])
    stops = [stop for stop, _, _ in bars.values() if stop]
    assert stops == ([last[2]] if last[2].startswith("stopped") else [])


def test_the_stop_rule_is_said_in_input_pixels():
    # the demo: a 512 x 384 input at width 128, supervision grid 0.5 -> 64 x 48 cells of 8 input px
    assert stop_rule(2.0, (384, 512), (48, 64)) == \
        "every handle within 2 grid cells = 16 px of its target at this working size"
    assert stop_rule(2.0, (64, 64), (32, 32)) == "every handle within 2 grid cells = 4.0 px of its target"
    assert stop_rule(2.0) == "every handle within 2 grid cells of its target"


def test_the_progress_bar_and_the_last_line_say_the_rule():
    bar = StageProgressBar("drag")
    bar._train_progress_bar = Tqdm(total=40, file=io.StringIO())
    module = SimpleNamespace(reached=True, stop_step=24, drag=SimpleNamespace(stop_distance=2.0),
                             image_hw=(384, 512), grid_hw=(48, 64))
    bar.on_train_end(SimpleNamespace(), module)
    assert bar.train_progress_bar.desc.startswith("drag: stopped early at iteration 24 (every handle within 2 grid "
                                                  "cells = 16 px of its target at this working size)")
    cfg = load_config(REPO / "configs" / "demo.yaml", [])
    assert edit_cli.early_stop_rule(cfg, demo_sample()) == \
        "every handle within 2 grid cells = 16 px of its target at this working size"
    small = make_sample(demo_sample().image[:200, :300], [[10, 10], [20, 20]])
    cfg = load_config(REPO / "configs" / "demo.yaml", ["drag.width=64"])  # 300 px on a 32-cell grid
    assert edit_cli.early_stop_rule(cfg, small) == \
        "every handle within 2 grid cells = 19 px of its target at this working size"
