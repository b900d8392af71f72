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
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
PRECISION_ALIASES = {"32-true": "32", "16": "16-mixed", "bf16": "bf16-mixed"}
PRECISION_EXPECTED = "one of 32, 16-mixed, bf16-mixed (32-true, 16 and bf16 are accepted as aliases)"


def normalize_precision(value) -> str:
    """``trainer.precision`` as one of PRECISIONS; a ConfigError listing every accepted value otherwise."""
    text = str(value)
    text = PRECISION_ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise ConfigError(f"config key 'trainer.precision' = {value!r}: expected {PRECISION_EXPECTED}")
    return text


@dataclass
class ModelConfig:
    # hub id, local diffusers folder, single-file checkpoint (.safetensors/.ckpt), or "tiny"
    name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae: Optional[str] = None  # optional separate VAE (hub id or folder), e.g. stabilityai/sd-vae-ft-mse
    single_file_config: Optional[str] = None  # diffusers folder/hub id giving the layout of a single-file checkpoint
    dtype: str = "auto"  # frozen weights: auto (half on a GPU under mixed precision) | float32 | float16 | bfloat16
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
    cache_latents: bool = True  # VAE-encode the image once and crop views in latent space (false: every view, every step)
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward: far less memory, ~30% slower


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
    precision: str = "32"  # 32 | 16-mixed | bf16-mixed (dragdiffusion.policy: one policy for every stage)
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
    image_every: int = 10  # trajectory image every K drag steps (0 = only at the end)
    image_source: str = "input"  # trajectory drawn on: input | estimate (decoded x0 of z_t: +1 UNet, +1 VAE call)


@dataclass
class GenerationConfig:
    """The generated-image path (``generate=true``): the image is sampled from ``prompt``, then dragged."""
    seed: int = 42  # seed of the initial noise
    guidance_scale: float = 7.5  # classifier-free guidance of the sampling (and of the drag's features)
    steps: int = 50  # DDIM sampling steps; the drag works on the latent kept at drag.inversion_strength
    width: int = 512
    height: int = 512
    negative_prompt: str = ""


@dataclass
class AppConfig:
    """The browser app (python -m dragdiffusion.app): bound to this machine unless asked otherwise."""
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False  # a public gradio.live link only when asked
    max_queue: int = 16  # requests waiting beyond this are refused; device jobs run one at a time


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
    generate: bool = False  # sample the image from `prompt` (generation.*) instead of reading one
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    app: AppConfig = field(default_factory=AppConfig)
    out: str = "outputs"
    lora_dir: Optional[str] = None  # data=DIR with lora.enabled: reuse <lora_dir>/<sample>/pytorch_lora_weights.safetensors
    seed: int = 42
    quiet: bool = False
    evaluate: bool = False  # after a data=DIR batch run, evaluate the results (DragBench MD / IF)
    evaluate_overrides: list[str] = field(default_factory=list)  # key=value items for configs/evaluate.yaml


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
    ckpt_path: Optional[str] = None  # resume from a Lightning checkpoint (written every lora.save_every steps)
    quiet: bool = False


@dataclass
class MeanDistanceConfig:
    """DragBench Mean Distance: DIFT point matching between the source and the edited image."""
    t: int = 261  # DIFT timestep
    up_block: int = 1  # DIFT features: output of unet.up_blocks[up_block]
    ensemble_size: int = 8  # noises averaged per image
    width: Optional[int] = None  # DIFT working width (height keeps the aspect); None = each image's own size
    search: str = "full"  # full | mask (m-MD: search matches only inside the sample's mask)
    normalize: str = "none"  # none | diagonal (distance / image diagonal)
    seed: int = 0  # mixed with each sample's name: the noise of a sample never depends on order or devices
    chunk_rows: int = 64  # image rows matched at once (memory bound only; results do not depend on it)


