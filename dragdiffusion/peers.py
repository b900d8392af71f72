"""The processes of a multi-device batch and what happens when one of them dies.

- Each process records its finished rows as it goes: ``<out>/.rows/rank-<r>.json`` (``RowLog``), rewritten
  atomically after every sample and marked ``done`` when the process has run its whole share. After any crash the
  finished samples are listed there (and their folders are complete: resume skips them).
- The processes meet only at the start and at the end (the rows are gathered to rank 0). Before that gather each
  process waits on the others' row files (``wait_for_peers``), so that none enters a collective with a dead peer
  (NCCL would wait for its whole timeout, holding every GPU of the job). A peer counts as lost when this node saw
  it exit (``WatchfulLauncher``), when the process that launched this one is gone, or when it finished no sample
  for ``trainer.timeout_s`` seconds.
- ``WatchfulLauncher`` replaces Lightning's launcher of the other local processes: Lightning's observer SIGKILLs
  every process of the node (the survivors too) 5 s after one of them dies, before they could write a summary.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch.distributed as dist
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from .errors import PeerLost
from .io import save_json

ROWS_DIR = ".rows"
PEER_LOST_STATUS = PeerLost.exit_status  # 3 (README: Errors and exit statuses)
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "nccl",
                     "Socket Timeout", "timed out", "Broken pipe", "DistNetworkError", "DistBackendError")

_EXITED: dict[int, int] = {}  # global rank -> exit status of the local processes this one launched and saw die
_PARENT = os.getppid()
_LAUNCHED = "LOCAL_RANK" in os.environ  # started by a launcher (Lightning's rank 0, torchrun), not from a shell


# ----------------------------------------------------------------------------------------------- rows on disk

class RowLog:
    """This process's finished rows in ``<out>/.rows/rank-<r>.json``, rewritten atomically after every sample.
    ``run`` tells this run's files from an earlier run's (rank 0 draws it, every process gets it at setup)."""

    def __init__(self, out_root: str | Path, rank: int, world_size: int, run: str, pending: list[str] = ()):
        self.path = Path(out_root) / ROWS_DIR / f"rank-{rank}.json"
        self.rank, self.world_size, self.run = int(rank), int(world_size), str(run)
        self.pending = list(pending)  # every sample this run was to do (all processes)
        self.rows: list[dict] = []
        self.done = False
        self.write()

    def write(self) -> None:
        save_json(self.path, {"run": self.run, "rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                              "done": self.done, "rows": self.rows})

    def add(self, rows: list[dict]) -> None:
        self.rows += list(rows)
        self.write()

    def finish(self) -> None:
        self.done = True
        self.write()

    def remove(self) -> None:
        """A finished run's file (the summary lists its rows); rank 0 also removes earlier runs' files."""
        self.path.unlink(missing_ok=True)
        if self.rank == 0:
            try:  # another process may have removed the folder already (it was the last one out)
                others = list(self.path.parent.glob("rank-*.json"))
            except FileNotFoundError:
                others = []
            for path in others:
                try:
                    if json.loads(path.read_text()).get("run") != self.run:
                        path.unlink(missing_ok=True)
                except (OSError, ValueError, AttributeError):
                    path.unlink(missing_ok=True)
            try:  # half-written files of a process killed while it rewrote its rows (every process is done now)
                for path in self.path.parent.glob(".rank-*.tmp"):
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        try:
            self.path.parent.rmdir()  # the last process out removes the folder
        except OSError:
            pass


def read_logs(out_root: str | Path, run: str) -> dict[int, dict]:
    """The row files of run ``run``: {rank: {"done", "rows", ...}}; unreadable or other runs' files are left out."""
    logs = {}
    for path in (Path(out_root) / ROWS_DIR).glob("rank-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("run") == run:
            logs[int(data["rank"])] = data
    return logs


# ----------------------------------------------------------------------------------------------- lost peers

def exited_children() -> dict[int, int]:
    """{global rank: exit status} of the processes this one launched (Lightning's DDP on one node) that died."""
    return dict(_EXITED)


def parent_gone() -> bool:
    """The launcher of this process is gone (for a DDP process launched by rank 0: rank 0 died). A process
    started from a shell (rank 0, srun's tasks) never counts its parent: a shell may end before the job."""
    return _LAUNCHED and os.getppid() != _PARENT


def wait_for_peers(log: RowLog, timeout_s: float, poll_s: float = 0.2) -> tuple[list[int], str]:
    """Wait until every other process has marked its share done: ([], "") then, or (lost ranks, why) as soon as one
    is known dead or none of those still running finished a sample for ``timeout_s`` seconds."""
    progress: dict[int, tuple[int, float]] = {}  # rank -> (rows seen, when that count was first seen)
    while True:
        logs = read_logs(log.path.parent.parent, log.run)
        waiting = [r for r in range(log.world_size) if r != log.rank and not logs.get(r, {}).get("done")]
        if not waiting:
            return [], ""
        dead = {r: code for r, code in exited_children().items() if r in waiting}
        if dead:
            return sorted(dead), "(" + ", ".join(describe_exit(c) for _, c in sorted(dead.items())) + ")"
        if parent_gone():
            return waiting, "(the process that launched this one is gone)"
        now = time.monotonic()
        for r in waiting:
            count = len(logs.get(r, {}).get("rows", []))
            if r not in progress or progress[r][0] != count:
                progress[r] = (count, now)
        stale = [r for r in waiting if now - progress[r][1] > timeout_s]
        if stale:
            return stale, f"(no sample finished for trainer.timeout_s={timeout_s:g} s)"
        time.sleep(poll_s)


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"


def is_peer_loss(exc: BaseException) -> bool:
    """An error of a collective whose peer is gone (gloo: "Connection closed by peer"; NCCL: a timeout)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{exc.__class__.__name__}: {exc}"
    return isinstance(exc, RuntimeError) and any(m in text for m in PEER_LOSS_MARKERS)


# ----------------------------------------------------------------------------------------------- launching

class WatchfulLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher of the other processes of this node (``python edit.py ...`` again with their local
    rank), with a watcher that records a process that dies instead of Lightning's observer, which SIGKILLs every
    process of the node 5 s later, the survivors included."""

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            threading.Thread(target=self._watch, daemon=True, name="dragdiffusion-process-watch").start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _watch(self) -> None:
        first = self.cluster_environment.node_rank() * self.num_processes + 1  # global rank of the first child
        while True:
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code:
                    _EXITED.setdefault(first + i, code)
            if all(p.returncode is not None for p in self.procs):
                return
            time.sleep(0.2)


def watch_processes(trainer):
    """A distributed Trainer whose DDP processes (``trainer.strategy=ddp``, or ``auto`` resolved to DDP) are
    watched by ``WatchfulLauncher`` instead of Lightning's observer."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        if type(strategy._launcher) is _SubprocessScriptLauncher:
            strategy._launcher = WatchfulLauncher(strategy.cluster_environment, strategy.num_processes,
                                                  strategy.num_nodes)
    return trainer
