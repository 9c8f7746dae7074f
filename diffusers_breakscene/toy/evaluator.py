"""A learned evaluator for the toy world, in the roles the paper gives CLIP and DINO.

Break-A-Scene measures *prompt similarity* (does the image show what the prompt says? CLIP) and
*identity similarity* (is the generated object the same object as in the input scene? DINO).
In the toy world both are read by three small CNNs trained on rendered scenes
(:mod:`diffusers_breakscene.toy.train_evaluator`; weights shipped in
``diffusers_breakscene/assets/toy/evaluator``):

* the **reader** looks at a whole 64x64 image and gives its setting (7-way), the number of
  objects, and on a 16x16 grid of cells the presence of every attribute, pair and identity
  (their maximum over the cells is the image-level presence, :attr:`ImageReading.presence`);
* the **crop reader** reads the objects: :func:`colour_regions` cuts the image into one-colour
  regions (exact on rendered images: an object, touching objects of one colour, or a piece of
  an object cut in two), and the crop reader gives every (shape, pattern) pair present in each
  region's crop, surroundings included in version 3 (see :class:`ImageReading`);
* the **embedder** maps an object crop (background blacked out, cropped to the mask's bounding
  square, resized to 32x32, the mask as a 4th channel) to a unit vector. It is trained as a
  cosine classifier over the 6 x 8 x 4 = 192 identities (shape, colour, pattern), so two crops
  of one object in any pose, size, angle and setting are close, crops of different objects far.

:meth:`ToyEvaluator.prompt_accuracy` checks every attribute of a toy-world prompt against the
reading; :meth:`ToyEvaluator.identity_similarity` finds the objects of a generated image by
colour (:meth:`ToyEvaluator.find_objects`) and compares them with a reference object.

Why this module is over 500 lines: the three networks, prompt parsing, the result records and
the scoring live together; the networks are the part to move to their own module next.

Example:
    >>> from diffusers_breakscene.toy.evaluator import default_evaluator
    >>> from diffusers_breakscene.toy.world import sample_scene
    >>> ev = default_evaluator()
    >>> s = sample_scene(12345, split="any")
    >>> score = ev.prompt_accuracy(s.image, s.caption)
    >>> score.setting_ok, len(score.objects) == len(s.objects), 0.0 <= score.fraction <= 1.0
    (True, True, True)
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..errors import InvalidArgumentError, MissingFileError, fail
from ..mask_ops import dilate, erode
from ..mask_ops import regions as connected_regions
from .world import (
    COLOURS,
    MAX_OBJECTS,
    PATTERNS,
    SETTINGS,
    SHAPES,
    ToyObject,
    caption_for,
    render_background,
)

__all__ = [
    "CROP_SIZE",
    "DEFAULT_EVALUATOR_PATH",
    "IMAGE_SIZE",
    "LABEL_NAMES",
    "NUM_IDENTITIES",
    "NUM_LABELS",
    "NUM_SHAPE_PATTERNS",
    "VERSION",
    "CropReader",
    "EmbedNet",
    "IdentityMatch",
    "ImageReading",
    "ObjectScore",
    "PromptObject",
    "PromptScore",
    "ReadObject",
    "ReaderNet",
    "ToyEvaluator",
    "cell_distribution",
    "cell_log_probs",
    "colour_regions",
    "crop_object",
    "default_evaluator",
    "describe",
    "identity_index",
    "identity_label_table",
    "parse_prompt",
    "presence_probs",
]

#: Side of the images the reader sees (other sizes are resized).
IMAGE_SIZE = 64
#: Side of the object crops the embedder sees.
CROP_SIZE = 32
#: The shipped weights.
DEFAULT_EVALUATOR_PATH = Path(__file__).resolve().parent.parent / "assets" / "toy" / "evaluator"
WEIGHTS_NAME = "evaluator.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "diffusers-breakscene-toy-evaluator"
#: Version 2: objects read per one-colour region by :class:`CropReader`. Version 3 adds the
#: config keys ``merge`` and ``crop_context``/``crop_margin`` (absent: version 2's behaviour).
VERSION = 3

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SETTING_NAMES: tuple[str, ...] = tuple(SETTINGS)
_NS, _NC, _NP = len(SHAPES), len(COLOUR_NAMES), len(PATTERNS)
#: Identities: (shape, colour, pattern), index ``shape * 32 + colour * 4 + pattern``.
NUM_IDENTITIES = _NS * _NC * _NP

# Label layout of the reader's presence logits.
_OFF_S = 0
_OFF_C = _OFF_S + _NS
_OFF_P = _OFF_C + _NC
_OFF_SC = _OFF_P + _NP
_OFF_SP = _OFF_SC + _NS * _NC
_OFF_CP = _OFF_SP + _NS * _NP
_OFF_T = _OFF_CP + _NC * _NP
#: Number of presence labels: 6 + 8 + 4 singles, 48 + 24 + 32 pairs, 192 identities.
NUM_LABELS = _OFF_T + NUM_IDENTITIES


def identity_index(shape: str, colour: str, pattern: str) -> int:
    """Index of an identity (0-191).

    Example:
        >>> identity_index("circle", "red", "plain"), identity_index("ring", "pink", "checkered")
        (0, 191)
    """
    s, c, p = SHAPES.index(shape), COLOUR_NAMES.index(colour), PATTERNS.index(pattern)
    return s * _NC * _NP + c * _NP + p


def _identity_words(index: int) -> tuple[str, str, str]:
    s, rest = divmod(int(index), _NC * _NP)
    c, p = divmod(rest, _NP)
    return SHAPES[s], COLOUR_NAMES[c], PATTERNS[p]


def _label_names() -> tuple[str, ...]:
    names = list(SHAPES) + list(COLOUR_NAMES) + list(PATTERNS)
    names += [f"{s}+{c}" for s in SHAPES for c in COLOUR_NAMES]
    names += [f"{s}+{p}" for s in SHAPES for p in PATTERNS]
    names += [f"{c}+{p}" for c in COLOUR_NAMES for p in PATTERNS]
    names += [f"{s}+{c}+{p}" for s in SHAPES for c in COLOUR_NAMES for p in PATTERNS]
    return tuple(names)


#: Name of each presence label: ``"star"``, ``"red"``, ``"striped"``, ``"star+red"``,
#: ``"star+striped"``, ``"red+striped"``, ``"star+red+striped"``.
LABEL_NAMES: tuple[str, ...] = _label_names()
_LABEL_INDEX = {name: i for i, name in enumerate(LABEL_NAMES)}


@functools.lru_cache(maxsize=1)
def _label_table_np() -> np.ndarray:
    table = np.zeros((NUM_IDENTITIES + 1, NUM_LABELS), dtype=np.float32)
    for k in range(NUM_IDENTITIES):
        s, c, p = _identity_words(k)
        for name in (s, c, p, f"{s}+{c}", f"{s}+{p}", f"{c}+{p}", f"{s}+{c}+{p}"):
            table[k, _LABEL_INDEX[name]] = 1.0
    return table


def identity_label_table() -> torch.Tensor:
    """``(193, NUM_LABELS)`` 0/1 table: row ``k`` holds the 7 presence labels that identity ``k``
    turns on; the last row (index 192, "no object") is all zeros. A scene's labels are the
    maximum of its objects' rows.

    Example:
        >>> t = identity_label_table()
        >>> t.shape, int(t[0].sum()), int(t[-1].sum())
        (torch.Size([193, 314]), 7, 0)
    """
    return torch.from_numpy(_label_table_np().copy())


# -- networks ---------------------------------------------------------------------------------


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


class ReaderNet(nn.Module):
    """Whole-image reader: ``(B, 3, 64, 64)`` in [0, 1] -> cell logits ``(B, 19, 16, 16)``,
    setting logits ``(B, 7)`` and object-count logits ``(B, 3)``.

    Each 4x4-pixel cell holds a distribution over "background" and the 192 identities, with
    factorised logits (background; 6 shape, 8 colour, 4 pattern logits: an identity's logit is
    the sum of its three attributes' logits), see :func:`cell_distribution`. Presence
    probabilities of attributes, pairs and identities are their maxima over the cells
    (:func:`presence_probs`).

    Example:
        >>> cells, setting, count = ReaderNet()(torch.rand(2, 3, 64, 64))
        >>> tuple(cells.shape), tuple(setting.shape), tuple(count.shape)
        ((2, 19, 16, 16), (2, 7), (2, 3))
    """

    def __init__(self, widths: Sequence[int] = (32, 48, 96), hidden: int = 128) -> None:
        super().__init__()
        a, b, c = (int(w) for w in widths)
        self.stage1 = nn.Sequential(_cbr(3, a, 4, 2, 1), _cbr(a, a))  # 32x32
        self.stage2 = nn.Sequential(_cbr(a, b, 3, 2, 1), _cbr(b, b))  # 16x16
        self.stage3 = nn.Sequential(_cbr(b, c, 3, 2, 1), _cbr(c, c), _cbr(c, c))  # 8x8
        self.cells = nn.Sequential(
            nn.Conv2d(b + c, hidden, 1), nn.ReLU(True), nn.Conv2d(hidden, _CELL_LOGITS, 1)
        )
        self.scene = nn.Sequential(
            nn.Linear(2 * c, hidden), nn.ReLU(True), nn.Linear(hidden, len(SETTINGS) + MAX_OBJECTS)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h2 = self.stage2(self.stage1((images - 0.5) / 0.25))
        h3 = self.stage3(h2)
        up = F.interpolate(h3, size=h2.shape[-2:], mode="nearest")
        cells = self.cells(torch.cat([h2, up], 1))
        scene = self.scene(torch.cat([h3.mean((2, 3)), h3.amax((2, 3))], 1))
        return cells, scene[:, : len(SETTINGS)], scene[:, len(SETTINGS) :]


_CELL_LOGITS = 1 + _NS + _NC + _NP


def cell_log_probs(
    cells: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of a cell map ``(B, 19, H, W)``: ``log p(background)`` ``(B, H, W)``
    and the log-softmaxes of the shape, colour and pattern logits, plus ``log p(object)``;
    ``p(identity s, c, p) = p(object) p(s) p(c) p(p)``."""
    z_bg = cells[:, 0]
    a, b, d = cells[:, 1 : 1 + _NS], cells[:, 1 + _NS : 1 + _NS + _NC], cells[:, 1 + _NS + _NC :]
    lse = torch.logsumexp(a, 1) + torch.logsumexp(b, 1) + torch.logsumexp(d, 1)
    log_z = torch.logaddexp(z_bg, lse)
    return (
        z_bg - log_z,
        lse - log_z,
        torch.log_softmax(a, 1),
        torch.log_softmax(b, 1),
        torch.log_softmax(d, 1),
    )


def cell_distribution(cells: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(p_object, p_shape, p_colour, p_pattern)`` of a cell map: ``(B, H, W)``, ``(B, 6, H, W)``,
    ``(B, 8, H, W)``, ``(B, 4, H, W)``.

    Example:
        >>> p_obj, ps, pc, pp = cell_distribution(torch.zeros(1, 19, 2, 2))
        >>> round(float(p_obj[0, 0, 0]), 3), round(float(ps.sum(1)[0, 0, 0]), 3)
        (0.995, 1.0)
    """
    _, log_obj, ls, lc, lp = cell_log_probs(cells)
    return log_obj.exp(), ls.exp(), lc.exp(), lp.exp()


def presence_probs(cells: torch.Tensor) -> torch.Tensor:
    """Image-level presence probability ``(B, NUM_LABELS)`` of every label of
    :data:`LABEL_NAMES`: the maximum over the cells of the probability that the cell shows an
    object with that attribute / pair / identity.

    Example:
        >>> presence_probs(torch.zeros(2, 19, 16, 16)).shape
        torch.Size([2, 314])
    """
    p_obj, ps, pc, pp = cell_distribution(cells)
    o = p_obj[:, None]
    sc = ps[:, :, None] * pc[:, None]  # (B, 6, 8, H, W)
    sp = ps[:, :, None] * pp[:, None]
    cp = pc[:, :, None] * pp[:, None]
    scp = sc[:, :, :, None] * pp[:, None, None]  # (B, 6, 8, 4, H, W)
    n = len(cells)
    parts = [
        o * ps,
        o * pc,
        o * pp,
        o * sc.reshape(n, -1, *cells.shape[-2:]),
        o * sp.reshape(n, -1, *cells.shape[-2:]),
        o * cp.reshape(n, -1, *cells.shape[-2:]),
        o * scp.reshape(n, -1, *cells.shape[-2:]),
    ]
    return torch.cat([x.amax((2, 3)) for x in parts], 1)


def _crop_features(widths: Sequence[int]) -> nn.Sequential:
    """The convolutional trunk shared by :class:`EmbedNet` and :class:`CropReader`:
    ``(B, 4, 32, 32)`` crops -> ``(B, widths[2], 8, 8)``."""
    a, b, c = (int(w) for w in widths)
    return nn.Sequential(
        _cbr(4, a),  # 32x32
        _cbr(a, b, 3, 2, 1),  # 16x16
        _cbr(b, b),
        _cbr(b, c, 3, 2, 1),  # 8x8
        _cbr(c, c),
    )


def _pooled_features(features: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Normalised crops through ``features``, then mean- and max-pooled: ``(B, 2 * channels)``."""
    x = crops.clone()
    x[:, :3] = (x[:, :3] - 0.25) / 0.25
    h = features(x)
    return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class EmbedNet(nn.Module):
    """Object-crop embedder: ``(B, 4, 32, 32)`` crops (see :func:`crop_object`) -> unit vectors
    ``(B, dim)``; :meth:`logits` is the cosine classifier over the 192 identities it is trained
    with (``scale * cos(embedding, class weight)``).

    Example:
        >>> e = EmbedNet()(torch.rand(2, 4, 32, 32))
        >>> tuple(e.shape), bool(torch.allclose(e.norm(dim=1), torch.ones(2)))
        ((2, 128), True)
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 96), dim: int = 128) -> None:
        super().__init__()
        c = int(widths[-1])
        self.features = _crop_features(widths)
        self.project = nn.Linear(2 * c, dim)
        self.classes = nn.Parameter(torch.randn(NUM_IDENTITIES, dim) * 0.1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(_pooled_features(self.features, crops)), dim=1)

    def logits(self, embeddings: torch.Tensor, scale: float = 16.0) -> torch.Tensor:
        """Cosine-classifier logits of unit ``embeddings``."""
        return scale * embeddings @ F.normalize(self.classes, dim=1).T


#: Labels of the crop reader: (shape, pattern) pairs, index ``shape * 4 + pattern``.
NUM_SHAPE_PATTERNS = _NS * _NP


class CropReader(nn.Module):
    """Object-region reader: ``(B, 4, 32, 32)`` crops of one-colour regions (see
    :func:`crop_object`) -> ``(B, 24)`` logits, one independent probability per
    (shape, pattern) pair present in the region. A region is usually one object; touching
    objects of one colour make one region with several pairs, a ring cut in two by another
    object makes two regions with the same pair.

    Example:
        >>> tuple(CropReader()(torch.rand(2, 4, 32, 32)).shape)
        (2, 24)
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 96), hidden: int = 128) -> None:
        super().__init__()
        c = int(widths[-1])
        self.features = _crop_features(widths)
        self.head = nn.Sequential(
            nn.Linear(2 * c, hidden), nn.ReLU(True), nn.Linear(hidden, NUM_SHAPE_PATTERNS)
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(_pooled_features(self.features, crops))


# -- inputs -----------------------------------------------------------------------------------


def _to_array(image: Any, name: str = "image") -> np.ndarray:
    """An RGB image as float32 ``(H, W, 3)`` in [0, 1]."""
    fix = "pass a PIL image, an HxWx3 uint8/float numpy array or a 3xHxW float tensor in [0, 1]"
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float32)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            fail(InvalidArgumentError, f"{name} is a tensor of shape {tuple(image.shape)}", fix)
        arr = t.permute(1, 2, 0).numpy()
        if arr.min() < -0.01:  # [-1, 1] convention
            arr = (arr + 1.0) / 2.0
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
            fail(InvalidArgumentError, f"{name} is an array of shape {image.shape}", fix)
        if image.dtype == np.uint8:
            return image.astype(np.float32) / 255.0
        if np.issubdtype(image.dtype, np.floating):
            return np.clip(image, 0.0, 1.0).astype(np.float32)
        fail(InvalidArgumentError, f"{name} is an array of dtype {image.dtype}", fix)
    fail(InvalidArgumentError, f"{name} is a {type(image).__name__}, not an image", fix)


