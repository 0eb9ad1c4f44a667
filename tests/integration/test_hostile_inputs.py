"""Hostile inputs through the real `prepare` and `label` jobs (the session's Ray cluster, local files).

One shard per input format -- a plain Parquet table of pairs, an img2dataset Parquet shard, an
img2dataset WebDataset tar with the metadata Parquet beside it -- holds good pairs of the built-in
sample plus every image kind of tests/imagekinds.py, a null image, null / empty / whitespace /
100 KB / digits / Korean / emoji / RTL / HTML / NUL texts, a failed download (img2dataset formats)
and a key used twice. Expected: one output row per input row with its key, the
status and message the transforms give that row when called one at a time in this process, good rows
prepared and predicted exactly as that plain loop does, and file-level problems named with the file.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import imagekinds as kinds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_label import plain_loop, read_output

from raypipe.bundle import Bundle, save_bundle
from raypipe.config import LabelJobConfig, PrepareConfig, StorageConfig, load_config
from raypipe.io.readers import InputError
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline.label import run_label
from raypipe.pipeline.prepare import run_prepare
from raypipe.datasets.sample import SampleSpec, write_sample
from raypipe.formats.img2dataset import METADATA_SCHEMA, PARQUET_SCHEMA
from raypipe.transforms.image import ImageError, ImageOptions, load_rgb
from raypipe.transforms.text import TextNormalizer, TextOptions, encode_tokens
from raypipe.transforms.vocab import Vocabulary

pytestmark = pytest.mark.integration

IMAGE, TEXT = ImageOptions(), TextOptions()  # prepare's defaults, which the bundle below keeps
GOOD_TEXT = "a red car parked on a sunny beach"
TEXTS = {  # paired with a good image
    "null": None,
    "empty": "",
    "whitespace": " \t\n \r ",
    "100kb": ("a dog swimming in the lake at sunset " * 2800)[:100_000],
    "digits": "0123456789 42 3.14",
    "korean": "해변에 주차된 빨간 자동차",
    "emoji": "😀🎉👍🏽❤️🇰🇷",
    "rtl": "سيارة حمراء على الشاطئ ומכונית אדומה",
    "html": "<p>A <b>red</b> car &amp; a <a href='https://x.example/a'>beach</a></p><script>x()</script>",
    "nul": "red\x00car\x00on\x00the beach",
}
FORMAT_ARGS = {  # how each format is read; the plain table names its columns
    "parquet": ["data.format=parquet", "data.key_column=id", "data.image_column=image", "data.text_column=alt_text"],
    "img2dataset_parquet": ["data.format=img2dataset_parquet"],
    "webdataset": ["data.format=webdataset"],
}
COMMON_ARGS = ["ray.progress_bars=false", "ray.batch_size=16"]


@dataclass(frozen=True)
class Pair:
    key: str
    image: bytes | None
    text: str | None
    label: str
    downloaded: bool = True  # False: an img2dataset failed download (no image, status failed_to_download)


@pytest.fixture(scope="module")
def good_pairs(tmp_path_factory) -> list[Pair]:
    root = tmp_path_factory.mktemp("hostile-sample")
    write_sample(str(root), SampleSpec(num_pairs=48, shard_size=48, image_size=(64, 64)), formats=("parquet",))
    rows = pq.read_table(root / "parquet" / "00000.parquet").to_pylist()
    return [Pair(r["key"], r["jpg"], r["caption"], r["label"]) for r in rows if r["status"] == "success"]


def hostile_pairs(fmt: str, good: Pair) -> list[Pair]:
    pairs = [Pair(f"image-{kind}", build(), GOOD_TEXT, good.label) for kind, build in kinds.ALL_KINDS.items()]
    pairs.append(Pair("image-null", None, GOOD_TEXT, good.label))  # in a tar: a sample without an image member
    pairs += [Pair(f"text-{name}", good.image, text, good.label) for name, text in TEXTS.items()]
    if fmt != "parquet":
        pairs.append(Pair("failed-download", None, "an image img2dataset could not fetch", good.label, downloaded=False))
    pairs += [Pair("duplicate", good.image, "two rows share this key", good.label)] * 2  # a tar: two samples
    return pairs


# --- writers, one per format ------------------------------------------------------------------------


def as_table(pairs: list[Pair]) -> pa.Table:
    """The plain table of pairs (also what test_label's plain loop reads)."""
    return pa.table({
        "id": pa.array([p.key for p in pairs], pa.string()),
        "image": pa.array([p.image for p in pairs], pa.binary()),
        "alt_text": pa.array([p.text for p in pairs], pa.string()),
        "label": pa.array([p.label for p in pairs], pa.string()),
    })


def img2dataset_rows(pairs: list[Pair]) -> list[dict]:
    return [
        {name: None for name in PARQUET_SCHEMA.names} | {
            "id": i, "label": p.label, "caption": p.text, "url": f"https://pairs.example/{p.key}", "key": p.key,
            "status": "success" if p.downloaded else "failed_to_download",
            "error_message": None if p.downloaded else "HTTP Error 404: Not Found", "jpg": p.image,
        }
        for i, p in enumerate(pairs)
    ]


def write_tar(pairs: list[Pair], path: Path) -> None:
    """img2dataset's layout ({key}.jpg/.json/.txt, failed downloads left out), PNG bytes as {key}.png."""
    with tarfile.open(path, "w") as tar:
        for p in pairs:
            if not p.downloaded:
                continue
            members = {"json": json.dumps({"key": p.key, "caption": p.text, "label": p.label}).encode()}
            if p.image is not None:
                members["png" if p.image.startswith(b"\x89PNG") else "jpg"] = p.image
            if p.text is not None:
                members["txt"] = p.text.encode()
            for suffix in sorted(members):
                info = tarfile.TarInfo(f"{p.key}.{suffix}")
                info.size = len(members[suffix])
                tar.addfile(info, io.BytesIO(members[suffix]))


def write_shard(fmt: str, pairs: list[Pair], folder: Path, name: str = "00000") -> Path:
    """The shard (the tar for webdataset, with its metadata Parquet beside it); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(as_table(pairs), folder / f"{name}.parquet")
        return folder / f"{name}.parquet"
    if fmt == "img2dataset_parquet":
        pq.write_table(pa.Table.from_pylist(img2dataset_rows(pairs), schema=PARQUET_SCHEMA), folder / f"{name}.parquet")
        return folder / f"{name}.parquet"
    metadata = [{k: v for k, v in row.items() if k != "jpg"} for row in img2dataset_rows(pairs)]
    pq.write_table(pa.Table.from_pylist(metadata, schema=METADATA_SCHEMA), folder / f"{name}.parquet")
    write_tar(pairs, folder / f"{name}.tar")
    return folder / f"{name}.tar"


# --- what each row should end with ------------------------------------------------------------------


def expected(pair: Pair, normalizer: TextNormalizer, labeling: bool) -> tuple[str, str]:
    """(status, a part of its message) for one row, from the transforms called directly."""
    if not pair.downloaded:
        return "not_downloaded", "failed_to_download"
    try:
        load_rgb(pair.image or None, IMAGE)  # the readers take zero bytes for no bytes
    except ImageError as e:
        return e.status.value, e.message
    if labeling and not normalizer.tokens(pair.text):
        return "missing_text", "the fusion model reads text"
    return "ok", ""


def assert_rows_accounted_for(out: pa.Table, pairs: list[Pair], labeling: bool, shard: Path) -> list[dict]:
    """One output row per input row, each with its expected status and message; returns the rows."""
    normalizer = TextNormalizer(TEXT)
    rows = out.to_pylist()
    assert Counter(r["key"] for r in rows) == Counter(p.key for p in pairs)
    want = {p.key: expected(p, normalizer, labeling) for p in pairs}
    got = {r["key"]: (r["status"], r["error_message"]) for r in rows}
    for row in rows:  # each row of a key used twice, too
        status, message = want[row["key"]]
        assert row["status"] == status, row["key"]
        assert (row["error_message"] is None) if status == "ok" else (message in row["error_message"]), row["key"]
    assert all(r["source"].endswith(shard.name) for r in rows)  # each row names its file
    # Every image kind ends as the kinds' own table says (independent of the loop above).
    assert {k: got[f"image-{k}"][0] for k in kinds.ALL_KINDS} == kinds.EXPECTED_STATUS
    return rows


def untrained_bundle(url: str, vocab: Vocabulary, classes: tuple[str, ...]) -> str:
    """A real bundle of an untrained fusion model: labeling is under test here, not training (a trainer
    start costs ~30-60 s on 2 cores)."""
    config = ModelConfig(len(classes), len(vocab), conv_channels=(8,), embed_dim=8, lstm_hidden=8, fc_dims=(16,))
    torch.manual_seed(0)
    save_bundle(url, StorageConfig(), Bundle(config, IMAGE, TEXT, vocab, classes, FusionClassifier(config).state_dict(), {}))
    return url


def prepare_config(fmt: str, inputs: list[Path], output: Path) -> PrepareConfig:
    urls = ", ".join(map(str, inputs))
    return load_config(PrepareConfig, None, [*FORMAT_ARGS[fmt], *COMMON_ARGS, f"data.input=[{urls}]",
                                             f"output={output}", "vocab.min_freq=1"])


def label_config(fmt: str, inputs: list[Path], bundle: str, output: Path) -> LabelJobConfig:
    urls = ", ".join(map(str, inputs))
    return load_config(LabelJobConfig, None, [*FORMAT_ARGS[fmt], *COMMON_ARGS, f"data.input=[{urls}]",
                                              f"bundle={bundle}", f"output={output}", "predict.max_actors=1"])


@pytest.fixture(scope="module")
def some_bundle(tmp_path_factory) -> str:
    """For the tests of problems found before any row is labeled."""
    url = str(tmp_path_factory.mktemp("hostile-bundle") / "bundle")
    return untrained_bundle(url, Vocabulary(("<pad>", "<unk>", "car")), ("beach", "lake"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMAT_ARGS))
def test_prepare_and_label_account_for_every_hostile_row(ray_cluster, good_pairs, fmt, tmp_path):
    pairs = good_pairs + hostile_pairs(fmt, good_pairs[0])
    shard = write_shard(fmt, pairs, tmp_path / "in")
    empty = write_shard(fmt, [], tmp_path / "empty-in", name="00001")  # an empty shard beside it

    prepared = tmp_path / "prepared"
    stats = run_prepare(prepare_config(fmt, [shard, empty], prepared))
    rows = assert_rows_accounted_for(pq.read_table(prepared / "prepared"), pairs, labeling=False, shard=shard)
    assert stats["input_files"] == 2 and stats["rows_in"] == len(pairs) and stats["duplicate_keys"] == 1
    assert stats["by_status"] == dict(Counter(expected(p, TextNormalizer(TEXT), False)[0] for p in pairs))
    # Usable rows hold exactly what the transforms give for them alone.
    vocab = Vocabulary.from_json((prepared / "vocab.json").read_text())
    normalizer, by_key = TextNormalizer(TEXT), {p.key: p for p in pairs}
    for row in (r for r in rows if r["status"] == "ok"):
        pair = by_key[row["key"]]
        image = np.frombuffer(row["image"], dtype=np.uint8).reshape(IMAGE.size, IMAGE.size, 3)
        assert np.array_equal(image, load_rgb(pair.image, IMAGE)), pair.key
        tokens, length = encode_tokens([normalizer.tokens(pair.text)], vocab.token_to_id, TEXT.max_len)
        assert np.array_equal(row["tokens"], tokens[0]) and row["length"] == length[0], pair.key

    classes = tuple(json.loads((prepared / "classes.json").read_text()))
    bundle = untrained_bundle(str(tmp_path / "bundle"), vocab, classes)
    labels = tmp_path / "labels"
    summary = run_label(label_config(fmt, [shard], bundle, labels))  # (the empty shard: see the last test)
    assert summary["complete"] and summary["rows_in"] == summary["rows_out"] == len(pairs)
    assert summary["duplicate_keys"] == 1
    rows = assert_rows_accounted_for(read_output(str(labels)), pairs, labeling=True, shard=shard)
    assert summary["by_status"] == dict(Counter(r["status"] for r in rows))
    predicted = plain_loop(bundle, as_table(pairs))
    for row in rows:
        if row["status"] == "ok":
            assert row["label_id"] == predicted[row["key"]][0], row["key"]
            assert row["confidence"] == pytest.approx(predicted[row["key"]][1], abs=1e-4), row["key"]
        else:
            assert row["label"] is None and row["confidence"] is None


# --- file-level problems ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "columns, problem",
    [
        ({"id": ["a"], "image": [b"x"]}, r"bad\.parquet: column 'alt_text' is missing"),
        ({"id": ["a"], "image": [b"x"], "alt_text": [7]}, r"bad\.parquet: column 'alt_text' has type int64, expected string"),
        ({"id": ["a"], "image": ["x"], "alt_text": ["t"]}, r"bad\.parquet: column 'image' has type string, expected binary"),
    ],
    ids=["missing column", "int text", "string image"],
)
def test_a_parquet_file_with_a_missing_column_or_a_wrong_type_is_named_before_anything_runs(
    good_pairs, some_bundle, tmp_path, columns, problem
):
    good = write_shard("parquet", good_pairs[:4], tmp_path / "in")
    bad = tmp_path / "in" / "bad.parquet"
    pq.write_table(pa.table(columns), bad)
    with pytest.raises(InputError, match=problem):
        run_prepare(prepare_config("parquet", [good, bad], tmp_path / "prepared"))
    with pytest.raises(InputError, match=problem):
        run_label(label_config("parquet", [good, bad], some_bundle, tmp_path / "labels"))


@pytest.mark.parametrize(
    "damage",
    [lambda tar: b"", lambda tar: tar[: len(tar) // 2], lambda tar: tar[: len(tar) // 1024 * 512], lambda tar: b"x" * 4096],
    ids=["zero bytes", "cut short", "cut at a block boundary", "not a tar"],
)
def test_a_damaged_tar_is_named_before_anything_runs(good_pairs, some_bundle, tmp_path, damage):
    """Ray's reader would fail on it mid-run, or (cut short) silently lose the rows after the cut."""
    good = write_shard("webdataset", good_pairs[:4], tmp_path / "in")
    bad = write_shard("webdataset", good_pairs[4:8], tmp_path / "in", name="00001")
    bad.write_bytes(damage(bad.read_bytes()))
    problem = rf"{bad}: not a complete tar archive"
    with pytest.raises(InputError, match=problem):
        run_prepare(prepare_config("webdataset", [good, bad], tmp_path / "prepared"))
    with pytest.raises(InputError, match=problem):
        run_label(label_config("webdataset", [good, bad], some_bundle, tmp_path / "labels"))


def test_a_key_twice_in_a_tar_costs_nothing_and_labels_as_in_parquet(ray_cluster, good_pairs, some_bundle, tmp_path):
    """A key again after other samples is a second row with that key, in a tar with img2dataset's
    metadata beside it and in one without (whose keys label counts itself), as in a Parquet shard."""
    pairs = [*good_pairs, good_pairs[0]]  # the first key again, last: not adjacent
    want = {p.key: expected(p, TextNormalizer(TEXT), labeling=True)[0] for p in pairs}  # ok unless no word
    assert want[good_pairs[0].key] == "ok"
    outputs = {}
    for fmt, folder in (("parquet", "parquet"), ("webdataset", "tar"), ("webdataset", "bare-tar")):
        shard = write_shard(fmt, pairs, tmp_path / folder)
        if folder == "bare-tar":
            shard.with_suffix(".parquet").unlink()
        summary = run_label(label_config(fmt, [shard], some_bundle, tmp_path / f"{folder}-labels"))
        assert summary["complete"] and summary["rows_in"] == summary["rows_out"] == len(pairs), folder
        assert summary["duplicate_keys"] == 1, folder
        rows = read_output(str(tmp_path / f"{folder}-labels")).to_pylist()
        assert Counter(r["key"] for r in rows) == Counter(p.key for p in pairs), folder
        assert [r["key"] for r in rows if r["status"] != want[r["key"]]] == [], folder
        assert summary["by_status"] == dict(Counter(r["status"] for r in rows)), folder
        outputs[folder] = Counter((r["key"], r["status"], r["label"]) for r in rows)
    assert outputs["tar"] == outputs["bare-tar"] == outputs["parquet"]


def test_label_counts_an_empty_shard_as_complete(ray_cluster, good_pairs, some_bundle, tmp_path):
    good = write_shard("parquet", good_pairs[:4], tmp_path / "in")
    empty = write_shard("parquet", [], tmp_path / "in", name="00001")
    summary = run_label(label_config("parquet", [good, empty], some_bundle, tmp_path / "labels"))
    assert summary["complete"] and summary["files"]["complete"] == 2
