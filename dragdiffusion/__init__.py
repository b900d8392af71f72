"""DragDiffusion point-based image editing as PyTorch Lightning modules."""

from .noise import drop_library_noise

__version__ = "0.1.0"

drop_library_noise()  # library messages never about the user's input (noise.py), before diffusers is imported