def _resize(arr: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _to_mask(mask: Any, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """A bool ``(H, W)`` mask of an image of ``shape``."""
    if isinstance(mask, Image.Image):
        m = np.asarray(mask.convert("L"))
    elif isinstance(mask, torch.Tensor):
        m = mask.detach().cpu().numpy()
    elif isinstance(mask, np.ndarray):
        m = mask
    else:
        fail(
            InvalidArgumentError,
            f"{name} is a {type(mask).__name__}",
            "pass an HxW bool/uint8 numpy array, tensor or PIL 'L' image",
        )
    m = np.squeeze(m)
    if m.shape != tuple(shape):
        fail(
            InvalidArgumentError,
            f"{name} has shape {m.shape} but its image is {tuple(shape)}",
            "pass one HxW mask of the same height and width as the image",
        )
    if m.dtype != bool:
        m = m.astype(np.float32)
        m = m > (0.5 if m.max() <= 1.0 else 127.0)
    if not m.any():
        fail(InvalidArgumentError, f"{name} is empty", "pass a mask that covers the object")
    return m


def crop_object(
    image: Any, mask: Any, size: int = CROP_SIZE, context: bool = False, margin: int = 1
) -> torch.Tensor:
    """The embedder's input for one object: ``(4, size, size)`` float, RGB in [0, 1] with the
    pixels outside ``mask`` set to 0, then the mask; cropped to the mask's bounding square (plus
    ``margin`` pixels each side, zero-padded at image borders) and resized (bilinear,
    antialiased). With ``context`` the pixels outside the mask keep their colour (the crop
    reader of evaluators saved with ``"crop_context": true`` sees what covers a region's object).

    Example:
        >>> from diffusers_breakscene.toy.world import sample_scene
        >>> s = sample_scene(0)
        >>> tuple(crop_object(s.image, s.masks[0]).shape)
        (4, 32, 32)
    """
    arr = image if isinstance(image, np.ndarray) and image.dtype == np.float32 else None
    if arr is None or arr.ndim != 3:
        arr = _to_array(image)
    m = _to_mask(mask, arr.shape[:2])
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(y1 - y0, x1 - x0) + 2 * margin
    top = (y0 + y1 - side) // 2
    left = (x0 + x1 - side) // 2
    canvas = np.zeros((side, side, 4), dtype=np.float32)
    h, w = m.shape
    sy0, sy1 = max(top, 0), min(top + side, h)
    sx0, sx1 = max(left, 0), min(left + side, w)
    region = m[sy0:sy1, sx0:sx1]
    pixels = arr[sy0:sy1, sx0:sx1]
    canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left, :3] = (
        pixels if context else pixels * region[..., None]
    )
    canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left, 3] = region
    t = torch.from_numpy(canvas).permute(2, 0, 1)[None]
    mode = dict(mode="bilinear", align_corners=False, antialias=side > size)
    return F.interpolate(t, size=(size, size), **mode)[0]


