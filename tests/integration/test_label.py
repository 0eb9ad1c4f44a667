"""The labeling job end to end on the moto S3 server and the session's Ray cluster: one tiny model is
trained for the module (a trainer start costs ~30-60 s here), then labels plain Parquet pair tables."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from waiting import wait_until

from raypipe.bundle import load_bundle
from raypipe.config import LabelJobConfig, PrepareConfig, StorageConfig, TrainConfig, load_config
from raypipe.io.fs import resolve
from raypipe.pipeline.label import SUMMARY_FILE, LabelError, run_label
from raypipe.pipeline.prepare import run_prepare
from raypipe.pipeline.train import run_train
from raypipe.datasets.sample import SampleSpec, write_sample
from raypipe.transforms.image import ImageError, load_rgb
from raypipe.transforms.text import TextNormalizer, encode_tokens

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAD = {  # key -> (image bytes, caption, expected status)
    900001: (b"this is not an image", "a photo", "image_decode_error"),
    900002: (None, "a photo", "missing_image"),
    900003: ("GOOD", "", "missing_text"),
    900004: ("GOOD", "!!! 42 ...", "missing_text"),
}


@pytest.fixture(scope="module")
def module_bucket(s3_endpoint) -> str:
    import boto3

    name = f"rp-label-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory) -> tuple[pa.Table, Path]:
    """The sample's downloaded pairs as a plain table: id (int), image (bytes), alt_text, url."""
    root = tmp_path_factory.mktemp("label-data")
    write_sample(str(root / "sample"), SampleSpec(num_pairs=320, shard_size=160, image_size=(64, 64)))
    files = sorted(str(p) for p in (root / "sample" / "parquet").glob("*.parquet"))
    table = pq.ParquetDataset(files).read(columns=["key", "jpg", "caption", "url", "status"])
    table = table.filter(pc.equal(table["status"], "success"))
    table = table.filter(pc.match_substring_regex(table["caption"], "[A-Za-z]{3,}"))  # captions with words
    return pa.table({
        "id": pc.cast(table["key"], pa.int64()),
        "image": table["jpg"],
        "alt_text": table["caption"],
        "url": table["url"],
    }), root


@pytest.fixture(scope="module")
def bundle_url(ray_cluster, sample_rows, module_bucket) -> str:
    _, root = sample_rows
    prepared = root / "prepared"
    run_prepare(load_config(PrepareConfig, None, [f"data.input={root / 'sample' / 'parquet'}", f"output={prepared}"]))
    result = run_train(load_config(TrainConfig, None, [
        f"prepared={prepared}", f"run.storage_path=s3://{module_bucket}/runs", "run.name=label-tiny",
        "model.conv_channels=[8]", "model.embed_dim=8", "model.lstm_hidden=8", "model.fc_dims=[16]",
        "optim.epochs=1", "scaling.num_workers=1",
    ]))
    return result["bundle"]


def write_collection(table: pa.Table, url: str, parts: int, bad: bool = False) -> pa.Table:
    """Writes ``table`` (plus the bad rows when asked) as ``parts`` Parquet files under ``url``."""
    if bad:
        good_image = table["image"][0].as_py()
        extra = pa.table({
            "id": pa.array(list(BAD), pa.int64()),
            "image": pa.array([good_image if v[0] == "GOOD" else v[0] for v in BAD.values()], pa.binary()),
            "alt_text": pa.array([v[1] for v in BAD.values()], pa.string()),
            "url": pa.array([f"https://bad.example/{k}" for k in BAD], pa.string()),
        })
        table = pa.concat_tables([extra, table.cast(extra.schema)])
    loc = resolve(url, StorageConfig())
    loc.fs.create_dir(loc.path, recursive=True)
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        pq.write_table(table.take(pa.array(chunk)), f"{loc.path}/pairs-{i:03d}.parquet", filesystem=loc.fs)
    return table


def label_args(inputs: str, output: str, *more: str) -> list[str]:
    return [f"data.input={inputs}", "data.format=parquet", "data.key_column=id", "data.image_column=image",
            "data.text_column=alt_text", "data.keep_columns=[url]", f"output={output}", "predict.max_actors=1",
            "ray.progress_bars=false", *more]


