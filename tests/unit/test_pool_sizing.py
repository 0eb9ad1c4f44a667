"""Predictor pools and training workers are sized from what the cluster can have (the nodes up and the
node types its autoscaler may start) so that a job can never wait forever for resources; what cannot
fit is refused at once with what was asked for and what the cluster has."""

from __future__ import annotations

import pytest

from raypipe.config import EvaluateConfig, LabelJobConfig, TrainConfig, load_config
from raypipe.pipeline.capacity import (
    UNBOUNDED_ACTORS, Capacity, CapacityError, NodeType, first_work, plan_worker_resources, predictor_compute,
    execution_defaults, require_shared_paths,
)


def one_machine(**resources: float) -> Capacity:
    """A local cluster: one node, no autoscaler."""
    return Capacity((resources,))


# Shaped like cluster.yaml and the multi-node test cluster: a head with no CPU, 1-CPU workers, none up.
AUTOSCALING = Capacity(({"CPU": 0.0},), (NodeType("head", {"CPU": 0.0}, 1), NodeType("cpu", {"CPU": 1.0}, 3)))


def label_predict(*overrides: str):
    return load_config(LabelJobConfig, None, list(overrides)).predict


def cpu_share(compute: dict) -> float:
    return compute["compute"].max_size * compute["num_cpus"]


@pytest.mark.parametrize("cpus", [2.0, 3.0, 4.0, 64.0])
def test_default_cpu_pools_always_leave_a_cpu_for_reading_and_preprocessing(cpus):
    for predict, per_actor in ((label_predict("predict.use_gpu=false"), 0.9), (EvaluateConfig().predict, 1.0)):
        compute = predictor_compute(predict, one_machine(CPU=cpus), per_actor)
        assert compute["compute"].min_size >= 2 and cpu_share(compute) <= cpus - 1


def test_a_cluster_of_one_cpu_is_refused_for_cpu_actors():
    with pytest.raises(CapacityError, match="need a cluster of at least 2 CPUs.*the cluster has 1"):
        predictor_compute(label_predict("predict.use_gpu=false"), one_machine(CPU=1.0))


def test_gpu_actors_on_a_cluster_without_gpus_are_refused():
    with pytest.raises(CapacityError, match="predict.use_gpu=true asks for .* one GPU each; the cluster can have no GPU"):
        predictor_compute(label_predict("predict.use_gpu=true"), one_machine(CPU=4.0))
    compute = predictor_compute(label_predict("predict.use_gpu=true", "predict.max_actors=4"), one_machine(CPU=4.0, GPU=1.0))
    assert compute["compute"].min_size == 1 and compute["num_gpus"] == 1  # runs on the one GPU there is


def test_more_cpu_actors_than_can_usefully_share_the_cpus_are_refused():
    assert cpu_share(predictor_compute(label_predict("predict.use_gpu=false", "predict.max_actors=10"), one_machine(CPU=2.0))) <= 1
    with pytest.raises(CapacityError, match=r"predict.max_actors=11 .* 1 CPU\(s\) left .* 2-CPU cluster.* at most 10"):
        predictor_compute(label_predict("predict.use_gpu=false", "predict.max_actors=11"), one_machine(CPU=2.0))


def test_training_workers_that_cannot_fit_are_refused_with_both_sides():
    def scaling(*overrides: str):
        return load_config(TrainConfig, None, list(overrides)).scaling

    assert plan_worker_resources(scaling(), one_machine(CPU=2.0)) == {"CPU": 1.0}  # the default on 2 CPUs
    with pytest.raises(CapacityError, match="1 worker.* leaves no CPU for data loading on a cluster with 1 CPUs"):
        plan_worker_resources(scaling(), one_machine(CPU=1.0))
    with pytest.raises(CapacityError, match="asks for 2 GPU worker.*the cluster can have 1 GPU"):
        plan_worker_resources(scaling("scaling.use_gpu=true", "scaling.num_workers=2"), one_machine(CPU=8.0, GPU=1.0))

    two = scaling("scaling.num_workers=2")
    assert plan_worker_resources(two, one_machine(CPU=2.0)) == {"CPU": 0.5}
    assert plan_worker_resources(two, one_machine(CPU=8.0)) == {"CPU": 1.0}
    with pytest.raises(CapacityError, match="leaves no CPU for data loading"):
        plan_worker_resources(scaling("scaling.cpus_per_worker=1", "scaling.num_workers=2"), one_machine(CPU=2.0))


def test_an_autoscaling_cluster_with_no_worker_up_is_planned_for_the_nodes_it_can_start():
    label = predictor_compute(label_predict("predict.use_gpu=false"), AUTOSCALING, 0.9)
    # 3 CPUs reachable: one for reading and preprocessing, two actors that start one by one.
    assert (label["compute"].min_size, label["compute"].max_size, label["num_cpus"]) == (1, 2, 0.9)
    assert first_work(label) == [{"CPU": 0.9}, {"CPU": 1.0}]
    scaling = load_config(TrainConfig, None, ["scaling.num_workers=2"]).scaling
    assert plan_worker_resources(scaling, AUTOSCALING) == {"CPU": 1.0}  # one worker per 1-CPU node
    assert AUTOSCALING.autoscales and not one_machine(CPU=2.0).autoscales


