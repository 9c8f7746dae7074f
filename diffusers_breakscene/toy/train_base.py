"""Train the toy Stable Diffusion pipeline from scratch on the toy world (2 CPU cores).

The shipped weights (``diffusers_breakscene/assets/toy``) come from two commands on 2 CPU cores,
about 124 minutes in all: this script's defaults (85 minutes: VAE 7.4, latent cache 1.5, UNet +
text encoder 75 with 9,917 steps of batch 16, decoder 1.2), then the same work folder trained on
with a longer schedule (38 more minutes, 15,040 UNet steps in all; the cosine, now over 113
minutes, picks up at 2.6e-4 from the 8e-5 the first run ended at)::

    python -m diffusers_breakscene.toy.train_base --output OUT --work-dir WORK \
        --threads 2 --steps 13000 --max-minutes 75 --attn-weight 0.2 --outline-weight 4 \
        --word-weight 0.05 --vae-steps 2500 --log-every 50
    python -m diffusers_breakscene.toy.train_base --output OUT --work-dir WORK \
        --threads 2 --steps 20000 --max-minutes 113 --attn-weight 0.2 --outline-weight 4 \
        --word-weight 0.05 --vae-steps 2500 --log-every 50

The first command alone (the defaults) stays inside issue 11's 90-minute budget and draws
one-object shapes right 0.76 of the time, the second reaches 0.93 (docs/toy-world.md).
(The weights shipped from 2026-11-27 to 2026-11-28 were the first command with a 500-step VAE:
its round trip kept the shape of 0.82 of rendered training-split objects, the 2,500-step one
0.97; ``benchmarks/toy_autoencoder.py``, docs/toy-world.md.)

``toy_info.json`` records the commands (``history``), the steps and the stage times. The
weights shipped before 2026-11-27 (8,539 steps, no outline or word loss) took about 182 minutes
on shared cores in four resumed runs; docs/toy-world.md compares them. ``--threads 2`` suits an
idle machine, where a step of batch 16 takes 0.41-0.49 s; on cores shared with another job
one thread each runs faster than two (two intra-op threads on a busy 2-core machine ran 3-10x
slower). With the ``--max-minutes`` cap the number of steps (and so the weights) depends on the
machine's speed.

Four stages, each resumable from ``--work-dir`` (run the same command again after a stop;
every file there is written whole, so a run killed at any moment resumes where its last
checkpoint, every ``--save-every`` steps, left it):

1. VAE (downsample 2) on random 32x32 crops of training scenes: MSE + L1 + 1e-6 KL, decoding
   the posterior mean.
2. Render ``--num-images`` training scenes (``split="train"``: no held-out shape, pattern or
   pair) and cache their latents (posterior means) and 8x8 object masks.
3. UNet + text encoder jointly: v-prediction on SD's ``scaled_linear`` DDPM schedule rescaled to
   zero terminal SNR (``--prediction-type epsilon --no-zero-snr`` gives SD 1.x's recipe), loss
   weighted by ``min(1, --snr-gamma / (SNR + 1))``, AdamW with warmup and cosine decay to 10%
   (``--lr-decay linear|wsd``, ``--decay-share`` and ``--lr-floor`` change its form and end), EMA,
   caption dropout 10% (for classifier-free guidance), setting phrase dropped in 15% of captions.
   An auxiliary cross-attention loss (``--attn-weight``, Break-A-Scene's form: each object
   word's latent/4 map, divided by its max, regressed on the object's visible mask) teaches the
   base model to localise its words, a property large text-to-image models have and that a
   model this small would learn slowly; ``--attn-weight 0`` turns it off.
   ``--max-minutes`` caps the wall time of this stage. ``--word-weight`` adds a word-identity
   loss that keeps the object words apart in the text encoder's output (they collapse without
   it: docs/toy-world.md); ``--init-from`` continues a saved pipeline (its VAE too) instead of
   starting from random weights. ``--outline-weight W`` weighs the diffusion loss up by
   ``1 + W`` on the latent pixels of object outlines (:func:`outline_maps`), where the shape words
   decide the answer and a plain loss hardly rewards them. ``--band-share P`` draws that share
   of the timesteps from ``--timestep-band LO HI`` (:func:`sample_timesteps`). ``--device cuda``
   trains this stage on a GPU (the random numbers stay on the CPU: the same data on any device).
   ``--compile`` runs the UNet through ``torch.compile`` (inductor unless a backend is named;
   the same losses as eager; on 2 CPU cores no faster here, docs/toy-world.md).

4. The VAE decoder alone, on whole images (encoder frozen: the latent space does not move).

The autoencoder stages (1, 2 and 4) live in :mod:`~diffusers_breakscene.toy.train_latents`;
this module holds the arguments, the diffusion stage and ``main``, which runs them top to bottom.

The pipeline saved in ``--output`` holds the EMA weights (``save_pretrained`` layout, safetensors,
fp32) and ``toy_info.json`` (arguments, steps, times, held-out sets).

Example:
    >>> from diffusers_breakscene.toy.train_base import main
    >>> main(["--output", "/tmp/toy", "--steps", "2", "--vae-steps", "2",
    ...       "--num-images", "64"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import optimizer_from_tensors, optimizer_to_tensors
from ..files import usual_permissions
from .model import (
    TOY_RESOLUTION,
    UNET_CHANNELS,
    UNET_LAYERS,
    build_scheduler,
    build_text_encoder,
    build_unet,
    toy_tokenizer,
)
from .train_latents import (
    attention_masks,
    build_cache,
    decayed_lr,
    finetune_decoder,
    log,
    optimizer_step,
    read_checkpoint_info,
    render_batch,
    save_checkpoint_file,
    train_vae,
)
from .world import (
    HELDOUT_PAIRS,
    HELDOUT_PATTERNS,
    HELDOUT_SHAPES,
    SETTINGS,
    ToyObject,
    ToySample,
    object_words,
    render_scene,
)

if TYPE_CHECKING:
    from ..attention import AttentionStore

__all__ = [
    "DiffusionBatch",
    "caption_tokens",
    "diffusion_loss",
    "main",
    "outline_maps",
    "parse_args",
    "sample_timesteps",
    "scene_batch",
]

PREFIX = ("a", "photo", "of")


def _int_triple(text: str) -> tuple[int, int, int]:
    """``"1,2,2"`` -> ``(1, 2, 2)``; ``"2"`` -> ``(2, 2, 2)`` (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give one number or three (one per level)")
    return values  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``).

    Example:
        >>> parse_args(["--output", "x"]).steps
        13000
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder for the trained pipeline")
    p.add_argument("--work-dir", default=None, help="checkpoints/cache (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--vae-steps",
        type=int,
        default=2500,
        help="VAE training steps (default 2500; 500 lost a fifth of the objects' shapes)",
    )
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--num-images", type=int, default=24000)
    p.add_argument("--decoder-steps", type=int, default=400)
    p.add_argument("--decoder-batch", type=int, default=16)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument(
        "--unet-channels",
        type=_int_triple,
        default=UNET_CHANNELS,
        help="UNet channels of the 32x32, 16x16 and 8x8 levels, comma-separated (default: "
        + ",".join(map(str, UNET_CHANNELS))
        + ")",
    )
    p.add_argument(
        "--unet-layers",
        type=_int_triple,
        default=UNET_LAYERS,
        help="UNet layers per level (one number for all, or three comma-separated; default: 1)",
    )
    p.add_argument("--steps", type=int, default=13000)
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="UNet batch size (8 measured worse than 16 in the same 75 minutes, one-object shape "
        "0.43 against 0.76: docs/toy-world.md)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=8e-4,
        help="peak learning rate of the UNet and text encoder (4e-4 and 1.2e-3 measured worse in "
        "the same 75 minutes, one-object shape 0.65 and 0.48 against 0.76: docs/toy-world.md)",
    )
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--lr-decay",
        choices=("cosine", "linear", "wsd"),
        default="cosine",
        help="how the learning rate falls after the warmup, by --steps or --max-minutes "
        "(whichever comes first), to --lr-floor times --lr; wsd holds --lr and decays linearly "
        "over the last --decay-share of the run (linear to 0 measured worse than cosine to 0.1 "
        "in the same steps, one-object shape 0.54 against 0.76; wsd 0.52: docs/toy-world.md)",
    )
    p.add_argument(
        "--decay-share",
        type=float,
        default=0.2,
        help="with --lr-decay wsd: the share of the run (after the warmup) spent decaying",
    )
    p.add_argument(
        "--lr-floor",
        type=float,
        default=0.1,
        help="the learning rate at the end, as a share of --lr (default 0.1; 0 decays to zero)",
    )
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0: no EMA)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--setting-dropout", type=float, default=0.15)
    p.add_argument("--attn-weight", type=float, default=0.2)
    p.add_argument(
        "--outline-weight",
        type=float,
        default=4.0,
        help="weigh the diffusion loss up by 1 + W on the latent pixels of object outlines, where "
        "the shape words matter (0: off; 10 measured worse than 4 at full length, one-object "
        "shape 0.56 against 0.76: docs/toy-world.md)",
    )
    p.add_argument(
        "--word-weight",
        type=float,
        default=0.05,
        help="weight of the word-identity loss: each object word's final text-encoder state must "
        "pick out its own word among the vocabulary's input embeddings (0: off; without it the "
        "shape words collapse onto one vector early in training)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PIPELINE",
        help="start from a saved toy pipeline's VAE, UNet and text encoder (e.g. the shipped "
        "one) instead of random weights; the UNet architecture must match",
    )
    p.add_argument(
        "--prediction-type",
        choices=("v_prediction", "epsilon"),
        default="v_prediction",
        help="what the UNet predicts (v-prediction is needed with zero terminal SNR)",
    )
    p.add_argument(
        "--no-zero-snr",
        dest="zero_snr",
        action="store_false",
        help="keep SD's schedule (about 7%% of the signal left at the last timestep) instead of "
        "rescaling it to zero terminal SNR",
    )
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=5.0,
        help="down-weight easy low-noise steps: loss weight min(1, gamma / (SNR + 1)) (0: off)",
    )
    p.add_argument(
        "--timestep-band",
        type=int,
        nargs=2,
        default=(500, 950),
        metavar=("LO", "HI"),
        help="timesteps [LO, HI) that --band-share draws from (default: 500 950, where the noise "
        "leaves only an object's rough outline and its shape word decides it)",
    )
    p.add_argument(
        "--band-share",
        type=float,
        default=0.0,
        help="share of each batch's timesteps drawn from --timestep-band instead of uniformly "
        "from [0, 1000) (0: uniform sampling)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the UNet and text encoder train (e.g. cuda); the autoencoder stages and the "
        "random numbers stay on the CPU, so a run's data do not depend on the device",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=75.0,
        help="wall-time cap of the diffusion stage (the LR schedule ends by then too)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="run the diffusion stage's UNet through torch.compile (default backend: inductor, "
        "which needs a C++ compiler on the CPU; the first step compiles, about 3 minutes cold). "
        "On 2 CPU cores it did not make this stage faster: docs/toy-world.md",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    args = p.parse_args(argv)
    for name in ("attn_weight", "word_weight", "outline_weight"):
        if getattr(args, name) < 0:  # a negative weight would reward the error it measures
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give 0 (off) or more")
    lo, hi = args.timestep_band
    if not 0 <= lo < hi <= 1000:
        p.error(f"--timestep-band {lo} {hi}: give 0 <= LO < HI <= 1000")
    if not 0 <= args.lr_floor <= 1:
        p.error(f"--lr-floor {args.lr_floor}: give a share of --lr between 0 and 1")
    if not 0 < args.decay_share <= 1:
        p.error(f"--decay-share {args.decay_share}: give a share of the run above 0, at most 1")
    if not 0 <= args.band_share <= 1:
        p.error(f"--band-share {args.band_share}: give a share between 0 and 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; leave --device out (cpu)")
    if args.compile is not None:
        _check_compile(p, args.compile, device)
    return args


def _check_compile(p: argparse.ArgumentParser, backend: str, device: torch.device) -> None:
    """Refuse a ``--compile`` backend that torch does not have, or inductor on the CPU without
    the C++ compiler it builds its kernels with (it would fail at the first diffusion step,
    after the autoencoder stages)."""
    if backend not in torch.compiler.list_backends(exclude_tags=()):  # debug ones too ("eager")
        p.error(
            f"--compile {backend!r}: not a torch.compile backend; give one of "
            f"{torch.compiler.list_backends()} (or leave the value out: inductor)"
        )
    if backend == "inductor" and device.type == "cpu":
        # Inductor's own search (its cpp.cxx config: $CXX, else g++ on Linux), so that this check
        # accepts exactly the compilers inductor will use; torch has no public API for it.
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler:
            p.error(
                "--compile: inductor needs a C++ compiler on the CPU and found none ($CXX, else "
                "g++); install one (e.g. apt-get install g++) or leave --compile out"
            )


def caption_tokens(
    objects: list[ToyObject], setting: str | None
) -> tuple[list[str], list[list[int]]]:
    """Caption words and, per object, the token positions of its words (1 + word index: every
    world word is one token after the start token).

    Example:
        >>> words, pos = caption_tokens([ToyObject("star", "red", "plain", .4, (.5, .5))], None)
        >>> " ".join(words), pos
        ('a photo of a red star', [[5, 6]])
    """
    words = list(PREFIX)
    positions = []
    for i, obj in enumerate(objects):
        if i:
            words.append("and")
        named = object_words(obj)
        words.append("an" if named[0][0] in "aeiou" else "a")
        positions.append([len(words) + 1 + k for k in range(len(named))])
        words.extend(named)
    if setting is not None:
        words.extend(SETTINGS[setting].split())
    return words, positions


def outline_maps(scenes: list[tuple[list[ToyObject], str]], size: int) -> torch.Tensor:
    """Where the cached scenes' objects have their outlines, at latent resolution: per scene a
    ``size x size`` map in [0, 1] (float16), the largest over its objects of a 3x3 dilation minus
    a 3x3 erosion of the object's visible mask averaged down from the image. Masks depend on the
    objects only (not on the background), so they are redrawn from the cache's scene list.

    Example:
        >>> objs = [ToyObject("square", "red", "plain", 0.5, (0.5, 0.5))]
        >>> m = outline_maps([(objs, "gray")], 32)
        >>> tuple(m.shape), float(m[0, 16, 16]), float(m[0, 0, 0]), float(m.max())
        ((1, 32, 32), 0.0, 0.0, 1.0)
    """
    maps = torch.zeros(len(scenes), size, size, dtype=torch.float16)
    for i, (objects, setting) in enumerate(scenes):
        for mask in render_scene(objects, setting).masks:
            full = torch.from_numpy(mask.astype(np.float32))[None, None]
            soft = F.adaptive_avg_pool2d(full, size)
            edge = F.max_pool2d(soft, 3, 1, 1) + F.max_pool2d(-soft, 3, 1, 1)  # dilate - erode
            maps[i] = torch.maximum(maps[i], edge[0, 0].half())
    return maps


# -- stage 3: UNet + text encoder -------------------------------------------------------------


def sample_timesteps(
    n: int, generator: torch.Generator, band: tuple[int, int] = (500, 950), share: float = 0.0
) -> torch.Tensor:
    """``n`` training timesteps: uniform on [0, 1000), except that each one is drawn from
    ``band`` = [lo, hi) with probability ``share`` (``--band-share``).

    Example:
        >>> t = sample_timesteps(1000, torch.Generator().manual_seed(0), (500, 950), 1.0)
        >>> int(t.min()) >= 500 and int(t.max()) < 950
        True
    """
    t = torch.randint(0, 1000, (n,), generator=generator)
    if share <= 0:  # the generator's stream is then exactly the uniform recipe's
        return t
    in_band = torch.randint(band[0], band[1], (n,), generator=generator)
    pick = torch.rand(n, generator=generator) < share
    return torch.where(pick, in_band, t)


def _lr_at(step: int, args: argparse.Namespace, minutes: float = 0.0) -> float:
    """Warmup, then ``--lr-decay`` (cosine, linear, or wsd: held, then linear over the last
    ``--decay-share``) to ``--lr-floor`` times ``--lr`` by ``--steps`` or ``--max-minutes``,
    whichever is first."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(
        1.0,
        max(
            (step - args.warmup) / max(1, args.steps - args.warmup),
            minutes / args.max_minutes,
        ),
    )
    return decayed_lr(args.lr, progress, args.lr_decay, args.lr_floor, args.decay_share)


def _checkpoint_info(args: argparse.Namespace, work: Path) -> dict | None:
    """The info of ``work``'s diffusion checkpoint (``None`` when there is none yet); a
    checkpoint with no step count or with another UNet architecture is refused."""
    ckpt = work / "diffusion.safetensors"
    if not ckpt.is_file():
        return None
    info = read_checkpoint_info(ckpt)
    if info is None:
        raise SystemExit(
            f"{ckpt} holds no step count (no metadata and no diffusion.json beside it): "
            "delete it to train the diffusion stage from the start, or use another --work-dir."
        )
    # Checkpoints from before --unet-channels/--unet-layers hold the default architecture.
    saved = info.get("unet", [list(UNET_CHANNELS), list(UNET_LAYERS)])
    wanted = [list(args.unet_channels), list(args.unet_layers)]
    if saved != wanted:
        raise SystemExit(
            f"{ckpt} holds a UNet with channels {saved[0]} and layers "
            f"{saved[1]}, not --unet-channels {wanted[0]} --unet-layers {wanted[1]}: pass those "
            "values to resume it, or use another --work-dir."
        )
    return info


class DiffusionBatch(NamedTuple):
    """One batch of the diffusion stage, on the training device."""

    ids: torch.Tensor  #: (B, 77) caption token ids
    noisy: torch.Tensor  #: (B, 4, h, w) noised latents
    timesteps: torch.Tensor  #: (B,) their timesteps
    target: torch.Tensor  #: what the UNet learns to predict: the noise, or v
    #: (batch index, token position, object index) of every object word in the captions
    triples: list[tuple[int, int, int]]
    masks: torch.Tensor  #: (B, objects, 8, 8) the objects' masks at the attention level
    outlines: torch.Tensor | None  #: (B, h, w) :func:`outline_maps` (``--outline-weight`` > 0)


def scene_batch(
    samples: list[ToySample],
    tokenizer: Any,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    outlines: bool = True,
) -> DiffusionBatch:
    """A :class:`DiffusionBatch` of rendered scenes around given latents: each scene's full
    caption (:func:`caption_tokens`, setting included, no dropout), its object words' positions,
    its :func:`~diffusers_breakscene.toy.train_latents.attention_masks` and, with ``outlines``,
    its :func:`outline_maps` at the latents' size.

    Example:
        >>> import torch
        >>> from diffusers_breakscene.toy.model import toy_tokenizer
        >>> from diffusers_breakscene.toy.train_base import scene_batch
        >>> from diffusers_breakscene.toy.world import sample_scene
        >>> latents = torch.zeros(1, 4, 32, 32)
        >>> batch = scene_batch([sample_scene(0, "train")], toy_tokenizer(), latents,
        ...                     torch.tensor([500]), latents)
        >>> tuple(batch.ids.shape), tuple(batch.masks.shape), tuple(batch.outlines.shape)
        ((1, 77), (1, 3, 8, 8), (1, 32, 32))
    """
    captions, triples = [], []
    for b, sample in enumerate(samples):
        words, positions = caption_tokens(list(sample.objects), sample.setting)
        captions.append(" ".join(words))
        triples += [(b, pos, j) for j, group in enumerate(positions) for pos in group]
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.to(noisy.device)
    masks = torch.stack([attention_masks(sample.masks) for sample in samples]).to(noisy.device)
    maps = None
    if outlines:
        scenes = [(list(sample.objects), sample.setting) for sample in samples]
        maps = outline_maps(scenes, noisy.shape[-1]).float().to(noisy.device)
    return DiffusionBatch(ids, noisy, timesteps, target, triples, masks, maps)


def diffusion_loss(
    text_encoder: torch.nn.Module,
    unet: torch.nn.Module,
    batch: DiffusionBatch,
    args: argparse.Namespace,
    store: AttentionStore | None = None,
    snr_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diffusion stage's loss on one batch, as :func:`main` trains: ``(total, attention,
    word)``. The prediction loss (weighted up on outlines by ``args.outline_weight`` and per
    timestep by ``snr_weights``, indexed by timestep), plus ``args.word_weight`` times the
    word-identity loss and ``args.attn_weight`` times the attention loss when ``store`` (an
    :class:`~diffusers_breakscene.attention.AttentionStore` on ``unet``) records the maps.

    Example:
        >>> import torch
        >>> from diffusers_breakscene.toy.model import build_text_encoder, build_unet
        >>> from diffusers_breakscene.toy.model import toy_tokenizer
        >>> from diffusers_breakscene.toy.train_base import (
        ...     DiffusionBatch, diffusion_loss, parse_args)
        >>> args = parse_args(["--output", "out", "--attn-weight", "0"])
        >>> tokenizer = toy_tokenizer()
        >>> ids = tokenizer(["a photo of a red star"], padding="max_length", max_length=77,
        ...                 return_tensors="pt").input_ids
        >>> latents = torch.zeros(1, 4, 32, 32)
        >>> batch = DiffusionBatch(ids, latents, torch.tensor([500]), latents,
        ...                        [(0, 5, 0)], torch.zeros(1, 3, 8, 8), None)
        >>> total, attention, word = diffusion_loss(
        ...     build_text_encoder(len(tokenizer)), build_unet(), batch, args)
        >>> bool(total > 0), float(attention)
        (True, 0.0)
    """
    device = batch.noisy.device
    hidden = text_encoder(batch.ids)[0]
    pred = unet(batch.noisy, batch.timesteps, encoder_hidden_states=hidden).sample
    err = F.mse_loss(pred, batch.target, reduction="none")
    if batch.outlines is not None:
        err = err * (1 + args.outline_weight * batch.outlines[:, None])
    per_sample = err.mean(dim=(1, 2, 3))
    if snr_weights is not None:
        loss = (per_sample * snr_weights[batch.timesteps]).mean()
    else:
        loss = per_sample.mean()
    if batch.triples:
        b_i, p_i, j_i = (torch.tensor(v, device=device) for v in zip(*batch.triples, strict=True))
    word_loss = torch.zeros((), device=device)
    if args.word_weight > 0 and batch.triples:
        word_loss = _word_identity_loss(text_encoder, hidden[b_i, p_i], batch.ids[b_i, p_i])
        loss = loss + args.word_weight * word_loss
    attn_loss = torch.zeros((), device=device)
    if store is not None and batch.triples:
        maps = store.aggregate()  # (B, 8, 8, 77)
        sel = maps[b_i, :, :, p_i]
        sel = sel / sel.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        attn_loss = F.mse_loss(sel, batch.masks[b_i, j_i])
        loss = loss + args.attn_weight * attn_loss
    return loss, attn_loss, word_loss


def train_diffusion(
    args: argparse.Namespace,
    work: Path,
    vae: torch.nn.Module,
    cache: dict,
    resume: dict | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    from diffusers import DDPMScheduler

    from ..attention import AttentionStore

    tokenizer = toy_tokenizer()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    unet = build_unet(args.unet_channels, args.unet_layers)
    text_encoder = build_text_encoder(len(tokenizer))
    if args.init_from is not None:
        _init_from_pipeline(Path(args.init_from), unet, text_encoder)
    unet.to(device)
    text_encoder.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=args.zero_snr,
        prediction_type=args.prediction_type,
    )
    alphas = noise_scheduler.alphas_cumprod.float().to(device)
    # min(1, gamma / (SNR + 1)): Min-SNR weighting (Hang et al. 2023) for a v-prediction loss,
    # floored so that the zero-SNR step (the one that sets the background) keeps full weight.
    snr = alphas / (1 - alphas).clamp_min(1e-8)
    weights = (args.snr_gamma / (snr + 1)).clamp(max=1.0) if args.snr_gamma > 0 else None
    scale = float(vae.config.scaling_factor)
    latents_all, masks_all, scenes = cache["latents"], cache["masks"], cache["scenes"]
    outlines = None
    if args.outline_weight > 0:
        outlines = outline_maps(scenes, latents_all.shape[-1])
        log(f"diffusion: outlines cover {float((outlines > 0).float().mean()):.0%} of the latents")

    step, elapsed = 0, 0.0
    ckpt = work / "diffusion.safetensors"
    if resume is not None:  # main's _checkpoint_info: read and checked before any stage ran
        tensors = load_file(ckpt)
        for i, p in enumerate(params):
            p.data.copy_(tensors[f"param.{i}"])
            ema[i].copy_(tensors[f"ema.{i}"])
        opt.load_state_dict(optimizer_from_tensors(tensors, resume, prefix="opt."))
        step, elapsed = int(resume["step"]), float(resume.get("minutes", 0.0))
        log(f"diffusion: resuming at step {step}")

    def save_checkpoint() -> None:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        tensors.update({f"ema.{i}": e.cpu().contiguous() for i, e in enumerate(ema)})
        opt_tensors, opt_rest = optimizer_to_tensors(opt.state_dict(), prefix="opt.")
        tensors.update(opt_tensors)
        minutes = elapsed + (time.time() - start) / 60
        unet_layout = [list(args.unet_channels), list(args.unet_layers)]
        info = {**opt_rest, "step": step, "minutes": minutes, "unet": unet_layout}
        save_checkpoint_file(tensors, ckpt, info)

    rng = np.random.default_rng([args.seed, 3, step])
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    unet.train()
    text_encoder.train()
    store = AttentionStore.attach(unet) if args.attn_weight > 0 else None
    forward = unet  # the module the loss calls; it shares its parameters with ``unet``
    if args.compile is not None:
        # torch.compile traces lazily: the first step compiles (counted in --max-minutes).
        forward = torch.compile(unet, backend=args.compile)
        log(f"diffusion: UNet compiled with {args.compile!r} (the first step compiles)")
    start = time.time()
    first = step
    losses: list[float] = []
    attn_losses: list[float] = []
    word_losses: list[float] = []
    while step < args.steps:
        if elapsed + (time.time() - start) / 60 > args.max_minutes:
            log(f"diffusion: --max-minutes {args.max_minutes} reached at step {step}")
            break
        idx = rng.integers(0, len(scenes), args.batch)
        x0 = latents_all[idx].float().to(device) * scale
        captions, triples = [], []  # triples: (batch index, token position, object index)
        for b, i in enumerate(idx):
            objects, setting = scenes[int(i)]
            if rng.random() < args.caption_dropout:
                captions.append("")
                continue
            keep = None if rng.random() < args.setting_dropout else setting
            words, positions = caption_tokens(objects, keep)
            captions.append(" ".join(words))
            triples += [(b, pos, j) for j, ps in enumerate(positions) for pos in ps]
        ids = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        # Noise and timesteps come from a CPU generator: the same run on any --device.
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = sample_timesteps(args.batch, gen, args.timestep_band, args.band_share).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if args.prediction_type == "epsilon":
            goal = noise
        else:  # v = sqrt(a) * noise - sqrt(1 - a) * x0
            goal = a.sqrt() * noise - (1 - a).sqrt() * x0
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args, elapsed + (time.time() - start) / 60)
        batch = DiffusionBatch(
            ids, noisy, t, goal, triples, masks_all[idx].float().to(device),
            outlines[idx].float().to(device) if outlines is not None else None,
        )  # fmt: skip
        loss, attn_loss, word_loss = diffusion_loss(
            text_encoder, forward, batch, args, store, weights
        )
        optimizer_step(opt, loss, params)
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step)) if args.ema > 0 else 0.0
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        attn_losses.append(attn_loss.item())
        word_losses.append(word_loss.item())
        if step % args.log_every == 0 or step == args.steps:
            per_step = (time.time() - start) / (step - first)
            log(
                f"diffusion step {step}/{args.steps} loss {np.mean(losses):.4f} "
                f"attn {np.mean(attn_losses):.4f} word {np.mean(word_losses):.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} "
                f"({per_step:.2f} s/step, ETA {per_step * (args.steps - step) / 60:.1f} min)"
            )
            losses, attn_losses, word_losses = [], [], []
        if step % args.save_every == 0:
            save_checkpoint()
    if store is not None:
        store.detach()
    save_checkpoint()
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    unet.eval().cpu()  # the pipeline is assembled and saved on the CPU
    text_encoder.eval().cpu()
    return unet, text_encoder, step


