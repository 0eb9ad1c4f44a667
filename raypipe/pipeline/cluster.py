"""Joining or starting the Ray cluster: the one place raypipe calls ``ray.init``."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from raypipe.config import RayConfig, StorageConfig
from raypipe.pipeline.capacity import Capacity, cluster_capacity, execution_defaults, require_shared_paths

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def default_token_path() -> Path:
    """Where Ray looks for its token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return Path.home() / ".ray" / "auth_token"


def ensure_auth_token() -> None:
    """Token authentication on, with a token to use, as `ray get-auth-token --generate` makes one.

    A fresh machine has no ``~/.ray/auth_token``: ``ray.init()`` of a local cluster writes one itself,
    but ``ray start --head`` and every client of an existing cluster fail with AuthenticationError.
    A token given by RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is used as it is. The new token is written
    owner-only (it grants the right to run code on the cluster) and never printed. RAY_AUTH_MODE is set
    to token unless the user chose a mode, which also keeps Ray from warning that it chose one (the
    refresh of Ray's cached setting is what Ray 2.60's own ``_enable_token_auth`` does)."""
    if AUTH_MODE_ENV not in os.environ:
        os.environ[AUTH_MODE_ENV] = "token"
        if "ray" in sys.modules:  # Ray read the mode when it was imported: refresh it, as Ray itself does
            from ray._raylet import Config

            Config.initialize("")
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = default_token_path()
    if path.is_file() and path.stat().st_size > 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # Ray's own generator: 256 random bits, hex
    log.info("created a Ray authentication token in %s", path)


def init_ray(cfg: RayConfig) -> Capacity:
    """Joins or starts the cluster and sets Ray Data's context for this job; returns what the cluster can
    have (its defaults depend on it)."""
    import ray
    from ray.data import DataContext
    from ray.data.context import DEFAULT_OP_RESOURCE_RESERVATION_RATIO

    if not ray.is_initialized():
        ensure_auth_token()
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # A local cluster is one machine, which nothing preempts: Ray Train's preemption watcher has
            # nothing to watch (and its start logs an error about its own restart policy). The cluster's
            # processes inherit this environment.
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
            # With the dashboard, which serves the State API: Ray Train's placement-group cleaner asks it
            # every second whether the trainer is alive, and warns each time it cannot.
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
        resources = ray.cluster_resources()
        log.info("Ray cluster: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))
    capacity = cluster_capacity()
    derived = execution_defaults(capacity)
    reader_v2 = derived["parquet_reader_v2"] if cfg.parquet_reader_v2 is None else cfg.parquet_reader_v2
    reserve = derived["reserve_per_operator"] if cfg.reserve_per_operator is None else cfg.reserve_per_operator
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    ctx.target_max_block_size = cfg.block_mib << 20
    ctx.use_datasource_v2 = reader_v2
    # Ray Data holds a stage back for its object-store budget only through its resource allocator, the
    # same part that reserves resources per operator: with the reservation off and a budget set, the
    # allocator runs with a reservation ratio of 0 (each operator keeps only what one task needs), so
    # the budget is enforced without splitting the CPUs up front. Every field is set on every call: the
    # context outlives a job in a long-lived driver (a notebook, the tests).
    budget = cfg.object_store_mib is not None
    ctx.op_resource_reservation_enabled = reserve or budget
    ctx.op_resource_reservation_ratio = DEFAULT_OP_RESOURCE_RESERVATION_RATIO if reserve else 0.0
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(
        object_store_memory=cfg.object_store_mib << 20 if budget else float("inf")
    )
    return capacity


def wait_for_free_cpus(timeout_s: float = 10.0) -> None:
    """Waits (up to ``timeout_s``) until the cluster's resource view shows a free CPU.

    The view learns that a finished dataset's tasks released their CPUs a moment after they end. A
    dataset run in that moment (any execution, even of a materialized dataset) warns that the cluster
    has no available CPUs and "will hang unless more CPUs are freed up", which is false. Call this
    after a driver-side execution that another follows. A cluster without CPUs of its own (nodes still
    to be started by the autoscaler) is not waited for: there the warning is true."""
    import ray

    if not ray.cluster_resources().get("CPU"):
        return
    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.05)  # a poll of the resource view, bounded by the deadline


def start_cluster(ray_config: RayConfig, storage: StorageConfig, paths: Mapping[str, str | None]) -> None:
    """Joins or starts the cluster (``init_ray``), then refuses the job's local ``paths`` if the cluster
    spans nodes: the check every job makes before its first task."""
    require_shared_paths(init_ray(ray_config), paths, storage.shared_filesystem)
