"""The documentation stays true to the code: CLI flags, config fields, API pages, nav."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from diffusers_breakscene.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_cli_reference_names_every_subcommand_and_flag():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name, parser in subcommands().items():
        assert f"## {name}\n" in text, f"docs/cli.md lacks a section for `breakscene {name}`"
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        shown = {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}
        for action in parser._actions:
            if action.help is argparse.SUPPRESS and action.dest not in ("quiet", "debug"):
                # a hidden diffusers-style alias (--lora_rank): its visible flag is listed
                assert action.dest in shown, (name, action.option_strings)
                continue
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section or flag in section, (
                        f"docs/cli.md: `breakscene {name}` lacks {flag}; regenerate it with "
                        "python docs/gen_cli.py > docs/cli.md"
                    )
        assert "SUPPRESS" not in section, name
    assert "`--underscored_flag`" in text  # the header states the hidden aliases' rule once


def test_cli_reference_is_generated_from_the_current_parser():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = module.generate()
    # Compare without whitespace: argparse's line wrapping differs between Python versions.
    squash = lambda text: re.sub(r"\s+", " ", text)  # noqa: E731
    assert squash(generated) == squash((DOCS / "cli.md").read_text(encoding="utf-8")), (
        "docs/cli.md is out of date: python docs/gen_cli.py > docs/cli.md"
    )


def test_training_guide_lists_every_config_field_with_its_default():
    from diffusers_breakscene import BreakASceneConfig

    text = (DOCS / "training.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(BreakASceneConfig):
        row = next((line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")), "")
        assert row, f"docs/training.md has no table row for {f.name}"
        assert f"`{f.default!r}`" in row, f"docs/training.md: wrong default for {f.name}"


@pytest.mark.parametrize(
    "name",
    ["Scene", "BreakASceneConfig", "BreakASceneTrainer", "Bundle", "BreakAScenePipelineMixin",
     "AttentionStore"],
)  # fmt: skip
def test_public_classes_have_an_api_page(name):
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    assert f"::: diffusers_breakscene.{name}\n" in pages


def test_every_nav_page_exists_or_belongs_to_another_author():
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    assert "benchmarks.md" in nav and "reliability.md" in nav
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert set(missing) <= {"benchmarks.md", "reliability.md"}, missing


def test_docs_mention_the_readme_commands():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = "python -m pytest -q -n 2"
    assert "breakscene demo" in index and command in index and command in readme
    assert "python3 -m pytest -q -n 2\n" in ci  # CI runs the README's test command


@pytest.mark.parametrize(
    "module", ["world", "model", "experiment", "prompt_check", "attention_check"]
)
def test_toy_api_page_lists_every_public_function_and_class(module):
    import importlib
    import inspect

    mod = importlib.import_module(f"diffusers_breakscene.toy.{module}")
    page = (DOCS / "api" / "toy.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+- (\w+)$", page, re.MULTILINE)) | set(
        re.findall(r"^::: diffusers_breakscene\.toy\.\w+\.(\w+)$", page, re.MULTILINE)
    )
    objects = {name: getattr(mod, name) for name in mod.__all__}
    public = [n for n, o in objects.items() if inspect.isfunction(o) or inspect.isclass(o)]
    assert public and not set(public) - listed, sorted(set(public) - listed)
