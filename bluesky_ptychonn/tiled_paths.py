"""Every Tiled path the package reads or writes, in one place, and get-or-create of a container.

Layout (DESIGN.md)::

    raw/<uid>                         runs (CatalogOfBlueskyRuns 3.0, written by TiledWriter)
    processed/<raw uid>/ptychonn      live and replayed PtychoNN results
    processed/<raw uid>/iterative     pty-chi reconstructions (training labels, references)
    processed/<raw uid>/refined       pty-chi refinements seeded with the PtychoNN result
    simulation_truth/<sample id>      ground truth of simulated samples
    models/<content hash>             registered checkpoints

Pure strings and duck typing on the client: this module imports nothing from Tiled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import RunError, TiledKeyError

#: Container of raw runs.
RAW = "raw"
#: Container of results, one child per raw run uid.
PROCESSED = "processed"
#: Container of registered models, one child per content hash.
MODELS = "models"
#: Container of simulation truths, one child per sample id.
SIMULATION_TRUTH = "simulation_truth"
#: Result name of PtychoNN images (live and replay) under ``processed/<uid>``.
PTYCHONN = "ptychonn"
#: Result name of iterative reconstructions under ``processed/<uid>``.
ITERATIVE = "iterative"
#: Result name of pty-chi refinements seeded with the PtychoNN image, under ``processed/<uid>``.
REFINED = "refined"


#: Characters a key may hold besides letters and digits: what uuids, hashes and sample ids use.
KEY_PUNCTUATION = "-_."


def tiled_key(name: object, what: str = "key") -> str:
    """``name``, checked to be exactly one Tiled key; raises :class:`TiledKeyError` otherwise.

    Run uids come from documents, and Tiled's client splits a key on ``/`` (``client["a/b"]`` is
    ``client["a"]["b"]``) and puts it in a URL unescaped: a uid ``../models/x`` or ``x?y`` would
    read or write somewhere else. So a key is letters, digits and ``-_.``, and not ``.`` or ``..``.

    Parameters
    ----------
    name : str
        The candidate key.
    what : str
        What it is, for the message (``"run uid"``, ``"sample id"``).
    """
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or not all(c.isalnum() or c in KEY_PUNCTUATION for c in name)
    ):
        raise TiledKeyError(
            f"{what} {name!r} cannot be a Tiled key: expected letters, digits and {KEY_PUNCTUATION!r}, "
            "not empty, '.' or '..'"
        )
    return name


def processed_path(raw_uid: str, name: str) -> str:
    """``processed/<raw_uid>/<name>``; raises :class:`TiledKeyError` unless both are single keys."""
    return f"{PROCESSED}/{tiled_key(raw_uid, 'run uid')}/{tiled_key(name, 'result name')}"


def truth_path(sample_id: str) -> str:
    """``simulation_truth/<sample_id>``; raises :class:`TiledKeyError` unless the id is a single key."""
    return f"{SIMULATION_TRUTH}/{tiled_key(sample_id, 'sample id')}"


def child_container(
    parent: Any, key: str, *, metadata: dict[str, Any] | None = None, specs: list[Any] | None = None
) -> Any:
    """``parent[key]``, created as a container with ``metadata`` and ``specs`` if it is missing.

    Another writer may create the same key between the check and the creation (two consumers,
    replay beside live); the server then refuses ours and the existing node is returned.
    Raises :class:`TiledKeyError` unless ``key`` is a single key (see :func:`tiled_key`).
    """
    tiled_key(key)
    try:  # one round trip where the key exists, as it usually does
        return parent[key]
    except KeyError:
        pass
    try:
        parent.create_container(key, metadata=metadata or {}, specs=specs or [])
    except Exception:
        if key not in parent:
            raise
    # Looked up rather than the node create_container returns: the lookup gives the client class
    # of the node's specs (a CatalogOfBlueskyRuns for ``raw``) and its canonical URI.
    return parent[key]


def run_results(client: Any, raw_uid: str) -> Any:
    """The ``processed/<raw_uid>`` container, where every result of one raw run lives, created if missing."""
    return child_container(child_container(client, PROCESSED), raw_uid, metadata={"raw_uid": raw_uid})


def read_stored_probe(client: Any, uid: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The probe stored with run ``uid``'s iterative reconstruction: complex64 (n, n), and that result's metadata.

    For runs whose start document describes no probe (measured data): a run of the same set-up,
    reconstructed once, lends its probe. Raises :class:`RunError` when there is no complete result.
    """
    path = processed_path(uid, ITERATIVE)
    try:
        node = client[path]
    except KeyError as err:
        raise RunError(f"run {uid} has no iterative reconstruction at {path}") from err
    metadata = dict(node.metadata)
    if metadata.get("status") != "complete" or "probe_amplitude" not in node:
        raise RunError(f"run {uid}: the iterative reconstruction at {path} holds no complete probe")
    probe = node["probe_amplitude"].read() * np.exp(1j * node["probe_phase"].read())
    return probe.astype(np.complex64), metadata


def stored_probe(client: Any, uid: str | None) -> tuple[np.ndarray, str] | None:
    """:func:`read_stored_probe` and where it came from, or None when run ``uid`` (or no uid) stores none."""
    if client is None or not uid:
        return None
    try:
        probe, _ = read_stored_probe(client, uid)
    except RunError:
        return None
    return probe, f"iterative reconstruction of run {uid} ({processed_path(uid, ITERATIVE)})"
