"""Structured configs: the dataclasses below are the one source of every default and type.

Every default of ``algorithm.md`` is a field default here. ``configs/*.yaml`` hold only what a preset changes
(``python edit.py --print-config`` prints the whole resolved config). "One of" fields are Enums, so OmegaConf
refuses another value with the list of accepted ones; range checks live in each dataclass's ``__post_init__``
and run through ``OmegaConf.to_object`` (``validate_config``). Config groups work like Hydra's: ``model=tiny``
resets the ``model`` section to its defaults and merges ``configs/model/tiny.yaml``; likewise ``logger=`` and
``trainer=``.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "logger", "trainer")
MODEL_GROUP = "model"  # a model preset may also set per-backbone defaults of these sections (configs/model/*.yaml)
MODEL_PRESET_SECTIONS = ("drag", "reference", "lora", "generation")
MODEL_PRESET_KEYS = ("width",)  # top-level keys a model preset may set (its backbone's working width)
METHOD_GROUP = "method"  # a method preset sets keys of several sections (configs/method/*.yaml)
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


def runs_on_one_device(trainer_cfg) -> bool:
    """``trainer.devices`` = 1 (or one listed device) on one node: the policy's single-device Trainer."""
    devices = trainer_cfg.devices
    one = devices == 1 or (OmegaConf.is_list(devices) or isinstance(devices, (list, tuple))) and len(devices) == 1
    return bool(one) and int(trainer_cfg.num_nodes) == 1


def check(ok: bool, key: str, value, expected: str) -> None:
    """A range check of ``__post_init__``: a ConfigError naming the key, its value and what was expected."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


class Choice(str, Enum):
    """A "one of" config value: compares, prints and formats as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class MethodName(Choice):
    """The drag method (``method=``): each has a preset with its published defaults in configs/method/."""
    dragdiffusion = "dragdiffusion"
    gooddrag = "gooddrag"
    dragnoise = "dragnoise"
    freedrag = "freedrag"
    fastdrag = "fastdrag"

    @property
    def optimizes(self) -> bool:
        """Its drag is a fit (an optimizer), so the DragText switch ``text.optimize`` applies (FastDrag's is a warp)."""
        return self is not MethodName.fastdrag


TEXT_SUFFIX = "+text"  # method=gooddrag+text: the method with DragText (text.optimize=true)


def split_method_name(name: str) -> tuple[str, bool]:
    """("gooddrag", True) for "gooddrag+text"; ("gooddrag", False) for "gooddrag"."""
    name = str(name)
    return (name[:-len(TEXT_SUFFIX)], True) if name.endswith(TEXT_SUFFIX) else (name, False)


def method_label(cfg) -> str:
    """The name results go by: the method, with "+text" when DragText optimizes its text embedding too (summaries,
    evaluation tables, trajectory.json, the folders of a ``methods=[...]`` batch)."""
    name = str(cfg.get("method", MethodName.dragdiffusion.value))
    text = cfg.get("text", None)
    on = text is not None and bool(text.get("optimize", False))
    return name + TEXT_SUFFIX if on and MethodName(name).optimizes else name


def method_names() -> list[str]:
    """Every method name ``method=`` takes, each optimizing one also with DragText ("gooddrag+text")."""
    names = []
    for m in sorted(MethodName, key=lambda m: m.value):
        names += [m.value] + ([m.value + TEXT_SUFFIX] if m.optimizes else [])
    return names


def check_method_names(names, key: str = "methods") -> None:
    """Each a known method, optionally with "+text" (only for a method that optimizes), no repeats."""
    known = [m.value for m in MethodName]
    bad = [n for n in names if split_method_name(n)[0] not in known
           or (split_method_name(n)[1] and not MethodName(split_method_name(n)[0]).optimizes)]
    check(not bad and len(set(names)) == len(names), key, list(names),
          f"distinct method names from {known}, each optionally with {TEXT_SUFFIX} (DragText) except fastdrag "
          "(no optimizer)")


class WeightDtype(Choice):
    auto = "auto"  # float16 under 16-mixed on a GPU, bfloat16 under bf16-mixed, else float32
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Optimizer(Choice):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class LoggerName(Choice):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"
    csv = "csv"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ImageSource(Choice):
    input = "input"
    estimate = "estimate"


class SearchMode(Choice):
    full = "full"
    mask = "mask"


class Normalize(Choice):
    none = "none"
    diagonal = "diagonal"


