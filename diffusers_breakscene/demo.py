"""The offline demo: a scene, trained, loaded, generated, scored and explained.

``breakscene demo`` runs :func:`run_demo`. By default it uses the built-in **toy model** (a small
pipeline trained on the toy world, :mod:`diffusers_breakscene.toy`): it learns the two objects of
a toy-world evaluation scene (objects the toy model never saw drawn), re-creates them in new
settings and recombines them, draws where each handle attends, and prints the toy evaluator's
identity similarity and prompt accuracy for every image. No network, no GPU, under 2 minutes on
2 CPU cores. With ``--model tiny-sd1`` (random weights) it only shows the workflow; with a real
model (a hub id or folder) it runs on a drawn scene at 512 px.

Example:
    >>> from diffusers_breakscene.demo import draw_demo_scene
    >>> image, masks = draw_demo_scene(64)
    >>> image.size, len(masks)
    ((64, 64), 2)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base_pipeline import DEFAULT_MODEL, TINY_MODEL, TINY_MODELS, TOY_MODEL, load_pipeline
from .files import check_output_dir
from .validation import attention_picture, generate_images
from .viz import save_png

__all__ = [
    "DEFAULT_MODEL",
    "DEMO_PROMPTS",
    "TINY_MODEL",
    "TOY_DEMO_PROMPTS",
    "TOY_MODEL",
    "DemoResult",
    "attention_picture",
    "draw_demo_scene",
    "generate_images",
    "load_pipeline",
    "overview_picture",
    "run_demo",
]

#: Optimizer steps per phase of the demo on the tiny model.
TINY_DEMO_STEPS = 50
#: Denoising steps of the demo's images on the built-in models.
TINY_INFERENCE_STEPS = 25
#: Which of the toy world's evaluation scenes the demo learns (two held-out objects).
TOY_DEMO_SCENE = 0
#: Prompts the demo renders on a drawn scene; the first (both handles) has its attention drawn.
DEMO_PROMPTS: tuple[str, ...] = (
    "a photo of <asset0> and <asset1>",
    "a photo of <asset0> on the beach",
    "a photo of <asset1> in the snow",
)
#: Prompts the demo renders on the toy model: each object in new settings, and recombined.
TOY_DEMO_PROMPTS: tuple[str, ...] = (
    "a photo of <asset0> and <asset1>",
    "a photo of <asset0> in the snow",
    "a photo of <asset1> at night",
    "a photo of <asset1> and <asset0> on the beach",
)
NOTICE = (
    "The built-in tiny model has random weights: it shows the workflow, not image quality. "
    "Run without --model for the toy model, or with a real model on a GPU."
)


def draw_demo_scene(size: int = 256) -> tuple[Image.Image, list[Image.Image]]:
    """Draw the built-in scene: a red ball and a blue box on a gray floor, and their masks.

    Returns ``(image, [ball_mask, box_mask])``; masks are white on black ``"L"`` images.

    Example:
        >>> image, (ball, box) = draw_demo_scene(128)
        >>> image.getpixel((40, 80))[0] > 150, ball.getpixel((40, 80)), box.getpixel((40, 80))
        (True, 255, 0)
    """
    s = size / 256
    image = Image.new("RGB", (size, size), (150, 160, 175))  # wall
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, round(150 * s), size, size), fill=(110, 110, 110))  # floor
    ball = tuple(round(v * s) for v in (25, 105, 115, 195))
    box = tuple(round(v * s) for v in (140, 85, 225, 190))
    draw.ellipse(ball, fill=(215, 35, 35))
    draw.ellipse(tuple(round(v * s) for v in (50, 120, 75, 140)), fill=(250, 140, 140))
    draw.rectangle(box, fill=(35, 70, 210))
    draw.rectangle(tuple(round(v * s) for v in (140, 85, 225, 100)), fill=(70, 110, 240))
    masks = []
    for shape, bbox in (("ellipse", ball), ("rectangle", box)):
        mask = Image.new("L", (size, size), 0)
        getattr(ImageDraw.Draw(mask), shape)(bbox, fill=255)
        masks.append(mask)
    return image, masks


def overview_picture(
    scene_image: Image.Image,
    masks: Sequence[Any],
    tokens: Sequence[str],
    images: Sequence[Image.Image],
    captions: Sequence[str],
    tile: int = 160,
) -> Image.Image:
    """The input scene and each handle's mask on the first row, the generated images with their
    captions below (four to a row).

    Example:
        >>> import numpy as np
        >>> from PIL import Image
        >>> im = Image.new("RGB", (64, 64))
        >>> pic = overview_picture(im, [np.ones((64, 64))], ["<asset0>"], [im, im], ["a", "b"])
        >>> pic.size
        (640, 384)
    """
    from .viz import PALETTE

    label = 32
    columns = 4
    first = [("input scene", scene_image.convert("RGB"))]
    for k, (token, mask) in enumerate(zip(tokens, masks, strict=True)):
        arr = np.asarray(mask, dtype=np.float32)
        inside = arr > 0.5 * float(arr.max() or 1.0)
        base = np.asarray(scene_image.convert("RGB"), dtype=np.float32)
        shown = np.where(
            inside[..., None], base, base * 0.2 + np.array(PALETTE[k % len(PALETTE)]) * 0.3
        )
        first.append((f"{token} mask", Image.fromarray(shown.clip(0, 255).astype(np.uint8))))
    rows = [first[i : i + columns] for i in range(0, len(first), columns)]
    generated = list(zip(captions, images, strict=True))
    rows += [generated[i : i + columns] for i in range(0, len(generated), columns)]
    canvas = Image.new("RGB", (columns * tile, len(rows) * (tile + label)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (caption, picture) in enumerate(row):
            x, y = c * tile, r * (tile + label)
            canvas.paste(picture.resize((tile, tile), Image.NEAREST), (x, y + label))
            words, line, lines = caption.split(), "", []
            for word in words:  # wrap the caption into two short lines
                if len(line) + len(word) + 1 > 26 and line:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            draw.multiline_text((x + 3, y + 1), "\n".join(lines[:2]), fill=(0, 0, 0))
    return canvas


@dataclass
class DemoResult:
    """Where :func:`run_demo` put everything, and (on the toy model) the evaluator's scores."""

    scene_dir: Path
    scene_files: list[Path]
    bundle: Path
    images: list[Path]
    attention: Path
    overview: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: Per generated image (toy model only): prompt, prompt accuracy, identity per handle.
    scores: list[dict[str, Any]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every file written, in order."""
        extra = [self.overview] if self.overview is not None else []
        return [*self.scene_files, self.bundle, *self.images, self.attention, *extra]


def _toy_scores(
    sample: Any, tokens: Sequence[str], prompts: Sequence[str], images: Sequence[Image.Image]
) -> list[dict[str, Any]]:
    """The toy evaluator's prompt accuracy and identity similarity of each generated image."""
    from .toy.evaluator import default_evaluator
    from .toy.experiment import score_image
    from .toy.world import object_phrase

    evaluator = default_evaluator()
    words = [object_phrase(o) for o in sample.objects]
    scores = []
    for prompt, image in zip(prompts, images, strict=True):
        described = prompt
        present = [i for i, t in enumerate(tokens) if t in prompt]
        for i in present:
            described = described.replace(tokens[i], words[i])
        accuracy, identities = score_image(evaluator, sample, image, described, present)
        identity = {tokens[i]: value for i, value in identities.items()}
        scores.append({"prompt": prompt, "described": described, "prompt_accuracy": accuracy,
                       "identity": identity})  # fmt: skip
    return scores


def run_demo(
    output: str | os.PathLike[str] = "breakscene-demo",
    model: str | None = None,
    steps: int | None = None,
    *,
    inference_steps: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
    echo: Callable[[str], Any] | None = print,
) -> DemoResult:
    """Learn a scene, save the bundle, generate with it, draw attention maps and score.

    ``model=None`` (or ``"toy"``) uses the built-in toy model on evaluation scene
    :data:`TOY_DEMO_SCENE` of the toy world at 64 px with the default step counts (the toy
    evaluator scores every image); ``"tiny-sd1"`` (or ``"tiny-sd2"``, ``"tiny-sdxl"``) a
    random-weight tiny model on a drawn scene (256 px, :data:`TINY_DEMO_STEPS` per phase); any
    other model a drawn scene at 512 px with
    ``BreakASceneConfig``'s step counts. ``steps`` sets the optimizer steps of each phase,
    ``inference_steps`` the denoising steps of each image, ``resolution`` the size of a drawn
    scene, the training and the images. ``echo`` receives progress lines (``None``: silent).

    Example:
        >>> result = run_demo("demo-out", steps=2, echo=None)  # doctest: +SKIP
        >>> result.bundle.name  # doctest: +SKIP
        'break_a_scene.safetensors'
    """
    model = TOY_MODEL if model is None else str(model)
    if model in (TOY_MODEL, *TINY_MODELS):
        # The built-in models are so small that one thread is fastest; two threads on a busy
        # 2-core machine measured 50x slower (OpenMP threads waiting on each other).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run_demo(output, model, steps, inference_steps, resolution, progress, echo)
        finally:
            torch.set_num_threads(threads)
    return _run_demo(output, model, steps, inference_steps, resolution, progress, echo)


def _run_demo(
    output: str | os.PathLike[str],
    model: str,
    steps: int | None,
    inference_steps: int | None,
    resolution: int | None,
    progress: bool,
    echo: Callable[[str], Any] | None,
) -> DemoResult:
    from .config import BreakASceneConfig
    from .scene import Scene
    from .trainer import BreakASceneTrainer

    say = echo or (lambda _text: None)
    started = time.perf_counter()
    toy, tiny = model == TOY_MODEL, model in TINY_MODELS
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1 (optimizer steps per phase).")
    if inference_steps is not None and inference_steps < 1:
        raise ValueError(f"--inference-steps {inference_steps} must be >= 1.")
    if toy and resolution not in (None, 64):
        raise ValueError(f"--resolution {resolution}: the toy model works at 64 px; leave it out.")
    out = check_output_dir(output, "output folder")
    scene_dir = out / "scene"
    sample = None
    if toy:
        from .toy.experiment import toy_config
        from .toy.model import TOY_GUIDANCE
        from .toy.world import evaluation_scenes, object_phrase, to_scene

        sample = evaluation_scenes()[TOY_DEMO_SCENE]
        resolution = sample.image.width
        image, masks = (
            sample.image,
            [Image.fromarray(m.astype("uint8") * 255) for m in sample.masks],
        )
        initializers = to_scene(sample).initializer_tokens  # the toy scenes' default words
        described = " and ".join(object_phrase(o) for o in sample.objects)
        config = toy_config()
        prompts = TOY_DEMO_PROMPTS
        guidance = TOY_GUIDANCE  # measured best for the toy model (its docstring)
    else:
        resolution = resolution or (256 if tiny else 512)
        image, masks = draw_demo_scene(resolution)
        initializers = ["ball", "box"]
        described = "a red ball and a blue box"
        config = BreakASceneConfig(resolution=resolution)
        if tiny:
            config = config.replace(phase1_steps=TINY_DEMO_STEPS, phase2_steps=TINY_DEMO_STEPS)
        prompts = DEMO_PROMPTS
        guidance = config.validation_guidance_scale  # the scale training's own pictures use
    if steps is not None:
        config = config.replace(phase1_steps=steps, phase2_steps=steps)
    config = config.replace(validate_phase_ends=False)  # the demo draws its own pictures
    inference_steps = inference_steps or TINY_INFERENCE_STEPS

    scene_files = [save_png(image, scene_dir / "img.png")]
    scene_files += [save_png(m, scene_dir / f"mask{i}.png") for i, m in enumerate(masks)]
    say(f"Scene ({described}) written to {scene_dir}/:")
    for path in scene_files:
        say(f"  {path}")

    scene = Scene.from_dir(scene_dir, initializer_tokens=initializers)
    say(
        f"Training {scene.tokens} on {model}: {config.phase1_steps} + {config.phase2_steps} "
        f"steps at {resolution} px ..."
    )
    # The model goes in as text so that the bundle records it as its base model.
    trainer = BreakASceneTrainer(model, scene, config)
    bundle = trainer.train(out, progress=progress)
    say(f"Bundle written to {bundle}")
    del trainer

    pipe = load_pipeline(model)
    tokens = pipe.load_break_a_scene(bundle)
    say(f"Loaded the bundle into a fresh pipeline; tokens {tokens}")
    first, picture = attention_picture(
        pipe, prompts[0], tokens, scene.masks, scene.image, steps=inference_steps,
        guidance=guidance, height=resolution, width=resolution, progress=progress,
    )  # fmt: skip
    rest = generate_images(
        pipe, prompts[1:], steps=inference_steps, guidance=guidance, seed=1, height=resolution,
        width=resolution, progress=progress,
    )  # fmt: skip
    images = [first, *rest]
    image_paths = []
    for i, (prompt, img) in enumerate(zip(prompts, images, strict=True)):
        path = save_png(img, out / "images" / f"{i}.png")
        image_paths.append(path)
        say(f"  {prompt!r} -> {path}")
    attention = save_png(picture, out / "attention.png")
    say(f"Attention of each handle (left: its mask, right: where it attends) -> {attention}")
    overview = save_png(
        overview_picture(scene.image, scene.masks, tokens, images, prompts),
        out / "overview.png",
    )
    say(f"The scene, its masks and every generated image -> {overview}")
    scores = _toy_scores(sample, tokens, prompts, images) if sample is not None else []
    if scores:
        say("Scored by the toy evaluator (identity: cosine to the input object, 1 = same; "
            "prompt accuracy: right attributes and setting):")  # fmt: skip
        for score in scores:
            ids = ", ".join(f"{t} {v:.2f}" for t, v in score["identity"].items())
            say(f"  {score['prompt']!r}: identity {ids}; prompt accuracy "
                f"{score['prompt_accuracy']:.2f}")  # fmt: skip
        identity = statistics.fmean(v for s in scores for v in s["identity"].values())
        accuracy = statistics.fmean(s["prompt_accuracy"] for s in scores)
        say(f"  mean: identity {identity:.2f}, prompt accuracy {accuracy:.2f}")
    say(f"Demo finished in {time.perf_counter() - started:.0f} s.")
    notes = [NOTICE] if tiny else []
    for note in notes:
        say(note)
    return DemoResult(
        scene_dir, scene_files, bundle, image_paths, attention, overview, notes, scores
    )
