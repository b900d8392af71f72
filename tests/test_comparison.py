"""Comparing methods: paper tables per dataset (CSV, Markdown, LaTeX), the W&B tables and the side-by-side images,
report.html in headless Chromium, and evaluate=true failing before the first edit when the evaluation cannot run.

The results folder is a methods=[...] batch's layout built by hand: two methods (one with a name no preset has)
over a DragBench and a Drag100 sample, each result with its trajectory.json (method, seconds, UNet passes)."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

import edit as edit_cli
from conftest import REPO
from dragdiffusion.comparison import (Column, Table, aggregate, category_tables, comparison_tables, latex_escape,
                                      to_csv, to_latex, to_markdown)
from dragdiffusion.report import nice_ticks, scatter_svg
from test_app import CHROMIUM, CHROMIUM_ARGS
from test_logging import leet, run_table, wandb_offline  # noqa: F401 - wandb_offline: W&B under tmp
from test_methods_e2e import BENCH_SAMPLE, DRAG100, DRAG100_SAMPLE, mixed_tree

METHODS = ("dragdiffusion", "gooddrag+text")  # a name without a preset: it comes from the results
BENCH = f"animals/{Path(BENCH_SAMPLE).name}"
# per (method, sample): the edit's seconds by stage and its UNet passes by stage, as trajectory.json records them
EDITS = {("dragdiffusion", BENCH): ({"lora": 10.0, "inversion": 2.04, "drag": 3.0, "denoise": 1.0},
                                    {"lora": 80, "inversion": 35, "drag": 80, "denoise": 35}),
         ("dragdiffusion", DRAG100_SAMPLE): ({"lora": 9.0, "inversion": 2.0, "drag": 2.0, "denoise": 1.0},
                                             {"lora": 80, "inversion": 35, "drag": 61, "denoise": 35}),
         ("gooddrag+text", BENCH): ({"lora": 8.0, "inversion": 2.0, "drag": 20.26, "denoise": 1.0},
                                    {"lora": 70, "inversion": 38, "drag": 224, "denoise": 31}),
         ("gooddrag+text", DRAG100_SAMPLE): ({"lora": 8.0, "inversion": 2.0, "drag": 12.0, "denoise": 1.0},
                                             {"lora": 70, "inversion": 38, "drag": 150, "denoise": 31})}
EVAL = ["model=tiny", "trainer=cpu", "mean_distance.ensemble_size=1", "mean_distance.width=64",
        "image_fidelity.enabled=false", "dai.gammas=[1,5]", "quiet=true"]


# ------------------------------------------------------------------------------------------ pure tables

def row(sample, dataset, category, method, distances, dai, seconds=None, passes=None, status="ok"):
    return {"sample": sample, "dataset": dataset, "category": category, "method": method, "status": status,
            "n_pairs": len(distances), "pairs": [{"distance": d, "masked_distance": d / 2} for d in distances],
            "image_fidelity": None, "dai_1": dai, "seconds": seconds, "unet_passes": passes}


ROWS = [row("animals/a", "dragbench", "animals", "my_drag", [10.0, 20.0], 0.11111, 12.34, 230),
        row("animals/b", "dragbench", "animals", "my_drag", [30.0], 0.2, 20.0, 230),
        row("art/c", "dragbench", "art", "my_drag", [1.0], 0.3, 5.0, 230),
        row("animals/a", "dragbench", "animals", "other", [40.0, 41.0], 0.5, 2.0, 120),
        row("animals/b", "dragbench", "animals", "other", [], None, status="missing"),
        row("art/c", "dragbench", "art", "other", [3.333], 0.6, 2.0, 120),
        row("cat_2", "drag100", "", "my_drag", [7.0], 0.0696, 30.0, 230),
        row("cat_2", "drag100", "", "other", [9.0], 0.1477, 3.0, 120)]


def test_one_comparison_table_per_dataset_one_row_per_method_rounded_with_directions():
    tables = comparison_tables(ROWS, gammas=[1])
    assert list(tables) == ["drag100", "dragbench"]  # DragBench's figures never averaged with Drag100's
    bench = tables["dragbench"]
    assert [r["method"] for r in bench.rows] == ["my_drag", "other"]
    mine = bench.rows[0]
    assert mine["mean_distance"] == pytest.approx(61 / 4)  # the mean over the 4 pairs, not over the 3 samples
    assert mine["dai_1"] == pytest.approx((0.11111 + 0.2 + 0.3) / 3) and mine["seconds"] == pytest.approx(37.34 / 3)
    assert bench.rows[1]["samples"] == "2 of 3" and mine["samples"] == "3"
    assert "image_fidelity" not in [c.key for c in bench.columns]  # no value: no column
    lines = list(csv.reader(to_csv(bench).splitlines()))
    assert lines[0] == ["method", "MD (px) [lower is better]", "m-MD (px) [lower is better]",
                        "DAI gamma=1 [lower is better]", "s / edit [lower is better]", "UNet passes [lower is better]",
                        "samples"]
    assert lines[1] == ["my_drag", "15.25", "7.62", "0.2037", "12.4", "230", "3"]  # 7.625 -> 7.62 (half even)
    assert lines[2] == ["other", "28.11", "14.06", "0.5500", "2.0", "120", "2 of 3"]
    drag100 = list(csv.reader(to_csv(tables["drag100"]).splitlines()))
    assert drag100[1][:4] == ["my_drag", "7.00", "3.50", "0.0696"] and drag100[2][3] == "0.1477"

    md = to_markdown(bench)
    assert "| method | MD (px) ↓ | m-MD (px) ↓ | DAI γ=1 ↓ | s / edit ↓ | UNet passes ↓ | samples |" in md
    assert "|:---|---:|---:|---:|---:|---:|:---|" in md
    assert "| my\\_drag | **15.25** | **7.62** | **0.2037** | 12.4 | 230 | 3 |" in md  # best of each column bold
    assert "| other | 28.11 | 14.06 | 0.5500 | **2.0** | **120** | 2 of 3 |" in md
    tex = to_latex(bench)
    assert "\\begin{tabular}{lrrrrrl}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert "method & MD (px) $\\downarrow$ & m-MD (px) $\\downarrow$ & DAI $\\gamma{=}1$ $\\downarrow$" in tex
    assert "my\\_drag & \\textbf{15.25} & \\textbf{7.62} & \\textbf{0.2037} & 12.4 & 230 & 3 \\\\" in tex


def test_category_table_keeps_methods_apart_and_names_drag100_by_its_dataset():
    tables = category_tables(ROWS, gammas=[1])
    bench = [(r["method"], r["category"], r["n_samples"]) for r in tables["dragbench"].rows]
    assert bench == [("my_drag", "animals", 2), ("my_drag", "art", 1), ("my_drag", "all", 3),
                     ("other", "animals", 2), ("other", "art", 1), ("other", "all", 3)]
    assert [(r["method"], r["category"]) for r in tables["drag100"].rows] == [("my_drag", "Drag100"),
                                                                           ("other", "Drag100")]  # one: no "all"
    animals = tables["dragbench"].rows[0]
    assert animals["mean_distance"] == pytest.approx(20.0) and animals["dai_1"] == pytest.approx((0.11111 + 0.2) / 2)
    assert "**" not in to_markdown(tables["dragbench"])  # no "best" across categories


def test_latex_and_markdown_escape_what_they_must():
    assert latex_escape("a_b & 50% #1 $x$ {y} ~ ^ \\") == \
        "a\\_b \\& 50\\% \\#1 \\$x\\$ \\{y\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"
    table = Table("t", [Column("method", "method"), Column("x", "x", "higher", 3)],
                  [{"method": "a|b_c", "x": 0.12345}, {"method": "d", "x": None}])
    assert "| a\\|b\\_c | 0.123 |" in to_markdown(table) and "| d | n/a |" in to_markdown(table)
    assert "a|b\\_c & 0.123 \\\\" in to_latex(table) and "x $\\uparrow$" in to_latex(table)


def test_aggregate_means_seconds_and_passes_over_the_evaluated_results_only():
    figures = aggregate([r for r in ROWS if r["method"] == "other" and r["dataset"] == "dragbench"], [1])
    assert figures["n_samples"] == 3 and figures["n_evaluated"] == 2 and figures["n_pairs"] == 3
    assert figures["seconds"] == 2.0 and figures["unet_passes"] == 120
    assert figures["counts"] == {"ok": 2, "missing": 1, "size_mismatch": 0, "error": 0}


def test_plot_ticks_are_round_and_cover_the_points():
    assert nice_ticks(0, 37) == [0, 10, 20, 30, 40]
    assert nice_ticks(0, 0.7) == [0, 0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(0, 0) == [-1, -0.5, 0, 0.5, 1]  # one point at 0: an axis around it
    svg = scatter_svg([("a", 12.0, 30.5), ("b_c", 40.0, 22.0)], "seconds", "MD")
    assert svg.count("<circle") == 2 and ">b_c</text>" in svg and ">40</text>" in svg


# ------------------------------------------------------------------------------------------ the evaluator

@pytest.fixture(scope="module")
def compared(tmp_path_factory, dragbench_dir, tiny_model_dir, wandb_offline):  # noqa: F811
    """Two methods' results over a DragBench and a Drag100 sample, evaluated once (W&B offline)."""
    if not DRAG100.is_dir():
        pytest.skip(f"the shared Drag100 sample is not at {DRAG100}")
    from dragdiffusion.data import read_sample
    from dragdiffusion.evaluate import main
    from dragdiffusion.io import save_json, save_png
    root = tmp_path_factory.mktemp("compare")
    data = mixed_tree(root / "data", (dragbench_dir / BENCH_SAMPLE, DRAG100 / DRAG100_SAMPLE))
    results = root / "results"
    for method in METHODS:
        save_json(results / method / "summary.json", {"method": method, "samples": []})  # as a methods batch
        for name in (BENCH, DRAG100_SAMPLE):
            image = read_sample(data / name, name).image
            if method != METHODS[0]:
                image = np.roll(image, 9, axis=1)  # another result: other figures
            seconds, passes = EDITS[(method, name)]
            save_png(results / method / name / "dragged_image.png", image)
            save_png(results / method / name / "drag_input.png", image)
            save_json(results / method / name / "trajectory.json",
                      {"method": {"name": method}, "seconds": seconds, "unet_passes": passes})
            preset = method.split("+")[0]  # the variant's config names its preset
            (results / method / name / "config.yaml").write_text(f"method: {preset}\nseed: 42\n")
    logs = root / "logs"
    assert main([f"results={results}", f"data={data}", *EVAL, "logger=wandb", f"logger.save_dir={logs}"]) == 0
    (run_dir,) = (logs / "wandb").glob("offline-run-*")
    return results, run_dir


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


