"""Describe the machine a benchmark ran on, so every figure names its hardware."""

from __future__ import annotations

import os
import platform
import socket


def describe(device: str = "cpu") -> dict:
    """CPU model and count, Python, torch, and the GPU's name when ``device`` is CUDA."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def device_name(info: dict) -> str:
    """A one-line name of the device that ran the work."""
    return info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far (Linux ``/proc``): of process ``pid`` (all its threads; this one when None)
    as ``process``, and of the whole machine, busy and idle, summed over its CPUs."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return {
        "process": (int(fields[11]) + int(fields[12])) / tick,  # utime + stime
        "busy": (user + nice + system + irq + softirq + steal) / tick,
        "idle": (idle + iowait) / tick,
    }


def cores_between(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Mean cores each figure of :func:`cpu_seconds` took over ``seconds`` of wall time."""
    return {key: (after[key] - before[key]) / max(seconds, 1e-9) for key in before}
