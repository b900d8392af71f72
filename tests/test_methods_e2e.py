"""Every method end to end on the tiny model: edit.py on a DragBench and a Drag100 sample, a batch over both layouts
on 2 CPU processes, then one evaluate run over the results."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import edit as edit_cli
from conftest import DRAGBENCH, REPO
from test_batch import subprocess_env

DRAG100 = REPO.parent / "shared" / "data" / "drag100-sample"
BENCH_SAMPLE = "animals/JH_2023-09-14-1838-08"
DRAG100_SAMPLE = "cat_2"
# small schedules: 10 DDIM steps (7-8 inverted), GoodDrag with 2 tracking rounds (6 updates) per drag step
SMALL = ["model=tiny", "trainer=cpu", "lora.enabled=false", "drag.width=64", "drag.n_pix_step=6",
         "drag.num_inference_steps=10", "gooddrag.track_per_step=2", "gooddrag.drag_end_step=3", "freedrag.max_step=6", "quiet=true",
         "trainer.enable_progress_bar=false"]
METHODS = ["dragdiffusion", "gooddrag", "dragnoise", "freedrag", "fastdrag"]
# one batch: every method, GoodDrag with and without DragText, DragNoise with it
BATCH_METHODS = ["dragdiffusion", "gooddrag", "gooddrag+text", "dragnoise+text", "freedrag", "fastdrag"]


@pytest.fixture(scope="module")
def shared_samples():
    if not DRAGBENCH.is_dir() or not DRAG100.is_dir():
        pytest.skip("the shared DragBench / Drag100 samples are not there")
    return DRAGBENCH / BENCH_SAMPLE, DRAG100 / DRAG100_SAMPLE


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_edit_py_runs_each_method_on_a_dragbench_and_a_drag100_sample(method, shared_samples, tmp_path,
                                                                      tiny_model_dir):
    for sample in shared_samples:
        out = tmp_path / sample.name
        assert edit_cli.main([f"method={method}", *SMALL, f"sample={sample}", f"out={out}"]) == 0
        t = json.loads((out / "trajectory.json").read_text())
        assert t["method"]["name"] == method
        assert (out / "dragged_image.png").is_file()
        if method == "gooddrag":
            assert t["t"] == 701 and t["drag_timesteps"][0] == 701  # round(0.75 x 10) = 8 inverted steps
            assert len(t["drag_timesteps"]) <= 3
        elif method == "fastdrag":  # one warp, no iteration, no LoRA
            assert t["iterations"] == 0 and t["t"] == 601 and t["lora"] is None and t["fastdrag"]["moved_cells"] > 0
        else:
            assert t["iterations"] <= 6
            assert t["t"] == 601 and t["drag_timesteps"] == [601] and t["control_from_step"] == 0
        config = (out / "config.yaml").read_text()
        assert f"method: {method}" in config


def mixed_tree(root: Path, samples) -> Path:
    """A dataset folder holding one DragBench sample (in its category) and one Drag100 sample, as links."""
    bench, drag100 = samples
    (root / "animals").mkdir(parents=True)
    (root / "animals" / bench.name).symlink_to(bench, target_is_directory=True)
    (root / drag100.name).symlink_to(drag100, target_is_directory=True)
    return root


@pytest.mark.slow
def test_one_command_runs_every_method_over_both_layouts_on_two_processes_then_one_evaluation(
        shared_samples, tmp_path, tiny_model_dir):
    """The researcher's comparison: one command edits with every method and evaluates (evaluate=true), then the
    paper tables of comparison/ hold one row per method for each dataset, with its seconds and UNet passes."""
    data = mixed_tree(tmp_path / "data", shared_samples)
    results = tmp_path / "results"
    cmd = [sys.executable, "edit.py", *SMALL, f"methods=[{','.join(BATCH_METHODS)}]", f"data={data}",
           f"out={results}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "evaluate=true",
           "evaluate_overrides=[model=tiny,image_fidelity.enabled=false,mean_distance.ensemble_size=1,"
           "mean_distance.width=64]"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = {"dragbench": f"animals/{shared_samples[0].name}", "drag100": shared_samples[1].name}
    passes = {}
    for method in BATCH_METHODS:
        out = results / method
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["method"] == method
        rows = {r["sample"]: r for r in summary["samples"]}
        assert set(rows) == set(names.values())
        assert all(r["status"] == "ok" for r in rows.values()) and sorted(r["rank"] for r in rows.values()) == [0, 1]
        for dataset, name in names.items():
            t = json.loads((out / name / "trajectory.json").read_text())
            assert t["method"]["name"] == method
            assert ("text_shift" in t) == method.endswith("+text")
            if method.endswith("+text") and t["iterations"]:
                assert max(t["text_shift"]) > 0 and len(t["text_shift"]) == t["iterations"]
            n = t["unet_passes"]  # inversion: 7 of 10 steps (GoodDrag 8); the denoising: the steps left
            inverted = 8 if method.startswith("gooddrag") else 7
            # an inversion done by an earlier method of the batch in this process is reused (gooddrag+text:
            # gooddrag's; freedrag: dragnoise's, the same schedule without a LoRA), not FastDrag's (its keys/values)
            reused = t["sources"]["inversion"] == "reused"
            assert reused == (method in ("gooddrag+text", "dragnoise+text", "freedrag"))
            assert n["lora"] == 0 and n["inversion"] == (0 if reused else inverted)
            assert n["drag"] == 0 if method == "fastdrag" else n["drag"] >= 1  # FastDrag's drag is a warp
            assert n["denoise"] == inverted - t["control_from_step"]
            passes[(dataset, method)] = sum(n.values())
            # what summary.csv's final distance measures: tracked handles, FreeDrag's and FastDrag's planned ones
            assert rows[name]["final_distance_of"] == t["final_distance_of"]
            assert t["final_distance_of"].startswith("planned" if method in ("freedrag", "fastdrag") else "tracked")
    report = json.loads((results / "evaluation.json").read_text())
    per_method = {m["method"]: m for m in report["summary"]["methods"]}
    assert set(per_method) == set(BATCH_METHODS)  # with and without DragText side by side
    assert len(report["lines"]) == 2 * len(BATCH_METHODS) and all(line in proc.stdout for line in report["lines"])
    for dataset in names:
        lines = list(csv.reader((results / "comparison" / f"{dataset}.csv").read_text().splitlines()))
        header = lines[0]
        assert header[:3] == ["method", "MD (px) [lower is better]", "m-MD (px) [lower is better]"]
        assert "DAI gamma=1 [lower is better]" in header and header[-1] == "samples"
        table = {r[0]: dict(zip(header, r)) for r in lines[1:]}
        assert sorted(table) == sorted(BATCH_METHODS)
        for method, cells in table.items():
            assert cells["UNet passes [lower is better]"] == str(passes[(dataset, method)])
            assert len(cells["MD (px) [lower is better]"].split(".")[1]) == 2 and cells["samples"] == "1"
            assert float(cells["s / edit [lower is better]"]) > 0
    assert (results / "comparison" / "report.html").stat().st_size > 0
    print(proc.stdout[-1500:])
