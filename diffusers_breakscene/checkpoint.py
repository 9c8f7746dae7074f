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

from .errors import InvalidConfigError, MissingFileError, TrainingError
from .files import fsync_dir, new_file_mode, settle_permissions

__all__ = [
    "HANDLE_PARAMS",
    "CheckpointState",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "prune_checkpoints",
    "resolve_resume",
    "restore_checkpoint",
    "save_checkpoint",
    "use_configured_learning_rates",
]

STATE_FILE = "state.safetensors"
#: Names of the handle rows among a checkpoint's trainable tensors: the text encoder's, and on
#: SDXL the second encoder's. They are what carries over from phase 1 to phase 2.
HANDLE_PARAMS = ("handles", "handles_2")
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


def optimizer_to_tensors(
    state: dict[str, Any], prefix: str = "optimizer."
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's ``state_dict()`` into tensors for a safetensors file (named
    ``{prefix}{param index}.{key}``) and the JSON-able rest (``param_groups`` and any non-tensor
    state); :func:`optimizer_from_tensors` joins them again. Also used by the toy world's
    ``train_base``, whose checkpoints hold an EMA this module's do not.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(2); opt.step()
        >>> tensors, rest = optimizer_to_tensors(opt.state_dict())
        >>> sorted(tensors)
        ['optimizer.0.exp_avg', 'optimizer.0.exp_avg_sq', 'optimizer.0.step']
        >>> opt.load_state_dict(optimizer_from_tensors(tensors, rest))
    """
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, dict):  # bitsandbytes nests its 8-bit state in one dict entry
                for sub, item in value.items():
                    if not isinstance(item, torch.Tensor):
                        raise TypeError(f"optimizer state {key}.{sub} is not a tensor")
                    # cloned: its quantization maps are one tensor shared by every parameter
                    tensors[f"{prefix}{index}.{key}/{sub}"] = item.detach().cpu().clone()
            elif isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def optimizer_from_tensors(
    tensors: dict[str, torch.Tensor], rest: dict[str, Any], prefix: str = "optimizer."
) -> dict[str, Any]:
    """The optimizer ``state_dict`` that :func:`optimizer_to_tensors` split; tensors whose
    names lack ``prefix`` are ignored (see there for an example)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split(".", 1)
            entry = state.setdefault(int(index), {})
            if "/" in name:  # a nested entry (see optimizer_to_tensors)
                outer, inner = name.split("/", 1)
                entry.setdefault(outer, {})[inner] = value
            else:
                entry[name] = value
    for key, value in rest.get("plain", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


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
    opt_tensors, opt_plain = optimizer_to_tensors(optimizer.state_dict())
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
    settle_permissions(tmp / STATE_FILE, final / STATE_FILE, new_file_mode(tmp))
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
    return CheckpointState(
        step=int(metadata["step"]),
        phase=int(metadata["phase"]),
        params={k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")},
        optimizer=optimizer_from_tensors(tensors, opt_meta),
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


def resolve_resume(spec: str | None, output_dir: str | os.PathLike[str]) -> CheckpointState | None:
    """The checkpoint ``resume_from_checkpoint`` names: ``None``; ``"latest"`` (the newest under
    ``output_dir/checkpoints``, or ``None`` when there is none yet); or a checkpoint folder.

    Example:
        >>> import tempfile
        >>> resolve_resume("latest", tempfile.mkdtemp()) is None
        True
    """
    if not spec:
        return None
    if spec == "latest":
        found = latest_checkpoint(Path(output_dir) / "checkpoints")
        return load_checkpoint(found) if found is not None else None
    return load_checkpoint(spec)


def restore_checkpoint(
    state: CheckpointState,
    phase: int,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    lr_scheduler: Any,
    generator: torch.Generator,
    process_index: int = 0,
) -> int:
    """Load ``state`` into one phase's training state; returns the step to continue from.

    A checkpoint of the same phase restores everything; one taken at the very end of phase 1
    seeds phase 2 with the handles (the LoRA and optimizer start fresh, as they would have
    without the interruption). Each process takes its own generator state. The learning rates
    of ``optimizer`` as configured win over the saved ones (see
    :func:`use_configured_learning_rates`).

    Example:
        >>> import tempfile, torch
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.AdamW([p])
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        >>> path = save_checkpoint(tempfile.mkdtemp(), step=3, phase=1, params={"p": p * 2},
        ...                        optimizer=opt, scheduler=sched,
        ...                        generator_states=torch.Generator().get_state()[None])
        >>> restore_checkpoint(load_checkpoint(path), 1, {"p": p}, opt, sched, torch.Generator())
        3
        >>> p.tolist()
        [2.0, 2.0]
    """
    same_phase = state.phase == phase
    # Across phases only the handle rows carry over.
    names = [n for n in trainable if same_phase or n in HANDLE_PARAMS]
    missing = [name for name in names if name not in state.params]
    if missing:
        raise InvalidConfigError(
            f"The checkpoint at step {state.step} lacks {len(missing)} trainable tensors "
            f"(e.g. {missing[0]!r}): it was made with another configuration (phase2, LoRA "
            "rank or targets); resume with the same config."
        )
    with torch.no_grad():
        for name in names:
            param = trainable[name]
            param.copy_(state.params[name].to(param.device, param.dtype))
    if same_phase:
        configured = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.scheduler)
        use_configured_learning_rates(optimizer, lr_scheduler, configured)
    index = min(process_index, state.generator_states.shape[0] - 1)
    generator.set_state(state.generator_states[index].clone())
    if state.torch_rng_state is not None:
        torch.set_rng_state(state.torch_rng_state)
    return state.step


def use_configured_learning_rates(optimizer: Any, lr_scheduler: Any, configured: list) -> None:
    """After loading a checkpoint, use the config's base learning rates, not the saved ones.

    Resuming with the same config changes nothing; resuming with a lowered learning rate (the
    fix NonFiniteLossError suggests) really lowers it, keeping the schedule's position.
    """
    for index, (group, base) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
        saved = group.get("initial_lr", base)
        if saved == base:
            continue
        group["lr"] = group["lr"] * (base / saved) if saved else base
        group["initial_lr"] = base
        lr_scheduler.base_lrs[index] = base
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
