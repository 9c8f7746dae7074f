"""The toy pipeline shipped in diffusers_breakscene/assets/toy, and its training script."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_breakscene.toy.model import TOY_MODEL_DIR, toy_model_path, toy_pipeline
from diffusers_breakscene.toy.train_latents import read_checkpoint_info, save_model_folder


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return toy_pipeline()


def test_shipped_weights_are_small_safetensors():
    folder = toy_model_path()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    files = [p for part in parts for p in (folder / part).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    info = json.loads((folder / "toy_info.json").read_text())
    assert info["heldout"]["shapes"] == ["heart"]


def _recipe(args: dict) -> dict:
    # Not part of the recipe: where things go, logging, and --compile (added after the shipped
    # weights were trained; it runs the same steps, not other ones).
    how = {"output", "work_dir", "log_every", "compile"}
    # Added after the shipped weights were trained, with what they trained on as the default.
    later = {"lr_decay": "cosine", "lr_floor": 0.1, "decay_share": 0.2}
    args = {**later, **json.loads(json.dumps(args))}
    return {k: v for k, v in args.items() if k not in how}


def test_shipped_weights_record_the_commands_that_trained_them():
    from diffusers_breakscene.toy.train_base import parse_args

    info = json.loads((toy_model_path() / "toy_info.json").read_text())
    runs = [c for c in info["history"] if c.startswith("python -m diffusers_breakscene.toy.")]
    first, last = (vars(parse_args(shlex.split(c)[3:])) for c in (runs[0], runs[-1]))
    # The first run is `train_base --output DIR` (its defaults: 85 minutes on 2 CPU cores)...
    assert _recipe(first) == _recipe(vars(parse_args(["--output", "x"])))
    # ...and the shipped weights are that run's work folder trained on: the same recipe with a
    # longer schedule (--max-minutes 113 --steps 20000), as `args` records.
    assert info["command"] == runs[-1]
    first_recipe, last_recipe = _recipe(first), _recipe(last)
    assert last_recipe == _recipe(info["args"])
    longer = {k for k in first_recipe if first_recipe[k] != last_recipe[k]}
    assert longer == {"steps", "max_minutes"} and last["max_minutes"] > first["max_minutes"]
    assert info["args"]["word_weight"] > 0 and info["args"]["outline_weight"] > 0
    assert info["diffusion_steps"] > 10_000


def test_loads_through_from_pretrained(one_torch_thread):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, local_files_only=True)
    assert pipe.unet.dtype == torch.float32
    assert pipe.unet.config.sample_size == 32
    # zero terminal SNR + v-prediction: the text, not the starting noise, picks the background
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    ids = pipe.tokenizer("a photo of a red checkered heart").input_ids
    assert len(ids) == 2 + 7  # every world word is one token


def test_attention_level_is_8x8_in_down_and_up_blocks(toy):
    from diffusers_breakscene import AttentionStore
    from diffusers_breakscene.attention import cross_attention_levels

    places = {place for place, f in cross_attention_levels(toy.unet).values() if f == 4}
    assert {"down", "up"} <= places
    with AttentionStore.attach(toy.unet) as store:
        toy("a photo of a red circle", num_inference_steps=2, height=64, width=64)
        maps = store.aggregate(part="cond", over_steps=True)
    assert tuple(maps.shape) == (1, 8, 8, 77)


@pytest.mark.slow
def test_colour_words_change_the_colour(toy):
    def images(prompt: str) -> np.ndarray:
        return toy(
            [prompt] * 4,
            num_inference_steps=12,
            guidance_scale=4.0,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    def reddish(x: np.ndarray) -> float:  # fraction of clearly red/orange pixels
        return float(((x[..., 0] - x[..., 2]) > 0.3).mean())

    def bluish(x: np.ndarray) -> float:
        return float(((x[..., 2] - x[..., 0]) > 0.3).mean())

    red = images("a photo of a red circle on a gray background")
    blue = images("a photo of a blue circle on a gray background")
    assert reddish(red) > reddish(blue) + 0.01
    assert bluish(blue) > bluish(red) + 0.01


def test_attention_check_runs(toy):
    from diffusers_breakscene.toy.attention_check import attention_iou, attention_ious
    from diffusers_breakscene.toy.world import sample_scene

    result = attention_iou(toy, num_samples=2, timesteps=(500,))
    assert result["num_objects"] >= 2
    assert 0.0 <= result["mean_iou"] <= 1.0
    # one shape per IoU, in the scenes' object order
    expected = [o.shape for i in range(2) for o in sample_scene(i, "train", size=64).objects]
    assert result["shapes"] == expected and len(result["ious"]) == len(expected)
    # the pattern word's map: only objects whose pattern is written (not plain)
    patterned = [o.shape for i in range(2) for o in sample_scene(i, "train", size=64).objects
                 if o.pattern != "plain"]  # fmt: skip
    pattern = attention_iou(toy, 2, timesteps=(500,), words="pattern")
    assert pattern["shapes"] == patterned and "plain" not in pattern["patterns"]
    colour = attention_iou(toy, 2, timesteps=(500,), words="colour")
    assert colour["words"] == "colour" and colour["shapes"] == expected
    with pytest.raises(ValueError, match="words='size' must be"):
        attention_iou(toy, 2, words="size")
    # every choice from one pass over the scenes: the same results as one call per choice
    by_word = attention_ious(toy, 2, timesteps=(500,), words=("colour", "pattern"))
    assert by_word == {"colour": colour, "pattern": pattern}
    with pytest.raises(ValueError, match="words=\\(\\) must be"):
        attention_ious(toy, 2, words=())


@pytest.mark.slow
def test_training_script_runs_and_resumes(tmp_path, one_torch_thread, capsys):
    from diffusers import StableDiffusionPipeline

    from diffusers_breakscene.toy.train_base import main

    argv = [
        "--output",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "work"),
        "--threads",
        "1",
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--num-images",
        "16",
        "--decoder-steps",
        "2",
        "--decoder-batch",
        "2",
        "--steps",
        "2",
        "--batch",
        "4",
        "--warmup",
        "1",
        "--save-every",
        "1",
        "--band-share",
        "0.5",
        "--lr-decay",
        "linear",
        "--device",
        "cpu",
    ]
    out = main(argv)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.sample_size == 32 and pipe.unet.device.type == "cpu"
    info = json.loads((out / "toy_info.json").read_text())
    assert info["diffusion_steps"] == 2
    assert info["args"]["band_share"] == 0.5 and info["args"]["timestep_band"] == [500, 950]
    assert info["args"]["lr_decay"] == "linear" and info["args"]["lr_floor"] == 0.1
    # Every stage wrote its files whole: no partial folder or temporary file is left.
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == [
        "cache.json", "cache.safetensors", "diffusion.json", "diffusion.safetensors", "vae",
        "vae_decoder",
    ]  # fmt: skip
    ckpt = work / "diffusion.safetensors"
    assert read_checkpoint_info(ckpt)["step"] == 2
    # Resume: one more step on top of the checkpoint. The step count travels inside the
    # checkpoint, so a stale diffusion.json (a run killed between the two writes) is not read.
    (work / "diffusion.json").write_text(json.dumps({"step": 1}))
    argv[argv.index("--steps") + 1] = "3"
    capsys.readouterr()
    main(argv)
    assert "diffusion: resuming at step 2" in capsys.readouterr().out
    assert json.loads((out / "toy_info.json").read_text())["diffusion_steps"] == 3
    # A checkpoint written before the step count moved into it still resumes from its .json.
    legacy = load_file(ckpt)
    save_file(legacy, ckpt)
    assert read_checkpoint_info(ckpt) == json.loads((work / "diffusion.json").read_text())
    argv[argv.index("--steps") + 1] = "4"
    main(argv)
    assert json.loads((out / "toy_info.json").read_text())["diffusion_steps"] == 4
    # ...and one with no step count anywhere is refused by name, untouched.
    save_file(load_file(ckpt), ckpt)
    (work / "diffusion.json").unlink()
    before = ckpt.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"holds no step count.*another --work-dir"):
        main(argv)
    assert ckpt.read_bytes() == before
    assert "VAE" not in capsys.readouterr().out  # refused before any stage ran


def test_model_folders_are_saved_whole(tmp_path):
    from diffusers import AutoencoderKL

    from diffusers_breakscene.toy.model import build_vae

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half-written")
    vae = build_vae()
    save_model_folder(vae, folder)  # replaces what a killed run left, leaves nothing beside it
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]
    again = AutoencoderKL.from_pretrained(folder)
    for (name, a), b in zip(vae.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_training_script_takes_another_unet_and_refuses_to_resume_a_different_one(
    tmp_path, one_torch_thread, capsys
):
    from diffusers import UNet2DConditionModel

    from diffusers_breakscene.toy.train_base import main

    argv = ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    argv += ["--threads", "1", "--vae-steps", "1", "--vae-batch", "2", "--num-images", "8"]
    argv += ["--decoder-steps", "0", "--steps", "1", "--batch", "2", "--warmup", "1"]
    out = main(
        [*argv, "--unet-channels", "16,32,48", "--unet-layers", "1,2,2", "--compile", "eager"]
    )
    assert "UNet compiled with 'eager'" in capsys.readouterr().out
    assert json.loads((out / "toy_info.json").read_text())["args"]["compile"] == "eager"
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    assert list(unet.config.block_out_channels) == [16, 32, 48]
    assert list(unet.config.layers_per_block) == [1, 2, 2]
    before = (tmp_path / "work" / "diffusion.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"--unet-layers \[1, 1, 1\].*another --work-dir"):
        main([*argv, "--unet-channels", "16,32,48", "--steps", "2"])
    assert (tmp_path / "work" / "diffusion.safetensors").read_bytes() == before


@pytest.mark.slow
def test_training_script_continues_a_saved_pipeline_and_refuses_another_architecture(
    tmp_path, one_torch_thread
):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffusers_breakscene.toy.model import toy_model_path
    from diffusers_breakscene.toy.train_base import main

    shipped = toy_model_path()
    argv = ["--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    argv += ["--threads", "1", "--num-images", "8", "--decoder-steps", "0", "--steps", "1"]
    argv += ["--batch", "2", "--warmup", "1", "--lr", "1e-12", "--init-from", str(shipped)]
    out = main([*argv, "--word-weight", "0.5", "--outline-weight", "3"])
    assert json.loads((out / "toy_info.json").read_text())["args"]["outline_weight"] == 3
    # One step at a negligible rate: the continued weights are the shipped ones, not random ones.
    ours = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    theirs = UNet2DConditionModel.from_pretrained(shipped / "unet").state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-4
    encoder = AutoencoderKL.from_pretrained(out / "vae").encoder.state_dict()
    shipped_encoder = AutoencoderKL.from_pretrained(shipped / "vae").encoder.state_dict()
    assert all(torch.equal(encoder[k], shipped_encoder[k]) for k in shipped_encoder)
    with pytest.raises(SystemExit, match=r"--init-from .*does not match --unet-channels"):
        main([*argv, "--work-dir", str(tmp_path / "work2"), "--unet-layers", "1,2,2"])
    assert not (tmp_path / "work2" / "vae").exists()  # refused before any stage ran
    with pytest.raises(SystemExit, match=r"not a saved pipeline folder \(missing vae/config"):
        main([*argv, "--work-dir", str(tmp_path / "work3"), "--init-from", str(tmp_path)])


def test_outline_maps_mark_the_visible_outlines_and_nothing_else():
    from diffusers_breakscene.toy.train_base import outline_maps
    from diffusers_breakscene.toy.world import ToyObject, render_scene

    square = ToyObject("square", "red", "plain", 0.5, (0.5, 0.5), 0.0)
    ring = ToyObject("ring", "blue", "plain", 0.3, (0.75, 0.5), 0.0)
    maps = outline_maps([([square], "gray"), ([square, ring], "beach")], 32)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float16
    one, two = maps.float()
    # A square of side ~ 0.5 x 32 / sqrt(2) latent pixels: its outline is marked, its inside and
    # the background far from it are not.
    assert one[16, 16] == 0 and one[0, 0] == 0 and one[31, 31] == 0
    assert one.max() == 1 and 0.05 < (one > 0).float().mean() < 0.3
    row = one[16]
    assert row[:16].max() == 1 and row[16:].max() == 1  # left and right edges
    # The ring drawn over the square adds its own outline (and its hole's) where it covers it.
    ring_mask = torch.from_numpy(render_scene([square, ring], "beach").masks[1]).float()
    ring_small = torch.nn.functional.adaptive_avg_pool2d(ring_mask[None, None], 32)[0, 0]
    assert ((two > 0) & ~(one > 0) & (ring_small > 0)).sum() > 10
    assert torch.equal(maps[0], outline_maps([([square], "night")], 32)[0])  # setting-free


def test_word_identity_loss_is_low_for_distinct_words_and_high_for_collapsed_ones():
    from diffusers_breakscene.toy.model import build_text_encoder, toy_tokenizer
    from diffusers_breakscene.toy.train_base import _word_identity_loss

    torch.manual_seed(0)
    encoder = build_text_encoder(len(toy_tokenizer()))
    table = encoder.get_input_embeddings().weight.detach()
    word_ids = torch.tensor([11, 12, 13])
    own = table[word_ids]  # each word's state is its own embedding: the loss's optimum
    collapsed = table[word_ids[:1]].expand(3, -1)  # every word the same state
    low = _word_identity_loss(encoder, own, word_ids).item()
    high = _word_identity_loss(encoder, collapsed, word_ids).item()
    assert low < 1.0 < high


def test_training_script_reads_unet_shapes_and_names_a_bad_one(capsys):
    from diffusers_breakscene.toy.train_base import parse_args

    args = parse_args(["--output", "x", "--unet-layers", "2", "--unet-channels", "32,64,128"])
    assert args.unet_layers == (2, 2, 2)
    assert args.unet_channels == (32, 64, 128)
    assert parse_args(["--output", "x"]).unet_layers == (1, 1, 1)
    for bad in ("1,2", "a,b,c"):
        with pytest.raises(SystemExit):
            parse_args(["--output", "x", "--unet-layers", bad])
        assert "--unet-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--output", "x", "--outline-weight", "-1"])
    assert "--outline-weight -1.0: give 0 (off) or more" in capsys.readouterr().err


def test_learning_rate_warms_up_then_decays_to_its_floor_by_steps_or_minutes():
    from diffusers_breakscene.toy.train_base import _lr_at, parse_args

    base = ["--output", "x", "--lr", "1e-3", "--warmup", "10", "--steps", "110"]
    cosine = parse_args([*base, "--max-minutes", "60"])
    linear = parse_args([*base, "--max-minutes", "60", "--lr-decay", "linear", "--lr-floor", "0"])
    for args in (cosine, linear):
        assert _lr_at(0, args) == pytest.approx(1e-4) and _lr_at(9, args) == pytest.approx(1e-3)
        assert _lr_at(10, args) == pytest.approx(1e-3)
    # Halfway both are at the middle of their range; at the end each sits on its floor.
    assert _lr_at(60, cosine) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert _lr_at(60, linear) == pytest.approx(0.5e-3)
    assert _lr_at(110, cosine) == pytest.approx(1e-4) and _lr_at(110, linear) == 0.0
    # A quarter of the way, linear is lower than cosine (cosine keeps the peak longer)...
    assert _lr_at(35, linear) == pytest.approx(0.75e-3)
    assert _lr_at(35, linear) < _lr_at(35, cosine)
    # ...and the wall-time cap ends the schedule when it comes first.
    assert _lr_at(20, linear, minutes=45.0) == pytest.approx(0.25e-3)
    assert _lr_at(20, linear, minutes=90.0) == 0.0
    # Warmup-stable-decay: the peak held until the last quarter, then a straight line to 0.1.
    wsd = parse_args([*base, "--max-minutes", "60", "--lr-decay", "wsd", "--decay-share", "0.25"])
    assert _lr_at(10, wsd) == _lr_at(60, wsd) == _lr_at(85, wsd) == pytest.approx(1e-3)
    assert _lr_at(97.5, wsd) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert _lr_at(110, wsd) == pytest.approx(1e-4)
    assert _lr_at(20, wsd, minutes=52.5) == pytest.approx(1e-4 + 0.5 * 9e-4)
    # The decoder stage's schedule is the same function, cosine to 0.1 by its step count.
    from diffusers_breakscene.toy.train_latents import decayed_lr

    assert decayed_lr(5e-4, 200 / 400) == pytest.approx(5e-5 + 0.5 * 4.5e-4)
    assert decayed_lr(5e-4, 1.0) == pytest.approx(5e-5)


def test_sample_timesteps_draws_its_share_from_the_band():
    from diffusers_breakscene.toy.train_base import sample_timesteps

    uniform = sample_timesteps(4000, torch.Generator().manual_seed(3))
    # share 0 is the plain uniform draw, number for number (the recipe without the option)
    assert torch.equal(
        uniform, torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(3))
    )
    half = sample_timesteps(4000, torch.Generator().manual_seed(3), (600, 900), 0.5)
    in_band = ((half >= 600) & (half < 900)).float().mean().item()
    assert 0.6 < in_band < 0.7  # 0.5 from the band + 0.5 x 0.3 of the uniform half
    assert half.min() >= 0 and half.max() < 1000
    every = sample_timesteps(500, torch.Generator().manual_seed(3), (600, 900), 1.0)
    assert every.min() >= 600 and every.max() < 900


def test_diffusion_loss_is_the_sum_of_its_weighted_parts_and_reaches_both_networks(
    one_torch_thread,
):
    from diffusers_breakscene.attention import AttentionStore
    from diffusers_breakscene.toy.model import build_text_encoder, build_unet, toy_tokenizer
    from diffusers_breakscene.toy.train_base import (
        DiffusionBatch,
        caption_tokens,
        diffusion_loss,
        parse_args,
        scene_batch,
    )
    from diffusers_breakscene.toy.train_latents import attention_masks, optimizer_step
    from diffusers_breakscene.toy.world import sample_scene

    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer))
    scenes = [sample_scene(i, "train") for i in range(2)]
    size = unet.config.sample_size
    noisy, target = torch.randn(2, 4, size, size), torch.randn(2, 4, size, size)
    batch = scene_batch(scenes, tokenizer, noisy, torch.tensor([100, 700]), target)
    # the batch holds each scene's caption, its object words' positions and its masks
    words, positions = caption_tokens(list(scenes[1].objects), scenes[1].setting)
    assert tokenizer.decode(batch.ids[1], skip_special_tokens=True) == " ".join(words)
    assert [(p, j) for b, p, j in batch.triples if b == 1] == [
        (p, j) for j, group in enumerate(positions) for p in group
    ]
    assert torch.equal(batch.masks[1], attention_masks(scenes[1].masks))
    assert scene_batch(scenes, tokenizer, noisy, batch.timesteps, target, False).outlines is None
    store = AttentionStore.attach(unet)
    try:
        args = parse_args(["--output", "x", "--outline-weight", "0", "--word-weight", "0"])
        plain, attention, word = diffusion_loss(text_encoder, unet, batch, args, store)
        args = parse_args(["--output", "x"])  # the defaults: outline and word losses on
        total, attention_2, word_2 = diffusion_loss(text_encoder, unet, batch, args, store)
    finally:
        store.detach()
    assert word.item() == 0.0 and word_2.item() > 0 and attention.item() > 0
    assert torch.allclose(attention, attention_2)
    # outlines weigh the prediction loss up: more than the word term alone adds
    assert total.item() > plain.item() + args.word_weight * word_2.item()
    # per-timestep weights: the second sample (t = 700) weighs nothing, so the loss is half the
    # first sample's alone; without object words no attention or word term
    weights = torch.zeros(1000)
    weights[100] = 1.0
    words_out = batch._replace(triples=[])
    halved = diffusion_loss(text_encoder, unet, words_out, args, None, weights)
    first = DiffusionBatch(*(x[:1] for x in batch[:4]), [], batch.masks[:1], batch.outlines[:1])
    alone = diffusion_loss(text_encoder, unet, first, args)[0]
    assert torch.allclose(halved[0], alone / 2, rtol=1e-4)
    assert halved[1].item() == 0.0 and halved[2].item() == 0.0

    params = list(unet.parameters()) + list(text_encoder.parameters())
    before = [p.detach().clone() for p in params]
    optimizer_step(torch.optim.SGD(params, lr=0.1), total, params)
    moved = [not torch.equal(a, p) for a, p in zip(before, params, strict=True)]
    in_unet = len(list(unet.parameters()))
    assert any(moved[:in_unet]) and any(moved[in_unet:])  # both networks learn
    change = torch.cat([(p.detach() - a).flatten() for a, p in zip(before, params, strict=True)])
    norm = change.norm()
    assert float(norm) <= 0.1 + 1e-5  # the gradients were clipped to norm 1


def test_diffusion_loss_is_the_same_through_torch_compile(one_torch_thread):
    """``--compile``: the attention store still records under torch.compile's tracing, so the
    compiled UNet gives the same three losses (the "eager" backend traces as inductor does, in
    seconds instead of minutes)."""
    from diffusers_breakscene.attention import AttentionStore
    from diffusers_breakscene.toy.model import build_text_encoder, build_unet, toy_tokenizer
    from diffusers_breakscene.toy.train_base import diffusion_loss, parse_args, scene_batch
    from diffusers_breakscene.toy.world import sample_scene

    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer))
    latents = torch.randn(2, 4, 32, 32)
    scenes = [sample_scene(i, "train") for i in range(2)]
    batch = scene_batch(scenes, tokenizer, latents, torch.tensor([300, 800]), latents.flip(0))
    args = parse_args(["--output", "x", "--compile", "eager"])
    store = AttentionStore.attach(unet)
    try:
        eager = diffusion_loss(text_encoder, unet, batch, args, store)
        compiled = torch.compile(unet, backend=args.compile)
        for _ in range(2):  # the second call runs the traced graph, not the first trace
            traced = diffusion_loss(text_encoder, compiled, batch, args, store)
            assert traced[1].item() > 0  # the attention loss saw the recorded maps
            for a, b in zip(eager, traced, strict=True):
                torch.testing.assert_close(a, b)
    finally:
        store.detach()


def test_training_script_names_a_bad_compile_backend_or_a_missing_compiler(
    capsys, monkeypatch, tmp_path
):
    from diffusers_breakscene.toy.train_base import parse_args

    assert parse_args(["--output", "x"]).compile is None
    with pytest.raises(SystemExit):
        parse_args(["--output", "x", "--compile", "turbo"])
    assert (
        "--compile 'turbo': not a torch.compile backend; give one of [" in capsys.readouterr().err
    )
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ to be found
    with pytest.raises(SystemExit):
        parse_args(["--output", "x", "--compile"])
    assert "inductor needs a C++ compiler" in capsys.readouterr().err
    assert parse_args(["--output", "x", "--compile", "eager"]).compile == "eager"  # needs none
    compiler = tmp_path / "g++"  # inductor's compiler where $CXX is not set
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    # a bare --compile means inductor, and does not swallow the next option
    args = parse_args(["--output", "x", "--compile", "--steps", "5"])
    assert args.compile == "inductor" and args.steps == 5


def test_training_script_names_a_bad_band_share_or_device(capsys):
    from diffusers_breakscene.toy.train_base import parse_args

    args = parse_args(["--output", "x", "--timestep-band", "400", "800", "--band-share", "0.3"])
    assert tuple(args.timestep_band) == (400, 800) and args.band_share == 0.3
    for bad, message in (
        (["--timestep-band", "800", "400"], "--timestep-band 800 400: give 0 <= LO < HI <= 1000"),
        (["--timestep-band", "0", "1001"], "--timestep-band 0 1001"),
        (["--band-share", "1.5"], "--band-share 1.5: give a share between 0 and 1"),
        (["--lr-floor", "-0.1"], "--lr-floor -0.1: give a share of --lr between 0 and 1"),
        (["--lr-decay", "step"], "invalid choice: 'step'"),
        (["--decay-share", "0"], "--decay-share 0.0: give a share of the run above 0, at most 1"),
        (["--device", "gpu0"], "--device 'gpu0'"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--output", "x", *bad])
        assert message in capsys.readouterr().err
    if torch.cuda.is_available():
        assert parse_args(["--output", "x", "--device", "cuda"]).device == "cuda"
    else:
        with pytest.raises(SystemExit):
            parse_args(["--output", "x", "--device", "cuda"])
        assert "CUDA is not available here" in capsys.readouterr().err


def test_build_unet_names_a_bad_architecture():
    from diffusers_breakscene.toy.model import build_unet

    unet = build_unet((16, 32, 48), (1, 2, 2))
    assert [len(b.resnets) for b in unet.down_blocks] == [1, 2, 2]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 2]  # one more, as in diffusers
    with pytest.raises(ValueError, match=r"block_out_channels.*multiples of 16"):
        build_unet((32, 64, 100))
    with pytest.raises(ValueError, match=r"layers_per_block.*three counts"):
        build_unet(layers_per_block=(1, 0, 1))


def test_shipped_text_encoder_uses_the_classic_key_layout():
    # transformers 5.0 (the lower bound) reads only "text_model."-prefixed CLIP keys; without the
    # prefix it would silently start the toy text encoder from random weights.
    from safetensors import safe_open

    from diffusers_breakscene.toy.model import toy_model_path

    path = toy_model_path() / "text_encoder" / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


@pytest.mark.slow
def test_toy_model_benchmark_smoke():
    from background import BACKGROUND

    BACKGROUND.stdout("toy_model")  # run beside the other tests (background.py)
    tmp_path = BACKGROUND.root / "toy_model"
    report = json.loads((tmp_path / "toy_model-smoke.json").read_text())
    assert report["generation"]["one_object"]["prompts"] == 4
    assert set(report["attention"]) == {"train", "heldout"}
    assert "| one object | 4 |" in (tmp_path / "toy_model-smoke.md").read_text()
    for split in report["attention"].values():  # each object word's map, not only the shape's
        assert set(split["by_word"]) == {"colour", "pattern", "all"}
        assert split["by_word"]["colour"]["objects"] == split["objects"]  # every object has one
        assert split["by_word"]["pattern"]["objects"] <= split["objects"]  # plain ones have none
        assert "plain" not in split["by_word"]["pattern"]["by_pattern"]
    assert "| split | shape word | colour word |" in (tmp_path / "toy_model-smoke.md").read_text()
    assert (tmp_path / "toy_model-smoke.png").is_file()
    # the per-shape breakdown accounts for every prompted object, right or read as another shape
    for part, per_prompt in (("one_object", 1), ("two_objects", 2)):
        rows = report["generation"][part]["by_shape"]
        assert sum(r["objects"] for r in rows.values()) == 4 * per_prompt
        for shape, r in rows.items():
            assert sum(r["read"].values()) == r["objects"]
            assert r["shape"] == r["read"].get(shape, 0) / r["objects"]
    assert (
        "| shape | one object | two objects | read instead |"
        in (tmp_path / "toy_model-smoke.md").read_text()
    )
    # compared with the shipped evaluator itself: the same images, the same checks
    compared = report["compare_evaluator"]
    for part in ("one_object", "two_objects"):
        assert compared[part]["checks_differing"] == 0.0
        assert compared[part]["colour"] == report["generation"][part]["colour"]


@pytest.mark.slow
def test_toy_autoencoder_benchmark_smoke():
    from background import BACKGROUND

    BACKGROUND.stdout("toy_autoencoder")  # run beside the other tests (background.py)
    folder = BACKGROUND.root / "toy_autoencoder"
    report = json.loads((folder / "toy_autoencoder-smoke.json").read_text())
    rows = {(r["model"], r["split"]): r for r in report["rows"]}
    shipped = str(Path(__file__).resolve().parents[1] / "diffusers_breakscene/assets/toy")
    assert set(rows) == {(m, s) for m in ("rendered", "toy", shipped) for s in ("train", "heldout")}
    for split in ("train", "heldout"):
        rendered, by_name = rows["rendered", split], rows["toy", split]
        by_folder = rows[shipped, split]
        assert rendered["all_right"] >= 0.75  # the evaluator reads rendered scenes (98% in full)
        assert "psnr_db" not in rendered and by_name["psnr_db"] > 15
        # "toy" is the shipped folder: one VAE, the same round trip, the same checks
        for key in ("colour", "shape", "pattern", "setting", "psnr_db", "shape_by_shape"):
            assert by_name[key] == by_folder[key]
    assert rows["rendered", "heldout"]["shape_by_shape"].keys() & {"heart"}  # held-out shape
    table = (folder / "toy_autoencoder-smoke.md").read_text()
    assert "| rendered | train |" in table and "| round trip, `toy` | heldout |" in table
    assert (folder / "toy_autoencoder-smoke.png").is_file()


def test_toy_autoencoder_benchmark_refuses_a_folder_without_a_vae(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import toy_autoencoder

    with pytest.raises(SystemExit):
        toy_autoencoder.main(["--smoke", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no vae/config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unseen_prompts_are_not_training_captions():
    from diffusers_breakscene.toy.evaluator import parse_prompt
    from diffusers_breakscene.toy.prompt_check import unseen_prompts
    from diffusers_breakscene.toy.world import HELDOUT_PAIRS, HELDOUT_PATTERNS, HELDOUT_SHAPES

    prompts = unseen_prompts(30, 30)
    assert len(prompts) == len(set(prompts[:30])) + 30
    for n, prompt in enumerate(prompts):
        objects, setting = parse_prompt(prompt)
        assert len(objects) == (1 if n < 30 else 2) and setting is not None
        # every prompt holds a held-out pair, so no training caption can equal it ...
        assert any((o.shape, o.colour) in HELDOUT_PAIRS for o in objects), prompt
        # ... and uses only words the base model saw in training
        assert not any(o.shape in HELDOUT_SHAPES or o.pattern in HELDOUT_PATTERNS for o in objects)


@pytest.mark.slow
def test_shipped_model_follows_settings_and_colours_of_unseen_prompts(toy):
    # A small quality smoke check (benchmarks/toy_model.py measures 200 prompts: setting 1.00,
    # colour 0.95, shape 0.39 on one-object prompts; docs/toy-world.md).
    from diffusers_breakscene.toy.prompt_check import generation_accuracy, unseen_prompts

    rates, images, _ = generation_accuracy(
        toy, unseen_prompts(8, 0, seed=1), num_inference_steps=15, seed=1
    )
    assert len(images) == 8
    assert rates["setting"] >= 7 / 8, rates
    assert rates["colour"] >= 3 / 8, rates


@pytest.mark.slow
def test_recipe_sweep_trains_each_variant_and_seed_from_one_autoencoder_and_scores_it():
    from background import BACKGROUND

    BACKGROUND.stdout("toy_recipe_sweep")
    folder = BACKGROUND.root / "toy_recipe_sweep"
    data = json.loads((folder / "toy_recipe_sweep-smoke.json").read_text())
    assert list(data["variants"]) == ["outline10"] and data["seeds"] == [1]
    row = data["variants"]["outline10"]
    assert row["flags"] == "--outline-weight 10" and list(row["runs"]) == ["1"]
    run = row["runs"]["1"]
    assert "failed" not in run, run
    assert run["steps"] == 2 and row["steps"] == [2]
    assert 0.0 <= run["generation"]["one_object"]["shape"] <= 1.0
    assert 0.0 <= run["attention_iou"]["heldout"] <= 1.0
    assert row["generation"] == run["generation"]  # the mean of one run
    work = folder / "work"
    info = json.loads((work / "outline10" / "seed1" / "out" / "toy_info.json").read_text())
    assert info["args"]["outline_weight"] == 10.0 and info["args"]["seed"] == 1
    # the autoencoder trained once (seed 0, in base/); seed 1's cache built once beside it and
    # hard-linked into its runs
    assert json.loads((work / "base" / "cache.json").read_text())["seed"] == 0
    assert json.loads((work / "base-seed1" / "cache.json").read_text())["seed"] == 1
    cache = work / "outline10" / "seed1" / "cache.safetensors"
    assert cache.stat().st_ino == (work / "base-seed1" / "cache.safetensors").stat().st_ino
    vae = work / "outline10" / "seed1" / "vae" / "diffusion_pytorch_model.safetensors"
    assert (
        vae.stat().st_ino
        == (work / "base" / vae.relative_to(work / "outline10" / "seed1")).stat().st_ino
    )
    table = (folder / "toy_recipe_sweep-smoke.md").read_text()
    shape = row["generation"]["one_object"]["shape"]
    assert f"| outline10 | `--outline-weight 10` | 2 | {shape:.2f} /" in table
    assert "training seeds 1," in table


def test_recipe_sweep_reports_the_mean_and_range_over_seeds_and_names_failed_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import toy_recipe_sweep

    def scores(shape: float, iou: float) -> dict:
        rates = {"colour": 1.0, "shape": shape, "setting": 1.0, "pattern": 0.5}
        generation = {"one_object": rates, "two_objects": {**rates, "shape": shape / 2}}
        return {
            "steps": 9,
            "generation": generation,
            "attention_iou": {"train": iou, "heldout": iou},
        }

    row = toy_recipe_sweep.summarize(
        {"0": scores(0.6, 0.4), "1": {"failed": "out of memory"}, "2": scores(0.8, 0.5)}
    )
    assert row["steps"] == [9, 9]  # the failed run counts nowhere
    assert row["generation"]["one_object"]["shape"] == pytest.approx(0.7)
    assert row["range"]["one_object"]["shape"] == [0.6, 0.8]
    assert row["range"]["two_objects"]["shape"] == [0.3, 0.4]
    assert row["attention_iou"]["heldout"] == pytest.approx(0.45)
    assert "failed" not in row and row["runs"]["1"] == {"failed": "out of memory"}
    assert toy_recipe_sweep.summarize({"0": {"failed": "x"}})["failed"] == "every seed failed"

    report = {
        "mode": "full", "machine": {"device": "cpu"}, "minutes": 4.5, "date": "2026-11-30",
        "seeds": [0, 1, 2],
        "variants": {"a": {"flags": "--outline-weight 10", **row},
                     "b": {"flags": "", **toy_recipe_sweep.summarize({"0": {"failed": "x"}})}},
    }  # fmt: skip
    table = toy_recipe_sweep.markdown(report)
    assert "| a | `--outline-weight 10` | 9, 9 | 0.70 (0.60-0.80) / 0.35 (0.30-0.40) |" in table
    assert "| b | (defaults) | failed |" in table
    assert "a, seed 1: failed" in table and "training seeds 0, 1, 2" in table


def test_recipe_sweep_reads_variants_and_names_a_bad_list():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import toy_recipe_sweep

    parsed = toy_recipe_sweep._variants("a=--outline-weight 10; b=")
    assert parsed == {"a": "--outline-weight 10", "b": ""}
    assert toy_recipe_sweep._variants(None) == toy_recipe_sweep.VARIANTS
    with pytest.raises(SystemExit, match="NAME=FLAGS pairs"):
        toy_recipe_sweep._variants("just-flags")


@pytest.mark.parametrize(
    "seeds, message",
    [
        ("0,0", "--seeds 0,0: give each seed once"),
        ("-1", "--seeds -1: give comma-separated integers, e.g. --seeds 0,1"),
        ("one", "--seeds one: give comma-separated integers, e.g. --seeds 0,1"),
        ("", "--seeds : give comma-separated integers, e.g. --seeds 0,1"),
    ],
)
def test_recipe_sweep_names_bad_seeds_before_making_anything(seeds, message, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import toy_recipe_sweep

    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_info:
        toy_recipe_sweep.main(["--seeds", seeds, "--work", str(work)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not work.exists()


def test_recipe_sweep_refuses_an_autoencoder_folder_without_a_vae_before_making_anything(
    tmp_path, capsys
):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import toy_recipe_sweep

    (tmp_path / "ae" / "vae").mkdir(parents=True)  # no config.json, no vae_decoder
    work = tmp_path / "work"
    with pytest.raises(SystemExit):
        toy_recipe_sweep.main(["--autoencoder", str(tmp_path / "ae"), "--work", str(work)])
    assert "no vae/config.json" in capsys.readouterr().err
    assert not work.exists()


def test_shape_rates_count_what_each_prompted_shape_was_read_as():
    from diffusers_breakscene.toy.evaluator import default_evaluator
    from diffusers_breakscene.toy.prompt_check import shape_rates
    from diffusers_breakscene.toy.world import sample_scene

    ev = default_evaluator()
    scene = sample_scene(3, num_objects=1)
    shape = scene.objects[0].shape
    other = next(s for s in ("circle", "square", "triangle") if s != shape)
    right = ev.prompt_accuracy(scene.image, scene.caption)
    wrong = ev.prompt_accuracy(scene.image, scene.caption.replace(shape, other))
    rows = shape_rates([right, wrong])
    assert rows[shape] == {"objects": 1, "shape": 1.0, "read": {shape: 1}}
    assert rows[other] == {"objects": 1, "shape": 0.0, "read": {shape: 1}}


def test_train_step_benchmark_times_each_variant_against_eager(tmp_path, one_torch_thread, capsys):
    from importlib.util import module_from_spec, spec_from_file_location

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))  # the script imports its neighbour reports.py
    try:
        spec = spec_from_file_location("toy_train_step", bench / "toy_train_step.py")
        script = module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(bench))
    # in process (the model is tiny, importing torch again in a subprocess would cost more)
    assert script.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "toy_train_step-smoke.json").read_text())
    assert list(report["summary"]) == ["eager", "bf16"] and report["steps"] == 2
    assert report["batch"] == 2 and report["machine"]["cpu"]  # the smoke's batch; the CPU named
    eager = report["summary"]["eager"]["seconds_per_step"]
    for v in report["summary"].values():
        assert len(v["rounds"]) == 1 and v["seconds_per_step"] > 0
        assert v["ratio_to_eager"] == pytest.approx(v["seconds_per_step"] / eager)
    assert report["summary"]["eager"]["ratio_to_eager"] == pytest.approx(1.0)
    assert "| bf16 |" in (tmp_path / "toy_train_step-smoke.md").read_text()
    capsys.readouterr()
    for flags, message in (
        (["--variants", "eager,fp8"], "--variants 'eager,fp8': choose from"),
        (["--batch", "0"], "--batch 0: give 1 or more"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main([*flags, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()  # refused before anything ran
