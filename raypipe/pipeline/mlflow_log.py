"""MLflow logging of a training run (``run.mlflow_tracking_uri``), an option when ``mlflow`` is installed
(the ``mlflow`` extra). The driver opens the MLflow run, logs the config as params and, at the end, the
bundle as artifacts; the rank-0 training worker logs each epoch's metrics to it, as it writes TensorBoard's."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from raypipe.config import TrainConfig, dump_config, flat_config
from raypipe.errors import UserError
from raypipe.io import fs as rfs

# In <storage_path>/<name>: the MLflow run that a resumed run goes on logging to.
RUN_RECORD = "mlflow_run.json"
BUNDLE_ARTIFACTS = "bundle"


class MlflowError(UserError, RuntimeError):
    """MLflow asked for but not usable."""


def require_mlflow(cfg: TrainConfig) -> None:
    """Fails before any cluster work when run.mlflow_tracking_uri is set and MLflow is not installed."""
    if cfg.run.mlflow_tracking_uri is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise MlflowError(
            "run.mlflow_tracking_uri is set but MLflow is not installed: pip install 'raypipe[mlflow]' "
            "(or leave run.mlflow_tracking_uri unset)"
        ) from None


@dataclass(frozen=True)
class MlflowRun:
    tracking_uri: str
    run_id: str


def _experiment_id(client) -> str:
    """MLflow's own choice: MLFLOW_EXPERIMENT_NAME (created if new), else MLFLOW_EXPERIMENT_ID, else Default."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else client.create_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")


def _earlier_run(client, record: rfs.Location, tracking_uri: str) -> str | None:
    """The id of the MLflow run an earlier attempt of this run logged to, if it is still there."""
    from mlflow.exceptions import MlflowException

    if not rfs.exists(record):
        return None
    earlier = json.loads(rfs.read_text(record))
    if earlier["tracking_uri"] != tracking_uri:
        return None
    try:
        return client.get_run(earlier["run_id"]).info.run_id
    except MlflowException:  # deleted, or another store at the same URI
        return None


def open_run(cfg: TrainConfig, run_dir: rfs.Location) -> MlflowRun:
    """The MLflow run of this training run, named run.name: the one an earlier attempt started (a resumed
    run's epochs continue its curves), else a new one. Logs the config's params that the run does not hold
    yet (MLflow keeps a param's first value; the bundle's metrics.json has the config of the last attempt)."""
    from mlflow import MlflowClient

    tracking_uri = cfg.run.mlflow_tracking_uri
    client = MlflowClient(tracking_uri)
    record = run_dir.join(RUN_RECORD)
    run_id = _earlier_run(client, record, tracking_uri)
    if run_id is None:
        run_id = client.create_run(_experiment_id(client), run_name=cfg.run.name).info.run_id
        rfs.write_text(record, json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}))
    else:
        client.update_run(run_id, status="RUNNING")
    logged = client.get_run(run_id).data.params
    params = {k: v for k, v in flat_config(dump_config(cfg)).items() if k not in logged}
    for name, value in params.items():
        client.log_param(run_id, name, value)
    return MlflowRun(tracking_uri, run_id)


def log_epoch(run: MlflowRun, scalars: dict[str, float], epoch: int) -> None:
    """One point per metric at step ``epoch`` (rank 0's worker, after every epoch)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now_ms, epoch) for key, value in scalars.items()]
    MlflowClient(run.tracking_uri).log_batch(run.run_id, metrics=metrics)


def log_bundle(run: MlflowRun, bundle_dir: str) -> None:
    """The bundle's files (in a local directory) as the run's artifacts under ``bundle/``."""
    from mlflow import MlflowClient

    MlflowClient(run.tracking_uri).log_artifacts(run.run_id, bundle_dir, artifact_path=BUNDLE_ARTIFACTS)


def end_run(run: MlflowRun, status: str) -> None:
    """``status``: FINISHED or FAILED."""
    from mlflow import MlflowClient

    MlflowClient(run.tracking_uri).set_terminated(run.run_id, status=status)
