"""Does each object word attend to its object? Attention/mask IoU of a toy pipeline.

For each of ``num_samples`` rendered scenes: encode the image with the pipeline's VAE, noise the
latent at a few mid timesteps (default 300, 500, 700 of 1000; one noise draw per scene), run the
UNet once per timestep on the scene's caption (conditional only) with an
:class:`~diffusers_breakscene.AttentionStore` on the latent/4 level (8x8 for 64 px), average the
maps over the timesteps, and for every object take the map of its shape word (``words="shape"``),
its colour word (``"colour"``), its pattern word (``"pattern"``: only objects with a written
pattern; "plain" is not written) or the mean map of all its words (``words="all"``). The map is
upsampled bilinearly to the image size and thresholded at ``0.5 * max``
(``threshold="half_max"``, default) or at its mean (``threshold="mean"``); the IoU with the
object's visible mask is reported.

Example:
    >>> from diffusers_breakscene.toy.attention_check import attention_iou
    >>> from diffusers_breakscene.toy.model import toy_pipeline
    >>> result = attention_iou(toy_pipeline(), num_samples=8)  # doctest: +SKIP
    >>> round(result["mean_iou"], 2)  # doctest: +SKIP
    0.6
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import AttentionStore
from .train_base import caption_tokens
from .world import Split, sample_scene

__all__ = ["WORDS", "attention_iou", "attention_ious"]


Words = Literal["shape", "colour", "pattern", "all"]
WORDS: tuple[str, ...] = ("shape", "colour", "pattern", "all")


def attention_iou(
    pipe: Any,
    num_samples: int = 32,
    seed: int = 0,
    split: Split = "train",
    timesteps: tuple[int, ...] = (300, 500, 700),
    threshold: Literal["half_max", "mean"] = "half_max",
    words: Words = "shape",
    num_objects: int | None = None,
) -> dict[str, Any]:
    """Mean IoU between object-word attention maps and object masks (see the module docstring).

    Scenes are ``sample_scene(seed + i, split, num_objects=num_objects)``. Returns
    ``{"mean_iou", "ious" (one per object), "shapes" and "patterns" (each object's shape and
    pattern, in the same order), "num_objects", "threshold", "words", "timesteps"}``.

    Example:
        >>> attention_iou(pipe, num_samples=4, threshold="mean")["threshold"]  # doctest: +SKIP
        'mean'
    """
    return attention_ious(
        pipe, num_samples, seed, split, timesteps, threshold, (words,), num_objects
    )[words]


@torch.no_grad()
def attention_ious(
    pipe: Any,
    num_samples: int = 32,
    seed: int = 0,
    split: Split = "train",
    timesteps: tuple[int, ...] = (300, 500, 700),
    threshold: Literal["half_max", "mean"] = "half_max",
    words: tuple[Words, ...] = WORDS,
    num_objects: int | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`attention_iou` for several ``words`` choices at once: ``{words: result}``, each
    result the same as ``attention_iou(..., words=words)`` returns, from one UNet pass per scene
    and timestep instead of one per choice.

    Example:
        >>> by_word = attention_ious(pipe, 4, words=("shape", "colour"))  # doctest: +SKIP
        >>> sorted(by_word)  # doctest: +SKIP
        ['colour', 'shape']
    """
    if threshold not in ("half_max", "mean"):
        raise ValueError(f"threshold={threshold!r} must be 'half_max' or 'mean'.")
    words = tuple(words)
    bad = [w for w in words if w not in WORDS]
    if bad or not words:
        shown = repr(bad[0]) if bad else repr(words)  # the first bad choice, or the empty tuple
        raise ValueError(f"words={shown} must be 'shape', 'colour', 'pattern' or 'all'.")
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    size = int(pipe.unet.config.sample_size) * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    alphas = pipe.scheduler.alphas_cumprod.to(torch.float32)
    # per words choice: (iou, shape, pattern) of every object scored
    scored: dict[str, list[tuple[float, str, str]]] = {w: [] for w in words}
    store = AttentionStore.attach(pipe.unet)
    try:
        for i in range(num_samples):
            sample = sample_scene(seed + i, split, size=size, num_objects=num_objects)
            tokens, positions = caption_tokens(list(sample.objects), sample.setting)
            ids = pipe.tokenizer(
                " ".join(tokens), padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids.to(device)
            hidden = pipe.text_encoder(ids)[0].to(dtype)
            x = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)[None].float()
            x = (x / 127.5 - 1).to(device, dtype)
            latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + i))
            noise = noise.to(device, dtype)
            maps = []
            for t in timesteps:
                a = alphas[t].item()
                noisy = a**0.5 * latent + (1 - a) ** 0.5 * noise
                store.reset()
                pipe.unet(noisy, torch.tensor([t], device=device), encoder_hidden_states=hidden)
                maps.append(store.aggregate()[0].float().cpu())
            mean_map = torch.stack(maps).mean(0)  # (h, w, 77)
            for obj, mask, pos in zip(sample.objects, sample.masks, positions, strict=True):
                # an object's words: colour, then its pattern if written, then its shape
                for w in words:
                    if w == "pattern" and len(pos) < 3:
                        continue  # a plain object has no pattern word
                    chosen = {"shape": pos[-1:], "colour": pos[:1], "pattern": pos[1:2]}.get(w, pos)
                    iou = _mask_iou(mean_map[:, :, chosen].mean(-1), mask, threshold)
                    scored[w].append((iou, obj.shape, obj.pattern))
    finally:
        store.detach()
    return {
        w: {
            "mean_iou": float(np.mean([r[0] for r in rows])) if rows else float("nan"),
            "ious": [r[0] for r in rows],
            "shapes": [r[1] for r in rows],
            "patterns": [r[2] for r in rows],
            "num_objects": len(rows),
            "threshold": threshold,
            "words": w,
            "timesteps": tuple(timesteps),
        }
        for w, rows in scored.items()
    }


def _mask_iou(attention: torch.Tensor, mask: np.ndarray, threshold: str) -> float:
    """IoU of ``mask`` with the (h, w) ``attention`` map upsampled to its size and thresholded."""
    m = attention[None, None]
    m = F.interpolate(m, size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    cut = 0.5 * m.max() if threshold == "half_max" else m.mean()
    pred = (m > cut).numpy()
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / max(union, 1))
