"""The studio in a real browser: headless Chromium (Debian's, driven by Playwright) goes from a
bad upload, through a toy-world photo, proposed masks, a short training run and a generated
image, to downloading the bundle and loading it back. A screenshot of each stage is saved.

    python tests/studio_browser.py --out OUT            # OUT/screenshots/*.png, OUT/result.json
    python tests/studio_browser.py --out docs/images/studio --docs   # the docs' screenshots

tests/test_studio.py runs it (in the background queue) and checks what it wrote. Nothing is
downloaded: the browser is /usr/bin/chromium (``BREAKSCENE_CHROMIUM`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("BREAKSCENE_CHROMIUM", "/usr/bin/chromium")
# What the machine's closed network needs (no background requests, no updates), as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 3  # optimizer steps per phase: enough to see training and validation happen
# Records (data-state, data-step) of #train-state each time the page redraws it.
_RECORD_STATES = """() => {
    window.trainStatesDrawn = [];
    const note = () => {
        const bar = document.querySelector("#train-state");
        if (bar) window.trainStatesDrawn.push([bar.dataset.state, bar.dataset.step]);
    };
    new MutationObserver(note).observe(document.body, {subtree: true, childList: true,
        attributes: true, attributeFilter: ["data-state", "data-step"]});
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pixels(path: Path) -> int:
    import numpy as np
    from PIL import Image

    return int((np.asarray(Image.open(path).convert("L")) > 127).sum())


def _proposed_pixels(photo: Path, words: str) -> list[int]:
    """The masks the page proposed, computed again here (the same deterministic call)."""
    from diffusers_breakscene.studio import StudioSession

    session = StudioSession("toy", tempfile.mkdtemp())
    return [int(m.sum()) for m in session.propose(str(photo), words).masks]


def run(out: Path, docs: bool = False) -> dict:
    from playwright.sync_api import expect, sync_playwright

    from diffusers_breakscene.studio import launch_studio
    from diffusers_breakscene.toy.world import evaluation_scenes, object_phrase

    shots = out if docs else out / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="studio-browser-"))
    sample = evaluation_scenes()[0]
    photo = work / "toy-scene.png"
    sample.image.resize((256, 256), 0).save(photo)  # nearest: the toy world's pixels, larger
    not_image = work / "notes.png"
    not_image.write_text("this is not a picture")
    words = ", ".join(object_phrase(o) for o in sample.objects)

    port = _free_port()
    page_server = launch_studio("toy", work / "runs", port=port, block=False, quiet=True)
    result: dict = {"words": words, "stages": []}
    started = time.perf_counter()

    def shot(page, name: str) -> None:
        path = shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if docs:  # smaller files for the docs: 60 % size, 128 colours
            from PIL import Image

            with Image.open(path) as full:
                small = full.convert("RGB").resize(
                    (round(full.width * 0.6), round(full.height * 0.6)), Image.Resampling.LANCZOS
                )
            small.quantize(128).save(path, optimize=True)
        result["stages"].append({"stage": name, "seconds": round(time.perf_counter() - started)})

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                expect(page.locator("#propose")).to_be_visible(timeout=60_000)

                # A file that is not an image: a message in the page, and the page goes on.
                page.locator("#photo-upload input[type=file]").set_input_files(str(not_image))
                toast = page.locator(".toast-body").first
                expect(toast).to_contain_text("not an image", timeout=60_000)
                result["bad_upload_message"] = toast.inner_text()
                shot(page, "0-bad-upload")
                page.locator(".toast-close").first.click()
                page.locator("#photo-upload button[aria-label='Clear']").first.click()

                # The photo, and the proposed masks.
                page.locator("#photo-upload input[type=file]").set_input_files(str(photo))
                # The photo is read on the server first (slower on Gradio 6.0): proposing
                # before it is shown would be answered "Upload a photo first."
                expect(page.locator("#photo-view img")).to_be_visible(timeout=60_000)
                page.locator("#words textarea").fill(words)
                page.locator("#propose").click()
                expect(page.locator("#slot-1")).to_be_visible(timeout=120_000)
                expect(page.locator("#preview img")).to_be_visible(timeout=60_000)
                for k in range(2):
                    expect(page.locator(f"#editor-{k} canvas").first).to_be_visible(timeout=60_000)
                    expect(page.locator(f"#slot-{k}")).not_to_contain_text(
                        "processing", timeout=60_000
                    )
                result["tokens_offered"] = [
                    page.locator(f"#token-{k} textarea").input_value() for k in range(2)
                ]
                shot(page, "1-masks")

                # A brush stroke that adds to mask0 (below the square, on the snow), applied.
                page.locator("#editor-0 button[aria-label='Brush']").first.click()
                box = page.locator("#editor-0 canvas").first.bounding_box()
                y = box["y"] + 0.8 * box["height"]
                page.mouse.move(box["x"] + 0.42 * box["width"], y)
                page.mouse.down()
                page.mouse.move(box["x"] + 0.5 * box["width"], y, steps=8)
                page.mouse.up()
                before = page.locator("#preview img").get_attribute("src")
                page.locator("#apply").click()
                expect(page.locator("#preview img")).not_to_have_attribute(
                    "src", before or "", timeout=60_000
                )
                for k in range(2):
                    expect(page.locator(f"#slot-{k}")).not_to_contain_text(
                        "processing", timeout=60_000
                    )
                shot(page, "2-brush")

                # A short training run, watched live.
                for field, value in (("phase1", STEPS), ("phase2", STEPS), ("every", STEPS)):
                    page.locator(f"#{field} input").fill(str(value))
                # Every state the bar shows is recorded in the page as it is drawn, so a short run
                # that passes "running" between two polls below is still seen running.
                page.evaluate(_RECORD_STATES)
                page.locator("#train").click()
                state = page.locator("#train-state")
                seen = []
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    errors = page.locator(".toast-body")
                    assert not errors.count(), errors.first.inner_text()
                    if state.count():
                        seen.append(
                            (state.get_attribute("data-state"), state.get_attribute("data-step"))
                        )
                        if seen[-1][0] == "done":
                            break
                    time.sleep(0.25)
                drawn = [tuple(item) for item in page.evaluate("window.trainStatesDrawn")]
                result["progress_seen"] = sorted(set(seen) | set(drawn))
                expect(page.locator("#validation img").first).to_be_visible(timeout=30_000)
                result["validation_pictures"] = page.locator("#validation img").count()
                expect(page.locator("#loaded")).to_contain_text("Loaded", timeout=30_000)
                result["loaded_after_training"] = page.locator("#loaded").inner_text()
                shot(page, "3-training")

                # A prompt with the new handles.
                page.locator("#prompt textarea").fill(
                    "a photo of <asset0> and <asset1> in the snow"
                )
                page.locator("#generate").click()
                expect(page.locator("#result img")).to_be_visible(timeout=120_000)
                shot(page, "4-generate")

                # The bundle: downloaded, then loaded back through the page.
                with page.expect_download(timeout=60_000) as download:
                    page.locator("#download a").first.click()
                bundle = out / "downloaded.safetensors"
                download.value.save_as(str(bundle))
                result["downloaded"] = str(bundle)
                page.locator("#bundle-upload input[type=file]").set_input_files(str(bundle))
                expect(page.locator("#loaded")).to_contain_text(
                    f"from {bundle.name}", timeout=60_000
                )
                result["loaded_back"] = page.locator("#loaded").inner_text()
                shot(page, "5-load-bundle")
            except Exception:
                shot(page, "failure")  # what the page showed when it went wrong
                raise
            browser.close()
        scene = work / "runs" / "run-0" / "scene"
        result["trained_mask_pixels"] = [_pixels(scene / f"mask{k}.png") for k in range(2)]
        result["proposed_mask_pixels"] = _proposed_pixels(photo, words)
        result["trained_bundle"] = str(out / "trained.safetensors")
        shutil.copyfile(work / "runs" / "run-0" / "break_a_scene.safetensors",
                        result["trained_bundle"])  # fmt: skip
    finally:
        page_server.close()
        shutil.rmtree(work, ignore_errors=True)
    if docs:
        Path(result["downloaded"]).unlink()
        Path(result["trained_bundle"]).unlink()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--docs", action="store_true", help="write only the screenshots")
    args = parser.parse_args(argv)
    result = run(args.out, docs=args.docs)
    text = json.dumps(result, indent=2)
    if not args.docs:
        (args.out / "result.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