def test_what_no_node_type_can_hold_is_refused_at_once_naming_the_setting():
    big = load_config(TrainConfig, None, ["scaling.cpus_per_worker=2"]).scaling
    with pytest.raises(CapacityError, match=r"need\(s\) \{CPU: 2\} on one node.*cpu \{CPU: 1\} x up to 3.*"
                                            r"scaling.cpus_per_worker"):
        plan_worker_resources(big, AUTOSCALING)
    with pytest.raises(CapacityError, match="can have 0 GPU.*the autoscaler may start"):
        plan_worker_resources(load_config(TrainConfig, None, ["scaling.use_gpu=true"]).scaling, AUTOSCALING)


def test_a_node_type_without_an_upper_bound_gives_a_bounded_pool():
    unbounded = Capacity(({"CPU": 0.0},), (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, -1),))
    gpu = predictor_compute(label_predict("predict.use_gpu=true"), unbounded)
    cpu = predictor_compute(label_predict("predict.use_gpu=false"), unbounded, 0.9)
    assert gpu["compute"].max_size == cpu["compute"].max_size == UNBOUNDED_ACTORS


# Ray 2.60's cluster launcher: an autoscaler runs, its node types are not reported, no worker is up.
UNSEEN = Capacity(({"CPU": 0.0},), unseen_node_types=True)


def test_a_cluster_whose_node_types_are_unseen_is_planned_as_one_that_may_grow_and_refuses_nothing_in_advance():
    label = predictor_compute(label_predict("predict.use_gpu=false"), UNSEEN, 0.9)
    assert (label["compute"].min_size, label["compute"].max_size, label["num_cpus"]) == (1, UNBOUNDED_ACTORS, 0.9)
    assert first_work(label) == [{"CPU": 0.9}, {"CPU": 1.0}]  # what the job waits for, asking the autoscaler
    gpu = predictor_compute(label_predict("predict.use_gpu=true"), UNSEEN)
    assert (gpu["compute"].min_size, gpu["num_gpus"]) == (1, 1)
    scaling = load_config(TrainConfig, None, ["scaling.num_workers=2", "scaling.use_gpu=true"]).scaling
    assert plan_worker_resources(scaling, UNSEEN) == {"CPU": 1.0, "GPU": 1}
    assert UNSEEN.autoscales and UNSEEN.holds({"CPU": 64.0, "GPU": 8.0})
    # Only what is seen decides whether GPUs are there (labeling's default between GPU and CPU actors).
    assert UNSEEN.seen("GPU") == 0 and UNSEEN.most("GPU") == float("inf")
    assert "does not report its node types" in UNSEEN.describe()
    assert execution_defaults(UNSEEN) == execution_defaults(TEN_4_GPU_NODES)  # sized as a large cluster


def test_local_paths_are_refused_on_a_cluster_of_many_nodes_unless_shared():
    paths = {"data.input": "s3://bucket/shards", "output": "/data/prepared", "labels.sidecar": None}
    require_shared_paths(one_machine(CPU=2.0), paths, shared_filesystem=False)  # one machine: its disk is the disk
    with pytest.raises(CapacityError, match=r"^output=/data/prepared: a local path.*s3://.*storage.shared_filesystem=true"):
        require_shared_paths(AUTOSCALING, paths, shared_filesystem=False)
    with pytest.raises(CapacityError, match=r"^output=file:///x: a local path"):
        require_shared_paths(Capacity(({"CPU": 1.0}, {"CPU": 1.0})), {"output": "file:///x"}, shared_filesystem=False)
    with pytest.raises(CapacityError, match=r"^output=/data/prepared: a local path"):
        require_shared_paths(UNSEEN, paths, shared_filesystem=False)
    require_shared_paths(AUTOSCALING, paths, shared_filesystem=True)
    require_shared_paths(AUTOSCALING, {**paths, "output": "s3://bucket/prepared"}, shared_filesystem=False)


# The three shapes docs/cluster.md gives the defaults for ("Defaults from the cluster").
TWO_CORES = one_machine(CPU=2.0)
ONE_32_CORE_NODE = one_machine(CPU=32.0)
TEN_4_GPU_NODES = Capacity(
    ({"CPU": 0.0},), (NodeType("head", {"CPU": 0.0}, 1), NodeType("gpu", {"CPU": 48.0, "GPU": 4.0}, 10))
)


@pytest.mark.parametrize(
    "capacity, data_defaults, label_pool, train_workers",
    [
        (TWO_CORES, False, ("fixed", 2, 2, {"num_cpus": 0.5}), {"CPU": 1.0}),
        (ONE_32_CORE_NODE, True, ("fixed", 31, 31, {"num_cpus": 0.9}), {"CPU": 1.0}),
        (TEN_4_GPU_NODES, True, ("autoscaling", 1, 40, {"num_gpus": 1}), {"CPU": 1.0, "GPU": 1}),
    ],
    ids=["2 cores", "one 32-core node", "10 x 4-GPU nodes"],
)
def test_defaults_follow_the_cluster(capacity, data_defaults, label_pool, train_workers):
    assert execution_defaults(capacity) == {"parquet_reader_v2": data_defaults, "reserve_per_operator": data_defaults}
    use_gpu = capacity.seen("GPU") > 0  # the label job's default
    compute = predictor_compute(label_predict(f"predict.use_gpu={str(use_gpu).lower()}"), capacity, 0.9)
    kind, least, most, per_actor = label_pool
    assert (compute["compute"].min_size, compute["compute"].max_size) == (least, most)
    assert (kind == "autoscaling") == capacity.autoscales
    assert {k: compute[k] for k in per_actor} == per_actor
    workers = [] if not use_gpu else ["scaling.use_gpu=true", "scaling.num_workers=40"]
    assert plan_worker_resources(load_config(TrainConfig, None, workers).scaling, capacity) == train_workers
