"""Tests for diffusers_breakscene.scene: Scene input, validation, prepare, sampling, prompts."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_breakscene.errors import InvalidSceneError, MissingFileError
from diffusers_breakscene.scene import Scene, hflip

W, H = 64, 48  # tiny images keep the tests fast


# --- helpers ----------------------------------------------------------------------------------


def gradient_image(width: int = W, height: int = H) -> np.ndarray:
    """A uint8 HxWx3 image whose pixels differ, so that flips and crops are visible."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 3 % 256, ys * 5 % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)


def box_mask(
    left: int, top: int, right: int, bottom: int, width: int = W, height: int = H
) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def two_masks() -> list[np.ndarray]:
    return [box_mask(2, 2, 20, 20), box_mask(30, 10, 60, 40)]


@contextlib.contextmanager
def raises_invalid(match: str) -> Iterator[pytest.ExceptionInfo[ValueError]]:
    """The error is an InvalidSceneError, a ValueError, and its message matches."""
    with pytest.raises(ValueError, match=match) as info:
        yield info
    assert isinstance(info.value, InvalidSceneError)


@contextlib.contextmanager
def raises_missing(match: str) -> Iterator[pytest.ExceptionInfo[FileNotFoundError]]:
    with pytest.raises(FileNotFoundError, match=match) as info:
        yield info
    assert isinstance(info.value, MissingFileError)


def save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


# --- construction from each input kind --------------------------------------------------------


def test_from_pil_image_and_pil_masks() -> None:
    image = Image.fromarray(gradient_image())
    mask_l = Image.fromarray(box_mask(2, 2, 20, 20).astype(np.uint8) * 255)  # mode L
    mask_1 = Image.fromarray(box_mask(30, 10, 60, 40)).convert("1")  # mode 1
    scene = Scene(image, [mask_l, mask_1])
    assert scene.size == (W, H)
    assert scene.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(scene.image), gradient_image())
    assert [m.dtype for m in scene.masks] == [np.dtype(bool)] * 2
    np.testing.assert_array_equal(scene.masks[0], box_mask(2, 2, 20, 20))
    np.testing.assert_array_equal(scene.masks[1], box_mask(30, 10, 60, 40))


def test_grayscale_pil_image_becomes_rgb() -> None:
    gray = Image.new("L", (W, H), 77)
    scene = Scene(gray, two_masks())
    assert scene.image.mode == "RGB"
    assert scene.image.getpixel((5, 5)) == (77, 77, 77)


def test_float_and_uint8_arrays_give_the_same_image() -> None:
    pixels = gradient_image()
    from_uint8 = Scene(pixels, two_masks())
    from_float = Scene(pixels.astype(np.float32) / 255.0, two_masks())
    np.testing.assert_array_equal(np.asarray(from_uint8.image), np.asarray(from_float.image))


def test_torch_image_channel_first_and_last_and_torch_masks() -> None:
    pixels = torch.from_numpy(gradient_image())
    chw_float = pixels.permute(2, 0, 1).float() / 255.0
    masks = [torch.from_numpy(m) for m in two_masks()]
    masks[1] = masks[1].float().unsqueeze(0)  # 1xHxW float
    a = Scene(chw_float, masks)
    b = Scene(pixels, two_masks())  # HxWx3 uint8 tensor
    assert a.size == b.size == (W, H)
    np.testing.assert_array_equal(np.asarray(a.image), gradient_image())
    np.testing.assert_array_equal(np.asarray(b.image), gradient_image())
    np.testing.assert_array_equal(a.masks[1], two_masks()[1])


