"""The studio's page (Gradio): photo -> proposed masks -> brush corrections -> training with
live validation pictures -> prompts, and bundles to download or load back.

Every event calls :class:`~.session.StudioSession`; every error, expected or not, is shown as a
message in the page (``gr.Error``), never as a dead page.
"""

from __future__ import annotations

import functools
import html
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..base_pipeline import BUILTIN_MODELS
from ..errors import BreakSceneError
from ..masks import MaskProposal
from .editing import (
    ADD_COLOUR,
    MASK_COLOURS,
    REMOVE_COLOUR,
    apply_edits,
    editor_value,
    read_photo,
)
from .session import StudioSession, TrainingRun

__all__ = ["MAX_OBJECTS", "build_studio"]

#: Objects (mask slots) the page offers.
MAX_OBJECTS = 4
_POLL_SECONDS = 0.5
_SHOWN_SIDE = 256  # smaller generated images are shown enlarged (nearest neighbour)
_log = logging.getLogger(__name__)

_INTRO = f"""# Break-A-Scene studio
From one photo and a mask per object, learn a handle token per object, then use the handles in
prompts. **1.** Upload a photo. **2.** Name its objects and propose masks. **3.** Correct each
mask: paint <span style="color:{ADD_COLOUR}">green</span> to add,
<span style="color:{REMOVE_COLOUR}">pink</span> to remove (the eraser takes paint back), then
*Apply brush edits*. **4.** Train. **5.** Generate, download the bundle, or load one back."""


