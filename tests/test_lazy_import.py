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


IMPORT_ORDERS = {
    # ours first, then a stock pipeline class (the hook registers when diffusers loads it)
    "ours-first": "import diffusers_breakscene\nfrom diffusers import StableDiffusionPipeline as P",
    # diffusers' pipelines already loaded: registered at import
    "diffusers-first": (
        "from diffusers import StableDiffusionPipeline as P\nimport diffusers_breakscene"
    ),
    # only the top-level diffusers package loaded before
    "diffusers-package-first": (
        "import diffusers\nimport diffusers_breakscene\nP = diffusers.StableDiffusionPipeline"
    ),
}
CHECK = """
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


@pytest.mark.slow  # imports diffusers in subprocesses
def test_pipelines_get_the_methods_whatever_the_import_order():
    # the three fresh interpreters run side by side (each mostly waits on imports)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", CHECK.format(code=code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, code in IMPORT_ORDERS.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-3000:])
        got = json.loads(out.strip().splitlines()[-1])
        assert got == {"same": True, "unload": True, "adapters": True}, name


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        diffusers_breakscene.Nope  # noqa: B018
    assert "BreakASceneTrainer" in dir(diffusers_breakscene)


@pytest.mark.slow  # a fresh interpreter
def test_quiet_refuses_bad_settings_before_diffusers_loads():
    code = f"""
import contextlib, io, json, sys
from diffusers_breakscene.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["train", "--scene-dir", "s", "--output", "o", "--phase1-steps", "-1", "--quiet"])
loaded = json.loads({LOADED})
print(json.dumps({{"rc": rc, "said": "phase1_steps" in err.getvalue(), "loaded": loaded}}))
"""
    got = _run(code)
    assert got["rc"] == 1 and got["said"]
    assert got["loaded"] == dict.fromkeys(HEAVY, False)


def test_after_import_runs_now_or_when_the_module_loads(tmp_path, monkeypatch):
    from diffusers_breakscene.import_hooks import after_import, cancel

    (tmp_path / "late_module.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    after_import("late_module", lambda m: seen.append(m.VALUE + 1))
    after_import("late_module", lambda m: seen.append(m.VALUE + 2))
    dropped = seen.append
    after_import("late_module", dropped)
    cancel("late_module", dropped)
    assert seen == []
    import late_module  # noqa: F401

    assert seen == [42, 43]
    after_import("late_module", lambda m: seen.append(0))  # already loaded: at once
    assert seen == [42, 43, 0]
    monkeypatch.delitem(sys.modules, "late_module")
