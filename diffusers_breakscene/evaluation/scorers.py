"""The two scores of the paper's protocol, behind one interface (:class:`Scorer`):

* **prompt similarity**: how well an image shows its prompt, with each handle replaced by its
  object's words;
* **identity similarity**: how alike a generated object and the input object are.

:class:`ClipDinoScorer` is the paper's choice for real photos: CLIP's image-text cosine, and
DINO's (``[CLS]``) cosine between the input object masked out of its photo and the generated
object segmented by CLIPSeg from its class word. :class:`ToyScorer` gives the toy evaluator the
same interface: its prompt accuracy and its object embeddings.

Example:
    >>> from diffusers_breakscene.toy.world import evaluation_scenes
    >>> s = evaluation_scenes()[0]
    >>> scorer = ToyScorer()
    >>> scorer.describe(s.image, s.masks[0], None, "square")
    'orange dotted square'
    >>> round(scorer.identity(s.image, s.image, s.masks[0], "square"), 3)
    1.0
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "DEFAULT_SEGMENTER",
    "ClipDinoScorer",
    "Scorer",
    "ToyScorer",
    "masked_crop",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""CLIP for prompt similarity (the paper's protocol uses CLIP ViT-L/14)."""
DEFAULT_DINO_MODEL = "facebook/dinov2-base"
"""DINO for identity similarity (any ``AutoModel`` ViT whose first token is ``[CLS]``)."""
DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
"""CLIPSeg, which finds the generated object from its class word."""

_GRAY = (127, 127, 127)


class Scorer(Protocol):
    """What :func:`~diffusers_breakscene.evaluation.evaluate_images` needs of a metric."""

    name: str

    def describe(
        self, image: Image.Image, mask: np.ndarray, word: str | None, default: str | None = None
    ) -> str:
        """The words that replace a handle in prompts: ``word`` (the user's class word) when
        given, else what this metric takes (read off the object, or ``default``, the handle's
        initializer word)."""

    def prompt(self, image: Image.Image, prompt: str) -> float:
        """Prompt similarity of ``image`` and ``prompt`` (handles already replaced)."""

    def identity(
        self, image: Image.Image, reference: Image.Image, mask: np.ndarray, word: str
    ) -> float:
        """Identity similarity of the object ``word`` in ``image`` and ``mask`` of
        ``reference``."""


def masked_crop(image: Image.Image, mask: np.ndarray | None, margin: float = 0.1) -> Image.Image:
    """``image`` with everything outside ``mask`` gray, cropped to the mask's box plus a
    ``margin`` (a fraction of the box), square; the whole image when the mask is empty or
    ``None``.

    Example:
        >>> m = np.zeros((40, 40), bool); m[10:20, 10:30] = True
        >>> masked_crop(Image.new("RGB", (40, 40), "red"), m).size
        (22, 22)
    """
    image = image.convert("RGB")
    if mask is None or not np.asarray(mask).any():
        return image
    mask = np.asarray(mask, bool)
    if mask.shape != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST))
    arr = np.asarray(image).copy()
    arr[~mask] = _GRAY
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + margin) / 2
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    return Image.fromarray(arr).crop(box)  # outside the photo: black, as PIL pads


def _load(model_cls: Any, processor_cls: Any, source: Any, flag: str) -> tuple[Any, Any]:
    """A transformers model and its processor, or an error naming ``source`` and ``flag``."""
    from ..errors import MissingFileError

    try:
        return (
            model_cls.from_pretrained(str(source)).eval(),
            processor_cls.from_pretrained(str(source)),
        )
    except OSError as error:
        raise MissingFileError(
            f"cannot load {source!r} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"pass {flag} with a local folder or a Hub id you can download."
        ) from error


class ToyScorer:
    """The toy evaluator (:mod:`diffusers_breakscene.toy.evaluator`) as a :class:`Scorer`:
    prompt accuracy (the share of a toy prompt's attributes the image shows) and its object
    embeddings' cosine. A handle is replaced by the words the evaluator reads off its object.
    """

    name = "toy"

    def __init__(self, evaluator: Any = None) -> None:
        from ..toy.evaluator import default_evaluator

        self.evaluator = evaluator or default_evaluator()

    def describe(
        self, image: Image.Image, mask: np.ndarray, word: str | None, default: str | None = None
    ) -> str:
        return word or self.evaluator.describe_object(image, mask)

    def prompt(self, image: Image.Image, prompt: str) -> float:
        return float(self.evaluator.prompt_accuracy(image, prompt).fraction)

    def identity(
        self, image: Image.Image, reference: Image.Image, mask: np.ndarray, word: str
    ) -> float:
        return float(self.evaluator.identity_similarity(image, reference, mask))


