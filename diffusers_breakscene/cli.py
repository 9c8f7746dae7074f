"""The ``breakscene`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import BreakSceneError

EPILOG = """examples:
  breakscene tiny-model ./tiny-sd1                 # save an offline tiny SD1-style pipeline
  breakscene tiny-model ./tiny-sd2 --family sd2    # ... or an SD2-style (v-prediction) one
"""


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.directory, args.family, seed=args.seed)
    if not args.quiet:
        print(f"Saved a tiny {args.family} pipeline (random weights) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``breakscene`` command."""
    parser = argparse.ArgumentParser(
        prog="breakscene",
        description="Break-A-Scene for diffusers: learn a token per object from one image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser(
        "tiny-model", help="save an offline tiny SD-family pipeline (random weights)"
    )
    tiny.add_argument("directory", help="folder to write the pipeline into")
    tiny.add_argument("--family", choices=("sd1", "sd2"), default="sd1")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--quiet", action="store_true", help="print nothing on success")
    tiny.set_defaults(func=_cmd_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``breakscene`` command; returns the exit code (0 success, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (BreakSceneError, OSError, ValueError) as error:
        if args.debug:
            raise
        print(f"breakscene {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
