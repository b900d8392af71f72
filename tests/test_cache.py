"""The identity LoRA and inversion cache: a hit is a miss bit for bit, keys change with what they depend on, broken
entries are ignored and made again, concurrent writers leave a valid entry, a batch counts LoRAs trained and reused.

Every test starts with an empty cache (conftest's ``empty_edit_cache``); tests that look into it name their own
folder (``cache.dir``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import dragdiffusion.editor as editor_module
from conftest import REPO, editor_with
from dragdiffusion.backbone import model_identity
from dragdiffusion.cache import (INVERSION_FILE, INVERSIONS, CacheWarning, DiskCache, InversionRecord, key_hash,
                                 path_identity)
from dragdiffusion.data.convert import write_folder_sample
from dragdiffusion.demo import demo_sample
from dragdiffusion.lora import WEIGHT_NAME, identity_lora_key
from dragdiffusion.policy import DevicePolicy

LORA = ["lora.enabled=true", "lora.steps=2", "lora.resolution=64", "lora.batch_size=2"]
SMALL = ["drag.width=64", "drag.num_inference_steps=6", "drag.n_pix_step=3"]


@pytest.fixture
def training_count(monkeypatch):
    """How many times the editor trained an identity LoRA."""
    calls = []
    real = editor_module.train_lora

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(editor_module, "train_lora", counting)
    return calls


def lora_entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "lora").iterdir() if p.is_dir()) if (root / "lora").is_dir() else []


# ------------------------------------------------------------------------------------------ a hit is a miss

def test_a_hit_gives_the_same_images_and_latents_as_a_miss(tiny_editor, tmp_path):
    sample = demo_sample(96, 72)
    editor = editor_with(tiny_editor, LORA + SMALL + [f"cache.dir={tmp_path}", "cache.inversion_disk=true"])
    miss = editor.edit(sample)
    hit = editor.edit(sample)  # the LoRA from the disk cache, the inversion from memory
    INVERSIONS.clear()
    from_disk = editor.edit(sample)  # the inversion from the disk cache (another process would see this)
    off = editor_with(tiny_editor, LORA + SMALL + ["cache.lora=false", "cache.inversion=false"]).edit(sample)
    assert miss.trajectory["sources"] == {"lora": "trained", "inversion": "computed"}
    assert hit.trajectory["sources"] == {"lora": "reused", "inversion": "reused"}
    assert from_disk.trajectory["sources"] == {"lora": "reused", "inversion": "reused"}
    assert off.trajectory["sources"] == {"lora": "trained", "inversion": "computed"}
    entry = lora_entries(tmp_path)[0]
    assert hit.trajectory["lora"] == f"reused {entry / WEIGHT_NAME}" and miss.trajectory["lora"] is None
    for other in (hit, from_disk, off):
        np.testing.assert_array_equal(other.image, miss.image)
        assert torch.equal(other.z_t, miss.z_t) and torch.equal(other.z_edited, miss.z_edited)
        assert other.trajectory["handles"] == miss.trajectory["handles"]
        assert other.trajectory["loss"] == miss.trajectory["loss"]
    # the cached LoRA is the standard file: the key beside it
    assert json.loads((entry / "key.json").read_text())["prompt"] == sample.prompt
    assert (tmp_path / "inversion").is_dir()


def test_the_cached_lora_is_restored_bit_for_bit_in_float32_under_half_weights(tiny_model_dir, tmp_path):
    """Half weights (a GPU's fp16): the trained adapter is fp32; a hit must rebuild exactly that, not the fp16
    adapter a plain diffusers load would give (whose edits differ in the last bits)."""
    from diffusers import UNet2DConditionModel
    from dragdiffusion.lora import add_identity_lora, identity_lora_layers, restore_identity_lora, save_lora
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet", torch_dtype=torch.float16)
    cfg = OmegaConf.create({"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_v"], "seed": 3})
    add_identity_lora(unet, cfg, 3)
    with torch.no_grad():
        for layer in identity_lora_layers(unet):
            layer.lora_B["identity"].weight.normal_(0, 1e-3)  # "trained": B no longer zero
    trained = [p.detach().clone() for layer in identity_lora_layers(unet)
               for p in (layer.lora_A["identity"].weight, layer.lora_B["identity"].weight)]
    file = save_lora(unet, tmp_path)
    restore_identity_lora(unet, cfg, file)
    restored = [p for layer in identity_lora_layers(unet)
                for p in (layer.lora_A["identity"].weight, layer.lora_B["identity"].weight)]
    assert trained[0].dtype == torch.float32 and all(p.dtype == torch.float32 for p in restored)
    assert len(restored) == len(trained) and all(torch.equal(a, b) for a, b in zip(trained, restored))


# ------------------------------------------------------------------------------------------ keys

def test_changing_one_key_field_misses(tiny_editor, tiny_model_dir, tmp_path, training_count):
    sample = demo_sample(96, 72)
    editor = editor_with(tiny_editor, LORA + [f"cache.dir={tmp_path}"])
    editor.prepare_lora(sample)
    editor.prepare_lora(sample)
    assert len(training_count) == 1 and editor.lora_stage.source == "reused"
    one_pixel = demo_sample(96, 72)
    one_pixel.image = one_pixel.image.copy()
    one_pixel.image[40, 50, 1] ^= 1
    other_prompt = demo_sample(96, 72)
    other_prompt.prompt = sample.prompt + "!"
    editor.prepare_lora(one_pixel)
    editor.prepare_lora(other_prompt)
    editor_with(tiny_editor, LORA + [f"cache.dir={tmp_path}", "lora.steps=3"]).prepare_lora(sample)
    assert len(training_count) == 4
    # the same weights under another model identity (the tiny model's folder by path): another model
    folder_cfg = OmegaConf.merge(editor.cfg, {"model": {"name_or_path": str(tiny_model_dir)}})
    assert model_identity(folder_cfg.model) != model_identity(editor.cfg.model)
    other_model = editor_module.DragEditor(folder_cfg)
    other_model.prepare_lora(sample)
    assert len(training_count) == 5 and other_model.lora_stage.source == "trained"
    assert len(lora_entries(tmp_path)) == 5
    editor.prepare_lora(sample)  # and the first is still there
    assert len(training_count) == 5


def test_the_lora_key_covers_every_setting_that_changes_the_weights_and_no_other():
    policy = DevicePolicy.cpu()
    base = OmegaConf.create({"rank": 16, "alpha": 16, "target_modules": ["to_q", "to_k"], "steps": 80, "lr": 5e-4,
                             "betas": [0.9, 0.999], "weight_decay": 1e-2, "eps": 1e-8, "batch_size": 4,
                             "resolution": 64, "seed": 0, "cache_latents": True, "save_every": 0, "path": None,
                             "enabled": True})
    image = demo_sample(96, 72).image
    model = {"name_or_path": {"tiny": "tiny-sd15-v1"}}

    def key(cfg=base, img=image, prompt="a ball", mdl=model, pol=policy, ckpt=False):
        return key_hash(identity_lora_key(img, prompt, cfg, mdl, pol, ckpt))

    changes = {"rank": 8, "alpha": 8, "target_modules": ["to_q"], "steps": 81, "lr": 4e-4, "betas": [0.8, 0.999],
               "weight_decay": 0.0, "eps": 1e-6, "batch_size": 2, "resolution": 128, "seed": 1, "cache_latents": False}
    for name, value in changes.items():
        assert key(OmegaConf.merge(base, {name: value})) != key(), name
    for name, value in {"save_every": 10, "path": None, "enabled": False}.items():
        assert key(OmegaConf.merge(base, {name: value})) == key(), name
    assert key(OmegaConf.merge(base, {"target_modules": ["to_k", "to_q"]})) == key()  # order does not matter
    assert key(prompt="a ball!") != key() and key(mdl={"name_or_path": {"tiny": "tiny-sd2v-v1"}}) != key()
    assert key(ckpt=True) != key()
    assert key(pol=DevicePolicy(torch.device("cpu"), "bf16-mixed", torch.float32)) != key()
    assert key(pol=DevicePolicy(torch.device("cpu"), "32", torch.bfloat16)) != key()


def test_the_inversion_key_follows_what_the_inversion_depends_on(tiny_editor, tmp_path):
    sample = demo_sample(96, 72)

    def source(overrides, s=sample):
        editor = editor_with(tiny_editor, SMALL + overrides)
        editor.prepare_lora(s)  # as edit does: the LoRA (or none) the inversion runs with
        return editor.invert(s).sources["inversion"]

    assert source([]) == "computed"
    assert source([]) == "reused"
    assert source(["drag.guidance_scale=3", "drag.lr=0.5"]) == "reused"  # the inversion runs without guidance
    assert source(["drag.inversion_strength=0.5"]) == "computed"
    assert source(["drag.num_inference_steps=7"]) == "computed"
    assert source(["drag.width=72"]) == "computed"
    assert source(["reference.exact=true"]) == "computed"  # the classic attention
    other = demo_sample(96, 72)
    other.prompt = "another prompt"
    assert source([], other) == "computed"
    assert source(["cache.inversion=false"]) == "computed"
    # the UNet's LoRA is part of it: the same settings with an identity LoRA invert again
    assert source(LORA + [f"cache.dir={tmp_path}"]) == "computed"


def test_the_model_identity_of_a_folder_follows_its_files(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, copy_function=shutil.copy2)  # times kept: the same identity
    cfg = OmegaConf.create({"name_or_path": str(folder), "vae": None, "single_file_config": None})
    first = model_identity(cfg)
    assert first == model_identity(OmegaConf.merge(cfg, {"name_or_path": str(tiny_model_dir)}))
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace("\n", "\n ", 1))  # a small file: by content
    assert path_identity(folder) != first["name_or_path"]


# ------------------------------------------------------------------------------------------ broken entries

def test_a_truncated_or_foreign_cache_file_is_ignored_and_rebuilt(tiny_editor, tmp_path, training_count):
    sample = demo_sample(96, 72)
    editor = editor_with(tiny_editor, LORA + [f"cache.dir={tmp_path}"])
    editor.prepare_lora(sample)
    entry = lora_entries(tmp_path)[0]
    weights = entry / WEIGHT_NAME
    good = {k: v.clone() for k, v in load_file(str(weights)).items()}  # (not views of the file: it is truncated)
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # truncated

    def rebuilt() -> bool:  # the same LoRA again, whole
        again = load_file(str(weights))
        return set(again) == set(good) and all(torch.equal(again[k], good[k]) for k in good)
    with pytest.warns(CacheWarning, match="not a readable safetensors"):
        editor.prepare_lora(sample)
    assert len(training_count) == 2 and editor.lora_stage.source == "trained"
    assert rebuilt()
    (entry / "key.json").write_text("{not json")
    with pytest.warns(CacheWarning, match="not JSON"):
        editor.prepare_lora(sample)
    assert len(training_count) == 3
    torch_file = {k: v for k, v in load_file(str(weights)).items() if "down_blocks" not in k}
    from safetensors.torch import save_file
    save_file(torch_file, str(weights))  # a foreign file under the right key: some tensors missing
    with pytest.warns(CacheWarning, match="not this identity LoRA"):
        editor.prepare_lora(sample)
    assert len(training_count) == 4 and rebuilt()
    # a killed run: the payload there, no key.json yet (it is written last): not a hit
    (entry / "key.json").unlink()
    editor.prepare_lora(sample)
    assert len(training_count) == 5 and (entry / "key.json").is_file()
    editor.prepare_lora(sample)
    assert len(training_count) == 5


def test_a_truncated_inversion_file_is_ignored_and_inverted_again(tiny_editor, tmp_path):
    sample = demo_sample(96, 72)
    editor = editor_with(tiny_editor, SMALL + [f"cache.dir={tmp_path}", "cache.inversion_disk=true"])
    first = editor.invert(sample)
    file = next((tmp_path / "inversion").glob(f"*/{INVERSION_FILE}"))
    file.write_bytes(file.read_bytes()[:40])
    INVERSIONS.clear()
    with pytest.warns(CacheWarning):
        again = editor.invert(sample)
    assert again.sources["inversion"] == "computed" and torch.equal(again.z_t, first.z_t)
    INVERSIONS.clear()
    assert editor.invert(sample).sources["inversion"] == "reused"  # rebuilt


def test_the_cache_keeps_to_its_size_limit_least_recently_used_first(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=3 * 70_000)
    keys = [{"kind": "inversion", "n": i} for i in range(4)]
    for i, key in enumerate(keys):
        record = InversionRecord(torch.full((1, 4, 64, 64), float(i)))  # 64 KiB each
        cache.store("inversion", key, lambda folder, r=record: r.save(folder / INVERSION_FILE))
        time.sleep(0.02)
        if i == 1:
            assert cache.find("inversion", keys[0], INVERSION_FILE) is not None  # used again: now the newest
            time.sleep(0.02)
    kept = {e.key["n"] for e in cache.entries()}
    assert kept == {0, 2, 3}  # 1 was the least recently used
    assert cache.clear()[0] == 3 and cache.entries() == []


def test_the_cache_command_lists_and_clears(tmp_path, capsys):
    from dragdiffusion.cache import main
    cache = DiskCache(tmp_path)
    for i in range(2):
        cache.store("inversion", {"kind": "inversion", "n": i, "prompt": "p"},
                    lambda folder: InversionRecord(torch.zeros(1, 4, 8, 8)).save(folder / INVERSION_FILE))
    assert main(["list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("inversion ") >= 2 and "2 inversion entries" in out
    assert main(["clear", "--dir", str(tmp_path)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out and cache.entries() == []


# ------------------------------------------------------------------------------------------ two writers

WRITER = """
import sys, time, torch
from pathlib import Path
from dragdiffusion.cache import DiskCache, InversionRecord, INVERSION_FILE
root, value = Path(sys.argv[1]), float(sys.argv[2])
cache = DiskCache(root / "cache")
record = InversionRecord(torch.full((1, 4, 128, 128), value), {"keys": torch.full((64, 1024), value)})
(root / f"ready-{value}").touch()
while len(list(root.glob("ready-*"))) < 2:  # both write at once
    time.sleep(0.002)
for _ in range(40):
    cache.store("inversion", {"kind": "inversion", "shared": True}, lambda f: record.save(f / INVERSION_FILE))
"""


def test_two_processes_writing_the_same_key_leave_one_valid_entry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(v)], env=env) for v in (1.0, 2.0)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = DiskCache(tmp_path / "cache").entries()
    assert len(entries) == 1 and entries[0].key == {"kind": "inversion", "shared": True}
    record = InversionRecord.load(entries[0].folder / INVERSION_FILE)
    value = float(record.z_t.flatten()[0])
    assert value in (1.0, 2.0)
    assert torch.equal(record.z_t, torch.full_like(record.z_t, value))  # one writer's whole file, never a mix
    assert torch.equal(record.extras["keys"], torch.full((64, 1024), value))
    assert [p.name for p in entries[0].folder.iterdir()] and not list(entries[0].folder.glob("*.tmp"))


# ------------------------------------------------------------------------------------------ batches

def test_a_methods_batch_counts_loras_trained_and_reused(tmp_path, tiny_model_dir):
    """DragNoise and FreeDrag share their LoRA settings: the second method reuses the first one's LoRA."""
    import edit as edit_cli
    data = tmp_path / "data"
    write_folder_sample(demo_sample(96, 72), data / "s0")
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "configs" / "edit.yaml"), "model=tiny", "trainer=cpu", "quiet=true",
            "trainer.enable_progress_bar=false", *LORA, *SMALL, "freedrag.max_step=3", f"data={data}", f"out={out}",
            "methods=[dragnoise,freedrag]", f"cache.dir={tmp_path / 'cache'}"]
    assert edit_cli.main(argv) == 0
    noise = json.loads((out / "dragnoise" / "summary.json").read_text())
    free = json.loads((out / "freedrag" / "summary.json").read_text())
    assert noise["lora"] == {"trained": 1, "reused": 0, "loaded": 0}
    assert free["lora"] == {"trained": 0, "reused": 1, "loaded": 0}
    assert free["samples"][0]["lora"] == "reused"
    assert "lora" in (out / "freedrag" / "summary.csv").read_text().splitlines()[0].split(",")
    t = json.loads((out / "freedrag" / "s0" / "trajectory.json").read_text())
    assert t["lora"].startswith("reused ") and Path(t["lora"][len("reused "):]).is_file()
    assert t["sources"] == {"lora": "reused", "inversion": "reused"}  # the same LoRA and schedule: one process


def test_a_separate_unet_is_part_of_the_models_identity(tmp_path, tiny_model_dir):
    """model.unet (FastDrag's LCM UNet) changes every UNet output: another UNet is another identity."""
    from dragdiffusion.backbone import model_identity
    from dragdiffusion.config import load_config
    base = model_identity(load_config(None, ["model=tiny"]).model)
    swapped = model_identity(load_config(None, ["model=tiny", f"model.unet={tiny_model_dir / 'unet'}"]).model)
    assert base is not None and swapped is not None and base != swapped and swapped["unet"] is not None
