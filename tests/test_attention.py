"""AttentionStore: which layers it records, equivalence with SDPA, gradients, restore."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig

from diffusers_breakscene import AttentionStore
from diffusers_breakscene.attention import cross_attention_levels

TOL = 1e-5


def _inputs(unet, batch=2, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *size, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return latents, timesteps, text


def _add_random_lora(unet):
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the LoRA delta real
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


class MyProcessor(AttnProcessor):
    """A user's own processor: must survive attach/detach as the very same object."""


def test_attach_replaces_only_latent_over_4_cross_attention(sd1_pipe):
    unet = sd1_pipe.unet
    unet.set_attn_processor(AttnProcessor2_0())
    custom = MyProcessor()
    self_attn = "down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    unet.set_attn_processor({**unet.attn_processors, self_attn: custom})
    before = unet.attn_processors

    store = AttentionStore.attach(unet)
    after = unet.attn_processors
    assert store.factor == 4
    assert store.layers == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    ]
    for name, processor in before.items():
        if name in store.layers:
            assert after[name] is not processor
        else:
            assert after[name] is processor
    assert after[self_attn] is custom

    store.detach()
    assert all(unet.attn_processors[name] is p for name, p in before.items())
    assert not store.attached


def test_levels_follow_the_block_structure(sd2_pipe):
    levels = cross_attention_levels(sd2_pipe)
    assert {factor for _, factor in levels.values()} == {1, 2, 4, 8}
    assert levels["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] == ("mid", 8)
    assert all(name.endswith("attn2.processor") for name in levels)
    assert levels["up_blocks.3.attentions.1.transformer_blocks.0.attn2.processor"] == ("up", 1)


def test_places_and_divisor_are_configurable(sd1_pipe):
    store = AttentionStore.attach(sd1_pipe, places=("down",), resolution_divisor=2)
    assert store.factor == 2
    assert store.layers == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"]
    store.detach()
    with pytest.raises(ValueError, match="places"):
        AttentionStore.attach(sd1_pipe, places=("side",))
    with pytest.raises(ValueError, match="power of two"):
        AttentionStore.attach(sd1_pipe, resolution_divisor=3)


def test_unet_without_the_level_gets_the_nearest_one_with_a_warning():
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    with pytest.warns(UserWarning, match=r"nearest level, latent/1"):
        store = AttentionStore.attach(unet)
    assert store.factor == 1
    latents, t, text = _inputs(unet, size=(8, 8))
    unet(latents, t, encoder_hidden_states=text)
    assert store.aggregate().shape == (2, 8, 8, 77)
    store.detach()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
def test_output_equals_sdpa(family, with_lora, request):
    unet = request.getfixturevalue(f"{family}_pipe").unet
    if with_lora:
        _add_random_lora(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    latents, t, text = _inputs(unet)
    with torch.no_grad():
        reference = unet(latents, t, encoder_hidden_states=text).sample
        with AttentionStore.attach(unet):
            recorded = unet(latents, t, encoder_hidden_states=text).sample
    assert (recorded - reference).abs().max() <= TOL
    if with_lora:  # the LoRA really changed the output, so the check above covered it
        unet.disable_adapters()
        with torch.no_grad():
            plain = unet(latents, t, encoder_hidden_states=text).sample
        assert (plain - reference).abs().max() > 1e-3


def test_output_equals_sdpa_with_attention_mask_and_cfg_batch(sd1_pipe):
    unet = sd1_pipe.unet
    unet.set_attn_processor(AttnProcessor2_0())
    latents, t, text = _inputs(unet, batch=1)
    uncond = torch.zeros_like(text)
    cfg_latents, cfg_t, cfg_text = (
        torch.cat([latents] * 2),
        torch.cat([t] * 2),
        torch.cat([uncond, text]),
    )
    mask = torch.ones(2, 77)
    mask[:, 10:] = 0  # padding positions masked out
    kwargs = {"encoder_hidden_states": cfg_text, "encoder_attention_mask": mask}
    with torch.no_grad():
        reference = unet(cfg_latents, cfg_t, **kwargs).sample
        with AttentionStore.attach(unet) as store:
            recorded = unet(cfg_latents, cfg_t, **kwargs).sample
            maps = store.aggregate()
            cond = store.aggregate(part="cond")
            uncond_maps = store.aggregate(part="uncond")
    assert (recorded - reference).abs().max() <= TOL
    assert maps[:, :, :, 10:].abs().max() == 0  # masked positions get no attention
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 8, 8))
    assert torch.equal(cond, maps[1:]) and torch.equal(uncond_maps, maps[:1])


