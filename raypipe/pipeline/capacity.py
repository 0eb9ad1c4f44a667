"""What a job can have of the cluster: the nodes up now, and those its autoscaler may start.

A job sizes its actors and workers against ``Capacity`` (the most the cluster can reach, not what
happens to be up when it starts), refuses at once what no node could ever hold, and waits, with a
progress line and a deadline, for the autoscaler to start the nodes the first of its work needs.
On a cluster without an autoscaler (a local ``ray.init``, fixed nodes) the nodes up are all there is.

Where the autoscaler's node types come from: the cluster config in the GCS (``get_cluster_config``, which
Ray Train and Ray Data read too), where an autoscaler that reports them puts them. Ray 2.60's cluster
launcher (``ray up``, its v1 autoscaler) reports none; there raypipe knows only that an autoscaler runs,
from the status report ``ray status`` prints, and cannot see how far it reaches: it refuses nothing in
advance and waits for the nodes, as Ray Train and Ray Data do there.

The sizing functions are pure (``Capacity`` in, Ray Data / Ray Train arguments out); only
``cluster_capacity`` and ``wait_for_resources`` talk to Ray.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raypipe.config import PredictSection, ScalingSection
from raypipe.console import say
from raypipe.errors import UserError

# Below this, more CPU predictor actors only add processes (each holding the model), not compute.
MIN_CPUS_PER_ACTOR = 0.1
# Predictor actors when the autoscaler has no upper bound (an autoscaling pool grows to it only as
# the input keeps them busy).
UNBOUNDED_ACTORS = 256
PROGRESS_EVERY_S = 15.0


class CapacityError(UserError, RuntimeError):
    """Work the cluster cannot hold, now or ever; the message says what was asked and what to change."""


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may start (``available_node_types`` of the cluster YAML)."""

    name: str
    resources: Mapping[str, float]
    max_count: int  # -1: no limit


@dataclass(frozen=True)
class Capacity:
    nodes: tuple[Mapping[str, float], ...]  # total resources of each node up now
    node_types: tuple[NodeType, ...] = ()  # what the autoscaler may add (none: a fixed cluster)
    # An autoscaler runs whose node types are not reported (Ray 2.60's cluster launcher): it may add
    # anything, as far as a job can tell.
    unseen_node_types: bool = False

    @property
    def autoscales(self) -> bool:
        return self.unseen_node_types or any(t.max_count != 0 and t.resources for t in self.node_types)

    def seen(self, resource: str) -> float:
        """The cluster-wide amount of ``resource`` it is known to reach: the nodes up, or every reported
        node type at its maximum count, whichever is more."""
        now = sum(node.get(resource, 0.0) for node in self.nodes)
        if any(t.max_count < 0 and t.resources.get(resource, 0) > 0 for t in self.node_types):
            return math.inf
        return max(now, sum(t.resources.get(resource, 0.0) * t.max_count for t in self.node_types))

    def most(self, resource: str) -> float:
        """The cluster-wide amount of ``resource`` it may reach: what is seen, or no limit where the
        autoscaler's node types are unseen."""
        return math.inf if self.unseen_node_types else self.seen(resource)

    def holds(self, bundle: Mapping[str, float]) -> bool:
        """Whether one node, up now or of a type the autoscaler may start, can hold ``bundle`` (where the
        node types are unseen, one of them may)."""
        shapes = [*self.nodes, *(t.resources for t in self.node_types if t.max_count != 0)]
        fits = any(all(shape.get(k, 0.0) >= v for k, v in bundle.items() if v) for shape in shapes)
        return fits or self.unseen_node_types

    def describe(self) -> str:
        up = f"{len(self.nodes)} node(s) up with {_resources(_total(self.nodes))}"
        if self.unseen_node_types:
            return up + "; an autoscaler runs that does not report its node types (`ray status` on the head lists them)"
        if not self.autoscales:
            return up + ", no autoscaler"
        types = ", ".join(
            f"{t.name} {_resources(t.resources)} x {'any number' if t.max_count < 0 else f'up to {t.max_count}'}"
            for t in self.node_types if t.max_count != 0 and t.resources
        )
        return f"{up}; the autoscaler may start {types}"

    def require(self, bundle: Mapping[str, float], what: str, settings: str) -> None:
        """Refuses at once a bundle that no node can ever hold, naming the settings that size it."""
        if not self.holds(bundle):
            raise CapacityError(
                f"{what} need(s) {_resources(bundle)} on one node, and no node can hold that ({self.describe()}). "
                f"Change {settings}, or add a node type that fits to the cluster (cluster.yaml, "
                "available_node_types)."
            )


