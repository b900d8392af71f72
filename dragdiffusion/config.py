"""Structured configs (dataclasses) and ``load_config(yaml, dotlist)`` with validation.

Every default of ``algorithm.md`` is a field default here, and ``configs/*.yaml`` mirror these classes.
Config groups work like Hydra's: ``model=tiny`` on the command line merges ``configs/model/tiny.yaml``
into ``model``; ``logger=csv`` likewise for ``configs/logger/csv.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "logger", "trainer")


@dataclass
class ModelConfig:
    # hub id, local diffusers folder, single-file checkpoint (.safetensors/.ckpt), or "tiny"
    name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae: Optional[str] = None  # optional separate VAE (hub id or folder), e.g. stabilityai/sd-vae-ft-mse
    single_file_config: Optional[str] = None  # diffusers folder/hub id giving the layout of a single-file checkpoint
    dtype: str = "float32"  # weights dtype: float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    local_files_only: bool = False  # never reach the network (also when HF_HUB_OFFLINE=1)
    tiny_dir: Optional[str] = None  # where the tiny model is written (default: ~/.cache/dragdiffusion)


@dataclass
class LoraConfig:
    enabled: bool = True  # train the identity LoRA before the edit (published default: on)
    path: Optional[str] = None  # an existing LoRA (.safetensors file or folder) to load instead of training
    rank: int = 16
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    steps: int = 80
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    batch_size: int = 4
    resolution: int = 512
    save_every: int = 0  # write intermediate LoRA files every N steps (0 = only the final one)
    seed: int = 0


@dataclass
class DragConfig:
    width: int = 512  # working width; height = int(width * h / w)
    num_inference_steps: int = 50
    inversion_strength: float = 0.7
    guidance_scale: float = 1.0  # classifier-free guidance in the final denoising (1.0 = none)
    n_pix_step: int = 80  # max drag iterations
    lr: float = 0.01
    optimizer: str = "adam"  # adam | adamw | sgd
    r_m: int = 1  # motion-supervision patch radius (grid cells)
    r_p: int = 3  # point-tracking window radius (grid cells)
    lam: float = 0.1  # mask-regularization weight
    stop_distance: float = 2.0  # stop when every handle is within this many grid cells of its target
    sup_res_factor: float = 0.5  # supervision grid = image size x this factor
    feature_blocks: list[int] = field(default_factory=lambda: [2])  # unet.up_blocks indices (concatenated)
    mask_regularization: bool = True
    point_tracking: bool = True


@dataclass
class ReferenceControlConfig:
    enabled: bool = True
    layers: list[str] = field(default_factory=lambda: ["up_blocks.2", "up_blocks.3"])  # prefixes of attn1 names
    start_step: int = 0  # first denoising step (0-based, of the remaining steps) with control
    end_step: Optional[int] = None  # one past the last; None = all


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed
    enable_progress_bar: bool = True
    log_every_n_steps: int = 1


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb | tensorboard | csv
    project: str = "dragdiffusion"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb: online | offline | disabled
    tags: list[str] = field(default_factory=list)
    run_name: Optional[str] = None
    save_dir: str = "logs"
    image_every: int = 10  # trajectory image every K drag steps


@dataclass
class EditConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    drag: DragConfig = field(default_factory=DragConfig)
    reference: ReferenceControlConfig = field(default_factory=ReferenceControlConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # inputs: either a sample folder (DragBench or our format) / dataset, or the four fields below
    sample: Optional[str] = None
    data: Optional[str] = None
    image: Optional[str] = None
    points: Optional[list[Any]] = None  # [[x, y], ...] alternating handle, target (pixels of the input image)
    mask: Optional[str] = None
    prompt: Optional[str] = None
    out: str = "outputs"
    seed: int = 42
    quiet: bool = False


@dataclass
class LoraTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    image: Optional[str] = None
    prompt: Optional[str] = None
    data: Optional[str] = None
    out: str = "outputs/lora"
    quiet: bool = False


def _split_group_overrides(overrides: list[str], config_dir: Path) -> tuple[list[Path], list[str]]:
    """``model=tiny`` -> the file configs/model/tiny.yaml; every other override stays a dotlist item."""
    files, rest = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (for example drag.n_pix_step=40)")
        key, value = item.split("=", 1)
        if key in GROUPS:
            candidate = config_dir / key / f"{value}.yaml"
            if not candidate.exists():
                options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
                raise ConfigError(f"{key}={value}: no such {key} preset; expected one of {options}")
            files.append((key, candidate))
        else:
            rest.append(item)
    return files, rest


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema=EditConfig) -> DictConfig:
    """Merge the dataclass defaults, the YAML file at ``path`` and the ``key=value`` overrides, validated."""
    overrides = list(overrides or [])
    config_dir = Path(path).resolve().parent if path else CONFIG_DIR
    if not (config_dir / "model").is_dir():
        config_dir = CONFIG_DIR
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"--config {path}: file not found")
            cfg = OmegaConf.merge(cfg, _load_yaml_with_groups(Path(path), config_dir))
        group_files, dotlist = _split_group_overrides(overrides, config_dir)
        for key, file in group_files:
            cfg = OmegaConf.merge(cfg, {key: OmegaConf.load(file)})
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        raise ConfigError(f"config key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}".splitlines()[0]) from None
    validate_config(cfg)
    return cfg


def _load_yaml_with_groups(path: Path, config_dir: Path) -> DictConfig:
    """A YAML file may name a group preset as a plain string (``model: tiny``)."""
    raw = OmegaConf.load(path)
    for key in GROUPS:
        if key in raw and isinstance(raw[key], str):
            file = config_dir / key / f"{raw[key]}.yaml"
            if not file.exists():
                raise ConfigError(f"{path}: {key}: {raw[key]}: no such preset {file}")
            raw[key] = OmegaConf.load(file)
    return raw


def validate_config(cfg: DictConfig) -> None:
    """Range checks that the type system cannot express; each error names the key."""
    def check(ok: bool, key: str, expected: str):
        if not ok:
            value = OmegaConf.select(cfg, key)
            raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")

    if "drag" in cfg:
        d = cfg.drag
        check(d.width >= 64 and d.width % 8 == 0, "drag.width", "a multiple of 8, at least 64")
        check(0.0 < d.inversion_strength <= 1.0, "drag.inversion_strength", "a number in (0, 1]")
        check(d.num_inference_steps >= 1, "drag.num_inference_steps", "a positive integer")
        check(d.n_pix_step >= 0, "drag.n_pix_step", "a non-negative integer")
        check(d.lr > 0, "drag.lr", "a positive number")
        check(d.r_m >= 0 and d.r_p >= 0, "drag.r_m", "non-negative radii r_m and r_p")
        check(d.lam >= 0, "drag.lam", "a non-negative number")
        check(0 < d.sup_res_factor <= 1, "drag.sup_res_factor", "a number in (0, 1]")
        check(len(d.feature_blocks) > 0 and all(0 <= b <= 3 for b in d.feature_blocks),
              "drag.feature_blocks", "a non-empty list of up_blocks indices in 0..3")
        check(d.optimizer in ("adam", "adamw", "sgd"), "drag.optimizer", "one of adam, adamw, sgd")
        check(d.guidance_scale >= 1.0, "drag.guidance_scale", "a number >= 1.0")
    if "trainer" in cfg:
        check(str(cfg.trainer.precision) in ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"),
              "trainer.precision", "one of 32, bf16-mixed, 16-mixed")
    if "model" in cfg:
        check(cfg.model.dtype in ("float32", "float16", "bfloat16"), "model.dtype", "float32, float16 or bfloat16")
    if "logger" in cfg:
        check(cfg.logger.name in ("none", "wandb", "tensorboard", "csv"), "logger.name",
              "one of none, wandb, tensorboard, csv")
        check(cfg.logger.mode in ("online", "offline", "disabled"), "logger.mode", "online, offline or disabled")
    if "lora" in cfg:
        check(cfg.lora.rank >= 1, "lora.rank", "a positive integer")
        check(cfg.lora.steps >= 0, "lora.steps", "a non-negative integer")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
