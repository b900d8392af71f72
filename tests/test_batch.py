"""Batch editing of datasets: 2 CPU processes (Lightning DDP, gloo) = 1 process, resume after a kill, failure
isolation, unsafe pickles refused, the LoRA pipeline, the shared DragBench subset end to end."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import edit as edit_cli
from conftest import REPO, TwoStepModule
from dragdiffusion.batch import check_finite, run_item, NonFiniteResultError
from dragdiffusion.data.convert import write_dragbench_sample, write_folder_sample
from dragdiffusion.demo import demo_sample
from test_data import evil_pickle

# tiny settings: a sample takes a second or two on the tiny model
TINY = ["model=tiny", "trainer=cpu", "lora.enabled=false", "drag.width=64", "drag.n_pix_step=3",
        "drag.num_inference_steps=10", "quiet=true", "trainer.enable_progress_bar=false"]
SIZES = [(96, 64), (80, 80), (64, 96)]


def make_dataset(root: Path) -> Path:
    for i, (w, h) in enumerate(SIZES):
        write_folder_sample(demo_sample(w, h, seed=i), root / f"cat{i % 2}" / f"s{i}")
    return root


def edit_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "edit.py", *TINY, f"data={data}", f"out={out}", *extra]


def subprocess_env() -> dict:
    # the same thread count in every run and process: float reductions, hence images, stay bit-identical
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def finished(out: Path) -> list[str]:
    return sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("dragged_image.png"))


def assert_no_corrupt_file(out: Path):
    for png in out.rglob("*.png"):
        with Image.open(png) as img:
            img.load()
    for js in out.rglob("*.json"):
        json.loads(js.read_text())
    assert not list(out.rglob(".*.tmp")), "temporary files of atomic writes were left behind"




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def killed_and_resumed(dataset, tmp_path_factory, tiny_model_dir):
    """A 1-process run killed once the first sample is written, then the same command run again."""
    out = tmp_path_factory.mktemp("resumed") / "out"
    proc = subprocess.Popen(edit_cmd(dataset, out), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out.exists() and finished(out)):
        assert proc.poll() is None, "the run ended before any sample was written"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = finished(out)
    first = out / at_kill[0] / "dragged_image.png"
    first_state = (first.stat().st_mtime_ns, first.read_bytes())
    rerun = subprocess.run(edit_cmd(dataset, out), cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    return {"out": out, "at_kill": at_kill, "first": first, "first_state": first_state, "rerun": rerun}


def test_killed_run_resumes_with_every_sample_done_once(killed_and_resumed):
    r = killed_and_resumed
    assert 1 <= len(r["at_kill"]) < 3, "the kill came too late to interrupt anything"
    assert r["rerun"].returncode == 0, r["rerun"].stderr[-2000:]
    out = r["out"]
    assert finished(out) == ["cat0/s0", "cat0/s2", "cat1/s1"]
    rows = summary(out)["samples"]
    assert sorted(x["sample"] for x in rows) == ["cat0/s0", "cat0/s2", "cat1/s1"]
    status = {x["sample"]: x["status"] for x in rows}
    assert {s for s, v in status.items() if v == "skipped"} == set(r["at_kill"])  # not redone
    assert all(status[s] == "ok" for s in status if s not in r["at_kill"])
    assert (r["first"].stat().st_mtime_ns, r["first"].read_bytes()) == r["first_state"]
    assert all(x["iterations"] == 3 and x["final_distance_px"] > 0 for x in rows)  # skipped rows read back too
    assert all(x["seconds"] > 0 for x in rows)  # killed: no summary; a skipped row's seconds from its trajectory
    assert_no_corrupt_file(out)
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("sample,status,iterations,final_distance_px,final_distance_of,seconds,error")
    assert len(csv_lines) == 4 and all(",tracked handles," in line for line in csv_lines[1:])


def run_ddp(dataset: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(edit_cmd(dataset, out, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_two_cpu_processes_give_the_one_process_outputs(dataset, killed_and_resumed, tmp_path):
    out = tmp_path / "ddp"
    proc = run_ddp(dataset, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(out)["samples"]
    assert summary(out)["world_size"] == 2
    assert sorted(x["sample"] for x in rows) == ["cat0/s0", "cat0/s2", "cat1/s1"]  # each once: none done twice
    assert all(x["status"] == "ok" for x in rows)
    assert sorted(x["rank"] for x in rows) == [0, 0, 1]  # 3 samples split 2 + 1, no padding
    reference = killed_and_resumed["out"]
    assert finished(out) == finished(reference)
    for name in finished(reference):
        assert (out / name / "dragged_image.png").read_bytes() == (reference / name / "dragged_image.png").read_bytes()
        a = json.loads((out / name / "trajectory.json").read_text())
        b = json.loads((reference / name / "trajectory.json").read_text())
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    # resumed under DDP with one sample left for two processes: one process has nothing to do, none hangs
    redo = out / "cat1" / "s1"
    for f in redo.iterdir():
        f.unlink()
    proc = run_ddp(dataset, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = {x["sample"]: x["status"] for x in summary(out)["samples"]}
    assert status == {"cat0/s0": "skipped", "cat0/s2": "skipped", "cat1/s1": "ok"}
    assert (redo / "dragged_image.png").read_bytes() == (reference / "cat1" / "s1" / "dragged_image.png").read_bytes()


def test_broken_samples_are_reported_and_the_others_finish(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    write_folder_sample(demo_sample(96, 64), data / "good")
    outside = demo_sample(96, 64)
    outside.targets = [(200.0, 10.0)]
    write_folder_sample(outside, data / "target_outside")  # caught by validation, before any model loads
    flat = demo_sample(512, 8)  # valid, but 64 x 1 px at drag.width=64: fails inside the model
    flat.handles, flat.targets, flat.mask = [(100.0, 4.0)], [(120.0, 4.0)], None
    write_folder_sample(flat, data / "too_flat")
    out = tmp_path / "out"
    argv = ["--config", "configs/edit.yaml", *TINY, f"data={data}", f"out={out}"]
    assert edit_cli.main(argv) == 1
    report = capsys.readouterr().out
    assert "3 samples, 2 pairs, 2 valid, 1 invalid" in report and "invalid: target_outside" in report
    rows = {x["sample"]: x for x in summary(out)["samples"]}
    assert rows["good"]["status"] == "ok" and (out / "good" / "dragged_image.png").is_file()
    assert rows["target_outside"]["status"] == "failed" and "outside the image" in rows["target_outside"]["error"]
    assert rows["too_flat"]["status"] == "failed" and rows["too_flat"]["error"]
    assert not (out / "too_flat" / "dragged_image.png").exists()
    # the same command again: the finished sample is skipped, the failed ones are tried again
    assert edit_cli.main(argv) == 1
    rows = {x["sample"]: x["status"] for x in summary(out)["samples"]}
    assert rows == {"good": "skipped", "target_outside": "failed", "too_flat": "failed"}


def test_unsafe_pickle_refuses_the_whole_dataset(tmp_path, capsys):
    data, marker = tmp_path / "data", tmp_path / "pwned"
    write_folder_sample(demo_sample(64, 48), data / "good")
    write_dragbench_sample(demo_sample(64, 48), data / "evil")
    evil_pickle(data / "evil" / "meta_data.pkl", marker)
    out = tmp_path / "out"
    assert edit_cli.main(["--config", "configs/edit.yaml", *TINY, f"data={data}", f"out={out}"]) == 2
    assert "refusing the dataset" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()  # nothing ran, nothing was written


class _FailingJob:
    def __init__(self, exc):
        self.exc = exc

    def run(self, sample, name):
        raise self.exc


@pytest.mark.parametrize("exc,expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    (NonFiniteResultError("drag loss is nan at iteration 4"), "drag loss is nan at iteration 4"),
])
def test_a_failing_sample_becomes_a_failed_row(exc, expected):
    row = run_item(_FailingJob(exc), {"name": "cat/s", "path": "x", "sample": object(), "error": None}, rank=1)
    assert row["status"] == "failed" and row["error"] == expected and row["rank"] == 1 and row["sample"] == "cat/s"


def test_non_finite_losses_or_latents_are_failures():
    check_finite({"loss": [3.0, 2.5]}, torch.zeros(1, 4, 8, 8))
    with pytest.raises(NonFiniteResultError, match="iteration 1"):
        check_finite({"loss": [3.0, float("nan")]}, torch.zeros(1, 4, 8, 8))
    with pytest.raises(NonFiniteResultError, match="latent"):
        check_finite({"loss": [3.0]}, torch.tensor([0.0, float("inf")]))


def test_nested_drag_trainer_stays_out_of_the_cluster(monkeypatch):
    """Inside a SLURM job the per-sample Trainer must not install SLURM's requeue handler of its own."""
    import lightning as L
    from dragdiffusion.policy import DevicePolicy
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
                       "SLURM_JOB_NAME": "drag", "SLURM_JOB_ID": "42", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
                       "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["sigusr1"] = signal.getsignal(signal.SIGUSR1)
            seen["global_rank"] = trainer.global_rank

    before = signal.getsignal(signal.SIGUSR1)
    trainer = DevicePolicy.cpu().trainer(2, [Probe()], quiet=True)
    module = TwoStepModule()
    trainer.fit(module)
    assert seen == {"sigusr1": before, "global_rank": 0}
    assert float(module.w.detach()[0]) < 1.0  # it did train, on its own