class FillMode(Choice):
    interpolation = "interpolation"  # vectorized: the holes from the cells filled before the fill
    sequential = "sequential"  # FastDrag's code: hole by hole in raster order, in place (slower)


class LpipsNet(Choice):
    alex = "alex"
    vgg = "vgg"
    squeeze = "squeeze"


@dataclass
class ModelConfig:
    # hub id, local diffusers folder, single-file checkpoint (.safetensors/.ckpt), or "tiny"
    name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae: Optional[str] = None  # optional separate VAE (hub id or folder), e.g. stabilityai/sd-vae-ft-mse
    # optional UNet from another folder or hub id (its config.json, or a pipeline's unet/ subfolder) beside the base
    # model's text encoder(s) and VAE, e.g. FastDrag's LCM-distilled UNet: SimianLuo/LCM_Dreamshaper_v7
    unet: Optional[str] = None
    single_file_config: Optional[str] = None  # diffusers folder/hub id giving the layout of a single-file checkpoint
    dtype: WeightDtype = WeightDtype.auto  # frozen weights (dragdiffusion.policy decides "auto")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    local_files_only: bool = False  # never reach the network (also when HF_HUB_OFFLINE=1)
    tiny_dir: Optional[str] = None  # where the tiny model is written (default: ~/.cache/dragdiffusion)
    channels_last: bool = False  # the UNet in channels_last memory layout (faster convolutions on some GPUs)
    compile: bool = False  # torch.compile of the UNet's transformer blocks (a one-time warm-up; eager on failure)
    # recompute the UNet's activations in the backward of the drag and the LoRA stage (lora.gradient_checkpointing
    # is the LoRA stage's alone): far less memory (SDXL at 1024 px), about one more UNet forward per step
    gradient_checkpointing: bool = False


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

    def __post_init__(self):
        check(self.rank >= 1, "lora.rank", self.rank, "a positive integer")
        check(self.steps >= 0, "lora.steps", self.steps, "a non-negative integer")
        check(self.alpha > 0, "lora.alpha", self.alpha, "a positive number")
        check(self.lr > 0, "lora.lr", self.lr, "a positive number")
        check(self.batch_size >= 1, "lora.batch_size", self.batch_size, "a positive integer")
        check(self.resolution >= 64 and self.resolution % 8 == 0, "lora.resolution", self.resolution,
              "a multiple of 8, at least 64")
        check(self.save_every >= 0, "lora.save_every", self.save_every, "a non-negative integer (0 = final file only)")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "lora.betas", list(self.betas),
              "two numbers in [0, 1)")
        check(len(self.target_modules) > 0, "lora.target_modules", list(self.target_modules),
              "a non-empty list of layer names")


@dataclass
class DragConfig:
    width: int = 512  # working width; height = int(width * h / w)
    num_inference_steps: int = 50
    inversion_strength: float = 0.7
    guidance_scale: float = 1.0  # classifier-free guidance in the final denoising (1.0 = none)
    n_pix_step: int = 80  # max drag iterations
    lr: float = 0.01
    optimizer: Optimizer = Optimizer.adam
    r_m: int = 1  # motion-supervision patch radius (grid cells)
    r_p: int = 3  # point-tracking window radius (grid cells)
    lam: float = 0.1  # mask-regularization weight
    stop_distance: float = 2.0  # stop when every handle is within this many grid cells of its target
    sup_res_factor: float = 0.5  # supervision grid = image size x this factor
    feature_blocks: list[int] = field(default_factory=lambda: [2])  # unet.up_blocks indices (concatenated)
    mask_regularization: bool = True
    point_tracking: bool = True

    def __post_init__(self):
        check(self.width >= 64 and self.width % 8 == 0, "drag.width", self.width, "a multiple of 8, at least 64")
        check(0.0 < self.inversion_strength <= 1.0, "drag.inversion_strength", self.inversion_strength,
              "a number in (0, 1]")
        check(round(self.num_inference_steps * self.inversion_strength) >= 1, "drag.inversion_strength",
              self.inversion_strength, f"at least one inverted step: round({self.num_inference_steps} x strength) >= 1")
        check(self.num_inference_steps >= 1, "drag.num_inference_steps", self.num_inference_steps, "a positive integer")
        check(self.n_pix_step >= 0, "drag.n_pix_step", self.n_pix_step, "a non-negative integer")
        check(self.lr > 0, "drag.lr", self.lr, "a positive number")
        check(self.r_m >= 0, "drag.r_m", self.r_m, "a non-negative radius")
        check(self.r_p >= 0, "drag.r_p", self.r_p, "a non-negative radius")
        check(self.lam >= 0, "drag.lam", self.lam, "a non-negative number")
        check(0 < self.sup_res_factor <= 1, "drag.sup_res_factor", self.sup_res_factor, "a number in (0, 1]")
        check(len(self.feature_blocks) > 0 and all(0 <= b <= 3 for b in self.feature_blocks), "drag.feature_blocks",
              list(self.feature_blocks), "a non-empty list of up_blocks indices in 0..3")
        check(self.guidance_scale >= 1.0, "drag.guidance_scale", self.guidance_scale, "a number >= 1.0")


