"""`ingest`: a manifest of the user's own labeled pairs -> shards in img2dataset's Parquet format.

A manifest is a CSV, JSON-lines or Parquet table with one row per pair: an image (local path, path
relative to the manifest or ``base_dir``, http(s):// or s3:// / fsspec URL, or the encoded bytes), a
text and a label. Each shard is written as img2dataset's ``output_format="parquet"`` writes it::

    {shard:05d}.parquet        label, keep_columns..., caption, url, key, status, error_message,
                               width, height, original_width, original_height, exif, sha256, jpg
    {shard:05d}_stats.json     count, successes, failed_to_download, failed_to_resize, duration,
                               start_time, end_time, status_dict (per status / error message)

so ``jobs/prepare.py data.input=<output> labels.column=label`` reads it like a COYO download.
Images are re-encoded as RGB JPEG: EXIF orientation applied, alpha composited on white, palette /
LA / CMYK / 16-bit converted, downscaled to ``max_side`` keeping the aspect ratio; SVG drawings are
rasterized with cairosvg when it is installed.

A row that cannot be used never stops the job: it is written with img2dataset's conventions
(``status`` ``failed_to_download`` when the image cannot be read, ``failed_to_resize`` when it cannot
be decoded or converted, an ``error_message``, ``jpg`` null), counted in its shard's stats.

Everything per row and per shard is a plain function (no Ray); ``run_ingest`` holds the Ray wiring:
the manifest is read and checked on the driver, then one Ray Data task per shard fetches, converts
and writes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import time
import urllib.request
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import ExifTags, Image, UnidentifiedImageError

from raypipe.config import EncodeOptions, IngestConfig, StorageConfig
from raypipe.io import fs as rfs
from raypipe.formats.img2dataset import (
    FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, PARQUET_ROW_GROUP, PARQUET_SCHEMA, STATUSES, SUCCESS, compute_key, shard_name,
)
from raypipe.transforms.image import (
    FORMATS,
    UPRIGHT,
    ImageError,
    ImageOptions,
    check_declared_size,
    exif_orientation,
    to_rgb,
)
from raypipe.errors import UserError
from raypipe.transforms.labels import label_text

log = logging.getLogger(__name__)

# img2dataset's per-sample statuses.
LABEL = "label"
# img2dataset's own columns, in its order (the sample's schema without its saved columns id/label).
I2D_FIELDS = [f for f in PARQUET_SCHEMA if f.name not in ("id", LABEL)]
SHARD_FILE = re.compile(r"^\d{5}(\.parquet|_stats\.json)$")
MANIFEST_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                       ".parquet": "parquet"}
USER_AGENT = "raypipe-ingest/0.1 (img2dataset-compatible shards)"
SVG_SUFFIXES = (".svg", ".svgz")
RESIZE_FILTER = Image.Resampling.LANCZOS  # stored images are looked at again: a sharper filter than prepare's
EXAMPLES_PER_SHARD = 3
# Internal manifest columns (normalized on the driver); the image bytes column exists only when the
# manifest holds encoded images instead of paths.
_URL, _BYTES = "url", "__image_bytes"


class IngestError(UserError, RuntimeError):
    """A manifest or output that cannot be used as configured; the message names it and the fix."""


class RowError(Exception):
    """Why one row has no image: an img2dataset status and a message."""

    def __init__(self, status: str, message: str):
        super().__init__(status, message)  # both in args, so the exception pickles
        self.status, self.message = status, message


@dataclass(frozen=True)
class EncodedImage:
    jpg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    exif: str  # a JSON object, as img2dataset's extract_exif writes it


# ------------------------------------------------------------------------------------ one image


def looks_like_svg(data: bytes, name: str = "") -> bool:
    if name.lower().endswith(SVG_SUFFIXES):
        return True
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<") and b"<svg" in head.lower()


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Keep the ratio, longer side at most max_side, never upscale."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _exif_json(img: Image.Image) -> str:
    try:
        exif = img.getexif()
        tags = {f"Image {ExifTags.TAGS.get(k, k)}": str(v) for k, v in exif.items() if not isinstance(v, bytes)}
    except Exception:  # a broken EXIF block does not make the pixels unusable
        tags = {}
    return json.dumps(tags, ensure_ascii=False)


def _svg_declared_size(data: bytes) -> tuple[float, float] | None:
    """The drawing's declared size in pixels (96 dpi), read with cairosvg's own parser; None if unknown."""
    from cairosvg import helpers, parser

    try:
        tree = parser.Tree(bytestring=data)
        context = SimpleNamespace(dpi=96, context_width=0, context_height=0, font_size=12)
        width, height, _ = helpers.node_format(context, tree)
    except Exception:
        return None
    return (width, height) if width and height else None


def rasterize_svg(data: bytes, opts: EncodeOptions) -> tuple[Image.Image, tuple[int, int]]:
    """An SVG (or gzipped SVGZ) drawing -> (RGBA image at most max_side, declared size). Raises RowError."""
    try:
        import cairosvg
    except (ImportError, OSError) as e:  # OSError: the Python package is there but libcairo is not
        raise RowError(
            FAILED_TO_RESIZE,
            f"SVG image but no SVG rasterizer ({type(e).__name__}: {e}); install one with "
            "`pip install cairosvg` (it needs the cairo library, e.g. apt-get install libcairo2)",
        ) from None
    declared = _svg_declared_size(data)
    scale = 1.0
    if declared is not None:
        width, height = declared
        if width * height > opts.max_pixels:
            raise RowError(
                FAILED_TO_RESIZE,
                f"SVG declares {width:.0f}x{height:.0f} = {width * height:.2g} pixels, over max_pixels={opts.max_pixels:.2g}",
            )
        if opts.max_side and max(width, height) > opts.max_side:
            scale = opts.max_side / max(width, height)
    try:
        png = cairosvg.svg2png(bytestring=data, scale=scale)
        img = Image.open(io.BytesIO(png))
        img.load()
    except Exception as e:  # cairosvg raises ParseError, EntitiesForbidden, ValueError ...
        raise RowError(FAILED_TO_RESIZE, f"SVG rasterize failed: {type(e).__name__}: {e}") from None
    original = (round(declared[0]), round(declared[1])) if declared else img.size
    return img, original


def _open_raster(data: bytes, opts: EncodeOptions) -> tuple[Image.Image, tuple[int, int], str]:
    """Decode a raster image upright, JPEGs drafted near the target size: (image, original size, exif)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the guard
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    original = img.size
    check_declared_size(*original, ImageOptions(max_pixels=opts.max_pixels))
    exif = _exif_json(img)
    orientation = exif_orientation(img)
    img.draft("RGB", _target_size(*original, opts.max_side))  # JPEG only: decode at 1/2, 1/4, 1/8 scale
    img.load()
    if orientation in UPRIGHT:
        img = img.transpose(UPRIGHT[orientation])
        if orientation >= 5:  # the upright picture is rotated: report it as it is shown
            original = original[::-1]
    return img, original, exif


