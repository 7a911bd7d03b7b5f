"""The 0MQ wire format: real event-model documents round-trip with their numpy values; pickles never load.

The end-to-end path through a real ``bluesky-0MQ-proxy`` is in ``test_service.py``.
"""

import os
import pickle

import event_model
import msgpack
import numpy as np
import pytest

from bluesky_ptychonn.errors import DocumentDecodeError, DocumentEncodeError, PtychoNNError
from bluesky_ptychonn.live.wire import MAX_DOCUMENT_BYTES, NDARRAY_EXT, deserialize, serialize


class Marker:
    """Unpickling this creates a folder: the proof of whether a payload was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def assert_same(sent, received, where="doc"):
    """Equal values of equal types: arrays keep dtype (byte order included) and shape, numpy scalars their type."""
    if isinstance(sent, np.ndarray):
        assert isinstance(received, np.ndarray), where
        assert received.dtype == sent.dtype and received.dtype.str == sent.dtype.str, where
        assert received.shape == sent.shape, where
        np.testing.assert_array_equal(received, sent, err_msg=where)
        assert received.flags.writeable, where  # as pickle gave them
    elif isinstance(sent, np.generic) and not isinstance(sent, float):
        assert type(received) is type(sent) and received == sent, where
    elif isinstance(sent, dict):
        assert isinstance(received, dict) and received.keys() == sent.keys(), where
        for key in sent:
            assert_same(sent[key], received[key], f"{where}[{key!r}]")
    elif isinstance(sent, list | tuple):  # a tuple arrives as a list, as it would through JSON
        assert isinstance(received, list) and len(received) == len(sent), where
        for i, (a, b) in enumerate(zip(sent, received, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert received == sent, where
        if not isinstance(sent, float):  # np.float64 is a float and arrives as one
            assert type(received) is type(sent), where


def real_documents():
    """A run as a RunEngine would emit it, with numpy values wherever documents can hold them."""
    run = event_model.compose_run(
        metadata={"plan_name": "ptycho_fly_scan", "scan_shape": [np.int64(5), np.int64(6)], "step_m": np.float64(2e-7)}
    )
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            "diffraction": {"source": "sim", "dtype": "array", "shape": [2, 3], "dtype_numpy": "<u2"},
            "positions_m": {"source": "sim", "dtype": "array", "shape": [2]},
            "frame_id": {"source": "sim", "dtype": "integer", "shape": []},
            "saturated": {"source": "sim", "dtype": "boolean", "shape": []},
        },
    )
    frames = np.arange(24, dtype="<u2").reshape(4, 2, 3)
    page = descriptor.compose_event_page(
        data={
            "diffraction": frames,  # filled inline
            "positions_m": np.asfortranarray(np.linspace(0, 1e-6, 8, dtype=">f8").reshape(4, 2)),
            "frame_id": np.arange(4, dtype=np.int64),
            "saturated": np.array([False, True, False, False]),
        },
        timestamps={key: np.full(4, 1.7e9) for key in ("diffraction", "positions_m", "frame_id", "saturated")},
        seq_num=[1, 2, 3, 4],
    )
    event = descriptor.compose_event(
        data={
            "diffraction": frames[0, ::-1],  # a strided view
            "positions_m": np.array([1e-7, 2e-7], dtype=np.float32),
            "frame_id": np.uint32(4),
            "saturated": np.bool_(True),
        },
        timestamps={"diffraction": 1.7e9, "positions_m": 1.7e9, "frame_id": 1.7e9, "saturated": 1.7e9},
        seq_num=5,
    )
    resource = run.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri="file://localhost/data/scan.h5",
        data_key="diffraction",
        parameters={"dataset": "/entry/data/data", "chunk_shape": (1, 2, 3)},
    )
    datum = resource.compose_stream_datum(indices={"start": 0, "stop": 5})
    extras = {  # more dtypes than one run holds
        "complex": np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        "text": np.array(["amplitude", "phase"]),
        "bytes": np.array([b"a", b"bc"]),
        "int8": np.array([[-3, 4]], dtype=np.int8),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "zero_d": np.array(2.5),
        "float16": np.float16(0.5),
        "int16": np.int16(-7),
        "complex128": np.complex128(1j),
    }
    return [
        ("start", {**run.start_doc, "extras": extras}),
        ("descriptor", descriptor.descriptor_doc),
        ("event_page", page),
        ("event", event),
        ("stream_resource", resource.stream_resource_doc),
        ("stream_datum", datum),
        ("stop", run.compose_stop()),
    ]


@pytest.mark.parametrize(("name", "doc"), real_documents(), ids=[name for name, _ in real_documents()])
def test_real_documents_round_trip(name, doc):
    received = deserialize(serialize(doc))
    assert_same(doc, received, name)


def test_float64_scalars_arrive_as_floats():
    """np.float64 subclasses float, so msgpack carries it as one: the value is exact, the type plain."""
    received = deserialize(serialize({"x": np.float64(0.1)}))["x"]
    assert type(received) is float and received == 0.1


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_is_refused_without_being_unpickled(protocol, tmp_path):
    payload = pickle.dumps({"uid": "x", "marker": Marker(tmp_path / "unpickled")}, protocol=protocol)
    pickle.loads(pickle.dumps(Marker(tmp_path / "control"), protocol=protocol))
    assert (tmp_path / "control").is_dir()  # the marker works: unpickling it does create the folder
    with pytest.raises(DocumentDecodeError) as info:
        deserialize(payload)
    assert not (tmp_path / "unpickled").exists()
    assert isinstance(info.value, PtychoNNError) and isinstance(info.value, ValueError)
    if protocol >= 2:
        assert "pickle" in str(info.value)


def _ext(dtype, shape, raw):
    return {"data": msgpack.ExtType(NDARRAY_EXT, msgpack.packb([dtype, shape, raw]))}


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not a msgpack document"),
        (msgpack.packb([1, 2]), "must hold a document"),
        (msgpack.packb({1: "integer key"}), "not a msgpack document"),
        (msgpack.packb({"a": 1}) + b"\x00", "not a msgpack document"),
        (msgpack.packb({"a": 1})[:-1], "not a msgpack document"),
        (b"\x81\xa1a" + b"\x91" * 10_000 + b"\xc0", "not a msgpack document"),  # nested too deep
        (msgpack.packb({"a": msgpack.ExtType(42, b"")}), "extension type 42"),
        (msgpack.packb(_ext("|O", [1], b"\0" * 8)), "refused"),
        (msgpack.packb(_ext("i4,O", [1], b"\0" * 12)), "refused"),
        (msgpack.packb(_ext("|V8", [1], b"\0" * 8)), "refused"),
        (msgpack.packb(_ext("float64", [1], b"\0" * 8)), "refused"),  # not the canonical '<f8'
        (msgpack.packb(_ext("<f8", [2], b"\0" * 8)), "needs 16 bytes, got 8"),
        (msgpack.packb(_ext("<f8", [-1], b"")), "bad numpy shape"),
        (msgpack.packb(_ext("<f8", [1] * 40, b"\0" * 8)), "malformed numpy payload"),
        (msgpack.packb(_ext("no-such-dtype", [1], b"\0")), "unknown numpy dtype"),
    ],
)
def test_malformed_messages_are_refused(payload, match):
    with pytest.raises(DocumentDecodeError, match=match):
        deserialize(payload)


def test_oversized_messages_are_refused_before_parsing():
    with pytest.raises(DocumentDecodeError, match="exceeds the limit"):
        deserialize(bytes(MAX_DOCUMENT_BYTES + 1))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([1, None], dtype=object), "dtype object"),
        (np.zeros(2, dtype=[("a", "<f8")]), "cannot cross"),
        ({1, 2}, "builtins.set"),
        (2**70, "64-bit range"),
    ],
)
def test_values_without_a_wire_form_are_refused_when_sent(value, match):
    with pytest.raises(DocumentEncodeError, match=match) as info:
        serialize({"value": value})
    assert isinstance(info.value, TypeError)
