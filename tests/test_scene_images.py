"""Scenes seen in several images: ``Scene.from_images``, the folder layout, sampling, training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

import diffusers_breakscene as bas
from diffusers_breakscene.errors import InvalidSceneError
from diffusers_breakscene.handles import add_handles
from diffusers_breakscene.step import SamplingSettings, encode_scene, sample_batch
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene

RES = 64


def box(x: int, y: int = 4, size: int = 16, side: int = 32) -> np.ndarray:
    mask = np.zeros((side, side), dtype=bool)
    mask[y : y + size, x : x + size] = True
    return mask


def painted(masks: list[np.ndarray], colours: list[tuple[int, int, int]]) -> np.ndarray:
    image = np.full((*masks[0].shape, 3), 90, dtype=np.uint8)
    for mask, colour in zip(masks, colours, strict=True):
        image[mask] = colour
    return image


RED, BLUE = (220, 30, 30), (30, 30, 220)


def three_views() -> bas.Scene:
    """Handle 0 (red) in images 0 and 2, handle 1 (blue) in images 0 and 1."""
    return bas.Scene.from_images(
        [
            painted([box(0), box(16)], [RED, BLUE]),
            painted([box(8, 12)], [BLUE]),
            painted([box(12, 2)], [RED]),
        ],
        [[box(0), box(16)], [box(8, 12)], [box(12, 2)]],
        concepts=[[0, 1], [1], [0]],
        initializer_tokens=["cup", "bowl"],
    )


def test_from_images_keeps_each_image_with_its_concepts():
    scene = three_views()
    assert scene.num_images == 3 and scene.num_concepts == 2
    assert scene.tokens == ["<asset0>", "<asset1>"]
    assert [scene.concepts_in(i) for i in range(3)] == [[0, 1], [1], [0]]
    assert [im.size for im in scene.images] == [(32, 32)] * 3
    view = scene.view(1)
    assert view.concepts == (1,) and np.array_equal(view.masks[0], box(8, 12))
    assert scene.mask_areas() == [0.25, 0.25]  # the mean over the images that show the concept
    assert "images=3" in repr(scene)
    # the first image is what the one-image properties describe
    assert scene.size == (32, 32) and len(scene.masks) == 2


def test_background_is_the_complement_in_every_image():
    scene = bas.Scene.from_images(
        [painted([box(0)], [RED]), painted([box(10)], [RED])],
        [[box(0)], [box(10)]],
        background_token="<bg>",
    )
    assert scene.tokens == ["<asset0>", "<bg>"]
    for i, x in enumerate((0, 10)):
        view = scene.view(i)
        assert view.concepts == (0, 1)
        assert np.array_equal(view.masks[1], ~box(x))


def test_prepare_gives_empty_masks_for_concepts_an_image_does_not_show():
    scene = three_views()
    pixels, masks = scene.prepare(32, image=1)
    assert pixels.shape == (3, 32, 32) and masks.shape == (2, 32, 32)
    assert masks[0].sum() == 0 and masks[1].sum() == 16 * 16
    # image 1 shows the blue object where its mask is
    assert pixels[2][masks[1].bool()].mean() > 0.5
    with pytest.raises(InvalidSceneError, match=r"image index 3 is out of range.*3 image"):
        scene.prepare(32, image=3)


def test_sampling_draws_an_image_then_concepts_it_shows():
    scene = three_views()
    g = torch.Generator().manual_seed(0)
    draws = [scene.sample(g) for _ in range(300)]
    assert {image for image, _ in draws} == {0, 1, 2}
    for image, concepts in draws:
        assert concepts and set(concepts) <= set(scene.concepts_in(image))
    both = [c for image, c in draws if image == 0]
    assert {len(c) for c in both} == {1, 2} and {tuple(c) for c in both} >= {(0, 1), (1, 0)}
    again = torch.Generator().manual_seed(0)
    assert [scene.sample(again) for _ in range(300)] == draws
    g = torch.Generator().manual_seed(1)
    assert all(c == scene.concepts_in(i) for i, c in (scene.sample(g, False) for _ in range(20)))


def test_one_image_scenes_sample_exactly_as_before():
    """No image draw for one image: runs with a seed keep their results."""
    scene = tiny_scene(32)
    g, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(50):
        k = int(torch.randint(1, 3, (1,), generator=reference).item())
        expected = torch.randperm(2, generator=reference)[:k].tolist()
        assert scene.sample(g) == (0, expected)


def test_batches_pair_each_latent_with_its_own_image_masks():
    scene = three_views()
    pipe = tiny_pipeline("sd1")
    encoded = encode_scene(pipe.vae, scene, 32)
    assert encoded.latent_mean.shape[0] == 6 and encoded.masks.shape == (6, 2, 32, 32)
    ids = add_handles(pipe.tokenizer, pipe.text_encoder, scene.tokens)
    settings = SamplingSettings.from_config(tiny_config(32, train_batch_size=8))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = sample_batch(scene, encoded, pipe.tokenizer, ids, g, settings, scaling_factor=1.0)
        for masks in batch.masks:
            assert all(m.sum() > 0 for m in masks)  # never a concept the image does not show


def test_from_dir_reads_one_subfolder_per_image(tmp_path):
    layout = {"front": {0: box(0), 1: box(16)}, "side": {1: box(8, 12)}, "back": {0: box(12, 2)}}
    for name, masks in layout.items():
        (tmp_path / name).mkdir()
        Image.fromarray(painted(list(masks.values()), [RED] * len(masks))).save(
            tmp_path / name / "img.png"
        )
        for handle, mask in masks.items():
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / name / f"mask{handle}.png")
    (tmp_path / ".cache").mkdir()  # hidden folders are not images
    scene = bas.Scene.from_dir(tmp_path, initializer_tokens=["cup", "bowl"])
    # subfolders in natural order of their names: back, front, side
    assert [scene.concepts_in(i) for i in range(3)] == [[0], [0, 1], [1]]
    assert scene.initializer_tokens == ["cup", "bowl"]
    assert np.array_equal(scene.view(2).masks[0], box(8, 12))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a": ["mask0.png"], "b": ["mask2.png"]}, "no image folder has mask1.png"),
        ({"a": ["mask0.png", "mask_cup.png"]}, re.escape("mask_cup.png") + ".*mask<N>.png"),
        ({"a": ["mask0.png", "mask00.png"]}, "two masks for handle 0"),
        ({"a": ["mask0.png"], "b": []}, "holds no mask"),
    ],
)
def test_from_dir_with_subfolders_names_what_is_wrong(tmp_path, files, message):
    for name, masks in files.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / name / "img.png")
        for mask in masks:
            Image.fromarray(box(0).astype(np.uint8) * 255).save(tmp_path / name / mask)
    with pytest.raises(InvalidSceneError, match=message):
        bas.Scene.from_dir(tmp_path)


def test_from_dir_subfolder_without_image_is_named(tmp_path):
    (tmp_path / "front").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "front" / "img.png")
    Image.fromarray(box(0).astype(np.uint8) * 255).save(tmp_path / "front" / "mask0.png")
    (tmp_path / "notes").mkdir()
    with pytest.raises(InvalidSceneError, match=r"notes must hold exactly one image"):
        bas.Scene.from_dir(tmp_path)


IMG = np.zeros((32, 32, 3), np.uint8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": IMG, "masks": [[box(0)]]}, "images must be a list of images"),
        ({"images": [], "masks": []}, "images is empty"),
        ({"images": [IMG, IMG], "masks": [[box(0)]]}, "masks has 1 entries for 2 images"),
        ({"images": [IMG], "masks": [box(0)]}, r"masks\[0\] must be a list"),
        ({"images": [IMG], "masks": [[box(0)]], "concepts": [0]}, r"concepts\[0\] must be a list"),
        ({"images": [IMG], "masks": [[box(0)]], "concepts": "0"}, "concepts must be a list"),
        ({"images": [IMG], "masks": [[]]}, r"masks\[0\] is empty"),
        ({"images": [IMG], "masks": [[box(0)]], "concepts": [[0, 1]]}, "has 2 entries"),
        ({"images": [IMG], "masks": [[box(0), box(9)]], "concepts": [[1, 1]]}, "handle 1 twice"),
        ({"images": [IMG], "masks": [[box(0)]], "concepts": [[-1]]}, r"concepts\[0\]\[0\]"),
        ({"images": [IMG], "masks": [[box(0)]], "concepts": [[1]]}, "handle 0 is in no image"),
        ({"images": [IMG, IMG], "masks": [[box(0)], [np.zeros((32, 32))]]}, r"masks\[1\]\[0\]"),
        ({"images": [IMG, np.zeros((16, 16, 3), np.uint8)], "masks": [[box(0)], [box(0)]]},
         r"masks\[1\]\[0\] is 32x32.*images\[1\] is 16x16"),
        ({"images": [IMG, "missing.png"], "masks": [[box(0)], [box(0)]]}, r"images\[1\]"),
        ({"images": [IMG], "masks": [[box(0)]], "tokens": ["<a>", "<b>"]}, "1 masks but 2"),
    ],
)  # fmt: skip
def test_from_images_rejects_bad_input_naming_it(kwargs, message):
    with pytest.raises((InvalidSceneError, FileNotFoundError), match=message):
        bas.Scene.from_images(**kwargs)


@pytest.mark.slow
def test_a_scene_of_several_images_trains_and_learns_other_handles(tmp_path):
    """Same seed, same first image: adding two more images of the concepts changes what the
    handles learn, and the bundle loads like any other."""
    single = tiny_scene(RES)
    flipped = tiny_scene(RES)
    pixels = torch.flip(flipped.prepare(RES)[0], dims=(1,))  # the objects moved to other corners
    masks = torch.flip(flipped.prepare(RES)[1], dims=(1,))
    several = bas.Scene.from_images(
        [single.image, (pixels + 1) / 2, (pixels + 1) / 2],
        [single.masks, [masks[0]], [masks[1]]],
        concepts=[[0, 1], [0], [1]],
    )
    cfg = tiny_config(RES, phase1_steps=4, phase2_steps=2)
    one = bas.BreakASceneTrainer(tiny_pipeline("sd1"), single, cfg).train(tmp_path / "one")
    many = bas.BreakASceneTrainer(tiny_pipeline("sd1"), several, cfg).train(tmp_path / "many")
    a, b = bas.Bundle.load(one), bas.Bundle.load(many)
    assert a.tokens == b.tokens == ["<asset0>", "<asset1>"]
    for token in a.tokens:
        assert not torch.equal(a.handles[token], b.handles[token])
    pipe = tiny_pipeline("sd1")
    pipe.load_break_a_scene(many)
    image = pipe("a photo of <asset0>", num_inference_steps=1, height=RES, width=RES).images[0]
    assert image.size == (RES, RES)


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scene_images.py"
    spec = importlib.util.spec_from_file_location("scene_images_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_redraws_the_same_objects_elsewhere():
    from diffusers_breakscene.toy.world import evaluation_scenes

    sample = evaluation_scenes()[1]
    again = _benchmark().redraw(sample, seed=5)
    same = [(o.shape, o.colour, o.pattern) for o in sample.objects]
    assert [(o.shape, o.colour, o.pattern) for o in again.objects] == same
    assert again.setting == sample.setting
    assert [o.center for o in again.objects] != [o.center for o in sample.objects]
    assert all(m.any() for m in again.masks)


@pytest.mark.slow
def test_scene_images_benchmark_smoke_writes_its_report(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = _benchmark().run("smoke", tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [row["images"] for row in report["rows"]] == [1, 2]
    assert all(-1.0 <= row["identity"] <= 1.0 for row in report["rows"])
    table = (tmp_path / "scene_images-smoke.md").read_text()
    assert "| 1 |" in table and "| 2 |" in table
