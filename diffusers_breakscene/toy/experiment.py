"""Break-A-Scene on the toy world: train on one evaluation scene, generate, and score.

One scene of :func:`~diffusers_breakscene.toy.world.evaluation_scenes` is learned with a
configuration (``"ours"``: the default, scaled to the toy model by :func:`toy_config`;
``"phase1"``: handles only, the paper's TI-m) or not learned at all (``"base"``: the base model
prompted with the objects' own words, the closest a prompt can get without handles; ``"init"``:
the handles added at their starting point, the mean embedding of their initializer words, and not
trained: what training adds to the handles' start). Then every
prompt of :data:`ONE_HANDLE_PROMPTS` (each handle in new settings) and
:data:`TWO_HANDLE_PROMPTS` (two handles recombined) is generated with a few seeds and scored by
the toy evaluator:

* **identity similarity**: for each handle of the prompt, the evaluator's cosine between its
  object in the input scene (masked) and the best-matching object of the generated image;
* **prompt accuracy**: the evaluator's :meth:`~diffusers_breakscene.toy.evaluator.ToyEvaluator.
  prompt_accuracy` of the image against the prompt with each handle replaced by its object's
  words ("a photo of a red checkered heart in the snow"): the fraction of right attributes
  (shape, colour, pattern of each object, and the setting); **strict accuracy** also counts
  every object read beyond the prompt's as three wrong checks (:attr:`~diffusers_breakscene.toy.
  evaluator.PromptScore.strict_fraction`), since the pairing takes the best of the read objects
  and a cluttered image would otherwise pass by chance;
* **attribute checks** (:attr:`Generation.checks`): for each handle of the prompt, whether its
  object came out with the right shape, colour and pattern. :func:`attribute_rates` pools them
  by kind, the held-out shape and pattern apart from the trained ones
  (:data:`ATTRIBUTE_KINDS`): does a handle draw what the base model's words cannot say?

With ``article=True`` every handle takes an article, as the toy model's captions always do:
training prompts read "a photo of a <asset0> and a <asset1>" (:data:`ARTICLE_TEMPLATE`,
:data:`ARTICLE_JOINER`) and generation prompts "a photo of a <asset0> in the snow". The default
(no article) is the paper's prompt form; on the toy model the article alone is worth about 0.13
identity (docs/toy-world.md).

The demo and ``benchmarks/toy_world.py`` both use :func:`run_variant`.

Example:
    >>> from diffusers_breakscene.toy.experiment import fill
    >>> fill("a photo of {0} and {1} on the beach", ["<asset0>", "<asset1>"])
    'a photo of <asset0> and <asset1> on the beach'
"""

from __future__ import annotations

import statistics
import string
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from PIL import Image

from ..config import DEFAULT_LORA_RANK, BreakASceneConfig
from .model import TOY_GUIDANCE
from .world import (
    DEFAULT_INITIALIZER,
    HELDOUT_PAIRS,
    HELDOUT_PATTERNS,
    HELDOUT_SHAPES,
    Initializer,
    ToyObject,
    ToySample,
    object_phrase,
    to_scene,
)

__all__ = [
    "ARTICLE_JOINER",
    "ARTICLE_TEMPLATE",
    "ATTRIBUTE_KINDS",
    "ONE_HANDLE_PROMPTS",
    "TOY_RANK_DIVISOR",
    "TWO_HANDLE_PROMPTS",
    "Generation",
    "VariantResult",
    "attribute_kinds",
    "attribute_rates",
    "fill",
    "run_variant",
    "score_image",
    "toy_config",
    "with_article",
]

Variant = Literal["ours", "phase1", "base", "init"]

#: One handle in a new setting. ``{0}`` is the handle (or the object's words).
ONE_HANDLE_PROMPTS: tuple[str, ...] = (
    "a photo of {0} in the snow",
    "a photo of {0} on the beach",
    "a photo of {0} at night",
)
#: Two handles recombined in a new setting, in both orders.
TWO_HANDLE_PROMPTS: tuple[str, ...] = (
    "a photo of {1} and {0} on the beach",
    "a photo of {0} and {1} on the grass",
)

#: Training prompt and joiner of ``run_variant(..., article=True)``: every handle after "a".
ARTICLE_TEMPLATE = "a photo of a {}"
ARTICLE_JOINER = " and a "


#: A LoRA rank r at Stable Diffusion scale is r / 8 on the toy UNet, whose layers are 10 to 13
#: times narrower (32/64/96 channels against SD's 320/640/1280); 8 is a convention that keeps
#: the toy ranks whole numbers (``benchmarks/defaults_search.py`` converts back the same way).
TOY_RANK_DIVISOR = 8


