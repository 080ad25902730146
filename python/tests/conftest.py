"""Shared fixtures of the Python tests, and the closing line `scripts/test` counts.

The tests run on the `sim` backend (host memory, numpy views) everywhere; `test_gpu.py` needs an
NVIDIA GPU and torch and is skipped elsewhere, reported as `skipped: no GPU`.
"""

from __future__ import annotations

import secrets
import warnings
from pathlib import Path

import pytest

import vram_residency as vr

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates" / "vram-residency" / "tests" / "fixtures"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "worker.token"
    path.write_text(secrets.token_urlsafe(48))
    path.chmod(0o600)
    return path


@pytest.fixture
def sim_worker(token_file: Path) -> vr.Worker:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return vr.Worker(token_file, backend="sim", sim_bytes_per_device=64 << 20)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    """One libtest-style line, so that scripts/test-summary.awk counts the Python tests too."""
    stats = terminalreporter.stats
    passed = len(stats.get("passed", []))
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    skipped = len(stats.get("skipped", []))
    status = "ok" if failed == 0 else "FAILED"
    terminalreporter.write_line(
        f"test result: {status}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; "
        "0 filtered out (python)"
    )
