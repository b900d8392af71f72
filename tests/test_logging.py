"""Experiment tracking: offline W&B runs read back from their files, the same edit through CSV, TensorBoard,
the LoRA artifact, and the batch table. No network: WANDB_MODE=offline, every W&B directory under tmp."""
from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import editor_with
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import ConfigError
from dragdiffusion.loggers import (BATCH_COLUMNS, TRAJECTORY_COLUMNS, close_logger, edit_media, log_batch_results,
                                   log_images, make_logger)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLE_WH = (192, 144)  # input size: every trajectory image must have it
EDIT = ["logger.image_every=4", "logger.run_name=test-edit", "logger.tags=[unit,tiny]", "drag.n_pix_step=8",
        "drag.num_inference_steps=10", "lora.enabled=true", "lora.steps=2", "lora.resolution=64", "cache.lora=false"]


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory):
    """W&B offline, its settings, cache and staging folders under tmp (never the home folder)."""
    root = tmp_path_factory.mktemp("wandb-home")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CACHE_DIR": str(root / "cache"),
           "WANDB_DATA_DIR": str(root / "data"), "WANDB_CONFIG_DIR": str(root / "config"), "WANDB_SILENT": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield root


@functools.lru_cache(maxsize=None)
def _leet(run_dir: Path, summary: bool) -> str:
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"] + (["--summary"] if summary else []) + [str(run_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


def leet(run_dir: Path, summary: bool = False):
    """The finished offline run's records (or its summary), through ``wandb leet inspect --json``."""
    out = _leet(Path(run_dir), summary)
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


def history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in leet(run_dir) if r["type"] == "history"]


def run_table(run_dir: Path, key: str) -> tuple[dict, dict]:
    """A logged wandb.Table as stored for a later sync: (table JSON, {path in the artifact: file})."""
    for r in leet(run_dir):
        if r["type"] == "artifact" and r["artifact"]["type"] == "run_table":
            files = {e["path"]: Path(e["local_path"]) for e in r["artifact"]["manifest"]["contents"]}
            if f"{key}.table.json" in files:
                return json.loads(files[f"{key}.table.json"].read_text()), files
    raise AssertionError(f"no table {key} in {run_dir}")


def edit_with_logger(tiny_editor, tmp: Path, overrides: list[str]):
    editor = editor_with(tiny_editor, EDIT + [f"logger.save_dir={tmp / 'logs'}"] + overrides)
    logger = make_logger(editor.cfg.logger, config=editor.cfg, quiet=True)
    result = editor.edit(demo_sample(*SAMPLE_WH), logger=logger, out_dir=tmp / "out")
    result.save(tmp / "out", editor.cfg)
    run_dir = Path(logger.experiment.dir).parent if editor.cfg.logger.name == "wandb" else Path(logger.log_dir)
    close_logger(logger)
    return result, run_dir, json.loads((tmp / "out" / "trajectory.json").read_text())


@pytest.fixture(scope="module")
def wandb_edit(tiny_editor, tmp_path_factory):
    return edit_with_logger(tiny_editor, tmp_path_factory.mktemp("wandb-edit"), ["logger=wandb"])


def check_png(path: Path, size_wh):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size == tuple(size_wh)
        return np.asarray(img.convert("RGB"))


def test_wandb_offline_loss_curve_has_one_point_per_step_and_matches_trajectory_json(wandb_edit):
    result, run_dir, traj = wandb_edit
    rows = [r for r in history(run_dir) if "drag/loss" in r]
    n = traj["iterations"]
    assert n >= 1 and len(rows) == n
    assert [r["trainer/global_step"] for r in rows] == list(range(n))
    assert [r["drag/loss"] for r in rows] == pytest.approx(traj["loss"], rel=1e-6)
    assert [r["drag/motion_loss"] for r in rows] == pytest.approx(traj["motion_loss"], rel=1e-6)
    # per step, each handle's distance to its target in input pixels, as trajectory.json has the positions
    expected = [float(np.hypot(*(np.array(h[0]) - traj["targets"][0]))) for h in traj["handles"][:n]]
    assert [r["drag/distance_px_0"] for r in rows] == pytest.approx(expected, rel=1e-4)


