"""Shards written by the real img2dataset, from images served on 127.0.0.1 (no internet)."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def serve_bytes(files: dict[str, bytes]):
    """An HTTP server on a free 127.0.0.1 port serving ``files`` by name (404 otherwise)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_img2dataset(rows: list[dict], files: dict[str, bytes], output_dir: Path, output_format: str, **kwargs) -> Path:
    """``rows``: dicts with ``path`` (served name; absent names give 404), ``caption`` and extra columns.

    Writes img2dataset's own output (tars + metadata parquet, or parquet shards) to ``output_dir``."""
    from img2dataset import download

    output_dir.mkdir(parents=True, exist_ok=True)
    # A proxy configured on the machine must not see requests to the local server.
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    with serve_bytes(files) as base:
        extra = [c for c in rows[0] if c not in ("path", "caption")]
        table = pa.table(
            {"url": [f"{base}/{r['path']}" for r in rows], "caption": [r["caption"] for r in rows]}
            | {c: [r[c] for r in rows] for c in extra}
        )
        url_list = output_dir.parent / f"{output_dir.name}-urls.parquet"
        pq.write_table(table, url_list)
        options = dict(
            url_list=str(url_list),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=extra,
            output_format=output_format,
            output_folder=str(output_dir),
            processes_count=1,
            thread_count=4,
            resize_mode="no",
            number_sample_per_shard=max(1, len(rows) // 2),
            distributor="multiprocessing",
            timeout=5,
            retries=0,
            enable_wandb=False,
            disallowed_header_directives=[],
        )
        download(**(options | kwargs))
    return output_dir
