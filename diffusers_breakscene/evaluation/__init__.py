"""``breakscene evaluate``: the paper's protocol on images generated with a scene's handles.

For each image and its prompt, every handle in the prompt is replaced by its object's words
(a class word such as "dog", or on the toy model the words the toy evaluator reads off the
object), and two scores are taken (:mod:`.scorers`):

* **prompt similarity** of the image and the described prompt;
* **identity similarity** of each handle's object in the image and in the scene.

The images come from a folder (each ``NAME.png`` with its prompt in ``NAME.txt``, as
validation and :func:`generate_for_evaluation` write them), or are generated from a bundle.
The report (:class:`EvaluationReport`) is the same for every metric: one row per image,
means and spreads, per handle, as JSON and a markdown table.

Example:
    >>> from diffusers_breakscene.toy.world import evaluation_scenes
    >>> from diffusers_breakscene.evaluation import ToyScorer, evaluate_images, scene_of_sample
    >>> sample = evaluation_scenes()[0]
    >>> report = evaluate_images(ToyScorer(), scene_of_sample(sample),
    ...                          [("input", sample.image, "a photo of <asset0> and <asset1>")])
    >>> report.rows[0].described
    'a photo of an orange dotted square and a pink star'
    >>> round(report.summary()["identity"]["mean"], 3)
    1.0
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InvalidArgumentError, MissingFileError
from ..files import atomic_write
from .scorers import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    DEFAULT_SEGMENTER,
    ClipDinoScorer,
    Scorer,
    ToyScorer,
    masked_crop,
)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "DEFAULT_SEGMENTER",
    "ClipDinoScorer",
    "EvaluatedImage",
    "EvaluationReport",
    "Scorer",
    "ToyScorer",
    "evaluate_images",
    "generate_for_evaluation",
    "masked_crop",
    "read_image_folder",
    "scene_of_sample",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class EvaluatedImage:
    """One image's scores: ``identity`` maps each handle in its prompt to its similarity."""

    name: str
    prompt: str
    described: str
    prompt_score: float
    identity: dict[str, float] = field(default_factory=dict)


def _stats(values: Sequence[float]) -> dict[str, float]:
    values = list(values)
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "n": len(values)}


