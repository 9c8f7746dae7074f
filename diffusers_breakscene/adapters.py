"""PEFT adapters of a pipeline, as the bundle loader needs them: which are active, their
per-layer strengths, and exact fusing.

diffusers' ``set_adapters(names, weights)`` both picks the active adapters and rescales every
adapter it names, and loading a new adapter makes it the only active one. A bundle must join the
adapters the user has active without touching their strengths (which may differ per block), so
:func:`activate` snapshots the strengths of the adapters it keeps, activates, and writes them
back. ``fuse_lora`` / ``unfuse_lora`` add and subtract the LoRA delta, which does not give the
original weights back bit for bit; :class:`FuseBackups` keeps the pristine weights of the layers
it fuses so that unfusing is exact.

Example:
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> active_adapters(tiny_pipeline("sd1"))
    []
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "FuseBackups",
    "activate",
    "active_adapters",
    "adapter_names",
    "lora_layers",
    "merged_adapters",
]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _tuner_layers(pipe: Any) -> Iterator[tuple[str, Any]]:
    """``("component.module", layer)`` for every PEFT LoRA layer of the pipeline."""
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                yield f"{component}.{name}", module


def lora_layers(pipe: Any, components: Iterable[str]) -> dict[str, Any]:
    """``{"component.module": layer}`` of the LoRA layers in ``components``."""
    wanted = tuple(f"{c}." for c in components)
    return {key: layer for key, layer in _tuner_layers(pipe) if key.startswith(wanted)}


def adapter_names(pipe: Any) -> set[str]:
    """Every PEFT adapter loaded into any component of ``pipe``."""
    names: set[str] = set()
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        names |= set(getattr(model, "peft_config", None) or {})
    return names


def active_adapters(pipe: Any) -> list[str]:
    """The adapters active in any LoRA layer, in the order first seen (diffusers'
    ``get_active_adapters`` looks at the first layer only)."""
    seen: dict[str, None] = {}
    for _, layer in _tuner_layers(pipe):
        for name in layer.active_adapters:
            seen.setdefault(name, None)
    return list(seen)


def merged_adapters(pipe: Any) -> set[str]:
    """Adapters fused (merged) into at least one layer."""
    merged: set[str] = set()
    for _, layer in _tuner_layers(pipe):
        merged |= set(getattr(layer, "merged_adapters", ()))
    return merged


def _strengths(pipe: Any, names: Iterable[str]) -> dict[tuple[str, str], float]:
    keep = set(names)
    return {
        (key, name): layer.scaling[name]
        for key, layer in _tuner_layers(pipe)
        for name in keep
        if name in layer.scaling
    }


def activate(pipe: Any, names: list[str], new_weights: Mapping[str, float]) -> None:
    """Make exactly ``names`` the active adapters. Adapters in ``new_weights`` get that weight
    (diffusers' ``set_adapters`` meaning); every other adapter keeps the per-layer strength it
    had, e.g. one the user set with ``pipe.set_adapters``.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> activate(tiny_pipeline("sd1"), [], {})  # no adapters: nothing to do
    """
    present = adapter_names(pipe)
    names = [n for n in dict.fromkeys(names) if n in present]
    if not names:
        return
    kept = _strengths(pipe, [n for n in names if n not in new_weights])
    pipe.set_adapters(names, adapter_weights=[float(new_weights.get(n, 1.0)) for n in names])
    layers = dict(_tuner_layers(pipe))
    for (key, name), value in kept.items():
        layers[key].scaling[name] = value


class FuseBackups:
    """Pristine weights of fused layers (on the CPU), for an exact unfuse.

    Example:
        >>> backups = FuseBackups()
        >>> backups.components()
        []
    """

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def components(self) -> list[str]:
        """The pipeline components that hold backed-up layers."""
        return sorted({key.split(".", 1)[0] for key in self.weights})

    def fuse(self, pipe: Any, name: str, components: list[str]) -> None:
        """Back up the layers ``name`` changes, then fuse it (at its current strength)."""
        for key, layer in lora_layers(pipe, components).items():
            if name in layer.lora_A and key not in self.weights:
                self.weights[key] = layer.base_layer.weight.detach().to("cpu", copy=True)
        # The adapter's strength is already in the layers' scaling (set_adapters); fuse_lora's
        # lora_scale would multiply it again, and that of every other active adapter too.
        pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=[name])

    def unfuse_all(self, pipe: Any) -> None:
        """Unfuse every fused adapter of the backed-up components and write the pristine
        weights back (``unfuse_lora`` alone leaves float rounding behind)."""
        components = self.components()
        if not components:
            return
        # diffusers' own method: the pipeline's instance may wrap unfuse_lora to call this one
        type(pipe).unfuse_lora(pipe, components=components)
        layers = lora_layers(pipe, components)
        with torch.no_grad():
            for key, weight in self.weights.items():
                if key in layers:  # gone if the user unloaded the LoRA layers
                    target = layers[key].base_layer.weight
                    target.copy_(weight.to(target.device, target.dtype))
        self.weights.clear()