@dataclass
class GoodDragConfig:
    """GoodDrag's alternating drag and denoise (``method=gooddrag``; its other values are drag.* keys set by the
    preset: lr 0.02, r_m = r1 = 4, r_p = r2 = 12, inversion_strength 0.75)."""
    drag_end_step: int = 7  # the latent is optimized at each of the first N denoising steps
    track_per_step: int = 10  # tracking rounds per drag step
    max_drag_per_track: int = 3  # optimizer steps between two tracking rounds
    max_track_no_change: int = 5  # stop dragging after this many rounds in which no handle moved
    beta: float = 4.0  # the predicted patch sits min(beta, |target - handle|) cells toward the target

    def __post_init__(self):
        check(self.drag_end_step >= 1, "gooddrag.drag_end_step", self.drag_end_step, "a positive integer")
        check(self.track_per_step >= 1, "gooddrag.track_per_step", self.track_per_step, "a positive integer")
        check(self.max_drag_per_track >= 1, "gooddrag.max_drag_per_track", self.max_drag_per_track,
              "a positive integer")
        check(self.max_track_no_change >= 1, "gooddrag.max_track_no_change", self.max_track_no_change,
              "a positive integer")
        check(self.beta > 0, "gooddrag.beta", self.beta, "a positive number of grid cells")


@dataclass
class DragNoiseConfig:
    """DragNoise (``method=dragnoise``): the UNet bottleneck is optimized and then propagated."""
    end_step: int = 0  # the last N denoising steps use the UNet's own bottleneck (0: the optimized one throughout)

    def __post_init__(self):
        check(self.end_step >= 0, "dragnoise.end_step", self.end_step, "a non-negative number of steps")


@dataclass
class FreeDragConfig:
    """FreeDrag (``method=freedrag``): feature templates, line search along the drag, no point tracking."""
    win_r: int = 4  # template window radius (a 9 x 9 window of offsets)
    l_expected: float = 1.0  # l: the expected template distance of a good move
    threshold_d: float = 2.0  # a point is done closer than this many grid cells to its target (and loss_end <= l / 2)
    d_max: float = 5.0  # the longest move (grid cells)
    candidates: int = 10  # line-search candidates per move
    steps_per_move: int = 5  # Adam steps per move at most
    max_step: int = 300  # Adam steps in all at most

    def __post_init__(self):
        check(self.win_r >= 0, "freedrag.win_r", self.win_r, "a non-negative radius")
        check(self.l_expected > 0, "freedrag.l_expected", self.l_expected, "a positive number")
        check(self.threshold_d > 0, "freedrag.threshold_d", self.threshold_d, "a positive number of grid cells")
        check(self.d_max > 0, "freedrag.d_max", self.d_max, "a positive number of grid cells")
        check(self.candidates >= 1, "freedrag.candidates", self.candidates, "a positive integer")
        check(self.steps_per_move >= 1, "freedrag.steps_per_move", self.steps_per_move, "a positive integer")
        check(self.max_step >= 1, "freedrag.max_step", self.max_step, "a positive integer")


@dataclass
class FastDragConfig:
    """FastDrag (``method=fastdrag``): one latent warp, a fill of its holes, the inversion's keys and values in the
    denoising (its preset: 10 DDIM steps, strength 0.7, no LoRA)."""
    fill: FillMode = FillMode.interpolation  # interpolation (vectorized) | sequential (the reference's, slower)
    kv_layers: list[str] = field(default_factory=lambda: ["up_blocks"])  # self-attention under these names

    def __post_init__(self):
        check(len(self.kv_layers) > 0, "fastdrag.kv_layers", list(self.kv_layers),
              "a non-empty list of module-name prefixes, e.g. [up_blocks]")


