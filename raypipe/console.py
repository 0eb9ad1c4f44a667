"""raypipe's own lines on the console: progress and results, one line at a time."""

from __future__ import annotations

import sys


def say(line: str) -> None:
    """One progress line on the driver's console. Written to stdout directly: Ray Train patches
    print() to log through the root logger, which shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
