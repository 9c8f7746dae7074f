"""Checking and decoding what a user hands to :class:`~diffusers_breakscene.Scene`: tokens,
initializer words and settings (``check_*``), and images and masks as files, PIL images, arrays
or tensors, decoded into an RGB ``PIL.Image`` and boolean ``(H, W)`` masks.

Every failure raises :class:`~diffusers_breakscene.errors.InvalidSceneError` (or
:class:`~diffusers_breakscene.errors.MissingFileError`) naming the input (``"image"``,
``"masks[1]"``) and how to fix it. Files are rotated by their EXIF orientation, as viewers show
them.

Example:
    >>> import numpy as np
    >>> load_mask(np.eye(3), "masks[0]", 0.5).tolist()[0]
    [True, False, False]
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InvalidSceneError, MissingFileError

__all__ = [
    "DEFAULT_MASK_THRESHOLD",
    "ImageInput",
    "MaskInput",
    "SceneView",
    "check_concepts",
    "check_images",
    "check_initializers",
    "check_mask_sequence",
    "check_per_image",
    "check_resolution",
    "check_threshold",
    "check_token_text",
    "check_tokens",
    "decode_view",
    "exif_hint",
    "load_image",
    "load_mask",
]

ImageInput: TypeAlias = Image.Image | str | os.PathLike[str] | np.ndarray | torch.Tensor
"""What :class:`~diffusers_breakscene.Scene` accepts as the image."""

MaskInput: TypeAlias = Image.Image | str | os.PathLike[str] | np.ndarray | torch.Tensor
"""What :class:`~diffusers_breakscene.Scene` accepts as one mask."""


@dataclass(frozen=True)
class SceneView:
    """One image of a :class:`Scene`: the RGB ``image``, its bool ``masks`` and the concept
    index each mask shows (``concepts``, same order; the background, if any, last)."""

    image: Image.Image
    masks: tuple[np.ndarray, ...]
    concepts: tuple[int, ...]


DEFAULT_MASK_THRESHOLD = 0.5
"""A mask pixel is inside when its value is above this fraction of the largest possible value."""

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights of PIL's convert("L")
_FLOAT_TOLERANCE = 1e-3  # float inputs may overshoot [0, 1] by rounding error, not more


# --- loading ----------------------------------------------------------------------------------


def check_threshold(value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) < 1.0
    ):
        raise InvalidSceneError(
            f"mask_threshold must be a number strictly between 0 and 1, got {value!r}; the "
            f"default {DEFAULT_MASK_THRESHOLD} suits black-and-white and anti-aliased masks."
        )
    return float(value)


def check_resolution(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise InvalidSceneError(
            f"resolution must be a positive integer multiple of 8, got {value!r}; e.g. 512."
        )
    if value % 8:
        raise InvalidSceneError(
            f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {value}; "
            f"use {max(8, round(value / 8) * 8)}."
        )
    return int(value)


def check_mask_sequence(masks: Sequence[MaskInput], what: str = "masks") -> list[MaskInput]:
    single = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, Image.Image)
    if isinstance(masks, single) or not isinstance(masks, Sequence):
        raise InvalidSceneError(
            f"{what} must be a list with one mask per concept, got {type(masks).__name__}; wrap "
            f"a single mask in a list ({what}=[mask]), or split a stack with list(stack)."
        )
    if len(masks) == 0:
        raise InvalidSceneError(
            f"{what} is empty; pass one binary mask per concept (at least one), e.g. {what}=[mask]."
        )
    return list(masks)


def check_token_text(token: object, what: str) -> str:
    if not isinstance(token, str) or not token:
        raise InvalidSceneError(
            f"{what} must be a non-empty string, got {token!r}; e.g. '<asset0>'."
        )
    if any(ch.isspace() for ch in token):
        suggestion = re.sub(r"\s+", "_", token.strip()) or "<asset0>"
        raise InvalidSceneError(
            f"{what} {token!r} contains whitespace; a handle must be one word, e.g. {suggestion!r}."
        )
    return token


def check_tokens(tokens: Sequence[str] | None, n: int) -> list[str]:
    if tokens is None:
        return [f"<asset{i}>" for i in range(n)]
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise InvalidSceneError(
            f"tokens must be a list of strings, one per mask, got {type(tokens).__name__}; e.g. "
            f"tokens=[{tokens!r}]."
        )
    if len(tokens) != n:
        raise InvalidSceneError(
            f"got {n} masks but {len(tokens)} tokens; pass one token per mask (the background "
            f"token goes in background_token), or leave tokens out for <asset0>, <asset1>, ..."
        )
    out = [check_token_text(t, f"tokens[{i}]") for i, t in enumerate(tokens)]
    seen: dict[str, int] = {}
    for i, token in enumerate(out):
        if token in seen:
            raise InvalidSceneError(
                f"tokens[{i}] {token!r} repeats tokens[{seen[token]}]; every concept needs its "
                f"own token."
            )
        seen[token] = i
    return out


def check_initializers(
    initializers: Sequence[str | None] | None, n: int, background: str | None
) -> list[str | None]:
    total = n + (background is not None)
    if initializers is None:
        return [None] * total
    if isinstance(initializers, str) or not isinstance(initializers, Sequence):
        raise InvalidSceneError(
            f"initializer_tokens must be a list with one word (or None) per mask, got "
            f"{type(initializers).__name__}; e.g. initializer_tokens=[{initializers!r}]."
        )
    allowed = f"{n}" if background is None else f"{n} (or {n + 1} with the background's last)"
    if len(initializers) not in {n, total}:
        raise InvalidSceneError(
            f"got {n} masks but {len(initializers)} initializer_tokens; pass {allowed} entries, "
            f"None where there is no word."
        )
    out: list[str | None] = []
    for i, word in enumerate(initializers):
        if word is not None and (not isinstance(word, str) or not word.strip()):
            raise InvalidSceneError(
                f"initializer_tokens[{i}] must be a non-empty word or None, got {word!r}."
            )
        out.append(word)
    return out + [None] * (total - len(out))


# --- decoding ---------------------------------------------------------------------------------


def check_images(images: Sequence[ImageInput]) -> list[ImageInput]:
    single = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, Image.Image)
    if isinstance(images, single) or not isinstance(images, Sequence):
        raise InvalidSceneError(
            f"images must be a list of images, got {type(images).__name__}; for one image use "
            f"Scene(image, masks), or wrap it: Scene.from_images([image], [masks])."
        )
    if len(images) == 0:
        raise InvalidSceneError("images is empty; pass at least one image.")
    return list(images)


def check_per_image(value: Any, what: str, count: int, kind: str, example: str) -> list[Any]:
    """``value`` as a list with one entry (a ``kind``) per image of ``count``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidSceneError(
            f"{what} must be a list with one {kind} per image, got {type(value).__name__}; "
            f"e.g. {what}={example}."
        )
    if len(value) != count:
        raise InvalidSceneError(
            f"{what} has {len(value)} entries for {count} images; pass one {kind} per image "
            f"({what}[i] belongs to images[i])."
        )
    return list(value)


