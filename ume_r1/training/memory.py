"""Peak memory of each stage of a worker's step (`perf/peak_memory_gb/<stage>`, verl's `perf/max_memory_*`
in spirit): the accelerator's peak allocation on CUDA, the process's peak resident set on CPU. Each stage
starts from a reset peak, so a figure is that stage's own high-water mark (what was resident when it
began included), not the process's since start-up."""

from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
GB = 2**30
PREFIX = "perf/peak_memory_gb/"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():  # Linux: the peak resident set (VmHWM) back to the current one
        _CLEAR_REFS.write_text("5")


def peak_gb(device: torch.device) -> float:
    """Without Linux's /proc (macOS) the process's peak since start-up: no per-stage reset there."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    if not _STATUS.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB  # bytes on macOS
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    raise RuntimeError(f"no VmHWM in {_STATUS}")


class StagePeaks:
    """Per-stage peaks since the last `take`; a stage run more than once keeps its largest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        reset_peak(self.device)
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak_gb(self.device))

    def take(self) -> dict[str, float]:
        """The recorded peaks as metrics, cleared for the next step."""
        taken = {f"{PREFIX}{name}": value for name, value in self.peaks.items()}
        self.peaks.clear()
        return taken
