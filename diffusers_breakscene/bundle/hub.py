"""Where bundles come from and go to: local paths, Hub repos, model cards and uploads.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "break_a_scene.safetensors").write_bytes(b"")
    0
    >>> resolve_source(folder).name
    'break_a_scene.safetensors'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base_pipeline import available_model_id
from ..errors import BreakSceneError, MissingFileError, fail, message
from ..files import atomic_write, check_output_dir
from ..fingerprint import FINGERPRINT_FIELDS
from .format import (
    DEFAULT_WEIGHT_NAME,
    DIFFUSERS_EMBEDDINGS_NAME,
    DIFFUSERS_LORA_NAME,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_EMBEDDINGS_NAME,
    TRAINING_CONFIG_NAME,
    BundleMetadata,
    library_version,
)
from .io import save_atomic

if TYPE_CHECKING:
    import torch

    from .core import Bundle

__all__ = [
    "card_was_edited",
    "model_card",
    "preview_writer",
    "resolve_source",
    "upload",
    "write_hub_folder",
]

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_TRAINING_KEYS = (
    "phase1_steps",
    "phase2_steps",
    "phase2",
    "phase1_learning_rate",
    "phase2_learning_rate",
    "resolution",
    "seed",
)


def _looks_like_repo_id(text: str) -> bool:
    if not _REPO_ID.match(text) or text.lower().endswith(".safetensors"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, filename: str, subfolder: str | None, **kwargs: Any) -> Path:
    # Not diffusers' _get_model_file: its errors are generic EnvironmentErrors, while each Hub
    # failure below gets its own fix.
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{subfolder}/{filename}" if subfolder else filename
    what = f"bundle {where!r} of Hub repo {repo_id!r}" + (
        f" at revision {kwargs['revision']!r}" if kwargs.get("revision") else ""
    )
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id,
            filename=filename,
            subfolder=subfolder,
            library_name="diffusers-breakscene",
            library_version=library_version(),
            **kwargs,
        )
    except errors.LocalEntryNotFoundError as err:
        problem = (
            f"{what} was not found locally: it is not in the Hugging Face cache and the Hub "
            "was not asked (offline: local_files_only=True, HF_HUB_OFFLINE=1 or no network)"
        )
        fix = "connect and retry without local_files_only, or pass a local file or folder"
        raise MissingFileError(message(problem, fix)) from err
    except errors.GatedRepoError as err:
        problem = f"{what}: the repo is gated"
        fix = "accept its conditions on the Hub and pass token=..."
        raise BreakSceneError(message(problem, fix)) from err
    except errors.RepositoryNotFoundError as err:
        raise MissingFileError(f"{what}: no such repo (or it is private: pass token=...)") from err
    except errors.RevisionNotFoundError as err:
        raise MissingFileError(message(f"{what}: no such revision", "check revision=...")) from err
    except errors.EntryNotFoundError as err:
        problem = f"{what}: the repo has no file {where!r}"
        fix = "pass weight_name=... (and subfolder=...) with the bundle's file name"
        raise MissingFileError(message(problem, fix)) from err
    except (OSError, ValueError) as err:  # HTTP errors, connection errors, bad arguments
        raise BreakSceneError(f"could not download {what}: {err}") from err
    return Path(path)


def resolve_source(
    source: str | os.PathLike[str],
    weight_name: str | None = None,
    subfolder: str | None = None,
    download: Mapping[str, Any] | None = None,
) -> Path:
    """The local bundle file for ``source``: a file, a folder (+ ``subfolder``) holding
    ``weight_name`` (default :data:`DEFAULT_WEIGHT_NAME`), or a Hub repo id, downloaded with
    ``huggingface_hub.hf_hub_download`` (``download``: its ``revision``, ``local_files_only``,
    ``cache_dir`` and ``token`` arguments). Raises :class:`MissingFileError`."""
    if not isinstance(source, (str, os.PathLike)):
        fail(
            MissingFileError,
            f"bundle source must be a path or a Hub repo id, got {type(source).__name__}",
        )
    name = weight_name or DEFAULT_WEIGHT_NAME
    text = os.fspath(source)
    p = Path(text).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        folder = p / subfolder if subfolder else p
        if (folder / name).is_file():
            return folder / name
        others = sorted(x.name for x in folder.glob("*.safetensors"))
        fix = (
            f"it holds {others}: pass weight_name=..."
            if others
            else "pass the .safetensors file itself, or the output_dir that training wrote"
        )
        fail(MissingFileError, f"folder {str(folder)!r} has no bundle file {name!r}", fix)
    if isinstance(source, str) and _looks_like_repo_id(text):
        return _download(text, name, subfolder, **(download or {}))
    fail(
        MissingFileError,
        f"bundle {text!r} does not exist",
        f"pass a .safetensors file, a folder holding {name!r}, or a Hub repo id such as "
        "'user/name'",
    )


def _example_prompts(tokens: tuple[str, ...]) -> list[str]:
    prompts = [f"a photo of {tokens[0]}"]
    if len(tokens) > 1:
        prompts.append("a photo of " + " and ".join(tokens))
    prompts.append(f"a photo of {tokens[-1]} on the beach")
    prompts.append(f"an oil painting of {tokens[0]}")
    return prompts


def model_card(
    meta: BundleMetadata,
    has_lora: bool,
    repo_id: str | None = None,
    preview: str | None = None,
    *,
    embedding_tokens: list[str] | None = None,
    sdxl: bool = False,
) -> str:
    """The Hub ``README.md`` of a bundle with metadata ``meta`` (see ``Bundle.model_card``).

    The front matter is ``huggingface_hub.ModelCardData``. (diffusers'
    ``load_or_create_model_card`` would look the repo up on the Hub and write its DreamBooth
    template; ``populate_model_card`` only sets what ``ModelCardData`` is given here.)

    Example:
        >>> card = model_card(BundleMetadata(("<a>",)), has_lora=False)
        >>> "textual-inversion" in card and "| `<a>` | - | - |" in card
        True
    """
    from huggingface_hub import ModelCardData

    tokens, base_model = meta.tokens, meta.base_model
    # A base model id that was removed from the Hub is shown as the mirror holding its weights.
    base_model = available_model_id(base_model) if base_model else base_model
    hub_base = base_model if base_model and _looks_like_repo_id(base_model) else None
    if hub_base and Path(hub_base).exists():
        hub_base = None
    prompts = _example_prompts(tokens)
    tags = ["text-to-image", "diffusers", "break-a-scene", "diffusers-breakscene"]
    tags += ["stable-diffusion-xl" if sdxl else "stable-diffusion", "textual-inversion"]
    tags += ["lora", "template:sd-lora"] if has_lora else []
    extra: dict[str, Any] = {"instance_prompt": prompts[0]}
    if preview:  # the Hub shows a widget's output picture on the model page
        extra["widget"] = [{"text": prompts[0], "output": {"url": preview}}]
    card_data = ModelCardData(
        library_name="diffusers",
        tags=tags,
        base_model=hub_base,
        pipeline_tag="text-to-image",
        **extra,
    )
    lines = ["---", card_data.to_yaml().strip(), "---", ""]
    lines += [f"# {repo_id.split('/')[-1] if repo_id else 'Break-A-Scene bundle'}", ""]
    lines += [
        "A [Break-A-Scene](https://arxiv.org/abs/2305.16311) bundle made with "
        "[diffusers-breakscene](https://pypi.org/project/diffusers-breakscene/): one text "
        "token (handle) per concept learned from a single image and its masks"
        + (", plus a LoRA on the model." if has_lora else "."),
        "",
    ]
    if preview:
        lines += [f"![preview]({preview})", ""]
    lines += ["## Tokens", "", "| token | initializer | mask area |", "|---|---|---|"]
    concepts = meta.concepts or {}
    for token in tokens:
        info = concepts.get(token)
        init = info.initializer if info and info.initializer else "-"
        area = f"{info.mask_area:.1%}" if info and info.mask_area is not None else "-"
        lines.append(f"| `{token}` | {init} | {area} |")
    lines += ["", "## Base model", ""]
    lines.append(f"- base model: `{base_model}`" if base_model else "- base model: unknown")
    fingerprint = meta.base_fingerprint or {}
    lines += [f"- {key}: `{fingerprint[key]}`" for key in FINGERPRINT_FIELDS if key in fingerprint]
    lines += ["", "## Example prompts", "", *(f"- `{p}`" for p in prompts)]
    rows = embedding_tokens or list(tokens)
    lines += _usage(rows, sdxl, has_lora, base_model, repo_id, prompts[0])
    if meta.lora:
        lines += ["", "## LoRA", "", "| component | r | lora_alpha | target modules |"]
        lines += ["|---|---|---|---|"]
        for component, lora in meta.lora.items():
            targets = lora.target_modules
            shown = (
                f"`{targets}`" if isinstance(targets, str) else ", ".join(f"`{t}`" for t in targets)
            )
            lines.append(f"| {component} | {lora.r} | {lora.lora_alpha} | {shown} |")
    training = meta.training or {}
    if training:
        lines += ["", "## Training", ""]
        lines += [f"- {key}: `{training[key]}`" for key in _TRAINING_KEYS if key in training]
    lines += [
        "",
        f"Made with diffusers-breakscene {meta.library_version}, bundle format {FORMAT} version "
        f"{FORMAT_VERSION}.",
        "",
    ]
    return _sign("\n".join(lines))


def _usage(
    tokens: list[str],
    sdxl: bool,
    has_lora: bool,
    base_model: str | None,
    repo_id: str | None,
    prompt: str,
) -> list[str]:
    """The card's usage section: the plugin's one call, and stock diffusers' two calls on the
    files that :func:`write_hub_folder` uploads next to the bundle."""
    repo = repo_id or "path/to/this/folder"
    base = base_model or "<base model>"
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    stock = [
        "```python",
        f"from diffusers import {pipeline}",
        "from huggingface_hub import hf_hub_download",
        "from safetensors.torch import load_file",
        "",
        f'pipe = {pipeline}.from_pretrained("{base}")',
    ]
    if has_lora:
        stock.append(f'pipe.load_lora_weights("{repo}", weight_name="{DIFFUSERS_LORA_NAME}")')
    stock += [
        f'embeds = load_file(hf_hub_download("{repo}", "{DIFFUSERS_EMBEDDINGS_NAME}"))',
        f'pipe.load_textual_inversion(embeds["clip_l"], token={tokens},',
        "                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
    ]
    if sdxl:
        stock += [
            f'pipe.load_textual_inversion(embeds["clip_g"], token={tokens},',
            "                            text_encoder=pipe.text_encoder_2,",
            "                            tokenizer=pipe.tokenizer_2)",
        ]
    stock += [f'image = pipe("{prompt}").images[0]', "```"]
    return [
        "",
        "## Usage",
        "",
        "With the plugin (`pip install diffusers-breakscene`), one call:",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        "import diffusers_breakscene  # adds load_break_a_scene to diffusers pipelines",
        "",
        f'pipe = {pipeline}.from_pretrained("{base}")',
        f'pipe.load_break_a_scene("{repo}")',
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
        "With stock diffusers only"
        + (" (the LoRA, then the handles as textual-inversion embeddings):" if has_lora else ":"),
        "",
        *stock,
        "",
        f"`{DIFFUSERS_EMBEDDINGS_NAME}` holds one row per token in the order above "
        '(`{"clip_l": (rows, dim)}`' + (', plus `"clip_g"`' if sdxl else "") + "); it is not "
        f"named `{LEGACY_EMBEDDINGS_NAME}`, so `load_textual_inversion(repo)` does not take its "
        "key for a token.",
    ]


_SIGNATURE = re.compile(r"\n<!-- diffusers-breakscene card sha256:([0-9a-f]{64}) -->\n?$")


def _sign(card: str) -> str:
    """``card`` with a last line recording its hash, so that a later push can tell whether
    someone edited it (see :func:`card_was_edited`)."""
    digest = hashlib.sha256(card.encode("utf-8")).hexdigest()
    return f"{card}\n<!-- diffusers-breakscene card sha256:{digest} -->\n"


def card_was_edited(text: str) -> bool:
    """True when ``text`` (a repo's ``README.md``) is not a card this library wrote, or was
    changed after it was written.

    Example:
        >>> card = model_card(BundleMetadata(("<a>",)), has_lora=False)
        >>> card_was_edited(card), card_was_edited(card.replace("# ", "# My ", 1))
        (False, True)
    """
    match = _SIGNATURE.search(text)
    if match is None:
        return True
    body = text[: match.start()]
    return hashlib.sha256(body.encode("utf-8")).hexdigest() != match.group(1)


def preview_writer(preview_image: Any) -> tuple[str, Callable[[Path], object]] | None:
    """``(file name, write(path))`` for a preview image (a PIL image or an image file), or
    None; a missing file raises :class:`MissingFileError` before anything is uploaded."""
    if preview_image is None:
        return None
    if hasattr(preview_image, "save"):
        return "preview.png", lambda path: preview_image.save(path, format="PNG")
    path = Path(preview_image)
    if not path.is_file():
        fail(
            MissingFileError,
            f"preview image {str(path)!r} does not exist",
            "pass a PIL image or an image file",
        )
    return "preview" + path.suffix.lower(), lambda target: shutil.copyfile(path, target)


def write_hub_folder(
    bundle: Bundle,
    directory: str | os.PathLike[str],
    repo_id: str | None = None,
    *,
    preview_image: Any = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Path]:
    """Write what :meth:`Bundle.push_to_hub` uploads into ``directory`` (see
    ``Bundle.save_hub_folder``); returns ``{file name: path}``. Every check (preview image,
    dtype, writable folder) runs before the first file is written; each file is written
    atomically."""
    from . import interop

    directory = check_output_dir(directory, "Hub folder")
    preview = preview_writer(preview_image)
    # The LoRA rounded to dtype once: the bundle file and the stock files hold the same
    # weights, so that both ways of loading give the same pictures.
    stored = bundle if dtype is None else bundle.with_lora_dtype(dtype)
    tensors, metadata = stored._serialize(None)
    card = bundle.model_card(repo_id, preview[0] if preview else None)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    out[DEFAULT_WEIGHT_NAME] = directory / DEFAULT_WEIGHT_NAME
    save_atomic(tensors, metadata, out[DEFAULT_WEIGHT_NAME])
    for path in interop.export_diffusers(stored, directory).values():
        out[path.name] = path
    training = bundle.metadata.get("training")
    if training:
        text = json.dumps(training, indent=2, sort_keys=True) + "\n"
        out[TRAINING_CONFIG_NAME] = atomic_write(
            directory / TRAINING_CONFIG_NAME,
            lambda path: path.write_text(text, encoding="utf-8"),
            "training config",
        )
    if preview is not None:
        out[preview[0]] = atomic_write(directory / preview[0], preview[1], "preview image")
    out["README.md"] = atomic_write(
        directory / "README.md", lambda path: path.write_text(card, encoding="utf-8"), "card"
    )
    return out


def upload(
    repo_id: str,
    folder: Path,
    *,
    private: bool | None,
    token: str | bool | None,
    commit_message: str,
    overwrite_readme: bool = False,
) -> str:
    """Create the model repo ``repo_id`` if needed and upload every file of ``folder`` in one
    commit; returns the repo URL. The repo's ``README.md`` is kept (and a warning logged) when
    someone edited it after this library wrote it, unless ``overwrite_readme``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ignore: list[str] = []
    if not overwrite_readme and api.file_exists(repo_id, "README.md", repo_type="model"):
        remote = Path(api.hf_hub_download(repo_id, "README.md", repo_type="model"))
        if card_was_edited(remote.read_text(encoding="utf-8", errors="replace")):
            ignore.append("README.md")
            logger.warning(
                "%s: README.md on the Hub was edited after diffusers-breakscene wrote it; it is "
                "kept. Pass overwrite_readme=True (--overwrite-readme) to replace it.",
                repo_id,
            )
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=ignore or None,
    )
    return str(url)
