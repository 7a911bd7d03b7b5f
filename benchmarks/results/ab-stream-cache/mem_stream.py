"""Scratch: RSS of the process (embedded server + sink) over many publishes of 1,222-wide blocks."""
import sys, tempfile, time, resource
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main")
from bluesky_ptychonn.archive import servers
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.stitching import StitchedImage
from bluesky_ptychonn.live.sink import TiledSink

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
SHAPE = (1222, 1222)
grid = ObjectGrid(SHAPE, 1e-8, (0.0, 0.0))
block = np.random.default_rng(0).random((100, 1222), dtype=np.float32)
md = {"status": "running", "frames_done": 1, "errors": [], "trust": {"frames_flagged": 0}}
with tempfile.TemporaryDirectory() as tmp:
    a = servers.start_embedded_server(Path(tmp)/"data", directory=Path(tmp)/"tiled")
    try:
        sink = TiledSink(a.client, "x"); sink.prepare(SHAPE, trust=True, metadata=md)
        print("start", round(rss()), "MiB", flush=True)
        t0 = time.perf_counter()
        for k in range(int(sys.argv[1])):
            image = StitchedImage(block, block, block, grid, 1, trust=block, offset=((k * 100) % 1100, 0))
            sink.publish(image, md)
            if k % 50 == 49:
                print(k + 1, "publishes", round(rss()), "MiB", round(time.perf_counter() - t0, 1), "s", flush=True)
    finally:
        a.close()
