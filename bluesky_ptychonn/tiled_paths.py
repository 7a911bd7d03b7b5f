"""Every Tiled path the package reads or writes, in one place, and get-or-create of a container.

Layout (DESIGN.md)::

    raw/<uid>                         runs (CatalogOfBlueskyRuns 3.0, written by TiledWriter)
    processed/<raw uid>/ptychonn      live and replayed PtychoNN results
    processed/<raw uid>/iterative     pty-chi reconstructions (training labels, references)
    simulation_truth/<sample id>      ground truth of simulated samples
    models/<content hash>             registered checkpoints

Pure strings and duck typing on the client: this module imports nothing from Tiled.
"""

from __future__ import annotations

from typing import Any

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


def processed_path(raw_uid: str, name: str) -> str:
    """``processed/<raw_uid>/<name>``."""
    return f"{PROCESSED}/{raw_uid}/{name}"


def truth_path(sample_id: str) -> str:
    """``simulation_truth/<sample_id>``."""
    return f"{SIMULATION_TRUTH}/{sample_id}"


def child_container(
    parent: Any, key: str, *, metadata: dict[str, Any] | None = None, specs: list[Any] | None = None
) -> Any:
    """``parent[key]``, created as a container with ``metadata`` and ``specs`` if it is missing.

    Another writer may create the same key between the check and the creation (two consumers,
    replay beside live); the server then refuses ours and the existing node is returned.
    """
    if key not in parent:
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
