"""Reuse what an edit computed before: identity LoRAs and inversions, keyed by exactly what they depend on.

Two stores, one key discipline:

- **On disk** (``DiskCache``): ``<root>/<kind>/<hash>/`` holds one payload file (safetensors: ``lora`` entries
  hold the standard diffusers ``pytorch_lora_weights.safetensors``, ``inversion`` entries ``inversion.safetensors``)
  and ``key.json``, the key itself (the hash is the sha256 of its canonical JSON). A lookup is a hit only when
  ``key.json`` equals the wanted key and the payload then loads; anything else (a missing, truncated, corrupt or
  foreign file) is ignored with a ``CacheWarning`` and built again. Nothing is ever unpickled: tensors come from
  safetensors, the key from JSON. Writes are atomic (a unique temporary name in the entry folder, then
  ``os.replace``; ``key.json`` last), so a killed run leaves no file a later run would load, and two processes
  writing the same key both leave a valid entry (the last rename wins). After a write, the least recently used
  entries go until the cache is within ``cache.max_bytes`` (a hit refreshes its entry's ``key.json`` time).
- **In memory** (``MemoryStore``, ``INVERSIONS``): the inversions of this process (the app, a batch, repeated
  ``DragEditor.edit`` calls), least recently used out beyond ``cache.memory_bytes``.

The root: ``cache.dir``, else ``$DRAGDIFFUSION_EDIT_CACHE``, else ``$DRAGDIFFUSION_CACHE`` (where the tiny model also
goes), else ``~/.cache/dragdiffusion``. ``python -m dragdiffusion.cache list|info|clear`` shows and empties it.

What identifies a base model: ``backbone.model_identity`` (a local folder or file by ``path_identity`` here).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .io import atomic_write_bytes

CACHE_VERSION = 1  # bump when what a key means changes: every older entry then misses
KEY_FILE = "key.json"
KINDS = ("lora", "inversion")
INVERSION_FILE = "inversion.safetensors"
SMALL_FILE_BYTES = 2 ** 20  # model files up to this size are identified by their content, larger ones by size + time
MAX_KEY_BYTES = 2 ** 20  # a key.json larger than this is not read (not one of ours)


class CacheWarning(UserWarning):
    """A cache entry was ignored (corrupt, truncated, foreign) or could not be written; the work is redone."""


def warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------- keys

def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_tensor(x: torch.Tensor | np.ndarray) -> str:
    """sha256 of a tensor's shape, dtype and raw bytes (on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().numpy()
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{list(x.shape)}".encode())
    h.update(x.tobytes())
    return h.hexdigest()


def canonical(key: dict) -> str:
    """The key as canonical JSON (sorted keys, no spaces): what ``key_hash`` hashes and ``key.json`` holds."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def key_hash(key: dict) -> str:
    """The entry name of a key: 32 hex digits of the sha256 of its canonical JSON."""
    return digest_bytes(canonical(key).encode())[:32]


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    if stat.st_size <= SMALL_FILE_BYTES:
        return {"sha256": digest_bytes(path.read_bytes())}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def path_identity(path: str | Path) -> dict:
    """A local file or folder: its files (relative names) with the content hash of the small ones and the size
    and modification time of the large ones; hidden files and folders (``.cache``, ``.git``) are left out."""
    path = Path(os.path.expanduser(str(path))).resolve()
    if path.is_file():
        return {"file": path.name, **_file_identity(path)}
    files = {}
    for folder, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            file = Path(folder) / name
            files[file.relative_to(path).as_posix()] = _file_identity(file)
    return {"folder": digest_bytes(canonical(files).encode())}


def cache_root(directory: str | None = None) -> Path:
    """The root of the edit caches: ``cache.dir``, else $DRAGDIFFUSION_EDIT_CACHE, else $DRAGDIFFUSION_CACHE, else
    $XDG_CACHE_HOME/dragdiffusion or ~/.cache/dragdiffusion."""
    root = directory or os.environ.get("DRAGDIFFUSION_EDIT_CACHE") or os.environ.get("DRAGDIFFUSION_CACHE") or \
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dragdiffusion")
    return Path(os.path.expanduser(str(root)))


# ----------------------------------------------------------------------------------------------- keyed folders

def read_key(folder: Path) -> dict | None:
    """``folder/key.json`` as a dict; None when missing. A ValueError when unreadable or not a key."""
    file = folder / KEY_FILE
    if not file.is_file():
        return None
    if file.stat().st_size > MAX_KEY_BYTES:
        raise ValueError(f"{file}: larger than {MAX_KEY_BYTES} bytes")
    try:
        key = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not JSON ({exc.__class__.__name__})") from None
    if not isinstance(key, dict):
        raise ValueError(f"{file}: not a JSON object")
    return key


def write_key(folder: Path, key: dict) -> Path:
    return atomic_write_bytes(folder / KEY_FILE, (json.dumps(key, indent=1, sort_keys=True) + "\n").encode())


def keyed_file(folder: Path, key: dict, filename: str, foreign_warns: bool = True) -> Path | None:
    """``folder/filename`` when ``folder/key.json`` is exactly ``key`` (the payload then still has to load);
    None otherwise. An unreadable key, or (``foreign_warns``) another key under this key's name, warns."""
    try:
        found = read_key(folder)
    except (OSError, ValueError) as exc:
        warn(f"cache: ignoring {folder} ({exc}); it is made again")
        return None
    if found is None:
        return None
    if found != key:
        if foreign_warns:
            warn(f"cache: ignoring {folder}: its key.json holds another key; it is made again")
        return None
    file = folder / filename
    return file if file.is_file() else None


