"""Options shared by the sub-commands: defaults and help read from the configuration models, and
the run selection of the archive commands."""

from __future__ import annotations

import argparse
import logging
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..core.iterative import IterativeOptions
from ..errors import ConfigurationError, RunError

logger = logging.getLogger(__name__)

#: Where the command line looks for the Tiled API key unless told otherwise.
API_KEY_ENV = "TILED_API_KEY"
#: The Tiled server's URI when --tiled-uri is not given.
TILED_URI_ENV = "TILED_URI"
#: A Tiled profile's name when neither --tiled-uri nor $TILED_URI is given (tiled's own variable).
TILED_PROFILE_ENV = "TILED_PROFILE"


class Parser(argparse.ArgumentParser):
    """A sub-command's parser: positionals and options in any order, help text shown as written.

    Plain argparse cannot resume a ``*`` positional after an option (``fine-tune model.safetensors
    --newest 2 sample_id=x`` failed with "unrecognized arguments"); ``parse_intermixed_args`` can,
    but not on a parser with sub-commands, so every sub-command parses intermixed instead.
    """

    _plain = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._plain:  # the intermixed parse calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._plain = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._plain = False


def add_command(
    sub: argparse._SubParsersAction, name: str, summary: str, examples: str, description: str = ""
) -> argparse.ArgumentParser:
    """A sub-command with a one-line ``summary`` (the top-level list), a description and ``examples`` in its help."""
    text = f"{summary[0].upper()}{summary[1:]}.\n\n{description}".rstrip()
    return sub.add_parser(name, help=summary, description=text, epilog="examples:\n" + examples.rstrip())


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


SELECTION_RULE = (
    "Runs are named by uid (or its first 5+ characters) and selected by conditions: KEY=VALUE, --where, --since, "
    "--until, --plan-name. Several uids: any of them. Several conditions: all must hold. Uids and conditions together: "
    "the named runs, each of which must meet every condition (else an error names it). --dry-run lists the "
    "selected runs and does nothing."
)