def encode_image(data: bytes | None, opts: EncodeOptions, name: str = "") -> EncodedImage:
    """Image bytes -> RGB JPEG at most max_side (alpha on white). ``name`` (a path or URL) helps spot
    SVG files. Raises RowError with img2dataset's status."""
    if not data:
        raise RowError(FAILED_TO_DOWNLOAD, "image is empty (0 bytes)" if data is not None else "no image")
    fmt = "image"
    try:
        if looks_like_svg(data, name):
            img, original = rasterize_svg(data, opts)
            fmt, exif = "SVG", "{}"
        else:
            img, original, exif = _open_raster(data, opts)
            fmt = img.format or fmt
        rgb = to_rgb(img)
        size = _target_size(*rgb.size, opts.max_side)
        if size != rgb.size:
            rgb = rgb.resize(size, RESIZE_FILTER, reducing_gap=3.0)
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=opts.jpeg_quality)
    except RowError:
        raise
    except ImageError as e:  # the declared-size guard of raypipe.transforms.image
        raise RowError(FAILED_TO_RESIZE, e.message) from None
    except Image.DecompressionBombError as e:
        raise RowError(FAILED_TO_RESIZE, f"Pillow refused a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise RowError(
            FAILED_TO_RESIZE, f"not a supported image format ({', '.join(FORMATS)}, SVG); first bytes {bytes(data[:16])!r}"
        ) from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise RowError(FAILED_TO_RESIZE, f"{fmt} decode failed: {type(e).__name__}: {e}") from None
    return EncodedImage(out.getvalue(), *rgb.size, *original, exif)


