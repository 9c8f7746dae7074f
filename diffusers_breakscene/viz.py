"""Attention maps as pictures: heat overlays, mask-vs-attention grids, atomic PNG writes.

Example:
    >>> import torch
    >>> from PIL import Image
    >>> from diffusers_breakscene.viz import attention_overlay
    >>> image = Image.new("RGB", (64, 64), "gray")
    >>> attention_overlay(image, torch.rand(8, 8)).size
    (64, 64)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write
from .handles import expand_handles
from .mask_ops import erode

__all__ = [
    "attention_overlay",
    "handle_positions",
    "mask_vs_attention_grid",
    "save_png",
    "token_attention_maps",
]

#: Colours cycled over handles in grids (RGB).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40),
    (40, 120, 255),
    (40, 200, 80),
    (255, 180, 0),
    (200, 60, 255),
    (0, 210, 210),
)

_LABEL_HEIGHT = 14


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(value, dtype=np.float32)


def _normalise(attention_map: Any) -> np.ndarray:
    arr = _to_numpy(attention_map).astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(
            f"attention_map must be 2-D (h, w), got shape {tuple(arr.shape)}; pick one map, "
            "e.g. maps[k] from token_attention_maps(...)."
        )
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(arr.min()), float(arr.max())
    if high - low <= 1e-12:
        return np.zeros_like(arr)
    return (arr - low) / (high - low)


def _upsample(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0, 1] map to ``size`` = (width, height)."""
    tensor = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    out = torch.nn.functional.interpolate(
        tensor, size=(size[1], size[0]), mode="bilinear", align_corners=False
    )
    return out[0, 0].clamp(0, 1).numpy()


