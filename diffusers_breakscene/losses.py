"""Losses of Break-A-Scene as pure tensor functions.

Every function here takes tensors and returns a scalar (or a target tensor); nothing touches a
model, an optimizer or global state, and no input is written in place. Losses are computed in
float32 even when the inputs are fp16/bf16, and gradients flow to ``model_pred`` and
``attention_maps``.

Mask resizing rule: masks are resized with **nearest-neighbour** interpolation
(``torch.nn.functional.interpolate(mode="nearest")``), exactly what the reference code does for
both its latent-size (64x64) masks and its attention-size (16x16) masks. Binary masks therefore
stay binary; nothing is averaged or thresholded.

Example:
    >>> import torch
    >>> from diffusers_breakscene.losses import masked_diffusion_loss
    >>> pred, target = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    >>> mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    >>> masked_diffusion_loss(pred, target, mask).item()
    0.25
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "cross_attention_loss",
    "diffusion_target",
    "masked_diffusion_loss",
    "position_group",
    "prior_preservation_loss",
    "resize_masks",
    "union_mask",
]

#: Smallest value a per-token attention maximum is divided by (an all-zero map stays zero).
_MAX_EPS = 1e-8
#: Smallest mask area the "area" normalisation divides by (an empty mask gives a zero loss).
_AREA_EPS = 1e-8

_NORMALIZATIONS = ("mean", "area")


def diffusion_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The tensor the UNet is trained to predict, by the scheduler's ``prediction_type``.

    ``"epsilon"`` -> ``noise``; ``"v_prediction"`` -> ``scheduler.get_velocity(latents, noise,
    timesteps)``; ``"sample"`` -> ``latents``. Any other type raises ``ValueError``.

    Example:
        >>> import torch
        >>> from diffusers import DDPMScheduler
        >>> latents, noise = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
        >>> target = diffusion_target(DDPMScheduler(), latents, noise, torch.tensor([10]))
        >>> torch.equal(target, noise)
        True
    """
    config = getattr(scheduler, "config", None)
    prediction_type = getattr(config, "prediction_type", None)
    if prediction_type is None and isinstance(config, dict):
        prediction_type = config.get("prediction_type")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"unknown scheduler prediction_type {prediction_type!r}: expected 'epsilon', "
        "'v_prediction' or 'sample'; use a scheduler configured with one of these"
    )


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks ``(..., H, W)`` to ``(..., h, w)`` with nearest-neighbour interpolation.

    This is the reference code's rule (``F.interpolate`` in its default ``"nearest"`` mode) for
    both the latent-size and the attention-size masks: binary masks stay binary. Floating
    masks keep their dtype; bool/integer masks come back as float32. Works for up- and
    down-sampling; a mask already at ``size`` is returned as is.

    Example:
        >>> import torch
        >>> m = torch.zeros(4, 4)
        >>> m[:2, :2] = 1.0
        >>> resize_masks(m, (2, 2)).tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """
    if masks.dim() < 2:
        raise ValueError(
            f"masks must have at least 2 dimensions (..., H, W), got shape {tuple(masks.shape)}"
        )
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be two positive ints (h, w), got {size!r}")
    target = (int(size[0]), int(size[1]))
    if not masks.is_floating_point():
        masks = masks.to(torch.float32)
    if tuple(masks.shape[-2:]) == target:
        return masks
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    resized = F.interpolate(flat, size=target, mode="nearest")
    return resized.reshape(*lead, *target)


def union_mask(masks: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Elementwise maximum of the masks ``masks[indices]``: ``(K, H, W)`` -> ``(H, W)``.

    Example:
        >>> import torch
        >>> masks = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
        >>> union_mask(masks, [0, 1]).tolist()
        [[1.0, 1.0]]
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (K, H, W), got {tuple(masks.shape)}")
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty: select at least one mask")
    k = masks.shape[0]
    bad = [i for i in idx if not 0 <= i < k]
    if bad:
        raise ValueError(f"indices {bad} out of range for {k} masks (valid: 0..{k - 1})")
    return masks[idx].amax(dim=0)


def _as_4d_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Bring a mask to ``(B, 1, H, W)``; accepts ``(B, H, W)`` or ``(B, 1, H, W)``."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}")
    if mask.shape[0] not in (batch, 1):
        raise ValueError(
            f"mask batch size {mask.shape[0]} does not match model_pred batch size {batch}"
        )
    return mask


def masked_diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    normalization: str = "mean",
) -> torch.Tensor:
    """Diffusion loss restricted to the masked region (the reference's masked loss).

    ``model_pred`` and ``target`` are ``(B, C, h, w)``; ``mask`` is ``(B, 1, H, W)`` or
    ``(B, H, W)`` at any size and is resized to ``(h, w)`` with :func:`resize_masks`.

    - ``"mean"``: ``mean((pred*m - target*m)**2)`` over all ``B*C*h*w`` elements (the
      reference normalisation: not divided by the mask area).
    - ``"area"``: per example ``sum((pred*m - target*m)**2) / (C * sum(m))``, then the mean over
      the batch; an empty mask contributes 0.

    Example:
        >>> import torch
        >>> pred, target = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
        >>> mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> masked_diffusion_loss(pred, target, mask, normalization="area").item()
        1.0
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if model_pred.dim() != 4:
        raise ValueError(f"model_pred must have shape (B, C, h, w), got {tuple(model_pred.shape)}")
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_pred shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}"
        )
    batch, channels, h, w = model_pred.shape
    m = resize_masks(_as_4d_mask(mask, batch), (h, w)).to(
        device=model_pred.device, dtype=torch.float32
    )
    pred32 = model_pred.float()
    target32 = target.float()
    sq = (pred32 * m - target32 * m) ** 2
    if normalization == "mean":
        return sq.mean()
    area = m.expand(batch, 1, h, w).sum(dim=(1, 2, 3)) * channels
    per_example = sq.sum(dim=(1, 2, 3)) / area.clamp_min(_AREA_EPS)
    return per_example.mean()


