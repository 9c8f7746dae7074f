"""``train_many`` / ``breakscene train-many``: every scene folder of a folder, one bundle each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from background import _free_port
from helpers import tiny_config
from PIL import Image
from safetensors.torch import load_file

import diffusers_breakscene as bas
from diffusers_breakscene.errors import InvalidArgumentError, InvalidConfigError, MissingFileError
from diffusers_breakscene.train_many import (
    SceneResult,
    list_scenes,
    scenes_of_process,
    summary_table,
    train_many,
)

# one intra-op thread, as in the subprocesses, so that their runs and ours compute the same
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = 64
FLAGS = ["--phase1-steps", "3", "--phase2-steps", "3", "--resolution", str(RES),
         "--lora-rank", "4", "--no-validate-phase-ends"]  # fmt: skip


def config(**changes):
    return tiny_config(RES, **changes)


def write_scene(folder: Path, seed: int, objects: int = 1) -> Path:
    """A random-noise image with ``objects`` square masks at seed-dependent places."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(folder / "img.png")
    for k in range(objects):
        mask = np.zeros((RES, RES), np.uint8)
        x, y = (int(v) for v in rng.integers(0, RES // 2, 2))
        mask[y : y + 24, x : x + 24] = 255
        Image.fromarray(mask).save(folder / f"mask{k}.png")
    return folder


def scenes(root: Path, n: int) -> Path:
    for i in range(n):
        write_scene(root / f"scene{i}", seed=i, objects=1 + i % 2)
    return root


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def same(a: Path, b: Path) -> bool:
    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_scenes_are_listed_in_natural_order_and_split_over_processes(tmp_path):
    for name in ["b10", "b2", "a", ".hidden", "_work"]:
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a scene")
    names = [p.name for p in list_scenes(tmp_path)]
    assert names == ["a", "b2", "b10"]
    parts = [scenes_of_process(names, p, 2) for p in range(2)]
    assert parts == [["a", "b10"], ["b2"]]
    assert sorted(parts[0] + parts[1]) == sorted(names)  # each once, none twice
    assert scenes_of_process(names, 0, 1) == names


def test_train_many_trains_each_scene_records_failures_and_skips_finished(tmp_path):
    root = scenes(tmp_path / "scenes", 3)
    (root / "scene1" / "mask0.png").unlink()
    (root / "scene1" / "mask1.png").unlink()  # scene1 is broken: no masks
    out = tmp_path / "out"
    lines: list[str] = []
    results = train_many(root, out, model="tiny-sd1", config=config(), progress=False,
                         log=lines.append)  # fmt: skip
    assert [(r.scene, r.status) for r in results] == [
        ("scene0", "done"), ("scene1", "failed"), ("scene2", "done"),
    ]  # fmt: skip
    failed = results[1]
    assert "holds no mask" in failed.error and "scene1" in failed.error
    assert "Traceback" in (out / "scene1" / "error.txt").read_text()
    for r in (results[0], results[2]):
        assert r.steps == 6 and r.seconds > 0 and r.identity is None
        assert {"loss", "loss_rec", "loss_attn"} <= r.losses.keys()
        bundle = bas.Bundle.load(out / r.scene / "break_a_scene.safetensors")
        assert bundle.tokens == ["<asset0>"] if r.scene == "scene0" else len(bundle.tokens) == 1
        assert not (out / r.scene / "checkpoints").exists()  # removed once the scene is done
    summary = json.loads((out / "summary.json").read_text())
    assert [row["status"] for row in summary] == ["done", "failed", "done"]
    table = (out / "summary.md").read_text()
    assert "| scene0 | done | 6 |" in table and "failed: InvalidSceneError" in table
    assert any("scene1: FAILED" in line for line in lines)

    # the second run skips the finished scenes (their files untouched) and retries the failed
    stamp = (out / "scene0" / "break_a_scene.safetensors").stat().st_mtime_ns
    write_scene(tmp_path / "fixed", seed=7)
    for name in ("mask0.png",):
        (tmp_path / "fixed" / name).rename(root / "scene1" / name)
    again = train_many(root, out, model="tiny-sd1", config=config(), progress=False, log=None)
    assert [(r.status, r.this_run) for r in again] == [
        ("done", False), ("done", True), ("done", False),
    ]  # fmt: skip
    assert (out / "scene0" / "break_a_scene.safetensors").stat().st_mtime_ns == stamp
    assert not (out / "scene1" / "error.txt").exists()
    assert "done (earlier run)" in (out / "summary.md").read_text()


def test_scene_json_gives_each_scene_its_words(tmp_path):
    root = tmp_path / "scenes"
    write_scene(root / "dog", seed=0)
    (root / "dog" / "scene.json").write_text(
        json.dumps({"tokens": ["<dog>"], "initializer_tokens": ["dog"]})
    )
    (result,) = train_many(root, tmp_path / "out", model="tiny-sd1",
                           config=config(phase2_steps=0), progress=False, log=None)  # fmt: skip
    bundle = bas.Bundle.load(result.bundle)
    assert bundle.tokens == ["<dog>"]
    assert bundle.metadata["concepts"]["<dog>"]["initializer"] == "dog"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scenes_dir": "missing"}, MissingFileError, "scenes_dir .*missing does not exist"),
        ({"scenes_dir": "empty"}, MissingFileError, "holds no scene folders"),
        ({"config": config(resume_from_checkpoint="latest")}, InvalidConfigError,
         "leave resume_from_checkpoint unset"),
        ({"model": 3}, InvalidArgumentError, "fresh base pipeline"),
        ({"output_dir": "file"}, bas.UnwritableOutputError, "is a file"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, error, message):
    root = scenes(tmp_path / "scenes", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = {"scenes_dir": root, "output_dir": tmp_path / "out", "model": "tiny-sd1",
            "config": config()}  # fmt: skip
    args.update({k: tmp_path / v if k.endswith("dir") else v for k, v in kwargs.items()})
    with pytest.raises(error, match=message):
        train_many(**args, progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_summary_table_marks_earlier_runs_and_failures():
    table = summary_table([
        SceneResult("a", "done", 6, 1.5, {"loss": 0.5, "loss_attn": 0.25}, identity=0.8),
        SceneResult("b", "done", 6, 2.0, {"loss": 0.4}, this_run=False),
        SceneResult("c", "failed", error="InvalidSceneError: no masks | here"),
    ])  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "| scene | status | steps | time (s) | loss | loss_attn | identity |"
    assert lines[2] == "| a | done | 6 | 1.5 | 0.5000 | 0.2500 | 0.800 |"
    assert lines[3].startswith("| b | done (earlier run) |") and lines[3].endswith("– | – |")
    assert "failed: InvalidSceneError: no masks / here" in lines[4]


KILLABLE = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from diffusers_breakscene import trainer as trainer_module
    from diffusers_breakscene.train_many import train_many
    from test_train_many import config

    # Pace the steps (the maths is unchanged) so that the parent can kill mid-scene.
    step = trainer_module.training_step
    trainer_module.training_step = lambda *a, **k: (time.sleep(0.05), step(*a, **k))[1]
    train_many(sys.argv[1], sys.argv[2], model="tiny-sd1", config=config(checkpointing_steps=1),
               progress=False)
    """
)


@pytest.mark.slow
def test_a_killed_run_started_again_finishes_only_the_missing_scenes(tmp_path):
    assert torch.get_num_threads() == 1  # the same arithmetic as the subprocess
    root = scenes(tmp_path / "scenes", 3)
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(KILLABLE.format(tests=str(Path(__file__).parent)))
    command = [sys.executable, str(script), str(root), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = out / "scene1" / "checkpoints" / "checkpoint-2" / "state.safetensors"
    deadline = time.monotonic() + 180
    while proc.poll() is None and not target.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert (out / "scene0" / "result.json").is_file()
    assert not (out / "scene1" / "result.json").exists()
    assert not (out / "scene2").exists()
    stamp = (out / "scene0" / "break_a_scene.safetensors").stat().st_mtime_ns

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "scene0: done in an earlier run, skipped" in again.stdout
    assert "scene1: done" in again.stdout and "resumed from step" in again.stdout
    assert (out / "scene0" / "break_a_scene.safetensors").stat().st_mtime_ns == stamp
    result = json.loads((out / "scene1" / "result.json").read_text())
    assert result["resumed_from"] >= 2
    # the resumed scene ends exactly where an uninterrupted run of it ends
    reference = bas.BreakASceneTrainer(
        "tiny-sd1", bas.Scene.from_dir(root / "scene1"), config(checkpointing_steps=1)
    ).train(tmp_path / "reference", progress=False)
    assert same(out / "scene1" / "break_a_scene.safetensors", reference)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["scene"], r["this_run"]) for r in summary] == [
        ("scene0", False), ("scene1", True), ("scene2", True),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_share_four_scenes_each_as_a_one_process_run(tmp_path):
    root = scenes(tmp_path / "scenes", 4)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "diffusers_breakscene.cli", "train-many",
         str(root), "--output", str(out), "--model", "tiny-sd1", *FLAGS],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["scene"], r["status"], r["process"]) for r in summary] == [
        ("scene0", "done", 0), ("scene1", "done", 1), ("scene2", "done", 0), ("scene3", "done", 1),
    ]  # fmt: skip
    assert result.stdout.count("| scene3 | done |") == 1  # one summary, from the first process
    # each bundle is what a one-process run of that scene with the same seed writes (checked
    # for one scene of each process)
    for name in ("scene0", "scene1"):
        reference = bas.BreakASceneTrainer(
            "tiny-sd1", bas.Scene.from_dir(root / name), config()
        ).train(tmp_path / "reference" / name, progress=False)
        assert same(out / name / "break_a_scene.safetensors", reference), name


@pytest.mark.slow
def test_on_the_toy_model_each_scene_gets_an_identity_score(tmp_path, capsys):
    from diffusers_breakscene.toy.world import evaluation_scenes

    sample = evaluation_scenes()[0]
    folder = tmp_path / "scenes" / "toy0"
    folder.mkdir(parents=True)
    sample.image.save(folder / "img.png")
    for k, mask in enumerate(sample.masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"mask{k}.png")
    (folder / "scene.json").write_text(
        json.dumps({"initializer_tokens": [o.shape for o in sample.objects]})
    )
    from diffusers_breakscene.cli import main

    rc = main(["train-many", str(tmp_path / "scenes"), "--output", str(tmp_path / "out"),
               "--model", "toy", *FLAGS])  # fmt: skip
    assert rc == 0
    (row,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert row["status"] == "done" and -1.0 <= row["identity"] <= 1.0
    assert f"{row['identity']:.3f} |" in capsys.readouterr().out


def test_cli_train_many_exits_1_naming_the_failed_scenes(tmp_path, capsys):
    from diffusers_breakscene.cli import main

    root = scenes(tmp_path / "scenes", 2)
    for mask in (root / "scene0").glob("mask*.png"):
        mask.unlink()
    rc = main(["train-many", str(root), "--output", str(tmp_path / "out"), "--model", "tiny-sd1",
               "--quiet", *FLAGS])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 of 2 scenes failed (scene0)" in err and "finished scenes are skipped" in err
    assert (tmp_path / "out" / "scene1" / "break_a_scene.safetensors").is_file()
