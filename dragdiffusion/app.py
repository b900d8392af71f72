"""The browser app: drag-edit a picture (uploaded or generated) by clicking points.

  python -m dragdiffusion.app --config configs/edit.yaml model=tiny        # http://127.0.0.1:7860
  python -m dragdiffusion.app model.name_or_path=/models/sd15 app.port=7861 app.share=true

Three parts, each readable alone: ``build_layout`` (the components), ``AppEvents`` (what each event does; the
device jobs themselves are in ``app_jobs``, which needs no UI) and ``wire_events`` (which event calls what).
Served on ``app.host`` (127.0.0.1: this machine only) and ``app.port``; a public link only with
``app.share=true``. Device jobs (edit, generate) run one at a time; the rest of the page stays live.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home

import io
import sys
import traceback
from dataclasses import dataclass

import gradio as gr
import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from .app_jobs import (ALL_BUDGET_FIELDS, CONFIG_MODEL, RUNNER, budget_fields, edit_job, generate_job, method_names,
                       method_settings, model_settings, page_config, reuse_note, save_outputs, settings_changes,
                       timing_line)
from .callbacks import EditCancelled
from .config import CONFIG_DIR, cli_parser, load_config, method_label, to_container, to_yaml
from .errors import DragError
from .images import resize_uint8
from .sample import draw_drag, exif_orientation, points_count, to_rgb_uint8, upright, working_size

VIEW_SIZE = 400  # the points view enlarges small working images to about this many pixels
# the Settings panel's fields, in the order the events take them: the method first (it fills the fields below it)
SETTINGS = ("method", "model", "width", "seed", "lora_on", "lora_steps", "n_pix_step", "drag_steps", "rounds",
            "max_step", "lam", "strength", "lr", "blocks")
METHOD_FIELDS = ("lora_on", "lora_steps", "n_pix_step", "drag_steps", "rounds", "max_step", "lam", "strength", "lr")
STEPS = ("## DragDiffusion: drag editing\n\n"
         "1. Upload an image (or generate one below) and paint the region that may change.\n"
         "2. Click a handle, then its target, on the middle image (repeat for more pairs).\n"
         "3. Write the prompt, pick the method under *Settings* (its published values fill the fields), and *Run*.\n\n"
         "The replay zip holds the edit as a sample folder: `python edit.py --config DIR/config.yaml sample=DIR` "
         "runs it again.")


# ----------------------------------------------------------------------------------------------- view helpers

def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def display_image(image: np.ndarray, width: int) -> np.ndarray:
    """The image at the working resolution (width ``width``, aspect kept, not cropped)."""
    w, h = working_size(image.shape[1], image.shape[0], int(width))
    return resize_uint8(image, (h, w))


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
    return resize_uint8(display, (display.shape[0] * k, display.shape[1] * k), "nearest")


def scale_points(points, from_wh, to_wh) -> list[list[float]]:
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    return [[x * sx, y * sy] for x, y in points]


def overlay(display: np.ndarray, points_disp, mask_disp=None, current=None) -> np.ndarray:
    """The display image with the mask tinted, handle -> target arrows, a handle waiting for its target, and the
    current handle positions (yellow)."""
    pairs = len(points_disp) // 2
    if mask_disp is not None and mask_disp.shape != display.shape[:2]:
        mask_disp = resize_uint8(mask_disp, display.shape[:2], "nearest")
    img = draw_drag(display, points_disp[0:2 * pairs:2], points_disp[1:2 * pairs:2], mask_disp)
    draw = ImageDraw.Draw(img)
    r = max(3, round(min(img.size) / 80))
    if len(points_disp) % 2:  # a handle waiting for its target
        x, y = points_disp[-1]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 30, 30), outline=(255, 255, 255))
    for x, y in current or []:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 210, 0), outline=(0, 0, 0))
    return np.asarray(img)


def message(exc: BaseException) -> str:
    """A one-line message for the page; unexpected errors also go to the server log with their traceback."""
    if isinstance(exc, EditCancelled):
        return "cancelled"
    if isinstance(exc, DragError):
        return f"error: {exc}"
    traceback.print_exception(exc, file=sys.stderr)
    return f"error: {exc.__class__.__name__}: {exc}"


# ----------------------------------------------------------------------------------------------- layout

@dataclass
class Layout:
    """The page's components (``build_layout``)."""
    canvas: gr.ImageEditor
    points_view: gr.Image
    undo: gr.Button
    clear_points: gr.Button
    result_view: gr.Image
    result_file: gr.File
    replay_file: gr.File
    prompt: gr.Textbox
    run: gr.Button
    cancel: gr.Button
    status: gr.Textbox
    generation: list  # seed, guidance, steps, width, height
    generate: gr.Button
    settings: list  # the Settings fields in SETTINGS order
    session: gr.State  # {"original", "display", "view", "generated", "generation"}
    points: gr.State  # [[x, y], ...] alternating handle, target, in pixels of the original image

    def setting(self, name: str):
        return self.settings[SETTINGS.index(name)]


