"""`prepare` end to end on shards written by the real img2dataset, through a moto S3 server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from i2d import run_img2dataset
from PIL import Image

from raypipe.config import PrepareConfig, StorageConfig, load_config
from raypipe.io.fs import resolve
from raypipe.io.readers import InputError
from raypipe.pipeline.prepare import PrepareError, run_prepare
from raypipe.schema import Status
from raypipe.transforms.image import image_rows

pytestmark = pytest.mark.integration

COLOURS = {"tomato": (220, 40, 30), "lime": (40, 200, 60), "sky": (60, 120, 230)}
N_GOOD = 24


def _jpeg(rgb, seed) -> bytes:
    noise = np.random.default_rng(seed).integers(-20, 20, (120, 160, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


@pytest.fixture(scope="module")
def i2d_shards(tmp_path_factory):
    """24 good pairs over 3 classes, one undecodable image and one 404, in both img2dataset formats."""
    files, rows = {}, []
    names = list(COLOURS)
    for i in range(N_GOOD):
        label = names[i % 3]
        files[f"{i}.jpg"] = _jpeg(COLOURS[label], i)
        rows.append({"path": f"{i}.jpg", "caption": f"A {label} thing, swimming #{i}!", "id": 5000 + i, "label": label})
    files["junk.jpg"] = b"this is not an image"
    rows.append({"path": "junk.jpg", "caption": "broken", "id": 6000, "label": "lime"})
    rows.append({"path": "gone.jpg", "caption": "missing", "id": 6001, "label": "sky"})
    root = tmp_path_factory.mktemp("i2d")
    return {fmt: run_img2dataset(rows, files, root / fmt, fmt) for fmt in ("webdataset", "parquet")}


def _upload(local_dir, bucket: str, prefix: str) -> str:
    s3 = resolve(f"s3://{bucket}", StorageConfig()).fs
    pafs.copy_files(str(local_dir), f"{bucket}/{prefix}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    return f"s3://{bucket}/{prefix}"


def _read_prepared(output: str) -> pa.Table:
    loc = resolve(f"{output}/prepared", StorageConfig())
    return pq.ParquetDataset(loc.path, filesystem=loc.fs).read()


def test_webdataset_from_s3_to_s3_accounts_for_every_row(ray_cluster, bucket, i2d_shards):
    source = _upload(i2d_shards["webdataset"], bucket, "coyo/shards")
    output = f"s3://{bucket}/prepared-run"
    cfg = load_config(PrepareConfig, None, [f"data.input={source}", f"output={output}", "vocab.min_freq=1"])
    stats = run_prepare(cfg)

    assert stats["input_format"] == "webdataset" and stats["input_files"] == 2
    assert stats["rows_in"] == N_GOOD + 2
    assert stats["rows_ok"] == N_GOOD
    assert stats["by_status"] == {Status.OK.value: N_GOOD, Status.NOT_DOWNLOADED.value: 2}
    assert sum(s["rows"] for s in stats["shards"].values()) == stats["rows_in"]
    reasons = " ".join(e["error_message"] for e in stats["error_examples"][Status.NOT_DOWNLOADED.value])
    assert "failed_to_download" in reasons and "failed_to_resize" in reasons

    table = _read_prepared(output)
    assert table.num_rows == N_GOOD + 2 and len(set(table["key"].to_pylist())) == N_GOOD + 2
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    assert ok.schema.field("image").type == pa.large_binary()  # one byte string of pixels per row
    images = image_rows(ok["image"])
    assert images.shape == (N_GOOD, 64, 64, 3) and images.dtype == np.uint8
    # Colour survives decode + resize: each class's image is dominated by its own channel.
    for label, image in zip(ok["label"].to_pylist(), images):
        assert int(np.argmax(image.reshape(-1, 3).mean(0))) == int(np.argmax(COLOURS[label]))
    tokens = np.stack(ok["tokens"].to_numpy(zero_copy_only=False))
    assert tokens.dtype == np.int32 and tokens.shape[1] == 32 and (ok["length"].to_numpy() > 0).all()

    out = resolve(output, StorageConfig())
    classes = json.loads(out.fs.open_input_stream(f"{out.path}/classes.json").read())
    vocab = json.loads(out.fs.open_input_stream(f"{out.path}/vocab.json").read())
    assert classes == sorted(COLOURS)
    assert "swim" in vocab["tokens"] and "swimming" not in vocab["tokens"]  # lemmatized
    assert {"tomato", "lime", "sky"} <= set(vocab["tokens"])
    assert json.loads(out.fs.open_input_stream(f"{out.path}/stats.json").read())["rows_in"] == N_GOOD + 2


def test_img2dataset_parquet_with_sidecar_labels_and_passthrough(ray_cluster, tmp_path, i2d_shards):
    # Labels kept apart from the shards (like COYO-Labeled-300M), joined on COYO's `id`.
    sidecar = tmp_path / "labels.parquet"
    ids = [5000 + i for i in range(N_GOOD) if i != 5]  # one good row has no label -> missing_label
    pq.write_table(pa.table({"id": ids, "category": [["tomato", "lime", "sky"][(i - 5000) % 3] for i in ids]}), sidecar)
    cfg = load_config(
        PrepareConfig,
        None,
        [
            f"data.input={i2d_shards['parquet']}",
            "data.keep_columns=[id, url]",
            f"labels.sidecar={sidecar}",
            "labels.join_on=id",
            "labels.column=category",
            f"output={tmp_path / 'out'}",
        ],
    )
    stats = run_prepare(cfg)
    assert stats["input_format"] == "img2dataset_parquet"
    assert stats["by_status"] == {Status.OK.value: N_GOOD - 1, Status.NOT_DOWNLOADED.value: 2, Status.MISSING_LABEL.value: 1}
    table = _read_prepared(str(tmp_path / "out"))
    assert {"id", "url"} <= set(table.column_names)
    row = table.filter(pa.compute.equal(table["id"], 5003)).to_pylist()[0]
    assert row["label"] == "tomato" and row["label_id"] == 2 and row["url"].endswith("/3.jpg")

    # A second run into the same output refuses to overwrite it unless asked.
    with pytest.raises(PrepareError, match="overwrite=true"):
        run_prepare(cfg)

    # With overwrite=true, a run that cannot go leaves the output as it was: a class list naming none of the
    # labels is refused from the sidecar before any pass; a run that finds no usable row (every image above
    # image.max_pixels here) fails after its passes, having written nothing.
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    no_class = cfg.model_copy(update={"overwrite": True, "labels": cfg.labels.model_copy(update={"classes": ["zebra"]})})
    with pytest.raises(PrepareError, match=r"labels.classes \['zebra'\] matches none of the labels of column"):
        run_prepare(no_class)
    no_image = cfg.model_copy(update={"overwrite": True, "image": cfg.image.model_copy(update={"max_pixels": 1})})
    with pytest.raises(PrepareError, match=r"no usable row in .*'image_too_large': 2\d.*nothing was written"):
        run_prepare(no_image)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before

    # A run that can go replaces it whole, and leaves no staging folder behind.
    fewer = cfg.model_copy(update={"overwrite": True, "data": cfg.data.model_copy(update={"limit": 10})})
    assert run_prepare(fewer)["rows_in"] == 10
    assert [p.name for p in (tmp_path / "out").iterdir()] and not list((tmp_path / "out").glob(".staging-*"))
    assert _read_prepared(str(tmp_path / "out")).num_rows == 10


def test_plain_parquet_with_a_missing_column_names_the_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"uid": ["a"], "img": [b"x"], "alt": ["t"]}), path)
    cfg = load_config(PrepareConfig, None, [f"data.input={path}", "data.format=parquet", f"output={tmp_path / 'o'}"])
    with pytest.raises(InputError, match=r"pairs.parquet: column 'key' is missing.*data.key_column"):
        run_prepare(cfg)
    wrong_type = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"key": ["a"], "jpg": ["not bytes"], "caption": ["t"]}), wrong_type)
    cfg = load_config(PrepareConfig, None, [f"data.input={wrong_type}", "data.format=parquet", f"output={tmp_path / 'o'}"])
    with pytest.raises(InputError, match=r"typed.parquet: column 'jpg' has type string, expected binary"):
        run_prepare(cfg)


def _prepared_rows(output) -> list[dict]:
    """Every prepared row, by key, with array cells (token ids) as lists."""
    rows = _read_prepared(str(output)).to_pylist()
    return sorted(({k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()} for row in rows),
                  key=lambda row: row["key"])


def test_a_killed_prepare_resumes_from_its_finished_inputs_to_the_same_result(ray_cluster, tmp_path):
    """The prepare job killed (SIGKILL) once some input files are done, then run again: it skips those
    and its output equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    from ray.util.state import list_jobs, list_tasks
    from waiting import wait_until

    from raypipe.datasets.sample import SampleSpec, write_sample

    write_sample(str(tmp_path / "sample"), SampleSpec(num_pairs=480, shard_size=40, image_size=(48, 48)),
                 formats=("parquet",))
    args = [f"data.input={tmp_path / 'sample' / 'parquet'}", "text.lemmatize=false", "ray.batch_size=8",
            "ray.progress_bars=false"]
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    script = Path(__file__).parents[2] / "jobs" / "prepare.py"
    proc = subprocess.Popen([sys.executable, str(script), *args, f"output={tmp_path / 'resumed'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished_inputs() -> int:
        staged = list((tmp_path / "resumed").glob(".staging-*/prepared"))
        return sum(1 for d in staged[0].iterdir() if any(d.glob("part-*.parquet"))) if staged else 0

    try:
        wait_until(lambda: proc.poll() is not None or finished_inputs() >= 2, 300, "two prepared input files",
                   interval_s=0.05)
        assert proc.poll() is None, "the job ended before it could be interrupted"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def tasks_ended() -> bool:  # none of the killed job's tasks may still write a part
        jobs = [j.job_id for j in list_jobs(address=ray_cluster.dashboard)
                if j.driver_info and str(j.driver_info.pid) == str(proc.pid)]
        tasks = list_tasks(address=ray_cluster.dashboard, filters=[("job_id", "=", jobs[0])]) if jobs else [None]
        return bool(jobs) and all(t.state in ("FINISHED", "FAILED") for t in tasks)

    wait_until(tasks_ended, 60, "the killed job's tasks to end")
    assert not (tmp_path / "resumed" / "prepared").exists()  # nothing published by the killed run

    resumed = run_prepare(load_config(PrepareConfig, None, [*args, f"output={tmp_path / 'resumed'}"]))
    whole = run_prepare(load_config(PrepareConfig, None, [*args, f"output={tmp_path / 'whole'}"]))
    assert resumed["input_files_resumed"] >= 1 and whole["input_files_resumed"] == 0
    assert resumed["rows_in"] == whole["rows_in"] == 480 and resumed["by_status"] == whole["by_status"]
    assert _prepared_rows(tmp_path / "resumed") == _prepared_rows(tmp_path / "whole")
    assert not list((tmp_path / "resumed").glob(".staging-*"))
