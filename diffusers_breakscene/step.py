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
from dataclasses import dataclass
from typing import Any

import torch

from .config import BreakASceneConfig
from .losses import (
    cross_attention_loss,
    diffusion_target,
    masked_diffusion_loss,
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
    scaling factor; ``masks`` is ``(n, K, H, W)`` (scene images only).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    masks: torch.Tensor | None = None

    def sample(self, index: int, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
        """One latent draw of image ``index``, times the VAE scaling factor: ``(c, h, w)``."""
        noise = torch.randn(self.latent_mean.shape[1:], generator=generator)
        return (self.latent_mean[index] + self.latent_std[index] * noise) * scaling_factor


@torch.no_grad()
def encode_images(vae: Any, pixel_values: torch.Tensor) -> EncodedImages:
    """Encode ``(n, 3, H, W)`` images in [-1, 1] with ``vae``; moments are kept on the CPU."""
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return EncodedImages(dist.mean.float().cpu(), dist.std.float().cpu())


def encode_scene(vae: Any, scene: Scene, resolution: int) -> EncodedImages:
    """Encode every scene image and its horizontal flip once: index ``2 * i`` is image ``i`` as
    it is, ``2 * i + 1`` its mirror image."""
    pixels, masks = [], []
    for i in range(scene.num_images):
        image_pixels, image_masks = scene.prepare(resolution, i)
        flipped_pixels, flipped_masks = hflip(image_pixels, image_masks)
        pixels += [image_pixels, flipped_pixels]
        masks += [image_masks, flipped_masks]
    encoded = encode_images(vae, torch.stack(pixels))
    encoded.masks = torch.stack(masks)
    return encoded


@dataclass
class Batch:
    """One training batch. Prior-preservation examples, if any, follow the scene examples."""

    latents: torch.Tensor  # (B [+ P], c, h, w), already scaled
    input_ids: torch.Tensor  # (B [+ P], L)
    masks: list[torch.Tensor]  # B entries of (k_b, H, W): sampled concepts, in prompt order
    union_masks: torch.Tensor  # (B, 1, H, W)
    token_positions: list[list[int]]  # B entries of k_b text positions
    prompts: list[str]
    num_prior: int = 0


def _tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def sample_batch(
    scene: Scene,
    encoded: EncodedImages,
    tokenizer: Any,
    handle_ids: list[int],
    generator: torch.Generator,
    settings: SamplingSettings | None = None,
    *,
    scaling_factor: float,
    prior: EncodedImages | None = None,
) -> Batch:
    """Draw one batch; each example gets its own image (scenes of several images), concept
    subset, flip and latent noise draw.

    ``settings`` default to :meth:`SamplingSettings.from_config` of the default config;
    ``scaling_factor`` is the VAE's (``vae.config.scaling_factor``).
    """
    settings = settings or SamplingSettings.from_config()
    batch_size = settings.train_batch_size
    latents, masks, prompts, sampled = [], [], [], []
    assert encoded.masks is not None
    for _ in range(batch_size):
        image, indices = scene.sample(generator, union_sampling=settings.union_sampling)
        sampled.append(indices)
        flip = int(torch.rand((), generator=generator).item() < settings.flip_probability)
        latents.append(encoded.sample(2 * image + flip, generator, scaling_factor))
        masks.append(encoded.masks[2 * image + flip][indices])
        prompts.append(
            scene.prompt(indices, template=settings.prompt_template, joiner=settings.token_joiner)
        )
    input_ids = _tokenize(tokenizer, prompts)
    # The prompt names the sampled concepts in sampling order, one handle token each.
    positions = [
        [row.index(handle_ids[i]) for i in indices]
        for row, indices in zip(input_ids.tolist(), sampled, strict=True)
    ]
    union = torch.stack([m.amax(dim=0, keepdim=True) for m in masks])
    num_prior = 0
    if prior is not None:
        picks = torch.randint(prior.latent_mean.shape[0], (batch_size,), generator=generator)
        latents += [prior.sample(int(i), generator, scaling_factor) for i in picks]
        input_ids = torch.cat(
            [input_ids, _tokenize(tokenizer, [settings.class_prompt] * batch_size)]
        )
        num_prior = batch_size
    return Batch(
        latents=torch.stack(latents),
        input_ids=input_ids,
        masks=masks,
        union_masks=union,
        token_positions=positions,
        prompts=prompts,
        num_prior=num_prior,
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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward pass and losses of one batch; returns ``(loss, {term: value})``.

    ``settings`` default to :meth:`LossSettings.from_config` of the default config.
    ``attention_store`` (an attached :class:`~diffusers_breakscene.AttentionStore`) turns the
    cross-attention loss on; ``None`` turns it off.
    """
    settings = settings or LossSettings.from_config()
    device = unet.device if hasattr(unet, "device") else batch.latents.device
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    text = text_encoder(batch.input_ids.to(device))[0]
    if attention_store is not None:
        attention_store.reset()
    model_pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
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
