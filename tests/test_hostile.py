"""What a hostile or careless user does: every case ends in a clear message and exit status 2 before any model
loads (or a failed row while the rest of a batch goes on), never a traceback and never lost work.

The hostile list (with the malicious pickles of test_data.py): decompression bombs and oversized files, an
unwritable or foreign output folder, changed settings on resume, missing / corrupt / wrong-rank LoRA files,
points in every malformed shape, no input at all, signals in the middle of a run.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edit as edit_cli
import train as train_cli
from conftest import REPO
from dragdiffusion.config import load_config
from dragdiffusion.data.convert import write_folder_sample
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import ConfigError, SampleError
from dragdiffusion.outputs import prepare_edit_folder
from dragdiffusion.sample import ReadLimits, make_sample, read_image

TINY = ["model=tiny", "trainer=cpu", "quiet=true", "lora.enabled=false", "drag.width=64", "drag.n_pix_step=2",
        "drag.num_inference_steps=5"]


def png_bomb(path: Path, width: int = 15000, height: int = 12000) -> Path:
    """A PNG of a few hundred bytes whose header claims width x height pixels (Pillow's decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the decoder never gets that far
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(data + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a test failure here: every error must come before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    import dragdiffusion.editor
    import dragdiffusion.lora
    monkeypatch.setattr(dragdiffusion.editor, "load_backbone", refuse)
    monkeypatch.setattr(dragdiffusion.lora, "load_backbone", refuse)


def run_edit(capsys, *overrides) -> tuple[int, str]:
    rc = edit_cli.main([*TINY, *overrides])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- files

def test_decompression_bomb_is_an_invalid_sample_not_a_crash(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 2000
    with pytest.raises(SampleError, match=r"image: .*too large to decode.*limits.max_image_pixels"):
        read_image(bomb)
    # below Pillow's own limit, ours still decides (and it is a config key)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(SampleError, match=r"60x40 = 2400 pixels, more than limits.max_image_pixels=1000"):
        read_image(tmp_path / "small.png", limits=ReadLimits(max_image_pixels=1000))
    with pytest.raises(SampleError, match=r"bytes, more than limits.max_file_bytes=100$"):
        read_image(bomb, limits=ReadLimits(max_file_bytes=100))


def test_single_edit_applies_the_limits(tmp_path, capsys, no_model):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "small.png")
    rc, err = run_edit(capsys, f"image={tmp_path / 'small.png'}", "points=[[1,2],[3,4]]",
                       "limits.max_image_pixels=1000", f"out={tmp_path / 'out'}")
    assert rc == 2 and "limits.max_image_pixels=1000" in err and "Traceback" not in err
    rc, err = run_edit(capsys, f"image={png_bomb(tmp_path / 'bomb.png')}", "points=[[1,2],[3,4]]",
                       f"out={tmp_path / 'out'}")
    assert rc == 2 and "too large to decode" in err


def test_unwritable_output_is_refused_before_any_model_loads(tmp_path, capsys, no_model):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out"
    rc, err = run_edit(capsys, f"image={tmp_path / 'a.png'}", "points=[[1,2],[30,4]]", f"out={out}")
    assert rc == 2 and f"out={out}: not writable" in err
    rc = train_cli.main(["model=tiny", "trainer=cpu", f"image={tmp_path / 'a.png'}", f"out={out}"])
    assert rc == 2 and f"out={out}: not writable" in capsys.readouterr().err
    from dragdiffusion import evaluate
    write_folder_sample(demo_sample(64, 48), tmp_path / "data" / "s")
    (tmp_path / "results").mkdir()
    rc = evaluate.main(["model=tiny", f"data={tmp_path / 'data'}", f"results={tmp_path / 'results'}", f"out={out}"])
    assert rc == 2 and f"out={out}: not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        rc, err = run_edit(capsys, f"image={tmp_path / 'a.png'}", "points=[[1,2],[30,4]]", f"out={locked}")
        assert rc == 2 and "not writable" in err


def test_a_foreign_output_folder_is_refused_unless_overwrite(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    with pytest.raises(ConfigError, match=r"thesis.tex.*overwrite=true"):
        prepare_edit_folder(out, overwrite=False)
    assert prepare_edit_folder(out, overwrite=True) is not None
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    rc, err = run_edit(capsys, f"image={tmp_path / 'a.png'}", "points=[[1,2],[30,4]]", f"out={out}")
    assert rc == 2 and "thesis.tex" in err and (out / "thesis.tex").read_text() == "months of work"
    ours = tmp_path / "ours"  # an earlier edit's output is replaced, with a line saying so
    ours.mkdir()
    for name in ("dragged_image.png", "trajectory.json", "config.yaml", "lora"):
        (ours / name).mkdir() if name == "lora" else (ours / name).write_text("old")
    assert "replaced" in prepare_edit_folder(ours, overwrite=False)
    assert prepare_edit_folder(tmp_path / "new", overwrite=False) is None


# ----------------------------------------------------------------------------------------------- inputs

def test_points_as_json_text_and_bad_shapes(tmp_path, capsys):
    cfg = load_config(None, [f"image={tmp_path / 'a.png'}", 'points="[[40,30],[50,40]]"'])
    assert cfg.points == "[[40,30],[50,40]]"  # a quoted value arrives as text
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "a.png")
    s = edit_cli.load_input(cfg)
    assert s.handles == [(40.0, 30.0)] and s.targets == [(50.0, 40.0)]
    for bad in ("[40,30,50,40]", "[[1,2,3]]", "not json", '{"x": 1}'):
        with pytest.raises(SampleError, match=r"points: .*points='\[\[120, 80\], \[160, 80\]\]'"):
            make_sample(np.zeros((60, 60, 3), np.uint8), bad)


def test_no_input_or_a_missing_file_is_named_first(tmp_path, capsys, no_model):
    rc, err = run_edit(capsys, f"out={tmp_path / 'o'}")
    assert rc == 2 and "nothing to edit" in err and "sample=demo" in err
    rc, err = run_edit(capsys, "mask=/nonexistent.png", f"out={tmp_path / 'o'}")
    assert rc == 2 and "no image=PATH" in err
    rc, err = run_edit(capsys, "image=/nonexistent.png", f"out={tmp_path / 'o'}")  # no points either
    assert rc == 2 and "file not found: /nonexistent.png" in err
    rc, err = run_edit(capsys, "n_pix_step=5")
    assert rc == 2 and "did you mean drag.n_pix_step" in err


def test_config_is_found_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert edit_cli.main(["--config", "configs/demo.yaml", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name_or_path: tiny" in printed and "sample: demo" in printed


# ----------------------------------------------------------------------------------------------- LoRA files

def test_bad_lora_files_exit_2_before_the_model_loads(tmp_path, capsys, no_model):
    from safetensors.torch import save_file
    import torch
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    args = [f"image={tmp_path / 'a.png'}", "points=[[1,2],[30,4]]", f"out={tmp_path / 'o'}", "lora.enabled=true"]
    rc, err = run_edit(capsys, *args, f"lora.path={tmp_path / 'missing.safetensors'}")
    assert rc == 2 and "no LoRA file found" in err
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rc, err = run_edit(capsys, *args, f"lora.path={tmp_path / 'corrupt.safetensors'}")
    assert rc == 2 and "not a readable LoRA safetensors file" in err
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{layer}.lora.down.weight": torch.zeros(8, 32), f"{layer}.lora.up.weight": torch.zeros(32, 8)},
              str(tmp_path / "rank8.safetensors"))
    rc, err = run_edit(capsys, *args, f"lora.path={tmp_path / 'rank8.safetensors'}")
    assert rc == 2 and "LoRA rank 8, but lora.rank is 16" in err
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)},
              str(tmp_path / "kohya.safetensors"))
    rc, err = run_edit(capsys, *args, f"lora.path={tmp_path / 'kohya.safetensors'}")
    assert rc == 2 and "kohya" in err and "lora_unet_down_blocks_0" in err


