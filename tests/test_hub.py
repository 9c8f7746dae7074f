"""Sharing on the Hub, up to the huggingface_hub boundary.

What ``push_to_hub`` would upload is written by ``save_hub_folder``; that folder is laid out as a
Hugging Face cache entry, so that the model card's own code (the plugin way and the stock
diffusers way) runs unchanged, offline, through the real ``from_pretrained`` /
``hf_hub_download`` / ``load_lora_weights`` code paths. Uploads stop at ``HfApi``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffusers_breakscene as bas
from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.bundle.hub import card_was_edited
from diffusers_breakscene.cli import main as cli_main
from diffusers_breakscene.tiny import tiny_pipeline, tiny_scene

REPO = "me/scene"
BASE = "tiny/sd1-base"
COMMIT = "0" * 40


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    cfg = bas.BreakASceneConfig(
        phase1_steps=1, phase2_steps=1, resolution=64, lora_rank=4, lora_alpha=8,
        phase1_learning_rate=1e-1, phase2_learning_rate=1e-1, validate_phase_ends=False,
    )  # fmt: skip
    path = bas.BreakASceneTrainer(tiny_pipeline("sd1"), tiny_scene(64), cfg).train(
        tmp_path_factory.mktemp("trained"), progress=False
    )
    trained = Bundle.load(path)
    return Bundle(trained.handles, trained.lora, {**trained.metadata, "base_model": BASE})


def as_cache_entry(folder: Path, repo_id: str, cache: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repo."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)


def code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


@pytest.mark.slow
def test_the_uploaded_folder_loads_as_its_model_card_says(bundle, tmp_path):
    from PIL import Image

    files = bundle.save_hub_folder(
        tmp_path / "upload", REPO, preview_image=Image.new("RGB", (8, 8), "red")
    )
    assert sorted(files) == [
        "README.md", "break_a_scene.safetensors", "break_a_scene_emb.safetensors",
        "preview.png", "pytorch_lora_weights.safetensors", "training_config.json",
    ]  # fmt: skip
    card = files["README.md"].read_text()
    assert json.loads(files["training_config.json"].read_text())["phase1_steps"] == 1
    plugin, stock = code_blocks(card)
    assert f'load_break_a_scene("{REPO}")' in plugin and "load_lora_weights" in stock
    cache = tmp_path / "hub-cache"
    as_cache_entry(files["README.md"].parent, REPO, cache)
    # The card calls pipe(prompt) with the model's default size; a 64 px default keeps it quick.
    base = tiny_pipeline("sd1")
    base.unet.register_to_config(sample_size=8)
    base.save_pretrained(tmp_path / "base")
    as_cache_entry(tmp_path / "base", BASE, cache)
    # Each block runs as written (its own pipe(...) call included); then each pipeline it built
    # draws the same seeded picture, and the two must be the same. (The blocks' own pictures
    # differ: the two ways of loading draw different amounts from the global random generator.)
    script = textwrap.dedent(
        """
        import sys, numpy as np, torch
        images = []
        for block in sys.argv[1:]:
            scope = {}
            exec(block, scope)
            assert min(scope["image"].size) >= 64  # the block made its picture
            out = scope["pipe"]("a photo of <asset0> and <asset1>", num_inference_steps=4,
                                generator=torch.Generator().manual_seed(0), output_type="np")
            images.append(out.images[0])
        print("same" if np.array_equal(images[0], images[1]) else "different")
        print("std", float(images[0].std()))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, plugin, stock],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "same", result.stdout
    assert float(result.stdout.split()[-1]) > 0  # a real picture, not a blank


def test_stock_textual_inversion_does_not_take_the_embeddings_key_for_a_token(bundle, tmp_path):
    # diffusers' load_textual_inversion(folder) looks for learned_embeds.* by itself; the
    # uploaded embeddings file has another name, so the key "clip_l" never becomes a token.
    folder = tmp_path / "upload"
    bundle.save_hub_folder(folder, REPO)
    assert not list(folder.glob("learned_embeds*"))
    pipe = tiny_pipeline("sd1")
    with pytest.raises((OSError, ValueError)):
        pipe.load_textual_inversion(str(folder))
    assert "clip_l" not in pipe.tokenizer.get_vocab()


