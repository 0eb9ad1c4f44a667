"""URLs -> (pyarrow filesystem, paths): local paths, s3:// (any endpoint) and any fsspec URL.

Ray Data reads and writes through pyarrow filesystems, so every URL is resolved here once. Inputs are
expanded to an explicit file list on the driver: a missing path or an empty glob fails before any
cluster work, naming the URL.

Object-store faults (see docs/reliability.md):

* every request is retried ``storage.retries`` times by the AWS SDK (its standard mode: exponential
  backoff with jitter), in the driver and in every Ray worker;
* before the first request to an endpoint, a process checks that the endpoint answers at all, retrying
  on a fixed schedule (0.25 s, 0.5 s, 1 s, ... doubling, ``storage.retries`` times: 7.75 s at the
  default 5), so an outage of a few seconds is ridden out and an endpoint that is down for good fails
  within seconds, naming the URL, instead of after the SDK's slower retries of every request;
* a bucket that does not exist is named as such (inputs, and outputs via ``resolve_output``).

Credentials: ``storage.access_key_id`` / ``secret_access_key`` / ``session_token`` when set, else the
AWS SDK's own chain (environment, ~/.aws, instance profile).
"""

from __future__ import annotations

import fnmatch
import http.client
import os
import posixpath
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raypipe.config import StorageConfig
from raypipe.errors import UserError

GLOB_CHARS = "*?["
FIRST_RETRY_DELAY_S = 0.25  # the reachability check's delays double from here

_reachable_endpoints: set[str] = set()  # endpoints this process has reached once


class StorageError(UserError, RuntimeError):
    """A URL that cannot be read or written; the message names it and says what to check."""


