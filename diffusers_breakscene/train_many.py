"""Many scenes, one bundle each: :func:`train_many` and ``breakscene train-many``.

Every subfolder of ``scenes_dir`` is a scene folder (:meth:`~diffusers_breakscene.Scene.from_dir`:
one image with its masks, or one subfolder per image, and an optional ``scene.json`` with the
scene's handle words). Each is trained from a fresh base pipeline into ``output_dir/<name>/``;
``output_dir/summary.json`` and ``summary.md`` list every scene.

* **Resumable.** A scene whose ``result.json`` says ``done`` (and whose bundle exists) is skipped;
  one that was interrupted continues from its latest checkpoint (set ``checkpointing_steps``
  for checkpoints inside a phase; the phase ends are checkpointed by default); one that failed
  is tried again.
* **Failures stay local.** A scene that raises is recorded as ``failed`` with its error (and the
  traceback in ``error.txt``); the other scenes go on.
* **Several processes or nodes.** Under ``torchrun`` / ``accelerate launch`` each process trains
  whole scenes on its own device, without gradient synchronisation: scene ``i`` (in natural
  order of the folder names) goes to process ``i % world_size``, so no scene is trained twice
  and a process's scenes are trained exactly as a one-process run would train them. At the end
  the processes exchange their results and the first one writes the summary.

Example:
    >>> from diffusers_breakscene.train_many import list_scenes, scenes_of_process
    >>> scenes_of_process(["a", "b", "c", "d", "e"], process=1, num_processes=2)
    ['b', 'd']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .config import BreakASceneConfig
from .errors import InvalidArgumentError, InvalidConfigError, MissingFileError
from .files import atomic_write, check_output_dir
from .scene_folder import natural_key

__all__ = ["SceneResult", "list_scenes", "scenes_of_process", "summary_table", "train_many"]

BUNDLE = "break_a_scene.safetensors"
RESULT = "result.json"
T = TypeVar("T")

# The variables by which a launcher (torchrun, accelerate launch, MPI) tells a process that it is
# one of several. While a process trains its own scenes they are hidden, so that accelerate sets
# up a one-process run (accelerate has no public switch for this inside a launched job).
_LAUNCH_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
)  # fmt: skip


@dataclass
class SceneResult:
    """What happened to one scene.

    ``status`` is ``"done"`` or ``"failed"``; ``this_run`` is ``False`` for a scene finished by
    an earlier run (skipped now). ``losses`` are the last logged values of the run;
    ``identity`` is the toy evaluator's identity similarity (toy model only, else ``None``).
    """

    scene: str
    status: Literal["done", "failed"]
    steps: int = 0
    seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    identity: float | None = None
    bundle: str | None = None
    error: str | None = None
    process: int = 0
    resumed_from: int | None = None
    this_run: bool = True

    @classmethod
    def from_file(cls, path: Path) -> SceneResult:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def list_scenes(scenes_dir: str | os.PathLike[str]) -> list[Path]:
    """The scene folders of ``scenes_dir``: its subfolders in natural order of their names
    (``scene2`` before ``scene10``); names starting with ``.`` or ``_`` are left out.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ["s10", "s2", ".cache"]:
        ...     (root / name).mkdir()
        >>> [p.name for p in list_scenes(root)]
        ['s2', 's10']
    """
    root = Path(scenes_dir)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise MissingFileError(
            f"scenes_dir {root} {what}; pass a folder with one scene folder (img.* and "
            f"mask*.png) per scene."
        )
    scenes = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
        key=lambda p: natural_key(p.name),
    )
    if not scenes:
        raise MissingFileError(
            f"scenes_dir {root} holds no scene folders; put each scene (img.* and mask*.png) "
            f"in its own subfolder, e.g. {root}/dog/img.jpg and {root}/dog/mask0.png."
        )
    return scenes


def scenes_of_process(scenes: Sequence[T], process: int, num_processes: int) -> list[T]:
    """The scenes that process ``process`` of ``num_processes`` trains: every
    ``num_processes``-th, starting at ``process``. The split does not depend on which scenes
    are already done, so processes that read the output folder at different times agree."""
    return list(scenes[process::num_processes])


def train_many(
    scenes_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Callable[[], Any],
    config: BreakASceneConfig | None = None,
    evaluate: bool | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
    **from_pretrained: Any,
) -> list[SceneResult]:
    """Train every scene folder of ``scenes_dir`` into ``output_dir/<scene name>/``.

    Args:
        scenes_dir: a folder of scene folders (see :func:`list_scenes`).
        output_dir: where each scene's bundle, ``result.json`` and (while it trains)
            checkpoints go, and ``summary.json`` / ``summary.md``.
        model: the base model, loaded fresh for every scene: a built-in name (``"toy"``,
            ``"tiny-sd1"``), a local folder or a Hub id, or a function that returns a new
            pipeline.
        config: the training settings of every scene (default: ``BreakASceneConfig()``).
            ``resume_from_checkpoint`` must be unset: each scene resumes from its own latest
            checkpoint by itself.
        evaluate: score each scene with the toy evaluator (identity similarity of generated
            handles to the input objects); default: when ``model`` is ``"toy"``.
        keep_checkpoints: keep ``<scene>/checkpoints`` of a finished scene (default: removed).
        progress: show the training progress bars (first process of each node).
        log: where progress lines go (``None``: nowhere).
        from_pretrained: ``revision``, ``variant``, ``cache_dir`` for a Hub model.

    Returns:
        One :class:`SceneResult` per scene (all scenes on the first process; only its own on
        the others).

    Example:
        >>> from diffusers_breakscene import BreakASceneConfig
        >>> from diffusers_breakscene.train_many import train_many
        >>> results = train_many("scenes/", "bundles/", model="toy")  # doctest: +SKIP
        >>> [(r.scene, r.status) for r in results]  # doctest: +SKIP
        [('dog', 'done'), ('mug', 'done')]
    """
    config = config or BreakASceneConfig()
    if not isinstance(config, BreakASceneConfig):
        raise InvalidConfigError(
            f"config must be a BreakASceneConfig, got {type(config).__name__}; use "
            "BreakASceneConfig(**fields) or BreakASceneConfig.from_file(path)."
        )
    if config.resume_from_checkpoint:
        raise InvalidConfigError(
            f"resume_from_checkpoint={config.resume_from_checkpoint!r}: train_many resumes each "
            "scene from its own latest checkpoint; leave resume_from_checkpoint unset."
        )
    is_pipeline = hasattr(model, "components") and hasattr(model, "unet")  # pipelines are callable
    if is_pipeline or not (isinstance(model, str | os.PathLike) or callable(model)):
        raise InvalidArgumentError(
            f"model must be a built-in name, a folder, a Hub id or a function that returns a "
            f"new pipeline, got {type(model).__name__}: every scene starts from a fresh base "
            f"pipeline (training changes the one it is given)."
        )
    scenes = list_scenes(scenes_dir)
    out = Path(output_dir)
    check_output_dir(out, "output_dir")
    for scene in scenes:
        check_output_dir(out / scene.name, f"output folder of scene {scene.name!r}")
    if evaluate is None:
        evaluate = str(model) == "toy"
    say = log or (lambda _: None)
    process, num_processes, local = _launch()
    mine = scenes_of_process(scenes, process, num_processes)
    if num_processes > 1:
        say(f"[process {process}/{num_processes}] {len(mine)} of {len(scenes)} scenes")

    results: list[SceneResult] = []
    with _one_process_training(local):
        for folder in mine:
            result = _train_one(
                folder, out / folder.name, model, config, from_pretrained,
                evaluate=evaluate, keep_checkpoints=keep_checkpoints,
                progress=progress and local == 0, process=process,
            )  # fmt: skip
            results.append(result)
            say(_one_line(result))

    everything = _gather(results, num_processes)
    if process == 0:
        order = {s.name: i for i, s in enumerate(scenes)}
        everything.sort(key=lambda r: order[r.scene])
        _write_summary(out, everything)
        say(summary_table(everything))
        return everything
    return results


def summary_table(results: Sequence[SceneResult]) -> str:
    """A markdown table of ``results``: scene, status, steps, time, final losses, identity.

    Example:
        >>> print(summary_table([SceneResult("dog", "done", 800, 61.2, {"loss": 0.12})]))
        | scene | status | steps | time (s) | loss | identity |
        |---|---|---|---|---|---|
        | dog | done | 800 | 61.2 | 0.1200 | – |
    """
    loss_keys = sorted({k for r in results for k in r.losses}, key=lambda k: (k != "loss", k))
    head = ["scene", "status", "steps", "time (s)", *loss_keys, "identity"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        status = r.status if r.this_run else f"{r.status} (earlier run)"
        if r.status == "failed" and r.error:
            status = f"failed: {r.error.splitlines()[0][:80]}"
        cells = [r.scene, status, str(r.steps), f"{r.seconds:.1f}"]
        cells += [f"{r.losses[k]:.4f}" if k in r.losses else "–" for k in loss_keys]
        cells.append(f"{r.identity:.3f}" if r.identity is not None else "–")
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(rows)


# -- one scene ----------------------------------------------------------------------------------


def _train_one(
    folder: Path,
    out: Path,
    model: Any,
    config: BreakASceneConfig,
    from_pretrained: dict[str, Any],
    *,
    evaluate: bool,
    keep_checkpoints: bool,
    progress: bool,
    process: int,
) -> SceneResult:
    record = out / RESULT
    if record.is_file() and (out / BUNDLE).is_file():
        with contextlib.suppress(ValueError, TypeError, OSError):
            earlier = SceneResult.from_file(record)
            if earlier.status == "done":
                earlier.this_run = False
                return earlier
    from .checkpoint import latest_checkpoint
    from .scene import Scene
    from .trainer import BreakASceneTrainer

    started = time.perf_counter()
    result = SceneResult(folder.name, "failed", process=process)
    try:
        scene = Scene.from_dir(folder)
        latest = latest_checkpoint(out / "checkpoints")
        if latest is not None:
            result.resumed_from = int(latest.name.rsplit("-", 1)[-1])
        pipe = model() if callable(model) else model
        trainer = BreakASceneTrainer(
            pipe, scene, config.replace(resume_from_checkpoint="latest"), **from_pretrained
        )
        bundle = trainer.train(out, progress=progress)
        last = trainer.history[-1] if trainer.history else {}
        result.steps = config.phase1_steps + config.phase2_steps
        result.losses = {k: float(v) for k, v in last.items() if k.startswith("loss")}
        result.bundle = str(bundle)
        if evaluate:
            result.identity = _identity(trainer.pipeline, scene, trainer.config)
        result.status = "done"
        (out / "error.txt").unlink(missing_ok=True)
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    except Exception as err:  # one scene's failure must not stop the others
        result.error = f"{type(err).__name__}: {err}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "error.txt", lambda p: p.write_text(traceback.format_exc()))
    result.seconds = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(result), indent=2) + "\n"
    atomic_write(record, lambda p: p.write_text(text, encoding="utf-8"), "scene result")
    return result


def _identity(
    pipe: Any, scene: Any, config: BreakASceneConfig, seeds: Sequence[int] = (0, 1)
) -> float:
    """Mean toy-evaluator identity similarity of ``"a photo of <handle>"`` images (two seeds,
    25 steps, guidance 7.5, as the toy experiments generate) to each handle's object in the
    first image that shows it (the background is left out)."""
    import torch

    from .toy.evaluator import default_evaluator

    evaluator = default_evaluator()
    pipe.set_progress_bar_config(disable=True)
    scores = []
    concepts = range(scene.num_concepts - (scene.background_token is not None))
    for concept in concepts:
        view = next(
            scene.view(i) for i in range(scene.num_images) if concept in scene.concepts_in(i)
        )
        mask = view.masks[view.concepts.index(concept)]
        for seed in seeds:
            with torch.no_grad():
                image = pipe(
                    f"a photo of {scene.tokens[concept]}",
                    num_inference_steps=25,
                    guidance_scale=7.5,
                    height=config.resolution,
                    width=config.resolution,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
            scores.append(evaluator.identity_similarity(image, view.image, mask))
    return round(sum(scores) / len(scores), 4)


def _one_line(result: SceneResult) -> str:
    if not result.this_run:
        return f"{result.scene}: done in an earlier run, skipped"
    if result.status == "failed":
        return f"{result.scene}: FAILED ({result.error}); see its error.txt"
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    return f"{result.scene}: done in {result.seconds:.1f} s{resumed}"


def _write_summary(out: Path, results: list[SceneResult]) -> None:
    data = json.dumps([asdict(r) for r in results], indent=2) + "\n"
    atomic_write(out / "summary.json", lambda p: p.write_text(data, encoding="utf-8"), "summary")
    table = summary_table(results) + "\n"
    atomic_write(out / "summary.md", lambda p: p.write_text(table, encoding="utf-8"), "summary")


# -- processes ----------------------------------------------------------------------------------


def _launch() -> tuple[int, int, int]:
    """``(process, num_processes, local process)`` as a launcher set them (one process: 0, 1, 0)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1))))
    rank = int(env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0))))
    local = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return rank, world, local


@contextlib.contextmanager
def _one_process_training(local_process: int) -> Iterator[None]:
    """Hide the launcher's variables (and reset accelerate's process-wide state) so that each
    trainer runs as a one-process job on this process's own device; put them back after."""
    from accelerate.state import AcceleratorState

    saved = {k: os.environ.pop(k) for k in _LAUNCH_VARIABLES if k in os.environ}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        if saved:
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(local_process % torch.cuda.device_count())
        yield
    finally:
        os.environ.update(saved)
        AcceleratorState._reset_state(reset_partial_state=True)


def _gather(results: list[SceneResult], num_processes: int) -> list[SceneResult]:
    """Every process's results, on every process (a CPU ``gloo`` group, made for this)."""
    if num_processes == 1:
        return list(results)
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        gathered: list[Any] = [None] * num_processes
        dist.all_gather_object(gathered, [asdict(r) for r in results])
    finally:
        if created:
            dist.destroy_process_group()
    return [SceneResult(**r) for part in gathered for r in part]
