"""The Drag Accuracy Index (GoodDrag's Drag100 metric) with hand-computed answers, its border rule and GoodDrag's
script's numbers (reference_compat), then the evaluator: MD, m-MD, IF and DAI over a results folder that mixes
the layouts and the methods, and DAI without any model."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from dragdiffusion.errors import ConfigError, SampleError
from dragdiffusion.metrics import DAI_GAMMAS, DragAccuracyIndex, dai_pairs, drag_accuracy_index, pair_distances

from test_drag100 import DRAG100, mixed_tree

TINY_EVAL = ["model=tiny", "trainer=cpu", "mean_distance.ensemble_size=2", "mean_distance.width=128",
             "image_fidelity.enabled=false", "quiet=true"]


# ------------------------------------------------------------------------------------------ pure math

def test_hand_computed_dai_of_one_pair_on_8x8_images():
    source = np.zeros((8, 8, 3), np.uint8)
    edited = np.zeros((8, 8, 3), np.uint8)
    edited[5, 5] = (255, 0, 0)  # inside the 3 x 3 patch at the target (5, 5): adds 1^2
    edited[4, 4] = (255, 255, 255)  # adds 3 x 1^2
    edited[0, 0] = (255, 255, 255)  # outside the patch: adds nothing
    source[2, 2] = (0, 0, 255)  # the handle's own pixel: the edited (5, 5) has blue 0, adds 1^2
    # sum = 1 + 3 + 1 = 5 over the 9 offsets of the patch
    assert drag_accuracy_index(source, edited, [[2, 2]], [[5, 5]], gamma=1) == pytest.approx(5 / 9, abs=1e-15)
    assert dai_pairs(source, edited, [[2, 2]], [[5, 5]], 1).tolist() == pytest.approx([5 / 9])
    # gamma 0: one pixel, (0, 0, 1) vs (1, 0, 0) -> 2
    assert drag_accuracy_index(source, edited, [[2, 2]], [[5, 5]], gamma=0) == pytest.approx(2.0)
    # float images in [0, 1] give the same number
    assert drag_accuracy_index(source / 255.0, edited / 255.0, [[2, 2]], [[5, 5]], 1) == pytest.approx(5 / 9)


def test_an_unedited_image_with_handle_at_target_has_dai_zero():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    points = [[3, 4], [20, 10], [0, 0], [23, 15]]  # two at corners: the patches are cut, still 0
    for gamma in DAI_GAMMAS:
        assert drag_accuracy_index(image, image.copy(), points, points, gamma) == 0.0
        assert drag_accuracy_index(image, image.copy(), points, points, gamma, reference_compat=True) == 0.0


def test_mean_over_pairs_and_reference_compat_divides_once_more_by_the_number_of_pairs():
    rng = np.random.default_rng(1)
    source, edited = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2))
    handles, targets = [[8, 8], [20, 12]], [[12, 10], [24, 22]]  # patches of radius 5 inside both images
    per_pair = dai_pairs(source, edited, handles, targets, 5)
    src, edt = source / 255.0, edited / 255.0
    expected = [np.square(src[3:14, 3:14] - edt[5:16, 7:18]).sum() / 121,
                np.square(src[7:18, 15:26] - edt[17:28, 19:30]).sum() / 121]
    assert per_pair.tolist() == pytest.approx(expected, rel=1e-12)
    ours = drag_accuracy_index(source, edited, handles, targets, 5)
    assert ours == pytest.approx(sum(expected) / 2, rel=1e-12)
    assert drag_accuracy_index(source, edited, handles, targets, 5, reference_compat=True) == \
        pytest.approx(ours / 2, rel=1e-12)
    one = drag_accuracy_index(source, edited, handles[:1], targets[:1], 5)  # one pair: the two agree
    assert drag_accuracy_index(source, edited, handles[:1], targets[:1], 5, reference_compat=True) == \
        pytest.approx(one, rel=1e-12)


def test_border_patches_use_the_offsets_inside_both_images():
    rng = np.random.default_rng(2)
    source, edited = (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2))
    src, edt = source / 255.0, edited / 255.0
    # handle at the left edge (x = 0), target at x = 4: offsets dx in 0..1 (dx = -1 leaves the source), dy in -1..1
    value = drag_accuracy_index(source, edited, [[0, 3]], [[4, 3]], 1)
    assert value == pytest.approx(np.square(src[2:5, 0:2] - edt[2:5, 4:6]).sum() / 6, rel=1e-12)
    # GoodDrag's script: a slice from x = -1 wraps to an empty patch, which numpy cannot subtract from a 3 x 3 one
    with pytest.raises(SampleError, match="dai: reference_compat: at gamma 1 .* 0x3 px .* 3x3 px"):
        drag_accuracy_index(source, edited, [[0, 3]], [[4, 3]], 1, reference_compat=True, name="s")
    # both at the bottom-right corner: 2 x 2 offsets; the script cuts both patches to 2 x 2 and divides by 9
    corner = np.square(src[6:8, 6:8] - edt[6:8, 6:8]).sum()
    assert drag_accuracy_index(source, edited, [[7, 7]], [[7, 7]], 1) == pytest.approx(corner / 4, rel=1e-12)
    assert drag_accuracy_index(source, edited, [[7, 7]], [[7, 7]], 1, reference_compat=True) == \
        pytest.approx(corner / 9, rel=1e-12)
    # points are rounded to the nearest pixel and must be inside
    assert drag_accuracy_index(source, edited, [[0.4, 2.6]], [[3.6, 3.4]], 1) == \
        drag_accuracy_index(source, edited, [[0, 3]], [[4, 3]], 1)
    with pytest.raises(SampleError, match="points: target 0 .* outside the 8x8 image"):
        drag_accuracy_index(source, edited, [[0, 3]], [[8, 3]], 1)
    with pytest.raises(SampleError, match="as many targets as handles"):
        drag_accuracy_index(source, edited, [[0, 3], [1, 1]], [[4, 3]], 1)


def test_the_metric_is_the_mean_over_images_exact_in_any_order():
    rng = np.random.default_rng(3)
    samples = [(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                [[5, 5], [12, 18]][:k], [[9, 7], [14, 20]][:k]) for k in (1, 2, 2)]
    expected = {g: np.mean([drag_accuracy_index(*s, g) for s in samples]) for g in DAI_GAMMAS}
    results = []
    for order in (samples, samples[::-1]):
        metric = DragAccuracyIndex()
        for s in order:
            metric.update(*s)
        assert set(metric.last) == set(DAI_GAMMAS)
        results.append({g: v.item() for g, v in metric.compute().items()})
    assert results[0] == results[1]  # bit-identical: fixed-point sums
    assert results[0] == pytest.approx(expected, rel=1e-9)
    assert metric.dai_sum.dtype == torch.long and metric.dai_sum.shape == (len(DAI_GAMMAS),)
    compat = DragAccuracyIndex(gammas=[1], reference_compat=True)
    compat.update(*samples[1])
    assert compat.compute()[1].item() == pytest.approx(drag_accuracy_index(*samples[1], 1) / 2, rel=1e-9)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert all(np.isnan(v.item()) for v in DragAccuracyIndex().compute().values())
    with pytest.raises(ValueError, match="gammas"):
        DragAccuracyIndex(gammas=[1, 1])


# ------------------------------------------------------------------------------------------ the evaluator

@pytest.fixture(scope="module")
def mixed_results(tmp_path_factory, dragbench_dir):
    """Data: DragBench + Drag100 + ours in one tree. Results: the unedited sources as dragged_image.png; the
    DragBench sample's config.yaml says method gooddrag, car_0's has no method key (an older DragDiffusion
    result), cat_2 and ours/demo have none (another code base's output)."""
    if not DRAG100.is_dir():
        pytest.skip(f"the shared Drag100 sample is not at {DRAG100}")
    from dragdiffusion.data import read_sample
    from dragdiffusion.io import save_png
    root = tmp_path_factory.mktemp("mixed")
    names = mixed_tree(root / "data", dragbench_dir, DRAG100)
    for n in names:
        save_png(root / "results" / n / "dragged_image.png", read_sample(root / "data" / n, n).image)
    (root / "results" / names[0] / "config.yaml").write_text(
        "method: gooddrag\nseed: 42\ndrag:\n  lr: 0.02\n  r_m: 4\ngooddrag:\n  drag_end_step: 7\nlora:\n  path: /x\n")
    (root / "results" / "car_0" / "config.yaml").write_text("seed: 42\ndrag:\n  lr: 0.01\ngooddrag:\n  beta: 4.0\n")
    return root, names


def test_evaluate_reports_md_mmd_dai_per_sample_category_and_method(mixed_results, tiny_model_dir, tmp_path,
                                                                    capsys):
    from dragdiffusion.data import read_sample
    from dragdiffusion.evaluate import main
    root, names = mixed_results
    out = tmp_path / "eval"
    assert main([f"results={root / 'results'}", f"data={root / 'data'}", f"out={out}", *TINY_EVAL]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    summary, rows = report["summary"], {r["sample"]: r for r in report["samples"]}
    assert sorted(rows) == sorted(names)
    for n in names:
        s, row = read_sample(root / "data" / n, n), rows[n]
        assert row["status"] == "ok"
        assert [p["match"] for p in row["pairs"]] == [[round(x), round(y)] for x, y in s.handles]  # unedited
        md = pair_distances([[round(x), round(y)] for x, y in s.handles], s.targets).mean().item()
        assert row["mean_distance"] == pytest.approx(md) and row["masked_mean_distance"] is not None
        assert all("masked_match" in p and "masked_distance" in p for p in row["pairs"])
        for g in DAI_GAMMAS:
            assert row[f"dai_{g}"] == pytest.approx(drag_accuracy_index(s.image, s.image, s.handles, s.targets, g))
    assert summary["dai_gammas"] == list(DAI_GAMMAS) and summary["dai_reference_compat"] is False
    for g in DAI_GAMMAS:
        assert summary[f"dai_{g}"] == pytest.approx(np.mean([rows[n][f"dai_{g}"] for n in names]), abs=1e-9)
    assert summary["masked_mean_distance"] is not None and summary["n_pairs"] == sum(rows[n]["n_pairs"] for n in names)
    methods = {m["method"]: m for m in summary["methods"]}
    assert sorted(methods) == ["dragdiffusion", "gooddrag", "unknown"]
    assert methods["gooddrag"]["settings"] == {"method": "gooddrag", "seed": 42, "drag.lr": 0.02, "drag.r_m": 4,
                                               "gooddrag.drag_end_step": 7}  # no lora.path: a per-sample path
    assert methods["dragdiffusion"]["settings"] == {"method": "dragdiffusion", "seed": 42, "drag.lr": 0.01}
    assert methods["unknown"]["n_samples"] == 2 and methods["unknown"]["settings"] == {}
    assert methods["gooddrag"]["dai_1"] == pytest.approx(rows[names[0]]["dai_1"])
    assert {r["sample"]: r["method"] for r in report["samples"]}["car_0"] == "dragdiffusion"
    assert "settings" not in rows["car_0"]
    # one line per dataset (the sample's layout) and method: figures never averaged over methods or datasets
    assert report["line"].startswith("3 method(s) on Drag100, DragBench and folder-format samples: 4/4 results")
    assert [line.split(": MD ")[0] for line in report["lines"]] == [
        "dragdiffusion on Drag100", "unknown on Drag100", "gooddrag on DragBench", "unknown on folder-format samples"]
    line = report["lines"][2]
    assert "| m-MD " in line and "IF n/a" in line and "(gamma 1/5/10/20)" in line
    assert f"{rows[names[0]]['n_pairs']} pairs" in line and "1/1 samples evaluated" in line
    assert report["line"] in printed and all(m in printed for m in report["lines"])
    samples_csv = list(csv.DictReader((out / "evaluation_samples.csv").open()))
    assert list(samples_csv[0])[-7:] == ["dai_1", "dai_5", "dai_10", "dai_20", "seconds", "unet_passes", "message"]
    assert {r["sample"]: (r["dataset"], r["method"]) for r in samples_csv}["car_0"] == ("drag100", "dragdiffusion")
    categories = list(csv.DictReader((out / "evaluation_categories.csv").open()))
    assert [(c["dataset"], c["method"], c["category"]) for c in categories] == [
        ("drag100", "dragdiffusion", "Drag100"), ("drag100", "unknown", "Drag100"),
        ("dragbench", "gooddrag", "animals"), ("folder", "unknown", "ours")]  # Drag100's flat folders: its name
    assert float(categories[2]["dai_20"]) == pytest.approx(rows[names[0]]["dai_20"])
    method_rows = list(csv.DictReader((out / "evaluation_methods.csv").open()))
    assert [(m["dataset"], m["method"]) for m in method_rows] == [
        ("drag100", "dragdiffusion"), ("drag100", "unknown"), ("dragbench", "gooddrag"), ("folder", "unknown")]
    assert "settings" not in method_rows[0]
    settings = list(csv.DictReader((out / "evaluation_settings.csv").open()))
    assert {"method": "gooddrag", "setting": "gooddrag.drag_end_step", "value": "7"} in settings


def test_dai_needs_no_model_and_reference_compat_is_labelled(mixed_results, tmp_path):
    from dragdiffusion.evaluate import main
    root, names = mixed_results
    args = [f"results={root / 'results'}", f"data={root / 'data'}", "trainer=cpu", "quiet=true",
            "model.name_or_path=no-such-org/no-such-model", "model.local_files_only=true",
            "mean_distance.enabled=false", "image_fidelity.enabled=false"]
    assert main(args + [f"out={tmp_path / 'ours'}"]) == 0
    ours = json.loads((tmp_path / "ours" / "evaluation.json").read_text())
    assert ours["summary"]["mean_distance"] is None and ours["summary"]["dai_1"] is not None
    assert all(line.split(": ", 1)[1].startswith("MD n/a | m-MD n/a | IF n/a | DAI ") for line in ours["lines"])
    assert ours["summary"]["n_pairs"] == sum(r["n_pairs"] for r in ours["samples"])
    assert main(args + [f"out={tmp_path / 'compat'}", "dai.reference_compat=true", "dai.gammas=[1,5]"]) == 0
    compat = json.loads((tmp_path / "compat" / "evaluation.json").read_text())
    assert compat["summary"]["dai_gammas"] == [1, 5] and compat["summary"]["dai_reference_compat"] is True
    for a, b in zip(ours["samples"], compat["samples"]):  # no patch of these samples crosses the border
        assert b["dai_1"] == pytest.approx(a["dai_1"] / a["n_pairs"], rel=1e-12) and "dai_10" not in b


def test_evaluate_errors_for_dai_name_the_keys(mixed_results, capsys):
    from dragdiffusion.config import EvaluateConfig, load_config
    from dragdiffusion.evaluate import main
    root, _ = mixed_results
    with pytest.raises(ConfigError, match="dai.gammas"):
        load_config(None, ["dai.gammas=[1,1]"], schema=EvaluateConfig)
    args = [f"results={root / 'results'}", f"data={root / 'data'}", "trainer=cpu", "quiet=true"]
    assert main(args + ["mean_distance.enabled=false", "image_fidelity.enabled=false", "dai.enabled=false"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(args + ["model.name_or_path=no-such-org/no-such-model", "model.local_files_only=true",
                        "image_fidelity.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "mean_distance.enabled=false (DAI and IF need no DIFT model)" in err


def test_a_copied_results_folder_of_only_drag100_samples(tmp_path, tiny_model_dir):
    """GoodDrag's own outputs (output_image.png, no config.yaml) evaluate as method 'unknown'."""
    from dragdiffusion.evaluate import main
    if not DRAG100.is_dir():
        pytest.skip(f"the shared Drag100 sample is not at {DRAG100}")
    (tmp_path / "res" / "car_0").mkdir(parents=True)
    shutil.copy(DRAG100 / "car_0" / "original.jpg", tmp_path / "res" / "car_0" / "output_image.png")
    data = tmp_path / "data"
    shutil.copytree(DRAG100 / "car_0", data / "car_0")
    assert main([f"results={tmp_path / 'res'}", f"data={data}", "result_name=output_image.png",
                 "mean_distance.enabled=false", "image_fidelity.enabled=false", "trainer=cpu", "quiet=true"]) == 0
    from dragdiffusion.data import read_sample
    report = json.loads((tmp_path / "res" / "evaluation.json").read_text())
    assert [m["method"] for m in report["summary"]["methods"]] == ["unknown"]
    assert report["line"].startswith("unknown on Drag100: MD n/a") and report["samples"][0]["status"] == "ok"
    s = read_sample(data / "car_0")  # the JPEG copied under a .png name reads as the same pixels
    assert report["summary"]["dai_1"] == pytest.approx(drag_accuracy_index(s.image, s.image, s.handles, s.targets, 1))