def save_tensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: a unique temporary name beside it, then ``os.replace``."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


@dataclass
class Entry:
    kind: str
    folder: Path
    size: int
    last_used: float  # key.json's modification time (refreshed by every hit), else the folder's
    key: dict | None


class DiskCache:
    """The on-disk entries under ``root`` (``<root>/<kind>/<hash>/``), at most ``max_bytes`` in all."""

    def __init__(self, root: str | Path, max_bytes: int = 4 * 2 ** 30):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def folder(self, kind: str, key: dict) -> Path:
        return self.root / kind / key_hash(key)

    def find(self, kind: str, key: dict, filename: str) -> Path | None:
        """The payload of ``key``'s entry if its key.json matches (its use time refreshed), else None."""
        folder = self.folder(kind, key)
        file = keyed_file(folder, key, filename) if folder.is_dir() else None
        if file is not None:
            try:
                os.utime(folder / KEY_FILE)  # least recently used goes first
            except OSError:
                pass  # a read-only cache still serves
        return file

    def store(self, kind: str, key: dict, write: Callable[[Path], Path]) -> Path | None:
        """Make ``key``'s entry: ``write(folder)`` writes the payload atomically and returns it, then key.json is
        written (last: an entry without it is never a hit) and old entries are evicted. A failure to write (full or
        read-only disk) warns and returns None: the edit goes on without the cache."""
        folder = self.folder(kind, key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            file = write(folder)
            write_key(folder, key)
        except OSError as exc:
            warn(f"cache: could not write {folder} ({exc.strerror or exc}); going on without it")
            return None
        self.evict(keep=folder)
        return file

    def reject(self, file: Path, reason: str) -> None:
        """A payload that did not load: warn, and remove the entry's key so that it is made again."""
        warn(f"cache: ignoring {file} ({reason}); it is made again")
        try:
            (file.parent / KEY_FILE).unlink(missing_ok=True)
        except OSError:
            pass

    def entries(self, kinds=KINDS) -> list[Entry]:
        out = []
        for kind in kinds:
            base = self.root / kind
            if not base.is_dir():
                continue
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                try:
                    key = read_key(folder)
                    used = (folder / KEY_FILE).stat().st_mtime if key is not None else folder.stat().st_mtime
                except (OSError, ValueError):
                    key, used = None, 0.0
                out.append(Entry(kind, folder, size, used, key))
        return out

    def evict(self, keep: Path | None = None) -> list[Entry]:
        """Remove the least recently used entries (never ``keep``) until the cache holds at most ``max_bytes``."""
        try:
            entries = sorted(self.entries(), key=lambda e: e.last_used)
        except OSError:
            return []  # another process removed an entry while we looked: its own eviction runs
        total = sum(e.size for e in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and entry.folder == keep:
                continue
            shutil.rmtree(entry.folder, ignore_errors=True)
            total -= entry.size
            removed.append(entry)
        return removed

    def clear(self, kinds=KINDS) -> tuple[int, int]:
        """Remove every entry of ``kinds``: (entries, bytes) removed."""
        entries = self.entries(kinds)
        for entry in entries:
            shutil.rmtree(entry.folder, ignore_errors=True)
        return len(entries), sum(e.size for e in entries)


# ----------------------------------------------------------------------------------------------- inversions

@dataclass
class InversionRecord:
    """What an inversion leaves for the drag: the inverted latent ``z_t`` and, for a method that records more
    during the inversion (FastDrag's self-attention keys and values per timestep, say), named ``extras``.

    A method that records extras names them in the inversion key (``extras``) so that a record without them is
    never a hit for it, and puts them here; they are stored like ``z_t`` (memory, and safetensors as
    ``extra.<name>``). Tensors taken from a record are shared with the store: read them, never change them in
    place (``z_t`` is handed out as a copy)."""
    z_t: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.z_t, *self.extras.values()])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"z_t": self.z_t, **{f"extra.{k}": v for k, v in self.extras.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], device=None) -> "InversionRecord":
        if "z_t" not in tensors:
            raise ValueError("no z_t tensor")
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        return cls(move(tensors["z_t"]), {k[len("extra."):]: move(v) for k, v in tensors.items()
                                          if k.startswith("extra.")})

    def save(self, file: Path) -> Path:
        return save_tensors(file, self.tensors(), {"format": "pt", "kind": "dragdiffusion-inversion"})

    @classmethod
    def load(cls, file: Path, device=None) -> "InversionRecord":
        # copies, not views of the mapped file (a file changed in place under a mapping crashes its reader)
        return cls.from_tensors({k: v.clone() for k, v in load_file(str(file)).items()}, device)


