"""Train the toy-world evaluator (:mod:`diffusers_breakscene.toy.evaluator`) on rendered scenes.

Commands that produced the shipped weights (``diffusers_breakscene/assets/toy/evaluator``,
version 3; the first one is version 2 from scratch, the second continues its crop reader)::

    python -m diffusers_breakscene.toy.train_evaluator --output EV2 \\
        --num-scenes 60000 --crop-steps 5000 --crop-multi-share 0.33
    python -m diffusers_breakscene.toy.train_evaluator \\
        --output diffusers_breakscene/assets/toy/evaluator --init-from EV2 \\
        --steps 0 --embed-steps 0 --num-scenes 60000 --touching-scenes 30000 \\
        --crop-steps 4000 --crop-multi-share 0.4 --crop-context --crop-margin 3 --lr 2e-3

1. Render ``--num-scenes`` scenes with ``sample_scene(seed, split="any")`` (all shapes, colours,
   patterns and pairs, held-out ones included), seeds ``0 .. num_scenes - 1``; kept in memory.
2. Reader: AdamW, warmup + cosine decay, horizontal flips and mild pixel noise. Losses: BCE of
   the image-level presences (max over the 8x8 cells) against the scene's labels, BCE of every
   cell's presences against the labels of the objects covering >= 30% of the cell (labels of
   objects covering 0-30% of it are ignored there), cross-entropy of the setting and of the
   object count.
3. Embedder: every object's :func:`~diffusers_breakscene.toy.evaluator.crop_object` crop of the
   same scenes, cosine classifier over the 192 identities (scale 16, additive margin 0.15),
   flips and, on some crops, blur, colour drift and noise.
4. Crop reader: every :func:`~diffusers_breakscene.toy.evaluator.colour_regions` region of the
   same scenes and of ``--touching-scenes`` scenes of touching same-colour objects
   (:func:`region_crops`, :func:`touching_scene`), with its surroundings if ``--crop-context``,
   binary cross-entropy over the 24 (shape, pattern) pairs it holds, ``--crop-multi-share`` of
   each batch from regions of several objects; same augmentation.
5. Evaluate the saved evaluator on ``--test-scenes`` fresh scenes (seeds from 10,000,000, never
   used for training) and write the numbers into ``config.json`` (``metrics``).

Fixed seed (``--seed``), one thread by default (``--threads``), progress on stdout.

Example:
    >>> from diffusers_breakscene.toy.train_evaluator import main
    >>> main(["--output", "/tmp/ev", "--num-scenes", "64", "--steps", "3",
    ...       "--embed-steps", "3", "--test-scenes", "16"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..errors import InvalidArgumentError, fail
from .evaluator import (
    CONFIG_NAME,
    FORMAT,
    NUM_IDENTITIES,
    NUM_SHAPE_PATTERNS,
    SETTING_NAMES,
    VERSION,
    WEIGHTS_NAME,
    CropReader,
    EmbedNet,
    ReaderNet,
    ToyEvaluator,
    cell_log_probs,
    colour_regions,
    crop_object,
    identity_index,
    identity_label_table,
    presence_probs,
)
from .world import (
    COLOURS,
    DEFAULT_SIZE,
    MAX_OBJECTS,
    PATTERNS,
    SETTINGS,
    SHAPES,
    ToyObject,
    ToySample,
    _visible_enough,
    render_scene,
    sample_object,
    sample_scene,
)

__all__ = [
    "TEST_SEED_BASE",
    "TOUCHING_SEED_BASE",
    "SceneData",
    "evaluate",
    "main",
    "parse_args",
    "render_data",
    "touching_scene",
]

#: Seeds of evaluation scenes start here; training scenes use seeds below it.
TEST_SEED_BASE = 10_000_000
#: Seeds of the crop reader's extra scenes of touching same-colour objects (``--touching-scenes``).
TOUCHING_SEED_BASE = 40_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``).

    Example:
        >>> parse_args(["--output", "x"]).steps
        2000
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder for evaluator.safetensors/config.json")
    p.add_argument("--seed", type=int, default=0, help="torch seed (init, batches, augmentation)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--num-scenes", type=int, default=20000, help="rendered training scenes")
    p.add_argument("--steps", type=int, default=2000, help="reader optimisation steps")
    p.add_argument("--embed-steps", type=int, default=1000, help="embedder optimisation steps")
    p.add_argument("--batch-size", type=int, default=32, help="reader batch size")
    p.add_argument("--embed-batch-size", type=int, default=64)
    p.add_argument("--crop-steps", type=int, default=3000, help="crop reader optimisation steps")
    p.add_argument("--crop-batch-size", type=int, default=96)
    p.add_argument(
        "--crop-multi-share",
        type=float,
        default=0.25,
        help="share of each crop-reader batch drawn from regions of several touching objects",
    )
    p.add_argument(
        "--crop-context",
        action="store_true",
        help="the crop reader sees a region's surroundings too, not only the region (what covers "
        "an occluded object)",
    )
    p.add_argument("--crop-margin", type=int, default=1, help="pixels around a region's crop")
    p.add_argument(
        "--touching-scenes",
        type=int,
        default=0,
        help="extra scenes for the crop reader only, in which two objects of one colour touch "
        "(touching_scene, seeds from 40,000,000)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from the networks of this saved evaluator folder instead of random weights "
        "(then --steps 0 / --embed-steps 0 keep its reader / embedder as they are)",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-scenes", type=int, default=1000, help="evaluation scenes (0: none)")
    p.add_argument("--identity-trials", type=int, default=5000, help="(same, different) trials")
    p.add_argument("--rerender-trials", type=int, default=200, help="identity_similarity trials")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if not 0 < args.num_scenes < TEST_SEED_BASE:
        fail(InvalidArgumentError, f"--num-scenes {args.num_scenes}", "use 1 to 9,999,999")
    for name in ("steps", "embed_steps", "batch_size", "embed_batch_size", "threads"):
        least = 0 if args.init_from is not None and name in ("steps", "embed_steps") else 1
        if getattr(args, name) < least:
            fix = "raise it" if least else "raise it (0 keeps the --init-from network)"
            fail(InvalidArgumentError, f"--{name.replace('_', '-')} must be >= {least}", fix)
    if args.crop_steps < 0 or args.touching_scenes < 0 or args.crop_margin < 0:
        fail(
            InvalidArgumentError,
            "--crop-steps, --crop-margin and --touching-scenes must be >= 0",
            "raise it",
        )
    if args.init_from is not None and not (Path(args.init_from) / CONFIG_NAME).is_file():
        fail(
            InvalidArgumentError,
            f"--init-from {args.init_from}: no {CONFIG_NAME} there",
            "give the folder of a saved evaluator, e.g. diffusers_breakscene/assets/toy/evaluator",
        )
    if not 0 <= args.crop_multi_share < 1:
        fail(
            InvalidArgumentError,
            f"--crop-multi-share {args.crop_multi_share}",
            "use a share from 0 (no oversampling) to below 1",
        )
    return args


@dataclass
class SceneData:
    """Rendered scenes in memory: ``images`` uint8 ``(N, 64, 64, 3)``, ``owner`` int8
    ``(N, 64, 64)`` (index of the visible object, -1 for background), ``ids`` ``(N, 3)`` identity
    indices (192 = no object), ``setting`` and ``count`` ``(N,)``."""

    images: np.ndarray
    owner: np.ndarray
    ids: np.ndarray
    setting: np.ndarray
    count: np.ndarray


def render_data(
    seeds: range, log: Any = print, make: Callable[[int], ToySample] | None = None
) -> SceneData:
    """Render ``make(seed)`` (default ``sample_scene(seed, split="any")``) for every seed.

    Example:
        >>> render_data(range(2), log=lambda *a: None).images.shape
        (2, 64, 64, 3)
    """
    n = len(seeds)
    data = SceneData(
        images=np.zeros((n, 64, 64, 3), np.uint8),
        owner=np.full((n, 64, 64), -1, np.int8),
        ids=np.full((n, MAX_OBJECTS), NUM_IDENTITIES, np.int64),
        setting=np.zeros(n, np.int64),
        count=np.zeros(n, np.int64),
    )
    start = time.time()
    for i, seed in enumerate(seeds):
        s = make(seed) if make is not None else sample_scene(seed, split="any")
        data.images[i] = np.asarray(s.image)
        for k, (obj, mask) in enumerate(zip(s.objects, s.masks, strict=True)):
            data.owner[i][mask] = k
            data.ids[i, k] = identity_index(obj.shape, obj.colour, obj.pattern)
        data.setting[i] = SETTING_NAMES.index(s.setting)
        data.count[i] = len(s.objects)
        if (i + 1) % 4000 == 0 or i + 1 == n:
            log(f"render {i + 1}/{n} scenes  {time.time() - start:.0f}s")
    return data


def touching_scene(seed: int) -> ToySample:
    """A scene in which two objects of one colour touch or overlap (a quarter of the time the
    same object twice), with a third object of any colour in 3 scenes of 10; every object keeps
    at least 40% of its area visible. Such objects often make one :func:`colour_regions` region,
    which the crop reader must read as two objects; in ``sample_scene`` they are rare.

    Example:
        >>> s = touching_scene(TOUCHING_SEED_BASE)
        >>> len({o.colour for o in s.objects[:2]}) if len(s.objects) == 2 else 1
        1
    """
    rng = np.random.default_rng(seed)
    while True:
        setting = str(rng.choice(list(SETTINGS)))
        a, b = sample_object(rng, "any"), sample_object(rng, "any")
        if rng.random() < 0.25:
            b = replace(b, shape=a.shape, pattern=a.pattern)
        b = replace(b, colour=a.colour)
        # centres closer than the sum of the bounding radii: the outlines touch or overlap
        angle = rng.uniform(0.0, 2 * math.pi)
        dist = (a.size + b.size) / 2 * rng.uniform(0.5, 0.95)
        centre = (a.center[0] + dist * math.cos(angle), a.center[1] + dist * math.sin(angle))
        if not all(b.size * 0.4 <= c <= 1 - b.size * 0.4 for c in centre):
            continue
        objects = [a, replace(b, center=(float(centre[0]), float(centre[1])))]
        if rng.random() < 0.3:
            objects.insert(int(rng.integers(0, 3)), sample_object(rng, "any"))
        sample = render_scene(objects, setting, background_seed=int(rng.integers(0, 2**31)))
        if _visible_enough(sample, DEFAULT_SIZE):  # sample_scene's rule
            return sample


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 30)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _augment(x: torch.Tensor, gen: torch.Generator, *extra: torch.Tensor) -> list[torch.Tensor]:
    """Flip half the batch horizontally (with ``extra`` per-pixel tensors), add noise to half."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    out = [torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t) for t in (x, *extra)]
    noisy = (torch.rand(len(x), generator=gen) < 0.5).float().view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen) * 0.02 * noisy
    out[0] = out[0] + noise
    return out


