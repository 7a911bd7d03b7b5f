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
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: this package's progress at INFO (the default of `consume`); -vv: everything at DEBUG, HTTP requests "
        "included",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (files, live, archive, results):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the command's result as JSON. Exit 2 on a bad input, with the reason; 1 when
    some runs of a batch failed (each one's summary says why)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose + (args.command == "consume"))  # a service logs one line per run
    try:
        result = _dry_run(args) if getattr(args, "dry_run", False) else args.func(args)
    except PtychoNNError as err:
        print(f"bluesky-ptychonn {args.command}: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    failed = [r for r in result if isinstance(r, dict) and "error" in r] if isinstance(result, list) else []
    if failed:  # a batch goes on past a failed run, and says so in its exit status
        print(f"bluesky-ptychonn {args.command}: {len(failed)} of {len(result)} runs failed", file=sys.stderr)
        return 1
    return 0


def configure_logging(verbosity: int) -> None:
    """WARNING; 1: this package at INFO; 2: DEBUG everywhere. HTTP request lines (httpx, uvicorn) only at 2."""
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if verbosity == 1:
        logger.setLevel(logging.INFO)
    if verbosity < 2:
        for name in ("httpx", "httpcore", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _dry_run(args: argparse.Namespace) -> list[dict]:
    """``--dry-run``: the runs a command would act on, with their results' status; nothing else."""
    client, raw, uids = runs_from_args(args)
    now = time.time()
    return [results.run_row(client, raw[uid], now) for uid in uids]


if __name__ == "__main__":
    sys.exit(main())
