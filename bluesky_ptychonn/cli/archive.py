"""Commands on the archive: ``serve`` Tiled, ``replay`` runs, ``iterative`` labels, ``refine``, ``train-runs``,
``fine-tune``, ``restore`` backups."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

from ..archive.servers import API_KEY_ENV as SERVER_KEY_ENV
from ..archive.training import FINE_TUNE_EPOCHS, FINE_TUNE_LEARNING_RATE
from ..core.base_model import DEFAULT_BASE
from ..core.config import TrainConfig
from ..core.engine import LiveOptions
from ..core.refine import REFINE_OPTIONS
from ..errors import ConfigurationError
from ..live.lifecycle import STALE_AFTER_S
from ..tiled_paths import PTYCHONN
from .options import (
    API_KEY_ENV,
    add_cluster_arguments,
    add_command,
    add_field,
    add_iterative_options,
    add_network_options,
    add_selection_arguments,
    add_tiled_arguments,
    add_training_options,
    connect_from_args,
    iterative_options,
    labels_on_cluster,
    map_selected,
    model_file,
    runs_from_args,
    training_config,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``replay``, ``iterative``, ``refine``, ``train-runs``, ``fine-tune`` and ``restore``."""
    p = add_command(
        sub,
        "serve",
        "run a persistent Tiled server with the 'raw' catalog of Bluesky runs",
        """  TILED_API_KEY=secret bluesky-ptychonn serve ./archive -r ./data
  bluesky-ptychonn serve ./archive -r ./data --api-key-file key.txt --host 0.0.0.0 --public
  PGPASSWORD=... bluesky-ptychonn serve ./archive -r ./data --catalog postgresql://tiled@db:5432/tiled""",
        "Its web UI answers at http://HOST:PORT/ui/ once it runs.",
    )
    p.add_argument("directory", type=Path, help="folder for the catalog, array data and tables")
    p.add_argument(
        "-r",
        "--detector-data",
        type=Path,
        action="append",
        default=[],
        help="detector data folder the server may read (repeat for several)",
    )
    p.add_argument(
        "--catalog",
        default=None,
        help="catalog database URI (default: SQLite in DIRECTORY), e.g. postgresql://tiled@db:5432/tiled with the "
        "password in $PGPASSWORD or ~/.pgpass, never in the URI",
    )
    p.add_argument("--tables", default=None, help="tabular storage URI (default: DuckDB in DIRECTORY)")
    p.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help=f"file holding the API key for writes (default: ${API_KEY_ENV}, else ${SERVER_KEY_ENV}); "
        "never on the command line, where ps shows it",
    )
    # Kept only to refuse it by name, without echoing the value (argparse would print an unknown
    # option's value, and would take --api-key as an abbreviation of --api-key-file).
    p.add_argument("--api-key", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--public", action="store_true", help="allow anonymous reads (writes still need the key)")
    p.set_defaults(func=serve)

    p = add_command(
        sub,
        "replay",
        "reconstruct archived runs again with a model, reading them through Tiled",
        """  bluesky-ptychonn replay 3f2a9c1e --checkpoint model.safetensors
  bluesky-ptychonn replay sample_id=sim-features-0 --since 2026-11-01 --checkpoint default-64 --dry-run
  bluesky-ptychonn replay 3f2a9c1e --checkpoint model.safetensors --name ptychonn-v2 --refine""",
        "The result replaces processed/<uid>/<name> (--keep refuses to); --dry-run first lists the runs a "
        "selection would replace.",
    )
    add_selection_arguments(p)
    p.add_argument(
        "--checkpoint", required=True, help="the model (.safetensors), or a shipped base model's name (default-64)"
    )
    p.add_argument("--name", default=PTYCHONN, help=f"result name under processed/<uid> (default {PTYCHONN})")
    p.add_argument("--keep", action="store_true", help="refuse to replace an existing result")
    add_field(p, "--batch-size", LiveOptions, "batch_size")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:n]' (default: auto)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the network as a torch.compile graph, built once per process as it loads the model "
        "(seconds to build, then faster: pays for many or long runs; figures in the README)",
    )
    p.add_argument(
        "--refine", action="store_true", help="then refine each run with pty-chi from its new image (see `refine`)"
    )
    p.add_argument(
        "--incomplete",
        action="store_true",
        help="only the selected (default: all) ended runs whose live result is missing, interrupted, failed or stale",
    )
    p.add_argument(
        "--stale-after-s",
        type=float,
        default=STALE_AFTER_S,
        help=f"with --incomplete, a result still 'running' after this long is stale (default {STALE_AFTER_S:.0f})",
    )
    add_cluster_arguments(p)
    p.set_defaults(func=replay)

    p = add_command(
        sub,
        "iterative",
        "reconstruct archived runs with pty-chi into processed/<uid>/iterative",
        """  bluesky-ptychonn iterative 3f2a9c1e --engine epie --epochs 100
  bluesky-ptychonn iterative sample_id=sim-features-0 --device cpu""",
        "The reference images (and training labels) of `train-runs --labels iterative`.",
    )
    add_selection_arguments(p)
    add_iterative_options(p, "--")
    p.add_argument("--photons-per-frame", type=float, default=None, help="flux (default: the run's metadata)")
    add_cluster_arguments(p)
    p.set_defaults(func=iterative)

    p = add_command(
        sub,
        "refine",
        "refine archived runs with pty-chi from their PtychoNN image into processed/<uid>/refined",
        """  bluesky-ptychonn refine 3f2a9c1e
  bluesky-ptychonn refine sample_id=sim-features-0 --seed flat --epochs 300 --tolerance 0.001""",
    )
    add_selection_arguments(p)
    add_iterative_options(p, "--", defaults=REFINE_OPTIONS)
    p.add_argument(
        "--seed",
        dest="seed_source",
        choices=("ptychonn", "flat"),
        default="ptychonn",
        help="start from processed/<uid>/ptychonn, or from a flat object (default: ptychonn)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="model (file or base model name) to replay a run with when it has no PtychoNN result",
    )
    p.add_argument("--photons-per-frame", type=float, default=None, help="flux (default: the run's metadata)")
    add_cluster_arguments(p)
    p.set_defaults(func=refine)

    p = add_command(
        sub,
        "train-runs",
        "train a model on prior runs selected in the Tiled catalog",
        """  bluesky-ptychonn train-runs sample_id=sim-features-0 --labels iterative --out model.safetensors
  bluesky-ptychonn train-runs --since 2026-11-01 --labels truth --from-scratch --network small --out m.safetensors""",
        "Starts from the shipped base model for the runs' geometry when there is one (--from-scratch: random "
        "weights); the model is registered at models/<content hash> in Tiled.",
    )
    _add_run_training(p)
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors), atomically")
    add_network_options(p, transforms=("sqrt", "log1p", "none"))
    p.add_argument(
        "--base",
        default="auto",
        help="start from this model: a checkpoint, a shipped base model's name, or 'auto', the shipped base for the "
        "runs' geometry when there is one (default: auto; its network and recipe replace --network and --transform)",
    )
    p.add_argument("--from-scratch", action="store_true", help="start from random weights, not from a base model")
    add_training_options(p, epochs=None)
    (epochs,) = [a for a in p._actions if a.dest == "epochs"]
    epochs.help = f"most epochs (default: {FINE_TUNE_EPOCHS} from a base model, {TrainConfig().epochs} from scratch)"
    p.set_defaults(func=train_runs)

    p = add_command(
        sub,
        "fine-tune",
        "continue training a model on the newest runs; replace it atomically",
        """  bluesky-ptychonn fine-tune model.safetensors sample_id=sim-features-0 --newest 2 --labels iterative
  bluesky-ptychonn fine-tune model.safetensors --newest 2 --labels iterative sample_id=sim-features-0
  bluesky-ptychonn fine-tune default-64 3f2a9c1e --self-supervised --minutes 5 --out run.safetensors""",
    )
    p.add_argument(
        "checkpoint",
        help=f"the model to start from (and, without --out, to replace), or a shipped base model ({DEFAULT_BASE})",
    )
    _add_run_training(p, labels_required=False)
    p.add_argument("--out", type=Path, default=None, help="where to write the new model (default: CHECKPOINT)")
    p.add_argument("--newest", type=int, default=None, help="train on the newest N selected runs only")
    p.add_argument(
        "--self-supervised",
        action="store_true",
        help="no labels: adapt to one run's own frames through the forward model with its probe and the overlaps",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="budget of --self-supervised (default: 5)")
    add_training_options(p, epochs=FINE_TUNE_EPOCHS, learning_rate=FINE_TUNE_LEARNING_RATE)
    p.set_defaults(func=fine_tune)

    p = add_command(
        sub,
        "restore",
        "write runs and live images backed up during a Tiled outage into Tiled",
        """  bluesky-ptychonn restore ./backup --tiled-uri http://127.0.0.1:8000""",
        "Backups that cannot be written stay in the folder for the next try.",
    )
    p.add_argument("directory", type=Path, help="the backup folder (subscribe_archive's, [callback] backup_dir)")
    add_tiled_arguments(p)
    p.set_defaults(func=restore)


