"""Measurements that run in their own process (one per configuration, so memory peaks do not mix).

Each ``*_worker(spec)`` takes a JSON-able dict and returns a JSON-able dict; ``run.py`` starts
``python benchmarks/run.py --worker KIND SPEC`` and reads the last line of its output.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any

import torch

# -- memory --------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak memory of this process from a starting point: CUDA allocator or CPU RSS (VmHWM)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_was_reset = False
        self.base = 0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.peak_was_reset = True
        else:
            self.peak_was_reset = reset_peak()
            self.base = (_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return (_status_kib("VmHWM") or 0) * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_times(fn: Any, warmup: int, repeats: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# -- models --------------------------------------------------------------------------------------


def sd15_components(res: int, seed: int = 0) -> dict[str, Any]:
    """SD1.5-sized UNet (860 M, random weights) and a CLIP-L-sized text encoder from configs.

    The tokenizer is the tiny one, so the text encoder's vocabulary is small (the embedding
    matrix is 38 M parameters smaller than CLIP-L's; every layer is CLIP-L's). The VAE is the
    tiny one: the benchmarks time the UNet and text encoder only.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_breakscene.tiny import tiny_components

    parts = tiny_components("sd1", seed=seed, resolution=res)
    tok = parts["tokenizer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts["unet"] = UNet2DConditionModel(cross_attention_dim=768, sample_size=res // 8)
        parts["text_encoder"] = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
    for m in (parts["unet"], parts["text_encoder"]):
        m.eval()
    return parts


def components(model: str, res: int, seed: int = 0) -> dict[str, Any]:
    from diffusers_breakscene.tiny import tiny_components

    return sd15_components(res, seed) if model == "sd15" else tiny_components("sd1", seed, res)


def pipeline(model: str, res: int) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components(model, res), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dtype(name: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)


# -- 1 + 2: one phase-two training step -------------------------------------------------------


def step_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Median phase-two step time and memory of one configuration.

    spec: model (sd15|tiny), res, phase2 (lora|full), captures (list of ours|none|reference),
    warmup, repeats, device, dtype (fp32|fp16|bf16), xformers (bool).
    capture="none" is a plain LoRA DreamBooth step: no store, plain MSE, all concepts in every
    prompt; "ours" and "reference" are full Break-A-Scene steps (union sampling, masked loss,
    cross-attention loss) that differ only in how the attention maps are captured.
    """
    from diffusers import DDPMScheduler
    from reference_capture import ReferenceCaptureStore

    from diffusers_breakscene.attention import AttentionStore
    from diffusers_breakscene.config import BreakASceneConfig
    from diffusers_breakscene.handles import HandleEmbedding, add_handles
    from diffusers_breakscene.lora import add_unet_lora
    from diffusers_breakscene.scene import hflip
    from diffusers_breakscene.step import (
        EncodedImages,
        LossSettings,
        SamplingSettings,
        sample_batch,
        training_step,
    )
    from diffusers_breakscene.tiny import tiny_scene

    device, res = spec.get("device", "cpu"), spec["res"]
    dtype = _dtype(spec.get("dtype", "fp32"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    parts = components(spec["model"], res)
    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    scene = tiny_scene(res)
    pixels, masks = scene.prepare(res)
    _, flipped = hflip(pixels, masks)
    lat = res // 8
    encoded = EncodedImages(
        torch.randn(2, 4, lat, lat),
        torch.full((2, 4, lat, lat), 0.1),
        torch.stack([masks, flipped]),
    )
    del parts
    ids = add_handles(tok, te, scene.tokens, generator=torch.Generator().manual_seed(0))
    handles = HandleEmbedding.install(te, ids)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    handles.handle_weight.requires_grad_(True)
    if spec.get("xformers") and device == "cuda":
        unet.enable_xformers_memory_efficient_attention()
    if spec["phase2"] == "lora":
        if dtype != torch.float32:
            unet.to(dtype=dtype)
        params = add_unet_lora(unet)  # the default: rank 32 on attention + feed-forward
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    unet.to(device)
    te.to(device)
    unet.train()
    te.train()
    trainable = [handles.handle_weight, *params]
    optimizer = torch.optim.AdamW(
        [{"params": [handles.handle_weight], "lr": 1e-4}, {"params": params, "lr": 1e-4}],
        weight_decay=1e-2,
    )
    # AdamW creates its state lazily on the first step: create it now (zero gradients, one
    # optimizer step), so that the state is part of the loaded memory of every configuration
    # and the (costly, for full fine-tuning) first-touch of it is not in any timed step.
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    scaling = 0.18215  # Stable Diffusion's VAE scaling factor (latents here are random)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    # Several captures share one process (and one model). They run interleaved, one step each
    # per round (warm-up rounds first), so drifts of the machine's load hit them alike; every
    # step's memory is measured from the RSS at its start, after freeing the previous step's.
    stores = {"none": lambda: None, "ours": AttentionStore.attach}
    stores["reference"] = ReferenceCaptureStore.attach
    captures = spec["captures"]
    times: dict[str, list[float]] = {c: [] for c in captures}
    peaks: dict[str, list[int]] = {c: [] for c in captures}
    steps: dict[str, list[int]] = {c: [] for c in captures}
    extra: dict[str, dict[str, Any]] = {c: {} for c in captures}
    was_reset = True
    _release()
    loaded = Memory(device)
    loaded.start()  # RSS (or CUDA allocation) with the models, LoRA and optimizer built
    for round_ in range(spec["warmup"] + spec["repeats"]):
        for capture in captures:
            store = stores[capture](unet) if capture != "none" else None
            bas_step = capture != "none"
            sampling = SamplingSettings.from_config(BreakASceneConfig(union_sampling=bas_step))
            batch = sample_batch(scene, encoded, tok, ids, gen, sampling, scaling_factor=scaling)
            _release()
            memory = Memory(device)
            memory.start()
            was_reset = was_reset and memory.peak_was_reset
            _sync(device)
            t0 = time.perf_counter()
            with autocast:
                losses = LossSettings.from_config(BreakASceneConfig(use_masked_loss=bas_step))
                loss, _ = training_step(
                    unet, te, scheduler, batch, gen, losses, attention_store=store
                )  # fmt: skip
            if store is not None:
                extra[capture]["store_bytes"] = store.memory_bytes
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            took = time.perf_counter() - t0
            peak = memory.peak()
            del loss
            if store is not None:
                store.detach()
            peaks[capture].append(peak)
            if round_ >= spec["warmup"]:
                times[capture].append(took)
                steps[capture].append(peak - memory.base)
    return {
        c: {
            "step_time_s": statistics.median(times[c]),
            "step_times_s": times[c],
            "peak_bytes": max(peaks[c]),
            "loaded_bytes": loaded.base,
            "peak_over_loaded_bytes": max(peaks[c]) - loaded.base,
            "step_bytes": max(steps[c]),
            "peak_was_reset": was_reset,
            "trainable_params": sum(p.numel() for p in trainable),
            "unet_params": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n),
            **extra[c],
        }
        for c in captures
    }


def _release() -> None:
    """Give freed memory back to the OS so the next measurement starts from a clean RSS."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- 3 + 4: inference overhead, bundle size, load/unload ----------------------------------------


def _make_bundle(pipe: Any, out_dir: str) -> tuple[Any, str]:
    from diffusers_breakscene.bundle import Bundle
    from diffusers_breakscene.fingerprint import base_fingerprint
    from diffusers_breakscene.lora import (
        ADAPTER_NAME,
        add_unet_lora,
        lora_metadata,
        lora_state_dict,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_unet_lora(pipe.unet)  # default config: rank 32, attention + feed-forward
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # a trained LoRA is not zero: make the fused weights change
                p.data.normal_(0.0, 1e-3)
    lora = lora_state_dict(unet=pipe.unet)
    meta = {"unet": lora_metadata(pipe.unet)}
    pipe.unet.delete_adapters(ADAPTER_NAME)
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    bundle = Bundle(
        handles={"<asset0>": torch.randn(1, dim), "<asset1>": torch.randn(1, dim)},
        lora=lora,
        metadata={
            "base_model": "benchmark",
            "base_fingerprint": base_fingerprint(pipe),
            "lora": meta,
        },
    )
    path = bundle.save(os.path.join(out_dir, "break_a_scene.safetensors"))  # fp16 LoRA
    return Bundle.load(path), str(path)


def inference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-step UNet time (CFG batch 2): base, bundle unfused, bundle fused, idle AttentionStore.

    The four states are measured in interleaved rounds (base, unfused, fused, store, base, ...)
    so slow drifts of the machine's load hit all of them alike; load/unload times are taken
    from the same rounds.
    """
    import tempfile

    import diffusers_breakscene  # noqa: F401  (registers pipe.load_break_a_scene)
    from diffusers_breakscene.attention import AttentionStore

    device, res = spec.get("device", "cpu"), spec["res"]
    dtype = _dtype(spec.get("dtype", "fp32"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    pipe = pipeline(spec["model"], res)
    tmp = tempfile.mkdtemp()
    bundle, path = _make_bundle(pipe, tmp)
    pipe.to(device, dtype)
    if spec.get("xformers") and device == "cuda":
        pipe.enable_xformers_memory_efficient_attention()
    lat = res // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    dim = pipe.unet.config.cross_attention_dim
    text = torch.randn(2, 77, dim, generator=g).to(device, dtype)

    def forward() -> None:
        with torch.no_grad():
            pipe.unet(sample, 500, encoder_hidden_states=text)

    times: dict[str, list[float]] = {"base": [], "unfused": [], "fused": [], "store": []}
    loads: dict[str, list[float]] = {"load_unfused": [], "load_fused": [], "unload": []}
    warm, reps = spec["warmup"], spec["repeats"]

    def timed(fn: Any) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    forward()  # warm-up
    # A freshly built UNet is not the state that unloading returns to (issue 14: it ran slower
    # than the same UNet after one load/unload cycle, on the CPU). So the fresh state is timed
    # once, on its own, and then one untimed load/unload cycle puts the pipeline in the state
    # every later "base" round starts from: rounds of base/unfused/fused/store from there.
    fresh = _median_times(forward, warm, reps, device)
    pipe.load_break_a_scene(bundle)
    pipe.unload_break_a_scene()
    for _ in range(spec["rounds"]):
        times["base"] += _median_times(forward, warm, reps, device)
        for fused in (False, True):
            key = "fused" if fused else "unfused"
            loads[f"load_{key}"].append(
                timed(lambda f=fused: pipe.load_break_a_scene(bundle, fuse=f))
            )
            times[key] += _median_times(forward, warm, reps, device)
            loads["unload"].append(timed(pipe.unload_break_a_scene))
        store = AttentionStore.attach(pipe.unet)
        times["store"] += _median_times(forward, warm, reps, device)
        store.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "unet_step_s": med,
        "unet_step_times_s": times,
        "fresh_base_step_s": statistics.median(fresh),
        "load_s": {k: statistics.median(v) for k, v in loads.items()},
        "load_from_file_s": timed(lambda: pipe.load_break_a_scene(path)),
        "bundle_bytes": os.path.getsize(path),
        "bundle_lora_tensors": len(bundle.lora),
        "bundle_lora_params": sum(t.numel() for t in bundle.lora.values()),
    }


def sd21_base_pipeline_bytes() -> dict[str, Any]:
    """Size of stable-diffusion-2-1-base in fp32, from parameter counts (models built on 'meta')."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=512,
            )
        )
    counts = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te))
    }
    return {"params": counts, "bytes_fp32": 4 * sum(counts.values())}


WORKERS = {"step": step_worker, "inference": inference_worker}