def train_reader(reader: ReaderNet, data: SceneData, args: argparse.Namespace, log: Any) -> None:
    """Optimise ``reader`` on ``data`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    table = identity_label_table()
    opt = torch.optim.AdamW(reader.parameters(), lr=args.lr, weight_decay=1e-4)
    reader.train()
    n, start, hist = len(data.images), time.time(), []
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(args.steps):
        if pos + args.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + args.batch_size].numpy()
        pos += args.batch_size
        img = torch.from_numpy(data.images[idx]).permute(0, 3, 1, 2).float() / 255.0
        own = torch.from_numpy(data.owner[idx]).long()
        img, own = _augment(img, gen, own)
        ids = torch.from_numpy(data.ids[idx])  # (B, 3), 192 = none
        onehot = (own[:, None] == torch.arange(MAX_OBJECTS)[None, :, None, None]).float()
        cover = F.avg_pool2d(onehot, 4)  # (B, 3, 16, 16)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr)
        cells, setting_logits, count_logits = reader(img.contiguous())
        log_bg, log_obj, ls, lc, lp = cell_log_probs(cells)
        real = ids.clamp(max=NUM_IDENTITIES - 1)
        shape_i, colour_i, pattern_i = real // 32, (real // 4) % 8, real % 4
        log_ident = (
            log_obj[:, None] + _pick(ls, shape_i) + _pick(lc, colour_i) + _pick(lp, pattern_i)
        )
        l_cell = -((1.0 - cover.sum(1)) * log_bg + (cover * log_ident).sum(1)).mean()
        l_setting = F.cross_entropy(setting_logits, torch.from_numpy(data.setting[idx]))
        l_count = F.cross_entropy(count_logits, torch.from_numpy(data.count[idx] - 1))
        loss = l_cell + l_setting + l_count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                image_t = table[ids].amax(1)
                exact = ((presence_probs(cells) > 0.5).float() == image_t).all(1).float().mean()
        else:
            exact = torch.tensor(float("nan"))
        hist.append([loss.item(), l_cell.item(), l_setting.item(), l_count.item(), exact.item()])
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            h = np.mean(hist[-args.log_every :], axis=0)
            log(
                f"reader {step + 1}/{args.steps}  loss {h[0]:.4f}  cell {h[1]:.4f}  "
                f"setting {h[2]:.4f}  count {h[3]:.4f}  labels exact (this batch) "
                f"{hist[-1][4]:.3f}  {time.time() - start:.0f}s"
            )
    reader.eval()


def _pick(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``logp[b, index[b, i], h, w]`` as ``(B, I, H, W)``."""
    return logp.gather(1, index[:, :, None, None].expand(-1, -1, *logp.shape[-2:]))


