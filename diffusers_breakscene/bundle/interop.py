"""Interchange with diffusers: stock LoRA and textual-inversion files, trained pipelines.

:func:`export_diffusers` writes ``pytorch_lora_weights.safetensors`` with diffusers' own
``save_lora_weights`` and ``break_a_scene_emb.safetensors`` in the pivotal-tuning layout
(``{"clip_l": (n, d)}``); :func:`read_diffusers` reads such files back into bundle parts, and
:func:`read_pipeline` takes them from a trained pipeline.

Example:
    >>> import tempfile, torch
    >>> from diffusers_breakscene.bundle import Bundle
    >>> folder = tempfile.mkdtemp()
    >>> sorted(export_diffusers(Bundle(handles={"<a>": torch.ones(1, 4)}), folder))
    ['embeddings']
    >>> read_diffusers(folder)["tokens"]
    ['<a>']
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from ..errors import (
    InvalidArgumentError,
    InvalidBundleError,
    MissingFileError,
    UnwritableOutputError,
    fail,
)
from ..files import check_utf8_path, check_writable, fsync_dir, new_file_mode, settle_permissions
from .format import (
    DIFFUSERS_EMBEDDINGS_NAME,
    DIFFUSERS_LORA_NAME,
    FIX_DAMAGED,
    LEGACY_EMBEDDINGS_NAME,
    LORA_COMPONENTS,
    check_tokens,
    is_int,
)
from .io import read_file, read_header
from .tensors import owned

if TYPE_CHECKING:
    from .core import Bundle

__all__ = ["export_diffusers", "read_diffusers", "read_lora_state", "read_pipeline"]

_EMBEDDING_KEYS = ("clip_l", "clip_g")


# ------------------------------------------------------------------------------------------
# export


def export_diffusers(bundle: Bundle, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``bundle`` for stock diffusers into ``directory`` (see ``Bundle.export_diffusers``).

    Both files are written into a staging folder first, then renamed into place.
    """
    bundle.validate()
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        fail(
            UnwritableOutputError,
            f"cannot export into {str(directory)!r}: it is a file",
            "pass a folder",
        )
    check_writable(directory / DIFFUSERS_EMBEDDINGS_NAME, "export")
    check_utf8_path(directory, "export folder", UnwritableOutputError)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".breakscene-export-", dir=directory))
    except OSError as err:
        raise UnwritableOutputError(f"cannot write into {str(directory)!r}: {err}") from err
    written: dict[str, Path] = {}
    try:
        if bundle.lora:
            _write_lora(bundle, staging)
            written["lora"] = staging / DIFFUSERS_LORA_NAME
        _write_embeddings(bundle, staging / DIFFUSERS_EMBEDDINGS_NAME)
        written["embeddings"] = staging / DIFFUSERS_EMBEDDINGS_NAME
        out: dict[str, Path] = {}
        mode = new_file_mode(staging)  # the umask's mode, probed out of the user's sight
        for key, tmp in written.items():
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            out[key] = directory / tmp.name
            settle_permissions(tmp, out[key], mode)
            os.replace(tmp, out[key])
        stale = directory / DIFFUSERS_LORA_NAME
        if "lora" not in out and stale.is_file():
            stale.unlink()  # an earlier export's LoRA must not pair with these handles
    except OSError as err:
        raise UnwritableOutputError(f"exporting into {str(directory)!r} failed: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(directory)
    return out


def _write_lora(bundle: Bundle, directory: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    config = bundle.info.lora or {}
    components = sorted({k.split(".", 1)[0] for k in bundle.lora})
    sdxl = "text_encoder_2" in components or bundle.handles_2
    kwargs: dict[str, Any] = {}
    for component in components:
        prefix = f"{component}."
        kwargs[f"{component}_lora_layers"] = {
            k.removeprefix(prefix): owned(v, v.dtype)
            for k, v in bundle.lora.items()
            if k.startswith(prefix)
        }
        kwargs[f"{component}_lora_adapter_metadata"] = config[component].to_dict()
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        str(directory), weight_name=DIFFUSERS_LORA_NAME, safe_serialization=True, **kwargs
    )


def _write_embeddings(bundle: Bundle, file: Path) -> None:
    tokens = bundle.tokens
    embeds = {"clip_l": torch.cat([bundle.handles[t].float() for t in tokens])}
    if bundle.handles_2:
        embeds["clip_g"] = torch.cat([bundle.handles_2[t].float() for t in tokens])
    meta = {
        "format": "pt",
        "tokens": json.dumps(tokens),
        "vectors_per_token": json.dumps([int(bundle.handles[t].shape[0]) for t in tokens]),
    }
    embeds = {k: v.detach().cpu().contiguous() for k, v in embeds.items()}
    safetensors.torch.save_file(embeds, str(file), metadata=meta)


# ------------------------------------------------------------------------------------------
# import


def read_diffusers(
    directory_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokens: Sequence[str] | None = None,
    *,
    subfolder: str | None = None,
    weight_name: str = DIFFUSERS_LORA_NAME,
    embeddings_name: str = DIFFUSERS_EMBEDDINGS_NAME,
) -> dict[str, Any]:
    """The bundle parts (``tokens``, ``handles``, ``handles_2``, ``lora``, ``lora_config``)
    held by a stock diffusers LoRA file and textual-inversion file (see
    ``Bundle.from_diffusers``)."""
    lora_file, embeddings_file = _diffusers_files(
        directory_or_files, subfolder, weight_name, embeddings_name
    )
    # Not diffusers' load_textual_inversion_state_dicts: it drops the file's __metadata__
    # (tokens, vectors_per_token) and lets safetensors' own errors through.
    embeds, embeds_meta = read_file(embeddings_file, "embeddings file")
    token_list = _embedding_tokens(embeds, embeds_meta, tokens, embeddings_file)
    handles, handles_2 = _split_embeddings(embeds, embeds_meta, token_list, embeddings_file)
    lora, config = _read_lora(lora_file) if lora_file is not None else ({}, {})
    return {
        "tokens": token_list,
        "handles": handles,
        "handles_2": handles_2,
        "lora": lora,
        "lora_config": config,
    }


def _diffusers_files(
    directory_or_files: Any, subfolder: str | None, weight_name: str, embeddings_name: str
) -> tuple[Path | None, Path]:
    # Not diffusers' _best_guess_weight_name: the folder holds two .safetensors files (LoRA and
    # embeddings) and it would pick either; the names are known, so they are looked up.
    if isinstance(directory_or_files, (str, os.PathLike)):
        folder = Path(directory_or_files).expanduser()
        if folder.is_file():
            return _classify_files([folder])
        folder = folder / subfolder if subfolder else folder
        if not folder.is_dir():
            fail(
                MissingFileError,
                f"{str(folder)!r} does not exist",
                "pass the folder written by export_diffusers or a list of .safetensors files",
            )
        lora_file, embeddings_file = folder / weight_name, folder / embeddings_name
        legacy = folder / LEGACY_EMBEDDINGS_NAME
        if embeddings_name == DIFFUSERS_EMBEDDINGS_NAME and not embeddings_file.is_file():
            embeddings_file = legacy if legacy.is_file() else embeddings_file
        if not embeddings_file.is_file():
            fail(
                MissingFileError,
                f"folder {str(folder)!r} has no {embeddings_name!r} (the handle embeddings)",
                "pass embeddings_name=... or a list of files",
            )
        return (lora_file if lora_file.is_file() else None), embeddings_file
    if isinstance(directory_or_files, Iterable):
        return _classify_files([Path(p).expanduser() for p in directory_or_files])
    fail(
        MissingFileError,
        f"expected a folder or a list of files, got {type(directory_or_files).__name__}",
    )


def _classify_files(files: list[Path]) -> tuple[Path | None, Path]:
    lora_file: Path | None = None
    embeddings_file: Path | None = None
    for file in files:
        if not file.is_file():
            fail(MissingFileError, f"file {str(file)!r} does not exist")
        keys, _ = read_header(file, "file")
        if keys and all("lora" in k for k in keys):
            if lora_file is not None:
                fail(
                    InvalidBundleError,
                    f"two LoRA files given: {str(lora_file)!r} and {str(file)!r}",
                )
            lora_file = file
        else:
            if embeddings_file is not None:
                fail(
                    InvalidBundleError,
                    f"two embeddings files given: {str(embeddings_file)!r} and {str(file)!r}",
                )
            embeddings_file = file
    if embeddings_file is None:
        fail(
            MissingFileError,
            "no embeddings file among the files given",
            f"add the {DIFFUSERS_EMBEDDINGS_NAME} file",
        )
    return lora_file, embeddings_file


def json_field(meta: dict[str, str], key: str, name: str) -> Any:
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError):
        fail(InvalidBundleError, f"{name}: metadata {key!r} is not valid JSON", FIX_DAMAGED)