@dataclass
class TextConfig:
    """DragText (Choi et al., WACV 2025): the prompt's text embedding is optimized beside the method's variable and
    the edited branch is denoised with it (every method with an optimizer; off by default)."""
    optimize: bool = False
    lr: float = 0.004  # its own Adam learning rate (a parameter group beside the latent's)
    lam: float = 0.1  # weight of sum |c - c_orig| over the start and prompt tokens
    # false (DragText's code): the embedding's gradient is the motion term's + the regularizer's (a second
    # backward when a mask term exists); true: it also takes the mask term's gradient (one backward, cheaper)
    mask_term: bool = False

    def __post_init__(self):
        check(self.lr > 0, "text.lr", self.lr, "a positive number")
        check(self.lam >= 0, "text.lam", self.lam, "a non-negative number")


@dataclass
class ReferenceControlConfig:
    enabled: bool = True
    layers: list[str] = field(default_factory=lambda: ["up_blocks.2", "up_blocks.3"])  # prefixes of attn1 names
    start_step: int = 0  # first denoising step (0-based, of the remaining steps) with control
    end_step: Optional[int] = None  # one past the last; None = all
    # reproduce the reference's numbers: without a LoRA its inversion and drag use the classic (non-fused)
    # attention, and it samples the shifted motion patch with its own bilinear weights. Slower (README: Numerics)
    exact: bool = False


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32"  # 32 | 16-mixed | bf16-mixed (dragdiffusion.policy: one policy for every stage)
    enable_progress_bar: bool = True
    log_every_n_steps: int = 1
    # DDP: the process-group timeout, and how long a batch's processes wait for a peer that finishes no sample
    # before counting it lost (exit status 3); longer than the slowest sample's edit (README: Batch editing)
    timeout_s: float = 300.0

    def __post_init__(self):
        normalize_precision(self.precision)
        check(self.timeout_s > 0, "trainer.timeout_s", self.timeout_s, "a positive number of seconds")
        check(self.accelerator in ("auto", "cpu", "gpu", "cuda"), "trainer.accelerator", self.accelerator,
              "auto, cpu, gpu or cuda")
        check(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "a positive integer")


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "dragdiffusion"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline  # wandb only
    tags: list[str] = field(default_factory=list)
    run_name: Optional[str] = None
    save_dir: str = "logs"
    image_every: int = 10  # trajectory image every K drag steps (0 = only at the end)
    image_source: ImageSource = ImageSource.input  # trajectory drawn on the input, or the decoded x0 estimate of z_t

    def __post_init__(self):
        check(self.image_every >= 0, "logger.image_every", self.image_every, "a non-negative integer (0 = only at the end)")


@dataclass
class GenerationConfig:
    """The generated-image path (``generate=true``): the image is sampled from ``prompt``, then dragged."""
    seed: int = 42  # seed of the initial noise
    guidance_scale: float = 7.5  # classifier-free guidance of the sampling (and of the drag's features)
    steps: int = 50  # DDIM sampling steps; the drag works on the latent kept at drag.inversion_strength
    width: int = 512
    height: int = 512
    negative_prompt: str = ""

    def __post_init__(self):
        check(self.guidance_scale >= 1.0, "generation.guidance_scale", self.guidance_scale, "a number >= 1.0")
        check(self.steps >= 1, "generation.steps", self.steps, "a positive integer")
        check(self.width >= 64 and self.width % 8 == 0, "generation.width", self.width, "a multiple of 8, at least 64")
        check(self.height >= 64 and self.height % 8 == 0, "generation.height", self.height,
              "a multiple of 8, at least 64")


@dataclass
class AppConfig:
    """The browser app (python -m dragdiffusion.app): bound to this machine unless asked otherwise."""
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False  # a public gradio.live link only when asked
    max_queue: int = 16  # requests waiting beyond this are refused; device jobs run one at a time

    def __post_init__(self):
        check(0 <= self.port <= 65535, "app.port", self.port, "a port number in 0..65535 (0 = any free port)")
        check(self.max_queue >= 1, "app.max_queue", self.max_queue, "a positive integer")


