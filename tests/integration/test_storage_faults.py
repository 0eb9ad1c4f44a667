"""The object store goes away for a few seconds in the middle of a training run, just as the first
checkpoint is written: the run retries and finishes with every checkpoint and its bundle."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from flaky_proxy import FlakyProxy

from raypipe.bundle import load_bundle
from raypipe.config import PrepareConfig, StorageConfig, TrainConfig, load_config
from raypipe.io.fs import resolve
from raypipe.pipeline.prepare import run_prepare
from raypipe.pipeline.train import run_train
from raypipe.datasets.sample import SampleSpec, write_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("faults-data")
    write_sample(str(root / "sample"), SampleSpec(num_pairs=160, shard_size=80, image_size=(64, 64)))
    run_prepare(load_config(PrepareConfig, None, [f"data.input={root / 'sample' / 'parquet'}",
                                                  f"output={root / 'prepared'}", "ray.progress_bars=false"]))
    return str(root / "prepared")


def test_a_checkpoint_write_rides_out_a_few_seconds_of_outage(prepared, bucket, s3_endpoint):
    proxy = FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    # The first upload of a checkpoint file (by the training worker) is cut, and the store stays
    # unreachable for 3 s.
    proxy.outage_on(rb"^PUT /[^ ]*/checkpoint_", seconds=3.0)
    storage = f"s3://{bucket}/runs"
    try:
        result = run_train(load_config(TrainConfig, None, [
            f"prepared={prepared}", f"run.storage_path={storage}", "run.name=outage", f"storage.endpoint_url={proxy.url}",
            "optim.epochs=2", "model.conv_channels=[8]", "model.embed_dim=8", "model.lstm_hidden=8",
            "model.fc_dims=[16]", "ray.progress_bars=false",
        ]))
    finally:
        proxy.close()

    assert proxy.outages == 1 and proxy.dropped >= 1  # the outage happened, and requests were retried into it
    assert result["epochs_run"] == 2
    loc = resolve(f"{storage}/outage", StorageConfig())
    files = [i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))]
    assert len([f for f in files if f.endswith("/progress.json")]) == 2  # both epochs' checkpoints
    assert load_bundle(result["bundle"], StorageConfig()).identity == result["identity"]
