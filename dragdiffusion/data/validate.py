"""Check every sample of a dataset up front (before any model loads) and report which are bad and why.

  python -m dragdiffusion.data.validate DIR      # exit 0: all good, 1: some bad, 2: unsafe pickle / no data

Each sample (DragBench, our format or Drag100, mixed in one tree) is read exactly as an edit would read it:
images decoded, points paired and inside the image, mask of the image's size, pickles through the restricted
unpickler. A pickle that would call code is marked
``unsafe``: batch runs refuse the whole dataset then, rather than skip it quietly.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import DragError, SampleError, UnsafePickleError
from ..sample import ALL_ZERO_MASK, DEFAULT_LIMITS, ReadLimits
from .readers import LAYOUTS_HELP, find_samples, read_sample, sample_name


@dataclass
class SampleCheck:
    name: str  # path below the dataset root, e.g. animals/JH_2023-09-14-1838-08
    path: Path
    error: str | None = None  # why the sample cannot be edited; None = good
    unsafe: bool = False  # its meta_data.pkl would have run code
    pairs: int = 0  # handle/target pairs (of a valid sample)
    all_zero_mask: bool = False  # its mask marks nothing: no region constraint

    @property
    def ok(self) -> bool:
        return self.error is None


def check_sample(folder: Path, root: Path, limits: ReadLimits = DEFAULT_LIMITS) -> SampleCheck:
    name = sample_name(folder, root)
    try:
        sample = read_sample(folder, name, limits)
    except UnsafePickleError as exc:
        return SampleCheck(name, folder, str(exc), unsafe=True)
    except DragError as exc:
        return SampleCheck(name, folder, str(exc))
    return SampleCheck(name, folder, pairs=len(sample.handles), all_zero_mask=sample.all_zero_mask)


def check_dataset(root: str | Path, limits: ReadLimits = DEFAULT_LIMITS) -> list[SampleCheck]:
    """One SampleCheck per sample folder below ``root``, in the sorted order every process agrees on."""
    root = Path(root)
    checks = [check_sample(folder, root, limits) for folder in find_samples(root)]
    if not checks:
        raise SampleError("data", f"no samples found below {root}; expected sample folders holding "
                                  f"{LAYOUTS_HELP}")
    return checks


def format_report(checks: list[SampleCheck]) -> str:
    bad = [c for c in checks if not c.ok]
    pairs = sum(c.pairs for c in checks)
    lines = [f"{len(checks)} samples, {pairs} pairs, {len(checks) - len(bad)} valid, {len(bad)} invalid"]
    lines += [f"  {'UNSAFE' if c.unsafe else 'invalid'}: {c.name}: {c.error}" for c in bad]
    zero = [c.name for c in checks if c.all_zero_mask]
    if zero:
        shown = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
        lines.append(f"  note: {len(zero)} sample(s) ({shown}): {ALL_ZERO_MASK}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragdiffusion.data.validate",
                                     description="Check every sample of a drag dataset and report the bad ones.")
    parser.add_argument("data", help="dataset folder (DragBench layout, ours, Drag100's, or a mix)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_LIMITS.max_image_pixels,
                        help="refuse images of more pixels (default: %(default)s, limits.max_image_pixels)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_LIMITS.max_file_bytes,
                        help="refuse larger files (default: %(default)s, limits.max_file_bytes)")
    args = parser.parse_args(argv)
    try:
        checks = check_dataset(args.data, ReadLimits(args.max_image_pixels, args.max_file_bytes))
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(checks))
    if any(c.unsafe for c in checks):
        return 2
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