class ClipDinoScorer:
    """The paper's metrics through transformers: CLIP image-text cosine for prompt similarity;
    DINO ``[CLS]`` cosine between masked object crops for identity similarity.

    Args:
        clip_model: ``CLIPModel`` id or folder.
        dino_model: an ``AutoModel`` ViT (DINOv2 or DINO) id or folder.
        segmenter: ``CLIPSegForImageSegmentation`` id or folder that segments the generated
            object from its class word; ``None`` compares the whole generated image.
        threshold: CLIPSeg probability above which a pixel is the object.
        device: where the models run (default: CUDA when present).

    Example:
        >>> scorer = ClipDinoScorer()  # doctest: +SKIP
        >>> scorer.prompt(image, "a photo of a dog on the beach")  # doctest: +SKIP
        0.27
    """

    name = "clip-dino"

    def __init__(
        self,
        clip_model: str | os.PathLike[str] = DEFAULT_CLIP_MODEL,
        dino_model: str | os.PathLike[str] = DEFAULT_DINO_MODEL,
        segmenter: str | os.PathLike[str] | None = DEFAULT_SEGMENTER,
        *,
        threshold: float = 0.4,
        device: str | torch.device | None = None,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.threshold = float(threshold)
        self.clip, self.clip_processor = _load(CLIPModel, CLIPProcessor, clip_model, "--clip-model")
        self.dino, self.dino_processor = _load(
            AutoModel, AutoImageProcessor, dino_model, "--dino-model"
        )
        self.segmenter = self.segmenter_processor = None
        if segmenter is not None:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            self.segmenter, self.segmenter_processor = _load(
                CLIPSegForImageSegmentation, CLIPSegProcessor, segmenter, "--segmenter"
            )
            self.segmenter.to(self.device)
        self.clip.to(self.device)
        self.dino.to(self.device)

    def describe(
        self, image: Image.Image, mask: np.ndarray, word: str | None, default: str | None = None
    ) -> str:
        word = word or default
        if not word:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError(
                "CLIP/DINO metrics need a class word per handle (e.g. 'dog'): pass --class-word "
                "once per handle, or keep initializer_tokens in the scene's scene.json."
            )
        return word

    @torch.inference_mode()
    def prompt(self, image: Image.Image, prompt: str) -> float:
        inputs = self.clip_processor(
            text=[prompt], images=[image.convert("RGB")], return_tensors="pt", padding=True,
            truncation=True,
        ).to(self.device)  # fmt: skip
        out = self.clip(**inputs)
        return float(torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds))

    @torch.inference_mode()
    def segment(self, image: Image.Image, word: str) -> np.ndarray | None:
        """The pixels of ``image`` that CLIPSeg gives to ``word`` (``None`` without a
        segmenter)."""
        if self.segmenter is None:
            return None
        inputs = self.segmenter_processor(
            text=[word], images=[image.convert("RGB")], return_tensors="pt", padding=True
        ).to(self.device)
        logits = self.segmenter(**inputs).logits.reshape(1, 1, *inputs.pixel_values.shape[-2:])
        probs = torch.sigmoid(logits.float())
        probs = torch.nn.functional.interpolate(probs, size=(image.height, image.width))
        return (probs[0, 0] > self.threshold).cpu().numpy()

    @torch.inference_mode()
    def _embed(self, picture: Image.Image) -> torch.Tensor:
        inputs = self.dino_processor(images=[picture], return_tensors="pt").to(self.device)
        return self.dino(**inputs).last_hidden_state[:, 0]

    def identity(
        self, image: Image.Image, reference: Image.Image, mask: np.ndarray, word: str
    ) -> float:
        generated = masked_crop(image, self.segment(image, word))
        ref = masked_crop(reference, mask)
        a, b = self._embed(generated), self._embed(ref)
        return float(torch.nn.functional.cosine_similarity(a, b))
