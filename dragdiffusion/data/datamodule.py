"""The DataModule of batch runs: the samples still to do, split over processes with no sample twice.

Rank 0 decides which samples are still to do (the others may list the output folder a moment later, or
through a lagging network file system) and broadcasts the list; every rank then takes every
``world_size``-th sample from its rank on. Unlike torch's DistributedSampler this never pads a short shard
by repeating samples, so each sample is edited exactly once (the Trainer runs with
``use_distributed_sampler=False`` so that it keeps this sampler).
"""
from __future__ import annotations

from typing import Callable, Iterator

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DragError
from ..sample import DEFAULT_LIMITS, ReadLimits
from .readers import read_sample


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of ``range(n)`` for ``rank`` of ``world_size``: disjoint, covering, never padded."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
    return list(range(rank, n, world_size))


class ShardSampler(Sampler[int]):
    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = shard_indices(n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SampleFolders(Dataset):
    """Items {name, path, sample, error}: reading errors travel as data so one bad sample stops nothing."""

    def __init__(self, entries: list[tuple[str, str]], limits: ReadLimits = DEFAULT_LIMITS):
        self.entries = list(entries)
        self.limits = limits

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        name, path = self.entries[i]
        try:
            return {"name": name, "path": path, "sample": read_sample(path, name, self.limits), "error": None}
        except DragError as exc:
            return {"name": name, "path": path, "sample": None, "error": str(exc)}


def as_list(batch: list) -> list:
    """Collate: keep the items as they are (samples have different sizes)."""
    return batch


class DragDataModule(L.LightningDataModule):
    """Serves the samples of ``entries`` [(name, folder)] for which ``is_done(name)`` is false.

    After ``setup`` on rank 0, ``skipped`` holds the names found done already (resume)."""

    def __init__(self, entries: list[tuple[str, str]], is_done: Callable[[str], bool], num_workers: int = 0,
                 limits: ReadLimits = DEFAULT_LIMITS):
        super().__init__()
        self.limits = limits
        self.entries = [(str(n), str(p)) for n, p in entries]
        self.is_done = is_done
        self.num_workers = num_workers
        self.pending: list[tuple[str, str]] = []
        self.skipped: list[str] = []

    def setup(self, stage: str) -> None:
        pending = None
        if self.trainer is None or self.trainer.is_global_zero:
            pending = [e for e in self.entries if not self.is_done(e[0])]
        if self.trainer is not None:
            pending = self.trainer.strategy.broadcast(pending, src=0)
        self.pending = [tuple(e) for e in pending]
        todo = {n for n, _ in self.pending}
        self.skipped = [n for n, _ in self.entries if n not in todo]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # DragSamples stay numpy arrays; the per-sample job moves what it needs

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(SampleFolders(self.pending, self.limits), batch_size=1, sampler=ShardSampler(len(self.pending), rank, world),
                          collate_fn=as_list, num_workers=self.num_workers)


class StepIndices(Dataset):
    """One dummy item per optimization step, for modules that make their own inputs (drag, identity LoRA)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i
