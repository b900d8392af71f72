"""The browser app: drag-edit a picture (uploaded or generated) by clicking points. Layout and wiring only:
every edit goes through the library (DragEditor, make_sample, EditResult.save / save_replay).

  python -m dragdiffusion.app --config configs/edit.yaml model=tiny        # http://127.0.0.1:7860
  python -m dragdiffusion.app model.name_or_path=/models/sd15 app.port=7861 app.share=true

Served on ``app.host`` (127.0.0.1: this machine only) and ``app.port``; a public link only with
``app.share=true``. Device jobs (edit, generate) run one at a time; the rest of the page stays live.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home

import argparse
import queue
import shutil
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import gradio as gr
import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from .callbacks import EditCancelled, ProgressReporter
from .config import CONFIG_DIR, load_config, to_yaml, validate_config
from .editor import DragEditor
from .errors import ConfigError, DragError
from .sample import draw_drag, make_sample, to_rgb_uint8, working_size

CONFIG_MODEL = "as configured"
VIEW_SIZE = 400  # the points view enlarges small working images to about this many pixels
_DEVICE = threading.Lock()  # one device job at a time, also after a cancelled one is still winding down
_CANCEL: dict[str, threading.Event] = {}  # session -> cancel flag of its running job
_BACKBONES: dict[str, object] = {}  # the loaded backbone, by its model config (one kept)


# ----------------------------------------------------------------------------------------------- helpers

def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def editor_for(cfg) -> DragEditor:
    """A DragEditor for ``cfg`` that reuses the loaded backbone when the model is the same."""
    key = to_yaml(cfg.model)
    if key not in _BACKBONES:
        _BACKBONES.clear()
        _BACKBONES[key] = DragEditor(cfg).backbone
    return DragEditor(cfg, backbone=_BACKBONES[key])


def display_image(image: np.ndarray, width: int) -> np.ndarray:
    """The image at the working resolution (width ``width``, aspect kept, not cropped)."""
    w, h = working_size(image.shape[1], image.shape[0], int(width))
    return np.asarray(Image.fromarray(image).resize((w, max(h, 1)), Image.BILINEAR))


def painted_mask(editor_value) -> np.ndarray | None:
    """The brush layers of the ImageEditor as an H x W {0, 1} mask (None without an image)."""
    if not editor_value or editor_value.get("background") is None:
        return None
    background = editor_value["background"]
    mask = np.zeros(background.shape[:2], np.uint8)
    for layer in editor_value.get("layers") or []:
        if layer is not None and layer.ndim == 3 and layer.shape[2] == 4 and layer.shape[:2] == mask.shape:
            mask |= (layer[..., 3] > 0).astype(np.uint8)
    return mask


def view_image(display: np.ndarray, target: int = VIEW_SIZE) -> np.ndarray:
    """The points view: the display image enlarged by a whole factor (nearest) so small images are clickable."""
    k = max(1, target // max(display.shape[:2]))
    return np.asarray(Image.fromarray(display).resize((display.shape[1] * k, display.shape[0] * k), Image.NEAREST))


def scale_points(points, from_wh, to_wh) -> list[list[float]]:
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    return [[x * sx, y * sy] for x, y in points]


def overlay(display: np.ndarray, points_disp, mask_disp=None, current=None) -> np.ndarray:
    """The display image with the mask tinted, handle -> target arrows, and current handle positions (yellow)."""
    pairs = len(points_disp) // 2
    if mask_disp is not None and mask_disp.shape != display.shape[:2]:
        mask_disp = np.asarray(Image.fromarray(mask_disp).resize(display.shape[1::-1], Image.NEAREST))
    img = draw_drag(display, points_disp[0:2 * pairs:2], points_disp[1:2 * pairs:2], mask_disp)
    draw = ImageDraw.Draw(img)
    r = max(3, round(min(img.size) / 80))
    for (hx, hy), (tx, ty) in zip(points_disp[0:2 * pairs:2], points_disp[1:2 * pairs:2]):
        d = np.array([tx - hx, ty - hy], np.float64)
        n = np.linalg.norm(d)
        if n > 1e-6:
            d /= n
            side = np.array([-d[1], d[0]])
            tip = np.array([tx, ty]) - d * r
            head = [tuple(tip), tuple(tip - d * 2 * r + side * r), tuple(tip - d * 2 * r - side * r)]
            draw.polygon(head, fill=(255, 255, 255))
    if len(points_disp) % 2:  # a handle waiting for its target
        x, y = points_disp[-1]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 30, 30), outline=(255, 255, 255))
    for x, y in current or []:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 210, 0), outline=(0, 0, 0))
    return np.asarray(img)


def build_config(base_path, base_overrides, model, settings: dict):
    """The launch config + a model preset + the page's settings (validated; errors name the key)."""
    overrides = list(base_overrides) + ([f"model={model}"] if model and model != CONFIG_MODEL else [])
    cfg = load_config(base_path, overrides)
    try:
        cfg = OmegaConf.merge(cfg, settings)
    except Exception as exc:  # an OmegaConf type error: name the key
        raise ConfigError(f"settings: {str(exc).splitlines()[0]}") from None
    validate_config(cfg)
    return cfg


