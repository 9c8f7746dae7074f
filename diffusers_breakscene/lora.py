"""Phase two's PEFT LoRA: build the config, attach it, export it in the diffusers layout.

Break-A-Scene fine-tunes the whole UNet in phase two. Here a LoRA takes its place by default, so
the result is a few MB instead of a model copy. The paper's authors report that a small
parameter-efficient variant (Custom Diffusion) was too weak for them, so the default was chosen
by measurement (``benchmarks/defaults_search.py``, docs/fidelity.md): rank 16 on the attention
projections of every transformer block, 6.6 MB for SD2.1, level with the paper's recipe within
the toy world's noise (see :class:`~diffusers_breakscene.BreakASceneConfig` and
docs/training.md). ``phase2="full"`` keeps the paper's full fine-tuning as a reference mode.

Example:
    >>> from diffusers_breakscene.lora import add_unet_lora, lora_state_dict
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("sd1")
    >>> params = add_unet_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_v"])
    >>> sd = lora_state_dict(unet=pipe.unet)
    >>> next(iter(sd)).startswith("unet.")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import DEFAULT_LORA_RANK, DEFAULT_LORA_TARGET_MODULES
from .errors import InvalidConfigError

__all__ = [
    "ADAPTER_NAME",
    "add_text_encoder_lora",
    "add_unet_lora",
    "lora_metadata",
    "lora_state_dict",
]

#: Adapter name used while training (loading a bundle uses its own names).
ADAPTER_NAME = "break_a_scene"


def _lora_config(rank: int, alpha: float, target_modules: Sequence[str], dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def _add(model: Any, config: Any, what: str) -> list[torch.nn.Parameter]:
    try:
        if hasattr(model, "set_adapters"):  # diffusers models: their PEFT integration
            model.add_adapter(config, adapter_name=ADAPTER_NAME)
        else:
            # transformers 5's own add_adapter needs peft >= 0.22; peft's injection works with
            # every supported peft and yields the same layers and state-dict keys.
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise InvalidConfigError(
            f"The {what} LoRA target_modules={sorted(config.target_modules)} match no layer of "
            f"the {what} ({error}); use module names such as 'to_q', 'to_k', 'to_v', 'to_out.0', "
            "'ff.net.0.proj', 'ff.net.2', 'proj_in', 'proj_out' (UNet) or 'q_proj', 'k_proj', "
            "'v_proj', 'out_proj' (text encoder)."
        ) from None
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for param in params:
        param.requires_grad_(True)
    # Trainable weights in float32 under mixed precision; frozen weights keep their dtype.
    from diffusers.training_utils import cast_training_params

    cast_training_params(model, dtype=torch.float32)
    return params


def add_unet_lora(
    unet: Any,
    rank: int = DEFAULT_LORA_RANK,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGET_MODULES,
    dropout: float = 0.0,
) -> list[torch.nn.Parameter]:
    """Attach a trainable PEFT LoRA to ``unet``; returns its parameters (float32).

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> unet = tiny_pipeline("sd1").unet
        >>> len(add_unet_lora(unet, rank=4, target_modules=["to_k"])) > 0
        True
    """
    return _add(unet, _lora_config(rank, alpha or rank, target_modules, dropout), "UNet")


def add_text_encoder_lora(
    text_encoder: Any,
    rank: int = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj"),
    dropout: float = 0.0,
) -> list[torch.nn.Parameter]:
    """Attach a trainable PEFT LoRA (alpha = rank) to a CLIP text encoder; returns its params.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> te = tiny_pipeline("sd1").text_encoder
        >>> len(add_text_encoder_lora(te, rank=2)) > 0
        True
    """
    return _add(text_encoder, _lora_config(rank, rank, target_modules, dropout), "text encoder")


def _diffusers_layout(model: Any) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {
        k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()
    }


def lora_state_dict(unet: Any = None, text_encoder: Any = None) -> dict[str, torch.Tensor]:
    """The trained LoRA weights as ``{"unet.<key>": t, "text_encoder.<key>": t}``.

    The layout is the one ``StableDiffusionPipeline.load_lora_weights(state_dict)`` reads.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> unet = tiny_pipeline("sd1").unet
        >>> _ = add_unet_lora(unet, rank=2, target_modules=["to_q"])
        >>> sorted(lora_state_dict(unet=unet))[0]
        'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight'
    """
    out: dict[str, torch.Tensor] = {}
    if unet is not None and ADAPTER_NAME in getattr(unet, "peft_config", {}):
        out.update({f"unet.{k}": v for k, v in _diffusers_layout(unet).items()})
    if text_encoder is not None and ADAPTER_NAME in getattr(text_encoder, "peft_config", {}):
        for key, value in _diffusers_layout(text_encoder).items():
            # transformers 5 dropped CLIPTextModel.text_model; LoRA files keep the classic
            # "text_model." keys, which diffusers maps onto either transformers version.
            if not key.startswith("text_model."):
                key = f"text_model.{key}"
            out[f"text_encoder.{key}"] = value
    return out


def lora_metadata(model: Any) -> dict[str, Any]:
    """``{"r", "lora_alpha", "target_modules"}`` of the training adapter on ``model``.

    Kept to these three keys so that older peft versions can read them back.

    Example:
        >>> from diffusers_breakscene.tiny import tiny_pipeline
        >>> unet = tiny_pipeline("sd1").unet
        >>> _ = add_unet_lora(unet, rank=2, alpha=4, target_modules=["to_q"])
        >>> lora_metadata(unet)
        {'r': 2, 'lora_alpha': 4, 'target_modules': ['to_q']}
    """
    config = model.peft_config[ADAPTER_NAME]
    return {
        "r": int(config.r),
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
    }
