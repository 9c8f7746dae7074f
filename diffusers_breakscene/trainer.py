"""``BreakASceneTrainer``: the two phases of Break-A-Scene on accelerate.

Phase 1 trains only the handle embeddings at a high learning rate; phase 2 trains the handles
and a PEFT LoRA on the UNet (or the whole UNet with ``phase2="full"``) at low rates. Each step is
:func:`~diffusers_breakscene.step.training_step`. The loop runs the same on one CPU, one GPU or
several processes under ``accelerate launch`` / ``torchrun`` (distributed data parallel).

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
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import BreakASceneConfig
from .errors import (
    InvalidConfigError,
    InvalidSceneError,
    MissingFileError,
    NonFiniteLossError,
)
from .files import check_writable
from .handles import HandleEmbedding, add_handles, get_handle_embeddings
from .lora import add_text_encoder_lora, add_unet_lora, lora_metadata, lora_state_dict
from .scene import Scene
from .step import EncodedImages, encode_images, encode_scene, sample_batch, training_step

__all__ = ["BreakASceneTrainer"]


def _load_pipeline(source: Any) -> Any:
    """A pipeline object as is, or ``StableDiffusionPipeline.from_pretrained(source)``."""
    if not isinstance(source, str | os.PathLike):
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(source, part, None) is None:
                raise InvalidConfigError(
                    f"The pipeline has no {part}; BreakASceneTrainer needs an SD-family pipeline "
                    "(StableDiffusionPipeline or a model path/hub id)."
                )
        return source
    return load_base_pipeline(source)


def load_base_pipeline(source: str | os.PathLike[str]) -> Any:
    """``StableDiffusionPipeline.from_pretrained(source)`` without safety checker, for a local
    folder (read offline) or a Hub repo id, with a :class:`MissingFileError` that says what to
    pass when ``source`` is neither.
    """
    from diffusers import StableDiffusionPipeline

    local = Path(source).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise MissingFileError(
            f"{source} has no model_index.json; pass a diffusers pipeline folder or a hub id."
        )
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if local.exists():
        kwargs["local_files_only"] = True
    try:
        return StableDiffusionPipeline.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as err:
        # diffusers says "neither a valid local path nor a valid repo id" (ValueError) or
        # cannot find/download the files (OSError): the user named something that is not there.
        raise MissingFileError(
            f"Cannot load a pipeline from {str(source)!r} ({err}); pass an existing diffusers "
            "pipeline folder (with model_index.json) or a Hub repo id such as "
            "'stabilityai/stable-diffusion-2-1-base'."
        ) from err


def _use_configured_learning_rates(optimizer: Any, lr_scheduler: Any, configured: list) -> None:
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


@dataclass
class _Run:
    """What one call of :meth:`BreakASceneTrainer.train` works with, built once at its start."""

    accelerator: Any
    unet: Any
    text_encoder: Any
    noise_scheduler: Any
    handles: HandleEmbedding
    store: AttentionStore | None
    encoded: EncodedImages
    prior: EncodedImages | None
    handle_ids: list[int]
    generator: torch.Generator
    output_dir: Path
    bar: Any


class BreakASceneTrainer:
    """Learn one handle token per concept of a :class:`~diffusers_breakscene.Scene`.

    Args:
        pipeline_or_path: an SD-family pipeline (trained in place: after :meth:`train` it holds
            the handles and the LoRA adapter ``"break_a_scene"``), or a local folder / hub id.
        scene: the image, masks and tokens.
        config: hyperparameters; ``BreakASceneConfig()`` (the paper's) when omitted.
        accelerator: an ``accelerate.Accelerator`` to use instead of a new one.

    Example:
        >>> from diffusers_breakscene import BreakASceneConfig, BreakASceneTrainer, Scene
        >>> trainer = BreakASceneTrainer("stabilityai/stable-diffusion-2-1-base",
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
        self.scene = scene
        self.config = config
        self.pipeline = _load_pipeline(pipeline_or_path)
        self.base_model = (
            str(pipeline_or_path)
            if isinstance(pipeline_or_path, str | os.PathLike)
            else getattr(self.pipeline, "name_or_path", None)
            or self.pipeline.config.get("_name_or_path", "")
        )
        vocab = self.pipeline.tokenizer.get_vocab()
        clash = [t for t in scene.tokens if t in vocab]
        if clash:
            from .errors import TokenConflictError

            raise TokenConflictError(
                f"Scene tokens {clash} already exist in the pipeline's tokenizer; choose other "
                "handle names with Scene(..., tokens=[...])."
            )
        self._accelerator = accelerator
        self.history: list[dict[str, float]] = []

    # -- public ---------------------------------------------------------------------------------

    def train(self, output_dir: str | os.PathLike[str], *, progress: bool = True) -> Path:
        """Run both phases and write ``output_dir/break_a_scene.safetensors``; returns its path.

        With ``config.checkpointing_steps`` set, ``output_dir/checkpoints/checkpoint-N`` folders
        are written, and ``config.resume_from_checkpoint`` ("latest" or a folder) continues from
        one exactly where it stopped.
        """
        output_dir = Path(output_dir)
        check_writable(output_dir, "output_dir")
        resume = self._resolve_resume(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

        cfg = self.config
        accelerator = self._make_accelerator(output_dir)
        device = accelerator.device
        pipe = self.pipeline
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        for model in (unet, vae, text_encoder):
            model.requires_grad_(False)
            model.to(device)
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)

        # Data that does not change during training: VAE latents of the image, its flip, and
        # (with prior preservation) of the class images, computed once.
        prior = self._class_latents(output_dir, accelerator) if cfg.prior_preservation else None
        encoded = encode_scene(vae, self.scene, cfg.resolution)

        handle_ids = add_handles(
            tokenizer,
            text_encoder,
            self.scene.tokens,
            self.scene.initializer_tokens,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        handles = HandleEmbedding.install(text_encoder, handle_ids)
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
        if weight_dtype != torch.float32 and cfg.phase2 == "lora":
            unet.to(dtype=weight_dtype)  # frozen base weights; trainable ones stay float32
        unet.train()
        text_encoder.train()

        start_step = 0
        if resume is not None and resume.step >= cfg.phase1_steps:
            start_step = resume.step
        total = cfg.phase1_steps + cfg.phase2_steps
        run = _Run(
            accelerator, unet, text_encoder, noise_scheduler, handles, store, encoded, prior,
            handle_ids, generator, output_dir,
            self._progress(total, start_step, accelerator, progress),
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
            text_encoder.eval()
            handles.uninstall(accelerator.unwrap_model(text_encoder))

        accelerator.wait_for_everyone()
        path = output_dir / "break_a_scene.safetensors"
        if accelerator.is_main_process:
            path = self._write_outputs(output_dir, encoded)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return path

    # -- the phases ------------------------------------------------------------------------------

    def _run_phase(self, phase: int, run: _Run, resume: Any) -> None:
        """Optimizer, scheduler and loop of one phase; continues from ``resume`` if given."""
        cfg = self.config
        accelerator = run.accelerator
        first = 0 if phase == 1 else cfg.phase1_steps
        last = cfg.phase1_steps if phase == 1 else cfg.phase1_steps + cfg.phase2_steps
        groups, trainable = self._param_groups(phase, run.unet, run.text_encoder, run.handles)
        from diffusers.optimization import get_scheduler

        optimizer = torch.optim.AdamW(
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
            step = self._restore(
                resume, phase, trainable, optimizer, lr_scheduler, run.generator, accelerator
            )
        models = [run.text_encoder] if phase == 1 else [run.unet, run.text_encoder]
        prepared = accelerator.prepare(*models, optimizer, lr_scheduler)
        *models, optimizer, lr_scheduler = prepared
        ddp_text_encoder = models[-1]
        ddp_unet = models[0] if phase == 2 else run.unet

        run.bar.set_description(f"phase {phase}/2")
        while step < last:
            with accelerator.accumulate(*models):
                batch = sample_batch(
                    self.scene,
                    run.encoded,
                    self.pipeline.tokenizer,
                    run.handle_ids,
                    run.generator,
                    batch_size=cfg.train_batch_size,
                    scaling_factor=self.pipeline.vae.config.scaling_factor,
                    union_sampling=cfg.union_sampling,
                    flip_probability=cfg.flip_probability,
                    prompt_template=cfg.prompt_template,
                    token_joiner=cfg.token_joiner,
                    prior=run.prior,
                    class_prompt=cfg.class_prompt,
                )
                with accelerator.autocast():
                    loss, logs = training_step(
                        ddp_unet,
                        ddp_text_encoder,
                        run.noise_scheduler,
                        batch,
                        run.generator,
                        attention_store=run.store,
                        use_masked_loss=cfg.use_masked_loss,
                        lambda_attention=cfg.lambda_attention,
                        masked_loss_normalization=cfg.masked_loss_normalization,
                        prior_loss_weight=cfg.prior_loss_weight,
                    )
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
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
                self._save(step, phase, trainable, optimizer, lr_scheduler, run)
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                self._validate(step, run)

    def _param_groups(
        self, phase: int, unet: Any, text_encoder: Any, handles: HandleEmbedding
    ) -> tuple[list[dict[str, Any]], dict[str, torch.nn.Parameter]]:
        """Optimizer groups and ``{name: param}`` of everything trained in ``phase``."""
        cfg = self.config
        handles.handle_weight.requires_grad_(True)
        if phase == 1:
            return [{"params": [handles.handle_weight], "lr": cfg.phase1_learning_rate}], {
                "handles": handles.handle_weight
            }
        trainable = {"handles": handles.handle_weight}
        groups = [{"params": [handles.handle_weight], "lr": cfg.phase2_handle_learning_rate}]
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

    def _resolve_resume(self, output_dir: Path) -> Any:
        spec = self.config.resume_from_checkpoint
        if not spec:
            return None
        if spec == "latest":
            found = latest_checkpoint(output_dir / "checkpoints")
            return load_checkpoint(found) if found is not None else None
        return load_checkpoint(spec)

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

    def _restore(
        self,
        resume: Any,
        phase: int,
        trainable: dict[str, torch.nn.Parameter],
        optimizer: Any,
        lr_scheduler: Any,
        generator: torch.Generator,
        accelerator: Any,
    ) -> int:
        """Load a checkpoint into this phase's state; returns the step to continue from.

        A checkpoint from the same phase restores everything; one taken at the very end of
        phase 1 seeds phase 2 with the handles (the LoRA and optimizer start fresh, as they
        would have without the interruption).
        """
        same_phase = resume.phase == phase
        names = list(trainable) if same_phase else ["handles"]
        missing = [name for name in names if name not in resume.params]
        if missing:
            raise InvalidConfigError(
                f"The checkpoint at step {resume.step} lacks {len(missing)} trainable tensors "
                f"(e.g. {missing[0]!r}): it was made with another configuration (phase2, LoRA "
                "rank or targets); resume with the same config."
            )
        with torch.no_grad():
            for name in names:
                param = trainable[name]
                param.copy_(resume.params[name].to(param.device, param.dtype))
        if same_phase:
            configured = [group["initial_lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(resume.optimizer)
            lr_scheduler.load_state_dict(resume.scheduler)
            _use_configured_learning_rates(optimizer, lr_scheduler, configured)
        index = min(accelerator.process_index, resume.generator_states.shape[0] - 1)
        generator.set_state(resume.generator_states[index].clone())
        if resume.torch_rng_state is not None:
            torch.set_rng_state(resume.torch_rng_state)
        return resume.step

    # -- validation, prior preservation, outputs ---------------------------------------------

    def _validate(self, step: int, run: _Run) -> None:
        """Generate the validation prompts; with ``save_attention_maps``, also draw where each
        handle of the prompt attends next to its mask (``NN-attention.png``)."""
        accelerator, store, output_dir = run.accelerator, run.store, run.output_dir
        if not accelerator.is_main_process:
            return
        from PIL import Image

        from .viz import mask_vs_attention_grid, save_png, token_attention_maps

        cfg = self.config
        everything = list(range(self.scene.num_concepts))
        prompts = list(cfg.validation_prompts) or [
            self.scene.prompt(everything, cfg.prompt_template, cfg.token_joiner)
        ]
        folder = output_dir / "validation" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        pipe = self.pipeline
        pixels, masks = self.scene.prepare(cfg.resolution)
        array = ((pixels.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        training_image = Image.fromarray(array)
        own_store = store is None and cfg.save_attention_maps
        if own_store:
            store = AttentionStore.attach(
                pipe.unet, resolution_divisor=cfg.attention_resolution_divisor
            )
        handle_ids = dict(zip(self.scene.tokens, pipe.tokenizer.convert_tokens_to_ids(
            self.scene.tokens), strict=True))  # fmt: skip
        unet_mode, te_mode = pipe.unet.training, pipe.text_encoder.training
        pipe.unet.eval()
        pipe.text_encoder.eval()
        try:
            for index, prompt in enumerate(prompts):
                if store is not None:
                    store.reset()
                with torch.no_grad():
                    image = pipe(
                        prompt,
                        num_inference_steps=cfg.validation_num_inference_steps,
                        guidance_scale=cfg.validation_guidance_scale,
                        height=cfg.resolution,
                        width=cfg.resolution,
                        generator=torch.Generator().manual_seed(cfg.seed),
                    ).images[0]
                save_png(image, folder / f"{index:02d}.png")
                (folder / f"{index:02d}.txt").write_text(prompt + "\n")
                ids = pipe.tokenizer(prompt, truncation=True).input_ids
                present = [t for t in self.scene.tokens if handle_ids[t] in ids]
                if not (cfg.save_attention_maps and store is not None and present):
                    continue
                part = "cond" if cfg.validation_guidance_scale > 1 else "all"
                maps = store.aggregate(part=part, over_steps=True)[0]
                heat = token_attention_maps(maps, [ids.index(handle_ids[t]) for t in present])
                chosen = [masks[self.scene.tokens.index(t)] for t in present]
                grid = mask_vs_attention_grid(
                    image, chosen, heat, present, mask_image=training_image
                )
                save_png(grid, folder / f"{index:02d}-attention.png")
        finally:
            if store is not None:
                store.reset()
                if own_store:
                    store.detach()
            pipe.unet.train(unet_mode)
            pipe.text_encoder.train(te_mode)

    def _class_latents(self, output_dir: Path, accelerator: Any) -> EncodedImages:
        """Class images for prior preservation: generated once, cached as PNG, encoded once."""
        import numpy as np
        from PIL import Image

        cfg = self.config
        folder = Path(cfg.class_images_dir) if cfg.class_images_dir else output_dir / "class_images"
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(folder.glob("*.png"))
        if accelerator.is_main_process and len(existing) < cfg.num_class_images:
            generator = torch.Generator().manual_seed(cfg.seed)
            for index in range(len(existing), cfg.num_class_images):
                with torch.no_grad():
                    image = self.pipeline(
                        cfg.class_prompt,
                        num_inference_steps=cfg.validation_num_inference_steps,
                        height=cfg.resolution,
                        width=cfg.resolution,
                        generator=generator,
                    ).images[0]
                image.save(folder / f"class-{index:04d}.png")
        accelerator.wait_for_everyone()
        files = sorted(folder.glob("*.png"))[: cfg.num_class_images]
        pixels = []
        for file in files:
            image = Image.open(file).convert("RGB").resize((cfg.resolution, cfg.resolution))
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
            pixels.append(array.permute(2, 0, 1))
        return encode_images(self.pipeline.vae, torch.stack(pixels))

    def _write_outputs(self, output_dir: Path, encoded: EncodedImages) -> Path:
        from .bundle import Bundle
        from .fingerprint import base_fingerprint

        cfg = self.config
        pipe = self.pipeline
        tokens = self.scene.tokens
        rows = get_handle_embeddings(pipe.tokenizer, pipe.text_encoder, tokens)
        lora_components: dict[str, Any] = {}
        if cfg.phase2_steps and cfg.phase2 == "lora":
            lora_components["unet"] = lora_metadata(pipe.unet)
            if cfg.train_text_encoder_lora:
                lora_components["text_encoder"] = lora_metadata(pipe.text_encoder)
        weights = (
            lora_state_dict(
                unet=pipe.unet,
                text_encoder=pipe.text_encoder if cfg.train_text_encoder_lora else None,
            )
            if lora_components
            else {}
        )
        areas = self.scene.mask_areas()
        concepts = {
            token: {"initializer": init, "mask_area": round(float(area), 6)}
            for token, init, area in zip(tokens, self.scene.initializer_tokens, areas, strict=True)
        }
        bundle = Bundle(
            handles=rows,
            lora=weights,
            metadata={
                "tokens": tokens,
                "concepts": concepts,
                "base_model": str(self.base_model or ""),
                "base_fingerprint": base_fingerprint(pipe),
                "lora": lora_components,
                "training": cfg.to_dict(),
            },
        )
        if cfg.phase2 == "full" and cfg.phase2_steps:
            pipe.unet.save_pretrained(output_dir / "unet")
        return bundle.save(output_dir / "break_a_scene.safetensors")

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
