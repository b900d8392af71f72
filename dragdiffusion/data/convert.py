"""Write samples in any of the three layouts and convert whole datasets between them.

  python -m dragdiffusion.data.convert SRC DST --to folder      # DragBench / Drag100 -> our format
  python -m dragdiffusion.data.convert SRC DST --to dragbench   # our format / Drag100 -> DragBench
  python -m dragdiffusion.data.convert SRC DST --to drag100     # any -> Drag100 (GoodDrag's layout)

SRC may mix the layouts. The tree below SRC is mirrored below DST (``<category>/<sample>/``). DragBench pickles
are read with the restricted unpickler and written with plain data only (dict of str, list of [x, y], uint8 numpy
mask). Drag100's image is a JPEG: ``--to drag100`` writes quality 100 without chroma subsampling (near-lossless,
not bit-exact), and a sample's prompt goes into points.json as an extra "prompt" key (Drag100 itself has none).
A sample that cannot be read is reported and skipped; the exit status is 1 if any was.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from ..errors import DragError
from ..io import atomic_write_bytes, save_jpeg, save_json, save_png
from ..sample import DragSample, draw_drag
from .readers import find_samples, read_sample, sample_name

LAYOUTS = ("folder", "dragbench", "drag100")
PICKLE_PROTOCOL = 4  # readable by every Python 3 and numpy 1.x / 2.x


def _number(v: float) -> int | float:
    """DragBench stores integer pixel coordinates; keep a coordinate integral when it is."""
    v = float(v)
    return int(v) if v.is_integer() else v


def write_folder_sample(sample: DragSample, folder: str | Path) -> Path:
    """Our format: image.png, mask.png (when the sample has a mask array), drag.json."""
    folder = Path(folder)
    save_png(folder / "image.png", sample.image)
    if sample.mask is not None:
        save_png(folder / "mask.png", (sample.mask > 0).astype(np.uint8) * 255)
    save_json(folder / "drag.json", {
        "prompt": sample.prompt,
        "handles": [[_number(x), _number(y)] for x, y in sample.handles],
        "targets": [[_number(x), _number(y)] for x, y in sample.targets],
    })
    return folder


def write_dragbench_sample(sample: DragSample, folder: str | Path) -> Path:
    """DragBench: original_image.png, meta_data.pkl {prompt, points, mask}, user_drag.png (for people).

    DragBench always stores a mask; a sample without one gets an all-zero mask, which means the same thing
    (no region constraint)."""
    folder = Path(folder)
    mask = sample.mask if sample.mask is not None else np.zeros((sample.height, sample.width), np.uint8)
    meta = {
        "prompt": sample.prompt,
        "points": [[_number(x), _number(y)] for x, y in sample.points],
        "mask": (np.asarray(mask) > 0).astype(np.uint8),
    }
    save_png(folder / "original_image.png", sample.image)
    save_png(folder / "user_drag.png", draw_drag(sample.image, sample.handles, sample.targets, sample.mask))
    atomic_write_bytes(folder / "meta_data.pkl", pickle.dumps(meta, protocol=PICKLE_PROTOCOL))
    return folder


def write_drag100_sample(sample: DragSample, folder: str | Path) -> Path:
    """Drag100: original.jpg (JPEG quality 100, no chroma subsampling), mask.png (L, 255 = may change; all zero
    for a sample without a mask, as DragBench's), points.json {"points": [[x, y], ...]} alternating handle and
    target (+ "prompt" when the sample has one), image_with_points.jpg (the drag drawn, for people)."""
    folder = Path(folder)
    mask = sample.mask if sample.mask is not None else np.zeros((sample.height, sample.width), np.uint8)
    save_jpeg(folder / "original.jpg", sample.image)
    save_png(folder / "mask.png", (np.asarray(mask) > 0).astype(np.uint8) * 255)
    doc = {"points": [[_number(x), _number(y)] for x, y in sample.points]}
    if sample.prompt:
        doc["prompt"] = sample.prompt
    save_json(folder / "points.json", doc)
    save_jpeg(folder / "image_with_points.jpg", draw_drag(sample.image, sample.handles, sample.targets, sample.mask),
              quality=90)
    return folder


WRITERS = {"folder": write_folder_sample, "dragbench": write_dragbench_sample, "drag100": write_drag100_sample}


def convert_dataset(src: str | Path, dst: str | Path, to: str) -> dict[str, str | None]:
    """Convert every sample below ``src`` into layout ``to`` below ``dst``; {sample name: error or None}."""
    if to not in WRITERS:
        raise DragError(f"--to {to}: expected one of {', '.join(LAYOUTS)}")
    src, dst = Path(src), Path(dst)
    results: dict[str, str | None] = {}
    folders = find_samples(src)
    if not folders:
        raise DragError(f"no samples found below {src}")
    for folder in folders:
        name = sample_name(folder, src)
        try:
            sample = read_sample(folder, name)
        except DragError as exc:  # unsafe pickles included: refused unexecuted, reported, not converted
            results[name] = str(exc)
            continue
        WRITERS[to](sample, dst / name)
        results[name] = None
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragdiffusion.data.convert",
                                     description="Convert a drag dataset between the DragBench layout, ours and "
                                                 "Drag100's.")
    parser.add_argument("src", help="dataset folder (any mix of DragBench, our and Drag100 sample folders)")
    parser.add_argument("dst", help="output folder; the tree below src is mirrored")
    parser.add_argument("--to", required=True, choices=LAYOUTS,
                        help="folder: image.png + drag.json [+ mask.png]; dragbench: original_image.png + "
                             "meta_data.pkl; drag100: original.jpg + mask.png + points.json")
    args = parser.parse_args(argv)
    try:
        results = convert_dataset(args.src, args.dst, args.to)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = {k: v for k, v in results.items() if v}
    for name, error in bad.items():
        print(f"skipped {name}: {error}", file=sys.stderr)
    print(f"converted {len(results) - len(bad)} of {len(results)} samples to {args.to} in {args.dst}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
