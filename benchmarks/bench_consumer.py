"""The out-of-process consumer: end-to-end throughput, and memory and losses over a 100,000-frame scan.

A real RunEngine flies the simulated detector (64x64 frames, HDF5 files) into an embedded Tiled
server and publishes its documents through a real ``bluesky-0MQ-proxy`` to
``bluesky-ptychonn consume`` running in its own process, which writes the image into the same
Tiled server. Two scans, both unpaced (frames wait on disk while the consumer catches up):

* throughput: frames / (first frame reaching the consumer -> result seen ``complete`` in Tiled),
  against the same model on the same frames in memory (model-only, the best of three passes) at
  the same batch size, on a 1,600-frame scan (start-up and the final write weigh in) and over the long scan below;
* memory: a 250 x 400 = 100,000-frame scan; the consumer's resident memory (``/proc``) after its
  first 10,000 frames, at the end and at its peak, and the frames lost (done, missing, skipped or
  dropped, from the result's metadata);
* where the cores went over the long scan, while it was flown and from its end to the result's
  end: the consumer's process, this one's and the machine's idle time (``/proc``), so that a ratio
  below 1 shows whether the consumer lacked cores or did more than the model with them.

On this benchmark's 2-core machine the RunEngine, detector, TiledWriter and Tiled server share
the cores with the consumer's inference.
"""

from __future__ import annotations

