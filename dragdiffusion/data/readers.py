"""Read samples: DragBench (<category>/<sample>/original_image.png + meta_data.pkl), our format
(<sample>/image.png, optional mask.png, drag.json {"prompt", "handles", "targets"}) and Drag100, GoodDrag's
benchmark (<name>/original.jpg, mask.png, points.json {"points": [[x, y], ...]} alternating handle, target; the
prompt is empty; image_with_points.jpg is a picture for people and is not read).

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
from ..sample import DEFAULT_LIMITS, DragSample, ReadLimits, check_file_size, make_sample, open_image, read_mask

# the file that marks a sample folder of each layout, in the order read_sample tries them
LAYOUT_MARKERS = {"dragbench": "meta_data.pkl", "folder": "drag.json", "drag100": "points.json"}
DRAG100_POINTS_FORM = '{"points": [[x, y], ...]} (pixel pairs alternating handle and target)'

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


def read_json(folder: Path, file: str, name: str, limits: ReadLimits):
    """``folder/file`` parsed as JSON, within ``limits``; a SampleError naming the file when missing or not JSON."""
    path = folder / file
    try:
        check_file_size(path, file, name, limits)
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SampleError(file, f"not found in {folder}", name) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SampleError(file, f"not valid JSON ({exc})", name) from None


def read_folder_sample(folder: str | Path, name: str | None = None,
                       limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    folder = Path(folder)
    name = name or folder.name
    drag = read_json(folder, "drag.json", name, limits)
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


def read_drag100_mask(path: str | Path, sample: str | None = None, limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    """A Drag100 mask.png: 255 = may change. An RGB(A) or palette mask counts by its first (red) channel, as
    GoodDrag's own loader does (``mask[:, :, 0]``); a grayscale one by its value. Editable = value > 127 (the
    threshold of our mask.png; Drag100's masks hold only 0 and 255, so > 0 would give the same masks)."""
    with open_image(path, "mask", sample, limits) as img:
        if img.mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            arr = np.asarray(img.convert("RGB"))[..., 0]
        else:
            arr = np.asarray(img.convert("L"))
    return (arr > 127).astype(np.uint8)


def read_drag100_sample(folder: str | Path, name: str | None = None,
                        limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    """A Drag100 sample folder: original.jpg, mask.png (optional here: none = no region constraint), points.json.

    points.json may also hold a "prompt" (written by ``convert --to drag100`` for a sample that has one; GoodDrag's
    scripts ignore it); Drag100's own samples have none: the prompt is empty."""
    folder = Path(folder)
    name = name or folder.name
    data = read_json(folder, "points.json", name, limits)
    if not isinstance(data, dict) or "points" not in data:
        got = f"a dict with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise SampleError("points.json", f"expected {DRAG100_POINTS_FORM}, got {got}", name)
    if not isinstance(data["points"], list):
        raise SampleError("points.json", f"expected {DRAG100_POINTS_FORM}, got points={data['points']!r:.60}", name)
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise SampleError("prompt", f"expected a string in {folder / 'points.json'}, got {type(prompt).__name__}", name)
    mask_path = folder / "mask.png"
    mask = read_drag100_mask(mask_path, name, limits) if mask_path.exists() else None
    return make_sample(folder / "original.jpg", data["points"], mask, prompt, name, limits)


def is_dragbench_sample(folder: Path) -> bool:
    return (folder / "meta_data.pkl").exists() and (folder / "original_image.png").exists()


def is_folder_sample(folder: Path) -> bool:
    return (folder / "drag.json").exists() and (folder / "image.png").exists()


def is_drag100_sample(folder: Path) -> bool:
    return (folder / "points.json").exists() and (folder / "original.jpg").exists()


def sample_layout(folder: str | Path) -> str | None:
    """The layout of a sample folder by its marker file (dragbench, folder, drag100; the first that is there), or
    None for a folder that is no sample."""
    folder = Path(folder)
    return next((layout for layout, marker in LAYOUT_MARKERS.items() if (folder / marker).exists()), None)


LAYOUTS_HELP = ("meta_data.pkl + original_image.png (DragBench), drag.json + image.png (our format) or "
                "points.json + original.jpg (Drag100)")


def read_sample(folder: str | Path, name: str | None = None, limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    """A sample folder in any of the three layouts (files within ``limits``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleError("sample", f"folder not found: {folder}", name)
    layout = sample_layout(folder)
    if layout is None:
        raise SampleError("sample", f"{folder} holds none of {LAYOUTS_HELP}", name)
    return READERS[layout](folder, name, limits)


def find_samples(root: str | Path) -> list[Path]:
    """Every sample folder under ``root`` (any layout, mixed), sorted, so every process sees the same order.

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
        if any(marker in files for marker in LAYOUT_MARKERS.values()):
            found.append(Path(folder))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


READERS = {"dragbench": read_dragbench_sample, "folder": read_folder_sample, "drag100": read_drag100_sample}
