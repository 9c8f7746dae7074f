"""The tensors of a bundle: checked against its metadata and against a pipeline.

Handles are ``{token: (k, d) float tensor}`` per text encoder; LoRA weights are
``{"<component>.<module>.lora...": tensor}`` in the layout diffusers' ``load_lora_weights`` reads.

Example:
    >>> import torch
    >>> from diffusers_breakscene.bundle.format import BundleMetadata
    >>> check_contents({"<a>": torch.ones(1, 4)}, {}, {}, BundleMetadata(("<a>",)))
    >>> lora_role("unet.x.to_q.lora.down.weight"), lora_component("unet.x.lora.up.weight")
    ('down', 'unet')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import IncompatibleBaseError, InvalidBundleError, fail
from .format import LORA_COMPONENTS, BundleMetadata, LoraInfo

__all__ = [
    "check_contents",
    "check_fits_pipeline",
    "lora_component",
    "lora_role",
    "owned",
]

_OTHER_BASE = "load it into a pipeline of the base model it was trained on"


def owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU copy of ``tensor`` in ``dtype`` that shares memory with nothing."""
    return (
        tensor.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)
    )


def lora_component(key: str) -> str | None:
    """The component (``"unet"``, ``"text_encoder"``...) a LoRA tensor name is under, or None."""
    head = key.split(".", 1)[0]
    return head if head in LORA_COMPONENTS and "." in key else None


def lora_role(key: str) -> str | None:
    """``"down"`` (input side, shape ``(r, in, ...)``), ``"up"`` (``(out, r, ...)``) or None."""
    tail = key[key.find(".lora") + 1 :] if ".lora" in key else ""
    if "lora_A" in tail or ".down." in tail or tail.startswith("lora_down"):
        return "down"
    if "lora_B" in tail or ".up." in tail or tail.startswith("lora_up"):
        return "up"
    return None


