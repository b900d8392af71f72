"""The browser app, driven by a real headless Chromium (Debian's) through Playwright, on the tiny model.

The app is served from this process on a free localhost port; each test opens a page, clicks and paints like a
person, and reads the page's status box, result image and downloads.
"""
from __future__ import annotations

import io
import json
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edit as edit_cli
from conftest import REPO, TINY_EDIT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# short schedules keep each device job to seconds: 3 inversion + 3 denoising steps, 5 drag iterations
APP_SETTINGS = TINY_EDIT + ["drag.num_inference_steps=5", "drag.n_pix_step=5", "generation.width=128",
                            "generation.height=96", "generation.steps=5"]
TIMEOUT_MS = 150_000  # a device job on a busy 2-core machine (seconds when idle)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir):
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")
    from dragdiffusion.app import build_app, launch
    from dragdiffusion.config import load_config
    config = REPO / "configs" / "edit.yaml"
    cfg = load_config(config, APP_SETTINGS + [f"app.port={free_port()}"])
    demo = build_app(config, APP_SETTINGS)
    _, url, share_url = launch(demo, cfg.app, block=False)
    assert url.startswith("http://127.0.0.1:") and share_url is None  # local only unless app.share=true
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser test driver)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (scripts/install.sh test does it)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh page on the app; afterwards, every request it made must have stayed on this machine."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    hosts = set()
    pg.on("request", lambda request: hosts.add(request.url.split("/")[2]))
    pg.errors = []  # the page's console errors and exceptions, for the messages of failing waits
    pg.on("console", lambda msg: pg.errors.append(msg.text) if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(app_url)
    # the editor's drawing canvas is made after its file input: a file set before it exists breaks the editor
    # ("Cannot read properties of undefined (reading 'reset_layers')"), as seen on a loaded machine
    pg.wait_for_selector("#mask_editor canvas", state="attached")
    yield pg
    context.close()
    assert all(h.startswith("127.0.0.1") for h in hosts if h), f"the page reached out: {hosts}"


# ----------------------------------------------------------------------------------------------- page actions

def status(page) -> str:
    return page.locator("#status textarea").input_value()


def wait_status(page, prefix: str) -> str:
    try:
        page.wait_for_function("p => document.querySelector('#status textarea').value.startsWith(p)", arg=prefix)
    except Exception as exc:  # say what the page shows instead
        raise AssertionError(f"waited for a status starting {prefix!r}; it is {status(page)!r}") from exc
    return status(page)


def upload(page, path: Path, tries: int = 3) -> None:
    """Upload an image into the editor; a file the page did not take (no status after 40 s) is set again, as a
    person would drop it again."""
    for _ in range(tries):
        page.locator("#mask_editor input[type=file]").set_input_files(str(path))
        try:
            page.wait_for_function("p => document.querySelector('#status textarea').value.startsWith(p)",
                                   arg="image ", timeout=40_000)
            return
        except Exception:  # noqa: BLE001 - not taken: set the file again
            continue
    raise AssertionError(f"the upload never reached the app in {tries} tries; status {status(page)!r}; "
                         f"page errors: {getattr(page, 'errors', [])[-5:]}")


def click_view(page, x: float, y: float) -> None:
    """Click pixel (x, y) of the points view image (Gradio maps the click back to natural pixels)."""
    page.wait_for_function("(document.querySelector('#points_view img') || {}).naturalWidth > 0")
    img = page.locator("#points_view img")
    rw, rh, nw, nh = img.evaluate("e => {const r = e.getBoundingClientRect(); "
                                  "return [r.width, r.height, e.naturalWidth, e.naturalHeight]}")
    s = min(rw / nw, rh / nh, 1)
    img.click(position={"x": (rw - nw * s) / 2 + (x + 0.25) * s, "y": (rh - nh * s) / 2 + (y + 0.25) * s})


def view_size(page) -> tuple[int, int]:
    return tuple(page.locator("#points_view img").evaluate("e => [e.naturalWidth, e.naturalHeight]"))


def add_pair(page, handle, target) -> None:
    click_view(page, *handle)
    wait_status(page, "handle")
    click_view(page, *target)
    wait_status(page, "target")


def paint(page, fx0: float, fx1: float, fy: float) -> None:
    """One brush stroke across the editor canvas, from fx0 to fx1 of its width at height fraction fy."""
    page.locator("#mask_editor button[aria-label=Brush]").click()
    box = page.locator("#mask_editor canvas").first.bounding_box()
    x0, x1, y = box["x"] + fx0 * box["width"], box["x"] + fx1 * box["width"], box["y"] + fy * box["height"]
    page.mouse.move(x0, y)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x0 + (x1 - x0) * i / 10, y)
    page.mouse.up()