def add_tiled_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the Tiled server is: --tiled-uri, else $TILED_URI, else a Tiled profile; the key from the environment."""
    group = parser.add_argument_group("Tiled server")
    group.add_argument(
        "--tiled-uri",
        default=None,
        help=f"the server's root URI (default: ${TILED_URI_ENV}, else the Tiled profile)",
    )
    group.add_argument(
        "--profile",
        default=None,
        help=f"a Tiled profile (`tiled profile list`) when no URI is given (default: ${TILED_PROFILE_ENV}, "
        "else tiled's default profile)",
    )
    group.add_argument(
        "--api-key-env",
        default=API_KEY_ENV,
        help=f"environment variable holding the API key (default: {API_KEY_ENV}); never on the command line",
    )


def connect_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """The root client and the ``raw`` catalog of the server the arguments (or environment) name."""
    from ..archive.servers import connect, ensure_raw_catalog

    api_key = os.environ.get(args.api_key_env) or None
    uri = args.tiled_uri or os.environ.get(TILED_URI_ENV)
    if uri:
        return connect(uri, api_key=api_key)
    from tiled.profiles import get_default_profile_name

    profile = args.profile or os.environ.get(TILED_PROFILE_ENV) or get_default_profile_name()
    if not profile:
        raise ConfigurationError(
            f"which Tiled server? give --tiled-uri, set ${TILED_URI_ENV}, or name a Tiled profile with --profile"
        )
    from tiled.client import from_profile
    from tiled.profiles import ProfileNotFound

    try:
        client = from_profile(profile, **({"api_key": api_key} if api_key else {}))
    except ProfileNotFound as err:
        raise ConfigurationError(str(err)) from err
    return client, ensure_raw_catalog(client)


def add_selection_arguments(parser: argparse.ArgumentParser, *, dry_run: bool = True) -> None:
    """Run selection (RUN as uid or KEY=VALUE, --uid, --where, --since, --until, --plan-name) and the Tiled server."""
    group = parser.add_argument_group("run selection", SELECTION_RULE)
    group.add_argument(
        "runs", nargs="*", metavar="RUN", help="a run uid (or its first 5+ characters), or a KEY=VALUE condition"
    )
    group.add_argument("--uid", dest="uids", action="append", default=[], help="a run uid (repeatable)")
    group.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="start-document condition (repeatable); a bare KEY is in the ptychography section (sample_id=...), "
        "a dotted one a path from the start document (start.operator=...)",
    )
    group.add_argument("--since", help="runs started at or after this ISO 8601 time")
    group.add_argument("--until", help="runs started before this ISO 8601 time")
    group.add_argument("--plan-name", help="runs of this plan only (e.g. ptycho_fly_scan)")
    if dry_run:
        group.add_argument("--dry-run", action="store_true", help="list the selected runs and do nothing")
    add_tiled_arguments(parser)


def runs_from_args(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """Connect as the arguments say; return (root client, raw catalog, uids of the selected runs).

    The selection follows :data:`SELECTION_RULE`. With ``--incomplete`` (``replay``) only the
    selected runs whose live result is not final are kept, and no selection means every run.
    """
    from ..archive.runs import queries_for, select_matching

    uids = [r for r in args.runs if "=" not in r] + list(args.uids)
    conditions = [r for r in args.runs if "=" in r] + list(args.where)
    queries = queries_for(conditions, since=args.since, until=args.until, plan_name=args.plan_name)
    client, raw = connect_from_args(args)
    if not getattr(args, "incomplete", False):
        runs = select_matching(raw, uids, queries)
        return client, raw, [run.metadata["start"]["uid"] for run in runs]
    from ..archive.replay import incomplete_runs

    chosen = select_matching(raw, uids, queries) if uids or queries else raw.values()
    found = incomplete_runs(client, chosen, stale_after_s=args.stale_after_s)
    for run, state in found:
        logger.warning("run %s: its live result is %s", run.metadata["start"]["uid"], state)
    return client, raw, [run.metadata["start"]["uid"] for run, _ in found]


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """--workers and --scheduler: many runs at once on Dask (:mod:`~bluesky_ptychonn.archive.cluster`)."""
    group = parser.add_argument_group(
        "cluster",
        "One task per run on Dask; each worker reads its run and writes its result through Tiled, with the key "
        "from its own environment (--api-key-env). Model files must be readable by every worker.",
    )
    group.add_argument(
        "--workers", type=int, default=1, help="start a local Dask cluster of this many processes (default 1: none)"
    )
    group.add_argument(
        "--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786, e.g. dask-jobqueue's)"
    )


def map_selected(args: argparse.Namespace, task: Any, client: Any, uids: list[str], **options: Any) -> list[dict]:
    """``task`` over the selected runs, in this process or on the cluster the arguments name."""
    from ..archive.cluster import map_runs

    here = args.scheduler is None and args.workers <= 1
    if args.workers < 1:
        raise ConfigurationError(f"--workers must be at least 1, got {args.workers}")
    kwargs = {"progress": True} if here and len(uids) == 1 else {}  # frame/epoch bars for one run here
    return map_runs(
        task,
        uids,
        client,
        api_key_env=args.api_key_env,
        scheduler=args.scheduler,
        workers=args.workers,
        **options,
        **kwargs,
    )


def labels_on_cluster(args: argparse.Namespace, client: Any, uids: list[str]) -> None:
    """``--labels iterative`` with --workers/--scheduler: the runs' missing pty-chi labels, one Dask task per run.

    Training then reads them from Tiled; a run whose labels could not be made stops the training, naming it.
    """
    from ..archive.tasks import iterative_task
    from ..core import distributed
    from ..tiled_paths import ITERATIVE, processed_path

    if args.labels != "iterative" or (args.scheduler is None and args.workers <= 1) or not distributed.is_writer():
        return

    def stored(uid: str) -> bool:
        try:
            return client[processed_path(uid, ITERATIVE)].metadata.get("status") == "complete"
        except KeyError:
            return False

    missing = [uid for uid in uids if not stored(uid)]
    logger.warning("iterative labels of %d of %d runs to make on the cluster", len(missing), len(uids))
    options = iterative_options(args, "iterative_")
    failed = [r for r in map_selected(args, iterative_task, client, missing, options=options) if "error" in r]
    if failed:
        raise RunError("no iterative labels for " + "; ".join(f"run {r['raw_uid']}: {r['error']}" for r in failed))


def model_file(text: str | Path) -> Path:
    """A checkpoint argument: a shipped base model's name (``default-64``), else a path."""
    from ..core.base_model import BASE_MODELS, base_model_path

    return base_model_path(str(text)) if str(text) in BASE_MODELS else Path(text)


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


def add_iterative_options(
    parser: argparse.ArgumentParser, prefix: str, defaults: IterativeOptions | None = None
) -> None:
    """pty-chi's options (``IterativeOptions``) as ``<prefix>engine``, ``<prefix>epochs``, ...

    ``defaults`` (e.g. the refinement's) replace the model's defaults; help still comes from the fields.
    """
    dest = "iterative_" if prefix != "--" else ""
    defaults = defaults or IterativeOptions()
    for name, flag in (
        ("engine", "engine"),
        ("epochs", "epochs"),
        ("stop_tolerance", "tolerance"),
        ("stop_window", "stop-window"),
        ("min_epochs", "min-epochs"),
        ("batch_size", "batch-size"),
        ("object_step_size", "step-size"),
        ("refine_probe", "refine-probe"),
        ("device", "device"),
    ):
        add_field(parser, prefix + flag, IterativeOptions, name, dest=dest + name, default=getattr(defaults, name))


def iterative_options(args: argparse.Namespace, dest: str) -> IterativeOptions:
    """The ``IterativeOptions`` that the options with ``dest`` prefix describe (a bad value: one line)."""
    values = {name: getattr(args, dest + name) for name in IterativeOptions.model_fields if hasattr(args, dest + name)}
    try:
        return IterativeOptions(**values)
    except ValidationError as err:  # e.g. --device gpu: one line, not a traceback
        raise ConfigurationError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())) from err
