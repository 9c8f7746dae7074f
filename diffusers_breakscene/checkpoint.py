"""Training checkpoints in safetensors only: trainable weights, optimizer, scheduler, random state.

``accelerate``'s ``save_state``/``load_state`` would also work, but its loader unpickles the
optimizer, scheduler and random states (``torch.load``, ``weights_only=False`` for custom
objects); this project never unpickles files, so a checkpoint here is one ``state.safetensors``
holding every tensor, with the few non-tensor values (step, phase, optimizer hyperparameters,
scheduler counters) as JSON in its metadata. Each checkpoint folder is written under a temporary
name and renamed into place: a crash mid-save leaves the previous checkpoints intact.

Example:
    >>> import tempfile, torch
    >>> from diffusers_breakscene.checkpoint import load_checkpoint, save_checkpoint
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.AdamW([p])
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    >>> path = save_checkpoint(tempfile.mkdtemp(), step=3, phase=1, params={"p": p},
    ...                        optimizer=opt, scheduler=sched,
    ...                        generator_states=torch.Generator().get_state()[None])
    >>> load_checkpoint(path).step
    3
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import MissingFileError, TrainingError
from .files import fsync_dir

__all__ = [
    "CheckpointState",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

STATE_FILE = "state.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` returns."""

    step: int
    phase: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator_states: torch.Tensor
    torch_rng_state: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    phase: int,
    params: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    generator_states: torch.Tensor,
    torch_rng_state: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/checkpoint-{step}/state.safetensors`` atomically; returns the folder."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    tensors = {f"param.{k}": v.detach().cpu().float().contiguous() for k, v in params.items()}
    opt_tensors, opt_plain = _optimizer_tensors(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.generators"] = generator_states.cpu().contiguous()
    if torch_rng_state is not None:
        tensors["rng.torch"] = torch_rng_state.cpu().contiguous()
    metadata = {
        "format": "break-a-scene-checkpoint",
        "step": str(step),
        "phase": str(phase),
        "optimizer": json.dumps(opt_plain),
        "scheduler": json.dumps(scheduler.state_dict()),
        "extra": json.dumps(extra or {}),
    }
    save_file(tensors, tmp / STATE_FILE, metadata=metadata)
    with open(tmp / STATE_FILE, "rb") as handle:
        os.fsync(handle.fileno())
    if final.is_dir():
        # A folder cannot be renamed over a non-empty one atomically; the checkpoint is one
        # file, so replace that file atomically instead: a crash leaves the old or the new.
        os.replace(tmp / STATE_FILE, final / STATE_FILE)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(root)
    return final


def load_checkpoint(directory: str | os.PathLike[str]) -> CheckpointState:
    """Read a folder written by :func:`save_checkpoint`."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise MissingFileError(
            f"No checkpoint at {directory} ({STATE_FILE} missing); pass a checkpoint-N folder "
            "or resume_from_checkpoint='latest'."
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != "break-a-scene-checkpoint":
            raise TrainingError(f"{path} is not a diffusers-breakscene checkpoint.")
        tensors = load_file(path)
    except TrainingError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise TrainingError(
            f"{path} cannot be read ({err}); resume from another checkpoint-N folder or delete "
            "this one."
        ) from None
    opt_meta = json.loads(metadata["optimizer"])
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for key, value in opt_meta["plain"].items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    return CheckpointState(
        step=int(metadata["step"]),
        phase=int(metadata["phase"]),
        params={k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")},
        optimizer={"state": opt_state, "param_groups": opt_meta["param_groups"]},
        scheduler=json.loads(metadata["scheduler"]),
        generator_states=tensors["rng.generators"],
        torch_rng_state=tensors.get("rng.torch"),
        extra=json.loads(metadata.get("extra", "{}")),
    )


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N under ``directory``, or ``None``."""
    found = _checkpoints(Path(directory))
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | os.PathLike[str], keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most ``keep`` remain (``None``: keep all)."""
    if keep is None:
        return
    found = _checkpoints(Path(directory))
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
