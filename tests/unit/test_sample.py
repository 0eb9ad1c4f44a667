"""raypipe.datasets.sample: deterministic, img2dataset-shaped, and class evidence split between image and text."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raypipe.datasets import sample
from raypipe.formats import img2dataset as shard_format
from raypipe.datasets.sample import CLASSES, SampleSpec, write_sample

# Non-square on purpose: image_size is (width, height).
SPEC = SampleSpec(num_pairs=1600, shard_size=400, image_size=(96, 64), failed_fraction=0.03, seed=7)
SMALL = SampleSpec(num_pairs=250, shard_size=100, image_size=(48, 40), seed=3)

METADATA_COLUMNS = [
    ("id", "int64"),
    ("label", "string"),
    ("caption", "string"),
    ("url", "string"),
    ("key", "string"),
    ("status", "string"),
    ("error_message", "string"),
    ("width", "int32"),
    ("height", "int32"),
    ("original_width", "int32"),
    ("original_height", "int32"),
    ("exif", "string"),
    ("sha256", "string"),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    summary = write_sample(str(out), SPEC)
    return out, summary


@pytest.fixture(scope="module")
def rows(written):
    """All rows of the parquet output format, in file order."""
    out, _ = written
    result = []
    for path in sorted((out / "parquet").glob("*.parquet")):
        result += pq.read_table(path).to_pylist()
    return result


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    write_sample(str(tmp_path / "a"), SMALL)
    write_sample(str(tmp_path / "b"), SMALL)
    write_sample(str(tmp_path / "c"), SampleSpec(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    a, b, c = (_all_files(tmp_path / x) for x in "abc")
    assert sorted(a) == [
        *(f"parquet/{i:05d}{suffix}" for i in range(3) for suffix in (".parquet", "_stats.json")),
        *(f"webdataset/{i:05d}{suffix}" for i in range(3) for suffix in (".parquet", ".tar", "_stats.json")),
    ]
    assert a == b
    assert sorted(c) == sorted(a)
    for name in ("webdataset/00000.tar", "webdataset/00000.parquet", "parquet/00000.parquet", "parquet/00002.parquet"):
        assert a[name] != c[name], name


def test_a_row_does_not_depend_on_sharding():
    by_shard_100 = list(sample.iter_samples(SampleSpec(num_pairs=30, shard_size=100, image_size=(32, 32))))
    by_shard_7 = list(sample.iter_samples(SampleSpec(num_pairs=30, shard_size=7, image_size=(32, 32))))
    for r1, r2 in zip(by_shard_100, by_shard_7):
        assert (r1["caption"], r1["jpg"], r1["label"], r1["id"]) == (r2["caption"], r2["jpg"], r2["label"], r2["id"])
    assert by_shard_7[8]["key"] == "000011"  # shard 1, index 1: ceil(log10(7)) = 1 index digit


# -------------------------------------------------------------------------------------------------
# img2dataset formats


def test_compute_key_is_img2datasets():
    assert shard_format.compute_key(42, 1, 500) == "00001042"  # ceil(log10(500)) = 3 digits for the index
    assert shard_format.compute_key(42, 1, 10000) == "000010042"  # img2dataset's default shard size
    assert shard_format.compute_key(999, 0, 1000) == "00000999"
    assert shard_format.compute_key(0, 12, 1001) == "000120000"


def test_layout_and_summary(written):
    out, summary = written
    n_shards = math.ceil(SPEC.num_pairs / SPEC.shard_size)
    names = [f"{i:05d}" for i in range(n_shards)]
    assert sorted(p.name for p in (out / "webdataset").iterdir()) == sorted(
        f"{n}{s}" for n in names for s in (".tar", ".parquet", "_stats.json")
    )
    assert sorted(p.name for p in (out / "parquet").iterdir()) == sorted(
        f"{n}{s}" for n in names for s in (".parquet", "_stats.json")
    )
    assert summary["num_shards"] == n_shards
    assert summary["paths"]["webdataset"] == [str(out / "webdataset" / f"{n}.tar") for n in names]
    assert summary["paths"]["parquet"] == [str(out / "parquet" / f"{n}.parquet") for n in names]
    assert summary["per_class"] == {c: SPEC.num_pairs // len(CLASSES) for c in CLASSES}
    n_failed = round(SPEC.num_pairs * SPEC.failed_fraction)
    assert summary["per_status"] == {"failed_to_download": n_failed, "success": SPEC.num_pairs - n_failed}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_parquet_columns_and_types(written, fmt):
    out, _ = written
    expected = METADATA_COLUMNS + ([("jpg", "binary")] if fmt == "parquet" else [])
    for path in sorted((out / fmt).glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        assert [(f.name, str(f.type)) for f in pq.read_schema(path)] == expected
        assert meta.num_rows == SPEC.shard_size
        # img2dataset's BufferedParquetWriter flushes every 100 rows
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100] * (SPEC.shard_size // 100)


def test_rows(rows):
    assert len(rows) == SPEC.num_pairs
    keys = [r["key"] for r in rows]
    assert keys == [shard_format.compute_key(i % SPEC.shard_size, i // SPEC.shard_size, SPEC.shard_size) for i in range(len(rows))]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(10**12 <= r["id"] < 10**13 for r in rows)
    assert {r["label"] for r in rows} == set(CLASSES)
    for r in rows:
        assert r["url"].startswith("https://")
        assert isinstance(r["caption"], str)


def test_failed_rows(rows, written):
    out, _ = written
    failed = [r for r in rows if r["status"] != "success"]
    assert len(failed) == round(SPEC.num_pairs * SPEC.failed_fraction)
    for r in failed:
        assert r["status"] == "failed_to_download"
        assert r["error_message"] and re.match(r"HTTP Error \d{3}|<urlopen error|The read|timed out|Remote end|Use of", r["error_message"])
        assert r["jpg"] is None
        assert r["width"] is r["height"] is r["original_width"] is r["original_height"] is None
        assert r["exif"] is r["sha256"] is None
    # the metadata parquet beside the tars keeps them too
    meta = []
    for path in sorted((out / "webdataset").glob("*.parquet")):
        meta += pq.read_table(path).to_pylist()
    assert [{k: v for k, v in r.items() if k != "jpg"} for r in rows] == meta


def test_successful_rows_decode_at_spec_size(rows):
    ok = [r for r in rows if r["status"] == "success"]
    for r in ok:
        assert r["error_message"] is None
        assert (r["width"], r["height"]) == SPEC.image_size
        assert r["original_width"] >= r["width"] and r["original_height"] >= r["height"]
        assert r["exif"] == "{}"
        im = Image.open(io.BytesIO(r["jpg"]))
        assert im.format == "JPEG" and im.size == SPEC.image_size
        im.load()
    assert len({r["sha256"] for r in ok}) == len(ok)


def test_tar_members(written, rows):
    out, _ = written
    by_key = {r["key"]: r for r in rows}
    seen = []
    for path in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert len(members) % 3 == 0
            for i in range(0, len(members), 3):
                names = [m.name for m in members[i : i + 3]]
                key = names[0].split(".")[0]
                assert names == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
                assert all(m.isfile() and m.mode == 0o444 and m.uname == "bigdata" for m in members[i : i + 3])
                jpg, js, txt = (tar.extractfile(m).read() for m in members[i : i + 3])
                row = by_key[key]
                assert jpg == row["jpg"]
                im = Image.open(io.BytesIO(jpg))
                im.load()
                assert im.size == SPEC.image_size
                assert txt.decode("utf-8") == row["caption"]
                meta = json.loads(js)
                assert list(meta) == [name for name, _ in METADATA_COLUMNS]
                assert meta == {k: v for k, v in row.items() if k != "jpg"}
                assert js.decode().startswith('{\n    "id": ')  # json.dumps(meta, indent=4)
                seen.append(key)
    assert seen == [r["key"] for r in rows if r["status"] == "success"]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_stats_files(written, rows, fmt):
    out, _ = written
    for shard in range(math.ceil(SPEC.num_pairs / SPEC.shard_size)):
        stats = json.loads((out / fmt / f"{shard:05d}_stats.json").read_text())
        assert list(stats) == [
            "count", "successes", "failed_to_download", "failed_to_resize",
            "duration", "start_time", "end_time", "status_dict",
        ]  # fmt: skip
        shard_rows = rows[shard * SPEC.shard_size : (shard + 1) * SPEC.shard_size]
        statuses = Counter(r["status"] for r in shard_rows)
        assert stats["count"] == len(shard_rows)
        assert stats["successes"] == statuses["success"]
        assert stats["failed_to_download"] == statuses["failed_to_download"]
        assert stats["failed_to_resize"] == 0
        assert stats["end_time"] > stats["start_time"]
        expected = Counter(r["error_message"] or r["status"] for r in shard_rows)
        assert stats["status_dict"] == dict(expected)


def test_fsspec_url_and_stale_shards_removed():
    fs = fsspec.filesystem("memory")
    url = "memory://raypipe-sample-test"
    try:
        write_sample(url, SampleSpec(num_pairs=120, shard_size=40, image_size=(32, 32)), formats=("webdataset",))
        assert len(fs.glob("/raypipe-sample-test/webdataset/*.tar")) == 3
        summary = write_sample(url, SampleSpec(num_pairs=50, shard_size=40, image_size=(32, 32)), formats=("webdataset",))
        tars = sorted(fs.glob("/raypipe-sample-test/webdataset/*.tar"))
        assert [t.rsplit("/", 1)[-1] for t in tars] == ["00000.tar", "00001.tar"]
        assert not fs.exists("/raypipe-sample-test/webdataset/00002_stats.json")
        assert not fs.exists("/raypipe-sample-test/parquet")
        assert summary["paths"]["webdataset"][0] == "memory:///raypipe-sample-test/webdataset/00000.tar"
        with fs.open(tars[1], "rb") as f, tarfile.open(fileobj=f) as tar:
            assert len(tar.getmembers()) == 3 * sum(1 for n in tar.getnames() if n.endswith(".jpg"))
    finally:
        if fs.exists("/raypipe-sample-test"):
            fs.rm("/raypipe-sample-test", recursive=True)


def test_cli(tmp_path, capsys):
    assert sample.main([str(tmp_path), "--num-pairs", "20", "--image-size", "40x30", "--formats", "parquet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_pairs"] == 20 and summary["image_size"] == [40, 30] and summary["formats"] == ["parquet"]
    assert not (tmp_path / "webdataset").exists()
    row = next(r for r in pq.read_table(tmp_path / "parquet" / "00000.parquet").to_pylist() if r["jpg"])
    assert Image.open(io.BytesIO(row["jpg"])).size == (40, 30)
    with pytest.raises(SystemExit, match="^2$"):  # argparse's exit status for a usage error
        sample.main([str(tmp_path), "--image-size", "640by480"])
    assert "argument --image-size: expected WIDTHxHEIGHT" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        sample.main([str(tmp_path), "--formats", "tfrecord"])
    assert "argument --formats: formats must be a comma-separated subset" in capsys.readouterr().err


def test_spec_validation():
    with pytest.raises(ValueError, match=r"shard_size must be >= 1, got 0"):
        SampleSpec(shard_size=0)
    with pytest.raises(ValueError, match=r"failed_fraction must be in \[0, 1\], got 1.5"):
        SampleSpec(failed_fraction=1.5)
    with pytest.raises(ValueError, match=r"formats must be a non-empty subset .* got \('files',\)"):
        write_sample("/tmp/never-written", SampleSpec(num_pairs=1), formats=("files",))


def test_generates_the_default_3000_pairs(tmp_path):
    summary = write_sample(str(tmp_path), SampleSpec())
    assert summary["num_pairs"] == 3000 and summary["num_shards"] == 6
    assert summary["per_class"] == {c: 375 for c in CLASSES}
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "parquet").glob("*.parquet"))
    assert n == 3000


# -------------------------------------------------------------------------------------------------
# the split of class evidence


def test_groups_are_structurally_split():
    assert len(CLASSES) == 8 and list(CLASSES) == sorted(CLASSES)
    pairs = [sample.CLASS_GROUPS[c] for c in CLASSES]
    assert len(set(pairs)) == len(CLASSES)  # (image group, text group) names the class
    image_count = Counter(g for g, _ in pairs)
    text_count = Counter(t for _, t in pairs)
    assert image_count == {g: 2 for g in sample.IMAGE_GROUPS}  # each modality alone: 2 candidates
    assert text_count == {t: 2 for t in sample.TEXT_GROUPS}
    for g in sample.IMAGE_GROUPS:
        for t in sample.TEXT_GROUPS:
            assert sum(p == (g, t) for p in pairs) <= 1


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[\uac00-\ud7a3]+", text.lower())


def test_captions_never_name_the_image_group():
    # a text group's vocabulary is shared by its two classes: no word may tell them apart
    # failed_fraction=1.0: captions only, no image is drawn
    rows = list(sample.iter_samples(SampleSpec(num_pairs=2400, image_size=(16, 16), failed_fraction=1.0)))
    for tg in sample.TEXT_GROUPS:
        a, b = (c for c in CLASSES if sample.TEXT_GROUP[c] == tg)
        counts = {c: Counter() for c in (a, b)}
        for r in rows:
            if r["label"] in counts:
                counts[r["label"]].update(set(_words(r["caption"])))
        for word in set(counts[a]) | set(counts[b]):
            if counts[a][word] + counts[b][word] >= 30:
                ratio = counts[a][word] / (counts[a][word] + counts[b][word])
                assert 0.25 < ratio < 0.75, (tg, word, counts[a][word], counts[b][word])


def _nearest_centroid_accuracy(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    labels = np.unique(y[train])
    centroids = np.stack([X[train & (y == c)].mean(0) for c in labels])
    d = ((X[~train][:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((labels[d.argmin(1)] == y[~train]).mean())


def _standardize(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    Z = (X - X[train].mean(0)) / (X[train].std(0) + 1e-6)
    return Z / math.sqrt(X.shape[1])  # each block weighs the same in a concatenation


def test_neither_modality_alone_reaches_the_fusion(rows):
    """Cheap empirical proxy: numpy nearest-centroid on 8x8 thumbnails / bag of words / both."""
    ok = [r for r in rows if r["status"] == "success"]
    y = np.array([CLASSES.index(r["label"]) for r in ok])
    train = np.arange(len(ok)) % 2 == 0

    def thumb(b: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(b)).convert("RGB").resize((8, 8), Image.BILINEAR)
        return np.asarray(im, np.float32).ravel() / 255.0

    X_img = _standardize(np.stack([thumb(r["jpg"]) for r in ok]), train)
    vocab = sorted({w for r, t in zip(ok, train) if t for w in _words(r["caption"])})
    index = {w: i for i, w in enumerate(vocab)}
    bow = np.zeros((len(ok), len(vocab)), np.float32)
    for i, r in enumerate(ok):
        for w in _words(r["caption"]):
            if w in index:
                bow[i, index[w]] = 1.0
    X_txt = _standardize(bow, train)

    image_acc = _nearest_centroid_accuracy(X_img, y, train)
    text_acc = _nearest_centroid_accuracy(X_txt, y, train)
    both_acc = _nearest_centroid_accuracy(np.hstack([X_img, X_txt]), y, train)
    # the groups themselves are learnable...
    ig = np.array([sample.IMAGE_GROUPS.index(sample.IMAGE_GROUP[CLASSES[c]]) for c in y])
    tg = np.array([sample.TEXT_GROUPS.index(sample.TEXT_GROUP[CLASSES[c]]) for c in y])
    image_group_acc = _nearest_centroid_accuracy(X_img, ig, train)
    text_group_acc = _nearest_centroid_accuracy(X_txt, tg, train)
    print(f"nearest centroid: image {image_acc:.3f} (group {image_group_acc:.3f}), "
          f"text {text_acc:.3f} (group {text_group_acc:.3f}), combined {both_acc:.3f}")  # fmt: skip
    assert image_group_acc > 0.6 and text_group_acc > 0.6
    # ...but each is capped near 1/2 of its group accuracy, and only together do they name the class
    assert image_acc < 0.55
    assert text_acc < 0.55
    assert both_acc > max(image_acc, text_acc) + 0.15