def toy_config(**changes: Any) -> BreakASceneConfig:
    """The default :class:`~diffusers_breakscene.BreakASceneConfig`, scaled to the toy model:
    64 px images (the toy model's size; its latent/4 attention grid is 8x8) and a LoRA rank
    that fits its narrow layers (the default rank divided by :data:`TOY_RANK_DIVISOR`: 2
    instead of 16), without the phase-end checkpoints and validation pictures (experiments
    train and time many runs and score their own images); every other setting is the default.

    Example:
        >>> toy_config().resolution, toy_config().lora_rank, toy_config(phase2_steps=0).phase2_steps
        (64, 2, 0)
    """
    base: dict[str, Any] = {
        "resolution": 64,
        "lora_rank": max(1, DEFAULT_LORA_RANK // TOY_RANK_DIVISOR),
        "checkpoint_phase_ends": False,
        "validate_phase_ends": False,
    }
    return BreakASceneConfig(**{**base, **changes})


def with_article(config: BreakASceneConfig) -> BreakASceneConfig:
    """``config`` training on prompts with "a" before every handle (:data:`ARTICLE_TEMPLATE`,
    :data:`ARTICLE_JOINER`): the configuration ``run_variant(..., article=True)`` trains with.

    Example:
        >>> cfg = with_article(toy_config())
        >>> cfg.prompt_template.replace("{}", cfg.token_joiner.join(["<asset0>", "<asset1>"]))
        'a photo of a <asset0> and a <asset1>'
    """
    return config.replace(prompt_template=ARTICLE_TEMPLATE, token_joiner=ARTICLE_JOINER)


def fill(template: str, names: Sequence[str]) -> str:
    """``template`` with ``{0}``, ``{1}``, ... replaced by ``names``."""
    return template.format(*names)


#: The kinds :func:`attribute_kinds` sorts an object's checks into: its shape, pattern and
#: (shape, colour) pair, each either held out of the base model's training data (the words
#: cannot say it) or trained, and its colour.
ATTRIBUTE_KINDS: tuple[str, ...] = (
    "heldout shape",
    "trained shape",
    "heldout pattern",
    "trained pattern",
    "heldout pair",
    "trained pair",
    "colour",
)


def attribute_kinds(obj: ToyObject, checks: dict[str, bool]) -> dict[str, bool]:
    """``checks`` of one object (``{"shape": ok, "colour": ok, "pattern": ok}``, as in
    :attr:`Generation.checks`) keyed by :data:`ATTRIBUTE_KINDS`: its shape check under
    "heldout shape" if ``obj``'s shape is held out (:data:`~diffusers_breakscene.toy.world.
    HELDOUT_SHAPES`), else "trained shape"; the same for its pattern; "… pair" is shape and
    colour both right, held out if the pair is in :data:`~diffusers_breakscene.toy.world.
    HELDOUT_PAIRS`.

    Example:
        >>> from diffusers_breakscene.toy.world import ToyObject
        >>> heart = ToyObject("heart", "red", "checkered", 0.4, (0.5, 0.5))
        >>> attribute_kinds(heart, {"shape": False, "colour": True, "pattern": True})
        {'heldout shape': False, 'heldout pattern': True, 'trained pair': False, 'colour': True}
    """
    shape = "heldout" if obj.shape in HELDOUT_SHAPES else "trained"
    pattern = "heldout" if obj.pattern in HELDOUT_PATTERNS else "trained"
    pair = "heldout" if (obj.shape, obj.colour) in HELDOUT_PAIRS else "trained"
    return {
        f"{shape} shape": checks["shape"],
        f"{pattern} pattern": checks["pattern"],
        f"{pair} pair": checks["shape"] and checks["colour"],
        "colour": checks["colour"],
    }


@dataclass
class Generation:
    """One generated image and its scores. ``checks`` maps each handle (object index) of the
    prompt to whether its object came out with the right ``"shape"``, ``"colour"`` and
    ``"pattern"`` (the evaluator's pairing of :meth:`~diffusers_breakscene.toy.evaluator.
    ToyEvaluator.prompt_accuracy`). ``objects_read``: how many objects the evaluator read in the
    image; the pairing (and identity's best match) picks the best of them, so an image cluttered
    with many objects can pass checks by chance. ``strict_accuracy`` counts each object read
    beyond the prompt's as three wrong checks (:attr:`~diffusers_breakscene.toy.evaluator.
    PromptScore.strict_fraction`)."""

    prompt: str
    described: str  # the prompt with handles replaced by the objects' words
    handles: list[int]  # indices of the scene objects the prompt names
    seed: int
    image: Image.Image = field(repr=False)
    prompt_accuracy: float
    identity: float  # mean over the prompt's handles
    checks: dict[int, dict[str, bool]] = field(default_factory=dict)
    objects_read: int = 0  # how many objects the evaluator read in the image
    strict_accuracy: float = float("nan")  # prompt accuracy, extra objects counted as wrong


@dataclass
class VariantResult:
    """What :func:`run_variant` measured for one scene and one variant."""

    variant: str
    scene_index: int
    generations: list[Generation]
    train_seconds: float = 0.0
    bundle: Path | None = None

    def generations_of(self, handles: int, *, exact_count: bool = False) -> list[Generation]:
        """The generations of ``handles``-handle prompts (``exact_count``: only those the
        evaluator read with exactly ``handles`` objects).

        Example:
            >>> g = Generation("a photo of <asset0>", "a photo of a red ring", [0], 0, None, 1.0,
            ...                0.5, objects_read=2)  # a ring and something else
            >>> result = VariantResult("ours", 0, [g])
            >>> len(result.generations_of(1)), len(result.generations_of(1, exact_count=True))
            (1, 0)
        """
        return [
            g
            for g in self.generations
            if len(g.handles) == handles and (not exact_count or g.objects_read == handles)
        ]

    def mean(
        self,
        what: Literal["identity", "prompt_accuracy", "strict_accuracy"],
        handles: int,
        *,
        exact_count: bool = False,
    ) -> float:
        """Mean of ``what`` over the generations of ``handles``-handle prompts (``exact_count``:
        only those the evaluator read with exactly ``handles`` objects; NaN when there is none).

        Example:
            >>> result = VariantResult("base", 0, [])
            >>> result.mean("identity", handles=1)
            nan
        """
        if what not in ("identity", "prompt_accuracy", "strict_accuracy"):
            raise ValueError(
                f"what={what!r} must be 'identity', 'prompt_accuracy' or 'strict_accuracy'."
            )
        values = [getattr(g, what) for g in self.generations_of(handles, exact_count=exact_count)]
        return statistics.fmean(values) if values else float("nan")


def attribute_rates(
    result: VariantResult, sample: ToySample, handles: int, *, exact_count: bool = False
) -> dict[str, tuple[int, int]]:
    """``{kind: (right, checked)}`` over the generations of ``handles``-handle prompts in
    ``result``: every handle's object's checks sorted by :func:`attribute_kinds`; kinds the
    scene's objects do not have are left out. ``exact_count=True`` counts only images in which
    the evaluator read exactly ``handles`` objects: a cluttered image offers many objects to
    pair with, so its checks pass more often by chance.

    Example:
        >>> from diffusers_breakscene.toy.world import evaluation_scenes
        >>> s = evaluation_scenes()[1]  # a pink striped heart, a green checkered star, ...
        >>> result = run_variant("base", s, seeds=[0])  # doctest: +SKIP
        >>> attribute_rates(result, s, handles=1)["heldout shape"]  # doctest: +SKIP
        (1, 3)
    """
    rates: dict[str, list[int]] = {}
    for g in result.generations_of(handles, exact_count=exact_count):
        for i, checks in g.checks.items():
            for kind, ok in attribute_kinds(sample.objects[i], checks).items():
                right_checked = rates.setdefault(kind, [0, 0])
                right_checked[0] += int(ok)
                right_checked[1] += 1
    return {k: (rates[k][0], rates[k][1]) for k in ATTRIBUTE_KINDS if k in rates}


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(n) if i < j]


