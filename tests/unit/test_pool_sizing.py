"""Predictor pools and training workers are sized from the cluster so that a job can never wait
forever for resources; what cannot fit is refused with what was asked for and what the cluster has."""

from __future__ import annotations

import pytest

from raypipe.config import EvaluateConfig, LabelJobConfig, TrainConfig, load_config
from raypipe.pipeline.evaluate import EvaluateError, predictor_compute
from raypipe.pipeline.train import TrainError, plan_worker_resources


def label_predict(*overrides: str):
    return load_config(LabelJobConfig, None, list(overrides)).predict


def cpu_share(compute: dict) -> float:
    return compute["compute"].max_size * compute["num_cpus"]


@pytest.mark.parametrize("cpus", [2.0, 3.0, 4.0, 64.0])
def test_default_cpu_pools_always_leave_a_cpu_for_reading_and_preprocessing(cpus):
    for predict, per_actor in ((label_predict("predict.use_gpu=false"), 0.9), (EvaluateConfig().predict, 1.0)):
        compute = predictor_compute(predict, {"CPU": cpus}, per_actor)
        assert compute["compute"].min_size >= 2 and cpu_share(compute) <= cpus - 1


def test_a_cluster_of_one_cpu_is_refused_for_cpu_actors():
    with pytest.raises(EvaluateError, match="need a cluster of at least 2 CPUs.*the cluster has 1"):
        predictor_compute(label_predict("predict.use_gpu=false"), {"CPU": 1.0})


def test_gpu_actors_on_a_cluster_without_gpus_are_refused():
    with pytest.raises(EvaluateError, match="predict.use_gpu=true asks for .* one GPU each; the cluster has no GPU"):
        predictor_compute(label_predict("predict.use_gpu=true"), {"CPU": 4.0})
    compute = predictor_compute(label_predict("predict.use_gpu=true", "predict.max_actors=4"), {"CPU": 4.0, "GPU": 1.0})
    assert compute["compute"].min_size == 1 and compute["num_gpus"] == 1  # runs on the one GPU there is


def test_more_cpu_actors_than_can_usefully_share_the_cpus_are_refused():
    assert cpu_share(predictor_compute(label_predict("predict.use_gpu=false", "predict.max_actors=10"), {"CPU": 2.0})) <= 1
    with pytest.raises(EvaluateError, match=r"predict.max_actors=11 .* 1 CPU\(s\) left .* 2-CPU cluster.* at most 10"):
        predictor_compute(label_predict("predict.use_gpu=false", "predict.max_actors=11"), {"CPU": 2.0})


def test_training_workers_that_cannot_fit_are_refused_with_both_sides():
    def scaling(*overrides: str):
        return load_config(TrainConfig, None, list(overrides)).scaling

    assert plan_worker_resources(scaling(), {"CPU": 2.0}) == {"CPU": 1.0}  # the default on 2 CPUs
    with pytest.raises(TrainError, match="1 worker.* leaves no CPU for data loading on a cluster with 1 CPUs"):
        plan_worker_resources(scaling(), {"CPU": 1.0})
    with pytest.raises(TrainError, match="asks for 2 GPU worker.*the cluster has 1 GPU"):
        plan_worker_resources(scaling("scaling.use_gpu=true", "scaling.num_workers=2"), {"CPU": 8.0, "GPU": 1.0})
