"""What one live publish costs on the embedded Tiled server, and what a stacked layout would cost.

The frame-to-Tiled latency on a small CPU is set by the publish: the shipped
:class:`~bluesky_ptychonn.live.sink.TiledSink` writes a block of a 400x400 result as six requests
(the odd ``publish_seq``, four array patches, the metadata). Beside it, the same block written as
one patch of a stacked (4, H, W) array plus the metadata: two requests, and no sequence lock
needed, since one patch is one write. This measures the layout a change would buy; the shipped
layout is the four arrays. Idle server, same process, median of repeats.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from machine import describe, device_name

SHAPE = (400, 400)
BLOCK_ROWS = 60  # about what a raster scan adds between two publishes
REPEATS = 10


def _stacked(node, shape: tuple[int, ...]):
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import DataSource

    structure = ArrayStructure(
        shape=shape,
        chunks=tuple((n,) for n in shape),
        dims=("channel", "y", "x"),
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype(np.float32)),
    )
    return node.new(
        StructureFamily.array, [DataSource(structure=structure, structure_family=StructureFamily.array)], key="image"
    )


def run(quick: bool = False) -> dict:
    from bluesky_ptychonn.archive.servers import start_embedded_server
    from bluesky_ptychonn.core.geometry import ObjectGrid
    from bluesky_ptychonn.core.stitching import StitchedImage
    from bluesky_ptychonn.live.sink import TiledSink
    from bluesky_ptychonn.tiled_paths import run_results

    machine = describe("cpu")
    repeats = 3 if quick else REPEATS
    grid = ObjectGrid(SHAPE, 1e-8, (0.0, 0.0))
    block = np.ones((BLOCK_ROWS, SHAPE[1]), np.float32)
    metadata = {"status": "running", "frames_done": 1, "errors": [], "trust": {"frames_flagged": 0}}
    with tempfile.TemporaryDirectory() as tmp:
        archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
        try:
            sink = TiledSink(archive.client, "bench-publish")
            sink.prepare(SHAPE, trust=True, metadata=metadata)
            node = run_results(archive.client, "bench-publish")["ptychonn"]
            stacked = _stacked(node, (4, *SHAPE))
            image = StitchedImage(block, block, block, grid, 1, trust=block, offset=(100, 0))
            shipped, one_array = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sink.publish(image, metadata)
                shipped.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                stacked.patch(np.stack([block] * 4), offset=(0, 100, 0))
                node.update_metadata(metadata, drop_revision=True)
                one_array.append(time.perf_counter() - t0)
        finally:
            archive.close()
    row = {
        "device": device_name(machine),
        "result_shape": list(SHAPE),
        "block_rows": BLOCK_ROWS,
        "repeats": repeats,
        "shipped_publish_ms": round(float(np.median(shipped)) * 1e3, 1),
        "shipped_requests": 6,
        "stacked_publish_ms": round(float(np.median(one_array)) * 1e3, 1),
        "stacked_requests": 2,
        "ratio": round(float(np.median(shipped) / np.median(one_array)), 2),
    }
    print(
        f"   {row['device'][:40]:40s} one publish of a {BLOCK_ROWS}-row block: shipped four arrays "
        f"{row['shipped_publish_ms']} ms (6 requests), one stacked array {row['stacked_publish_ms']} ms "
        f"(2 requests): {row['ratio']}x"
    )
    return {
        "benchmark": "one live publish on the embedded Tiled server",
        "machine": machine,
        "results": [row],
        "note": "idle server in the benchmark's process; the stacked array is a measured alternative, not the layout",
    }
