"""Bad input gets a clear error before any model loads; odd images are converted, not rejected."""
import warnings

import numpy as np
import pytest
from PIL import Image

import edit as edit_cli
from dragdiffusion.config import load_config
from dragdiffusion.errors import ConfigError, SampleError
from dragdiffusion.sample import make_sample

NO_MODEL = ["model.name_or_path=/nonexistent/model/folder", "lora.enabled=false"]


def rgb(h=40, w=60):
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def cli(tmp_path, *overrides):
    return edit_cli.main(["--config", "configs/edit.yaml", *NO_MODEL, f"out={tmp_path}/out", *overrides])


def test_odd_number_of_points(tmp_path, capsys):
    Image.fromarray(rgb()).save(tmp_path / "a.png")
    assert cli(tmp_path, f"image={tmp_path}/a.png", "points=[[1,2],[3,4],[5,6]]") == 2
    err = capsys.readouterr().err
    assert "points" in err and "odd number" in err and "Traceback" not in err


def test_points_outside_the_image(tmp_path, capsys):
    Image.fromarray(rgb()).save(tmp_path / "a.png")
    assert cli(tmp_path, f"image={tmp_path}/a.png", "points=[[1,2],[70,4]]") == 2
    err = capsys.readouterr().err
    assert "target 0" in err and "outside the image" in err


def test_mask_of_another_size(tmp_path, capsys):
    Image.fromarray(rgb()).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m.png")
    assert cli(tmp_path, f"image={tmp_path}/a.png", "points=[[1,2],[3,4]]", f"mask={tmp_path}/m.png") == 2
    assert "mask" in capsys.readouterr().err


def test_unreadable_image(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not a png at all")
    assert cli(tmp_path, f"image={tmp_path}/a.png", "points=[[1,2],[3,4]]") == 2
    assert "cannot read" in capsys.readouterr().err


def test_unknown_config_key(tmp_path, capsys):
    assert cli(tmp_path, "drag.n_pix_stepz=3") == 2
    assert "drag.n_pix_stepz" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="drag.width"):
        load_config("configs/edit.yaml", ["drag.width=100"])
    with pytest.raises(ConfigError, match="model=nope"):
        load_config("configs/edit.yaml", ["model=nope"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "LA"])
def test_grayscale_rgba_16bit_are_converted(tmp_path, mode):
    base = Image.fromarray(rgb())
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257), mode="I;16")
    else:
        img = base.convert(mode)
    img.save(tmp_path / "x.png")
    s = make_sample(tmp_path / "x.png", [[1, 2], [3, 4]])
    assert s.image.shape == (40, 60, 3) and s.image.dtype == np.uint8
    if mode == "I;16":  # 16-bit values are scaled down, not clipped
        gray = np.asarray(base.convert("L")).astype(int)
        assert np.abs(s.image[..., 0].astype(int) - gray).max() <= 1


def test_empty_points_and_nonnumeric_points():
    with pytest.raises(SampleError, match="points"):
        make_sample(rgb(), [])
    with pytest.raises(SampleError, match="points"):
        make_sample(rgb(), [["a", 1], [2, 3]])


def test_long_prompt_is_truncated_with_a_warning(tiny_editor):
    from dragdiffusion.backbone import encode_prompt
    with pytest.warns(UserWarning, match="truncated"):
        emb = encode_prompt(tiny_editor.backbone, "a very long prompt " * 40)
    assert emb.shape[1] == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompt(tiny_editor.backbone, "short prompt")


def test_missing_model_error_says_what_was_looked_for():
    from dragdiffusion.backbone import load_backbone
    from dragdiffusion.errors import ModelLoadError
    cfg = load_config("configs/edit.yaml", ["model.name_or_path=some-org/not-a-model", "model.local_files_only=true"])
    with pytest.raises(ModelLoadError, match="model=tiny"):
        load_backbone(cfg.model)
    cfg = load_config("configs/edit.yaml", ["model.name_or_path=/tmp/definitely-missing.safetensors"])
    with pytest.raises(ModelLoadError, match="not found"):
        load_backbone(cfg.model)


def test_one_key_sets_the_working_width_of_every_stage(capsys):
    """``width`` sets the working width of the inversion / drag / denoising (``drag.width``) and of the identity
    LoRA's views (``lora.resolution``, which also follows ``drag.width``); a per-stage key given explicitly differs;
    the published 512 and the model presets' widths stay."""
    from dragdiffusion.config import LoraTrainConfig, to_yaml

    def widths(*overrides, path="configs/edit.yaml"):
        cfg = load_config(path, list(overrides))
        return cfg.width, cfg.drag.width, cfg.lora.resolution

    assert widths() == (512, 512, 512)  # published
    assert widths("width=128") == (128, 128, 128)
    assert widths("drag.width=128") == (512, 128, 128)  # the LoRA is no longer trained at 512 for a 128 edit
    assert widths("width=128", "lora.resolution=256") == (128, 128, 256)  # per-stage keys still differ
    assert widths("model=sdxl") == (1024, 1024, 1024) and widths("model=sd21") == (768, 768, 768)
    assert widths("model=sdxl", "drag.width=768") == (1024, 768, 768)
    assert widths(path="configs/demo.yaml") == (128, 128, 128)
    assert "resolution: 128" in to_yaml(load_config("configs/edit.yaml", ["width=128"]))  # saved resolved
    train = load_config("configs/lora.yaml", ["width=256"], schema=LoraTrainConfig)
    assert train.lora.resolution == 256 and load_config(None, ["model=sdxl"], schema=LoraTrainConfig).lora.resolution == 1024
    with pytest.raises(ConfigError, match="'width' = 100"):
        load_config(None, ["width=100"])
    with pytest.raises(ConfigError, match="'drag.width' = 100"):
        load_config(None, ["drag.width=100"])
    with pytest.raises(SystemExit):
        edit_cli.parse_args(["--help"])
    main_keys = capsys.readouterr().out.split("Main keys")[1]
    assert main_keys.splitlines()[1].strip().startswith("width=512 the working width of every stage")


def test_train_takes_a_sample_folder_and_names_the_lora_after_it(tmp_path):
    """train.py's image: ``sample=DIR`` (its image and prompt) or ``image=PATH``; a Drag100 image (every one is
    original.jpg) is named after its sample folder, a lone file after itself."""
    from dragdiffusion.config import LoraTrainConfig
    from dragdiffusion.data.convert import write_drag100_sample
    from dragdiffusion.demo import demo_sample
    from dragdiffusion.inputs import lora_input
    sample = demo_sample(64, 48)
    sample.prompt = "a drawing"
    write_drag100_sample(sample, tmp_path / "art_0")
    Image.fromarray(rgb()).save(tmp_path / "cat.png")

    def train_input(*overrides):
        return lora_input(load_config("configs/lora.yaml", list(overrides), schema=LoraTrainConfig))

    by_folder = train_input(f"sample={tmp_path / 'art_0'}")
    assert (by_folder.name, by_folder.prompt, by_folder.image.shape) == ("art_0", "a drawing", (48, 64, 3))
    assert train_input(f"sample={tmp_path / 'art_0'}", "prompt=other").prompt == "other"
    assert train_input(f"image={tmp_path / 'art_0' / 'original.jpg'}").name == "art_0"
    assert train_input(f"image={tmp_path / 'cat.png'}").name == "cat"
    with pytest.raises(SampleError, match="either sample=DIR or image=PATH"):
        train_input(f"image={tmp_path / 'cat.png'}", f"sample={tmp_path / 'art_0'}")
