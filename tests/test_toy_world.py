"""The toy world generator: exact masks, honest captions, determinism, held-out splits."""

from __future__ import annotations

import numpy as np
import pytest

from diffusers_breakscene.toy.world import (
    COLOURS,
    DEFAULT_INITIALIZER,
    HELDOUT_PAIRS,
    HELDOUT_PATTERNS,
    HELDOUT_SHAPES,
    INITIALIZERS,
    MAX_OBJECTS,
    PATTERNS,
    SETTINGS,
    SHAPES,
    WORLD_WORDS,
    ToyObject,
    caption_for,
    evaluation_scenes,
    in_split,
    is_heldout,
    object_mask,
    object_words,
    render_scene,
    sample_scene,
    to_scene,
)


def _differs(sample) -> np.ndarray:
    return (np.array(sample.image) != np.array(sample.background)).any(-1)


def test_world_has_enough_attributes():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(PATTERNS) >= 4
    assert {"beach", "snow", "grass", "night"} <= set(SETTINGS)
    rgb = np.array(list(COLOURS.values()), dtype=float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert dist.min() > 60  # clearly distinct colours


@pytest.mark.parametrize("seed", range(40))
def test_masks_are_exactly_the_visible_pixels(seed):
    s = sample_scene(seed, split="any")
    union = np.logical_or.reduce(s.masks)
    np.testing.assert_array_equal(union, _differs(s))
    assert int(sum(m.astype(int) for m in s.masks).max()) == 1  # disjoint
    pixels = np.array(s.image)
    for obj, mask in zip(s.objects, s.masks, strict=True):
        assert mask.dtype == bool and mask.shape == pixels.shape[:2] and mask.any()
        colour = np.array(COLOURS[obj.colour])
        allowed = {tuple(colour), tuple(colour // 2)}
        assert {tuple(p) for p in pixels[mask]} <= allowed
        assert tuple(colour) in {tuple(p) for p in pixels[mask]}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("setting", ["beach", "night", "gray"])
def test_single_object_mask_is_the_difference_from_the_background(shape, setting):
    obj = ToyObject(shape, "red", "striped", 0.45, (0.5, 0.55), 15.0)
    s = render_scene([obj], setting, background_seed=3)
    np.testing.assert_array_equal(s.masks[0], _differs(s))
    np.testing.assert_array_equal(s.masks[0], object_mask(obj))
    assert s.masks[0].mean() > 0.05


def test_later_objects_occlude_earlier_ones():
    a = ToyObject("square", "red", "plain", 0.5, (0.4, 0.5))
    b = ToyObject("circle", "blue", "plain", 0.5, (0.6, 0.5))
    s = render_scene([a, b], "white")
    np.testing.assert_array_equal(s.masks[1], object_mask(b))
    np.testing.assert_array_equal(s.masks[0], object_mask(a) & ~object_mask(b))


@pytest.mark.parametrize("seed", range(30))
def test_captions_match_the_attributes(seed):
    s = sample_scene(seed, split="any")
    assert s.caption == caption_for(s.objects, s.setting)
    assert s.caption.startswith("a photo of ") and s.caption.endswith(SETTINGS[s.setting])
    phrases = s.caption.removeprefix("a photo of ").removesuffix(" " + SETTINGS[s.setting])
    parts = phrases.split(" and ")
    assert len(parts) == len(s.objects)
    for part, obj in zip(parts, s.objects, strict=True):
        words = part.split()
        assert words[0] in ("a", "an") and words[1] == obj.colour and words[-1] == obj.shape
        assert (obj.pattern in words) == (obj.pattern != "plain")
        assert "plain" not in words


def test_example_caption_style():
    objs = [
        ToyObject("star", "red", "striped", 0.4, (0.3, 0.3)),
        ToyObject("ring", "blue", "plain", 0.4, (0.7, 0.7)),
    ]
    assert (
        caption_for(objs, "beach") == "a photo of a red striped star and a blue ring on the beach"
    )
    orange = ToyObject("circle", "orange", "plain", 0.3, (0.5, 0.5))
    assert caption_for([orange], None) == "a photo of an orange circle"


def test_determinism_by_seed():
    a, b, c = sample_scene(11), sample_scene(11), sample_scene(12)
    assert a.objects == b.objects and a.caption == b.caption
    np.testing.assert_array_equal(np.array(a.image), np.array(b.image))
    for ma, mb in zip(a.masks, b.masks, strict=True):
        np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(np.array(a.image), np.array(c.image))
    assert {len(sample_scene(s).objects) for s in range(40)} == set(range(1, MAX_OBJECTS + 1))
    assert len(sample_scene(3, "heldout", num_objects=MAX_OBJECTS).objects) == MAX_OBJECTS
    for bad in (0, MAX_OBJECTS + 1):
        with pytest.raises(ValueError, match=f"num_objects={bad}: a toy scene holds 1 to 3"):
            sample_scene(3, num_objects=bad)
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [sample_scene(rng1).caption for _ in range(5)] == [
        sample_scene(rng2).caption for _ in range(5)
    ]


@pytest.mark.slow
def test_train_split_never_holds_out_attributes():
    rng = np.random.default_rng(0)
    seen_shapes, seen_patterns = set(), set()
    for _ in range(2000):
        s = sample_scene(rng, split="train")
        assert 1 <= len(s.objects) <= MAX_OBJECTS
        for o in s.objects:
            assert o.shape not in HELDOUT_SHAPES
            assert o.pattern not in HELDOUT_PATTERNS
            assert (o.shape, o.colour) not in HELDOUT_PAIRS
            seen_shapes.add(o.shape)
            seen_patterns.add(o.pattern)
    assert seen_shapes == set(SHAPES) - HELDOUT_SHAPES
    assert seen_patterns == set(PATTERNS) - HELDOUT_PATTERNS


def test_heldout_split_always_has_a_heldout_object():
    rng = np.random.default_rng(1)
    for _ in range(300):
        s = sample_scene(rng, split="heldout")
        assert in_split(s.objects, "heldout") and not in_split(s.objects, "train")
    assert is_heldout(ToyObject("heart", "red", "plain", 0.3, (0.5, 0.5)))
    assert is_heldout(ToyObject("circle", "red", "checkered", 0.3, (0.5, 0.5)))
    assert not is_heldout(ToyObject("circle", "red", "dotted", 0.3, (0.5, 0.5)))


def test_heldout_words_are_single_tokens():
    from diffusers_breakscene.toy.model import toy_tokenizer

    tok = toy_tokenizer()
    for word in WORLD_WORDS:
        assert len(tok(word).input_ids) == 3, word  # start, the word, end
    assert {"heart", "checkered"} <= set(WORLD_WORDS)


def test_evaluation_scenes():
    scenes = evaluation_scenes()
    assert len(scenes) >= 10
    again = evaluation_scenes()
    for s, t in zip(scenes, again, strict=True):
        assert s.caption == t.caption
        np.testing.assert_array_equal(np.array(s.image), np.array(t.image))
    for s in scenes:
        assert 2 <= len(s.objects) <= 3
        assert all(is_heldout(o) for o in s.objects)
        assert len({o.shape for o in s.objects}) == len(s.objects)
        for i, m in enumerate(s.masks):
            assert m.mean() >= 0.06
            for other in s.masks[i + 1 :]:
                assert not (m & other).any()
    kinds = {
        kind
        for s in scenes
        for o in s.objects
        for kind, hit in (
            ("shape", o.shape in HELDOUT_SHAPES),
            ("pattern", o.pattern in HELDOUT_PATTERNS),
            ("pair", (o.shape, o.colour) in HELDOUT_PAIRS),
        )
        if hit
    }
    assert kinds == {"shape", "pattern", "pair"}


def test_to_scene():
    sample = evaluation_scenes()[1]
    scene = to_scene(sample)
    assert scene.num_concepts == len(sample.objects)
    # the default start is the object's phrase: every word of it, no article
    assert DEFAULT_INITIALIZER == "phrase"
    assert scene.initializer_tokens == [" ".join(object_words(o)) for o in sample.objects]
    assert to_scene(sample, initializer="shape").initializer_tokens == [
        o.shape for o in sample.objects
    ]
    for a, b in zip(scene.masks, sample.masks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert to_scene(sample, tokens=["<x>", "<y>", "<z>"], initializer="none").tokens == [
        "<x>",
        "<y>",
        "<z>",
    ]
    assert to_scene(sample, initializer="colour").initializer_tokens == [
        o.colour for o in sample.objects
    ]
    phrases = scene.initializer_tokens
    assert all(p.split()[-1] == o.shape for p, o in zip(phrases, sample.objects, strict=True))
    assert all(p.split()[0] == o.colour for p, o in zip(phrases, sample.objects, strict=True))
    with pytest.raises(ValueError, match="initializer='words' must be one of 'shape', 'colour'"):
        to_scene(sample, initializer="words")
    assert set(INITIALIZERS) == {"shape", "colour", "phrase", "none"}


def test_run_variant_refuses_a_bad_initializer_before_loading_a_pipeline():
    from diffusers_breakscene.toy.experiment import run_variant

    loaded = []
    with pytest.raises(ValueError, match="initializer='noun'"):
        run_variant(
            "ours", evaluation_scenes()[0], initializer="noun",
            pipeline_factory=lambda: loaded.append(1),
        )  # fmt: skip
    assert not loaded
