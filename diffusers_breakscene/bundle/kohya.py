"""Interchange with AUTOMATIC1111, SD.Next, ComfyUI and kohya's sd-scripts.

Those programs read a LoRA in kohya's key layout (``lora_unet_down_blocks_0_..._to_q.lora_down
.weight`` with an ``.alpha`` per module) and textual-inversion embeddings as one file per token,
named after it: the file name is the word a prompt uses. :func:`export_kohya` writes both
(``bundled=True`` puts the embeddings inside the LoRA file instead, the A1111 / SD.Next
"bundled embeddings" form ``bundle_emb.<name>.string_to_param.*``); :func:`read_kohya` reads
either form back into bundle parts.

The LoRA keys come from diffusers' own ``convert_state_dict_to_kohya`` and are read back by
diffusers' own ``lora_state_dict`` (which converts kohya keys). Two things are done by hand:
diffusers writes every ``.alpha`` as the rank (it has no alphas to go on), so the bundle's real
``lora_alpha`` is written over it; and a single text encoder is ``lora_te_`` as in kohya's SD1/SD2
files (diffusers writes ``lora_te1_``, the SDXL name).

Embedding tensors per model family: ``{"emb_params": (k, d)}`` for SD1 (CLIP ViT-L) and SD2
(OpenCLIP ViT-H: its rows are not ``clip_l`` rows, and the file's metadata says which encoder
they belong to), ``{"clip_l": (k, 768), "clip_g": (k, 1280)}`` for SDXL.

Example:
    >>> embedding_name("<asset0>"), embedding_name("my cat!")
    ('asset0', 'my_cat_')
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidArgumentError, InvalidBundleError, MissingFileError, fail
from ..files import check_output_dir, fsync_dir
from .interop import json_field, read_lora_state
from .io import read_file, save_atomic

if TYPE_CHECKING:
    from .core import Bundle

__all__ = ["embedding_name", "export_kohya", "read_kohya"]

#: Text encoder of each family, as recorded in an embedding file's metadata.
ENCODERS = {"sd1": "clip_l", "sd2": "open_clip_vit_h14", "sdxl": "clip_l+clip_g"}
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_BUNDLED = "bundle_emb."


def embedding_name(token: str) -> str:
    """The file stem (and prompt word in A1111 / ComfyUI) for ``token``: angle brackets
    dropped, every character other than letters, digits, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", token.strip("<>")) or "handle"


def _family(bundle: Bundle) -> str:
    fingerprint = bundle.metadata.get("base_fingerprint") or {}
    if fingerprint.get("family") in ENCODERS:
        return str(fingerprint["family"])
    if bundle.handles_2:
        return "sdxl"
    width = int(next(iter(bundle.handles.values())).shape[-1])
    return "sd2" if width == 1024 else "sd1"