# ------------------------------------------------------------------------------------ fetching


class Fetcher:
    """Reads the bytes behind a resolved image reference: a local path, http(s) (urllib, as
    img2dataset downloads), s3:// through raypipe's configured filesystem, or any fsspec URL."""

    def __init__(self, storage: StorageConfig | None = None, timeout_s: float = 10.0):
        self.storage = storage or StorageConfig()
        self.timeout_s = timeout_s
        self._s3 = None

    def __call__(self, ref: str) -> bytes:
        try:
            return self._read(ref)
        except RowError:
            raise
        except OSError as e:
            detail = e.strerror or str(e) or type(e).__name__
            raise RowError(FAILED_TO_DOWNLOAD, f"{type(e).__name__}: {detail}") from None
        except Exception as e:
            raise RowError(FAILED_TO_DOWNLOAD, f"{type(e).__name__}: {e}") from None

    def _read(self, ref: str) -> bytes:
        scheme = urlsplit(ref).scheme.lower() if "://" in ref else ""
        if scheme in ("http", "https"):
            request = urllib.request.Request(ref, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        if scheme in ("", "file"):
            with open(ref.removeprefix("file://"), "rb") as f:
                return f.read()
        if scheme in ("s3", "s3a"):  # one filesystem (and connection pool) for every row
            if self._s3 is None:
                self._s3 = rfs.resolve("s3://bucket", self.storage).fs
            with self._s3.open_input_stream(ref.split("://", 1)[1]) as f:
                return f.read()
        loc = rfs.resolve(ref, self.storage)
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()


def resolve_image_ref(ref: str, base: str) -> str:
    """A manifest's image cell -> an absolute path or URL (relative ones start from ``base``)."""
    ref = ref.strip()
    if "://" in ref:
        return ref
    if ref.startswith("~"):
        return os.path.expanduser(ref)
    if os.path.isabs(ref):
        return ref
    if "://" in base:
        return posixpath.join(base.rstrip("/") + "/", ref)
    return os.path.normpath(os.path.join(base, ref))


# ------------------------------------------------------------------------------------ one shard


def _status_message(status: str, message: str | None) -> str:
    return SUCCESS if status == SUCCESS else (message or status)


def shard_stats(statuses: list[str], messages: list[str | None], start: float, end: float) -> dict:
    """img2dataset's ``{shard}_stats.json`` for one shard."""
    counts = Counter(statuses)
    return {
        "count": len(statuses),
        "successes": counts[SUCCESS],
        "failed_to_download": counts[FAILED_TO_DOWNLOAD],
        "failed_to_resize": counts[FAILED_TO_RESIZE],
        "duration": round(end - start, 3),
        "start_time": start,
        "end_time": end,
        "status_dict": dict(Counter(_status_message(s, m) for s, m in zip(statuses, messages)).most_common()),
    }


def output_schema(rows: pa.Table) -> pa.Schema:
    """label (when the manifest has labels) and saved columns first, then img2dataset's own."""
    saved = [f for f in rows.schema if f.name not in (_URL, _BYTES, "key", "caption")]
    return pa.schema([*saved, *I2D_FIELDS])


def ingest_shard(rows: pa.Table, opts: EncodeOptions, fetch, threads: int = 16) -> tuple[pa.Table, dict, list[dict]]:
    """Normalized manifest rows (see ``normalize_manifest``) -> (the shard's table, its stats, a few
    failed examples). ``fetch(ref) -> bytes`` reads one image and raises RowError; every row is kept."""
    started = time.time()
    n = rows.num_rows
    refs = rows[_URL].to_pylist()
    embedded = rows[_BYTES].to_pylist() if _BYTES in rows.column_names else [None] * n
    out: dict[str, list] = {f.name: [None] * n for f in I2D_FIELDS}
    out["key"], out["caption"], out[_URL] = rows["key"].to_pylist(), rows["caption"].to_pylist(), refs

    def read(i: int) -> bytes:
        if embedded[i] is not None:
            return embedded[i]
        if refs[i] is None:
            raise RowError(FAILED_TO_DOWNLOAD, "no image path or URL in the manifest row")
        return fetch(refs[i])

    def fetched(i: int) -> bytes | RowError:
        try:
            return read(i)
        except RowError as e:
            return e

    window = max(1, threads) * 4  # bounded: a shard's images are never all in memory at once
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, n, window):
            indices = range(start, min(n, start + window))
            for i, data in zip(indices, pool.map(fetched, indices)):
                try:
                    if isinstance(data, RowError):
                        raise data
                    image = encode_image(data, opts, refs[i] or "")
                except RowError as e:
                    out["status"][i], out["error_message"][i] = e.status, e.message
                    continue
                out["status"][i] = SUCCESS
                out["jpg"][i] = image.jpg
                out["width"][i], out["height"][i] = image.width, image.height
                out["original_width"][i], out["original_height"][i] = image.original_width, image.original_height
                out["exif"][i] = image.exif
                out["sha256"][i] = hashlib.sha256(data).hexdigest()
    table_schema = output_schema(rows)
    columns = {f.name: (out[f.name] if f.name in out else rows[f.name]) for f in table_schema}
    table = pa.Table.from_pydict(columns, table_schema)
    stats = shard_stats(out["status"], out["error_message"], started, time.time())
    examples = [
        {"key": out["key"][i], "url": refs[i], "status": out["status"][i], "error_message": out["error_message"][i]}
        for i in range(n)
        if out["status"][i] != SUCCESS
    ][:EXAMPLES_PER_SHARD]
    return table, stats, examples