def test_from_paths_str_and_pathlike(tmp_path: Path) -> None:
    image_path = save_png(gradient_image(), tmp_path / "photo.png")
    mask_paths = [
        save_png(m.astype(np.uint8) * 255, tmp_path / f"m{i}.png")
        for i, m in enumerate(two_masks())
    ]
    scene = Scene(str(image_path), [mask_paths[0], str(mask_paths[1])])
    np.testing.assert_array_equal(np.asarray(scene.image), gradient_image())
    for got, want in zip(scene.masks, two_masks(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_exif_orientation_is_applied_to_files(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees for display
    path = tmp_path / "img.jpg"
    Image.fromarray(gradient_image()).save(path, exif=exif)
    upright_mask = np.zeros((W, H), dtype=bool)  # displayed image is H wide and W tall
    upright_mask[:10, :10] = True
    assert Scene(path, [upright_mask]).size == (H, W)


def test_from_dir_sorts_masks_naturally(tmp_path: Path) -> None:
    Image.fromarray(gradient_image()).save(tmp_path / "img.jpg")
    for i in range(11):  # mask i marks column block i: order is visible in the result
        save_png(
            box_mask(i * 5, 0, i * 5 + 4, 10).astype(np.uint8) * 255, tmp_path / f"mask{i}.png"
        )
    (tmp_path / "notes.txt").write_text("ignored")
    scene = Scene.from_dir(tmp_path)
    assert scene.tokens == [f"<asset{i}>" for i in range(11)]
    for i, mask in enumerate(scene.masks):
        columns = np.flatnonzero(mask.any(axis=0))
        assert (columns[0], columns[-1]) == (i * 5, i * 5 + 3), f"mask{i}.png out of order"


def test_from_dir_passes_keyword_arguments(tmp_path: Path) -> None:
    save_png(gradient_image(), tmp_path / "img.png")
    save_png(box_mask(0, 0, 10, 10).astype(np.uint8) * 255, tmp_path / "mask0.png")
    scene = Scene.from_dir(tmp_path, tokens=["<dog>"], background_token="<bg>")
    assert scene.tokens == ["<dog>", "<bg>"]


# --- tokens, initializers, background ---------------------------------------------------------


def test_default_and_custom_tokens() -> None:
    assert Scene(gradient_image(), two_masks()).tokens == ["<asset0>", "<asset1>"]
    scene = Scene(gradient_image(), two_masks(), ("<cup>", "<bowl>"), ["cup", None])
    assert scene.tokens == ["<cup>", "<bowl>"]
    assert scene.initializer_tokens == ["cup", None]
    assert scene.num_concepts == 2
    assert scene.background_token is None


def test_background_is_the_complement_and_comes_last() -> None:
    masks = two_masks()
    scene = Scene(
        gradient_image(), masks, initializer_tokens=["cup", "bowl"], background_token="<bg>"
    )
    assert scene.tokens == ["<asset0>", "<asset1>", "<bg>"]
    assert scene.num_concepts == 3
    assert scene.background_token == "<bg>"
    assert scene.initializer_tokens == ["cup", "bowl", None]
    np.testing.assert_array_equal(scene.masks[2], ~(masks[0] | masks[1]))
    areas = scene.mask_areas()
    assert areas[0] == pytest.approx(18 * 18 / (W * H))
    assert sum(areas) == pytest.approx(1.0)  # disjoint masks + complement tile the image


def test_background_initializer_may_be_given_last() -> None:
    scene = Scene(
        gradient_image(),
        two_masks(),
        initializer_tokens=["a", "b", "room"],
        background_token="<bg>",
    )
    assert scene.initializer_tokens == ["a", "b", "room"]


def test_repr_shows_size_tokens_and_areas() -> None:
    text = repr(Scene(gradient_image(), [box_mask(0, 0, 32, 48)], background_token="<bg>"))
    assert "64x48" in text
    assert "<asset0>: 50.0%" in text
    assert "<bg>: 50.0%" in text


def test_returned_state_cannot_change_the_scene() -> None:
    scene = Scene(gradient_image(), two_masks())
    scene.tokens.append("<x>")
    scene.image.paste((0, 0, 0), (0, 0, W, H))
    assert scene.tokens == ["<asset0>", "<asset1>"]
    assert np.asarray(scene.image).any()
    with pytest.raises(ValueError):  # numpy: assignment destination is read-only
        scene.masks[0][0, 0] = False


# --- prompts -----------------------------------------------------------------------------------


def three_concept_scene() -> Scene:
    return Scene(gradient_image(), [*two_masks(), box_mask(0, 40, 10, 48)])


def test_prompt_text() -> None:
    scene = three_concept_scene()
    assert scene.prompt([2, 0]) == "a photo of <asset2> and <asset0>"
    assert scene.prompt([1]) == "a photo of <asset1>"
    assert scene.prompt(torch.tensor([0, 1])) == "a photo of <asset0> and <asset1>"
    assert scene.prompt([0, 2], template="{x} {} on a beach", joiner=", ") == (
        "{x} <asset0>, <asset2> on a beach"
    )


@pytest.mark.parametrize(
    ("indices", "template", "match"),
    [
        ([0], "a photo", "exactly one"),
        ([0], "{} and {}", "exactly one"),
        ([3], "{}", r"indices\[0\] = 3 is out of range.*3 concepts"),
        ([0, -1], "{}", r"indices\[1\] = -1 is out of range"),
        ([True], "{}", "integer concept index"),
        ([], "{}", "indices is empty"),
    ],
)
def test_prompt_rejects_bad_arguments(indices: list, template: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        three_concept_scene().prompt(indices, template=template)


# --- union sampling ----------------------------------------------------------------------------


def test_union_sampling_covers_every_ordered_subset_without_duplicates() -> None:
    scene = three_concept_scene()
    generator = torch.Generator().manual_seed(1234)
    draws = [tuple(scene.sample_concepts(generator)) for _ in range(3000)]
    assert all(len(set(d)) == len(d) for d in draws), "a concept was drawn twice"
    assert all(set(d) <= {0, 1, 2} for d in draws)
    sizes = Counter(len(d) for d in draws)
    assert set(sizes) == {1, 2, 3}
    for k in (1, 2, 3):  # k ~ Uniform{1..N}
        assert 0.29 < sizes[k] / len(draws) < 0.38, sizes
    expected = {p for k in (1, 2, 3) for p in itertools.permutations(range(3), k)}
    assert set(draws) == expected  # all 15 ordered subsets, e.g. (2, 0) and (0, 2)


def test_union_sampling_is_deterministic_and_uses_only_the_generator() -> None:
    scene = three_concept_scene()

    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [scene.sample_concepts(g) for _ in range(50)]

    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    first = run(7)
    after = torch.rand(3)  # the global RNG did not move
    assert torch.equal(before, after)
    assert run(7) == first
    assert run(8) != first

    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        scene.sample_concepts(g)
    state = g.get_state()
    resumed = torch.Generator()
    resumed.set_state(state)
    assert [scene.sample_concepts(g) for _ in range(20)] == [
        scene.sample_concepts(resumed) for _ in range(20)
    ]


def test_union_sampling_off_returns_all_in_order() -> None:
    scene = Scene(gradient_image(), two_masks(), background_token="<bg>")
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert scene.sample_concepts(g, union_sampling=False) == [0, 1, 2]
    assert torch.equal(g.get_state(), state)


def test_sample_concepts_requires_a_generator() -> None:
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        three_concept_scene().sample_concepts(0)  # type: ignore[arg-type]


# --- binarisation ------------------------------------------------------------------------------


def test_uint8_soft_mask_is_thresholded_at_half_of_255() -> None:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[0, 0], mask[0, 1], mask[0, 2] = 127, 128, 255  # 127 < 127.5 < 128
    got = Scene(gradient_image(), [mask]).masks[0]
    assert got[0].tolist()[:3] == [False, True, True]
    assert got.sum() == 2


def test_float_soft_mask_threshold_is_strict_and_configurable() -> None:
    mask = np.zeros((H, W), dtype=np.float32)
    mask[0, :4] = [0.2, 0.3, 0.5, 0.51]
    assert Scene(gradient_image(), [mask]).masks[0][0, :4].tolist() == [False, False, False, True]
    low = Scene(gradient_image(), [mask], mask_threshold=0.25).masks[0]
    assert low[0, :4].tolist() == [False, True, True, True]
    assert Scene(gradient_image(), [mask]).mask_threshold == 0.5


def test_zero_one_label_masks_and_uint16_masks() -> None:
    labels = box_mask(0, 0, 10, 10).astype(np.uint8)  # values 0/1: 1 is inside
    np.testing.assert_array_equal(Scene(gradient_image(), [labels]).masks[0], labels.astype(bool))
    deep = box_mask(0, 0, 10, 10).astype(np.uint16) * 40000  # 40000 > 0.5 * 65535
    deep[20, 20] = 30000  # below half of 65535
    np.testing.assert_array_equal(Scene(gradient_image(), [deep]).masks[0], labels.astype(bool))


def test_colour_mask_uses_luminance() -> None:
    mask = np.zeros((H, W, 3), dtype=np.uint8)
    mask[0, 0] = (255, 0, 0)  # luminance 76: outside
    mask[0, 1] = (0, 255, 0)  # luminance 150: inside
    mask[0, 2] = (255, 255, 255)
    got = Scene(gradient_image(), [mask]).masks[0]
    assert got[0, :3].tolist() == [False, True, True]
    assert got.sum() == 2


def test_rgba_mask_uses_alpha_when_it_varies_else_luminance() -> None:
    rng = np.random.default_rng(0)
    cutout = np.zeros((H, W, 4), dtype=np.uint8)
    cutout[..., :3] = rng.integers(0, 256, (H, W, 3))  # a photo of the object
    cutout[5:15, 5:25, 3] = 255  # opaque object, transparent elsewhere
    from_alpha = Scene(gradient_image(), [Image.fromarray(cutout, "RGBA")]).masks[0]
    np.testing.assert_array_equal(from_alpha, box_mask(5, 5, 25, 15))

    opaque = np.zeros((H, W, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    opaque[30:40, 30:50, :3] = 255  # white on black, alpha constant
    from_luma = Scene(gradient_image(), [opaque]).masks[0]
    np.testing.assert_array_equal(from_luma, box_mask(30, 30, 50, 40))


def test_palette_png_mask(tmp_path: Path) -> None:
    mask = Image.fromarray(box_mask(0, 0, 16, 16).astype(np.uint8) * 255).convert("P")
    mask.save(tmp_path / "mask.png")
    got = Scene(gradient_image(), [tmp_path / "mask.png"]).masks[0]
    np.testing.assert_array_equal(got, box_mask(0, 0, 16, 16))


def test_single_full_mask_is_allowed_alone() -> None:
    scene = Scene(gradient_image(), [np.ones((H, W), dtype=bool)])
    assert scene.mask_areas() == [1.0]


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_wide_image_keeps_the_off_centre_object() -> None:
    width, height = 300, 200
    image = gradient_image(width, height)
    obj = box_mask(240, 60, 290, 140, width, height)  # near the right edge
    scene = Scene(image, [obj], background_token="<bg>")
    pixels, masks = scene.prepare(64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.float32
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    scale = 64 / height  # shorter side -> 64, so 300x200 -> 96x64
    assert masks[0].sum().item() == pytest.approx(obj.sum() * scale**2, rel=0.15)
    assert masks[0, :, -1].sum() == 0  # object ends before the right border (290 < 300)
    assert masks[0, :, 56:].sum() > 0  # the window is clamped to the right end of the image
    torch.testing.assert_close(masks[1], 1.0 - masks[0])  # background stays the complement


def test_prepare_tall_image_crops_vertically_around_the_object() -> None:
    width, height = 48, 144
    obj = box_mask(10, 70, 30, 90, width, height)  # centre row 80
    _, masks = Scene(gradient_image(width, height), [obj]).prepare(48)
    rows = torch.nonzero(masks[0].any(dim=1)).flatten().tolist()
    top_margin, bottom_margin = rows[0], 47 - rows[-1]
    assert abs(top_margin - bottom_margin) <= 1  # the window is centred on the object
    assert len(rows) == 20


def test_prepare_at_native_size_is_exact_pixel_scaling() -> None:
    image = gradient_image(32, 32)
    pixels, masks = Scene(image, [box_mask(4, 4, 12, 12, 32, 32)]).prepare(32)
    expected = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 * 2.0 - 1.0
    torch.testing.assert_close(pixels, expected)
    assert torch.equal(masks[0].bool(), torch.from_numpy(box_mask(4, 4, 12, 12, 32, 32)))


def test_prepare_is_cached_and_returns_fresh_copies() -> None:
    scene = Scene(gradient_image(), two_masks())
    pixels, masks = scene.prepare(32)
    pixels.zero_()
    masks.zero_()
    again_pixels, again_masks = scene.prepare(32)
    assert again_pixels.abs().sum() > 0 and again_masks.sum() > 0
    assert scene.prepare(16)[0].shape == (3, 16, 16)


def test_prepare_errors_when_objects_do_not_fit_one_square() -> None:
    width, height = 192, 32
    masks = [box_mask(0, 0, 10, 10, width, height), box_mask(180, 0, 192, 10, width, height)]
    scene = Scene(gradient_image(width, height), masks)
    with raises_invalid(r"masks\[0\] \(token '<asset0>'\) is empty after cropping.*Crop the photo"):
        scene.prepare(32)


def test_prepare_errors_when_an_object_vanishes_in_the_resize() -> None:
    width, height = 256, 256
    scene = Scene(gradient_image(width, height), [box_mask(100, 100, 102, 102, width, height)])
    with raises_invalid(r"masks\[0\].*too small"):
        scene.prepare(16)


def test_prepare_warns_when_the_crop_cuts_most_of_an_object() -> None:
    width, height = 96, 32
    masks = [box_mask(0, 0, 20, 10, width, height), box_mask(30, 10, 60, 20, width, height)]
    with pytest.warns(UserWarning, match=r"masks\[0\].*keeps only 30%"):
        Scene(gradient_image(width, height), masks).prepare(32)


@pytest.mark.parametrize("resolution", [0, -8, 12, 33, 8.0, True])
def test_prepare_rejects_bad_resolution(resolution: object) -> None:
    with raises_invalid("resolution must be"):
        Scene(gradient_image(), two_masks()).prepare(resolution)  # type: ignore[arg-type]


# --- hflip -------------------------------------------------------------------------------------


def test_hflip_flips_image_and_masks_together() -> None:
    scene = Scene(gradient_image(), [box_mask(0, 0, 10, 48)])
    pixels, masks = scene.prepare(48)
    flipped_pixels, flipped_masks = hflip(pixels, masks)
    assert torch.equal(flipped_pixels[..., 0], pixels[..., -1])
    assert flipped_masks[0, :, -1].all() and not flipped_masks[0, :, 0].any()
    back = hflip(flipped_pixels, flipped_masks)
    assert torch.equal(back[0], pixels) and torch.equal(back[1], masks)
    batch_pixels, batch_masks = hflip(pixels[None], masks[None])
    assert torch.equal(batch_pixels[0], flipped_pixels) and torch.equal(
        batch_masks[0], flipped_masks
    )


def test_hflip_rejects_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="same"):
        hflip(torch.zeros(3, 8, 8), torch.zeros(1, 8, 4))


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"masks": []}, "masks is empty"),
        ({"masks": np.zeros((H, W), bool)}, r"masks must be a list.*masks=\[mask\]"),
        ({"tokens": ["<a>"]}, "got 2 masks but 1 tokens"),
        ({"tokens": "<a>"}, "tokens must be a list"),
        ({"tokens": ["<a>", "<a>"]}, r"tokens\[1\] '<a>' repeats tokens\[0\]"),
        ({"tokens": ["<a>", ""]}, r"tokens\[1\] must be a non-empty string"),
        ({"tokens": ["<a>", 3]}, r"tokens\[1\] must be a non-empty string"),
        ({"tokens": ["<a>", "<my dog>"]}, r"tokens\[1\] '<my dog>' contains whitespace.*<my_dog>"),
        ({"initializer_tokens": ["cat"]}, "got 2 masks but 1 initializer_tokens"),
        ({"initializer_tokens": ["cat", "dog", "x"]}, "got 2 masks but 3 initializer_tokens"),
        ({"initializer_tokens": ["cat", " "]}, r"initializer_tokens\[1\] must be a non-empty word"),
        ({"background_token": "<asset1>"}, r"background_token '<asset1>' is also tokens\[1\]"),
        ({"background_token": "the bg"}, "background_token 'the bg' contains whitespace"),
        ({"mask_threshold": 0.0}, "mask_threshold must be a number strictly between 0 and 1"),
        ({"mask_threshold": 1.0}, "mask_threshold must be"),
        ({"mask_threshold": -0.2}, "mask_threshold must be"),
        ({"mask_threshold": True}, "mask_threshold must be"),
        ({"mask_threshold": float("nan")}, "mask_threshold must be"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    arguments = {"image": gradient_image(), "masks": two_masks(), **kwargs}
    with raises_invalid(match):
        Scene(**arguments)


def test_mask_size_mismatch_names_both_sizes_and_the_fix() -> None:
    masks = [box_mask(0, 0, 5, 5), box_mask(0, 0, 5, 5, 32, 24)]
    with raises_invalid(r"masks\[1\] is 32x24 \(width x height\) but the image is 64x48.*resize"):
        Scene(gradient_image(), masks)


def test_empty_mask_after_thresholding() -> None:
    faint = np.full((H, W), 100, dtype=np.uint8)  # below 127.5 everywhere
    with raises_invalid(r"masks\[1\] \(token '<asset1>'\) is empty.*mask_threshold"):
        Scene(gradient_image(), [box_mask(0, 0, 5, 5), faint])


def test_full_mask_with_other_concepts() -> None:
    full = np.ones((H, W), dtype=bool)
    with raises_invalid(r"masks\[0\] .*covers the whole image"):
        Scene(gradient_image(), [full, box_mask(0, 0, 5, 5)])
    with raises_invalid(r"masks\[0\] .*covers the whole image.*background"):
        Scene(gradient_image(), [full], background_token="<bg>")


def test_background_complement_empty() -> None:
    halves = [box_mask(0, 0, 32, 48), box_mask(32, 0, 64, 48)]
    with raises_invalid("background mask .* is empty"):
        Scene(gradient_image(), halves, background_token="<bg>")


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.zeros((H, W, 2), np.uint8), "2 channels"),
        (np.zeros((1, H, W, 1), np.uint8), "must be HxW, HxWx1, HxWx3 or HxWx4"),
        (np.zeros((H, W, 5), np.uint8), "must be HxW, HxWx1, HxWx3 or HxWx4"),
        (torch.zeros(2, H, W), r"tensor mask must be HxW or 1xHxW.*list\(stack\)"),
        (np.full((H, W), 2.0), r"float mask values must be in \[0, 1\]"),
        (np.full((H, W), np.nan), "NaN"),
        (np.full((H, W), -1, dtype=np.int64), "must not be negative"),
        (np.zeros((H, W), dtype=np.complex64), "unsupported dtype"),
        ([[0, 1]], "must be a PIL image, a path"),
    ],
)
def test_invalid_mask_arrays(mask: object, match: str) -> None:
    with raises_invalid(r"masks\[1\].*" + match):
        Scene(gradient_image(), [box_mask(0, 0, 5, 5), mask])


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((H, W, 4), np.uint8), r"HxWx3.*alpha"),
        (np.zeros((H, W), np.uint8), r"HxWx3.*grayscale"),
        (np.zeros((H, W, 2), np.uint8), "HxWx3"),
        (torch.zeros(1, 3, H, W), r"\(3, H, W\) or \(H, W, 3\).*batch"),
        (torch.zeros(4, H, W), r"\(3, H, W\) or \(H, W, 3\)"),
        (np.full((H, W, 3), 2.0, np.float32), r"float pixel values must be in \[0, 1\]"),
        (np.full((H, W, 3), 300, np.int64), r"integer pixel values must be in \[0, 255\]"),
        (np.zeros((H, W, 3), bool), "unsupported dtype"),
        ([[1, 2, 3]], "must be a PIL image, a path"),
    ],
)
def test_invalid_images(image: object, match: str) -> None:
    with raises_invalid(r"image.*" + match):
        Scene(image, two_masks())  # type: ignore[arg-type]


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with raises_missing(r"image: file not found: .*nope\.png"):
        Scene(tmp_path / "nope.png", two_masks())
    with raises_missing(r"masks\[0\]: file not found"):
        Scene(gradient_image(), [str(tmp_path / "gone.png")])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with raises_invalid(r"image: cannot read .*broken\.png as an image"):
        Scene(broken, two_masks())
    with raises_invalid(r"masks\[0\]: cannot read .*broken\.png"):
        Scene(gradient_image(), [broken])
    with raises_invalid("is a folder, not an image file"):
        Scene(tmp_path, two_masks())


def test_from_dir_errors(tmp_path: Path) -> None:
    with raises_missing("folder not found"):
        Scene.from_dir(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with raises_invalid("is a file, not a folder"):
        Scene.from_dir(tmp_path / "file.txt")
    with raises_invalid(r"exactly one image named img.*found 0 \(file\.txt\)"):
        Scene.from_dir(tmp_path)
    save_png(gradient_image(), tmp_path / "img.png")
    with raises_invalid(r"no mask\*\.png.*img\.png"):
        Scene.from_dir(tmp_path)
    Image.fromarray(gradient_image()).save(tmp_path / "img.jpg")
    with raises_invalid(re.escape("found 2 (img.jpg, img.png)")):
        Scene.from_dir(tmp_path)
