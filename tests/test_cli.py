"""The ``breakscene`` command, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from diffusers import StableDiffusionPipeline

from diffusers_breakscene.cli import main


def test_tiny_model_saves_a_loadable_pipeline(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny"), "--family", "sd2"]) == 0
    assert "sd2" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_errors_are_one_line_and_exit_non_zero(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_breakscene.cli", "tiny-model", str(blocker / "sub")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("breakscene tiny-model: error:")


def test_help_shows_examples(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    assert "examples:" in capsys.readouterr().out