# -- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptObject:
    """One object a prompt asks for. ``colour`` is ``None`` when the prompt names none (then it
    is not checked); an unnamed pattern means ``"plain"`` (the toy world never writes it).

    Example:
        >>> PromptObject("star", "red", "striped").words
        ['red', 'striped', 'star']
    """

    shape: str
    colour: str | None
    pattern: str = "plain"

    @property
    def words(self) -> list[str]:
        """The object's words in caption order (``plain`` left out)."""
        words = [self.colour] if self.colour else []
        return words + ([self.pattern] if self.pattern != "plain" else []) + [self.shape]


def parse_prompt(prompt: str) -> tuple[list[PromptObject], str | None]:
    """The objects and setting (``None`` if the prompt names none) of a toy-world prompt.

    Each shape word closes one object; the colour and pattern words since the previous shape
    word are its attributes. Other words (``a``, ``photo``, ``of``, ``and``...) are ignored. The
    setting is the last setting phrase of :data:`~diffusers_breakscene.toy.world.SETTINGS` in
    the prompt (``"on the beach"``, ...).

    Example:
        >>> objs, setting = parse_prompt("a red striped star and a blue ring on the beach")
        >>> [o.words for o in objs], setting
        ([['red', 'striped', 'star'], ['blue', 'ring']], 'beach')
    """
    if not isinstance(prompt, str):
        fail(InvalidArgumentError, f"prompt is a {type(prompt).__name__}", "pass a string")
    if re.search(r"<[^>]*>", prompt):
        fail(
            InvalidArgumentError,
            f"prompt {prompt!r} contains a handle token",
            "replace every handle by its object's words first, e.g. with describe()",
        )
    words = re.findall(r"[a-z]+", prompt.lower())
    text = " " + " ".join(words) + " "
    setting, at = None, -1
    for key, phrase in SETTINGS.items():
        pos = text.rfind(" " + phrase + " ")
        if pos > at:
            setting, at = key, pos
    if setting is not None:
        words = (text[:at] + " " + text[at + len(SETTINGS[setting]) + 1 :]).split()
    objects: list[PromptObject] = []
    colour: str | None = None
    pattern: str | None = None
    for word in words:
        if word in COLOURS:
            if colour is not None:
                fail(
                    InvalidArgumentError,
                    f"prompt {prompt!r} gives two colours ({colour}, {word}) to one object",
                    "give each object one colour word before its shape word",
                )
            colour = word
        elif word in PATTERNS:
            if pattern is not None:
                fail(
                    InvalidArgumentError,
                    f"prompt {prompt!r} gives two patterns ({pattern}, {word}) to one object",
                    "give each object one pattern word before its shape word",
                )
            pattern = word
        elif word in SHAPES:
            objects.append(PromptObject(word, colour, pattern or "plain"))
            colour = pattern = None
    if colour is not None or pattern is not None:
        fail(
            InvalidArgumentError,
            f"prompt {prompt!r} has {colour or pattern!r} without a shape word after it",
            f"name the object's shape ({', '.join(SHAPES)}) after its colour and pattern",
        )
    if not objects:
        fail(
            InvalidArgumentError,
            f"prompt {prompt!r} names no object",
            f"name at least one shape ({', '.join(SHAPES)}), e.g. 'a photo of a red star'",
        )
    return objects, setting


