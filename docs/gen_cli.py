"""Generate docs/cli.md from the ``breakscene`` argument parser.

    python docs/gen_cli.py > docs/cli.md

tests/test_docs.py checks that docs/cli.md names every subcommand and flag.
"""

from __future__ import annotations

import argparse
import os
import re

os.environ["COLUMNS"] = "80"  # argparse wraps usage lines at the terminal width

from diffusers_breakscene.cli import build_parser

NOTES = {
    "demo": (
        "By default it learns the two objects of one of the toy world's evaluation scenes with"
        " the built-in toy model (64 px, 400 + 400 steps), saves the bundle, generates four"
        " images of them in new settings and together, an attention picture and an overview"
        " beside the input, all under `--output`, and prints the toy evaluator's identity"
        " similarity and prompt accuracy. With `--model tiny-sd1` (or `tiny-sd2`, `tiny-sdxl`)"
        " it draws a scene (a red ball and a blue box) and trains 50 steps per phase at 256 px"
        " on random weights; on a real model the `BreakASceneConfig` defaults apply (400 + 400"
        " steps, 512 px)."
    ),
    "generate": (
        "Writes `OUTPUT/00.png`, `01.png`, ... one per `--prompt`, with seeds `--seed`, "
        "`--seed + 1`, .... `--scale` and `--token-prefix` are given once (for every "
        "`--bundle`) or once per `--bundle`, in order. Two bundles whose tokens collide (both "
        "`<asset0>`) need a prefix on one of them: `--bundle a --bundle b --token-prefix '' "
        "--token-prefix s2_` makes the second one's tokens `<s2_asset0>`, ... "
        "([Loading bundles](loading.md#several-bundles-and-token-prefixes))."
    ),
    "inspect": (
        "Prints the size, format version, library version, base model, tokens (with their "
        "embedding shape, initializer and mask area), the base fingerprint and the LoRA "
        "settings. With `--model`, also loads that pipeline and runs "
        "`Bundle.check_compatible`; exit code 1 and the differing numbers when it does not "
        "fit."
    ),
    "export": (
        "`--format diffusers` (default) writes `pytorch_lora_weights.safetensors` (when the "
        "bundle has a LoRA) and `break_a_scene_emb.safetensors` into `directory` and prints a "
        "stock-diffusers loading snippet. `--format kohya` writes a kohya-keyed "
        "`break_a_scene.safetensors` LoRA and one embedding file per handle named after it "
        "(`asset0.safetensors`), for AUTOMATIC1111, SD.Next, ComfyUI and kohya; `--format "
        "a1111` writes the LoRA alone with the embeddings bundled inside. Both print where the "
        "files go and a prompt; see [Interop](interop.md#automatic1111-sdnext-comfyui-kohya)."
    ),
    "push": (
        "Uploads, in one commit, the bundle, the stock diffusers files "
        "(`pytorch_lora_weights.safetensors`, `break_a_scene_emb.safetensors`), "
        "`training_config.json`, the `--preview` image and a model card whose usage section "
        "shows the plugin way and the stock diffusers way. A `README.md` on the Hub that was "
        "edited after this library wrote it is kept unless `--overwrite-readme`. "
        "`--local-dir DIR` writes the same files into `DIR` and uploads nothing; see "
        "[Sharing on the Hub](interop.md#sharing-on-the-hub)."
    ),
    "attention": (
        "Generates the prompt once with an `AttentionStore` attached and writes `--output` "
        "(one row per handle: its training mask with `--scene-dir`, beside its attention over"
        " the image) and the image itself as `<output>.image.png`; see [Attention "
        "maps](attention.md)."
    ),
    "train": (
        "Give the scene as `--scene-dir DIR` (`img.*` + `mask*.png`, see [Making "
        "masks](masks.md); or one subfolder per image of the same objects, see [Datasets of "
        "scenes](datasets.md)) or as `--image IMG` with one `--mask` per object, in order. "
        "`--token` and `--initializer` give one value per mask. Writes "
        "`OUTPUT/break_a_scene.safetensors`. `--revision`, `--variant` and `--cache-dir` go to "
        "`from_pretrained` of a Hub `--model`; `--push-to-hub --hub-model-id user/name` uploads "
        "the bundle afterwards as `breakscene push` does (with the last validation picture as "
        "its preview). Under `accelerate launch` / `torchrun` it trains"
        " data parallel ([Training](training.md#several-gpus))."
    ),
    "masks": (
        "Proposes one mask per object and writes `--output` as a scene folder (`img.png`, "
        "`mask0.png`, ..., `scene.json` with an initializer word per mask, `preview.png`). "
        "`--words` takes one phrase per object and uses `--model`'s own cross-attention (no "
        "extra weights); `--point X Y` or `--box X0 Y0 X1 Y1`, once per object, use Segment "
        "Anything (`--sam-model`, with `--label` names). A folder that already holds an image "
        "or masks is refused. See [Making masks](masks.md#proposed-masks-breakscene-masks)."
    ),
    "evaluate": (
        "Scores images generated with a scene's handles the paper's way: each handle in a "
        "prompt is replaced by its object's words, then prompt similarity (CLIP, or the toy "
        "evaluator's prompt accuracy) and identity similarity (DINO on masked object crops, or "
        "the toy evaluator's embeddings) are taken. The images come from `--images` (each "
        "`NAME.png` with its prompt in `NAME.txt`) or are generated from `--bundle` with "
        "`--prompt` (written to `OUTPUT/images/`). Writes `OUTPUT/report.json` and "
        "`report.md`. See [Evaluating](evaluate.md)."
    ),
    "studio": (
        "Serves a local web page (Gradio; `pip install 'diffusers-breakscene[studio]'`) from "
        "photo to bundle: upload a photo, propose a mask per object from words, correct the "
        "masks with a brush, name the handles, train with a progress bar and live validation "
        "pictures, generate, download the bundle or load one back. Each run is written to "
        "`--output/run-N/` (scene folder, validation pictures, bundle). Serves on "
        "`127.0.0.1` until Ctrl+C. See [The studio](studio.md)."
    ),
    "train-many": (
        "Trains every subfolder of `SCENES_DIR` (a scene folder in either layout of [Datasets "
        "of scenes](datasets.md), with an optional `scene.json` for its words) from a fresh "
        "`--model` into `OUTPUT/<scene>/`, with the same settings (every `train` setting flag "
        "and `--config`). Finished scenes are skipped and an interrupted one resumes from its "
        "latest checkpoint, so the same command finishes an interrupted run; a failing scene "
        "is recorded (`OUTPUT/<scene>/error.txt`) and the others go on; exit 1 names the failed "
        "scenes. Writes `OUTPUT/summary.md` and `summary.json` (steps, time, final losses, and "
        "the toy evaluator's identity with `--model toy`). Under `torchrun` / `accelerate "
        "launch` the scenes are spread over the processes, each training whole scenes."
    ),
    "tiny-model": (
        "Saves the built-in tiny pipeline with `save_pretrained`, so it can be used like any "
        "local model folder (`--model ./tiny-sd1`, "
        "`StableDiffusionPipeline.from_pretrained(path, local_files_only=True)`). `sd1` is "
        "epsilon-prediction, `sd2` v-prediction with linear projections."
    ),
}

