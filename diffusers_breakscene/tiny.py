"""Tiny SD-family pipelines with random weights, built offline.

They have the real architectures (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
a real ``CLIPTokenizer``) at a few hundred thousand parameters, so the demo, the tests and the
benchmarks run the same code paths as a full Stable Diffusion model, in seconds, on a CPU and with
no model hub. They show the workflow, not image quality: the weights are random.

Three families exist; the table in :data:`FAMILIES` is the one place to add another:

* ``"sd1"``: epsilon prediction, convolutional ``proj_in``/``proj_out`` in the transformer blocks.
* ``"sd2"``: v-prediction, linear projections, upcast attention and a wider text encoder.
* ``"sdxl"``: a ``StableDiffusionXLPipeline``: two text encoders (the second with a projection),
  ``addition_embed_type="text_time"``, three UNet levels of which the first has no attention
  (SDXL's layout), and SDXL's VAE scaling factor. Training and loading both work on it.

SD1 and SD2 mirror Stable Diffusion's block layout: four UNet levels, cross-attention on the
first three, a VAE that downsamples by 8. At the default 256 px the latent is 32x32 and the
cross-attention level the Break-A-Scene loss uses (latent / 4) is 8x8, found at
``down_blocks.2`` and ``up_blocks.1`` exactly as in SD1/SD2 (and SDXL).

Example:
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline("sd1", seed=0)
    >>> image = pipe("a photo of a dog on the beach", num_inference_steps=2, height=64, width=64,
    ...              output_type="np").images[0]
    >>> image.shape
    (64, 64, 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "TINY_WORDS",
    "TinySpec",
    "save_tiny_clip",
    "save_tiny_clipseg",
    "save_tiny_dino",
    "save_tiny_pipeline",
    "save_tiny_sam",
    "sd_scheduler",
    "tiny_components",
    "tiny_pipeline",
    "tiny_scene",
    "tiny_tokenizer",
]

#: Default image size of the tiny pipelines (latent 32x32, attention-loss maps 8x8).
DEFAULT_RESOLUTION = 256

#: Whole words that the tiny tokenizer knows as single tokens. Every other word still tokenizes
#: without unknown tokens (the byte alphabet is in the vocabulary), just into more pieces.
TINY_WORDS: tuple[str, ...] = tuple(
    """
    a an the of and on in at with by to from for next under over near behind beside inside
    photo picture image painting drawing sketch render rendering illustration portrait oil
    watercolor pencil cartoon anime style art artwork close up view shot high quality detailed
    beach forest city street snow mountain mountains sea ocean lake river garden room kitchen park
    sky night sunset sunrise desert field grass floor table desk wall window road bridge space
    moon jungle studio background scene water sand rain fog
    dog cat bear teddy toy doll car ball cube sphere vase bowl cup mug book bag hat shoe shoes
    shirt chair sofa lamp tree flower flowers house bird fish horse man woman person child robot
    plant pot bottle box clock bike boat
    red orange yellow green blue purple pink brown black white gray grey gold silver wooden
    plastic metal glass small big large tiny old new
    sitting standing lying walking floating flying playing
    van gogh monet picasso
    asset bg concept handle token
    """.split()
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny family. Field names follow the diffusers/transformers configs they feed."""

    prediction_type: str
    text_hidden_size: int
    text_intermediate_size: int
    text_hidden_act: str
    unet_block_out_channels: tuple[int, ...]
    unet_attention_head_dim: int | tuple[int, ...]
    use_linear_projection: bool
    upcast_attention: bool
    vae_block_out_channels: tuple[int, ...]
    #: SDXL: the second text encoder's width (0: no second encoder), its time-id embedding
    #: width, and transformer layers per UNet level.
    text_2_hidden_size: int = 0
    addition_time_embed_dim: int = 0
    transformer_layers_per_block: int | tuple[int, ...] = 1