def _check_init_from(args: argparse.Namespace) -> None:
    """Refuse an ``--init-from`` folder that is not a toy pipeline of the requested UNet
    architecture, before any stage runs."""
    if args.init_from is None:
        return
    folder = Path(args.init_from)
    missing = [
        f"{part}/config.json"
        for part in ("vae", "unet", "text_encoder")
        if not (folder / part / "config.json").is_file()
    ]
    if missing:
        raise SystemExit(
            f"--init-from {folder}: not a saved pipeline folder (missing {', '.join(missing)}); "
            "pass the --output folder of an earlier run or the shipped toy model's folder."
        )
    config = json.loads((folder / "unet" / "config.json").read_text())
    layers = config["layers_per_block"]
    saved = (
        tuple(config["block_out_channels"]),
        tuple(layers if isinstance(layers, list) else [layers] * 3),
    )
    if saved != (tuple(args.unet_channels), tuple(args.unet_layers)):
        raise SystemExit(
            f"--init-from {folder}: its UNet has channels {list(saved[0])} and layers "
            f"{list(saved[1])}, which does not match --unet-channels {list(args.unet_channels)} "
            f"--unet-layers {list(args.unet_layers)}; pass its architecture."
        )


def _init_from_pipeline(folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Copy a saved toy pipeline's UNet and text-encoder weights into the fresh models (strict:
    another architecture is refused, naming the folder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    saved_unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    saved_text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    try:
        unet.load_state_dict(saved_unet.state_dict())
        text_encoder.load_state_dict(saved_text.state_dict())
    except RuntimeError as err:
        raise SystemExit(
            f"--init-from {folder}: its UNet or text encoder does not match --unet-channels "
            f"{unet.config.block_out_channels} --unet-layers {unet.config.layers_per_block} "
            f"({str(err).splitlines()[0]}); pass its architecture."
        ) from err
    log(f"diffusion: starting from the UNet and text encoder of {folder}")


def _word_identity_loss(
    text_encoder: torch.nn.Module, states: torch.Tensor, word_ids: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of object words' final hidden ``states`` (N, width) against the vocabulary's
    input embeddings, the right answer being each word's own id (``word_ids``, N): cosine
    similarity, temperature 0.1, tied to the embeddings as a language model's output layer is, so
    nothing new is trained or saved. It keeps the words the UNet must tell apart (star,
    triangle, ...) apart in the text encoder's output."""
    table = F.normalize(text_encoder.get_input_embeddings().weight, dim=-1)
    return F.cross_entropy(F.normalize(states, dim=-1) @ table.T / 0.1, word_ids)


def _classic_text_encoder_keys(path: Path) -> None:
    """Rewrite the text encoder's keys in the classic ``text_model.`` layout, in place.

    transformers >= 5.x saves ``CLIPTextModel`` without the ``text_model.`` prefix and reads both
    layouts, but transformers 5.0 (this package's lower bound) reads only the prefixed one and
    would silently start the text encoder from random weights.
    """
    tensors = load_file(path)
    classic = {
        k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()
    }
    save_file({k: v.contiguous() for k, v in classic.items()}, path, metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> Path:
    """Run all stages; returns the output folder.

    Example:
        >>> main(["--output", "/tmp/toy", "--steps", "2", "--vae-steps", "2",
        ...       "--num-images", "64"])  # doctest: +SKIP
    """
    from diffusers import StableDiffusionPipeline

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "breakscene_toy_work")
    work.mkdir(parents=True, exist_ok=True)
    resume = _checkpoint_info(args, work)  # one it cannot resume is refused before any stage
    _check_init_from(args)
    t0 = time.time()
    vae = train_vae(args, work)
    t_vae = time.time() - t0
    with torch.no_grad():  # deterministic: the same value again on a resumed run
        x = render_batch(np.random.default_rng([args.seed, 4]), 256)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"VAE latent std {std:.3f}: scaling_factor {1 / std:.3f}")
    cache = build_cache(args, work, vae)
    t_cache = time.time() - t0 - t_vae
    unet, text_encoder, steps = train_diffusion(args, work, vae, cache, resume)
    vae = finetune_decoder(args, work, vae)
    t_total = time.time() - t0

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=toy_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(args.prediction_type, args.zero_snr),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    with usual_permissions(out):
        pipe.save_pretrained(out, safe_serialization=True)
        _classic_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    info = {
        "command": "python -m diffusers_breakscene.toy.train_base "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (v if v != float("inf") else None) for k, v in vars(args).items()},
        "diffusion_steps": steps,
        "seconds": {"vae": round(t_vae), "cache": round(t_cache), "total": round(t_total)},
        "resolution": TOY_RESOLUTION,
        "heldout": {
            "shapes": sorted(HELDOUT_SHAPES),
            "patterns": sorted(HELDOUT_PATTERNS),
            "shape_colour_pairs": sorted(HELDOUT_PAIRS),
        },
    }
    (out / "toy_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved the pipeline to {out} ({steps} diffusion steps, {t_total / 60:.1f} min)")
    return out


if __name__ == "__main__":
    main()
