"""One Break-A-Scene training step as plain functions, shared by the trainer and the benchmarks.

:func:`encode_scene` runs the VAE once on the image and its mirror image; :func:`sample_batch`
draws a batch (union sampling, flip, prompts, latents) from one ``torch.Generator``; and
:func:`training_step` computes the losses of one forward pass. Every random choice comes from
the generator, in a fixed order, so a run is reproduced exactly from its seed or its checkpoint.

Example:
    >>> import torch
    >>> from diffusers_breakscene.step import encode_scene, sample_batch
    >>> from diffusers_breakscene.scene import Scene
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("sd1")
    >>> image = torch.rand(3, 64, 64)
    >>> mask = torch.zeros(64, 64); mask[8:40, 8:40] = 1
    >>> scene = Scene(image, [mask])
    >>> data = encode_scene(pipe.vae, scene, resolution=64)
    >>> data.latent_mean.shape  # the image and its flip
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .conditioning import crop_time_ids, encode_text, time_ids, tokenize
from .config import BreakASceneConfig
from .handles import expand_handles
from .losses import (
    cross_attention_loss,
    diffusion_target,
    masked_diffusion_loss,
    position_group,
    prior_preservation_loss,
)
from .scene import Scene, hflip

__all__ = [
    "Batch",
    "EncodedImages",
    "LossSettings",
    "SamplingSettings",
    "encode_images",
    "encode_scene",
    "sample_batch",
    "training_step",
]


class _FromConfig:
    """A settings record whose field names are :class:`BreakASceneConfig` field names."""

    @classmethod
    def from_config(cls, config: BreakASceneConfig | None = None) -> Any:
        """The settings of ``config`` (default: ``BreakASceneConfig()``)."""
        cfg = config or BreakASceneConfig()
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class SamplingSettings(_FromConfig):
    """How :func:`sample_batch` draws examples; the values come from a
    :class:`~diffusers_breakscene.BreakASceneConfig` (same field names), where every default is
    written.

    Example:
        >>> SamplingSettings.from_config(BreakASceneConfig(union_sampling=False)).union_sampling
        False
    """

    train_batch_size: int
    union_sampling: bool
    flip_probability: float
    prompt_template: str
    token_joiner: str
    class_prompt: str


@dataclass(frozen=True)
class LossSettings(_FromConfig):
    """Which losses :func:`training_step` adds and how; the values come from a
    :class:`~diffusers_breakscene.BreakASceneConfig` (same field names), where every default is
    written.

    Example:
        >>> LossSettings.from_config().lambda_attention
        0.01
    """

    use_masked_loss: bool
    lambda_attention: float
    masked_loss_normalization: str
    prior_loss_weight: float


@dataclass
class EncodedImages:
    """VAE latent distributions of a few images, computed once.

    ``latent_mean``/``latent_std`` are ``(n, c, h, w)`` and already include nothing of the VAE's
    scaling factor; ``masks`` is ``(n, K, H, W)`` (scene images only); ``time_ids`` is
    ``(n, 6)``: SDXL's original size, crop corner and target size of each picture
    (:func:`~diffusers_breakscene.conditioning.crop_time_ids`).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    masks: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def sample(self, index: int, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
        """One latent draw of image ``index``, times the VAE scaling factor: ``(c, h, w)``."""
        noise = torch.randn(self.latent_mean.shape[1:], generator=generator)
        return (self.latent_mean[index] + self.latent_std[index] * noise) * scaling_factor


@torch.no_grad()
def encode_images(vae: Any, pixel_values: torch.Tensor) -> EncodedImages:
    """Encode ``(n, 3, H, W)`` images in [-1, 1] with ``vae``; moments are kept on the CPU.

    A half-precision VAE whose config says ``force_upcast`` (SDXL's, which overflows in fp16)
    encodes in float32, as the SDXL pipelines decode, and is put back in its dtype after; an
    fp16-safe VAE (``force_upcast=False``, such as madebyollin/sdxl-vae-fp16-fix) is used as it
    is.
    """
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    finally:
        if upcast:
            vae.to(dtype=dtype)
    return EncodedImages(dist.mean.float().cpu(), dist.std.float().cpu())


def encode_scene(vae: Any, scene: Scene, resolution: int) -> EncodedImages:
    """Encode every scene image and its horizontal flip once: index ``2 * i`` is image ``i`` as
    it is, ``2 * i + 1`` its mirror image."""
    pixels, masks, rows = [], [], []
    for i in range(scene.num_images):
        image_pixels, image_masks = scene.prepare(resolution, i)
        flipped_pixels, flipped_masks = hflip(image_pixels, image_masks)
        pixels += [image_pixels, flipped_pixels]
        masks += [image_masks, flipped_masks]
        window = scene.crop_window(resolution, i)
        rows += [crop_time_ids(*window, resolution, flipped=f) for f in (False, True)]
    encoded = encode_images(vae, torch.stack(pixels))
    encoded.masks = torch.stack(masks)
    encoded.time_ids = time_ids(rows)
    return encoded


@dataclass
class Batch:
    """One training batch. Prior-preservation examples, if any, follow the scene examples."""

    latents: torch.Tensor  # (B [+ P], c, h, w), already scaled
    input_ids: torch.Tensor  # (B [+ P], L)
    masks: list[torch.Tensor]  # B entries of (k_b, H, W): sampled concepts, in prompt order
    union_masks: torch.Tensor  # (B, 1, H, W)
    # B entries of k_b groups, in prompt order: the text positions of one handle's vectors
    token_positions: list[list[list[int]]]
    prompts: list[str]
    num_prior: int = 0
    input_ids_2: torch.Tensor | None = None  # SDXL: the second tokenizer's ids
    time_ids: torch.Tensor | None = None  # (B [+ P], 6): SDXL's size and crop conditioning


def sample_batch(
    scene: Scene,
    encoded: EncodedImages,
    tokenizer: Any,
    handle_ids: Sequence[int | Sequence[int]],
    generator: torch.Generator,
    settings: SamplingSettings | None = None,
    *,
    scaling_factor: float,
    prior: EncodedImages | None = None,
    tokenizer_2: Any = None,
) -> Batch:
    """Draw one batch; each example gets its own image (scenes of several images), concept
    subset, flip and latent noise draw.

    ``handle_ids`` holds each concept's token id, or the ids of its vectors for handles of
    several (:func:`~diffusers_breakscene.handles.vector_tokens`): prompts then name every
    vector, and ``token_positions`` holds each handle's group of positions.
    ``settings`` default to :meth:`SamplingSettings.from_config` of the default config;
    ``scaling_factor`` is the VAE's (``vae.config.scaling_factor``). With ``tokenizer_2``
    (SDXL) the batch also holds the second tokenizer's ids and the pictures' time ids.
    """
    settings = settings or SamplingSettings.from_config()
    groups = [position_group(i) for i in handle_ids]  # the ids of each handle's vectors
    batch_size = settings.train_batch_size
    latents, masks, prompts, sampled, pictures = [], [], [], [], []
    assert encoded.masks is not None
    for _ in range(batch_size):
        image, indices = scene.sample(generator, union_sampling=settings.union_sampling)
        sampled.append(indices)
        flip = int(torch.rand((), generator=generator).item() < settings.flip_probability)
        picture = 2 * image + flip  # encode_scene's order: each image, then its mirror image
        pictures.append(picture)
        latents.append(encoded.sample(picture, generator, scaling_factor))
        masks.append(encoded.masks[picture][indices])
        prompt = scene.prompt(
            indices, template=settings.prompt_template, joiner=settings.token_joiner
        )
        prompts.append(expand_handles(prompt, tokenizer, scene.tokens))
    input_ids = tokenize(tokenizer, prompts)
    # The prompt names the sampled concepts in sampling order, each by all its vectors.
    positions = [
        [[_position(row, token, prompt) for token in groups[i]] for i in indices]
        for row, indices, prompt in zip(input_ids.tolist(), sampled, prompts, strict=True)
    ]
    union = torch.stack([m.amax(dim=0, keepdim=True) for m in masks])
    time_rows = [encoded.time_ids[i] for i in pictures] if encoded.time_ids is not None else []
    num_prior = 0
    if prior is not None:
        picks = torch.randint(prior.latent_mean.shape[0], (batch_size,), generator=generator)
        latents += [prior.sample(int(i), generator, scaling_factor) for i in picks]
        input_ids = torch.cat(
            [input_ids, tokenize(tokenizer, [settings.class_prompt] * batch_size)]
        )
        if prior.time_ids is not None:
            time_rows += [prior.time_ids[int(i)] for i in picks]
        num_prior = batch_size
    input_ids_2 = None
    if tokenizer_2 is not None:
        all_prompts = prompts + [settings.class_prompt] * num_prior
        input_ids_2 = tokenize(tokenizer_2, all_prompts)
        _check_same_positions(tokenizer, tokenizer_2, input_ids, input_ids_2, positions)
    return Batch(
        latents=torch.stack(latents),
        input_ids=input_ids,
        masks=masks,
        union_masks=union,
        token_positions=positions,
        prompts=prompts,
        num_prior=num_prior,
        input_ids_2=input_ids_2,
        time_ids=torch.stack(time_rows) if time_rows else None,
    )


def _position(row: list[int], token: int, prompt: str) -> int:
    if token not in row:  # the tokenizer cut the prompt before this handle
        raise ValueError(
            f"The training prompt {prompt!r} is longer than the tokenizer's maximum length, so "
            "a handle was cut off; use a shorter prompt_template, fewer concepts or fewer "
            "vectors_per_handle."
        )
    return row.index(token)


def _check_same_positions(
    tokenizer: Any, tokenizer_2: Any, ids: torch.Tensor, ids_2: torch.Tensor, positions: list
) -> None:
    """The attention loss reads each handle's map at its position in the first tokenizer's
    ids; SDXL's second tokenizer must hold the same token there (both are CLIP BPE tokenizers,
    so it does when both were given the same handle tokens)."""
    for row, row_2, groups in zip(ids.tolist(), ids_2.tolist(), positions, strict=False):
        where = [p for group in groups for p in group]
        first = tokenizer.convert_ids_to_tokens([row[i] for i in where])
        second = tokenizer_2.convert_ids_to_tokens([row_2[i] for i in where])
        if first != second:
            raise ValueError(
                f"The two tokenizers read handles {first} and {second} at positions {where}; "
                "both must hold the same handle tokens (add them to both)."
            )


def training_step(
    unet: Any,
    text_encoder: Any,
    noise_scheduler: Any,
    batch: Batch,
    generator: torch.Generator,
    settings: LossSettings | None = None,
    *,
    attention_store: Any = None,
    text_encoder_2: Any = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward pass and losses of one batch; returns ``(loss, {term: value})``.

    ``settings`` default to :meth:`LossSettings.from_config` of the default config.
    ``attention_store`` (an attached :class:`~diffusers_breakscene.AttentionStore`) turns the
    cross-attention loss on; ``None`` turns it off. ``text_encoder_2`` (SDXL) conditions the
    UNet as SDXL does (:func:`~diffusers_breakscene.conditioning.encode_text`), with the
    batch's second ids and time ids.
    """
    settings = settings or LossSettings.from_config()
    device = unet.device if hasattr(unet, "device") else batch.latents.device
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if text_encoder_2 is None:
        text, added = encode_text([text_encoder], [batch.input_ids.to(device)])
    else:
        if batch.input_ids_2 is None or batch.time_ids is None:
            raise ValueError("text_encoder_2 needs a batch drawn with tokenizer_2 (SDXL).")
        ids = [batch.input_ids.to(device), batch.input_ids_2.to(device)]
        text, added = encode_text([text_encoder, text_encoder_2], ids, batch.time_ids)
    if attention_store is not None:
        attention_store.reset()
    model_pred = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)

    n = latents.shape[0] - batch.num_prior
    pred, prior_pred = model_pred[:n], model_pred[n:]
    scene_target, prior_target = target[:n], target[n:]
    if settings.use_masked_loss:
        rec = masked_diffusion_loss(
            pred, scene_target, batch.union_masks.to(device), settings.masked_loss_normalization
        )
    else:
        rec = prior_preservation_loss(pred, scene_target)  # plain MSE
    loss = rec
    logs = {"loss_rec": rec.item()}
    if attention_store is not None:
        maps = attention_store.aggregate()[:n]
        attn = cross_attention_loss(
            maps, [m.to(device) for m in batch.masks], batch.token_positions
        )
        loss = loss + settings.lambda_attention * attn
        logs["loss_attn"] = attn.item()
    if batch.num_prior:
        prior = prior_preservation_loss(prior_pred, prior_target)
        loss = loss + settings.prior_loss_weight * prior
        logs["loss_prior"] = prior.item()
    logs["loss"] = loss.item()
    return loss, logs