import os
import pickle
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from machine import cores_between, cpu_seconds, describe, device_name, free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[model]
checkpoint = "{checkpoint}"
device = "{device}"
[tiled]
uri = "{tiled_uri}"
[zmq]
address = "{zmq_out}"
publish_address = "{zmq_in}"
[callback]
data_roots = ["{data_root}"]
[live]
batch_size = {batch}
max_wait_s = 0.2
publish_interval_s = 0.5
"""


def _memory_mib(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of ``pid`` (Linux /proc), MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


class _Consumer:
    """``bluesky-ptychonn consume`` in a subprocess, its stderr read on a thread."""

    def __init__(self, config: Path, api_key: str) -> None:
        env = {**os.environ, "TILED_API_KEY": api_key}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bluesky_ptychonn.cli", "consume", "--config", str(config)],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put((time.time(), line))

    def wait_for(self, pattern: str, timeout: float = 120, poke=None) -> float:
        """Wait for a line in which the regular expression ``pattern`` is found; return when it came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if poke is not None:
                poke()
            try:
                said_at, line = self.lines.get(timeout=0.25)
                if re.search(pattern, line):
                    return said_at
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        raise RuntimeError(f"the consumer never said {pattern!r}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _cpu(consumer_pid: int) -> dict[str, float]:
    """CPU seconds so far of the consumer's process, of this one (RunEngine, detector, TiledWriter,
    Tiled server) and of the machine, busy and idle."""
    machine = cpu_seconds()
    return {"consumer": cpu_seconds(consumer_pid)["process"], "benchmark": machine.pop("process"), **machine}


def _watch(client, uids: list, consumer: _Consumer, timeout_s: float, poll_s: float, first_after: int = 10_000) -> dict:
    """Poll the result of the run whose uid lands in ``uids`` every ``poll_s`` until it is no longer running.

    Started before the scan, in a thread: the consumer's memory is sampled from its first frame,
    while the RunEngine still flies, not only once the scan is over.
    """
    samples, progress, seen_done = [], [], None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            md = dict(client["processed"][uids[0]]["ptychonn"].metadata) if uids else {}
        except KeyError:
            md = {}
        memory = _memory_mib(consumer.process.pid)
        samples.append((md.get("frames_done", 0), memory["VmRSS"]))
        progress.append((time.time(), md.get("frames_done", 0)))
        if md and md.get("status") != "running":
            seen_done, cpu_done = time.time(), _cpu(consumer.process.pid)
            break
        time.sleep(poll_s)
    if seen_done is None:
        raise RuntimeError(f"run {uids} did not finish within {timeout_s:.0f} s")
    after_first = next((rss for done, rss in samples if done >= first_after), samples[-1][1])
    return {"metadata": md, "seen_done": seen_done, "cpu_done": cpu_done, "rss_after_first": after_first,
            "memory": memory, "samples": samples, "progress": progress}  # fmt: skip


def _after_scan(progress: list[tuple[float, int]], scan_end: float, seen_done: float, frames: int) -> tuple[int, float]:
    """(frames published as the scan ended, frames/s from then to the result's end).

    From the published progress, sampled once a second: the rate starts at the first sample after
    the scan's end that shows a new publish (its count is fresh then), so it is within a second's
    frames of the truth.
    """
    before = [done for t, done in progress if t <= scan_end]
    at_end = before[-1] if before else 0
    later = [(t, done) for t, done in progress if t > scan_end and done > at_end]
    t0, done0 = later[0] if later else (scan_end, at_end)
    return at_end, (frames - done0) / max(seen_done - t0, 1e-9)


def _rss_curve(samples: list[tuple[int, float]], total: int, points: int = 10) -> list[list[float]]:
    """The consumer's resident MiB at each tenth of the scan's frames: [frames done, MiB]."""
    curve = []
    for k in range(1, points + 1):
        hit = next(((done, rss) for done, rss in samples if done >= total * k // points), None)
        if hit is not None:
            curve.append([hit[0], round(hit[1], 1)])
    return curve


def run(quick: bool = False) -> dict:
    import zmq
    from bench_live import live_frames, model_only_rate
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_archive
    from bluesky_ptychonn.core.checkpoint import CheckpointInfo, save_checkpoint
    from bluesky_ptychonn.core.config import NetworkConfig, PreprocessRecipe
    from bluesky_ptychonn.core.inference import Predictor
    from bluesky_ptychonn.core.network import PtychoNN
    from bluesky_ptychonn.core.preprocess import preprocess
    from bluesky_ptychonn.live.wire import serialize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = describe(device)
    batch = 64
    throughput_shape = (16, 16) if quick else (40, 40)
    memory_shape = (100, 200) if quick else (250, 400)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = start_embedded_server(tmp / "data", directory=tmp / "tiled")
        zmq_in, zmq_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        proxy_script = Path(sys.executable).with_name("bluesky-0MQ-proxy")
        proxy = subprocess.Popen(
            [str(proxy_script) if proxy_script.exists() else shutil.which("bluesky-0MQ-proxy"),
             "--in-address", zmq_in, "--out-address", zmq_out],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        torch.manual_seed(0)
        net = NetworkConfig.preset("small")
        checkpoint = tmp / "small.safetensors"
        save_checkpoint(checkpoint, PtychoNN(net).eval(), CheckpointInfo(net, PreprocessRecipe(scale=0.01)))
        config = tmp / "ptychonn.toml"
        config.write_text(
            CONFIG.format(
                checkpoint=checkpoint,
                device=device,
                tiled_uri=archive.server.uri.split("/api/v1")[0],
                zmq_out=zmq_out,
                zmq_in=zmq_in,
                data_root=archive.data_dir,
                batch=batch,
            )
        )
        consumer = _Consumer(config, archive.server.api_key)
        publishers = []
        try:
            consumer.wait_for("consuming documents")
            publisher = Publisher(zmq_in, serializer=serialize)
            # A 0MQ PUB drops what it sends before the subscriber is connected: probe with a message
            # the consumer refuses (and says so) until it answers.
            probe = Publisher(zmq_in, serializer=pickle.dumps)
            publishers += [publisher, probe]
            consumer.wait_for("dropped a 0MQ message", poke=lambda: probe("start", {"uid": "probe", "time": 0.0}))
            run_engine = RunEngine({})
            subscribe_archive(run_engine, archive.client)
            run_engine.subscribe(publisher)
            stage = SimStage(name="stage")
            detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-0")

            (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=6e-7, shape=throughput_shape))
            # The end: the consumer's one line per run, logged once the final image is in Tiled. Polling
            # the result every 0.05 s instead cost the server, on the same two cores, a request each time.
            written = consumer.wait_for(f"run {uid[:8]}: \\w+, \\d+ frames in ", timeout=1800)
            md = dict(archive.client["processed"][uid]["ptychonn"].metadata)
            e2e = md["frames_done"] / (written - md["first_frame"])
            predictor = Predictor.from_checkpoint(checkpoint, device=device)
            model_only = model_only_rate(predictor, preprocess(live_frames(detector.path), predictor.info.recipe))
            print(
                f"   out of process, small network, {md['frames_done']} frames: {e2e:.1f} frames/s, model only "
                f"{model_only:.1f} frames/s, ratio {e2e / model_only:.2f} (target >= 0.9)"
            )

            uids: list[str] = []
            watched: dict = {}
            watcher = threading.Thread(
                target=lambda: watched.update(_watch(archive.client, uids, consumer, timeout_s=7200, poll_s=1.0)),
                daemon=True,
            )
            token = run_engine.subscribe(lambda name, doc: uids.append(doc["uid"]), "start")
            started, started_wall, cpu_start = time.monotonic(), time.time(), _cpu(consumer.process.pid)
            watcher.start()
            run_engine(ptycho_fly_scan(detector, stage, step_m=2.4e-7, shape=memory_shape))
            scan_end, cpu_scan_end = time.time(), _cpu(consumer.process.pid)
            run_engine.unsubscribe(token)
            watcher.join()
            if not watched:
                raise RuntimeError("the long scan's result was not followed to its end (see the watcher's traceback)")
            big = watched["metadata"]
            long_s = time.monotonic() - started
            long_rate = big["frames_done"] / (watched["seen_done"] - big["first_frame"])
            total = memory_shape[0] * memory_shape[1]
            lost = total - big["frames_done"]
            rss_first, rss_final = watched["rss_after_first"], watched["memory"]["VmRSS"]
            at_end, after = _after_scan(watched["progress"], scan_end, watched["seen_done"], big["frames_done"])
            # Where the two cores went, while the scan was flown and from its end to the result's end.
            cores = {
                "during_scan": cores_between(cpu_start, cpu_scan_end, scan_end - started_wall),
                "after_scan": cores_between(cpu_scan_end, watched["cpu_done"], watched["seen_done"] - scan_end),
            }
            print(
                f"   {total} frames in {long_s:.0f} s ({long_rate:.1f} frames/s, {long_rate / model_only:.2f} of model "
                f"only; {at_end / total:.0%} published as the scan ended, then {after:.1f} frames/s, "
                f"{after / model_only:.2f}): status {big['status']}, lost {lost}; "
                f"consumer memory after 10,000 frames {rss_first:.0f} MiB, final {rss_final:.0f} MiB "
                f"({rss_final / rss_first - 1:+.1%}; target within 10 %), peak {watched['memory']['VmHWM']:.0f} MiB; "
                f"[frames, MiB] at each tenth: {_rss_curve(watched['samples'], total)}"
            )
            for window, used in cores.items():
                print(
                    f"   cores {window.replace('_', ' ')}: consumer {used['consumer']:.2f}, RunEngine, detector and "
                    f"Tiled server {used['benchmark']:.2f}, machine busy {used['busy']:.2f}, idle {used['idle']:.2f}"
                )
        finally:
            for p in publishers:  # with messages queued for the stopped proxy, a garbage-collected
                p._socket.setsockopt(zmq.LINGER, 0)  # context's term() would block the process for good
                p.close()
            consumer.stop()
            proxy.terminate()
            archive.close()
    return {
        "benchmark": "out-of-process consumer (0MQ proxy) end-to-end, memory and losses",
        "machine": machine,
        "results": [
            {
                "device": device_name(machine),
                "network": "small",
                "batch": batch,
                "frames": md["frames_done"],
                "end_to_end_frames_per_s": round(e2e, 1),
                "model_only_frames_per_s": round(model_only, 1),
                "ratio": round(e2e / model_only, 3),
                "long_scan_frames": total,
                "long_scan_status": big["status"],
                "frames_lost": lost,
                "frames_missing": big.get("frames_missing"),
                "frames_skipped": big.get("frames_skipped"),
                "frames_dropped": big.get("frames_dropped"),
                "long_scan_s": round(long_s, 1),
                "long_scan_frames_per_s": round(long_rate, 1),
                "long_scan_ratio": round(long_rate / model_only, 3),
                "long_scan_published_at_scan_end": round(at_end / total, 3),
                "long_scan_after_scan_frames_per_s": round(after, 1),
                "long_scan_after_scan_ratio": round(after / model_only, 3),
                "rss_after_10k_mib": round(rss_first, 1),
                "rss_final_mib": round(rss_final, 1),
                "rss_growth": round(rss_final / rss_first - 1, 3),
                "rss_peak_mib": round(watched["memory"]["VmHWM"], 1),
                "rss_curve_frames_mib": _rss_curve(watched["samples"], total),
                **{
                    f"long_scan_{window}_{key}_cores": round(value, 2)
                    for window, used in cores.items()
                    for key, value in used.items()
                },
            }
        ],
        "note": (
            "the consumer's own process; RunEngine, detector and Tiled server run in the benchmark's process; "
            "long_scan_after_scan_*: from the end of the RunEngine's scan (the frames published by then) to the "
            "result's end, when the simulated acquisition no longer shares the cores; *_cores: the mean cores taken "
            "by the consumer's process, by the benchmark's (RunEngine, detector, TiledWriter, Tiled server) and by "
            "the whole machine (busy, idle), while the long scan was flown and from its end to the result's end"
        ),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run(quick="--quick" in sys.argv)