def _message(error: BaseException) -> str:
    if isinstance(error, BreakSceneError | ValueError | FileNotFoundError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _page_error(gr: Any, fn: Callable[..., Any], error: Exception) -> Exception:
    """The message the page shows for ``error`` (logged with its traceback when unexpected)."""
    if not isinstance(error, BreakSceneError):
        _log.exception("studio: %s failed", fn.__name__)
    return gr.Error(_message(error), duration=None)


def _shown(gr: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every exception turned into a message in the page."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as error:
            raise _page_error(gr, fn, error) from error

    return wrapper


def _shown_stream(gr: Any, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """:func:`_shown` for a generator (an event that streams updates)."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Iterator[Any]:
        try:
            yield from fn(*args)
        except gr.Error:
            raise
        except Exception as error:
            raise _page_error(gr, fn, error) from error

    return wrapper


def _code(tokens: list[str]) -> str:
    """Handles as Markdown code (``<asset0>`` would otherwise be read as an HTML tag)."""
    return ", ".join(f"`{t}`" for t in tokens)


def _progress_html(run: TrainingRun) -> str:
    logs = run.logs
    parts = [f"step {run.step} / {run.total}"]
    if "phase" in logs:
        parts.append(f"phase {int(logs['phase'])}")
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    parts.append(f"{time.perf_counter() - run.started:.0f} s")
    state = "failed" if run.error else "done" if run.bundle else "running"
    if state == "done":
        parts.append(f"bundle: {run.bundle.name}")
    text = html.escape(" · ".join(parts))
    return (
        f'<div id="train-state" data-step="{run.step}" data-total="{run.total}" '
        f'data-state="{state}"><progress max="{run.total}" value="{run.step}" '
        f'style="width:100%"></progress><div>{state}: {text}</div></div>'
    )


def build_studio(session: StudioSession) -> Any:
    """The studio page for ``session``, as a ``gradio.Blocks`` (not launched).

    Example:
        >>> from diffusers_breakscene.studio import StudioSession, build_studio
        >>> page = build_studio(StudioSession("toy", "studio-out"))  # doctest: +SKIP
        >>> page.launch()  # doctest: +SKIP
    """
    import gradio as gr

    def on_photo(path: str | None) -> tuple[Any, ...]:
        hidden = [gr.update(visible=False)] * MAX_OBJECTS
        if not path:
            return (None, None, None, *hidden)
        photo = read_photo(path)
        return (photo, photo, None, *hidden)

    def propose(photo: Any, words: str) -> tuple[Any, ...]:
        if photo is None:
            raise gr.Error("Upload a photo first.")
        proposal = session.propose(photo, words)
        n = len(proposal.masks)
        if n > MAX_OBJECTS:
            raise gr.Error(f"The studio takes at most {MAX_OBJECTS} objects; name fewer.")
        state = {"labels": proposal.labels, "masks": proposal.masks}
        columns = [gr.update(visible=k < n) for k in range(MAX_OBJECTS)]
        return (state, proposal.preview(), *columns)

    def fill_slots(photo: Any, state: Any) -> list[Any]:
        # A second event, once the mask rows are shown: an image editor that gets its picture
        # while hidden draws it at the wrong size and place (Gradio 6.31), and textboxes in a
        # row that is being shown keep their old value (Gradio 6.0).
        masks = state["masks"] if photo is not None and state else []
        words = MaskProposal(photo, state["labels"], masks).initializer_words() if masks else []
        n = len(masks)
        editors = [
            editor_value(photo, masks[k], MASK_COLOURS[k]) if k < n else None
            for k in range(MAX_OBJECTS)
        ]
        tokens = [f"<asset{k}>" for k in range(MAX_OBJECTS)]
        inits = [words[k] if k < n else "" for k in range(MAX_OBJECTS)]
        return [*editors, *tokens, *inits]

    def edited(photo: Any, state: Any, editors: tuple[Any, ...]) -> MaskProposal:
        if photo is None or not state:
            raise gr.Error("Upload a photo and propose masks first.")
        masks = [apply_edits(m, editors[k]) for k, m in enumerate(state["masks"])]
        return MaskProposal(photo, state["labels"], masks)

    def apply(photo: Any, state: Any, *editors: Any) -> tuple[Any, ...]:
        proposal = edited(photo, state, editors)
        state = {"labels": proposal.labels, "masks": proposal.masks}
        fresh = [editor_value(photo, m, MASK_COLOURS[k]) for k, m in enumerate(proposal.masks)] + [
            gr.update()
        ] * (MAX_OBJECTS - len(proposal.masks))
        return (state, proposal.preview(), *fresh)

    def train(photo: Any, state: Any, p1: Any, p2: Any, every: Any, *slots: Any) -> Iterator:
        editors = slots[:MAX_OBJECTS]
        tokens = slots[MAX_OBJECTS : 2 * MAX_OBJECTS]
        inits = slots[2 * MAX_OBJECTS :]
        proposal = edited(photo, state, editors)
        n = len(proposal.masks)
        scene = session.scene(photo, proposal.masks, tokens[:n], inits[:n])
        config = session.config(int(p1 or 0), int(p2 or 0), int(every) if every else None)
        run = session.start_training(scene, config)
        new_state = {"labels": proposal.labels, "masks": proposal.masks}
        while not run.done:
            yield (new_state, _progress_html(run), run.validation_pictures(), gr.update(),
                   gr.update())  # fmt: skip
            time.sleep(_POLL_SECONDS)
        if run.error is not None:  # the bar shows "failed", then the message says why
            yield (new_state, _progress_html(run), run.validation_pictures(), gr.update(),
                   gr.update())  # fmt: skip
        bundle = run.wait()
        loaded = session.load_bundle(bundle)
        note = f"Loaded {_code(loaded)} from `{bundle}`: use them in prompts below."
        yield (new_state, _progress_html(run), run.validation_pictures(),
               str(bundle), note)  # fmt: skip

    def generate(prompt: str, seed: Any, steps: Any) -> Any:
        image = session.generate(prompt, seed=int(seed or 0), steps=int(steps or 25))
        if max(image.size) < _SHOWN_SIDE:  # the toy model's 64 px, enlarged pixel for pixel
            factor = -(-_SHOWN_SIDE // max(image.size))
            image = image.resize((image.width * factor, image.height * factor), 0)
        return image

    def load(path: str | None) -> str:
        if not path:
            return gr.update()
        tokens = session.load_bundle(path)
        return f"Loaded {_code(tokens)} from `{Path(path).name}`: use them in prompts below."

    builtin = session.model in BUILTIN_MODELS
    p1_default, p2_default = (50, 50) if builtin else (400, 400)
    with gr.Blocks(title="Break-A-Scene studio") as page:
        photo_state = gr.State(None)
        masks_state = gr.State(None)
        gr.Markdown(_INTRO)
        with gr.Row():
            with gr.Column():
                photo_file = gr.File(
                    label="1. Photo (PNG, JPEG or WebP)", type="filepath", elem_id="photo-upload"
                )
                photo_view = gr.Image(
                    label="Photo", interactive=False, type="pil", height=256, elem_id="photo-view"
                )
            with gr.Column():
                words = gr.Textbox(
                    label="2. Objects: one phrase each, separated by commas",
                    placeholder="a dog, a hat",
                    elem_id="words",
                )
                propose_button = gr.Button("Propose masks", variant="primary", elem_id="propose")
                preview = gr.Image(
                    label="Proposed masks", interactive=False, type="pil", height=256,
                    elem_id="preview",
                )  # fmt: skip
        gr.Markdown("### 3. Correct the masks, name the handles")
        columns, editors, tokens, inits = [], [], [], []
        # One full-width row per mask: an editor whose width changes when another column
        # appears beside it keeps drawing its picture off-centre (Gradio 6.31).
        for k in range(MAX_OBJECTS):
            with gr.Row(visible=False, elem_id=f"slot-{k}") as column:
                editors.append(
                    gr.ImageEditor(
                        label=f"mask{k}",
                        type="pil",
                        sources=(),
                        transforms=(),
                        layers=False,
                        brush=gr.Brush(
                            colors=[ADD_COLOUR, REMOVE_COLOUR],
                            default_color=ADD_COLOUR,
                            color_mode="fixed",
                        ),
                        eraser=gr.Eraser(),
                        height=360,
                        scale=3,
                        elem_id=f"editor-{k}",
                    )
                )
                with gr.Column(scale=1):
                    tokens.append(gr.Textbox(label="Handle", elem_id=f"token-{k}"))
                    inits.append(gr.Textbox(label="Initializer word", elem_id=f"init-{k}"))
            columns.append(column)
        apply_button = gr.Button("Apply brush edits", elem_id="apply")
        gr.Markdown("### 4. Train")
        with gr.Row():
            phase1 = gr.Number(p1_default, label="Phase 1 steps (handles)", precision=0,
                               minimum=0, elem_id="phase1")  # fmt: skip
            phase2 = gr.Number(p2_default, label="Phase 2 steps (handles + LoRA)", precision=0,
                               minimum=0, elem_id="phase2")  # fmt: skip
            every = gr.Number(
                max(1, p1_default // 2),
                label="Validation pictures every N steps (0: at phase ends only)",
                precision=0, minimum=0, elem_id="every",
            )  # fmt: skip
        train_button = gr.Button("Train", variant="primary", elem_id="train")
        progress = gr.HTML(elem_id="train-progress")
        gallery = gr.Gallery(label="Validation pictures (newest first)", columns=4, height=280,
                             elem_id="validation")  # fmt: skip
        # Always shown: a component made visible and given a value in the same update stays
        # empty (Gradio 6.0).
        download = gr.File(
            label="Bundle (after training): click its name to download", interactive=False,
            elem_id="download",
        )  # fmt: skip
        gr.Markdown("### 5. Generate")
        loaded = gr.Markdown(elem_id="loaded")
        with gr.Row():
            prompt = gr.Textbox("a photo of <asset0> in the snow", label="Prompt", scale=3,
                                elem_id="prompt")  # fmt: skip
            seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            steps = gr.Number(25, label="Denoising steps", precision=0, minimum=1)
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        result = gr.Image(label="Generated", interactive=False, type="pil", height=256,
                          elem_id="result")  # fmt: skip
        bundle_upload = gr.File(label="Load a bundle (.safetensors)", type="filepath",
                                elem_id="bundle-upload")  # fmt: skip

        photo_file.change(
            _shown(gr, on_photo), photo_file, [photo_state, photo_view, masks_state, *columns]
        )
        propose_button.click(
            _shown(gr, propose), [photo_state, words],
            [masks_state, preview, *columns],
        ).success(
            _shown(gr, fill_slots), [photo_state, masks_state], [*editors, *tokens, *inits]
        )  # fmt: skip
        apply_button.click(
            _shown(gr, apply), [photo_state, masks_state, *editors],
            [masks_state, preview, *editors],
        )  # fmt: skip
        train_button.click(
            _shown_stream(gr, train),
            [photo_state, masks_state, phase1, phase2, every, *editors, *tokens, *inits],
            [masks_state, progress, gallery, download, loaded],
            show_progress="hidden",
        )
        generate_button.click(_shown(gr, generate), [prompt, seed, steps], result)
        bundle_upload.upload(_shown(gr, load), bundle_upload, loaded)
    return page
