"""The toy model's autoencoder stages, run by :mod:`~diffusers_breakscene.toy.train_base`: the
VAE (stage 1), the latent cache of rendered training scenes with their latent/4 object masks
(stage 2) and the decoder fine-tuning (stage 4). Each resumes from the work folder.

Example:
    >>> import numpy as np
    >>> from diffusers_breakscene.toy.train_latents import render_batch
    >>> render_batch(np.random.default_rng(0), 2).shape
    torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_write
from .model import TOY_RESOLUTION, build_vae
from .world import MAX_OBJECTS, ToyObject, sample_scene

__all__ = [
    "attention_masks",
    "build_cache",
    "decayed_lr",
    "finetune_decoder",
    "log",
    "optimizer_step",
    "read_checkpoint_info",
    "render_batch",
    "save_checkpoint_file",
    "save_model_folder",
    "train_vae",
]

GRID = TOY_RESOLUTION // 8  # latent / 4


def log(msg: str) -> None:
    """Print ``msg`` with the time of day (the training stages' progress lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """``n`` rendered training scenes as a ``(n, 3, 64, 64)`` batch in [-1, 1]."""
    arrays = [np.asarray(sample_scene(rng, "train").image) for _ in range(n)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def save_model_folder(model: Any, folder: Path) -> None:
    """``model.save_pretrained(folder)`` in one move: saved beside ``folder`` and renamed into
    place, so a run killed while saving leaves no half-written folder for the next run to resume
    from (the stages resume from any folder holding a ``config.json``, which diffusers writes
    before the weights).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from diffusers_breakscene.toy.model import build_vae
        >>> from diffusers_breakscene.toy.train_latents import save_model_folder
        >>> work = Path(tempfile.mkdtemp())
        >>> save_model_folder(build_vae(), work / "vae")
        >>> sorted(p.name for p in work.iterdir()), (work / "vae" / "config.json").is_file()
        (['vae'], True)
    """
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)  # at most a partial folder of an older version
    os.replace(partial, folder)


def save_checkpoint_file(tensors: dict[str, torch.Tensor], path: Path, info: dict) -> None:
    """Write ``tensors`` to ``path`` atomically with ``info`` in the file's own metadata, so
    the step count and the weights can never disagree, then ``info`` again as ``path``'s
    ``.json`` sibling for people and older readers.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from diffusers_breakscene.toy.train_latents import (
        ...     read_checkpoint_info, save_checkpoint_file)
        >>> path = Path(tempfile.mkdtemp()) / "diffusion.safetensors"
        >>> save_checkpoint_file({"w": torch.ones(2)}, path, {"step": 100})
        >>> read_checkpoint_info(path)
        {'step': 100}
    """
    text = json.dumps(info)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"info": text}), "checkpoint")
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text), "checkpoint info")


