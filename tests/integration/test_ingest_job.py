"""`ingest` end to end on the session Ray cluster: a manifest of ~30 pairs -> img2dataset Parquet
shards -> `prepare` with labels.column=label, locally and through the moto S3 server."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raypipe.config import IngestConfig, PrepareConfig, StorageConfig, load_config
from raypipe.ingest import FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, SUCCESS, IngestError, run_ingest
from raypipe.io.fs import resolve
from raypipe.pipeline.prepare import run_prepare
from raypipe.schema import Status
from raypipe.transforms.image import image_rows

pytestmark = pytest.mark.integration

COLOURS = {"tomato": (220, 40, 30), "lime": (40, 200, 60), "sky": (60, 120, 230)}
N_GOOD = 27


def _picture(rgb, seed: int, alpha: bool) -> bytes:
    """A noisy colour field; every other one an RGBA PNG with a transparent border."""
    noise = np.random.default_rng(seed).integers(-20, 20, (90, 120, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    if alpha:
        rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
        rgba[:10], rgba[-10:] = 0, 0
        Image.fromarray(rgba, "RGBA").save(out, "PNG")
    else:
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _pairs() -> tuple[dict[str, bytes], list[dict]]:
    """27 good pairs over 3 classes, then an undecodable file, a missing file and a row without a path."""
    files, rows = {}, []
    names = list(COLOURS)
    for i in range(N_GOOD):
        label = names[i % 3]
        name = f"img/{i}.{'png' if i % 2 else 'jpg'}"
        files[name] = _picture(COLOURS[label], i, alpha=bool(i % 2))
        rows.append({"id": f"p{i:03d}", "path": name, "alt": f"A {label} thing, swimming #{i}!", "category": label})
    files["img/junk.png"] = b"this is not an image"
    rows.append({"id": "p900", "path": "img/junk.png", "alt": "broken", "category": "lime"})
    rows.append({"id": "p901", "path": "img/gone.jpg", "alt": "missing", "category": "sky"})
    rows.append({"id": "p902", "path": None, "alt": "no path", "category": "sky"})
    return files, rows


COLUMNS = ["image_column=path", "text_column=alt", "label_column=category", "key_column=id", "shard_size=10"]


def test_local_manifest_to_shards_to_prepare(ray_cluster, tmp_path):
    files, rows = _pairs()
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    manifest = tmp_path / "manifest.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), manifest)
    shards = tmp_path / "shards"
    cfg = load_config(IngestConfig, None, [f"manifest={manifest}", f"output={shards}", *COLUMNS])

    summary = run_ingest(cfg)
    assert summary["rows"] == N_GOOD + 3 and summary["shards"] == 3
    assert summary["by_status"] == {SUCCESS: N_GOOD, FAILED_TO_DOWNLOAD: 2, FAILED_TO_RESIZE: 1}
    assert sorted(p.name for p in shards.iterdir()) == [f"0000{i}{s}" for i in range(3) for s in (".parquet", "_stats.json")]
    stats = [json.loads((shards / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert [s["count"] for s in stats] == [10, 10, 10] and sum(s["successes"] for s in stats) == N_GOOD
    table = pq.ParquetDataset(sorted(str(p) for p in shards.glob("*.parquet"))).read()
    assert sorted(table["key"].to_pylist()) == sorted(r["id"] for r in rows)  # every row, once

    with pytest.raises(IngestError, match="overwrite=true"):  # a second run does not clobber the shards
        run_ingest(cfg)

    prepared = tmp_path / "prepared"
    stats = run_prepare(load_config(
        PrepareConfig, None, [f"data.input={shards}", "labels.column=label", "vocab.min_freq=1", f"output={prepared}"]
    ))
    assert stats["input_format"] == "img2dataset_parquet" and stats["input_files"] == 3
    assert stats["rows_in"] == N_GOOD + 3 and stats["rows_ok"] == N_GOOD
    assert stats["by_status"] == {Status.OK.value: N_GOOD, Status.NOT_DOWNLOADED.value: 3}
    assert stats["ok_by_class"] == {name: N_GOOD // 3 for name in COLOURS}
    out = pq.ParquetDataset(str(prepared / "prepared")).read()
    ok = out.filter(pc.equal(out["status"], "ok"))
    images = image_rows(ok["image"])
    for label, image in zip(ok["label"].to_pylist(), images):  # the colour survived ingest + prepare
        centre = image[16:48, 16:48].reshape(-1, 3).mean(0)
        assert int(np.argmax(centre)) == int(np.argmax(COLOURS[label]))


def test_manifest_and_images_on_s3(ray_cluster, bucket):
    files, rows = _pairs()
    s3 = resolve(f"s3://{bucket}", StorageConfig()).fs
    for name, data in files.items():
        with s3.open_output_stream(f"{bucket}/pairs/{name}") as f:
            f.write(data)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    with s3.open_output_stream(f"{bucket}/pairs/manifest.jsonl") as f:
        f.write(lines.encode())
    output = f"s3://{bucket}/shards"
    cfg = load_config(IngestConfig, None, [f"manifest=s3://{bucket}/pairs/manifest.jsonl", f"output={output}", *COLUMNS])

    summary = run_ingest(cfg)
    assert summary["by_status"] == {SUCCESS: N_GOOD, FAILED_TO_DOWNLOAD: 2, FAILED_TO_RESIZE: 1}
    loc = resolve(output, StorageConfig())
    parts = [i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path)) if i.path.endswith(".parquet")]
    table = pq.ParquetDataset(sorted(parts), filesystem=loc.fs).read()
    assert table.num_rows == N_GOOD + 3
    assert set(table.filter(pc.equal(table["key"], "p000"))["url"].to_pylist()) == {f"s3://{bucket}/pairs/img/0.jpg"}
