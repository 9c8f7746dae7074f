"""Fidelity in the toy world: our recipe against the paper's, handles only, weights only, and
four ablations, all on the same step budget, scenes, seeds and prompts.

    python benchmarks/fidelity.py          # 12 scenes x seeds 0-2, 400 + 400 steps (~4-5 h)
    python benchmarks/fidelity.py --quick  # scene 0 x seeds 0, 1, 75 + 75 steps (~11 min)
    python benchmarks/fidelity.py --smoke  # scene 0 x seed 0, 2 + 2 steps (~25 s; the tests)

Modes (:data:`MODES`; times on 2 CPU cores): full: the 12 evaluation scenes x seeds 0, 1, 2,
400 + 400 steps, 25 inference steps, curve every 50 steps on seed 0, 10 class images. Quick:
scene 0 (two objects) x seeds 0, 1, 75 + 75 steps, 25 inference steps, curve every 25 steps on
seed 0, 4 class images. Smoke: scene 0 x seed 0, 2 + 2 steps, 2 inference steps, only the first
one- and two-handle prompt template, curve every 2 steps, 1 class image, 1 draw for
``iou_scene``: every variant and every column, no meaningful number.

Variants (:func:`variant_configs`; every one trains ``phase1_steps + phase2_steps`` steps in all):

* ``ours``: :func:`~diffusers_breakscene.toy.experiment.toy_config` (the default recipe scaled to
  the toy model: 64 px, LoRA rank 2 on the attention projections);
* ``paper``: the paper's / reference code's phase 2: the whole UNet and the whole text encoder
  at 2e-6 (``phase2="full"``, ``train_text_encoder=True``), handles at 5e-4 then 2e-6;
* ``ti_m``: handles only (phase 1 gets the whole budget), the paper's TI-m;
* ``db_m``: weights only (phase 2 gets the whole budget: our LoRA, masked loss; the handles stay
  near their initial word at phase 2's 2e-6), the paper's DB-m;
* ``no_masked_loss``, ``no_attention_loss``, ``no_union_sampling``: ``ours`` with one switch off;
* ``prior_preservation``: ``ours`` with DreamBooth's prior loss on class images of
  :data:`CLASS_PROMPT` (generated once per benchmark run and shared by all its runs).

One *run* is one (variant, scene, seed): train with ``config.seed = seed`` and generate every
prompt of :mod:`diffusers_breakscene.toy.experiment` once with that seed (three one-handle
prompts per handle, two two-handle prompts per pair of handles; 25 DDIM steps, guidance 5, the
toy model's ``TOY_GUIDANCE``; the results of 2026-11-27 and before used 7.5).
Columns, for one-handle (``_1``) and two-handle (``_2``) prompts, mean ± spread over runs:

* ``identity``, ``prompt_accuracy``: the toy evaluator's scores
  (:func:`~diffusers_breakscene.toy.experiment.score_image`, as ``benchmarks/toy_world.py``);
* ``iou``: per handle of the prompt, the IoU between its latent/4 (8x8) cross-attention map,
  averaged over the denoising steps (conditional half), thresholded at half its maximum, and the
  mask of the generated object the evaluator matches to that handle (best identity); 0 when the
  evaluator finds no object (:func:`~diffusers_breakscene.metrics.attention_mask_iou`);
* ``leakage``: the fraction of images showing an object the prompt does not name: some object
  of the image is closer to another handle's object than to every named one, with a cosine above
  :data:`LEAK_THRESHOLD`. NaN (with its reason in the report) where no handle is left out:
  two-handle prompts on two-object scenes;
* ``leak_similarity``: the continuous version: the best cosine of any object of the image to a
  handle's object the prompt does not name;
* ``iou_scene`` (one per run): the same IoU measured on the noised *input* scene with every handle
  in the training prompt (:func:`~diffusers_breakscene.metrics.evaluate_alignment`), what the
  attention loss trains (6 seeded draws);
* ``seconds_per_step``: training wall time without the curve's images, over the steps (includes
  setup and the bundle's writing: a few percent at 800 steps, most of it in ``--smoke``);
* ``trainable_params``: everything the optimizer updates (handles, LoRA or UNet, text encoder).

Curve (``ours`` and ``paper``, on the curve seeds of every scene): one-handle identity every
``curve_every`` steps, from the trainer's validation images (``validation_steps``: the same
one-handle prompts, seed and sampler as the table, rendered inside the one training run), and the
first step at which ``ours``' mean reaches ``paper``'s final mean.

Claims and every variant against ``ours``: paired differences (same scene and seed), mean ±
standard error over the scenes, a scene's seeds averaged first
(:func:`reports.paired_difference`); a verdict needs two standard errors (:func:`verdict`).

Writes ``<out>/fidelity[-quick|-smoke].json``, ``.md``, ``.png`` (identity against prompt
accuracy, one point per variant) and ``-curve.png`` (the curve; default out: benchmarks/results).

Resumable: every finished run is saved at once in ``<out>/fidelity[-mode]-runs/`` (one JSON file
per variant, scene and seed, written atomically). Run the same command again after a stop and
it trains only the runs still missing; a saved run counts only if it was made with the same plan,
configuration and toy-model weights (:func:`run_key`). ``--fresh`` ignores the saved runs.
``--shard K/N`` runs only every N-th run from the K-th (0-based) and writes no report: run N such
processes side by side (one torch thread each), then the command without ``--shard`` writes the
report from the saved runs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(HERE))
import reports  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    # scenes: indices of evaluation_scenes() (None: all 12); steps: per phase (None: 400 + 400);
    # templates: how many of the one- and of the two-handle prompt templates (None: all)
    "full": {"scenes": None, "seeds": [0, 1, 2], "steps": None, "inference_steps": 25,
             "templates": None, "curve_every": 50, "curve_seeds": [0], "class_images": 10,
             "draws": 6},
    "quick": {"scenes": [0], "seeds": [0, 1], "steps": 75, "inference_steps": 25,
              "templates": None, "curve_every": 25, "curve_seeds": [0], "class_images": 4,
              "draws": 6},
    "smoke": {"scenes": [0], "seeds": [0], "steps": 2, "inference_steps": 2, "templates": 1,
              "curve_every": 2, "curve_seeds": [0], "class_images": 1, "draws": 1},
}  # fmt: skip
VARIANTS = (
    "ours",
    "paper",
    "ti_m",
    "db_m",
    "no_masked_loss",
    "no_attention_loss",
    "no_union_sampling",
    "prior_preservation",
)
CURVE_VARIANTS = ("ours", "paper")
#: Per-prompt columns, each for one-handle (_1) and two-handle (_2) prompts.
PROMPT_COLUMNS = ("identity", "prompt_accuracy", "iou", "leakage", "leak_similarity")
#: Per-run columns.
RUN_COLUMNS = ("iou_scene", "seconds_per_step", "trainable_params")
COLUMNS = tuple(f"{c}_{k}" for k in (1, 2) for c in PROMPT_COLUMNS) + RUN_COLUMNS
#: Cosine above which an object of a generated image counts as a handle's object: halfway
#: between the evaluator's mean cosine for the same object (0.875) and for different objects
#: (0.005), docs/toy-evaluator.md.
LEAK_THRESHOLD = 0.5
#: The toy world's counterpart of the reference code's "a photo at the beach": a scene-level
#: class prompt in the toy phrasing (it draws beach scenes with random objects). "a photo of a
#: shape" does not fit: the toy tokenizer splits "shape" into pieces the model never saw, and
#: it draws empty backgrounds.
CLASS_PROMPT = "a photo on the beach"
#: The toy model's guidance scale, ``toy.model.TOY_GUIDANCE`` (a test checks; no torch import
#: here). It was 7.5 until 2026-11-28: runs saved with it keep their keys and are not reused.
GUIDANCE = 5.0
#: The paper's claims (issue 12, point 3), each checked as paired differences (same scene and
#: seed) of ``variant`` minus ``reference`` in the named columns; the sign says which way the
#: claim goes (+1: higher, -1: lower).
CLAIMS: tuple[tuple[str, str, str, tuple[tuple[str, int], ...]], ...] = (
    ("the attention loss aligns each handle's attention with its object", "ours",
     "no_attention_loss", (("iou_1", 1), ("iou_2", 1), ("iou_scene", 1))),
    ("the attention loss lowers leakage", "ours", "no_attention_loss",
     (("leakage_1", -1), ("leak_similarity_1", -1))),
    ("union sampling makes two-handle prompts succeed more often", "ours", "no_union_sampling",
     (("prompt_accuracy_2", 1), ("identity_2", 1))),
    ("both phases beat handles alone (TI-m)", "ours", "ti_m",
     (("identity_1", 1), ("identity_2", 1), ("prompt_accuracy_1", 1), ("prompt_accuracy_2", 1))),
    ("both phases beat weights alone (DB-m)", "ours", "db_m",
     (("identity_1", 1), ("identity_2", 1), ("prompt_accuracy_1", 1), ("prompt_accuracy_2", 1))),
)  # fmt: skip
#: Columns of the table of every variant's paired difference against ``ours``.
PAIRED_COLUMNS = (
    "identity_1", "identity_2", "prompt_accuracy_1", "prompt_accuracy_2", "iou_1", "iou_scene",
    "leakage_1",
)  # fmt: skip
NAN_REASONS = {
    "leakage_2": "every scene of the run has two objects: a two-handle prompt leaves no handle out",
    "leak_similarity_2": "as leakage_2",
}


def variant_configs(base: Any, num_class_images: int) -> dict[str, Any]:
    """Every variant's :class:`~diffusers_breakscene.BreakASceneConfig`, from ``ours``."""
    total = base.total_steps
    return {
        "ours": base,
        # The reference's rates, spelled out so that a change of our defaults leaves them be.
        "paper": base.replace(
            phase2="full",
            train_text_encoder=True,
            phase1_learning_rate=5e-4,
            phase2_handle_learning_rate=2e-6,
            phase2_full_learning_rate=2e-6,
        ),
        "ti_m": base.replace(phase1_steps=total, phase2_steps=0),
        "db_m": base.replace(phase1_steps=0, phase2_steps=total),
        "no_masked_loss": base.replace(use_masked_loss=False),
        "no_attention_loss": base.replace(use_attention_loss=False),
        "no_union_sampling": base.replace(union_sampling=False),
        "prior_preservation": base.replace(
            prior_preservation=True, class_prompt=CLASS_PROMPT, num_class_images=num_class_images
        ),
    }