def _check_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        fail(InvalidBundleError, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        fail(
            InvalidBundleError,
            f"tensor {name!r} has dtype {tensor.dtype}; handles and LoRA weights must be "
            "floating point",
            "convert it with .float()",
        )
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        fail(
            InvalidBundleError,
            f"tensor {name!r} contains NaN or infinite values",
            "the training diverged or the file is damaged: use an earlier checkpoint",
        )


def _check_handles(
    prefix: str, handles: Any, tokens: tuple[str, ...], width: int | None
) -> dict[str, int]:
    """Validate one handles dict; returns rows per token."""
    if not isinstance(handles, Mapping):
        fail(InvalidBundleError, f"{prefix} must be a dict token -> tensor, got {type(handles)}")
    missing = [t for t in tokens if t not in handles]
    if missing:
        fail(
            InvalidBundleError,
            f"metadata 'tokens' lists {missing} but there is no tensor "
            + ", ".join(repr(f"{prefix}.{t}") for t in missing),
            "every token needs its handle rows",
        )
    extra = [t for t in handles if t not in tokens]
    if extra:
        fail(
            InvalidBundleError,
            "tensor(s) "
            + ", ".join(repr(f"{prefix}.{t}") for t in extra)
            + " have no entry in metadata 'tokens'",
            "add the token to 'tokens' or remove the tensor",
        )
    rows: dict[str, int] = {}
    seen_width: int | None = None
    for token in tokens:
        name, tensor = f"{prefix}.{token}", handles[token]
        _check_tensor(name, tensor)
        if tensor.dim() != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
            fail(
                InvalidBundleError,
                f"tensor {name!r} has shape {tuple(tensor.shape)}; handle rows must be 2-D "
                "(k, d) with k >= 1 vectors of the text encoder's width d",
                "reshape a single vector with .reshape(1, -1)",
            )
        d = int(tensor.shape[1])
        if seen_width is not None and d != seen_width:
            fail(
                InvalidBundleError,
                f"tensor {name!r} has width {d} but the other {prefix} tensors have "
                f"{seen_width}; all handles of one text encoder share its width",
            )
        seen_width = d
        if width is not None and d != width:
            fail(
                InvalidBundleError,
                f"tensor {name!r} has width {d} but base_fingerprint text_hidden_sizes says "
                f"{width}",
                "the handles do not belong to that base model: re-train or fix base_fingerprint",
            )
        rows[token] = int(tensor.shape[0])
    return rows


def _check_lora(lora: Any, config: Mapping[str, LoraInfo] | None) -> None:
    """The LoRA tensors: names, values, and their components and ranks against ``config``."""
    if not isinstance(lora, Mapping):
        fail(InvalidBundleError, f"lora must be a dict name -> tensor, got {type(lora).__name__}")
    components: dict[str, list[str]] = {}
    for key, tensor in lora.items():
        component = lora_component(key) if isinstance(key, str) else None
        if component is None:
            fail(
                InvalidBundleError,
                f"LoRA tensor {key!r} is not under 'unet.', 'text_encoder.' or 'text_encoder_2.'",
                "prefix the keys of each component's state dict with its name",
            )
        if "lora" not in key:
            fail(
                InvalidBundleError,
                f"LoRA tensor {key!r} has no 'lora' in its name, so diffusers would refuse it",
                "store only LoRA weights (convert_state_dict_to_diffusers output)",
            )
        _check_tensor(key, tensor)
        components.setdefault(component, []).append(key)
    if components and config is None:
        fail(
            InvalidBundleError,
            f"the bundle has LoRA weights for {sorted(components)} but no 'lora' metadata",
            'add {"<component>": {"r": ..., "lora_alpha": ..., "target_modules": [...]}}',
        )
    config = config or {}
    missing = sorted(set(components) - set(config))
    if missing:
        fail(
            InvalidBundleError,
            f"the bundle has LoRA weights for {missing} but metadata 'lora' has no entry for them",
            "without r and lora_alpha the LoRA would load at the wrong scale",
        )
    extra = sorted(set(config) - set(components))
    if extra:
        fail(
            InvalidBundleError,
            f"metadata 'lora' describes {extra}, for which the bundle has no LoRA weights",
        )
    for component, keys in components.items():
        info = config[component]
        if info.rank_pattern:
            continue
        for key in keys:
            tensor, role = lora[key], lora_role(key)
            if tensor.dim() < 2 or role is None:
                continue
            rank = int(tensor.shape[0] if role == "down" else tensor.shape[1])
            if rank != info.r:
                fail(
                    InvalidBundleError,
                    f"LoRA tensor {key!r} has rank {rank} but metadata 'lora'[{component!r}] "
                    f"says r={info.r}",
                    "fix 'r' (or add a rank_pattern)",
                )


def check_contents(handles: Any, handles_2: Any, lora: Any, meta: BundleMetadata) -> None:
    """Raise :class:`InvalidBundleError` unless the tensors fit the (valid) metadata ``meta``."""
    sizes = meta.text_hidden_sizes
    rows = _check_handles("handles", handles, meta.tokens, sizes[0] if sizes else None)
    if not isinstance(handles_2, Mapping):
        fail(InvalidBundleError, f"handles_2 must be a dict, got {type(handles_2).__name__}")
    if handles_2:
        if sizes is not None and len(sizes) < 2:
            fail(
                InvalidBundleError,
                "the bundle has handles_2 tensors (second text encoder) but base_fingerprint "
                f"text_hidden_sizes {sizes} names only one text encoder",
            )
        width = sizes[1] if sizes and len(sizes) > 1 else None
        rows_2 = _check_handles("handles_2", handles_2, meta.tokens, width)
        for token in meta.tokens:
            if rows_2[token] != rows[token]:
                fail(
                    InvalidBundleError,
                    f"tensor 'handles_2.{token}' has {rows_2[token]} rows but "
                    f"'handles.{token}' has {rows[token]}; both text encoders need the same count",
                )
    _check_lora(lora, meta.lora)


def check_fits_pipeline(
    handles: Mapping[str, torch.Tensor],
    handles_2: Mapping[str, torch.Tensor],
    lora: Mapping[str, torch.Tensor],
    pipeline: Any,
) -> None:
    """Raise :class:`IncompatibleBaseError` unless the handle widths fit the pipeline's text
    encoders and every LoRA weight fits the module it targets (which must exist)."""
    for index, (attr, rows) in enumerate(
        (("text_encoder", handles), ("text_encoder_2", handles_2))
    ):
        if not rows:
            continue
        encoder = getattr(pipeline, attr, None)
        if encoder is None:
            fail(
                IncompatibleBaseError,
                f"the bundle has handles for text encoder {index + 1} but the pipeline has no "
                f"{attr}",
                _OTHER_BASE,
            )
        width = int(encoder.get_input_embeddings().weight.shape[-1])
        d = int(next(iter(rows.values())).shape[-1])
        if d != width:
            fail(
                IncompatibleBaseError,
                f"the bundle's handles are {d} wide but the pipeline's {attr} embeds tokens in "
                f"{width}",
                _OTHER_BASE,
            )
    if handles and not handles_2 and getattr(pipeline, "text_encoder_2", None) is not None:
        # The first encoder's width can match (SD1 and SDXL both start with CLIP ViT-L, 768),
        # but the second encoder would not know the tokens: the bundle would half-load.
        fail(
            IncompatibleBaseError,
            "the bundle has handles for one text encoder (an SD1/SD2 bundle) but the pipeline has "
            "two (SDXL); its handles would reach only the first",
            _OTHER_BASE,
        )
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in lora.items():
        component, rest = key.split(".", 1)
        if component not in modules:
            model = getattr(pipeline, component, None)
            if model is None:
                fail(
                    IncompatibleBaseError,
                    f"the bundle has LoRA weights for {component!r} but the pipeline has none",
                    _OTHER_BASE,
                )
            modules[component] = dict(model.named_modules())
        role = lora_role(rest)
        if role is None or ".lora" not in rest:
            continue
        module_name = rest[: rest.find(".lora")]
        named = modules[component]
        module = named.get(module_name)
        if module is None and module_name.startswith("text_model."):
            module = named.get(module_name.removeprefix("text_model."))
        if module is None:
            fail(
                IncompatibleBaseError,
                f"LoRA weight {key!r} targets {component}.{module_name}, which the pipeline "
                "does not have",
                _OTHER_BASE,
            )
        if tensor.dim() < 2:
            continue
        side, axis, prefix = ("input", 1, "in") if role == "down" else ("output", 0, "out")
        want = getattr(module, f"{prefix}_features", getattr(module, f"{prefix}_channels", None))
        if want is not None and tensor.shape[axis] != want:
            fail(
                IncompatibleBaseError,
                f"LoRA weight {key!r} expects {side} size {int(tensor.shape[axis])} but the "
                f"pipeline's {component}.{module_name} has {want}",
                _OTHER_BASE,
            )
