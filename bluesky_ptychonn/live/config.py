"""What the live callback is told: which documents carry the frames, where files may be read, the live policy."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .. import schema
from ..core.config import Frozen
from ..core.engine import LiveOptions
from ..core.geometry import GRID_MARGIN_PIXELS

__all__ = ["CallbackConfig", "RunShare"]


class RunShare(Frozen):
    """Which runs one of several consumers on the same proxy reconstructs (the ``[share]`` table).

    ``by = "uid"``: the runs whose uid hashes (CRC-32, the same in every process) to ``index``
    modulo ``count``; consumers 0..count-1 with one count split every run, none twice, none left
    out, and stay balanced without knowing a beamline's names. ``"beamline"`` / ``"plan"``: the runs
    whose start document's ``beamline_id`` / ``plan_name`` is in ``values``; the lists of all
    consumers must be disjoint and cover every value, which only the operator can check. A
    consumer ignores the other runs' documents silently.
    """

    by: Literal["all", "uid", "beamline", "plan"] = Field("all", description="How runs are shared out.")
    index: int = Field(0, ge=0, description="This consumer's share, 0..count-1 (by uid).")
    count: int = Field(1, ge=1, description="How many consumers share the runs (by uid).")
    values: tuple[str, ...] = Field((), description="Beamline ids or plan names this consumer takes.")

    @model_validator(mode="after")
    def _consistent(self) -> RunShare:
        if self.by == "uid" and self.index >= self.count:
            raise ValueError(f"share index {self.index} is not below count {self.count}")
        if self.by in ("beamline", "plan") and not self.values:
            raise ValueError(f"a share by {self.by} needs values: the {self.by}s this consumer takes")
        return self

    def takes(self, start: Mapping[str, Any]) -> bool:
        """Whether this consumer reconstructs the run of this start document."""
        if self.by == "all":
            return True
        if self.by == "uid":
            return bool(self.takes_uid(str(start.get("uid"))))
        return start.get("beamline_id" if self.by == "beamline" else "plan_name") in self.values

    def takes_uid(self, uid: str) -> bool | None:
        """Whether the run ``uid`` is this consumer's, when the uid alone tells (None: it needs the start)."""
        if self.by == "all":
            return True
        if self.by == "uid":
            return zlib.crc32(uid.encode()) % self.count == self.index
        return None

    def __str__(self) -> str:
        if self.by == "uid":
            return f"uid hash {self.index} of {self.count}"
        return "all runs" if self.by == "all" else f"{self.by} in {list(self.values)}"


class CallbackConfig(Frozen):
    """Which documents carry the frames, where files may be read, and the live policy."""

    frames_key: str = Field(schema.FRAMES_KEY, description="Data key of the diffraction frames.")
    positions_key: str = Field(schema.POSITIONS_KEY, description="Data key of (y, x) positions in metres, shape (2,).")
    frame_id_key: str | None = Field(
        schema.FRAME_ID_KEY, description="Data key of frame ids; None uses the stream index."
    )
    stream_name: str = Field(schema.STREAM_NAME, description="Event stream holding the frames.")
    data_roots: tuple[Path, ...] = Field((), description="Folders whose files documents may name.")
    grid_margin_pixels: int = Field(
        GRID_MARGIN_PIXELS, ge=0, description="Object-grid margin beyond the scan extent (jitter, noise)."
    )
    live: LiveOptions = Field(default_factory=LiveOptions, description="Batching, cadence and retry policy.")
    backup_dir: Path | None = Field(
        None,
        description=(
            "Folder for final images Tiled could not take (given up after final_retry_s, or still unwritten at exit), "
            "as <uid>.ptychonn.h5; `bluesky-ptychonn restore` writes them into Tiled. None: logged and lost."
        ),
    )
    probe_run: str | None = Field(
        None,
        description=(
            "uid of a run of the same set-up whose stored iterative reconstruction (processed/<uid>/iterative) lends "
            "its probe to the trust map of runs that describe none."
        ),
    )
    share: RunShare = Field(
        default_factory=RunShare, description="Which runs this consumer takes when several share a proxy."
    )