#: The tiny families. Cross-attention dim = text hidden size, as in SD1 (768) and SD2 (1024).
FAMILIES: dict[str, TinySpec] = {
    "sd1": TinySpec(
        prediction_type="epsilon",
        text_hidden_size=32,
        text_intermediate_size=64,
        text_hidden_act="quick_gelu",
        unet_block_out_channels=(32, 32, 64, 64),
        unet_attention_head_dim=4,
        use_linear_projection=False,
        upcast_attention=False,
        vae_block_out_channels=(16, 16, 32, 32),
    ),
    "sd2": TinySpec(
        prediction_type="v_prediction",
        text_hidden_size=48,
        text_intermediate_size=96,
        text_hidden_act="gelu",
        unet_block_out_channels=(32, 32, 64, 64),
        unet_attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        upcast_attention=True,
        vae_block_out_channels=(16, 16, 32, 32),
    ),
    # SDXL's layout: three UNet levels, the first without attention, cross-attention on the
    # concatenated hidden states of two text encoders (the second with a projection, whose
    # pooled output and the six time ids form the "text_time" added embedding).
    "sdxl": TinySpec(
        prediction_type="epsilon",
        text_hidden_size=32,
        text_intermediate_size=64,
        text_hidden_act="quick_gelu",
        unet_block_out_channels=(32, 64, 64),
        unet_attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=False,
        vae_block_out_channels=(16, 16, 32, 32),
        text_2_hidden_size=48,
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2),
    ),
}


def _spec(family: str) -> TinySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"Unknown tiny family {family!r}; choose one of {sorted(FAMILIES)}."
        ) from None


