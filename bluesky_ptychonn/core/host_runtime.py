"""The C runtimes under torch and numpy on the host: glibc's heap and the OpenMP thread teams.

Both are reached through ``ctypes`` and both hooks are optional: where the runtime is another one
(musl, macOS, an Intel or LLVM OpenMP), they are None and nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable

#: ``omp_pause_soft`` of the OpenMP 5.0 API: the calling thread's idle workers exit; the next
#: parallel region on that thread starts new ones.
OMP_PAUSE_SOFT = 1


def heap_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows).

    Frames are read into large arrays on one thread and freed on another. After the first such
    free, glibc raises its mmap threshold and serves later ones from per-thread arenas whose free
    pages it keeps: a 30,000-frame scan read from HDF5 grew resident memory 7-8 MiB per 1,000
    frames while the queue drained. ``malloc_trim(0)`` once a second returns those pages (about
    10 ms a call on the 2-core benchmark machine), and resident memory follows the queue again.
    """
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _loaded_libgomp() -> str | None:
    """Path of the GNU OpenMP runtime this process has loaded (torch's wheels on Linux bring one), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if path.rsplit("/", 1)[-1].startswith("libgomp"):
                    return path
    except OSError:
        pass
    return None


_PAUSE: list[Callable[[int], int]] = []  # libgomp's omp_pause_resource_all, once found (it stays loaded)


def _omp_pause() -> Callable[[int], int] | None:
    if not _PAUSE:
        path = _loaded_libgomp()
        try:
            # dlopen of a loaded library's path returns that library: the runtime torch's ops use.
            _PAUSE.extend([ctypes.CDLL(path).omp_pause_resource_all] if path else [])
        except (OSError, AttributeError):
            pass
    return _PAUSE[0] if _PAUSE else None


def release_openmp_team() -> bool:
    """Let the calling thread's idle OpenMP workers exit, before compute moves to another thread.

    libgomp gives every thread that runs a parallel region its own team of workers, and they stay
    after it. Once the workers of all teams outnumber the CPUs, it cuts the time each one spins
    for work from about 300,000 rounds to 100, so every convolution and pointwise op wakes its
    workers from sleep. A live reconstruction infers on its own thread after the caller's thread
    has loaded the model (a parallel region or more): on the 2-core benchmark machine the same 576
    frames then took 1.3-1.6x as long as on the caller's thread. Releasing the caller's team as the
    worker starts (and keeping torch off the publisher's thread) restores the speed. Returns False
    where the runtime is not libgomp, or where the release was refused (inside a parallel region).
    """
    pause = _omp_pause()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment``; the OpenMP workers it starts later inherit it.

    On Linux a nice value belongs to one thread, so the inference thread can yield the cores to
    the scan's own threads (the RunEngine, the detector, TiledWriter) and to the Tiled server,
    while taking every cycle they leave. An unprivileged thread cannot lower it again; the
    engine's worker thread ends with its run. Returns False where nothing was changed (another
    OS, ``increment`` 0, or refused).
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        return False
    return True