@dataclass(frozen=True)
class Location:
    """A resolved URL: the filesystem and the path within it, plus the URL as the user wrote it."""

    fs: pafs.FileSystem
    path: str
    url: str

    def join(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts), "/".join([self.url.rstrip("/"), *parts]))


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry strategy when pickled: pyarrow's own pickling drops
    it, so Ray workers (read tasks, training workers writing checkpoints) fell back to 3 attempts."""

    def __init__(self, retries: int, **options):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retries + 1), **options)
        self._retries, self._options = retries, options

    def __reduce__(self):
        return _rebuild_s3_filesystem, (self._retries, self._options)


def _rebuild_s3_filesystem(retries: int, options: dict) -> _S3FileSystem:
    return _S3FileSystem(retries, **options)


def _endpoint(storage: StorageConfig) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region(storage: StorageConfig) -> str:
    return storage.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def _s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    options: dict = dict(
        region=_region(storage),
        anonymous=storage.anonymous,
        connect_timeout=storage.connect_timeout_s,
        request_timeout=storage.request_timeout_s,
    )
    endpoint = _endpoint(storage)
    if endpoint:
        parts = urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    # Without secret fields, pyarrow's AWS SDK finds the credentials itself (environment, ~/.aws, instance
    # profile) in every process, so they never enter the options. With them, the options carry the keys
    # to the Ray workers this filesystem is pickled into.
    if storage.access_key_id is not None:
        options.update(access_key=storage.access_key_id.get_secret_value(),
                       secret_key=storage.secret_access_key.get_secret_value())
    if storage.session_token is not None:
        options.update(session_token=storage.session_token.get_secret_value())
    return _S3FileSystem(storage.retries, **options)


def _answers(endpoint: str, timeout_s: float) -> None:
    """One unauthenticated ``HEAD /``: any HTTP answer, even an error status, means the server is up.
    Raises OSError or HTTPException when the connection is refused, dropped or times out."""
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        # Only reachability is checked and nothing secret is sent, so the certificate is left to the
        # SDK (which verifies it on every real request).
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        connection.request("HEAD", "/")
        connection.getresponse()
    finally:
        connection.close()


def _wait_for_endpoint(storage: StorageConfig, url: str) -> None:
    """Fails within seconds, naming the URL, when the object store does not answer; retries on a fixed
    schedule first, so a short outage is ridden out."""
    endpoint = _endpoint(storage) or f"https://s3.{_region(storage)}.amazonaws.com"
    if endpoint in _reachable_endpoints:
        return
    started = time.monotonic()
    for attempt in range(storage.retries + 1):
        if attempt:
            time.sleep(FIRST_RETRY_DELAY_S * 2 ** (attempt - 1))
        try:
            _answers(endpoint, storage.connect_timeout_s)
        except (OSError, http.client.HTTPException) as e:
            error = e
            continue
        _reachable_endpoints.add(endpoint)
        return
    reason = str(error) or type(error).__name__
    raise StorageError(
        f"cannot access {url}: the object store at {endpoint} does not answer ({reason}; "
        f"{storage.retries + 1} attempt(s) over {time.monotonic() - started:.1f} s). Check storage.endpoint_url "
        "(or AWS_ENDPOINT_URL), that the server is running and that this machine can reach it."
    )


def resolve(url: str, storage: StorageConfig) -> Location:
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in ("", "file"):
        local = os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
        return Location(pafs.LocalFileSystem(), local, url)
    if scheme in ("s3", "s3a"):
        _wait_for_endpoint(storage, url)
        return Location(_s3_filesystem(storage), url.split("://", 1)[1], url)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        extra = " (pip install 'raypipe[gcs]')" if scheme in ("gs", "gcs") else ""
        raise StorageError(f"cannot open {url}: no filesystem for scheme {scheme!r}{extra} ({e})") from None
    return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path, url)


def _missing_bucket(loc: Location) -> str | None:
    """The bucket of an S3 location when the store says it does not exist (else None: it exists, or
    the store would not say, e.g. to credentials that may not list buckets)."""
    if not isinstance(loc.fs, pafs.S3FileSystem):
        return None
    bucket = loc.path.split("/", 1)[0]
    try:
        missing = loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return None
    return bucket if missing else None


def _no_bucket(url: str, bucket: str) -> str:
    return f"cannot access {url}: there is no bucket {bucket!r}; fix the URL or create the bucket"


def resolve_output(url: str, storage: StorageConfig) -> Location:
    """``resolve`` for a location a job will write to, checked before any work is done: an object
    store refuses to write into a bucket that does not exist, and would say so only at the end."""
    loc = resolve(url, storage)
    bucket = _missing_bucket(loc)
    if bucket is not None:
        raise StorageError(_no_bucket(url, bucket))
    return loc


def _describe_failure(loc: Location, err: Exception) -> str:
    url = loc.url
    bucket = _missing_bucket(loc) if isinstance(err, FileNotFoundError) else None
    if bucket is not None:
        return _no_bucket(url, bucket)
    text = (str(err).splitlines()[0] if str(err) else type(err).__name__).rstrip(".")
    if "ACCESS_DENIED" in text:  # the AWS SDK's name for 403, whether the key is wrong or lacks permission
        return (
            f"cannot access {url}: access denied ({text}). Check the credentials (storage.access_key_id / "
            "storage.secret_access_key, else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment, "
            "~/.aws or the instance profile) and that they may use this bucket."
        )
    return (
        f"cannot access {url}: {text}. Check the path, the bucket name, the endpoint "
        "(storage.endpoint_url or AWS_ENDPOINT_URL) and the credentials."
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
                bucket = _missing_bucket(loc)
                raise StorageError(_no_bucket(url, bucket) if bucket else f"{url} does not exist")
            if info.type == pafs.FileType.File:
                return loc.fs, [path]
            infos = loc.fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(extensions)]
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(loc, e)) from None
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
        raise StorageError(_describe_failure(loc, e)) from None


def write_bytes(loc: Location, data: bytes) -> None:
    try:
        parent = posixpath.dirname(loc.path)
        if parent:
            loc.fs.create_dir(parent, recursive=True)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(loc, e)) from None


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(loc, e)) from None


def is_nonempty_dir(loc: Location) -> bool:
    if not exists(loc):
        return False
    return bool(loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False)))


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_dir(loc.path)


def replace_with(staged: Location, target: Location, names: tuple[str, ...]) -> None:
    """Puts the files and folders ``names`` of ``staged`` in place of those of ``target``, then removes
    ``staged``. Object stores have no rename of a folder, so each file is moved on its own; what is
    replaced is deleted only now, after the new output is complete."""
    try:
        for name in names:
            old, new = target.join(name), staged.join(name)
            info = target.fs.get_file_info(old.path)
            if info.type == pafs.FileType.Directory:
                target.fs.delete_dir(old.path)
            elif info.type == pafs.FileType.File:
                target.fs.delete_file(old.path)
            new_info = staged.fs.get_file_info(new.path)
            if new_info.type == pafs.FileType.File:
                staged.fs.move(new.path, old.path)
                continue
            for item in staged.fs.get_file_info(pafs.FileSelector(new.path, recursive=True)):
                if item.type == pafs.FileType.File:
                    # By prefix: posixpath.relpath would resolve the bucket paths against the working directory.
                    destination = posixpath.join(old.path, item.path[len(new.path.rstrip('/')) + 1:])
                    target.fs.create_dir(posixpath.dirname(destination), recursive=True)
                    staged.fs.move(item.path, destination)
        delete_dir(staged)
    except (OSError, ValueError) as e:
        raise StorageError(_describe_failure(target, e)) from None
