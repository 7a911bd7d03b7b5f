"""Metadata as plain JSON types: what Tiled, HDF5 attributes and JSON files accept."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Mapping):  # Tiled's metadata views
        return dict(value)
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    return str(value)


def jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``metadata`` made of dicts, lists, strings, numbers, booleans and None.

    numpy scalars and arrays become numbers and lists, tuples become lists, mapping views become
    dicts, anything else its ``str``.
    """
    return json.loads(json.dumps(metadata, default=_plain))