class UprightImageEditor(gr.ImageEditor):
    """``gr.ImageEditor`` whose images reach the app as viewers show them: a phone photo's EXIF orientation is
    applied (gradio's editor passes the stored pixels on), so the mask, the clicked points and the result are in
    the orientation the user sees. The page is gradio's own image editor."""

    def get_block_name(self) -> str:
        return "imageeditor"

    def convert_and_format_image(self, file, flatten_on_white: bool = False):
        if file is not None:
            path = getattr(file, "path", None)
            try:
                with Image.open(path if path else io.BytesIO(file)) as img:
                    if exif_orientation(img) != 1:
                        buf = io.BytesIO()
                        upright(img, close=False).save(buf, format="PNG")
                        file = buf.getvalue()  # upright pixels, no tag
            except (OSError, ValueError, TypeError):
                pass  # gradio's own reading reports it
        return super().convert_and_format_image(file, flatten_on_white)


def build_layout(base: DictConfig) -> Layout:
    """Create the components (inside a ``gr.Blocks``), with the config's values as their defaults."""
    d, lo, g = base.drag, base.lora, base.generation
    gr.Markdown(STEPS, elem_id="steps")
    session, points = gr.State({}), gr.State([])
    with gr.Row(equal_height=True):
        canvas = UprightImageEditor(
            label="1. Image - paint the editable region", type="numpy", image_mode="RGBA",
            sources=("upload", "clipboard"), transforms=(), layers=False, height=420, format="png",
            elem_id="mask_editor", brush=gr.Brush(colors=[("#ffffff", 0.6)], color_mode="fixed", default_size=12),
            eraser=gr.Eraser(default_size=12))
        with gr.Column():
            points_view = gr.Image(label="2. Points - click a handle, then its target", type="numpy",
                                   interactive=False, height=420, format="png", elem_id="points_view")
            with gr.Row():
                undo = gr.Button("Undo last point", size="sm", elem_id="undo")
                clear_points = gr.Button("Clear points", size="sm", elem_id="clear_points")
        with gr.Column():
            result_view = gr.Image(label="Result", type="numpy", interactive=False, height=420, format="png",
                                   elem_id="result")
            result_file = gr.File(label="Result (PNG)", interactive=False, height=70, elem_id="result_file")
            replay_file = gr.File(label="Replay folder (zip)", interactive=False, height=70, elem_id="replay_file")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt (describes the image; for Generate: what to draw)", scale=4,
                            value=base.prompt or "", elem_id="prompt")
        run = gr.Button("Run", variant="primary", scale=1, elem_id="run")
        cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel")
    status = gr.Textbox(label="Status", interactive=False, elem_id="status")
    with gr.Accordion("Generate an image instead (then drag it without inversion)", open=False,
                      elem_id="generate_panel"):
        with gr.Row():
            generation = [gr.Number(label="Seed", value=int(g.seed), precision=0),
                          gr.Number(label="Guidance scale", value=float(g.guidance_scale), minimum=1.0),
                          gr.Number(label="Steps", value=int(g.steps), precision=0, minimum=1),
                          gr.Number(label="Width", value=int(g.width), precision=0, step=8),
                          gr.Number(label="Height", value=int(g.height), precision=0, step=8)]
        generate = gr.Button("Generate", elem_id="generate")
    with gr.Accordion("Settings", open=False, elem_id="settings"):
        shown = set(budget_fields(method_label(base)))
        with gr.Row():
            method = gr.Dropdown(method_names(), value=method_label(base), elem_id="method",
                                 label="Drag method (its published defaults fill the fields below; only the fields "
                                       "it uses are shown)")
            model = gr.Dropdown([CONFIG_MODEL] + model_presets(), value=CONFIG_MODEL,
                                label=f"Model preset ({CONFIG_MODEL}: {base.model.name_or_path})")
            width = gr.Number(label="Working width (px)", value=int(d.width), precision=0, step=8)
            seed = gr.Number(label="Seed", value=int(base.seed), precision=0)
        with gr.Row():
            lora_on = gr.Checkbox(label="Identity LoRA", value=bool(lo.enabled))
            lora_steps = gr.Number(label="LoRA steps", value=int(lo.steps), precision=0, minimum=0)
        with gr.Row():
            n_pix_step = gr.Number(label="Drag iterations", value=int(d.n_pix_step), precision=0, minimum=0,
                                   visible="n_pix_step" in shown, elem_id="n_pix_step")
            drag_steps = gr.Number(label="Drag steps (denoising steps that drag)",
                                   value=int(base.gooddrag.drag_end_step), precision=0, minimum=1,
                                   visible="drag_steps" in shown, elem_id="drag_steps")
            rounds = gr.Number(label=f"Tracking rounds per drag step (x {base.gooddrag.max_drag_per_track} optimizer "
                                     "steps)", value=int(base.gooddrag.track_per_step), precision=0, minimum=1,
                               visible="rounds" in shown, elem_id="rounds")
            max_step = gr.Number(label="Adam steps at most", value=int(base.freedrag.max_step), precision=0,
                                 minimum=1, visible="max_step" in shown, elem_id="max_step")
            lam = gr.Number(label="Mask weight (lam)", value=float(d.lam), minimum=0)
            strength = gr.Slider(0.05, 1.0, value=float(d.inversion_strength), step=0.05, label="Inversion strength")
            lr = gr.Number(label="Latent lr", value=float(d.lr))
            blocks = gr.CheckboxGroup([0, 1, 2, 3], value=list(d.feature_blocks), label="Feature up_blocks")
    fields = dict(method=method, model=model, width=width, seed=seed, lora_on=lora_on, lora_steps=lora_steps,
                  n_pix_step=n_pix_step, drag_steps=drag_steps, rounds=rounds, max_step=max_step, lam=lam,
                  strength=strength, lr=lr, blocks=blocks)
    return Layout(canvas, points_view, undo, clear_points, result_view, result_file, replay_file, prompt, run,
                  cancel, status, generation, generate, [fields[name] for name in SETTINGS], session, points)


