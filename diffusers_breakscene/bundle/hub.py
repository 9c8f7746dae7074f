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

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..base_pipeline import available_model_id
from ..errors import BreakSceneError, MissingFileError, fail, message
from ..fingerprint import FINGERPRINT_FIELDS
from .format import DEFAULT_WEIGHT_NAME, FORMAT, FORMAT_VERSION, BundleMetadata, library_version

__all__ = ["model_card", "preview_writer", "resolve_source", "upload"]

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
    meta: BundleMetadata, has_lora: bool, repo_id: str | None = None, preview: str | None = None
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
    tags = ["break-a-scene", "diffusers-breakscene", "text-to-image", "stable-diffusion"]
    tags += ["diffusers", "lora" if has_lora else "textual-inversion"]
    card_data = ModelCardData(
        library_name="diffusers", tags=tags, base_model=hub_base, pipeline_tag="text-to-image"
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
    prompts = _example_prompts(tokens)
    lines += ["", "## Example prompts", "", *(f"- `{p}`" for p in prompts)]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "import diffusers_breakscene  # adds load_break_a_scene to diffusers pipelines",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{base_model or "<base model>"}")',
        f'pipe.load_break_a_scene("{repo_id or "path/to/bundle"}")',
        f'image = pipe("{prompts[0]}").images[0]',
        "```",
        "",
        "Stock diffusers only: `Bundle.load(...).export_diffusers(folder)` writes "
        "`pytorch_lora_weights.safetensors` (for `load_lora_weights`) and "
        "`learned_embeds.safetensors` (for `load_textual_inversion`).",
    ]
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
    return "\n".join(lines)


def preview_writer(preview_image: Any) -> tuple[str, Callable[[Path], object]] | None:
    """``(file name, write(path))`` for a preview image (a PIL image or an image file), or
    None; a missing file raises :class:`MissingFileError` before anything is uploaded."""
    if preview_image is None:
        return None
    if hasattr(preview_image, "save"):
        return "preview.png", preview_image.save
    path = Path(preview_image)
    if not path.is_file():
        fail(
            MissingFileError,
            f"preview image {str(path)!r} does not exist",
            "pass a PIL image or an image file",
        )
    return "preview" + path.suffix.lower(), lambda target: shutil.copyfile(path, target)


def upload(
    repo_id: str,
    files: Mapping[str, Callable[[Path], object]],
    *,
    private: bool | None,
    token: str | bool | None,
    commit_message: str,
) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``files`` (name -> ``write(path)``)
    in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="breakscene-push-") as tmp:
        for name, write in files.items():
            write(Path(tmp) / name)
        api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", commit_message=commit_message
        )
    return str(url)
