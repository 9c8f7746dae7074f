"""Handle tokens: adding, initialising, training only their rows, reading them back."""

from __future__ import annotations

import pytest
import torch

from diffusers_breakscene import TokenConflictError
from diffusers_breakscene.handles import (
    HandleEmbedding,
    add_handles,
    get_handle_embeddings,
    initial_handle_rows,
    set_handle_embeddings,
    token_ids,
)
from diffusers_breakscene.lora import add_unet_lora, lora_metadata, lora_state_dict


def test_add_handles_appends_tokens_and_keeps_other_rows(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    before = te.get_input_embeddings().weight.detach().clone()
    ids = add_handles(tok, te, ["<asset0>", "<asset1>"], ["dog", None])
    after = te.get_input_embeddings().weight.detach()
    assert ids == [before.shape[0], before.shape[0] + 1]
    assert torch.equal(after[: before.shape[0]], before)
    # the handle is ONE token in prompts
    assert tok("a photo of <asset0>").input_ids.count(ids[0]) == 1
    dog = tok("dog", add_special_tokens=False).input_ids
    assert torch.equal(after[ids[0]], before[dog].mean(0))
    assert token_ids(tok, ["<asset1>", "<asset0>"]) == [ids[1], ids[0]]
    with pytest.raises(TokenConflictError, match=r"\['<asset7>'\] are not in the tokenizer"):
        token_ids(tok, ["<asset0>", "<asset7>"])


def test_multi_token_initializer_uses_the_mean_of_its_pieces(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    pieces = tok("zebra", add_special_tokens=False).input_ids
    assert len(pieces) > 1  # not in the tiny vocabulary as one token
    weight = te.get_input_embeddings().weight.detach()
    row = initial_handle_rows(tok, te, ["zebra"])[0]
    torch.testing.assert_close(row, weight[pieces].mean(0))


def test_default_initialisation_is_seeded(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    a = initial_handle_rows(tok, te, [None, None], torch.Generator().manual_seed(3))
    b = initial_handle_rows(tok, te, [None, None], torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_existing_or_duplicate_tokens_are_refused_before_any_change(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    size = len(tok)
    with pytest.raises(TokenConflictError, match="already exist"):
        add_handles(tok, te, ["<new>", "dog</w>"])
    with pytest.raises(TokenConflictError, match="duplicates"):
        add_handles(tok, te, ["<a>", "<a>"])
    assert len(tok) == size and te.get_input_embeddings().weight.shape[0] == size


def test_handle_embedding_trains_only_handle_rows(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    ids = add_handles(tok, te, ["<asset0>"])
    base = te.get_input_embeddings().weight.detach().clone()
    wrapper = HandleEmbedding.install(te, ids)
    trainable = [n for n, p in te.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("token_embedding.handle_weight")
    optimizer = torch.optim.AdamW([wrapper.handle_weight], lr=0.1)
    input_ids = tok("a photo of <asset0> and a dog", return_tensors="pt").input_ids
    for _ in range(3):
        te(input_ids)[0].pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    learned = wrapper.handle_weight.detach().clone()
    assert not torch.equal(learned[0], base[ids[0]])
    assert torch.equal(wrapper.base.weight, base)  # the vocabulary is never written while training
    rows = get_handle_embeddings(tok, te, ["<asset0>"])
    assert torch.equal(rows["<asset0>"], learned)
    wrapper.uninstall(te)
    after = te.get_input_embeddings().weight.detach()
    assert torch.equal(after[ids[0]], learned[0])
    assert torch.equal(after[: ids[0]], base[: ids[0]])  # every other row bit-identical


def test_set_and_get_rows(sd1_pipe):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    add_handles(tok, te, ["<a>"])
    set_handle_embeddings(tok, te, {"<a>": torch.full((1, 32), 0.5)})
    assert torch.equal(get_handle_embeddings(tok, te, ["<a>"])["<a>"], torch.full((1, 32), 0.5))
    with pytest.raises(ValueError, match="shape"):
        set_handle_embeddings(tok, te, {"<a>": torch.ones(2, 32)})
    with pytest.raises(TokenConflictError, match="not in the tokenizer"):
        get_handle_embeddings(tok, te, ["<missing>"])


def test_lora_state_dict_is_in_the_layout_diffusers_loads(sd1_pipe):
    from diffusers_breakscene.tiny import tiny_pipeline

    add_unet_lora(sd1_pipe.unet, rank=2, alpha=4, target_modules=["to_q", "ff.net.2"])
    with torch.no_grad():
        for name, param in sd1_pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = lora_state_dict(unet=sd1_pipe.unet)
    assert state and all(k.startswith("unet.") and "lora" in k for k in state)
    assert lora_metadata(sd1_pipe.unet) == {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["ff.net.2", "to_q"],
    }
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(state, adapter_name="x")  # stock diffusers accepts it
    loaded = [k for k in fresh.unet.state_dict() if "lora" in k]
    assert len(loaded) == len(state)


# --- handles named like ordinary words (issue 13) ----------------------------------------------


def test_vocabulary_words_finds_single_word_handles_only(sd1_pipe):
    from diffusers_breakscene.handles import vocabulary_words

    tok = sd1_pipe.tokenizer
    found = vocabulary_words(tok, ["dog", "Cat", "<asset0>", "<dog>", "zebra", "x"])
    # 'zebra' splits into pieces (not one word of the tiny vocabulary); 'x' is one piece
    assert found == {"dog": "dog</w>", "Cat": "cat</w>", "x": "x</w>"}
    tok.add_tokens(["<added>"])
    assert vocabulary_words(tok, ["<added>"]) == {}  # an added token is no vocabulary word


@pytest.mark.parametrize("word", ["dog", "Dog", "cat"])
def test_add_handles_refuses_a_word_before_changing_anything(sd1_pipe, word):
    tok, te = sd1_pipe.tokenizer, sd1_pipe.text_encoder
    vocab, weight = dict(tok.get_vocab()), te.get_input_embeddings().weight.detach().clone()
    with pytest.raises(TokenConflictError, match=rf"\['{word}'\].*that is not a word"):
        add_handles(tok, te, ["<asset0>", word])
    assert tok.get_vocab() == vocab
    assert torch.equal(te.get_input_embeddings().weight, weight)