def run_job(job, session: str):
    """Run ``job(report, should_cancel)`` in a worker thread holding the device; yields its progress reports
    (the latest only when several are waiting) and returns its value (or raises its error)."""
    cancel = threading.Event()
    _CANCEL[session] = cancel
    updates: queue.Queue = queue.Queue()

    def worker():
        try:
            with _DEVICE:
                updates.put(("done", job(lambda *a: updates.put(("progress", a)), cancel.is_set)))
        except BaseException as exc:  # handed to the page as a message
            updates.put(("error", exc))

    threading.Thread(target=worker, daemon=True).start()
    finished = False
    try:
        while True:
            kind, payload = updates.get()
            while kind == "progress" and not updates.empty():
                kind, payload = updates.get()
            if kind == "progress":
                yield payload
                continue
            finished = True
            if kind == "error":
                raise payload
            return payload
    finally:
        if not finished:
            cancel.set()  # the page went away or the event was cancelled: stop the worker at its next step
        if _CANCEL.get(session) is cancel:
            del _CANCEL[session]


def outcome(jobs):
    """Wait for a ``run_job`` without progress reports; its value."""
    while True:
        try:
            next(jobs)
        except StopIteration as stop:
            return stop.value


def message(exc: BaseException) -> str:
    """A one-line message for the page; unexpected errors also go to the server log with their traceback."""
    if isinstance(exc, EditCancelled):
        return "cancelled"
    if isinstance(exc, DragError):
        return f"error: {exc}"
    traceback.print_exception(exc, file=sys.stderr)
    return f"error: {exc.__class__.__name__}: {exc}"


# ----------------------------------------------------------------------------------------------- the page