def describe(objects: Sequence[Any], setting: str | None = None) -> str:
    """A toy-world prompt for ``objects`` (:class:`~diffusers_breakscene.toy.world.ToyObject`,
    :class:`ReadObject`, :class:`PromptObject` or ``(shape, colour, pattern)`` tuples), e.g. to
    replace ``<asset0>`` handles by their objects' words before
    :meth:`ToyEvaluator.prompt_accuracy`.

    Example:
        >>> describe([("star", "red", "striped"), ("ring", "blue", "plain")], "beach")
        'a photo of a red striped star and a blue ring on the beach'
    """
    toys = []
    for obj in objects:
        if isinstance(obj, ToyObject):
            toys.append(obj)
            continue
        if isinstance(obj, tuple) and len(obj) == 3:
            shape, colour, pattern = obj
        elif isinstance(obj, ReadObject | PromptObject):
            shape, colour, pattern = obj.shape, obj.colour, obj.pattern
        else:
            fail(
                InvalidArgumentError,
                f"objects holds a {type(obj).__name__}",
                "pass ToyObject, ReadObject or (shape, colour, pattern) tuples",
            )
        toys.append(ToyObject(shape, colour, pattern, 0.3, (0.5, 0.5)))
    if setting is not None and setting not in SETTINGS:
        fail(InvalidArgumentError, f"setting={setting!r}", f"use one of {sorted(SETTINGS)}")
    return caption_for(toys, setting)


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadObject:
    """An object the reader found: its attributes and a confidence ``score`` in [0, 1].

    Example:
        >>> ReadObject("star", "red", "plain", 0.99).words
        ['red', 'star']
    """

    shape: str
    colour: str
    pattern: str
    score: float = 1.0

    @property
    def words(self) -> list[str]:
        """The object's words in caption order (``plain`` left out)."""
        return [self.colour] + ([self.pattern] if self.pattern != "plain" else []) + [self.shape]


