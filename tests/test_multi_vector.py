"""Handles of several vectors (``vectors_per_handle=k``): naming, initialisation, training
prompts and positions, the attention loss, bundles, and loading into diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffusers_breakscene as bas
from diffusers_breakscene import Bundle, TokenConflictError
from diffusers_breakscene.handles import (
    add_handles,
    expand_handles,
    get_handle_embeddings,
    handle_vectors,
    initial_handle_rows,
    set_handle_embeddings,
    vector_tokens,
)
from diffusers_breakscene.losses import cross_attention_loss, position_group
from diffusers_breakscene.step import SamplingSettings, encode_scene, sample_batch
from diffusers_breakscene.tiny import tiny_pipeline
from diffusers_breakscene.viz import handle_positions

SIZE = 64


def _scene() -> bas.Scene:
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    m0, m1 = torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE)
    m0[:32, :32] = 1
    m1[32:, 32:] = 1
    return bas.Scene(image, [m0, m1], initializer_tokens=["red dog", "cat"])


def _rows(pipe, words: str) -> torch.Tensor:
    ids = pipe.tokenizer(words, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight.detach()[ids].float()


# --- names and prompts -----------------------------------------------------------------------
def test_vector_tokens_follow_diffusers_naming_and_refuse_bad_counts():
    assert vector_tokens("<a>") == ["<a>"]
    assert vector_tokens("<a>", 3) == ["<a>", "<a>_1", "<a>_2"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            vector_tokens("<a>", bad)


def test_expand_handles_matches_whole_handles_longest_first(sd1_pipe):
    tok = sd1_pipe.tokenizer
    names = [f"<asset{i}>" for i in range(11)]
    add_handles(tok, sd1_pipe.text_encoder, names, vectors_per_handle=2)
    prompt = "a photo of <asset1> and <asset10> on the beach"
    expanded = expand_handles(prompt, tok, names)
    # diffusers' substring replacement would also rewrite the inside of "<asset10>"
    assert expanded == "a photo of <asset1> <asset1>_1 and <asset10> <asset10>_1 on the beach"
    assert handle_vectors(tok, "<asset10>") == ["<asset10>", "<asset10>_1"]
    assert expand_handles("a photo of a dog", tok, names) == "a photo of a dog"
    # single-vector handles (and the pipeline's own prompts) are left alone
    add_handles(tok, sd1_pipe.text_encoder, ["<one>"])
    assert expand_handles("<one> dog", tok, ["<one>"]) == "<one> dog"


# --- initialisation ----------------------------------------------------------------------------
def test_each_vector_starts_at_its_part_of_the_initializer(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    words = _rows(sd1_pipe, "red dog cat")
    assert words.shape[0] == 3
    three = initial_handle_rows(tok, te, ["red dog cat"], vectors_per_handle=3)
    torch.testing.assert_close(three, words, rtol=0, atol=0)
    # fewer vectors than words: consecutive groups, each at its mean
    two = initial_handle_rows(tok, te, ["red dog cat"], vectors_per_handle=2)
    torch.testing.assert_close(two[0], words[0])
    torch.testing.assert_close(two[1], words[1:].mean(0))
    # more vectors than words: the words repeat in order
    pair = _rows(sd1_pipe, "red dog")
    four = initial_handle_rows(tok, te, ["red dog"], vectors_per_handle=3)
    torch.testing.assert_close(four, pair[[0, 0, 1]], rtol=0, atol=0)
    # no initializer: k seeded random vocabulary rows, not one row repeated
    a = initial_handle_rows(tok, te, [None], torch.Generator().manual_seed(3), 2)
    b = initial_handle_rows(tok, te, [None], torch.Generator().manual_seed(3), 2)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_add_handles_with_vectors_adds_k_tokens_per_handle(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    before = te.get_input_embeddings().weight.detach().clone()
    ids = add_handles(tok, te, ["<a>", "<b>"], ["red dog", None], vectors_per_handle=2)
    assert ids == list(range(before.shape[0], before.shape[0] + 4))
    assert tok.convert_ids_to_tokens(ids) == ["<a>", "<a>_1", "<b>", "<b>_1"]
    weight = te.get_input_embeddings().weight.detach()
    assert torch.equal(weight[: before.shape[0]], before)
    torch.testing.assert_close(weight[ids[:2]], _rows(sd1_pipe, "red dog"), rtol=0, atol=0)
    rows = get_handle_embeddings(tok, te, ["<a>", "<b>"])
    assert [tuple(r.shape) for r in rows.values()] == [(2, 32), (2, 32)]
    set_handle_embeddings(tok, te, {"<a>": torch.ones(2, 32)})
    assert torch.equal(get_handle_embeddings(tok, te, ["<a>"])["<a>"], torch.ones(2, 32))
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        set_handle_embeddings(tok, te, {"<b>": torch.ones(1, 32)})


def test_vector_names_that_collide_are_refused_before_any_change(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    size = len(tok)
    with pytest.raises(TokenConflictError, match="collide with each other's vectors"):
        add_handles(tok, te, ["<a>", "<a>_1"], vectors_per_handle=2)
    add_handles(tok, te, ["<b>_1"])
    with pytest.raises(TokenConflictError, match=r"\['<b>_1'\] already exist"):
        add_handles(tok, te, ["<b>"], vectors_per_handle=2)
    assert len(tok) == size + 1


# --- training batch and loss -------------------------------------------------------------------
def test_training_prompts_name_every_vector_and_positions_group_them(sd1_pipe):
    scene = _scene()
    tok = sd1_pipe.tokenizer
    ids = add_handles(tok, sd1_pipe.text_encoder, scene.tokens, vectors_per_handle=3)
    groups = [ids[:3], ids[3:]]
    encoded = encode_scene(sd1_pipe.vae, scene, SIZE)
    settings = SamplingSettings.from_config(bas.BreakASceneConfig(train_batch_size=4))
    batch = sample_batch(
        scene, encoded, tok, groups, torch.Generator().manual_seed(0), settings,
        scaling_factor=sd1_pipe.vae.config.scaling_factor,
    )  # fmt: skip
    for prompt, row, positions, masks in zip(
        batch.prompts, batch.input_ids.tolist(), batch.token_positions, batch.masks, strict=True
    ):
        assert "<asset0> <asset0>_1 <asset0>_2" in prompt or "<asset0>" not in prompt
        assert len(positions) == masks.shape[0]
        for group in positions:
            assert len(group) == 3
            assert [row[p] for p in group] in groups


def test_attention_loss_of_a_group_is_the_loss_of_its_summed_map():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(1, 4, 4, 6, generator=g)
    mask = (torch.rand(1, 4, 4, generator=g) > 0.5).float()
    grouped = cross_attention_loss(maps, [mask], [[[2, 3, 4]]])
    summed = maps[..., [2, 3, 4]].sum(-1, keepdim=True)
    assert torch.allclose(grouped, cross_attention_loss(summed, [mask], [[0]]))
    assert not torch.allclose(grouped, cross_attention_loss(maps, [mask], [[2]]))
    with pytest.raises(ValueError, match="group of token positions is empty"):
        cross_attention_loss(maps, [mask], [[[]]])
    # one position, a tensor of them, or a 0-d tensor: the same groups
    assert position_group(2) == position_group(torch.tensor(2)) == [2]
    assert position_group(torch.tensor([2, 3])) == position_group((2, 3)) == [2, 3]


def test_attention_overlay_positions_cover_all_vectors(sd1_pipe):
    tok = sd1_pipe.tokenizer
    ids = add_handles(tok, sd1_pipe.text_encoder, ["<a>"], vectors_per_handle=2)
    positions = handle_positions(tok, "a photo of <a> in the snow", ["<a>"])
    row = tok(expand_handles("a photo of <a> in the snow", tok, ["<a>"])).input_ids
    assert [row[p] for p in positions[0]] == ids


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_bundle(tmp_path_factory):
    cfg = bas.BreakASceneConfig(
        phase1_steps=2,
        phase2_steps=2,
        resolution=SIZE,
        lora_rank=4,
        phase2_learning_rate=1e-2,
        vectors_per_handle=2,
        validate_phase_ends=False,
    )
    pipe = tiny_pipeline("sd1")
    start = initial_handle_rows(pipe.tokenizer, pipe.text_encoder, ["red dog"], None, 2)
    path = bas.BreakASceneTrainer(pipe, _scene(), cfg).train(
        tmp_path_factory.mktemp("multi"), progress=False
    )
    return Bundle.load(path), start


def _generate(pipe, prompt: str) -> np.ndarray:
    return pipe(
        prompt, num_inference_steps=2, guidance_scale=1.0, height=SIZE, width=SIZE,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def test_trained_bundle_holds_k_learned_rows_per_handle(multi_bundle):
    bundle, start = multi_bundle
    assert bundle.tokens == ["<asset0>", "<asset1>"]
    assert [tuple(bundle.handles[t].shape) for t in bundle.tokens] == [(2, 32), (2, 32)]
    assert not torch.equal(bundle.handles["<asset0>"], start)  # trained, from "red dog"
    assert bundle.metadata["training"]["vectors_per_handle"] == 2
    assert bundle.embedding_tokens() == ["<asset0>", "<asset0>_1", "<asset1>", "<asset1>_1"]


def test_multi_vector_bundle_loads_like_stock_diffusers_and_unloads_exactly(multi_bundle, tmp_path):
    bundle, _ = multi_bundle
    pipe = tiny_pipeline("sd1")
    vocab = len(pipe.tokenizer)
    rows = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    assert handle_vectors(pipe.tokenizer, "<asset0>") == ["<asset0>", "<asset0>_1"]
    ours = _generate(pipe, "a photo of <asset0> and <asset1>")

    bundle.export_diffusers(tmp_path)
    stock = tiny_pipeline("sd1")
    stock.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    stock.load_textual_inversion(
        load_file(tmp_path / "break_a_scene_emb.safetensors")["clip_l"],
        token=bundle.embedding_tokens(), tokenizer=stock.tokenizer, text_encoder=stock.text_encoder,
    )  # fmt: skip
    # stock diffusers expands "<asset0>" into its vectors by itself, as our loader's pipeline does
    assert stock.maybe_convert_prompt("<asset0>", stock.tokenizer) == "<asset0> <asset0>_1"
    np.testing.assert_allclose(
        ours, _generate(stock, "a photo of <asset0> and <asset1>"), rtol=0, atol=1e-5
    )

    # a second bundle whose handle would take one of the vector names is refused
    clash = Bundle(
        handles={"<asset0>_1": torch.ones(1, 32)},
        metadata={k: v for k, v in bundle.metadata.items() if k not in ("library_version",)}
        | {"tokens": ["<asset0>_1"], "concepts": {"<asset0>_1": {}}, "lora": {}},
    )
    with pytest.raises(TokenConflictError, match="already used"):
        pipe.load_break_a_scene(clash)
    pipe.unload_break_a_scene("scene")
    assert len(pipe.tokenizer) == vocab
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows


def test_prompt_too_long_for_the_vectors_is_refused_before_training(sd1_pipe):
    cfg = bas.BreakASceneConfig(phase1_steps=1, phase2_steps=0, resolution=SIZE,
                                vectors_per_handle=40)  # fmt: skip
    size = len(sd1_pipe.tokenizer)
    with pytest.raises(ValueError, match=r"vectors_per_handle=40 is .* tokens, more than"):
        bas.BreakASceneTrainer(sd1_pipe, _scene(), cfg)
    assert len(sd1_pipe.tokenizer) == size


def test_sdxl_handles_of_two_vectors_train_in_both_encoders_and_load(tmp_path):
    from diffusers_breakscene.tiny import tiny_scene

    cfg = bas.BreakASceneConfig(
        phase1_steps=2, phase2_steps=1, resolution=SIZE, lora_rank=4, vectors_per_handle=2,
        validate_phase_ends=False,
    )  # fmt: skip
    path = bas.BreakASceneTrainer(tiny_pipeline("sdxl"), tiny_scene(SIZE), cfg).train(
        tmp_path, progress=False
    )
    bundle = Bundle.load(path)
    assert [tuple(bundle.handles[t].shape) for t in bundle.tokens] == [(2, 32), (2, 32)]
    assert [tuple(bundle.handles_2[t].shape) for t in bundle.tokens] == [(2, 48), (2, 48)]
    pipe = tiny_pipeline("sdxl")
    sizes = len(pipe.tokenizer), len(pipe.tokenizer_2)
    pipe.load_break_a_scene(bundle, adapter_name="scene")
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert handle_vectors(tokenizer, "<asset1>") == ["<asset1>", "<asset1>_1"]
    image = _generate(pipe, "a photo of <asset0> and <asset1>")
    assert np.isfinite(image).all()
    pipe.unload_break_a_scene("scene")
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