@dataclass
class ImageFidelityConfig:
    """DragBench Image Fidelity: 1 - LPIPS between the source and the edited image."""
    enabled: bool = True
    net: str = "alex"  # LPIPS backbone: alex | vgg | squeeze
    size: int = 224  # both images are resized to size x size


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="stabilityai/stable-diffusion-2-1"))
    mean_distance: MeanDistanceConfig = field(default_factory=MeanDistanceConfig)
    image_fidelity: ImageFidelityConfig = field(default_factory=ImageFidelityConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    results: Optional[str] = None  # results folder laid out as the data: <category>/<sample>/<result_name>
    data: Optional[str] = None  # the dataset (DragBench layout or ours)
    result_name: str = "dragged_image.png"
    resize_mismatched: bool = False  # resize an edited image of another size to the source's (else reported)
    out: Optional[str] = None  # where the tables go (default: the results folder)
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
        normalize_precision(cfg.trainer.precision)
    if "model" in cfg:
        check(cfg.model.dtype in ("auto", "float32", "float16", "bfloat16"), "model.dtype",
              "auto, float32, float16 or bfloat16")
    if "logger" in cfg:
        check(cfg.logger.name in ("none", "wandb", "tensorboard", "csv"), "logger.name",
              "one of none, wandb, tensorboard, csv")
        check(cfg.logger.mode in ("online", "offline", "disabled"), "logger.mode", "online, offline or disabled")
        check(cfg.logger.image_every >= 0, "logger.image_every", "a non-negative integer (0 = only at the end)")
        check(cfg.logger.image_source in ("input", "estimate"), "logger.image_source", "input or estimate")
    if cfg.get("evaluate"):
        check(bool(cfg.data), "evaluate", "evaluate=true only with a batch run: data=DIR")
    if "mean_distance" in cfg:
        m = cfg.mean_distance
        check(0 <= m.t <= 999, "mean_distance.t", "a timestep in 0..999")
        check(0 <= m.up_block <= 3, "mean_distance.up_block", "an up_blocks index in 0..3")
        check(m.ensemble_size >= 1, "mean_distance.ensemble_size", "a positive integer")
        check(m.width is None or (m.width >= 8 and m.width % 8 == 0), "mean_distance.width",
              "null (each image's own size) or a multiple of 8, at least 8")
        check(m.search in ("full", "mask"), "mean_distance.search", "full or mask")
        check(m.normalize in ("none", "diagonal"), "mean_distance.normalize", "none or diagonal")
        check(m.chunk_rows >= 1, "mean_distance.chunk_rows", "a positive integer")
    if "image_fidelity" in cfg:
        check(cfg.image_fidelity.net in ("alex", "vgg", "squeeze"), "image_fidelity.net", "alex, vgg or squeeze")
        check(cfg.image_fidelity.size >= 32, "image_fidelity.size", "an image size of at least 32")
    if "generation" in cfg:
        g = cfg.generation
        check(g.guidance_scale >= 1.0, "generation.guidance_scale", "a number >= 1.0")
        check(g.steps >= 1, "generation.steps", "a positive integer")
        check(g.width >= 64 and g.width % 8 == 0, "generation.width", "a multiple of 8, at least 64")
        check(g.height >= 64 and g.height % 8 == 0, "generation.height", "a multiple of 8, at least 64")
    if "app" in cfg:
        check(0 <= cfg.app.port <= 65535, "app.port", "a port number in 0..65535 (0 = any free port)")
        check(cfg.app.max_queue >= 1, "app.max_queue", "a positive integer")
    if "lora" in cfg:
        check(cfg.lora.rank >= 1, "lora.rank", "a positive integer")
        check(cfg.lora.steps >= 0, "lora.steps", "a non-negative integer")
        check(cfg.lora.alpha > 0, "lora.alpha", "a positive number")
        check(cfg.lora.lr > 0, "lora.lr", "a positive number")
        check(cfg.lora.batch_size >= 1, "lora.batch_size", "a positive integer")
        check(cfg.lora.resolution >= 64 and cfg.lora.resolution % 8 == 0, "lora.resolution",
              "a multiple of 8, at least 64")
        check(cfg.lora.save_every >= 0, "lora.save_every", "a non-negative integer (0 = final file only)")
        check(len(cfg.lora.betas) == 2 and all(0 <= b < 1 for b in cfg.lora.betas), "lora.betas",
              "two numbers in [0, 1)")
        check(len(cfg.lora.target_modules) > 0, "lora.target_modules", "a non-empty list of layer names")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def cli_parser(doc: str, default_config: str):
    """The command-line shape shared by edit.py, train.py and the other entry points: --config + key=value items.

    ``doc``'s first line is the description, the rest the epilog (examples, main keys, exit status)."""
    import argparse
    lines = doc.split("\n")
    parser = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]).strip("\n"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (OmegaConf dotlist)")
    return parser
