"""Text conditioning of a training step, for one text encoder (SD1/SD2) or two (SDXL).

SD1/SD2 condition the UNet on the text encoder's last hidden state. SDXL conditions it as
``StableDiffusionXLPipeline.encode_prompt`` does: the penultimate hidden states of both
encoders, concatenated, plus two *added conditions*: the second encoder's pooled projection and
six *time ids* (original size, crop top-left corner, target size), which tell the UNet how the
training picture was resized and cut (Podell et al. 2023, section 2.2).

Example:
    >>> import torch
    >>> from diffusers_breakscene.conditioning import TextConditioning, encode_text, time_ids
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> text = TextConditioning.from_pipeline(tiny_pipeline("sdxl"))
    >>> ids = text.tokenize(["a dog"])
    >>> hidden, added = encode_text(text.text_encoders, ids, time_ids([(64, 64, 0, 0, 64, 64)]))
    >>> tuple(hidden.shape[-1:]), sorted(added)  # 32 + 48 wide: both encoders
    ((80,), ['text_embeds', 'time_ids'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TextConditioning", "crop_time_ids", "encode_text", "time_ids", "tokenize"]


def crop_time_ids(
    original_size: tuple[int, int],
    resized_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    resolution: int,
    flipped: bool = False,
) -> tuple[int, ...]:
    """SDXL's six time ids of one training picture: ``(orig_h, orig_w, top, left, res, res)``.

    ``original_size`` is the photo's ``(height, width)`` before resizing, ``resized_size`` its
    size after the resize, ``crop_top_left`` the ``(top, left)`` corner of the square window
    cut from the resized photo. A mirrored picture's window is mirrored too: its left edge is
    ``resized_width - left - resolution``. (diffusers' SDXL text-to-image script writes
    ``width - left`` there, which is not where the mirrored window starts.)

    Example:
        >>> crop_time_ids((600, 800), (512, 683), (0, 100), 512)
        (600, 800, 0, 100, 512, 512)
        >>> crop_time_ids((600, 800), (512, 683), (0, 100), 512, flipped=True)
        (600, 800, 0, 71, 512, 512)
    """
    top, left = crop_top_left
    if flipped:
        left = resized_size[1] - left - resolution
    return (*original_size, top, left, resolution, resolution)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``(n, L)`` input ids of ``prompts``, padded (and cut) to the tokenizer's maximum length,
    as the pipelines and the training step feed the text encoders.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_tokenizer
        >>> tokenize(tiny_tokenizer(), ["a dog", "a cat"]).shape
        torch.Size([2, 77])
    """
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def time_ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(n, 6)`` float32 tensor of time-id rows (see :func:`crop_time_ids`).

    Example:
        >>> time_ids([(64, 64, 0, 0, 64, 64)]).shape
        torch.Size([1, 6])
    """
    return torch.tensor([list(row) for row in rows], dtype=torch.float32).reshape(-1, 6)


@dataclass(frozen=True)
class TextConditioning:
    """The tokenizers and text encoders that condition a pipeline's UNet, in the pipeline's
    order: ``(tokenizer,)`` for SD1/SD2, ``(tokenizer, tokenizer_2)`` for SDXL.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> TextConditioning.from_pipeline(tiny_pipeline("sd1")).is_sdxl
        False
    """

    tokenizers: tuple[Any, ...]
    text_encoders: tuple[Any, ...]

    @classmethod
    def from_pipeline(cls, pipe: Any) -> TextConditioning:
        """The pipeline's tokenizer(s) and text encoder(s); a second pair counts when both of
        its parts are there (SDXL)."""
        tokenizers, encoders = [pipe.tokenizer], [pipe.text_encoder]
        second = getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)
        if all(part is not None for part in second):
            tokenizers.append(second[0])
            encoders.append(second[1])
        return cls(tuple(tokenizers), tuple(encoders))

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders: SDXL's conditioning (concatenated states, pooled text, time ids)."""
        return len(self.text_encoders) == 2

    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """:func:`tokenize` ``(prompts)`` for each tokenizer."""
        return [tokenize(tok, prompts) for tok in self.tokenizers]


def encode_text(
    text_encoders: Sequence[Any],
    input_ids: Sequence[torch.Tensor],
    time_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``(encoder_hidden_states, added_cond_kwargs)`` for the UNet, from one text encoder
    (SD1/SD2: ``added_cond_kwargs`` is ``None``) or two (SDXL: ``time_ids`` is needed, an
    ``(n, 6)`` tensor from :func:`time_ids`).

    ``input_ids`` holds one ``(n, L)`` tensor per encoder (:meth:`TextConditioning.tokenize`),
    on the encoders' device.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> pipe = tiny_pipeline("sd1")
        >>> ids = TextConditioning.from_pipeline(pipe).tokenize(["a dog"])
        >>> hidden, added = encode_text([pipe.text_encoder], ids)
        >>> tuple(hidden.shape), added
        ((1, 77, 32), None)
    """
    if len(text_encoders) != len(input_ids):
        raise ValueError(f"{len(text_encoders)} text encoders but {len(input_ids)} id tensors.")
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0])[0], None
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (original size, crop, target size).")
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        out = encoder(ids, output_hidden_states=True)
        # As StableDiffusionXLPipeline.encode_prompt: the penultimate layer of each encoder;
        # the pooled projection comes from the encoder that has one (the second).
        states.append(out.hidden_states[-2])
        if out[0].ndim == 2:
            pooled = out[0]
    hidden = torch.cat(states, dim=-1)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids.to(hidden.device, hidden.dtype)}
