"""DragSample (image, handles, targets, mask, prompt), its validation, and pixel <-> grid geometry.

Coordinates: pixels (x, y) of the sample's own image at every interface; (row, col) on the supervision
grid only inside the math (motion.py; ``geometry.py`` converts as tensors). Validation runs before any model is
loaded, and this module needs no torch: ``edit.py`` and ``train.py`` check their inputs before the heavy imports
(``inputs.py``).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import SampleError


ALL_ZERO_MASK = "the mask is all zero: no region constraint (the whole image may change; the mask term is off)"


@dataclass
class DragSample:
    image: np.ndarray  # H x W x 3 uint8 RGB
    handles: list[tuple[float, float]]  # pixels (x, y)
    targets: list[tuple[float, float]]  # pixels (x, y)
    mask: np.ndarray | None = None  # H x W uint8 in {0, 1}, 1 = may change; None or all-zero = no constraint
    prompt: str = ""
    name: str = "sample"
    meta: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def points(self) -> list[tuple[float, float]]:
        """Alternating handle, target, handle, target... as in DragBench's meta_data."""
        out = []
        for h, t in zip(self.handles, self.targets):
            out += [tuple(h), tuple(t)]
        return out

    @property
    def has_mask(self) -> bool:
        return self.mask is not None and bool(np.any(self.mask))

    @property
    def all_zero_mask(self) -> bool:
        """A mask was given but marks nothing: taken as no region constraint (``ALL_ZERO_MASK`` says so)."""
        return self.mask is not None and not self.has_mask

    def validate(self) -> "DragSample":
        validate_sample(self)
        return self


# ----------------------------------------------------------------------------------------------- reading

def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL image (grayscale, RGBA, palette, 16-bit) -> H x W x 3 uint8 RGB. Alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


@dataclass(frozen=True)
class ReadLimits:
    """What an input file may be: at most ``max_file_bytes`` on disk and ``max_image_pixels`` (width x height) when
    decoded. A small PNG can claim 15000 x 12000 pixels (a decompression bomb); the limits refuse it unread.
    The config keys ``limits.max_image_pixels`` and ``limits.max_file_bytes`` set them."""
    max_image_pixels: int = 50_000_000  # 8000 x 6000 is fine; DragBench's largest is 512 x 913
    max_file_bytes: int = 200 * 2 ** 20

    @classmethod
    def from_config(cls, cfg) -> "ReadLimits":
        limits = cfg.get("limits") if hasattr(cfg, "get") else None
        if limits is None:
            return cls()
        return cls(int(limits.max_image_pixels), int(limits.max_file_bytes))


DEFAULT_LIMITS = ReadLimits()


def check_file_size(path: Path, field_name: str, sample: str | None, limits: ReadLimits) -> None:
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise SampleError(field_name, f"{path} is {size} bytes, more than limits.max_file_bytes="
                                      f"{limits.max_file_bytes}", sample)


EXIF_ORIENTATION = 0x0112  # 1 = as stored; 3 = turned 180; 6 / 8 = turned 90 (width and height swap); 2, 4, 5, 7 mirrored


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation tag (1 when it has none or it cannot be read)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: read the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def upright(img: Image.Image, close: bool = True) -> Image.Image:
    """The image as viewers show it (a phone photo's EXIF orientation applied), without the tag; the image itself
    when it needs no turn. Points, masks and outputs are all in this orientation."""
    if exif_orientation(img) == 1:
        return img
    try:
        turned = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block: read the pixels as stored
        return img
    if close and turned is not img:
        img.close()
    return turned