def check_concepts(
    concepts: Sequence[Sequence[int]] | None, mask_lists: list[list[MaskInput]]
) -> list[list[int]]:
    """One list of handle indices per image, one index per mask, covering ``0..N-1``."""
    if concepts is None:
        return [list(range(len(m))) for m in mask_lists]
    check_per_image(
        concepts, "concepts", len(mask_lists), "list of handle indices", "[[0, 1], [1]]"
    )
    out: list[list[int]] = []
    for i, (indices, masks) in enumerate(zip(concepts, mask_lists, strict=True)):
        if isinstance(indices, str | bytes) or not isinstance(indices, Sequence):
            raise InvalidSceneError(
                f"concepts[{i}] must be a list of handle indices, one per mask of images[{i}], "
                f"got {type(indices).__name__}."
            )
        if len(indices) != len(masks):
            raise InvalidSceneError(
                f"concepts[{i}] has {len(indices)} entries but masks[{i}] has {len(masks)} "
                f"masks; give the handle index of every mask of images[{i}]."
            )
        row: list[int] = []
        for j, value in enumerate(indices):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSceneError(
                    f"concepts[{i}][{j}] must be a handle index (an integer >= 0), got {value!r}."
                )
            if value in row:
                raise InvalidSceneError(
                    f"concepts[{i}] names handle {value} twice; an image shows each handle at "
                    f"most once (merge its masks into one)."
                )
            row.append(value)
        out.append(row)
    n = 1 + max(c for row in out for c in row)
    missing = sorted(set(range(n)) - {c for row in out for c in row})
    if missing:
        raise InvalidSceneError(
            f"handle {missing[0]} is in no image (concepts use indices up to {n - 1}); number "
            f"the handles 0, 1, ... without gaps, each shown by at least one image."
        )
    return out


