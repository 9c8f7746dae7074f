"""Bundle: the single-file format, its validation, atomic writes, diffusers interchange, Hub."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from diffusers_breakscene.bundle import (
    DEFAULT_WEIGHT_NAME,
    DIFFUSERS_EMBEDDINGS_NAME,
    DIFFUSERS_LORA_NAME,
    FORMAT,
    Bundle,
    base_fingerprint,
    check_compatible,
)
from diffusers_breakscene.config import BreakASceneConfig
from diffusers_breakscene.errors import (
    BreakSceneError,
    IncompatibleBaseError,
    InvalidBundleError,
    MissingFileError,
    UnwritableOutputError,
)
from diffusers_breakscene.tiny import tiny_pipeline

TOKENS = ["<asset0>", "<asset1>"]
TARGETS = ["to_k", "to_out.0", "to_q", "to_v"]


# --------------------------------------------------------------------------------------------
# fixtures: a real PEFT LoRA on the tiny SD1 UNet


def _unet_lora(family: str) -> tuple[dict[str, torch.Tensor], dict]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = tiny_pipeline(family)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    lora = {f"unet.{k}": v.detach().clone() for k, v in state.items()}
    return lora, base_fingerprint(pipe)


@pytest.fixture(scope="module")
def sd1_lora():
    return _unet_lora("sd1")


def _metadata(fingerprint: dict, *, lora: bool = True) -> dict:
    meta = {
        "tokens": list(TOKENS),
        "concepts": {
            "<asset0>": {"initializer": "dog", "mask_area": 0.25},
            "<asset1>": {"initializer": None, "mask_area": 0.125},
        },
        "base_model": "tiny/sd1-test",
        "base_fingerprint": fingerprint,
        "training": BreakASceneConfig(lora_rank=4, lora_alpha=8, phase1_steps=3).to_dict(),
    }
    if lora:
        meta["lora"] = {"unet": {"r": 4, "lora_alpha": 8.0, "target_modules": TARGETS}}
    return meta


def _handles(d: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {t: torch.randn(1, d, generator=generator) for t in TOKENS}


@pytest.fixture()
def bundle(sd1_lora) -> Bundle:
    lora, fingerprint = sd1_lora
    return Bundle(
        handles=_handles(),
        lora={k: v.clone() for k, v in lora.items()},
        metadata=_metadata(fingerprint),
    )


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------
# save / load


def test_round_trip_is_bit_exact_with_dtype_none(bundle, tmp_path):
    path = bundle.save(tmp_path / "scene.safetensors", dtype=None)
    assert path == tmp_path / "scene.safetensors"
    loaded = Bundle.load(path)
    assert loaded.tokens == TOKENS
    _assert_same_tensors(loaded.handles, bundle.handles)
    _assert_same_tensors(loaded.lora, bundle.lora)
    assert loaded.metadata == bundle.metadata
    assert loaded.handles_2 == {}
    assert loaded.size_bytes == path.stat().st_size == bundle.size_bytes
    # the file itself: tensor names and string metadata as specified
    with safetensors.safe_open(str(path), "pt") as f:
        raw = f.metadata()
        keys = set(f.keys())
    assert {"handles.<asset0>", "handles.<asset1>"} <= keys
    assert all(k.startswith(("handles.", "unet.")) for k in keys)
    assert raw["format"] == FORMAT and raw["format_version"] == "1"
    assert json.loads(raw["tokens"]) == TOKENS
    assert json.loads(raw["lora"])["unet"]["lora_alpha"] == 8.0
    assert json.loads(raw["concepts"])["<asset0>"] == {"initializer": "dog", "mask_area": 0.25}
    assert json.loads(raw["training"])["lora_rank"] == 4
    assert raw["library_version"]


def test_fp16_storage_rounds_lora_only_and_is_smaller(bundle, tmp_path):
    full = bundle.save(tmp_path / "full.safetensors", dtype=None)
    half = bundle.save(tmp_path / "half.safetensors")  # default float16
    assert half.stat().st_size < full.stat().st_size
    loaded = Bundle.load(half)
    for key, value in bundle.lora.items():
        assert loaded.lora[key].dtype == torch.float16
        assert torch.equal(loaded.lora[key], value.half())
    _assert_same_tensors(loaded.handles, bundle.handles)  # handles stay float32, exact
    assert bundle.size_bytes == half.stat().st_size  # last saved file


def test_handles_are_stored_float32_whatever_their_dtype(tmp_path):
    handles = {"<a>": torch.randn(2, 8, dtype=torch.float64)}
    loaded = Bundle.load(Bundle(handles=handles).save(tmp_path))
    assert loaded.handles["<a>"].dtype == torch.float32
    assert torch.equal(loaded.handles["<a>"], handles["<a>"].float())


def test_directory_source_and_weight_name(bundle, tmp_path):
    path = bundle.save(tmp_path)
    assert path == tmp_path / DEFAULT_WEIGHT_NAME
    assert Bundle.load(tmp_path).tokens == TOKENS
    assert Bundle.load(str(tmp_path)).tokens == TOKENS
    other = bundle.save(tmp_path / "sub" / "other.safetensors")
    assert Bundle.load(tmp_path / "sub", weight_name="other.safetensors").tokens == TOKENS
    with pytest.raises(MissingFileError, match=r"other\.safetensors.*weight_name"):
        Bundle.load(other.parent)
    # a new name without suffix is a folder
    assert bundle.save(tmp_path / "new").parent == tmp_path / "new"


def test_missing_local_path_is_a_missing_file_error(tmp_path):
    for source in (tmp_path / "nope.safetensors", str(tmp_path / "nope"), "./nope/x.safetensors"):
        with pytest.raises(MissingFileError, match="does not exist"):
            Bundle.load(source)
    with pytest.raises(MissingFileError):
        Bundle.load(tmp_path / "empty-dir-that-is-missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="has no bundle file"):
        Bundle.load(tmp_path / "empty")


def test_save_is_atomic_when_the_writer_fails(bundle, tmp_path, monkeypatch):
    path = bundle.save(tmp_path / "b.safetensors")
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise RuntimeError("disk exploded")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    changed = Bundle(handles=_handles(seed=5), lora=bundle.lora, metadata=bundle.metadata)
    with pytest.raises(RuntimeError, match="disk exploded"):
        changed.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # no temp left


def test_save_is_atomic_when_the_rename_fails(bundle, tmp_path, monkeypatch):
    path = bundle.save(tmp_path / "b.safetensors")
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(UnwritableOutputError, match="previous file there is unchanged"):
        Bundle(handles=_handles(seed=6)).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert Bundle.load(path).tokens == TOKENS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]


def test_unwritable_target_raises_before_writing(bundle, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for target in (blocker / "b.safetensors", blocker / "sub" / "dir"):
        with pytest.raises(UnwritableOutputError, match=r"file\.txt"):
            bundle.save(target)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    (folder / DEFAULT_WEIGHT_NAME).mkdir()
    with pytest.raises(UnwritableOutputError, match="is a folder"):
        bundle.save(folder)
    with pytest.raises(UnwritableOutputError, match=r"file\.txt"):
        bundle.export_diffusers(blocker)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_is_unwritable(bundle, tmp_path):  # pragma: no cover - not root in CI
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UnwritableOutputError, match="ro"):
            bundle.save(folder)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_save_refuses_bad_dtype_and_fp16_overflow(tmp_path):
    lora = {"unet.a.to_q.lora.down.weight": torch.full((2, 4), 1e6)}
    meta = {"lora": {"unet": {"r": 2, "lora_alpha": 2, "target_modules": ["to_q"]}}}
    b = Bundle(handles={"<a>": torch.ones(1, 4)}, lora=lora, metadata=meta)
    with pytest.raises(InvalidBundleError, match=r"overflows torch\.float16.*bfloat16"):
        b.save(tmp_path)
    with pytest.raises(InvalidBundleError, match="not a floating dtype"):
        b.save(tmp_path, dtype=torch.int8)
    assert list(tmp_path.iterdir()) == []
    assert Bundle.load(b.save(tmp_path, dtype=torch.bfloat16)).lora[next(iter(lora))].dtype == (
        torch.bfloat16
    )


def test_constructor_fills_required_fields_and_validates():
    b = Bundle(handles={"<b>": torch.zeros(1, 4), "<a>": torch.zeros(1, 4)})
    assert b.tokens == ["<b>", "<a>"]
    assert b.metadata["format"] == FORMAT and b.metadata["format_version"] == 1
    assert b.metadata["library_version"]
    assert "<b>" in repr(b) and "tensor(" not in repr(b)
    assert b.lora_adapter_metadata == {}
    with pytest.raises(InvalidBundleError, match="non-empty"):
        Bundle(handles={})
    with pytest.raises(InvalidBundleError, match="2-D"):
        Bundle(handles={"<a>": torch.zeros(4)})
    with pytest.raises(InvalidBundleError, match="without spaces"):
        Bundle(handles={"a b": torch.zeros(1, 4)})


def test_lora_adapter_metadata_is_diffusers_flat_layout(bundle):
    assert bundle.lora_adapter_metadata == {
        "unet.r": 4,
        "unet.lora_alpha": 8.0,
        "unet.target_modules": TARGETS,
    }


def test_from_pipeline_builds_the_trained_bundle(tmp_path):
    from diffusers_breakscene.errors import InvalidArgumentError
    from diffusers_breakscene.handles import add_handles, get_handle_embeddings
    from diffusers_breakscene.lora import add_unet_lora, lora_state_dict

    pipe = tiny_pipeline("sd1")
    add_handles(pipe.tokenizer, pipe.text_encoder, TOKENS, ["dog", None])
    add_unet_lora(pipe.unet, rank=4, alpha=8, target_modules=TARGETS)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:  # a LoRA that is not the identity, as after training
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    training = BreakASceneConfig(lora_rank=4, lora_alpha=8, phase1_steps=3).to_dict()
    bundle = Bundle.from_pipeline(
        pipe,
        TOKENS,
        initializers=["dog", None],
        mask_areas=[0.25, 1 / 3],
        base_model="tiny/sd1-test",
        training=training,
    )
    expected = {
        "tokens": TOKENS,
        "concepts": {
            "<asset0>": {"initializer": "dog", "mask_area": 0.25},
            "<asset1>": {"initializer": None, "mask_area": 0.333333},
        },
        "base_model": "tiny/sd1-test",
        "base_fingerprint": base_fingerprint(pipe),
        "lora": {"unet": {"r": 4, "lora_alpha": 8, "target_modules": sorted(TARGETS)}},
        "training": training,
    }
    fixed = ("format", "format_version", "library_version")
    assert {k: v for k, v in bundle.metadata.items() if k not in fixed} == expected
    _assert_same_tensors(
        bundle.handles, get_handle_embeddings(pipe.tokenizer, pipe.text_encoder, TOKENS)
    )
    _assert_same_tensors(bundle.lora, lora_state_dict(unet=pipe.unet))
    assert bundle.lora and all(k.startswith("unet.") for k in bundle.lora)
    bundle.check_compatible(pipe)
    loaded = Bundle.load(bundle.save(tmp_path, dtype=None))
    assert loaded.metadata == bundle.metadata
    _assert_same_tensors(loaded.handles, bundle.handles)
    _assert_same_tensors(loaded.lora, bundle.lora)
    # phase 2 off (or full fine-tuning): handles only, and the record says so
    bare = Bundle.from_pipeline(
        pipe, TOKENS, initializers=[None, None], mask_areas=[1, 0.5], unet_lora=False
    )
    assert bare.lora == {} and bare.metadata["lora"] == {} and "training" not in bare.metadata
    assert bare.metadata["base_model"] == ""
    assert Bundle.load(bare.save(tmp_path / "bare")).metadata == bare.metadata
    with pytest.raises(InvalidArgumentError, match="one initializer"):
        Bundle.from_pipeline(pipe, TOKENS, initializers=["dog"], mask_areas=[0.1, 0.2])


# --------------------------------------------------------------------------------------------
# validation of crafted files


def _write(path: Path, tensors: dict, metadata: dict) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _valid_parts(sd1_lora) -> tuple[dict, dict]:
    lora, fingerprint = sd1_lora
    keys = [k for k in lora if "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in k]
    tensors = {f"handles.{t}": v for t, v in _handles().items()}
    tensors.update({k: lora[k].clone() for k in keys})
    meta = {
        "format": FORMAT,
        "format_version": "1",
        "tokens": json.dumps(TOKENS),
        "base_fingerprint": json.dumps(fingerprint),
        "lora": json.dumps({"unet": {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}}),
    }
    return tensors, meta


def test_crafted_valid_file_loads(sd1_lora, tmp_path):
    tensors, meta = _valid_parts(sd1_lora)
    assert Bundle.load(_write(tmp_path / "ok.safetensors", tensors, meta)).tokens == TOKENS


def _lora_key(tensors: dict) -> str:
    return next(k for k in tensors if k.startswith("unet.") and "lora.down" in k)


CASES = {
    "no format": (lambda t, m: m.pop("format"), "no 'format' metadata"),
    "other format": (lambda t, m: m.update(format="pt"), "format='pt'.*from_diffusers"),
    "newer version": (lambda t, m: m.update(format_version="2"), "upgrade diffusers-breakscene"),
    "version text": (lambda t, m: m.update(format_version="one"), "not a whole number"),
    "version zero": (lambda t, m: m.update(format_version="0"), "unknown format_version"),
    "no version": (lambda t, m: m.pop("format_version"), "no 'format_version'"),
    "no tokens": (lambda t, m: m.pop("tokens"), "no 'tokens'"),
    "tokens json": (lambda t, m: m.update(tokens="[<asset0>"), "'tokens' is not valid JSON"),
    "tokens not list": (lambda t, m: m.update(tokens='"<asset0>"'), "'tokens' must be"),
    "duplicate token": (
        lambda t, m: m.update(tokens=json.dumps(["<asset0>", "<asset0>", "<asset1>"])),
        "more than once",
    ),
    "lora json": (lambda t, m: m.update(lora="{"), "'lora' is not valid JSON"),
    "fingerprint json": (
        lambda t, m: m.update(base_fingerprint="nope"),
        "'base_fingerprint' is not valid JSON",
    ),
    "concepts json": (lambda t, m: m.update(concepts="{'a': 1}"), "'concepts' is not valid JSON"),
    "training json": (lambda t, m: m.update(training="[1,"), "'training' is not valid JSON"),
    "training not dict": (lambda t, m: m.update(training="[1]"), "'training' must be"),
    "deeply nested json": (
        lambda t, m: m.update(training="[" * 100_000 + "]" * 100_000),
        "'training' is not valid JSON",
    ),
    "fingerprint fields": (
        lambda t, m: m.update(base_fingerprint=json.dumps({"family": "sd1"})),
        "base_fingerprint' lacks",
    ),
    "concept unknown token": (
        lambda t, m: m.update(concepts=json.dumps({"<x>": {"mask_area": 0.1}})),
        "'<x>', which is not in 'tokens'",
    ),
    "mask area range": (
        lambda t, m: m.update(concepts=json.dumps({"<asset0>": {"mask_area": 3}})),
        "mask_area",
    ),
    "missing handle": (lambda t, m: t.pop("handles.<asset1>"), r"no tensor 'handles.<asset1>'"),
    "extra handle": (
        lambda t, m: t.update({"handles.<asset9>": torch.zeros(1, 32)}),
        r"'handles.<asset9>' have no entry in metadata 'tokens'",
    ),
    "handle 1-D": (lambda t, m: t.update({"handles.<asset0>": torch.zeros(32)}), "2-D"),
    "handle 3-D": (lambda t, m: t.update({"handles.<asset0>": torch.zeros(1, 1, 32)}), "2-D"),
    "handle widths differ": (
        lambda t, m: t.update({"handles.<asset1>": torch.zeros(1, 16)}),
        "other handles tensors have",
    ),
    "handle width vs fingerprint": (
        lambda t, m: t.update({f"handles.{x}": torch.zeros(1, 16) for x in TOKENS}),
        "width 16 but base_fingerprint text_hidden_sizes says 32",
    ),
    "handles_2 without encoder": (
        lambda t, m: t.update({f"handles_2.{x}": torch.zeros(1, 64) for x in TOKENS}),
        "names only one text encoder",
    ),
    "int handle": (
        lambda t, m: t.update({"handles.<asset0>": torch.zeros(1, 32, dtype=torch.int32)}),
        r"'handles.<asset0>'.*dtype I32.*floating point",
    ),
    "bool lora": (
        lambda t, m: t.update({_lora_key(t): torch.zeros(4, 32, dtype=torch.bool)}),
        "dtype BOOL",
    ),
    "nan handle": (
        lambda t, m: t.update({"handles.<asset1>": torch.full((1, 32), float("nan"))}),
        r"'handles.<asset1>' contains NaN",
    ),
    "inf lora": (
        lambda t, m: t.update({_lora_key(t): torch.full((4, 32), float("inf"))}),
        "contains NaN or infinite",
    ),
    "no lora metadata": (lambda t, m: m.pop("lora"), "no 'lora' metadata"),
    "lora metadata other component": (
        lambda t, m: m.update(
            lora=json.dumps({"text_encoder": {"r": 4, "lora_alpha": 4, "target_modules": ["q"]}})
        ),
        r"LoRA weights for \['unet'\] but metadata 'lora' has no entry",
    ),
    "lora r type": (
        lambda t, m: m.update(
            lora=json.dumps({"unet": {"r": "4", "lora_alpha": 8, "target_modules": TARGETS}})
        ),
        r"\['r'\] must be a positive int",
    ),
    "lora alpha missing": (
        lambda t, m: m.update(lora=json.dumps({"unet": {"r": 4, "target_modules": TARGETS}})),
        "lora_alpha",
    ),
    "lora rank mismatch": (
        lambda t, m: m.update(
            lora=json.dumps({"unet": {"r": 8, "lora_alpha": 8, "target_modules": TARGETS}})
        ),
        "has rank 4 but metadata 'lora'",
    ),
    "lora key prefix": (
        lambda t, m: t.update({"vae.x.lora.down.weight": torch.zeros(4, 4)}),
        "'vae.x.lora.down.weight' is neither",
    ),
    "lora key without lora": (
        lambda t, m: t.update({"unet.conv_in.weight": torch.zeros(4, 4)}),
        "no 'lora' in its name",
    ),
    "bare key": (lambda t, m: t.update({"junk": torch.zeros(1)}), "'junk' is neither"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_metadata_and_tensors_are_refused(case, sd1_lora, tmp_path):
    tensors, meta = _valid_parts(sd1_lora)
    change, message = CASES[case]
    change(tensors, meta)
    path = _write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(InvalidBundleError, match=message) as info:
        Bundle.load(path)
    assert "bad.safetensors" in str(info.value)


def _valid_bytes() -> bytes:
    b = Bundle(handles={"<a>": torch.arange(8.0).reshape(1, 8)})
    tensors, meta = b._serialize(None)
    return safetensors.torch.save(tensors, metadata=meta)


def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


CORRUPT = {
    "empty": (lambda good: b"", "only 0 bytes"),
    "tiny": (lambda good: b"abc", "only 3 bytes"),
    "zip pickle": (lambda good: b"PK\x03\x04" + b"\x00" * 100, "zip archive.*never loaded"),
    "pickle": (lambda good: b"\x80\x04\x95" + b"\x00" * 64 + b".", "pickle.*never loaded"),
    "huge header": (lambda good: struct.pack("<Q", 2**62) + b"{}", "header length"),
    "header past end": (lambda good: struct.pack("<Q", 1000) + b"{}", "truncated"),
    "truncated": (lambda good: good[: len(good) - 7], "truncated"),
    "garbage header": (lambda good: struct.pack("<Q", 8) + b"{\xff\xfe[}]xx", "not JSON"),
    "header not object": (lambda good: struct.pack("<Q", 4) + b"abcd", "not a JSON object"),
    "header list": (lambda good: _header([1, 2]), "not a JSON object"),
    "deep header": (
        lambda good: struct.pack("<Q", 200_002) + b"{" + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "not JSON",
    ),
    "bad metadata": (lambda good: _header({"__metadata__": {"a": 1}}), "__metadata__"),
    "bad offsets": (
        lambda good: _header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}),
        "invalid data offsets",
    ),
    "size mismatch": (
        lambda good: (
            _header({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}) + b"\x00" * 4
        ),
        "does not fit its shape",
    ),
    "unknown dtype": (
        lambda good: (
            _header({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}) + b"\x00" * 4
        ),
        "unknown dtype",
    ),
    "no metadata": (
        lambda good: (
            _header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}) + b"\x00" * 4
        ),
        "no 'format'",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_files_are_refused(case, tmp_path):
    make, message = CORRUPT[case]
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(make(_valid_bytes()))
    with pytest.raises(InvalidBundleError, match=message):
        Bundle.load(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=400))
def test_arbitrary_bytes_only_raise_invalid_bundle_error(data, cut):
    good = _valid_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        # a strict prefix of a valid file is always refused
        path.write_bytes(good[: min(cut, len(good) - 1)])
        with pytest.raises(InvalidBundleError):
            Bundle.load(path)
        # anything else either loads or raises InvalidBundleError, never another exception
        for blob in (data, good[:cut] + data, data + good[cut:]):
            path.write_bytes(blob)
            with contextlib.suppress(InvalidBundleError):
                Bundle.load(path)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.lists(
        st.text(st.characters(codec="utf-8", exclude_categories=["Z", "C"]), min_size=1),
        min_size=1,
        max_size=4,
        unique=True,
    ),
    rows=st.integers(min_value=1, max_value=3),
    width=st.integers(min_value=1, max_value=16),
)
def test_round_trip_any_token_names(tokens, rows, width):
    tokens = [t for t in tokens if not any(c.isspace() for c in t)] or ["<a>"]
    handles = {t: torch.randn(rows, width) for t in tokens}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = Bundle.load(Bundle(handles=handles).save(tmp))
    assert loaded.tokens == tokens
    _assert_same_tensors(loaded.handles, handles)


# --------------------------------------------------------------------------------------------
# stock diffusers interchange


def test_export_diffusers_loads_in_stock_diffusers(bundle, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    files = bundle.export_diffusers(tmp_path / "export")
    assert files == {
        "lora": tmp_path / "export" / DIFFUSERS_LORA_NAME,
        "embeddings": tmp_path / "export" / DIFFUSERS_EMBEDDINGS_NAME,
    }
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        [DIFFUSERS_LORA_NAME, DIFFUSERS_EMBEDDINGS_NAME]
    )
    with safetensors.safe_open(str(files["lora"]), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == 8.0 and adapter["unet.r"] == 4

    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(tmp_path / "export", weight_name=DIFFUSERS_LORA_NAME, adapter_name="s")
    pipe.load_textual_inversion(
        load_file(files["embeddings"])["clip_l"],
        token=bundle.tokens,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    config = pipe.unet.peft_config["s"]
    assert config.r == 4 and config.lora_alpha == 8.0  # alpha survived (scale 2, not 1)
    loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="s"))
    expected = {k.removeprefix("unet."): v for k, v in bundle.lora.items()}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    for token in bundle.tokens:
        row = embeddings[pipe.tokenizer.convert_tokens_to_ids(token)]
        assert torch.equal(row, bundle.handles[token][0])


def test_lora_adapter_metadata_loads_from_memory(bundle):
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_into_unet(
        dict(bundle.lora),
        network_alphas=None,
        unet=pipe.unet,
        adapter_name="mem",
        metadata=bundle.lora_adapter_metadata,
    )
    assert pipe.unet.peft_config["mem"].lora_alpha == 8.0


def test_export_handles_only_and_multi_vector(tmp_path):
    handles = {"<a>": torch.randn(2, 32), "<b>": torch.randn(1, 32)}
    b = Bundle(handles=handles)
    (tmp_path / DIFFUSERS_LORA_NAME).write_bytes(b"an earlier export")
    files = b.export_diffusers(tmp_path)
    assert list(files) == ["embeddings"]
    assert not (tmp_path / DIFFUSERS_LORA_NAME).exists()  # stale LoRA removed
    assert load_file(files["embeddings"])["clip_l"].shape == (3, 32)
    assert b.embedding_tokens() == ["<a>", "<a>_1", "<b>"]
    pipe = tiny_pipeline("sd1")
    pipe.load_textual_inversion(
        load_file(files["embeddings"])["clip_l"],
        token=b.embedding_tokens(),
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    back = Bundle.from_diffusers(tmp_path)
    assert back.tokens == ["<a>", "<b>"]
    _assert_same_tensors(back.handles, handles)


def test_export_leaves_no_staging_folder_on_failure(bundle, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(UnwritableOutputError, match="No space left"):
        bundle.export_diffusers(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_from_diffusers_inverts_export(bundle, tmp_path):
    files = bundle.export_diffusers(tmp_path)
    fingerprint = bundle.metadata["base_fingerprint"]
    for source, tokens in ((tmp_path, None), (list(files.values()), TOKENS)):
        back = Bundle.from_diffusers(
            source, tokens, base_fingerprint=fingerprint, base_model="tiny/sd1-test"
        )
        assert back.tokens == TOKENS
        _assert_same_tensors(back.handles, bundle.handles)
        _assert_same_tensors(back.lora, bundle.lora)
        assert back.metadata["lora"] == bundle.metadata["lora"]
        assert back.metadata["base_fingerprint"] == fingerprint
    with pytest.raises(InvalidBundleError, match="rows"):
        Bundle.from_diffusers(tmp_path, ["<only-one>"])


def test_from_diffusers_without_adapter_metadata_assumes_alpha_equals_rank(sd1_lora, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora, _ = sd1_lora
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers={k.removeprefix("unet."): v for k, v in lora.items()}
    )
    save_file({"<cat>": torch.randn(32)}, str(tmp_path / "cat.safetensors"))
    back = Bundle.from_diffusers([tmp_path / DIFFUSERS_LORA_NAME, tmp_path / "cat.safetensors"])
    assert back.tokens == ["<cat>"] and back.handles["<cat>"].shape == (1, 32)
    config = back.metadata["lora"]["unet"]
    assert config["r"] == 4 and config["lora_alpha"] == 4.0
    assert all(t.endswith(("to_q", "to_k", "to_v", "to_out.0")) for t in config["target_modules"])
    with pytest.raises(MissingFileError):
        Bundle.from_diffusers(tmp_path / "nothing-here")
    with pytest.raises(MissingFileError, match="break_a_scene_emb"):
        Bundle.from_diffusers(tmp_path)


def test_from_diffusers_refuses_corrupt_files(tmp_path):
    (tmp_path / DIFFUSERS_EMBEDDINGS_NAME).write_bytes(b"PK\x03\x04 not a safetensors file")
    with pytest.raises(InvalidBundleError, match="zip archive"):
        Bundle.from_diffusers(tmp_path, ["<a>"])


# --------------------------------------------------------------------------------------------
# base model fingerprint


def test_base_fingerprint_of_tiny_families():
    assert base_fingerprint(tiny_pipeline("sd1")) == {
        "family": "sd1",
        "text_hidden_sizes": [32],
        "cross_attention_dim": 32,
        "prediction_type": "epsilon",
    }
    assert base_fingerprint(tiny_pipeline("sd2")) == {
        "family": "sd2",
        "text_hidden_sizes": [48],
        "cross_attention_dim": 48,
        "prediction_type": "v_prediction",
    }
    fake_xl = types.SimpleNamespace(
        unet=tiny_pipeline("sd1").unet,
        text_encoder=tiny_pipeline("sd1").text_encoder,
        text_encoder_2=tiny_pipeline("sd2").text_encoder,
        scheduler=types.SimpleNamespace(config=types.SimpleNamespace()),
    )
    fp = base_fingerprint(fake_xl)
    assert fp["family"] == "sdxl" and fp["text_hidden_sizes"] == [32, 48]
    assert fp["prediction_type"] == "epsilon"
    with pytest.raises(IncompatibleBaseError, match="no UNet"):
        base_fingerprint(types.SimpleNamespace(transformer=object()))


def test_check_compatible_names_the_differing_fields():
    sd1, sd2 = tiny_pipeline("sd1"), tiny_pipeline("sd2")
    check_compatible(base_fingerprint(sd1), sd1)
    with pytest.raises(IncompatibleBaseError) as info:
        check_compatible(base_fingerprint(sd1), sd2)
    message = str(info.value)
    assert "cross_attention_dim=32 but the pipeline's UNet has 48" in message
    assert "text_hidden_sizes=[32]" in message and "family='sd1'" in message
    assert "prediction_type='epsilon'" in message
    assert "load it into an SD1-family pipeline" in message
    v_sd1 = dict(base_fingerprint(sd1), prediction_type="v_prediction")
    with pytest.raises(IncompatibleBaseError, match=r"prediction_type='v_prediction'.*scheduler"):
        check_compatible(v_sd1, sd1)


def test_bundle_check_compatible_uses_fingerprint_and_tensors(bundle):
    sd1, sd2 = tiny_pipeline("sd1"), tiny_pipeline("sd2")
    bundle.check_compatible(sd1)
    with pytest.raises(IncompatibleBaseError, match="cross_attention_dim"):
        bundle.check_compatible(sd2)
    # without a fingerprint, the tensors themselves are checked
    meta = {k: v for k, v in bundle.metadata.items() if k != "base_fingerprint"}
    bare = Bundle(handles=bundle.handles, lora=bundle.lora, metadata=meta)
    with pytest.raises(IncompatibleBaseError, match=r"handles are 32 wide.*48"):
        bare.check_compatible(sd2)
    no_handles_check = Bundle(
        handles={t: torch.zeros(1, 48) for t in TOKENS}, lora=bundle.lora, metadata=meta
    )
    with pytest.raises(IncompatibleBaseError, match=r"LoRA weight 'unet.*size"):
        no_handles_check.check_compatible(sd2)
    wrong_module = {"unet.nowhere.to_q.lora.down.weight": torch.zeros(4, 32)}
    meta_one = dict(meta, lora={"unet": {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]}})
    with pytest.raises(IncompatibleBaseError, match=r"unet\.nowhere\.to_q"):
        Bundle(handles=bundle.handles, lora=wrong_module, metadata=meta_one).check_compatible(sd1)


# --------------------------------------------------------------------------------------------
# the Hub


def test_hub_load_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match=r"not found locally.*offline") as info:
        Bundle.load("someone/some-scene", local_files_only=True, cache_dir=tmp_path)
    assert "someone/some-scene" in str(info.value)


def test_hub_load_uses_hf_hub_download(bundle, tmp_path, monkeypatch):
    import huggingface_hub

    file = bundle.save(tmp_path / "cache" / "custom.safetensors")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = Bundle.load("me/scene", revision="v1", token="t", cache_dir=tmp_path)
    assert loaded.tokens == TOKENS
    repo_id, filename, kwargs = calls[-1]
    assert (repo_id, filename) == ("me/scene", DEFAULT_WEIGHT_NAME)
    assert kwargs["revision"] == "v1" and kwargs["token"] == "t"
    assert kwargs["local_files_only"] is False and kwargs["cache_dir"] == tmp_path
    Bundle.load("me/scene", weight_name="custom.safetensors")
    assert calls[-1][1] == "custom.safetensors"


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        ("RepositoryNotFoundError", MissingFileError, "no such repo"),
        ("RemoteEntryNotFoundError", MissingFileError, "weight_name"),
        ("RevisionNotFoundError", MissingFileError, "revision"),
        ("GatedRepoError", BreakSceneError, "gated"),
        ("HfHubHTTPError", BreakSceneError, "could not download"),
    ],
)
def test_hub_errors_are_translated(error, kind, message, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    response = types.SimpleNamespace(headers={}, request=None)

    def fake_download(*args, **kwargs):
        raise getattr(errors, error)("server said no", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(kind, match=message):
        Bundle.load("me/scene")


def test_push_to_hub_uploads_bundle_card_and_preview(bundle, monkeypatch):
    from huggingface_hub import HfApi
    from PIL import Image

    uploaded: dict[str, bytes] = {}
    calls: dict[str, dict] = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def fake_upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        for path in Path(kwargs["folder_path"]).iterdir():
            uploaded[path.name] = path.read_bytes()

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(HfApi, "file_exists", lambda self, *a, **k: False)  # a new repo
    url = bundle.push_to_hub(
        "me/scene", private=True, preview_image=Image.new("RGB", (8, 8), "red")
    )
    assert url == "https://huggingface.co/me/scene"
    assert calls["create_repo"]["exist_ok"] is True and calls["create_repo"]["private"] is True
    assert calls["upload_folder"]["repo_id"] == "me/scene"
    assert "<asset0>" in calls["upload_folder"]["commit_message"]
    assert sorted(uploaded) == [
        "README.md", DEFAULT_WEIGHT_NAME, "break_a_scene_emb.safetensors", "preview.png",
        "pytorch_lora_weights.safetensors", "training_config.json",
    ]  # fmt: skip
    card = uploaded["README.md"].decode()
    assert "![preview](preview.png)" in card and "me/scene" in card
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DEFAULT_WEIGHT_NAME
        path.write_bytes(uploaded[DEFAULT_WEIGHT_NAME])
        back = Bundle.load(path)
    assert back.tokens == TOKENS and back.metadata == bundle.metadata
    assert bundle._file is None  # pushing does not change where the bundle lives
    with pytest.raises(MissingFileError, match="preview image"):
        bundle.push_to_hub("me/scene", preview_image="/nonexistent/preview.png")


def test_model_card_content(bundle):
    import yaml

    card = bundle.model_card(repo_id="me/scene")
    front, body = card.split("---\n", 2)[1:]
    data = yaml.safe_load(front)
    assert data["library_name"] == "diffusers"
    assert "break-a-scene" in data["tags"] and "lora" in data["tags"]
    assert data["base_model"] == "tiny/sd1-test"  # looks like a Hub id
    for text in (
        "`<asset0>`",
        "`<asset1>`",
        "| dog |",
        "25.0%",
        "tiny/sd1-test",
        "a photo of <asset0>",
        "a photo of <asset0> and <asset1>",
        'pipe.load_break_a_scene("me/scene")',
        "cross_attention_dim",
        "| unet | 4 | 8.0 |",
        "phase1_steps: `3`",
        bundle.metadata["library_version"],
    ):
        assert text in body, text
    local = Bundle(handles=bundle.handles, metadata={"base_model": "/models/sd15"})
    assert "base_model" not in yaml.safe_load(local.model_card().split("---\n")[1])
    assert "`/models/sd15`" in local.model_card()


@pytest.mark.slow
def test_text_encoder_lora_round_trips_through_diffusers(bundle, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    # (transformers' text_encoder.add_adapter wants peft >= 0.22; peft's own injection works)
    encoder = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=6, init_lora_weights="gaussian", target_modules=["q_proj"]),
        tiny_pipeline("sd1").text_encoder,
    )
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    lora = dict(bundle.lora) | {f"text_encoder.{k}": v.clone() for k, v in state.items()}
    config = dict(bundle.metadata["lora"])
    config["text_encoder"] = {"r": 2, "lora_alpha": 6.0, "target_modules": ["q_proj"]}
    both = Bundle(handles=bundle.handles, lora=lora, metadata=dict(bundle.metadata, lora=config))
    back = Bundle.load(both.save(tmp_path, dtype=None))
    _assert_same_tensors(back.lora, lora)
    both.export_diffusers(tmp_path / "export")
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(tmp_path / "export", weight_name=DIFFUSERS_LORA_NAME, adapter_name="s")
    assert pipe.text_encoder.peft_config["s"].lora_alpha == 6.0
    assert pipe.unet.peft_config["s"].lora_alpha == 8.0
    again = Bundle.from_diffusers(tmp_path / "export")
    assert again.metadata["lora"] == config
    _assert_same_tensors(again.lora, lora)
