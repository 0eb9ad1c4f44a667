"""URLs -> (pyarrow filesystem, paths): local paths, s3:// (any endpoint) and any fsspec URL.

Ray Data reads and writes through pyarrow filesystems, so every URL is resolved here once. Inputs are
expanded to an explicit file list on the driver: a missing path or an empty glob fails before any
cluster work, naming the URL.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raypipe.config import StorageConfig

GLOB_CHARS = "*?["


class StorageError(RuntimeError):
    """A URL that cannot be read or written; the message names it and says what to check."""


@dataclass(frozen=True)
class Location:
    """A resolved URL: the filesystem and the path within it, plus the URL as the user wrote it."""

    fs: pafs.FileSystem
    path: str
    url: str

    def join(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts), "/".join([self.url.rstrip("/"), *parts]))


def _s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = storage.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    kwargs: dict = dict(
        region=region,
        anonymous=storage.anonymous,
        connect_timeout=storage.connect_timeout_s,
        request_timeout=storage.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=storage.retries + 1),
    )
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    # Credentials: pyarrow's AWS SDK reads the environment, ~/.aws and the instance profile itself.
    return pafs.S3FileSystem(**kwargs)


def resolve(url: str, storage: StorageConfig) -> Location:
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in ("", "file"):
        local = os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
        return Location(pafs.LocalFileSystem(), local, url)
    if scheme in ("s3", "s3a"):
        return Location(_s3_filesystem(storage), url.split("://", 1)[1], url)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {url}: no filesystem for scheme {scheme!r} ({e})") from None
    return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path, url)


def _describe_failure(url: str, err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"cannot access {url}: {text}. Check the path, the bucket name, the endpoint "
        "(storage.endpoint_url or AWS_ENDPOINT_URL) and the credentials in the environment."
    )


def list_files(url: str, storage: StorageConfig, extensions: tuple[str, ...]) -> tuple[pafs.FileSystem, list[str]]:
    """A file, a directory (recursive, filtered by extension) or a glob -> sorted file paths."""
    loc = resolve(url, storage)
    path = loc.path
    try:
        if any(c in path for c in GLOB_CHARS):
            base = path[: min(path.index(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            infos = loc.fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        else:
            info = loc.fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"{url} does not exist")
            if info.type == pafs.FileType.File:
                return loc.fs, [path]
            infos = loc.fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(extensions)]
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(url, e)) from None
    if not files:
        raise StorageError(f"no {'/'.join(extensions)} files match {url}")
    return loc.fs, sorted(files)


def list_inputs(
    urls: list[str], storage: StorageConfig, extensions: tuple[str, ...]
) -> tuple[pafs.FileSystem, list[str]]:
    """All inputs must live on one filesystem (Ray Data reads a dataset through one)."""
    filesystem, paths, kind = None, [], None
    for url in urls:
        fs, files = list_files(url, storage, extensions)
        if kind is not None and fs.type_name != kind:
            raise StorageError(f"inputs mix filesystems ({kind} and {fs.type_name} for {url}); read them in separate runs")
        filesystem, kind = filesystem or fs, fs.type_name
        paths.extend(files)
    duplicates = [p for p, n in Counter(paths).items() if n > 1]
    if duplicates:
        raise StorageError(f"the same file is listed more than once in data.input: {sorted(duplicates)[:3]}")
    return filesystem, paths


def read_text(loc: Location) -> str:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read().decode("utf-8")
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(loc.url, e)) from None


def write_bytes(loc: Location, data: bytes) -> None:
    try:
        parent = posixpath.dirname(loc.path)
        if parent:
            loc.fs.create_dir(parent, recursive=True)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(loc.url, e)) from None


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(loc.url, e)) from None


def is_nonempty_dir(loc: Location) -> bool:
    if not exists(loc):
        return False
    return bool(loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False)))


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_dir(loc.path)