def _open_file(path: str | os.PathLike[str], what: str) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what}: file not found: {p}")
    if p.is_dir():
        raise InvalidSceneError(
            f"{what}: {p} is a folder, not an image file; pass a file (Scene.from_dir reads a "
            f"folder with img.* and mask*.png)."
        )
    try:
        with Image.open(p) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Exception as exc:
        raise InvalidSceneError(
            f"{what}: cannot read {p} as an image ({type(exc).__name__}: {exc}); save it as "
            f"PNG or JPEG."
        ) from exc


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    if isinstance(image, str | os.PathLike):
        image = _open_file(image, what)
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16"):
            arr = np.asarray(image).astype(np.float64) / 65535.0
            return Image.fromarray(np.round(arr * 255.0).astype(np.uint8)).convert("RGB")
        if image.mode in {"I", "F"}:
            raise InvalidSceneError(
                f"{what}: PIL mode {image.mode!r} (32-bit) is not a photo format; convert to "
                f"8-bit RGB first, e.g. Image.fromarray(uint8_array)."
            )
        if image.width == 0 or image.height == 0:
            raise InvalidSceneError(f"{what} has no pixels ({image.width}x{image.height}).")
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] == 3:
            t = t.permute(1, 2, 0)
        elif t.dim() != 3 or t.shape[-1] != 3:
            raise InvalidSceneError(
                f"{what}: a tensor image must be (3, H, W) or (H, W, 3), got shape "
                f"{tuple(t.shape)}" + _image_shape_hint(tuple(t.shape))
            )
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        image = t.numpy()
    if isinstance(image, np.ndarray):
        return Image.fromarray(_image_array_to_uint8(image, what))
    raise InvalidSceneError(
        f"{what} must be a PIL image, a path, an HxWx3 numpy array or a torch tensor, got "
        f"{type(image).__name__}."
    )


def _image_shape_hint(shape: tuple[int, ...]) -> str:
    if len(shape) == 4:
        return "; remove the batch dimension, e.g. image[0]."
    if len(shape) == 2:
        return "; a grayscale image needs 3 channels, e.g. np.stack([gray] * 3, axis=-1)."
    if len(shape) == 3 and 4 in (shape[0], shape[-1]):
        return "; drop the alpha channel, e.g. rgba[..., :3]."
    return "; pass an RGB image with 3 channels."