# ----------------------------------------------------------------------------------------------- batches

def summary(out: Path) -> dict:
    return {r["sample"]: r for r in json.loads((out / "summary.json").read_text())["samples"]}


def test_resume_refuses_changed_settings_and_overwrite_redoes(tmp_path, capsys, tiny_model_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    write_folder_sample(demo_sample(64, 48), data / "a")
    write_folder_sample(demo_sample(64, 48, seed=1), data / "b")
    png_bomb(data / "bomb" / "image.png") if (data / "bomb").mkdir() is None else None
    (data / "bomb" / "drag.json").write_text(json.dumps({"prompt": "", "handles": [[1, 1]], "targets": [[5, 5]]}))
    base = [*TINY, f"data={data}", f"out={out}"]
    assert edit_cli.main(base) == 1  # the bomb is an invalid sample; the others ran
    captured = capsys.readouterr()
    assert "3 samples, 2 pairs, 2 valid, 1 invalid" in captured.out and "too large to decode" in captured.out
    rows = summary(out)
    assert rows["a"]["status"] == rows["b"]["status"] == "ok" and rows["bomb"]["status"] == "failed"
    assert rows["bomb"]["rank"] == 0 and rows["bomb"]["seconds"] == 0.0
    before = (out / "a" / "dragged_image.png").read_bytes()
    first = rows
    assert edit_cli.main(base) == 1  # same settings: skipped, with the figures of the run that made it
    rows = summary(out)
    assert rows["a"]["status"] == "skipped" and rows["a"]["rank"] == 0
    assert rows["a"]["seconds"] == first["a"]["seconds"] > 0
    assert (rows["a"]["iterations"], rows["a"]["final_distance_px"]) == (first["a"]["iterations"],
                                                                         first["a"]["final_distance_px"])
    capsys.readouterr()
    assert edit_cli.main(base + ["drag.n_pix_step=3"]) == 2  # other settings: refused, naming the key
    err = capsys.readouterr().err
    assert "drag.n_pix_step: 2 -> 3" in err and "overwrite=true" in err
    assert (out / "a" / "dragged_image.png").read_bytes() == before  # nothing was touched
    assert edit_cli.main(base + ["drag.n_pix_step=3", "overwrite=true"]) == 1
    rows = summary(out)
    assert rows["a"]["status"] == "ok" and rows["a"]["iterations"] == 3
    assert json.loads((out / "a" / "trajectory.json").read_text())["iterations"] == 3


def test_a_missing_per_sample_lora_is_a_failed_row_in_a_batch(tmp_path, capsys, tiny_model_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    write_folder_sample(demo_sample(64, 48), data / "a")
    (tmp_path / "loras").mkdir()
    assert edit_cli.main([*TINY, "lora.enabled=true", f"lora.path={tmp_path / 'loras'}", f"data={data}",
                          f"out={out}"]) == 1  # a sample failed: not a bad command
    row = summary(out)["a"]
    assert row["status"] == "failed" and "no LoRA file found" in row["error"]


# ----------------------------------------------------------------------------------------------- signals

def test_ctrl_c_in_a_batch_says_what_finished_and_the_same_command_resumes(tmp_path, tiny_model_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    for i, name in enumerate(("a", "b", "c")):
        write_folder_sample(demo_sample(64, 48, seed=i), data / name)
    cmd = [sys.executable, str(REPO / "edit.py"), *TINY, "quiet=false", "drag.n_pix_step=30",
           "drag.point_tracking=false", f"data={data}", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = ""
    deadline = time.monotonic() + 300
    while "a: ok in" not in seen and time.monotonic() < deadline:  # the first sample is written, b is running
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + rest
    assert "stopped by signal 2: 1 sample(s) finished (1 in this run, 0 before), 0 failed, 2 not run" in rest
    assert "The same command resumes" in rest
    first = summary(out)["a"]
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    rows = summary(out)
    assert [rows[n]["status"] for n in "abc"] == ["skipped", "ok", "ok"]
    assert rows["a"]["seconds"] == first["seconds"] > 0  # the first run's figures, not "skipped, 0.0 s"
    assert rows["a"]["iterations"] == first["iterations"] == 30


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_edit_promptly_and_leaves_no_partial_files(tmp_path, tiny_model_dir, sig, status):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "edit.py"), "--config", "configs/demo.yaml", "lora.enabled=false",
           "drag.n_pix_step=100000", "drag.point_tracking=false", "drag.width=64", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = ""
    deadline = time.monotonic() + 120
    while "drag:" not in seen and time.monotonic() < deadline:  # the drag loop is running
        seen += proc.stdout.read(1) or ""
    assert "drag:" in seen, seen[-2000:]
    tic = time.monotonic()
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == status, (seen + rest)[-2000:]
    assert time.monotonic() - tic < 15
    assert "stopped by signal" in rest
    assert not out.exists() or not any(out.iterdir())