def run(page) -> str:
    page.locator("#run").click()
    try:
        page.wait_for_function("['done', 'error', 'cancelled'].some(p => "
                               "document.querySelector('#status textarea').value.startsWith(p))")
    except Exception as exc:
        raise AssertionError(f"the run did not finish; status {status(page)!r}") from exc
    return status(page)


def download(page, elem_id: str) -> bytes:
    href = page.locator(f"#{elem_id} a").first.get_attribute("href")
    response = page.request.get(href)
    assert response.ok, href
    return response.body()


def make_image(path: Path, size=(160, 120)) -> Path:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    img[h // 4:3 * h // 4, w // 4:w // 2] = (220, 40, 30)
    Image.fromarray(img).save(path)
    return path


# ----------------------------------------------------------------------------------------------- tests

def test_progress_reports_every_stage_and_cancels(tiny_editor):
    """The app's live progress and cancel: a ProgressReporter on the LoRA and drag Trainers of editor.edit and on
    its stages outside a Trainer, labelled and counted as the console's bars."""
    from conftest import editor_with
    from dragdiffusion.callbacks import EditCancelled, ProgressReporter
    from dragdiffusion.demo import demo_sample
    sample = demo_sample(128, 96)
    reports = []
    progress = ProgressReporter(lambda *r: reports.append(r), (sample.height, sample.width))
    editor = editor_with(tiny_editor, ["drag.num_inference_steps=5", "drag.n_pix_step=3", "drag.point_tracking=false",
                                       "lora.enabled=true", "lora.steps=2", "lora.resolution=64", "lora.batch_size=1"])
    result = editor.edit(sample, callbacks=[progress], lora_callbacks=[progress])
    # 5 steps at strength 0.7: round(3.5) = 4 inverted, 4 denoised
    assert [r[:3] for r in reports] == [("LoRA", 1, 2), ("LoRA", 2, 2), *[("inversion", k, 4) for k in range(1, 5)],
                                        ("drag", 1, 3), ("drag", 2, 3), ("drag", 3, 3),
                                        *[("denoise", k, 4) for k in range(1, 5)], ("decode", 1, 1)]
    assert all(r[3] is None for r in reports if r[0] != "drag")
    np.testing.assert_allclose(reports[7][3], result.trajectory["handles"][-1])  # handles in input pixels

    reports.clear()
    stop = ProgressReporter(lambda *r: None, (sample.height, sample.width),
                            should_cancel=lambda: sum(r[0] == "drag" for r in reports) >= 2)
    counting = ProgressReporter(lambda *r: reports.append(r), (sample.height, sample.width))
    with pytest.raises(EditCancelled):
        editor_with(editor, ["lora.enabled=false", "drag.n_pix_step=10"]).edit(sample, callbacks=[counting, stop])
    assert [r[:2] for r in reports if r[0] != "inversion"] == [("drag", 1), ("drag", 2)]  # before the third



def test_the_apps_second_run_on_the_same_image_reuses_the_lora_and_the_inversion(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """Drag, look, move a point, drag again: the second run neither trains the identity LoRA nor inverts again
    (the cache is the test's own, empty at its start: conftest), and says so with the time it took."""
    import torch
    import dragdiffusion.editor as editor_module
    from dragdiffusion.app_jobs import EditorCache, edit_job, page_config, reuse_note, settings_changes
    trained = []
    real_train = editor_module.train_lora
    monkeypatch.setattr(editor_module, "train_lora", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    cfg = page_config(None, ["model=tiny", "trainer=cpu", "lora.resolution=64", "lora.batch_size=1",
                             "drag.num_inference_steps=5"], None, settings_changes(128, 42, True, 2, 3, 0.1, 0.7,
                                                                                   0.01, [2]))
    image = np.asarray(Image.open(make_image(tmp_path / "in.png")))
    editors, runs = EditorCache(), []
    for points in ([[40, 60], [70, 60]], [[40, 60], [80, 50]]):  # the person moves the target and runs again
        reports = []
        job = edit_job(cfg, image, points, None, "a ball", editors=editors)
        runs.append((job(lambda *r: reports.append(r), lambda: False), [r[0] for r in reports]))
    (first, first_stages), (second, second_stages) = runs
    assert trained == [1]
    assert "LoRA" in first_stages and "lora_reused" not in first_stages
    assert "LoRA" not in second_stages and second_stages.count("lora_reused") == 1
    assert second.trajectory["sources"] == {"lora": "reused", "inversion": "reused"}
    assert torch.equal(second.z_t, first.z_t)
    assert second.trajectory["seconds"]["lora"] < first.trajectory["seconds"]["lora"]
    assert reuse_note(first.trajectory) == ""
    assert reuse_note(second.trajectory).startswith("; reused the identity LoRA of this image (")
    assert reuse_note(second.trajectory).endswith(" s) and its inversion")


@pytest.mark.browser
def test_bad_inputs_give_messages_and_the_app_keeps_serving(page, tmp_path):
    assert run(page).startswith("error: image:")  # nothing uploaded
    upload(page, make_image(tmp_path / "in.png"))
    assert run(page).startswith("error: points:")  # no points
    w, h = view_size(page)
    click_view(page, w * 0.3, h * 0.5)
    assert wait_status(page, "handle 1")
    assert "odd" in run(page)  # a handle without its target
    page.locator("#clear_points").click()
    wait_status(page, "points cleared")
    assert run(page).startswith("error: points:")
    add_pair(page, (w * 0.3, h * 0.5), (w * 0.5, h * 0.5))
    done = run(page)  # no mask painted: allowed (no region constraint), with a warning in the page
    assert done.startswith("done (dragdiffusion) in "), done
    assert "no mask painted" in done
    result = Image.open(io.BytesIO(download(page, "result_file")))
    assert result.size == (160, 120)


@pytest.mark.browser
def test_page_edit_replays_bit_for_bit_through_edit_py(page, tmp_path):
    upload(page, make_image(tmp_path / "in.png"))
    w, h = view_size(page)
    paint(page, 0.3, 0.7, 0.5)
    add_pair(page, (w * 0.35, h * 0.5), (w * 0.55, h * 0.5))
    done = run(page)
    assert done.startswith("done (dragdiffusion) in "), done
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    result = np.asarray(Image.open(io.BytesIO(download(page, "result_file"))).convert("RGB"))
    assert result.shape == (120, 160, 3)  # the input's size, not the working size (128 x 96)

    zipfile.ZipFile(io.BytesIO(download(page, "replay_file"))).extractall(tmp_path / "replay")
    folder = tmp_path / "replay" / "drag_edit"
    drag = json.loads((folder / "drag.json").read_text())
    # the clicks, mapped from the enlarged view back to the 160 x 120 input (within one view pixel)
    scale = 160 / w
    np.testing.assert_allclose(drag["handles"], [[w * 0.35 * scale, h * 0.5 * scale]], atol=1.5 * scale)
    np.testing.assert_allclose(drag["targets"], [[w * 0.55 * scale, h * 0.5 * scale]], atol=1.5 * scale)
    mask = np.asarray(Image.open(folder / "mask.png")) > 0
    assert mask.shape == (120, 160) and 0 < mask.mean() < 0.5 and mask[60, 80]  # the brush stroke
    assert edit_cli.main(["--config", str(folder / "config.yaml"), f"sample={folder}",
                          f"out={tmp_path / 'cli'}"]) == 0
    replayed = np.asarray(Image.open(tmp_path / "cli" / "dragged_image.png").convert("RGB"))
    np.testing.assert_array_equal(replayed, result)


@pytest.mark.browser
def test_generated_image_drag_in_the_page(page, tmp_path):
    page.get_by_text("Generate an image instead").click()
    page.locator("#prompt textarea").fill("a red ball on a table")
    page.locator("#generate").click()
    generated = wait_status(page, "generated")
    assert "128x96" in generated and "t = 601" in generated  # 5 steps, strength 0.7: round(3.5) = 4, t = 601
    w, h = view_size(page)
    add_pair(page, (w * 0.4, h * 0.5), (w * 0.6, h * 0.5))
    done = run(page)
    assert done.startswith("done (dragdiffusion) in "), done
    result = Image.open(io.BytesIO(download(page, "result_file")))
    assert result.size == (128, 96)
    zipfile.ZipFile(io.BytesIO(download(page, "replay_file"))).extractall(tmp_path / "replay")
    config = (tmp_path / "replay" / "drag_edit" / "config.yaml").read_text()
    assert "generate: true" in config and "a red ball on a table" in config


def test_app_jobs_take_the_method_preset():
    from dragdiffusion.app_jobs import method_names, method_settings, page_config, settings_changes
    assert method_names() == ["dragdiffusion", "dragdiffusion+text", "dragnoise", "dragnoise+text", "fastdrag",
                              "freedrag", "freedrag+text", "gooddrag", "gooddrag+text"]
    values = method_settings(None, ["model=tiny"], "gooddrag")
    assert (values["lora_steps"], values["lr"], values["strength"], values["lora_on"]) == (70, 0.02, 0.75, True)
    assert not method_settings(None, ["model=tiny"], "fastdrag")["lora_on"]
    assert page_config(None, ["model=tiny"], None, {}, "gooddrag+text").text.optimize
    changes = settings_changes(128, 42, False, 70, 80, 0.1, 0.75, 0.02, [2])
    cfg = page_config(None, ["model=tiny"], None, changes, "gooddrag")
    assert str(cfg.method) == "gooddrag" and cfg.drag.r_p == 12 and cfg.gooddrag.drag_end_step == 7
    assert (values["drag_steps"], values["rounds"], method_settings(None, [], "freedrag")["max_step"]) == (7, 10, 300)
    changes = settings_changes(128, 42, False, 70, 80, 0.1, 0.75, 0.02, [2], drag_steps=3, rounds=2)
    cfg = page_config(None, ["model=tiny"], None, changes, "gooddrag")
    assert (cfg.gooddrag.drag_end_step, cfg.gooddrag.track_per_step, cfg.lora.resolution) == (3, 2, 128)


def test_the_launch_line_names_the_config_keys():
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")
    from dragdiffusion.app import serving_line
    assert "app.share=true" in serving_line("http://127.0.0.1:7860", None)  # not gradio's share=True hint
    assert "app.host=0.0.0.0: other machines too" in serving_line("http://0.0.0.0:7860", None, "0.0.0.0")
    assert "https://x.gradio.live" in serving_line("http://127.0.0.1:7860", "https://x.gradio.live")


@pytest.mark.browser
def test_gooddrag_runs_in_the_page(page, tmp_path):
    """The page as a new user reads it: numbered steps rendered as a list, the method selector at the top of the
    settings (it fills the fields below it, and only the fields the method uses are shown), points counted as on
    the command line."""
    assert page.locator("#steps ol > li").count() == 3  # the numbered steps render as steps
    page.locator("#settings").get_by_text("Settings").first.click()
    page.locator("#method input").wait_for(state="visible")
    first_field = page.locator("#settings input").first  # the method selector comes first
    assert first_field.evaluate("e => e.closest('#method') !== null")
    assert page.locator("#n_pix_step").is_visible() and not page.locator("#drag_steps").is_visible()
    page.locator("#method input").click()
    page.get_by_role("option", name="gooddrag", exact=True).click()
    page.wait_for_function("document.querySelector('#method input').value === 'gooddrag'")
    page.locator("#drag_steps").wait_for(state="visible")  # GoodDrag's budget: drag steps x tracking rounds
    assert page.locator("#rounds").is_visible() and not page.locator("#n_pix_step").is_visible()
    assert page.locator("#drag_steps input").input_value() == "7"  # filled from the preset
    upload(page, make_image(tmp_path / "in.png"))
    w, h = view_size(page)
    add_pair(page, (w * 0.35, h * 0.5), (w * 0.55, h * 0.5))
    assert status(page).endswith("2 points = 1 handle/target pair")
    done = run(page)
    assert done.startswith("done (gooddrag) in "), done
    zipfile.ZipFile(io.BytesIO(download(page, "replay_file"))).extractall(tmp_path / "replay")
    config = (tmp_path / "replay" / "drag_edit" / "config.yaml").read_text()
    assert "method: gooddrag" in config and "drag_end_step: 7" in config


@pytest.mark.browser
def test_fastdrag_runs_in_the_page_and_says_its_time(page, tmp_path):
    page.locator("#settings").get_by_text("Settings").first.click()
    page.locator("#method input").wait_for(state="visible")
    page.locator("#method input").click()
    page.get_by_role("option", name="fastdrag", exact=True).click()
    page.wait_for_function("document.querySelector('#method input').value === 'fastdrag'")
    upload(page, make_image(tmp_path / "in.png"))
    w, h = view_size(page)
    add_pair(page, (w * 0.35, h * 0.5), (w * 0.55, h * 0.5))
    done = run(page)
    assert done.startswith("done (fastdrag) in ") and "one latent warp" in done, done
