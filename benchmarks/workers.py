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


#: SDXL-base's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2.57 G params.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "layers_per_block": 2,
}


def sdxl_unet_params() -> int:
    """Parameter count of SDXL-base's UNet, built on the ``meta`` device (no memory, < 1 s)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return sum(p.numel() for p in unet.parameters())


def tiny_unet_params(family: str = "sdxl") -> int:
    """Parameter count of the tiny pipeline's UNet of ``family`` (tiny.py's; built in a blink)."""
    from diffusers_breakscene.tiny import tiny_components

    return sum(p.numel() for p in tiny_components(family)["unet"].parameters())


def sdxl_components(res: int, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """SDXL-base-sized UNet and text encoders (random weights, built from configs).

    UNet: :data:`SDXL_UNET_CONFIG` (2.57 G parameters, 10.3 GB in fp32). Text encoders: CLIP-L
    (width 768, 12 layers) and OpenCLIP-bigG (width 1280, 32 layers, projection 1280), both with
    the tiny tokenizers' vocabulary (every layer is SDXL's; the embedding matrices are smaller).
    The tokenizers, the scheduler and the VAE (its config carries SDXL's scaling factor) are the
    tiny SDXL pipeline's: latents are drawn directly. Built with the ordinary initialisation,
    which on one CPU thread takes longer than building SD1.5's (3.3 G parameters to fill); the
    step worker times nothing of it. With ``device="cuda"`` the big models are built (and their
    random weights drawn) on the GPU: seconds instead of minutes, the same layers and sizes.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusers_breakscene.tiny import tiny_components

    parts = tiny_components("sdxl", seed=seed, resolution=res)

    def text_config(width: int, layers: int, heads: int, act: str) -> Any:
        tok = parts["tokenizer"]
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
            hidden_act=act, projection_dim=width, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip

    # Drop the tiny models first, so that their memory is not held while the big ones are built.
    for name in ("unet", "text_encoder", "text_encoder_2"):
        del parts[name]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts["unet"] = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        parts["text_encoder"] = CLIPTextModel(text_config(768, 12, 12, "quick_gelu"))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config(1280, 32, 20, "gelu"))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        parts[name].eval()
    return parts


