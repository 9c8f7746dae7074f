"""The offline demo: a scene drawn with PIL, trained, loaded, generated and explained.

``breakscene demo`` runs :func:`run_demo`. With the built-in tiny model (random weights) it needs
no network and no GPU; it shows the whole workflow (scene -> training -> bundle -> generation ->
attention maps), not image quality.

Example:
    >>> from diffusers_breakscene.demo import draw_demo_scene
    >>> image, masks = draw_demo_scene(64)
    >>> image.size, len(masks)
    ((64, 64), 2)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .base_pipeline import DEFAULT_MODEL, TINY_MODEL, load_pipeline
from .validation import attention_picture, generate_images
from .viz import save_png

__all__ = [
    "DEFAULT_MODEL",
    "DEMO_PROMPTS",
    "TINY_MODEL",
    "DemoResult",
    "attention_picture",
    "draw_demo_scene",
    "generate_images",
    "load_pipeline",
    "run_demo",
]

#: Optimizer steps per phase of the demo on the tiny model (keeps the demo under 2 minutes on
#: 2 CPU cores).
TINY_DEMO_STEPS = 50
#: Denoising steps of the demo's images on the tiny model.
TINY_INFERENCE_STEPS = 25
#: Prompts the demo renders; the first (both handles) is the one whose attention is drawn.
DEMO_PROMPTS: tuple[str, ...] = (
    "a photo of <asset0> and <asset1>",
    "a photo of <asset0> on the beach",
    "a photo of <asset1> in the snow",
)
NOTICE = (
    "The built-in tiny model has random weights: it shows the workflow, not image quality. "
    "Run with --model stabilityai/stable-diffusion-2-1-base on a GPU for real results."
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


@dataclass
class DemoResult:
    """Where :func:`run_demo` put everything."""

    scene_dir: Path
    scene_files: list[Path]
    bundle: Path
    images: list[Path]
    attention: Path
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every file written, in order."""
        return [*self.scene_files, self.bundle, *self.images, self.attention]


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
    """Draw the built-in scene, train, save the bundle, generate and draw attention maps.

    ``model=None`` uses the built-in tiny model (256 px, :data:`TINY_DEMO_STEPS` per phase,
    offline); any other model runs at 512 px with ``BreakASceneConfig``'s step counts. ``steps``
    sets the optimizer steps of each phase, ``inference_steps`` the denoising steps of each image,
    ``resolution`` the size of the scene, the training and the images.
    ``echo`` receives progress lines (``None``: silent).

    Example:
        >>> result = run_demo("demo-out", steps=2, echo=None)  # doctest: +SKIP
        >>> result.bundle.name  # doctest: +SKIP
        'break_a_scene.safetensors'
    """
    from .config import BreakASceneConfig
    from .scene import Scene
    from .trainer import BreakASceneTrainer

    say = echo or (lambda _text: None)
    started = time.perf_counter()
    tiny = model is None or model == TINY_MODEL
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1 (optimizer steps per phase).")
    out = Path(output).expanduser()
    resolution = resolution or (256 if tiny else 512)
    config = BreakASceneConfig(resolution=resolution)
    if steps is not None or tiny:
        per_phase = steps if steps is not None else TINY_DEMO_STEPS
        config = config.replace(phase1_steps=per_phase, phase2_steps=per_phase)
    if inference_steps is None:
        inference_steps = TINY_INFERENCE_STEPS if tiny else 25
    elif inference_steps < 1:
        raise ValueError(f"--inference-steps {inference_steps} must be >= 1.")

    image, masks = draw_demo_scene(resolution)
    scene_dir = out / "scene"
    scene_files = [save_png(image, scene_dir / "img.png")]
    scene_files += [save_png(m, scene_dir / f"mask{i}.png") for i, m in enumerate(masks)]
    say(f"Scene (a red ball and a blue box) written to {scene_dir}/:")
    for path in scene_files:
        say(f"  {path}")

    scene = Scene.from_dir(scene_dir, initializer_tokens=["ball", "box"])
    say(
        f"Training {scene.tokens} on {model or 'the built-in tiny model'}: "
        f"{config.phase1_steps} + {config.phase2_steps} steps at {resolution} px ..."
    )
    # A model id/folder goes in as text so that the bundle records it as its base model.
    trainer = BreakASceneTrainer(load_pipeline(None) if tiny else str(model), scene, config)
    bundle = trainer.train(out, progress=progress)
    say(f"Bundle written to {bundle}")
    del trainer

    pipe = load_pipeline(model)
    tokens = pipe.load_break_a_scene(bundle)
    say(f"Loaded the bundle into a fresh pipeline; tokens {tokens}")
    image_paths = []
    first, picture = attention_picture(
        pipe,
        DEMO_PROMPTS[0],
        tokens,
        scene.masks,
        scene.image,
        steps=inference_steps,
        height=resolution,
        width=resolution,
        progress=progress,
    )
    rest = generate_images(
        pipe,
        DEMO_PROMPTS[1:],
        steps=inference_steps,
        seed=1,
        height=resolution,
        width=resolution,
        progress=progress,
    )
    for i, (prompt, img) in enumerate(zip(DEMO_PROMPTS, [first, *rest], strict=True)):
        path = save_png(img, out / "images" / f"{i}.png")
        image_paths.append(path)
        say(f"  {prompt!r} -> {path}")
    attention = save_png(picture, out / "attention.png")
    say(f"Attention of each handle (left: its mask, right: where it attends) -> {attention}")
    say(f"Demo finished in {time.perf_counter() - started:.0f} s.")
    notes = [NOTICE] if tiny else []
    for note in notes:
        say(note)
    return DemoResult(scene_dir, scene_files, bundle, image_paths, attention, notes)