def restore(args: argparse.Namespace) -> dict:
    """``restore``: write every backup in the folder into Tiled; failures stay for the next try."""
    from ..archive.backup import restore_backups

    client, _ = connect_from_args(args)
    return {"restored": restore_backups(client, args.directory)}


def _add_run_training(p: argparse.ArgumentParser, labels_required: bool = True) -> None:
    add_selection_arguments(p)
    text = "label source" + ("" if labels_required else " (required unless --self-supervised)")
    p.add_argument("--labels", choices=("iterative", "truth"), required=labels_required, help=text)
    p.add_argument("--lines", type=float, default=1.0, help="use the first fraction of each run's scan lines")
    add_iterative_options(p, "--iterative-")
    p.add_argument("--no-register", action="store_true", help="do not describe the model at models/<hash> in Tiled")
    add_cluster_arguments(p)  # where missing iterative labels are made; training itself runs under torchrun


def serve(args: argparse.Namespace) -> dict:
    """``serve``: run the facility Tiled server until it exits or is stopped; returns a summary.

    SIGTERM (``kill``, a service manager) stops it as Ctrl-C does: the ``tiled`` child is
    terminated with it, never left behind holding the port.
    """
    from ..archive.servers import FacilityServer

    if args.api_key is not None:
        raise ConfigurationError(
            f"--api-key is refused: ps shows a command line to every user; set ${API_KEY_ENV} or use --api-key-file"
        )
    server = FacilityServer(
        directory=args.directory,
        api_key=_serve_api_key(args.api_key_file),
        readable=list(args.detector_data),
        catalog=args.catalog,
        tables=args.tables,
        host=args.host,
        port=args.port,
        public=args.public,
    )
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        process = server.start()
        print(f"bluesky-ptychonn serve: Tiled at {server.uri} with catalog 'raw'; Ctrl-C stops it", flush=True)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop()  # also when the start failed or was interrupted half way
        signal.signal(signal.SIGTERM, previous)
    return {"uri": server.uri, "directory": str(server.directory), "exit_code": code}