def components(model: str, res: int, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Components of ``model``: sd15 / sdxl (real sizes), tiny / tiny-sdxl (tiny.py's).

    ``device``: where the SDXL-sized models are built (the others are built on the CPU).
    """
    from diffusers_breakscene.tiny import tiny_components

    if model == "sd15":
        return sd15_components(res, seed)
    if model == "sdxl":
        return sdxl_components(res, seed, device)
    return tiny_components("sdxl" if model == "tiny-sdxl" else "sd1", seed, res)


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

    spec: model (sd15|sdxl|tiny|tiny-sdxl), res, phase2 (lora|full), captures (list of
    ours|none|reference), warmup, repeats, device, dtype (fp32|fp16|bf16), xformers (bool),
    gradient_checkpointing (bool, default false: the UNet's, as ``gradient_checkpointing=True``).
    capture="none" is a plain LoRA DreamBooth step: no store, plain MSE, all concepts in every
    prompt; "ours" and "reference" are full Break-A-Scene steps (union sampling, masked loss,
    cross-attention loss) that differ only in how the attention maps are captured. SDXL models
    are conditioned as SDXL trains (both text encoders, pooled text and time ids), with handles
    in both encoders, as ``BreakASceneTrainer`` does.
    """
    from diffusers import DDPMScheduler
    from reference_capture import ReferenceCaptureStore

    from diffusers_breakscene.attention import AttentionStore
    from diffusers_breakscene.conditioning import crop_time_ids, time_ids
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
    parts = components(spec["model"], res, device=device)
    unet = parts["unet"]
    # (tokenizer, text encoder) pairs: one for SD1.5, two for SDXL.
    text = [(parts["tokenizer"], parts["text_encoder"])]
    if "text_encoder_2" in parts:
        text.append((parts["tokenizer_2"], parts["text_encoder_2"]))
    sdxl = len(text) == 2
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    scaling = parts["vae"].config.scaling_factor  # SD1.5: 0.18215, SDXL: 0.13025
    scene = tiny_scene(res)
    pixels, masks = scene.prepare(res)
    _, flipped = hflip(pixels, masks)
    lat = res // 8
    encoded = EncodedImages(
        torch.randn(2, 4, lat, lat),
        torch.full((2, 4, lat, lat), 0.1),
        torch.stack([masks, flipped]),
    )
    if sdxl:  # the whole picture, uncropped, and its mirror image
        window = ((res, res), (res, res), (0, 0))
        encoded.time_ids = time_ids([crop_time_ids(*window, res, flipped=f) for f in (False, True)])
    del parts
    unet.requires_grad_(False)
    handle_ids, handle_weights = [], []
    for tok, te in text:
        ids = add_handles(tok, te, scene.tokens, generator=torch.Generator().manual_seed(0))
        handle_ids.append(ids)
        weight = HandleEmbedding.install(te, ids).handle_weight  # freezes the rest of te
        weight.requires_grad_(True)
        handle_weights.append(weight)
    if spec.get("xformers") and device == "cuda":
        unet.enable_xformers_memory_efficient_attention()
    if spec.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    if spec["phase2"] == "lora":
        if dtype != torch.float32:
            unet.to(dtype=dtype)
        params = add_unet_lora(unet)  # the default LoRA (BreakASceneConfig's rank and layers)
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    for model in (unet, *(te for _, te in text)):
        model.to(device)
        model.train()
    trainable = [*handle_weights, *params]
    optimizer = torch.optim.AdamW(
        [{"params": handle_weights, "lr": 1e-4}, {"params": params, "lr": 1e-4}],
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
            batch = sample_batch(
                scene, encoded, text[0][0], handle_ids[0], gen, sampling,
                scaling_factor=scaling, tokenizer_2=text[1][0] if sdxl else None,
            )  # fmt: skip
            _release()
            memory = Memory(device)
            memory.start()
            was_reset = was_reset and memory.peak_was_reset
            _sync(device)
            t0 = time.perf_counter()
            with autocast:
                losses = LossSettings.from_config(BreakASceneConfig(use_masked_loss=bas_step))
                loss, _ = training_step(
                    unet, text[0][1], scheduler, batch, gen, losses, attention_store=store,
                    text_encoder_2=text[1][1] if sdxl else None,
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
            "text_encoder_params": sum(
                p.numel() for _, te in text for n, p in te.named_parameters() if "handle" not in n
            ),
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
        add_unet_lora(pipe.unet)  # the default LoRA (BreakASceneConfig's rank and layers)
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


def _minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel had to map and zero)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


#: Inference states, in the order of the first timed round (later rounds rotate it).
STATES = ("base", "unfused", "fused", "store")


def inference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-step UNet time (CFG batch 2): base, bundle unfused, bundle fused, idle AttentionStore.

    Every state is timed from the same starting point and no state owns the first or the last
    place of a round (issue 14). Before anything is timed the pipeline goes once through all
    four states (one untimed round: load unfused, unload, load fused, unload, attach, detach,
    one forward in each), so first-call and allocation effects of any code path are spent before
    round one. The timed rounds then rotate the order (round r starts at state r mod 4), so
    slow drifts of the machine's load and whatever one state leaves behind for the next do
    not always fall on the same state. Load/unload times come from the timed rounds. The
    fresh UNet (built, one forward) is timed once before all of this, on its own
    (``fresh_base_step_s``). Minor page faults per forward are recorded for every state: on
    the CPU they show whether a state's memory behaves differently (docs/benchmarks.md).
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

    times: dict[str, list[float]] = {state: [] for state in STATES}
    faults: dict[str, list[float]] = {state: [] for state in STATES}
    loads: dict[str, list[float]] = {"load_unfused": [], "load_fused": [], "unload": []}
    warm, reps = spec["warmup"], spec["repeats"]
    stores: list[Any] = []

    def timed(fn: Any) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    def enter(state: str, record: bool) -> None:
        if state in ("unfused", "fused"):
            took = timed(lambda: pipe.load_break_a_scene(bundle, fuse=state == "fused"))
            if record:
                loads[f"load_{state}"].append(took)
        elif state == "store":
            stores.append(AttentionStore.attach(pipe.unet))

    def leave(state: str, record: bool) -> None:
        if state in ("unfused", "fused"):
            took = timed(pipe.unload_break_a_scene)
            if record:
                loads["unload"].append(took)
        elif state == "store":
            stores.pop().detach()

    def measure(state: str) -> list[float]:
        start = _minor_faults()
        took = _median_times(forward, warm, reps, device)
        faults[state].append((_minor_faults() - start) / (warm + reps))
        return took

    forward()  # the first forward of the fresh UNet, untimed
    fresh_faults = _minor_faults()
    fresh = _median_times(forward, warm, reps, device)
    fresh_faults = (_minor_faults() - fresh_faults) / (warm + reps)
    for state in STATES:  # the untimed round through every state and its code paths
        enter(state, record=False)
        forward()
        leave(state, record=False)
    for round_ in range(spec["rounds"]):
        shift = round_ % len(STATES)
        for state in STATES[shift:] + STATES[:shift]:
            enter(state, record=True)
            times[state] += measure(state)
            leave(state, record=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "unet_step_s": med,
        "unet_step_times_s": times,
        "fresh_base_step_s": statistics.median(fresh),
        "fresh_base_step_times_s": fresh,
        "minor_faults_per_forward": {
            "fresh": fresh_faults,
            **{k: statistics.median(v) for k, v in faults.items()},
        },
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
