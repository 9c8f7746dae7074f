"""``import diffusers_breakscene`` and ``breakscene --help`` stay cheap (issue 13), and the
public names and the pipeline methods still arrive exactly as before.

Each check runs in a fresh interpreter (``sys.modules`` of the test process already holds
torch). No wall-clock time is asserted: what is checked is which modules got imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import diffusers_breakscene

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned decoded."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOADED = f"json.dumps({{m: m in sys.modules for m in {HEAVY!r}}})"


def test_building_the_parser_and_help_import_no_torch():
    code = f"""
import contextlib, io, json, sys
import diffusers_breakscene.cli as cli
cli.build_parser()
for argv in (["--help"], ["train", "--help"], ["train", "--phase1-steps", "x"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:
            pass
print({LOADED})
"""
    loaded = _run(code)
    assert loaded == dict.fromkeys(HEAVY, False), loaded


def test_importing_the_package_and_its_config_imports_no_torch():
    code = f"""
import json, sys
import diffusers_breakscene as bas
from diffusers_breakscene import BreakASceneConfig, InvalidConfigError
from diffusers_breakscene.config_schema import field_specs
BreakASceneConfig(phase1_steps=2)
field_specs(BreakASceneConfig)
print({LOADED})
"""
    assert _run(code) == dict.fromkeys(HEAVY, False)


@pytest.mark.slow  # imports the whole library in a subprocess
def test_every_public_name_is_importable_as_before():
    names = ", ".join(diffusers_breakscene.__all__)
    code = f"""
import json
from diffusers_breakscene import {names}
import diffusers_breakscene as bas
print(json.dumps({{n: getattr(bas, n) is not None for n in bas.__all__}}))
"""
    assert _run(code) == dict.fromkeys(diffusers_breakscene.__all__, True)


@pytest.mark.slow  # imports diffusers in a subprocess
@pytest.mark.parametrize(
    "code",
    [
        # ours first, then a stock pipeline class (the hook registers when diffusers loads it)
        "import diffusers_breakscene\nfrom diffusers import StableDiffusionPipeline as P",
        # diffusers' pipelines already loaded: registered at import
        "from diffusers import StableDiffusionPipeline as P\nimport diffusers_breakscene",
        # only the top-level diffusers package loaded before
        "import diffusers\nimport diffusers_breakscene\nP = diffusers.StableDiffusionPipeline",
    ],
    ids=["ours-first", "diffusers-first", "diffusers-package-first"],
)
def test_pipelines_get_the_methods_whatever_the_import_order(code):
    check = f"""
import json, warnings
warnings.simplefilter("error", RuntimeWarning)
{code}
from diffusers import DiffusionPipeline
from diffusers_breakscene import BreakAScenePipelineMixin as M
print(json.dumps({{
    "same": DiffusionPipeline.load_break_a_scene is M.load_break_a_scene,
    "unload": hasattr(P, "unload_break_a_scene"),
    "adapters": isinstance(P.__dict__.get("break_a_scene_adapters")
                           or DiffusionPipeline.break_a_scene_adapters, property),
}}))
"""
    assert _run(check) == {"same": True, "unload": True, "adapters": True}


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        diffusers_breakscene.Nope  # noqa: B018
    assert "BreakASceneTrainer" in dir(diffusers_breakscene)