def test_lora_pipeline_trains_per_sample_loras_then_reuses_them(tmp_path, tiny_model_dir):
    from dragdiffusion.batch import run_batch, run_lora_batch
    from dragdiffusion.config import LoraTrainConfig, load_config
    data = tmp_path / "data"
    write_folder_sample(demo_sample(96, 64), data / "a" / "s0")
    write_folder_sample(demo_sample(80, 80, seed=1), data / "b" / "s1")
    lora = ["lora.steps=2", "lora.resolution=64", "lora.batch_size=1"]
    loras = tmp_path / "loras"
    cfg = load_config(REPO / "configs" / "lora.yaml", ["model=tiny", "trainer=cpu", "quiet=true",
                      "trainer.enable_progress_bar=false", *lora, f"data={data}", f"out={loras}"], schema=LoraTrainConfig)
    assert run_lora_batch(cfg) == 0
    weights = loras / "a" / "s0" / "pytorch_lora_weights.safetensors"
    assert weights.is_file() and (loras / "b" / "s1" / "pytorch_lora_weights.safetensors").is_file()
    (loras / "b" / "s1" / "pytorch_lora_weights.safetensors").unlink()  # s1 has no LoRA: the pipeline trains it
    out = tmp_path / "out"
    cfg = load_config(REPO / "configs" / "edit.yaml", [*TINY, "lora.enabled=true", *lora, f"data={data}",
                                                       f"out={out}", f"lora_dir={loras}"])
    assert run_batch(cfg) == 0
    t0 = json.loads((out / "a" / "s0" / "trajectory.json").read_text())
    t1 = json.loads((out / "b" / "s1" / "trajectory.json").read_text())
    assert t0["lora"] == str(weights)  # reused, not trained
    assert t1["lora"] == str(out / "b" / "s1" / "lora" / "pytorch_lora_weights.safetensors")
    assert Path(t1["lora"]).is_file()


@pytest.mark.slow
def test_shared_dragbench_subset_end_to_end(dragbench_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--config", "configs/edit.yaml", "model=tiny", "trainer=cpu", "lora.enabled=false", "drag.width=128",
            "drag.n_pix_step=3", "drag.num_inference_steps=10", "quiet=true", "trainer.enable_progress_bar=false",
            f"data={dragbench_dir}", f"out={out}"]
    assert edit_cli.main(argv) == 0
    rows = summary(out)["samples"]
    assert len(rows) == 10 and all(x["status"] == "ok" for x in rows)
    for x in rows:
        src = Image.open(dragbench_dir / x["sample"] / "original_image.png")
        assert Image.open(out / x["sample"] / "dragged_image.png").size == src.size
        assert np.isfinite(x["final_distance_px"])