def test_wandb_stages_have_their_own_step_axes(wandb_edit):
    """The LoRA and drag Trainers both count global_step from 0: each stage's curves use its own step metric."""
    result, run_dir, traj = wandb_edit
    axes = {r["metric"].get("glob_name"): r["metric"].get("step_metric") for r in leet(run_dir) if r["type"] == "metric"}
    assert axes["lora/*"] == "lora/step" and axes["drag/*"] == "drag/step"
    rows = history(run_dir)
    assert [r["lora/step"] for r in rows if "lora/loss" in r] == [0, 1]  # lora.steps=2
    assert [r["drag/step"] for r in rows if "drag/loss" in r] == list(range(traj["iterations"]))


def test_wandb_offline_trajectory_images_are_pngs_of_the_input_size(wandb_edit):
    result, run_dir, traj = wandb_edit
    rows = [r for r in history(run_dir) if "drag/trajectory.filenames" in r]
    last = len(traj["handles"]) - 1
    # every image_every (4) steps, and at the end
    assert [r["trainer/global_step"] for r in rows] == [s for s in range(last + 1) if s % 4 == 0] + [last]
    for r in rows:
        (name,) = r["drag/trajectory.filenames"]
        check_png(run_dir / "files" / name, SAMPLE_WH)
    pair = [r for r in history(run_dir) if "edit/before_after.filenames" in r]
    assert len(pair) == 1 and pair[0]["edit/before_after.captions"] == ["before", "after"]
    before = check_png(run_dir / "files" / pair[0]["edit/before_after.filenames"][0], SAMPLE_WH)
    assert np.array_equal(before, result.sample.image)


def test_wandb_offline_records_config_name_tags_and_trajectory_table(wandb_edit):
    result, run_dir, traj = wandb_edit
    summary = leet(run_dir, summary=True)
    assert summary["state"] == "finished" and summary["name"] == "test-edit"
    assert summary["tags"] == ["unit", "tiny"]
    config = summary["config"]
    assert config["drag"]["n_pix_step"] == 8 and config["model"]["name_or_path"] == "tiny"
    assert config["logger"]["image_every"] == 4
    assert summary["summary"]["edit/iterations"] == traj["iterations"]
    table, _ = run_table(run_dir, "edit/trajectory")
    assert table["columns"] == TRAJECTORY_COLUMNS
    assert len(table["data"]) == len(traj["handles"]) * len(traj["targets"])
    assert [row[-1] for row in table["data"][:traj["iterations"]]] == pytest.approx(traj["loss"], rel=1e-6)


def test_csv_logger_writes_the_same_losses_and_png_files(wandb_edit, tiny_editor, tmp_path):
    _, wandb_dir, wandb_traj = wandb_edit
    # the CSV run also draws on the decoded x0 estimate: the extra UNet/VAE calls must not change the drag
    result, log_dir, traj = edit_with_logger(tiny_editor, tmp_path, ["logger=csv", "logger.image_source=estimate"])
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["drag/loss"]]
    wandb_losses = [r["drag/loss"] for r in history(wandb_dir) if "drag/loss" in r]
    assert [float(r["drag/loss"]) for r in rows] == pytest.approx(wandb_losses, rel=1e-6)
    assert traj["loss"] == wandb_traj["loss"]
    assert "n_pix_step: 8" in (log_dir / "hparams.yaml").read_text()
    last = len(traj["handles"]) - 1
    images = sorted((log_dir / "images").glob("drag-trajectory_step*.png"))
    assert [int(p.stem[-5:]) for p in images] == sorted({s for s in range(last + 1) if s % 4 == 0} | {last})
    estimate = check_png(images[0], SAMPLE_WH)
    wandb_first = next(r for r in history(wandb_dir) if "drag/trajectory.filenames" in r)
    drawn_on_input = check_png(wandb_dir / "files" / wandb_first["drag/trajectory.filenames"][0], SAMPLE_WH)
    assert np.abs(estimate.astype(int) - drawn_on_input.astype(int)).mean() > 5  # another background
    with open(log_dir / "edit-trajectory.csv") as f:
        assert next(csv.reader(f)) == TRAJECTORY_COLUMNS


