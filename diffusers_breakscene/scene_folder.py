"""Reading a scene folder (:meth:`~diffusers_breakscene.Scene.from_dir`): one image with its
masks, or one subfolder per image when a scene is seen in several images.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for view, handles in {"front": [0, 1], "side": [1]}.items():
    ...     (root / view).mkdir()
    ...     Image.new("RGB", (32, 32)).save(root / view / "img.png")
    ...     for h in handles:
    ...         Image.new("L", (32, 32), 255).save(root / view / f"mask{h}.png")
    >>> images, masks, concepts = read_scene_dir(root)
    >>> [p.parent.name for p in images], concepts
    (['front', 'side'], [[0, 1], [1]])
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import InvalidSceneError, MissingFileError

__all__ = ["IMAGE_SUFFIXES", "SCENE_OPTIONS", "read_scene_dir", "read_scene_options"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""File suffixes :meth:`~diffusers_breakscene.Scene.from_dir` accepts for ``img.*``."""


def read_scene_dir(
    folder: str | os.PathLike[str],
) -> tuple[list[Path], list[list[Path]], list[list[int]] | None]:
    """``(images, masks, concepts)`` of a scene folder; ``concepts`` is ``None`` for the
    one-image layout (its masks are concepts 0, 1, ... in natural order), and otherwise holds
    the handle index of every mask (``mask<N>.png`` is handle ``N``). The layouts are described
    in :meth:`~diffusers_breakscene.Scene.from_dir`.
    """
    path = Path(folder)
    if not path.exists():
        raise MissingFileError(f"Scene.from_dir: folder not found: {path}")
    if not path.is_dir():
        raise InvalidSceneError(
            f"Scene.from_dir: {path} is a file, not a folder; pass the folder that holds "
            f"img.* and mask*.png, or build Scene(image, masks) directly."
        )
    files = _files(path)
    subfolders = sorted(
        (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )
    if _image_files(files) or not subfolders:
        image, mask_names = _read_one(path, files)
        return [path / image], [[path / name for name in mask_names]], None

    images, masks, concepts = [], [], []
    for sub in subfolders:
        image, mask_names = _read_one(sub, _files(sub))
        numbers: list[int] = []
        for name in mask_names:
            digits = Path(name).stem[4:]
            if not digits.isdigit():
                raise InvalidSceneError(
                    f"Scene.from_dir: {sub / name}: in a folder of several images each mask is "
                    f"named mask<N>.png, N being its handle's index (mask0.png is <asset0>); "
                    f"rename it, e.g. mask0.png."
                )
            if int(digits) in numbers:
                raise InvalidSceneError(
                    f"Scene.from_dir: {sub} holds two masks for handle {int(digits)} ({name} and "
                    f"another); keep one mask per handle per image."
                )
            numbers.append(int(digits))
        images.append(sub / image)
        masks.append([sub / name for name in mask_names])
        concepts.append(numbers)
    used = {c for row in concepts for c in row}
    missing = sorted(set(range(max(used) + 1)) - used)
    if missing:
        raise InvalidSceneError(
            f"Scene.from_dir: {path}: no image folder has mask{missing[0]}.png, but handles up "
            f"to mask{max(used)}.png are used; number the handles 0, 1, ... without gaps, each "
            f"in at least one image."
        )
    return images, masks, concepts


SCENE_OPTIONS = ("tokens", "initializer_tokens", "background_token", "mask_threshold")
"""Keys an optional ``scene.json`` in a scene folder may set (keyword arguments of
:class:`~diffusers_breakscene.Scene`)."""


def read_scene_options(folder: str | os.PathLike[str]) -> dict[str, object]:
    """The settings of ``folder/scene.json`` (``{}`` when there is none), checked for unknown
    keys: e.g. ``{"initializer_tokens": ["dog", "hat"], "background_token": "<bg>"}``, so that a
    folder of many scenes carries each scene's words (``breakscene train-many``).

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "scene.json").write_text(json.dumps({"initializer_tokens": ["dog"]}))
        >>> read_scene_options(folder)
        {'initializer_tokens': ['dog']}
    """
    file = Path(folder) / "scene.json"
    if not file.is_file():
        return {}
    try:
        options = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidSceneError(
            f"{file} is not valid JSON ({err}); write an object such as "
            f'{{"initializer_tokens": ["dog", "hat"]}}, or delete the file.'
        ) from None
    if not isinstance(options, dict):
        raise InvalidSceneError(
            f"{file} must hold a JSON object with some of the keys {list(SCENE_OPTIONS)}, got "
            f"{type(options).__name__}."
        )
    unknown = sorted(set(options) - set(SCENE_OPTIONS))
    if unknown:
        raise InvalidSceneError(
            f"{file}: unknown keys {unknown}; the keys are {list(SCENE_OPTIONS)}."
        )
    return options


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``mask2`` before ``mask10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file())


def _image_files(files: list[str]) -> list[str]:
    return [
        name
        for name in files
        if Path(name).stem.lower() == "img" and Path(name).suffix.lower() in IMAGE_SUFFIXES
    ]


def _read_one(path: Path, files: list[str]) -> tuple[str, list[str]]:
    """The ``img.*`` and the ``mask*.png`` (natural order) of one image's folder."""
    images = _image_files(files)
    mask_names = sorted(
        (n for n in files if n.lower().startswith("mask") and n.lower().endswith(".png")),
        key=natural_key,
    )
    if len(images) != 1:
        found = ", ".join(images) if images else _listing(files)
        raise InvalidSceneError(
            f"Scene.from_dir: {path} must hold exactly one image named img with suffix "
            f"{'/'.join(IMAGE_SUFFIXES)}; found {len(images)} ({found}). Keep one img.* file "
            f"(or, for several images, one subfolder per image)."
        )
    if not mask_names:
        raise InvalidSceneError(
            f"Scene.from_dir: {path} holds no mask*.png (files: {_listing(files)}); save one "
            f"mask per concept as mask0.png, mask1.png, ..."
        )
    return images[0], mask_names


def _listing(names: list[str], limit: int = 20) -> str:
    if not names:
        return "the folder is empty"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