def test_card_records_its_hash_and_tells_edits():
    card = Bundle(handles={"<a>": torch.ones(1, 4)}).model_card(REPO)
    assert not card_was_edited(card)
    assert card_was_edited(card.replace("## Usage", "## How to use"))
    assert card_was_edited("# my own readme\n")


class FakeHub:
    """HfApi up to the network: what was asked, and the repo's README.md."""

    def __init__(self, monkeypatch, tmp_path, readme: str | None):
        from huggingface_hub import HfApi

        self.uploads: list[dict] = []
        self.readme = readme
        hub = self

        def create_repo(api, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def file_exists(api, repo_id, filename, **kwargs):
            return filename == "README.md" and hub.readme is not None

        def hf_hub_download(api, repo_id, filename, **kwargs):
            path = tmp_path / "remote-README.md"
            path.write_text(hub.readme)
            return str(path)

        def upload_folder(api, **kwargs):
            names = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            ignored = kwargs.get("ignore_patterns") or []
            self.uploads.append({**kwargs, "files": [n for n in names if n not in ignored]})

        fakes = {
            "create_repo": create_repo,
            "file_exists": file_exists,
            "hf_hub_download": hf_hub_download,
            "upload_folder": upload_folder,
        }
        for name, fn in fakes.items():
            monkeypatch.setattr(HfApi, name, fn)


@pytest.mark.parametrize(
    ("remote", "overwrite", "readme_uploaded"),
    [
        (None, False, True),  # a new repo
        ("ours", False, True),  # the card this library wrote, unchanged: refreshed
        ("edited", False, False),  # edited by the user: kept
        ("edited", True, True),  # ... unless asked to overwrite
    ],
)
def test_push_keeps_a_readme_the_user_edited(
    bundle, monkeypatch, tmp_path, caplog, remote, overwrite, readme_uploaded
):
    card = bundle.model_card(REPO)
    readme = {None: None, "ours": card, "edited": card + "\nMy notes.\n"}[remote]
    hub = FakeHub(monkeypatch, tmp_path, readme)
    with caplog.at_level(logging.WARNING):
        url = bundle.push_to_hub(REPO, overwrite_readme=overwrite)
    assert url == f"https://huggingface.co/{REPO}"
    (upload,) = hub.uploads
    assert ("README.md" in upload["files"]) == readme_uploaded
    stock = {"pytorch_lora_weights.safetensors", "break_a_scene_emb.safetensors"}
    assert {"break_a_scene.safetensors", "training_config.json", *stock} <= set(upload["files"])
    assert ("was edited" in caplog.text) == (remote == "edited" and not overwrite)


def test_cli_push_writes_the_folder_or_uploads(bundle, monkeypatch, tmp_path):
    path = bundle.save(tmp_path / "b.safetensors")
    out = tmp_path / "local"
    assert cli_main(["push", str(path), REPO, "--local-dir", str(out), "--quiet"]) == 0
    assert (out / "README.md").is_file() and (out / "break_a_scene_emb.safetensors").is_file()
    assert f'load_break_a_scene("{REPO}")' in (out / "README.md").read_text()
    hub = FakeHub(monkeypatch, tmp_path, readme=None)
    assert cli_main(["push", str(path), REPO, "--private", "--quiet"]) == 0
    assert hub.uploads and hub.uploads[0]["repo_id"] == REPO


def test_cli_push_refuses_a_bad_repo_id_before_anything(bundle, tmp_path, capsys):
    path = bundle.save(tmp_path / "b.safetensors")
    assert cli_main(["push", str(path), "not a repo id"]) == 1
    assert "repo id" in capsys.readouterr().err