@dataclass
class LimitsConfig:
    """What an input file may be (checked before it is decoded): refuses decompression bombs and huge files."""
    max_image_pixels: int = 50_000_000  # width x height of an image or mask (8000 x 6000 passes)
    max_file_bytes: int = 200 * 2 ** 20  # an image, mask, drag.json or meta_data.pkl on disk

    def __post_init__(self):
        check(self.max_image_pixels >= 64, "limits.max_image_pixels", self.max_image_pixels, "a positive pixel count")
        check(self.max_file_bytes >= 1024, "limits.max_file_bytes", self.max_file_bytes, "at least 1024 bytes")


def following(section, **links):
    """A default factory: ``section``'s defaults with some keys following another key (OmegaConf interpolations,
    e.g. ``drag.width`` = ``${width}``), set after construction so that ``__post_init__`` checks numbers only (the
    resolved ones, in ``validate_config``). A key given explicitly breaks its link."""
    def make():
        obj = section()
        for key, value in links.items():
            setattr(obj, key, value)
        return obj
    return make


def check_width(value, key: str = "width") -> None:
    check(isinstance(value, int) and value >= 64 and value % 8 == 0, key, value, "a multiple of 8, at least 64")


@dataclass
class CacheConfig:
    """Edits reuse the identity LoRA and the inversion when nothing they depend on changed (README: Caching)."""
    # the cache root; null: $DRAGDIFFUSION_EDIT_CACHE, else $DRAGDIFFUSION_CACHE, else ~/.cache/dragdiffusion
    dir: Optional[str] = None
    lora: bool = True  # identity LoRAs kept in <dir>/lora/<key>/ and reused (false: always trained)
    inversion: bool = True  # inverted latents kept in this process's memory and reused (false: always inverted)
    inversion_disk: bool = False  # also keep them in <dir>/inversion/<key>/, for later processes
    max_bytes: int = 4 * 2 ** 30  # the disk cache's size limit; the least recently used entries go first
    memory_bytes: int = 512 * 2 ** 20  # the in-memory inversions' limit, likewise

    def __post_init__(self):
        check(self.max_bytes >= 1, "cache.max_bytes", self.max_bytes, "a positive number of bytes")
        check(self.memory_bytes >= 1, "cache.memory_bytes", self.memory_bytes, "a positive number of bytes")
        check(self.dir is None or str(self.dir).strip() != "", "cache.dir", self.dir,
              "a folder, or null for the default")


@dataclass
class EditConfig:
    method: MethodName = MethodName.dragdiffusion  # the drag method; method=NAME also takes its preset
    # the working width of every stage (height = int(width x h / w)): the inversion, drag and denoising
    # (drag.width follows it) and the identity LoRA's views (lora.resolution follows drag.width); a per-stage key
    # given explicitly differs. Model presets set their backbone's (sd21: 768, sdxl: 1024)
    width: int = 512
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=following(LoraConfig, resolution="${drag.width}"))
    drag: DragConfig = field(default_factory=following(DragConfig, width="${width}"))
    gooddrag: GoodDragConfig = field(default_factory=GoodDragConfig)
    dragnoise: DragNoiseConfig = field(default_factory=DragNoiseConfig)
    freedrag: FreeDragConfig = field(default_factory=FreeDragConfig)
    fastdrag: FastDragConfig = field(default_factory=FastDragConfig)
    text: TextConfig = field(default_factory=TextConfig)
    reference: ReferenceControlConfig = field(default_factory=ReferenceControlConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # inputs: either a sample folder (DragBench or our format) / dataset, or the four fields below
    sample: Optional[str] = None  # a sample folder, or "demo" (the built-in demo sample)
    data: Optional[str] = None
    image: Optional[str] = None
    points: Optional[Any] = None  # [[x, y], ...] or its JSON text, alternating handle, target (input pixels)
    mask: Optional[str] = None
    prompt: Optional[str] = None
    generate: bool = False  # sample the image from `prompt` (generation.*) instead of reading one
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    app: AppConfig = field(default_factory=AppConfig)
    out: str = "outputs"
    overwrite: bool = False  # replace a folder that is not an earlier edit's / redo samples made with other settings
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    lora_dir: Optional[str] = None  # data=DIR with lora.enabled: reuse <lora_dir>/<sample>/pytorch_lora_weights.safetensors
    seed: int = 42
    quiet: bool = False
    # data=DIR: run the batch once per method (a name, or NAME+text for DragText), into <out>/<method>/
    methods: list[str] = field(default_factory=list)
    evaluate: bool = False  # after a data=DIR batch run, evaluate the results (DragBench MD / IF)
    evaluate_overrides: list[str] = field(default_factory=list)  # key=value items for the evaluation's config

    def __post_init__(self):
        check_width(self.width)
        check(not self.evaluate or bool(self.data), "evaluate", self.evaluate,
              "evaluate=true only with a batch run: data=DIR")
        check_method_names([str(m) for m in self.methods])
        check(not self.methods or bool(self.data), "methods", list(self.methods),
              "methods=[...] only with a batch run: data=DIR (one edit takes method=NAME)")


@dataclass
class LoraTrainConfig:
    method: MethodName = MethodName.dragdiffusion  # method=NAME takes that method's LoRA settings (lora.steps ...)
    width: int = 512  # the working width: the LoRA's views (lora.resolution follows it); model presets set theirs
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=following(LoraConfig, resolution="${width}"))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    image: Optional[str] = None
    sample: Optional[str] = None  # a sample folder (any layout): its image and prompt; the LoRA is named after it
    prompt: Optional[str] = None
    data: Optional[str] = None
    out: str = "outputs/lora"
    overwrite: bool = False  # data=DIR: retrain samples whose LoRA was made with other settings
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ckpt_path: Optional[str] = None  # resume from a Lightning checkpoint (written every lora.save_every steps)
    quiet: bool = False

    def __post_init__(self):
        check(MethodName(self.method).optimizes, "method", str(self.method),
              "a method with an identity LoRA (fastdrag has none: nothing to train)")


