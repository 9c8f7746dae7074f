"""The reference implementation's attention capture, rebuilt as a benchmark baseline.

google/break-a-scene replaces EVERY attention processor of the UNet (self and cross, all levels)
with an explicit-softmax processor and, prompt-to-prompt style, keeps every per-head probability
map whose query grid is at most 32x32 (``attn.shape[1] <= 32 ** 2``) with its autograd graph. The
attention loss then averages the cross-attention maps of the latent/4 level over layers and heads.

:class:`ReferenceCaptureStore` does the same on current diffusers. It has the two methods
``training_step`` uses (``reset`` and ``aggregate``), so the benchmark can run the very same step
with either store. It is a baseline only: nothing of the library uses it.
"""

from __future__ import annotations

from typing import Any

import torch


class _ExplicitSoftmaxProcessor:
    """Plain ``AttnProcessor`` math (explicit softmax), handing the probabilities to the store."""

    def __init__(self, store: ReferenceCaptureStore, name: str, is_cross: bool) -> None:
        self.store = store
        self.name = name
        self.is_cross = is_cross

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store._record(self.name, self.is_cross, probs, batch_size)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ReferenceCaptureStore:
    """Every processor replaced (32 in SD1.5's UNet, 140 in SDXL's); every map with <= 32*32
    queries kept (all heads, with grad)."""

    MAX_QUERIES = 32**2

    def __init__(self) -> None:
        self._unet: Any = None
        self._original: dict[str, Any] = {}
        self._hook: Any = None
        self._latent: int = 0
        self.maps: list[tuple[str, bool, int, torch.Tensor]] = []

    @classmethod
    def attach(cls, unet: Any) -> ReferenceCaptureStore:
        store = cls()
        store._unet = unet
        store._original = dict(unet.attn_processors)
        replacement = {}
        for name in store._original:
            module = unet.get_submodule(name.removesuffix(".processor"))
            replacement[name] = _ExplicitSoftmaxProcessor(
                store, name, bool(getattr(module, "is_cross_attention", False))
            )
        unet.set_attn_processor(replacement)
        store._hook = unet.register_forward_pre_hook(store._on_forward, with_kwargs=True)
        return store

    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self._latent = int(sample.shape[-1])

    def _record(self, name: str, is_cross: bool, probs: torch.Tensor, batch: int) -> None:
        if probs.shape[1] <= self.MAX_QUERIES:
            self.maps.append((name, is_cross, batch, probs))

    @property
    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for *_, p in self.maps)

    def reset(self) -> None:
        self.maps = []

    def aggregate(self, divisor: int = 4) -> torch.Tensor:
        """Cross maps of the latent/``divisor`` grid, down and up blocks, mean over layers and
        heads: ``(batch, h, w, seq)`` like :meth:`AttentionStore.aggregate`."""
        side = -(-self._latent // divisor)
        picked = []
        for name, is_cross, batch, probs in self.maps:
            if is_cross and not name.startswith("mid_block") and probs.shape[1] == side * side:
                heads = probs.shape[0] // batch
                picked.append(probs.view(batch, heads, *probs.shape[1:]).mean(dim=1))
        maps = torch.stack(picked).float().mean(dim=0)
        return maps.reshape(maps.shape[0], side, side, maps.shape[-1])

    def detach(self) -> None:
        if self._unet is not None:
            self._unet.set_attn_processor(dict(self._original))
            self._hook.remove()
            self._unet = None
        self.reset()
