"""DragBench metrics: known-answer properties without pretrained weights, then the evaluator end to end on the
tiny model (1 and 2 CPU processes give the same numbers), and bad result folders reported per sample."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dragdiffusion.errors import ConfigError, ModelLoadError, SampleError
from dragdiffusion.metrics import (ImageFidelity, MeanDistance, bilinear_matrix, dift_features, encode_latent,
                                   match_handles, pair_distances, sample_seed)

from conftest import REPO

# small, fast evaluation settings on the tiny model
TINY_EVAL = ["model=tiny", "trainer=cpu", "mean_distance.ensemble_size=2", "mean_distance.width=128",
             "image_fidelity.enabled=false", "quiet=true"]




def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ pure math

@pytest.mark.parametrize("n_out,n_in", [(512, 32), (341, 22), (37, 5), (5, 9), (8, 8)])
def test_bilinear_matrix_is_f_interpolate(n_out, n_in):
    x = torch.randn(2, 3, n_in, 4)
    ref = F.interpolate(x, size=(n_out, 4), mode="bilinear", align_corners=False)
    ours = torch.einsum("yh,bchw->bcyw", bilinear_matrix(n_out, n_in), x)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_unedited_features_match_every_handle_to_itself():
    g = torch.Generator().manual_seed(0)
    handles = torch.tensor([[5.0, 7.0], [40.0, 3.0], [63.0, 47.0], [0.0, 0.0], [20.4, 30.6]])
    targets = torch.tensor([[9.0, 10.0], [40.0, 20.0], [50.0, 47.0], [3.0, 4.0], [20.0, 31.0]])
    full = torch.randn(16, 48, 64, generator=g)  # one feature per pixel
    matches = match_handles(full, full.clone(), handles, (48, 64))
    assert matches.tolist() == handles.round().long().tolist()
    md = pair_distances(matches, targets)
    assert torch.allclose(md, pair_distances(handles.round(), targets))
    # coarse features upsampled 8x, handles away from the clamped border
    coarse = torch.randn(16, 6, 8, generator=g)
    inner = torch.tensor([[10.0, 12.0], [33.0, 25.0], [52.0, 36.0]])
    matches = match_handles(coarse, coarse.clone(), inner, (48, 64), chunk_rows=7)
    assert matches.tolist() == inner.long().tolist()


@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -5), (7, 4)])
def test_shifted_content_moves_the_match_by_the_shift(dx, dy):
    # features are a function of content: a random texture; the edited image is the texture moved by (dx, dy)
    g = torch.Generator().manual_seed(1)
    texture = torch.randn(8, 40, 50, generator=g)
    edited = torch.roll(texture, shifts=(dy, dx), dims=(1, 2))
    handles = torch.tensor([[10.0, 10.0], [30.0, 20.0], [25.0, 30.0]])
    matches = match_handles(texture, edited, handles, (40, 50))
    assert (matches - handles.long()).tolist() == [[dx, dy]] * 3
    targets = handles + torch.tensor([dx, dy])
    assert pair_distances(matches, targets).abs().max() == 0
    # the distance to any other target is the geometric one
    assert torch.allclose(pair_distances(matches, handles), torch.full((3,), math.hypot(dx, dy), dtype=torch.float64))


def test_shift_of_coarse_features_by_one_cell_moves_the_match_by_the_scale():
    g = torch.Generator().manual_seed(2)
    coarse = torch.randn(16, 8, 10, generator=g)
    edited = torch.roll(coarse, shifts=1, dims=2)  # one feature cell = 8 px to the right at 64 x 80
    handles = torch.tensor([[20.0, 20.0], [44.0, 36.0]])
    matches = match_handles(coarse, edited, handles, (64, 80))
    assert (matches - handles.long()).tolist() == [[8, 0], [8, 0]]


def test_masked_search_stays_inside_the_mask_and_empty_mask_searches_everywhere():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(8, 30, 40, generator=g)
    handles = torch.tensor([[10.0, 10.0]])
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[:, 20:] = True  # the handle's own pixel is outside
    match = match_handles(feat, feat, handles, (30, 40), mask)[0]
    assert mask[match[1], match[0]] and match.tolist() != [10, 10]
    sims = F.cosine_similarity(feat[:, 10, 10][:, None, None], feat, dim=0)
    sims[~mask] = -2
    best = int(sims.flatten().argmax())
    assert match.tolist() == [best % 40, best // 40]
    empty = torch.zeros(30, 40, dtype=torch.bool)
    assert match_handles(feat, feat, handles, (30, 40), empty)[0].tolist() == [10, 10]


def test_distance_normalised_by_the_diagonal():
    d = pair_distances([[0, 0], [3, 4]], [[3, 4], [3, 4]], normalizer=math.hypot(30, 40))
    assert torch.allclose(d, torch.tensor([0.1, 0.0], dtype=torch.float64))


def test_seed_comes_from_the_name_not_the_order():
    names = ["animals/a", "animals/b", "art_work/a"]
    seeds = [sample_seed(n) for n in names]
    assert seeds == [sample_seed(n) for n in names] and len(set(seeds)) == 3
    assert sample_seed("animals/a", 1) != sample_seed("animals/a", 0)


# ------------------------------------------------------------------------------------------ Image Fidelity

def mean_abs(x, y):
    return (x - y).abs().mean(dim=(1, 2, 3))


def test_image_fidelity_identical_images_is_one_and_net_sees_224_inputs_in_range():
    seen = []

    def net(x, y):
        seen.append((tuple(x.shape), float(x.min()), float(x.max())))
        return mean_abs(x, y)

    metric = ImageFidelity(net=net)
    img = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    metric.update(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1,
                  torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert metric.compute().item() == 1.0
    assert seen[0][0] == (1, 3, 224, 224) and -1 <= seen[0][1] and seen[0][2] <= 1


def test_image_fidelity_is_the_mean_of_one_minus_distance_over_images():
    metric = ImageFidelity(net=mean_abs, size=32)
    a = torch.zeros(2, 3, 32, 32)
    b = torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 0.5)])  # distances 0 and 0.5
    metric.update(a, b)
    assert torch.allclose(metric.last, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert abs(metric.compute().item() - 0.75) < 1e-9
    # a shifted vertical edge: the fraction of differing columns is the shift / width
    edge = torch.full((1, 3, 32, 32), -1.0)
    edge[..., 16:] = 1.0
    shifted = torch.roll(edge, shifts=4, dims=3)
    shifted[..., :4] = -1.0
    one = ImageFidelity(net=mean_abs, size=32)
    one.update(edge, shifted)
    assert abs(one.compute().item() - (1 - 2 * 4 / 32)) < 1e-9


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_image_fidelity_without_lpips_backbone_says_what_is_missing():
    with pytest.raises(ModelLoadError, match="torchvision.*not installed.*net=callable"):
        ImageFidelity()


# ------------------------------------------------------------------------------------------ tiny model

@pytest.fixture(scope="module")
def tiny_md(tiny_model_dir):
    return MeanDistance("tiny", ensemble_size=2, width=128)


def test_dift_features_are_the_ensemble_mean(tiny_md):
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    from dragdiffusion.backbone import encode_prompt
    cond = encode_prompt(tiny_md.backbone, "a cat")
    latent = encode_latent(tiny_md.vae, image)
    noise = torch.randn(2, *latent.shape[1:], generator=torch.Generator().manual_seed(0))
    both = dift_features(tiny_md.unet, tiny_md.backbone.scheduler, latent, cond, 261, noise, up_block=1)
    singles = [dift_features(tiny_md.unet, tiny_md.backbone.scheduler, latent, cond, 261, noise[i:i + 1], up_block=1)
               for i in range(2)]
    assert both.shape[0] == tiny_md.unet.config.block_out_channels[-2] and both.shape[1:] == (64 // 16, 96 // 16)  # as SD: 1/16
    assert torch.allclose(both, (singles[0] + singles[1]) / 2, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_mean_distance_of_unedited_samples_is_the_handle_target_distance_in_any_order(tiny_md, dragbench_dir):
    from dragdiffusion.data import find_samples, read_sample
    samples = [read_sample(p, p.relative_to(dragbench_dir).as_posix()) for p in find_samples(dragbench_dir)[:4]]
    expected = torch.cat([pair_distances(s.handles, s.targets) for s in samples]).mean().item()
    results = []
    for order in (samples, samples[::-1]):
        tiny_md.reset()
        per_sample = {}
        for s in order:
            tiny_md.update(s.image, s.image.copy(), s.handles, s.targets, s.prompt, s.name, s.mask)
            per_sample[s.name] = tiny_md.last["distances"].tolist()
        results.append((tiny_md.compute().item(), per_sample))
    assert results[0] == results[1]  # bit-identical whatever the order
    assert abs(results[0][0] - expected) < 1e-6
    with pytest.raises(SampleError, match="edited image.*expected the same size"):
        tiny_md.update(samples[0].image, samples[0].image[:-8], samples[0].handles, samples[0].targets)


# ------------------------------------------------------------------------------------------ the evaluator

@pytest.fixture(scope="module")
def results_tree(tmp_path_factory, dragbench_dir):
    """Results = the source images (unedited), one sample without output, one output of another size."""
    from dragdiffusion.data import find_samples
    root = tmp_path_factory.mktemp("results")
    names = [p.relative_to(dragbench_dir).as_posix() for p in find_samples(dragbench_dir)]
    for name in names:
        (root / name).mkdir(parents=True)
        shutil.copy(dragbench_dir / name / "original_image.png", root / name / "dragged_image.png")
    os.remove(root / names[1] / "dragged_image.png")
    small = root / names[2] / "dragged_image.png"
    Image.open(small).resize((200, 100)).save(small)
    return root, names


def comparable(report_path):
    doc = json.loads(report_path.read_text())
    for key in ("seconds", "world_size"):
        doc["summary"].pop(key)
    doc.pop("config")
    return doc


@pytest.mark.slow
def test_evaluate_cli_reports_per_sample_and_is_the_same_on_two_processes(results_tree, dragbench_dir, tmp_path,
                                                                         tiny_model_dir, capsys):
    from dragdiffusion.data import read_sample
    from dragdiffusion.evaluate import main
    root, names = results_tree
    args = [f"results={root}", f"data={dragbench_dir}", *TINY_EVAL]
    assert main(args + [f"out={tmp_path / 'one'}"]) == 1  # 1: some samples were not evaluated
    line = capsys.readouterr().out
    report = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    rows = {r["sample"]: r for r in report["samples"]}
    assert [r["sample"] for r in report["samples"]] == sorted(names)
    assert rows[names[1]]["status"] == "missing" and "dragged_image.png" in rows[names[1]]["message"]
    assert rows[names[2]]["status"] == "size_mismatch" and "200x100" in rows[names[2]]["message"]
    ok = [n for n in names if n not in names[1:3]]
    pairs = 0
    for n in ok:  # unedited: every handle matches itself
        s = read_sample(dragbench_dir / n, n)
        assert rows[n]["status"] == "ok"
        assert [p["match"] for p in rows[n]["pairs"]] == [[round(x), round(y)] for x, y in s.handles]
        assert rows[n]["mean_distance"] == pytest.approx(pair_distances(s.handles, s.targets).mean().item())
        pairs += len(s.handles)
    summary = report["summary"]
    assert summary["n_pairs"] == pairs and summary["counts"] == {"ok": 8, "missing": 1, "size_mismatch": 1, "error": 0}
    all_distances = [p["distance"] for n in ok for p in rows[n]["pairs"]]
    assert summary["mean_distance"] == pytest.approx(sum(all_distances) / len(all_distances), abs=1e-8)
    assert f"{summary['n_pairs']} pairs" in line and "MD " in line and "IF n/a" in line
    categories = (tmp_path / "one" / "evaluation_categories.csv").read_text().splitlines()
    assert categories[0].startswith("dataset,method,category,") and len(categories) == 1 + len(names) + 1
    assert (tmp_path / "one" / "evaluation_samples.csv").read_text().count("\n") == 1 + len(names)

    # the same numbers on two processes (DDP, gloo)
    cmd = [sys.executable, "-m", "dragdiffusion.evaluate", *args, f"out={tmp_path / 'two'}", "trainer.devices=2",
           "trainer.strategy=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert two["summary"]["world_size"] == 2
    assert comparable(tmp_path / "two" / "evaluation.json") == comparable(tmp_path / "one" / "evaluation.json")


def test_resize_mismatched_scores_the_resized_output(results_tree, dragbench_dir, tmp_path, tiny_model_dir):
    from dragdiffusion.evaluate import main
    root, names = results_tree
    data = tmp_path / "data"  # just the mismatched sample
    shutil.copytree(dragbench_dir / names[2], data / names[2])
    assert main([f"results={root}", f"data={data}", f"out={tmp_path}", "resize_mismatched=true", *TINY_EVAL,
                 "logger=csv", f"logger.save_dir={tmp_path / 'logs'}", "logger.run_name=eval"]) == 0
    row = json.loads((tmp_path / "evaluation.json").read_text())["samples"][0]
    assert row["status"] == "ok" and row["message"] == "resized from 200x100" and row["mean_distance"] is not None
    logged = (tmp_path / "logs" / "dragdiffusion" / "eval" / "metrics.csv").read_text().splitlines()
    values = dict(zip(logged[0].split(","), logged[1].split(",")))
    assert float(values["eval/mean_distance"]) == pytest.approx(row["mean_distance"])
    assert (tmp_path / "logs" / "dragdiffusion" / "eval" / "eval-samples.csv").is_file()


def test_evaluate_cli_errors_name_what_is_wrong(tmp_path, dragbench_dir, capsys):
    from dragdiffusion.evaluate import main
    assert main(["mean_distance.search=everywhere"]) == 2
    assert "mean_distance.search" in capsys.readouterr().err
    assert main([f"data={dragbench_dir}"]) == 2
    assert "results=DIR is required" in capsys.readouterr().err
    args = [f"results={tmp_path}", f"data={dragbench_dir}", "model.name_or_path=no-such-org/no-such-model",
            "model.local_files_only=true", "trainer=cpu", "image_fidelity.enabled=false", "quiet=true"]
    assert main(args) == 2
    err = capsys.readouterr().err  # found before any model loads
    assert "model.name_or_path: 'no-such-org/no-such-model' is a hub id that is not in the Hugging Face cache" in err
    if importlib.util.find_spec("torchvision") is None:
        assert main([f"results={tmp_path}", f"data={dragbench_dir}", "model=tiny", "trainer=cpu", "quiet=true"]) == 2
        assert "image_fidelity.enabled=false" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "results=" in capsys.readouterr().out


def test_edit_config_evaluation_uses_the_run_trainer_logger_and_overrides():
    from dragdiffusion.config import load_config
    from dragdiffusion.evaluation import config_from_edit
    edit = load_config(REPO / "configs" / "edit.yaml", ["data=/d", "out=/o", "evaluate=true", "trainer=cpu",
                                                        "logger=csv", "evaluate_overrides=[model=tiny,mean_distance.t=200]"])
    cfg = config_from_edit(edit)
    assert (cfg.results, cfg.data, cfg.model.name_or_path, cfg.mean_distance.t) == ("/o", "/d", "tiny", 200)
    assert cfg.trainer.accelerator == "cpu" and cfg.logger.name == "csv"
    assert cfg.mean_distance.ensemble_size == 8  # the rest stays DragBench's
    with pytest.raises(ConfigError, match="evaluate.*data=DIR"):
        load_config(REPO / "configs" / "edit.yaml", ["evaluate=true"])


@pytest.mark.slow
def test_edit_py_batch_with_evaluate(dragbench_dir, tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    name = "other_objects/JH_2023-09-15-0951-47"
    shutil.copytree(dragbench_dir / name, data / name)
    cmd = [sys.executable, "edit.py", "model=tiny", "trainer=cpu", "lora.enabled=false", "drag.width=128",
           "drag.n_pix_step=4", "quiet=true", f"data={data}", f"out={tmp_path / 'out'}", "evaluate=true",
           "evaluate_overrides=[model=tiny,mean_distance.ensemble_size=2,mean_distance.width=128,"
           "image_fidelity.enabled=false]"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dragdiffusion on DragBench: MD" in proc.stdout and "| DAI " in proc.stdout and " s/edit" in proc.stdout
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["summary"]["counts"]["ok"] == 1 and report["summary"]["n_pairs"] == 3
