"""Does the toy model draw what a prompt it never saw asks for? Generation accuracy.

The prompts are toy-world captions the base model's training data cannot hold
(:func:`unseen_prompts`): one-object prompts of a held-out (shape, colour) pair (purple circle,
orange square, ...) with a seen pattern in one of the 7 settings, and two-object prompts joining
one such object to an object of the training split; every word in them was seen in training.
:func:`generation_accuracy` generates one image per prompt and lets the toy evaluator check
each object's colour, shape and pattern (bound to the same object) and the setting.

Example:
    >>> from diffusers_breakscene.toy.prompt_check import unseen_prompts
    >>> unseen_prompts(1, 1)  # doctest: +SKIP
    ['a photo of a cyan dotted triangle on the grass', 'a photo of ... on the beach']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .model import TOY_GUIDANCE
from .world import HELDOUT_PAIRS, SETTINGS, ToyObject, caption_for, sample_object

__all__ = ["SEEN_PATTERNS", "generation_accuracy", "score_rates", "shape_rates", "unseen_prompts"]

#: Patterns of the training split (``checkered`` is held out).
SEEN_PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")


def unseen_prompts(num_one: int, num_two: int, seed: int = 0) -> list[str]:
    """``num_one`` one-object then ``num_two`` two-object prompts whose captions cannot be in
    the base model's training data (see the module docstring); deterministic by ``seed``.

    Example:
        >>> prompts = unseen_prompts(2, 1)
        >>> len(prompts), prompts[0].startswith("a photo of")
        (3, True)
    """
    rng = np.random.default_rng(seed)
    settings = list(SETTINGS)
    pairs = sorted(HELDOUT_PAIRS)
    combos = [(p, pat, s) for p in pairs for pat in SEEN_PATTERNS for s in settings]
    order = rng.permutation(len(combos))
    prompts = []
    for k in range(num_one):
        (shape, colour), pattern, setting = combos[order[k % len(combos)]]
        prompts.append(caption_for([ToyObject(shape, colour, pattern, 0.4, (0.5, 0.5))], setting))
    for _ in range(num_two):
        shape, colour = pairs[rng.integers(len(pairs))]
        held = ToyObject(shape, colour, str(rng.choice(SEEN_PATTERNS)), 0.4, (0.3, 0.3))
        while True:
            other = sample_object(rng, "train")
            if other.colour != held.colour or other.shape != held.shape:
                break
        objects = [held, other] if rng.random() < 0.5 else [other, held]
        prompts.append(caption_for(objects, str(rng.choice(settings))))
    return prompts


@torch.no_grad()
def generation_accuracy(
    pipe: Any,
    prompts: Sequence[str],
    evaluator: Any = None,
    num_inference_steps: int = 25,
    guidance_scale: float = TOY_GUIDANCE,
    seed: int = 0,
    batch_size: int = 25,
) -> tuple[dict[str, float], list[Any], list[Any]]:
    """Generate one image per prompt (seed ``seed * 100000 + index``) and score it with the toy
    evaluator (default: the shipped one). Returns ``(rates, images, scores)``: ``rates`` has
    the share of right ``colour``, ``shape`` and ``pattern`` over the prompts' objects, of right
    ``setting`` over the prompts and of prompts ``all_right``; ``scores`` are the evaluator's
    :class:`~diffusers_breakscene.toy.evaluator.PromptScore` per image.

    Example:
        >>> from diffusers_breakscene.toy.model import toy_pipeline
        >>> rates, images, _ = generation_accuracy(toy_pipeline(), unseen_prompts(2, 0),
        ...                                        num_inference_steps=2)
        >>> sorted(rates), len(images)
        (['all_right', 'colour', 'pattern', 'setting', 'shape'], 2)
    """
    from .evaluator import default_evaluator

    ev = evaluator if evaluator is not None else default_evaluator()
    images: list[Any] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo : lo + batch_size])
        gens = [torch.Generator().manual_seed(seed * 100_000 + lo + i) for i in range(len(chunk))]
        images += pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gens,
        ).images
    readings = ev.read_images(images)
    scores = [ev.prompt_accuracy(r, p) for r, p in zip(readings, prompts, strict=True)]
    return score_rates(scores), images, scores


def score_rates(scores: Sequence[Any]) -> dict[str, float]:
    """The shares of :func:`generation_accuracy`'s ``rates`` from the evaluator's
    :class:`~diffusers_breakscene.toy.evaluator.PromptScore` list: right ``colour``, ``shape``
    and ``pattern`` over all prompt objects, right ``setting`` and ``all_right`` over prompts.

    Example:
        >>> from diffusers_breakscene.toy.evaluator import default_evaluator
        >>> from diffusers_breakscene.toy.world import sample_scene
        >>> s = sample_scene(0)
        >>> score_rates([default_evaluator().prompt_accuracy(s.image, s.caption)])["all_right"]
        1.0
    """
    objects = [o for s in scores for o in s.objects]
    return {
        "colour": float(np.mean([bool(o.colour_ok) for o in objects])),
        "shape": float(np.mean([o.shape_ok for o in objects])),
        "pattern": float(np.mean([o.pattern_ok for o in objects])),
        "setting": float(np.mean([bool(s.setting_ok) for s in scores])),
        "all_right": float(np.mean([s.all_ok for s in scores])),
    }


def shape_rates(scores: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per prompted shape, from the evaluator's
    :class:`~diffusers_breakscene.toy.evaluator.PromptScore` list: its ``objects``, the share
    drawn as that shape (``shape``), and what the evaluator read (``read``: shape -> count;
    ``"none"`` when no object was matched to it). Shapes sorted.

    Example:
        >>> from diffusers_breakscene.toy.evaluator import default_evaluator
        >>> from diffusers_breakscene.toy.world import sample_scene
        >>> s = sample_scene(0, num_objects=1)
        >>> score = default_evaluator().prompt_accuracy(s.image, s.caption)
        >>> shape_rates([score])[s.objects[0].shape]["shape"]
        1.0
    """
    rows: dict[str, dict[str, Any]] = {}
    for score in scores:
        for o in score.objects:
            row = rows.setdefault(o.expected.shape, {"objects": 0, "right": 0, "read": {}})
            row["objects"] += 1
            row["right"] += int(o.shape_ok)
            read = o.matched.shape if o.matched is not None else "none"
            row["read"][read] = row["read"].get(read, 0) + 1
    return {
        shape: {"objects": r["objects"], "shape": r["right"] / r["objects"], "read": r["read"]}
        for shape, r in sorted(rows.items())
    }
