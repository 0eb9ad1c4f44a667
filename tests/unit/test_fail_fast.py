"""Settings that cannot work with the input are named before any cluster work, from file metadata or
the first sample: a label column the shards do not have, in Parquet footers and in WebDataset tars."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.config import PrepareConfig, load_config
from raypipe.io.errors import InputError
from raypipe.pipeline.prepare import PrepareError, plan_prepare


def write_tar(path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in (("json", json.dumps(sample).encode()), ("txt", sample["caption"].encode())):
                info = tarfile.TarInfo(f"{sample['key']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def plan(*overrides: str):
    return plan_prepare(load_config(PrepareConfig, None, ["text.lemmatize=false", *overrides]))


def test_a_label_column_the_tar_samples_lack_is_named_from_the_first_sample(tmp_path):
    write_tar(tmp_path / "00000.tar", [{"key": "000", "caption": "a cat"}, {"key": "001", "caption": "a dog"}])
    with pytest.raises(InputError, match=r"first sample's .json in .*00000.tar: column\(s\) \['label'\] missing; "
                                         r"the samples have \['caption', 'key'\]. Set labels.column"):
        plan(f"data.input={tmp_path / '00000.tar'}")
    assert plan(f"data.input={tmp_path / '00000.tar'}", "labels.source=none").inputs.format == "webdataset"


def test_a_label_column_is_checked_in_the_metadata_beside_the_tar(tmp_path):
    write_tar(tmp_path / "00000.tar", [{"key": "000", "caption": "a cat", "category": "cat"}])
    pq.write_table(pa.table({"key": ["000"], "caption": ["a cat"], "status": ["success"], "category": ["cat"]}),
                   tmp_path / "00000.parquet")
    assert plan(f"data.input={tmp_path / '00000.tar'}", "labels.column=category").inputs.column_types == {
        "category": pa.string()}
    with pytest.raises(InputError, match=r"00000.parquet: column\(s\) \['label'\] missing"):
        plan(f"data.input={tmp_path / '00000.tar'}")


def test_a_gs_path_without_gcsfs_names_the_extra_to_install():
    import importlib.util

    from raypipe.config import StorageConfig
    from raypipe.io.fs import StorageError, resolve

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: gs:// paths open")
    with pytest.raises(StorageError, match=r"gs://bucket/shards: no filesystem for scheme 'gs' "
                                           r"\(pip install 'raypipe\[gcs\]'\)"):
        resolve("gs://bucket/shards", StorageConfig())


def test_replacing_an_output_moves_nested_parts_even_without_a_working_directory(tmp_path, monkeypatch):
    """A Ray job's driver may run in a folder that is gone by the time the output is published; object
    store paths ("bucket/key", here a sub-tree filesystem's) are relative, so nothing may resolve them
    against the working directory."""
    import pyarrow.fs as pafs

    from raypipe.io.fs import Location, replace_with

    out = Location(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "out", "store://out")
    (tmp_path / "out" / "prepared" / "old").mkdir(parents=True)
    (tmp_path / "out" / "prepared" / "old" / "part-1.parquet").write_bytes(b"old")
    staged = out.join(".staging-x")
    (tmp_path / "out" / ".staging-x" / "prepared" / "00000").mkdir(parents=True)
    (tmp_path / "out" / ".staging-x" / "prepared" / "00000" / "part-2.parquet").write_bytes(b"new")
    (tmp_path / "out" / ".staging-x" / "stats.json").write_text("{}")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    replace_with(staged, out, ("prepared", "stats.json"))
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["prepared/00000/part-2.parquet", "stats.json"]


def _img2dataset_parquet(path, labels: list) -> None:
    n = len(labels)
    pq.write_table(pa.table({"key": [f"{i:03d}" for i in range(n)], "caption": ["a pet"] * n,
                             "status": ["success"] * n, "jpg": [b"x"] * n, "category": [str(v) for v in labels]}), path)


@pytest.mark.parametrize("where", ["parquet", "tar", "tar+metadata"])
def test_a_class_list_that_names_none_of_the_labels_is_refused_from_the_first_rows(tmp_path, where):
    labels = ["cat", "dog", "cat", 7]
    if where == "parquet":
        _img2dataset_parquet(tmp_path / "00000.parquet", labels)
        source = tmp_path / "00000.parquet"
    else:
        write_tar(tmp_path / "00000.tar", [{"key": f"{i:03d}", "caption": "a pet", "category": label}
                                           for i, label in enumerate(labels)])
        if where == "tar+metadata":
            _img2dataset_parquet(tmp_path / "00000.parquet", labels)
        source = tmp_path / "00000.tar"
    with pytest.raises(PrepareError, match=r"labels.classes \['apple', 'banana'\] matches none of the labels of column "
                                           r"'category' in the first 4 rows of .*00000\.(parquet|tar).* \(most common: "
                                           r"'cat', 'dog', '7'\)\. Fix labels.classes"):
        plan(f"data.input={source}", "labels.column=category", "labels.classes=[apple, banana]")
    # A list that names some of the labels is a choice (the rest become unknown_label), and ints match digits.
    assert plan(f"data.input={source}", "labels.column=category", "labels.classes=[cat, 7]").cfg.labels.classes == ["cat", "7"]


def test_an_input_with_no_rows_is_refused_from_the_footers_or_the_tars(tmp_path):
    _img2dataset_parquet(tmp_path / "00000.parquet", [])
    with pytest.raises(InputError, match=r"the 1 input file\(s\) hold no rows \(Parquet footers\); nothing to read"):
        plan(f"data.input={tmp_path / '00000.parquet'}", "labels.source=none")
    (tmp_path / "empty").mkdir()
    write_tar(tmp_path / "empty" / "00000.tar", [])
    with pytest.raises(InputError, match=r"the 1 input file\(s\) hold no rows \(no tar has a sample\)"):
        plan(f"data.input={tmp_path / 'empty'}", "labels.source=none")