def test_evaluation_writes_paper_tables_per_dataset_and_method(compared, capsys):
    results, _ = compared
    report = json.loads((results / "evaluation.json").read_text())
    groups = {(g["dataset"], g["method"]): g for g in report["summary"]["groups"]}
    assert sorted(groups) == [(d, m) for d in ("drag100", "dragbench") for m in METHODS]
    folder = results / "comparison"
    for dataset, name in (("dragbench", BENCH), ("drag100", DRAG100_SAMPLE)):
        lines = read_csv(folder / f"{dataset}.csv")
        assert lines[0] == ["method", "MD (px) [lower is better]", "m-MD (px) [lower is better]",
                            "DAI gamma=1 [lower is better]", "DAI gamma=5 [lower is better]",
                            "s / edit [lower is better]", "UNet passes [lower is better]", "samples"]
        assert [r[0] for r in lines[1:]] == list(METHODS)
        for method, cells in zip(METHODS, lines[1:]):
            g = groups[(dataset, method)]
            seconds, passes = EDITS[(method, name)]
            assert cells[1] == f"{g['mean_distance']:.2f}" and cells[3] == f"{g['dai_1']:.4f}"
            assert cells[5] == f"{sum(seconds.values()):.1f}" and cells[6] == str(sum(passes.values()))
            assert cells[7] == "1"
        assert "MD (px) ↓" in (folder / f"{dataset}.md").read_text()
        tex = (folder / f"{dataset}.tex").read_text()
        assert "\\toprule" in tex and "gooddrag+text &" in tex
    assert groups[("dragbench", "gooddrag+text")]["dai_1"] != groups[("drag100", "gooddrag+text")]["dai_1"]
    categories = read_csv(folder / "drag100_categories.csv")
    assert [r[:2] for r in categories[1:]] == [["dragdiffusion", "Drag100"], ["gooddrag+text", "Drag100"]]
    # the raw tables: no row mixes methods or datasets, no settings JSON in a comparison CSV
    raw = list(csv.DictReader((results / "evaluation_categories.csv").open()))
    assert {(r["dataset"], r["method"], r["category"]) for r in raw} == {
        (d, m, c) for m in METHODS for d, c in (("dragbench", "animals"), ("drag100", "Drag100"))}
    assert all(r["n_samples"] == "1" for r in raw)
    methods_csv = list(csv.DictReader((results / "evaluation_methods.csv").open()))
    assert len(methods_csv) == 4 and "settings" not in methods_csv[0]
    assert float(methods_csv[0]["mean_distance"]) == groups[("drag100", "dragdiffusion")]["mean_distance"]  # raw
    settings = list(csv.DictReader((results / "evaluation_settings.csv").open()))
    assert {"method": "dragdiffusion", "setting": "seed", "value": "42"} in settings
    assert len(report["lines"]) == 4 and report["lines"][0].startswith("dragdiffusion on Drag100: MD ")
    assert report["line"].startswith("2 method(s) on Drag100 and DragBench: 4/4 results evaluated")