def run(
    mode: str,
    out: Path,
    curve_every: int | None = None,
    fresh: bool = False,
    shard: tuple[int, int] | None = None,
    partial: bool = False,
) -> dict[str, Any] | None:
    """Train and score every variant on the mode's scenes and seeds; write the report.

    Runs saved by an earlier call with the same plan, configuration and weights are reused
    unless ``fresh``. With ``shard=(k, n)`` only runs ``k, k + n, ...`` (in the plan's order)
    are trained and saved, and no report is written: ``None`` is returned (see the module
    docstring). With ``partial`` nothing is trained: the report is written from the saved
    runs of the (scene, seed) pairs that every variant has finished, and says so.
    """
    import torch

    from diffusers_breakscene.toy.evaluator import default_evaluator
    from diffusers_breakscene.toy.experiment import toy_config
    from diffusers_breakscene.toy.model import toy_model_path, toy_pipeline
    from diffusers_breakscene.toy.world import evaluation_scenes
    from diffusers_breakscene.validation import generate_class_images

    name = "fidelity" if mode == "full" else f"fidelity-{mode}"
    runs_dir = out / f"{name}-runs"
    spec = {**MODES[mode], **({"curve_every": curve_every} if curve_every else {})}
    load_start = [round(x, 2) for x in os.getloadavg()]
    # The toy model is so small that one thread is fastest (see benchmarks/toy_world.py).
    torch.set_num_threads(1)
    all_scenes = evaluation_scenes()
    indices = spec["scenes"] if spec["scenes"] is not None else list(range(len(all_scenes)))
    base = toy_config(
        validation_num_inference_steps=spec["inference_steps"],
        validation_guidance_scale=GUIDANCE,
    )
    if spec["steps"] is not None:
        base = base.replace(phase1_steps=spec["steps"], phase2_steps=spec["steps"])
    configs = variant_configs(base, spec["class_images"])
    changes = {v: _changes(base, c) for v, c in configs.items()}
    evaluator = default_evaluator()
    rows: list[dict[str, Any]] = []
    resumed = 0
    weights = model_digest(toy_model_path())
    started = time.perf_counter()
    class_dir = Path(tempfile.mkdtemp(prefix="fidelity-class-"))
    try:
        # One set of class images for every run: they depend on the base model only (made when
        # the first prior-preservation run needs them).
        prior = configs["prior_preservation"].replace(class_images_dir=str(class_dir))
        configs["prior_preservation"] = prior
        # Seed-major: a run stopped part-way has whole seeds (every scene, every variant) done.
        plan = [(i, s, v) for s in spec["seeds"] for i in indices for v in VARIANTS]

        def train_run(variant: str, index: int, seed: int, curve: bool) -> dict[str, Any]:
            if variant == "prior_preservation" and not any(class_dir.iterdir()):
                generate_class_images(toy_pipeline(), prior, class_dir)
            return run_one(
                variant, configs[variant], all_scenes[index], index, seed, spec, evaluator, curve
            )

        for number, (index, seed, variant) in enumerate(plan):
            if shard is not None and number % shard[1] != shard[0]:
                continue  # another shard's run
            curve = variant in CURVE_VARIANTS and seed in spec["curve_seeds"]
            path = runs_dir / f"{variant}-scene{index}-seed{seed}.json"
            key = run_key(spec, configs[variant], index, seed, curve, weights)

            if partial:
                row, reused = load_run(path, key), True
                if row is None:
                    continue  # not trained yet
            else:
                train = functools.partial(train_run, variant, index, seed, curve)
                row, reused = saved_or_new(path, key, fresh, train)
            resumed += reused
            rows.append(row)
            printed = {k: v for k, v in row.items() if k != "curve"}
            print(json.dumps(printed), flush=True)
    finally:
        shutil.rmtree(class_dir, ignore_errors=True)
    if shard is not None:
        print(
            f"shard {shard[0]}/{shard[1]}: {len(rows)} runs saved in {runs_dir} "
            f"({resumed} reused); run without --shard to write the report",
            flush=True,
        )
        return None
    saved = len(rows)
    if partial:
        rows = complete_groups(rows)
        resumed = len(rows)
    report = {
        **reports.header(mode),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "plan": {
            "scenes": indices,
            "seeds": spec["seeds"],
            "steps": {"phase1": base.phase1_steps, "phase2": base.phase2_steps},
            "inference_steps": spec["inference_steps"],
            "guidance": GUIDANCE,
            "templates": "all" if spec["templates"] is None else spec["templates"],
            "curve_every": spec["curve_every"],
            "curve_variants": list(CURVE_VARIANTS),
            "curve_seeds": spec["curve_seeds"],
            "class_prompt": CLASS_PROMPT,
            "class_images": spec["class_images"],
            "iou_scene_draws": spec["draws"],
            "leak_threshold": LEAK_THRESHOLD,
        },
        "config": base.to_dict(),
        "variants": changes,
        "seconds": round(time.perf_counter() - started, 1),
        "resumed_runs": resumed,
        "rows": rows,
        "summary": summarize(rows),
        "curve": curve_summary(rows, base.total_steps),
        "claims": check_claims(rows),
        "paired_vs_ours": {
            v: {c: reports.paired_difference(rows, v, "ours", lambda r, c=c: r[c])
                for c in PAIRED_COLUMNS}
            for v in VARIANTS[1:]
        },
    }  # fmt: skip
    if partial:
        report["partial"] = {
            "planned_runs": len(plan),
            "saved_runs": saved,
            "pairs": sorted({(r["scene"], r["seed"]) for r in rows}, key=lambda p: (p[1], p[0])),
        }
    reports.write(out, name, report, markdown(report))
    scatter(report["summary"]).save(out / f"{name}.png")
    curve_picture(report["curve"], base.phase1_steps).save(out / f"{name}-curve.png")
    return report