def _token_loss(store, token=5):
    maps = store.aggregate()
    return maps[..., token].pow(2).mean()


@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
def test_gradients_reach_token_embeddings_and_lora(sd1_pipe, dtype):
    unet, text_encoder, tokenizer = sd1_pipe.unet, sd1_pipe.text_encoder, sd1_pipe.tokenizer
    _add_random_lora(unet)
    embeddings = text_encoder.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    ids = tokenizer(
        "a photo of a dog", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    latents, t, _ = _inputs(unet, batch=1)
    with AttentionStore.attach(unet) as store:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"):
            text = text_encoder(ids)[0]
            unet(latents, t, encoder_hidden_states=text)
            loss = _token_loss(store, token=5)  # "dog"
        loss.backward()
    assert torch.isfinite(loss)
    dog = ids[0, 5]
    assert embeddings.weight.grad[dog].abs().sum() > 0
    recorded_lora = [
        p.grad
        for n, p in unet.named_parameters()
        if "lora" in n and "down_blocks.2.attentions.0" in n and "attn2.to_k" in n
    ]
    assert recorded_lora and all(g is not None and g.abs().sum() > 0 for g in recorded_lora)


def test_no_double_counting_under_gradient_checkpointing(sd1_pipe):
    unet = sd1_pipe.unet
    _add_random_lora(unet)
    latents, t, text = _inputs(unet, batch=1)
    lora = [p for n, p in unet.named_parameters() if "lora" in n]

    def run(checkpointing):
        for p in lora:
            p.grad = None
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        unet.train()
        with AttentionStore.attach(unet) as store:
            calls = []
            record = store._record
            store._record = lambda name, maps: (calls.append(name), record(name, maps))
            unet(latents, t, encoder_hidden_states=text)
            before = store.aggregate().detach().clone()
            _token_loss(store).backward()
            after = store.aggregate().detach()
            counts = (store.num_steps, len(store.layers), len(calls))
        return before, after, [None if p.grad is None else p.grad.clone() for p in lora], counts

    plain_maps, _, plain_grads, (_, _, plain_calls) = run(False)
    maps, maps_after_backward, grads, (steps, layers, calls) = run(True)
    assert calls > plain_calls == 3  # the recompute in backward really ran the recorders again
    assert unet.is_gradient_checkpointing is True
    torch.testing.assert_close(maps, plain_maps)
    torch.testing.assert_close(maps_after_backward, maps)  # recompute overwrote, did not add
    assert steps == 0 and layers == 3  # training passes never enter the running sums
    assert sum(g is not None for g in grads) > 10
    for a, b in zip(grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_pipeline_generation_records_every_step_with_bounded_memory(sd1_pipe):
    with AttentionStore.attach(sd1_pipe) as store:
        sd1_pipe("a photo of a dog", num_inference_steps=2, height=64, width=96)
        small = store.memory_bytes
        assert store.num_steps == 2
        store.reset()
        sd1_pipe("a photo of a dog", num_inference_steps=5, height=64, width=96)
        assert store.num_steps == 5
        assert store.memory_bytes == small  # more steps, same memory
        maps = store.aggregate(part="cond", over_steps=True)
    assert maps.shape == (1, 2, 3, 77)  # latent 8x12 -> 2x3: aspect ratio kept
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 3))


def test_store_is_not_a_module_and_stays_out_of_state_dict(sd1_pipe):
    unet = sd1_pipe.unet
    keys = set(unet.state_dict())
    store = AttentionStore.attach(unet)
    assert not isinstance(store, torch.nn.Module)
    assert set(unet.state_dict()) == keys
    store.detach()


def test_misuse_gets_clear_errors(sd1_pipe):
    store = AttentionStore.attach(sd1_pipe.unet)
    with pytest.raises(RuntimeError, match="recorded no forward pass"):
        store.aggregate()
    with pytest.raises(RuntimeError, match="already has an AttentionStore"):
        AttentionStore.attach(sd1_pipe.unet)
    latents, t, text = _inputs(sd1_pipe.unet, batch=1)
    with torch.no_grad():
        sd1_pipe.unet(latents, t, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="even size"):
        store.aggregate(part="cond")
    with pytest.raises(ValueError, match="part="):
        store.aggregate(part="half")
    store.detach()
    store.detach()  # idempotent
    with pytest.raises(TypeError, match="diffusers UNet"):
        AttentionStore.attach(torch.nn.Linear(2, 2))
