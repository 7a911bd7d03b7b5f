"""Document streams, fuzzed: shuffled, duplicated, truncated, malformed and interleaved runs.

Each generated stream is fed to a fresh callback (no Tiled; the tiny test model). Whatever the
stream, the callback never raises, every run that was stopped reaches a final state that does not
lie (never ``complete`` without an image), and every frame that was valid when it arrived (after
its descriptor, before its stop, finite, on the grid, in a well-formed page) is in the image.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_callback import _inline_run

from bluesky_ptychonn import schema
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback
from bluesky_ptychonn.sim.physics import simulate_scan

#: Generated streams per run of the suite: issue 11 asks for at least 1,000 (about 36 s on the 2-core VM).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 1000))
OPTIONS = LiveOptions(batch_size=8, max_wait_s=0.0, publish_interval_s=60, saturation_counts=1e9, idle_timeout_s=5)
FINAL = {"complete", "failed", "aborted"}

# Damage done to one page of frames, and whether its frames stay valid.
DAMAGE = {
    "none": True,
    "nan": False,  # one frame NaN: only that frame is lost
    "saturated": False,
    "off_grid": False,
    "wrong_shape": False,  # the whole page is refused
    "wrong_dtype": False,
    "missing_key": False,
    "duplicate": True,  # sent twice: counted once
}


@pytest.fixture(scope="module")
def world(checkpoint):
    geometry = DetectorGeometry(frame_pixels=32)
    scan = simulate_scan(geometry=geometry, scan_shape=(4, 4), probe={"kind": "gaussian", "fwhm_px": 8})
    section = {
        "version": schema.VERSION,
        **geometry.model_dump(),
        "scan": {"shape": [4, 4], "step_m": scan.metadata["scan"]["step_m"], "center_m": [0, 0]},
    }
    return scan, section, Predictor.from_checkpoint(checkpoint, device="cpu")


def _pages(docs, cuts):
    """Split the run's one EventPage at ``cuts`` (sorted point indices) into several pages."""
    page = docs[2][1]
    bounds = [0, *cuts, len(page["seq_num"])]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            part = {k: (v[a:b] if isinstance(v, list) else v) for k, v in page.items()}
            part["data"] = {k: v[a:b] for k, v in page["data"].items()}
            part["timestamps"] = {k: v[a:b] for k, v in page["timestamps"].items()}
            out.append(part)
    return out


def _damage(page, kind, rng):
    """Apply ``kind`` to a copy of ``page``; return it and the ids of its frames that stay valid."""
    page = {**page, "data": {k: list(v) for k, v in page["data"].items()}}
    ids = list(page["data"]["frame_id"])
    valid = set(ids) if DAMAGE[kind] else set()
    i = int(rng.integers(len(ids)))
    frames = page["data"]["diffraction"]
    if kind == "nan":
        frames[i] = np.where(np.arange(frames[i].size).reshape(frames[i].shape) == 7, np.nan, frames[i])
        valid = set(ids) - {ids[i]}
    elif kind == "saturated":
        frames[i] = frames[i] + 1e10
        valid = set(ids) - {ids[i]}
    elif kind == "off_grid":
        page["data"]["positions_m"][i] = np.asarray(page["data"]["positions_m"][i]) + 1.0  # a metre away
        valid = set(ids) - {ids[i]}
    elif kind == "wrong_shape":
        page["data"]["diffraction"] = [f[:16, :16] for f in frames]
    elif kind == "wrong_dtype":
        page["data"]["diffraction"] = [np.full(f.shape, "x") for f in frames]
    elif kind == "missing_key":
        del page["data"]["positions_m"]
    return page, valid


@st.composite
def runs(draw, world, tag):
    """One run's documents in the order they are sent, and the frame ids that must be in its image."""
    scan, section, _ = world
    n = len(scan.frames)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    docs = _inline_run(scan.frames, scan.positions_m, section, frame_ids=scan.frame_ids, tag=tag)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4)))
    pages = []
    expected: set[int] = set()
    for page in _pages(docs, cuts):
        kind = draw(st.sampled_from(sorted(DAMAGE)))
        page, valid = _damage(page, kind, rng)
        pages += [("event_page", page)] * (2 if kind == "duplicate" else 1)
        expected |= valid
    order = draw(st.permutations(range(len(pages))))
    body = [pages[i] for i in order]
    stop_at = draw(st.sampled_from(["end", "early", "never"]))
    if stop_at == "early":  # frames after the stop are lost by design, and said so in the log
        k = draw(st.integers(0, len(body)))
        expected = {i for _, p in body[:k] for i in _valid_in(p, expected)}
        body = body[:k] + [docs[-1]] + body[k:]
    elif stop_at == "end":
        body = body + [docs[-1]]
    else:
        expected = set()  # no stop: the run must still say ``running``, never a final state
    garbage = draw(st.lists(st.sampled_from(["unknown_descriptor", "no_keys", "not_a_dict"]), max_size=2))
    for g in garbage:
        body.insert(draw(st.integers(0, len(body))), _garbage(g))
    return {"uid": docs[0][1]["uid"], "docs": [docs[0], docs[1], *body], "expected": expected, "stop": stop_at}


def _valid_in(page, valid):
    return [i for i in page["data"].get("frame_id", []) if i in valid]


def _garbage(kind):
    return {
        "unknown_descriptor": ("event_page", {"descriptor": "no-such-descriptor", "data": {}}),
        "no_keys": ("stream_datum", {}),
        "not_a_dict": ("descriptor", "not a document"),
    }[kind]


def _interleave(a, b, choices):
    """Merge two document lists, keeping each one's order."""
    out, i, j = [], 0, 0
    for pick in choices:
        if pick and i < len(a):
            out.append(a[i])
            i += 1
        elif j < len(b):
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]


def _check(callback, run):
    uid = run["uid"]
    live = callback.runs[uid].live
    assert live is not None
    if run["stop"] == "never":
        assert live.metadata["status"] == "running"
        live.finish("interrupted")  # what the idle timeout would do: release the threads now
        assert live.wait(10)
        return
    assert callback.wait(uid, 20), live.metadata
    md = live.metadata
    assert md["status"] in FINAL, md
    assert md["status"] != "complete" or md["frames_done"] > 0, md
    image = live.snapshot()
    assert image.frames == md["frames_done"] == len(run["expected"]), (md, sorted(run["expected"]))
    # Nothing lost silently: every point of the scan is in the image, counted as dropped, or missing.
    assert md["frames_done"] + md["frames_dropped"] + md["frames_missing"] == md["frames_expected"] == 16, md


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same streams on every run of the suite: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_document_stream_ends_in_a_defined_state(world, data):
    first = data.draw(runs(world, "a"))
    two = data.draw(st.booleans())
    callback = PtychoNNCallback(world[2], None, CallbackConfig(live=OPTIONS))
    if two:
        second = data.draw(runs(world, "b"))
        choices = data.draw(st.lists(st.booleans(), min_size=40, max_size=40))
        stream = _interleave(first["docs"], second["docs"], choices)
    else:
        stream = first["docs"]
    for name, doc in stream:
        callback(name, doc)  # never raises: a RunEngine would abort the scan
    assert callback.flush(30)
    for run in [first, second] if two else [first]:
        _check(callback, run)