def _total(nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            total[key] = total.get(key, 0.0) + value
    return total


# Resources every node reports that say nothing about what a job asks for.
BOOKKEEPING_RESOURCES = ("memory", "object_store_memory", "node:", "accelerator_type:")


def _resources(resources: Mapping[str, float]) -> str:
    """``{CPU: 4, GPU: 1}``: the schedulable resources (custom ones included), without bookkeeping."""
    shown = {k: v for k, v in resources.items() if v and not k.startswith(BOOKKEEPING_RESOURCES)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


# Up to this many CPUs a cluster counts as small: two Ray Data defaults are turned off there (measured on
# 2 CPUs, docs/benchmarks.md); on larger clusters, for which Ray tunes them, they stay on.
SMALL_CLUSTER_CPUS = 8


def execution_defaults(capacity: Capacity) -> dict[str, bool]:
    """The values of ``ray.parquet_reader_v2`` and ``ray.reserve_per_operator`` when they are not set.

    On a small cluster both are off: the newer Parquet reader packed 40 shards into 4 read tasks and
    started footer-reading actors on every run, and the per-operator reservation kept a core idle
    between reading and preprocessing. On more CPUs than ``SMALL_CLUSTER_CPUS`` both are Ray's own
    default, on: packing many small files into fewer tasks and reserving per operator pay off there."""
    large = capacity.most("CPU") > SMALL_CLUSTER_CPUS
    return {"parquet_reader_v2": large, "reserve_per_operator": large}


# --- sizing, pure ----------------------------------------------------------------------------------


def plan_worker_resources(scaling: ScalingSection, capacity: Capacity) -> dict[str, float]:
    """CPUs (and a GPU) per training worker such that the trainer never takes every CPU the cluster can
    have: Ray Data needs one to feed it, and a trainer that starves its own input hangs without an error."""
    cpus, gpus, n = capacity.most("CPU"), capacity.most("GPU"), scaling.num_workers
    if scaling.use_gpu and gpus < n:
        raise CapacityError(
            f"scaling.use_gpu=true asks for {n} GPU worker(s); the cluster can have {gpus:g} GPU(s) "
            f"({capacity.describe()}). Add GPU nodes (see docs/cluster.md) or set scaling.use_gpu=false."
        )
    per_worker = scaling.cpus_per_worker or min(1.0, (cpus - 1) / n)
    if per_worker <= 0 or per_worker * n > cpus - 0.5:
        raise CapacityError(
            f"{n} worker(s) x {per_worker:g} CPU leaves no CPU for data loading on a cluster with {cpus:g} CPUs "
            f"({capacity.describe()}); lower scaling.num_workers or scaling.cpus_per_worker, or add nodes."
        )
    resources = {"CPU": round(per_worker, 3)}
    if scaling.use_gpu:
        resources["GPU"] = 1
    capacity.require(resources, f"{n} training worker(s)", "scaling.cpus_per_worker / scaling.use_gpu")
    return resources


def predictor_compute(predict: PredictSection, capacity: Capacity, cpus_per_actor: float = 1.0) -> dict:
    """map_batches arguments for a predictor actor pool that cannot take every CPU.

    GPU actors: an autoscaling pool, one GPU each (it starts with one actor, so it runs as soon as one
    GPU is free). CPU actors share the CPUs the cluster can have but one, which stays for the reading and
    preprocessing tasks; at least two actors (on a 2-CPU machine: two of 0.5 CPU, each running the model
    on one thread, so one computes while the other waits for input). On a fixed cluster the pool is
    fixed (started at once, so no actor starts late and the pool never shrinks and grows again); on an
    autoscaling one it starts with one actor and grows as nodes come up. A pool that could never run, or
    would deadlock the preprocessing, is refused with what it asks for and what the cluster has."""
    from ray.data import ActorPoolStrategy

    if predict.use_gpu:
        gpus = capacity.most("GPU")
        if gpus < 1:
            raise CapacityError(
                "predict.use_gpu=true asks for predictor actors with one GPU each; the cluster can have no GPU "
                f"({capacity.describe()}). Set predict.use_gpu=false, or add GPU nodes (see docs/cluster.md)."
            )
        capacity.require({"GPU": 1}, "a GPU predictor actor", "predict.use_gpu")
        most = predict.max_actors or int(min(gpus, UNBOUNDED_ACTORS))
        return {"compute": ActorPoolStrategy(min_size=1, max_size=most), "num_gpus": 1}
    cpus = capacity.most("CPU")
    if cpus < 2:
        raise CapacityError(
            f"CPU predictor actors need a cluster of at least 2 CPUs (one for reading and preprocessing, the "
            f"rest for the actors); the cluster has {cpus:g} ({capacity.describe()}). On one machine set "
            "ray.num_cpus=2 or more (logical CPUs may exceed the cores); on a cluster, add worker nodes."
        )
    spare = min(cpus - 1, UNBOUNDED_ACTORS * cpus_per_actor)
    actors = predict.max_actors or max(2, int(spare / cpus_per_actor) if capacity.autoscales else int(spare))
    if spare / actors < MIN_CPUS_PER_ACTOR:
        raise CapacityError(
            f"predict.max_actors={actors} CPU predictor actors would share the {spare:g} CPU(s) left for "
            f"prediction on this {cpus:g}-CPU cluster at {spare / actors:.3f} CPU each; at most "
            f"{int(spare / MIN_CPUS_PER_ACTOR)} ({MIN_CPUS_PER_ACTOR} CPU each) are useful. Lower "
            "predict.max_actors, or add nodes."
        )
    per_actor = round(min(cpus_per_actor, spare / actors), 3)
    capacity.require({"CPU": per_actor}, "a CPU predictor actor", "predict.cpus_per_actor")
    pool = ActorPoolStrategy(min_size=1, max_size=actors) if capacity.autoscales else ActorPoolStrategy(size=actors)
    return {"compute": pool, "num_cpus": per_actor}


def first_work(compute: dict) -> list[dict[str, float]]:
    """The resources a labeling or evaluation run needs before it can do anything: its first predictor
    actors and one CPU for a reading and preprocessing task."""
    actor = {"GPU": compute["num_gpus"]} if "num_gpus" in compute else {"CPU": compute["num_cpus"]}
    return [actor] * compute["compute"].min_size + [{"CPU": 1.0}]


def predictor_pool(predict: PredictSection, node_wait_s: float, cpus_per_actor: float = 1.0) -> dict:
    """``predictor_compute`` against the cluster's capacity (GPU actors when ``predict.use_gpu`` is unset
    and the cluster can have GPUs); on an autoscaling cluster, after waiting for the nodes of the first
    actors and a preprocessing task."""
    capacity = cluster_capacity()
    if predict.use_gpu is None:
        # Only GPUs known to be there: on a cluster of unseen node types a GPU pool might wait for ever.
        predict = predict.model_copy(update={"use_gpu": capacity.seen("GPU") > 0})
        if capacity.unseen_node_types and not predict.use_gpu:
            say("predict.use_gpu not set and no GPU seen (the autoscaler does not report its node types): "
                "CPU predictor actors; set predict.use_gpu=true to label on GPU nodes the autoscaler may start")
    compute = predictor_compute(predict, capacity, cpus_per_actor)
    if capacity.autoscales:
        wait_for_resources(first_work(compute), "the first predictor actor(s) and a preprocessing task", node_wait_s)
    return compute


# --- talking to Ray --------------------------------------------------------------------------------


def cluster_capacity() -> Capacity:
    """The nodes up now and, where an autoscaler runs, its node types (where it reports them to the GCS)."""
    import ray
    import ray._private.state

    nodes = tuple(dict(node["Resources"]) for node in ray.nodes() if node["Alive"])
    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        types = tuple(NodeType(g.name, dict(g.resources), g.max_count) for g in config.node_group_configs)
        return Capacity(nodes, types)
    return Capacity(nodes, unseen_node_types=_launcher_autoscaler_runs())


def _launcher_autoscaler_runs() -> bool:
    """Whether the cluster launcher's autoscaler runs (Ray 2.60's v1 monitor given a cluster config).

    Its status report (what ``ray status`` prints, in the GCS's key-value store) names each node's type.
    Every Ray head runs that monitor; without a cluster config it only mirrors the nodes, each as a type
    of its own named after the node (``node_<id>``), and never adds one."""
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw).get("autoscaler_report") if raw else None) or {}
    node_types = (report.get("node_type_mapping") or {}).values()
    mirrored = format_readonly_node_type("")
    return any(not node_type.startswith(mirrored) for node_type in node_types)


