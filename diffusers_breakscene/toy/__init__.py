"""The toy world and the toy Stable Diffusion pipeline trained on it.

:mod:`diffusers_breakscene.toy.world` renders captioned scenes of coloured, patterned shapes with
exact masks and held-out attributes; :mod:`diffusers_breakscene.toy.model` loads the small
``StableDiffusionPipeline`` shipped in ``diffusers_breakscene/assets/toy`` (trained from scratch on
that world by :mod:`diffusers_breakscene.toy.train_base`).

Example:
    >>> from diffusers_breakscene.toy import evaluation_scenes, sample_scene
    >>> len(evaluation_scenes()), sample_scene(0).image.size
    (12, (64, 64))
"""

from .world import (
    COLOURS,
    HELDOUT_PAIRS,
    HELDOUT_PATTERNS,
    HELDOUT_SHAPES,
    PATTERNS,
    SETTINGS,
    SHAPES,
    WORLD_WORDS,
    ToyObject,
    ToySample,
    caption_for,
    evaluation_scenes,
    in_split,
    is_heldout,
    object_mask,
    render_scene,
    sample_scene,
    to_scene,
)

__all__ = [
    "COLOURS",
    "HELDOUT_PAIRS",
    "HELDOUT_PATTERNS",
    "HELDOUT_SHAPES",
    "PATTERNS",
    "SETTINGS",
    "SHAPES",
    "WORLD_WORDS",
    "ToyObject",
    "ToySample",
    "caption_for",
    "evaluation_scenes",
    "in_split",
    "is_heldout",
    "object_mask",
    "render_scene",
    "sample_scene",
    "to_scene",
]
