"""Frames that documents point to: StreamResource/StreamDatum as bluesky-tiled-plugins reads them
(``multiplier``, multi-file ``template``) and legacy Resource/Datum through event-model's Filler.

Real HDF5 files written with h5py, real documents from event-model's ``compose_*`` helpers, the
callback without Tiled (``client=None``); every live image is compared with the same frames
reconstructed offline by the same model.
"""

import event_model
import h5py
import numpy as np
import pytest

from bluesky_ptychonn import schema
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.engine import LiveOptions
from bluesky_ptychonn.core.geometry import ObjectGrid
from bluesky_ptychonn.core.inference import Predictor
from bluesky_ptychonn.core.reconstruct import reconstruct
from bluesky_ptychonn.errors import DataPathError
from bluesky_ptychonn.live.callback import CallbackConfig, PtychoNNCallback
from bluesky_ptychonn.sim.physics import simulate_scan

FAST = LiveOptions(batch_size=16, max_wait_s=0.05, publish_interval_s=0.1, retry_s=0.1)
PIXELS = 32
POINTS = 16
OUTSIDE = "outside the configured data roots"


@pytest.fixture(scope="module")
def scan():
    """A 4 x 4 scan of 32-pixel frames, and a second exposure of each point (other photon noise)."""
    geometry = DetectorGeometry(frame_pixels=PIXELS)
    first = simulate_scan(geometry=geometry, scan_shape=(4, 4), probe={"kind": "gaussian", "fwhm_px": 8})
    second = simulate_scan(geometry=geometry, scan_shape=(4, 4), probe={"kind": "gaussian", "fwhm_px": 8}, noise_seed=1)
    # Two exposures per point, stored one after the other as a detector with multiplier 2 writes them.
    exposures = np.stack([first.frames, second.frames], axis=1).reshape(2 * POINTS, PIXELS, PIXELS)
    return first, exposures


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, device="cpu")


def _start(scan):
    section = {
        "version": schema.VERSION,
        **DetectorGeometry(frame_pixels=PIXELS).model_dump(),
        "scan": {"shape": [4, 4], "step_m": scan.metadata["scan"]["step_m"], "center_m": [0, 0]},
    }
    return event_model.compose_run(metadata={"ptychography": section})


def _descriptor(bundle, frames_shape, frames_external, positions_external=None):
    keys = {
        "diffraction": {"dtype": "array", "dtype_numpy": "<u4", "shape": frames_shape, "external": frames_external},
        "positions_m": {"dtype": "array", "dtype_numpy": "<f8", "shape": [2]},
        "frame_id": {"dtype": "integer", "dtype_numpy": "<i8", "shape": []},
    }
    for key in ("positions_m", "frame_id"):
        if positions_external:
            keys[key]["external"] = positions_external
    return bundle.compose_descriptor(name="primary", data_keys={k: {"source": "test", **v} for k, v in keys.items()})