# ----------------------------------------------------------------------------------------------- events

class AppEvents:
    """What each event of the page does. Settings arrive as the ``Layout.settings`` values, in that order."""

    def __init__(self, config_path, overrides):
        self.config_path = config_path
        self.overrides = list(overrides)

    def config(self, settings, extra: dict | None = None) -> DictConfig:
        """The run's config from the Settings values (in SETTINGS order; the drag budget fields of other methods
        are not taken) and ``extra`` changes."""
        v = dict(zip(SETTINGS, settings))
        method, model = v["method"], v["model"]
        budget = {k: v[k] for k in ("drag_steps", "rounds", "max_step") if k in budget_fields(method)}
        changes = settings_changes(v["width"], v["seed"], v["lora_on"], v["lora_steps"], v["n_pix_step"], v["lam"],
                                   v["strength"], v["lr"], v["blocks"], **budget)
        for key, value in (extra or {}).items():
            changes[key] = {**changes[key], **value} if isinstance(value, dict) and key in changes else value
        return page_config(self.config_path, self.overrides, model, changes, method)

    def model_chosen(self, model):
        """A model preset picked: its backbone's working width and feature blocks into the Settings fields (the
        reference-control layers come from the preset itself)."""
        v = model_settings(self.config_path, self.overrides, model)
        return v["width"], v["blocks"]

    def method_chosen(self, method):
        """A method picked: its preset's values into the Settings fields (METHOD_FIELDS: LoRA on and its steps, its
        drag budget, lam, strength, lr); only its own drag budget fields are shown."""
        v = method_settings(self.config_path, self.overrides, method)
        own = budget_fields(method)
        return tuple(gr.update(value=v[k], visible=k in own) if k in ALL_BUDGET_FIELDS else v[k]
                     for k in METHOD_FIELDS)

    # ---------------------------------------------------------------- image and points
    def upload(self, value, sess, width):
        if not value or value.get("background") is None:
            return gr.update(), {}, [], None, "no image"
        original = to_rgb_uint8(Image.fromarray(value["background"]))
        shown = sess.get("display")
        if shown is not None and shown.shape == original.shape and np.abs(shown.astype(int) - original).mean() < 1:
            return (gr.skip(),) * 5  # the editor echoing the image this app put there (resized or generated)
        try:
            shown = display_image(original, width)
        except (ValueError, ZeroDivisionError):
            shown = original
        new = {"original": original, "display": shown, "view": view_image(shown)}
        note = (f"image {original.shape[1]}x{original.shape[0]} px, shown at {shown.shape[1]}x{shown.shape[0]}; "
                "paint the editable region, then click a handle and its target")
        return {"background": shown, "layers": [], "composite": shown}, new, [], new["view"], note

    def clear(self):
        return {}, [], None, "no image"

    def redraw(self, sess, pts, current=None, mask=None):
        """The points view for points (and current handles) in original pixels."""
        view = sess.get("view")
        if view is None:
            return None
        h, w = sess["original"].shape[:2]
        to_view = lambda p: scale_points(p, (w, h), (view.shape[1], view.shape[0]))
        return overlay(view, to_view(pts), mask, to_view(current) if current else None)

    def click(self, sess, pts, evt: gr.SelectData):
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
        return (pts, self.redraw(sess, pts),
                f"{kind} {len(pts) // 2 + len(pts) % 2} at ({ox:.1f}, {oy:.1f}): {points_count(len(pts))}")

    def undo(self, sess, pts):
        pts = pts[:-1]
        return pts, self.redraw(sess, pts), points_count(len(pts))

    def clear_points(self, sess):
        return [], self.redraw(sess, []), "points cleared"

    # ---------------------------------------------------------------- device jobs
    def run(self, value, sess, pts, prompt, method, model, width, seed, lora_on, lora_steps, n_pix_step, drag_steps,
            rounds, max_step, lam, strength, lr, blocks, request: gr.Request):
        """Run: (status, points view, result, result file, replay zip) as the job goes."""
        keep = (gr.update(),) * 4

        def say(text, warn=False):
            if warn:
                gr.Warning(text)
            return (text,) + keep

        original = sess.get("original")
        if original is None or value is None or value.get("background") is None:
            yield say("error: image: upload an image (or generate one) first", warn=True)
            return
        if not pts:
            yield say("error: points: none yet; click a handle, then its target, on the middle image", True)
            return
        if len(pts) % 2:
            yield say(f"error: points: odd number of points ({points_count(len(pts))}); click the last handle's "
                      "target (or undo it)", True)
            return
        generated = sess.get("generated")
        settings = (method, model, width, seed, lora_on, lora_steps, n_pix_step, drag_steps, rounds, max_step, lam,
                    strength, lr, blocks)
        try:
            if generated is not None:  # the generation's model and schedule, the page's drag settings
                gen = sess["generation"]
                settings = tuple(gen["model"] if name == "model" else value
                                 for name, value in zip(SETTINGS, settings))
                cfg = self.config(settings, {"drag": {"inversion_strength": gen["inversion_strength"]},
                                             "generate": True, "prompt": generated.prompt,
                                             "generation": gen["generation"]})
            else:
                cfg = self.config(settings)
            mask_disp = painted_mask(value)
            mask = resize_uint8(mask_disp * 255, original.shape[:2], "nearest") > 127
            job = edit_job(cfg, original, pts, mask.astype(np.uint8), prompt, generated)
        except DragError as exc:
            yield say(message(exc), warn=True)
            return
        has_mask = bool(mask.any())
        no_mask = "" if has_mask else "; no mask painted: the whole image may change (mask term off)"
        if no_mask:
            gr.Warning("No mask painted: the whole image may change (the mask term is off).")
        mask_shown = mask_disp if has_mask else None
        stages = [] if generated is not None or not cfg.lora.enabled else [f"LoRA ({cfg.lora.steps} steps)"]
        label = method_label(cfg)
        stages += ([] if generated is not None else ["inversion"]) + [f"drag ({label})", "denoise", "decode"]
        yield ("running: " + ", ".join(stages),) + keep
        try:
            jobs = RUNNER.run(job, request.session_hash if request else "local")
            while True:
                try:
                    stage, step, total, handles = next(jobs)
                except StopIteration as stop:
                    result = stop.value
                    break
                if handles is not None:  # a drag stage: "drag" or "drag step 2/7 (t=721)", as on the console
                    where = ", ".join(f"({x:.0f}, {y:.0f})" for x, y in handles)
                    yield (f"{stage}: iteration {step}/{total}: handles at {where}",
                           self.redraw(sess, pts, handles, mask_shown), gr.update(), gr.update(), gr.update())
                elif stage == "lora_reused":
                    yield (f"reusing the identity LoRA of this image ({handles['seconds']:.2f} s)",) + keep
                else:
                    yield (f"{stage}: {step}/{total}",) + keep
            png, archive = save_outputs(result, cfg)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message, the app keeps serving
            if isinstance(exc, (GeneratorExit, KeyboardInterrupt)):
                raise
            yield say(message(exc), warn=not isinstance(exc, EditCancelled))
            return
        t = result.trajectory
        dist = ", ".join(f"{v:.1f}" for v in t["final_distance_px"])
        why = t.get("stop_reason") if t.get("stop_reason") not in (None, "reached") else "handles reached"
        stop = f"stopped early at iteration {t['stop_step']}: {why}" if t["stopped_early"] else "ran every iteration"
        steps = f" at {len(t['drag_timesteps'])} timesteps" if len(t.get("drag_timesteps", [])) > 1 else ""
        drag = "one latent warp" if "fastdrag" in t else f"{t['iterations']} drag iterations{steps} ({stop})"
        done = (f"done ({label}) {timing_line(result.seconds)}: {drag}, final distance (px): {dist}; result "
                f"{result.image.shape[1]}x{result.image.shape[0]}{no_mask}{reuse_note(t)}")
        last = [list(p) for p in t["handles"][-1]] if t["handles"] else None
        yield done, self.redraw(sess, pts, last, mask_shown), result.image, str(png), str(archive)

    def generate(self, prompt, seed, guidance, steps, gen_width, gen_height, method, model, width, run_seed, lora_on,
                 lora_steps, n_pix_step, drag_steps, rounds, max_step, lam, strength, lr, blocks, request: gr.Request):
        """Generate: (status, canvas, session, points, points view)."""
        keep = (gr.update(),) * 4
        settings = (method, model, width, run_seed, lora_on, lora_steps, n_pix_step, drag_steps, rounds, max_step, lam,
                    strength, lr, blocks)
        try:
            generation = {"seed": int(seed), "guidance_scale": float(guidance), "steps": int(steps),
                          "width": int(gen_width), "height": int(gen_height)}
            cfg = self.config(settings, {"generate": True, "prompt": prompt or "", "generation": generation})
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
            jobs = RUNNER.run(generate_job(cfg), request.session_hash if request else "local")
            while True:  # sampling reports no steps
                try:
                    next(jobs)
                except StopIteration as stop:
                    generated = stop.value
                    break
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, (GeneratorExit, KeyboardInterrupt)):
                raise
            gr.Warning(message(exc))
            yield (message(exc),) + keep
            return
        image = generated.image
        new = {"original": image, "display": image, "view": view_image(image), "generated": generated,
               "generation": {"model": model, "inversion_strength": float(cfg.drag.inversion_strength),
                              "generation": to_container(cfg.generation)}}
        yield (f"generated {image.shape[1]}x{image.shape[0]} (seed {generated.seed}, drag latent at "
               f"t = {generated.t}); paint the editable region, click a handle and its target, Run",
               {"background": image, "layers": [], "composite": image}, new, [], new["view"])

    def cancel(self, request: gr.Request):
        return "cancelled" if RUNNER.cancel(request.session_hash if request else "local") else "nothing to cancel"


