"""What archiving costs a paced scan, in cores of this process (RunEngine, detector, TiledWriter, embedded server).

A 40x40 scan paced at 94 frames/s, a flush every 0.1 s: unarchived, then through
``subscribe_archive`` registering every flush (``register_every_s=0``) and merged over 1 s; the
requests to the server counted.

    python archive_cores.py
"""
import tempfile
import time
from collections import Counter
from pathlib import Path

from bluesky import RunEngine

from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive

with tempfile.TemporaryDirectory() as tmp:
    archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
    requests: list = []
    archive.client.context.http_client.event_hooks["request"].append(lambda r: requests.append((r.method, r.url.path)))
    try:
        for every in (None, 0.0, 1.0):
            stage = SimStage(name="stage")
            detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-0")
            detector.settings = detector.settings.updated(paced=True, chunk_frames=8)
            run_engine = RunEngine({})
            if every is not None:
                subscribe_archive(run_engine, archive.client, register_every_s=every)
            requests.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            run_engine(ptycho_fly_scan(detector, stage, step_m=6e-7, shape=(40, 40), exposure_s=0.0106, flush_period_s=0.1))
            seconds = time.perf_counter() - wall
            kinds = Counter(f"{method} {'/'.join(path.split('/')[:4])}" for method, path in requests)
            label = "unarchived" if every is None else f"register_every_s={every:g}"
            print(f"{label}: {(time.process_time() - cpu) / seconds:.2f} cores over {seconds:.1f} s, {len(requests)} requests {dict(kinds)}")
    finally:
        archive.close()
