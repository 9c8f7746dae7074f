"""Recording cross-attention maps on the few UNet layers that Break-A-Scene needs.

:class:`AttentionStore` swaps in a recording processor on the cross-attention layers of ONE UNet
level (by default the level whose query grid is latent / 4: 16x16 for 512 px SD1/SD2) and leaves
every other processor object exactly as the user configured it (SDPA, xformers, a custom one).
The recording processor computes the attention probabilities explicitly, so it returns the same
output as ``AttnProcessor2_0``, runs the projections through the module calls (PEFT LoRA applies),
and keeps the head-averaged probabilities with their autograd graph.

Two kinds of record are kept:

* the latest forward pass, per layer, with gradients (training). A layer that runs again, as
  gradient checkpointing does during backward, overwrites its own entry: nothing is counted twice.
* a running sum over the forward passes made without gradients (generation), detached, so a
  picture of where each token attends over a whole sampling run costs one map per recorded layer.

Example:
    >>> import torch
    >>> from diffusers_breakscene import AttentionStore
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("sd1")
    >>> with AttentionStore.attach(pipe.unet) as store:
    ...     _ = pipe("a photo of a dog", num_inference_steps=2, height=128, width=128)
    ...     maps = store.aggregate(part="cond", over_steps=True)
    >>> tuple(maps.shape)  # (batch, latent_h / 4, latent_w / 4, text length)
    (1, 4, 4, 77)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch

__all__ = ["AttentionStore", "cross_attention_levels"]

Place = Literal["down", "mid", "up"]
Part = Literal["all", "cond", "uncond"]


def _unet_of(model: Any) -> torch.nn.Module:
    """The UNet of a pipeline, or the model itself; unwraps DDP/compile wrappers."""
    unet = getattr(model, "unet", model)
    unet = getattr(unet, "module", unet)  # DistributedDataParallel
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(
            f"AttentionStore.attach needs a diffusers UNet (or a pipeline with a .unet), got "
            f"{type(model).__name__}."
        )
    return unet


def cross_attention_levels(unet: Any) -> dict[str, tuple[Place, int]]:
    """Map each cross-attention processor name of ``unet`` to its place and downsampling factor.

    The factor is read from the block structure (a down block with downsamplers halves the grid
    for the blocks after it, an up block with upsamplers doubles it), so it holds for any input
    resolution and for the SD1, SD2 and SDXL layouts.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> levels = cross_attention_levels(tiny_pipeline("sd1").unet)
        >>> levels["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"]
        ('down', 4)
    """
    unet = _unet_of(unet)
    prefixes: list[tuple[str, Place, int]] = []
    factor = 1
    for i, block in enumerate(unet.down_blocks):
        prefixes.append((f"down_blocks.{i}.", "down", factor))
        if getattr(block, "downsamplers", None):
            factor *= 2
    prefixes.append(("mid_block.", "mid", factor))
    for i, block in enumerate(unet.up_blocks):
        prefixes.append((f"up_blocks.{i}.", "up", factor))
        if getattr(block, "upsamplers", None):
            factor //= 2

    levels: dict[str, tuple[Place, int]] = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if not getattr(module, "is_cross_attention", False):
            continue
        for prefix, place, level in prefixes:
            if name.startswith(prefix):
                levels[name] = (place, level)
                break
    return levels


def _grid(latent_size: int, factor: int) -> int:
    # diffusers' downsamplers are stride-2 convolutions with padding 1: ceil(n / 2) per level.
    for _ in range(int(math.log2(factor))):
        latent_size = (latent_size + 1) // 2
    return latent_size


class _RecordingProcessor:
    """Cross-attention with explicit softmax that hands the head-averaged probabilities to a store.

    Mirrors ``AttnProcessor2_0`` step by step (norms, projections, masks, residual, rescale), with
    ``Attention.get_attention_scores`` in place of the fused kernel. A plain object, not an
    ``nn.Module``: nothing of it enters ``unet.state_dict()``.
    """

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store = store
        self.name = name

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
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

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

        # [B*H, S, D/H], batch-major: row b*H + h is head h of sample b.
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        probs = attn.get_attention_scores(query, key, attention_mask)
        heads = probs.shape[0] // batch_size
        self.store._record(self.name, probs.view(batch_size, heads, *probs.shape[1:]).mean(dim=1))

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionStore:
    """Records cross-attention probabilities of one UNet level; see the module docstring.

    Create it with :meth:`attach`, read it with :meth:`aggregate`, and give the UNet its original
    processors back with :meth:`detach` (or use it as a context manager).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> unet = tiny_pipeline("sd1").unet
        >>> before = unet.attn_processors
        >>> store = AttentionStore.attach(unet)
        >>> store.layers[0]
        'down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor'
        >>> store.detach()
        >>> all(unet.attn_processors[k] is v for k, v in before.items())
        True
    """

    def __init__(self) -> None:
        # Use AttentionStore.attach(); a bare store records nothing.
        self.layers: list[str] = []
        self.factor: int = 0
        self._unet: torch.nn.Module | None = None
        self._original: dict[str, Any] = {}
        self._hook: Any = None
        self._latent_hw: tuple[int, int] | None = None
        self._latest: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @classmethod
    def attach(
        cls,
        unet: Any,
        places: Iterable[Place] = ("down", "up"),
        resolution_divisor: int = 4,
    ) -> AttentionStore:
        """Record the cross-attention of ``unet`` (or ``pipeline.unet``) at latent / divisor.

        Only the processors of the cross-attention layers at that level, in ``places`` (any of
        ``"down"``, ``"mid"``, ``"up"``), are replaced. A UNet without such a level gets the nearest
        level it has (ties go to the coarser one), with a warning that says which.

        Example:
            >>> from diffusers_breakscene.tiny import tiny_pipeline
            >>> store = AttentionStore.attach(tiny_pipeline("sd2"), places=("up",))
            >>> [name.split(".attentions")[0] for name in store.layers]
            ['up_blocks.1', 'up_blocks.1']
            >>> store.detach()
        """
        places = tuple(places)
        unknown = [p for p in places if p not in ("down", "mid", "up")]
        if unknown or not places:
            raise ValueError(
                f"places={places!r} must be a non-empty subset of ('down', 'mid', 'up')."
            )
        if (
            not isinstance(resolution_divisor, int)
            or resolution_divisor < 1
            or resolution_divisor & (resolution_divisor - 1)
        ):
            raise ValueError(
                f"resolution_divisor={resolution_divisor!r} must be a power of two "
                "(1, 2, 4, 8, ...)."
            )
        module = _unet_of(unet)
        current = module.attn_processors
        if any(isinstance(p, _RecordingProcessor) for p in current.values()):
            raise RuntimeError(
                "This UNet already has an AttentionStore attached; call detach() on it first."
            )
        candidates = {
            name: factor
            for name, (place, factor) in cross_attention_levels(module).items()
            if place in places
        }
        if not candidates:
            raise ValueError(f"The UNet has no cross-attention layers in places={places!r}.")
        available = sorted(set(candidates.values()))
        if resolution_divisor in available:
            factor = resolution_divisor
        else:
            factor = min(
                available,
                key=lambda f: (abs(math.log2(f) - math.log2(resolution_divisor)), -f),
            )
            warnings.warn(
                f"The UNet has no cross-attention at latent/{resolution_divisor} in "
                f"places={places!r} (levels: {[f'latent/{f}' for f in available]}); recording "
                f"the nearest level, latent/{factor}, instead.",
                UserWarning,
                stacklevel=2,
            )

        store = cls()
        store.factor = factor
        store.layers = [name for name, f in candidates.items() if f == factor]
        store._unet = module
        store._original = dict(current)
        replacement = dict(current)
        for name in store.layers:
            replacement[name] = _RecordingProcessor(store, name)
        module.set_attn_processor(replacement)
        store._hook = module.register_forward_pre_hook(store._on_unet_forward, with_kwargs=True)
        return store

    # -- recording ---------------------------------------------------------------------------

    def _on_unet_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _record(self, name: str, maps: torch.Tensor) -> None:
        self._latest[name] = maps
        if torch.is_grad_enabled():
            return
        previous = self._sums.get(name)
        if previous is not None and previous.shape != maps.shape:
            # A new generation with another batch or size: start the running sums again.
            self._sums.clear()
            self._counts.clear()
            previous = None
        summed = maps.detach().float()
        self._sums[name] = summed if previous is None else previous + summed
        self._counts[name] = self._counts.get(name, 0) + 1

    # -- reading -----------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the recording processors are installed."""
        return self._unet is not None

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the recorded maps (latest pass plus running sums)."""
        tensors = list(self._latest.values()) + list(self._sums.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_steps(self) -> int:
        """How many forward passes without gradients the running sums hold."""
        return max(self._counts.values(), default=0)

    def aggregate(self, part: Part = "all", over_steps: bool = False) -> torch.Tensor:
        """Average the recorded maps over layers: a ``(batch, h, w, seq_len)`` float32 tensor.

        ``part="cond"`` keeps the conditional (second) half of a classifier-free-guidance batch,
        ``"uncond"`` the first half. ``over_steps=True`` averages the no-gradient passes recorded
        since the last :meth:`reset` (a generation) instead of using the latest pass, which keeps
        its autograd graph.

        Example:
            >>> import torch
            >>> from diffusers_breakscene.tiny import tiny_pipeline
            >>> pipe = tiny_pipeline("sd1")
            >>> store = AttentionStore.attach(pipe.unet)
            >>> latents = torch.randn(2, 4, 32, 32)
            >>> text = torch.randn(2, 77, 32)
            >>> _ = pipe.unet(latents, 10, encoder_hidden_states=text)
            >>> store.aggregate().shape
            torch.Size([2, 8, 8, 77])
            >>> store.detach()
        """
        if part not in ("all", "cond", "uncond"):
            raise ValueError(f"part={part!r} must be 'all', 'cond' or 'uncond'.")
        if over_steps:
            records = [self._sums[n] / self._counts[n] for n in self.layers if n in self._sums]
        else:
            records = [self._latest[n] for n in self.layers if n in self._latest]
        if not records:
            what = "no forward pass without gradients" if over_steps else "no forward pass"
            raise RuntimeError(
                f"The AttentionStore has recorded {what} yet: run the UNet (or the pipeline) "
                "after attach() and before aggregate()."
            )
        maps = torch.stack([r.float() for r in records]).mean(dim=0)  # (B, h*w, S)
        batch = maps.shape[0]
        if part != "all":
            if batch % 2:
                raise ValueError(
                    f"part={part!r} needs a classifier-free-guidance batch of even size, "
                    f"got {batch}."
                )
            maps = maps[batch // 2 :] if part == "cond" else maps[: batch // 2]
        height, width = self._map_size(maps.shape[1])
        return maps.reshape(maps.shape[0], height, width, maps.shape[-1])

    def _map_size(self, queries: int) -> tuple[int, int]:
        if self._latent_hw is not None:
            height, width = (_grid(n, self.factor) for n in self._latent_hw)
            if height * width == queries:
                return height, width
        side = math.isqrt(queries)
        if side * side != queries:
            raise RuntimeError(
                f"Cannot tell the map size of {queries} queries: run the UNet through its forward "
                "method so the store sees the latent size."
            )
        return side, side

    def reset(self) -> None:
        """Forget everything recorded (latest maps and running sums)."""
        self._latest.clear()
        self._sums.clear()
        self._counts.clear()

    def detach(self) -> None:
        """Put the original processor objects back (the same objects, not copies) and reset."""
        if self._unet is None:
            return
        self._unet.set_attn_processor(dict(self._original))
        self._hook.remove()
        self._unet = None
        self._hook = None
        self._original = {}
        self.reset()

    def __enter__(self) -> AttentionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"AttentionStore({state}, latent/{self.factor}, {len(self.layers)} layers)"
