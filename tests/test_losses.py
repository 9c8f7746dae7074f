"""Tests for diffusers_breakscene.losses: hand-computed values, resizing, gradients, dtypes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_breakscene.losses import (
    cross_attention_loss,
    diffusion_target,
    masked_diffusion_loss,
    prior_preservation_loss,
    resize_masks,
    union_mask,
)


def _t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# diffusion_target


def test_epsilon_target_is_noise() -> None:
    latents, noise = torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = diffusion_target(DDPMScheduler(), latents, noise, torch.tensor([3]))
    assert torch.equal(out, noise)


def test_sample_target_is_latents() -> None:
    latents, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = diffusion_target(
        DDIMScheduler(prediction_type="sample"), latents, noise, torch.tensor([3])
    )
    assert torch.equal(out, latents)


def test_v_prediction_target_matches_scheduler_velocity() -> None:
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 3, generator=gen)
    noise = torch.randn(2, 4, 3, 3, generator=gen)
    timesteps = torch.tensor([10, 500])
    out = diffusion_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(out, scheduler.get_velocity(latents, noise, timesteps))
    # and the velocity formula itself, per example, with plain Python scalars
    for b, t in enumerate(timesteps.tolist()):
        alpha_bar = float(scheduler.alphas_cumprod[t])
        expected = math.sqrt(alpha_bar) * noise[b] - math.sqrt(1.0 - alpha_bar) * latents[b]
        torch.testing.assert_close(out[b], expected)


def test_unknown_prediction_type_is_named() -> None:
    fake = SimpleNamespace(config=SimpleNamespace(prediction_type="flow_match"))
    with pytest.raises(ValueError, match="flow_match"):
        diffusion_target(fake, torch.zeros(1), torch.zeros(1), torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# resize_masks / union_mask


def test_resize_is_nearest_not_area() -> None:
    # 4x4 -> 2x2 with nearest picks source rows/cols 0 and 2 (the reference's F.interpolate).
    top_left = torch.zeros(4, 4)
    top_left[0, 0] = 1.0
    assert resize_masks(top_left, (2, 2)).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    off_grid = torch.zeros(4, 4)
    off_grid[1, 1] = 1.0  # area averaging would give 0.25 here; nearest drops it
    assert resize_masks(off_grid, (2, 2)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_resize_upsamples_by_repetition_and_keeps_leading_dims() -> None:
    m = _t([[1.0, 0.0], [0.0, 1.0]])
    up = resize_masks(m, (4, 4))
    assert up.tolist() == [
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0],
    ]
    batch = torch.zeros(2, 3, 8, 8)
    assert resize_masks(batch, (2, 4)).shape == (2, 3, 2, 4)


def test_resize_keeps_binary_masks_binary() -> None:
    gen = torch.Generator().manual_seed(1)
    m = (torch.rand(3, 64, 64, generator=gen) > 0.5).float()
    small = resize_masks(m, (16, 16))
    assert set(small.unique().tolist()) <= {0.0, 1.0}


def test_resize_bool_gives_float32_and_same_size_is_identity() -> None:
    m = torch.tensor([[True, False], [False, True]])
    out = resize_masks(m, (2, 2))
    assert out.dtype == torch.float32
    assert out.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    half = torch.ones(2, 2, dtype=torch.float16)
    assert resize_masks(half, (4, 4)).dtype == torch.float16


@pytest.mark.parametrize(
    ("masks", "size"),
    [(torch.zeros(4), (2, 2)), (torch.zeros(4, 4), (0, 2)), (torch.zeros(4, 4), (2,))],
)
def test_resize_errors(masks: torch.Tensor, size: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        resize_masks(masks, size)  # type: ignore[arg-type]


def test_union_mask_is_elementwise_max_of_selected() -> None:
    masks = _t([[[1, 0], [0, 0]], [[0, 1], [0, 0]], [[0, 0], [1, 1]]])
    assert union_mask(masks, [0, 1]).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert union_mask(masks, [2]).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert union_mask(masks, [2, 0, 1]).tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("masks", "indices"),
    [(torch.zeros(2, 2, 2), []), (torch.zeros(2, 2, 2), [2]), (torch.zeros(2, 2), [0])],
)
def test_union_mask_errors(masks: torch.Tensor, indices: list[int]) -> None:
    with pytest.raises(ValueError):
        union_mask(masks, indices)


# ---------------------------------------------------------------------------------------------
# masked_diffusion_loss


def _simple_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred = _t([[[[1, 2], [3, 4]]]])  # (1, 1, 2, 2)
    target = _t([[[[0, 1], [1, 1]]]])
    mask = _t([[[1, 0], [1, 1]]])  # (1, 2, 2)
    return pred, target, mask


def test_masked_loss_mean_by_hand() -> None:
    pred, target, mask = _simple_case()
    # masked differences: 1-0, (masked out), 3-1, 4-1 -> squares 1, 0, 4, 9; sum 14 over 4 elements
    loss = masked_diffusion_loss(pred, target, mask)
    assert loss.item() == pytest.approx(14 / 4)


def test_masked_loss_area_by_hand() -> None:
    pred, target, mask = _simple_case()
    # same squared sum 14, divided by C * area = 1 * 3
    loss = masked_diffusion_loss(pred, target, mask, normalization="area")
    assert loss.item() == pytest.approx(14 / 3)


def test_masked_loss_batch_and_channels_by_hand() -> None:
    pred = _t([[[[1, 2]], [[0, 4]]], [[[3, 1]], [[2, 2]]]])  # (2, 2, 1, 2)
    target = torch.zeros(2, 2, 1, 2)
    mask = _t([[[[1, 0]]], [[[1, 1]]]])  # (2, 1, 1, 2)
    # example 0: mask keeps column 0 -> 1^2 + 0^2 = 1;   example 1: all -> 9+1+4+4 = 18
    assert masked_diffusion_loss(pred, target, mask).item() == pytest.approx((1 + 18) / 8)
    # area: example 0 -> 1 / (2 * 1) = 0.5;  example 1 -> 18 / (2 * 2) = 4.5;  mean 2.5
    area = masked_diffusion_loss(pred, target, mask, normalization="area")
    assert area.item() == pytest.approx((0.5 + 4.5) / 2)


def test_masked_loss_resizes_mask_of_any_size() -> None:
    pred, target, _ = _simple_case()
    big = torch.zeros(1, 1, 8, 8)
    big[..., :4, :4] = 1.0  # top-left quadrant -> [[1, 0], [0, 0]] at 2x2
    # only the top-left element survives: (1 - 0)^2 = 1, over 4 elements
    assert masked_diffusion_loss(pred, target, big).item() == pytest.approx(1 / 4)
    assert masked_diffusion_loss(pred, target, big, "area").item() == pytest.approx(1.0)


def test_masked_loss_empty_mask_area_is_zero_not_nan() -> None:
    pred, target, _ = _simple_case()
    loss = masked_diffusion_loss(pred, target, torch.zeros(1, 2, 2), normalization="area")
    assert loss.item() == 0.0


def test_masked_loss_gradient_by_hand_and_inputs_untouched() -> None:
    pred, target, mask = _simple_case()
    pred.requires_grad_(True)
    before = (pred.detach().clone(), target.clone(), mask.clone())
    masked_diffusion_loss(pred, target, mask).backward()
    # d/dpred mean(m^2 (pred - target)^2) = 2 m (pred - target) / 4
    assert pred.grad is not None
    assert pred.grad.tolist() == [[[[0.5, 0.0], [1.0, 1.5]]]]
    assert torch.equal(pred.detach(), before[0])
    assert torch.equal(target, before[1])
    assert torch.equal(mask, before[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_loss_low_precision_gives_float32(dtype: torch.dtype) -> None:
    pred, target, mask = _simple_case()
    pred = pred.to(dtype).requires_grad_(True)
    loss = masked_diffusion_loss(pred, target.to(dtype), mask.to(dtype), "area")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(14 / 3)
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == dtype


@pytest.mark.parametrize(
    ("pred", "target", "mask", "normalization"),
    [
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 2), "sum"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3), torch.ones(1, 2, 2), "mean"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 2, 2), "mean"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.ones(3, 2, 2), "mean"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 2, 2), "mean"),
    ],
)
def test_masked_loss_errors(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalization: str
) -> None:
    with pytest.raises(ValueError):
        masked_diffusion_loss(pred, target, mask, normalization)


# ---------------------------------------------------------------------------------------------
# cross_attention_loss


def _attention_case() -> tuple[torch.Tensor, list[torch.Tensor], list[list[int]]]:
    maps = torch.zeros(2, 2, 2, 4)  # B=2, 2x2 grid, S=4
    maps[0, :, :, 1] = _t([[0.2, 0.1], [0.0, 0.4]])
    maps[0, :, :, 3] = _t([[0.3, 0.3], [0.3, 0.3]])
    maps[0, :, :, 0] = _t([[0.9, 0.9], [0.9, 0.9]])  # not a handle position: must not matter
    maps[1, :, :, 0] = _t([[0.5, 0.5], [0.5, 0.5]])  # position 2 of example 1 stays all zero
    masks0 = _t([[[1, 0], [0, 1]], [[0, 0], [1, 1]]])  # k_0 = 2, already 2x2
    masks1 = torch.zeros(1, 4, 4)  # k_1 = 1, at 4x4: top half -> [[1, 1], [0, 0]]
    masks1[0, :2, :] = 1.0
    return maps, [masks0, masks1], [[1, 3], [2]]


# example 0, token at 1: A = [[0.5, 0.25], [0, 1]] vs [[1, 0], [0, 1]]
#   -> (0.25 + 0.0625 + 0 + 0) / 4 = 0.078125
# example 0, token at 3: A = all ones vs [[0, 0], [1, 1]] -> (1 + 1) / 4 = 0.5
# example 1, token at 2: all-zero map stays zero (eps guard) vs [[1, 1], [0, 0]] -> 2 / 4 = 0.5
_EXPECTED_ATTENTION = ((0.078125 + 0.5) + 0.5) / 2


def test_attention_loss_by_hand_with_different_k() -> None:
    maps, masks, positions = _attention_case()
    loss = cross_attention_loss(maps, masks, positions)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_EXPECTED_ATTENTION)


def test_attention_loss_accepts_channel_dim_and_tensor_positions() -> None:
    maps, masks, positions = _attention_case()
    masks = [m.unsqueeze(1) for m in masks]  # (k, 1, H, W), the reference's layout
    tensor_positions = [torch.tensor(p) for p in positions]
    loss = cross_attention_loss(maps, masks, tensor_positions)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(_EXPECTED_ATTENTION)


def test_attention_loss_empty_example_contributes_zero() -> None:
    maps, masks, positions = _attention_case()
    masks[1] = torch.zeros(0, 2, 2)
    positions[1] = []
    loss = cross_attention_loss(maps, masks, positions)
    assert loss.item() == pytest.approx((0.078125 + 0.5) / 2)


def test_attention_loss_gradients_reach_maps_only_at_handle_positions() -> None:
    maps, masks, positions = _attention_case()
    maps.requires_grad_(True)
    before = maps.detach().clone()
    cross_attention_loss(maps, masks, positions).backward()
    assert maps.grad is not None
    assert maps.grad[0, :, :, 1].abs().sum() > 0
    assert maps.grad[0, :, :, 3].abs().sum() > 0
    assert torch.count_nonzero(maps.grad[:, :, :, 0]) == 0
    assert torch.equal(maps.detach(), before)


def test_attention_loss_low_precision_gives_float32() -> None:
    maps, masks, positions = _attention_case()
    half = maps.to(torch.float16).requires_grad_(True)
    loss = cross_attention_loss(half, [m.half() for m in masks], positions)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_EXPECTED_ATTENTION, abs=1e-3)
    loss.backward()
    assert half.grad is not None and half.grad.dtype == torch.float16


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"masks": "drop"}, "masks has 1 entries"),
        ({"positions": "drop"}, "token_positions has 1 entries"),
        ({"positions0": [1]}, "2 masks but 1 token positions"),
        ({"positions0": [1, 4]}, r"\[4\] out of range for sequence length 4"),
        ({"positions0": [-1, 3]}, "out of range"),
        ({"maps3d": True}, r"\(B, h, w, S\)"),
        ({"mask2d": True}, r"masks\[1\] must have shape"),
    ],
)
def test_attention_loss_errors(change: dict, match: str) -> None:
    maps, masks, positions = _attention_case()
    if change.get("masks") == "drop":
        masks = masks[:1]
    if change.get("positions") == "drop":
        positions = positions[:1]
    if "positions0" in change:
        positions[0] = change["positions0"]
    if change.get("maps3d"):
        maps = maps[0]
    if change.get("mask2d"):
        masks[1] = masks[1][0]
    with pytest.raises(ValueError, match=match):
        cross_attention_loss(maps, masks, positions)


# ---------------------------------------------------------------------------------------------
# prior_preservation_loss


def test_prior_loss_by_hand_fp16_in_float32_out() -> None:
    pred = _t([[[[1, 2], [3, 4]]]], torch.float16).requires_grad_(True)
    target = torch.zeros(1, 1, 2, 2, dtype=torch.float16)
    loss = prior_preservation_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    loss.backward()
    assert pred.grad is not None
    assert pred.grad.float().tolist() == [[[[0.5, 1.0], [1.5, 2.0]]]]


def test_prior_loss_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        prior_preservation_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
