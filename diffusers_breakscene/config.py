"""Every Break-A-Scene hyperparameter in one validated dataclass, :class:`BreakASceneConfig`.

Where the defaults come from ("paper" = arXiv 2305.16311, "reference" = google/break-a-scene
``train.py``, "ours" = a choice of this library):

- Two phases of 400 steps each (paper, reference); phase 1 trains the handle embeddings only at
  1e-3 (ours, chosen by measurement: on the toy world's 12 scenes x 3 seeds it reaches the paper
  recipe's final identity by step 350 instead of 800, with final identity and prompt accuracy
  level with 5e-4, the paper's rate).
- Phase 2: the paper and the reference fine-tune the whole UNet at 2e-6 (``phase2="full"``,
  ``phase2_full_learning_rate``). Our default is a PEFT LoRA (``phase2="lora"``) at 1e-4, the
  usual LoRA rate (ours), rank 16 on the attention projections (ours, chosen by measurement in
  ``benchmarks/defaults_search.py``: within 1/500 of an SD2.1 pipeline, 6.6 MB, and level with
  the paper's recipe and the former rank 32 on attention + feed-forward within the toy world's
  noise; docs/fidelity.md).
  The handles keep learning in phase 2 at the reference's low rate, 2e-6. The reference also
  fine-tunes the whole text encoder (``phase2="full", train_text_encoder=True`` is exactly its
  phase 2); we train only the handles unless ``train_text_encoder_lora`` is set (ours).
- Losses: masked diffusion loss normalised by ``mean`` over all elements, cross-attention loss
  on the latent/4 level with weight 1e-2 (paper, reference).
- Union sampling, horizontal flip with p=0.5, prompt ``"a photo of " + " and ".join(tokens)``
  (reference).
- Prior preservation is off (paper); the reference code turns it on by default, with 100 class
  images of "a photo at the beach" and weight 1 (those are the defaults used when it is on).
- Optimizer: AdamW with betas (0.9, 0.999), weight decay 1e-2, epsilon 1e-8, gradient clipping
  1.0 and a constant learning rate, as in the reference code; the paper states Adam with
  beta2 0.99 and weight decay 1e-8.
- ``mixed_precision="no"`` (ours: runs everywhere; the reference uses fp16), seed 0 (ours: the
  reference leaves it unset), 512 px (reference), validation with 25 steps and guidance 7.5.

Why this module is near 600 lines: one dataclass field per hyperparameter, each with its help
text, and the value checks that name the field and the fix; how annotations are read lives in
:mod:`~diffusers_breakscene.config_schema`.

Example:
    >>> from diffusers_breakscene.config import BreakASceneConfig
    >>> config = BreakASceneConfig(phase1_steps=100, lora_rank=8)
    >>> config.effective_lora_alpha
    8.0
    >>> BreakASceneConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config_schema import config_error, field_specs
from .errors import InvalidConfigError, MissingFileError

__all__ = [
    "DEFAULT_LORA_RANK",
    "DEFAULT_LORA_TARGET_MODULES",
    "DEFAULT_PROMPT_TEMPLATE",
    "DEFAULT_TOKEN_JOINER",
    "KNOWN_LR_SCHEDULERS",
    "KNOWN_TRACKERS",
    "BreakASceneConfig",
]

#: The training prompt of the paper and the reference code: "a photo of <asset0> and <asset1>".
DEFAULT_PROMPT_TEMPLATE = "a photo of {}"
DEFAULT_TOKEN_JOINER = " and "

# diffusers' scheduler names that cannot run from this config alone (they need extra rules).
_UNSUPPORTED_LR_SCHEDULERS = {"piecewise_constant": "it needs step rules this config cannot hold"}
# The names of diffusers.optimization.SchedulerType and accelerate's LoggerType, as of the
# versions this library targets: known names are accepted without importing diffusers or
# accelerate (and so torch), which keeps config checks and `breakscene` argument errors instant.
# A name not listed is looked up in the installed library, so newer names still work;
# tests/test_config.py checks that these tuples match the installed libraries.
KNOWN_LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
KNOWN_TRACKERS = (
    "all",
    "aim",
    "tensorboard",
    "wandb",
    "trackio",
    "comet_ml",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
)
# Fields that hold a filesystem path: os.PathLike values are stored as str.
_PATH_FIELDS = ("class_images_dir", "resume_from_checkpoint", "logging_dir")


def _installed_names(field_name: str, known: bool) -> tuple[str, ...]:
    """The valid values of ``lr_scheduler`` or ``report_to``: the built-in tuple when the value
    is in it (no import), else those of the installed diffusers / accelerate."""
    if field_name == "lr_scheduler":
        if known:
            return KNOWN_LR_SCHEDULERS
        from diffusers.optimization import SchedulerType

        return tuple(s.value for s in SchedulerType)
    if known:
        return KNOWN_TRACKERS
    from accelerate.utils import LoggerType

    return tuple(t.value for t in LoggerType)


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a ``help`` text (peft's ``LoraConfig`` style)."""
    return field(default=default, metadata={"help": help})