def _serve_api_key(path: Path | None) -> str:
    """The server's API key: from ``path``, else ``$TILED_API_KEY``, else tiled's ``$TILED_SINGLE_USER_API_KEY``."""
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as err:
            raise ConfigurationError(f"cannot read the API key file {path}: {err.strerror}") from err
    key = os.environ.get(API_KEY_ENV) or os.environ.get(SERVER_KEY_ENV)
    if not key:
        raise ConfigurationError(
            f"serve needs an API key for writes: set ${API_KEY_ENV} or pass --api-key-file "
            "(never on the command line, where ps shows it)"
        )
    return key


def replay(args: argparse.Namespace) -> list[dict]:
    """``replay``: reconstruct the selected runs again; returns one summary per run."""
    from ..archive.runs import check_ptychography
    from ..archive.tasks import replay_task

    if args.refine and args.name != PTYCHONN:
        raise ConfigurationError(
            f"--refine seeds from processed/<uid>/{PTYCHONN}, not from a replay named {args.name!r}"
        )
    client, raw, uids = runs_from_args(args)
    check_ptychography(raw[uid] for uid in uids)
    checkpoint = model_file(args.checkpoint).resolve()
    if not checkpoint.is_file():
        raise ConfigurationError(f"no checkpoint {checkpoint}")
    return map_selected(
        args,
        replay_task,
        client,
        uids,
        checkpoint=str(checkpoint),
        device=args.device,
        compile=args.compile,
        options=LiveOptions(batch_size=args.batch_size),
        replace=not args.keep,
        name=args.name,
        refine=args.refine,
    )


