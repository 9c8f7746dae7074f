"""``breakscene studio``: a local web page from photo to bundle (Gradio, the ``[studio]`` extra).

The page runs :class:`StudioSession` (usable from Python without Gradio): propose masks from
words, correct them with a brush, name the handles, train with live validation pictures,
generate, download the bundle or load one back.

Example:
    >>> from diffusers_breakscene.studio import launch_studio
    >>> launch_studio(model="toy", output_dir="studio-out")  # doctest: +SKIP
    * Running on local URL:  http://127.0.0.1:7860
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import MissingDependencyError
from .session import StudioSession, TrainingRun

__all__ = ["StudioSession", "TrainingRun", "build_studio", "launch_studio"]


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio
    except ImportError as error:
        raise MissingDependencyError(
            "the studio needs Gradio; install it with: pip install 'diffusers-breakscene[studio]'"
        ) from error
    return gradio


def build_studio(session: StudioSession) -> Any:
    """The studio page for ``session`` as a ``gradio.Blocks``, not launched (see
    :func:`launch_studio`).

    Example:
        >>> page = build_studio(StudioSession("toy", "studio-out"))  # doctest: +SKIP
    """
    _gradio()
    from .app import build_studio as build

    return build(session)


def launch_studio(
    model: str = "toy",
    output_dir: str | os.PathLike[str] = "breakscene-studio",
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    open_browser: bool = False,
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Serve the studio on ``http://host:port`` (default port: Gradio's, 7860 or the next
    free one). With ``block=False`` it returns the running ``gradio.Blocks`` at once (call
    ``.close()`` to stop it); otherwise it serves until interrupted.

    Example:
        >>> page = launch_studio("toy", "studio-out", block=False)  # doctest: +SKIP
        >>> page.local_url  # doctest: +SKIP
        'http://127.0.0.1:7860/'
    """
    _gradio()
    import torch

    from ..base_pipeline import BUILTIN_MODELS

    session = StudioSession(model, output_dir)
    if session.model in BUILTIN_MODELS:
        # The built-in models are so small that one thread is fastest (as in the demo); the
        # page's own threads would otherwise fight over the two cores of a laptop.
        torch.set_num_threads(1)
    page = build_studio(session)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        inbrowser=open_browser,
        prevent_thread_lock=not block,
        quiet=quiet,
        allowed_paths=[str(session.output_dir.resolve())],
        show_error=True,
    )
    return page
