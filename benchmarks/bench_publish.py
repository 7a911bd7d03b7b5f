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
LARGE = (2600, 2600)  # about the grid of a 215x215-point scan at the demo's step


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


def _large_patch_ms(node, repeats: int) -> dict:
    """Median ms of one 130x130 patch into a LARGE array, stored as one chunk and in the sink's tiles."""
    from bluesky_ptychonn.live import sink

    block = np.ones((130, 130), np.float32)
    out = {}
    for label, tiles in (("one_chunk", lambda n: (n,)), ("tiles", sink._tiles)):
        shipped, sink._tiles = sink._tiles, tiles
        try:
            array = sink._new_array(node, f"large-{label}", LARGE)
        finally:
            sink._tiles = shipped
        array.patch(np.random.default_rng(0).random(LARGE, dtype=np.float32), offset=(0, 0))  # an image, not zeros
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            array.patch(block, offset=(97 * k % 2400, 53 * k % 2400))
            times.append(time.perf_counter() - t0)
        out[f"large_patch_{label}_ms"] = round(float(np.median(times)) * 1e3, 1)
    return out


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
            large = _large_patch_ms(node, repeats)
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
        "large_shape": list(LARGE),
        **large,
    }
    print(
        f"   {row['device'][:40]:40s} one publish of a {BLOCK_ROWS}-row block: shipped four arrays "
        f"{row['shipped_publish_ms']} ms (6 requests), one stacked array {row['stacked_publish_ms']} ms "
        f"(2 requests): {row['ratio']}x; a 130x130 patch into {LARGE[0]}x{LARGE[1]}: one chunk "
        f"{row['large_patch_one_chunk_ms']} ms, tiles {row['large_patch_tiles_ms']} ms"
    )
    return {
        "benchmark": "one live publish on the embedded Tiled server",
        "machine": machine,
        "results": [row],
        "note": "idle server in the benchmark's process; the stacked array is a measured alternative, not the layout",
    }
