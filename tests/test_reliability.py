"""Reliability (issue #6): crashes mid-write, interrupted training, NaN losses, load/unload churn.

* ``SIGKILL`` at random moments while a bundle, an export or a checkpoint is being written leaves
  the target loadable as the previous or the complete new version, never a partial one; what is
  written gets the umask's permissions (a replaced file keeps its own), never a temporary 0600.
* Training killed at random steps of both phases and resumed with ``"latest"`` (as often as it
  takes) ends bit-identical to an uninterrupted run.
* A non-finite loss stops training at the step it appears, naming the last good checkpoint,
  which stays intact.
* 50 rounds of loading/unloading two bundles leave the pipeline bit-identical, with no growth.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

import diffusers_breakscene as bas
from diffusers_breakscene import trainer as trainer_module
from diffusers_breakscene.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffusers_breakscene.tiny import save_tiny_pipeline, tiny_pipeline, tiny_scene

RES = 64
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> bas.BreakASceneConfig:
    return tiny_config(RES, **changes)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    bundle = bas.Bundle.load(path)
    return {**{f"handles.{k}": v for k, v in bundle.handles.items()}, **bundle.lora}


# --------------------------------------------------------------------------------------------
# 2. atomic writes under SIGKILL

WRITER = textwrap.dedent(
    """
    import os, random, shutil, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from diffusers_breakscene.bundle import Bundle
    from diffusers_breakscene.checkpoint import save_checkpoint

    root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    N = 1_000_000  # 4 x 1M float32 = 16 MB: a write takes long enough to be hit mid-way
    META = {"lora": {"unet": {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}}}

    def bundle(version):
        return Bundle(handles={"<a>": torch.full((1, 8), float(version))},
                      lora={"unet.a.to_q.lora.down.weight": torch.full((4, N), float(version))},
                      metadata=META)

    def write(kind, version):
        if kind == "bundle":
            bundle(version).save(root / "bundle" / "b.safetensors", dtype=None)
        elif kind == "export":
            bundle(version).export_diffusers(root / "export")
        else:
            p = torch.nn.Parameter(torch.full((4, N), float(version)))
            opt = torch.optim.SGD([p], lr=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
            save_checkpoint(root / "checkpoints", step=7, phase=1, params={"p": p},
                            optimizer=opt, scheduler=sched,
                            generator_states=torch.Generator().get_state()[None])

    rng = random.Random(seed)
    for kind in ("bundle", "export", "checkpoint"):
        write(kind, 0)
        for k in range(kills):
            child = os.fork()
            if child == 0:  # the writer: new versions back to back until it is killed
                version = 1000 * (k + 1)
                while True:
                    write(kind, version)
                    version += 1
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            snap = root / "snap" / f"{kind}-{k}"
            src = {"bundle": root / "bundle", "export": root / "export",
                   "checkpoint": root / "checkpoints" / "checkpoint-7"}[kind]
            shutil.copytree(src, snap)
    print("done", flush=True)
    """
)


def _version_of(tensor: torch.Tensor) -> float:
    value = tensor.reshape(-1)[0].item()
    assert torch.all(tensor == value), "a tensor mixes two versions"
    return value


@pytest.mark.slow
def test_sigkill_mid_save_never_leaves_a_partial_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    kills = 6
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(kills), str(random.randrange(10**6))],
        capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-3000:]
    left_over = 0
    for k in range(kills):
        # the bundle: always the previous or a complete new version
        snap = tmp_path / "snap" / f"bundle-{k}"
        left_over += len([p for p in snap.iterdir() if p.name.endswith(".tmp")])
        bundle = bas.Bundle.load(snap / "b.safetensors")
        version = _version_of(bundle.handles["<a>"])
        assert _version_of(bundle.lora["unet.a.to_q.lora.down.weight"]) == version
        assert version == 0 or version >= 1000
        # the export: each file is a complete safetensors file of one version
        snap = tmp_path / "snap" / f"export-{k}"
        embeds = load_file(snap / "break_a_scene_emb.safetensors")
        lora = load_file(snap / "pytorch_lora_weights.safetensors")
        assert embeds.keys() == {"clip_l"} and len(lora) == 1
        _version_of(embeds["clip_l"]), _version_of(next(iter(lora.values())))
        # the checkpoint: loads, and holds one version
        state = load_checkpoint(tmp_path / "snap" / f"checkpoint-{k}")
        assert state.step == 7 and state.params["p"].shape == (4, 1_000_000)
        _version_of(state.params["p"])
    # the live files load too, and temporary leftovers are never picked as checkpoints
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "checkpoint-7"
    print(f"kills that left a temporary file behind (mid-write): {left_over}/{kills}")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.skipif(os.name != "posix", reason="permission bits and umask are POSIX")
def test_written_files_get_the_umask_permissions_and_keep_replaced_ones(tmp_path):
    from PIL import Image

    from diffusers_breakscene.viz import save_png

    bundle = bas.Bundle(
        handles={"<a>": torch.ones(1, 8)},
        lora={"unet.a.to_q.lora.down.weight": torch.ones(4, 8)},
        metadata={"lora": {"unet": {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}}},
    )
    previous = os.umask(0o022)
    try:
        # new files: what the umask allows, as for any file opened for writing (the atomic
        # write's temporary file used to be created 0600, and the rename carried that over)
        saved = bundle.save(tmp_path / "shared" / "b.safetensors")
        picture = save_png(Image.new("RGB", (4, 4)), tmp_path / "shared" / "p.png")
        assert _mode(saved) == 0o644 and _mode(picture) == 0o644
        os.umask(0o027)
        assert _mode(bundle.save(tmp_path / "group.safetensors")) == 0o640
        export = bundle.export_diffusers(tmp_path / "export")
        assert {_mode(f) for f in export.values()} == {0o640}
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        state = dict(step=1, phase=1, params={"p": p}, optimizer=opt, scheduler=sched,
                     generator_states=torch.Generator().get_state()[None])  # fmt: skip
        folder = save_checkpoint(tmp_path / "checkpoints", **state)
        assert _mode(folder / "state.safetensors") == 0o640
        # a replaced file keeps the permissions its owner gave it
        os.chmod(saved, 0o664)
        assert _mode(bundle.save(saved)) == 0o664
        assert bas.Bundle.load(saved).tokens == ["<a>"]
        os.chmod(export["embeddings"], 0o600)
        assert _mode(bundle.export_diffusers(tmp_path / "export")["embeddings"]) == 0o600
        # model folders saved by diffusers' save_pretrained: its new files only
        model = tmp_path / "model"
        model.mkdir()
        (model / "mine.safetensors").write_bytes(b"")
        os.chmod(model / "mine.safetensors", 0o600)
        save_tiny_pipeline(model, "sd1")
        assert _mode(model / "unet" / "diffusion_pytorch_model.safetensors") == 0o640
        assert _mode(model / "text_encoder" / "model.safetensors") == 0o640
        assert _mode(model / "mine.safetensors") == 0o600
        os.chmod(model / "vae" / "diffusion_pytorch_model.safetensors", 0o644)
        save_tiny_pipeline(model, "sd1")  # saved again over itself: replaced files keep theirs
        assert _mode(model / "vae" / "diffusion_pytorch_model.safetensors") == 0o644
        os.chmod(folder / "state.safetensors", 0o644)
        assert (
            _mode(save_checkpoint(tmp_path / "checkpoints", **state) / "state.safetensors") == 0o644
        )
    finally:
        os.umask(previous)
    assert not [p for p in tmp_path.rglob("*.tmp")]


# --------------------------------------------------------------------------------------------
# 3. interrupted training, resumed until done, is bit-identical

TRAIN = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import diffusers_breakscene as bas
    from diffusers_breakscene import trainer as trainer_module
    from diffusers_breakscene.tiny import tiny_pipeline
    from test_reliability import RES, config
    from diffusers_breakscene.tiny import tiny_scene

    # Pace the steps (the maths is unchanged) so the parent can kill at a chosen step.
    step = trainer_module.training_step
    trainer_module.training_step = lambda *a, **k: (time.sleep(0.15), step(*a, **k))[1]
    cfg = config(checkpointing_steps=1, lr_scheduler="linear", resume_from_checkpoint="latest")
    bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), cfg).train(sys.argv[1],
                                                                          progress=False)
    print("finished", flush=True)
    """
)