def object_crops(data: SceneData) -> tuple[torch.Tensor, torch.Tensor]:
    """Every object's crop (uint8 ``(M, 4, 32, 32)``) and identity ``(M,)``."""
    crops, ids = [], []
    for i in range(len(data.images)):
        image = data.images[i].astype(np.float32) / 255.0
        for k in range(MAX_OBJECTS):
            if data.ids[i, k] < NUM_IDENTITIES:
                crops.append(crop_object(image, data.owner[i] == k))
                ids.append(int(data.ids[i, k]))
    stacked = (torch.stack(crops) * 255).round().to(torch.uint8)
    return stacked, torch.tensor(ids)


def region_crops(
    data: SceneData, log: Any = print, context: bool = False, margin: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop reader's training set: every :func:`colour_regions` region of every scene (with
    its true setting), as a uint8 crop ``(M, 4, 32, 32)``, and multi-hot (shape, pattern) labels
    ``(M, 24)``: an object belongs to a region that holds at least 8 of its visible pixels and at
    least 20% of the region. ``context`` and ``margin``: see
    :func:`~diffusers_breakscene.toy.evaluator.crop_object`.

    Example:
        >>> data = render_data(range(4), log=lambda *a: None)
        >>> crops, labels = region_crops(data, log=lambda *a: None)
        >>> crops.shape[1:], labels.shape[1], crops.dtype
        (torch.Size([4, 32, 32]), 24, torch.uint8)
    """
    crops, labels = [], []
    start = time.time()
    for i in range(len(data.images)):
        image = data.images[i].astype(np.float32) / 255.0
        setting = SETTING_NAMES[int(data.setting[i])]
        for region, _ in colour_regions(image, setting):
            label = torch.zeros(NUM_SHAPE_PATTERNS)
            area = int(region.sum())
            for k in range(MAX_OBJECTS):
                ident = int(data.ids[i, k])
                if ident >= NUM_IDENTITIES:
                    continue
                inside = int((region & (data.owner[i] == k)).sum())
                if inside >= 8 and inside >= 0.2 * area:
                    label[(ident // 32) * 4 + ident % 4] = 1.0
            if label.any():
                crops.append(crop_object(image, region, context=context, margin=margin))
                labels.append(label)
        if (i + 1) % 5000 == 0 or i + 1 == len(data.images):
            log(f"regions {i + 1}/{len(data.images)} scenes  {time.time() - start:.0f}s")
    stacked = (torch.stack(crops) * 255).round().to(torch.uint8)
    return stacked, torch.stack(labels)


def _augment_crops(x: torch.Tensor, gen: torch.Generator, context: bool = False) -> torch.Tensor:
    """Flips, and on some crops the blur, colour drift and noise of generated images (outside
    the mask too with ``context``; otherwise the outside stays black)."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    rgb, mask = x[:, :3], x[:, 3:]
    blur = (torch.rand(len(x), generator=gen) < 0.3).view(-1, 1, 1, 1)
    rgb = torch.where(blur, F.avg_pool2d(rgb, 3, 1, 1, count_include_pad=False), rgb)
    drift = (torch.rand(len(x), generator=gen) < 0.5).float().view(-1, 1, 1, 1)
    gain = 1 + drift * 0.08 * torch.randn(len(x), 3, 1, 1, generator=gen)
    noise = drift * 0.03 * torch.randn(rgb.shape, generator=gen)
    rgb = rgb * gain + noise
    return torch.cat([(rgb if context else rgb * mask).clamp(0, 1), mask], 1)