class MemoryStore:
    """Records of this process by key hash, least recently used out beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 * 2 ** 20):
        self.max_bytes = int(max_bytes)
        self.records: OrderedDict[str, InversionRecord] = OrderedDict()

    def get(self, key: dict) -> InversionRecord | None:
        name = key_hash(key)
        record = self.records.get(name)
        if record is not None:
            self.records.move_to_end(name)
        return record

    def put(self, key: dict, record: InversionRecord, max_bytes: int | None = None) -> None:
        if max_bytes is not None:
            self.max_bytes = int(max_bytes)
        name = key_hash(key)
        self.records[name] = record
        self.records.move_to_end(name)
        while self.records and sum(r.nbytes for r in self.records.values()) > self.max_bytes:
            self.records.popitem(last=False)

    def clear(self) -> None:
        self.records.clear()

    def __len__(self) -> int:
        return len(self.records)


INVERSIONS = MemoryStore()  # the inversions of this process (shared by every editor, like the loaded model)


# ----------------------------------------------------------------------------------------------- command line

def describe(entry: Entry) -> str:
    """One line about an entry: kind, name, size, when last used, and what its key says in short."""
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)) if entry.last_used else "?"
    key = entry.key or {}
    if entry.key is None:
        what = "incomplete (no key.json)"
    elif entry.kind == "lora":
        lora = key.get("lora", {})
        what = (f"prompt {key.get('prompt')!r}, {lora.get('steps')} steps lr {lora.get('lr')} at "
                f"{lora.get('resolution')} px")
    else:
        what = f"prompt {key.get('prompt')!r}, working size {key.get('working_size')}, " \
               f"{len(key.get('inversion_timesteps', []))} steps"
    return f"{entry.kind:9} {entry.folder.name}  {entry.size / 2 ** 20:8.2f} MiB  {used}  {what}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dragdiffusion.cache",
        description="The identity LoRA and inversion cache of edits (README: Caching). list: one line per entry; "
                    "info: where it is and how big; clear: remove the entries.")
    parser.add_argument("command", choices=["list", "info", "clear"])
    parser.add_argument("--dir", default=None, help="the cache root (cache.dir); default: $DRAGDIFFUSION_EDIT_CACHE, "
                                                     "$DRAGDIFFUSION_CACHE or ~/.cache/dragdiffusion")
    parser.add_argument("--kind", choices=list(KINDS), default=None, help="only this kind of entry")
    args = parser.parse_args(argv)
    cache = DiskCache(cache_root(args.dir))
    kinds = [args.kind] if args.kind else list(KINDS)
    if args.command == "clear":
        count, size = cache.clear(kinds)
        print(f"removed {count} entries ({size / 2 ** 20:.1f} MiB) from {cache.root}")
        return 0
    entries = cache.entries(kinds)
    if args.command == "list":
        for entry in sorted(entries, key=lambda e: e.last_used):
            print(describe(entry))
    print(f"{cache.root}: " + ", ".join(
        f"{sum(e.kind == k for e in entries)} {k} entries ({sum(e.size for e in entries if e.kind == k) / 2 ** 20:.1f}"
        " MiB)" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