def write_shard(output: rfs.Location, shard_id: int, table: pa.Table, stats: dict) -> None:
    name = shard_name(shard_id)
    output.fs.create_dir(output.path, recursive=True)
    pq.write_table(table, output.join(f"{name}.parquet").path, filesystem=output.fs, row_group_size=PARQUET_ROW_GROUP)
    rfs.write_text(output.join(f"{name}_stats.json"), json.dumps(stats, indent=4, ensure_ascii=False))


# ------------------------------------------------------------------------------------ the manifest


def manifest_format(path: str, configured: str) -> str:
    """csv | tsv | jsonl | parquet for one manifest file."""
    suffix = posixpath.splitext(path.lower())[1]
    detected = MANIFEST_EXTENSIONS.get(suffix)
    if configured == "auto":
        if detected is None:
            raise IngestError(
                f"{path}: cannot tell the manifest format from the extension {suffix!r}; "
                f"set format=csv, jsonl or parquet (known extensions: {', '.join(MANIFEST_EXTENSIONS)})"
            )
        return detected
    return "tsv" if configured == "csv" and detected == "tsv" else configured


def _read_json_lines(raw: bytes, path: str) -> pa.Table:
    text = raw.decode("utf-8-sig")
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            records = json.loads(text)
        except ValueError as e:
            raise IngestError(f"{path}: not valid JSON: {e}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise IngestError(f"{path}, line {number}: not valid JSON: {e}") from None
    if not all(isinstance(r, dict) for r in records):
        raise IngestError(f"{path}: every JSON line must be an object with the manifest's columns")
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them as text
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def read_manifest_file(filesystem: pafs.FileSystem, path: str, fmt: str, text_columns: tuple[str, ...]) -> pa.Table:
    """One manifest file as an Arrow table; ``text_columns`` are read as strings (ids keep their zeros)."""
    try:
        if fmt == "parquet":
            return pq.read_table(path, filesystem=filesystem)
        with filesystem.open_input_stream(path) as f:
            raw = f.read()
    except (OSError, pa.ArrowInvalid) as e:
        raise IngestError(f"{path}: cannot read the manifest: {e}") from None
    if fmt == "jsonl":
        return _read_json_lines(raw, path)
    try:
        return pacsv.read_csv(
            io.BytesIO(raw),
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns}, strings_can_be_null=True),
        )
    except pa.ArrowInvalid as e:
        raise IngestError(f"{path}: not a readable {fmt.upper()} manifest: {e}") from None