@dataclass(frozen=True)
class ImageReading:
    """What the reader sees in one image.

    * ``setting``: the most likely setting, ``setting_probs``: all 7 probabilities.
    * ``objects``: the objects read, most confident first. The image is cut into one-colour
      regions (:func:`colour_regions`, with the predicted setting's background colours); the
      :class:`CropReader` gives every (shape, pattern) pair present in each region (all pairs
      over 0.5, at least the likeliest); each is an object of the region's colour. An identity
      read in several regions counts once when the regions, grown by one pixel, join directly
      or through other objects (an object cut in two), and once per such group otherwise
      (evaluators before version 3, without ``"merge": "connected"``: once). ``score``: its
      probability.
    * ``presence``: image-level probability of every label of :data:`LABEL_NAMES`.
    * ``count_probs``: probabilities of 1, 2, 3 objects.

    Example:
        >>> r = ImageReading("beach", {"beach": 1.0}, (ReadObject("star", "red", "plain"),),
        ...                  {"star": 0.9}, (1.0, 0.0, 0.0))
        >>> r.probability(shape="star")
        0.9
    """

    setting: str
    setting_probs: dict[str, float]
    objects: tuple[ReadObject, ...]
    presence: dict[str, float] = field(repr=False)
    count_probs: tuple[float, float, float]

    def probability(
        self, shape: str | None = None, colour: str | None = None, pattern: str | None = None
    ) -> float:
        """Image-level presence probability of an attribute, pair or identity, e.g.
        ``probability(shape="star", colour="red")``: "is there a red star?"."""
        parts = [x for x in (shape, colour, pattern) if x is not None]
        if not parts:
            fail(InvalidArgumentError, "no attribute given", "pass shape, colour and/or pattern")
        name = "+".join(parts)
        if name not in self.presence:
            fail(InvalidArgumentError, f"unknown attribute combination {name!r}", "use toy words")
        return self.presence[name]


@dataclass(frozen=True)
class ObjectScore:
    """How one prompt object came out: ``matched`` is the read object it is paired with (``None``
    when the image has fewer objects than the prompt: every check fails); ``*_ok`` compare the
    prompt's attribute with the matched object's (``colour_ok`` is ``None`` when the prompt gives
    no colour)."""

    expected: PromptObject
    matched: ReadObject | None
    shape_ok: bool
    colour_ok: bool | None
    pattern_ok: bool

    @property
    def checks(self) -> list[bool]:
        """The checked attributes' results (shape, colour if named, pattern)."""
        return [c for c in (self.shape_ok, self.colour_ok, self.pattern_ok) if c is not None]

    @property
    def all_ok(self) -> bool:
        """Whether every checked attribute is right."""
        return all(self.checks)


@dataclass(frozen=True)
class PromptScore:
    """The result of :meth:`ToyEvaluator.prompt_accuracy`.

    ``fraction`` = (right checks) / (checks): per prompt object its shape, colour (if named) and
    pattern, plus the setting if the prompt names one. ``all_ok``: every check is right.
    ``count_ok``: the reader found as many objects as the prompt names (not in ``fraction``).
    ``strict_fraction`` also counts objects the prompt does not name: each read object beyond the
    prompt's number adds three failed checks (its shape, colour and pattern), so an image
    cluttered with objects cannot pass by offering many to pair with.
    """

    prompt: str
    objects: tuple[ObjectScore, ...]
    setting: str | None
    predicted_setting: str
    setting_ok: bool | None
    count_ok: bool
    reading: ImageReading = field(repr=False)

    @property
    def checks(self) -> list[bool]:
        """Every check, objects first, then the setting."""
        out = [c for o in self.objects for c in o.checks]
        return out + ([self.setting_ok] if self.setting_ok is not None else [])

    @property
    def fraction(self) -> float:
        """Fraction of right checks (see the class docstring)."""
        checks = self.checks
        return sum(checks) / len(checks)

    @property
    def all_ok(self) -> bool:
        """Whether every check is right."""
        return all(self.checks)

    @property
    def extra_objects(self) -> int:
        """How many more objects the reader found than the prompt names (0 when fewer)."""
        return max(0, len(self.reading.objects) - len(self.objects))

    @property
    def strict_fraction(self) -> float:
        """Right checks / (checks + 3 per extra object): :attr:`fraction` with every object the
        prompt does not name counted as three wrong checks (see the class docstring)."""
        checks = self.checks
        return sum(checks) / (len(checks) + 3 * self.extra_objects)


@dataclass(frozen=True)
class IdentityMatch:
    """The result of :meth:`ToyEvaluator.identity_match`: the best cosine ``similarity`` and the
    mask of the generated image's object it was found at (``None`` if no object was found)."""

    similarity: float
    mask: np.ndarray | None = field(repr=False)
    num_candidates: int = 0