def _embedding_tokens(
    embeds: dict[str, torch.Tensor], meta: dict[str, str], tokens: Sequence[str] | None, file: Path
) -> list[str]:
    name = f"embeddings file {str(file)!r}"
    if tokens is not None:
        return check_tokens([tokens] if isinstance(tokens, str) else list(tokens))
    if "tokens" in meta:
        return check_tokens(json_field(meta, "tokens", name))
    if any(k in embeds for k in _EMBEDDING_KEYS):
        fail(
            InvalidBundleError,
            f"{name} holds {sorted(embeds)} rows without token names",
            "pass tokens=[...] in row order",
        )
    return check_tokens(list(embeds))


def _split_embeddings(
    embeds: dict[str, torch.Tensor], meta: dict[str, str], tokens: list[str], file: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    name = f"embeddings file {str(file)!r}"
    if not any(k in embeds for k in _EMBEDDING_KEYS):  # keyed by token (classic TI files)
        if len(embeds) == 1 and len(tokens) == 1:
            tensor = next(iter(embeds.values()))
            return {tokens[0]: tensor.reshape(-1, tensor.shape[-1])}, {}
        missing = [t for t in tokens if t not in embeds]
        if missing:
            fail(
                InvalidBundleError, f"{name} has no tensor for {missing}; it holds {sorted(embeds)}"
            )
        return {t: embeds[t].reshape(-1, embeds[t].shape[-1]) for t in tokens}, {}
    counts: Any = [1] * len(tokens)
    recorded = json_field(meta, "tokens", name) if "tokens" in meta else None
    if "vectors_per_token" in meta and recorded == tokens:
        counts = json_field(meta, "vectors_per_token", name)
        if not (
            isinstance(counts, list)
            and len(counts) == len(tokens)
            and all(is_int(c) and c > 0 for c in counts)
        ):
            fail(
                InvalidBundleError,
                f"{name}: metadata 'vectors_per_token' {counts!r} does not fit tokens {tokens}",
            )
    out: list[dict[str, torch.Tensor]] = []
    for key in _EMBEDDING_KEYS:
        if key not in embeds:
            out.append({})
            continue
        matrix = embeds[key]
        if matrix.dim() != 2 or matrix.shape[0] != sum(counts):
            fail(
                InvalidBundleError,
                f"{name}: {key!r} has shape {tuple(matrix.shape)} but {len(tokens)} token(s) "
                f"need {sum(counts)} rows",
                "pass the tokens in row order (one per row)",
            )
        rows = torch.split(matrix, counts)
        out.append({t: r.clone() for t, r in zip(tokens, rows, strict=True)})
    if not out[0]:
        fail(InvalidBundleError, f"{name} has 'clip_g' rows but no 'clip_l' rows")
    return out[0], out[1]


def _read_lora(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and per-component LoRA configs of a diffusers LoRA file.

    The weights and adapter metadata come from diffusers' own
    ``StableDiffusionPipeline.lora_state_dict(..., return_lora_metadata=True)`` (which also
    converts Kohya / A1111 files); the file is checked by :func:`read_header` first, for its
    errors and because diffusers would fall back to unpickling a ``.bin`` next to it.
    """
    from diffusers import StableDiffusionPipeline

    name = f"LoRA file {str(file)!r}"
    _, raw = read_header(file, "LoRA file")
    if raw.get("lora_adapter_metadata") and not isinstance(
        json_field(raw, "lora_adapter_metadata", name), dict
    ):
        fail(
            InvalidBundleError,
            f"{name}: its 'lora_adapter_metadata' is not a JSON object",
            FIX_DAMAGED,
        )
    try:
        lora, alphas, flat = StableDiffusionPipeline.lora_state_dict(
            str(file.parent),
            weight_name=file.name,
            use_safetensors=True,
            local_files_only=True,
            return_lora_metadata=True,
        )
    except (OSError, ValueError, RuntimeError) as err:
        fail(InvalidBundleError, f"{name} cannot be read by diffusers: {err}", FIX_DAMAGED)
    return lora, _configs(lora, alphas, flat, name)


def read_lora_state(
    state: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (diffusers' layout) and per-component LoRA configs of a LoRA state dict in
    any layout diffusers' ``lora_state_dict`` reads (diffusers, peft, kohya / A1111)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    reader = StableDiffusionXLPipeline if any("lora_te2_" in k for k in state) else None
    reader = reader or StableDiffusionPipeline
    try:
        lora, alphas = reader.lora_state_dict(dict(state))[:2]
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        fail(InvalidBundleError, f"{name} cannot be read by diffusers: {err}", FIX_DAMAGED)
    # diffusers turns kohya's attention keys into its old attention-processor layout
    # ("attn1.processor.to_q_lora.down"); bundles hold the module layout ("attn1.to_q.lora.down")
    # that training writes, so that both read the same and the configs name real modules.
    lora = {_OLD_PROCESSOR_KEY.sub(_module_key, k): v for k, v in lora.items()}
    alphas = {_OLD_PROCESSOR_KEY.sub(_module_key, k): v for k, v in (alphas or {}).items()}
    return lora, _configs(lora, alphas, None, name)


_OLD_PROCESSOR_KEY = re.compile(r"\.processor\.to_(q|k|v|out)_lora\.")


def _module_key(match: re.Match[str]) -> str:
    projection = match.group(1)
    return f".to_{projection}{'.0' if projection == 'out' else ''}.lora."


def _configs(
    lora: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    flat: dict[str, Any] | None,
    name: str,
) -> dict[str, Any]:
    """Per-component LoRA configs: from the file's adapter metadata (``flat``) when it has
    them, else read from the weights and alphas."""
    config: dict[str, Any] = {}
    for component in sorted({k.split(".", 1)[0] for k in lora}):
        if component not in LORA_COMPONENTS:
            continue  # reported by validation with the key's name
        prefix = f"{component}."
        given = {k.removeprefix(prefix): v for k, v in (flat or {}).items() if k.startswith(prefix)}
        if {"r", "lora_alpha", "target_modules"} <= set(given):
            info = {k: given[k] for k in ("r", "lora_alpha", "target_modules")}
            info.update({k: given[k] for k in ("rank_pattern", "alpha_pattern") if given.get(k)})
        else:
            weights = {k.removeprefix(prefix): v for k, v in lora.items() if k.startswith(prefix)}
            info = _guess_config(component, weights, alphas, name)
        if isinstance(info["target_modules"], list):
            info["target_modules"] = sorted(info["target_modules"])
        config[component] = info
    return config


def _guess_config(
    component: str, weights: dict[str, torch.Tensor], alphas: dict[str, float] | None, name: str
) -> dict[str, Any]:
    """r / lora_alpha / target modules read from the weights, with diffusers' own
    ``get_peft_kwargs`` (as ``load_lora_weights`` does for a file without adapter metadata):
    without alphas in the file, ``lora_alpha = r``."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs

    if any("lora_linear_layer" in k or "to_out_lora" in k for k in weights):
        peft_state = convert_state_dict_to_peft(weights)
    else:
        peft_state = convert_unet_state_dict_to_peft(weights)
    ranks = {k: int(v.shape[1]) for k, v in peft_state.items() if "lora_B" in k and v.dim() > 1}
    if not ranks:
        fail(
            InvalidBundleError,
            f"{name}: cannot tell the rank of the {component} LoRA (no up weights)",
        )
    prefix = f"{component}."
    alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)}
    kwargs = get_peft_kwargs(ranks, alphas or None, peft_state, is_unet=component == "unet")
    info = {k: kwargs[k] for k in ("r", "lora_alpha", "target_modules")}
    info.update({k: kwargs[k] for k in ("rank_pattern", "alpha_pattern") if kwargs[k]})
    if component != "unet":
        # Module paths read from the keys start with "text_model.", which transformers 5's
        # CLIPTextModel no longer has; without it they match either version (peft matches
        # target names as suffixes of module paths).
        def short(name: str) -> str:
            return name.removeprefix("text_model.")

        if isinstance(info["target_modules"], list | set | tuple):
            info["target_modules"] = sorted({short(t) for t in info["target_modules"]})
        for key in ("rank_pattern", "alpha_pattern"):
            if key in info:
                info[key] = {short(k): v for k, v in info[key].items()}
    return info


