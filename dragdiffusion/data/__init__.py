"""Dataset readers and writers: DragBench (safe unpickler) and our folder format."""
from .readers import find_samples, read_dragbench_sample, read_folder_sample, read_sample, safe_load_pickle

__all__ = ["find_samples", "read_dragbench_sample", "read_folder_sample", "read_sample", "safe_load_pickle"]