def model_digest(folder: Path) -> str:
    """SHA-256 over the safetensors files of a pipeline folder (the toy evaluator's included):
    which weights a run used, and the evaluator's rule for objects read in two regions.

    Example:
        >>> from diffusers_breakscene.toy.model import toy_model_path
        >>> len(model_digest(toy_model_path()))
        64
    """
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*/*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    evaluator_config = folder / "evaluator" / "config.json"
    if evaluator_config.is_file():
        # A scoring rule added after the first runs ("merge") counts only when set, so that
        # the runs saved before it keep their keys.
        merge = json.loads(evaluator_config.read_text()).get("merge")
        if merge is not None:
            digest.update(f"merge={merge}".encode())
    return digest.hexdigest()


def run_key(
    spec: dict[str, Any], config: Any, scene: int, seed: int, curve: bool, weights: str
) -> str:
    """What a saved run must match to be reused: the mode's plan, the variant's configuration
    (the class-images folder left out: it is a fresh temporary folder every time; the plan's
    lists of scenes and seeds left out: they do not change this run), the scene, the seed,
    whether it drew the curve, and the weights."""
    settings = {k: v for k, v in config.to_dict().items() if k != "class_images_dir"}
    # Which scenes and seeds the whole plan holds does not change one run.
    per_run = {k: v for k, v in spec.items() if k not in ("scenes", "seeds")}
    plan = {"spec": per_run, "config": settings, "scene": scene, "seed": seed, "curve": curve}
    plan["weights"], plan["guidance"] = weights, GUIDANCE
    # The words the handles start from (toy.world.to_scene's default) count only when they are
    # not the shape word, the default the first runs were saved with, so those keep their keys.
    from diffusers_breakscene.toy import world

    if world.DEFAULT_INITIALIZER != "shape":
        plan["initializer"] = world.DEFAULT_INITIALIZER
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def save_run(path: Path, key: str, row: dict[str, Any]) -> None:
    """Write one finished run atomically (a stop mid-write leaves no half file)."""
    from diffusers_breakscene.files import atomic_write

    text = json.dumps({"key": key, "row": row}, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text), "fidelity run")


def load_run(path: Path, key: str) -> dict[str, Any] | None:
    """The run saved at ``path`` if it was made with ``key``; ``None`` otherwise."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: the run is done again
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None
    row = saved["row"]
    if "curve" in row:  # JSON object keys are strings; the curve's are steps
        row["curve"] = {int(step): value for step, value in row["curve"].items()}
    return row


def saved_or_new(
    path: Path,
    key: str,
    fresh: bool,
    train: Callable[[], dict[str, Any]],
    also: Path | None = None,
) -> tuple[dict[str, Any], bool]:
    """``(row, True)`` for the run saved at ``path`` with ``key`` (unless ``fresh``), or, when
    only folder ``also`` holds it (same file name and key), that run copied to ``path``;
    otherwise ``(train(), False)``, saved at ``path`` first."""
    row = None if fresh else load_run(path, key)
    if row is None and not fresh and also is not None:
        row = load_run(also / path.name, key)
        if row is not None:
            save_run(path, key, row)  # ``path``'s folder then holds every run of its plan
    if row is not None:
        return row, True
    row = train()
    save_run(path, key, row)
    return row, False


def run_one(
    variant: str,
    config: Any,
    sample: Any,
    scene_index: int,
    seed: int,
    spec: dict[str, Any],
    evaluator: Any,
    curve: bool,
) -> dict[str, Any]:
    """Train ``variant`` on one scene with one seed, generate every prompt, score the images."""
    import torch

    from diffusers_breakscene.attention import AttentionStore
    from diffusers_breakscene.handles import token_ids
    from diffusers_breakscene.metrics import attention_mask_iou, evaluate_alignment
    from diffusers_breakscene.toy import world
    from diffusers_breakscene.toy.experiment import (
        ONE_HANDLE_PROMPTS,
        TWO_HANDLE_PROMPTS,
        fill,
        score_image,
    )
    from diffusers_breakscene.toy.model import toy_pipeline
    from diffusers_breakscene.toy.world import object_phrase, to_scene
    from diffusers_breakscene.trainer import BreakASceneTrainer

    pipe = toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scene = to_scene(sample, initializer=world.DEFAULT_INITIALIZER)  # what run_key records
    n = len(sample.objects)
    one, two = ONE_HANDLE_PROMPTS[: spec["templates"]], TWO_HANDLE_PROMPTS[: spec["templates"]]
    jobs = [(t, [i]) for t in one for i in range(n)]
    curve_jobs = list(jobs)
    jobs += [(t, list(p)) for t in two for p in itertools.combinations(range(n), 2)]
    cfg = config.replace(seed=seed)
    if curve:
        cfg = cfg.replace(
            validation_prompts=[fill(t, [scene.tokens[i] for i in h]) for t, h in curve_jobs],
            validation_steps=spec["curve_every"],
            save_attention_maps=False,
        )
    trainer = BreakASceneTrainer(pipe, scene, cfg)
    curve_seconds = _time_validation(trainer)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fidelity-") as folder:
        trainer.train(folder, progress=False)
        train_s = time.perf_counter() - t0
        points = _read_curve(Path(folder), curve_jobs, sample, evaluator) if curve else {}

    iou_scene = evaluate_alignment(pipe, scene, cfg.resolution, draws=spec["draws"]).mean_iou
    handle_ids = token_ids(pipe.tokenizer, scene.tokens)
    refs = torch.stack([evaluator.embed_object(sample.image, m) for m in sample.masks])
    words = [object_phrase(o) for o in sample.objects]
    images: list[dict[str, Any]] = []
    store = AttentionStore.attach(pipe.unet, resolution_divisor=cfg.attention_resolution_divisor)
    with store:
        for template, handles in jobs:
            prompt = fill(template, [scene.tokens[i] for i in handles])
            store.reset()
            with torch.no_grad():
                image = pipe(
                    prompt, num_inference_steps=spec["inference_steps"], guidance_scale=GUIDANCE,
                    height=sample.image.height, width=sample.image.width,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]  # fmt: skip
            maps = store.aggregate(part="cond", over_steps=True)[0]
            described = fill(template, [words[i] for i in handles])
            accuracy, identities = score_image(evaluator, sample, image, described, handles)
            masks, sims = object_similarities(evaluator, refs, image)
            ids = pipe.tokenizer(prompt).input_ids
            ious = [
                attention_mask_iou(
                    maps[..., ids.index(handle_ids[i])], _matched_mask(masks, sims, i)
                )
                for i in handles
            ]
            leaked, leak_similarity = leakage(sims, handles)
            images.append({
                "handles": len(handles),
                "identity": sum(identities.values()) / len(handles),
                "prompt_accuracy": accuracy,
                "iou": sum(ious) / len(ious),
                "leakage": leaked,
                "leak_similarity": leak_similarity,
            })  # fmt: skip

    row: dict[str, Any] = {"variant": variant, "scene": scene_index, "seed": seed}
    row["objects"] = [f"{o.shape}/{o.colour}/{o.pattern}" for o in sample.objects]
    for k in (1, 2):
        for column in PROMPT_COLUMNS:
            values = [im[column] for im in images if im["handles"] == k]
            row[f"{column}_{k}"] = _mean(values)
    row["iou_scene"] = iou_scene
    row["seconds_per_step"] = (train_s - curve_seconds[0]) / cfg.total_steps
    row["trainable_params"] = trainable_parameters(pipe, cfg, n)
    row["train_s"] = round(train_s, 2)
    row["curve_s"] = round(curve_seconds[0], 2)
    if curve:
        row["curve"] = points
    return row


def _time_validation(trainer: Any) -> list[float]:
    """Make ``trainer`` add the seconds its validation renders take (the curve's images, which
    are not training) to the returned one-element list."""
    spent = [0.0]
    validate = trainer._validate

    def timed(step: int, run: Any) -> None:
        started = time.perf_counter()
        validate(step, run)
        spent[0] += time.perf_counter() - started

    # The trainer renders validation images inside its loop; timing them is the only way to
    # keep them out of seconds per step without a second training run.
    trainer._validate = timed
    return spent


def _read_curve(
    folder: Path, jobs: list[tuple[str, list[int]]], sample: Any, evaluator: Any
) -> dict[int, float]:
    """``{step: mean one-handle identity}`` of the validation images in ``folder``."""
    from PIL import Image

    points = {}
    for step_dir in (folder / "validation").glob("step-*"):
        values = []
        for k, (_, (i,)) in enumerate(jobs):
            with Image.open(step_dir / f"{k:02d}.png") as file:
                image = file.convert("RGB")
            values.append(evaluator.identity_similarity(image, sample.image, sample.masks[i]))
        points[int(step_dir.name.removeprefix("step-"))] = _mean(values)
    return dict(sorted(points.items()))


def object_similarities(evaluator: Any, refs: Any, image: Any) -> tuple[list[Any], Any]:
    """The objects the evaluator finds in ``image`` (masks, as for identity similarity) and
    their cosines to the scene's objects ``refs`` (``(regions, objects)``)."""
    import torch

    from diffusers_breakscene.toy.evaluator import crop_object

    masks = evaluator.find_objects(image)
    if not masks:
        return [], torch.zeros(0, refs.shape[0])
    crops = torch.stack([crop_object(image, m) for m in masks])
    return masks, evaluator.embed_crops(crops) @ refs.T


def _matched_mask(masks: list[Any], sims: Any, handle: int) -> Any:
    """The mask of the object best matching ``handle`` (empty when none was found: IoU 0)."""
    import torch

    from diffusers_breakscene.toy.evaluator import IMAGE_SIZE

    if not masks:
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(masks[int(sims[:, handle].argmax())])


def leakage(sims: Any, handles: list[int]) -> tuple[float, float]:
    """``(leaked, best cosine to a left-out object)`` of one image (see the module docstring);
    NaNs when the prompt names every object of the scene."""
    others = [j for j in range(sims.shape[1]) if j not in handles]
    if not others:
        return math.nan, math.nan
    if sims.shape[0] == 0:  # no object found: nothing leaked (identity reads 0.0 the same way)
        return 0.0, 0.0
    best_other = sims[:, others].max(dim=1).values
    best_named = sims[:, handles].max(dim=1).values
    leaked = bool(((best_other > LEAK_THRESHOLD) & (best_other > best_named)).any())
    return float(leaked), float(best_other.max())


def trainable_parameters(pipe: Any, config: Any, num_handles: int) -> int:
    """How many numbers the optimizer updates in the run (what the trainer puts in its groups)."""
    count = num_handles * pipe.text_encoder.get_input_embeddings().embedding_dim
    if config.phase2_steps == 0:
        return count
    if config.phase2 == "full":
        count += sum(p.numel() for p in pipe.unet.parameters())
    else:
        count += sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    if config.train_text_encoder:  # every weight, the handle rows' base matrix included
        count += sum(p.numel() for p in pipe.text_encoder.parameters())
    return count


def _mean(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return sum(clean) / len(clean) if clean else math.nan


def _changes(base: Any, config: Any) -> dict[str, Any]:
    """The fields in which ``config`` differs from ``base``."""
    ours, theirs = base.to_dict(), config.to_dict()
    return {k: v for k, v in theirs.items() if ours[k] != v}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant and column: mean, spread and count over runs; ``reason`` where it is NaN."""
    summary: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {}
        for column in COLUMNS:
            values = [float(r[column]) for r in mine]
            cell: dict[str, Any] = {**reports.stats(values), "n": sum(v == v for v in values)}
            if cell["n"] == 0:
                cell["reason"] = NAN_REASONS.get(column, "no run gave a value")
            summary[variant][column] = cell
    return summary


def curve_summary(
    rows: list[dict[str, Any]], total_steps: int, variants: Sequence[str] = CURVE_VARIANTS
) -> dict[str, Any]:
    """Mean identity per step of each of ``variants`` (over their runs that drew a curve), and
    the first step at which each reaches ``paper``'s final mean (``steps_to_paper_final``;
    ``None``: never). ``variants`` must include ``paper``; the verdict is about ``ours``.

    Example:
        >>> rows = [{"variant": "ours", "curve": {50: 0.1, 100: 0.3}},
        ...         {"variant": "paper", "curve": {50: 0.1, 100: 0.2}}]
        >>> curve_summary(rows, 100)["steps_to_paper_final"]
        {'ours': 100}
    """
    out: dict[str, Any] = {"variants": list(variants)}
    for variant in variants:
        runs = [r["curve"] for r in rows if r["variant"] == variant and "curve" in r]
        steps = sorted({s for points in runs for s in points})
        out[variant] = {
            "steps": steps,
            "identity": [reports.stats([p[s] for p in runs if s in p]) for s in steps],
            "runs": len(runs),
        }
    paper = out["paper"]
    target = paper["identity"][-1]["mean"] if paper["steps"] else math.nan
    out["paper_final_identity"] = target
    out["steps_to_paper_final"] = {
        v: _first_step_at(out[v], target) for v in variants if v != "paper"
    }
    reached = out["steps_to_paper_final"].get("ours")
    out["ours_steps_to_paper_final"] = reached
    goal = f"paper's final identity ({target:.3f})"
    out["verdict"] = (
        f"ours reaches {goal} at step {reached}"
        if reached is not None
        else f"ours does not reach {goal} within {total_steps} steps"
    )
    return out


def _first_step_at(curve: dict[str, Any], target: float) -> int | None:
    pairs = zip(curve["steps"], curve["identity"], strict=True)
    return next((step for step, point in pairs if point["mean"] >= target), None)


def curve_variants(curve: dict[str, Any]) -> list[str]:
    """The variants a :func:`curve_summary` holds (a report written before it named them: ours
    and paper)."""
    return list(curve.get("variants", CURVE_VARIANTS))


def curve_table(curve: dict[str, Any]) -> list[str]:
    """Markdown rows: one-handle identity (mean ± spread) per step, a column per variant."""
    variants = curve_variants(curve)
    lines = ["| step | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    by_step = {v: dict(zip(curve[v]["steps"], curve[v]["identity"], strict=True)) for v in variants}
    for step in sorted({s for v in variants for s in curve[v]["steps"]}):
        cells = [
            f"{by_step[v][step]['mean']:.3f} ± {by_step[v][step]['std']:.3f}"
            if step in by_step[v]
            else "-"
            for v in variants
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def complete_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the (scene, seed) pairs for which every variant has a run: the fair subset
    of a run stopped part-way (every variant then has the same scenes and seeds)."""
    have: dict[tuple[int, int], set[str]] = {}
    for r in rows:
        have.setdefault((r["scene"], r["seed"]), set()).add(r["variant"])
    done = {pair for pair, variants in have.items() if variants >= set(VARIANTS)}
    return [r for r in rows if (r["scene"], r["seed"]) in done]


def verdict(difference: dict[str, float], sign: int) -> str:
    """``"holds"`` when the paired difference goes the claimed way (``sign``) by at least two
    standard errors, ``"reversed"`` when it goes the other way as clearly, otherwise
    ``"within noise"`` (``"too few runs"`` under two scenes: the error is over scenes).

    Example:
        >>> up = {"mean": 0.1, "se": 0.02, "n": 12}
        >>> verdict(up, 1), verdict(up, -1), verdict({**up, "se": 0.06}, 1)
        ('holds', 'reversed', 'within noise')
    """
    mean, se = difference["mean"], difference["se"]
    if difference.get("scenes", difference["n"]) < 2 or math.isnan(se):
        return "too few runs"
    if abs(mean) <= 2 * se:  # also a zero difference with zero spread
        return "within noise"
    return "holds" if mean * sign > 0 else "reversed"


def check_claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS`: per column, the paired difference and its verdict."""
    out = []
    for claim, variant, reference, columns in CLAIMS:
        checks = []
        for column, sign in columns:
            diff = reports.paired_difference(rows, variant, reference, lambda r, c=column: r[c])
            checks.append({"column": column, "sign": sign, **diff, "verdict": verdict(diff, sign)})
        out.append({"claim": claim, "variant": variant, "reference": reference, "checks": checks})
    return out


def _signed(diff: dict[str, float]) -> str:
    if diff["n"] == 0:
        return "n/a"
    se = "n/a" if math.isnan(diff["se"]) else f"{diff['se']:.3f}"
    return f"{diff['mean']:+.3f} ± {se}"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: scores, attention and cost, the curve (mean ± spread over runs)."""
    plan, summary = report["plan"], report["summary"]

    def cell(variant: str, column: str, digits: int = 3) -> str:
        value = summary[variant][column]
        if value["n"] == 0:
            return "n/a"
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"

    steps = plan["steps"]
    lines = [
        f"Fidelity in the toy world, mode `{report['mode']}`: scenes {plan['scenes']} x seeds "
        f"{plan['seeds']}, {steps['phase1']} + {steps['phase2']} steps (every variant "
        f"{steps['phase1'] + steps['phase2']} in all), {plan['inference_steps']} inference "
        f"steps; {report['seconds']:.0f} s on {report['machine']['cpus']} CPUs, load "
        f"{report['load_average_start']} at start; {report['date']}."
        + (
            f" {report['resumed_runs']} of {len(report['rows'])} runs were saved by an earlier "
            "call and reused (their time is not in this one's; the runs' own training took "
            f"{sum(r.get('train_s', 0.0) for r in report['rows']) / 60:.0f} core-minutes in all)."
            if report.get("resumed_runs")
            else ""
        ),
        "",
    ]
    if "partial" in report:
        part = report["partial"]
        pairs = ", ".join(f"scene {a} seed {b}" for a, b in part["pairs"])
        lines += [
            f"**Partial report**: {part['saved_runs']} of the plan's {part['planned_runs']} runs "
            f"were saved when it was written; the tables use only the (scene, seed) pairs that "
            f"every variant has finished ({len(part['pairs'])}: {pairs}).",
            "",
        ]
    lines += [
        "| variant | identity 1 | prompt acc. 1 | IoU 1 | leakage 1 | identity 2 "
        "| prompt acc. 2 | IoU 2 | leakage 2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        cells = [cell(variant, f"{c}_{k}") for k in (1, 2) for c in PROMPT_COLUMNS[:4]]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| variant | IoU, input scene | leak similarity 1 | leak similarity 2 | s / step "
        "| trainable params |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        params = summary[variant]["trainable_params"]["mean"]
        cells = [
            cell(variant, "iou_scene"),
            cell(variant, "leak_similarity_1"),
            cell(variant, "leak_similarity_2"),
            cell(variant, "seconds_per_step", 3),
            f"{params:,.0f}",
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    reasons = {
        c: v["reason"] for values in summary.values() for c, v in values.items() if "reason" in v
    }
    lines += [""] + [f"n/a in `{c}`: {r}." for c, r in reasons.items()]
    curve = report["curve"]
    lines += [
        "",
        f"One-handle identity during training (curve seeds {plan['curve_seeds']}, every "
        f"{plan['curve_every']} steps):",
        "",
    ]
    lines += curve_table(curve)
    lines += ["", curve["verdict"] + "."]
    lines += [
        "",
        "The paper's claims, as paired differences (same scene and seed; mean ± standard error "
        "over scenes, a scene's seeds averaged first; a verdict needs two standard errors):",
        "",
        "| claim | comparison | measure | difference | pairs (scenes) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for claim in report["claims"]:
        for check in claim["checks"]:
            way = "higher" if check["sign"] > 0 else "lower"
            lines.append(
                f"| {claim['claim']} | {claim['variant']} - {claim['reference']} "
                f"| {check['column']} ({way} claimed) | {_signed(check)} "
                f"| {check['n']} ({check['scenes']}) "
                f"| {check['verdict']} |"
            )
    lines += [
        "",
        "Every variant against `ours` (variant - ours, paired; mean ± standard error over scenes):",
        "",
        "| variant | " + " | ".join(PAIRED_COLUMNS) + " |",
        "|---|" + "---|" * len(PAIRED_COLUMNS),
    ]
    for variant, diffs in report["paired_vs_ours"].items():
        cells = [_signed(diffs[c]) for c in PAIRED_COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter(summary: dict[str, dict[str, Any]], size: tuple[int, int] = (640, 420)) -> Any:
    """Identity (y) against prompt accuracy (x), one numbered point per variant (the mean of its
    one- and two-handle means), as in the paper's comparison figure; drawn with PIL."""
    points = {}
    for variant, values in summary.items():
        x = _mean([values[f"prompt_accuracy_{k}"]["mean"] for k in (1, 2)])
        y = _mean([values[f"identity_{k}"]["mean"] for k in (1, 2)])
        if not (math.isnan(x) or math.isnan(y)):
            points[variant] = (x, y)
    x_range = _axis_range([p[0] for p in points.values()] or [0.0, 1.0])
    y_range = _axis_range([p[1] for p in points.values()] or [0.0, 1.0])
    canvas, draw, at = plot_frame(
        size,
        x_range,
        y_range,
        "prompt accuracy (toy evaluator)",
        "identity similarity (toy evaluator)",
    )
    width, _ = size
    _, right, top, _ = PLOT_MARGINS
    black = (0, 0, 0)
    # Numbers on the points and names in a legend: variants often land on top of each other.
    for k, (variant, (x, y)) in enumerate(points.items(), start=1):
        u, v = at(x, y)
        colour = PALETTE[(k - 1) % len(PALETTE)]
        draw.ellipse([u - 5, v - 5, u + 5, v + 5], fill=colour, outline=black)
        draw.text((u + 7, v - 12), str(k), fill=colour)
        row = top + 18 * (k - 1)
        draw.ellipse([width - right + 14, row + 2, width - right + 22, row + 10], fill=colour)
        draw.text((width - right + 28, row), f"{k} {variant} ({x:.3f}, {y:.3f})", fill=black)
    return canvas


def curve_picture(
    curve: dict[str, Any], phase1_steps: int, size: tuple[int, int] = (640, 420)
) -> Any:
    """One-handle identity (y) against training step (x) for every curve variant (mean over the
    curve runs, a line per variant), with ``paper``'s final identity as a dashed line and the
    end of phase 1 as a grey line; drawn with PIL."""
    variants = curve_variants(curve)
    lines = {v: list(zip(curve[v]["steps"], (p["mean"] for p in curve[v]["identity"]), strict=True))
             for v in variants}  # fmt: skip
    lines = {v: [(x, y) for x, y in pts if not math.isnan(y)] for v, pts in lines.items()}
    xs = [x for pts in lines.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in lines.values() for _, y in pts]
    target = curve.get("paper_final_identity", math.nan)
    ys += [] if math.isnan(target) else [target]
    x_range = (0.0, float(max(max(xs), 1)))
    canvas, draw, at = plot_frame(
        size, x_range, _axis_range(ys or [0.0, 1.0]), "training step",
        "one-handle identity (toy evaluator)", x_format=".0f",
    )  # fmt: skip
    width, height = size
    _, right, top, bottom = PLOT_MARGINS
    grey, black = (160, 160, 160), (0, 0, 0)
    if x_range[0] < phase1_steps < x_range[1]:
        u, _ = at(phase1_steps, 0)
        draw.line([u, top, u, height - bottom], fill=grey)
        draw.text((u + 3, top + 2), "phase 2 starts", fill=grey)
    # A variant of the scatter keeps its colour there; others take the colours left over.
    colours = {v: PALETTE[VARIANTS.index(v)] for v in variants if v in VARIANTS}
    spare = iter(c for c in PALETTE if c not in colours.values())
    colours |= {v: next(spare, black) for v in variants if v not in colours}
    if not math.isnan(target):
        _, v = at(0, target)
        for u in range(PLOT_MARGINS[0], width - right, 12):  # dashed
            draw.line([u, v, min(u + 6, width - right), v], fill=colours["paper"])
    for k, (variant, pts) in enumerate(lines.items()):
        colour = colours.get(variant, black)
        pixels = [at(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for u, v in pixels:
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
        row = top + 18 * k
        draw.line([width - right + 12, row + 6, width - right + 24, row + 6], fill=colour, width=2)
        draw.text(
            (width - right + 28, row), f"{variant} ({curve[variant]['runs']} runs)", fill=black
        )
    row = top + 18 * len(lines)
    draw.line([width - right + 12, row + 6, width - right + 24, row + 6], fill=colours["paper"])
    draw.text((width - right + 28, row), "paper's final identity", fill=black)
    return canvas


#: Colours of the pictures' points and lines (the first two: ``ours`` and ``paper``).
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))  # fmt: skip
#: Room around the plot box (left, right, top, bottom): tick labels left, the legend right.
PLOT_MARGINS = (60, 230, 30, 50)


def plot_frame(
    size: tuple[int, int],
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    x_label: str,
    y_label: str,
    x_format: str = ".3f",
) -> tuple[Any, Any, Callable[[float, float], tuple[float, float]]]:
    """A white canvas with the plot box, five ticks per axis and the axis labels:
    ``(canvas, draw, at)``, where ``at(x, y)`` is the pixel of a data point (PIL)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = PLOT_MARGINS
    (x0, x1), (y0, y1) = x_range, y_range
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def at(x: float, y: float) -> tuple[float, float]:
        u = left + (x - x0) / (x1 - x0) * (width - left - right)
        v = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return u, v

    black = (0, 0, 0)
    draw.rectangle([left, top, width - right, height - bottom], outline=black)
    for i in range(5):
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        u, _ = at(x, y0)
        _, v = at(x0, y)
        draw.line([u, height - bottom, u, height - bottom + 4], fill=black)
        draw.text((u - 12, height - bottom + 6), f"{x:{x_format}}", fill=black)
        draw.line([left - 4, v, left, v], fill=black)
        draw.text((left - 40, v - 6), f"{y:.3f}", fill=black)
    draw.text((left, height - 20), x_label, fill=black)
    draw.text((left, 8), y_label, fill=black)
    return canvas, draw, at


def parse_shard(parser: argparse.ArgumentParser, text: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` as ``(K, N)`` (``None`` when not given); a bad value is a parser error."""
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        parser.error(f"--shard {text}: give K/N with 0 <= K < N, e.g. --shard 0/2")
    return int(k), int(n)


def _axis_range(values: list[float]) -> tuple[float, float]:
    """A range around ``values`` with 10% room each side (0.1 wide at least)."""
    low, high = min(values), max(values)
    pad = max(0.1 * (high - low), 0.05)
    return low - pad, high + pad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="scene 0, seeds 0 and 1, 75 + 75 steps")
    group.add_argument("--smoke", action="store_true", help="scene 0, seed 0, 2 + 2 steps")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument(
        "--curve-every", type=int, default=None, help="steps between curve points (mode default)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="train every run again, ignoring the runs saved in <out>/fidelity[-mode]-runs/",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="train and save only every N-th run from the K-th (0-based), write no report",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="train nothing: write the report from the saved runs of the (scene, seed) pairs "
        "every variant has finished, marked partial",
    )
    args = parser.parse_args(argv)
    if args.curve_every is not None and args.curve_every < 1:
        parser.error("--curve-every must be >= 1")
    if args.partial and (args.shard or args.fresh):
        parser.error("--partial trains nothing: leave out --shard and --fresh")
    shard = parse_shard(parser, args.shard)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    report = run(mode, args.out, args.curve_every, args.fresh, shard, args.partial)
    if report is not None:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
