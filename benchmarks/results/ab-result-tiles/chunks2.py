"""One whole-image chunk vs tiles that divide the grid, on the embedded server: write, read, patches."""
import tempfile, time
from pathlib import Path
import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource
from bluesky_ptychonn.archive.servers import start_embedded_server

def tile(n, lo=128, hi=512, target=256):
    for low in (lo, 32):
        ds = [d for d in range(low, min(hi, n) + 1) if n % d == 0]
        if ds:
            return min(ds, key=lambda d: abs(d - target))
    return n

def new(node, key, shape, tiled):
    chunks = tuple(((tile(n),) * (n // tile(n))) if tiled else (n,) for n in shape)
    s = ArrayStructure(shape=shape, chunks=chunks, dims=("y", "x"), data_type=BuiltinDtype.from_numpy_dtype(np.dtype(np.float32)))
    return node.new(StructureFamily.array, [DataSource(structure=s, structure_family=StructureFamily.array)], key=key)

med = lambda ts: f"{np.median(ts)*1e3:.0f}"
with tempfile.TemporaryDirectory() as tmp:
    a = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    try:
        root = a.client.create_container("t")
        for shape in ((400, 400), (1240, 1240), (1225, 1922), (2600, 2600)):
            for tiled in (False, True):
                arr = new(root, f"a{shape}_{tiled}", shape, tiled)
                whole = np.random.rand(*shape).astype(np.float32)
                t0 = time.perf_counter(); arr.patch(whole, offset=(0, 0)); tw = time.perf_counter() - t0
                rs = []
                for _ in range(3):
                    t0 = time.perf_counter(); got = arr.read(); rs.append(time.perf_counter() - t0)
                assert got.shape == whole.shape and np.array_equal(got, whole)
                out = {}
                for name, b in (("block130", np.ones((130, 130), np.float32)), ("band60", np.ones((60, shape[1]), np.float32))):
                    ts = []
                    for k in range(8):
                        y = (k * 97) % (shape[0] - 130); x = 0 if b.shape[1] == shape[1] else (k * 53) % (shape[1] - 130)
                        t0 = time.perf_counter(); arr.patch(b, offset=(y, x)); ts.append(time.perf_counter() - t0)
                        whole[y:y + b.shape[0], x:x + b.shape[1]] = 1
                    out[name] = med(ts)
                assert np.array_equal(arr.read(), whole)
                print(shape, arr.chunks[0][0], arr.chunks[1][0], f"whole write {tw*1e3:.0f} ms, read {med(rs)} ms, block130 {out['block130']} ms, band60 {out['band60']} ms", flush=True)
    finally:
        a.close()