def read_output(url: str) -> pa.Table:
    loc = resolve(url, StorageConfig())
    files = sorted(
        i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    return pa.concat_tables([pq.read_table(f, filesystem=loc.fs) for f in files])


def plain_loop(bundle_url: str, table: pa.Table) -> dict[str, tuple[int, float] | None]:
    """The same bundle applied one row at a time in this process, with the transforms called directly;
    probabilities at the bundle's temperature (fitted on validation when it was trained)."""
    bundle = load_bundle(bundle_url, StorageConfig())
    model = bundle.build_model("cpu")
    normalizer = TextNormalizer(bundle.text)
    out = {}
    for row in table.to_pylist():
        tokens = normalizer.tokens(row["alt_text"])
        try:
            image = load_rgb(row["image"], bundle.image)
        except ImageError:
            out[str(row["id"])] = None
            continue
        if not tokens:
            out[str(row["id"])] = None
            continue
        ids, _ = encode_tokens([tokens], bundle.vocab.token_to_id, bundle.text.max_len)
        with torch.inference_mode():
            logits = model(torch.from_numpy(image[None]), torch.from_numpy(ids).long())
            probs = torch.softmax(logits / bundle.temperature, dim=1)[0]
        out[str(row["id"])] = (int(probs.argmax()), float(probs.max()))
    return out


def test_good_and_bad_rows_on_s3_match_a_plain_loop(bundle_url, sample_rows, module_bucket):
    table, _ = sample_rows
    inputs, output = f"s3://{module_bucket}/pairs", f"s3://{module_bucket}/labels"
    written = write_collection(table.slice(0, 120), inputs, parts=3, bad=True)
    # fp32: the plain loop's precision (bf16 labeling's agreement with fp32 is tests/unit/test_precision.py's).
    summary = run_label(load_config(LabelJobConfig, None, [*label_args(inputs, output), f"bundle={bundle_url}",
                                                            "explain=true", "explain_words=3", "predict.precision=fp32"]))
    bundle = load_bundle(bundle_url, StorageConfig())

    out = read_output(output)
    keys = [str(k) for k in written["id"].to_pylist()]
    assert out.num_rows == written.num_rows and sorted(out["key"].to_pylist()) == sorted(keys)  # one row per row
    rows = {r["key"]: r for r in out.to_pylist()}
    for key, (_, _, status) in BAD.items():
        assert rows[str(key)]["status"] == status and rows[str(key)]["label"] is None
        assert rows[str(key)]["error_message"]
    good = [r for k, r in rows.items() if int(k) not in BAD]
    assert all(r["status"] == "ok" and r["label"] in bundle.classes for r in good)
    assert all(r["label"] == bundle.classes[r["label_id"]] and len(r["top_k_labels"]) == 3 for r in good)
    assert all(r["top_k_labels"][0] == r["label"] and r["confidence"] == pytest.approx(r["top_k_scores"][0]) for r in good)
    assert all(r["model"] == bundle.identity for r in rows.values())
    assert all(r["url"] for r in rows.values()) and all(r["source"].endswith(".parquet") for r in rows.values())
    assert all(0 < len(r["attention_words"]) <= 3 for r in good)

    # The same labels as the bundle applied in a plain single-process loop.
    expected = plain_loop(bundle_url, written)
    assert {k for k, v in expected.items() if v is None} == {str(k) for k in BAD}
    for key, value in expected.items():
        if value is not None:
            assert rows[key]["label_id"] == value[0], key
            assert rows[key]["confidence"] == pytest.approx(value[1], abs=1e-4)

    assert summary["complete"] and summary["rows_in"] == written.num_rows and summary["rows_labeled"] == len(good)
    assert summary["by_status"] == {"ok": len(good), "image_decode_error": 1, "missing_image": 1, "missing_text": 2}
    assert summary["files"] == {"total": 3, "labeled": 3, "skipped_complete": 0, "complete": 3, "incomplete": []}
    loc = resolve(output, StorageConfig())
    on_disk = json.loads(loc.fs.open_input_stream(f"{loc.path}/{SUMMARY_FILE}").read())
    assert on_disk["rows_labeled"] == summary["rows_labeled"] and on_disk["pairs_per_s"] > 0


def _parts(url: str) -> dict[str, dict[str, object]]:
    """name -> {part path: mtime} of each input's output directory."""
    loc = resolve(url, StorageConfig())
    out: dict[str, dict[str, object]] = {}
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and "/" in info.path[len(loc.path) + 1:]:
            name = info.path[len(loc.path) + 1:].split("/")[0]
            out.setdefault(name, {})[info.path] = info.mtime
    return out


def test_rerun_after_a_crash_completes_without_duplicates_or_gaps(bundle_url, sample_rows, tmp_path):
    table, _ = sample_rows
    inputs, output = str(tmp_path / "pairs"), str(tmp_path / "labels")
    written = write_collection(table.slice(0, 160), inputs, parts=4)
    # Small batches: several part files per input, so an input can be left half written.
    args = [*label_args(inputs, output), f"bundle={bundle_url}", "ray.batch_size=16", "predict.batch_size=16",
            "rows_per_part=16"]
    first = run_label(load_config(LabelJobConfig, None, args))
    assert first["complete"] and first["rows_out"] == written.num_rows
    before = _parts(output)
    assert sorted(before) == ["pairs-000", "pairs-001", "pairs-002", "pairs-003"]
    assert len(before["pairs-002"]) > 1

    # A crash: one input's output never written, another's half written with a part cut short.
    for path in before["pairs-001"]:
        Path(path).unlink()
    Path(sorted(before["pairs-002"])[0]).unlink()
    Path(output, "pairs-002", "part-cut-short.parquet").write_bytes(b"PAR1\x00\x01")
    second = run_label(load_config(LabelJobConfig, None, args))

    assert second["complete"] and second["files"]["labeled"] == 2 and second["files"]["skipped_complete"] == 2
    assert second["rows_processed"] == written.num_rows // 2  # two of four equal inputs
    out = read_output(output)
    assert Counter(out["key"].to_pylist()) == Counter(str(k) for k in written["id"].to_pylist())  # each key once
    after = _parts(output)
    assert after["pairs-000"] == before["pairs-000"] and after["pairs-003"] == before["pairs-003"]  # not recomputed
    assert not set(after["pairs-002"]) & set(before["pairs-002"])  # the partial input was redone from scratch

    # A third run has nothing left to do; another bundle is refused rather than mixed in.
    third = run_label(load_config(LabelJobConfig, None, args))
    assert third["files"]["labeled"] == 0 and third["rows_processed"] == 0 and _parts(output) == after
    job = Path(output, "_job.json")
    job.write_text(json.dumps({**json.loads(job.read_text()), "model": "another-model"}))
    with pytest.raises(LabelError, match="another bundle"):
        run_label(load_config(LabelJobConfig, None, args))


def _actors_gone(dashboard: str, driver_pid: int) -> bool:
    """Every map actor of the job whose driver had ``driver_pid`` is DEAD and its process has exited."""
    import psutil
    from ray.util.state import list_actors, list_jobs

    jobs = [j.job_id for j in list_jobs(address=dashboard)
            if j.driver_info and str(j.driver_info.pid) == str(driver_pid)]
    if not jobs:
        return False
    actors = list_actors(address=dashboard, filters=[("job_id", "=", jobs[0])], detail=True)
    # The map actors (predictors, part writers); Ray Data's detached ActorLocationTracker outlives jobs.
    workers = [a for a in actors if a.class_name.startswith("MapWorker")]
    return bool(workers) and all(a.state == "DEAD" and not (a.pid and psutil.pid_exists(a.pid)) for a in workers)


def test_a_killed_run_resumes_to_a_complete_output(bundle_url, sample_rows, ray_cluster, tmp_path):
    """The job killed (SIGKILL) while it writes, then run again: everything labeled, each key once."""
    import os
    import signal
    import subprocess
    import sys

    table, _ = sample_rows
    inputs, output = str(tmp_path / "pairs"), str(tmp_path / "labels")
    bigger = pa.concat_tables(  # enough rows that the job is surely killed half way
        [table.set_column(0, "id", pc.add(table["id"], pa.scalar(i * 10_000_000, pa.int64()))) for i in range(4)]
    )
    written = write_collection(bigger, inputs, parts=8)
    args = [*label_args(inputs, output), f"bundle={bundle_url}", "ray.batch_size=4", "predict.batch_size=4",
            "rows_per_part=4"]
    script = Path(__file__).parents[2] / "jobs" / "label.py"
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or any(name.startswith("pairs-") for name in _parts(output)),
                   120, "the job's first labeled part", interval_s=0.05)
        assert proc.poll() is None, "the job ended before it could be interrupted"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # The killed driver's map actors (the part writers among them) must be gone before the rerun, or a
    # late write could add a part after it. Ray marks them DEAD and ends their processes within a second
    # (seen 2026-12-06); the job's own end time is never set for a SIGKILLed driver, so it is no condition.
    wait_until(lambda: _actors_gone(ray_cluster.dashboard, proc.pid), 60, "the killed job's actors to end")

    resumed = run_label(load_config(LabelJobConfig, None, args))
    assert resumed["complete"] and resumed["files"]["labeled"] >= 1
    out = read_output(output)
    assert Counter(out["key"].to_pylist()) == Counter(str(k) for k in written["id"].to_pylist())