def wait_for_resources(bundles: list[dict[str, float]], what: str, timeout_s: float) -> None:
    """Waits until the cluster can place ``bundles`` at once, asking the autoscaler for the nodes they
    need: a placement group of them is pending demand it acts on. The group is removed once placed
    (the job's own tasks and actors then take the nodes), or when ``timeout_s`` runs out, which fails
    naming what was asked and what the cluster could offer. A line says what is being waited for
    every ``PROGRESS_EVERY_S`` seconds."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy="PACK")
    started = time.monotonic()
    try:
        while not group.wait(timeout_seconds=min(PROGRESS_EVERY_S, max(timeout_s, 0.1))):
            waited = time.monotonic() - started
            capacity = cluster_capacity()
            if waited >= timeout_s:
                raise CapacityError(
                    f"gave up after {waited:.0f} s waiting for {what} ({len(bundles)} x "
                    f"{', '.join(sorted({_resources(b) for b in bundles}))}): {capacity.describe()}. The "
                    "autoscaler did not start the nodes in time: see `ray status` on the head for launch "
                    "errors (quota, capacity, a failing setup command, no node type that can hold them), or "
                    "raise ray.node_wait_s."
                )
            say(f"waiting for {what}: {len(capacity.nodes)} node(s) up, {waited:.0f} s "
                f"(the autoscaler is starting nodes; ray.node_wait_s={timeout_s:g})")
    finally:
        remove_placement_group(group)
    waited = time.monotonic() - started
    if waited >= 1:
        say(f"{what}: resources ready after {waited:.0f} s")


def is_local_path(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def require_shared_paths(capacity: Capacity, paths: Mapping[str, str | None], shared_filesystem: bool) -> None:
    """Refuses local paths that tasks on other nodes would read or write, when the cluster has (or may
    start) more than one node: each node would see its own disk, so outputs land scattered over the
    workers (and vanish with them) and inputs are missing where the tasks run. ``paths`` maps each
    setting to its value; ``shared_filesystem`` says the paths are on a filesystem mounted on every node."""
    if shared_filesystem or (len(capacity.nodes) <= 1 and not capacity.autoscales):
        return
    local = {setting: url for setting, url in paths.items() if url and is_local_path(url)}
    if local:
        listed = ", ".join(f"{setting}={url}" for setting, url in local.items())
        raise CapacityError(
            f"{listed}: a local path, but this cluster has more than one node ({capacity.describe()}), and tasks on "
            "each node would read and write their own disk. Use object storage (s3://bucket/..., or any fsspec "
            "URL), or a filesystem mounted at the same path on every node and storage.shared_filesystem=true."
        )
