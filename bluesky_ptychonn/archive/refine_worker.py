"""Automatic refinement: every run whose live image is final is refined with pty-chi, off the RunEngine's path.

:class:`RefineWorker` is what the live callback's ``after_final`` hook calls (the command line and
the demo wire it; the live layer may not import this one). It refines one run at a time, each in
a child process (this module run as ``python -m``) at a lowered priority, and records every
failure in the run's ``processed/<uid>/refined`` instead of raising it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.refine import RUN_ARRIVAL_TIMEOUT_S
from ..errors import ConfigurationError, RunError
from ..tiled_paths import RAW, REFINED, processed_path
from .refine import SeedSource, execute_refinement, plan_refinement, record_refine_failure

if TYPE_CHECKING:
    from ..core.iterative import IterativeOptions

logger = logging.getLogger(__name__)

#: The child's API key travels in its environment under this name, never on its command line.
API_KEY_ENV = "BLUESKY_PTYCHONN_REFINE_API_KEY"

#: Added to the refinement's nice value: live inference (nice +10) and the scan's threads come first.
REFINE_NICE = 19


class RefineWorker:
    """Refines runs one at a time, off the RunEngine's and the live callback's path.

    Give :meth:`submit` to :class:`~bluesky_ptychonn.live.callback.PtychoNNCallback` as its
    ``after_final`` hook: once a run's live image is final, the worker's thread waits (at most
    ``run_timeout_s``) for the raw run to be in Tiled with its stop document, then refines it in
    a child process, which connects to the same server with the same key (handed over in its
    environment). Failures are logged and recorded in the refined result, never raised; a child
    that dies without recording its outcome (killed, out of memory) leaves ``failed``, not
    ``running``.

    Why a niced process: on a thread, pty-chi's Python holds the interpreter lock between its
    torch calls. On the 2-core benchmark machine a paced live scan (small network, 350 frames/s,
    embedded Tiled) beside the refinement of the run before it had a latency median of 5.8-6.4 s
    on the worker's thread, 1.1-2.3 s in a child at nice +19 (median of seven runs 1.4 s), and
    0.8-1.05 s with no refinement; the refinement took 37-39 s, then 42-46 s (runs in
    alternation, ``benchmarks/results/ab-refine-nice/``). A child that is not niced outweighs the engine's
    inference thread (nice +10): the median was 16 s; so does a child in a session of its own,
    whatever its nice, where the kernel schedules sessions as groups (autogroup): 23 s. So the
    child has a process group of its own in the consumer's session: Ctrl-C at the consumer's
    terminal reaches the consumer only, which waits for the run in progress (:meth:`close`). A
    child stopped with SIGTERM or SIGINT (a service manager stopping the consumer's group, a second
    Ctrl-C through :meth:`close`) records ``failed``, "interrupted"; one whose consumer is killed
    alone finishes its run and records it.

    Parameters
    ----------
    client : tiled Container
        The server's root, with a key that may write.
    options : IterativeOptions, optional
        Passed to :func:`refine_run` (default its refinement options).
    seed, refine_probe
        As for :func:`refine_run`.
    checkpoint : path, optional
        Model to replay a run with when it has no PtychoNN result (:func:`refine_run`'s
        ``predictor``, loaded in the child).
    run_timeout_s : float
        Longest wait for the raw run and its stop document.
    poll_s : float
        Pause between looks for the raw run.
    nice : int
        Added to the child's nice value, 0 to 19 (Linux, through ``nice``); 0 leaves it alone, and
        the refinement then takes the cores from live inference.
    """

    def __init__(
        self,
        client: Any,
        *,
        options: IterativeOptions | None = None,
        seed: SeedSource = "ptychonn",
        checkpoint: str | Path | None = None,
        refine_probe: bool | None = None,
        run_timeout_s: float = RUN_ARRIVAL_TIMEOUT_S,
        poll_s: float = 0.5,
        nice: int = REFINE_NICE,
    ) -> None:
        if run_timeout_s < 0 or poll_s <= 0:
            raise ConfigurationError(f"run_timeout_s must be >= 0 and poll_s > 0, got {run_timeout_s}, {poll_s}")
        if not 0 <= nice <= 19:
            raise ConfigurationError(f"nice must be 0 to 19, got {nice}")
        self.client = client
        self.job: dict[str, Any] = {
            "uri": client.uri,
            "options": None if options is None else options.model_dump(mode="json"),
            "seed": seed,
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "refine_probe": refine_probe,
        }
        self.nice = nice
        self.run_timeout_s, self.poll_s = run_timeout_s, poll_s
        #: Outcome per uid: the written metadata, or ``{"status": "failed", "errors": [...]}``.
        self.results: dict[str, dict[str, Any]] = {}
        #: The child refining a run now, if any.
        self.child: subprocess.Popen[str] | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name="ptychonn-refine", daemon=True)
        self._thread.start()

    def submit(self, uid: str) -> None:
        """Queue run ``uid`` for refinement; returns at once."""
        with self._idle:
            self._pending += 1
        self._queue.put(uid)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted run is refined or has failed; True if none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop after the run in progress (queued runs are dropped, and logged); waits up to ``timeout``.

        Interrupted while it waits (a second Ctrl-C), it stops the child, which records its run as
        ``failed`` ("interrupted"), and raises the interrupt.
        """
        self._closing.set()
        self._queue.put(None)
        try:
            self._thread.join(timeout)
        except KeyboardInterrupt:
            child = self.child
            if child is not None:
                child.terminate()
                self.wait(30)  # the child records its run, the worker its outcome (an interrupted join may not wait)
            raise

    def _work(self) -> None:
        while (uid := self._queue.get()) is not None:
            try:
                if self._closing.is_set():
                    logger.warning("run %s: refinement dropped, the worker is closing", uid)
                else:
                    self.results[uid] = self._refine(uid)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _refine(self, uid: str) -> dict[str, Any]:
        """Refine one run; any failure is logged and recorded, and returned as the outcome."""
        try:
            self._wait_for_run(uid)
        except Exception as err:
            return self._failed(uid, f"{err!r}", "could not start")
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        if self.client.context.api_key:
            env[API_KEY_ENV] = self.client.context.api_key
        # Niced from its start: numpy's BLAS starts its threads as it is imported, and each thread
        # keeps the nice it was born with. -P: nothing in the consumer's working folder shadows a module.
        nice = shutil.which("nice") if self.nice and sys.platform.startswith("linux") else None
        launched = time.time()
        try:
            self.child = subprocess.Popen(
                [*([nice, "-n", str(self.nice)] if nice else []), sys.executable, "-P", "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                # A process group of its own, so that Ctrl-C at the consumer's terminal reaches the consumer
                # first (close); in the consumer's session, so that its nice counts: with the kernel's
                # autogroup scheduling a session of its own shared the cores with the consumer equally.
                process_group=0,
            )
            out, said = self.child.communicate(json.dumps({**self.job, "uid": uid}))
            code = self.child.returncode
        except OSError as error:
            return self._failed(uid, f"the refinement process could not run: {error!r}", "could not start")
        finally:
            self.child = None
        if said.strip():
            logger.debug("run %s: the refinement process said:\n%s", uid, said.rstrip())
        try:
            outcome = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            outcome = None
        if not (isinstance(outcome, dict) and outcome.get("status") in ("complete", "failed")):
            # No outcome on its stdout: stopped (it recorded why), killed (its result may say running),
            # or it ended without a word. What it wrote in Tiled since it started decides, if anything.
            stored = self._stored(uid)
            if not (stored.get("status") in ("complete", "failed") and stored.get("updated", 0) >= launched):
                tail = " | ".join(said.strip().splitlines()[-3:])
                message = f"the refinement process exited with status {code} ({tail or 'no output'})"
                return self._failed(uid, message, "failed")
            outcome = stored
        if outcome["status"] == "failed":
            logger.error("run %s: refinement failed: %s", uid, "; ".join(outcome.get("errors", [])))
        else:  # one line per run, as the live image has
            logger.info(
                "run %s: refined, %s epochs (stopped by %s), pty-chi %.1f s, %.1f s in all",
                uid[:8],
                outcome.get("epochs"),
                outcome.get("stopped_by"),
                outcome.get("seconds") or 0.0,
                time.time() - launched,
            )
        return outcome

    def _stored(self, uid: str) -> dict[str, Any]:
        """The refined result's metadata as Tiled has it now, or nothing."""
        try:
            return dict(self.client[processed_path(uid, REFINED)].metadata)
        except Exception:  # absent, or Tiled down: the caller records what it can
            return {}

    def _failed(self, uid: str, message: str, what: str) -> dict[str, Any]:
        logger.error("run %s: refinement %s: %s", uid, what, message)
        try:
            record_refine_failure(self.client, uid, message)
        except Exception as tiled_err:
            logger.error("run %s: could not record the failed refinement in Tiled: %r", uid, tiled_err)
        return {"raw_uid": uid, "status": "failed", "errors": [message]}

    def _wait_for_run(self, uid: str) -> Any:
        """The raw run once Tiled has its stop document (the archive writer may lag the live callback)."""
        deadline = time.monotonic() + self.run_timeout_s
        while True:
            try:
                run = self.client[RAW][uid]  # looked up afresh: a node's metadata is a snapshot
                if run.metadata.get("stop"):
                    return run
            except KeyError:
                pass
            if time.monotonic() >= deadline:
                raise RunError(f"run {uid} did not reach Tiled with its stop document within {self.run_timeout_s} s")
            if self._closing.wait(self.poll_s):
                raise RunError(f"run {uid}: the refine worker closed while waiting for the run")


def _refine_in_child(job: dict[str, Any]) -> dict[str, Any]:
    """One refinement as :class:`RefineWorker`'s child runs it; failures are recorded in Tiled and returned."""
    from tiled.client import from_uri

    from ..core.inference import Predictor
    from ..core.iterative import IterativeOptions

    uid = job["uid"]
    client = from_uri(job["uri"], api_key=os.environ.get(API_KEY_ENV) or None)
    try:
        plan = plan_refinement(
            client[RAW][uid],
            client,
            options=None if job["options"] is None else IterativeOptions.model_validate(job["options"]),
            seed=job["seed"],
            predictor=None if job["checkpoint"] is None else Predictor.from_checkpoint(job["checkpoint"]),
            refine_probe=job["refine_probe"],
            photons_per_frame=None,
        )
    except Exception as err:
        record_refine_failure(client, uid, f"{err!r}")
        return {"raw_uid": uid, "status": "failed", "errors": [f"{err!r}"]}
    try:
        return execute_refinement(plan, client, progress=False)
    except Exception as err:  # already recorded in the result by execute_refinement
        return {"raw_uid": uid, "status": "failed", "errors": [f"{err!r}"]}
    except KeyboardInterrupt:  # SIGTERM (a service manager's stop, an interrupted close()) or SIGINT
        record_refine_failure(client, uid, "interrupted")
        raise


def _main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl-C: the result says so
    job = json.loads(sys.stdin.read())
    outcome = _refine_in_child(job)
    # On a line of its own, whatever pty-chi or a progress bar left unfinished before it.
    print("\n" + json.dumps(outcome, default=lambda value: value.item() if hasattr(value, "item") else str(value)))
    return 0 if outcome["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(_main())