@dataclass
class MeanDistanceConfig:
    """DragBench Mean Distance: DIFT point matching between the source and the edited image."""
    t: int = 261  # DIFT timestep
    up_block: int = 1  # DIFT features: output of unet.up_blocks[up_block]
    ensemble_size: int = 8  # noises averaged per image
    width: Optional[int] = None  # DIFT working width (height keeps the aspect); None = each image's own size
    search: SearchMode = SearchMode.full  # full | mask (m-MD: search matches only inside the sample's mask)
    normalize: Normalize = Normalize.none  # none | diagonal (distance / image diagonal)
    seed: int = 0  # mixed with each sample's name: the noise of a sample never depends on order or devices
    chunk_rows: int = 64  # image rows matched at once (memory bound only; results do not depend on it)
    enabled: bool = True  # false: no DIFT model is loaded, no MD / m-MD (DAI and IF still run)
    masked: bool = True  # also m-MD (matches searched inside the mask) from the same features: one more argmax

    def __post_init__(self):
        check(0 <= self.t <= 999, "mean_distance.t", self.t, "a timestep in 0..999")
        check(0 <= self.up_block <= 3, "mean_distance.up_block", self.up_block, "an up_blocks index in 0..3")
        check(self.ensemble_size >= 1, "mean_distance.ensemble_size", self.ensemble_size, "a positive integer")
        check(self.width is None or (self.width >= 8 and self.width % 8 == 0), "mean_distance.width", self.width,
              "null (each image's own size) or a multiple of 8, at least 8")
        check(self.chunk_rows >= 1, "mean_distance.chunk_rows", self.chunk_rows, "a positive integer")


@dataclass
class ImageFidelityConfig:
    """DragBench Image Fidelity: 1 - LPIPS between the source and the edited image."""
    enabled: bool = True
    net: LpipsNet = LpipsNet.alex  # LPIPS backbone
    size: int = 224  # both images are resized to size x size

    def __post_init__(self):
        check(self.size >= 32, "image_fidelity.size", self.size, "an image size of at least 32")


