"""Shared fixtures: the tiny model, the shared DragBench subset, small edit settings."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
DRAGBENCH = REPO.parent / "shared" / "data" / "dragbench-sample"

# Small, fast edit settings for the tiny model (the published defaults are the config's own).
TINY_EDIT = ["model=tiny", "trainer=cpu", "lora.enabled=false", "drag.width=128", "drag.n_pix_step=8",
             "quiet=true"]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tiny model's tensors are small: one thread is faster than two (no thread-pool spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def session_edit_cache(tmp_path_factory):
    """Module- and session-scoped fixtures run before a test's own empty cache is set: they get this session's,
    never the user's ~/.cache."""
    previous = os.environ.get("DRAGDIFFUSION_EDIT_CACHE")
    os.environ["DRAGDIFFUSION_EDIT_CACHE"] = str(tmp_path_factory.mktemp("session-edit-cache"))
    yield
    if previous is None:
        os.environ.pop("DRAGDIFFUSION_EDIT_CACHE", None)
    else:
        os.environ["DRAGDIFFUSION_EDIT_CACHE"] = previous


@pytest.fixture(autouse=True)
def empty_edit_cache(tmp_path_factory, monkeypatch):
    """Every test starts with an empty edit cache (identity LoRAs and inversions: its own folder, which
    subprocesses inherit through the environment, and nothing in memory): nothing carries over between tests, and
    nothing goes to the user's ~/.cache."""
    from dragdiffusion.cache import INVERSIONS
    monkeypatch.setenv("DRAGDIFFUSION_EDIT_CACHE", str(tmp_path_factory.mktemp("edit-cache")))
    INVERSIONS.clear()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from dragdiffusion.tiny import ensure_tiny_model
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def dragbench_dir() -> Path:
    if not DRAGBENCH.is_dir():
        pytest.skip(f"the shared DragBench subset is not at {DRAGBENCH}")
    return DRAGBENCH


@pytest.fixture(scope="session")
def tiny_editor(tiny_model_dir):
    """One DragEditor on the tiny model; tests change ``editor.cfg`` copies, not this one."""
    from dragdiffusion.editor import DragEditor
    return DragEditor.from_config(REPO / "configs" / "edit.yaml", TINY_EDIT)


def editor_with(base, overrides: list[str]):
    """A DragEditor sharing ``base``'s loaded backbone with extra overrides."""
    from dragdiffusion.config import load_config
    from dragdiffusion.editor import DragEditor
    cfg = load_config(REPO / "configs" / "edit.yaml", TINY_EDIT + list(overrides))
    return DragEditor(cfg, backbone=base.backbone)


class TwoStepModule(L.LightningModule):
    """One parameter, two training steps: for tests of the Trainer plumbing itself."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        return (self.w ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(2), batch_size=1)
