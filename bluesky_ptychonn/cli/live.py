"""Commands of the live path: ``consume`` documents from a bluesky-0MQ-proxy."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``consume``."""
    p = sub.add_parser("consume", help="reconstruct live the runs published through a bluesky-0MQ-proxy")
    p.add_argument(
        "--config", type=Path, required=True, help="TOML service configuration (see callbacks/ptychonn.toml)"
    )
    p.set_defaults(func=consume)


def consume(args: argparse.Namespace) -> None:
    """``consume``: subscribe to the proxy and reconstruct every ptychography run until interrupted."""
    from ..live.service import consume, load_config

    consume(load_config(args.config))