@dataclass
class DaiConfig:
    """Drag Accuracy Index (GoodDrag's Drag100 metric): source patch at the handle vs edited patch at the target."""
    enabled: bool = True  # pure pixel math: needs no model
    gammas: list[int] = field(default_factory=lambda: [1, 5, 10, 20])  # patch radii, each reported
    reference_compat: bool = False  # GoodDrag's script: / n_pairs twice, its border cut (README: Evaluation)

    def __post_init__(self):
        gammas = list(self.gammas)
        check(bool(gammas) and all(int(g) == g and g >= 0 for g in gammas) and len(set(gammas)) == len(gammas),
              "dai.gammas", gammas, "a non-empty list of distinct patch radii >= 0, e.g. [1,5,10,20]")


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="stabilityai/stable-diffusion-2-1"))
    mean_distance: MeanDistanceConfig = field(default_factory=MeanDistanceConfig)
    image_fidelity: ImageFidelityConfig = field(default_factory=ImageFidelityConfig)
    dai: DaiConfig = field(default_factory=DaiConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    results: Optional[str] = None  # results folder laid out as the data: <category>/<sample>/<result_name>
    data: Optional[str] = None  # the dataset (DragBench layout, ours, Drag100's, or a mix)
    result_name: str = "dragged_image.png"
    resize_mismatched: bool = False  # resize an edited image of another size to the source's (else reported)
    out: Optional[str] = None  # where the tables go (default: the results folder)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quiet: bool = False


def preset_file(group: str, name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """``configs/<group>/<name>.yaml``; a ConfigError listing the presets when there is none of that name."""
    file = config_dir / group / f"{name}.yaml"
    if not file.is_file():
        options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name}: no such {group} preset; expected one of {options}")
    return file


def resolve_config_path(path: str | Path) -> Path:
    """``--config``: as given (from the current folder), else relative to the project (so that
    ``--config configs/edit.yaml`` works from any folder)."""
    given = Path(path).expanduser()
    for candidate in (given, CONFIG_DIR.parent / given, CONFIG_DIR / given.name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config {path}: file not found (looked in the current folder and in {CONFIG_DIR})")


def _select_preset(cfg: DictConfig, base: DictConfig, group: str, name: str) -> DictConfig:
    """Like a Hydra group choice: the section starts again from its defaults, then takes the preset."""
    if group == MODEL_GROUP:
        return _select_model(cfg, base, name)
    cfg[group] = OmegaConf.merge(base[group], OmegaConf.load(preset_file(group, name)))
    return cfg


def _model_preset_parts(file: Path, base: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """(the ``model.*`` keys, the per-backbone defaults of other sections as dotted keys) of a model preset: a
    top-level key that names another section of the config (``drag``, ``reference``, ``lora``, ``generation``) or
    ``width`` (the working width) is a per-backbone default; every other key is a ``model.*`` key."""
    raw = OmegaConf.load(file)
    others = [k for k in raw if k not in base[MODEL_GROUP] and isinstance(raw[k], DictConfig) and k in
              MODEL_PRESET_SECTIONS]
    tops = [k for k in raw if k in MODEL_PRESET_KEYS]
    model = OmegaConf.create({k: raw[k] for k in raw if k not in others and k not in tops})
    items = {k: raw[k] for k in tops}
    for section in others:
        for key in leaf_keys(raw[section], section + "."):
            items[key] = OmegaConf.select(raw, key)
    return model, items


def _select_model(cfg: DictConfig, base: DictConfig, name: str) -> DictConfig:
    """``model=NAME``: the ``model`` section starts again from its defaults and takes the preset's ``model.*``
    keys; the preset's per-backbone defaults of other sections (working width, feature blocks, reference-control
    layers ...) work like a method preset's: every such key that any model preset sets starts again from its
    default, then takes this preset's value. Keys a schema lacks (evaluate has no drag section) are skipped; a
    ``key=value`` override still wins."""
    model, own = _model_preset_parts(preset_file(MODEL_GROUP, name), base)
    known = set(leaf_keys(base))
    for other in sorted((CONFIG_DIR / MODEL_GROUP).glob("*.yaml")):
        for key in _model_preset_parts(other, base)[1]:
            if key in known:
                OmegaConf.update(cfg, key, OmegaConf.select(base, key), merge=False)
    for key, value in own.items():
        if key in known:
            OmegaConf.update(cfg, key, value, merge=False)
    cfg[MODEL_GROUP] = OmegaConf.merge(base[MODEL_GROUP], model)
    return cfg


def _preset_items(file: Path) -> dict[str, Any]:
    """A preset file's leaf keys (dotted) and values."""
    raw = OmegaConf.load(file)
    return {k: OmegaConf.select(raw, k) for k in leaf_keys(raw)} if raw else {}


def _select_method(cfg: DictConfig, base: DictConfig, name: str) -> DictConfig:
    """``method=NAME``: a method preset (configs/method/NAME.yaml) sets keys of several sections (lora.steps,
    drag.lr ...). Like a group choice it starts again from the defaults, here of every key that any method preset
    sets (and ``text.optimize``), then takes its own values; keys a schema lacks (train.py has no drag section) are
    skipped. ``method=NAME+text`` is NAME with DragText (``text.optimize=true``)."""
    name, text = split_method_name(name)
    if text and name in [m.value for m in MethodName] and not MethodName(name).optimizes:
        raise ConfigError(f"method={name}{TEXT_SUFFIX}: {name} has no optimizer, so DragText (text.optimize) does not "
                          f"apply; expected method={name}")
    own = _preset_items(preset_file(METHOD_GROUP, name))
    if text:
        own["text.optimize"] = True
    known = set(leaf_keys(base))
    for other in sorted((CONFIG_DIR / METHOD_GROUP).glob("*.yaml")):
        for key in [*_preset_items(other), "text.optimize"]:
            if key in known:
                OmegaConf.update(cfg, key, OmegaConf.select(base, key), merge=False)
    for key, value in own.items():
        if key in known:
            OmegaConf.update(cfg, key, value, merge=False)
    cfg[METHOD_GROUP] = MethodName(name)
    return cfg


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items_ex(resolve=False) if hasattr(cfg, "items_ex") else cfg.items():
        full = f"{prefix}{key}"
        keys += leaf_keys(value, full + ".") if isinstance(value, DictConfig) else [full]
    return keys


def _omegaconf_message(exc: OmegaConfBaseException, schema=EditConfig) -> str:
    """One line naming the key; an unknown key gets the nearest known ones (``n_pix_step`` -> drag.n_pix_step)."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    text = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if "not in" in text and key:
        known = leaf_keys(OmegaConf.structured(schema))
        last = str(key).split(".")[-1]
        near = [k for k in known if k.split(".")[-1] == last]
        near += [k for k in difflib.get_close_matches(str(key), known, n=3, cutoff=0.6) if k not in near]
        if near:
            return f"config key '{key}' does not exist; did you mean {' or '.join(near[:3])}?"
        return f"config key '{key}' does not exist (--print-config lists every key)"
    return f"config key '{key}': {text}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema=EditConfig) -> DictConfig:
    """The dataclass defaults, then the YAML file at ``path``, then the ``key=value`` overrides; validated.

    ``model=NAME`` / ``logger=NAME`` / ``trainer=NAME`` (in the file or on the command line) select presets;
    ``method=NAME`` selects a drag method and its published defaults (``_select_method``)."""
    overrides = list(overrides or [])
    try:
        base = OmegaConf.structured(schema)
        cfg = base.copy()
        if path is not None:
            raw = OmegaConf.load(resolve_config_path(path))
            for group in GROUPS:
                if group in raw and isinstance(raw[group], str):
                    cfg = _select_preset(cfg, base, group, raw.pop(group))
            if METHOD_GROUP in raw and METHOD_GROUP in base:
                cfg = _select_method(cfg, base, str(raw.pop(METHOD_GROUP)))
            cfg = OmegaConf.merge(cfg, raw)
        dotlist = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value (for example drag.n_pix_step=40)")
            key, value = item.split("=", 1)
            if key in GROUPS:
                cfg = _select_preset(cfg, base, key, value)
            elif key == METHOD_GROUP and key in base:
                cfg = _select_method(cfg, base, value)
            else:
                dotlist.append(item)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, schema)) from None
    validate_config(cfg)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Run every dataclass's ``__post_init__`` range checks (OmegaConf.to_object builds the objects); the working
    width first, so that a bad ``width`` is named as given (not as the ``drag.width`` that follows it)."""
    try:
        for key in ("width", "drag.width"):  # lora.resolution follows them: the key given is named
            if OmegaConf.select(cfg, key) is not None:
                check_width(OmegaConf.select(cfg, key), key)
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(_omegaconf_message(exc)) from None


def to_container(cfg: DictConfig) -> dict:
    """Plain Python data (choices as strings), e.g. a logger's hyperparameters."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def cli_parser(doc: str, default_config: str | None, prog: str | None = None):
    """The command-line shape shared by edit.py, train.py and the other entry points: --config + key=value items.

    ``doc``'s first line is the description, the rest the epilog (examples, main keys, exit status)."""
    lines = doc.split("\n")
    parser = argparse.ArgumentParser(prog=prog, description=lines[0], epilog="\n".join(lines[1:]).strip("\n"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config,
                        help=f"YAML config, from the current folder or the project (default: {default_config})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key with its value) and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (OmegaConf dotlist)")
    return parser