def open_image(path: str | Path, field_name: str, sample: str | None, limits: ReadLimits) -> Image.Image:
    """A decoded PIL image, within ``limits``, turned as viewers show it (EXIF orientation applied: ``upright``);
    a SampleError naming the field otherwise (never a traceback)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(field_name, f"file not found: {path}", sample)
    if not path.is_file():
        raise SampleError(field_name, f"{path} is not a file", sample)
    check_file_size(path, field_name, sample, limits)
    too_big = (f"{path} is too large to decode: more than limits.max_image_pixels={limits.max_image_pixels} "
               "pixels (a huge image, or a decompression bomb)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(path)
            w, h = img.size  # stored size: width x height is the same once turned (a PNG's EXIF is read on load)
            if w * h > limits.max_image_pixels:
                img.close()
                raise SampleError(field_name, f"{too_big.split(':')[0]}: {w}x{h} = {w * h} pixels, more than "
                                              f"limits.max_image_pixels={limits.max_image_pixels}", sample)
            img.load()
            return upright(img)
    except Image.DecompressionBombError:
        raise SampleError(field_name, too_big, sample) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise SampleError(field_name, f"cannot read {path} as an image ({exc.__class__.__name__}: {exc})",
                          sample) from None


def read_image(path: str | Path, field_name: str = "image", sample: str | None = None,
               limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    with open_image(path, field_name, sample, limits) as img:
        return to_rgb_uint8(img)


def read_mask(path: str | Path, sample: str | None = None, limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    """A mask image: any pixel brighter than 127 (luminance) is editable."""
    with open_image(path, "mask", sample, limits) as img:
        arr = np.asarray(img.convert("L"))
    return (arr > 127).astype(np.uint8)


POINTS_FORM = ("a list of [x, y] pixel pairs, alternating handle and target, for example "
               "points='[[120, 80], [160, 80]]' (one handle at x=120, y=80 dragged to x=160, y=80)")


def points_count(n: int) -> str:
    """How points are counted, on the command line and in the app: "2 points = 1 handle/target pair", "3 points =
    1 handle/target pair + 1 handle without its target"."""
    pairs, odd = divmod(int(n), 2)
    text = f"{n} point{'s' if n != 1 else ''} = {pairs} handle/target pair{'s' if pairs != 1 else ''}"
    return text + (" + 1 handle without its target" if odd else "")


def split_points(points: Sequence, sample: str | None = None) -> tuple[list, list]:
    """[[x, y], ...] alternating handle, target -> (handles, targets)."""
    try:
        if isinstance(points, (str, bytes)) or any(isinstance(p, (str, bytes)) or len(p) != 2 for p in points):
            raise ValueError
        pts = [(float(p[0]), float(p[1])) for p in points]
    except (TypeError, ValueError, IndexError):
        raise SampleError("points", f"got {_short(points)}; expected {POINTS_FORM}", sample) from None
    if len(pts) == 0:
        raise SampleError("points", f"no points given; expected {POINTS_FORM}", sample)
    if len(pts) % 2:
        raise SampleError("points", f"odd number of points ({points_count(len(pts))}); expected handle/target "
                                    "pairs (handle, target, handle, target, ...)", sample)
    return pts[0::2], pts[1::2]


def _short(value) -> str:
    text = repr(value if not hasattr(value, "_content") else list(value))
    return text if len(text) <= 60 else text[:57] + "..."


def parse_points(points) -> list:
    """Points as given: a list of [x, y] (also an OmegaConf list), or its JSON text '[[x, y], ...]'."""
    if isinstance(points, str):
        try:
            return json.loads(points)
        except json.JSONDecodeError:
            raise SampleError("points", f"cannot parse {points!r} as JSON; expected {POINTS_FORM}") from None
    if points is None:
        raise SampleError("points", f"none given; expected {POINTS_FORM}")
    try:
        return list(points)
    except TypeError:
        raise SampleError("points", f"got {_short(points)}; expected {POINTS_FORM}") from None


def make_sample(image, points, mask=None, prompt: str = "", name: str = "sample",
                limits: ReadLimits = DEFAULT_LIMITS) -> DragSample:
    """Build and validate a sample from paths or arrays. Files are read (and checked) before the points;
    images are converted to RGB, not rejected."""
    img = read_image(image, "image", name, limits) if isinstance(image, (str, Path)) else _as_rgb_array(image, name)
    if isinstance(mask, (str, Path)):
        m = read_mask(mask, name, limits)
    elif mask is None:
        m = None
    else:
        m = (np.asarray(mask) > 0).astype(np.uint8)
        if m.ndim == 3:
            m = m[..., 0]
    handles, targets = split_points(parse_points(points), name)
    return DragSample(img, handles, targets, m, prompt or "", name).validate()


