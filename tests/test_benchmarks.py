"""The benchmark harness runs end to end in its smoke mode (tiny models) and writes its report.

No timing is asserted: only that every key of the issue's list is there, numeric, and that the
markdown table names each one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from background import BACKGROUND

REPO = Path(__file__).resolve().parents[1]
KEYS = [
    "lora_vs_full_step_time",
    "lora_vs_full_peak_memory",
    "bas_vs_plain_lora_step_time",
    "reference_capture_vs_ours_step_time",
    "reference_capture_vs_ours_step_memory",
    "fused_inference_vs_base",
    "unfused_inference_vs_base",
    "bundle_vs_full_pipeline_size",
    "alignment_iou_with_attention_loss",
    "alignment_iou_without_attention_loss",
    "lora_vs_full_loss_reduction",
]


@pytest.mark.slow
def test_smoke_run_writes_json_and_markdown():
    BACKGROUND.stdout("smoke")  # run beside the other tests (background.py)
    tmp_path = BACKGROUND.root / "smoke"
    data = json.loads((tmp_path / "smoke.json").read_text())
    for key in KEYS:
        assert isinstance(data[key], float | int), key
        assert math.isfinite(data[key]) or "loss_reduction" in key, key
    machine = data["machine"]
    assert {"cpu_count", "torch", "device", "date"} <= machine.keys()
    assert len(data["load_average_start"]) == 3 and len(data["load_average_end"]) == 3
    assert set(KEYS) <= data["targets_met"].keys()
    table = (tmp_path / "smoke.md").read_text()
    assert all(f"| {key} |" in table for key in KEYS)
    # The SDXL rows ran with and without gradient checkpointing (what --sdxl-gpu measures).
    steps = data["details"]["steps"]
    assert steps["sdxl_gc_lora_ours_64px_fp32"]["spec"]["gradient_checkpointing"] is True
    assert steps["sdxl_lora_ours_64px_fp32"]["spec"]["gradient_checkpointing"] is False
    assert data["sdxl_gc_lora_step_time_s"] > 0
    # Full fine-tuning of the tiny SDXL UNet fits this machine: its row ran, with its ratios.
    full = data["sdxl_full_fine_tuning"]
    assert full["fits"] and full["run"] and "sdxl_full_ours_64px_fp32" in steps
    assert full["unet_params"] == steps["sdxl_full_ours_64px_fp32"]["unet_params"]
    assert 0 < data["sdxl_lora_vs_full_peak_memory"] < 1.5
    assert "| sdxl_lora_vs_full_peak_memory |" in table
    assert "| sdxl_gc_lora_ours_64px_fp32 |" in table
    row = next(line for line in table.splitlines() if line.startswith("| sdxl_lora_ours_64px"))
    low, high = (float(x) for x in row.split("|")[3].split(" - "))
    times = steps["sdxl_lora_ours_64px_fp32"]["step_times_s"]
    assert (low, high) == (round(min(times), 3), round(max(times), 3))


def test_sdxl_gpu_mode_refuses_the_cpu_before_measuring(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--sdxl-gpu", "--device", "cpu",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--sdxl-gpu" in result.stderr and "run --sdxl" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_startup_writes_json_and_markdown(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cli_startup.py"), "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "cli_startup.json").read_text())
    rows = data["commands"]
    assert {"help", "train_help", "usage_error", "config_error", "eager_help"} <= rows.keys()
    assert all(row["median_s"] > 0 for row in rows.values())
    assert rows["help_torch_check"]["torch_imported"] is False
    assert rows["eager_help"]["torch_imported"] is True
    assert "| breakscene --help (`help`) |" in (tmp_path / "cli_startup.md").read_text()


@pytest.mark.slow
def test_gpu_check_smoke_writes_its_report():
    BACKGROUND.stdout("gpu_check")
    tmp_path = BACKGROUND.root / "gpu_check"
    data = json.loads((tmp_path / "gpu_check-smoke.json").read_text())
    labels = [row["label"] for row in data["training"]]
    # every precision on CUDA; on the CPU the smoke run trains fp32 only (fp16 is refused
    # there, bf16 is slow there and tested in test_trainer.py)
    cuda = data["machine"]["device"] == "cuda"
    assert labels == (["fp32", "bf16", "fp16", "fp16 + grad. checkpointing"] if cuda else ["fp32"])
    for row in data["training"]:
        assert row["steps"] == 4 and 0.0 <= row["prompt_accuracy_1"] <= 1.0
        assert math.isfinite(row["identity_1"]) and math.isfinite(row["identity_2"])
    inference = data["inference"]
    assert inference["all_finite"] and inference["unloaded_vs_base_max_abs"] == 0.0
    assert inference["handle_changes_image"] > 0.0
    assert "| fp32 |" in (tmp_path / "gpu_check-smoke.md").read_text()


@pytest.mark.slow
def test_run_one_section_only():
    BACKGROUND.stdout("smoke_inference")
    tmp_path = BACKGROUND.root / "smoke_inference"
    data = json.loads((tmp_path / "smoke-inference.json").read_text())
    assert "steps" not in data["details"] and "alignment" not in data["details"]
    assert data["fresh_vs_cycled_base_inference"] > 0
    assert data["targets_met"]["fused_inference_vs_base"] in (True, False)
    assert data["targets_met"]["lora_vs_full_step_time"] is None


def test_sdxl_sized_models_are_built_where_they_are_measured():
    # On CUDA the step worker builds SDXL's 3.3 G parameters on the GPU (seconds, not minutes on
    # one CPU thread); the "meta" device checks the same path here without the memory.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import workers

    parts = workers.components("sdxl", 64, device="meta")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert {p.device.type for p in parts[name].parameters()} == {"meta"}, name
    assert sum(p.numel() for p in parts["unet"].parameters()) == workers.sdxl_unet_params()
    assert parts["text_encoder_2"].config.hidden_size == 1280
    assert parts["vae"].device.type == "cpu"  # the tiny VAE: latents are drawn, not encoded


def test_sdxl_full_fine_tuning_runs_only_where_it_fits_and_a_failure_is_reported(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run

    real = run.sdxl_full_fine_tuning("cpu", "sdxl")
    assert real["unet_params"] == 2_567_463_684 and real["bytes_needed"] == 16 * 2_567_463_684
    assert real["fits"] == (real["memory_bytes"] >= run.FULL_FIT_FACTOR * real["bytes_needed"])

    def row(seconds):
        return {"step_time_s": seconds, "peak_bytes": 10, "peak_over_loaded_bytes": 5,
                "step_bytes": 5}  # fmt: skip

    def fake_step_rows(model, res, dtypes, phases, repeats, device, prefix="", extra=None):
        if "full" in phases:
            raise RuntimeError("worker step failed:\ntorch.OutOfMemoryError: CUDA out of memory")
        return {f"{prefix}lora_{c}_64px_fp32": row(1.0) for c in phases["lora"]}

    monkeypatch.setattr(run, "step_rows", fake_step_rows)
    results: dict = {"details": {}}
    mode = {"sdxl": {"model": "tiny-sdxl", "res": 64, "repeats": (1, 1), "full": (1, 1)}}
    run.sdxl_section(mode, "cpu", results)
    full = results["sdxl_full_fine_tuning"]
    assert full["fits"] and not full["run"]
    assert full["why"] == "tried and failed: torch.OutOfMemoryError: CUDA out of memory"
    assert "sdxl_lora_vs_full_step_time" not in results  # no full row, no ratio
    assert results["sdxl_bas_vs_plain_lora_step_time"] == 1.0