def _write(path, **datasets):
    """An HDF5 file in areaDetector's layout, closed before the documents name it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", libver="latest") as f:
        for name, data in datasets.items():
            f.create_dataset(f"entry/data/{name}", data=data, chunks=(1, *np.shape(data)[1:]))
    return path


def _positions_resource(bundle, path):
    """StreamResources of positions and frame ids, one row per point, in the file at ``path``."""
    return [
        bundle.compose_stream_resource(
            mimetype="application/x-hdf5",
            uri=f"file://localhost{path}",
            data_key=key,
            parameters={"dataset": f"/entry/data/{key}", "swmr": True},
        )
        for key in ("positions_m", "frame_id")
    ]


def _run(callback, docs):
    for name, doc in docs:
        callback(name, doc)
    uid = docs[0][1]["uid"]
    assert callback.wait(uid, 60)
    return callback.runs[uid].live


def _assert_offline_equal(live, predictor, frames, positions):
    """The live image is the offline reconstruction of ``frames`` at ``positions`` on the same grid."""
    offline = reconstruct(predictor, frames, positions, grid=ObjectGrid.from_metadata(live.metadata["grid"]))
    image = live.snapshot()
    np.testing.assert_allclose(image.amplitude, offline.amplitude, atol=1e-5)
    np.testing.assert_allclose(image.phase, offline.phase, atol=1e-5)
    np.testing.assert_allclose(image.weight, offline.weight, rtol=1e-5)


@pytest.mark.parametrize("frames_shape", [[PIXELS, PIXELS], [2, PIXELS, PIXELS]], ids=["frame", "point"])
def test_multiplier_frames_are_averaged_per_point(scan, predictor, tmp_path, frames_shape):
    """Two frames per stream index, announced in pieces while the file already holds more frames."""
    first, exposures = scan
    # One frame more than the announced points hold: the detector has started the next point.
    extra = exposures[:1]
    frames_file = _write(tmp_path / "det.h5", data=np.concatenate([exposures, extra]))
    positions_file = _write(tmp_path / "pos.h5", positions_m=first.positions_m, frame_id=first.frame_ids)
    bundle = _start(first)
    desc = _descriptor(bundle, frames_shape, "STREAM:", "STREAM:")
    frames = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=f"file://localhost{frames_file}",
        data_key="diffraction",
        parameters={"dataset": "/entry/data/data", "multiplier": 2, "chunk_shape": [1, PIXELS, PIXELS]},
    )
    positions, ids = _positions_resource(bundle, positions_file)

    def datum(resource, start, stop):
        doc = resource.compose_stream_datum(
            indices=event_model.StreamRange(start=start, stop=stop), descriptor=desc.descriptor_doc
        )
        return ("stream_datum", doc)

    docs = [
        ("start", bundle.start_doc),
        ("descriptor", desc.descriptor_doc),
        *(("stream_resource", r.stream_resource_doc) for r in (frames, positions, ids)),
        # Frames of points 0-4 first, positions of all points, then the remaining frames and ids:
        # rows meet by stream index, whatever the order.
        datum(frames, 0, 5),
        datum(positions, 0, POINTS),
        datum(frames, 5, POINTS),
        datum(ids, 0, POINTS),
        ("stop", bundle.compose_stop()),
    ]
    live = _run(PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path], live=FAST)), docs)
    assert live.metadata["errors"] == []
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == POINTS
    averaged = exposures.reshape(POINTS, 2, PIXELS, PIXELS).mean(axis=1)
    _assert_offline_equal(live, predictor, averaged, first.positions_m)


def _template_run(scan, data_dir, files_dir):
    """Documents of a run with one HDF5 file per point, named by a ``template``; positions in one file."""
    first, _ = scan
    for i, frame in enumerate(first.frames):
        _write(files_dir / f"scan_{i}.h5", data=frame[None])
    positions_file = _write(data_dir / "pos.h5", positions_m=first.positions_m, frame_id=first.frame_ids)
    bundle = _start(first)
    desc = _descriptor(bundle, [PIXELS, PIXELS], "STREAM:", "STREAM:")
    # MultipartHDF5Consolidator names file i as uri + template.format(i): <files_dir>/scan_<i>.h5
    frames = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=f"file://localhost{files_dir}/scan",
        data_key="diffraction",
        parameters={"dataset": "/entry/data/data", "template": "_{:d}.h5", "chunk_shape": [1, PIXELS, PIXELS]},
    )
    positions, ids = _positions_resource(bundle, positions_file)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    docs += [("stream_resource", r.stream_resource_doc) for r in (frames, positions, ids)]
    for resource, ranges in (
        (frames, [(0, 3), (3, 10), (10, POINTS)]),
        (positions, [(0, POINTS)]),
        (ids, [(0, 8), (8, POINTS)]),
    ):
        for start, stop in ranges:
            doc = resource.compose_stream_datum(
                indices=event_model.StreamRange(start=start, stop=stop), descriptor=desc.descriptor_doc
            )
            docs.append(("stream_datum", doc))
    return docs + [("stop", bundle.compose_stop())]


def test_frames_split_over_template_files(scan, predictor, tmp_path):
    docs = _template_run(scan, tmp_path, tmp_path / "frames")
    live = _run(PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path], live=FAST)), docs)
    assert live.metadata["errors"] == []
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == POINTS
    _assert_offline_equal(live, predictor, scan[0].frames, scan[0].positions_m)


def test_template_files_outside_the_data_roots_are_refused(scan, predictor, tmp_path):
    """A link inside the data roots that leads outside them: the files are never read."""
    inside = tmp_path / "inside"
    (inside / "frames").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (inside / "frames" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    docs = _template_run(scan, inside, inside / "frames" / "link")
    live = _run(PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[inside], live=FAST)), docs)
    assert live.metadata["frames_done"] == 0 and live.metadata["status"] == "failed"
    refused = [e for e in live.metadata["errors"] if OUTSIDE in e]
    assert refused and all("outside/scan_" in e for e in refused), live.metadata["errors"]


def _legacy_run(scan, root, frame_per_point):
    """Documents of a run whose frames are areaDetector HDF5 (AD_HDF5), one Datum per point."""
    first, exposures = scan
    stored = exposures if frame_per_point == 2 else first.frames
    _write(root / "det.h5", data=stored)
    bundle = _start(first)
    shape = [PIXELS, PIXELS] if frame_per_point == 1 else [frame_per_point, PIXELS, PIXELS]
    desc = _descriptor(bundle, shape, "FILESTORE:")
    resource = bundle.compose_resource(
        spec="AD_HDF5", root=str(root), resource_path="det.h5", resource_kwargs={"frame_per_point": frame_per_point}
    )
    datums = resource.compose_datum_page(datum_kwargs={"point_number": list(range(POINTS))})
    ids = datums["datum_id"]
    docs = [
        ("start", bundle.start_doc),
        ("descriptor", desc.descriptor_doc),
        ("resource", resource.resource_doc),
        ("datum_page", datums),  # the router unpacks it into Datums
    ]
    # The first points as single Events (the router packs each into an EventPage), the rest as one page.
    for i in range(4):
        event = desc.compose_event(
            data={"diffraction": ids[i], "positions_m": first.positions_m[i], "frame_id": int(first.frame_ids[i])},
            timestamps=dict.fromkeys(("diffraction", "positions_m", "frame_id"), 0.0),
            filled={"diffraction": False},
            seq_num=i + 1,
            validate=False,
        )
        docs.append(("event", event))
    rest = range(4, POINTS)
    page = desc.compose_event_page(
        data={
            "diffraction": [ids[i] for i in rest],
            "positions_m": [first.positions_m[i] for i in rest],
            "frame_id": [int(first.frame_ids[i]) for i in rest],
        },
        timestamps={k: [0.0] * len(rest) for k in ("diffraction", "positions_m", "frame_id")},
        filled={"diffraction": [False] * len(rest)},
        seq_num=[i + 1 for i in rest],
        time=[0.0] * len(rest),
        validate=False,
    )
    docs.append(("event_page", page))
    return docs + [("stop", bundle.compose_stop())]


@pytest.mark.parametrize("frame_per_point", [1, 2])
def test_legacy_resource_and_datum_are_filled(scan, predictor, tmp_path, frame_per_point):
    docs = _legacy_run(scan, tmp_path, frame_per_point)
    live = _run(PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path], live=FAST)), docs)
    assert live.metadata["errors"] == []
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == POINTS
    first, exposures = scan
    expected = first.frames if frame_per_point == 1 else exposures.reshape(POINTS, 2, PIXELS, PIXELS).mean(axis=1)
    _assert_offline_equal(live, predictor, expected, first.positions_m)
    # The documents other subscribers (TiledWriter) see are not filled in place.
    page = next(doc for name, doc in docs if name == "event_page")
    assert all(isinstance(d, str) for d in page["data"]["diffraction"]) and not any(page["filled"]["diffraction"])


def test_legacy_resource_outside_the_data_roots_is_refused_once(scan, predictor, tmp_path):
    docs = _legacy_run(scan, tmp_path / "outside", 1)
    callback = PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path / "inside"], live=FAST))
    live = _run(callback, docs)
    assert live.metadata["frames_done"] == 0 and live.metadata["status"] == "failed"
    # Refused at the Resource; its Events are skipped rather than failing one by one.
    assert len(live.metadata["errors"]) == 1 and OUTSIDE in live.metadata["errors"][0]


def test_debug_switch_lets_handler_errors_through(scan, predictor, tmp_path, monkeypatch):
    """``BLUESKY_DEBUG_CALLBACKS`` is bluesky's switch to see a callback's failures raised."""
    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")
    docs = _legacy_run(scan, tmp_path / "outside", 1)
    callback = PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path / "inside"], live=FAST))
    for name, doc in docs[:2]:
        callback(name, doc)
    with pytest.raises(DataPathError, match=OUTSIDE):
        callback(*docs[2])
    run = callback.runs[docs[0][1]["uid"]]
    assert any(OUTSIDE in e for e in run.errors)  # recorded before it was raised
    monkeypatch.delenv("BLUESKY_DEBUG_CALLBACKS")
    for name, doc in docs[3:]:
        callback(name, doc)
    assert callback.wait(run.uid, 60)


@pytest.mark.parametrize("frames_shape", [[PIXELS, PIXELS], [2, PIXELS, PIXELS]], ids=["frame", "point"])
def test_direct_reads_equal_tiled_adapter_reads(scan, tmp_path, frames_shape):
    """The fast path (one kept-open file) returns exactly what Tiled's HDF5 adapter returns."""
    from bluesky_ptychonn.files.readers import DataRoots
    from bluesky_ptychonn.live import frames as frame_sources

    _, exposures = scan
    path = _write(tmp_path / "det.h5", data=np.concatenate([exposures, exposures[:1]]))
    bundle = _start(scan[0])
    desc = _descriptor(bundle, frames_shape, "STREAM:")
    resource = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=f"file://localhost{path}",
        data_key="diffraction",
        parameters={"dataset": "/entry/data/data", "multiplier": 2, "chunk_shape": [1, PIXELS, PIXELS]},
    )
    source = frame_sources.StreamFrames(DataRoots([tmp_path]), ["diffraction"])
    source.stream_resource(resource.stream_resource_doc)
    reference = frame_sources.consolidator_factory(resource.stream_resource_doc, desc.descriptor_doc)
    for start, stop in ((0, 3), (3, 11), (11, POINTS)):
        doc = resource.compose_stream_datum(
            indices=event_model.StreamRange(start=start, stop=stop), descriptor=desc.descriptor_doc
        )
        _, direct = source.read(doc, desc.descriptor_doc)
        patch = reference.consume_stream_datum(doc)
        through_tiled = frame_sources._read_patch(reference, patch, [], DataRoots([tmp_path]))
        assert direct.shape == through_tiled.shape == (stop - start, 2, PIXELS, PIXELS)
        np.testing.assert_array_equal(direct, through_tiled)
    assert source._files, "the plain single-file case is read directly"
    source.close()


