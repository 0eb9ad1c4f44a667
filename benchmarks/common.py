"""Small helpers shared by the benchmark scripts: machine info, timing, CPU accounting, JSON results.

No Ray or torch import here: versions are read from package metadata so that asking for them does
not start anything or slow the script down.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_info(packages: tuple[str, ...] = ("ray", "torch", "pillow", "pyarrow", "numpy")) -> dict:
    """Where and with what a figure was measured (put it in every result file)."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gb": _mem_total_gb(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in packages},
    }
    try:
        from PIL import features

        info["pillow_libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception:  # an old Pillow without the feature flag
        pass
    return info


class Timing:
    """Wall and own-process CPU seconds of a ``with timed():`` block (filled in on exit)."""

    wall_s: float = float("nan")
    cpu_s: float = float("nan")


@contextmanager
def timed() -> Iterator[Timing]:
    t = Timing()
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t.wall_s = time.perf_counter() - w0
        t.cpu_s = time.process_time() - c0


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime in seconds) of one process, from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _proc_name(pid: int) -> str:
    """The process title (Ray workers set it: ``ray::IDLE``, ``ray::SomeActor``), else the command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::") or len(argv) < 2:
        return first.strip()
    # "python .../ray/_private/log_monitor.py ..." -> "log_monitor.py"; "/path/raylet" -> "raylet"
    script = next((a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py")), "")
    return Path(script or first).name


def process_tree(root: int | None = None) -> dict[int, tuple[str, float]]:
    """``{pid: (name, own CPU seconds so far)}`` for ``root`` (default: this process) and its
    descendants, e.g. a Ray driver with its raylet, GCS and workers."""
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = (_proc_name(pid), stats[pid][1])
        todo.extend(children.get(pid, ()))
    return tree


_MEMORY_FIELDS = ("Pss", "Rss", "Pss_Anon", "Pss_Shmem", "Pss_File")


def _memory_kib(pid: int) -> dict[str, int]:
    """PSS, RSS and the PSS by kind (anonymous, shared memory, file-backed) of one process in KiB,
    from /proc/<pid>/smaps_rollup (zeros once it is gone). PSS splits shared pages (Ray's object store
    in /dev/shm) among the processes that map them, so the PSS of a tree sums to the memory it really
    holds; the RSS sum counts shared pages repeatedly."""
    usage = dict.fromkeys(_MEMORY_FIELDS, 0)
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in usage:
                usage[name] = int(value.split()[0])
    except OSError:
        pass
    return usage


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds used so far by the live processes of a tree (exited ones are not counted: the
    raylet does not wait for its workers, so their time is lost; use ProcessSampler for phases)."""
    return sum(cpu for _, cpu in process_tree(root).values())


def system_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, every process: mind other work)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK_TCK


class ProcessSampler:
    """Samples a process tree in a thread while a phase runs: who was there and how much CPU it used.

    ``with ProcessSampler() as s: ...`` then
      ``s.names``  pid -> every name seen (a Ray worker renames itself: ``ray::IDLE`` -> ``ray::Actor``);
      ``s.new``    pids that appeared during the phase (short-lived workers included, if they lived
                   longer than ``interval_s``);
      ``s.cpu_s``  CPU seconds of the tree during the phase, exited processes counted up to their
                   last sample (so a slight undercount, at most ``interval_s`` per exited process).
    With ``memory=True`` also ``s.peak_pss_mib`` / ``s.peak_rss_mib``: the largest sum over the tree
    seen in one sample (PSS: what the tree really holds, shared memory counted once), and
    ``s.peak_pss_by_name_mib`` / ``s.peak_pss_by_kind_mib``: that peak sample's PSS per process name
    (who grew) and per kind: anon (heaps), shmem (the object store), file (mapped libraries).
    Costs one /proc scan per interval (a few ms; with memory, one smaps_rollup read per process).
    """

    def __init__(self, root: int | None = None, interval_s: float = 0.5, memory: bool = False):
        self.root, self.interval_s, self.memory = root, interval_s, memory
        self.peak_pss_mib = self.peak_rss_mib = 0.0
        self.peak_pss_by_name_mib: dict[str, float] = {}
        self.peak_pss_by_kind_mib: dict[str, float] = {}
        self.names: dict[int, set[str]] = {}
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._name: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        tree = process_tree(self.root)
        for pid, (name, cpu) in tree.items():
            self.names.setdefault(pid, set()).add(name)
            self._name[pid] = name
            self._last[pid] = cpu
        if self.memory:
            usage = {pid: _memory_kib(pid) for pid in tree}
            pss = sum(u["Pss"] for u in usage.values()) / 1024
            if pss > self.peak_pss_mib:
                by_name: dict[str, float] = {}
                for pid, u in usage.items():
                    by_name[tree[pid][0]] = by_name.get(tree[pid][0], 0.0) + u["Pss"] / 1024
                self.peak_pss_by_name_mib = {k: round(v) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}
                self.peak_pss_by_kind_mib = {
                    kind.removeprefix("Pss_").lower(): round(sum(u[kind] for u in usage.values()) / 1024)
                    for kind in _MEMORY_FIELDS[2:]
                }
                self.peak_pss_mib = pss
            self.peak_rss_mib = max(self.peak_rss_mib, sum(u["Rss"] for u in usage.values()) / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def new(self) -> list[int]:
        return [pid for pid in self.names if pid not in self._start]

    @property
    def cpu_s(self) -> float:
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in self._last.items())

    @property
    def cpu_s_by_name(self) -> dict[str, float]:
        """CPU seconds per process name (a renamed worker counts under its last name), largest first."""
        by_name: dict[str, float] = {}
        for pid, cpu in self._last.items():
            name = self._name[pid]
            by_name[name] = by_name.get(name, 0.0) + cpu - self._start.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v >= 0.01}

    def __enter__(self) -> ProcessSampler:
        self._sample()
        self._start = dict(self._last)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def env_pairs(items: list[str], error) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` (repeated ``--env`` options) -> a dict; ``error(message)`` on a bad item."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            error(f"--env expects NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds and seconds > 0 else None


def write_results(name: str, results: dict, directory: Path = RESULTS_DIR) -> Path:
    """``results`` plus machine info and the command line -> ``<directory>/<name>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), **results}
    payload.setdefault("machine", machine_info())
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=str) + "\n")
    return path
