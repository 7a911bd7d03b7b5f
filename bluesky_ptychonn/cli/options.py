"""Options shared by the sub-commands: defaults and help read from the configuration models, and
the run selection of the archive commands."""

from __future__ import annotations

import argparse
import os
import typing
from typing import Any

from pydantic import BaseModel

#: Where the command line looks for the Tiled API key unless told otherwise.
API_KEY_ENV = "TILED_API_KEY"


def add_field(
    parser: argparse.ArgumentParser, flag: str, model: type[BaseModel], name: str, **kwargs: Any
) -> argparse.Action:
    """Add ``flag`` for field ``name`` of ``model``: default, help and choices come from the field.

    So a default is written once, in the configuration model, and the command line can never
    drift from it. ``kwargs`` are passed to ``add_argument`` (``dest`` defaults to ``name``); a
    boolean field that defaults to False becomes a ``store_true`` switch, a ``Literal`` field gets
    its values as choices.
    """
    info = model.model_fields[name]
    kwargs.setdefault("dest", name)
    kwargs.setdefault("default", info.default)
    text = kwargs.pop("help", None) or (info.description or "").rstrip(".")
    if info.default is False and "action" not in kwargs:
        kwargs["action"] = "store_true"
    else:
        # ``int | None`` and the like: the one non-None type converts the text.
        kinds = [a for a in typing.get_args(info.annotation) if a is not type(None)] or [info.annotation]
        if typing.get_origin(info.annotation) is typing.Literal:
            kwargs.setdefault("choices", typing.get_args(info.annotation))
        elif len(kinds) == 1 and kinds[0] in (int, float):
            kwargs.setdefault("type", kinds[0])
        text = f"{text} (default: {kwargs['default']})"
    return parser.add_argument(flag, help=text, **kwargs)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Run selection and the Tiled connection: RUN (uid or KEY=VALUE), --uid, --where, --since, --until, ..."""
    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="a run uid (or its first 5+ characters), or a KEY=VALUE condition"
    )
    parser.add_argument("--uid", dest="uids", action="append", default=[], help="a run uid (repeatable)")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="start-document condition; a bare KEY is in the ptychography section (sample_id=...), "
        "a dotted one a path from the start document (start.operator=...); all conditions must hold",
    )
    parser.add_argument("--since", help="runs started at or after this ISO 8601 time")
    parser.add_argument("--until", help="runs started before this ISO 8601 time")
    parser.add_argument("--plan-name", help="runs of this plan only (e.g. ptycho_fly_scan)")
    parser.add_argument("--tiled-uri", required=True, help="Tiled server root URI")
    parser.add_argument(
        "--api-key-env", default=API_KEY_ENV, help=f"environment variable with the API key (default {API_KEY_ENV})"
    )


def runs_from_args(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """Connect as the arguments say; return (root client, raw catalog, selection items for ``select``)."""
    from ..archive.runs import selection
    from ..archive.servers import connect

    uids = [r for r in args.runs if "=" not in r] + list(args.uids)
    conditions = [r for r in args.runs if "=" in r] + list(args.where)
    items = selection(uids, conditions, since=args.since, until=args.until, plan_name=args.plan_name)
    client, raw = connect(args.tiled_uri, api_key=os.environ.get(args.api_key_env) or None)
    return client, raw, items


#: TrainConfig fields every training command exposes.
TRAIN_FIELDS = ["epochs", "batch_size", "learning_rate", "plateau_patience", "loss_window", "seed"]


def add_network_options(parser: argparse.ArgumentParser, *, transforms: tuple[str, ...]) -> None:
    """Network preset, BatchNorm and the input transform (one of ``transforms``) of a new model."""
    from ..core.config import NetworkConfig, PreprocessRecipe

    parser.add_argument("--network", choices=("paper", "small"), default="paper", help="network preset")
    add_field(parser, "--batch-norm", NetworkConfig, "batch_norm")
    text = "input transform" + (
        "; 'auto' picks the best on the held-out block after short trials" * ("auto" in transforms)
    )
    add_field(parser, "--transform", PreprocessRecipe, "transform", choices=transforms, help=text)


def add_training_options(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The training recipe (``TrainConfig``) and the device; ``defaults`` override the model's."""
    from ..core.config import TrainConfig

    for name in TRAIN_FIELDS:
        extra = {"default": defaults[name]} if name in defaults else {}
        flag = "--patience" if name == "plateau_patience" else "--" + name.replace("_", "-")
        add_field(parser, flag, TrainConfig, name, **extra)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:n]' (default: auto)")


def training_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` that the training options describe."""
    from ..core.config import TrainConfig

    return TrainConfig(**{name: getattr(args, name) for name in TRAIN_FIELDS})