# ----------------------------------------------------------------------------------------------- wiring

def wire_events(ui: Layout, events: AppEvents) -> None:
    """Connect the components to the events. Device jobs share one concurrency slot; the rest stay live."""
    live = dict(concurrency_limit=None, show_progress="hidden")
    ui.canvas.upload(events.upload, [ui.canvas, ui.session, ui.settings[1]],
                     [ui.canvas, ui.session, ui.points, ui.points_view, ui.status], **live)
    ui.canvas.clear(events.clear, None, [ui.session, ui.points, ui.points_view, ui.status], **live)
    ui.points_view.select(events.click, [ui.session, ui.points], [ui.points, ui.points_view, ui.status], **live)
    ui.undo.click(events.undo, [ui.session, ui.points], [ui.points, ui.points_view, ui.status], **live)
    ui.clear_points.click(events.clear_points, [ui.session], [ui.points, ui.points_view, ui.status], **live)
    device = dict(concurrency_limit=1, concurrency_id="device", show_progress="minimal")
    run = ui.run.click(events.run, [ui.canvas, ui.session, ui.points, ui.prompt] + ui.settings,
                       [ui.status, ui.points_view, ui.result_view, ui.result_file, ui.replay_file], **device)
    generate = ui.generate.click(events.generate, [ui.prompt] + ui.generation + ui.settings,
                                 [ui.status, ui.canvas, ui.session, ui.points, ui.points_view], **device)
    ui.cancel.click(events.cancel, None, ui.status, cancels=[run, generate], **live)
    ui.setting("method").change(events.method_chosen, [ui.setting("method")],
                                [ui.setting(name) for name in METHOD_FIELDS], **live)
    ui.setting("model").change(events.model_chosen, [ui.setting("model")], [ui.setting("width"), ui.setting("blocks")],
                               **live)


