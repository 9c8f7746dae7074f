"""The :class:`Bundle` object: handles + LoRA + metadata of one Break-A-Scene run.

Example:
    >>> import torch
    >>> Bundle(handles={"<cat>": torch.zeros(2, 8)}, metadata={"base_model": "me/base"})
    Bundle(tokens=['<cat>'], lora_tensors=0, base_model='me/base', family=None)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import InvalidBundleError, fail
from ..files import check_writable
from ..fingerprint import check_compatible
from . import hub, interop, kohya
from .format import (
    DEFAULT_WEIGHT_NAME,
    DIFFUSERS_EMBEDDINGS_NAME,
    DIFFUSERS_LORA_NAME,
    FIX_DAMAGED,
    BundleMetadata,
)
from .io import output_file, read_header, read_tensors, save_atomic
from .tensors import check_contents, check_fits_pipeline, lora_component, owned

__all__ = ["Bundle"]


class Bundle:
    """Handles + LoRA + metadata of one Break-A-Scene run (format version 1).

    ``handles`` (and ``handles_2`` for SDXL's second text encoder) map each token to its
    ``(k, d)`` rows; ``lora`` holds diffusers-layout LoRA weights under ``unet.`` /
    ``text_encoder.`` / ``text_encoder_2.``. ``metadata`` is validated into the typed
    :attr:`info`; ``format``, ``format_version``, ``tokens`` (default: the order of ``handles``)
    and ``library_version`` are filled in. Invalid input raises :class:`InvalidBundleError`
    naming the field or tensor (on construction, :meth:`validate`, :meth:`save` and
    :meth:`load`).

    Example:
        >>> import torch
        >>> bundle = Bundle(handles={"<asset0>": torch.zeros(1, 32)}, metadata={"base_model": "x"})
        >>> bundle.tokens, bundle.metadata["format"]
        (['<asset0>'], 'break-a-scene')
    """

    def __init__(
        self,
        handles: Mapping[str, torch.Tensor],
        lora: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
        handles_2: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        parts = {"handles": handles, "lora": lora, "metadata": metadata, "handles_2": handles_2}
        for name, value in parts.items():
            if not isinstance(value, Mapping) and (value is not None or name == "handles"):
                fail(InvalidBundleError, f"{name} must be a dict, got {type(value).__name__}")
        self.handles: dict[str, torch.Tensor] = dict(handles)
        self.lora: dict[str, torch.Tensor] = dict(lora or {})
        self.handles_2: dict[str, torch.Tensor] = dict(handles_2 or {})
        self._file: Path | None = None
        self.metadata = {"tokens": list(self.handles), **(metadata or {})}

    def __repr__(self) -> str:
        fp = self.info.base_fingerprint or {}
        return (
            f"Bundle(tokens={self.tokens!r}, lora_tensors={len(self.lora)}, "
            f"base_model={self.info.base_model!r}, family={fp.get('family')!r})"
        )

    # --- properties ---------------------------------------------------------------------
    @property
    def info(self) -> BundleMetadata:
        """The typed, validated metadata (read-only; set :attr:`metadata` to change it).

        Example:
            >>> import torch
            >>> meta = {"concepts": {"<a>": {"initializer": "dog", "mask_area": 0.5}}}
            >>> Bundle(handles={"<a>": torch.ones(1, 4)}, metadata=meta).info.concepts["<a>"]
            ConceptInfo(initializer='dog', mask_area=0.5)
        """
        return self._info

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata as a plain decoded dict (lists and dicts, ``format_version`` an int);
        a fresh copy on every access. Assigning a dict validates it and replaces it.

        Example:
            >>> import torch
            >>> sorted(Bundle(handles={"<a>": torch.ones(1, 4)}).metadata)
            ['format', 'format_version', 'library_version', 'tokens']
        """
        return self._info.to_dict()

    @metadata.setter
    def metadata(self, value: Mapping[str, Any]) -> None:
        self._info = BundleMetadata.from_dict(value)
        self.validate()

    @property
    def tokens(self) -> list[str]:
        """The handle tokens, in the order of ``metadata["tokens"]``.

        Example:
            >>> import torch
            >>> Bundle(handles={"<b>": torch.ones(1, 4), "<a>": torch.ones(1, 4)}).tokens
            ['<b>', '<a>']
        """
        return list(self._info.tokens)

    @property
    def size_bytes(self) -> int:
        """Size of the file the bundle was loaded from or last saved to; otherwise the size
        :meth:`save` would write with its default arguments.

        Example:
            >>> import torch
            >>> Bundle(handles={"<a>": torch.ones(1, 4)}).size_bytes > 16
            True
        """
        if self._file is not None and self._file.is_file():
            return self._file.stat().st_size
        tensors, metadata = self._serialize(torch.float16)
        return len(safetensors.torch.save(tensors, metadata=metadata))

    @property
    def lora_adapter_metadata(self) -> dict[str, Any]:
        """The LoRA configs in diffusers' flat layout (``{"unet.r": 4, "unet.lora_alpha": 8.0,
        ...}``), as ``save_lora_weights`` stores it and as the ``metadata=`` argument of
        ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` expects it.

        Example:
            >>> import torch
            >>> Bundle(handles={"<a>": torch.ones(1, 4)}).lora_adapter_metadata
            {}
        """
        return {
            f"{component}.{key}": value
            for component, info in (self._info.lora or {}).items()
            for key, value in info.to_dict().items()
        }

    # --- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`InvalidBundleError` naming the first problem found.

        Example:
            >>> import torch
            >>> bundle = Bundle(handles={"<a>": torch.ones(1, 4)})
            >>> bundle.handles["<a>"] = torch.ones(4)
            >>> try:
            ...     bundle.validate()
            ... except InvalidBundleError as err:
            ...     "2-D" in str(err)
            True
        """
        check_contents(self.handles, self.handles_2, self.lora, self._info)

    def check_compatible(self, pipeline: Any) -> None:
        """Raise :class:`IncompatibleBaseError` unless the bundle fits ``pipeline``; changes
        nothing.

        Checks the recorded base fingerprint (when there is one), then the tensors themselves:
        the handle widths against the text encoders, and every LoRA weight against the module
        it targets (which must exist, with matching input/output sizes).

        Example:
            >>> import torch
            >>> from diffusers_breakscene.tiny import tiny_pipeline
            >>> Bundle(handles={"<a>": torch.ones(1, 32)}).check_compatible(tiny_pipeline("sd1"))
        """
        if self._info.base_fingerprint:
            check_compatible(self._info.base_fingerprint, pipeline)
        check_fits_pipeline(self.handles, self.handles_2, self.lora, pipeline)

    # --- building -----------------------------------------------------------------------
    @classmethod
    def from_pipeline(
        cls,
        pipeline: Any,
        tokens: list[str],
        *,
        initializers: list[str | None],
        mask_areas: list[float],
        base_model: str = "",
        training: dict[str, Any] | None = None,
        unet_lora: bool = True,
        text_encoder_lora: bool = False,
    ) -> Bundle:
        """The bundle of a trained ``pipeline``: the handle rows of ``tokens`` in its text
        encoder (SDXL: in both, as ``handles`` and ``handles_2``), its base fingerprint, and,
        with ``unet_lora``, the training adapter's LoRA weights and config on the UNet (and on
        the text encoder with ``text_encoder_lora``). ``unet_lora=False`` stores no LoRA at all
        (``lora == {}``).

        Example:
            >>> from diffusers_breakscene.handles import add_handles
            >>> from diffusers_breakscene.tiny import tiny_pipeline
            >>> pipe = tiny_pipeline("sd1")
            >>> _ = add_handles(pipe.tokenizer, pipe.text_encoder, ["<a>"])
            >>> bundle = Bundle.from_pipeline(
            ...     pipe, ["<a>"], initializers=["dog"], mask_areas=[0.25], unet_lora=False)
            >>> bundle.metadata["concepts"], bundle.metadata["lora"]
            ({'<a>': {'initializer': 'dog', 'mask_area': 0.25}}, {})
        """
        components = [("unet", unet_lora), ("text_encoder", unet_lora and text_encoder_lora)]
        handles, lora, metadata = interop.read_pipeline(
            pipeline, tokens, initializers, mask_areas, [name for name, on in components if on]
        )
        metadata["base_model"] = base_model
        if training is not None:
            metadata["training"] = training
        handles_2 = None
        if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL: rows in both
            from ..handles import get_handle_embeddings

            handles_2 = get_handle_embeddings(pipeline.tokenizer_2, pipeline.text_encoder_2, tokens)
        return cls(handles, lora, metadata, handles_2=handles_2)

    # --- (de)serialization --------------------------------------------------------------
    def _serialize(self, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict]:
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            fail(
                InvalidBundleError,
                f"dtype={dtype!r} is not a floating dtype",
                "use torch.float16, torch.bfloat16, torch.float32 or None",
            )
        self.validate()
        tensors: dict[str, torch.Tensor] = {}
        for prefix, handles in (("handles", self.handles), ("handles_2", self.handles_2)):
            for token in self.tokens if handles else ():
                tensors[f"{prefix}.{token}"] = owned(handles[token], torch.float32)
        for key, value in self.lora.items():
            tensor = owned(value, dtype or value.dtype)
            if dtype is not None and not bool(torch.isfinite(tensor).all()):
                fail(
                    InvalidBundleError,
                    f"LoRA tensor {key!r} overflows {dtype}",
                    "save with dtype=torch.bfloat16, torch.float32 or None",
                )
            tensors[key] = tensor
        return tensors, self._info.to_header()

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str],
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
    ) -> Bundle:
        """Read and validate a bundle from a ``.safetensors`` file, a folder (and its
        ``subfolder``) holding ``weight_name`` (default :data:`DEFAULT_WEIGHT_NAME`) or a Hub
        repo id (``"user/name"``, fetched with ``huggingface_hub.hf_hub_download``).

        Raises :class:`MissingFileError` for a source that cannot be found and
        :class:`InvalidBundleError` for a file that is not a valid version-1 bundle.

        Example:
            >>> import tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> _ = Bundle(handles={"<a>": torch.ones(1, 4)}).save(folder)
            >>> Bundle.load(folder).tokens
            ['<a>']
        """
        download = {"revision": revision, "local_files_only": local_files_only}
        download |= {"cache_dir": cache_dir, "token": token}
        file = hub.resolve_source(source, weight_name, subfolder, download)
        keys, raw = read_header(file, "bundle")
        name = f"bundle {str(file)!r}"
        info = BundleMetadata.from_header(raw, name)
        for key in keys:
            if not key.startswith(("handles.", "handles_2.")) and lora_component(key) is None:
                fail(
                    InvalidBundleError,
                    f"{name}: tensor {key!r} is neither 'handles.<token>', 'handles_2.<token>' "
                    "nor a LoRA weight under 'unet.', 'text_encoder.' or 'text_encoder_2.'",
                    FIX_DAMAGED,
                )
        parts: dict[str, dict[str, torch.Tensor]] = {"handles": {}, "handles_2": {}, "lora": {}}
        for key, tensor in read_tensors(file, "bundle").items():
            prefix, _, token = key.partition(".")
            if prefix in ("handles", "handles_2"):
                parts[prefix][token] = tensor
            else:
                parts["lora"][key] = tensor
        try:
            bundle = cls(parts["handles"], parts["lora"], info.to_dict(), parts["handles_2"])
        except InvalidBundleError as err:
            fail(InvalidBundleError, f"{name}: {err}")
        bundle._file = file
        return bundle

    def save(
        self, path: str | os.PathLike[str], *, dtype: torch.dtype | None = torch.float16
    ) -> Path:
        """Write the bundle atomically and return the file path.

        ``path`` is a file, or a folder (an existing one, or a name without ``.safetensors``)
        that receives :data:`DEFAULT_WEIGHT_NAME`. ``dtype`` applies to the LoRA weights
        (``None`` keeps theirs); handles are always stored as float32.

        Example:
            >>> import tempfile, torch
            >>> path = Bundle(handles={"<a>": torch.ones(1, 4)}).save(tempfile.mkdtemp())
            >>> path.name
            'break_a_scene.safetensors'
        """
        file = output_file(path, DEFAULT_WEIGHT_NAME)
        check_writable(file, "bundle")
        tensors, metadata = self._serialize(dtype)
        save_atomic(tensors, metadata, file)
        self._file = file
        return file

    def with_lora_dtype(self, dtype: torch.dtype) -> Bundle:
        """A copy whose LoRA tensors are rounded to ``dtype`` (what :meth:`save` with
        ``dtype`` stores); handles and metadata are shared.

        Example:
            >>> import torch
            >>> b = Bundle(handles={"<a>": torch.ones(1, 4)})
            >>> b.with_lora_dtype(torch.float16).tokens
            ['<a>']
        """
        tensors, _ = self._serialize(dtype)
        lora = {k: tensors[k] for k in self.lora}
        return Bundle(self.handles, lora, self.metadata, self.handles_2)

    # --- stock diffusers interchange ----------------------------------------------------
    def export_diffusers(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the bundle for stock diffusers into ``directory``.

        * ``pytorch_lora_weights.safetensors`` (when there are LoRA weights), written by
          ``save_lora_weights`` with adapter metadata so that ``lora_alpha`` survives;
        * ``break_a_scene_emb.safetensors``: ``{"clip_l": (n, d)}`` (+ ``"clip_g"``), rows in token
          order; its ``__metadata__`` records ``tokens`` and ``vectors_per_token`` (JSON).

        Returns ``{"lora": path, "embeddings": path}`` (``"lora"`` only when written; for a
        bundle without LoRA weights, a LoRA file left there by an earlier export is removed so
        that the folder never pairs these handles with another LoRA). Load with
        ``pipe.load_lora_weights(directory, weight_name="pytorch_lora_weights.safetensors")``
        and ``pipe.load_textual_inversion(load_file(path)["clip_l"], token=bundle.tokens, ...)``
        (for handles of k > 1 rows pass :meth:`embedding_tokens` instead of ``tokens``).

        Example:
            >>> import tempfile, torch
            >>> files = Bundle(handles={"<a>": torch.ones(1, 4)}).export_diffusers(tempfile.mkdtemp())
            >>> sorted(files)
            ['embeddings']
        """  # noqa: E501
        return interop.export_diffusers(self, directory)

    def embedding_tokens(self) -> list[str]:
        """One token name per exported embedding row, diffusers' multi-vector convention:
        ``token`` for the first row of a handle, then ``token_1``, ``token_2``, ...; equal to
        :attr:`tokens` when every handle has one row.

        Example:
            >>> import torch
            >>> Bundle(handles={"<a>": torch.ones(2, 4)}).embedding_tokens()
            ['<a>', '<a>_1']
        """
        out: list[str] = []
        for token in self.tokens:
            rows = int(self.handles[token].shape[0])
            out += [token] + [f"{token}_{i}" for i in range(1, rows)]
        return out

    def export_kohya(
        self,
        directory: str | os.PathLike[str],
        *,
        name: str = "break_a_scene",
        bundled: bool = False,
    ) -> dict[str, Path]:
        """Write the bundle for AUTOMATIC1111, SD.Next, ComfyUI and kohya into ``directory``.

        * ``<name>.safetensors`` (with a LoRA): the LoRA in kohya's keys, with the bundle's
          ``lora_alpha`` in every ``.alpha``; A1111 prompts use it as ``<lora:<name>:1>``;
        * one embedding file per handle, named after it without the angle brackets
          (``<asset0>`` -> ``asset0.safetensors``: the prompt word in A1111 and, as
          ``embedding:asset0``, in ComfyUI): ``{"emb_params": (k, d)}`` for SD1/SD2,
          ``{"clip_l", "clip_g"}`` for SDXL; the metadata records the token and the encoder.

        ``bundled=True`` puts the embeddings inside the LoRA file instead (A1111 / SD.Next
        "bundled embeddings", ``bundle_emb.<name>.string_to_param.*``): one file holds the
        scene. Returns ``{"lora": path, <token>: path, ...}``.

        Example:
            >>> import tempfile, torch
            >>> files = Bundle(handles={"<a>": torch.ones(1, 4)}).export_kohya(tempfile.mkdtemp())
            >>> files["<a>"].name
            'a.safetensors'
        """
        return kohya.export_kohya(self, directory, name=name, bundled=bundled)

    @classmethod
    def from_kohya(
        cls,
        lora_file: str | os.PathLike[str] | None = None,
        embeddings: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]] = (),
        *,
        base_fingerprint: dict[str, Any] | None = None,
        base_model: str | None = None,
        training: dict[str, Any] | None = None,
    ) -> Bundle:
        """Build a bundle from a kohya / A1111 LoRA file and embedding files (one per token).

        ``embeddings``: files (each token is the one its metadata records, else ``<stem>``) or
        ``{token: file}``. Embeddings bundled inside ``lora_file`` (``bundle_emb.*``) are read
        too. Embedding tensors may be ``emb_params``, ``clip_l`` (+ ``clip_g``) or diffusers'
        ``{token: rows}``. The LoRA is read by diffusers' ``lora_state_dict`` (kohya keys and
        alphas converted); its ``r`` and ``lora_alpha`` come from the weights and alphas.

        Example:
            >>> import tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> files = Bundle(handles={"<a>": torch.ones(1, 4)}).export_kohya(folder)
            >>> Bundle.from_kohya(embeddings=[files["<a>"]]).tokens
            ['<a>']
        """
        parts = kohya.read_kohya(lora_file, embeddings)
        given = {"base_model": base_model, "base_fingerprint": base_fingerprint}
        return cls._from_parts(parts, **given, training=training)

    @classmethod
    def _from_parts(cls, parts: dict[str, Any], **metadata: Any) -> Bundle:
        """A bundle from the parts an importer read (``tokens``, ``handles``, ``handles_2``,
        ``lora``, ``lora_config``) and the metadata fields given (``None`` ones left out)."""
        given = {"lora": parts["lora_config"] or None, **metadata}
        meta = {"tokens": parts["tokens"]} | {k: v for k, v in given.items() if v is not None}
        return cls(parts["handles"], parts["lora"], meta, parts["handles_2"])

    @classmethod
    def from_diffusers(
        cls,
        directory_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokens: Sequence[str] | None = None,
        *,
        base_fingerprint: dict[str, Any] | None = None,
        base_model: str | None = None,
        concepts: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        weight_name: str = DIFFUSERS_LORA_NAME,
        embeddings_name: str = DIFFUSERS_EMBEDDINGS_NAME,
        subfolder: str | None = None,
    ) -> Bundle:
        """Build a bundle from a stock diffusers LoRA file and a textual-inversion file.

        ``directory_or_files``: a folder (and its ``subfolder``) holding ``weight_name``
        (optional) and ``embeddings_name``, or a list of ``.safetensors`` files (a file whose
        tensor names all contain ``lora`` is the LoRA, the other one the embeddings). Embeddings
        may be in the pivotal-tuning layout ``{"clip_l": (n, d), "clip_g": ...}`` or keyed by
        token. ``tokens`` defaults to the ``tokens`` recorded by :meth:`export_diffusers` or to
        the token keys. LoRA configs come from the file's ``lora_adapter_metadata``; without it
        they are read from the weights by diffusers' ``get_peft_kwargs`` (``lora_alpha = r``
        unless the file has alphas, diffusers' own assumption).

        Example:
            >>> import tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> _ = Bundle(handles={"<a>": torch.ones(1, 4)}).export_diffusers(folder)
            >>> Bundle.from_diffusers(folder, ["<renamed>"]).handles["<renamed>"].shape
            torch.Size([1, 4])
        """
        parts = interop.read_diffusers(
            directory_or_files,
            tokens,
            subfolder=subfolder,
            weight_name=weight_name,
            embeddings_name=embeddings_name,
        )
        return cls._from_parts(
            parts,
            concepts=concepts,
            base_model=base_model,
            base_fingerprint=base_fingerprint,
            training=training,
        )

    # --- sharing ------------------------------------------------------------------------
    def model_card(self, repo_id: str | None = None, preview: str | None = None) -> str:
        """A ``README.md`` for the Hub: YAML front matter (``library_name``, ``tags``,
        ``base_model`` when it is a Hub id), the tokens and concepts, example prompts, usage,
        the LoRA and training settings and the library version. ``preview`` is the name of an
        image file next to the card.

        Example:
            >>> import torch
            >>> card = Bundle(handles={"<a>": torch.ones(1, 4)}).model_card("me/scene")
            >>> card.startswith("---") and "a photo of <a>" in card
            True
        """
        return hub.model_card(
            self._info,
            bool(self.lora),
            repo_id=repo_id,
            preview=preview,
            embedding_tokens=self.embedding_tokens(),
            sdxl=bool(self.handles_2),
        )

    def save_hub_folder(
        self,
        directory: str | os.PathLike[str],
        repo_id: str | None = None,
        *,
        preview_image: Any = None,
        dtype: torch.dtype | None = torch.float16,
    ) -> dict[str, Path]:
        """Write into ``directory`` exactly what :meth:`push_to_hub` uploads; returns
        ``{file name: path}``:

        * ``break_a_scene.safetensors``: the bundle (LoRA in ``dtype``), for
          ``pipe.load_break_a_scene(repo_id)``;
        * ``pytorch_lora_weights.safetensors`` (with a LoRA) and ``break_a_scene_emb.safetensors``
          (:meth:`export_diffusers`), for stock diffusers' ``load_lora_weights`` and
          ``load_textual_inversion``;
        * ``training_config.json`` (when the bundle records its training settings), the preview
          image (``preview.png`` or the file's own suffix) and ``README.md``, the model card whose
          usage section shows both ways of loading.

        Example:
            >>> import tempfile, torch
            >>> files = Bundle(handles={"<a>": torch.ones(1, 4)}).save_hub_folder(tempfile.mkdtemp())
            >>> sorted(files)
            ['README.md', 'break_a_scene.safetensors', 'break_a_scene_emb.safetensors']
        """  # noqa: E501
        return hub.write_hub_folder(
            self, directory, repo_id, preview_image=preview_image, dtype=dtype
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        preview_image: Any = None,
        dtype: torch.dtype | None = torch.float16,
        overwrite_readme: bool = False,
    ) -> str:
        """Create ``repo_id`` if needed and upload, in one commit, what :meth:`save_hub_folder`
        writes: the bundle, the stock diffusers LoRA and embeddings files, the training config,
        ``preview_image`` (a PIL image or an image file path) and the model card; returns the
        repo URL. A ``README.md`` on the Hub that was edited after this library wrote it is kept
        unless ``overwrite_readme``.

        Example:
            >>> bundle.push_to_hub("me/my-scene", private=True)  # doctest: +SKIP
            'https://huggingface.co/me/my-scene'
        """
        message = commit_message or f"Upload Break-A-Scene bundle ({', '.join(self.tokens)})"
        with tempfile.TemporaryDirectory(prefix="breakscene-push-") as tmp:
            self.save_hub_folder(tmp, repo_id, preview_image=preview_image, dtype=dtype)
            return hub.upload(
                repo_id,
                Path(tmp),
                private=private,
                token=token,
                commit_message=message,
                overwrite_readme=overwrite_readme,
            )
