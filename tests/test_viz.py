"""Attention pictures: overlays, grids, token maps and atomic PNG writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_breakscene.tiny import tiny_tokenizer
from diffusers_breakscene.viz import (
    attention_overlay,
    handle_positions,
    mask_vs_attention_grid,
    save_png,
    token_attention_maps,
)


def test_overlay_has_image_size_and_is_coloured_where_the_map_is_high():
    image = Image.new("RGB", (80, 40), (100, 100, 100))
    heat = torch.zeros(4, 8)
    heat[0, 0] = 5.0  # top-left corner only; the scale does not matter (normalised)
    out = attention_overlay(image, heat, color=(255, 0, 0), alpha=0.8)
    assert out.size == image.size and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert arr[1, 1, 0] > 180 and arr[1, 1, 2] < 60  # red where the map is high
    assert tuple(arr[-1, -1]) == (100, 100, 100)  # unchanged where it is zero


def test_overlay_of_a_flat_map_leaves_the_image_alone_and_checks_input():
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    assert np.array_equal(np.asarray(attention_overlay(image, torch.ones(2, 2))), np.asarray(image))
    with pytest.raises(ValueError, match="2-D"):
        attention_overlay(image, torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="alpha"):
        attention_overlay(image, torch.ones(2, 2), alpha=2.0)


def test_token_attention_maps_picks_and_averages_positions():
    maps = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    out = token_attention_maps(maps, [1, [2, 4]])
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], maps[..., 1])
    assert torch.allclose(out[1], (maps[..., 2] + maps[..., 4]) / 2)
    with pytest.raises(ValueError, match="outside"):
        token_attention_maps(maps, [5])
    with pytest.raises(ValueError, match="seq_len"):
        token_attention_maps(maps[0], [1])


def test_handle_positions_finds_each_token_in_the_padded_prompt():
    tokenizer = tiny_tokenizer()
    assert handle_positions(tokenizer, "a photo of dog and cat", ["dog", "cat"]) == [[4], [6]]
    with pytest.raises(ValueError, match="does not occur"):
        handle_positions(tokenizer, "a photo of dog", ["cat"])


def test_grid_has_one_row_per_handle_and_two_columns():
    image = Image.new("RGB", (64, 32), "gray")
    masks = torch.zeros(3, 32, 64)
    masks[0, :, :10] = 1
    grid = mask_vs_attention_grid(image, masks, torch.rand(3, 4, 8), ["a", "b", "c"], 100)
    tile_h = 50 + 14  # image aspect 2:1 at width 100, plus the label strip
    assert grid.size == (200, 3 * tile_h)
    masks_np = [np.asarray(m) for m in masks.numpy()]
    other = Image.new("RGB", (64, 32), "white")
    grid2 = mask_vs_attention_grid(image, masks_np, torch.rand(3, 4, 8), "abc", 100, other)
    assert grid2.size == grid.size
    with pytest.raises(ValueError, match="same non-zero length"):
        mask_vs_attention_grid(image, masks, torch.rand(2, 4, 8), ["a", "b"])


def test_save_png_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "sub" / "x.png")
    assert Image.open(path).size == (8, 8)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (8, 8), "blue"), path)
    monkeypatch.undo()
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]