def score_image(
    evaluator: Any, sample: ToySample, image: Image.Image, described: str, handles: Sequence[int]
) -> tuple[float, dict[int, float]]:
    """``(prompt accuracy, {object index: identity similarity})`` of one generated ``image``:
    the evaluator's prompt accuracy against ``described`` (the prompt with handles replaced by
    the objects' words) and, for each object of ``sample`` in ``handles``, its identity
    similarity to that object's masked crop in the input scene.

    Example:
        >>> from diffusers_breakscene.toy.evaluator import default_evaluator
        >>> from diffusers_breakscene.toy.world import evaluation_scenes
        >>> s = evaluation_scenes()[0]
        >>> accuracy, ids = score_image(default_evaluator(), s, s.image, s.caption, [0, 1])
        >>> sorted(ids), 0.0 <= accuracy <= 1.0
        ([0, 1], True)
    """
    score, identities = _score(evaluator, sample, image, described, handles)
    return score.fraction, identities


def _score(
    evaluator: Any, sample: ToySample, image: Image.Image, described: str, handles: Sequence[int]
) -> tuple[Any, dict[int, float]]:
    """:func:`score_image` with the evaluator's whole ``PromptScore`` instead of its fraction."""
    score = evaluator.prompt_accuracy(image, described)
    identities = {
        i: evaluator.identity_similarity(image, sample.image, sample.masks[i]) for i in handles
    }
    return score, identities


