"""The policy of a live reconstruction: batching, cadence, retries, the bounded queue."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .config import Frozen
from .stitching import STITCH_WIDTH

__all__ = ["LiveOptions"]


class LiveOptions(Frozen):
    """Batching, cadence and retry policy of a live reconstruction."""

    batch_size: int = Field(64, ge=1, description="Frames per inference micro-batch.")
    max_wait_s: float = Field(0.2, ge=0, description="Longest a frame waits for its micro-batch to fill.")
    publish_interval_s: float = Field(1.0, gt=0, description="Cadence of snapshots to the sink while the scan runs.")
    publish_share_behind: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "While frames queue for the model, the most of the wall time that publishing may take: the Tiled "
            "server often shares the cores with inference. On the 2-core benchmark machine 0.5 (a publish, then "
            "as long a wait) held live throughput to 0.43-0.64 of model-only, 0.1 gave 0.73-0.86. Only while the "
            "queue lasts: once the model has caught up, the cadence resumes."
        ),
    )
    retry_s: float = Field(1.0, gt=0, description="First delay after a failed publish; doubles up to 30 s.")
    final_retry_s: float = Field(600.0, ge=0, description="How long the final image is retried after the run ends.")
    window: Literal["gaussian", "central", "uniform"] = Field(
        "gaussian", description="Stitching weight of each patch (see core.stitching.patch_window)."
    )
    window_width: float = Field(
        STITCH_WIDTH, gt=0, le=1, description="Width of the stitching window as a fraction of the patch."
    )
    pipeline: Literal["auto", "device", "host"] = Field(
        "auto",
        description=(
            "Where a batch is preprocessed, scored and stitched. 'device': with torch on the inference device, "
            "so on a GPU a batch crosses to it once and only two scores per frame come back; 'host': numpy on "
            "the host; 'auto' is 'device' (measured faster on both: on the 2-core CPU the engine ran 1.1x the "
            "frames/s of 'host', on the H200 host stitching ran 30x slower than inference)."
        ),
    )
    saturation_counts: float | None = Field(
        None, gt=0, description="Frames with any pixel at or above this are dropped as saturated; None keeps them."
    )
    max_queued_frames: int = Field(
        16384,
        ge=1,
        description=(
            "Frames waiting for inference at most (16384 64x64 float32 frames: 256 MiB). Frames in files wait on "
            "disk (read_ahead_frames); inline frames beyond it are skipped, never blocking the RunEngine, and "
            "their ids are listed in the result (replay finishes them)."
        ),
    )
    read_ahead_frames: int = Field(
        1024,
        ge=1,
        description=(
            "Frames in files are read while fewer than this wait for inference (a submission comes in whole). "
            "They can wait on disk, so holding more only costs memory: with the 16384 of max_queued_frames, "
            "a consumer behind a fast scan held 256 MiB more than after it caught up."
        ),
    )
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "Added to the inference thread's nice value (Linux): the scan's threads and the Tiled server come "
            "first and inference takes the cycles they leave. In paced in-process scans on the 2-core benchmark "
            "machine a publish took 0.45-0.50 s against 0.55-0.59 s, the latency median 1.14-1.43 s against "
            "1.33-1.57 s, at the same frames/s (five runs against three, alternating). 0 leaves it alone."
        ),
    )
    idle_timeout_s: float = Field(
        3600.0, gt=0, description="A run with no frames and no stop for this long is finished as 'interrupted'."
    )
    progress_s: float = Field(
        0.0, ge=0, description="Log the frames done so far and their rate this often while a run goes on; 0 never."
    )