def build_app(config_path=None, overrides=()) -> gr.Blocks:
    """The Gradio Blocks of the app for a config file and dotlist overrides (as edit.py takes them)."""
    overrides = list(overrides)
    base = load_config(config_path, overrides)
    d, lo, g = base.drag, base.lora, base.generation

    with gr.Blocks(title="DragDiffusion", analytics_enabled=False) as demo:
        gr.Markdown("## DragDiffusion: drag editing\n1. Upload an image (or generate one below) and paint the "
                    "region that may change. 2. Click a handle, then its target (repeat for more pairs). 3. Run. "
                    "The replay zip holds the edit as a sample folder: `python edit.py --config DIR/config.yaml "
                    "sample=DIR` runs it again.")
        session = gr.State({})  # {"original": HxWx3, "display": hxwx3, "generated": GeneratedImage, "generation": {}}
        points = gr.State([])  # [[x, y], ...] alternating handle, target, in pixels of the original image
        with gr.Row(equal_height=True):
            canvas = gr.ImageEditor(
                label="1. Image - paint the editable region", type="numpy", image_mode="RGBA",
                sources=("upload", "clipboard"), transforms=(), layers=False, height=420, format="png",
                elem_id="mask_editor",
                brush=gr.Brush(colors=[("#ffffff", 0.6)], color_mode="fixed", default_size=12),
                eraser=gr.Eraser(default_size=12))
            with gr.Column():
                points_view = gr.Image(label="2. Points - click a handle, then its target", type="numpy",
                                       interactive=False, height=420, format="png", elem_id="points_view")
                with gr.Row():
                    undo_btn = gr.Button("Undo last point", size="sm", elem_id="undo")
                    clear_btn = gr.Button("Clear points", size="sm", elem_id="clear_points")
            with gr.Column():
                result_view = gr.Image(label="Result", type="numpy", interactive=False, height=420, format="png",
                                       elem_id="result")
                result_file = gr.File(label="Result (PNG)", interactive=False, height=70, elem_id="result_file")
                replay_file = gr.File(label="Replay folder (zip)", interactive=False, height=70, elem_id="replay_file")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt (describes the image; for Generate: what to draw)", scale=4,
                                value=base.prompt or "", elem_id="prompt")
            run_btn = gr.Button("Run", variant="primary", scale=1, elem_id="run")
            cancel_btn = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel")
        status = gr.Textbox(label="Status", interactive=False, elem_id="status")
        with gr.Accordion("Generate an image instead (then drag it without inversion)", open=False,
                          elem_id="generate_panel"):
            with gr.Row():
                gen_seed = gr.Number(label="Seed", value=int(g.seed), precision=0)
                gen_guidance = gr.Number(label="Guidance scale", value=float(g.guidance_scale), minimum=1.0)
                gen_steps = gr.Number(label="Steps", value=int(g.steps), precision=0, minimum=1)
                gen_width = gr.Number(label="Width", value=int(g.width), precision=0, step=8)
                gen_height = gr.Number(label="Height", value=int(g.height), precision=0, step=8)
            gen_btn = gr.Button("Generate", elem_id="generate")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                model = gr.Dropdown([CONFIG_MODEL] + model_presets(), value=CONFIG_MODEL,
                                    label=f"Model preset ({CONFIG_MODEL}: {base.model.name_or_path})")
                width = gr.Number(label="Working width (px)", value=int(d.width), precision=0, step=8)
                seed = gr.Number(label="Seed", value=int(base.seed), precision=0)
            with gr.Row():
                lora_on = gr.Checkbox(label="Identity LoRA", value=bool(lo.enabled))
                lora_steps = gr.Number(label="LoRA steps", value=int(lo.steps), precision=0, minimum=0)
            with gr.Row():
                n_pix_step = gr.Number(label="Drag iterations", value=int(d.n_pix_step), precision=0, minimum=0)
                lam = gr.Number(label="Mask weight (lam)", value=float(d.lam), minimum=0)
                strength = gr.Slider(0.05, 1.0, value=float(d.inversion_strength), step=0.05,
                                     label="Inversion strength")
                lr = gr.Number(label="Latent lr", value=float(d.lr))
                blocks = gr.CheckboxGroup([0, 1, 2, 3], value=list(d.feature_blocks), label="Feature up_blocks")

        settings_inputs = [model, width, seed, lora_on, lora_steps, n_pix_step, lam, strength, lr, blocks]

        def settings_of(model_, width_, seed_, lora_on_, lora_steps_, n_pix_step_, lam_, strength_, lr_, blocks_):
            """(model preset, config changes) from the Settings panel; an empty or bad field is a ConfigError."""
            try:
                return model_, {
                    "seed": int(seed_), "quiet": True,
                    "lora": {"enabled": bool(lora_on_), "steps": int(lora_steps_)},
                    "drag": {"width": int(width_), "n_pix_step": int(n_pix_step_), "lam": float(lam_),
                             "inversion_strength": float(strength_), "lr": float(lr_),
                             "feature_blocks": sorted(int(b) for b in blocks_ or [])},
                }
            except (TypeError, ValueError):
                raise ConfigError("settings: every field needs a number (one is empty)") from None

        # ---------------------------------------------------------------- image and points
        def on_upload(value, sess, width_):
            if not value or value.get("background") is None:
                return gr.update(), {}, [], None, "no image"
            original = to_rgb_uint8(Image.fromarray(value["background"]))
            shown = sess.get("display")
            if shown is not None and shown.shape == original.shape and np.abs(shown.astype(int) - original).mean() < 1:
                return (gr.skip(),) * 5  # the editor echoing the image this app put there (resized or generated)
            try:
                shown = display_image(original, width_)
            except (ValueError, ZeroDivisionError):
                shown = original
            new = {"original": original, "display": shown, "view": view_image(shown)}
            note = (f"image {original.shape[1]}x{original.shape[0]} px, shown at {shown.shape[1]}x{shown.shape[0]}; "
                    "paint the editable region, then click a handle and its target")
            return {"background": shown, "layers": [], "composite": shown}, new, [], new["view"], note

        def on_clear():
            return {}, [], None, "no image"

        def redraw(sess, pts, current=None, mask=None):
            """The points view for points (and current handles) in original pixels."""
            view = sess.get("view")
            if view is None:
                return None
            h, w = sess["original"].shape[:2]
            to_view = lambda p: scale_points(p, (w, h), (view.shape[1], view.shape[0]))
            return overlay(view, to_view(pts), mask, to_view(current) if current else None)

        def on_click(sess, pts, evt: gr.SelectData):
            if sess.get("view") is None:
                gr.Warning("Upload an image (or generate one) first.")
                return pts, None, "error: image: upload an image (or generate one) first"
            shown, original = sess["view"], sess["original"]
            x, y = evt.index[0], evt.index[1]
            # the clicked view pixel's centre, in original pixels
            ox = min(max((x + 0.5) * original.shape[1] / shown.shape[1] - 0.5, 0), original.shape[1] - 1)
            oy = min(max((y + 0.5) * original.shape[0] / shown.shape[0] - 0.5, 0), original.shape[0] - 1)
            pts = pts + [[float(ox), float(oy)]]
            kind = "target" if len(pts) % 2 == 0 else "handle"
            return pts, redraw(sess, pts), f"{kind} {len(pts) // 2 + len(pts) % 2} at ({ox:.1f}, {oy:.1f})"

        def on_undo(sess, pts):
            pts = pts[:-1]
            return pts, redraw(sess, pts), f"{len(pts)} point(s)"

        def on_clear_points(sess):
            return [], redraw(sess, []), "points cleared"

        ui = dict(concurrency_limit=None, show_progress="hidden")
        canvas.upload(on_upload, [canvas, session, width], [canvas, session, points, points_view, status], **ui)
        canvas.clear(on_clear, None, [session, points, points_view, status], **ui)
        points_view.select(on_click, [session, points], [points, points_view, status], **ui)
        undo_btn.click(on_undo, [session, points], [points, points_view, status], **ui)
        clear_btn.click(on_clear_points, [session], [points, points_view, status], **ui)

        # ---------------------------------------------------------------- edit
        def on_run(value, sess, pts, prompt_, model_, width_, seed_, lora_on_, lora_steps_, n_pix_step_, lam_,
                   strength_, lr_, blocks_, request: gr.Request):
            settings = (model_, width_, seed_, lora_on_, lora_steps_, n_pix_step_, lam_, strength_, lr_, blocks_)
            outputs = (gr.update(),) * 4

            def say(text, warn=False):
                if warn:
                    gr.Warning(text)
                return (text,) + outputs

            original = sess.get("original")
            if original is None or value is None or value.get("background") is None:
                yield say("error: image: upload an image (or generate one) first", warn=True)
                return
            if not pts:
                yield say("error: points: none yet; click a handle, then its target, on the middle image", True)
                return
            if len(pts) % 2:
                yield say(f"error: points: {len(pts)} clicks, an odd number; click the last handle's target "
                          "(or undo it)", True)
                return
            generated = sess.get("generated")
            try:
                model_, changes = settings_of(*settings)
                if generated is not None:  # the generation's model and schedule, the page's drag settings
                    gen = sess["generation"]
                    model_ = gen["model"]
                    changes["drag"]["inversion_strength"] = gen["inversion_strength"]
                    changes.update(generate=True, prompt=generated.prompt, generation=gen["generation"])
                cfg = build_config(config_path, overrides, model_, changes)
                mask_disp = painted_mask(value)
                mask = np.asarray(Image.fromarray(mask_disp * 255).resize(
                    (original.shape[1], original.shape[0]), Image.NEAREST)) > 127
                sample = make_sample(original, pts, mask.astype(np.uint8),
                                     generated.prompt if generated is not None else prompt_, "edit")
            except DragError as exc:
                yield say(message(exc), warn=True)
                return
            no_mask = "" if sample.has_mask else "; no mask painted: the whole image may change (mask term off)"
            if no_mask:
                gr.Warning("No mask painted: the whole image may change (the mask term is off).")
            h, w = original.shape[:2]
            mask_shown = mask_disp if sample.has_mask else None
            stages = [] if generated is not None or not cfg.lora.enabled else [f"LoRA ({cfg.lora.steps} steps)"]
            stages += ["drag" if generated is not None else "inversion, drag", "denoising"]
            yield ("running: " + ", ".join(stages),) + outputs

            def job(report, should_cancel):
                editor = editor_for(cfg)
                progress = ProgressReporter(report, (h, w), should_cancel)
                if generated is not None:
                    return editor.edit_generated(generated, pts, sample.mask, callbacks=[progress])
                return editor.edit(sample, callbacks=[progress], lora_callbacks=[progress])

            try:
                jobs = run_job(job, request.session_hash if request else "local")
                while True:
                    try:
                        stage, step, total, handles = next(jobs)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if stage == "drag":
                        where = ", ".join(f"({x:.0f}, {y:.0f})" for x, y in handles)
                        yield (f"drag iteration {step}/{total}: handles at {where}",
                               redraw(sess, pts, handles, mask_shown), gr.update(), gr.update(), gr.update())
                    else:
                        yield (f"LoRA step {step}/{total}",) + outputs
                out = Path(tempfile.mkdtemp(prefix="dragdiffusion-app-"))
                result.save(out / "result", cfg)
                replay = result.save_replay(out / "replay" / "drag_edit", cfg)
                archive = shutil.make_archive(str(out / "drag_edit"), "zip", root_dir=replay.parent,
                                              base_dir=replay.name)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a message, the app keeps serving
                if isinstance(exc, (GeneratorExit, KeyboardInterrupt)):
                    raise
                text = message(exc)
                yield say(text, warn=not isinstance(exc, EditCancelled))
                return
            t = result.trajectory
            dist = ", ".join(f"{v:.1f}" for v in t["final_distance_px"])
            done = (f"done: {t['iterations']} drag iterations, stopped early: {t['stopped_early']}, final distance "
                    f"(px): {dist}; result {result.image.shape[1]}x{result.image.shape[0]}{no_mask}")
            last = [list(p) for p in t["handles"][-1]] if t["handles"] else None
            yield (done, redraw(sess, pts, last, mask_shown), result.image,
                   str(out / "result" / "dragged_image.png"), archive)

        run_evt = run_btn.click(on_run, [canvas, session, points, prompt] + settings_inputs,
                                [status, points_view, result_view, result_file, replay_file],
                                concurrency_limit=1, concurrency_id="device", show_progress="minimal")

        # ---------------------------------------------------------------- generate
        def on_generate(prompt_, seed_, guidance_, steps_, gw, gh, model_, width_, run_seed, lora_on_, lora_steps_,
                        n_pix_step_, lam_, strength_, lr_, blocks_, request: gr.Request):
            settings = (model_, width_, run_seed, lora_on_, lora_steps_, n_pix_step_, lam_, strength_, lr_, blocks_)
            keep = (gr.update(),) * 4
            try:
                model_, changes = settings_of(*settings)
                changes.update(generate=True, prompt=prompt_ or "", generation={
                    "seed": int(seed_), "guidance_scale": float(guidance_), "steps": int(steps_),
                    "width": int(gw), "height": int(gh)})
                cfg = build_config(config_path, overrides, model_, changes)
            except (TypeError, ValueError):
                gr.Warning("generation: every field needs a number (one is empty)")
                yield ("error: generation: every field needs a number (one is empty)",) + keep
                return
            except DragError as exc:
                gr.Warning(message(exc))
                yield (message(exc),) + keep
                return
            yield (f"generating {cfg.generation.width}x{cfg.generation.height} ({cfg.generation.steps} steps)",) + keep
            try:
                jobs = run_job(lambda report, cancel: editor_for(cfg).generate(cfg.prompt),
                               request.session_hash if request else "local")
                generated = outcome(jobs)  # sampling reports no steps
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, (GeneratorExit, KeyboardInterrupt)):
                    raise
                gr.Warning(message(exc))
                yield (message(exc),) + keep
                return
            image = generated.image
            new = {"original": image, "display": image, "view": view_image(image), "generated": generated,
                   "generation": {"model": model_, "inversion_strength": float(cfg.drag.inversion_strength),
                                  "generation": OmegaConf.to_container(cfg.generation)}}
            yield (f"generated {image.shape[1]}x{image.shape[0]} (seed {generated.seed}, drag latent at "
                   f"t = {generated.t}); paint the editable region, click a handle and its target, Run",
                   {"background": image, "layers": [], "composite": image}, new, [], new["view"])

        gen_evt = gen_btn.click(on_generate, [prompt, gen_seed, gen_guidance, gen_steps, gen_width, gen_height]
                                + settings_inputs, [status, canvas, session, points, points_view],
                                concurrency_limit=1, concurrency_id="device", show_progress="minimal")

        def on_cancel(request: gr.Request):
            event = _CANCEL.get(request.session_hash if request else "local")
            if event is None:
                return "nothing to cancel"
            event.set()
            return "cancelled"

        cancel_btn.click(on_cancel, None, status, cancels=[run_evt, gen_evt], **ui)
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dragdiffusion.app", description="The DragDiffusion browser app.",
                                     epilog="Keys: app.host (127.0.0.1), app.port (7860), app.share (false), "
                                            "app.max_queue; and every key of edit.py (see python edit.py --help).")
    parser.add_argument("--config", default=str(CONFIG_DIR / "edit.yaml"), help="YAML config (default: configs/edit.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (OmegaConf dotlist)")
    return parser.parse_args(argv)


def launch(demo: gr.Blocks, app_cfg, block: bool = True):
    """Queue device jobs (one at a time) and serve on ``app.host``:``app.port`` (0 = a free port)."""
    demo.queue(max_size=int(app_cfg.max_queue), default_concurrency_limit=1)
    return demo.launch(server_name=str(app_cfg.host), server_port=int(app_cfg.port) or None,
                       share=bool(app_cfg.share), prevent_thread_lock=not block, quiet=not block,
                       footer_links=["gradio"], show_error=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        demo = build_app(args.config, args.overrides)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launch(demo, cfg.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
