"""One image, one binary mask per concept, and the text handle that will name each concept.

A :class:`Scene` is the whole training input of Break-A-Scene. It checks the input once, up front,
with errors that name the offending argument and say how to fix it, and then gives the trainer
what it needs: square tensors at any resolution (:meth:`Scene.prepare`), the flip augmentation
(:func:`hflip`), union sampling of concepts (:meth:`Scene.sample_concepts`) and prompts
(:meth:`Scene.prompt`).

Rules, in one place:

* **Image.** A PIL image, a path, an ``HxWx3`` array (``uint8``, or float in ``[0, 1]``) or a
  tensor (``(3, H, W)`` or ``(H, W, 3)``; channel-first wins when both fit). PIL images and files
  are turned upright by their EXIF orientation (as ``diffusers.utils.load_image`` does) and
  converted to RGB; an alpha channel is dropped.
* **Masks.** One per concept, of the image's size. A pixel is inside when its value is strictly
  greater than ``mask_threshold * max_possible`` (threshold 0.5 by default; ``max_possible`` is
  255 for ``uint8``, 65535 for ``uint16``, 1.0 for float and bool). Integer masks whose values are
  all 0 or 1 are label masks: 1 is inside. Colour masks use their luminance
  (``0.299 R + 0.587 G + 0.114 B``); masks with an alpha channel use the alpha channel when it is
  not constant (a cut-out or strokes on transparency) and the luminance otherwise. Masks are
  turned upright by EXIF orientation like the image.
* **Background.** ``background_token`` adds one more concept, last, whose mask is every pixel
  that no other mask covers.
* **Resolution.** :meth:`Scene.prepare` resizes so that the shorter side equals the resolution
  (image: bicubic; masks: bilinear as float, then ``> 0.5``), then crops a square along the
  longer side, centred on the bounding box of the union of the concept masks and clamped to the
  image.

Example:
    >>> import numpy as np, torch
    >>> from diffusers_breakscene.scene import Scene, hflip
    >>> image = np.full((48, 64, 3), 128, dtype=np.uint8)
    >>> cat = np.zeros((48, 64), dtype=bool)
    >>> cat[8:40, 4:30] = True
    >>> scene = Scene(image, [cat], initializer_tokens=["cat"], background_token="<bg>")
    >>> scene.tokens
    ['<asset0>', '<bg>']
    >>> pixels, masks = scene.prepare(32)
    >>> tuple(pixels.shape), tuple(masks.shape)
    ((3, 32, 32), (2, 32, 32))
    >>> indices = scene.sample_concepts(torch.Generator().manual_seed(0))
    >>> scene.prompt([1, 0])
    'a photo of <bg> and <asset0>'
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InvalidSceneError, MissingFileError

__all__ = ["DEFAULT_MASK_THRESHOLD", "IMAGE_SUFFIXES", "ImageInput", "MaskInput", "Scene", "hflip"]

ImageInput: TypeAlias = Image.Image | str | os.PathLike[str] | np.ndarray | torch.Tensor
"""What :class:`Scene` accepts as the image."""

MaskInput: TypeAlias = Image.Image | str | os.PathLike[str] | np.ndarray | torch.Tensor
"""What :class:`Scene` accepts as one mask."""

DEFAULT_MASK_THRESHOLD = 0.5
"""A mask pixel is inside when its value is above this fraction of the largest possible value."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""File suffixes :meth:`Scene.from_dir` accepts for ``img.*``."""

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights of PIL's convert("L")
_FLOAT_TOLERANCE = 1e-3  # float inputs may overshoot [0, 1] by rounding error, not more
_LARGE_CROP_LOSS = 0.5  # warn when the square crop keeps less than this share of a concept


