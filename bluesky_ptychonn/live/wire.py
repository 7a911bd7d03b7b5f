"""The 0MQ wire format of Bluesky documents: msgpack with numpy arrays, never pickle.

bluesky's ``Publisher`` and ``RemoteDispatcher`` default to :func:`pickle.dumps` and
:func:`pickle.loads`, and unpickling runs code: anyone who can reach the proxy would run it in the
consumer, the process that holds the Tiled write key. Both ends use this pair instead::

    Publisher("tcp://127.0.0.1:5577", serializer=serialize)                  # RunEngine side
    RemoteDispatcher("tcp://127.0.0.1:5578", deserializer=deserialize)       # consumer side

A document is one msgpack map with string keys. A numpy array travels as msgpack extension type
:data:`NDARRAY_EXT` and a numpy scalar as :data:`SCALAR_EXT`; the payload of both is the msgpack
array ``[dtype.str, shape, raw bytes in C order]``. Only plain numeric, boolean, byte-string and
unicode dtypes cross the wire: object arrays (which other numpy codecs unpickle) are refused on
both sides. ``np.float64`` is a Python ``float`` and arrives as one; other numpy scalars keep
their type.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from ..errors import DocumentDecodeError, DocumentEncodeError

__all__ = ["MAX_DOCUMENT_BYTES", "NDARRAY_EXT", "SCALAR_EXT", "deserialize", "serialize"]

#: msgpack extension type code of a numpy array.
NDARRAY_EXT = 1
#: msgpack extension type code of a numpy scalar (``np.int64(3)``, ``np.bool_(True)``, ...).
SCALAR_EXT = 2
#: Largest message accepted, in bytes: an EventPage of a thousand 64 x 64 float64 frames filled
#: inline is 33 MB; anything near this limit belongs in a detector file named by a StreamResource.
MAX_DOCUMENT_BYTES = 256 * 2**20
#: Longest msgpack array and map accepted. The defaults grow with the message, so a 256 MB message
#: of one-byte nils would build a list of 256 million Python objects (about 2 GB).
MAX_CONTAINER_LEN = 2**20
#: numpy dtype kinds that cross the wire: bool, signed and unsigned integers, float, complex,
#: bytes and unicode. Object ('O'), structured and void ('V') dtypes never do.
DTYPE_KINDS = frozenset("biufcSU")
#: More dimensions than any document needs; numpy's own limit is 64.
MAX_NDIM = 32


def _array_payload(value: np.ndarray | np.generic) -> bytes:
    """The extension payload ``[dtype.str, shape, raw bytes]`` of an array or scalar."""
    dtype = value.dtype
    if dtype.kind not in DTYPE_KINDS or dtype.fields is not None or dtype.hasobject:
        raise DocumentEncodeError(
            f"numpy dtype {dtype!s} cannot cross the 0MQ wire: only kinds {''.join(sorted(DTYPE_KINDS))} "
            "(numbers, booleans, bytes, unicode) are carried; convert object arrays to lists"
        )
    # tobytes() always writes C order, so Fortran-ordered and strided views travel too.
    return msgpack.packb([dtype.str, list(np.shape(value)), value.tobytes()], use_bin_type=True)


def _encode(value: Any) -> msgpack.ExtType:
    """msgpack's ``default`` hook: numpy arrays and scalars; anything else is refused."""
    if isinstance(value, np.ndarray):
        return msgpack.ExtType(NDARRAY_EXT, _array_payload(value))
    if isinstance(value, np.generic):
        return msgpack.ExtType(SCALAR_EXT, _array_payload(value))
    if isinstance(value, int):  # msgpack hands over only the ints it cannot pack
        raise DocumentEncodeError(f"integer {value} is outside the 64-bit range of the 0MQ wire format")
    raise DocumentEncodeError(
        f"a {type(value).__module__}.{type(value).__qualname__} value cannot cross the 0MQ wire: documents "
        "hold only JSON-like values (dict, list, str, int, float, bool, None) and numpy arrays"
    )


def serialize(doc: dict[str, Any]) -> bytes:
    """Encode one Bluesky document for the 0MQ proxy (the ``serializer`` of bluesky's ``Publisher``).

    Parameters
    ----------
    doc : dict
        Any event-model document. Values are JSON-like (dict with string keys, list, tuple, str,
        int, float, bool, None), numpy arrays of a numeric, boolean, bytes or unicode dtype (any
        shape and memory order), or numpy scalars.

    Returns
    -------
    bytes
        The msgpack encoding.

    Raises
    ------
    DocumentEncodeError
        A value has no wire form: an object or structured array, a set, a ``datetime``, a ``Path``.
    """
    try:
        return msgpack.packb(doc, default=_encode, use_bin_type=True, datetime=False)
    except DocumentEncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as err:  # e.g. an int beyond 64 bits, a non-str key
        raise DocumentEncodeError(f"document cannot be encoded for the 0MQ wire: {err}") from err