HEADER = """\
The `breakscene` command is installed with the package (`python -m diffusers_breakscene.cli`
runs the same). Every subcommand accepts `--quiet` (print nothing on success) and `--debug`
(show the full traceback on errors). Exit codes: 0 success, 1 error (one line
`breakscene <command>: error: ...` on stderr), 2 usage error. `breakscene --version` prints
the version.

List flags take one or more values and may be repeated: `--mask m0.png --mask m1.png` and
`--mask m0.png m1.png` are the same (`--initializer`, `--token`, `--prompt`, `--bundle`,
`--scale`, `--token-prefix` and the list settings such as `--lora-target-modules` alike).
`breakscene train` and `train-many` also accept the spelling of diffusers' training scripts
(not listed in the tables below): every `--dashed-flag` as `--underscored_flag` (`--lora_rank`,
`--mixed_precision`, `--gradient_checkpointing`, `--no_union_sampling`, ...), `--rank`
(`--lora-rank`) and `--validation_prompt`; `train` also `--pretrained_model_name_or_path`,
`--output_dir` and `--instance_data_dir`.

Models (`--model`) are a hub id, a local diffusers folder, or a built-in name: `toy` (a small
pipeline trained on the [toy world](toy-world.md), offline) or `tiny-sd1`, `tiny-sd2`,
`tiny-sdxl` (tiny models with random weights, offline; they show the workflow, not image
quality). Bundles
(`--bundle`, `bundle`) are a bundle file, a folder holding `break_a_scene.safetensors`, or a
hub repo id.
"""


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is argparse.SUPPRESS or default is None or default is False or action.required:
        return ""
    if default == []:
        return ""
    return f"`{default}`"


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return names
    if action.metavar:
        metavar = action.metavar
    elif action.choices:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    if action.nargs == "+":
        metavar = f"{metavar} [{metavar} ...]"
    return f"{names} `{metavar}`"


def _row(action: argparse.Action) -> str:
    text = (action.help or "").replace("|", "\\|").replace("%%", "%")
    default = _default(action)
    match = re.search(r"\(default: (.*?)\)(; 'none' for None)?$", text)
    if match:
        default = f"`{match.group(1)}`"
        text = text[: match.start()].rstrip() + (" `none` for None." if match.group(2) else "")
    repeatable = isinstance(action, argparse._AppendAction)
    if action.required:
        default = "required" + (", repeatable" if repeatable else "")
    elif repeatable:
        default = (default + ", " if default else "") + "repeatable"
    return f"| {_flag(action)} | {default} | {text} |"


def generate() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [
        "# Command line",
        "",
        "<!-- generated by docs/gen_cli.py from the argument parser; edit that script -->",
        "",
        *HEADER.splitlines(),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    out += [f"| [`{name}`](#{name}) | {p.description} |" for name, p in sub.choices.items()]
    out.append("")
    for name, p in sub.choices.items():
        out += [f"## {name}", "", p.description[0].upper() + p.description[1:] + ".", ""]
        if name in NOTES:
            out += [NOTES[name], ""]
        out += ["```text", p.format_usage().strip(), "```", ""]
        for group in p._action_groups:
            actions = [
                a
                for a in group._group_actions
                if not isinstance(a, argparse._HelpAction)
                and a.dest not in ("quiet", "debug")
                and a.help is not argparse.SUPPRESS  # diffusers-style aliases, said in HEADER
            ]
            if not actions:
                continue
            if group.title == "positional arguments":
                out += ["Arguments:", ""]
            elif group.title.startswith("training settings"):
                out += [
                    "Training settings: every `BreakASceneConfig` field, as `--field-name`; they "
                    "override `--config`. Booleans come as `--flag` / `--no-flag`, optional "
                    "numbers accept `none`. Defaults and sources: "
                    "[Training](training.md#every-setting).",
                    "",
                ]
            else:
                out += ["Options:", ""]
            out += ["| flag | default | meaning |", "|---|---|---|"]
            out += [_row(a) for a in actions]
            out.append("")
        example = (p.epilog or "").replace("example:\n", "").strip()
        if example:
            out += ["Example:", "", "```bash", example, "```", ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(generate(), end="")
