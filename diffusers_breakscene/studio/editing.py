"""Uploads and mask edits of the studio, as plain images and arrays (no Gradio here).

The studio shows each proposed mask tinted on the photo, as the background of an image editor,
with one empty paint layer on top. The user paints with two colours: :data:`ADD_COLOUR` adds to
the mask, :data:`REMOVE_COLOUR` takes away from it; the editor's eraser removes paint. The mask
that results is ``(proposed | added) & ~removed`` (:func:`apply_edits`). Painting on a layer
preloaded with the mask would be more direct, but Gradio's image editor does not send a
preloaded layer's pixels back once the user paints on it (seen with Gradio 6.31), so the
proposal stays on the server and only the strokes travel.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> photo = Image.new("RGB", (8, 8), "gray")
    >>> mask = np.zeros((8, 8), bool); mask[:4] = True
    >>> layer = np.zeros((8, 8, 4), np.uint8); layer[:2] = (*hex_rgb(REMOVE_COLOUR), 255)
    >>> value = {"background": photo, "layers": [Image.fromarray(layer, "RGBA")]}
    >>> int(apply_edits(mask, value).sum())
    16
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidSceneError
from ..mask_ops import erode

__all__ = [
    "ADD_COLOUR",
    "MASK_COLOURS",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_SIDE",
    "REMOVE_COLOUR",
    "apply_edits",
    "editor_value",
    "hex_rgb",
    "read_photo",
]

#: Brush colour that adds to a mask.
ADD_COLOUR = "#22c55e"
#: Brush colour that removes from a mask.
REMOVE_COLOUR = "#ec4899"
#: One tint per mask slot (the same order as ``MaskProposal.preview``'s legend).
MASK_COLOURS = ("#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0")
#: Largest photo file the studio accepts.
MAX_UPLOAD_BYTES = 40 * 1024 * 1024
#: Largest photo side the studio accepts, in pixels.
MAX_UPLOAD_SIDE = 6000
_EDITOR_SIDE = 768  # the editor shows photos larger than this downscaled


def hex_rgb(colour: str) -> tuple[int, int, int]:
    """``"#22c55e"`` -> ``(34, 197, 94)``."""
    value = colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def read_photo(path: str | os.PathLike[str]) -> Image.Image:
    """The uploaded photo at ``path`` as RGB (EXIF rotation applied), or a clear error when it
    is not an image, too large, or empty.

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "notes.png"
        >>> _ = bad.write_text("not a picture")
        >>> try:
        ...     read_photo(bad)
        ... except ValueError as error:
        ...     print(error)
        notes.png is not an image PIL can read; upload a PNG, JPEG or WebP photo.
    """
    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise InvalidSceneError(f"{name} is empty (0 bytes); upload a PNG, JPEG or WebP photo.")
    if size > MAX_UPLOAD_BYTES:
        raise InvalidSceneError(
            f"{name} is {size / 2**20:.0f} MB; the studio takes photos up to "
            f"{MAX_UPLOAD_BYTES // 2**20} MB. Save it smaller (training uses 512 px at most)."
        )
    try:
        with Image.open(path) as probe:
            width, height = probe.size  # the header only: a huge image is refused undecoded
            if max(width, height) > MAX_UPLOAD_SIDE:
                raise InvalidSceneError(
                    f"{name} is {width}x{height} px; the studio takes photos up to "
                    f"{MAX_UPLOAD_SIDE} px a side. Downscale it (training uses 512 px at most)."
                )
            photo = ImageOps.exif_transpose(probe)
            photo = photo.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise InvalidSceneError(
            f"{name} is not an image PIL can read; upload a PNG, JPEG or WebP photo."
        ) from error
    if photo.width < 8 or photo.height < 8:
        raise InvalidSceneError(f"{name} is {photo.width}x{photo.height} px; upload a photo.")
    return photo


def _display_size(photo: Image.Image) -> tuple[int, int]:
    scale = min(1.0, _EDITOR_SIDE / max(photo.size))
    return max(1, round(photo.width * scale)), max(1, round(photo.height * scale))


def editor_value(photo: Image.Image, mask: np.ndarray, colour: str) -> dict[str, Any]:
    """The image editor's value for one mask: the photo with the mask tinted in ``colour`` and
    outlined as the background, and one empty paint layer (downscaled for display when the
    photo is larger than 768 px)."""
    size = _display_size(photo)
    base = np.asarray(photo.convert("RGB").resize(size), dtype=np.float32)
    shown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size)) > 127
    tint = np.array(hex_rgb(colour), dtype=np.float32)
    base[shown] = 0.5 * base[shown] + 0.5 * tint
    base[shown & ~erode(shown)] = tint
    background = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    return {"background": background, "layers": [layer], "composite": None}


def _strokes(value: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels painted with the add and the remove colour, at the mask's ``shape``."""
    add = np.zeros(shape, bool)
    remove = np.zeros(shape, bool)
    layers = (value.get("layers") or []) if isinstance(value, dict) else []
    want_add = np.array(hex_rgb(ADD_COLOUR), np.float32)
    want_remove = np.array(hex_rgb(REMOVE_COLOUR), np.float32)
    for layer in layers:
        if layer is None:
            continue
        picture = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        rgba = np.asarray(picture.convert("RGBA").resize(shape[::-1], Image.Resampling.NEAREST))
        painted = rgba[..., 3] >= 128
        rgb = rgba[..., :3].astype(np.float32)
        nearer_add = np.linalg.norm(rgb - want_add, axis=-1) <= np.linalg.norm(
            rgb - want_remove, axis=-1
        )
        add |= painted & nearer_add
        remove |= painted & ~nearer_add
    return add, remove


def apply_edits(mask: np.ndarray, value: Any) -> np.ndarray:
    """The mask after the user's strokes in the editor ``value``: pixels painted with
    :data:`ADD_COLOUR` join it, pixels painted with :data:`REMOVE_COLOUR` leave it."""
    mask = np.asarray(mask, dtype=bool)
    add, remove = _strokes(value, mask.shape)
    return (mask | add) & ~remove
