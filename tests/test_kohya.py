"""A1111 / SD.Next / ComfyUI / kohya files: export, import, and the same pictures after a round
trip (the plugin's loader and stock diffusers' loaders on the exported files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import diffusers_breakscene as bas
from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.cli import main as cli_main
from diffusers_breakscene.errors import InvalidArgumentError, MissingFileError
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene


def train(family: str, tmp_path_factory) -> Bundle:
    cfg = bas.BreakASceneConfig(
        phase1_steps=1, phase2_steps=1, resolution=64, lora_rank=4, lora_alpha=8,
        phase1_learning_rate=1e-1, phase2_learning_rate=1e-1, validate_phase_ends=False,
    )  # fmt: skip
    pipe = tiny_pipeline(family)
    path = bas.BreakASceneTrainer(pipe, tiny_scene(64), cfg).train(
        tmp_path_factory.mktemp(family), progress=False
    )
    return Bundle.load(path)


@pytest.fixture(scope="module")
def sd1_bundle(tmp_path_factory) -> Bundle:
    return train("sd1", tmp_path_factory)


def modules(bundle: Bundle) -> set[str]:
    """The LoRA's ``(module, down|up)`` names, whatever diffusers' key spelling."""
    return {
        k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") for k in bundle.lora
    }


def picture(pipe) -> np.ndarray:
    out = pipe("a photo of <asset0> and <asset1>", num_inference_steps=3, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    return out.images[0]


def plugin_picture(bundle: Bundle, family: str = "sd1") -> np.ndarray:
    pipe = tiny_pipeline(family)
    pipe.load_break_a_scene(bundle)
    return picture(pipe)


def test_kohya_files_round_trip_to_the_same_pictures(sd1_bundle, tmp_path):
    files = sd1_bundle.export_kohya(tmp_path)
    assert sorted(p.name for p in files.values()) == [
        "asset0.safetensors", "asset1.safetensors", "break_a_scene.safetensors",
    ]  # fmt: skip
    with safe_open(files["lora"], "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    assert alphas == {8.0}  # the bundle's lora_alpha, not diffusers' alpha = rank
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    with safe_open(files["<asset0>"], "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata()["token"] == "<asset0>"

    back = Bundle.from_kohya(files["lora"], [files["<asset0>"], files["<asset1>"]])
    assert back.tokens == sd1_bundle.tokens
    assert modules(back) == modules(sd1_bundle)  # the same modules, in the module layout
    assert back.metadata["lora"]["unet"]["lora_alpha"] == 8.0
    assert back.metadata["lora"]["unet"]["r"] == 4
    for token in back.tokens:
        assert torch.equal(back.handles[token], sd1_bundle.handles[token].float())
    np.testing.assert_array_equal(plugin_picture(back), plugin_picture(sd1_bundle))


def test_stock_diffusers_loads_the_kohya_files_to_the_same_pictures(sd1_bundle, tmp_path):
    files = sd1_bundle.export_kohya(tmp_path)
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(str(tmp_path), weight_name=files["lora"].name)
    for token in sd1_bundle.tokens:
        pipe.load_textual_inversion(str(files[token]), token=token)
    np.testing.assert_allclose(picture(pipe), plugin_picture(sd1_bundle), atol=1e-5)


def test_bundled_embeddings_form_round_trips(sd1_bundle, tmp_path):
    files = sd1_bundle.export_kohya(tmp_path, name="scene", bundled=True)
    assert list(files) == ["lora"] and files["lora"].name == "scene.safetensors"
    with safe_open(files["lora"], "pt") as f:
        bundled = sorted(k for k in f.keys() if k.startswith("bundle_emb."))  # noqa: SIM118
    assert bundled == [
        "bundle_emb.asset0.string_to_param.*", "bundle_emb.asset1.string_to_param.*",
    ]  # fmt: skip
    back = Bundle.from_kohya(files["lora"])
    assert back.tokens == sd1_bundle.tokens
    np.testing.assert_array_equal(plugin_picture(back), plugin_picture(sd1_bundle))


@pytest.mark.slow
def test_sd2_rows_are_not_labelled_clip_l(tmp_path_factory, tmp_path):
    bundle = train("sd2", tmp_path_factory)
    files = bundle.export_kohya(tmp_path)
    with safe_open(files["<asset0>"], "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata()["text_encoder"] == "open_clip_vit_h14"
    with safe_open(files["lora"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2"
    back = Bundle.from_kohya(files["lora"], {t: files[t] for t in bundle.tokens})
    np.testing.assert_array_equal(plugin_picture(back, "sd2"), plugin_picture(bundle, "sd2"))


def test_user_embedding_files_name_their_tokens(tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "mycat.safetensors"))
    save_file({"<hat>": torch.randn(1, 32)}, str(tmp_path / "hat.safetensors"))
    back = Bundle.from_kohya(embeddings=[tmp_path / "mycat.safetensors"])
    assert back.tokens == ["<mycat>"] and back.handles["<mycat>"].shape == (2, 32)
    named = Bundle.from_kohya(embeddings={"<hat>": tmp_path / "hat.safetensors"})
    assert named.tokens == ["<hat>"]


def test_bad_kohya_inputs_are_refused_with_the_fix(sd1_bundle, tmp_path):
    with pytest.raises(MissingFileError, match="neither"):
        Bundle.from_kohya()
    with pytest.raises(MissingFileError, match="does not exist"):
        Bundle.from_kohya(embeddings=[tmp_path / "missing.safetensors"])
    files = sd1_bundle.export_kohya(tmp_path)
    with pytest.raises(MissingFileError, match="no embeddings"):
        Bundle.from_kohya(files["lora"])
    with pytest.raises(InvalidArgumentError, match="plain file name"):
        sd1_bundle.export_kohya(tmp_path, name="../up")
    handles_only = Bundle(handles=sd1_bundle.handles, metadata={})
    with pytest.raises(InvalidArgumentError, match="no LoRA"):
        handles_only.export_kohya(tmp_path, bundled=True)


def test_cli_export_formats(sd1_bundle, tmp_path):
    path = sd1_bundle.save(tmp_path / "b.safetensors")
    assert cli_main(["export", str(path), str(tmp_path / "k"), "--format", "kohya", "--quiet"]) == 0
    assert (tmp_path / "k" / "asset0.safetensors").is_file()
    assert cli_main(["export", str(path), str(tmp_path / "a"), "--format", "a1111", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["break_a_scene.safetensors"]
    assert cli_main(["export", str(path), str(tmp_path / "d"), "--quiet"]) == 0
    assert (tmp_path / "d" / "break_a_scene_emb.safetensors").is_file()


def test_text_encoder_lora_uses_kohyas_single_encoder_prefix(tmp_path_factory, tmp_path):
    cfg = bas.BreakASceneConfig(
        phase1_steps=1, phase2_steps=1, resolution=64, lora_rank=4, lora_alpha=8,
        phase2_learning_rate=1e-1, train_text_encoder_lora=True, text_encoder_lora_rank=2,
        validate_phase_ends=False,
    )  # fmt: skip
    path = bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(64), cfg).train(
        tmp_path_factory.mktemp("te"), progress=False
    )
    bundle = Bundle.load(path)
    files = bundle.export_kohya(tmp_path)
    with safe_open(files["lora"], "pt") as f:
        te = [k for k in f.keys() if not k.startswith("lora_unet_")]  # noqa: SIM118
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    back = Bundle.from_kohya(files["lora"], [files[t] for t in bundle.tokens])
    assert back.metadata["lora"]["text_encoder"]["r"] == 2
    np.testing.assert_array_equal(plugin_picture(back), plugin_picture(bundle))