# -- the evaluator ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _object_palette() -> tuple[np.ndarray, np.ndarray]:
    colours, names = [], []
    for k, rgb in enumerate(COLOURS.values()):
        colours += [rgb, tuple(v // 2 for v in rgb)]
        names += [k, k]
    return np.array(colours, dtype=np.float32) / 255.0, np.array(names)


@functools.cache
def _background_palette(setting: str) -> np.ndarray:
    colours = {
        tuple(int(v) for v in rgb)
        for seed in range(4)
        for rgb in render_background(setting, IMAGE_SIZE, seed).reshape(-1, 3)
    }
    return np.array(sorted(colours), dtype=np.float32) / 255.0


def colour_regions(image: Any, setting: str, min_area: int = 12) -> list[tuple[np.ndarray, int]]:
    """The one-colour regions of a toy-world image: ``(mask, colour index)`` pairs, largest
    first (``mask``: bool, 64x64; colour index into the world's colours).

    Each pixel takes the nearest colour among the ``setting``'s background colours and the 16
    object colours (8 colours and their half-bright pattern shades; both shades count as one
    colour). The 8-connected regions of one object colour that keep at least ``min_area``
    pixels after a 1-pixel erosion (which removes thin blending halos of generated images) are
    kept. On rendered images a region is one object, or several touching objects of one colour,
    or a part of an object cut in two by another.

    Example:
        >>> from diffusers_breakscene.toy.world import render_scene, ToyObject
        >>> s = render_scene([ToyObject("star", "red", "plain", 0.45, (0.5, 0.5))], "gray")
        >>> [(int(m.sum()) == int(s.masks[0].sum()), COLOUR_NAMES[k])
        ...  for m, k in colour_regions(s.image, "gray")]
        [(True, 'red')]
    """
    arr = _resize(_to_array(image, "image"))
    if setting not in SETTINGS:
        fail(InvalidArgumentError, f"setting={setting!r}", f"use one of {sorted(SETTINGS)}")
    obj_rgb, obj_name = _object_palette()
    bg = _background_palette(setting)
    pixels = arr.reshape(-1, 3)
    d_obj = ((pixels[:, None] - obj_rgb[None]) ** 2).sum(-1)
    d_bg = ((pixels[:, None] - bg[None]) ** 2).sum(-1).min(1)
    nearest = d_obj.argmin(1)
    label = np.where(d_obj.min(1) < d_bg, obj_name[nearest], -1).reshape(arr.shape[:2])
    regions = []
    for k in np.unique(label[label >= 0]):
        for comp in connected_regions(label == k, connectivity=8):
            if erode(comp).sum() >= min_area:
                regions.append((comp, int(k)))
    return sorted(regions, key=lambda r: -int(r[0].sum()))


def _object_groups(masks: list[np.ndarray]) -> list[int]:
    """For each region, the index of its group: regions grown by one pixel that join, directly
    or through other regions' pixels, share a group. An identity read in two regions of one group
    is one object (cut in two by another object); in two groups, two objects."""
    if len(masks) < 2:
        return [0] * len(masks)
    grown = np.zeros_like(masks[0])
    for m in masks:
        grown |= dilate(m)
    components = connected_regions(grown, connectivity=8)
    return [next(i for i, c in enumerate(components) if c[m].any()) for m in masks]


class ToyEvaluator:
    """Reads toy-world images (prompt similarity) and compares objects (identity similarity).

    Load the shipped weights with :meth:`load` or :func:`default_evaluator`. Runs on CPU; all
    methods are inference only.

    Example:
        >>> from diffusers_breakscene.toy.world import render_scene, ToyObject
        >>> ev = ToyEvaluator.load()
        >>> s = render_scene([ToyObject("star", "red", "striped", 0.45, (0.5, 0.5), 10)], "beach")
        >>> reading = ev.read_image(s.image)
        >>> reading.setting, [o.colour for o in reading.objects]
        ('beach', ['red'])
    """

    def __init__(
        self,
        reader: ReaderNet,
        embedder: EmbedNet,
        crop_reader: CropReader,
        config: dict[str, Any],
    ) -> None:
        self.reader = reader.eval()
        self.embedder = embedder.eval()
        self.crop_reader = crop_reader.eval()
        self.config = config

    # loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> ToyEvaluator:
        """Load an evaluator folder (``evaluator.safetensors`` + ``config.json``, as written by
        :mod:`~diffusers_breakscene.toy.train_evaluator`); ``None``: the shipped weights.

        Example:
            >>> ToyEvaluator.load().config["format"]
            'diffusers-breakscene-toy-evaluator'
        """
        folder = Path(path) if path is not None else DEFAULT_EVALUATOR_PATH
        weights, cfg_file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
        for f in (weights, cfg_file):
            if not f.is_file():
                fail(
                    MissingFileError,
                    f"evaluator file {f} does not exist",
                    "pass a folder written by python -m diffusers_breakscene.toy.train_evaluator",
                )
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        if config.get("format") != FORMAT or "crop_reader" not in config:
            fail(
                InvalidArgumentError,
                f"{cfg_file} is not a toy evaluator config of version {VERSION}",
                "retrain it with python -m diffusers_breakscene.toy.train_evaluator",
            )
        if int(config.get("version", 1)) > VERSION:
            fail(
                InvalidArgumentError,
                f"{cfg_file} is version {config['version']}, newer than this library reads "
                f"({VERSION})",
                "upgrade diffusers-breakscene",
            )
        nets = {
            "reader": ReaderNet(**config["reader"]),
            "embedder": EmbedNet(**config["embedder"]),
            "crop_reader": CropReader(**config["crop_reader"]),
        }
        state = load_file(str(weights))
        for name, net in nets.items():
            prefix = f"{name}."
            net.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        return cls(nets["reader"], nets["embedder"], nets["crop_reader"], config)

    # reading --------------------------------------------------------------------------------

    def _read_regions(
        self, regions: list[list[tuple[np.ndarray, int]]], arrays: list[np.ndarray]
    ) -> list[tuple[ReadObject, ...]]:
        """Objects of each image from its one-colour regions (see :class:`ImageReading`)."""
        context = bool(self.config.get("crop_context", False))
        margin = int(self.config.get("crop_margin", 1))
        crops = [
            crop_object(arr, m, context=context, margin=margin)
            for arr, rs in zip(arrays, regions, strict=True)
            for m, _ in rs
        ]
        if not crops:
            return [() for _ in regions]
        probs = torch.sigmoid(self.crop_reader(torch.stack(crops))).double().numpy()
        threshold = float(self.config.get("crop_threshold", 0.5))
        connected = self.config.get("merge", "always") == "connected"
        out, row = [], 0
        for rs in regions:
            # (identity, group) -> score; the group tells apart two regions of one identity
            found: dict[tuple[tuple[str, str, str], int], float] = {}
            groups = _object_groups([m for m, _ in rs]) if connected else [0] * len(rs)
            for (_, colour), group in zip(rs, groups, strict=True):
                p = probs[row]
                row += 1
                pairs = np.nonzero(p > threshold)[0]
                for k in pairs if len(pairs) else [int(p.argmax())]:
                    key = ((SHAPES[k // _NP], COLOUR_NAMES[colour], PATTERNS[k % _NP]), group)
                    found[key] = max(found.get(key, 0.0), float(p[k]))
            objects = [ReadObject(*ident, score) for (ident, _), score in found.items()]
            out.append(tuple(sorted(objects, key=lambda o: -o.score)))
        return out

    @torch.inference_mode()
    def _run_reader(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole-image reader on 64x64 arrays: presence, setting and count probabilities."""
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        cells, setting_logits, count_logits = self.reader(batch)
        return (
            presence_probs(cells).double().numpy(),
            torch.softmax(setting_logits.double(), 1).numpy(),
            torch.softmax(count_logits.double(), 1).numpy(),
        )

    @torch.inference_mode()
    def read_images(self, images: Sequence[Any], batch_size: int = 256) -> list[ImageReading]:
        """:meth:`read_image` for many images, batched.

        Example:
            >>> from diffusers_breakscene.toy.world import sample_scene
            >>> len(default_evaluator().read_images([sample_scene(i).image for i in range(3)]))
            3
        """
        if isinstance(images, Image.Image | np.ndarray | torch.Tensor | str):
            fail(InvalidArgumentError, "images is a single image", "pass a list of images")
        arrays = [_resize(_to_array(im, f"images[{i}]")) for i, im in enumerate(images)]
        out: list[ImageReading] = []
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start : start + batch_size]
            presence, setting_p, count_p = self._run_reader(chunk)
            settings = [SETTING_NAMES[int(np.argmax(p))] for p in setting_p]
            regions = [
                colour_regions(arr, setting, int(self.config.get("min_area", 12)))
                for arr, setting in zip(chunk, settings, strict=True)
            ]
            read = self._read_regions(regions, chunk)
            for i in range(len(chunk)):
                objects = read[i]
                probs = presence[i]
                out.append(
                    ImageReading(
                        setting=settings[i],
                        setting_probs=dict(zip(SETTING_NAMES, setting_p[i].tolist(), strict=True)),
                        objects=objects,
                        presence={n: float(p) for n, p in zip(LABEL_NAMES, probs, strict=True)},
                        count_probs=tuple(float(v) for v in count_p[i]),
                    )
                )
        return out

    def read_image(self, image: Any) -> ImageReading:
        """Read one image (PIL, ``HxWx3`` numpy or ``3xHxW`` tensor in [0, 1]; resized to 64x64):
        its setting, objects and attribute presences (see :class:`ImageReading`).

        Example:
            >>> from diffusers_breakscene.toy.world import render_scene, ToyObject
            >>> s = render_scene([ToyObject("ring", "blue", "dotted", 0.45, (0.5, 0.5))], "snow")
            >>> r = default_evaluator().read_image(s.image)
            >>> r.setting, [o.words for o in r.objects], r.probability(shape="ring") > 0.5
            ('snow', [['blue', 'dotted', 'ring']], True)
        """
        return self.read_images([image])[0]

    # prompt similarity ----------------------------------------------------------------------

    def prompt_accuracy(self, image: Any, prompt: str) -> PromptScore:
        """Check every attribute of a toy-world ``prompt`` in ``image`` (an image or an
        :class:`ImageReading` from :meth:`read_image`).

        The prompt is parsed by :func:`parse_prompt` (no ``<assetN>`` handles: replace them by
        the objects' words first, e.g. with :func:`describe`). Each prompt object is paired with
        a different read object (:attr:`ImageReading.objects`), choosing the one-to-one pairing
        with the most agreeing attributes (ties: the most agreeing shapes, then colours); prompt
        objects left without a partner (the image shows fewer objects) fail every check. Then,
        per prompt object, ``shape_ok`` / ``colour_ok`` / ``pattern_ok`` say whether its
        partner has that attribute, so an attribute counts only when it is on the *same* object
        (binding): "a red star and a blue ring" read as a blue star and a red ring gets both
        shapes right and both colours wrong. ``setting_ok``: the predicted setting is the
        prompt's. ``fraction`` is the share of right checks, ``all_ok`` whether all are right.

        Example:
            >>> from diffusers_breakscene.toy.world import render_scene, ToyObject
            >>> s = render_scene([ToyObject("star", "red", "plain", 0.45, (0.3, 0.3)),
            ...                   ToyObject("ring", "blue", "plain", 0.45, (0.7, 0.7))], "beach")
            >>> score = default_evaluator().prompt_accuracy(
            ...     s.image, "a photo of a red star and a green ring in the snow")
            >>> [o.colour_ok for o in score.objects], score.setting_ok
            ([True, False], False)
            >>> len(score.checks)  # 2 x (shape, colour, pattern) + setting
            7
        """
        objects, setting = parse_prompt(prompt)
        reading = image if isinstance(image, ImageReading) else self.read_image(image)
        read = list(reading.objects)
        n, m = len(objects), len(read)

        def agree(p: PromptObject, r: ReadObject) -> tuple[int, int, int]:
            s = int(p.shape == r.shape)
            c = int(p.colour is not None and p.colour == r.colour)
            return (s + c + int(p.pattern == r.pattern), s, c)

        best: tuple[tuple[int, int, int], tuple[int | None, ...]] | None = None
        slots: list[int | None] = [*range(m), *([None] * n)]
        for perm in itertools.permutations(slots, n):
            if any(a is not None and perm.count(a) > 1 for a in perm):
                continue
            total = [0, 0, 0]
            for p, a in zip(objects, perm, strict=True):
                if a is not None:
                    total = [t + v for t, v in zip(total, agree(p, read[a]), strict=True)]
            key = (total[0], total[1], total[2])
            if best is None or key > best[0]:
                best = (key, perm)
        assert best is not None
        scores = []
        for p, a in zip(objects, best[1], strict=True):
            r = read[a] if a is not None else None
            scores.append(
                ObjectScore(
                    expected=p,
                    matched=r,
                    shape_ok=r is not None and r.shape == p.shape,
                    colour_ok=None if p.colour is None else r is not None and r.colour == p.colour,
                    pattern_ok=r is not None and r.pattern == p.pattern,
                )
            )
        return PromptScore(
            prompt=prompt,
            objects=tuple(scores),
            setting=setting,
            predicted_setting=reading.setting,
            setting_ok=None if setting is None else reading.setting == setting,
            count_ok=m == n,
            reading=reading,
        )

    # identity similarity --------------------------------------------------------------------

    @torch.inference_mode()
    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(N, dim)`` of :func:`crop_object` crops ``(N, 4, 32, 32)``."""
        if crops.ndim != 4 or crops.shape[1:] != (4, CROP_SIZE, CROP_SIZE):
            fail(
                InvalidArgumentError,
                f"crops has shape {tuple(crops.shape)}",
                f"pass crop_object() crops stacked as (N, 4, {CROP_SIZE}, {CROP_SIZE})",
            )
        return self.embedder(crops.float())

    def embed_object(self, image: Any, mask: Any) -> torch.Tensor:
        """Unit embedding ``(dim,)`` of the object under ``mask`` (HxW, same size as the image).

        Example:
            >>> from diffusers_breakscene.toy.world import sample_scene
            >>> s = sample_scene(0)
            >>> tuple(default_evaluator().embed_object(s.image, s.masks[0]).shape)
            (128,)
        """
        arr = _to_array(image, "image")
        return self.embed_crops(crop_object(arr, _to_mask(mask, arr.shape[:2]))[None])[0]

    def find_objects(
        self, image: Any, setting: str | None = None, min_area: int = 12
    ) -> list[np.ndarray]:
        """Masks (bool, 64x64, largest first) of the objects of an image without known masks:
        the one-colour regions of :func:`colour_regions` (``setting``: the reader's prediction
        when ``None``); touching objects of one colour come out as one.

        Example:
            >>> from diffusers_breakscene.toy.world import sample_scene
            >>> s = sample_scene(3, num_objects=1)
            >>> masks = default_evaluator().find_objects(s.image)
            >>> len(masks), bool((masks[0] == s.masks[0]).all())
            (1, True)
        """
        arr = _resize(_to_array(image, "image"))
        if setting is None:  # the reader's setting alone; the objects are not read here
            setting = SETTING_NAMES[int(np.argmax(self._run_reader([arr])[1][0]))]
        return [mask for mask, _ in colour_regions(arr, setting, min_area)]

    def identity_match(
        self, generated: Any, reference_image: Any, reference_mask: Any
    ) -> IdentityMatch:
        """:meth:`identity_similarity` with the mask of the best-matching object."""
        ref = self.embed_object(reference_image, reference_mask)
        arr = _resize(_to_array(generated, "generated"))
        masks = self.find_objects(arr)
        if not masks:
            return IdentityMatch(0.0, None, 0)
        emb = self.embed_crops(torch.stack([crop_object(arr, m) for m in masks]))
        sims = emb @ ref
        k = int(torch.argmax(sims))
        return IdentityMatch(float(sims[k]), masks[k], len(masks))

    def identity_similarity(
        self, generated: Any, reference_image: Any, reference_mask: Any
    ) -> float:
        """Cosine similarity (in [-1, 1]) between the embedding of the reference object (the
        ``reference_mask`` crop of ``reference_image``) and the best-matching object of
        ``generated``: the maximum over the objects :meth:`find_objects` finds. **0.0** when it
        finds none (e.g. an empty scene).

        Example:
            >>> from diffusers_breakscene.toy.world import render_scene, ToyObject
            >>> ref = render_scene([ToyObject("heart", "red", "dotted", 0.4, (0.4, 0.5))], "gray")
            >>> same = render_scene([ToyObject("heart", "red", "dotted", 0.3, (0.6, 0.4), 15)],
            ...                     "beach")
            >>> other = render_scene([ToyObject("star", "blue", "plain", 0.3, (0.6, 0.4))], "beach")
            >>> ev = default_evaluator()
            >>> (ev.identity_similarity(same.image, ref.image, ref.masks[0])
            ...  > ev.identity_similarity(other.image, ref.image, ref.masks[0]))
            True
        """
        return self.identity_match(generated, reference_image, reference_mask).similarity

    @torch.inference_mode()
    def describe_object(self, image: Any, mask: Any) -> str:
        """The words of the object under ``mask`` ("orange dotted square"): the colour of the
        one-colour region that covers most of the mask, and its (shape, pattern) as the crop
        reader reads them; what ``breakscene evaluate --model toy`` puts in place of a handle.

        Example:
            >>> from diffusers_breakscene.toy.world import render_scene, ToyObject
            >>> s = render_scene([ToyObject("star", "red", "striped", 0.45, (0.5, 0.5))], "gray")
            >>> default_evaluator().describe_object(s.image, s.masks[0])
            'red striped star'
        """
        arr = _resize(_to_array(image, "image"))
        target = _to_mask(mask, arr.shape[:2])
        regions = colour_regions(arr, self.read_image(arr).setting)
        best = max(regions, key=lambda r: int((r[0] & target).sum()), default=None)
        if best is None or not (best[0] & target).any():
            fail(
                InvalidArgumentError,
                "no toy-world object is under the mask",
                "pass a toy-world image and the mask of one of its objects",
            )
        ((read, *_),) = self._read_regions([[best]], [arr])
        return " ".join(read.words)

    def identity_similarity_masks(
        self, image_a: Any, mask_a: Any, image_b: Any, mask_b: Any
    ) -> float:
        """Cosine similarity of two objects given by their masks.

        Example:
            >>> from diffusers_breakscene.toy.world import sample_scene
            >>> s = sample_scene(0)
            >>> round(default_evaluator().identity_similarity_masks(
            ...     s.image, s.masks[0], s.image, s.masks[0]), 4)
            1.0
        """
        a = self.embed_object(image_a, mask_a)
        b = self.embed_object(image_b, mask_b)
        return float(a @ b)


@functools.lru_cache(maxsize=1)
def default_evaluator() -> ToyEvaluator:
    """The shipped :class:`ToyEvaluator`, loaded once and cached.

    Example:
        >>> default_evaluator() is default_evaluator()
        True
    """
    return ToyEvaluator.load()