def _as_rgb_array(image, name) -> np.ndarray:
    if isinstance(image, Image.Image):
        return to_rgb_uint8(upright(image, close=False))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SampleError("image", f"expected an H x W x 3 array, got shape {arr.shape}", name)
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    return arr[..., :3].copy()


def validate_sample(s: DragSample) -> None:
    if s.image.ndim != 3 or s.image.shape[2] != 3 or s.image.dtype != np.uint8:
        raise SampleError("image", f"expected H x W x 3 uint8, got {s.image.shape} {s.image.dtype}", s.name)
    h, w = s.height, s.width
    if h < 8 or w < 8:
        raise SampleError("image", f"image of {w}x{h} px is too small; expected at least 8x8", s.name)
    if len(s.handles) != len(s.targets) or not s.handles:
        raise SampleError("points", "expected as many targets as handles, at least one pair", s.name)
    for kind, pts in (("handle", s.handles), ("target", s.targets)):
        for i, (x, y) in enumerate(pts):
            if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                raise SampleError("points", f"{kind} {i} at (x={x}, y={y}) is outside the image "
                                            f"(expected 0 <= x <= {w - 1}, 0 <= y <= {h - 1})", s.name)
    if s.mask is not None:
        if s.mask.shape != (h, w):
            raise SampleError("mask", f"mask is {s.mask.shape[1]}x{s.mask.shape[0]} px but the image is {w}x{h}; "
                                      "expected the same size", s.name)
    if not isinstance(s.prompt, str):
        raise SampleError("prompt", f"expected a string, got {type(s.prompt).__name__}", s.name)




# ----------------------------------------------------------------------------------------------- geometry

def working_size(width: int, height: int, working_width: int) -> tuple[int, int]:
    """(W, H) of the working image: width ``working_width``, height int(working_width * h / w)."""
    return working_width, int(working_width * height / width)


def grid_size(work_w: int, work_h: int, factor: float) -> tuple[int, int]:
    """(sup_h, sup_w) of the supervision grid: int(factor * size)."""
    return int(factor * work_h), int(factor * work_w)


# ----------------------------------------------------------------------------------------------- drawing

def arrow_head(tail_xy, tip_xy, size: float) -> list[tuple[float, float]] | None:
    """The triangle of an arrowhead of ``size`` px ending just before ``tip_xy`` (None for a zero-length arrow)."""
    d = np.array([tip_xy[0] - tail_xy[0], tip_xy[1] - tail_xy[1]], np.float64)
    n = np.linalg.norm(d)
    if n < 1e-6:
        return None
    d /= n
    side = np.array([-d[1], d[0]])
    tip = np.array(tip_xy, np.float64) - d * size
    return [tuple(tip), tuple(tip - d * 2 * size + side * size), tuple(tip - d * 2 * size - side * size)]


def draw_drag(image: np.ndarray, handles, targets, mask: np.ndarray | None = None, paths=None) -> Image.Image:
    """The image with the mask tinted, handles red, targets blue, an arrow (with its head) from each handle to its
    target, and the handles' paths (yellow) if given."""
    img = Image.fromarray(image).convert("RGB")
    if mask is not None and np.any(mask):
        tint = np.asarray(img, dtype=np.float32)
        m = mask.astype(bool)
        tint[m] = tint[m] * 0.7 + np.array([255, 255, 255]) * 0.3
        img = Image.fromarray(tint.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = max(2, round(min(img.size) / 100))
    if paths is not None:
        for path in paths:
            draw.line([tuple(map(float, p)) for p in path], fill=(255, 200, 0), width=max(1, r // 2))
    for (hx, hy), (tx, ty) in zip(handles, targets):
        draw.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, r // 2))
        head = arrow_head((hx, hy), (tx, ty), r + 1)
        if head is not None:
            draw.polygon(head, fill=(255, 255, 255))
        draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(230, 30, 30))
        draw.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(30, 80, 230))
    return img