def attention_overlay(
    image: Image.Image,
    attention_map: torch.Tensor | np.ndarray,
    color: tuple[int, int, int] = (255, 40, 40),
    alpha: float = 0.5,
) -> Image.Image:
    """Show ``attention_map`` (h, w) as a heat overlay in ``color`` on ``image``.

    The map is normalised to [0, 1], upsampled (bilinear) to the image size and blended in with
    weight ``alpha * map``: where the map is high the pixel turns ``color``, where it is 0 the
    image is unchanged.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> heat = torch.zeros(4, 4); heat[0, 0] = 1.0
        >>> out = attention_overlay(Image.new("RGB", (32, 32), "black"), heat, alpha=1.0)
        >>> out.getpixel((0, 0))[0] > out.getpixel((31, 31))[0]
        True
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1].")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = _upsample(_normalise(attention_map), image.size)[..., None] * alpha
    tint = np.asarray(color, dtype=np.float32)[None, None, :]
    blended = base * (1.0 - heat) + tint * heat
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")


def token_attention_maps(
    maps: torch.Tensor,
    positions: Sequence[int | Sequence[int]],
) -> torch.Tensor:
    """Pick the maps of some prompt positions from one ``(h, w, seq_len)`` aggregate.

    ``maps`` is ``AttentionStore.aggregate(...)[i]``; ``positions`` holds, per handle, a token
    position in the prompt (or several, e.g. for a handle of k > 1 vectors, which are averaged).
    Returns a ``(K, h, w)`` float tensor.

    Example:
        >>> import torch
        >>> maps = torch.rand(8, 8, 77)
        >>> token_attention_maps(maps, [4, [6, 7]]).shape
        torch.Size([2, 8, 8])
    """
    if maps.ndim != 3:
        raise ValueError(
            f"maps must be (h, w, seq_len), got shape {tuple(maps.shape)}; pass "
            "store.aggregate(...)[i] for one image of the batch."
        )
    out = []
    for item in positions:
        group = [int(item)] if isinstance(item, int | np.integer) else [int(i) for i in item]
        if not group or any(not 0 <= i < maps.shape[-1] for i in group):
            raise ValueError(
                f"token position(s) {group} are outside the prompt's {maps.shape[-1]} positions."
            )
        out.append(maps[..., group].float().mean(dim=-1))
    if not out:
        raise ValueError("positions is empty; give one token position per handle.")
    return torch.stack(out)


def handle_positions(tokenizer: Any, prompt: str, tokens: Sequence[str]) -> list[list[int]]:
    """Positions of each handle token's ids in ``tokenizer(prompt)`` (padded to its max length);
    a handle of several vectors (``<a>``, ``<a>_1``) has all of them, as the pipeline expands it.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> handle_positions(tiny_tokenizer(), "a photo of dog", ["dog"])
        [[4]]
    """
    # A handle of k vectors is k tokens in what the pipeline encoded (it expands the prompt).
    ids = tokenizer(
        expand_handles(prompt, tokenizer, tokens), padding="max_length", truncation=True
    ).input_ids
    out = []
    for token in tokens:
        token_ids = tokenizer(
            expand_handles(token, tokenizer, [token]), add_special_tokens=False
        ).input_ids
        found = [i for i, value in enumerate(ids) if value in token_ids]
        if not found:
            raise ValueError(f"token {token!r} does not occur in the prompt {prompt!r}.")
        out.append(found)
    return out


def _label(tile: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (tile.width, tile.height + _LABEL_HEIGHT), (255, 255, 255))
    out.paste(tile, (0, _LABEL_HEIGHT))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0), font=ImageFont.load_default())
    return out


def _mask_tile(image: Image.Image, mask: Any, color: tuple[int, int, int]) -> Image.Image:
    """The image, dimmed outside the mask and outlined in ``color`` along its border."""
    arr = _to_numpy(mask)
    if arr.ndim != 2:
        raise ValueError(f"each mask must be 2-D (H, W), got shape {tuple(arr.shape)}.")
    inside = arr > 0.5 * float(arr.max() or 1.0)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base * np.where(inside, 1.0, 0.25)[..., None]
    edge = inside & ~erode(inside)
    out[edge] = color
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")


def mask_vs_attention_grid(
    image: Image.Image,
    masks: Sequence[Any] | torch.Tensor | np.ndarray,
    maps: Sequence[Any] | torch.Tensor | np.ndarray,
    labels: Sequence[str],
    tile_size: int = 192,
    mask_image: Image.Image | None = None,
    mask_label: str = "mask",
) -> Image.Image:
    """One row per handle: its mask on ``image`` | its attention map as a heat overlay.

    The mask tile dims the image outside the mask and outlines it; the attention tile shows the
    map in the handle's colour on a gray copy of ``image``.

    ``masks`` is (K, H, W) (tensor, array or list of PIL/arrays), ``maps`` is (K, h, w), and
    ``labels`` names the K rows (e.g. the handle tokens). Each tile is ``tile_size`` wide. The
    masks are drawn on ``mask_image`` when given (e.g. the training image, while ``image`` is a
    generated one), else on ``image``; ``mask_label`` names the left column.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> grid = mask_vs_attention_grid(Image.new("RGB", (64, 64)), torch.ones(2, 64, 64),
        ...                               torch.rand(2, 8, 8), ["<asset0>", "<asset1>"], 96)
        >>> grid.size
        (192, 220)
    """
    if not (len(masks) == len(maps) == len(labels)) or len(labels) == 0:
        raise ValueError(
            f"masks, maps and labels must have the same non-zero length, got {len(masks)}, "
            f"{len(maps)} and {len(labels)}."
        )
    height = max(1, round(tile_size * image.height / image.width))
    base = image.convert("RGB").resize((tile_size, height), Image.BILINEAR)
    mask_base = (mask_image or image).convert("RGB").resize((tile_size, height), Image.BILINEAR)
    rows = []
    for k, label in enumerate(labels):
        color = PALETTE[k % len(PALETTE)]
        mask = _to_numpy(masks[k])
        mask_img = Image.fromarray((mask > 0.5 * float(mask.max() or 1.0)).astype(np.uint8) * 255)
        mask_small = np.asarray(mask_img.resize((tile_size, height), Image.NEAREST))
        left = _label(_mask_tile(mask_base, mask_small, color), f"{label} {mask_label}")
        gray = base.convert("L").convert("RGB")  # the heat stands out on a gray image
        right = _label(
            attention_overlay(gray, maps[k], color=color, alpha=0.7), f"{label} attention"
        )
        rows.append((left, right))
    row_height = rows[0][0].height
    grid = Image.new("RGB", (2 * tile_size, row_height * len(rows)), (255, 255, 255))
    for k, (left, right) in enumerate(rows):
        grid.paste(left, (0, k * row_height))
        grid.paste(right, (tile_size, k * row_height))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as PNG atomically (temporary file in the same folder, then rename).

    Creates missing parent folders; returns the path.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> save_png(Image.new("RGB", (4, 4)), tempfile.mkdtemp() + "/a.png").name
        'a.png'
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            image.save(handle, format="PNG")

    atomic_write(path, write, "picture")
    return path