def run_variant(
    variant: Variant,
    sample: ToySample,
    scene_index: int = 0,
    *,
    config: BreakASceneConfig | None = None,
    seeds: Sequence[int] = (0, 1),
    inference_steps: int = 25,
    guidance: float = TOY_GUIDANCE,
    pipeline_factory: Callable[[], Any] | None = None,
    output_dir: str | Path | None = None,
    evaluator: Any = None,
    progress: bool = False,
    initializer: Initializer = DEFAULT_INITIALIZER,
    article: bool = False,
) -> VariantResult:
    """Learn ``sample`` with ``variant`` (see the module docstring), generate every prompt for
    every handle (and every pair of handles) with each seed, and score the images.

    ``pipeline_factory`` makes a fresh base pipeline (default: the shipped toy model);
    ``output_dir`` keeps the bundle (default: a temporary folder); ``initializer`` picks the
    words the handles start from (:func:`~diffusers_breakscene.toy.world.to_scene`);
    ``article=True`` puts "a" before every handle, in the training prompts (replacing the
    configuration's ``prompt_template`` and ``token_joiner``: :func:`with_article`) and in the
    generation prompts. The words of ``"base"`` always carry their article.

    Example:
        >>> from diffusers_breakscene.toy.world import evaluation_scenes
        >>> result = run_variant("base", evaluation_scenes()[0], seeds=[0])  # doctest: +SKIP
        >>> round(result.mean("prompt_accuracy", handles=1), 2)  # doctest: +SKIP
        0.9
    """
    import time

    from ..handles import add_handles
    from ..trainer import BreakASceneTrainer
    from .evaluator import default_evaluator

    if variant not in get_args(Variant):
        raise ValueError(f"variant={variant!r} must be 'ours', 'phase1', 'base' or 'init'.")
    scene = to_scene(sample, initializer=initializer)  # a bad initializer fails before loading
    evaluator = evaluator or default_evaluator()
    if pipeline_factory is None:
        from .model import toy_pipeline

        pipeline_factory = toy_pipeline
    pipe = pipeline_factory()
    words = [object_phrase(o) for o in sample.objects]
    result = VariantResult(variant, scene_index, [])
    cfg = config or toy_config()
    if article:
        cfg = with_article(cfg)
    if variant == "base":
        names = words
    elif variant == "init":
        names = list(scene.tokens)
        add_handles(
            pipe.tokenizer, pipe.text_encoder, names, scene.initializer_tokens,
            vectors_per_handle=cfg.vectors_per_handle,
        )  # fmt: skip
    else:  # "ours" or "phase1"
        if variant == "phase1":
            cfg = cfg.replace(phase2_steps=0)
        names = list(scene.tokens)
        folder = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp())
        started = time.perf_counter()
        trainer = BreakASceneTrainer(pipe, scene, cfg)
        result.bundle = trainer.train(folder, progress=progress)
        result.train_seconds = time.perf_counter() - started

    if article and variant != "base":
        names = [f"a {name}" for name in names]
    pipe.set_progress_bar_config(disable=True)
    n = len(sample.objects)
    jobs = [(t, [i]) for t in ONE_HANDLE_PROMPTS for i in range(n)]
    jobs += [(t, [i, j]) for t in TWO_HANDLE_PROMPTS for i, j in _pairs(n)]
    for template, handles in jobs:
        prompt = fill(template, [names[i] for i in handles])
        described = fill(template, [words[i] for i in handles])
        for seed in seeds:
            with torch.no_grad():
                image = pipe(
                    prompt,
                    num_inference_steps=inference_steps,
                    guidance_scale=guidance,
                    height=sample.image.height,
                    width=sample.image.width,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
            score, identities = _score(evaluator, sample, image, described, handles)
            identity = statistics.fmean(identities.values())
            # the described prompt names the handles' objects in the template's order
            named = [handles[int(f)] for _, f, _, _ in string.Formatter().parse(template) if f]
            checks = {
                i: {"shape": o.shape_ok, "colour": bool(o.colour_ok), "pattern": o.pattern_ok}
                for i, o in zip(named, score.objects, strict=True)
            }
            result.generations.append(
                Generation(
                    prompt,
                    described,
                    handles,
                    seed,
                    image,
                    score.fraction,
                    identity,
                    checks,
                    objects_read=len(score.reading.objects),
                    strict_accuracy=score.strict_fraction,
                )
            )
    return result
