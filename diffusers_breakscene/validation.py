"""Images made during and after training: validation images, class images for prior
preservation, and attention pictures.

One renderer, :func:`attention_grid`, draws where each handle attends next to its mask; the
trainer's validation pictures, the demo and ``breakscene attention`` all use it.

Example:
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("sd1")
    >>> image, picture = attention_picture(pipe, "a photo of dog", ["dog"], steps=1,
    ...                                    height=64, width=64, progress=False)
    >>> picture.width
    384
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .attention import AttentionStore
from .base_pipeline import sized_for
from .conditioning import TextConditioning, crop_time_ids, time_ids
from .config import BreakASceneConfig
from .errors import InvalidArgumentError
from .scene import Scene
from .step import EncodedImages, encode_images
from .viz import handle_positions, mask_vs_attention_grid, save_png, token_attention_maps

__all__ = [
    "attention_grid",
    "attention_picture",
    "encode_class_images",
    "generate_class_images",
    "generate_images",
    "render_validation",
]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    negative_prompt: str | None = None,
    num_images: int = 1,
    device: str | None = None,
) -> list[Image.Image]:
    """Render ``num_images`` images per prompt, each with its own seeded generator (seed,
    seed + 1, ... over all images in order), on ``device`` (default: CUDA when present).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> images = generate_images(tiny_pipeline("sd1"), ["a dog"], steps=1, height=64,
        ...                          width=64, progress=False)
        >>> [im.size for im in images]
        [(64, 64)]
    """
    pipe.set_progress_bar_config(disable=not progress)
    pipe.to(device or _device())
    images = []
    jobs = [prompt for prompt in prompts for _ in range(num_images)]
    for i, prompt in enumerate(jobs):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        out = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generator,
        )
        images.append(out.images[0])
    return images


def attention_grid(
    tokenizer: Any,
    prompt: str,
    image: Image.Image,
    maps: torch.Tensor,
    tokens: Sequence[str],
    masks: Sequence[Any] | None = None,
    mask_image: Image.Image | None = None,
) -> Image.Image | None:
    """Draw, for each of ``tokens`` that occurs in ``prompt``, its mask next to its attention.

    ``maps`` is one sample's ``(h, w, seq_len)`` aggregate from an
    :class:`~diffusers_breakscene.AttentionStore`; ``masks`` (one per token, in ``tokens``
    order) are drawn on ``mask_image`` (default: ``image``). Without masks the left column shows
    the generated image. Returns ``None`` when no token occurs in the prompt.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> grid = attention_grid(tiny_tokenizer(), "a photo of dog", Image.new("RGB", (64, 64)),
        ...                       torch.rand(8, 8, 77), ["dog", "cat"])
        >>> grid.height > 0
        True
    """
    ids = set(tokenizer(prompt, truncation=True).input_ids)

    def occurs(token: str) -> bool:
        return set(tokenizer(token, add_special_tokens=False).input_ids) <= ids

    present = [t for t in tokens if occurs(t)]
    if not present:
        return None
    heat = token_attention_maps(maps, handle_positions(tokenizer, prompt, present))
    if masks is not None:
        chosen = [masks[list(tokens).index(t)] for t in present]
        base = mask_image or image
    else:
        chosen = [torch.ones(image.height, image.width) for _ in present]
        base = image
    label = "mask" if masks is not None else "image"
    return mask_vs_attention_grid(image, chosen, heat, present, mask_image=base, mask_label=label)


def attention_picture(
    pipe: Any,
    prompt: str,
    tokens: Sequence[str],
    masks: Sequence[Any] | None = None,
    mask_image: Image.Image | None = None,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    device: str | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Generate ``prompt`` while recording cross-attention; return ``(image, picture)``.

    ``picture`` is :func:`attention_grid` of the maps averaged over the denoising steps
    (conditional half of classifier-free guidance).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> image, picture = attention_picture(tiny_pipeline("sd1"), "a photo of dog", ["dog"],
        ...                                    steps=1, height=64, width=64, progress=False)
        >>> picture.width
        384
    """
    if guidance <= 1.0:
        raise InvalidArgumentError(
            f"guidance={guidance} turns classifier-free guidance off; attention maps need "
            "guidance > 1 (e.g. 7.5)."
        )
    if not any(t in prompt for t in tokens):
        raise InvalidArgumentError(
            f"none of the handle tokens {list(tokens)} occurs in the prompt {prompt!r}; "
            "put them in the prompt, e.g. 'a photo of " + " and ".join(tokens) + "'."
        )
    with AttentionStore.attach(pipe.unet) as store:
        (image,) = generate_images(
            pipe,
            [prompt],
            steps=steps,
            guidance=guidance,
            seed=seed,
            height=height,
            width=width,
            progress=progress,
            device=device,
        )
        maps = store.aggregate(part="cond", over_steps=True)[0]
    picture = attention_grid(pipe.tokenizer, prompt, image, maps, tokens, masks, mask_image)
    assert picture is not None  # a token occurs in the prompt (checked above)
    return image, picture


