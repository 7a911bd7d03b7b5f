"""A live figure of the growing image for an IPython session, in the manner of bluesky's live plots.

:class:`LiveImageView` is a bluesky callback: subscribe it beside the analysis and a figure shows
amplitude, phase and (when the run has one) the trust map of the run in progress, redrawn on the
figure's own timer. Documents only say which run to show; drawing happens in the GUI's event loop
from a snapshot of the image, so the RunEngine never waits for a redraw, and a slow figure only
draws less often. Use an interactive matplotlib backend (``%matplotlib qt`` or ``widget``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from event_model import DocumentRouter
from event_model.documents import RunStart, RunStop

from ..core.geometry import ObjectGrid
from ..tiled_paths import PROCESSED, PTYCHONN

logger = logging.getLogger(__name__)


class LiveImageView(DocumentRouter):
    """Amplitude, phase and trust of the run in progress, redrawn every ``interval_s``.

    Parameters
    ----------
    source : PtychoNNCallback or tiled Container
        In process, the callback itself (the view reads its image in memory); otherwise the Tiled
        root client, and the view reads ``processed/<uid>/ptychonn`` as the consumer publishes it.
    interval_s : float
        Redraw period. The timer stops once the run's final image has been drawn.
    figure : matplotlib Figure, optional
        Where to draw (a new figure when omitted).

    Examples
    --------
    >>> RE.subscribe(LiveImageView(callback))          # doctest: +SKIP
    >>> RE.subscribe(LiveImageView(tiled_client))      # doctest: +SKIP
    """

    def __init__(self, source: Any, *, interval_s: float = 1.0, figure: Any = None) -> None:
        super().__init__()
        self.source = source
        self.interval_s = interval_s
        self.figure = figure
        self.uid: str | None = None
        self._images: dict[str, Any] = {}
        self._timer: Any = None
        self._stopped = False

    def start(self, doc: RunStart) -> None:
        self.uid, self._stopped = doc["uid"], False
        if self.figure is None:
            import matplotlib.pyplot as plt

            self.figure = plt.figure(figsize=(11, 3.8))
        self.figure.clear()
        self._images = {}
        if self._timer is None:
            self._timer = self.figure.canvas.new_timer(interval=int(self.interval_s * 1000))
            self._timer.add_callback(self._tick)
        self._timer.start()

    def stop(self, doc: RunStop) -> None:
        self._stopped = True  # the image still grows until inference catches up: the timer keeps going

    def _tick(self) -> None:
        try:
            final = self.update()
        except Exception as err:  # a figure must never take anything down
            logger.warning("live view of run %s: %r", self.uid, err)
            return
        if final and self._timer is not None:
            self._timer.stop()

    def _image(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The current arrays and metadata of the run shown, or None when there is nothing yet."""
        runs = getattr(self.source, "runs", None)
        if runs is not None:
            run = runs.get(self.uid)
            if run is None or run.live is None:
                return None
            image = run.live.snapshot()
            arrays = {"amplitude": image.amplitude, "phase": image.phase, "weight": image.weight}
            if image.trust is not None:
                arrays["trust"] = image.trust
            return arrays, {**run.live.metadata, "done": run.live.done}
        from .sink import read_image

        try:
            node = self.source[PROCESSED][self.uid][PTYCHONN]
        except KeyError:
            return None
        arrays, metadata = read_image(node, timeout_s=self.interval_s)
        return (arrays, {**metadata, "done": metadata.get("status") != "running"}) if "weight" in arrays else None

    def update(self) -> bool:
        """Redraw from the current image; True once the run's final image is drawn."""
        found = self._image()
        if found is None or self.figure is None:
            return False
        arrays, metadata = found
        covered = arrays["weight"] > 0
        panels = [("amplitude", "gray"), ("phase", "viridis")] + [("trust", "magma")] * ("trust" in arrays)
        if len(self._images) != len(panels):
            self.figure.clear()
            extent = tuple(np.asarray(ObjectGrid.from_metadata(metadata["grid"]).extent_m()) * 1e6)
            for i, (key, cmap) in enumerate(panels):
                ax = self.figure.add_subplot(1, len(panels), i + 1)
                self._images[key] = ax.imshow(arrays[key], cmap=cmap, extent=extent)
                ax.set_title(key, fontsize=10)
                ax.set_xlabel("x (µm)")
                self.figure.colorbar(self._images[key], ax=ax, fraction=0.046, pad=0.04)
        for key, _ in panels:
            data = np.where(covered, arrays[key], np.nan)
            self._images[key].set_data(data)
            finite = data[np.isfinite(data)]
            if finite.size:
                self._images[key].set_clim(*np.percentile(finite, (1, 99)))
        done = bool(metadata.get("done"))
        self.figure.suptitle(
            f"run {str(self.uid)[:8]}: {metadata.get('frames_done', 0)} frames, {metadata.get('status')}", fontsize=11
        )
        self.figure.canvas.draw_idle()
        return done and self._stopped
