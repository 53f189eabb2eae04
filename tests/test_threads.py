"""The thread settings chosen before torch is imported (`sqsd.threads`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sqsd import threads


def _fake_stat(monkeypatch, samples):
    """/proc/stat readings: each (idle, total) jiffies, returned in turn."""
    it = iter(samples)
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))
    monkeypatch.setattr(threads.time, "sleep", lambda _s: None)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.parametrize("idle, expected", [(400, 4), (200, 2), (100, 1), (0, 1), (260, 3)])
def test_free_cores_counts_the_idle_share_of_every_core(monkeypatch, idle, expected):
    _fake_stat(monkeypatch, [(1000, 5000), (1000 + idle, 5400)])  # 400 jiffies over 4 cores in the window
    assert threads.free_cores() == expected


def test_free_cores_never_exceeds_the_cores_this_process_may_use(monkeypatch):
    _fake_stat(monkeypatch, [(0, 0), (400, 400)])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert threads.free_cores() == 2


def _configured(env: dict[str, str]) -> tuple[str, str, int]:
    """OMP settings and torch's thread count in a fresh interpreter after `configure`."""
    code = ("import os; from sqsd import threads; threads.configure(); import torch; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1], int(out[2])


def test_configure_sets_passive_waiting_and_a_thread_per_free_core_before_torch_loads():
    policy, n, torch_threads = _configured({})
    assert policy == "PASSIVE" and 1 <= int(n) <= len(os.sched_getaffinity(0)) and torch_threads == int(n)


def test_configure_respects_what_the_environment_says():
    assert _configured({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}) == ("ACTIVE", "1", 1)


def test_configure_does_nothing_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401  (already imported by the test session; made explicit)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.configure()
    assert "OMP_NUM_THREADS" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
