"""The built-in sample mirrors what the real img2dataset writes.

Runs img2dataset on 3 JPEGs and 1 missing file served on 127.0.0.1 (tests/i2d.py), in both ``webdataset`` and ``parquet`` output formats, and
compares file names, parquet columns and types, tar member suffixes, json keys, keys and stats files
with ``raypipe.datasets.sample``'s output.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from i2d import run_img2dataset
from PIL import Image

from raypipe.datasets import sample
from raypipe.formats import img2dataset as shard_format

pytestmark = pytest.mark.integration

SHARD_SIZE = 500  # not img2dataset's default (10000), to check the key width follows it


@pytest.fixture(scope="module")
def real_outputs(tmp_path_factory):
    """img2dataset's own output folders, one per output format: 3 JPEGs and one URL that 404s."""
    files = {}
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        out = io.BytesIO()
        Image.new("RGB", (64 + 16 * i, 48), color).save(out, format="JPEG", quality=90)
        files[f"img{i}.jpg"] = out.getvalue()
    rows = [
        {"path": f"img{i}.jpg", "caption": f"caption {i}", "id": 4_000_000_000_000 + i, "label": "park"}
        for i in range(3)
    ] + [{"path": "missing.jpg", "caption": "gone", "id": 4_000_000_000_099, "label": "lake"}]
    work = tmp_path_factory.mktemp("img2dataset")
    return {
        fmt: run_img2dataset(rows, files, work / fmt, fmt, number_sample_per_shard=SHARD_SIZE, thread_count=2)
        for fmt in sample.FORMATS
    }


@pytest.fixture(scope="module")
def sample_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    spec = sample.SampleSpec(num_pairs=200, shard_size=SHARD_SIZE, image_size=(64, 48), failed_fraction=0.05)
    sample.write_sample(str(out), spec)
    return {fmt: out / fmt for fmt in sample.FORMATS}


def _schema(path: Path) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in pq.read_schema(path)]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_img2dataset_ran_offline(real_outputs):
    for fmt, folder in real_outputs.items():
        stats = json.loads((folder / "00000_stats.json").read_text())
        assert stats["count"] == 4, (fmt, stats)
        assert stats["successes"] == 3, (fmt, stats)
        assert stats["failed_to_download"] == 1, (fmt, stats)


def test_same_file_names(real_outputs, sample_outputs):
    assert _files(real_outputs["webdataset"]) == _files(sample_outputs["webdataset"]) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    assert _files(real_outputs["parquet"]) == _files(sample_outputs["parquet"]) == [
        "00000.parquet",
        "00000_stats.json",
    ]


@pytest.mark.parametrize("fmt", sample.FORMATS)
def test_same_parquet_columns_and_types(real_outputs, sample_outputs, fmt):
    real = _schema(real_outputs[fmt] / "00000.parquet")
    ours = _schema(sample_outputs[fmt] / "00000.parquet")
    assert ours == real
    expected = shard_format.PARQUET_SCHEMA if fmt == "parquet" else shard_format.METADATA_SCHEMA
    assert real == [(f.name, str(f.type)) for f in expected]


@pytest.mark.parametrize("fmt", sample.FORMATS)
def test_same_row_conventions(real_outputs, sample_outputs, fmt):
    real = pq.read_table(real_outputs[fmt] / "00000.parquet").to_pylist()
    ours = pq.read_table(sample_outputs[fmt] / "00000.parquet").to_pylist()
    for rows in (real, ours):
        ok = [r for r in rows if r["status"] == "success"]
        failed = [r for r in rows if r["status"] != "success"]
        assert ok and failed
        assert {r["status"] for r in failed} == {"failed_to_download"}
        for r in failed:
            assert r["error_message"]
            assert r["width"] is r["height"] is r["exif"] is r["sha256"] is None
            if fmt == "parquet":
                assert r["jpg"] is None
        for r in ok:
            assert r["error_message"] is None
            assert json.loads(r["exif"]) == {}
            assert len(r["sha256"]) == 64
            if fmt == "parquet":
                assert Image.open(io.BytesIO(r["jpg"])).size == (r["width"], r["height"])
        # img2dataset's key: shard * 10**ceil(log10(shard_size)) + index, 5 + 3 digits here
        assert all(len(r["key"]) == 8 and r["key"].isdigit() for r in rows)
    assert sorted(r["key"] for r in real) == [shard_format.compute_key(i, 0, SHARD_SIZE) for i in range(4)]
    assert [r["error_message"] for r in real if r["status"] != "success"] == ["HTTP Error 404: Not Found"]


def _tar_layout(path: Path) -> tuple[list[str], dict, list[str]]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        first_key = names[0].split(".")[0]
        per_key = [n.split(".", 1)[1] for n in names if n.split(".")[0] == first_key]
        meta = json.loads(tar.extractfile(f"{first_key}.json").read())
        attrs = {(m.mode, m.uname, m.gname, m.isfile()) for m in members}
    return per_key, meta, sorted(attrs)


def test_same_tar_members_and_json_keys(real_outputs, sample_outputs):
    real_suffixes, real_meta, real_attrs = _tar_layout(real_outputs["webdataset"] / "00000.tar")
    our_suffixes, our_meta, our_attrs = _tar_layout(sample_outputs["webdataset"] / "00000.tar")
    assert our_suffixes == real_suffixes == list(shard_format.TAR_MEMBER_SUFFIXES)
    assert list(our_meta) == list(real_meta)  # same keys, same order
    assert {k: type(v).__name__ for k, v in our_meta.items()} == {k: type(v).__name__ for k, v in real_meta.items()}
    assert our_attrs == real_attrs
    with tarfile.open(real_outputs["webdataset"] / "00000.tar") as tar:
        real_json = tar.extractfile(tar.getmembers()[1]).read().decode()
    with tarfile.open(sample_outputs["webdataset"] / "00000.tar") as tar:
        our_json = tar.extractfile(tar.getmembers()[1]).read().decode()
    assert real_json.startswith('{\n    "id": ') and our_json.startswith('{\n    "id": ')  # indent=4


def test_same_stats_keys(real_outputs, sample_outputs):
    for fmt in sample.FORMATS:
        real = json.loads((real_outputs[fmt] / "00000_stats.json").read_text())
        ours = json.loads((sample_outputs[fmt] / "00000_stats.json").read_text())
        assert list(ours) == list(real)
        assert {k: type(v).__name__ for k, v in ours.items()} == {k: type(v).__name__ for k, v in real.items()}
        assert real["status_dict"] == {"success": 3, "HTTP Error 404: Not Found": 1}