def _run_until_killed(script: Path, out: Path, kill_after: int | None, rng: random.Random) -> int:
    """Start training; SIGKILL it once checkpoint-``kill_after`` exists. Returns the rc."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            target = out / "checkpoints" / f"checkpoint-{kill_after}" / "state.safetensors"
            if kill_after is not None and target.exists():
                time.sleep(rng.uniform(0.0, 0.15))  # land anywhere in the next step or save
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err[-3000:])
    return proc.returncode


@pytest.mark.slow
def test_training_killed_in_both_phases_resumes_bit_identically(tmp_path):
    assert torch.get_num_threads() == 1  # the same arithmetic as the subprocesses
    cfg = config(checkpointing_steps=1, lr_scheduler="linear")
    reference = bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), cfg).train(
        tmp_path / "reference", progress=False
    )
    expected = _tensors(reference)

    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "interrupted"
    rng = random.Random()
    # phase 1 has steps 1..3, phase 2 steps 4..6: one kill in each (each subprocess costs
    # seconds of imports, so two kills, not more)
    kill_points = [rng.choice([1, 2]), rng.choice([4, 5])]
    runs = []
    for kill_after in kill_points:
        runs.append(_run_until_killed(script, out, kill_after, rng))
        assert not (out / "break_a_scene.safetensors").exists() or runs[-1] == 0
    for _ in range(4):  # resume until training completes
        runs.append(_run_until_killed(script, out, None, rng))
        if runs[-1] == 0:
            break
    assert runs[-1] == 0, runs
    assert runs.count(-signal.SIGKILL) == 2, f"kills {kill_points} landed too late: {runs}"
    got = _tensors(out / "break_a_scene.safetensors")
    assert got.keys() == expected.keys()
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not different, f"kills after {kill_points}: {different[:3]} differ"


# --------------------------------------------------------------------------------------------
# 4. a non-finite loss stops training at once


def test_nan_loss_stops_at_its_step_naming_the_intact_last_checkpoint(tmp_path, monkeypatch):
    losses: list[float] = []
    step_fn = trainer_module.training_step

    def recording_step(*args, **kwargs):
        loss, logs = step_fn(*args, **kwargs)
        losses.append(logs["loss"])
        return loss, logs

    saved: dict[int, str] = {}
    save_fn = trainer_module.save_checkpoint

    def recording_save(directory, **kwargs):
        folder = save_fn(directory, **kwargs)
        saved[kwargs["step"]] = hashlib.sha256(
            (folder / "state.safetensors").read_bytes()
        ).hexdigest()
        return folder

    monkeypatch.setattr(trainer_module, "training_step", recording_step)
    monkeypatch.setattr(trainer_module, "save_checkpoint", recording_save)
    # a learning rate that blows the handle embeddings up after the first update
    cfg = config(checkpointing_steps=1, phase1_learning_rate=1e30, phase1_steps=4)
    pipe = tiny_pipeline("sd1")
    vocab = len(pipe.tokenizer)
    with pytest.raises(bas.NonFiniteLossError) as info:
        bas.BreakASceneTrainer(pipe, tiny_scene(RES), cfg).train(tmp_path, progress=False)
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, bas.TrainingError)
    bad_step = next(
        i for i, loss in enumerate(losses, 1) if loss != loss or abs(loss) == float("inf")
    )
    assert len(losses) == bad_step, "training went on after the loss became non-finite"
    message = str(info.value)
    assert re.search(rf"at step {bad_step} \(phase 1\)", message), message
    last_good = tmp_path / "checkpoints" / f"checkpoint-{bad_step - 1}"
    assert f"last good checkpoint: {last_good}" in message
    assert sorted(saved) == list(range(1, bad_step)), "a checkpoint was written for the bad step"
    digest = hashlib.sha256((last_good / "state.safetensors").read_bytes()).hexdigest()
    assert digest == saved[bad_step - 1]  # unchanged bytes
    state = load_checkpoint(last_good)
    assert state.step == bad_step - 1 and all(
        torch.isfinite(v).all() for v in state.params.values()
    )
    assert not (tmp_path / "break_a_scene.safetensors").exists()
    assert len(pipe.tokenizer) == vocab + 2  # the handles stay (as after a finished run)


@pytest.mark.slow
def test_resume_uses_the_configured_learning_rates(tmp_path):
    """NonFiniteLossError says 'lower the learning rate': a resumed run must really use it."""
    cfg = config(checkpointing_steps=1, phase1_steps=4, phase2_steps=2, lr_scheduler="linear")
    first = bas.BreakASceneTrainer(
        tiny_pipeline("sd1"), tiny_scene(RES), cfg.replace(phase2_steps=0)
    )
    first.train(tmp_path / "a", progress=False)
    same = cfg.replace(resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "checkpoint-2"))
    lower = same.replace(phase1_learning_rate=cfg.phase1_learning_rate / 10)
    runs = {}
    for name, resumed in (("same", same), ("lower", lower)):
        trainer = bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), resumed)
        trainer.train(tmp_path / name, progress=False)
        runs[name] = [h["lr"] for h in trainer.history if h["phase"] == 1]
    assert len(runs["same"]) == 2 and runs["lower"] == pytest.approx([x / 10 for x in runs["same"]])


def test_nan_in_the_initial_handle_rows_is_caught_at_step_one(tmp_path, monkeypatch):
    install = trainer_module.HandleEmbedding.install

    def poisoned(text_encoder, ids):
        handles = install(text_encoder, ids)
        with torch.no_grad():
            handles.handle_weight[0].fill_(float("nan"))
        return handles

    monkeypatch.setattr(trainer_module.HandleEmbedding, "install", staticmethod(poisoned))
    with pytest.raises(bas.NonFiniteLossError, match=r"at step 1 \(phase 1\).*checkpoint: none"):
        bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), config()).train(
            tmp_path, progress=False
        )
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# 5. load/unload 50 times


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("two")
    paths = []
    for seed in (0, 1):
        cfg = config(phase1_steps=1, phase2_steps=1, seed=seed, phase2_learning_rate=1e-2)
        paths.append(
            bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), cfg).train(
                root / str(seed), progress=False
            )
        )
    return paths


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _snapshot(pipe) -> dict:
    return {
        "weights": {
            f"{part}.{k}": v.detach().clone()
            for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()
        },
        "vocab": dict(pipe.tokenizer.get_vocab()),
        "added": dict(pipe.tokenizer.get_added_vocab()),
        "processors": {k: (type(v), id(v)) for k, v in pipe.unet.attn_processors.items()},
        "te_processors": [type(m) for m in pipe.text_encoder.modules()],
        "embedding_rows": pipe.text_encoder.get_input_embeddings().weight.shape[0],
    }


@pytest.mark.slow
def test_twenty_load_unload_rounds_leave_no_trace(two_bundles):
    pipe = tiny_pipeline("sd1")
    start = _snapshot(pipe)
    bundles = [bas.Bundle.load(p) for p in two_bundles]  # from memory: no file I/O noise
    rss_warm = objects_warm = 0
    for i in range(20):
        if i == 5:
            gc.collect()
            rss_warm, objects_warm = _rss(), len(gc.get_objects())
        a = pipe.load_break_a_scene(bundles[0], fuse=i % 3 == 0, scale=0.5 + (i % 4) / 4)
        b = pipe.load_break_a_scene(
            two_bundles[1] if i % 5 == 0 else bundles[1], token_prefix="b_", fuse=i % 2 == 1
        )
        assert a == ["<asset0>", "<asset1>"] and b == ["<b_asset0>", "<b_asset1>"]
        if i % 2:  # unload one by one, in either order, or both at once
            first, second = sorted(pipe.break_a_scene_adapters, reverse=i % 4 == 1)
            pipe.unload_break_a_scene(first)
            pipe.unload_break_a_scene(second)
        else:
            pipe.unload_break_a_scene()
        assert pipe.break_a_scene_adapters == {}
    gc.collect()
    object_growth = len(gc.get_objects()) - objects_warm
    rss_growth = _rss() - rss_warm

    end = _snapshot(pipe)
    assert end["weights"].keys() == start["weights"].keys()
    assert all(torch.equal(end["weights"][k], v) for k, v in start["weights"].items())
    for key in ("vocab", "added", "processors", "te_processors", "embedding_rows"):
        assert end[key] == start[key], key
    assert not getattr(pipe.unet, "peft_config", None)
    assert not getattr(pipe.text_encoder, "peft_config", None)
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    assert len(pipe.tokenizer) == len(start["vocab"])
    assert object_growth < 2000, f"{object_growth} more live Python objects after 15 rounds"
    assert rss_growth < 64 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MB in 15 rounds"