def iterative(args: argparse.Namespace) -> list[dict]:
    """``iterative``: pty-chi reconstructions of the selected runs into Tiled; one summary per run."""
    from ..archive.runs import check_ptychography
    from ..archive.tasks import iterative_task

    options = iterative_options(args, "")
    client, raw, uids = runs_from_args(args)
    check_ptychography(raw[uid] for uid in uids)
    return map_selected(args, iterative_task, client, uids, options=options, photons_per_frame=args.photons_per_frame)


def refine(args: argparse.Namespace) -> list[dict]:
    """``refine``: pty-chi seeded with each selected run's PtychoNN image; one summary per run."""
    from ..archive.runs import check_ptychography
    from ..archive.tasks import refine_task

    client, raw, uids = runs_from_args(args)
    check_ptychography(raw[uid] for uid in uids)
    checkpoint = None if args.checkpoint is None else str(model_file(args.checkpoint).resolve())
    return map_selected(
        args,
        refine_task,
        client,
        uids,
        options=iterative_options(args, ""),
        seed=args.seed_source,
        checkpoint=checkpoint,
        device=args.device,
        photons_per_frame=args.photons_per_frame,
    )


def _summary(args: argparse.Namespace, client: Any, path: Path, info: Any) -> dict:
    from ..archive.registry import register_model

    return {
        "checkpoint": str(path),
        "content_hash": info.content_hash,
        "registered": None if args.no_register else register_model(client, path),
        "run_uids": info.provenance["run_uids"],
        "label_source": info.provenance["label_source"],
        **{k: v for k, v in info.metrics.items() if k != "history"},
    }


def train_runs(args: argparse.Namespace) -> dict | None:
    """``train-runs``: train a new model on the selected runs, register it; returns its summary (writer only)."""
    from ..archive.training import train_from_runs
    from ..core import distributed

    client, raw, items = runs_from_args(args)
    labels_on_cluster(args, client, items)
    if args.epochs is None:  # minutes on a CPU from a base model; a new network needs more
        args.epochs = TrainConfig().epochs if args.from_scratch else FINE_TUNE_EPOCHS
    _, info = train_from_runs(
        raw,
        items,
        label_source=args.labels,
        lines=args.lines,
        network=args.network,
        batch_norm=args.batch_norm,
        transform=args.transform,
        config=training_config(args),
        client=client,
        iterative_options=iterative_options(args, "iterative_"),
        device=args.device,
        out=args.out,
        base=None if args.from_scratch else args.base,
    )
    return _summary(args, client, args.out, info) if distributed.is_writer() else None


def fine_tune(args: argparse.Namespace) -> dict | None:
    """``fine-tune``: continue training a checkpoint on the newest selected runs; returns its summary (writer only)."""
    from ..archive.training import fine_tune
    from ..core import distributed

    client, raw, items = runs_from_args(args)
    out = args.out or args.checkpoint
    if args.self_supervised:
        from ..archive.training import adapt_to_run

        if len(items) != 1:
            raise ConfigurationError(f"--self-supervised adapts to one run; the selection matched {len(items)}")
        _, info = adapt_to_run(
            args.checkpoint, raw, items[0], out=args.out, minutes=args.minutes, client=client, device=args.device
        )
        return _summary(args, client, out, info) if distributed.is_writer() else None
    if args.labels is None:
        raise ConfigurationError("fine-tune needs --labels (iterative or truth), or --self-supervised")
    labels_on_cluster(args, client, items)
    config = training_config(args)
    _, info = fine_tune(
        args.checkpoint,
        raw,
        items,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        out=args.out,
        newest=args.newest,
        label_source=args.labels,
        lines=args.lines,
        config=config,
        client=client,
        iterative_options=iterative_options(args, "iterative_"),
        device=args.device,
    )
    return _summary(args, client, out, info) if distributed.is_writer() else None
