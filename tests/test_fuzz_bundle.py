"""Hostile bundle files (issue #6): property-based fuzzing of ``Bundle.load``.

``tests/test_bundle.py`` already feeds random bytes and a fixed list of corrupt files. Here the
files start from a *real* bundle (handles + LoRA + full metadata) and are damaged in structured
ways: truncated, bit-flipped, header length field or header entries rewritten, shapes declaring
10^12 elements, other dtypes, metadata fields replaced. For every one of them ``Bundle.load``

* either returns a valid bundle or raises a ``BreakSceneError`` (nothing else escapes),
* answers quickly (a generous 5 s bound; a load takes milliseconds),
* never unpickles: ``pickle.load(s)``, ``pickle.Unpickler`` and ``torch.load`` raise if called,
* reads a huge-shape header with bounded memory (tracemalloc peak under 50 MB).
"""

from __future__ import annotations

import json
import pickle
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_breakscene.bundle import Bundle
from diffusers_breakscene.config import BreakASceneConfig
from diffusers_breakscene.errors import BreakSceneError

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TARGETS = ["to_k", "to_q"]


def _valid_parts() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    lora = {}
    for layer in ("a.attn2.to_q", "a.attn2.to_k"):
        lora[f"unet.{layer}.lora.down.weight"] = torch.randn(4, 32, generator=g)
        lora[f"unet.{layer}.lora.up.weight"] = torch.randn(32, 4, generator=g)
    bundle = Bundle(
        handles={"<asset0>": torch.randn(1, 32, generator=g), "<asset1>": torch.randn(1, 32)},
        lora=lora,
        metadata={
            "tokens": ["<asset0>", "<asset1>"],
            "concepts": {
                "<asset0>": {"initializer": "dog", "mask_area": 0.25},
                "<asset1>": {"initializer": None, "mask_area": 0.5},
            },
            "base_model": "tiny/sd1",
            "base_fingerprint": {
                "family": "sd1",
                "text_hidden_sizes": [32],
                "cross_attention_dim": 32,
                "prediction_type": "epsilon",
            },
            "lora": {"unet": {"r": 4, "lora_alpha": 4.0, "target_modules": TARGETS}},
            "training": BreakASceneConfig(lora_rank=4, lora_alpha=4).to_dict(),
        },
    )
    return bundle._serialize(None)


TENSORS, METADATA = _valid_parts()
GOOD = safetensors.torch.save(TENSORS, metadata=METADATA)
HEADER_LEN = struct.unpack("<Q", GOOD[:8])[0]
HEADER = json.loads(GOOD[8 : 8 + HEADER_LEN])


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly (it would not be a BreakSceneError)."""

    class Unpickled(AssertionError):
        pass

    def refuse(*args, **kwargs):
        raise Unpickled("something tried to unpickle a bundle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


def _load(blob: bytes) -> Bundle | None:
    """Load ``blob`` as a bundle file: the bundle, or None for a BreakSceneError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hostile.safetensors"
        path.write_bytes(blob)
        try:
            bundle = Bundle.load(path)
        except BreakSceneError as err:
            assert isinstance(err, ValueError | FileNotFoundError), type(err)
            assert "hostile.safetensors" in str(err)
            bundle = None
    if bundle is not None:
        bundle.validate()
    return bundle


def _with_header(header: dict, data: bytes | None = None) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + (GOOD[8 + HEADER_LEN :] if data is None else data)


def test_the_valid_file_loads():
    bundle = _load(GOOD)
    assert bundle is not None and bundle.tokens == ["<asset0>", "<asset1>"]
    assert set(bundle.lora) == {k for k in TENSORS if k.startswith("unet.")}


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_every_truncation_is_refused(cut):
    assert _load(GOOD[:cut]) is None


@SETTINGS
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 7)), min_size=1, max_size=8
    )
)
@pytest.mark.slow
def test_bit_flips_load_or_raise_break_scene_errors(flips):
    blob = bytearray(GOOD)
    for position, bit in flips:
        blob[position] ^= 1 << bit
    bundle = _load(bytes(blob))
    if bundle is not None:  # flips in tensor data or harmless header bytes
        assert all(
            torch.isfinite(t).all() for t in [*bundle.handles.values(), *bundle.lora.values()]
        )


@SETTINGS
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(HEADER_LEN + 1, HEADER_LEN + 10**6)))
def test_header_length_field_lies(length):
    blob = struct.pack("<Q", length) + GOOD[8:]
    if length != HEADER_LEN:
        assert _load(blob) is None


