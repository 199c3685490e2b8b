"""Per-stage peak memory: each stage's figure is its own high-water mark, not the process's since start."""

from __future__ import annotations

import pytest
import torch

from ume_r1.training.memory import GB, StagePeaks, peak_gb, reset_peak

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_each_stage_reports_its_own_peak(device):
    device = torch.device(device)
    peaks = StagePeaks(device)
    reset_peak(device)
    resident = peak_gb(device)
    with peaks.stage("big"):
        big = torch.ones(GB // 2 // 4, device=device)  # 0.5 GB, touched
        del big
    with peaks.stage("small"):
        small = torch.ones(GB // 16 // 4, device=device)
        del small
    with peaks.stage("small"):  # a second run of a stage keeps the larger figure
        pass
    taken = peaks.take()
    assert set(taken) == {"perf/peak_memory_gb/big", "perf/peak_memory_gb/small"}
    big_peak, small_peak = taken["perf/peak_memory_gb/big"], taken["perf/peak_memory_gb/small"]
    assert big_peak - resident > 0.45, (resident, taken)
    assert big_peak - small_peak > 0.4, taken  # the 0.5 GB of the first stage is not in the second
    assert small_peak >= resident - 0.05, (resident, taken)
    assert peaks.take() == {}
