"""Atomic file writes (write to a temporary name, then rename): a killed run never leaves half a file."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path`` (mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_png(path: str | Path, image) -> Path:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_jpeg(path: str | Path, image, quality: int = 100) -> Path:
    """A JPEG (Drag100's original.jpg): ``quality`` 100 and no chroma subsampling, the least lossy JPEG."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return atomic_write_bytes(path, buf.getvalue())


def save_json(path: str | Path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