@SETTINGS
@given(
    key=st.sampled_from(sorted(HEADER.keys() - {"__metadata__"})),
    shape=st.lists(st.integers(0, 10**7), min_size=0, max_size=4),
    dtype=st.sampled_from(
        [
            "F16",
            "BF16",
            "F32",
            "F64",
            "I8",
            "U8",
            "I32",
            "I64",
            "BOOL",
            "F8_E4M3",
            "F8_E5M2",
            "C64",
            "Q4",
            "",
            "f32",
        ]
    ),
    offsets=st.one_of(st.none(), st.lists(st.integers(-(2**63), 2**64), min_size=0, max_size=3)),
)
@pytest.mark.slow
def test_rewritten_header_entries(key, shape, dtype, offsets):
    header = json.loads(json.dumps(HEADER))
    entry = header[key]
    entry["shape"], entry["dtype"] = shape, dtype
    if offsets is not None:
        entry["data_offsets"] = offsets
    bundle = _load(_with_header(header))
    if bundle is not None:
        assert dtype in {"F16", "BF16", "F32", "F64"}


@pytest.mark.parametrize(
    "shape, dtype",
    [([10**12], "F32"), ([10**6, 10**6], "F16"), ([2**40, 2**40], "F64"), ([10**12, 0], "F32")],
)
def test_huge_shape_headers_use_bounded_memory(shape, dtype):
    header = json.loads(json.dumps(HEADER))
    elements = 1
    for size in shape:
        elements *= size
    width = {"F16": 2, "F32": 4, "F64": 8}[dtype]
    header["handles.<asset0>"] = {
        "dtype": dtype,
        "shape": shape,
        "data_offsets": [0, elements * width],  # consistent with the shape, absent from the file
    }
    tracemalloc.start()
    try:
        bundle = _load(_with_header(header))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if elements:
        assert bundle is None
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MB for a {shape} header"


@SETTINGS
@given(
    tensor=st.sampled_from(sorted(TENSORS)),
    dtype=st.sampled_from(
        [
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int8,
            torch.uint8,
            torch.int32,
            torch.int64,
            torch.bool,
            torch.complex64,
            torch.float8_e4m3fn,
        ]
    ),
)
def test_tensors_of_another_dtype(tensor, dtype):
    tensors = dict(TENSORS)
    tensors[tensor] = tensors[tensor].to(dtype) if dtype != torch.complex64 else (
        torch.complex(tensors[tensor], tensors[tensor]))  # fmt: skip
    bundle = _load(safetensors.torch.save(tensors, metadata=METADATA))
    if bundle is not None:
        assert dtype in (torch.float16, torch.bfloat16, torch.float64)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@SETTINGS
@given(
    key=st.sampled_from([*sorted(METADATA), "extra", "__proto__"]),
    value=st.one_of(
        st.none(),  # drop the field
        st.text(max_size=40),  # not JSON, or a JSON scalar
        JSON_VALUES.map(json.dumps),  # any JSON
        st.sampled_from(["NaN", "Infinity", "-1", "1e400", "[" * 5000 + "]" * 5000, "9" * 5000]),
    ),
)
@pytest.mark.slow
def test_malformed_metadata(key, value):
    metadata = dict(METADATA)
    if value is None:
        metadata.pop(key, None)
    else:
        metadata[key] = value
    _load(safetensors.torch.save(TENSORS, metadata=metadata))


@SETTINGS
@given(
    extra=st.dictionaries(
        st.text(min_size=1, max_size=30),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16"]),
                "shape": st.lists(st.integers(0, 3), max_size=3),
                "data_offsets": st.lists(st.integers(0, 64), min_size=2, max_size=2),
            }
        ),
        max_size=3,
    )
)
@pytest.mark.slow
def test_extra_or_overlapping_tensor_entries(extra):
    header = json.loads(json.dumps(HEADER))
    header.update(extra)
    bundle = _load(_with_header(header))
    if bundle is not None:
        assert set(extra) <= set(HEADER) | {f"handles.{t}" for t in bundle.tokens} | set(
            bundle.lora
        )


def test_a_pickle_named_safetensors_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    for protocol in (2, 4, 5):
        assert _load(pickle.dumps(Boom(), protocol=protocol)) is None
    buffer = tmp_path / "x.pt"
    torch.save({"a": torch.ones(1)}, buffer)
    assert _load(buffer.read_bytes()) is None