def _example_masks(mask: torch.Tensor, b: int) -> torch.Tensor:
    """Bring ``masks[b]`` to ``(k, H, W)``; accepts ``(k, H, W)`` or ``(k, 1, H, W)``."""
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(
            f"masks[{b}] must have shape (k, H, W) or (k, 1, H, W), got {tuple(mask.shape)}"
        )
    return mask


def cross_attention_loss(
    attention_maps: torch.Tensor,
    masks: Sequence[torch.Tensor],
    token_positions: Sequence[Sequence[int | Sequence[int]]],
) -> torch.Tensor:
    """Cross-attention loss: each handle token must attend to its concept's mask.

    ``attention_maps`` is ``(B, h, w, S)``: head- and layer-averaged cross-attention
    probabilities over the ``S`` text positions. For example ``b``, ``masks[b]`` is
    ``(k_b, H, W)`` (any size, resized to ``(h, w)`` with :func:`resize_masks`) and
    ``token_positions[b]`` lists the ``k_b`` text positions of the sampled handles in the same
    order. Per token ``A_i = maps[b, :, :, pos_i] / max(maps[b, :, :, pos_i])`` and
    ``loss_b = sum_i mean((m_i - A_i)**2)``; the result is the mean of ``loss_b`` over the batch.
    Examples may have different ``k_b`` (``k_b = 0`` contributes 0). A handle of several
    vectors gives a group of positions instead of one (``[[3, 4]]``): its map is the sum of
    theirs (the same, once divided by its max, as their mean).

    Example:
        >>> import torch
        >>> maps = torch.zeros(1, 2, 2, 3)  # B=1, 2x2 grid, S=3
        >>> maps[0, :, :, 1] = torch.tensor([[0.5, 0.2], [0.0, 0.4]])  # the handle is at position 1
        >>> mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # k=1 mask
        >>> round(cross_attention_loss(maps, [mask], [[1]]).item(), 4)
        0.05
    """
    if attention_maps.dim() != 4:
        raise ValueError(
            f"attention_maps must have shape (B, h, w, S), got {tuple(attention_maps.shape)}"
        )
    batch, h, w, seq_len = attention_maps.shape
    if batch == 0:
        raise ValueError("attention_maps has batch size 0")
    if len(masks) != batch:
        raise ValueError(f"masks has {len(masks)} entries but attention_maps has batch {batch}")
    if len(token_positions) != batch:
        raise ValueError(
            f"token_positions has {len(token_positions)} entries but attention_maps has "
            f"batch {batch}"
        )
    maps32 = attention_maps.float()
    total = maps32.new_zeros(())
    for b in range(batch):
        example_masks = _example_masks(masks[b], b)
        groups = [position_group(p) for p in token_positions[b]]
        if len(groups) != example_masks.shape[0]:
            raise ValueError(
                f"example {b}: {example_masks.shape[0]} masks but {len(groups)} token "
                "positions; give one position (or group) per mask, in prompt order"
            )
        bad = [p for group in groups for p in group if not 0 <= p < seq_len]
        if bad:
            raise ValueError(
                f"example {b}: token positions {bad} out of range for sequence length {seq_len}"
            )
        if not groups:
            continue
        m = resize_masks(example_masks, (h, w)).to(device=maps32.device, dtype=torch.float32)
        attn = torch.stack([maps32[b][..., group].sum(dim=-1) for group in groups])  # (k, h, w)
        peak = attn.amax(dim=(1, 2), keepdim=True).clamp_min(_MAX_EPS)
        normalized = attn / peak
        total = total + ((m - normalized) ** 2).mean(dim=(1, 2)).sum()
    return total / batch


def position_group(position: int | Sequence[int]) -> list[int]:
    """One handle's text positions (or token ids) as a list: an int, or those of its vectors.

    Example:
        >>> position_group(3), position_group([3, 4])
        ([3], [3, 4])
    """
    if not isinstance(position, Sequence | torch.Tensor) or (
        isinstance(position, torch.Tensor) and position.dim() == 0
    ):
        return [int(position)]
    group = [int(p) for p in position]
    if not group:
        raise ValueError("a handle's group of token positions is empty; give at least one")
    return group


def prior_preservation_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain (unmasked) mean squared error in float32, for the class-image half of a batch.

    Example:
        >>> import torch
        >>> prior_preservation_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item()
        1.0
    """
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_pred shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}"
        )
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