def test_tensorboard_logger_writes_scalars_images_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from dragdiffusion.config import load_config
    cfg = load_config(None, ["logger=tensorboard", f"logger.save_dir={tmp_path}", "logger.run_name=tb"])
    logger = make_logger(cfg.logger, config=cfg)
    for step in range(3):
        logger.log_metrics({"drag/loss": 1.0 / (step + 1)}, step=step)
    log_images(logger, "drag/trajectory", [np.zeros((20, 30, 3), np.uint8)], step=2)
    close_logger(logger)
    events = EventAccumulator(str(tmp_path / "dragdiffusion" / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.value for e in events.Scalars("drag/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    (image,) = events.Images("drag/trajectory")
    assert (image.step, image.width, image.height) == (2, 30, 20)
    hparams = OmegaConf.load(tmp_path / "dragdiffusion" / "tb" / "hparams.yaml")
    assert hparams.drag.n_pix_step == cfg.drag.n_pix_step


def test_missing_tensorboard_is_a_clear_config_error(tmp_path, monkeypatch):
    import importlib.util
    from dragdiffusion.config import load_config
    cfg = load_config(None, ["logger=tensorboard", f"logger.save_dir={tmp_path}"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        make_logger(cfg.logger)
    assert make_logger(load_config(None, ["logger=none"]).logger) is False


def test_lora_stage_logs_loss_learning_rate_and_the_lora_artifact(wandb_edit):
    result, run_dir, traj = wandb_edit
    rows = [r for r in history(run_dir) if "lora/loss" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 1]  # lora.steps=2
    assert traj["unet_passes"]["lora"] == 2  # one UNet forward (a batch of views) per LoRA step
    assert all(np.isfinite(r["lora/loss"]) for r in rows)
    assert [r["lr-AdamW"] for r in history(run_dir) if "lr-AdamW" in r] == pytest.approx([5e-4, 5e-4])
    (record,) = [r["artifact"] for r in leet(run_dir) if r["type"] == "artifact" and r["artifact"]["type"] == "lora"]
    assert record["name"] == "lora-demo"
    (entry,) = record["manifest"]["contents"]
    assert entry["path"] == "pytorch_lora_weights.safetensors" and Path(traj["lora"]).name == entry["path"]
    assert int(entry["size"]) == Path(traj["lora"]).stat().st_size


def test_batch_table_has_every_sample_and_per_sample_curves(wandb_edit, tmp_path):
    result, _, traj = wandb_edit
    rows = [{"sample": "animals/cat", "status": "ok", "iterations": traj["iterations"], "seconds": 1.5,
             "final_distance_px": float(np.mean(traj["final_distance_px"])), "error": None},
            {"sample": "animals/dog", "status": "failed", "iterations": None, "final_distance_px": None,
             "seconds": 0.1, "error": "sample 'animals/dog': points: odd number of points"}]
    from dragdiffusion.config import load_config
    cfg = load_config(None, ["logger=wandb", f"logger.save_dir={tmp_path}"])
    logger = make_logger(cfg.logger, config=cfg, quiet=True)
    log_batch_results(logger, rows, {"animals/cat": edit_media(result)})
    run_dir = Path(logger.experiment.dir).parent
    close_logger(logger)
    table, files = run_table(run_dir, "batch/samples")
    assert table["columns"] == BATCH_COLUMNS
    by_name = {row[0]: dict(zip(BATCH_COLUMNS, row)) for row in table["data"]}
    assert set(by_name) == {"animals/cat", "animals/dog"}
    assert by_name["animals/cat"]["status"] == "ok" and by_name["animals/cat"]["iterations"] == traj["iterations"]
    assert by_name["animals/dog"]["status"] == "failed" and by_name["animals/dog"]["after"] is None
    assert "odd number of points" in by_name["animals/dog"]["error"]
    for column in ("before", "after"):  # thumbnails keep the aspect, longest side 128
        check_png(files[by_name["animals/cat"][column]["path"]], (128, 96))
    curve = [r["animals-cat/loss"] for r in history(run_dir) if "animals-cat/loss" in r]
    assert curve == pytest.approx(traj["loss"], rel=1e-6)
    summary = leet(run_dir, summary=True)["summary"]
    assert summary["batch/samples"] == 2 and summary["batch/failed"] == 1 and summary["batch/ok"] == 1


def test_two_process_batch_makes_one_wandb_run_with_every_sample(tmp_path, tiny_model_dir, wandb_offline):
    from test_batch import edit_cmd, make_dataset, subprocess_env
    data, out, logs = make_dataset(tmp_path / "data"), tmp_path / "out", tmp_path / "logs"
    env = {**subprocess_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_offline)}
    proc = subprocess.run(edit_cmd(data, out, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                                   "logger=wandb", f"logger.save_dir={logs}"),
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (logs / "wandb").glob("offline-run-*")  # one run for the job, not one per sample or process
    rows = json.loads((out / "summary.json").read_text())["samples"]
    assert sorted(r["rank"] for r in rows) == [0, 0, 1]
    table, files = run_table(run_dir, "batch/samples")
    by_name = {row[0]: dict(zip(BATCH_COLUMNS, row)) for row in table["data"]}
    assert sorted(by_name) == sorted(r["sample"] for r in rows) == ["cat0/s0", "cat0/s2", "cat1/s1"]
    for r in rows:  # rank 1's samples too: thumbnails, figures and curves
        cells = by_name[r["sample"]]
        assert cells["status"] == "ok" and cells["iterations"] == r["iterations"]
        with Image.open(out / r["sample"] / "dragged_image.png") as img:
            size = img.size
        thumb = check_png(files[cells["after"]["path"]], size)  # the samples are smaller than a thumbnail
        assert thumb.shape[:2] == size[::-1]
        traj = json.loads((out / r["sample"] / "trajectory.json").read_text())
        key = r["sample"].replace("/", "-") + "/loss"
        assert [h[key] for h in history(run_dir) if key in h] == pytest.approx(traj["loss"], rel=1e-6)
        key = r["sample"].replace("/", "-") + "/timestep"  # the timestep of every drag step
        assert [h[key] for h in history(run_dir) if key in h] == traj["timestep"] and set(traj["timestep"]) == {traj["t"]}
    config = leet(run_dir, summary=True)["config"]
    assert config["trainer"]["devices"] == 2 and config["method"] == "dragdiffusion"


def test_wandb_logs_how_far_dragtext_moved_the_embedding(tiny_editor, tmp_path):
    result, run_dir, traj = edit_with_logger(tiny_editor, tmp_path, ["logger=wandb", "text.optimize=true",
                                                                     "drag.stop_distance=0"])
    rows = [r for r in history(run_dir) if "drag/text_shift" in r]
    assert len(rows) == traj["iterations"] >= 2 and traj["method"]["name"] == "dragdiffusion+text"
    assert [r["drag/text_shift"] for r in rows] == pytest.approx(traj["text_shift"], rel=1e-6, abs=1e-9)
    assert rows[-1]["drag/text_shift"] > 0 and leet(run_dir, summary=True)["config"]["text"]["optimize"] is True