def _names(tokens: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for token in tokens:
        name = embedding_name(token)
        if name in names.values():
            fail(
                InvalidArgumentError,
                f"handles {tokens!r} give the same embedding file name {name!r}",
                "rename the handles (Bundle(...) with other tokens) before exporting",
            )
        names[token] = name
    return names


# ------------------------------------------------------------------------------------------
# export


def _kohya_lora(bundle: Bundle, family: str) -> dict[str, torch.Tensor]:
    """The bundle's LoRA in kohya's keys, with its own alphas."""
    from diffusers.utils import (
        convert_state_dict_to_kohya,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from peft.utils.other import get_pattern_key

    configs = bundle.info.lora or {}
    peft: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}  # kohya module name -> alpha
    for component in sorted({k.split(".", 1)[0] for k in bundle.lora}):
        prefix = f"{component}."
        part = {k.removeprefix(prefix): v for k, v in bundle.lora.items() if k.startswith(prefix)}
        if any("lora_linear_layer" in k for k in part):
            part = convert_state_dict_to_peft(part)
        else:
            part = convert_unet_state_dict_to_peft(part)
        peft.update({f"{prefix}{k}": v for k, v in part.items()})
        config = configs[component]
        head = {"unet": "lora_unet_", "text_encoder": "lora_te1_"}.get(component, "lora_te2_")
        for key in part:
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                pattern = get_pattern_key(list(config.alpha_pattern), module)
                alpha = config.alpha_pattern.get(pattern, config.lora_alpha)
                alphas[head + module.replace(".", "_")] = float(alpha)
    out: dict[str, torch.Tensor] = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        module = key.split(".")[0]
        if key.endswith(".alpha"):
            value = torch.tensor(alphas[module])
        if family != "sdxl" and key.startswith("lora_te1_"):
            key = "lora_te_" + key.removeprefix("lora_te1_")
        out[key] = value.detach().cpu().contiguous()
    return out


def _embedding_tensors(bundle: Bundle, token: str, family: str) -> dict[str, torch.Tensor]:
    rows = bundle.handles[token].detach().float().cpu().contiguous()
    if family == "sdxl":
        return {"clip_l": rows, "clip_g": bundle.handles_2[token].detach().float().cpu()}
    return {"emb_params": rows}


def export_kohya(
    bundle: Bundle,
    directory: str | os.PathLike[str],
    *,
    name: str = "break_a_scene",
    bundled: bool = False,
) -> dict[str, Path]:
    """Write ``bundle`` for A1111 / SD.Next / ComfyUI / kohya into ``directory`` (see
    ``Bundle.export_kohya``); returns ``{"lora": path, <token>: embedding path, ...}``."""
    bundle.validate()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        fail(InvalidArgumentError, f"name={name!r} is not a plain file name", "use e.g. 'my_scene'")
    directory = check_output_dir(directory, "export folder")
    family = _family(bundle)
    names = _names(bundle.tokens)
    common = {
        "breakscene_tokens": json.dumps(names),
        "text_encoder": ENCODERS[family],
        "ss_base_model_version": _BASE_VERSION[family],
    }
    if bundled and not bundle.lora:
        fail(
            InvalidArgumentError,
            "bundled=True puts the embeddings inside the LoRA file, but this bundle has no LoRA",
            "export without bundled (one embedding file per handle)",
        )
    out: dict[str, Path] = {}
    directory.mkdir(parents=True, exist_ok=True)
    if bundle.lora:
        tensors = _kohya_lora(bundle, family)
        if bundled:
            for token, stem in names.items():
                for key, value in _embedding_tensors(bundle, token, family).items():
                    sub = "string_to_param.*" if key == "emb_params" else key
                    tensors[f"{_BUNDLED}{stem}.{sub}"] = value
        unet = (bundle.info.lora or {}).get("unet")
        meta = {
            **common,
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(unet.r) if unet else "",
            "ss_network_alpha": str(unet.lora_alpha) if unet else "",
        }
        out["lora"] = directory / f"{name}.safetensors"
        save_atomic(tensors, meta, out["lora"], "export file")
    if not bundled:
        for token, stem in names.items():
            meta = {**common, "token": token, "name": stem}
            tensors = _embedding_tensors(bundle, token, family)
            out[token] = directory / f"{stem}.safetensors"
            save_atomic(tensors, meta, out[token], "export file")
    fsync_dir(directory)
    return out


# ------------------------------------------------------------------------------------------
# import


def read_kohya(
    lora_file: str | os.PathLike[str] | None = None,
    embeddings: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """The bundle parts (``tokens``, ``handles``, ``handles_2``, ``lora``, ``lora_config``) of
    a kohya / A1111 LoRA file and embedding files (see ``Bundle.from_kohya``)."""
    if lora_file is None and not embeddings:
        fail(
            MissingFileError,
            "neither a LoRA file nor embedding files were given",
            "pass the LoRA file, the embedding files (one per handle), or both",
        )
    state: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    lora_name = ""
    if lora_file is not None:
        path = _existing(lora_file, "LoRA file")
        lora_name = f"LoRA file {str(path)!r}"
        state, meta = read_file(path, lora_name)
    bundled = {k: state.pop(k) for k in list(state) if k.startswith(_BUNDLED)}
    # the embedding names export_kohya gave the tokens ({token: file stem})
    known = json_field(meta, "breakscene_tokens", lora_name) if "breakscene_tokens" in meta else {}
    by_name = {stem: token for token, stem in known.items()} if isinstance(known, dict) else {}
    handles: dict[str, torch.Tensor] = {}
    handles_2: dict[str, torch.Tensor] = {}

    def add(token: str, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        if token in handles:
            fail(InvalidBundleError, f"{where}: token {token!r} is given twice")
        rows = tensors.get("emb_params", tensors.get("string_to_param.*", tensors.get("*")))
        if rows is None and "clip_l" in tensors:
            rows = tensors["clip_l"]
            if "clip_g" in tensors:
                handles_2[token] = _rows(tensors["clip_g"], where)
        if rows is None and len(tensors) == 1:
            rows = next(iter(tensors.values()))  # diffusers' {token: rows}
        if rows is None:
            fail(
                InvalidBundleError,
                f"{where} holds {sorted(tensors)}, not an embedding",
                "pass an A1111 / ComfyUI embedding file (emb_params, or clip_l + clip_g)",
            )
        handles[token] = _rows(rows, where)

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in bundled.items():
        stem, _, sub = key.removeprefix(_BUNDLED).partition(".")
        groups.setdefault(stem, {})[sub] = value
    for stem, tensors in groups.items():
        add(by_name.get(stem, f"<{stem}>"), tensors, f"bundled embedding {stem!r}")
    if isinstance(embeddings, Mapping):
        files: list[tuple[str | None, Any]] = list(embeddings.items())
    else:
        files = [(None, p) for p in embeddings]
    for given, file in files:
        path = _existing(file, "embedding file")
        tensors, file_meta = read_file(path, f"embedding file {str(path)!r}")
        token = given or file_meta.get("token") or f"<{path.stem}>"
        add(token, tensors, f"embedding file {str(path)!r}")
    if not handles:
        fail(
            MissingFileError,
            "no embeddings: the LoRA file has no bundled embeddings and no embedding files "
            "were given",
            "pass the embedding files (one per handle)",
        )
    lora, config = read_lora_state(state, lora_name) if state else ({}, {})
    return {
        "tokens": list(handles),
        "handles": handles,
        "handles_2": handles_2,
        "lora": lora,
        "lora_config": config,
    }


def _rows(tensor: torch.Tensor, where: str) -> torch.Tensor:
    rows = tensor.detach().float()
    if rows.dim() == 1:
        rows = rows[None]
    if rows.dim() != 2 or rows.shape[0] == 0:
        fail(InvalidBundleError, f"{where}: embedding of shape {tuple(tensor.shape)} is not (k, d)")
    return rows


def _existing(file: str | os.PathLike[str], what: str) -> Path:
    path = Path(file).expanduser()
    if not path.is_file():
        fail(MissingFileError, f"{what} {str(path)!r} does not exist")
    return path