def build_app(config_path=None, overrides=()) -> gr.Blocks:
    """The Gradio Blocks of the app for a config file and dotlist overrides (as edit.py takes them)."""
    base = load_config(config_path, list(overrides))
    with gr.Blocks(title="DragDiffusion", analytics_enabled=False) as demo:
        wire_events(build_layout(base), AppEvents(config_path, overrides))
    return demo


def serving_line(url: str, share_url: str | None, host: str = "127.0.0.1") -> str:
    """Where the app is served, with the config keys that change it (gradio's own hint names its Python argument)."""
    if share_url:
        return f"serving on {url} and at the public link {share_url} (app.share=true; anyone with the link can use it)"
    reach = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else "other machines too"
    return (f"serving on {url} (app.host={host}: {reach}; a public gradio.live link: app.share=true; another port: "
            "app.port=N)")


def launch(demo: gr.Blocks, app_cfg, block: bool = True):
    """Queue device jobs (one at a time) and serve on ``app.host``:``app.port`` (0 = a free port); ``block``: say
    where (``serving_line``) and serve until stopped. Returns (app, local URL, share URL or None)."""
    demo.queue(max_size=int(app_cfg.max_queue), default_concurrency_limit=1)
    served = demo.launch(server_name=str(app_cfg.host), server_port=int(app_cfg.port) or None,
                         share=bool(app_cfg.share), prevent_thread_lock=True, quiet=True,
                         footer_links=["gradio"], show_error=False)
    if block:
        print(serving_line(served[1], served[2], str(app_cfg.host)), flush=True)
        demo.block_thread()
    return served


def main(argv=None) -> int:
    parser = cli_parser("The DragDiffusion browser app.\nKeys: app.host (127.0.0.1), app.port (7860), app.share "
                        "(false), app.max_queue; and every key of edit.py (see python edit.py --help).",
                        None, prog="python -m dragdiffusion.app")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        demo = build_app(args.config, args.overrides)
    except DragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launch(demo, cfg.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
