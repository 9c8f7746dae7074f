"""8-bit Adam (bitsandbytes, the ``[bnb]`` extra): training, checkpoints and exact resume; optimizer
state to and from safetensors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import tiny_config
from safetensors import safe_open

import diffusers_breakscene as bas
from diffusers_breakscene.cli import build_parser, config_from_args
from diffusers_breakscene.optimizer import adamw_class
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene

RES = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes):
    # phase2="full": the UNet's large weights get 8-bit state (bitsandbytes keeps tensors under
    # 4096 values, such as the tiny model's LoRA matrices, in 32 bits)
    return tiny_config(RES, use_8bit_adam=True, phase2="full", phase2_full_learning_rate=1e-4,
                       **changes)  # fmt: skip


def final(path) -> dict[str, torch.Tensor]:
    bundle = bas.Bundle.load(path)
    unet = tiny_pipeline("sd1").unet.__class__.from_pretrained(path.parent / "unet")
    return {**bundle.handles, **{f"unet.{k}": v for k, v in unet.state_dict().items()}}


def test_adamw_class_picks_bitsandbytes_when_asked():
    import bitsandbytes as bnb

    assert adamw_class(False) is torch.optim.AdamW
    assert adamw_class(True) is bnb.optim.AdamW8bit


def test_eight_bit_adam_trains_saves_8bit_state_and_resumes_exactly(tmp_path):
    cfg = config(checkpointing_steps=4, lr_scheduler="linear")  # + the phase ends: 3, 4, 6
    reference = bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), cfg).train(
        tmp_path / "ref", progress=False
    )
    # the optimizer state in the checkpoint is 8-bit (uint8) for the large weights
    state = tmp_path / "ref" / "checkpoints" / "checkpoint-6" / "state.safetensors"
    with safe_open(state, "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("optimizer.")}  # noqa: SIM118
    assert "U8" in dtypes
    # resume from the checkpoint after step 4 (in phase 2): the same final weights
    resumed = cfg.replace(
        resume_from_checkpoint=str(tmp_path / "ref" / "checkpoints" / "checkpoint-4")
    )
    path = bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(RES), resumed).train(
        tmp_path / "resumed", progress=False
    )
    expected, got = final(reference), final(path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    plain = bas.BreakASceneTrainer(
        tiny_pipeline("sd1"), tiny_scene(RES), cfg.replace(use_8bit_adam=False)
    ).train(tmp_path / "plain", progress=False)
    assert not all(torch.equal(expected[k], v) for k, v in final(plain).items())  # 8-bit differs


def test_without_bitsandbytes_the_trainer_refuses_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    pipe = tiny_pipeline("sd1")
    vocab = len(pipe.tokenizer)
    with pytest.raises(bas.InvalidConfigError, match=r"use_8bit_adam=True needs bitsandbytes"):
        bas.BreakASceneTrainer(pipe, tiny_scene(RES), config())
    assert len(pipe.tokenizer) == vocab and not list(tmp_path.iterdir())


def test_cli_takes_the_diffusers_script_flag():
    args = build_parser().parse_args(
        ["train", "--scene-dir", "s", "--output", "o", "--use_8bit_adam"]
    )
    assert config_from_args(args).use_8bit_adam is True


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from diffusers_breakscene.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    def trained(steps: int, opt_state=None):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, 4))
        opt = torch.optim.AdamW([p], lr=0.1)
        if opt_state is not None:
            p.data.copy_(opt_state[0])
            opt.load_state_dict(opt_state[1])
        for _ in range(steps):
            p.grad = p.detach() ** 2
            opt.step()
        return p, opt

    p, opt = trained(2)
    state = opt.state_dict()
    state["state"][0]["nested"] = {"absmax": torch.ones(2)}  # bitsandbytes' 8-bit layout
    state["state"][0]["note"] = 7  # a non-tensor entry goes to the JSON part
    tensors, rest = optimizer_to_tensors(state, prefix="opt.")
    assert set(tensors) == {
        "opt.0.exp_avg",
        "opt.0.exp_avg_sq",
        "opt.0.step",
        "opt.0.nested/absmax",
    }
    save_file({**tensors, "weight": p.detach()}, tmp_path / "s.safetensors")
    loaded = load_file(tmp_path / "s.safetensors")  # other tensors in the file are ignored
    back = optimizer_from_tensors(loaded, json.loads(json.dumps(rest)), prefix="opt.")
    assert back["state"][0]["note"] == 7 and torch.equal(
        back["state"][0]["nested"]["absmax"], torch.ones(2)
    )
    del back["state"][0]["nested"], back["state"][0]["note"]
    # resuming from the round-tripped state continues exactly as the uninterrupted run
    resumed, _ = trained(3, (loaded["weight"], back))
    straight, _ = trained(5)
    assert torch.equal(resumed, straight)
