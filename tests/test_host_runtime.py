"""OpenMP thread teams: the live engine's inference thread is the only one with a team while it runs,
and it runs with its workers at a lower priority than the rest.

libgomp slows every team's workers once all of them together outnumber the CPUs
(:func:`~bluesky_ptychonn.core.host_runtime.release_openmp_team`). Each check runs in a fresh
interpreter, so the count of its threads is the engine's alone.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")

PRELUDE = """
import os, time
import torch
from bluesky_ptychonn.core.host_runtime import _loaded_libgomp, release_openmp_team

def threads():
    return len(os.listdir("/proc/self/task"))

def settled(expected):  # a released worker leaves within moments
    deadline = time.monotonic() + 10
    while threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()

torch.set_num_threads(2)
torch.ones(4_000_000).add_(1)  # a parallel region on this thread: it has a team now
if _loaded_libgomp() is None:
    print("no libgomp")
    raise SystemExit(0)
"""


def _run(body: str) -> str:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "no libgomp":
        pytest.skip("torch here does not run on libgomp")
    return done.stdout


def test_releasing_a_threads_team_lets_its_idle_workers_exit():
    out = _run(
        """
        before = threads()
        assert release_openmp_team()
        print(before - settled(before - 1))
        """
    )
    assert out.split() == ["1"]  # two torch threads: the caller and one worker, which left


def test_a_thread_that_loads_a_model_keeps_no_idle_workers():
    out = _run(
        """
        from bluesky_ptychonn.core.base_model import base_model_path
        from bluesky_ptychonn.core.inference import Predictor

        before = threads()
        Predictor.from_checkpoint(base_model_path(), device="cpu")
        print(before - settled(before - 1))
        """
    )
    assert out.split() == ["1"]  # the live engine infers on its own thread: this one's team would slow it


def test_while_a_live_reconstruction_runs_only_its_inference_thread_has_a_team():
    out = _run(
        """
        import threading
        from bluesky_ptychonn.core.base_model import base_model_path
        from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
        from bluesky_ptychonn.core.geometry import ObjectGrid
        from bluesky_ptychonn.core.inference import Predictor
        from bluesky_ptychonn.sim.physics import simulate_scan

        predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", precision="float32")
        scan = simulate_scan(scan_shape=(16, 16))
        grid = ObjectGrid.covering(
            scan.positions_m, predictor.info.recipe.pixel_size_m(scan.geometry), predictor.patch_pixels
        )

        class Counting:  # a sink that counts the process's threads at each publish
            def __init__(self):
                self.counts = []

            def publish(self, image, metadata):
                self.counts.append(threads())

        sink = Counting()
        predictor.predict(scan.frames[:64])  # this thread's team is there
        before = threads()
        live = LiveReconstruction(predictor, grid, sink, {"raw_uid": "teams"}, LiveOptions(publish_interval_s=0.05))
        live.submit(scan.frame_ids, scan.frames, scan.positions_m)
        live.finish()
        live.wait()
        print(before, max(sink.counts))
        """
    )
    before, during = map(int, out.split())
    # +2 for the worker and the publisher; the worker's team (+1) replaces the caller's (-1), and
    # the publisher, which snapshots CPU sums through numpy, starts none.
    assert during == before + 2, (before, during)


def test_the_inference_thread_and_its_workers_yield_the_cores_and_nothing_else_does():
    out = _run(
        """
        import threading
        from bluesky_ptychonn.core.base_model import base_model_path
        from bluesky_ptychonn.core.engine import LiveOptions, LiveReconstruction
        from bluesky_ptychonn.core.geometry import ObjectGrid
        from bluesky_ptychonn.core.inference import Predictor
        from bluesky_ptychonn.sim.physics import simulate_scan

        def nice_values():  # field 19 of each thread's stat
            out = []
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/stat") as stat:
                    out.append(int(stat.read().rsplit(")", 1)[1].split()[16]))
            return sorted(out)

        predictor = Predictor.from_checkpoint(base_model_path(), device="cpu", precision="float32")
        scan = simulate_scan(scan_shape=(16, 16))
        grid = ObjectGrid.covering(
            scan.positions_m, predictor.info.recipe.pixel_size_m(scan.geometry), predictor.patch_pixels
        )

        class Recording:  # a sink that records every thread's nice value at each publish
            def __init__(self):
                self.seen = []

            def publish(self, image, metadata):
                self.seen.append((os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), nice_values()))

        sink = Recording()
        BASE = os.getpriority(os.PRIO_PROCESS, 0)
        live = LiveReconstruction(predictor, grid, sink, {"raw_uid": "nice"}, LiveOptions(publish_interval_s=0.05))
        live.submit(scan.frame_ids, scan.frames, scan.positions_m)
        live.finish()
        live.wait()
        base, lowered = BASE, min(19, BASE + 10)  # the test may itself run under nice
        publisher = max(own for own, _ in sink.seen)
        niced = max(values.count(lowered) for _, values in sink.seen)  # while the worker ran
        others = max(len(values) - values.count(base) - values.count(lowered) for _, values in sink.seen)
        print(os.getpriority(os.PRIO_PROCESS, 0) - base, publisher - base, niced, others)
        """
    )
    # The worker and the OpenMP worker it started (two torch threads) at +10; the caller, the
    # publisher and every other thread stay where they were.
    assert out.split() == ["0", "0", "2", "0"], out
