"""The pure core: configuration, geometry, preprocessing, network, checkpoints, inference, training,
stitching, metrics, offline and streaming reconstruction, and the pty-chi reference.

Nothing here imports bluesky, event-model, ophyd, tiled or databroker (an import-linter contract
in ``pyproject.toml`` checks it), so replay, training and tests drive it with plain arrays.
"""
