"""Output folders: checked before any model loads, never clobbered by surprise, resumed only when the settings
that shape the results are the same."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# what one edit writes into its folder (EditResult.save, edit.py generate=true, the LoRA stage)
EDIT_OUTPUTS = {"dragged_image.png", "drag_input.png", "drag_paths.png", "trajectory.json", "config.yaml",
                "generated_image.png", "lora"}
# config keys whose change changes an edit's result (resume compares them); the rest (devices, logging, out,
# paths of LoRAs found per sample) does not
MODEL_RESULT_KEYS = ("model.name_or_path", "model.vae", "model.unet", "model.single_file_config", "model.dtype",
                     "trainer.precision")
EDIT_RESULT_KEYS = MODEL_RESULT_KEYS + ("method", "drag", "lora", "reference", "seed", "gooddrag", "dragnoise",
                                        "freedrag", "fastdrag", "text")
# a method's own section matters only to runs of that method
METHOD_SECTIONS = {m: m for m in ("gooddrag", "dragnoise", "freedrag", "fastdrag")}
SWITCHED_SECTIONS = {"text": "text.optimize"}  # a section that matters only when its switch is on in either run
LORA_RESULT_KEYS = MODEL_RESULT_KEYS + ("lora",)
IGNORED = ("lora.path", "lora.save_every")


def check_writable(folder: str | Path, key: str = "out") -> Path:
    """A ConfigError ``<key>=...: not writable`` unless files can be created in ``folder`` (made if missing).
    Tested by creating and removing a file in the folder or its nearest existing parent; nothing is left."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key}={folder}: not writable ({probe} is a file, not a folder)")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{key}={folder}: not writable ({exc.strerror or exc.__class__.__name__})") from None
    return folder


def prepare_edit_folder(folder: str | Path, overwrite: bool) -> str | None:
    """A single edit's ``out``: writable, and empty or an earlier edit's output (replaced then: the returned line
    says so). A folder holding anything else is refused unless ``overwrite=true``."""
    folder = check_writable(folder)
    if not folder.is_dir():
        return None
    names = {p.name for p in folder.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    if not names:
        return None
    foreign = sorted(names - EDIT_OUTPUTS)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"out={folder}: the folder holds files that are not an earlier edit's output ({shown}); "
                          "choose another out=, or give overwrite=true to write into it anyway")
    return f"note: out={folder} holds an earlier output; it is replaced"


def setting(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True, enum_to_str=True) if OmegaConf.is_config(value) else \
        (str(value) if hasattr(value, "value") else value)


def changed_settings(saved: DictConfig, run: DictConfig, keys=EDIT_RESULT_KEYS) -> list[str]:
    """``key: saved -> run`` for every result-shaping setting (leaves under ``keys``) that differs."""
    changes = []
    methods = {str(setting(c, "method") or "dragdiffusion") for c in (saved, run)}  # older runs: dragdiffusion
    for key in keys:
        if key in METHOD_SECTIONS.values() and not any(METHOD_SECTIONS.get(m) == key for m in methods):
            continue
        if key in SWITCHED_SECTIONS and not any(setting(c, SWITCHED_SECTIONS[key]) for c in (saved, run)):
            continue  # off in both (older results have no such section)
        a, b = setting(saved, key), setting(run, key)
        if key == "method":
            a, b = a or "dragdiffusion", b or "dragdiffusion"
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            for sub in sorted(set(a) | set(b)):
                full = f"{key}.{sub}"
                if full not in IGNORED and a.get(sub) != b.get(sub):
                    changes.append(f"{full}: {a.get(sub)!r} -> {b.get(sub)!r}")
        elif key not in IGNORED and a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def saved_config(folder: Path) -> DictConfig | None:
    """The config.yaml an earlier run wrote into a sample's folder (None if missing or unreadable)."""
    try:
        return OmegaConf.load(folder / "config.yaml")
    except Exception:  # noqa: BLE001 - a missing or garbled file: no saved settings
        return None
