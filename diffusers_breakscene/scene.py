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

Why this module is over 500 lines: the documented resize and crop rules and their warnings, and
scenes of several images (:meth:`Scene.from_images`); input checks and decoding live in
:mod:`~diffusers_breakscene.scene_inputs`, folder reading in
:mod:`~diffusers_breakscene.scene_folder`.

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
import operator
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .config import DEFAULT_PROMPT_TEMPLATE, DEFAULT_TOKEN_JOINER
from .errors import InvalidSceneError
from .scene_folder import IMAGE_SUFFIXES, read_scene_dir, read_scene_options
from .scene_inputs import (
    DEFAULT_MASK_THRESHOLD,
    ImageInput,
    MaskInput,
    SceneView,
    check_concepts,
    check_images,
    check_initializers,
    check_mask_sequence,
    check_per_image,
    check_resolution,
    check_threshold,
    check_token_text,
    check_tokens,
    decode_view,
)

__all__ = [
    "DEFAULT_MASK_THRESHOLD",
    "IMAGE_SUFFIXES",
    "CropWindow",
    "ImageInput",
    "MaskInput",
    "Scene",
    "SceneView",
    "hflip",
]


_LARGE_CROP_LOSS = 0.5  # warn when the square crop keeps less than this share of a concept


class CropWindow(NamedTuple):
    """Where a scene image is cut for training (:meth:`Scene.crop_window`); sizes are
    ``(height, width)``, ``top_left`` is ``(top, left)`` in the resized image."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    top_left: tuple[int, int]


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
        threshold = check_threshold(mask_threshold)
        mask_list = check_mask_sequence(masks)
        n = len(mask_list)
        token_list = check_tokens(tokens, n)
        self._setup(
            [(image, mask_list, list(range(n)))], token_list, initializer_tokens,
            background_token, threshold, multi=False,
        )  # fmt: skip

    @classmethod
    def from_images(
        cls,
        images: Sequence[ImageInput],
        masks: Sequence[Sequence[MaskInput]],
        concepts: Sequence[Sequence[int]] | None = None,
        tokens: Sequence[str] | None = None,
        initializer_tokens: Sequence[str | None] | None = None,
        *,
        background_token: str | None = None,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    ) -> Scene:
        """A scene seen in several images: the same concepts, each in some of the images.

        ``masks[i]`` holds the masks of ``images[i]``, and ``concepts[i][j]`` says which concept
        (handle index) ``masks[i][j]`` shows; by default the masks of every image are concepts
        ``0, 1, ...`` in order. A concept may be missing from some images but must be in at
        least one, and in an image at most once. Training picks an image per example, then a
        subset of the concepts it shows (see :meth:`sample`). With ``background_token``, each
        image's background is the complement of its own masks. Other arguments as in
        :class:`Scene`, with ``tokens`` and ``initializer_tokens`` one per concept.

        Example:
            >>> import numpy as np
            >>> def box(x):
            ...     m = np.zeros((32, 32), dtype=bool); m[4:20, x:x + 10] = True; return m
            >>> images = [np.zeros((32, 32, 3), np.uint8)] * 3
            >>> scene = Scene.from_images(images, [[box(2), box(18)], [box(8)], [box(4)]],
            ...                           concepts=[[0, 1], [1], [0]],
            ...                           initializer_tokens=["cup", "bowl"])
            >>> scene.num_images, scene.tokens, scene.concepts_in(1)
            (3, ['<asset0>', '<asset1>'], [1])
        """
        threshold = check_threshold(mask_threshold)
        image_list = check_images(images)
        masks = check_per_image(masks, "masks", len(image_list), "list of masks", "[[cup], [cup]]")
        mask_lists = [check_mask_sequence(m, f"masks[{i}]") for i, m in enumerate(masks)]
        concept_lists = check_concepts(concepts, mask_lists)
        n = 1 + max(c for cs in concept_lists for c in cs)
        token_list = check_tokens(tokens, n)
        scene = cls.__new__(cls)
        scene._setup(
            list(zip(image_list, mask_lists, concept_lists, strict=True)), token_list,
            initializer_tokens, background_token, threshold, multi=True,
        )  # fmt: skip
        return scene

    def _setup(
        self,
        views: list[tuple[ImageInput, list[MaskInput], list[int]]],
        token_list: list[str],
        initializer_tokens: Sequence[str | None] | None,
        background_token: str | None,
        threshold: float,
        *,
        multi: bool,
    ) -> None:
        """Check and decode every image and mask, then store them (nothing is stored on error)."""
        n = len(token_list)
        if background_token is not None:
            check_token_text(background_token, "background_token")
            if background_token in token_list:
                raise InvalidSceneError(
                    f"background_token {background_token!r} is also tokens"
                    f"[{token_list.index(background_token)}]; choose a different background "
                    f"token, e.g. '<background>'."
                )
        init_list = check_initializers(initializer_tokens, n, background_token)
        decoded = []
        for v, (image, masks, concepts) in enumerate(views):
            names = [token_list[c] for c in concepts]
            where = v if multi else None
            decoded.append(
                decode_view(image, masks, names, concepts, threshold, background_token,
                            background_index=n, where=where)
            )  # fmt: skip
        if background_token is not None:
            token_list = [*token_list, background_token]

        self._views = decoded
        self._tokens = token_list
        self._initializers = init_list
        self._background = background_token is not None
        self._threshold = threshold
        self._prepared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str], **kwargs: Any) -> Scene:
        """Read a scene folder: one image, or several images of the same concepts.

        **One image**: the folder holds exactly one ``img.png`` / ``.jpg`` / ``.jpeg`` /
        ``.webp`` / ``.bmp`` and at least one ``mask*.png``; masks are taken in natural order
        (``mask0``, ``mask1``, ..., ``mask10``), so the first gets ``<asset0>``.

        **Several images**: the folder holds no ``img.*`` but one subfolder per image (taken in
        natural order of their names; names starting with ``.`` are ignored), each with one
        ``img.*`` and a ``mask<N>.png`` for every concept it shows, where ``N`` is the concept's
        handle index: ``mask1.png`` in any subfolder is ``<asset1>``. A concept may be missing
        from some images (see :meth:`from_images`)::

            my_scene/
              front/  img.jpg  mask0.png  mask1.png
              side/   img.jpg  mask0.png
              back/   img.jpg  mask1.png

        Names are matched without regard to case. An optional ``scene.json`` sets keyword
        arguments of :class:`Scene` (``tokens``, ``initializer_tokens``, ``background_token``,
        ``mask_threshold``), e.g. ``{"initializer_tokens": ["dog", "hat"]}``; keyword arguments
        given here win over it. They go to :class:`Scene` (or :meth:`from_images`).

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
        images, masks, concepts = read_scene_dir(folder)
        kwargs = {**read_scene_options(folder), **kwargs}
        if concepts is None:
            return cls(images[0], masks[0], **kwargs)
        return cls.from_images(images, masks, concepts, **kwargs)

    @property
    def num_images(self) -> int:
        """How many images the scene has (1 unless built with :meth:`from_images`)."""
        return len(self._views)

    @property
    def images(self) -> list[Image.Image]:
        """Every image, RGB, original size (copies)."""
        return [view.image.copy() for view in self._views]

    def view(self, index: int) -> SceneView:
        """Image ``index``, its masks and the concept index each mask shows (the background, if
        any, last). The image is a copy; the masks are read-only.

        Example:
            >>> import numpy as np
            >>> mask = np.eye(8, dtype=bool)
            >>> view = Scene(np.zeros((8, 8, 3), np.uint8), [mask], background_token="<bg>").view(0)
            >>> view.concepts, len(view.masks)
            ((0, 1), 2)
        """
        view = self._views[self._image_index(index)]
        return SceneView(view.image.copy(), view.masks, view.concepts)

    def concepts_in(self, index: int) -> list[int]:
        """Concept indices that image ``index`` shows (the background, if any, last)."""
        return list(self._views[self._image_index(index)].concepts)

    def _image_index(self, index: int) -> int:
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not (0 <= index < self.num_images)
        ):
            raise InvalidSceneError(
                f"image index {index!r} is out of range: this scene has {self.num_images} "
                f"image(s) (0..{self.num_images - 1})."
            )
        return index

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
        """The (first) image, RGB, original size (a copy: editing it does not change the scene)."""
        return self._views[0].image.copy()

    @property
    def masks(self) -> list[np.ndarray]:
        """Binary masks of the (first) image, bool ``HxW`` at its original size, one per concept
        it shows (every concept when the scene has one image), background last.

        The arrays are read-only. :meth:`view` gives the masks of every image.
        """
        return list(self._views[0].masks)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the (first) image, as PIL reports it."""
        return self._views[0].image.size

    def mask_areas(self) -> list[float]:
        """Fraction of the image area each concept's mask covers, in :attr:`tokens` order (with
        several images: the mean over the images that show the concept).

        Example:
            >>> import numpy as np
            >>> mask = np.zeros((10, 10), dtype=bool)
            >>> mask[:5, :] = True
            >>> Scene(np.zeros((10, 10, 3), np.uint8), [mask], background_token="<bg>").mask_areas()
            [0.5, 0.5]
        """
        areas: list[list[float]] = [[] for _ in self._tokens]
        for view in self._views:
            for concept, mask in zip(view.concepts, view.masks, strict=True):
                areas[concept].append(float(mask.mean()))
        return [sum(a) / len(a) for a in areas]

    def prepare(self, resolution: int, image: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Square training tensors of image ``image`` at ``resolution`` x ``resolution``.

        The image is resized (bicubic) so that its shorter side equals ``resolution``; masks are
        resized the same way as float with bilinear filtering and thresholded again at 0.5. A
        square window is then cut along the longer side, centred on the bounding box of the
        union of the concept masks (background excluded) and clamped to the image. A warning
        says when the window keeps less than half of a concept; a concept that the resize or the
        window removes entirely raises :class:`~diffusers_breakscene.errors.InvalidSceneError`.
        Results are cached per resolution; each call returns fresh copies.

        Args:
            resolution: Output side in pixels, a positive multiple of 8.
            image: Which image (for scenes of several images, :meth:`from_images`).

        Returns:
            ``pixel_values``: float32 ``(3, R, R)`` in ``[-1, 1]`` (``x / 255 * 2 - 1``), and
            ``masks``: float32 ``(num_concepts, R, R)`` with values in ``{0, 1}``; the masks of
            concepts the image does not show are all zero.

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
        resolution = check_resolution(resolution)
        key = (resolution, self._image_index(image))
        cached = self._prepared.get(key)
        if cached is None:
            cached = self._prepare(*key)
            self._prepared[key] = cached
        pixels, masks = cached
        return pixels.clone(), masks.clone()

    def crop_window(self, resolution: int, image: int = 0) -> CropWindow:
        """Where :meth:`prepare` cuts image ``image`` at ``resolution``: its original size, its
        size after the resize, and the top-left corner of the square window (SDXL's time ids
        are made of these).

        Example:
            >>> import numpy as np
            >>> mask = np.zeros((48, 96), dtype=bool)
            >>> mask[8:20, 68:88] = True
            >>> Scene(np.zeros((48, 96, 3), np.uint8), [mask]).crop_window(24)
            CropWindow(original_size=(48, 96), resized_size=(24, 48), top_left=(0, 24))
        """
        resolution = check_resolution(resolution)
        view = self._views[self._image_index(image)]
        width, height = view.image.size
        if width <= height:
            new_w, new_h = resolution, max(resolution, round(height * resolution / width))
        else:
            new_w, new_h = max(resolution, round(width * resolution / height)), resolution

        concept_masks = view.masks[:-1] if self._background else view.masks
        union = np.logical_or.reduce(concept_masks)
        left = top = 0
        if new_w > resolution:
            left = _window_start(union.any(axis=0), new_w / width, new_w, resolution)
        if new_h > resolution:
            top = _window_start(union.any(axis=1), new_h / height, new_h, resolution)
        return CropWindow((height, width), (new_h, new_w), (top, left))

    def _prepare(self, resolution: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = self._views[index]
        window = self.crop_window(resolution, index)
        (new_h, new_w), (top, left) = window.resized_size, window.top_left
        box = (left, top, left + resolution, top + resolution)
        concept_masks = view.masks[:-1] if self._background else view.masks

        resized_image = view.image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop(box)
        pixels = torch.from_numpy(np.asarray(resized_image, dtype=np.float32).copy())
        pixels = (pixels.permute(2, 0, 1) / 255.0 * 2.0 - 1.0).contiguous()

        out = torch.zeros(self.num_concepts, resolution, resolution)
        for k, mask in enumerate(view.masks):
            name = self._concept_name(index, k)
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
            out[view.concepts[k]] = torch.from_numpy(cropped.astype(np.float32))
        return pixels, out

    def sample(
        self, generator: torch.Generator, union_sampling: bool = True
    ) -> tuple[int, list[int]]:
        """An image index and concept indices for one training example.

        With several images an image is drawn first (``torch.randint``); then, with union
        sampling (the paper's), ``k ~ Uniform{1..N}`` for the ``N`` concepts that image shows,
        and ``k`` of them in a random order (``torch.randint``, then ``torch.randperm``). Every
        draw comes from ``generator``, so a seeded generator, or one restored with
        ``set_state``, repeats the same sequence. With ``union_sampling=False`` every concept of
        the image is returned in order; a scene of one image then does not use the generator.

        Example:
            >>> import numpy as np, torch
            >>> masks = [np.eye(8, dtype=bool), np.eye(8, dtype=bool)[::-1]]
            >>> scene = Scene.from_images([np.zeros((8, 8, 3), np.uint8)] * 2,
            ...                           [masks, masks[:1]], concepts=[[0, 1], [1]])
            >>> g = torch.Generator().manual_seed(0)
            >>> all(set(c) <= set(scene.concepts_in(i)) for i, c in
            ...     (scene.sample(g) for _ in range(20)))
            True
        """
        needs_generator = union_sampling or self.num_images > 1
        if needs_generator and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"sampling needs a torch.Generator, got {type(generator).__name__}; pass "
                f"e.g. torch.Generator().manual_seed(seed)."
            )
        index = 0
        if self.num_images > 1:
            draw = torch.randint(
                self.num_images, (1,), generator=generator, device=generator.device
            )
            index = int(draw.item())
        present = self._views[index].concepts
        if not union_sampling:
            return index, sorted(present)
        device = generator.device
        k = int(torch.randint(1, len(present) + 1, (1,), generator=generator, device=device).item())
        order = torch.randperm(len(present), generator=generator, device=device)[:k].tolist()
        return index, [present[i] for i in order]

    def sample_concepts(self, generator: torch.Generator, union_sampling: bool = True) -> list[int]:
        """Concept indices for one training step: :meth:`sample` without the image index.

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
        return self.sample(generator, union_sampling)[1]

    def prompt(
        self,
        indices: Sequence[int],
        template: str = DEFAULT_PROMPT_TEMPLATE,
        joiner: str = DEFAULT_TOKEN_JOINER,
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
        parts = [f"{t}: {a:.1%}" for t, a in zip(self._tokens, self.mask_areas(), strict=True)]
        background = f", background={self._tokens[-1]!r}" if self._background else ""
        if self.num_images > 1:
            where = f"images={self.num_images}"
        else:
            where = "size={}x{}".format(*self.size)
        return f"Scene({where}, concepts=[{', '.join(parts)}]{background})"

    def _concept_name(self, index: int, k: int) -> str:
        view = self._views[index]
        concept = view.concepts[k]
        token = self._tokens[concept]
        if self._background and concept == len(self._tokens) - 1:
            where = f" of images[{index}]" if self.num_images > 1 else ""
            return f"the background mask{where} (token {token!r})"
        if self.num_images > 1:
            return f"masks[{index}][{k}] (token {token!r})"
        return f"masks[{k}] (token {token!r})"


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


def _window_start(occupied: np.ndarray, scale: float, length: int, window: int) -> int:
    """Start of a ``window`` along an axis of ``length``, centred on the occupied span."""
    where = np.flatnonzero(occupied)
    centre = (where[0] + where[-1] + 1) / 2.0 * scale
    start = math.floor(centre - window / 2.0 + 0.5)
    return min(max(start, 0), length - window)