def _bpe_vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's layout in which each of ``words`` is one token.

    CLIP marks the end of a word with ``</w>``. The vocabulary holds every byte symbol, alone and
    word-final, so any text tokenizes without unknown tokens; the special tokens come last.
    Merges spell each word left to right; where an earlier merge splits a word differently
    (``"to"`` inside ``"photo"``), a merge of the pieces BPE actually produced is appended, until
    every word is one token. Deterministic (the ``tokenizers`` BPE trainer breaks ties
    differently from run to run).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [symbol + "</w>" for symbol in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []

    def add_merges(pieces: list[str]) -> None:
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))

    for word in words:
        add_merges([*list(word[:-1]), word[-1] + "</w>"])
    for _ in range(len(words)):
        bpe = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>"))
        split = [[t.value for t in bpe.model.tokenize(word)] for word in words]
        unfinished = [pieces for pieces in split if len(pieces) > 1]
        if not unfinished:
            break
        for pieces in unfinished:
            add_merges(pieces)
    # The special tokens come last, as in CLIP's real vocabulary (49406, 49407): diffusers'
    # unload_textual_inversion renumbers added tokens from the last special id on.
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def tiny_tokenizer(words: tuple[str, ...] = TINY_WORDS) -> Any:
    """A real ``CLIPTokenizer`` with a tiny BPE vocabulary (about 1,000 entries).

    Example:
        >>> tok = tiny_tokenizer()
        >>> ids = tok("a photo of a dog on the beach").input_ids
        >>> len(ids)  # start, 8 words, end
        10
    """
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_components(
    family: str = "sd1", seed: int = 0, resolution: int = DEFAULT_RESOLUTION
) -> dict[str, Any]:
    """The components of a tiny pipeline (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler``, ``safety_checker=None``, ``feature_extractor=None``), deterministic for ``seed``.

    The global torch random state is left as it was.

    Example:
        >>> parts = tiny_components("sd2", seed=1)
        >>> parts["scheduler"].config.prediction_type
        'v_prediction'
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = _spec(family)
    tokenizer = tiny_tokenizer()
    levels = len(spec.unet_block_out_channels)
    sdxl = spec.text_2_hidden_size > 0
    if sdxl:
        blocks = {
            "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            "up_block_types": ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            "cross_attention_dim": spec.text_hidden_size + spec.text_2_hidden_size,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": spec.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": spec.text_2_hidden_size
            + 6 * spec.addition_time_embed_dim,
            "transformer_layers_per_block": spec.transformer_layers_per_block,
        }
    else:
        blocks = {
            "down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            "cross_attention_dim": spec.text_hidden_size,
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=spec.unet_block_out_channels,
            attention_head_dim=spec.unet_attention_head_dim,
            use_linear_projection=spec.use_linear_projection,
            upcast_attention=spec.upcast_attention,
            norm_num_groups=8,
            **blocks,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_block_out_channels),
            block_out_channels=spec.vae_block_out_channels,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=resolution,
            **({"scaling_factor": 0.13025, "force_upcast": True} if sdxl else {}),
        )
        text_encoder = CLIPTextModel(
            _clip_text_config(spec.text_hidden_size, spec.text_intermediate_size, spec, tokenizer)
        )
        if sdxl:
            width = spec.text_2_hidden_size
            text_encoder_2 = CLIPTextModelWithProjection(
                _clip_text_config(width, 2 * width, spec, tokenizer)
            )
    scheduler = sd_scheduler(spec.prediction_type)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
             "scheduler": scheduler}  # fmt: skip
    if sdxl:
        parts.update(text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer())
    else:
        parts.update(safety_checker=None, feature_extractor=None)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].eval()
    return parts


def _clip_text_config(width: int, intermediate: int, spec: TinySpec, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=spec.text_hidden_act,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """Stable Diffusion's DDIM sampling scheduler (``scaled_linear`` betas 0.00085-0.012, 1000
    steps), as the tiny and toy pipelines save it.

    Example:
        >>> sd_scheduler("v_prediction").config.prediction_type
        'v_prediction'
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(
    family: str = "sd1",
    seed: int = 0,
    pipeline_cls: type | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    **extra_components: Any,
) -> Any:
    """A tiny pipeline of ``pipeline_cls`` (default: ``StableDiffusionPipeline``), random weights.

    ``family="toy"`` loads the trained toy model instead (:mod:`diffusers_breakscene.toy`;
    ``seed`` and ``resolution`` do not apply). ``extra_components`` go to the pipeline
    constructor as well (for example ``controlnet=``).

    Example:
        >>> from diffusers import StableDiffusionImg2ImgPipeline
        >>> pipe = tiny_pipeline("sd1", pipeline_cls=StableDiffusionImg2ImgPipeline)
        >>> type(pipe).__name__
        'StableDiffusionImg2ImgPipeline'
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = family != "toy" and _spec(family).text_2_hidden_size > 0
    pipeline_cls = pipeline_cls or (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline)
    if (
        family == "toy"
    ):  # trained weights, shipped with the package: seed and resolution do not apply
        from .toy.model import toy_model_path

        pipe = pipeline_cls.from_pretrained(
            toy_model_path(), local_files_only=True, **extra_components
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    components = tiny_components(family, seed=seed, resolution=resolution)
    if not sdxl:
        components["requires_safety_checker"] = False
    pipe = pipeline_cls(**components, **extra_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(
    directory: str | os.PathLike[str],
    family: str = "sd1",
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it into ``directory``; returns the path.

    Load it back like any local model:
    ``StableDiffusionPipeline.from_pretrained(path, local_files_only=True)``.

    Example:
        >>> import tempfile
        >>> from diffusers import StableDiffusionPipeline
        >>> path = save_tiny_pipeline(tempfile.mkdtemp(), "sd1")
        >>> pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    """
    from .errors import UnwritableOutputError
    from .files import check_output_dir, check_utf8_path, usual_permissions

    path = check_output_dir(directory, "model folder")
    check_utf8_path(path, "model folder", UnwritableOutputError)
    pipe = tiny_pipeline(family, seed=seed, resolution=resolution)
    path.mkdir(parents=True, exist_ok=True)
    with usual_permissions(path):
        pipe.save_pretrained(path)
    return path


