"""Input errors come before the heavy imports: edit.py and train.py check images, points, masks and the model path
with PIL, numpy and omegaconf only, so a bad input exits 2 in about a second, not after torch, Lightning and
diffusers (20-40 s on a loaded machine) have been imported. Each command runs in a subprocess that reports, when it
ends, which heavy modules were imported (``benchmarks/bench_input_errors.py`` times the same cases)."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

HEAVY = ("torch", "lightning", "diffusers", "transformers")
# runs a command-line script as __main__ and says, at its exit, which heavy modules it imported
PROBE = ("import runpy, sys\n"
         "sys.argv = sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "finally:\n"
         f"    heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
         "    print('heavy imports: ' + (', '.join(heavy) or 'none'), file=sys.stderr)\n")


def run_script(script: str, *args: str, env: dict | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    buf = io.BytesIO()
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    (folder / "corrupt.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])  # a JPEG cut in half
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "mask10.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(folder / "mask0.png")
    return folder


GOOD = ["points=[[1,2],[30,4]]", "lora.enabled=false"]
CASES = {  # name: (overrides, what the error says)
    "points outside the image": (["points=[[1,2],[70,4]]"], "target 0 at (x=70.0, y=4.0) is outside the image"),
    "a corrupt JPEG": (["image={f}/corrupt.jpg"], "cannot read"),
    "a missing image": (["image={f}/missing.png"], "file not found"),
    "a mask of another size": (["mask={f}/mask10.png"], "mask is 10x10 px but the image is 60x40"),
    "a missing checkpoint file": (["model.name_or_path={f}/missing.safetensors"],
                                  "checkpoint file not found"),
    "a missing model folder": (["model.name_or_path={f}/models/sd15"], "folder not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_edit_input_errors_come_before_torch_is_imported(files, tmp_path, case):
    overrides, says = CASES[case]
    args = [f"image={files}/a.png", *GOOD, f"out={tmp_path / 'out'}"] + [o.format(f=files) for o in overrides]
    rc, text = run_script("edit.py", *args)
    assert rc == 2, text
    assert says in text and "Traceback" not in text
    assert "heavy imports: none" in text, text
    if "checkpoint" in case:  # the error says what forms model.name_or_path takes
        assert "a hub id" in text and "a local diffusers folder" in text and ".safetensors or .ckpt" in text
        assert "tiny" in text


def test_a_missing_dataset_folder_is_said_before_torch_is_imported(tmp_path):
    for script in ("edit.py", "train.py"):
        rc, text = run_script(script, f"data={tmp_path / 'no-such-dataset'}", f"out={tmp_path / 'out'}")
        assert rc == 2 and "data: folder not found" in text and "heavy imports: none" in text, text


def test_train_input_errors_come_before_torch_is_imported(files, tmp_path):
    rc, text = run_script("train.py", f"image={files}/corrupt.jpg", f"out={tmp_path / 'lora'}")
    assert rc == 2 and "cannot read" in text and "heavy imports: none" in text, text
    rc, text = run_script("train.py", f"image={files}/a.png", f"model.name_or_path={files}/missing.ckpt",
                          f"out={tmp_path / 'lora'}")
    assert rc == 2 and "checkpoint file not found" in text and "heavy imports: none" in text, text
    rc, text = run_script("train.py", f"sample={files}/no-such-sample", f"out={tmp_path / 'lora'}")
    assert rc == 2 and "folder not found" in text and "heavy imports: none" in text, text


def test_an_all_zero_mask_and_several_devices_are_said(files, tmp_path):
    """What a single edit takes differently from what was asked is said in one line each (here before the missing
    model ends the run)."""
    rc, text = run_script("edit.py", f"image={files}/a.png", *GOOD, f"mask={files}/mask0.png", "trainer.devices=2",
                          f"model.name_or_path={files}/missing.safetensors", f"out={tmp_path / 'out'}")
    assert rc == 2 and "heavy imports: none" in text, text
    assert "the mask is all zero: no region constraint" in text
    assert "trainer.devices=2" in text and "a single edit runs in one process on one device" in text
    # a batch's validation report says it too
    from dragdiffusion.data.convert import write_folder_sample
    from dragdiffusion.data.validate import check_dataset, format_report
    from dragdiffusion.sample import make_sample
    write_folder_sample(make_sample(files / "a.png", [[1, 2], [30, 4]], np.zeros((40, 60), np.uint8)),
                        tmp_path / "data" / "s")
    assert "note: 1 sample(s) (s): the mask is all zero: no region constraint" in \
        format_report(check_dataset(tmp_path / "data"))


def test_a_hub_id_without_network_fails_at_once(files, tmp_path):
    """No network and no cached copy: one error naming the hub id, the cache and the fix, without the hub client's
    half minute of retries (the endpoint here is a closed local port: connection refused)."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    rc, text = run_script("edit.py", f"image={files}/a.png", *GOOD, "model.name_or_path=some-org/not-a-model",
                          f"out={tmp_path / 'out'}", env=env)
    assert rc == 2 and "heavy imports: none" in text, text
    assert "'some-org/not-a-model' is a hub id" in text and "cannot be reached" in text and "hf download" in text
    assert "Retrying" not in text and "stacktrace" not in text


def test_the_light_model_check_knows_the_tiny_models():
    """inputs.py cannot import tiny.py (torch): its list of the built-in names must be tiny.py's."""
    from dragdiffusion.inputs import TINY_NAMES
    from dragdiffusion.tiny import TINY_MODELS
    assert sorted(TINY_NAMES) == sorted(TINY_MODELS)
