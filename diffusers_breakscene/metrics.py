"""How well each handle's cross-attention lines up with its mask.

:func:`attention_mask_iou` scores one map against one mask; :func:`evaluate_alignment` runs a
pipeline that has a scene's handles on fixed, seeded draws (every handle in the prompt, no flip)
and reports the masked diffusion loss and, per handle, the IoU between its latent/4 attention map
thresholded at half its maximum and its mask. Tests and benchmarks use the same measure.

Example:
    >>> import torch
    >>> attention_mask_iou(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.eye(2))
    0.5
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from .attention import AttentionStore
from .config import BreakASceneConfig
from .handles import handle_vectors, token_ids
from .losses import resize_masks
from .scene import Scene
from .step import SamplingSettings, encode_scene, sample_batch, training_step

__all__ = ["AlignmentReport", "attention_mask_iou", "evaluate_alignment"]


def attention_mask_iou(
    attention: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5
) -> float:
    """IoU between ``attention > threshold * max(attention)`` and ``mask`` (resized, nearest).

    ``attention`` is one token's ``(h, w)`` map; ``mask`` is ``(H, W)`` in {0, 1}.
    """
    attention = attention.detach().float().cpu()  # maps recorded on a GPU, masks on the CPU
    mask = resize_masks(mask.cpu(), tuple(attention.shape)).bool()
    hot = attention / attention.max().clamp_min(1e-12) > threshold
    return ((hot & mask).sum() / (hot | mask).sum().clamp_min(1)).item()


@dataclass
class AlignmentReport:
    """Result of :func:`evaluate_alignment`."""

    masked_loss: float  # mean masked diffusion loss over the draws
    iou: list[float]  # per handle, in scene order: mean IoU of its map with its mask

    @property
    def mean_iou(self) -> float:
        """IoU averaged over the handles."""
        return statistics.mean(self.iou)


def evaluate_alignment(
    pipe: Any, scene: Scene, resolution: int, draws: int = 6, seed: int = 100
) -> AlignmentReport:
    """Evaluate ``pipe`` (holding ``scene``'s handles) on ``draws`` seeded draws.

    Example:
        >>> import diffusers_breakscene as bas
        >>> from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene
        >>> pipe, scene = tiny_pipeline("sd1"), tiny_scene(64)
        >>> _ = bas.handles.add_handles(pipe.tokenizer, pipe.text_encoder, scene.tokens)
        >>> len(evaluate_alignment(pipe, scene, 64, draws=1).iou)
        2
    """
    # Each handle's vectors (one id, or several for a multi-vector handle).
    ids = [token_ids(pipe.tokenizer, handle_vectors(pipe.tokenizer, t)) for t in scene.tokens]
    encoded = encode_scene(pipe.vae, scene, resolution)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # Every concept, never flipped: the maps are compared with the masks as drawn.
    settings = SamplingSettings.from_config(
        BreakASceneConfig(union_sampling=False, flip_probability=0.0, train_batch_size=1)
    )
    losses: list[float] = []
    per_handle: list[list[float]] = [[] for _ in scene.tokens]
    with torch.no_grad(), AttentionStore.attach(pipe.unet) as store:
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed + draw)
            batch = sample_batch(
                scene, encoded, pipe.tokenizer, ids, generator, settings,
                scaling_factor=pipe.vae.config.scaling_factor,
            )  # fmt: skip
            _, logs = training_step(
                pipe.unet, pipe.text_encoder, scheduler, batch, generator, attention_store=store
            )
            losses.append(logs["loss_rec"])
            maps = store.aggregate()[0]
            for i, group in enumerate(batch.token_positions[0]):  # a handle's vectors
                heat = maps[..., group].sum(dim=-1)
                per_handle[i].append(attention_mask_iou(heat, batch.masks[0][i]))
    return AlignmentReport(statistics.mean(losses), [statistics.mean(v) for v in per_handle])