class Scene:
    """One image, one binary mask per concept, and one handle token per concept.

    Everything is checked here, before anything is stored: a bad input raises
    :class:`~diffusers_breakscene.errors.InvalidSceneError` (a ``ValueError``) or, for a missing
    file, :class:`~diffusers_breakscene.errors.MissingFileError` (a ``FileNotFoundError``), with a
    message that names the input (``masks[2]``, ``tokens[0]``, ...) and the fix.

    Args:
        image: PIL image, path, ``HxWx3`` array (``uint8`` or float in ``[0, 1]``), or tensor
            ``(3, H, W)`` / ``(H, W, 3)`` (``uint8`` or float in ``[0, 1]``).
        masks: Non-empty sequence, one mask per concept, each the size of the image: PIL image,
            path, array ``HxW`` (bool, integer or float in ``[0, 1]``) or ``HxWx{1,3,4}``, or
            tensor ``HxW`` / ``1xHxW``. Binarised as described in the module docstring.
        tokens: One handle per mask; default ``["<asset0>", "<asset1>", ...]``. Non-empty, no
            whitespace, all different.
        initializer_tokens: Optional words whose embeddings initialise the handles, one per mask
            (``None`` for "no word"). With ``background_token`` it may have one more entry, for
            the background; otherwise the background gets ``None``.
        background_token: If given, an extra concept appended last whose mask is every pixel
            that no mask covers.
        mask_threshold: Fraction of the largest possible mask value above which a pixel is
            inside; strictly between 0 and 1.

    A mask may not be empty, and may not cover the whole image unless it is the only concept
    (with several concepts the masked and attention losses could not tell them apart).

    Example:
        >>> import numpy as np
        >>> image = np.zeros((48, 64, 3), dtype=np.uint8)
        >>> left = np.zeros((48, 64), dtype=np.uint8)
        >>> left[:, :20] = 255
        >>> right = np.zeros((48, 64), dtype=np.float32)
        >>> right[:, 40:] = 0.9
        >>> scene = Scene(image, [left, right], tokens=["<cup>", "<bowl>"])
        >>> scene.num_concepts, scene.size
        (2, (64, 48))
        >>> [round(a, 3) for a in scene.mask_areas()]
        [0.312, 0.375]
    """

    def __init__(
        self,
        image: ImageInput,
        masks: Sequence[MaskInput],
        tokens: Sequence[str] | None = None,
        initializer_tokens: Sequence[str | None] | None = None,
        *,
        background_token: str | None = None,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    ) -> None:
        threshold = _check_threshold(mask_threshold)
        mask_list = _check_mask_sequence(masks)
        n = len(mask_list)
        token_list = _check_tokens(tokens, n)
        if background_token is not None:
            _check_token_text(background_token, "background_token")
            if background_token in token_list:
                raise InvalidSceneError(
                    f"background_token {background_token!r} is also tokens"
                    f"[{token_list.index(background_token)}]; choose a different background "
                    f"token, e.g. '<background>'."
                )
        init_list = _check_initializers(initializer_tokens, n, background_token)

        rgb = _load_image(image)
        width, height = rgb.size
        total = n + (background_token is not None)
        bool_masks: list[np.ndarray] = []
        for i, mask in enumerate(mask_list):
            what = f"masks[{i}]"
            arr = _load_mask(mask, what, threshold)
            if arr.shape != (height, width):
                raise InvalidSceneError(
                    f"{what} is {arr.shape[1]}x{arr.shape[0]} (width x height) but the image is "
                    f"{width}x{height}; masks must have the image's size. Resize the mask to the "
                    f"image, e.g. mask.resize(({width}, {height}), Image.NEAREST)."
                    + _exif_hint(image, mask)
                )
            if not arr.any():
                raise InvalidSceneError(
                    f"{what} (token {token_list[i]!r}) is empty: no pixel is above "
                    f"mask_threshold={threshold} of the largest value. The object must be "
                    f"light (white) on a dark (black) background, or transparent around an "
                    f"opaque object; check the mask, or lower mask_threshold."
                )
            if arr.all() and total > 1:
                raise InvalidSceneError(
                    f"{what} (token {token_list[i]!r}) covers the whole image; with several "
                    f"concepts the masked and attention losses cannot separate them. Draw the "
                    f"mask around the object only (use background_token=... for the background)."
                )
            arr.setflags(write=False)
            bool_masks.append(arr)

        if background_token is not None:
            complement = ~np.logical_or.reduce(bool_masks)
            if not complement.any():
                raise InvalidSceneError(
                    f"background_token {background_token!r}: the masks together cover the whole "
                    f"image, so the background mask (their complement) is empty. Leave out "
                    f"background_token, or make the masks tighter around their objects."
                )
            complement.setflags(write=False)
            bool_masks.append(complement)
            token_list.append(background_token)

        self._image = rgb
        self._masks = bool_masks
        self._tokens = token_list
        self._initializers = init_list
        self._background = background_token is not None
        self._threshold = threshold
        self._prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str], **kwargs: Any) -> Scene:
        """Read ``img.*`` and ``mask*.png`` from a folder.

        The folder must hold exactly one ``img.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` /
        ``.bmp`` and at least one ``mask*.png``; masks are taken in natural order (``mask0``,
        ``mask1``, ..., ``mask10``), so the first gets ``<asset0>``. Names are matched without
        regard to case. Other keyword arguments go to :class:`Scene`.

        Example:
            >>> import tempfile
            >>> from pathlib import Path
            >>> from PIL import Image
            >>> folder = Path(tempfile.mkdtemp())
            >>> Image.new("RGB", (64, 48), "gray").save(folder / "img.jpg")
            >>> for i in range(2):
            ...     mask = Image.new("L", (64, 48), 0)
            ...     mask.paste(255, (30 * i, 0, 30 * i + 20, 20))
            ...     mask.save(folder / f"mask{i}.png")
            >>> Scene.from_dir(folder, initializer_tokens=["cup", None]).tokens
            ['<asset0>', '<asset1>']
        """
        path = Path(folder)
        if not path.exists():
            raise MissingFileError(f"Scene.from_dir: folder not found: {path}")
        if not path.is_dir():
            raise InvalidSceneError(
                f"Scene.from_dir: {path} is a file, not a folder; pass the folder that holds "
                f"img.* and mask*.png, or build Scene(image, masks) directly."
            )
        files = sorted(p.name for p in path.iterdir() if p.is_file())
        images = [
            name
            for name in files
            if Path(name).stem.lower() == "img" and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
        mask_names = sorted(
            (n for n in files if n.lower().startswith("mask") and n.lower().endswith(".png")),
            key=_natural_key,
        )
        if len(images) != 1:
            found = ", ".join(images) if images else _listing(files)
            raise InvalidSceneError(
                f"Scene.from_dir: {path} must hold exactly one image named img with suffix "
                f"{'/'.join(IMAGE_SUFFIXES)}; found {len(images)} ({found}). Keep one img.* file."
            )
        if not mask_names:
            raise InvalidSceneError(
                f"Scene.from_dir: {path} holds no mask*.png (files: {_listing(files)}); save one "
                f"mask per concept as mask0.png, mask1.png, ..."
            )
        return cls(path / images[0], [path / name for name in mask_names], **kwargs)

    @property
    def tokens(self) -> list[str]:
        """Handle tokens, one per concept; the background token (if any) is last."""
        return list(self._tokens)

    @property
    def initializer_tokens(self) -> list[str | None]:
        """Initializer word per concept (``None`` when not given); same length as :attr:`tokens`."""
        return list(self._initializers)

    @property
    def num_concepts(self) -> int:
        """Number of concepts, the background included: ``len(tokens)``."""
        return len(self._tokens)

    @property
    def background_token(self) -> str | None:
        """The background token, or ``None`` when the scene has no background concept."""
        return self._tokens[-1] if self._background else None

    @property
    def mask_threshold(self) -> float:
        """The threshold the masks were binarised with."""
        return self._threshold

    @property
    def image(self) -> Image.Image:
        """The image, RGB, original size (a copy: editing it does not change the scene)."""
        return self._image.copy()

    @property
    def masks(self) -> list[np.ndarray]:
        """Binary masks, bool ``HxW`` at the original size, one per concept, background last.

        The arrays are read-only.
        """
        return list(self._masks)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the image, as PIL reports it."""
        return self._image.size

    def mask_areas(self) -> list[float]:
        """Fraction of the image area each concept's mask covers, in :attr:`tokens` order.

        Example:
            >>> import numpy as np
            >>> mask = np.zeros((10, 10), dtype=bool)
            >>> mask[:5, :] = True
            >>> Scene(np.zeros((10, 10, 3), np.uint8), [mask], background_token="<bg>").mask_areas()
            [0.5, 0.5]
        """
        return [float(m.mean()) for m in self._masks]

    def prepare(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Square training tensors at ``resolution`` x ``resolution``.

        The image is resized (bicubic) so that its shorter side equals ``resolution``; masks are
        resized the same way as float with bilinear filtering and thresholded again at 0.5. A
        square window is then cut along the longer side, centred on the bounding box of the
        union of the concept masks (background excluded) and clamped to the image. A warning
        says when the window keeps less than half of a concept; a concept that the resize or the
        window removes entirely raises :class:`~diffusers_breakscene.errors.InvalidSceneError`.
        Results are cached per resolution; each call returns fresh copies.

        Args:
            resolution: Output side in pixels, a positive multiple of 8.

        Returns:
            ``pixel_values``: float32 ``(3, R, R)`` in ``[-1, 1]`` (``x / 255 * 2 - 1``), and
            ``masks``: float32 ``(num_concepts, R, R)`` with values in ``{0, 1}``.

        Example:
            >>> import numpy as np
            >>> mask = np.zeros((48, 96), dtype=bool)
            >>> mask[8:20, 68:88] = True  # off-centre object, right side
            >>> pixels, masks = Scene(np.zeros((48, 96, 3), np.uint8), [mask]).prepare(24)
            >>> pixels.dtype, tuple(masks.shape), float(pixels.min())
            (torch.float32, (1, 24, 24), -1.0)
            >>> int(masks.sum()) == int(mask.sum()) // 4  # the whole object is kept
            True
        """
        resolution = _check_resolution(resolution)
        cached = self._prepared.get(resolution)
        if cached is None:
            cached = self._prepare(resolution)
            self._prepared[resolution] = cached
        pixels, masks = cached
        return pixels.clone(), masks.clone()

    def _prepare(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = self.size
        if width <= height:
            new_w, new_h = resolution, max(resolution, round(height * resolution / width))
        else:
            new_w, new_h = max(resolution, round(width * resolution / height)), resolution

        concept_masks = self._masks[:-1] if self._background else self._masks
        union = np.logical_or.reduce(concept_masks)
        left = top = 0
        if new_w > resolution:
            left = _window_start(union.any(axis=0), new_w / width, new_w, resolution)
        if new_h > resolution:
            top = _window_start(union.any(axis=1), new_h / height, new_h, resolution)
        box = (left, top, left + resolution, top + resolution)

        image = self._image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop(box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        pixels = (pixels.permute(2, 0, 1) / 255.0 * 2.0 - 1.0).contiguous()

        out = []
        for k, mask in enumerate(self._masks):
            name = self._concept_name(k)
            soft = Image.fromarray(mask.astype(np.float32))
            resized = np.asarray(soft.resize((new_w, new_h), Image.Resampling.BILINEAR)) > 0.5
            if not resized.any():
                raise InvalidSceneError(
                    f"{name} vanishes when the image is resized to {new_w}x{new_h} for "
                    f"resolution {resolution}: the object is too small. Crop the photo closer "
                    f"to the object, or use a larger resolution."
                )
            cropped = resized[top : top + resolution, left : left + resolution]
            if not cropped.any():
                raise InvalidSceneError(
                    f"{name} is empty after cropping the {new_w}x{new_h} resized image to the "
                    f"square {box} (left, top, right, bottom) at resolution {resolution}: the "
                    f"objects do not fit in one square. Crop the photo first so that all "
                    f"objects fit in a square, or drop this mask."
                )
            kept = cropped.sum() / resized.sum()
            if (k < len(concept_masks)) and kept < _LARGE_CROP_LOSS:
                warnings.warn(
                    f"{name}: the square crop at resolution {resolution} keeps only {kept:.0%} "
                    f"of this object; crop the photo so that all objects fit in a square.",
                    UserWarning,
                    stacklevel=3,
                )
            out.append(torch.from_numpy(cropped.astype(np.float32)))
        return pixels, torch.stack(out)

    def sample_concepts(self, generator: torch.Generator, union_sampling: bool = True) -> list[int]:
        """Concept indices for one training step.

        Union sampling (the paper's): ``k ~ Uniform{1..N}``, then ``k`` different indices in a
        random order. Every draw comes from ``generator`` (two draws: ``torch.randint``, then
        ``torch.randperm``), so a seeded generator, or one restored with ``set_state``, repeats
        the same sequence. With ``union_sampling=False`` all indices are returned in order and
        the generator is not used.

        Example:
            >>> import numpy as np, torch
            >>> masks = [np.eye(8, dtype=bool), np.eye(8, dtype=bool)[::-1]]
            >>> scene = Scene(np.zeros((8, 8, 3), np.uint8), masks)
            >>> g = torch.Generator().manual_seed(0)
            >>> all(0 < len(scene.sample_concepts(g)) <= 2 for _ in range(10))
            True
            >>> scene.sample_concepts(g, union_sampling=False)
            [0, 1]
        """
        n = self.num_concepts
        if not union_sampling:
            return list(range(n))
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"sample_concepts needs a torch.Generator, got {type(generator).__name__}; pass "
                f"e.g. torch.Generator().manual_seed(seed)."
            )
        device = generator.device
        k = int(torch.randint(1, n + 1, (1,), generator=generator, device=device).item())
        return torch.randperm(n, generator=generator, device=device)[:k].tolist()

    def prompt(
        self, indices: Sequence[int], template: str = "a photo of {}", joiner: str = " and "
    ) -> str:
        """The training prompt for some concepts: their tokens joined into ``template``.

        Args:
            indices: Concept indices (as from :meth:`sample_concepts`), in prompt order.
            template: Text with exactly one ``{}``; other braces are left as they are.
            joiner: Put between tokens.

        Example:
            >>> import numpy as np
            >>> masks = [np.eye(4, dtype=bool), np.eye(4, dtype=bool)[::-1], np.ones((4, 4))]
            >>> masks[2][0] = 0
            >>> scene = Scene(np.zeros((4, 4, 3), np.uint8), masks)
            >>> scene.prompt([2, 0])
            'a photo of <asset2> and <asset0>'
            >>> scene.prompt([1], template="{} on the beach")
            '<asset1> on the beach'
        """
        if not isinstance(template, str) or template.count("{}") != 1:
            raise InvalidSceneError(
                f"template must contain exactly one '{{}}' where the tokens go, got {template!r}; "
                f"e.g. 'a photo of {{}}'."
            )
        chosen = []
        for position, index in enumerate(indices):
            try:
                if isinstance(index, bool):
                    raise TypeError
                i = operator.index(index)
            except TypeError:
                raise InvalidSceneError(
                    f"indices[{position}] must be an integer concept index, got {index!r}."
                ) from None
            if not 0 <= i < self.num_concepts:
                raise InvalidSceneError(
                    f"indices[{position}] = {i} is out of range: this scene has "
                    f"{self.num_concepts} concepts (indices 0..{self.num_concepts - 1})."
                )
            chosen.append(self._tokens[i])
        if not chosen:
            raise InvalidSceneError("indices is empty; pass at least one concept index.")
        return template.replace("{}", joiner.join(chosen))

    def __repr__(self) -> str:
        width, height = self.size
        parts = [f"{t}: {a:.1%}" for t, a in zip(self._tokens, self.mask_areas(), strict=True)]
        background = f", background={self._tokens[-1]!r}" if self._background else ""
        return f"Scene(size={width}x{height}, concepts=[{', '.join(parts)}]{background})"

    def _concept_name(self, k: int) -> str:
        if self._background and k == len(self._tokens) - 1:
            return f"the background mask (token {self._tokens[k]!r})"
        return f"masks[{k}] (token {self._tokens[k]!r})"


def hflip(pixel_values: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and masks left-right together (the last dimension of both).

    Works on single samples ``(C, H, W)`` / ``(K, H, W)`` and on batches. Returns new tensors.

    Example:
        >>> import torch
        >>> pixels, masks = torch.arange(6.0).reshape(1, 2, 3), torch.tensor([[[1.0, 0, 0]] * 2])
        >>> flipped_pixels, flipped_masks = hflip(pixels, masks)
        >>> flipped_pixels[0, 0].tolist(), flipped_masks[0, 0].tolist()
        ([2.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    """
    if pixel_values.dim() < 2 or masks.dim() < 2 or pixel_values.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"hflip: pixel_values {tuple(pixel_values.shape)} and masks {tuple(masks.shape)} must "
            f"end in the same (height, width)."
        )
    return torch.flip(pixel_values, dims=(-1,)), torch.flip(masks, dims=(-1,))


# --- validation helpers ---------------------------------------------------------------------


def _check_threshold(value: float) -> float:
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


def _check_resolution(value: int) -> int:
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


def _check_mask_sequence(masks: Sequence[MaskInput]) -> list[MaskInput]:
    single = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, Image.Image)
    if isinstance(masks, single) or not isinstance(masks, Sequence):
        raise InvalidSceneError(
            f"masks must be a list with one mask per concept, got {type(masks).__name__}; wrap "
            f"a single mask in a list (masks=[mask]), or split a stack with list(stack)."
        )
    if len(masks) == 0:
        raise InvalidSceneError(
            "masks is empty; pass one binary mask per concept (at least one), e.g. masks=[mask]."
        )
    return list(masks)


def _check_token_text(token: object, what: str) -> str:
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


def _check_tokens(tokens: Sequence[str] | None, n: int) -> list[str]:
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
    out = [_check_token_text(t, f"tokens[{i}]") for i, t in enumerate(tokens)]
    seen: dict[str, int] = {}
    for i, token in enumerate(out):
        if token in seen:
            raise InvalidSceneError(
                f"tokens[{i}] {token!r} repeats tokens[{seen[token]}]; every concept needs its "
                f"own token."
            )
        seen[token] = i
    return out


def _check_initializers(
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


# --- loading ----------------------------------------------------------------------------------


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


def _load_image(image: ImageInput) -> Image.Image:
    what = "image"
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


def _load_mask(mask: MaskInput, what: str, threshold: float) -> np.ndarray:
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


def _exif_hint(image: object, mask: object) -> str:
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


def _window_start(occupied: np.ndarray, scale: float, length: int, window: int) -> int:
    """Start of a ``window`` along an axis of ``length``, centred on the occupied span."""
    where = np.flatnonzero(occupied)
    centre = (where[0] + where[-1] + 1) / 2.0 * scale
    start = math.floor(centre - window / 2.0 + 0.5)
    return min(max(start, 0), length - window)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _listing(names: list[str], limit: int = 20) -> str:
    if not names:
        return "the folder is empty"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