def _as_text(column: pa.ChunkedArray) -> list[str | None]:
    return [None if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for v in column.to_pylist()]


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def normalize_manifest(table: pa.Table, cfg: IngestConfig, path: str, base: str) -> pa.Table:
    """One manifest's rows -> key (or null), url, [image bytes], caption, label, keep columns."""
    wanted = {cfg.image_column: "image_column", cfg.text_column: "text_column"}
    wanted.update({c: "key_column" for c in [cfg.key_column] if c})
    wanted.update({c: "label_column" for c in [cfg.label_column] if c})
    wanted.update({c: "keep_columns" for c in cfg.keep_columns})
    for column, setting in wanted.items():
        if column not in table.column_names:
            raise IngestError(f"{path}: column {column!r} is missing; the manifest has {table.column_names}. Set {setting}.")
    image = table[cfg.image_column]
    columns: dict[str, pa.Array | list] = {}
    if cfg.label_column:
        columns[LABEL] = pa.array([label_text(v) for v in table[cfg.label_column].to_pylist()], pa.string())
    for name in cfg.keep_columns:
        columns[name] = table[name]
    columns["key"] = pa.array(_as_text(table[cfg.key_column]) if cfg.key_column else [None] * len(table), pa.string())
    columns["caption"] = pa.array(_as_text(table[cfg.text_column]), pa.string())
    if _is_binary(image.type):
        columns[_URL] = pa.array([None] * len(table), pa.string())
        columns[_BYTES] = image.cast(pa.binary())
    else:
        refs = _as_text(image)
        columns[_URL] = pa.array([resolve_image_ref(r, base) if r and r.strip() else None for r in refs], pa.string())
    return pa.table(columns)