def _fit_on_crops(
    net: torch.nn.Module,
    name: str,
    score_name: str,
    crops: torch.Tensor,
    steps: int,
    seed: int,
    draw: Callable[[torch.Generator], torch.Tensor],
    loss_and_score: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    args: argparse.Namespace,
    log: Any,
    context: bool = False,
) -> None:
    """The loop both crop networks train with: AdamW, warmup + cosine decay, each step a batch
    of ``draw(gen)`` indices into the uint8 ``crops``, augmented; ``loss_and_score(x, idx)``
    gives the loss and a score logged as ``score_name``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    net.train()
    start, hist = time.time(), []
    for step in range(steps):
        idx = draw(gen)
        x = _augment_crops(crops[idx].float() / 255.0, gen, context)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, args.lr)
        loss, score = loss_and_score(x, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append((loss.item(), score.item()))
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            h = np.mean(hist[-args.log_every :], axis=0)
            log(
                f"{name} {step + 1}/{steps}  loss {h[0]:.4f}  {score_name} {h[1]:.3f}  "
                f"{time.time() - start:.0f}s"
            )
    net.eval()


def train_crop_reader(
    net: CropReader, crops: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, log: Any
) -> None:
    """Optimise ``net`` with binary cross-entropy on :func:`region_crops` (``--crop-multi-share``
    of each batch from the regions of several objects)."""
    n = len(crops)
    # Regions of several touching objects are ~3% of all: a share of each batch is drawn from
    # them, or the reader learns to name one object per region.
    multi = torch.nonzero(labels.sum(1) > 1)[:, 0]
    n_multi = round(args.crop_batch_size * args.crop_multi_share) if len(multi) else 0

    def draw(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (args.crop_batch_size - n_multi,), generator=gen)
        if n_multi:
            idx = torch.cat([idx, multi[torch.randint(0, len(multi), (n_multi,), generator=gen)]])
        return idx

    def loss_and_score(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, target = net(x), labels[idx]
        exact = ((logits > 0).float() == target).all(1).float().mean()  # every pair right
        return F.binary_cross_entropy_with_logits(logits, target), exact

    _fit_on_crops(
        net, "crop reader", "exact", crops, args.crop_steps, args.seed + 3, draw, loss_and_score,
        args, log, args.crop_context,
    )  # fmt: skip


def train_embedder(
    embedder: EmbedNet, crops: torch.Tensor, ids: torch.Tensor, args: argparse.Namespace, log: Any
) -> None:
    """Optimise ``embedder`` as a cosine classifier with an additive margin."""
    n = len(crops)

    def draw(gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, n, (args.embed_batch_size,), generator=gen)

    def loss_and_score(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, target = embedder.logits(embedder(x)), ids[idx]
        margin = F.one_hot(target, NUM_IDENTITIES).float() * (16.0 * 0.15)
        accuracy = (logits.argmax(1) == target).float().mean()
        return F.cross_entropy(logits - margin, target), accuracy

    _fit_on_crops(
        embedder, "embedder", "acc", crops, args.embed_steps, args.seed + 2, draw, loss_and_score,
        args, log,
    )  # fmt: skip


def evaluate(
    ev: ToyEvaluator,
    num_scenes: int = 1000,
    identity_trials: int = 5000,
    rerender_trials: int = 200,
    seed_base: int = TEST_SEED_BASE,
    log: Any = print,
) -> dict[str, Any]:
    """Measure ``ev`` on ``num_scenes`` scenes ``sample_scene(seed_base + i, split="any")``.

    * ``image_accuracy``: share of images whose true caption gets ``all_ok`` from
      :meth:`~ToyEvaluator.prompt_accuracy` (every object's shape, colour and pattern and the
      setting right); also per number of objects and per attribute (share of objects).
    * ``identity_pair_accuracy``: over random trials (anchor crop, crop of the same identity
      from another scene, crop of another identity), the share where the same-identity cosine
      is higher (ties count half); ``..._hard``: the other identity differs in one attribute.
    * ``rerender_accuracy``: :meth:`~ToyEvaluator.identity_similarity` of a test object against
      the same object re-rendered alone (new size, position, angle, setting) beats the same
      with a different identity in its place.

    Example:
        >>> evaluate(default_evaluator(), 20, 50, 5)["image_accuracy"] > 0.9  # doctest: +SKIP
        True
    """
    samples = [sample_scene(seed_base + i, split="any") for i in range(num_scenes)]
    readings = ev.read_images([s.image for s in samples])
    per_n: dict[int, list[bool]] = {1: [], 2: [], 3: []}
    attr: dict[str, list[bool]] = {a: [] for a in ("shape", "colour", "pattern")}
    attr_n: dict[str, list[bool]] = {}
    setting_ok, count_ok = [], []
    for s, r in zip(samples, readings, strict=True):
        score = ev.prompt_accuracy(r, s.caption)
        per_n[len(s.objects)].append(score.all_ok)
        setting_ok.append(bool(score.setting_ok))
        count_ok.append(score.count_ok)
        for o in score.objects:
            for a in attr:
                ok = bool(getattr(o, f"{a}_ok"))
                attr[a].append(ok)
                attr_n.setdefault(f"{a}_{len(s.objects)}obj", []).append(ok)
    all_images = [ok for v in per_n.values() for ok in v]
    metrics: dict[str, Any] = {
        "test_scenes": num_scenes,
        "test_seeds": [seed_base, seed_base + num_scenes - 1],
        "image_accuracy": float(np.mean(all_images)),
        "image_accuracy_by_objects": {str(k): float(np.mean(v)) for k, v in per_n.items() if v},
        "images_by_objects": {str(k): len(v) for k, v in per_n.items()},
        "setting_accuracy": float(np.mean(setting_ok)),
        "count_accuracy": float(np.mean(count_ok)),
        "attribute_accuracy": {a: float(np.mean(v)) for a, v in attr.items()},
        "attribute_accuracy_by_objects": {k: float(np.mean(v)) for k, v in sorted(attr_n.items())},
    }
    log(f"image accuracy {metrics['image_accuracy']:.4f}  {metrics['attribute_accuracy']}")

    # identity on known masks
    crops, ids, scene_of = [], [], []
    for i, s in enumerate(samples):
        arr = np.asarray(s.image, dtype=np.float32) / 255.0
        for obj, mask in zip(s.objects, s.masks, strict=True):
            crops.append(crop_object(arr, mask))
            ids.append(identity_index(obj.shape, obj.colour, obj.pattern))
            scene_of.append(i)
    emb = ev.embed_crops(torch.stack(crops))
    sim = (emb @ emb.T).numpy()
    ids_a, scene_a = np.array(ids), np.array(scene_of)
    same = (ids_a[:, None] == ids_a[None]) & (scene_a[:, None] != scene_a[None])
    diff = ids_a[:, None] != ids_a[None]
    words = [np.array([_words(k)[j] for k in ids_a]) for j in range(3)]
    differing = sum((w[:, None] != w[None]).astype(int) for w in words)
    rng = np.random.default_rng(0)
    anchors = np.nonzero(same.any(1))[0]
    wins, hard_wins = [], []
    for _ in range(identity_trials if len(anchors) else 0):
        a = int(rng.choice(anchors))
        p = int(rng.choice(np.nonzero(same[a])[0]))
        n = int(rng.choice(np.nonzero(diff[a])[0]))
        wins.append(1.0 if sim[a, p] > sim[a, n] else 0.5 if sim[a, p] == sim[a, n] else 0.0)
        hard = np.nonzero(diff[a] & (differing[a] == 1))[0]
        if len(hard):
            h = int(rng.choice(hard))
            hard_wins.append(1.0 if sim[a, p] > sim[a, h] else 0.0)
    metrics.update(
        identity_pair_accuracy=float(np.mean(wins)) if wins else None,
        identity_pair_accuracy_hard=float(np.mean(hard_wins)) if hard_wins else None,
        identity_mean_cosine_same=float(sim[same].mean()) if same.any() else None,
        identity_mean_cosine_different=float(sim[diff].mean()),
        identity_crops=len(crops),
    )
    log(
        f"identity pairs {metrics['identity_pair_accuracy']}  hard "
        f"{metrics['identity_pair_accuracy_hard']}  same {metrics['identity_mean_cosine_same']}"
        f"  different {metrics['identity_mean_cosine_different']:.3f}"
    )

    # identity_similarity on re-rendered objects (no mask known for the generated image)
    rwins, same_sims, diff_sims = [], [], []
    for t in range(min(rerender_trials, len(crops))):
        i = int(rng.integers(len(crops)))
        s = samples[scene_a[i]]
        k = [j for j in range(len(crops)) if scene_a[j] == scene_a[i]].index(i)
        obj = s.objects[k]
        moved = replace(
            obj,
            size=float(rng.uniform(0.25, 0.5)),
            center=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
            angle=float(rng.uniform(-25, 25)),
        )
        while True:
            other = replace(
                moved,
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                pattern=str(rng.choice(PATTERNS)),
            )
            if (other.shape, other.colour, other.pattern) != (obj.shape, obj.colour, obj.pattern):
                break
        setting = str(rng.choice([x for x in SETTINGS if x != s.setting]))
        a = ev.identity_similarity(_render(moved, setting, t), s.image, s.masks[k])
        b = ev.identity_similarity(_render(other, setting, t), s.image, s.masks[k])
        rwins.append(a > b)
        same_sims.append(a)
        diff_sims.append(b)
    if rwins:
        metrics.update(
            rerender_accuracy=float(np.mean(rwins)),
            rerender_mean_same=float(np.mean(same_sims)),
            rerender_mean_different=float(np.mean(diff_sims)),
            rerender_trials=len(rwins),
        )
        log(f"re-render identity {metrics['rerender_accuracy']:.4f}")
    return metrics


def _flag(name: str, value: Any) -> str:
    """``name=value`` as it is typed: ``--crop-context`` for a true switch, nothing for a false
    one or an unset option, ``--lr 0.002`` otherwise."""
    if value is None or value is False:
        return ""
    return f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")


def _words(index: int) -> tuple[str, str, str]:
    s, rest = divmod(index, len(COLOURS) * len(PATTERNS))
    c, p = divmod(rest, len(PATTERNS))
    return SHAPES[s], list(COLOURS)[c], PATTERNS[p]


def _render(obj: ToyObject, setting: str, seed: int) -> Any:
    return render_scene([obj], setting, background_seed=seed).image


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, save and evaluate; returns the saved config (with ``metrics``).

    Example:
        >>> main(["--output", "/tmp/ev", "--num-scenes", "64", "--steps", "3",
        ...       "--embed-steps", "3", "--test-scenes", "16"])  # doctest: +SKIP
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    reader_cfg = {"widths": [32, 48, 96], "hidden": 128}
    embed_cfg = {"widths": [32, 64, 96], "dim": 128}
    crop_cfg = {"widths": [32, 64, 96], "hidden": 128}
    previous = None
    if args.init_from is not None:
        start_from = ToyEvaluator.load(args.init_from)
        previous = start_from.config
        reader_cfg, embed_cfg = previous["reader"], previous["embedder"]
        crop_cfg = previous["crop_reader"]
        reader, embedder = start_from.reader, start_from.embedder
        crop_reader = start_from.crop_reader
        log(f"networks from {args.init_from}")
    else:
        reader, embedder = ReaderNet(**reader_cfg), EmbedNet(**embed_cfg)
        crop_reader = CropReader(**crop_cfg)
    times: dict[str, float] = {}

    t = time.time()
    data = render_data(range(args.num_scenes), log)
    times["render_s"] = time.time() - t
    t = time.time()
    if args.steps:
        train_reader(reader.to(memory_format=torch.channels_last), data, args, log)
    times["reader_s"] = time.time() - t
    t = time.time()
    if args.embed_steps:
        crops, ids = object_crops(data)
        log(f"{len(crops)} object crops")
        train_embedder(embedder, crops, ids, args, log)
    times["embedder_s"] = time.time() - t
    t = time.time()
    if args.crop_steps:
        view = {"context": args.crop_context, "margin": args.crop_margin}
        rcrops, rlabels = region_crops(data, log, **view)
        if args.touching_scenes:
            touching = range(TOUCHING_SEED_BASE, TOUCHING_SEED_BASE + args.touching_scenes)
            tdata = render_data(touching, log, touching_scene)
            tcrops, tlabels = region_crops(tdata, log, **view)
            rcrops, rlabels = torch.cat([rcrops, tcrops]), torch.cat([rlabels, tlabels])
        multi_share = float(rlabels.sum(1).gt(1).float().mean())
        log(f"{len(rcrops)} region crops, {multi_share:.3f} multi-object")
        train_crop_reader(crop_reader, rcrops, rlabels, args, log)
    times["crop_reader_s"] = time.time() - t

    state = {f"reader.{k}": v.contiguous() for k, v in reader.state_dict().items()}
    state.update({f"embedder.{k}": v.contiguous() for k, v in embedder.state_dict().items()})
    state.update({f"crop_reader.{k}": v.contiguous() for k, v in crop_reader.state_dict().items()})
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "reader": reader_cfg,
        "embedder": embed_cfg,
        "crop_reader": crop_cfg,
        "min_area": 12,
        "crop_threshold": 0.5,
        # an identity read in two regions is one object only if the regions join (evaluator.py)
        "merge": "connected",
        "crop_context": args.crop_context,
        "crop_margin": args.crop_margin,
        "training": {
            "command": "python -m diffusers_breakscene.toy.train_evaluator "
            + " ".join(filter(None, (_flag(k, v) for k, v in sorted(vars(args).items())))),
            "train_seeds": [0, args.num_scenes - 1],
            "split": "any",
            "torch": torch.__version__,
            "times_s": times,
            "total_train_s": round(sum(times.values()), 1),
        },
    }
    if previous is not None:
        # what the starting networks were trained with, so the whole recipe stays on record
        config["training"]["init_from"] = {
            "path": str(args.init_from),
            "training": previous.get("training"),
            "metrics": previous.get("metrics"),
        }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log(f"saved {out / WEIGHTS_NAME} ({(out / WEIGHTS_NAME).stat().st_size / 1e6:.2f} MB)")

    if args.test_scenes > 0:
        t = time.time()
        metrics = evaluate(
            ToyEvaluator.load(out),
            args.test_scenes,
            args.identity_trials,
            args.rerender_trials,
            log=log,
        )
        metrics["evaluate_s"] = round(time.time() - t, 1)
        config["metrics"] = metrics
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        log(json.dumps(metrics, indent=2))
    log("done")
    return config


if __name__ == "__main__":
    main()
