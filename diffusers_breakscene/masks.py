"""Masks without leaving Python: one proposed mask per object of a photo.

Two ways, both ending in a :class:`MaskProposal` (masks, a preview picture, a scene folder):

* :func:`masks_from_words`: from words ("a dog", "a hat"), with the base model's own
  cross-attention. The photo is encoded, noised at a few timesteps, and denoised once per step
  with the prompt "a photo of a dog and a hat" while an
  :class:`~diffusers_breakscene.AttentionStore` records where each phrase's tokens attend. The
  maps are averaged, normalised, and each pixel goes to the phrase that attends to it most (when
  it attends enough: Otsu's threshold per map); each mask keeps its largest connected region,
  with holes filled. No extra weights are needed.
* :func:`masks_from_sam`: with Segment Anything through transformers (``SamModel``,
  ``SamProcessor``; model id configurable) from one point or one box per object, for users who
  have those weights.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> image = Image.new("RGB", (32, 32), "white")
    >>> proposal = MaskProposal(image, ["a cup"], [np.eye(32, dtype=bool)])
    >>> proposal.initializer_words()
    ['cup']
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .conditioning import tokenize
from .errors import InvalidArgumentError, MissingFileError
from .files import atomic_write, check_output_dir
from .mask_ops import erode, regions
from .scene_inputs import ImageInput, load_image

__all__ = [
    "DEFAULT_SAM_MODEL",
    "MaskProposal",
    "check_scene_folder",
    "masks_from_sam",
    "masks_from_words",
    "refine_mask",
]

DEFAULT_SAM_MODEL = "facebook/sam-vit-base"
"""The Segment Anything checkpoint :func:`masks_from_sam` loads when none is named."""

_ARTICLES = {"a", "an", "the"}
_WORK_SIDE = 256  # refinement runs at this size (longer side), then masks go back to the photo's
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60)]  # fmt: skip


@dataclass
class MaskProposal:
    """Proposed masks for one photo: ``masks[i]`` (bool, the photo's size) is the object that
    ``labels[i]`` names; ``soft`` holds the attention maps they came from (``[0, 1]``, the
    photo's size) when they came from words.
    """

    image: Image.Image
    labels: list[str]
    masks: list[np.ndarray]
    soft: list[np.ndarray] = field(default_factory=list, repr=False)

    def initializer_words(self) -> list[str]:
        """One word per label for ``initializer_tokens``: its last word ("a red cup" -> "cup")."""
        return [label.split()[-1] if label.split() else label for label in self.labels]

    def preview(self, alpha: float = 0.45) -> Image.Image:
        """The photo with each mask tinted in its own colour and outlined, and a legend below
        (the sheet is widened when a label is longer than the photo is wide).

        Example:
            >>> import numpy as np
            >>> from PIL import Image
            >>> m = np.zeros((32, 32), bool); m[4:12, 4:12] = True
            >>> sheet = MaskProposal(Image.new("RGB", (32, 32)), ["a cup"], [m]).preview()
            >>> sheet.width > 32 and sheet.height > 32  # "mask0: a cup" does not fit in 32 px
            True
        """
        from PIL import ImageDraw

        base = np.asarray(self.image.convert("RGB"), dtype=np.float32)
        out = base.copy()
        for k, mask in enumerate(self.masks):
            colour = np.array(_COLOURS[k % len(_COLOURS)], dtype=np.float32)
            out[mask] = (1 - alpha) * out[mask] + alpha * colour
            edge = mask & ~erode(mask)
            out[edge] = colour
        picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
        line = 14
        texts = [f"mask{k}: {label}" for k, label in enumerate(self.labels)]
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        width = max([picture.width, *(16 + math.ceil(measure.textlength(t)) + 4 for t in texts)])
        legend = Image.new("RGB", (width, line * len(texts) + 4), "white")
        draw = ImageDraw.Draw(legend)
        for k, text in enumerate(texts):
            colour = _COLOURS[k % len(_COLOURS)]
            draw.rectangle((2, 2 + k * line, 12, 12 + k * line), fill=colour)
            draw.text((16, 1 + k * line), text, fill=(0, 0, 0))
        sheet = Image.new("RGB", (width, picture.height + legend.height), "white")
        sheet.paste(picture, (0, 0))
        sheet.paste(legend, (0, picture.height))
        return sheet

    def to_scene(self, **scene_kwargs: Any) -> Any:
        """A :class:`~diffusers_breakscene.Scene` of the photo and these masks (initializer
        words from the labels unless ``initializer_tokens`` is given)."""
        from .scene import Scene

        scene_kwargs.setdefault("initializer_tokens", self.initializer_words())
        return Scene(self.image, [m.astype(np.uint8) * 255 for m in self.masks], **scene_kwargs)

    def save_scene_dir(self, folder: str | os.PathLike[str], *, preview: bool = True) -> Path:
        """Write a scene folder ready for ``breakscene train --scene-dir``: ``img.png``,
        ``mask0.png``, ... (white object on black), ``scene.json`` with the initializer words,
        and ``preview.png``. Files are written atomically; an existing folder that already holds
        ``img.*`` or ``mask*.png`` is refused (nothing is overwritten)."""
        path = check_scene_folder(folder)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "img.png", lambda p: self.image.save(p, format="PNG"), "image")
        for k, mask in enumerate(self.masks):
            picture = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            atomic_write(path / f"mask{k}.png", lambda p, m=picture: m.save(p, format="PNG"))
        text = json.dumps({"initializer_tokens": self.initializer_words()}, indent=2) + "\n"
        atomic_write(path / "scene.json", lambda p: p.write_text(text, encoding="utf-8"))
        if preview:
            sheet = self.preview()
            atomic_write(path / "preview.png", lambda p: sheet.save(p, format="PNG"), "preview")
        return path


def check_scene_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a path if a new scene can be written there: it may exist, but not hold an
    ``img.*`` or ``mask*`` file already (proposed masks never overwrite a user's masks)."""
    path = Path(folder)
    check_output_dir(path, "scene folder")
    if path.is_dir():
        clash = sorted(
            p.name for p in path.iterdir() if p.name.lower().startswith(("img.", "mask"))
        )
        if clash:
            raise InvalidArgumentError(
                f"scene folder {path} already holds {clash[:4]}; choose an empty or new folder "
                "(masks are never overwritten)."
            )
    return path


# -- from words ---------------------------------------------------------------------------------


@torch.no_grad()
def masks_from_words(
    pipe: Any,
    image: ImageInput,
    words: Sequence[str],
    *,
    resolution: int | None = None,
    timesteps: Sequence[float] = (0.2, 0.35, 0.5),
    seeds: Sequence[int] = (0, 1),
    resolution_divisor: int | Sequence[int] = 4,
    prompt_template: str = "a photo of {}",
) -> MaskProposal:
    """Propose one mask per phrase of ``words`` from ``pipe``'s cross-attention on ``image``.

    Args:
        pipe: an SD-family pipeline (its VAE, UNet, text encoder and tokenizer are used; nothing
            is changed).
        image: the photo (anything :class:`~diffusers_breakscene.Scene` accepts).
        words: one phrase per object ("a dog", "red hat"); articles are left out of the
            attention.
        resolution: side of the square the photo is resized to (default: the pipeline's).
        timesteps: noise levels, as fractions of the training schedule, at which attention is
            recorded (one denoising call each per seed). The defaults (this, 2 seeds,
            latent/4) measured best in the toy world (``benchmarks/masks.py``).
        seeds: noise draws per timestep.
        resolution_divisor: the cross-attention level recorded (latent / divisor, as the
            training loss's), or several levels whose maps are averaged.
        prompt_template: the phrases joined with "and" go into its ``{}``.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> import numpy as np
        >>> photo = np.zeros((48, 64, 3), np.uint8)
        >>> proposal = masks_from_words(tiny_pipeline("sd1"), photo, ["a cup", "a bowl"],
        ...                             resolution=32, seeds=[0])
        >>> [m.shape for m in proposal.masks]
        [(48, 64), (48, 64)]
    """
    from diffusers import DDPMScheduler

    from .attention import AttentionStore
    from .viz import _normalise, token_attention_maps

    phrases = _check_words(words)
    photo = load_image(image)
    side = resolution or pipe.unet.config.sample_size * (
        2 ** (len(pipe.vae.config.block_out_channels) - 1)
    )
    prompt = prompt_template.replace("{}", " and ".join(phrases))
    positions = _phrase_positions(pipe.tokenizer, prompt, phrases)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    pixels = torch.from_numpy(
        np.asarray(photo.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    )
    pixels = (pixels.permute(2, 0, 1)[None] / 127.5 - 1.0).to(device, pipe.vae.dtype)
    latent = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = tokenize(pipe.tokenizer, [prompt]).to(device)
    text = pipe.text_encoder(ids)[0].to(dtype)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    total = scheduler.config.num_train_timesteps
    levels = [resolution_divisor] if isinstance(resolution_divisor, int) else resolution_divisor
    soft = [np.zeros((photo.height, photo.width), np.float32) for _ in phrases]
    for level in levels:
        store = AttentionStore.attach(pipe.unet, resolution_divisor=int(level))
        try:
            for fraction in timesteps:
                t = torch.tensor([min(total - 1, max(0, round(float(fraction) * total)))])
                for seed in seeds:
                    generator = torch.Generator().manual_seed(seed)
                    noise = torch.randn(latent.shape, generator=generator)
                    noisy = scheduler.add_noise(latent.float().cpu(), noise, t)
                    pipe.unet(noisy.to(device, dtype), t.to(device), encoder_hidden_states=text)
            maps = store.aggregate(over_steps=True)[0]
        finally:
            store.detach()
        per_phrase = token_attention_maps(maps, positions).cpu().numpy()  # (K, h, w)
        for k, m in enumerate(per_phrase):
            soft[k] += _to_size(_normalise(m), photo.size) / len(levels)
    masks = _assign(soft, phrases)
    return MaskProposal(photo, phrases, masks, soft)


def _check_words(words: Sequence[str]) -> list[str]:
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise InvalidArgumentError(
            f"words must be a non-empty list with one phrase per object, got {words!r}; e.g. "
            "['a dog', 'a hat']."
        )
    phrases = []
    for i, word in enumerate(words):
        if not isinstance(word, str) or not _content(word):
            raise InvalidArgumentError(
                f"words[{i}] = {word!r} names nothing; give a word or phrase, e.g. 'a dog'."
            )
        phrases.append(" ".join(word.split()))
    return phrases


def _content(phrase: str) -> list[str]:
    return [w for w in phrase.lower().split() if w not in _ARTICLES]


def _phrase_positions(tokenizer: Any, prompt: str, phrases: list[str]) -> list[list[int]]:
    """Prompt positions of each phrase's content words (articles left out), in order."""
    ids = tokenizer(prompt, padding="max_length", truncation=True).input_ids
    out, start = [], 0
    for phrase in phrases:
        wanted = tokenizer(" ".join(_content(phrase)), add_special_tokens=False).input_ids
        found = []
        for token in wanted:
            for i in range(start, len(ids)):
                if ids[i] == token:
                    found.append(i)
                    start = i + 1
                    break
        if not found:
            raise InvalidArgumentError(
                f"{phrase!r} is not in the prompt {prompt!r} after truncation; use fewer or "
                "shorter phrases."
            )
        out.append(found)
    return out


def _to_size(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized (bilinear) to ``size`` = (width, height)."""
    picture = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(picture.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _assign(soft: list[np.ndarray], labels: list[str]) -> list[np.ndarray]:
    """Hard masks: each pixel to the phrase that attends most, where it is above that map's Otsu
    threshold; refined (largest region, holes filled) at a working size, then resized back."""
    height, width = soft[0].shape
    scale = min(1.0, _WORK_SIDE / max(height, width))
    work = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.stack([_to_size(s, work) for s in soft])
    winner = small.argmax(axis=0)
    out = []
    for k, label in enumerate(labels):
        inside = (winner == k) & (small[k] >= _otsu(small[k]))
        if not inside.any():
            # nothing wins for this phrase: fall back to its own strongest region
            inside = small[k] >= 0.9 * small[k].max()
            warnings.warn(
                f"{label!r}: other phrases attend more everywhere; its mask is only its own "
                "strongest region. Check it in the preview.",
                UserWarning,
                stacklevel=4,  # the caller of masks_from_words (through torch.no_grad)
            )
        refined = refine_mask(inside)
        out.append(_to_size(refined.astype(np.float32), (width, height)) > 0.5)
    return out


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the split with the largest between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    prob = hist / max(1, hist.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(prob)
    mean = np.cumsum(prob * centres)
    total = mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * weight - mean) ** 2 / (weight * (1 - weight))
    between = np.nan_to_num(between)
    return float(edges[int(np.argmax(between)) + 1])


def refine_mask(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a bool mask, with its holes filled.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((8, 8), bool); m[1:6, 1:6] = True; m[3, 3] = False; m[7, 7] = True
        >>> refined = refine_mask(m)
        >>> bool(refined[3, 3]), bool(refined[7, 7]), int(refined.sum())
        (True, False, 25)
    """
    mask = np.asarray(mask, dtype=bool)
    found = regions(mask)
    if not found:
        return mask.copy()
    largest = max(found, key=lambda r: int(r.sum()))
    # holes: background regions that do not touch the border
    outside = np.zeros_like(mask)
    for region in regions(~largest):
        if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
            outside |= region
    return ~outside


# -- Segment Anything -------------------------------------------------------------------------


@torch.no_grad()
def masks_from_sam(
    image: ImageInput,
    *,
    points: Sequence[tuple[float, float]] | None = None,
    boxes: Sequence[tuple[float, float, float, float]] | None = None,
    labels: Sequence[str] | None = None,
    model: str | os.PathLike[str] = DEFAULT_SAM_MODEL,
    device: str | torch.device | None = None,
    **from_pretrained: Any,
) -> MaskProposal:
    """One mask per object from Segment Anything (``transformers.SamModel``), prompted with one
    point ``(x, y)`` or one box ``(x0, y0, x1, y1)`` per object, in the photo's pixels.

    Args:
        image: the photo.
        points: one ``(x, y)`` per object (give ``points`` or ``boxes``).
        boxes: one ``(x0, y0, x1, y1)`` per object.
        labels: one name per object (default ``object0``, ...); they become the preview's
            legend and the initializer words of :meth:`MaskProposal.save_scene_dir`.
        model: a SAM checkpoint: Hub id or local folder (``SamModel.from_pretrained``).
        device: where SAM runs (default: CUDA when available).
        from_pretrained: more arguments for ``from_pretrained`` (``revision``, ``cache_dir``).

    Example:
        >>> proposal = masks_from_sam("photo.jpg", boxes=[(10, 20, 200, 220)],
        ...                           labels=["dog"])  # doctest: +SKIP
        >>> proposal.save_scene_dir("my_scene")  # doctest: +SKIP
    """
    from transformers import SamModel, SamProcessor

    if (points is None) == (boxes is None):
        raise InvalidArgumentError(
            "masks_from_sam needs either points=[(x, y), ...] or boxes=[(x0, y0, x1, y1), ...] "
            "(one per object), not both and not neither."
        )
    prompts = list(points if points is not None else boxes)  # type: ignore[arg-type]
    size = 2 if points is not None else 4
    what = "points" if points is not None else "boxes"
    if not prompts:
        raise InvalidArgumentError(f"{what} is empty; give one per object.")
    photo = load_image(image)
    for i, item in enumerate(prompts):
        values = list(item) if isinstance(item, Sequence) else []
        if len(values) != size or not all(isinstance(v, int | float) for v in values):
            raise InvalidArgumentError(
                f"{what}[{i}] = {item!r} must be {size} numbers "
                f"({'x, y' if size == 2 else 'x0, y0, x1, y1'}) in the photo's pixels."
            )
        inside_x = all(0 <= x <= photo.width for x in values[0::2])
        if not (inside_x and all(0 <= y <= photo.height for y in values[1::2])):
            raise InvalidArgumentError(
                f"{what}[{i}] = {item!r} is outside the {photo.width}x{photo.height} photo."
            )
    names = list(labels) if labels is not None else [f"object{i}" for i in range(len(prompts))]
    if len(names) != len(prompts):
        raise InvalidArgumentError(
            f"got {len(prompts)} {what} but {len(names)} labels; give one label per object."
        )
    source = Path(model).expanduser()
    if source.exists() and not (source / "config.json").is_file():
        raise MissingFileError(f"{model} has no config.json; pass a SAM model folder or Hub id.")
    kwargs = {"local_files_only": True} if source.exists() else {}
    processor = SamProcessor.from_pretrained(str(model), **kwargs, **from_pretrained)
    sam = SamModel.from_pretrained(str(model), **kwargs, **from_pretrained).eval()
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sam.to(target)
    if points is not None:
        inputs = processor(photo, input_points=[[[list(p)] for p in prompts]], return_tensors="pt")
    else:
        inputs = processor(photo, input_boxes=[[list(b) for b in prompts]], return_tensors="pt")
    inputs = {k: v.to(target) if torch.is_tensor(v) else v for k, v in inputs.items()}
    outputs = sam(**inputs, multimask_output=False)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
        inputs["reshaped_input_sizes"].cpu(),
    )[0]  # fmt: skip
    result = [m[0].numpy().astype(bool) for m in masks]  # (objects, 1, H, W)
    empty = [names[i] for i, m in enumerate(result) if not m.any()]
    if empty:
        warnings.warn(
            f"SAM found nothing for {empty}; move the point onto the object or widen the box.",
            UserWarning,
            stacklevel=2,
        )
    return MaskProposal(photo, names, result)
