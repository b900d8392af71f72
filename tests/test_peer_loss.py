"""A process that dies in a multi-device batch: the survivor lists what finished, says so in one sentence and exits
with status 3; the same command again resumes. The process-group timeout is trainer.timeout_s."""
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy

from conftest import REPO
from dragdiffusion.config import load_config
from dragdiffusion.data.convert import write_folder_sample
from dragdiffusion.demo import demo_sample
from dragdiffusion.errors import ConfigError, PeerLost, exit_status
from dragdiffusion.peers import ROWS_DIR, RowLog, WatchfulLauncher, read_logs, wait_for_peers

TINY = ["model=tiny", "trainer=cpu", "lora.enabled=false", "drag.width=64", "drag.n_pix_step=3",
        "drag.num_inference_steps=10", "quiet=true", "trainer.enable_progress_bar=false"]
DDP2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def six_samples(root: Path) -> Path:
    for i in range(6):
        write_folder_sample(demo_sample(64 + 16 * (i % 3), 64 + 16 * ((i + 1) % 3), seed=i), root / f"c{i % 2}" / f"s{i}")
    return root


def run(data: Path, out: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "edit.py", *TINY, *DDP2, f"data={data}", f"out={out}"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - tic


def test_a_killed_process_is_reported_and_the_same_command_resumes(tiny_model_dir, tmp_path):
    data, out = six_samples(tmp_path / "data"), tmp_path / "out"
    proc, seconds = run(data, out, {"DRAGDIFFUSION_TEST_DIE_AFTER": "1:2"})  # rank 1 SIGKILLs itself after 2
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text
    sentence = [line for line in proc.stderr.splitlines() if "was lost" in line]
    assert len(sentence) == 1, text
    assert "rank 1" in sentence[0] and "killed by signal 9" in sentence[0] and \
        "run the same command again to resume" in sentence[0]
    assert "Traceback" not in text and "GLHF" not in text
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["sample"]: r for r in summary["samples"]}
    assert summary["lost_ranks"] == [1]
    assert sorted(r["rank"] for r in rows.values()).count(1) == 2  # the dead process's finished rows are listed
    assert all(r["status"] == "ok" for r in rows.values())
    assert len(rows) + len(summary["not_finished"]) == 6
    assert set(rows).isdisjoint(summary["not_finished"])
    for name in rows:
        assert (out / name / "dragged_image.png").is_file()
    assert (out / "summary.csv").read_text().count("\n") == len(rows) + 1
    print(f"\nfault run: rank 1 killed after 2 samples; rc 3 after {seconds:.1f} s; {len(rows)} rows "
          f"({summary['counts']}), not finished {summary['not_finished']}\n{sentence[0]}")

    not_run = set(summary["not_finished"])
    again, seconds = run(data, out)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads((out / "summary.json").read_text())
    statuses = {r["sample"]: r["status"] for r in summary["samples"]}
    assert len(statuses) == 6
    assert {n for n, s in statuses.items() if s == "skipped"} == set(rows)  # finished ones are not redone
    assert {n for n, s in statuses.items() if s == "ok"} == not_run  # and the rest is done now
    assert not (out / ROWS_DIR).exists()  # a finished run leaves only the summary
    print(f"resume: rc 0 in {seconds:.1f} s; {summary['counts']}")


def test_a_peer_that_finishes_nothing_for_timeout_s_counts_as_lost(tmp_path):
    mine = RowLog(tmp_path, 0, 2, "run-a", ["x", "y"])
    other = RowLog(tmp_path, 1, 2, "run-a", ["x", "y"])
    other.add([{"sample": "y", "status": "ok"}])
    RowLog(tmp_path, 1, 2, "an earlier run")  # other runs' files are not read
    assert read_logs(tmp_path, "an earlier run")[1]["rows"] == []
    tic = time.monotonic()
    assert wait_for_peers(mine, timeout_s=0.5, poll_s=0.05) == ([1], "(no sample finished for trainer.timeout_s=0.5 s)")
    assert 0.5 <= time.monotonic() - tic < 5
    other = RowLog(tmp_path, 1, 2, "run-a")
    other.finish()
    assert wait_for_peers(mine, timeout_s=0.5) == ([], "")
    assert json.loads((tmp_path / ROWS_DIR / "rank-0.json").read_text())["pid"] == os.getpid()


def test_timeout_s_is_the_process_group_timeout_and_the_launcher_is_watchful():
    from dragdiffusion.batch import make_batch_trainer
    from dragdiffusion.policy import distributed_trainer
    cfg = load_config(REPO / "configs" / "edit.yaml", TINY + DDP2 + ["trainer.timeout_s=42"])
    trainer = distributed_trainer(cfg.trainer)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._timeout == timedelta(seconds=42)
    assert load_config(REPO / "configs" / "edit.yaml", []).trainer.timeout_s == 300
    batch = make_batch_trainer(cfg.trainer, quiet=True)
    assert type(batch.strategy._launcher) is WatchfulLauncher  # not Lightning's observer, which kills survivors
    with pytest.raises(ConfigError, match="trainer.timeout_s"):
        load_config(REPO / "configs" / "edit.yaml", ["trainer.timeout_s=0"])
    assert exit_status(PeerLost("x")) == 3


def test_a_collective_whose_peer_is_gone_is_told_from_other_errors():
    from dragdiffusion.peers import is_peer_loss
    assert is_peer_loss(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                                     "[127.0.0.1]:50401"))
    assert is_peer_loss(RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=3, "
                                     "OpType=ALLGATHER) ran for 300000 milliseconds before timing out"))
    assert not is_peer_loss(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_peer_loss(ValueError("Connection closed by peer"))


def test_the_last_process_out_may_remove_the_rows_folder_before_rank_0_looks(tmp_path):
    """Rank 1 removes its file and then the (empty) folder before rank 0 lists it: no error for rank 0."""
    from dragdiffusion.peers import RowLog
    rank0, rank1 = RowLog(tmp_path, 0, 2, "run"), RowLog(tmp_path, 1, 2, "run")
    rank0.path.unlink()  # rank 0's own file first (the start of its remove)
    rank1.remove()  # rank 1 is the last one out: the folder goes
    assert not (tmp_path / ".rows").exists()
    rank0.remove()  # must not raise (Python 3.11's glob of a missing folder raises FileNotFoundError)
