"""Idle embedded server: one publish (400x400 result, 60-row block) with the settings override and without, alternated."""
import sys, tempfile, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main")
from tiled.server.settings import get_settings
from bluesky_ptychonn.archive.servers import start_embedded_server
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.stitching import StitchedImage
from bluesky_ptychonn.live.sink import TiledSink
SHAPE=(400,400)
grid = ObjectGrid(SHAPE, 1e-8, (0.0, 0.0))
block = np.ones((60, 400), np.float32)
md = {"status": "running", "frames_done": 1, "errors": [], "trust": {"frames_flagged": 0}}
with tempfile.TemporaryDirectory() as tmp:
    a = start_embedded_server(Path(tmp)/"data", directory=Path(tmp)/"tiled")
    ov = a.server.app.dependency_overrides
    saved = {get_settings: get_settings}
    print(len(ov))
    try:
        sink = TiledSink(a.client, "x"); sink.prepare(SHAPE, trust=True, metadata=md)
        image = StitchedImage(block, block, block, grid, 1, trust=block, offset=(100, 0))
        res={'override':[], 'none':[]}; cpu={'override':[], 'none':[]}
        for rnd in range(16):
            for mode in ("override", "none"):
                ov.clear()
                if mode == "override": ov.update(saved)
                ts = []; c0=time.process_time()
                for _ in range(8):
                    t0 = time.perf_counter(); sink.publish(image, md); ts.append(time.perf_counter() - t0)
                res[mode]+=ts; cpu[mode].append((time.process_time()-c0)/8)
        for m in res: print(m, 'wall median', round(np.median(res[m])*1e3,1), 'cpu/publish', round(np.median(cpu[m])*1e3,1))
    finally:
        ov.update(saved)
        a.close()