# ------------------------------------------------------------------------------------------
# a trained pipeline


def read_pipeline(
    pipeline: Any,
    tokens: Sequence[str],
    initializers: Sequence[str | None],
    mask_areas: Sequence[float],
    lora_components: Sequence[str] = ("unet",),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(handles, lora, metadata)`` of a trained pipeline, with the training adapter's LoRA
    of ``lora_components`` (``"unet"``, ``"text_encoder"``); see ``Bundle.from_pipeline``."""
    from ..fingerprint import base_fingerprint
    from ..handles import get_handle_embeddings
    from ..lora import lora_metadata, lora_state_dict

    tokens = list(tokens)
    if not len(tokens) == len(initializers) == len(mask_areas):
        fail(
            InvalidArgumentError,
            f"from_pipeline got {len(tokens)} tokens, {len(initializers)} initializers and "
            f"{len(mask_areas)} mask areas",
            "give one initializer (or None) and one mask area per token",
        )
    rows = get_handle_embeddings(pipeline.tokenizer, pipeline.text_encoder, tokens)
    config = {name: lora_metadata(getattr(pipeline, name)) for name in lora_components}
    models = {name: getattr(pipeline, name) for name in lora_components}
    weights = lora_state_dict(**models) if config else {}
    concepts = {
        token: {"initializer": init, "mask_area": round(float(area), 6)}
        for token, init, area in zip(tokens, initializers, mask_areas, strict=True)
    }
    metadata = {
        "tokens": tokens,
        "concepts": concepts,
        "base_fingerprint": base_fingerprint(pipeline),
        "lora": config,
    }
    return rows, weights, metadata