def test_stream_datums_before_their_stream_resource_are_kept_until_it_comes(scan, predictor, tmp_path):
    """Was: a StreamDatum ahead of its StreamResource was dropped and the run ended ``complete`` with 0 frames."""
    docs = _template_run(scan, tmp_path, tmp_path / "frames")
    resources = [d for d in docs if d[0] == "stream_resource"]
    rest = [d for d in docs if d[0] != "stream_resource"]
    docs = rest[:-1] + resources + rest[-1:]  # every StreamDatum first, the StreamResources just before the stop
    live = _run(PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path], live=FAST)), docs)
    assert live.metadata["errors"] == []
    assert live.metadata["status"] == "complete" and live.metadata["frames_done"] == POINTS
    _assert_offline_equal(live, predictor, scan[0].frames, scan[0].positions_m)


def test_a_stream_resource_that_never_comes_fails_the_run_and_says_which(scan, predictor, tmp_path):
    docs = _template_run(scan, tmp_path, tmp_path / "frames")
    frames_uid = next(d[1]["uid"] for d in docs if d[0] == "stream_resource" and d[1]["data_key"] == "diffraction")
    docs = [d for d in docs if not (d[0] == "stream_resource" and d[1]["uid"] == frames_uid)]
    live = _run(PtychoNNCallback(predictor, None, CallbackConfig(data_roots=[tmp_path], live=FAST)), docs)
    assert live.metadata["status"] == "failed" and live.metadata["frames_done"] == 0
    assert any(frames_uid in e and "never came" in e for e in live.metadata["errors"])