def _image_array_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InvalidSceneError(
            f"{what}: an array image must be HxWx3 (RGB), got shape {arr.shape}"
            + _image_shape_hint(arr.shape)
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidSceneError(f"{what} has no pixels (shape {arr.shape}).")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InvalidSceneError(
                f"{what}: integer pixel values must be in [0, 255], got [{lo}, {hi}]; pass uint8, "
                f"or float in [0, 1]."
            )
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidSceneError(
                f"{what} contains NaN or infinite values; pass finite pixels in [0, 1] (e.g. "
                "np.nan_to_num(x) before clipping)."
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
            raise InvalidSceneError(
                f"{what}: float pixel values must be in [0, 1], got [{lo:.3g}, {hi:.3g}]; for "
                f"[-1, 1] pass (x + 1) / 2, for [0, 255] pass x / 255 or x.astype(np.uint8)."
            )
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise InvalidSceneError(
        f"{what}: unsupported dtype {arr.dtype}; pass uint8 in [0, 255] or float in [0, 1]."
    )


def load_mask(mask: MaskInput, what: str, threshold: float) -> np.ndarray:
    if isinstance(mask, str | os.PathLike):
        mask = _open_file(mask, what)
    elif isinstance(mask, Image.Image):
        mask = ImageOps.exif_transpose(mask)
    if isinstance(mask, Image.Image):
        arr = _pil_mask_array(mask, what)
    elif isinstance(mask, torch.Tensor):
        t = mask.detach().cpu()
        if t.dim() == 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2:
            raise InvalidSceneError(
                f"{what}: a tensor mask must be HxW or 1xHxW, got shape {tuple(t.shape)}; pass "
                f"one mask per list entry (list(stack) splits a KxHxW stack)."
            )
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        arr = t.numpy()
    elif isinstance(mask, np.ndarray):
        arr = mask
    else:
        raise InvalidSceneError(
            f"{what} must be a PIL image, a path, a numpy array or a torch tensor, got "
            f"{type(mask).__name__}."
        )
    return _binarise(arr, what, threshold)


def _pil_mask_array(mask: Image.Image, what: str) -> np.ndarray:
    if mask.mode in {"1", "L", "RGB", "RGBA", "I", "F"} or mask.mode.startswith("I;16"):
        return np.asarray(mask)
    try:
        return np.asarray(mask.convert("RGBA"))  # P, PA, LA, CMYK, ...: alpha rule still applies
    except Exception as exc:
        raise InvalidSceneError(
            f"{what}: cannot use PIL mode {mask.mode!r} as a mask ({exc}); convert it with "
            f"mask.convert('L')."
        ) from exc


def _binarise(arr: np.ndarray, what: str, threshold: float) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 2:
        raise InvalidSceneError(
            f"{what}: an array mask with 2 channels is ambiguous (shape {arr.shape}); pass the "
            f"channel that marks the object, e.g. arr[..., 1] for gray + alpha."
        )
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InvalidSceneError(
            f"{what}: an array mask must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}; "
            f"pass one mask per list entry (list(stack) splits a KxHxW stack)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidSceneError(f"{what} has no pixels (shape {arr.shape}).")
    scale = _mask_scale(arr, what)
    if arr.ndim == 3:
        colour = arr[..., :3]
        alpha = arr[..., 3] if arr.shape[-1] == 4 else None
        if alpha is not None and alpha.min() != alpha.max():
            arr = alpha
        elif (colour[..., :1] == colour).all():
            arr = colour[..., 0]
        else:
            arr = colour.astype(np.float64) @ _LUMA
    return np.asarray(arr, dtype=np.float64) > threshold * scale


def _mask_scale(arr: np.ndarray, what: str) -> float:
    """The largest possible value of a mask array (1 for 0/1 label masks)."""
    kind = arr.dtype.kind
    if kind == "b":
        return 1.0
    if kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidSceneError(
                f"{what} contains NaN or infinite values; a mask must be finite: 0 for "
                "background, 1 for the object (e.g. np.nan_to_num(mask))."
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
            raise InvalidSceneError(
                f"{what}: float mask values must be in [0, 1], got [{lo:.3g}, {hi:.3g}]; for "
                f"0..255 masks pass uint8 (mask.astype(np.uint8)) or divide by 255."
            )
        return 1.0
    if kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise InvalidSceneError(
                f"{what}: mask values must not be negative, got minimum {lo}; pass a bool mask "
                f"or uint8 in [0, 255]."
            )
        if hi <= 1:
            return 1.0
        if kind == "u" and arr.dtype.itemsize == 1:
            return 255.0
        if kind == "u" and arr.dtype.itemsize == 2:
            return 65535.0
        if hi <= 255:
            return 255.0
        if hi <= 65535:
            return 65535.0
        raise InvalidSceneError(
            f"{what}: integer mask values must be at most 65535, got {hi}; pass a bool mask or "
            f"uint8 in [0, 255]."
        )
    raise InvalidSceneError(
        f"{what}: unsupported dtype {arr.dtype}; pass bool, uint8 in [0, 255] or float in [0, 1]."
    )


def exif_hint(image: object, mask: object) -> str:
    """A note on EXIF rotation when the image or mask carries one (a common cause of a mismatch)."""
    for obj in (image, mask):
        try:
            if isinstance(obj, str | os.PathLike):
                with Image.open(obj) as opened:
                    orientation = opened.getexif().get(0x0112, 1)
            elif isinstance(obj, Image.Image):
                orientation = obj.getexif().get(0x0112, 1)
            else:
                continue
        except Exception:
            continue
        if orientation not in (None, 1):
            return (
                " Note: a file is rotated by its EXIF orientation, as viewers show it; draw the "
                "mask on the upright image."
            )
    return ""


def decode_view(
    image: ImageInput,
    masks: list[MaskInput],
    tokens: list[str],
    concepts: list[int],
    threshold: float,
    background_token: str | None,
    *,
    background_index: int,
    where: int | None,
) -> SceneView:
    """Decode and check one image and its masks (``tokens[i]``/``concepts[i]``: the handle
    ``masks[i]`` shows). ``where`` is the image's index in a scene of several images (named in
    errors as ``images[where]``, ``masks[where][i]``), ``None`` for a one-image scene."""
    multi = where is not None
    owner = f"images[{where}]" if multi else "the image"
    rgb = load_image(image, f"images[{where}]" if multi else "image")
    width, height = rgb.size
    total = len(masks) + (background_token is not None)
    bool_masks: list[np.ndarray] = []
    for i, mask in enumerate(masks):
        what = f"masks[{where}][{i}]" if multi else f"masks[{i}]"
        token = tokens[i]
        arr = load_mask(mask, what, threshold)
        if arr.shape != (height, width):
            raise InvalidSceneError(
                f"{what} is {arr.shape[1]}x{arr.shape[0]} (width x height) but {owner} is "
                f"{width}x{height}; masks must have the image's size. Resize the mask to the "
                f"image, e.g. mask.resize(({width}, {height}), Image.NEAREST)."
                + exif_hint(image, mask)
            )
        if not arr.any():
            raise InvalidSceneError(
                f"{what} (token {token!r}) is empty: no pixel is above "
                f"mask_threshold={threshold} of the largest value. The object must be light "
                f"(white) on a dark (black) background, or transparent around an opaque object; "
                f"check the mask, or lower mask_threshold."
            )
        if arr.all() and total > 1:
            raise InvalidSceneError(
                f"{what} (token {token!r}) covers the whole image; with several concepts the "
                f"masked and attention losses cannot separate them. Draw the mask around the "
                f"object only (use background_token=... for the background)."
            )
        arr.setflags(write=False)
        bool_masks.append(arr)
    present = list(concepts)
    if background_token is not None:
        complement = ~np.logical_or.reduce(bool_masks)
        if not complement.any():
            raise InvalidSceneError(
                f"background_token {background_token!r}: the masks"
                f"{' of ' + owner if multi else ''} together cover the whole image, so the "
                f"background mask (their complement) is empty. Leave out background_token, or "
                f"make the masks tighter around their objects."
            )
        complement.setflags(write=False)
        bool_masks.append(complement)
        present.append(background_index)
    return SceneView(rgb, tuple(bool_masks), tuple(present))
