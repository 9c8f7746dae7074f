"""The studio: uploads and brush edits, the session behind the page, the page itself, and the
whole flow in a real browser (tests/studio_browser.py, run in the background queue)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.cli import main
from diffusers_breakscene.errors import InvalidArgumentError, InvalidSceneError
from diffusers_breakscene.studio import StudioSession, build_studio
from diffusers_breakscene.studio.editing import (
    ADD_COLOUR,
    MAX_UPLOAD_SIDE,
    REMOVE_COLOUR,
    apply_edits,
    editor_value,
    hex_rgb,
    read_photo,
)
from diffusers_breakscene.tiny import tiny_pipeline
from diffusers_breakscene.toy.world import evaluation_scenes, object_phrase

# CI installs Chromium and sets this: there the browser test must run, never skip.
REQUIRE_BROWSER = os.environ.get("BREAKSCENE_REQUIRE_BROWSER") == "1"
CHROMIUM = os.environ.get("BREAKSCENE_CHROMIUM", "/usr/bin/chromium")


def _layer(shape: tuple[int, int], painted: dict[str, tuple[slice, slice]]) -> Image.Image:
    rgba = np.zeros((*shape, 4), np.uint8)
    for colour, where in painted.items():
        rgba[where] = (*hex_rgb(colour), 255)
    return Image.fromarray(rgba, "RGBA")


# -- uploads -------------------------------------------------------------------------------------


def test_read_photo_takes_a_photo_and_applies_its_exif_rotation(tmp_path):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    photo = read_photo(path)
    assert photo.mode == "RGB" and photo.size == (20, 40)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_text("hello"), "not an image"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: Image.new("L", (MAX_UPLOAD_SIDE + 1, 8)).save(p), f"{MAX_UPLOAD_SIDE} px"),
        (lambda p: Image.new("RGB", (4, 4)).save(p), "4x4 px"),
    ],
    ids=["not-an-image", "empty", "huge", "tiny"],
)
def test_bad_uploads_get_a_message_naming_the_file(tmp_path, make, words):
    path = tmp_path / "upload.png"
    make(path)
    with pytest.raises(InvalidSceneError, match=r"upload\.png") as error:
        read_photo(path)
    assert words in str(error.value)


# -- brush edits ---------------------------------------------------------------------------------


def test_green_paint_adds_pink_paint_removes_and_unpainted_pixels_keep_the_proposal():
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    value = {
        "background": Image.new("RGB", (16, 16)),
        "layers": [
            _layer(
                (16, 16),
                {
                    ADD_COLOUR: (slice(0, 2), slice(0, 16)),
                    REMOVE_COLOUR: (slice(4, 6), slice(4, 12)),
                },
            )
        ],
    }
    edited = apply_edits(mask, value)
    assert edited[0:2].all() and not edited[4:6, 4:12].any() and edited[6:12, 4:12].all()
    assert int(edited.sum()) == 32 + 48
    assert np.array_equal(apply_edits(mask, None), mask)  # nothing painted yet


def test_edits_on_a_downscaled_editor_land_on_the_full_size_mask():
    photo = Image.new("RGB", (1536, 1024), "gray")  # shown at 768 x 512
    mask = np.zeros((1024, 1536), bool)
    value = editor_value(photo, mask, "#ff0000")
    assert value["background"].size == (768, 512) and value["layers"][0].size == (768, 512)
    value["layers"] = [_layer((512, 768), {ADD_COLOUR: (slice(0, 256), slice(0, 384))})]
    edited = apply_edits(mask, value)
    assert edited[:512, :768].all() and not edited[512:].any() and not edited[:, 768:].any()


def test_editor_value_tints_the_mask_and_leaves_the_rest_of_the_photo():
    photo = Image.new("RGB", (20, 20), (10, 10, 10))
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    background = np.asarray(editor_value(photo, mask, "#ff0000")["background"])
    assert tuple(background[0, 0]) == (10, 10, 10)
    assert background[10, 10, 0] > 100 and background[5, 5, 0] == 255  # tinted, outlined


# -- the session behind the page -----------------------------------------------------------------


def test_session_parses_words_and_refuses_none(tmp_path):
    assert StudioSession.parse_words("a dog,\n the  red hat ,") == ["a dog", "the red hat"]
    with pytest.raises(InvalidArgumentError, match="no objects named"):
        StudioSession.parse_words(" , ")


def test_session_refuses_an_empty_mask_and_a_taken_token_before_training(tmp_path):
    session = StudioSession("tiny-sd1", tmp_path / "out")
    photo = Image.new("RGB", (32, 32))
    full, empty = np.ones((32, 32), bool), np.zeros((32, 32), bool)
    with pytest.raises(InvalidSceneError, match=r"mask 1 \(<asset1>\) is empty"):
        session.scene(photo, [full, empty])
    with pytest.raises(ValueError, match="dog"):
        session.scene(photo, [full], ["dog"])
    assert not (tmp_path / "out").exists()  # nothing written


def test_session_trains_in_the_background_then_loads_and_generates(tmp_path):
    sample = evaluation_scenes()[0]
    session = StudioSession("toy", tmp_path / "runs")
    proposal = session.propose(sample.image, [object_phrase(o) for o in sample.objects])
    scene = session.scene(proposal.image, proposal.masks, None, proposal.initializer_words())
    run = session.start_training(scene, session.config(2, 1, validation_every=2))
    with pytest.raises(InvalidArgumentError, match="going on"):
        session.start_training(scene, session.config(1, 1))
    bundle = run.wait(timeout=300)
    assert run.done and run.step == run.total == 3 and "loss" in run.logs
    assert bundle == tmp_path / "runs" / "run-0" / "break_a_scene.safetensors"
    assert sorted(p.name for p in (tmp_path / "runs" / "run-0" / "scene").iterdir()) == [
        "img.png", "mask0.png", "mask1.png", "scene.json",
    ]  # fmt: skip
    captions = [caption for _, caption in run.validation_pictures()]
    assert captions[0].startswith("step 3") and any(c.startswith("step 2") for c in captions)
    assert session.load_bundle(bundle) == ["<asset0>", "<asset1>"]
    image = session.generate("a photo of <asset0> in the snow", steps=2)
    assert image.size == (64, 64)
    # Loading again replaces what was loaded (same tokens, no conflict).
    assert session.load_bundle(bundle) == ["<asset0>", "<asset1>"]
    assert session.loaded_tokens == ["<asset0>", "<asset1>"]


def test_a_bundle_that_does_not_load_leaves_the_session_pipeline_as_it_was(tmp_path):
    session = StudioSession("tiny-sd1", tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a bundle")
    vocab = len(session.pipeline.tokenizer)
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        session.load_bundle(bad)
    assert len(session.pipeline.tokenizer) == vocab and session.loaded_tokens == []


# -- the page ------------------------------------------------------------------------------------


def test_the_page_has_every_stage(tmp_path):
    page = build_studio(StudioSession("tiny-sd1", tmp_path))
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    for wanted in ("photo-upload", "words", "propose", "editor-0", "apply", "train",
                   "train-progress", "validation", "download", "prompt", "generate", "result",
                   "bundle-upload"):  # fmt: skip
        assert wanted in ids, wanted


def test_cli_studio_refuses_a_file_as_output_before_loading_anything(tmp_path, capsys):
    taken = tmp_path / "file.txt"
    taken.write_text("x")
    assert main(["studio", "--output", str(taken)]) == 1
    assert "--output" in capsys.readouterr().err


def test_studio_without_gradio_names_the_extra_before_anything_is_made(
    tmp_path, monkeypatch, capsys
):
    import sys

    from diffusers_breakscene import MissingDependencyError

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the [studio] extra were missing
    out = tmp_path / "runs"
    with pytest.raises(MissingDependencyError, match=r"diffusers-breakscene\[studio\]") as error:
        build_studio(StudioSession("tiny-sd1", tmp_path / "session"))
    assert isinstance(error.value, ImportError)  # `except ImportError` code still catches it
    assert main(["studio", "--output", str(out)]) == 1
    assert "pip install 'diffusers-breakscene[studio]'" in capsys.readouterr().err
    assert not out.exists()  # refused before the studio made its folder


# -- in a real browser ---------------------------------------------------------------------------


def _browser_ready() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists() or shutil.which("chromium") is not None


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(
    not REQUIRE_BROWSER and not _browser_ready(),
    reason="needs Debian's chromium and playwright (CI installs both and never skips this)",
)
def test_studio_in_chromium_from_photo_to_bundle():
    from background import BACKGROUND

    out = BACKGROUND.root / "studio_browser"
    BACKGROUND.stdout("studio_browser")
    result = json.loads((out / "result.json").read_text())
    # Each stage left a screenshot.
    names = sorted(p.stem for p in (out / "screenshots").glob("*.png"))
    assert names == ["0-bad-upload", "1-masks", "2-brush", "3-training", "4-generate",
                     "5-load-bundle"]  # fmt: skip
    # A bad upload was a message, and the page went on.
    assert "not an image" in result["bad_upload_message"]
    # The brush stroke added to mask0 only.
    trained, proposed = result["trained_mask_pixels"], result["proposed_mask_pixels"]
    assert trained[0] > proposed[0] and trained[1] == proposed[1]
    # Training was watched live and ended with validation pictures and the bundle loaded.
    states = {state for state, _ in result["progress_seen"]}
    assert {"running", "done"} <= states and result["validation_pictures"] >= 2
    assert "<asset0>, <asset1>" in result["loaded_after_training"]
    assert "downloaded.safetensors" in result["loaded_back"]
    # The downloaded bundle is the trained one, and loads into a fresh pipeline.
    downloaded = Path(result["downloaded"]).read_bytes()
    assert downloaded == Path(result["trained_bundle"]).read_bytes()
    bundle = Bundle.load(result["downloaded"])
    assert bundle.tokens == ["<asset0>", "<asset1>"]
    assert tiny_pipeline("toy").load_break_a_scene(bundle) == ["<asset0>", "<asset1>"]
