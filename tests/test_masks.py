"""Proposed masks: from words (the base model's attention) and with Segment Anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_breakscene as bas
from diffusers_breakscene.cli import main
from diffusers_breakscene.errors import InvalidArgumentError
from diffusers_breakscene.masks import (
    MaskProposal,
    _otsu,
    check_scene_folder,
    masks_from_sam,
    masks_from_words,
    refine_mask,
)
from diffusers_breakscene.tiny import save_tiny_sam, tiny_pipeline


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam"))


def photo(width: int = 64, height: int = 48) -> Image.Image:
    arr = np.full((height, width, 3), 200, np.uint8)
    arr[8:24, 8:24] = (220, 30, 30)
    arr[20:40, 36:60] = (30, 30, 220)
    return Image.fromarray(arr)


def test_refine_keeps_the_largest_region_and_fills_its_holes():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5:7, 5:7] = False  # a hole
    mask[15:18, 15:18] = True  # a smaller island
    refined = refine_mask(mask)
    assert refined[5, 5] and not refined[16, 16] and int(refined.sum()) == 100
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[2:7, 2:7] = False
    assert int(refine_mask(ring).sum()) == 49  # the inside of a closed ring is a hole


def test_otsu_splits_two_groups():
    values = np.concatenate([np.full(100, 0.1), np.full(50, 0.8)])
    assert 0.1 < _otsu(values) <= 0.8


def test_masks_from_words_gives_one_mask_per_phrase_and_leaves_the_pipeline_as_it_was():
    pipe = tiny_pipeline("sd1")
    processors = dict(pipe.unet.attn_processors)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    proposal = masks_from_words(pipe, photo(), ["a cup", "the red bowl"], resolution=64, seeds=[0])
    assert proposal.labels == ["a cup", "the red bowl"]
    assert [m.shape for m in proposal.masks] == [(48, 64)] * 2
    assert all(m.dtype == bool and m.any() for m in proposal.masks)
    assert not (proposal.masks[0] & proposal.masks[1]).any()  # each pixel goes to one phrase
    assert all(s.shape == (48, 64) and s.min() >= 0 and s.max() <= 1 for s in proposal.soft)
    assert proposal.initializer_words() == ["cup", "bowl"]
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize(
    ("words", "message"),
    [("a dog", "non-empty list"), ([], "non-empty list"), (["a dog", "the"], r"words\[1\]")],
)
def test_masks_from_words_refuses_bad_words(words, message):
    with pytest.raises(InvalidArgumentError, match=message):
        masks_from_words(tiny_pipeline("sd1"), photo(), words)


def test_on_the_toy_model_the_masks_find_the_objects():
    """The toy model's attention, refined, finds both objects of an evaluation scene (its
    mean IoU over all scenes is reported in docs/masks.md)."""
    from diffusers_breakscene.toy.model import toy_pipeline
    from diffusers_breakscene.toy.world import evaluation_scenes, object_phrase

    sample = evaluation_scenes()[0]
    words = [object_phrase(o) for o in sample.objects]
    proposal = masks_from_words(toy_pipeline(), sample.image, words)
    ious = [
        (m & t).sum() / (m | t).sum() for m, t in zip(proposal.masks, sample.masks, strict=True)
    ]
    assert min(ious) > 0.3, ious


def test_a_proposal_becomes_a_scene_folder_that_trains(tmp_path):
    mask = np.zeros((48, 64), bool)
    mask[8:24, 8:24] = True
    proposal = MaskProposal(photo(), ["a red cup"], [mask])
    folder = proposal.save_scene_dir(tmp_path / "scene")
    assert sorted(p.name for p in folder.iterdir()) == [
        "img.png", "mask0.png", "preview.png", "scene.json",
    ]  # fmt: skip
    assert json.loads((folder / "scene.json").read_text()) == {"initializer_tokens": ["cup"]}
    scene = bas.Scene.from_dir(folder)
    assert scene.initializer_tokens == ["cup"] and np.array_equal(scene.masks[0], mask)
    preview = Image.open(folder / "preview.png")
    assert preview.height > 48  # the legend below
    assert np.array_equal(np.asarray(preview)[:48, :64], np.asarray(proposal.preview())[:48, :64])
    assert proposal.to_scene().num_concepts == 1
    with pytest.raises(InvalidArgumentError, match=r"already holds \['img.png', 'mask0.png'\]"):
        proposal.save_scene_dir(folder)
    with pytest.raises(InvalidArgumentError, match="already holds"):
        check_scene_folder(folder)


def test_the_preview_legend_is_never_cut_at_the_photo_edge():
    from PIL import ImageDraw

    mask = np.zeros((16, 16), bool)
    mask[2:8, 2:8] = True
    label = "a very long description of a small object"
    sheet = MaskProposal(Image.new("RGB", (16, 16)), [label], [mask]).preview()
    text = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(f"mask0: {label}")
    assert sheet.width >= 16 + text
    legend = np.asarray(sheet.convert("L"))[16:]
    inked = np.nonzero((legend < 128).any(axis=0))[0]
    assert inked.max() < sheet.width - 2  # the last letter ends inside the sheet


def test_masks_from_sam_runs_a_tiny_sam_from_points_or_boxes(sam_folder):
    image = photo()
    by_box = masks_from_sam(image, boxes=[(8, 8, 24, 24), (36, 20, 60, 40)], model=sam_folder,
                            labels=["cup", "bowl"])  # fmt: skip
    assert by_box.labels == ["cup", "bowl"]
    assert [m.shape for m in by_box.masks] == [(48, 64)] * 2
    assert all(m.dtype == bool for m in by_box.masks)
    by_point = masks_from_sam(image, points=[(16, 16)], model=sam_folder)
    assert by_point.labels == ["object0"] and by_point.masks[0].shape == (48, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "either points"),
        ({"points": [(1, 1)], "boxes": [(0, 0, 2, 2)]}, "either points"),
        ({"boxes": [(0, 0, 200, 10)]}, r"boxes\[0\].*outside the 64x48 photo"),
        ({"points": [(1, 2, 3)]}, r"points\[0\].*must be 2 numbers"),
        ({"points": [(1, 2)], "labels": ["a", "b"]}, "1 points but 2 labels"),
    ],
)
def test_masks_from_sam_refuses_bad_prompts(sam_folder, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        masks_from_sam(photo(), model=sam_folder, **kwargs)


@pytest.mark.slow
def test_cli_masks_writes_a_scene_folder_from_words_boxes_or_points(tmp_path, sam_folder, capsys):
    image = tmp_path / "photo.png"
    photo().save(image)
    rc = main(["masks", str(image), "--words", "a cup", "a bowl", "--model", "tiny-sd1",
               "--resolution", "64", "--output", str(tmp_path / "words")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "mask1.png  a bowl" in out and "breakscene train --scene-dir" in out
    assert bas.Scene.from_dir(tmp_path / "words").initializer_tokens == ["cup", "bowl"]
    rc = main(["masks", str(image), "--box", "8", "8", "24", "24", "--label", "cup", "--quiet",
               "--sam-model", str(sam_folder), "--output", str(tmp_path / "sam")])  # fmt: skip
    assert rc == 0 and (tmp_path / "sam" / "mask0.png").is_file()
    rc = main(["masks", str(image), "--point", "16", "16", "--point", "48", "30", "--quiet",
               "--sam-model", str(sam_folder), "--output", str(tmp_path / "points")])  # fmt: skip
    assert rc == 0 and len(bas.Scene.from_dir(tmp_path / "points").masks) == 2
    rc = main(["masks", str(image), "--output", str(tmp_path / "none")])
    assert rc == 1 and "say what to mask in one way" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