#: The UNet LoRA's default rank and layers, chosen by ``benchmarks/defaults_search.py`` (2026-11-27,
#: docs/fidelity.md): rank 16 on the attention projections writes 6.6 MB for SD2.1 (1/777 of the
#: pipeline; the former rank 32 on attention + feed-forward wrote 24.5 MB, 1/211).
DEFAULT_LORA_RANK = 16
DEFAULT_LORA_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(kw_only=True)
class BreakASceneConfig:
    """Hyperparameters of a Break-A-Scene run, validated on construction.

    Every field has a default and a ``help`` text (``dataclasses.fields(BreakASceneConfig)``);
    invalid values raise :class:`~diffusers_breakscene.errors.InvalidConfigError` (a
    ``ValueError``) naming the field, the value and the fix. The object is a plain mutable
    dataclass: prefer :meth:`replace`, or call :meth:`validate` after changing fields by hand.

    Example:
        >>> config = BreakASceneConfig(phase2="full", prior_preservation=True)
        >>> config.total_steps
        800
        >>> config.replace(phase2_steps=0).total_steps
        400
    """

    # --- schedule of the two phases ---------------------------------------------------------
    phase1_steps: int = _f(400, "Optimizer steps of phase 1 (handle embeddings only). 0 skips it.")
    phase2_steps: int = _f(
        400, "Optimizer steps of phase 2 (handles + LoRA, or the full UNet). 0 skips it."
    )
    phase1_learning_rate: float = _f(
        1e-3, "Learning rate of the handles in phase 1 (the paper's is 5e-4)."
    )
    phase2_learning_rate: float = _f(
        1e-4, "Learning rate of the LoRA weights in phase 2 (typical LoRA rate)."
    )
    phase2_handle_learning_rate: float = _f(
        2e-6, "Learning rate of the handles in phase 2 (the reference's low rate)."
    )
    phase2_full_learning_rate: float = _f(
        2e-6, 'Learning rate of the UNet in phase 2 when phase2="full" (paper, reference).'
    )
    phase2: Literal["lora", "full"] = _f(
        "lora",
        'What phase 2 trains besides the handles: "lora" (PEFT LoRA on the UNet) or "full" '
        "(every UNet weight, the paper's setting; large memory and output).",
    )
    vectors_per_handle: int = _f(
        1,
        "Embedding rows per handle (the paper: 1). With k > 1 a handle is k tokens, named as "
        "diffusers names a multi-vector textual inversion ('<asset0>', '<asset0>_1', ...); "
        "prompts still say '<asset0>'. Vector j starts at the j-th part of the initializer "
        "phrase ('red striped star', k=3: one word each).",
    )

    # --- LoRA ------------------------------------------------------------------------------
    lora_rank: int = _f(DEFAULT_LORA_RANK, "Rank r of the UNet LoRA.")
    lora_alpha: float | None = _f(None, "LoRA alpha of the UNet LoRA; None means equal to rank.")
    lora_dropout: float = _f(0.0, "Dropout probability inside the LoRA layers, in [0, 1).")
    lora_target_modules: tuple[str, ...] = _f(
        DEFAULT_LORA_TARGET_MODULES,
        "UNet module name suffixes that get a LoRA (the attention projections; "
        '"ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", ... are allowed).',
    )
    train_text_encoder_lora: bool = _f(
        False, "Also train a LoRA on the text encoder(s) in phase 2."
    )
    train_text_encoder: bool = _f(
        False,
        'With phase2="full": also fine-tune every text-encoder weight in phase 2 at '
        "phase2_full_learning_rate, as the reference code does (saved in output_dir/text_encoder).",
    )
    text_encoder_lora_rank: int = _f(8, "Rank of the text-encoder LoRA (alpha equals rank).")
    text_encoder_lora_target_modules: tuple[str, ...] = _f(
        ("q_proj", "k_proj", "v_proj", "out_proj"),
        "Text-encoder module name suffixes that get a LoRA.",
    )

    # --- losses ----------------------------------------------------------------------------
    lambda_attention: float = _f(1e-2, "Weight of the cross-attention loss (paper: 0.01).")
    use_masked_loss: bool = _f(
        True, "Restrict the diffusion loss to the union of the sampled masks."
    )
    use_attention_loss: bool = _f(
        True, "Add the cross-attention loss that ties each handle to its mask."
    )
    masked_loss_normalization: Literal["mean", "area"] = _f(
        "mean",
        '"mean": mean over all latent elements (reference); "area": divided by the mask area.',
    )
    attention_resolution_divisor: int = _f(
        4,
        "Which UNet level's cross-attention the attention loss uses: latent size / this "
        "(4 = 16x16 at 512 px, the paper's choice). A power of two.",
    )

    # --- sampling and augmentation ---------------------------------------------------------
    union_sampling: bool = _f(
        True, "Each step, train on a random non-empty subset of the concepts (paper)."
    )
    flip_probability: float = _f(
        0.5, "Probability of a horizontal flip of image and masks together, in [0, 1]."
    )
    prompt_template: str = _f(
        DEFAULT_PROMPT_TEMPLATE, 'Training prompt; "{}" is replaced by the joined handle tokens.'
    )
    token_joiner: str = _f(
        DEFAULT_TOKEN_JOINER, "String placed between handle tokens in the prompt."
    )

    # --- prior preservation ----------------------------------------------------------------
    prior_preservation: bool = _f(
        False,
        "Add a DreamBooth prior-preservation loss on generated class images (the paper does not "
        "mention it; the reference code turns it on and cannot train without it when the "
        "attention loss is on: IndexError).",
    )
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.")
    class_prompt: str = _f("a photo at the beach", "Prompt of the class images (reference).")
    num_class_images: int = _f(100, "Number of class images to use (generated if missing).")
    class_images_dir: str | None = _f(
        None, "Folder of class images; None means a folder inside the output directory."
    )

    # --- data and precision ----------------------------------------------------------------
    resolution: int | None = _f(
        None,
        "Training image size in pixels, a positive multiple of 8; None: the base model's native "
        "size (UNet sample size x VAE factor: 512 for SD1.5 and SD2-base, 768 for SD2.1, 1024 "
        "for SDXL).",
    )
    train_batch_size: int = _f(1, "Examples per optimizer micro-step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps accumulated per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f(
        "no", 'Accelerate mixed precision: "no", "fp16" or "bf16".'
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute UNet activations in backward to save memory."
    )
    seed: int = _f(0, "Random seed for sampling, noise and initialisation, in [0, 2**32).")

    # --- optimizer (reference code's choices; the paper states beta2 0.99, wd 1e-8) --------
    adam_beta1: float = _f(0.9, "AdamW beta1, in [0, 1).")
    adam_beta2: float = _f(0.999, "AdamW beta2, in [0, 1) (reference code; paper: 0.99).")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay (reference code; paper: 1e-8).")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    use_8bit_adam: bool = _f(
        False,
        "Use bitsandbytes' 8-bit AdamW (optional: pip install 'diffusers-breakscene[bnb]'; "
        "bitsandbytes >= 0.50 also runs on CPUs): optimizer state in 1 byte per value instead "
        'of 8, which matters for phase2="full".',
    )
    lr_scheduler: str = _f(
        "constant",
        'diffusers.optimization scheduler name: "constant", "constant_with_warmup", "linear", '
        '"cosine", "cosine_with_restarts" or "polynomial".',
    )
    lr_warmup_steps: int = _f(0, "Warmup optimizer steps of the learning-rate scheduler.")
    lr_num_cycles: int = _f(1, 'Number of hard restarts of "cosine_with_restarts".')
    lr_power: float = _f(1.0, 'Power of the "polynomial" scheduler.')

    # --- checkpoints -----------------------------------------------------------------------
    checkpointing_steps: int | None = _f(
        None, "Save the training state every N optimizer steps; None never does."
    )
    checkpoints_total_limit: int | None = _f(
        None, "Keep at most this many checkpoints (oldest removed); None keeps all."
    )
    resume_from_checkpoint: str | None = _f(
        None, 'Resume from a checkpoint folder, or "latest" for the newest one in the output.'
    )
    checkpoint_phase_ends: bool = _f(
        True,
        "Also save a checkpoint at the end of each phase (a few MB with the LoRA; the whole "
        'UNet and its optimizer state with phase2="full").',
    )
    checkpoint_on_interrupt: bool = _f(
        True,
        "On Ctrl-C, finish the step in flight and save a checkpoint before stopping (one "
        'process only; resume with resume_from_checkpoint="latest").',
    )

    # --- validation and logging ------------------------------------------------------------
    validation_prompts: tuple[str, ...] = _f(
        (), "Prompts rendered during training for inspection (may use the handle tokens)."
    )
    validation_steps: int | None = _f(
        None, "Render the validation prompts every N optimizer steps; None never does."
    )
    validate_phase_ends: bool = _f(
        True,
        "Render the validation prompts (default: every handle in one prompt) with attention "
        "pictures at the end of each phase.",
    )
    validation_num_inference_steps: int = _f(25, "Denoising steps of validation images.")
    validation_guidance_scale: float = _f(
        7.5, "Classifier-free guidance scale of validation images."
    )
    save_attention_maps: bool = _f(True, "Save attention-map pictures with validation images.")
    report_to: str | None = _f(
        None, 'Accelerate tracker: "tensorboard", "wandb", "all", ...; None logs nowhere.'
    )
    logging_dir: str = _f("logs", "Tracker log folder, relative to the output directory.")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere and newer GPUs.")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @property
    def effective_lora_alpha(self) -> float:
        """``lora_alpha``, or ``lora_rank`` when it is None.

        Example:
            >>> BreakASceneConfig(lora_rank=4, lora_alpha=8).effective_lora_alpha
            8.0
        """
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def total_steps(self) -> int:
        """``phase1_steps + phase2_steps``: optimizer steps of the whole run.

        Example:
            >>> BreakASceneConfig(phase1_steps=10, phase2_steps=5).total_steps
            15
        """
        return self.phase1_steps + self.phase2_steps

    def validate(self) -> None:
        """Check every field (types, ranges, choices) and normalise values in place.

        Lists become tuples, ints in float fields become floats, path-like values become str.
        Raises :class:`InvalidConfigError` naming the first bad field.

        Example:
            >>> config = BreakASceneConfig()
            >>> config.flip_probability = 2.0
            >>> try:
            ...     config.validate()
            ... except ValueError as err:
            ...     print(str(err).split(":")[0])
            flip_probability=2.0 is invalid
        """
        for spec in field_specs(type(self)):
            value = getattr(self, spec.name)
            if spec.name in _PATH_FIELDS and isinstance(value, os.PathLike):
                value = os.fspath(value)
            setattr(self, spec.name, spec.check(value))
        self._check_values()

    def _check_values(self) -> None:
        for name in ("phase1_steps", "phase2_steps"):
            _require(self, name, getattr(self, name) >= 0, "must be >= 0", "use 0 to skip it")
        if self.total_steps == 0:
            _fail(
                "phase2_steps",
                self.phase2_steps,
                "phase1_steps and phase2_steps are both 0, so nothing would be trained",
                "give at least one phase a positive number of steps",
            )
        for name in (
            "phase1_learning_rate",
            "phase2_learning_rate",
            "phase2_handle_learning_rate",
            "phase2_full_learning_rate",
            "adam_epsilon",
            "max_grad_norm",
            "lr_power",
        ):
            _require(self, name, getattr(self, name) > 0, "must be > 0", "use a positive number")
        for name in (
            "lora_rank",
            "text_encoder_lora_rank",
            "train_batch_size",
            "gradient_accumulation_steps",
            "num_class_images",
            "validation_num_inference_steps",
            "lr_num_cycles",
            "vectors_per_handle",
        ):
            _require(self, name, getattr(self, name) >= 1, "must be >= 1", "use a positive int")
        for name in ("checkpointing_steps", "checkpoints_total_limit", "validation_steps"):
            value = getattr(self, name)
            _require(
                self, name, value is None or value >= 1, "must be >= 1", "use None to disable it"
            )
        if self.lora_alpha is not None:
            _require(self, "lora_alpha", self.lora_alpha > 0, "must be > 0", "or None (= rank)")
        _require(
            self,
            "lora_dropout",
            0.0 <= self.lora_dropout < 1.0,
            "must be in [0, 1)",
            "use e.g. 0.0 or 0.1",
        )
        _require(
            self,
            "flip_probability",
            0.0 <= self.flip_probability <= 1.0,
            "must be a probability in [0, 1]",
            "use 0.0 to never flip, 0.5 for the paper's setting",
        )
        for name in ("adam_beta1", "adam_beta2"):
            _require(self, name, 0.0 <= getattr(self, name) < 1.0, "must be in [0, 1)", "")
        for name in (
            "adam_weight_decay",
            "lambda_attention",
            "prior_loss_weight",
            "validation_guidance_scale",
        ):
            _require(self, name, getattr(self, name) >= 0, "must be >= 0", "")
        _require(self, "lr_warmup_steps", self.lr_warmup_steps >= 0, "must be >= 0", "")
        for name in ("lora_target_modules", "text_encoder_lora_target_modules"):
            modules = getattr(self, name)
            _require(
                self,
                name,
                len(modules) > 0 and all(m.strip() for m in modules),
                "must be a non-empty tuple of non-empty module names",
                'e.g. ("to_q", "to_k", "to_v", "to_out.0")',
            )
        _require(
            self,
            "train_text_encoder",
            not self.train_text_encoder or self.phase2 == "full",
            'fine-tunes the whole text encoder, which goes with phase2="full" only',
            'set phase2="full" (the reference\'s recipe), or use train_text_encoder_lora=True',
        )
        _require(
            self,
            "train_text_encoder",
            not (self.train_text_encoder and self.train_text_encoder_lora),
            "and train_text_encoder_lora=True both train the text encoder",
            "choose one of them",
        )
        _require(
            self,
            "validation_prompts",
            all(p.strip() for p in self.validation_prompts),
            "must not contain empty prompts",
            "remove the empty strings",
        )
        self._check_template()
        _require(
            self,
            "resolution",
            self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
            "must be a positive multiple of 8 (the VAE downsamples by 8)",
            "use e.g. 512, 768 or 1024, or None for the base model's own size",
        )
        divisor = self.attention_resolution_divisor
        _require(
            self,
            "attention_resolution_divisor",
            divisor >= 1 and divisor & (divisor - 1) == 0,
            "must be a power of two (one per UNet level)",
            "use 4 for the paper's 16x16 maps at 512 px",
        )
        latent = (self.resolution or 8 * divisor) // 8  # None: checked when it is resolved
        _require(
            self,
            "attention_resolution_divisor",
            latent % divisor == 0,
            f"does not divide the latent size {latent} (resolution {self.resolution} / 8)",
            "use a smaller power of two or a resolution that is a multiple of 8 * divisor",
        )
        _require(
            self, "seed", 0 <= self.seed < 2**32, "must be in [0, 2**32)", "use e.g. 0 or 1234"
        )
        if self.prior_preservation:
            _require(
                self,
                "class_prompt",
                bool(self.class_prompt.strip()),
                "must not be empty when prior_preservation is on",
                'use e.g. "a photo at the beach"',
            )
        for name in ("class_images_dir", "resume_from_checkpoint", "report_to"):
            value = getattr(self, name)
            _require(
                self, name, value is None or bool(value.strip()), "is empty", "use None instead"
            )
        _require(self, "logging_dir", bool(self.logging_dir.strip()), "is empty", 'use "logs"')
        self._check_lr_scheduler()
        self._check_report_to()

    def _check_template(self) -> None:
        template = self.prompt_template
        rest = template.replace("{}", "", 1)
        if template.count("{}") != 1 or "{" in rest or "}" in rest:
            _fail(
                "prompt_template",
                template,
                'must contain exactly one "{}" (where the handle tokens go) and no other braces',
                'use e.g. "a photo of {}"',
            )

    def _check_lr_scheduler(self) -> None:
        known = self.lr_scheduler in KNOWN_LR_SCHEDULERS
        names = [
            s
            for s in _installed_names("lr_scheduler", known)
            if s not in _UNSUPPORTED_LR_SCHEDULERS
        ]
        if self.lr_scheduler in _UNSUPPORTED_LR_SCHEDULERS:
            reason = _UNSUPPORTED_LR_SCHEDULERS[self.lr_scheduler]
            _fail("lr_scheduler", self.lr_scheduler, f"is not supported: {reason}", _one_of(names))
        if self.lr_scheduler not in names:
            _fail(
                "lr_scheduler",
                self.lr_scheduler,
                "is not a diffusers.optimization scheduler"
                + _did_you_mean(self.lr_scheduler, names),
                _one_of(names),
            )

    def _check_report_to(self) -> None:
        if self.report_to is None:
            return
        names = _installed_names("report_to", self.report_to in KNOWN_TRACKERS)
        if self.report_to not in names:
            _fail(
                "report_to",
                self.report_to,
                "is not an accelerate tracker" + _did_you_mean(self.report_to, names),
                _one_of(names) + " or None",
            )

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (tuples become lists).

        Example:
            >>> BreakASceneConfig().to_dict()["lora_target_modules"][:2]
            ['to_q', 'to_k']
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def __new__(cls, *args: Any, **kwargs: Any) -> BreakASceneConfig:
        # The generated __init__ would raise a bare TypeError for a misspelt field; check the
        # names first so the error says which field was meant.
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                raise InvalidConfigError(
                    f"unknown config field {key!r}"
                    + _did_you_mean(str(key), names)
                    + "; see dataclasses.fields(BreakASceneConfig) for the valid names"
                )
        return super().__new__(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BreakASceneConfig:
        """Build a validated config from a mapping such as :meth:`to_dict`'s output.

        Missing keys take their defaults; lists become tuples; an unknown key raises
        :class:`InvalidConfigError` that suggests the closest field name.

        Example:
            >>> BreakASceneConfig.from_dict({"phase1_steps": 10}).phase1_steps
            10
        """
        if not isinstance(data, Mapping):
            raise InvalidConfigError(
                f"config data must be a mapping of field names to values, got "
                f"{type(data).__name__}; pass a dict such as BreakASceneConfig().to_dict()"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                raise InvalidConfigError(
                    f"unknown config key {key!r}"
                    + _did_you_mean(str(key), names)
                    + "; see dataclasses.fields(BreakASceneConfig) for the valid names"
                )
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        """The config as JSON text (:meth:`to_dict`), readable by :meth:`from_file`.

        Example:
            >>> '"phase1_steps": 400' in BreakASceneConfig().to_json()
            True
        """
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BreakASceneConfig:
        """Read a config from a ``.json``, ``.yaml`` or ``.yml`` file (YAML needs pyyaml).

        In YAML, numbers such as ``5e-4`` (which YAML 1.1 reads as text) are accepted for float
        fields. A missing file raises :class:`MissingFileError`.

        Example:
            >>> import tempfile, pathlib
            >>> p = pathlib.Path(tempfile.mkdtemp()) / "config.json"
            >>> _ = p.write_text('{"lora_rank": 4}')
            >>> BreakASceneConfig.from_file(p).lora_rank
            4
        """
        file = Path(path)
        if not file.is_file():
            what = "is a folder, not a file" if file.is_dir() else "does not exist"
            raise MissingFileError(
                f"config file {str(file)!r} {what}; pass the path of a .json or .yaml file"
            )
        suffix = file.suffix.lower()
        text = file.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise InvalidConfigError(
                    f"config file {str(file)!r} is not valid JSON: {err}"
                ) from err
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise ImportError(
                    f"reading the YAML config {str(file)!r} needs pyyaml: "
                    "pip install pyyaml (or diffusers-breakscene[yaml]), or use a .json file"
                ) from err
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise InvalidConfigError(
                    f"config file {str(file)!r} is not valid YAML: {err}"
                ) from err
            data = {} if data is None else _coerce_yaml_floats(data, cls)
        else:
            raise InvalidConfigError(
                f"config file {str(file)!r} has suffix {suffix!r}; use .json, .yaml or .yml"
            )
        if not isinstance(data, Mapping):
            raise InvalidConfigError(
                f"config file {str(file)!r} must hold a mapping of field names to values, "
                f"got {type(data).__name__}"
            )
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> BreakASceneConfig:
        """A validated copy with some fields changed (unknown names raise InvalidConfigError).

        Example:
            >>> BreakASceneConfig().replace(lora_rank=4).lora_rank
            4
        """
        merged = self.to_dict()
        for key, value in changes.items():
            merged[key] = value
        return type(self).from_dict(merged)


# ---------------------------------------------------------------------------------------------
# helpers

_fail = config_error


def _require(config: BreakASceneConfig, name: str, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        _fail(name, getattr(config, name), problem, fix)


def _one_of(names: list[str]) -> str:
    return "use one of " + ", ".join(repr(n) for n in names)


def _did_you_mean(word: str, names: list[str]) -> str:
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _float_fields(cls: type) -> set[str]:
    return {spec.name for spec in field_specs(cls) if spec.kind == "float"}


def _coerce_yaml_floats(data: Any, cls: type) -> Any:
    """Turn YAML 1.1 strings such as ``"5e-4"`` into floats for float fields."""
    if not isinstance(data, Mapping):
        return data
    floats = _float_fields(cls)
    out = dict(data)
    for key, value in data.items():
        if key in floats and isinstance(value, str):
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out
