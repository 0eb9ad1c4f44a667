"""Ingest without Ray: manifests (CSV, JSON lines, Parquet) -> img2dataset Parquet shards."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys

import imagekinds as kinds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from i2d import serve_bytes
from PIL import Image

from raypipe import ingest, schema
from raypipe.config import ConfigError, DataConfig, IngestConfig, StorageConfig, load_config
from raypipe.ingest import (
    FAILED_TO_DOWNLOAD,
    FAILED_TO_RESIZE,
    SUCCESS,
    EncodeOptions,
    Fetcher,
    IngestError,
    RowError,
    encode_image,
    ingest_shard,
    read_manifests,
)
from raypipe.io.normalize import normalize_table
from raypipe.io.readers import plan_inputs
from raypipe.formats.img2dataset import PARQUET_SCHEMA, compute_key
from raypipe.schema import Status

OPTS = EncodeOptions()


def decoded(jpg: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.mode == "RGB"
    return np.asarray(img)


def assert_colour(pixels: np.ndarray, expected, tol: int = 12) -> None:
    mean = pixels.reshape(-1, 3).mean(0)
    assert np.abs(mean - np.asarray(expected, float)).max() <= tol, f"{np.round(mean)} != {expected}"


def config(tmp_path, *overrides: str) -> IngestConfig:
    return load_config(IngestConfig, None, [f"output={tmp_path / 'shards'}", *overrides])


# ------------------------------------------------------------------------------------ one image


def test_png_with_alpha_becomes_a_jpeg_on_white():
    image = encode_image(kinds.png_rgba(), OPTS)  # left half transparent black, right opaque green
    pixels = decoded(image.jpg)
    assert (image.width, image.height) == (128, 64) == (image.original_width, image.original_height)
    assert_colour(pixels[:, :48], kinds.WHITE)
    assert_colour(pixels[:, -48:], kinds.GREEN)


@pytest.mark.parametrize("kind", ["png_la", "png_palette", "png_palette_transparent", "jpeg_cmyk", "png_gray16",
                                  "tiff_gray16_be", "tiff_float", "png_1bit", "webp_alpha", "gif_animated", "jpeg_mpo"])
def test_every_colour_mode_becomes_rgb_jpeg(kind):
    image = encode_image(kinds.ALL_KINDS[kind](), OPTS)
    assert decoded(image.jpg).shape == (image.height, image.width, 3)


def test_16_bit_gray_is_scaled_not_clipped():
    pixels = decoded(encode_image(kinds.png_gray16(), OPTS).jpg)
    assert_colour(pixels[:, :48], (128, 128, 128), tol=4)
    assert_colour(pixels[:, -48:], (240, 240, 240), tol=4)


def test_palette_transparency_is_white():
    pixels = decoded(encode_image(kinds.png_palette_transparent(), OPTS).jpg)
    assert_colour(pixels[:, :48], kinds.WHITE)
    assert_colour(pixels[:, -48:], kinds.BLUE)


def test_downscaled_keeping_the_ratio_never_upscaled():
    wide = encode_image(kinds.ALL_KINDS["wide_10000x10"](), EncodeOptions(max_side=384, max_pixels=10**9))
    assert (wide.width, wide.height, wide.original_width, wide.original_height) == (384, 1, 10000, 10)
    photo = encode_image(kinds.jpeg_photo(640, 480), EncodeOptions(max_side=320))
    assert (photo.width, photo.height) == (320, 240)
    small = encode_image(kinds.jpeg_photo(200, 100), EncodeOptions(max_side=320))
    assert (small.width, small.height) == (200, 100)
    full = encode_image(kinds.jpeg_photo(640, 480), EncodeOptions(max_side=None))
    assert (full.width, full.height) == (640, 480)


def test_exif_orientation_is_applied_before_encoding():
    image = encode_image(kinds.jpeg_exif_rotated(), OPTS)  # stored 320x160 left red / right blue, orientation 6
    pixels = decoded(image.jpg)
    assert (image.width, image.height) == (160, 320) == (image.original_width, image.original_height)
    assert_colour(pixels[:100], kinds.RED, tol=20)
    assert_colour(pixels[-100:], kinds.BLUE, tol=20)
    assert json.loads(image.exif)["Image Orientation"] == "6"


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"", FAILED_TO_DOWNLOAD, "empty"),
        (None, FAILED_TO_DOWNLOAD, "no image"),
        (kinds.random_bytes(), FAILED_TO_RESIZE, "not a supported image format"),
        (kinds.truncated(kinds.jpeg_photo()), FAILED_TO_RESIZE, "decode failed"),
        (kinds.png_bomb(), FAILED_TO_RESIZE, "max_pixels"),
        (kinds.gif_bomb(), FAILED_TO_RESIZE, "max_pixels"),
    ],
)
def test_bad_images_get_img2dataset_statuses(data, status, words):
    with pytest.raises(RowError, match=re.escape(words)) as info:
        encode_image(data, OPTS)
    assert info.value.status == status


def test_svg_is_rasterized():
    import cairosvg  # noqa: F401  (the test extra installs it)
    image = encode_image(kinds.SVG, OPTS, "drawing.svg")  # 64x64 red square
    assert (image.width, image.height) == (64, 64)
    assert_colour(decoded(image.jpg), kinds.RED)
    transparent = b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="20" height="20" fill="blue"/></svg>'
    pixels = decoded(encode_image(transparent, OPTS).jpg)  # sniffed from the bytes, no name
    assert_colour(pixels[:, :16], kinds.BLUE)
    assert_colour(pixels[:, -16:], kinds.WHITE)
    big = b'<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="500"><rect width="10" height="10"/></svg>'
    drawn = encode_image(big, EncodeOptions(max_side=100))
    assert (drawn.width, drawn.height, drawn.original_width, drawn.original_height) == (100, 50, 1000, 500)
    bomb = b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"></svg>'
    with pytest.raises(RowError, match="max_pixels"):
        encode_image(bomb, OPTS)
    entities = b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY a "x">]><svg xmlns="http://www.w3.org/2000/svg">&a;</svg>'
    with pytest.raises(RowError, match="SVG rasterize failed"):  # entities are refused (defusedxml), not expanded
        encode_image(entities, OPTS)


def test_svg_without_a_rasterizer_gets_a_clear_status(monkeypatch):
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import cairosvg -> ImportError
    with pytest.raises(RowError, match="pip install cairosvg") as info:
        encode_image(kinds.SVG, OPTS, "drawing.svg")
    assert info.value.status == FAILED_TO_RESIZE


# ------------------------------------------------------------------------------------ manifests


@pytest.fixture
def pictures(tmp_path):
    """Two good pictures (an RGBA PNG and a JPEG), a junk file, and the manifest rows naming them."""
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "alpha.png").write_bytes(kinds.png_rgba())
    (folder / "photo.jpg").write_bytes(kinds.jpeg_photo(320, 240))
    (folder / "junk.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    return [
        {"path": "pics/alpha.png", "caption": "a green half", "category": "green", "id": "a1", "extra": 1},
        {"path": str(folder / "photo.jpg"), "caption": "a photo", "category": "photo", "id": "a2", "extra": 2},
        {"path": "pics/junk.png", "caption": "junk", "category": "green", "id": "a3", "extra": 3},
        {"path": "pics/missing.png", "caption": "gone", "category": "photo", "id": "a4", "extra": 4},
        {"path": "pics/empty.jpg", "caption": "empty", "category": "photo", "id": "a5", "extra": 5},
        {"path": None, "caption": "no path", "category": None, "id": "a6", "extra": 6},
    ]


COLUMNS = ["image_column=path", "text_column=caption", "label_column=category"]
EXPECTED = [SUCCESS, SUCCESS, FAILED_TO_RESIZE, FAILED_TO_DOWNLOAD, FAILED_TO_DOWNLOAD, FAILED_TO_DOWNLOAD]


def write_manifest(tmp_path, rows: list[dict], fmt: str):
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        header = list(rows[0])
        lines = [",".join(header)] + [",".join("" if r[c] is None else str(r[c]) for c in header) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_give_the_same_shard_and_lose_no_row(tmp_path, pictures, fmt):
    manifest = write_manifest(tmp_path, pictures, fmt)
    cfg = config(tmp_path, f"manifest={manifest}", *COLUMNS, "keep_columns=[extra]")
    rows = read_manifests(cfg)
    table, stats, examples = ingest_shard(rows, OPTS, Fetcher())

    assert table.num_rows == len(pictures)
    assert table["status"].to_pylist() == EXPECTED
    assert table["key"].to_pylist() == [compute_key(i, 0, cfg.shard_size) for i in range(len(pictures))]
    assert table["label"].to_pylist() == ["green", "photo", "green", "photo", "photo", None]
    assert table["caption"].to_pylist() == [r["caption"] for r in pictures]
    assert table["extra"].to_pylist() == [1, 2, 3, 4, 5, 6]
    assert table["url"][0].as_py() == str(tmp_path / "pics" / "alpha.png")  # relative to the manifest's folder
    jpgs = table["jpg"].to_pylist()
    assert all(j is None for j in jpgs[2:]) and all(table["error_message"][i].as_py() for i in range(2, 6))
    assert "No such file" in table["error_message"][3].as_py()
    assert_colour(decoded(jpgs[0])[:, :48], kinds.WHITE)
    assert table["sha256"][1].as_py() == hashlib.sha256(kinds.jpeg_photo(320, 240)).hexdigest()
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (6, 2, 3, 1)
    assert sum(stats["status_dict"].values()) == 6 and stats["status_dict"][SUCCESS] == 2
    assert [e["key"] for e in examples] == table["key"].to_pylist()[2:5]


def test_parquet_manifest_may_hold_the_image_bytes(tmp_path):
    manifest = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"img": [kinds.png_rgba(), b"junk"], "text": ["x", "y"], "label": [3, 4], "uid": ["u1", "u2"]}), manifest)
    cfg = config(tmp_path, f"manifest={manifest}", "image_column=img", "key_column=uid")
    table, stats, _ = ingest_shard(read_manifests(cfg), OPTS, Fetcher())
    assert table["status"].to_pylist() == [SUCCESS, FAILED_TO_RESIZE]
    assert table["key"].to_pylist() == ["u1", "u2"] and table["label"].to_pylist() == ["3", "4"]
    assert table["url"].to_pylist() == [None, None]


def test_shards_are_img2dataset_parquet_that_raypipe_reads(tmp_path, pictures):
    manifest = write_manifest(tmp_path, pictures, "csv")
    cfg = config(tmp_path, f"manifest={manifest}", *COLUMNS, "shard_size=4")
    rows = read_manifests(cfg)
    results = [
        ingest._ingest_item({"shard_id": shard_id, "rows": ingest._table_to_ipc(part)}, cfg.output, cfg.storage, OPTS, 5.0, 4)
        for shard_id, part in ingest.shard_slices(rows, cfg.shard_size)
    ]
    out = tmp_path / "shards"
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json"]
    shard = pq.read_table(out / "00001.parquet")
    # img2dataset's own columns and types, in its order, after the saved columns (here the label).
    expected = pa.schema([pa.field("label", pa.string()), *[f for f in PARQUET_SCHEMA if f.name not in ("id", "label")]])
    assert shard.schema.remove_metadata() == expected
    assert shard["key"].to_pylist() == [compute_key(i, 1, 4) for i in range(2)]  # img2dataset's keys: shard 1
    assert json.loads((out / "00000_stats.json").read_text())["count"] == 4

    summary = ingest.summarize(results, str(out), 1.0)
    assert summary["rows"] == 6 and summary["by_status"] == {SUCCESS: 2, FAILED_TO_DOWNLOAD: 3, FAILED_TO_RESIZE: 1}
    assert any("ingested 6 rows into 2 shard(s)" in line for line in ingest.summary_lines(summary))

    # raypipe's reader takes the shards as img2dataset Parquet, and its normalizer accounts for every row.
    plan = plan_inputs(DataConfig(input=[str(out)]), StorageConfig(), ("label",))
    assert plan.format == "img2dataset_parquet" and len(plan.files) == 2
    batch = {k: np.array(v, dtype=object) for k, v in pq.read_table(out / "00000.parquet").to_pydict().items()}
    normalized = normalize_table(batch, plan.columns)
    assert list(normalized[schema.STATUS]) == ["ok", "ok", Status.NOT_DOWNLOADED.value, Status.NOT_DOWNLOADED.value]
    assert "failed_to_resize" in normalized[schema.ERROR_MESSAGE][2]
    assert normalized[schema.IMAGE][0][:2] == b"\xff\xd8" and list(normalized["label"]) == ["green", "photo", "green", "photo"]


def test_images_over_http_and_a_404(tmp_path):
    files = {"a.png": kinds.png_rgba()}
    with serve_bytes(files) as base:
        manifest = write_manifest(tmp_path, [{"image": f"{base}/a.png", "text": "t"}, {"image": f"{base}/b.png", "text": "u"}], "jsonl")
        cfg = config(tmp_path, f"manifest={manifest}", "label_column=null")
        table, _, _ = ingest_shard(read_manifests(cfg), OPTS, Fetcher(timeout_s=5))
    assert table["status"].to_pylist() == [SUCCESS, FAILED_TO_DOWNLOAD]
    assert table["error_message"][1].as_py() == "HTTPError: HTTP Error 404: Not Found"
    assert "label" not in table.column_names


def test_base_dir_and_several_manifests(tmp_path, pictures):
    first = write_manifest(tmp_path, pictures[:2], "csv")
    other = tmp_path / "other"
    other.mkdir()
    second = write_manifest(other, pictures[2:3], "jsonl")
    cfg = config(tmp_path, f"manifest=[{first}, {second}]", *COLUMNS, f"base_dir={tmp_path}")
    table, _, _ = ingest_shard(read_manifests(cfg), OPTS, Fetcher())
    assert table["status"].to_pylist() == [SUCCESS, SUCCESS, FAILED_TO_RESIZE]
    assert table["url"][2].as_py() == str(tmp_path / "pics" / "junk.png")


def test_manifest_problems_are_reported_before_any_work(tmp_path, pictures):
    manifest = write_manifest(tmp_path, pictures, "csv")
    with pytest.raises(IngestError, match=r"column 'picture' is missing.*Set image_column"):
        read_manifests(config(tmp_path, f"manifest={manifest}", "image_column=picture"))
    duplicated = write_manifest(tmp_path, [{**pictures[0], "id": "same"}, {**pictures[1], "id": "same"}], "jsonl")
    with pytest.raises(IngestError, match="repeats 1 key"):
        read_manifests(config(tmp_path, f"manifest={duplicated}", *COLUMNS, "key_column=id"))
    odd = tmp_path / "pairs.txt"
    odd.write_text("x")
    with pytest.raises(IngestError, match="set format=csv"):
        read_manifests(config(tmp_path, f"manifest={odd}"))
    with pytest.raises(ConfigError, match="clash"):
        config(tmp_path, f"manifest={manifest}", "keep_columns=[status]")


def test_existing_shards_are_kept_unless_overwrite(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "00000.parquet").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(IngestError, match="overwrite=true"):
        ingest._check_output(config(tmp_path, "manifest=m.csv"))
    location, stale = ingest._check_output(config(tmp_path, "manifest=m.csv", "overwrite=true"))
    assert [p.rsplit("/", 1)[-1] for p in stale] == ["00000.parquet"]  # notes.txt is not ours
