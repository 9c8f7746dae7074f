"""The toy Stable Diffusion pipeline: its architecture, and the weights shipped with the package.

A real ``StableDiffusionPipeline`` (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel``,
``CLIPTokenizer``, ``DDIMScheduler``) small enough to train from scratch on 2 CPU cores in 80
minutes (see :mod:`diffusers_breakscene.toy.train_base`), trained on the toy world
(:mod:`diffusers_breakscene.toy.world`):

* 64x64 px images; the VAE downsamples by 2, so the latent is 32x32x4;
* a UNet with three levels (32, 16, 8) and cross-attention on the 16 and 8 levels, in down and up
  blocks: the Break-A-Scene attention loss uses latent/4 = 8x8 (``down_blocks.2`` and
  ``up_blocks.0``), found by :func:`diffusers_breakscene.attention.cross_attention_levels`;
* a 2-layer CLIP text encoder (width 64) and a tokenizer in which every world word (and every
  word of :data:`diffusers_breakscene.tiny.TINY_WORDS`) is one token;
* v-prediction on Stable Diffusion's ``scaled_linear`` beta schedule rescaled to zero terminal
  SNR, DDIM with ``"trailing"`` timesteps (:func:`build_scheduler`).

Example:
    >>> from diffusers_breakscene.toy.model import toy_pipeline
    >>> pipe = toy_pipeline()
    >>> pipe("a photo of a red circle on the beach", num_inference_steps=2, height=64,
    ...      width=64).images[0].size
    (64, 64)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..tiny import TINY_WORDS, sd_scheduler, tiny_tokenizer
from .world import DEFAULT_SIZE, WORLD_WORDS

__all__ = [
    "TOY_GUIDANCE",
    "TOY_MODEL_DIR",
    "TOY_RESOLUTION",
    "TOY_WORDS",
    "UNET_CHANNELS",
    "UNET_LAYERS",
    "build_scheduler",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "toy_model_path",
    "toy_pipeline",
    "toy_tokenizer",
]

#: Folder of the shipped weights (``save_pretrained`` layout).
TOY_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "toy"

#: Classifier-free guidance scale the toy experiments and the demo generate with. Chosen by
#: measurement (``benchmarks/toy_model.py --seed 1``, 200 unseen prompts, shipped weights): shape
#: right in one-object prompts 0.65 at 3, 0.74 at 5, 0.66 at 7.5 (SD's usual value); 50 DDIM
#: steps instead of 25 changed nothing (0.74). The reported numbers use seed 0's prompts.
TOY_GUIDANCE: float = 5.0

#: Image size the toy pipeline is trained at.
TOY_RESOLUTION: int = DEFAULT_SIZE

#: Single-token words of the toy tokenizer: the tiny pipelines' words plus the world's words.
TOY_WORDS: tuple[str, ...] = tuple(dict.fromkeys(TINY_WORDS + WORLD_WORDS))

TEXT_WIDTH = 64


def toy_model_path() -> Path:
    """The folder of the shipped toy pipeline; raises ``FileNotFoundError`` if it is missing.

    Example:
        >>> toy_model_path().name
        'toy'
    """
    if not (TOY_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy pipeline is not in {TOY_MODEL_DIR}; train it with "
            f"`python -m diffusers_breakscene.toy.train_base --output {TOY_MODEL_DIR}`."
        )
    return TOY_MODEL_DIR


def toy_tokenizer() -> Any:
    """The toy ``CLIPTokenizer`` (every word of :data:`TOY_WORDS` is one token).

    Example:
        >>> len(toy_tokenizer()("a photo of a red striped star").input_ids)  # start, 7, end
        9
    """
    return tiny_tokenizer(TOY_WORDS)


def build_vae() -> Any:
    """A fresh ``AutoencoderKL`` that downsamples by 2 (64x64x3 -> 32x32x4), random weights.

    Example:
        >>> tuple(build_vae().config.block_out_channels)
        (16, 32)
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TOY_RESOLUTION,
        mid_block_add_attention=False,
    )


#: The shipped UNet's channels per level (32x32, 16x16, 8x8) and layers per level.
UNET_CHANNELS: tuple[int, int, int] = (32, 64, 96)
UNET_LAYERS: tuple[int, int, int] = (1, 1, 1)


def build_unet(
    block_out_channels: tuple[int, int, int] = UNET_CHANNELS,
    layers_per_block: tuple[int, int, int] = UNET_LAYERS,
) -> Any:
    """A fresh ``UNet2DConditionModel``: levels 32/16/8, cross-attention on 16 and 8 (random).

    Args:
        block_out_channels: channels of the 32x32, 16x16 and 8x8 levels (multiples of 16).
        layers_per_block: ResNet (+ transformer) layers of each level's down block; the up blocks
            get one more, as in diffusers.

    Example:
        >>> from diffusers_breakscene.attention import cross_attention_levels
        >>> sorted(set(cross_attention_levels(build_unet()).values()))
        [('down', 2), ('down', 4), ('mid', 4), ('up', 2), ('up', 4)]
        >>> build_unet(layers_per_block=(1, 2, 2)).config.layers_per_block
        [1, 2, 2]
    """
    from diffusers import UNet2DConditionModel

    channels, layers = tuple(block_out_channels), tuple(layers_per_block)
    if len(channels) != 3 or any(c <= 0 or c % 16 for c in channels):
        raise ValueError(
            f"block_out_channels={channels!r}: give three positive multiples of 16 (one per level "
            "32x32, 16x16, 8x8), e.g. (32, 64, 96)."
        )
    if len(layers) != 3 or any(n < 1 for n in layers):
        raise ValueError(
            f"layers_per_block={layers!r}: give three counts >= 1 (one per level), e.g. (1, 2, 2)."
        )
    return UNet2DConditionModel(
        sample_size=TOY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        # diffusers takes one int or one per block; an int keeps the shipped config unchanged.
        layers_per_block=layers[0] if len(set(layers)) == 1 else list(layers),
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size: int) -> Any:
    """A fresh 2-layer ``CLIPTextModel`` of width 64 for a vocabulary of ``vocab_size``.

    Example:
        >>> build_text_encoder(len(toy_tokenizer())).config.hidden_size
        64
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = toy_tokenizer()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=TEXT_WIDTH,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )


def build_scheduler(prediction_type: str = "v_prediction", zero_terminal_snr: bool = True) -> Any:
    """The sampling scheduler saved with the pipeline: DDIM on SD's ``scaled_linear`` betas,
    by default rescaled to zero terminal SNR with ``"trailing"`` timesteps and v-prediction
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), so that the
    text, not the starting noise, picks a flat background's colour.

    Example:
        >>> s = build_scheduler()
        >>> s.config.prediction_type, s.config.rescale_betas_zero_snr, s.config.timestep_spacing
        ('v_prediction', True, 'trailing')
    """
    from diffusers import DDIMScheduler

    scheduler = sd_scheduler(prediction_type)
    if not zero_terminal_snr:
        return scheduler
    return DDIMScheduler.from_config(
        scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )


def toy_pipeline(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """The trained toy ``StableDiffusionPipeline`` (from :data:`TOY_MODEL_DIR` unless ``path``).

    Example:
        >>> pipe = toy_pipeline()
        >>> type(pipe).__name__
        'StableDiffusionPipeline'
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else toy_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, dtype=dtype or torch.float32
    )
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