def tiny_scene(resolution: int = 128, **scene_kwargs: Any) -> Any:
    """A two-concept :class:`~diffusers_breakscene.Scene` for tests and benchmarks.

    A red top-left and a blue bottom-right quadrant on noise (seed 0): the masks align with the
    cells of the latent/4 attention grid at any resolution that is a multiple of 32.

    Example:
        >>> tiny_scene(64).tokens
        ['<asset0>', '<asset1>']
    """
    from .scene import Scene

    image = torch.rand(3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    m0, m1 = torch.zeros(resolution, resolution), torch.zeros(resolution, resolution)
    half = resolution // 2
    m0[:half, :half] = 1
    m1[half:, half:] = 1
    image[:, m0.bool()] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    image[:, m1.bool()] = torch.tensor([0.1, 0.1, 0.9])[:, None]
    return Scene(image, [m0, m1], **scene_kwargs)


def save_tiny_sam(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a Segment Anything model with random weights and 64 px inputs (``SamModel`` and
    ``SamProcessor``, about 0.2 M parameters) for offline tests of
    :func:`~diffusers_breakscene.masks.masks_from_sam`: it runs the real code, and its masks
    mean nothing.

    Example:
        >>> import tempfile
        >>> from transformers import SamModel
        >>> path = save_tiny_sam(tempfile.mkdtemp())
        >>> SamModel.from_pretrained(path).config.vision_config.image_size
        64
    """
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    side, width = 64, 32
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=width, output_channels=width, num_hidden_layers=2, num_attention_heads=2,
            image_size=side, patch_size=16, mlp_dim=64, window_size=2, global_attn_indexes=[1],
            num_pos_feats=width // 2,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=width, image_size=side, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=width, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
            iou_head_hidden_dim=width,
        ),
    )  # fmt: skip
    processor = SamProcessor(
        SamImageProcessor(
            size={"longest_edge": side}, pad_size={"height": side, "width": side},
            mask_size={"longest_edge": side // 4}, mask_pad_size={"height": side // 4,
                                                                  "width": side // 4},
        )
    )  # fmt: skip
    return _save_random(SamModel, config, processor, directory, seed)


def _save_random(model_cls: Any, config: Any, processor: Any, directory: Any, seed: int) -> Path:
    """Build ``model_cls(config)`` with ``seed`` (the global generator is left as it was) and
    save it with ``processor`` into ``directory``: the shared tail of the ``save_tiny_*``
    transformers models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    path = Path(directory)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _text_config(vocab_size: int, width: int) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "projection_dim": 16}  # fmt: skip


def _vision_config(width: int, layers: int = 2) -> dict[str, Any]:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
            "projection_dim": 16}  # fmt: skip


def save_tiny_clip(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a CLIP model with random weights and 32 px inputs (``CLIPModel`` and
    ``CLIPProcessor`` with :func:`tiny_tokenizer`) for offline tests of
    :class:`~diffusers_breakscene.evaluation.ClipDinoScorer`: the real code runs, its scores
    mean nothing.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> path = save_tiny_clip(tempfile.mkdtemp())
        >>> CLIPModel.from_pretrained(path).config.vision_config.image_size
        32
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=_text_config(len(tokenizer), 32), vision_config=_vision_config(32),
        projection_dim=16,
    )  # fmt: skip
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    return _save_random(CLIPModel, config, processor, directory, seed)


def save_tiny_dino(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a DINOv2 model with random weights and 32 px inputs (``Dinov2Model`` and its
    image processor) for offline tests of the identity metric.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModel
        >>> AutoModel.from_pretrained(save_tiny_dino(tempfile.mkdtemp())).config.model_type
        'dinov2'
    """
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32,
        patch_size=8,
    )  # fmt: skip
    processor = BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True
    )
    return _save_random(Dinov2Model, config, processor, directory, seed)


def save_tiny_clipseg(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a CLIPSeg model with random weights and 32 px inputs
    (``CLIPSegForImageSegmentation`` and ``CLIPSegProcessor``) for offline tests of the
    segmentation of generated objects.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPSegForImageSegmentation
        >>> path = save_tiny_clipseg(tempfile.mkdtemp())
        >>> CLIPSegForImageSegmentation.from_pretrained(path).config.reduce_dim
        16
    """
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        ViTImageProcessor,
    )

    tokenizer = tiny_tokenizer()
    config = CLIPSegConfig(
        text_config=_text_config(len(tokenizer), 32), vision_config=_vision_config(32, 3),
        projection_dim=16, reduce_dim=16, extract_layers=[1, 2], decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )  # fmt: skip
    images = ViTImageProcessor(size={"height": 32, "width": 32})
    processor = CLIPSegProcessor(image_processor=images, tokenizer=tokenizer)
    return _save_random(CLIPSegForImageSegmentation, config, processor, directory, seed)