def _pil(pixels: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` tensor in [-1, 1] as an RGB image."""
    array = ((pixels.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
    return Image.fromarray(array)


def render_validation(
    pipe: Any,
    scene: Scene,
    config: BreakASceneConfig,
    folder: str | Path,
    store: AttentionStore | None = None,
) -> list[Path]:
    """Render ``config.validation_prompts`` (default: all handles) into ``folder``.

    Writes ``NN.png`` and ``NN.txt`` (the prompt) per prompt and, with
    ``config.save_attention_maps``, ``NN-attention.png`` (:func:`attention_grid` against the
    scene's masks). ``store`` is the trainer's recorder, if one is attached; otherwise one is
    attached for the call. The UNet and text encoder are put back in the mode they were in.
    Returns the files written.

    Example:
        >>> import tempfile
        >>> from diffusers_breakscene import BreakASceneConfig
        >>> from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene
        >>> cfg = BreakASceneConfig(resolution=64, validation_num_inference_steps=1,
        ...                         validation_prompts=("a photo of a dog",))
        >>> files = render_validation(tiny_pipeline("sd1"), tiny_scene(64), cfg, tempfile.mkdtemp())
        >>> [f.name for f in files]
        ['00.png', '00.txt']
    """
    cfg = sized_for(config, pipe)
    everything = list(range(scene.num_concepts))
    prompts = list(cfg.validation_prompts) or [
        scene.prompt(everything, cfg.prompt_template, cfg.token_joiner)
    ]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels, masks = scene.prepare(cfg.resolution)
    training_image = _pil(pixels)
    own_store = store is None and cfg.save_attention_maps
    if own_store:
        store = AttentionStore.attach(
            pipe.unet, resolution_divisor=cfg.attention_resolution_divisor
        )
    models = [pipe.unet, *TextConditioning.from_pipeline(pipe).text_encoders]
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    written: list[Path] = []
    part = "cond" if cfg.validation_guidance_scale > 1 else "all"
    try:
        for index, prompt in enumerate(prompts):
            if store is not None:
                store.reset()
            with torch.no_grad():
                image = pipe(
                    prompt,
                    num_inference_steps=cfg.validation_num_inference_steps,
                    guidance_scale=cfg.validation_guidance_scale,
                    height=cfg.resolution,
                    width=cfg.resolution,
                    generator=torch.Generator().manual_seed(cfg.seed),
                ).images[0]
            written.append(save_png(image, folder / f"{index:02d}.png"))
            text = folder / f"{index:02d}.txt"
            text.write_text(prompt + "\n")
            written.append(text)
            if not (cfg.save_attention_maps and store is not None):
                continue
            maps = store.aggregate(part=part, over_steps=True)[0]
            grid = attention_grid(
                pipe.tokenizer, prompt, image, maps, scene.tokens, masks, training_image
            )
            if grid is not None:
                written.append(save_png(grid, folder / f"{index:02d}-attention.png"))
    finally:
        if store is not None:
            store.reset()
            if own_store:
                store.detach()
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
    return written


def generate_class_images(pipe: Any, config: BreakASceneConfig, folder: str | Path) -> None:
    """Generate the missing ``config.num_class_images`` class images (prior preservation) into
    ``folder`` as PNG; images already there are kept, so a second run generates nothing.

    Example:
        >>> import tempfile
        >>> from diffusers_breakscene import BreakASceneConfig
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> cfg = BreakASceneConfig(resolution=64, num_class_images=2,
        ...                         validation_num_inference_steps=1)
        >>> folder = tempfile.mkdtemp()
        >>> generate_class_images(tiny_pipeline("sd1"), cfg, folder)
        >>> tuple(encode_class_images(tiny_pipeline("sd1"), cfg, folder).latent_mean.shape)
        (2, 4, 8, 8)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = sized_for(config, pipe)
    existing = sorted(folder.glob("*.png"))
    generator = torch.Generator().manual_seed(config.seed)
    for index in range(len(existing), config.num_class_images):
        with torch.no_grad():
            image = pipe(
                config.class_prompt,
                num_inference_steps=config.validation_num_inference_steps,
                height=config.resolution,
                width=config.resolution,
                generator=generator,
            ).images[0]
        save_png(image, folder / f"class-{index:04d}.png")


def encode_class_images(pipe: Any, config: BreakASceneConfig, folder: str | Path) -> EncodedImages:
    """Encode the first ``config.num_class_images`` PNGs of ``folder`` with the pipeline's VAE
    (see :func:`generate_class_images` for an example)."""
    config = sized_for(config, pipe)
    files = sorted(Path(folder).glob("*.png"))[: config.num_class_images]
    size = (config.resolution, config.resolution)
    pixels, rows = [], []
    for file in files:
        image = Image.open(file).convert("RGB")
        rows.append(crop_time_ids((image.height, image.width), size, (0, 0), config.resolution))
        array = torch.from_numpy(np.asarray(image.resize(size), dtype=np.float32) / 127.5 - 1.0)
        pixels.append(array.permute(2, 0, 1))
    encoded = encode_images(pipe.vae, torch.stack(pixels))
    encoded.time_ids = time_ids(rows)
    return encoded
