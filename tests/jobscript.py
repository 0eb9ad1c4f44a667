"""Runs a job script (jobs/*.py) the way a user does, for tests of what it prints and returns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

JOBS = Path(__file__).parents[1] / "jobs"


def run_script(job: str, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, seconds it took). RAY_ADDRESS is a closed port: a job that got past its
    checks fails to join a cluster instead of starting one (these tests hold no Ray lock)."""
    env = {**os.environ, **(env or {}), "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(JOBS / f"{job}.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    return done, time.monotonic() - started


def assert_one_clear_line(done: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status 2 and one ``error:`` line holding every ``expected`` text, no stack trace."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(text in errors[0] for text in expected), errors[0]