def test_wandb_run_has_the_tables_and_every_methods_result_side_by_side(compared):
    results, run_dir = compared
    table, _ = run_table(run_dir, "eval/comparison/dragbench")
    assert table["columns"][:3] == ["method", "MD (px) ↓", "m-MD (px) ↓"] and table["columns"][-1] == "samples"
    assert [r[0] for r in table["data"]] == list(METHODS)
    report = json.loads((results / "evaluation.json").read_text())
    md = {(g["dataset"], g["method"]): g["mean_distance"] for g in report["summary"]["groups"]}
    assert table["data"][1][1] == pytest.approx(round(md[("dragbench", "gooddrag+text")], 2))
    table, _ = run_table(run_dir, "eval/categories/drag100")
    assert [r[:2] for r in table["data"]] == [["dragdiffusion", "Drag100"], ["gooddrag+text", "Drag100"]]
    table, files = run_table(run_dir, "eval/side_by_side")
    assert table["columns"] == ["sample", "dataset", "input", *METHODS]
    assert [r[:2] for r in table["data"]] == [[BENCH, "DragBench"], [DRAG100_SAMPLE, "Drag100"]]
    for cells in table["data"]:
        for cell in cells[2:]:
            assert cell["_type"] == "image-file" and files[cell["path"]].stat().st_size > 0
    summary = leet(run_dir, summary=True)["summary"]
    assert summary["eval/drag100/gooddrag+text/unet_passes"] == 70 + 38 + 150 + 31


