"""Dataset readers and writers: DragBench (safe unpickler), our folder format and Drag100 (GoodDrag's)."""
from .readers import (find_samples, read_dragbench_sample, read_drag100_sample, read_folder_sample, read_sample,
                      safe_load_pickle, sample_layout)

__all__ = ["find_samples", "read_dragbench_sample", "read_drag100_sample", "read_folder_sample", "read_sample",
           "safe_load_pickle", "sample_layout"]