@dataclass
class EvaluationReport:
    """Scores of every image, with :meth:`summary`, :meth:`to_markdown` and :meth:`save`."""

    metric: str
    handles: dict[str, str]
    rows: list[EvaluatedImage]

    def summary(self) -> dict[str, Any]:
        """Mean, spread and count of prompt and identity similarity, overall and per handle,
        and split into images whose prompt has one handle or several."""
        identities = [v for row in self.rows for v in row.identity.values()]
        by_count: dict[str, dict[str, Any]] = {}
        for label, keep in (("one handle", lambda n: n == 1), ("several", lambda n: n > 1)):
            rows = [r for r in self.rows if keep(len(r.identity))]
            if rows:
                by_count[label] = {
                    "prompt": _stats([r.prompt_score for r in rows]),
                    "identity": _stats([v for r in rows for v in r.identity.values()]),
                }
        return {
            "metric": self.metric,
            "prompt": _stats([row.prompt_score for row in self.rows]),
            "identity": _stats(identities),
            "per_handle": {
                token: _stats([r.identity[token] for r in self.rows if token in r.identity])
                for token in self.handles
            },
            "by_handle_count": by_count,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "handles": self.handles,
            "summary": self.summary(),
            "images": [asdict(row) for row in self.rows],
        }

    def to_markdown(self) -> str:
        """The summary and one row per image, as markdown tables."""
        s = self.summary()

        def cell(stats: dict[str, float]) -> str:
            return (
                f"{stats['mean']:.3f} ± {stats['std']:.3f} (n={stats['n']})" if stats["n"] else "—"
            )

        lines = [
            f"# Evaluation ({self.metric})",
            "",
            "| handle | words | identity similarity |",
            "| --- | --- | --- |",
            *(f"| `{t}` | {w} | {cell(s['per_handle'][t])} |" for t, w in self.handles.items()),
            "",
            "| images | prompt similarity | identity similarity |",
            "| --- | --- | --- |",
            f"| all | {cell(s['prompt'])} | {cell(s['identity'])} |",
            *(
                f"| {label} | {cell(v['prompt'])} | {cell(v['identity'])} |"
                for label, v in s["by_handle_count"].items()
            ),
            "",
            "| image | prompt | prompt similarity | identity |",
            "| --- | --- | --- | --- |",
        ]
        for row in self.rows:
            ids = ", ".join(f"`{t}` {v:.3f}" for t, v in row.identity.items()) or "—"
            lines.append(f"| {row.name} | {row.prompt} | {row.prompt_score:.3f} | {ids} |")
        return "\n".join(lines) + "\n"

    def save(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``folder`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        markdown = self.to_markdown()
        json_path = atomic_write(folder / "report.json", lambda p: p.write_text(text), "report")
        md_path = atomic_write(folder / "report.md", lambda p: p.write_text(markdown), "report")
        return json_path, md_path


def _article(words: str) -> str:
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def evaluate_images(
    scorer: Scorer,
    scene: Any,
    images: Sequence[tuple[str, Image.Image, str]],
    class_words: Sequence[str | None] | None = None,
) -> EvaluationReport:
    """Score ``images`` (``(name, image, prompt)``; prompts use the scene's handles) against
    ``scene`` (a :class:`~diffusers_breakscene.Scene`): each handle is replaced by
    ``class_words[i]`` (default: what the scorer takes, see :meth:`Scorer.describe`).

    Example:
        >>> items = [("0.png", image, "a photo of <asset0>")]  # doctest: +SKIP
        >>> evaluate_images(ToyScorer(), scene, items).summary()["prompt"]  # doctest: +SKIP
        {'mean': 0.71, 'std': 0.0, 'n': 1}
    """
    tokens = list(scene.tokens)
    words = list(class_words or [])
    if len(words) > len(tokens):
        raise InvalidArgumentError(
            f"{len(words)} class words for {len(tokens)} handles {tokens}; pass one per handle."
        )
    words += [None] * (len(tokens) - len(words))
    if not images:
        raise InvalidArgumentError("no images to evaluate; pass a folder with images in it.")
    reference, masks = scene.image, scene.masks
    defaults = scene.initializer_tokens
    described_words = {
        token: scorer.describe(reference, masks[i], words[i], defaults[i])
        for i, token in enumerate(tokens)
    }
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    rows = []
    for name, image, prompt in images:
        present = [t for t in tokens if t in prompt]
        described = pattern.sub(lambda m: _article(described_words[m.group(0)]), prompt)
        identity = {
            t: scorer.identity(image, reference, masks[tokens.index(t)], described_words[t])
            for t in present
        }
        rows.append(
            EvaluatedImage(name, prompt, described, scorer.prompt(image, described), identity)
        )
    return EvaluationReport(scorer.name, described_words, rows)


def read_image_folder(
    folder: str | os.PathLike[str], prompt: str | None = None
) -> list[tuple[str, Image.Image, str]]:
    """``(name, image, prompt)`` of every image in ``folder``, sorted by name: the prompt of
    ``NAME.png`` is in ``NAME.txt``, or ``prompt`` for images without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder {folder} does not exist; pass --images FOLDER.")
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in _IMAGE_SUFFIXES or path.stem.endswith("attention"):
            continue
        text = path.with_suffix(".txt")
        this = text.read_text(encoding="utf-8").strip() if text.is_file() else prompt
        if not this:
            raise InvalidArgumentError(
                f"{path.name} has no prompt: write it into {text.name}, or pass --prompt."
            )
        with Image.open(path) as image:
            items.append((path.name, image.convert("RGB"), this))
    if not items:
        raise InvalidArgumentError(f"{folder} holds no PNG, JPEG or WebP image.")
    return items


def generate_for_evaluation(
    pipe: Any,
    prompts: Sequence[str],
    folder: str | os.PathLike[str],
    *,
    num_images: int = 4,
    steps: int = 25,
    seed: int = 0,
    size: int | None = None,
    progress: bool = True,
) -> list[tuple[str, Image.Image, str]]:
    """Generate ``num_images`` per prompt with ``pipe`` (bundles loaded) into ``folder`` as
    ``NN.png`` + ``NN.txt``, seeds ``seed``, ``seed + 1``, ...; returns them as
    :func:`read_image_folder` would."""
    from ..validation import generate_images
    from ..viz import save_png

    folder = Path(folder)
    images = generate_images(
        pipe, list(prompts), steps=steps, seed=seed, height=size, width=size,
        progress=progress, num_images=num_images,
    )  # fmt: skip
    jobs = [p for p in prompts for _ in range(num_images)]
    items = []
    for i, (prompt, image) in enumerate(zip(jobs, images, strict=True)):
        save_png(image, folder / f"{i:02d}.png")
        atomic_write(folder / f"{i:02d}.txt", lambda p, t=prompt: p.write_text(t + "\n"))
        items.append((f"{i:02d}.png", image, prompt))
    return items


def scene_of_sample(sample: Any) -> Any:
    """A :class:`~diffusers_breakscene.Scene` of a toy-world sample (its image and masks,
    handles ``<asset0>``, ...)."""
    from ..scene import Scene

    return Scene(sample.image, [m.astype("uint8") * 255 for m in sample.masks])