def _array_from_payload(payload: bytes) -> np.ndarray:
    """Rebuild an array from its extension payload, checking every part before numpy sees it."""
    try:
        parts = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_array_len=MAX_NDIM + 3)
    except (ValueError, msgpack.UnpackException) as err:
        raise DocumentDecodeError(f"malformed numpy payload: {err}") from err
    if not (isinstance(parts, list) and len(parts) == 3):
        raise DocumentDecodeError(f"numpy payload must be [dtype, shape, bytes], got {type(parts).__name__}")
    dtype_str, shape, raw = parts
    if not isinstance(dtype_str, str) or not isinstance(raw, bytes) or not isinstance(shape, list):
        raise DocumentDecodeError("numpy payload must be [dtype str, shape list, bytes]")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as err:
        raise DocumentDecodeError(f"unknown numpy dtype {dtype_str!r} in a 0MQ message") from err
    # Only the canonical spelling of a plain dtype is ours: no structured, object or void types.
    if dtype.str != dtype_str or dtype.kind not in DTYPE_KINDS or dtype.fields is not None or dtype.hasobject:
        raise DocumentDecodeError(f"numpy dtype {dtype_str!r} is refused on the 0MQ wire")
    if len(shape) > MAX_NDIM or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise DocumentDecodeError(f"bad numpy shape {shape!r} in a 0MQ message")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(raw):
        raise DocumentDecodeError(
            f"numpy payload of dtype {dtype_str} and shape {tuple(shape)} needs {expected} bytes, got {len(raw)}"
        )
    if expected == 0:  # frombuffer refuses zero-itemsize dtypes such as '<U0'
        return np.zeros(shape, dtype)
    # frombuffer shares the immutable message bytes; the copy gives the writable array pickle gave.
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _decode(code: int, payload: bytes) -> Any:
    """msgpack's ``ext_hook``: our two extension types; any other code is refused."""
    if code == NDARRAY_EXT:
        return _array_from_payload(payload)
    if code == SCALAR_EXT:
        value = _array_from_payload(payload)
        if value.ndim:
            raise DocumentDecodeError(f"numpy scalar payload has shape {value.shape}, expected ()")
        return value[()]
    raise DocumentDecodeError(f"unknown msgpack extension type {code} in a 0MQ message")


def _looks_like_pickle(data: bytes) -> bool:
    """True for the opening of a pickle of protocol 2 to 5: the PROTO opcode (0x80), then the version.

    Only to say why a message is refused: msgpack reads 0x80 as an empty map followed by extra
    bytes, which it refuses anyway, and older pickle protocols fail as msgpack too.
    """
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def deserialize(data: bytes) -> dict[str, Any]:
    """Decode one Bluesky document from the 0MQ proxy (the ``deserializer`` of ``RemoteDispatcher``).

    Nothing in ``data`` can run code: it is parsed as msgpack only, and arrays are rebuilt with
    :func:`numpy.frombuffer` from a checked dtype and shape.

    Parameters
    ----------
    data : bytes
        One message body as written by :func:`serialize`, at most :data:`MAX_DOCUMENT_BYTES`.

    Returns
    -------
    dict
        The document; arrays come back writable, with their dtype, byte order and shape.

    Raises
    ------
    DocumentDecodeError
        ``data`` is not a msgpack map in this format: a pickle (bluesky's default), truncated or
        trailing bytes, too large, an unknown extension type, or an array with an object dtype or a
        size that does not match its shape. ``RemoteDispatcher`` (non-strict) drops such a message
        and keeps going.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DocumentDecodeError(f"a 0MQ message body is bytes, got {type(data).__name__}")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentDecodeError(
            f"0MQ message of {len(data)} bytes exceeds the limit of {MAX_DOCUMENT_BYTES} bytes; "
            "large data belongs in detector files named by StreamResource documents"
        )
    if _looks_like_pickle(bytes(data[:2])):
        raise DocumentDecodeError(
            "0MQ message is a pickle and is refused (unpickling runs code): publish with "
            "Publisher(address, serializer=bluesky_ptychonn.live.wire.serialize)"
        )
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_decode,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except DocumentDecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as err:  # ExtraData, FormatError, StackError, UTF-8
        raise DocumentDecodeError(f"0MQ message is not a msgpack document: {type(err).__name__}: {err}") from err
    if not isinstance(doc, dict):
        raise DocumentDecodeError(f"0MQ message must hold a document (a map), got {type(doc).__name__}")
    return doc
