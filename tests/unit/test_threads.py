"""Issue 12, item 12: torch threads sized per process from the cores it may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from openft.threads import available_cores, threads_per_process


@pytest.mark.parametrize(
    ("cores", "processes", "threads"),
    [(2, 2, 1), (16, 2, 8), (16, 3, 5), (2, 3, 1), (1, 1, 1), (64, 1, 64), (8, 5, 1)],
)
def test_processes_times_threads_fit_the_cores(cores: int, processes: int, threads: int) -> None:
    got = threads_per_process(cores, processes)
    assert got == threads
    # Never more threads in all than cores, unless there are more processes than cores (then one each).
    assert got * processes <= cores or got == 1
    assert (got + 1) * processes > cores  # and no core left idle that a whole extra thread each could use


def test_zero_processes_is_a_bug() -> None:
    with pytest.raises(ValueError):
        threads_per_process(4, 0)


def test_available_cores_follows_affinity_without_a_quota(tmp_path: Path) -> None:
    assert available_cores(tmp_path) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("150000 100000", 1), ("max 100000", None), ("50000 100000", 1)]
)
def test_a_cgroup_v2_quota_caps_the_cores(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == (affinity if expected is None else min(affinity, expected))


def test_a_cgroup_v1_quota_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert available_cores(tmp_path) == len(os.sched_getaffinity(0))