def read_checkpoint_info(path: Path) -> dict | None:
    """The ``info`` :func:`save_checkpoint_file` stored with ``path``; for a checkpoint written
    before the info moved into the file, its ``.json`` sibling; ``None`` when there is none."""
    if path.is_file():
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "info" in meta:
            return json.loads(meta["info"])
    sibling = path.with_suffix(".json")
    return json.loads(sibling.read_text()) if sibling.is_file() else None


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list) -> None:
    """One step of every toy training stage: backward, gradients clipped to norm 1, ``opt``.

    Example:
        >>> import torch
        >>> from diffusers_breakscene.toy.train_latents import optimizer_step
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> optimizer_step(torch.optim.SGD([w], lr=0.1), (w**2).sum(), [w])
        >>> w.detach().tolist()  # the gradient (2, 2) clipped to norm 1
        [0.9292893409729004, 0.9292893409729004]
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def decayed_lr(
    peak: float,
    progress: float,
    form: str = "cosine",
    floor: float = 0.1,
    decay_share: float = 0.2,
) -> float:
    """The learning rate ``progress`` (0 to 1) of the way through a decay from ``peak`` to
    ``floor * peak``: ``"cosine"``, ``"linear"``, or ``"wsd"`` (``peak`` held, then linear over
    the last ``decay_share``). The toy stages set it by hand because the diffusion stage's
    progress is the larger of steps and wall time, which a step-indexed scheduler such as
    ``diffusers.optimization.get_scheduler`` lacks.

    Example:
        >>> from diffusers_breakscene.toy.train_latents import decayed_lr
        >>> decayed_lr(1.0, 0.5), decayed_lr(1.0, 0.5, "linear", floor=0.0)
        (0.55, 0.5)
        >>> decayed_lr(1.0, 0.7, "wsd", floor=0.0, decay_share=0.2), decayed_lr(1.0, 1.0)
        (1.0, 0.1)
    """
    if form == "linear":
        shape = 1.0 - progress
    elif form == "wsd":
        shape = min(1.0, (1.0 - progress) / decay_share)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (floor + (1 - floor) * shape)


def _log_reconstruction(
    stage: str, step: int, total: int, loss: torch.Tensor, mse: torch.Tensor, start: float
) -> None:
    psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))  # images in [-1, 1]: peak-to-peak 2
    log(
        f"{stage} step {step}/{total} loss {loss.item():.4f} PSNR {psnr:.1f} dB "
        f"({(time.time() - start) / step:.2f} s/step)"
    )


# -- stage 1: VAE -----------------------------------------------------------------------------


def train_vae(args: argparse.Namespace, work: Path) -> torch.nn.Module:
    """Stage 1: train the VAE (or resume it from ``work``) on random crops of training scenes;
    returns it in eval mode."""
    from diffusers import AutoencoderKL

    folder = work / "vae"
    if (folder / "config.json").is_file():
        log(f"VAE: resuming from {folder}")
        return AutoencoderKL.from_pretrained(folder)
    if args.init_from is not None:  # its latent space: the UNet being continued was trained in it
        log(f"VAE: taken from {args.init_from}")
        vae = AutoencoderKL.from_pretrained(Path(args.init_from) / "vae")
        save_model_folder(vae, folder)
        return vae
    torch.manual_seed(args.seed)
    vae = build_vae()
    vae.train()
    rng = np.random.default_rng([args.seed, 1])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    crop = TOY_RESOLUTION // 2
    start = time.time()
    for step in range(1, args.vae_steps + 1):
        x = render_batch(rng, args.vae_batch)
        oy, ox = (int(v) * 2 for v in rng.integers(0, (TOY_RESOLUTION - crop) // 2 + 1, 2))
        x = x[:, :, oy : oy + crop, ox : ox + crop]
        lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, args.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = max(lr, args.vae_lr * 0.05)
        posterior = vae.encode(x).latent_dist
        # The decoder sees the posterior mean (what the latent cache and the UNet use); the tiny
        # KL term only keeps the latent scale tame.
        recon = vae.decode(posterior.mode()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer_step(opt, loss, list(vae.parameters()))
        if step % args.log_every == 0 or step == args.vae_steps:
            _log_reconstruction("VAE", step, args.vae_steps, loss, mse, start)
    vae.eval()
    save_model_folder(vae, folder)
    return vae


def finetune_decoder(args: argparse.Namespace, work: Path, vae: torch.nn.Module) -> torch.nn.Module:
    """Stage 4: fine-tune the VAE decoder on whole images with the encoder frozen.

    The latent space (and so the UNet) is unchanged; the decoder gets sharper and its colours
    truer. Latents get a little noise (5% of their std) so the decoder tolerates imperfect UNet
    samples. Resumes from ``work/vae_decoder`` when that exists.
    """
    from diffusers import AutoencoderKL

    folder = work / "vae_decoder"
    if (folder / "config.json").is_file():
        log(f"decoder: resuming from {folder}")
        tuned = AutoencoderKL.from_pretrained(folder)
        tuned.register_to_config(scaling_factor=vae.config.scaling_factor)
        return tuned.eval()
    if args.decoder_steps <= 0:
        return vae
    torch.manual_seed(args.seed + 5)
    vae.requires_grad_(False)
    decoder_params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder_params, lr=args.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng([args.seed, 5])
    vae.train()
    start = time.time()
    for step in range(1, args.decoder_steps + 1):
        x = render_batch(rng, args.decoder_batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            z = z + 0.05 * z.std() * torch.randn_like(z)
        for g in opt.param_groups:
            g["lr"] = decayed_lr(args.decoder_lr, step / args.decoder_steps)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x)
        optimizer_step(opt, loss, decoder_params)
        if step % args.log_every == 0 or step == args.decoder_steps:
            _log_reconstruction("decoder", step, args.decoder_steps, loss, mse, start)
    vae.eval()
    vae.requires_grad_(True)
    save_model_folder(vae, folder)
    return vae


# -- stage 2: latent cache --------------------------------------------------------------------


def attention_masks(masks: list[np.ndarray]) -> torch.Tensor:
    """A scene's object masks (64x64 booleans) at the attention level the losses read: each
    object's share of every latent/4 cell, ``(MAX_OBJECTS, 8, 8)`` float32, zeros for objects
    the scene does not have.

    Example:
        >>> from diffusers_breakscene.toy.train_latents import attention_masks
        >>> from diffusers_breakscene.toy.world import sample_scene
        >>> scene = sample_scene(0, "train")
        >>> grid = attention_masks(scene.masks)
        >>> tuple(grid.shape), bool(grid[len(scene.masks):].eq(0).all())
        ((3, 8, 8), True)
    """
    grid = torch.zeros(MAX_OBJECTS, GRID, GRID)
    for j, m in enumerate(masks):
        small = torch.from_numpy(m.astype(np.float32))[None, None]
        grid[j] = F.adaptive_avg_pool2d(small, GRID)[0, 0]
    return grid


def build_cache(args: argparse.Namespace, work: Path, vae: torch.nn.Module) -> dict:
    """Stage 2: render ``args.num_images`` training scenes and cache their latents (posterior
    means) and :func:`attention_masks` in ``work`` (read back when the count and seed match);
    returns ``{"latents", "masks", "scenes"}``."""
    path, meta_path = work / "cache.safetensors", work / "cache.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["num_images"] == args.num_images and meta["seed"] == args.seed:
            log(f"cache: resuming from {path}")
            tensors = load_file(path)
            scenes = [
                ([ToyObject(**{**o, "center": tuple(o["center"])}) for o in objs], setting)
                for objs, setting in meta["scenes"]
            ]
            return {**tensors, "scenes": scenes}
    rng = np.random.default_rng([args.seed, 2])
    n = args.num_images
    latents = torch.empty(n, 4, TOY_RESOLUTION // 2, TOY_RESOLUTION // 2, dtype=torch.float16)
    masks = torch.zeros(n, MAX_OBJECTS, GRID, GRID, dtype=torch.float16)
    scenes = []
    start = time.time()
    chunk = 256
    for lo in range(0, n, chunk):
        samples = [sample_scene(rng, "train") for _ in range(min(chunk, n - lo))]
        x = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples]))
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            latents[lo : lo + len(samples)] = vae.encode(x).latent_dist.mean.half()
        for k, s in enumerate(samples):
            masks[lo + k] = attention_masks(s.masks).half()
            scenes.append((list(s.objects), s.setting))
        if (lo // chunk) % 10 == 0:
            log(f"cache: {lo + len(samples)}/{n} images ({time.time() - start:.0f} s)")
    # Both files atomically, tensors first: a run killed in between leaves either no
    # cache.json (rendered again) or one of the same count and seed, hence the same scenes.
    atomic_write(path, lambda tmp: save_file({"latents": latents, "masks": masks}, tmp), "cache")
    meta = {
        "num_images": n,
        "seed": args.seed,
        "scenes": [([o.__dict__ for o in objs], setting) for objs, setting in scenes],
    }
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)), "cache info")
    return {"latents": latents, "masks": masks, "scenes": scenes}
