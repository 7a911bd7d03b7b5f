"""End-to-end live throughput against model-only throughput, and frame-to-Tiled latency.

A real RunEngine flies the simulated detector (a 100x100 scan of 64x64 frames, as fast as it can)
into an embedded Tiled server, with TiledWriter and the PtychoNN callback subscribed. End-to-end
throughput is frames / (first frame reaching the callback -> final image written in Tiled), and
the time from the last frames' arrival to the final image is reported beside it; model-only
throughput is the same model on the same frames, already preprocessed and in memory, at the same
batch size (the best of three passes). Latency is measured in a second scan whose detector is
paced at a third of the end-to-end rate (a detector faster than the whole pipeline only measures
its backlog: on the 10,000-frame scan at half the rate, the embedded server's median grew to
4.3 s, p95 8.5 s), and as long as the first (a short scan measures the start-up): from a frame
reaching the callback (its StreamDatum, once the detector has flushed it) to the first snapshot
in Tiled that includes it; into the embedded server and again into ``tiled serve catalog`` in its
own process, as a facility runs it. Then, into each, the fastest detector the analysis keeps up
with, the image within 2 s: paced scans of a few seconds, bisected between that third and 1.5
times the end-to-end rate. On a CPU machine the simulated detector, TiledWriter and
the Tiled server share the cores with inference, which caps the end-to-end ratio.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bluesky_ptychonn.archive.servers import connect
from bluesky_ptychonn.core.checkpoint import CheckpointInfo
from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.network import PtychoNN
from bluesky_ptychonn.core.preprocess import preprocess

from machine import describe, device_name, free_port

#: A paced scan's analysis kept up when its detector made this share of the frames/s it was paced
#: at, and the latency of the scan's last two thirds had a median under KEEP_UP_LATENCY_S.
KEEP_UP_PACE = 0.95
KEEP_UP_LATENCY_S = 2.0


def _latencies(live) -> np.ndarray:
    out = []
    for t_submit, count in live.submit_log:
        t_pub = next((t for t, done in live.publish_log if done >= count), None)
        if t_pub is not None:
            out.append(t_pub - t_submit)
    return np.asarray(out)


def _scan(client, data_dir, predictor, options, rows: int, period: float | None = None):
    """One fly scan of ``rows`` x ``rows`` into ``client`` with TiledWriter and the callback subscribed.

    ``period``: the detector paced at one frame per ``period`` seconds (else as fast as it can).
    Returns the run's LiveReconstruction, the detector, and when the RunEngine's scan ended (the
    stop document made) with the frames the callback had stitched by then.
    """
    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import subscribe_archive
    from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback

    run_engine = RunEngine({})
    subscribe_archive(run_engine, client)
    callback = PtychoNNCallback(predictor, client, CallbackConfig(data_roots=[data_dir], live=options))
    run_engine.subscribe(callback)
    stage = SimStage(name="stage")
    detector = PtychoDetector(name="ptycho", stage=stage, data_dir=data_dir, sample="sim-features-0")
    pacing = {}
    if period is not None:
        detector.settings = detector.settings.updated(paced=True, chunk_frames=8)
        pacing = {"exposure_s": period, "flush_period_s": 0.1}
    (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=6e-7, shape=(rows, rows), **pacing))
    live = callback.runs[uid].live
    scan_end = (time.time(), live.stitcher.frames)
    callback.wait(uid, 1800)
    return live, detector, scan_end


def _latency_figures(live) -> dict:
    lat = _latencies(live)
    return {
        "latency_median_s": round(float(np.median(lat)), 3) if len(lat) else None,
        "latency_p95_s": round(float(np.percentile(lat, 95)), 3) if len(lat) else None,
        "publish_mean_s": round(live.timings["publish_s"] / max(1, len(live.publish_log)), 3),
    }


def _keeps_up(live, rate: float) -> list:
    """[asked, made frames/s, late latency s, kept up] of a paced scan: whether its analysis kept up
    with its detector, the image within KEEP_UP_LATENCY_S.

    Kept up: the detector made at least KEEP_UP_PACE of the frames/s it was paced at (the
    simulated one shares the cores with the analysis, so an analysis that takes too many slows the
    detector instead of falling behind it; a real detector is other hardware) and the median
    latency of the scan's last two thirds is under KEEP_UP_LATENCY_S (the first third holds the
    start-up: the result prepared in Tiled, the first publishes). A bound on the latency, not on
    its growth: over a scan of seconds the publish cadence's sawtooth hides a slow growth.
    """
    lat = _latencies(live)  # the submissions that reached Tiled: all but any after the last publish
    arrivals = np.asarray([t for t, _ in live.submit_log[: len(lat)]])
    (t0, n0), (t1, n1) = live.submit_log[0], live.submit_log[-1]
    made = (n1 - n0) / max(t1 - t0, 1e-9)
    late = float(np.median(lat[arrivals >= arrivals[0] + (arrivals[-1] - arrivals[0]) / 3]))
    return [round(rate, 1), round(made, 1), round(late, 2), made >= KEEP_UP_PACE * rate and late < KEEP_UP_LATENCY_S]


def _keep_up(client, data_dir, predictor, options, first: list, seconds: float, steps: int) -> dict:
    """The fastest paced detector the live path keeps up with (:func:`_keeps_up`), into ``client``.

    ``first``: the latency scan's trial (:func:`_keeps_up`). When it kept up,
    4.5 times its rate (1.5 times the unpaced end-to-end rate), then ``steps`` geometric
    bisections, each a paced scan of about ``seconds``.
    """
    trials = [first]

    def keeps_up(rate: float) -> bool:
        rows = max(16, int(np.ceil(np.sqrt(seconds * rate))))
        trials.append(_keeps_up(_scan(client, data_dir, predictor, options, rows, 1.0 / rate)[0], rate))
        return trials[-1][-1]

    low, high = first[0], 4.5 * first[0]
    if first[-1] and not keeps_up(high):
        for _ in range(steps):
            mid = (low * high) ** 0.5
            low, high = (mid, high) if keeps_up(mid) else (low, mid)
    kept = [asked for asked, _, _, ok in trials if ok]
    behind = [asked for asked, _, _, ok in trials if not ok]
    return {
        "keeps_up_frames_per_s": max(kept) if kept else None,
        "falls_behind_frames_per_s": min(behind) if behind else None,
        "keep_up_trials": trials,
    }


def _paced(client, data_dir, predictor, options, rows: int, period: float, search: tuple[float, int]) -> dict:
    """The latency scan into ``client``, paced at one frame per ``period``, then the keep-up search from its pace."""
    live = _scan(client, data_dir, predictor, options, rows, period)[0]
    return _latency_figures(live) | _keep_up(client, data_dir, predictor, options, _keeps_up(live, 1 / period), *search)


def run(quick: bool = False) -> dict:
    from bluesky_ptychonn.archive.servers import FacilityServer, start_embedded_server
    from bluesky_ptychonn.core.engine import LiveOptions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = describe(device)
    # A scan long enough to time the steady state: at 800-1,000 frames/s on the 2-core CPU, a
    # 40x40 scan lasted 2 s, of which preparing the result and writing the final image took 1.3.
    # A GPU also wants large micro-batches.
    rows = 16 if quick else 100
    batch = 1024 if device == "cuda" else 64
    options = LiveOptions(batch_size=batch, publish_interval_s=0.5)
    # Seconds of each paced scan and bisections; shorter on a GPU, whose run (benchmarks/gpu.sh) has 7 minutes.
    keep_up_search = (3.0, 2) if quick or device == "cuda" else (8.0, 4)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
        facility = FacilityServer(
            Path(tmp) / "facility",
            secrets.token_hex(16),
            readable=[archive.data_dir],
            port=free_port(),
            log=Path(tmp) / "tiled.log",
        )
        try:
            facility.start()
            facility_client, _ = connect(facility.uri, api_key=facility.api_key)
            for preset in ("small", "paper"):
                torch.manual_seed(0)
                net = NetworkConfig.preset(preset)
                info = CheckpointInfo(net, PreprocessRecipe(scale=0.01), content_hash=preset)
                predictor = Predictor(PtychoNN(net).eval(), info, device=device)
                scanned = _scan(archive.client, archive.data_dir, predictor, options, rows)
                live, detector, (scan_end, done_at_end) = scanned
                frames = live.metadata["frames_done"]
                e2e = frames / (live.publish_log[-1][0] - live.metadata["first_frame"])  # to the final image in Tiled
                # Once the simulated detector, TiledWriter and the RunEngine have stopped, the cores are the
                # analysis's: what a beamline's analysis host sees, where the detector is other hardware.
                after = (frames - done_at_end) / (live.publish_log[-1][0] - scan_end)
                tail = live.publish_log[-1][0] - live.submit_log[-1][0]  # last frames in -> final image written
                x = preprocess(live_frames(detector.path), predictor.info.recipe)
                model_only = model_only_rate(predictor, x)
                # Latency: a paced scan at a third of the end-to-end rate just measured (a detector
                # faster than the whole pipeline only measures the backlog it builds; the paced
                # detector flushes twice as often, registered in Tiled once a second), into the in-process
                # server and into a Tiled server in its own process, as a facility runs it.
                period = 3.0 / e2e
                paced, apart = (
                    _paced(client, archive.data_dir, predictor, options, rows, period, keep_up_search)
                    for client in (archive.client, facility_client)
                )
                row = {
                    "device": device_name(machine),
                    "network": preset,
                    "frames": frames,
                    "batch": predictor.batch_size,
                    "micro_batch": batch,
                    "paced_frame_period_s": round(period, 4),
                    "end_to_end_frames_per_s": round(e2e, 1),
                    "model_only_frames_per_s": round(model_only, 1),
                    "ratio": round(e2e / model_only, 3),
                    "last_frames_to_final_image_s": round(tail, 2),
                    "stitched_at_scan_end": round(done_at_end / frames, 3),
                    "after_scan_frames_per_s": round(after, 1),
                    "after_scan_ratio": round(after / model_only, 3),
                    **paced,
                    **{f"tiled_apart_{key}": value for key, value in apart.items()},
                    "publish_interval_s": options.publish_interval_s,
                }
                results.append(row)
                print(
                    f"   {row['device'][:40]:40s} {preset:5s} {frames} frames: live {e2e:.1f} frames/s, "
                    f"model only {model_only:.1f} frames/s, ratio {row['ratio']:.2f} (target >= 0.9), "
                    f"last frames in -> final image {tail:.2f} s; {done_at_end / frames:.0%} stitched as the scan "
                    f"ended, then {after:.1f} frames/s ({after / model_only:.2f} of model only); "
                    f"paced at {1 / period:.0f} frames/s: frame -> Tiled latency median {paced['latency_median_s']} s, "
                    f"p95 {paced['latency_p95_s']} s, a publish {paced['publish_mean_s']} s; keeps up at "
                    f"{paced['keeps_up_frames_per_s']} frames/s, falls behind at {paced['falls_behind_frames_per_s']} "
                    f"([asked, made, late latency, kept] {paced['keep_up_trials']}); with Tiled in its own process "
                    f"median {apart['latency_median_s']} s, p95 {apart['latency_p95_s']} s, "
                    f"a publish {apart['publish_mean_s']} s, keeps up at {apart['keeps_up_frames_per_s']} frames/s, "
                    f"falls behind at {apart['falls_behind_frames_per_s']} ({apart['keep_up_trials']})"
                )
        finally:
            facility.stop()
            archive.close()
    return {
        "benchmark": "live end-to-end vs model-only",
        "machine": machine,
        "results": results,
        "note": (
            "latency excludes the detector's flush period before its StreamDatum is emitted; after_scan_*: from "
            "the RunEngine's end of the unpaced scan (stitched_at_scan_end of the frames done by then) to the final "
            "image, when the simulated acquisition no longer shares the cores; publish_mean_s: "
            "the mean time of one publish (six Tiled requests) during the paced scan; "
            "keeps_up_/falls_behind_frames_per_s: the fastest detector pace kept up with into the embedded server "
            "and the slowest not (kept up: the detector made 95 % of that pace, the median latency over the scan's "
            "last two thirds under 2 s; keep_up_trials: [frames/s asked, made, that latency, kept up] of each paced "
            "scan, the latency scan first); "
            "tiled_apart_*: the same paced scan and search into `tiled serve catalog` in its own process, to which "
            "the four arrays' patches go together"
        ),
    }


def model_only_rate(predictor, x: np.ndarray, rounds: int = 3) -> float:
    """Frames/s of the predictor alone on preprocessed frames in memory: the best of ``rounds`` passes.

    One pass swung from 348 to 528 frames/s between runs on the 2-core VM; the best of three is
    the steadier reference for an end-to-end ratio (and the harder one to reach).
    """
    predictor.predict_preprocessed(x[:64])  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        predictor.predict_preprocessed(x)
        best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def live_frames(path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f["entry/data/data"][()]