def read_manifests(cfg: IngestConfig) -> pa.Table:
    """Every manifest, normalized, in order, with keys filled in (img2dataset's position keys by default)."""
    extensions = tuple(MANIFEST_EXTENSIONS) if cfg.format == "auto" else {
        "csv": (".csv", ".tsv"), "jsonl": (".jsonl", ".ndjson", ".json"), "parquet": (".parquet",)}[cfg.format]
    tables = []
    for url in cfg.manifest:
        filesystem, files = rfs.list_files(url, cfg.storage, extensions)
        for path in files:
            file_url = path if filesystem.type_name == "local" else _url_of(url, path)
            base = cfg.base_dir if cfg.base_dir else posixpath.dirname(file_url) if "://" in file_url else os.path.dirname(file_url)
            text_columns = tuple(c for c in (cfg.image_column, cfg.text_column, cfg.key_column, cfg.label_column) if c)
            raw = read_manifest_file(filesystem, path, manifest_format(path, cfg.format), text_columns)
            tables.append(normalize_manifest(raw, cfg, file_url, os.path.expanduser(base) if "://" not in base else base))
    if _BYTES in {c for t in tables for c in t.column_names}:
        tables = [t if _BYTES in t.column_names else t.append_column(_BYTES, pa.nulls(len(t), pa.binary())) for t in tables]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    if table is None or table.num_rows == 0:
        raise IngestError(f"no rows in the manifest(s) {cfg.manifest}")
    keys = table["key"].to_pylist()
    if cfg.key_column is None:
        keys = [compute_key(i % cfg.shard_size, i // cfg.shard_size, cfg.shard_size) for i in range(len(keys))]
        table = table.set_column(table.column_names.index("key"), "key", pa.array(keys, pa.string()))
    else:
        missing = sum(k is None or not k.strip() for k in keys)
        if missing:
            raise IngestError(f"{missing} manifest row(s) have no value in key_column={cfg.key_column!r}; every row needs a key")
        repeated = [k for k, count in Counter(keys).items() if count > 1]
        if repeated:
            raise IngestError(f"key_column={cfg.key_column!r} repeats {len(repeated)} key(s), e.g. {sorted(repeated)[:3]}; keys must be unique")
    return table


def _url_of(url: str, path: str) -> str:
    """The URL of a listed file, with the scheme of the URL it was listed from."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def shard_slices(table: pa.Table, shard_size: int) -> list[tuple[int, pa.Table]]:
    return [(start // shard_size, table.slice(start, shard_size)) for start in range(0, table.num_rows, shard_size)]


# ------------------------------------------------------------------------------------ the job


def existing_shards(output: rfs.Location) -> list[str]:
    if not rfs.exists(output):
        return []
    infos = output.fs.get_file_info(pafs.FileSelector(output.path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and SHARD_FILE.match(posixpath.basename(i.path)))


def _check_output(cfg: IngestConfig) -> tuple[rfs.Location, list[str]]:
    """The output location and the shard files already there (refused unless overwrite=true)."""
    output = rfs.resolve_output(cfg.output, cfg.storage)
    present = existing_shards(output)
    if present and not cfg.overwrite:
        raise IngestError(f"{cfg.output} already holds {len(present)} shard file(s); pass overwrite=true to replace them")
    return output, present


def _table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _ingest_item(item: dict, output: str, storage: StorageConfig, opts: EncodeOptions, timeout_s: float, threads: int) -> dict:
    """One Ray Data row = one shard: fetch, convert, write; returns its stats (as JSON text)."""
    rows = pa.ipc.open_stream(item["rows"]).read_all()
    table, stats, examples = ingest_shard(rows, opts, Fetcher(storage, timeout_s), threads)
    write_shard(rfs.resolve(output, storage), int(item["shard_id"]), table, stats)
    return {"shard_id": item["shard_id"], "stats": json.dumps(stats), "examples": json.dumps(examples)}


def summarize(results: list[dict], output: str, elapsed_s: float) -> dict:
    by_status, messages, examples = Counter(), Counter(), []
    for r in sorted(results, key=lambda r: r["shard_id"]):
        stats = json.loads(r["stats"])
        by_status.update({s: stats[s if s != SUCCESS else "successes"] for s in STATUSES})
        messages.update({m: c for m, c in stats["status_dict"].items() if m != SUCCESS})
        examples += json.loads(r["examples"])
    rows = sum(by_status.values())
    return {
        "rows": rows,
        "shards": len(results),
        "by_status": {s: by_status[s] for s in STATUSES},
        "top_errors": messages.most_common(10),
        "error_examples": examples[:10],
        "output": output,
        "elapsed_s": round(elapsed_s, 2),
        "rows_per_s": round(rows / elapsed_s, 1) if elapsed_s else None,
    }


def summary_lines(summary: dict) -> list[str]:
    s = summary["by_status"]
    lines = [
        f"ingested {summary['rows']} rows into {summary['shards']} shard(s) in {summary['elapsed_s']} s "
        f"({summary['rows_per_s']} rows/s) -> {summary['output']}",
        f"  {SUCCESS}: {s[SUCCESS]}, {FAILED_TO_DOWNLOAD}: {s[FAILED_TO_DOWNLOAD]}, {FAILED_TO_RESIZE}: {s[FAILED_TO_RESIZE]}",
    ]
    lines += [f"  {count} x {message}" for message, count in summary["top_errors"]]
    lines += [f"  e.g. {e['key']}: {e['url']} ({e['status']}: {e['error_message']})" for e in summary["error_examples"][:3]]
    return lines


def run_ingest(cfg: IngestConfig) -> dict:
    """Manifest(s) -> img2dataset Parquet shards at cfg.output; returns the summary. The one Ray-wired
    function: the manifest is read and checked on the driver, then one Ray Data task per shard."""
    import ray.data

    from raypipe.pipeline.cluster import init_ray

    started = time.perf_counter()
    output, stale = _check_output(cfg)
    manifest = read_manifests(cfg)  # every check that needs no cluster happens before Ray starts
    for path in stale:  # only shard files: anything else in the folder is left alone
        output.fs.delete_file(path)
    slices = shard_slices(manifest, cfg.shard_size)
    log.info("ingesting %d manifest rows into %d shard(s) at %s", manifest.num_rows, len(slices), output.url)
    init_ray(cfg.ray)
    items = [{"shard_id": shard_id, "rows": _table_to_ipc(rows)} for shard_id, rows in slices]
    opts = EncodeOptions(**cfg.model_dump(include=set(EncodeOptions.model_fields)))  # what the tasks need of cfg
    results = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(_ingest_item, fn_args=(cfg.output, cfg.storage, opts, cfg.timeout_s, cfg.fetch_threads))
        .take_all()
    )
    return summarize(results, output.url, time.perf_counter() - started)