@pytest.mark.browser
def test_report_html_renders_from_disk_with_every_image(compared):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser test driver)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    results, _ = compared
    page_file = results / "comparison" / "report.html"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            assert len(sizes) == 2 * (1 + len(METHODS))  # each sample: the input and every method's result
            assert all(done and width > 0 for done, width in sizes), sizes
            assert page.locator("svg circle").count() == 2 * len(METHODS)  # MD against seconds, per dataset
            assert page.locator("svg text", has_text="gooddrag+text").count() == 2
            headers = page.locator("table").first.locator("th").all_inner_texts()
            assert headers[:2] == ["method", "MD (px) ↓"]
            links = page.eval_on_selector_all("a", "as => as.map(a => a.href)")  # to the full-size results
            assert len(links) == 2 * len(METHODS)
            assert all(Path(unquote(urlparse(link).path)).is_file() for link in links), links
            assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing from a server
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------ before the first edit

@pytest.fixture
def no_batch(monkeypatch):
    """The batch runner replaced: a test fails if any edit starts."""
    import dragdiffusion.batch

    def refuse(cfg):
        raise AssertionError("an edit started")
    monkeypatch.setattr(dragdiffusion.batch, "run_batch", refuse)


def test_evaluate_true_with_a_misspelled_override_fails_before_any_edit(tmp_path, dragbench_dir, no_batch, capsys):
    out = tmp_path / "out"
    args = ["model=tiny", "trainer=cpu", "quiet=true", f"data={dragbench_dir}", f"out={out}", "evaluate=true"]
    assert edit_cli.main(args + ["evaluate_overrides=[model=tiny,mean_distanse.width=64]"]) == 2
    err = capsys.readouterr().err
    assert "evaluate_overrides" in err and "mean_distanse" in err and "did you mean mean_distance." in err
    assert "nothing was edited" in err and not out.exists()


