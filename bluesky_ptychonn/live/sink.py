"""The Tiled sink: one run's result at ``processed/<raw uid>/<name>`` on a Tiled server.

``amplitude``, ``phase`` and ``weight`` (and ``trust``, when the reconstruction keeps a trust map)
are 2-D float32 arrays with dims (y, x) of the grid's shape. They are created empty (zeros, no
upload) by :meth:`TiledSink.prepare` as the run starts, so the first image costs no more than any
other; each publish patches in only the block that changed since the last (the image's
``offset``), so a reader polling Tiled sees the covered part grow while the scan runs.

Tiled has no transaction over several arrays, so a publish is bracketed as a sequence lock: the
metadata's ``publish_seq`` is odd while the arrays are being patched and even once they all hold
the same snapshot. :func:`read_image` uses it to never return amplitude of one snapshot with
phase of another.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from ..core.faults import permanent_error
from ..core.metadata import jsonable
from ..core.stitching import StitchedImage
from ..errors import ConfigurationError
from ..tiled_paths import PTYCHONN, processed_path, run_results

logger = logging.getLogger(__name__)

ARRAYS = ("amplitude", "phase", "weight")

#: host:port of the Tiled servers running inside this process (the embedded default), kept by
#: :func:`~bluesky_ptychonn.archive.servers.start_embedded_server`.
IN_PROCESS_SERVERS: set[str] = set()


def _netloc(uri: str) -> str:
    return urllib.parse.urlsplit(uri).netloc


def _side_by_side(jobs: Sequence[Callable[[], Any]]) -> None:
    """Run ``jobs`` at once, the first on this thread; raise the first failure once all have ended.

    Daemon threads, as the publisher's own: a patch stuck on a dead server never holds up the
    interpreter's exit. The Tiled client is made for concurrent requests.
    """
    errors: list[BaseException] = []

    def run(job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as err:  # handed to the publisher below, which decides
            errors.append(err)

    threads = [threading.Thread(target=run, args=(job,), name="ptychonn-patch", daemon=True) for job in jobs[1:]]
    for thread in threads:
        thread.start()
    run(jobs[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


#: Preferred side of a stored tile (pixels) and the range a tile's side is taken from.
TILE_PIXELS, TILE_RANGE = 256, (128, 512)


def _tiles(n: int) -> tuple[int, ...]:
    """Chunks along one side of ``n`` pixels: equal tiles of the divisor of ``n`` nearest TILE_PIXELS.

    The divisor is looked for in TILE_RANGE, else the smallest above it (``n`` itself when prime):
    tiled 0.2.20's zarr storage makes every chunk the size of the first, so a smaller last chunk
    would pad the stored array (a 400-pixel side in chunks of 128 read back as 512, and a whole
    write of it failed with a server error).
    """
    low, high = TILE_RANGE
    if n <= low:
        return (n,)
    inside = [d for d in range(low, min(high, n) + 1) if n % d == 0]
    if inside:
        side = min(inside, key=lambda d: abs(d - TILE_PIXELS))
    else:  # the smallest divisor above the range (n itself when prime)
        side = next(d for d in range(high + 1, n + 1) if n % d == 0)
    return (side,) * (n // side)


def _new_array(node: Any, key: str, shape: tuple[int, ...]) -> Any:
    """An empty float32 (y, x) array at ``node/key``: created without uploading anything (zeros when read).

    Stored in tiles (:func:`_tiles`): a patch rewrites every chunk it touches whole, so with one
    chunk each publish's block cost grows with the image. On the idle embedded server (2-core VM)
    a 130x130 block into a 2,600x2,600 image took 159 ms as one chunk and 55 ms in 260-pixel tiles
    (``bench_publish``); at 400x400 about 35 ms either way. A read is still one request (tiled's
    client fetches arrays under 100 MiB whole).
    """
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import DataSource

    structure = ArrayStructure(
        shape=shape,
        chunks=tuple(_tiles(n) for n in shape),
        dims=("y", "x"),
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype(np.float32)),
    )
    return node.new(
        StructureFamily.array, [DataSource(structure=structure, structure_family=StructureFamily.array)], key=key
    )


class TiledSink:
    """Writes snapshots of one run's reconstruction to a Tiled container.

    Parameters
    ----------
    client : tiled.client.container.Container
        The server's root (a client made with an API key that may write).
    raw_uid : str
        The raw run's uid: the result lives at ``processed/<raw_uid>/<name>``.
    name : str
        ``"ptychonn"`` for live and replayed results.
    replace : bool
        Replace an existing result of the same name (replay): overwritten in place when it has the
        same grid, so a reader never finds the result without arrays; deleted first otherwise.
    side_by_side : bool, optional
        Send a publish's array patches together rather than one after another. By default, unless
        the server runs in this process. To a server of its own a publish took 0.51-0.56 s against
        0.67-0.76 s, the latency median 1.18-1.22 s against 1.30-1.40 s; to the embedded server the
        four requests at once kept the inference thread off Python's lock (163-192 against 202-211
        frames/s) and the median was no better, 1.89-2.17 s against 1.80-1.92 s
        (``benchmarks/results/ab-patch-side-by-side/``, 2-core VM).
    """

    def __init__(
        self,
        client: Any,
        raw_uid: str,
        name: str = PTYCHONN,
        *,
        replace: bool = False,
        side_by_side: bool | None = None,
    ) -> None:
        self.client = client
        self.raw_uid = raw_uid
        self.name = name
        self.replace = replace
        self.side_by_side = _netloc(client.uri) not in IN_PROCESS_SERVERS if side_by_side is None else side_by_side
        self._node: Any = None
        self._arrays: dict[str, Any] | None = None  # the result's array clients, as last known
        self._seq = 0  # publish_seq as last written: odd while arrays are being patched

    @property
    def path(self) -> str:
        """Path of the result on the server."""
        return processed_path(self.raw_uid, self.name)

    def _container(self, metadata: dict[str, Any]) -> Any:
        if self._node is not None:
            return self._node
        run = run_results(self.client, self.raw_uid)
        try:
            node = run[self.name]
        except KeyError:
            node = None
        if node is not None and self.replace and dict(node.metadata).get("grid") != metadata.get("grid"):
            node.delete(recursive=True, external_only=False)
            node = None
        if node is not None:
            self._seq = int(node.metadata.get("publish_seq") or 0)
        else:
            # Created as running: readers go by status, and the arrays are not there yet.
            node = run.create_container(self.name, metadata={**metadata, "status": "running"})
            self._arrays = {}  # a new container has none: no need to ask for each
        self._node = node
        return node

    def prepare(self, shape: tuple[int, int], *, trust: bool, metadata: dict[str, Any]) -> None:
        """Create the result and its empty arrays before the first image, off the frames' critical path.

        Creating a container and four arrays costs about ten Tiled round trips (0.1 s each on
        the 2-core benchmark machine); done at the first publish it delayed the first image by
        seconds. Arrays already there with this shape are kept (a restarted consumer's).
        """
        node = self._container(jsonable(metadata))
        self._ensure_arrays(node, ARRAYS + (("trust",) if trust else ()), tuple(shape))

    def _ensure_arrays(self, node: Any, keys: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, Any]:
        """Make sure ``keys`` exist with ``shape`` (created empty where not); return the array clients."""
        if self._arrays is None:  # asked of the server once; every request costs a round trip per publish
            self._arrays = {key: node[key] for key in (*ARRAYS, "trust") if key in node}
        arrays = self._arrays
        for key in keys:
            if key in arrays and tuple(arrays[key].shape) == shape:
                continue
            if key in arrays:  # another grid's, left by a replaced result
                arrays.pop(key).delete(external_only=False)
            arrays[key] = _new_array(node, key, shape)
        if "trust" in arrays and "trust" not in keys:  # a replaced result's trust map would not match
            arrays.pop("trust").delete(external_only=False)
        return arrays

    def publish(self, image: StitchedImage, metadata: dict[str, Any]) -> None:
        """Patch the image (whole, or a block of it at ``image.offset``) into the arrays, then write the metadata.

        Arrays missing or of another shape are created empty first; that needs the whole image
        (else :class:`ValueError`, and the caller sends the whole image next).
        """
        metadata = jsonable(metadata)
        node = self._container(metadata)
        keys = ARRAYS + (("trust",) if image.trust is not None else ())
        shape = tuple(image.grid.shape)
        try:
            arrays = self._arrays or {}
            stale = [key for key in keys if key not in arrays or tuple(arrays[key].shape) != shape]
            if stale and image.weight.shape != shape:
                raise ValueError(f"{self.path}: {stale} must be written whole before a block can be patched in")
            arrays = self._ensure_arrays(node, keys, shape)
            if image.weight.size:
                self._seq += 1 + self._seq % 2  # odd: readers of the arrays wait or retry
                node.update_metadata({"publish_seq": self._seq}, drop_revision=True)
                patches = [
                    partial(
                        arrays[key].patch, np.ascontiguousarray(getattr(image, key), np.float32), offset=image.offset
                    )
                    for key in keys
                ]
                if self.side_by_side:
                    _side_by_side(patches)
                else:
                    for patch in patches:
                        patch()
                self._seq += 1
            # Progress, not history: without drop_revision every publish kept two revision rows of
            # the whole metadata in the catalog (and cost the server two more queries each).
            node.update_metadata({**metadata, "publish_seq": self._seq}, drop_revision=True)
        except Exception:
            self._arrays = None  # what the server holds is uncertain now: ask again next time
            raise

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        """Metadata only: a result that never got an image (it failed), or one whose image is yet to come."""
        metadata = jsonable(metadata)
        self._container(metadata).update_metadata(metadata)


def check_write_access(client: Any) -> None:
    """Create and delete a scratch container under ``processed``: a key that cannot write fails here, at start-up.

    Raises :class:`~bluesky_ptychonn.errors.ConfigurationError` with one line naming the fix,
    before any model is loaded or frame read, instead of at the end of a scan.
    """
    import uuid

    try:
        run_results(client, f"write-check-{uuid.uuid4().hex}").delete(recursive=True, external_only=False)
    except Exception as err:
        raise ConfigurationError(permanent_error(err) or f"cannot write to Tiled: {err!r}") from err


def read_image(node: Any, timeout_s: float = 30.0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a result's arrays and metadata as one snapshot, even while a consumer is publishing it.

    Parameters
    ----------
    node : tiled.client.container.Container
        The result, e.g. ``client["processed"][uid]["ptychonn"]``.
    timeout_s : float
        Give up (:class:`TimeoutError`) if no consistent snapshot could be read for this long.

    Returns
    -------
    tuple of (dict, dict)
        ``{"amplitude": ..., "phase": ..., "weight": ... [, "trust": ...]}`` and the metadata.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        node.refresh()
        before = dict(node.metadata)
        seq = before.get("publish_seq")
        if seq is None or seq % 2 == 0:
            arrays = {key: node[key].read() for key in (*ARRAYS, "trust") if key in node}
            node.refresh()
            if node.metadata.get("publish_seq") == seq:
                return arrays, before
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.uri}: no consistent snapshot within {timeout_s:g} s (a publish kept going)")
        time.sleep(0.05)
