"""What the studio does, without the page: propose masks, build the scene, train in the
background, generate, load bundles. The Gradio page (:mod:`.app`) only calls these, so every
step is usable (and tested) from Python too.

Example:
    >>> from diffusers_breakscene.studio import StudioSession
    >>> session = StudioSession("toy", "studio-out")
    >>> session.parse_words("a red star, a blue ring")
    ['a red star', 'a blue ring']
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..base_pipeline import BUILTIN_MODELS, TOY_MODEL, load_pipeline
from ..errors import InvalidArgumentError, InvalidSceneError
from ..files import check_output_dir

__all__ = ["StudioSession", "TrainingRun"]

_TOY_RESOLUTION = 64


@dataclass
class TrainingRun:
    """A training run going on in a background thread. ``step`` / ``total`` and ``logs`` (the
    latest step's losses) can be read while it runs; :meth:`wait` returns the bundle or raises
    what training raised."""

    output_dir: Path
    total: int
    trainer: Any
    thread: threading.Thread | None = None
    bundle: Path | None = None
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def step(self) -> int:
        """Optimizer steps done so far."""
        return len(self.trainer.history)

    @property
    def logs(self) -> dict[str, float]:
        """The latest step's log line (``loss``, ``phase``, ``lr``...), empty before the first."""
        history = self.trainer.history
        return dict(history[-1]) if history else {}

    @property
    def done(self) -> bool:
        """Whether the run has ended (finished or failed)."""
        return self.thread is not None and not self.thread.is_alive()

    def validation_pictures(self) -> list[tuple[Path, str]]:
        """``(picture, caption)`` of every validation image written so far, newest first."""
        root = self.output_dir / "validation"
        found = []
        for folder in root.glob("step-*"):
            step = int(folder.name.removeprefix("step-") or 0)
            for image in sorted(folder.glob("*.png")):
                prompt = folder / f"{image.stem.split('-')[0]}.txt"  # 00.png, 00-attention.png
                text = prompt.read_text(encoding="utf-8").strip() if prompt.exists() else ""
                kind = "attention" if image.stem.endswith("attention") else "image"
                found.append((step, image.name, image, f"step {step} {kind}: {text}"))
        found.sort(key=lambda item: (-item[0], item[1]))
        return [(path, caption) for _, _, path, caption in found]

    def wait(self, timeout: float | None = None) -> Path:
        """Wait for the run; returns the bundle's path or raises the run's error."""
        if self.thread is not None:
            self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.bundle is None:
            raise TimeoutError(f"training still running after {timeout} s")
        return self.bundle

    def _work(self) -> None:
        try:
            self.bundle = self.trainer.train(self.output_dir, progress=False)
        except BaseException as error:  # reported to the page by whoever waits
            self.error = error


class StudioSession:
    """The studio's state: one base model, an output folder, and the pipeline it generates with.

    Args:
        model: a built-in model name (``"toy"``, ``"tiny-sd1"``...), a folder or a hub id.
        output_dir: where each training run gets its own ``run-N`` folder (scene, validation
            pictures, bundle).

    Example:
        >>> session = StudioSession("toy", "studio-out")  # doctest: +SKIP
        >>> proposal = session.propose("photo.png", "a red star, a blue ring")  # doctest: +SKIP
        >>> scene = session.scene(proposal.image, proposal.masks)  # doctest: +SKIP
        >>> run = session.start_training(scene, session.config(20, 20))  # doctest: +SKIP
        >>> session.load_bundle(run.wait())  # doctest: +SKIP
        ['<asset0>', '<asset1>']
        >>> image = session.generate("a photo of <asset0> in the snow")  # doctest: +SKIP
    """

    def __init__(
        self, model: str = TOY_MODEL, output_dir: str | os.PathLike[str] = "breakscene-studio"
    ) -> None:
        self.model = str(model)
        self.output_dir = check_output_dir(output_dir, "studio output folder")
        self._pipe: Any = None
        self._lock = threading.RLock()
        self.run: TrainingRun | None = None

    # -- the base pipeline ----------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The pipeline masks and images come from (loaded on first use)."""
        with self._lock:
            if self._pipe is None:
                self._pipe = load_pipeline(self.model)
                self._pipe.set_progress_bar_config(disable=True)
            return self._pipe

    @property
    def resolution(self) -> int | None:
        """Image size for masks, training and generation: 64 on the built-in models (the toy
        model's own size; the random-weight tiny ones kept quick), else ``None``: the model's
        own."""
        return _TOY_RESOLUTION if self.model in BUILTIN_MODELS else None

    @property
    def loaded_tokens(self) -> list[str]:
        """Handles of the bundles loaded into the pipeline now."""
        if self._pipe is None or not hasattr(self._pipe, "break_a_scene_adapters"):
            return []
        return [t for tokens in self._pipe.break_a_scene_adapters.values() for t in tokens]

    # -- masks and scene ------------------------------------------------------------------------

    @staticmethod
    def parse_words(words: str | Sequence[str]) -> list[str]:
        """One phrase per object from ``"a dog, a hat"`` (commas or new lines) or a list."""
        items = words.replace("\n", ",").split(",") if isinstance(words, str) else list(words)
        phrases = [" ".join(str(w).split()) for w in items]
        phrases = [p for p in phrases if p]
        if not phrases:
            raise InvalidArgumentError(
                "no objects named; type one word or phrase per object, separated by commas "
                '(e.g. "a dog, a hat").'
            )
        return phrases

    def propose(self, photo: Any, words: str | Sequence[str]) -> Any:
        """:func:`~diffusers_breakscene.masks.masks_from_words` on the base model (bundles
        loaded earlier are unloaded first: masks come from the model's own words)."""
        from ..masks import masks_from_words

        phrases = self.parse_words(words)
        with self._lock:
            pipe = self.pipeline
            if self.loaded_tokens:
                pipe.unload_break_a_scene()
            return masks_from_words(pipe, photo, phrases, resolution=self.resolution)

    def scene(
        self,
        photo: Image.Image,
        masks: Sequence[np.ndarray],
        tokens: Sequence[str] | None = None,
        initializers: Sequence[str | None] | None = None,
    ) -> Any:
        """A :class:`~diffusers_breakscene.Scene` from the edited masks, refused with a message
        naming the mask when one is empty or a token is unusable (before any training)."""
        from ..handles import check_handle_names
        from ..scene import Scene

        if not masks:
            raise InvalidSceneError("there are no masks yet; propose masks first.")
        tokens = list(tokens) if tokens else [f"<asset{i}>" for i in range(len(masks))]
        for i, mask in enumerate(masks):
            if not np.asarray(mask, bool).any():
                raise InvalidSceneError(
                    f"mask {i} ({tokens[i]}) is empty: paint its object with the green brush, "
                    "or propose masks again."
                )
        cleaned = [(w or "").strip() or None for w in initializers] if initializers else None
        scene = Scene(photo, [np.asarray(m, np.uint8) * 255 for m in masks], tokens, cleaned)
        check_handle_names(self.pipeline.tokenizer, scene.tokens, "handle names", "the studio")
        return scene

    # -- training -------------------------------------------------------------------------------

    def config(
        self, phase1_steps: int, phase2_steps: int, validation_every: int | None = None
    ) -> Any:
        """The default configuration (scaled to the toy model on ``"toy"``) with these step
        counts, rendering validation pictures every ``validation_every`` steps and at each
        phase's end."""
        from ..config import BreakASceneConfig
        from ..toy.experiment import toy_config

        changes: dict[str, Any] = {
            "phase1_steps": int(phase1_steps),
            "phase2_steps": int(phase2_steps),
            "validation_steps": int(validation_every) if validation_every else None,
            "validate_phase_ends": True,
            "checkpoint_phase_ends": False,
        }
        if self.model == TOY_MODEL:
            return toy_config(**changes)
        return BreakASceneConfig(**changes, resolution=self.resolution)

    def _run_folder(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        while (self.output_dir / f"run-{n}").exists():
            n += 1
        return self.output_dir / f"run-{n}"

    def start_training(self, scene: Any, config: Any) -> TrainingRun:
        """Train ``scene`` in a background thread into a new ``run-N`` folder (which also gets
        the scene's image and masks); returns at once. One run at a time."""
        from ..trainer import BreakASceneTrainer

        if self.run is not None and not self.run.done:
            raise InvalidArgumentError("a training run is going on; wait for it to finish.")
        folder = self._run_folder()
        trainer = BreakASceneTrainer(self.model, scene, config)
        _save_scene(scene, folder / "scene")
        run = TrainingRun(folder, config.phase1_steps + config.phase2_steps, trainer)
        run.thread = threading.Thread(target=run._work, name="breakscene-studio-train")
        self.run = run
        run.thread.start()
        return run

    # -- the result -----------------------------------------------------------------------------

    def load_bundle(self, path: str | os.PathLike[str]) -> list[str]:
        """Load a bundle into the pipeline in place of those loaded before; returns its
        tokens. A bundle that does not load leaves the pipeline as it was."""
        from ..bundle import Bundle

        bundle = Bundle.load(path)  # read and checked before the pipeline changes
        with self._lock:
            pipe = self.pipeline
            if self.loaded_tokens:
                pipe.unload_break_a_scene()
            return pipe.load_break_a_scene(bundle)

    def generate(self, prompt: str, *, seed: int = 0, steps: int = 25) -> Image.Image:
        """One image of ``prompt`` with the loaded bundles."""
        from ..validation import generate_images

        if not prompt or not prompt.strip():
            raise InvalidArgumentError('the prompt is empty; e.g. "a photo of <asset0>".')
        with self._lock:
            size = self.resolution
            (image,) = generate_images(
                self.pipeline, [prompt], steps=int(steps), seed=int(seed), height=size,
                width=size, progress=False,
            )  # fmt: skip
        return image


def _save_scene(scene: Any, folder: Path) -> None:
    """The scene's image and masks as a scene folder (``img.png``, ``mask<N>.png``)."""
    from ..masks import MaskProposal

    masks = [np.asarray(m, bool) for m in scene.masks]
    MaskProposal(scene.image, list(scene.tokens), masks).save_scene_dir(folder, preview=False)