def test_evaluate_true_names_what_the_evaluation_lacks_before_any_edit(tmp_path, dragbench_dir, no_batch, capsys):
    out = tmp_path / "out"
    args = ["model=tiny", "trainer=cpu", "quiet=true", f"data={dragbench_dir}", f"out={out}", "evaluate=true"]
    missing_dift = "evaluate_overrides=[model.name_or_path=no-such-org/no-such-model,model.local_files_only=true"
    assert edit_cli.main(args + [missing_dift + ",image_fidelity.enabled=false]"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "mean_distance.enabled=false" in err and "hf download" in err
    assert "nothing was edited" in err and not out.exists()
    if importlib.util.find_spec("torchvision") is None:  # this CPU machine: IF cannot run
        assert edit_cli.main(args + [missing_dift + "]"]) == 2
        err = capsys.readouterr().err
        assert "torchvision" in err and '.[eval]' in err and "image_fidelity.enabled=false" in err
        assert "no-such-org/no-such-model" in err  # every problem in one message
        assert not out.exists()
    assert edit_cli.main(args + ["evaluate_overrides=[mean_distance.enabled=false,image_fidelity.enabled=false,"
                                 "dai.enabled=false]"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err and not out.exists()


def test_model_missing_says_what_is_not_on_disk_without_loading(tmp_path):
    from dragdiffusion.inputs import model_missing
    from dragdiffusion.config import ModelConfig
    assert model_missing(ModelConfig(name_or_path="tiny")) is None
    assert "checkpoint file not found" in model_missing(ModelConfig(name_or_path=str(tmp_path / "sd.safetensors")))
    assert "no model_index.json" in model_missing(ModelConfig(name_or_path=str(tmp_path)))
    hub = model_missing(ModelConfig(name_or_path="no-such-org/no-such-model", local_files_only=True))
    assert "not in the Hugging Face cache" in hub
    assert "model.vae" in model_missing(ModelConfig(name_or_path="tiny", vae=str(tmp_path / "vae.safetensors")))


def test_evaluate_help_lists_every_model_preset(capsys):
    from dragdiffusion.evaluate import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    presets = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    assert presets and f"model={'|'.join(presets)}" in text
