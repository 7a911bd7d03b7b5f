"""Reconstruction results as HDF5 files (the Tiled sink writes the same arrays and metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

from ..core.geometry import ObjectGrid
from ..core.metadata import jsonable
from ..core.stitching import StitchedImage


def write_result(path: str | Path, image: StitchedImage, metadata: dict) -> Path:
    """Write amplitude, phase and weight with the grid and ``metadata`` (JSON) as attributes."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        for name in ("amplitude", "phase", "weight"):
            f.create_dataset(name, data=getattr(image, name), compression="lzf")
        f.attrs["grid"] = json.dumps(image.grid.as_metadata())
        f.attrs["frames"] = image.frames
        f.attrs["metadata"] = json.dumps(jsonable(metadata))
    return path


def read_result(path: str | Path) -> tuple[StitchedImage, dict]:
    """Inverse of :func:`write_result`."""
    with h5py.File(path, "r") as f:
        image = StitchedImage(
            amplitude=f["amplitude"][()],
            phase=f["phase"][()],
            weight=f["weight"][()],
            grid=ObjectGrid.from_metadata(json.loads(f.attrs["grid"])),
            frames=int(f.attrs["frames"]),
        )
        return image, json.loads(f.attrs["metadata"])


#: A final image Tiled could not take, kept as ``<raw uid>.ptychonn.h5`` in the backup folder.
BACKUP_SUFFIX = ".ptychonn.h5"


def backup_result(directory: str | Path, raw_uid: str, image: StitchedImage, metadata: dict) -> Path:
    """Keep a result Tiled could not take as ``<directory>/<raw_uid>.ptychonn.h5``, written atomically.

    ``raw_uid`` must already be a valid Tiled key (no path separators): it names the file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{raw_uid}{BACKUP_SUFFIX}"
    partial = path.with_name(path.name + ".partial")
    try:
        write_result(partial, image, metadata)
        os.replace(partial, path)  # never a half-written backup under the name restore reads
    finally:
        partial.unlink(missing_ok=True)
    return path
