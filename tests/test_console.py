"""What a run prints: no library noise (quiet or not), labelled stage bars only, real warnings kept; the
early-stop rule said in input pixels."""
import io
import os
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
         "Training:", "Epoch 0", "v_num", "`Trainer.fit` stopped", "TPU available")
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
    assert f"wrote {tmp_path / 'out'}/dragged_image.png" in proc.stdout
    if quiet:
        assert "LoRA:" not in text and "drag:" not in text and "GPU available" not in text
    elif early:  # a drag that stops early says why, and nothing else does
        assert "drag: stopped early at iteration 0 (every handle within 100 grid cells" in proc.stdout
    else:
        assert "LoRA: 100%" in proc.stdout and "drag: 100%" in proc.stdout  # the stages, labelled from the start
        assert "LoRA:   0%|          | 0/2" in proc.stdout


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
