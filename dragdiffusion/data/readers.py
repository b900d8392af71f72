"""Read samples: DragBench (<category>/<sample>/original_image.png + meta_data.pkl) and our format
(<sample>/image.png, optional mask.png, drag.json {"prompt", "handles", "targets"}).

DragBench's meta_data.pkl is a pickle: it is read with a restricted unpickler that admits plain containers,
numbers, strings and numpy arrays only, so a pickle that would call anything else is refused unexecuted.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import SampleError, UnsafePickleError
from ..sample import DEFAULT_LIMITS, DragSample, ReadLimits, check_file_size, make_sample, read_mask

# (module, name) pairs a DragBench pickle may reference: numpy's array and scalar reconstruction (pickle
# protocols 2 to 5, numpy 1.x and 2.x module names) and the latin-1 bytes helper of protocol 2; nothing else.
# None of them runs code given in the pickle: they only build arrays, dtypes, scalars and bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (out-of-band buffers)
    ("numpy._core.numeric", "_frombuffer"),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 writes bytes as ``_codecs.encode(str, "latin1")``: allow exactly that, no other codec."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}: only latin1 is allowed")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refused to load '{module}.{name}': only plain data (dict, list, str, numbers, "
                                "numpy arrays) is allowed in a meta_data.pkl")


def safe_load_pickle(path: str | Path, sample: str | None = None, limits: ReadLimits = DEFAULT_LIMITS):
    """Load a pickle that may hold only plain containers, numbers, strings and numpy arrays.

    A pickle that references anything else raises UnsafePickleError before anything is called; a truncated
    or garbled file raises SampleError (a broken sample, not an attack)."""
    check_file_size(Path(path), "meta_data.pkl", sample, limits)
    data = Path(path).read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated or not a pickle
        raise SampleError("meta_data.pkl", f"{path} is not a readable pickle ({exc.__class__.__name__}: {exc})",
                          sample) from None


def sample_name(folder: Path, root: Path | None = None) -> str:
    """The sample's path below the dataset root (``<category>/<sample>``); its folder name for a lone sample."""
    if root is None or Path(folder) == Path(root):
        return Path(folder).name
    return Path(folder).relative_to(root).as_posix()


def read_dragbench_sample(folder: str | Path, name: str | None = None,
                          limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    folder = Path(folder)
    name = name or folder.name
    meta_path = folder / "meta_data.pkl"
    if not meta_path.exists():
        raise SampleError("meta_data.pkl", f"not found in {folder}", name)
    meta = safe_load_pickle(meta_path, name, limits)
    if not isinstance(meta, dict):
        raise SampleError("meta_data.pkl", f"expected a dict, got {type(meta).__name__}", name)
    for key in ("points",):
        if key not in meta:
            raise SampleError(key, f"missing from {meta_path}", name)
    mask = meta.get("mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool):
            raise SampleError("mask", f"expected an H x W array of 0/1 in {meta_path}, got "
                                      f"{type(meta['mask']).__name__} of shape {mask.shape} ({mask.dtype})", name)
    return make_sample(folder / "original_image.png", meta["points"], mask, str(meta.get("prompt") or ""), name,
                       limits)


def read_folder_sample(folder: str | Path, name: str | None = None,
                       limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    folder = Path(folder)
    name = name or folder.name
    drag_path = folder / "drag.json"
    try:
        check_file_size(drag_path, "drag.json", name, limits)
        drag = json.loads(drag_path.read_text())
    except FileNotFoundError:
        raise SampleError("drag.json", f"not found in {folder}", name) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SampleError("drag.json", f"not valid JSON ({exc})", name) from None
    if not isinstance(drag, dict) or "handles" not in drag or "targets" not in drag:
        raise SampleError("drag.json", 'expected {"prompt": ..., "handles": [[x, y], ...], "targets": [[x, y], ...]}', name)
    handles, targets = drag["handles"], drag["targets"]
    if not isinstance(handles, list) or not isinstance(targets, list):
        raise SampleError("drag.json", f"expected lists of [x, y] for handles and targets, got {handles!r:.60} "
                                       f"and {targets!r:.60}", name)
    if len(handles) != len(targets):
        raise SampleError("drag.json", f"expected as many targets as handles, got {len(handles)} handles and "
                                       f"{len(targets)} targets", name)
    points = [p for pair in zip(handles, targets) for p in pair]
    mask_path = folder / "mask.png"
    mask = read_mask(mask_path, name, limits) if mask_path.exists() else None
    return make_sample(folder / "image.png", points, mask, str(drag.get("prompt") or ""), name, limits)


def is_dragbench_sample(folder: Path) -> bool:
    return (folder / "meta_data.pkl").exists() and (folder / "original_image.png").exists()


def is_folder_sample(folder: Path) -> bool:
    return (folder / "drag.json").exists() and (folder / "image.png").exists()


def read_sample(folder: str | Path, name: str | None = None, limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    """A sample folder in either layout (files within ``limits``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleError("sample", f"folder not found: {folder}", name)
    if (folder / "meta_data.pkl").exists():
        return read_dragbench_sample(folder, name, limits)
    if (folder / "drag.json").exists():
        return read_folder_sample(folder, name, limits)
    raise SampleError("sample", f"{folder} holds neither meta_data.pkl + original_image.png (DragBench) nor "
                                "drag.json + image.png (our format)", name)


def find_samples(root: str | Path) -> list[Path]:
    """Every sample folder under ``root`` (either layout), sorted, so every process sees the same order.

    Symbolic links to folders are followed (a subset made of links works), each real folder once."""
    root = Path(root)
    if not root.is_dir():
        raise SampleError("data", f"dataset folder not found: {root}")
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link cycle or a second link to the same folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # the same walk, hence the same de-duplicated names, in every process
        if "meta_data.pkl" in files or "drag.json" in files:
            found.append(Path(folder))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
