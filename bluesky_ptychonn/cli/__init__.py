"""The ``bluesky-ptychonn`` command line, grouped by workflow.

``files`` (simulate, train, reconstruct), ``live`` (consume) and ``archive`` (serve, replay,
iterative, refine, train-runs, fine-tune) each register their sub-commands; a command imports its
heavy modules only when it runs, so ``bluesky-ptychonn --help`` stays fast. Defaults come from the
configuration models (see :func:`~bluesky_ptychonn.cli.options.add_field`), never re-typed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from .. import __version__
from ..errors import PtychoNNError
from . import archive, files, live, results
from .options import Parser, runs_from_args

logger = logging.getLogger("bluesky_ptychonn")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="bluesky-ptychonn",
        description="Live PtychoNN ptychography reconstruction for Bluesky and Tiled.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (files, live, archive, results):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the command's result as JSON. Exit 2 on a bad input, with the reason."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = _dry_run(args) if getattr(args, "dry_run", False) else args.func(args)
    except PtychoNNError as err:
        print(f"bluesky-ptychonn {args.command}: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _dry_run(args: argparse.Namespace) -> list[dict]:
    """``--dry-run``: the runs a command would act on, with their results' status; nothing else."""
    client, raw, uids = runs_from_args(args)
    now = time.time()
    return [results.run_row(client, raw[uid], now) for uid in uids]


if __name__ == "__main__":
    sys.exit(main())
