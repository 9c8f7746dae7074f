"""A warm interpreter for the background jobs (background.py): it imports torch, diffusers,
transformers and this package once, then runs each job in a forked child exactly as
``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) would: ``runpy`` with ``__name__ ==
"__main__"``, the script's folder first on ``sys.path``, stdout and stderr to files.

Why: a fresh interpreter spends ~6-7 s of CPU on those imports (torch, diffusers' pipelines,
transformers, bitsandbytes) before a job's first line, and the suite runs ~15 jobs on 2 cores;
a forked child starts with them imported and nothing else shared (each job gets its own copy of
the process). Forking is safe here: the runner starts no thread and runs no tensor operation
before it forks (checked at start: one thread).

Protocol, one JSON object per line: stdin ``{"name", "argv", "stdout", "stderr"}`` (``argv``
as after ``python``); stdout ``{"name", "returncode"}`` when that job's child has exited.
End of stdin (the tests are over, or their process died): the jobs still running are killed,
with every process they started (each job is a process group of its own), and the runner exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import select
import signal
import sys
import threading


def _warm() -> None:
    """The imports every job makes (and nothing that starts a thread, such as gradio)."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import diffusers_breakscene
    import diffusers_breakscene.tiny
    import diffusers_breakscene.toy.evaluator
    import diffusers_breakscene.trainer  # noqa: F401

    threads = threading.active_count(), len(os.listdir("/proc/self/task"))
    assert threads == (1, 1), f"the job runner must not fork with threads running: {threads}"


def _child(job: dict) -> int:
    """In the forked child: run the job as its command line would; return its exit code."""
    os.setpgid(0, 0)  # a group of its own: the runner can stop it with what it starts
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(0)
    sys.stdin = open(os.devnull)  # noqa: SIM115 (the process's stdin until it exits)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    argv = job["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # what an uncaught exception does in a fresh interpreter
        import traceback

        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    _warm()
    running: dict[int, str] = {}
    pending, stdin_open = b"", True
    while stdin_open or running:
        if stdin_open and select.select([0], [], [], 0.2)[0]:
            data = os.read(0, 1 << 16)  # unbuffered: select() sees every line that is not read
            stdin_open = bool(data)
            if not stdin_open:
                for pid in running:
                    with contextlib.suppress(ProcessLookupError):  # exited, not reaped yet
                        os.killpg(pid, signal.SIGKILL)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                job = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    # The child leaves through the interpreter's normal exit (atexit handlers,
                    # threads joined, files flushed), as the job's own process would.
                    sys.exit(_child(job))
                # as the child does, so that the group exists before anything may kill it
                with contextlib.suppress(PermissionError, ProcessLookupError):
                    os.setpgid(pid, pid)  # (an error: it has exited already)
                running[pid] = job["name"]
        elif running:
            select.select([], [], [], 0.2)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            done = {"name": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}
            with contextlib.suppress(BrokenPipeError):  # the tests are gone: nobody to tell
                os.write(1, (json.dumps(done) + "\n").encode())


if __name__ == "__main__":
    main()
