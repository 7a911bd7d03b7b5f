"""What the live callback is told: which documents carry the frames, where files may be read, the live policy."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from .. import schema
from ..core.config import Frozen
from ..core.engine import LiveOptions
from ..core.geometry import GRID_MARGIN_PIXELS

__all__ = ["CallbackConfig"]


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
