"""Where a shard folder lives: a local folder or a prefix of an S3-compatible object store, one interface.

`open_store(location)` takes a folder path or `s3://BUCKET/PREFIX`. Every reader and writer of a
shard folder (xc-prep shard/info/preview/export, the trainer's index and loader) opens, lists and
writes its files through the returned `Store`, by paths relative to the folder ("manifest.json",
"vqa/shard-00000.arrow"); how samples are encoded is schemas/shards.py's business.

The object store is reached through pyarrow's S3 file system (pyarrow.fs.S3FileSystem: the AWS C++
SDK inside the pyarrow wheel, no extra dependency for reading and writing). Credentials, region and
endpoint come from the standard AWS environment variables and config files (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL,
~/.aws/config); the URL's query overrides the endpoint, scheme or region of one location:
`s3://bucket/prefix?endpoint_override=minio.local:9000&scheme=http`. Secrets never go in the URL
(it is recorded in run configs).

What each write guarantees on a store without rename:
- `write_bytes`: one PUT; readers see the old object or the new one, never a part.
- `publish_file(local, rel)`: a fully written local file becomes the object (local folders: fsync +
  rename; object stores: an upload that creates the object only when it completes; a killed upload
  leaves no object). An upload that fails midway deletes what it may have created.
- `lock(rel)`: one writer at a time. A local folder uses flock; an object store a lease object
  created only if absent (`If-None-Match: *`, through boto3: the `[s3]` extra), holding the
  owner and refreshed by a heartbeat with `If-Match`, so a second writer is refused and a crashed
  writer's lease expires after LEASE_TTL_S.
Reads of an object are ranged GETs (`open_input`: random access, the Arrow IPC footer then one
sample's bytes), each retried up to READ_ATTEMPTS times on a transient error, and counted
(`read_stats`) for the loader's throughput report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from schemas.atomic import publish, write_atomic

S3_SCHEME = "s3://"
QUERY_KEYS = ("endpoint_override", "scheme", "region")
"""Options a location's URL may carry; credentials come from the AWS environment or config only."""
READ_ATTEMPTS = 4
READ_BACKOFF_S = 0.5
"""First wait before retrying a failed read; doubled for each further attempt."""
LEASE_TTL_S = 60.0
"""A lease whose heartbeat is older than this belongs to a crashed writer and may be taken over."""
HEARTBEAT_S = 10.0
HASH_CHUNK_BYTES = 1 << 22


class StorageError(OSError):
    """A location that cannot be used (bad URL, missing dependency, refused lock); says the fix."""


class LockHeld(StorageError):
    """Another writer holds the lock (the message names it and what to do)."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(S3_SCHEME)


# ---------------------------------------------------------------- read accounting


@dataclass
class ReadStats:
    """Bytes read from object stores by this process, the seconds they took, and the retries."""

    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0


_READ_STATS = ReadStats()


def read_stats() -> ReadStats:
    """This process's object-store read counters (cumulative; copy to take a difference)."""
    return _READ_STATS


# ---------------------------------------------------------------- the interface


class Lock(Protocol):
    def check(self) -> None:
        """Raise LockHeld if the lock was lost (another writer took an expired lease)."""

    def release(self) -> None: ...


class Store(Protocol):
    """A shard folder; `rel` arguments are '/'-separated paths relative to it."""

    is_local: bool

    @property
    def location(self) -> str:
        """The folder path or URL as given (for messages and records)."""
        ...

    def url(self, rel: str = "") -> str:
        """How a member is named in messages: `shards/manifest.json`, `s3://b/p/manifest.json`."""
        ...

    def local_path(self, rel: str = "") -> Path:
        """The member's path on this machine (local folders only)."""
        ...

    def size(self, rel: str) -> int | None:
        """Bytes of a file, None when it does not exist."""
        ...

    def list_files(self, rel: str = "") -> list[str]:
        """Every file under `rel` (recursive), relative to the folder, sorted."""
        ...

    def read_bytes(self, rel: str) -> bytes: ...

    def open_input(self, rel: str) -> pa.NativeFile:
        """A random-access file (memory-mapped locally, ranged GETs remotely); FileNotFoundError if absent."""
        ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically (readers see the old or the new bytes)."""
        ...

    def publish_file(self, local: Path, rel: str) -> None:
        """Make a fully written local file the member `rel` atomically; `local` is consumed."""
        ...

    def delete(self, rel: str) -> None:
        """Remove a file if it exists."""
        ...

    def lock(self, rel: str, holder: str) -> Lock:
        """Hold an exclusive lock named `rel` for this process; LockHeld if another writer holds it."""
        ...


def open_store(location: str | Path) -> Store:
    """The store of a folder path or an `s3://BUCKET/PREFIX[?endpoint_override=...]` URL."""
    text = str(location)
    if is_remote(text):
        return S3Store.from_url(text)
    if "://" in text:
        raise StorageError(
            f"{text}: unsupported location; use a folder path or s3://BUCKET/PREFIX "
            "(S3-compatible stores: set AWS_ENDPOINT_URL or ?endpoint_override=HOST:PORT)"
        )
    return LocalStore(Path(text))


def sha256_of(store: Store, rel: str) -> str:
    """sha256 of a member, streamed (an object store: read whole, by ranged reads)."""
    h = hashlib.sha256()
    with store.open_input(rel) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- local folders


@dataclass
class LocalStore:
    """A folder on a (local or shared) file system; atomic writes are temp file + fsync + rename."""

    root: Path
    is_local: bool = True

    @property
    def location(self) -> str:
        return str(self.root)

    def url(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def local_path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def size(self, rel: str) -> int | None:
        path = self.root / rel
        return path.stat().st_size if path.is_file() else None

    def list_files(self, rel: str = "") -> list[str]:
        base = self.root / rel if rel else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def open_input(self, rel: str) -> pa.NativeFile:
        return pa.memory_map(str(self.root / rel), "r")

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_atomic(self.root / rel, data)

    def publish_file(self, local: Path, rel: str) -> None:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        publish(local, target)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def lock(self, rel: str, holder: str) -> Lock:
        return _FileLock.acquire(self.root / rel, self.url(), holder)


class _FileLock:
    """flock on a file: released by the kernel when the process ends, even by kill -9."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, folder: str, holder: str) -> _FileLock:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(
                f"{folder}: another {holder} is writing to this folder; wait for it or choose another"
            ) from None
        return cls(fd)

    def check(self) -> None:
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------- S3-compatible object stores


def _parse_s3_url(url: str) -> tuple[str, str, dict[str, str]]:
    """(bucket, prefix without slashes at either end, query options) of an s3:// URL."""
    parts = urllib.parse.urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket; expected s3://BUCKET/PREFIX")
    options = {}
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in QUERY_KEYS:
            raise StorageError(
                f"{url}: unknown option {key!r} (allowed: {', '.join(QUERY_KEYS)}); credentials go in "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile, never in the URL"
            )
        options[key] = values[-1]
    return bucket, prefix, options


@dataclass
class S3Store:
    """A prefix of a bucket. Picklable: each process makes its own clients on first use (an AWS
    client must not cross a fork), so loader workers and Ray tasks can carry a store."""

    location: str
    bucket: str
    prefix: str
    options: dict[str, str] = field(default_factory=dict)
    is_local: bool = False
    _clients: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        bucket, prefix, options = _parse_s3_url(url)
        return cls(location=url, bucket=bucket, prefix=prefix, options=options)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_clients": {}}

    # --- clients, one set per process

    def _client(self, kind: str, make: Callable[[], Any]) -> Any:
        key = f"{kind}:{os.getpid()}"
        if key not in self._clients:
            self._clients[key] = make()
        return self._clients[key]

    @property
    def fs(self) -> Any:
        def make() -> Any:
            from pyarrow.fs import S3FileSystem

            kwargs: dict[str, Any] = {}
            endpoint = self.options.get("endpoint_override") or _env_endpoint()
            if endpoint:
                # pyarrow takes HOST:PORT and the scheme apart; AWS_ENDPOINT_URL is a whole URL
                scheme, sep, host = endpoint.partition("://")
                kwargs["endpoint_override"] = host if sep else endpoint
                if sep:
                    kwargs["scheme"] = scheme
            if "scheme" in self.options:
                kwargs["scheme"] = self.options["scheme"]
            if "region" in self.options:
                kwargs["region"] = self.options["region"]
            return S3FileSystem(**kwargs)

        return self._client("fs", make)

    def _boto(self) -> Any:
        def make() -> Any:
            try:
                import boto3
            except ImportError as e:
                raise StorageError(
                    f"{self.location}: writing to an object store needs boto3 for its lock "
                    "(a create-only lease object): pip install 'xcomposer-finetune[s3]'"
                ) from e
            kwargs: dict[str, Any] = {}
            if endpoint := self.options.get("endpoint_override"):
                scheme = self.options.get("scheme", "https")
                kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
            if region := self.options.get("region"):
                kwargs["region_name"] = region
            return boto3.client("s3", **kwargs)

        return self._client("boto", make)

    # --- paths

    def key(self, rel: str = "") -> str:
        """The object key of a member."""
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def _path(self, rel: str) -> str:
        return f"{self.bucket}/{self.key(rel)}"

    def url(self, rel: str = "") -> str:
        base = f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        return f"{base}/{rel}" if rel else base

    def local_path(self, rel: str = "") -> Path:
        raise AssertionError(f"{self.url(rel)}: an object has no local path (caller must use the store)")

    # --- reading

    def size(self, rel: str) -> int | None:
        from pyarrow.fs import FileType

        info = _retry(lambda: self.fs.get_file_info(self._path(rel)), self.url(rel))
        return info.size if info.type == FileType.File else None

    def list_files(self, rel: str = "") -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        base = self._path(rel).rstrip("/")
        selector = FileSelector(base, recursive=True, allow_not_found=True)
        infos = _retry(lambda: self.fs.get_file_info(selector), self.url(rel))
        root = f"{self.bucket}/{self.prefix}".rstrip("/") + "/"
        return sorted(i.path.removeprefix(root) for i in infos if i.type == FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        with self.open_input(rel) as f:
            return f.read()

    def open_input(self, rel: str) -> pa.NativeFile:
        raw = _retry(lambda: self.fs.open_input_file(self._path(rel)), self.url(rel))
        return pa.PythonFile(_RetryingReader(raw, self, rel), mode="r")

    # --- writing

    def write_bytes(self, rel: str, data: bytes) -> None:
        def put() -> None:
            with self.fs.open_output_stream(self._path(rel)) as f:
                f.write(data)

        _retry(put, self.url(rel))

    def publish_file(self, local: Path, rel: str) -> None:
        from pyarrow.fs import LocalFileSystem, copy_files

        try:
            copy_files(
                str(local),
                self._path(rel),
                source_filesystem=LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        except BaseException:
            # pyarrow completes an interrupted upload with the parts it sent: remove that object
            # (a run also only trusts a shard its sidecar describes, written after this returns).
            try:
                self.delete(rel)
            except OSError:
                pass
            raise
        finally:
            local.unlink(missing_ok=True)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._path(rel))
        except FileNotFoundError:
            pass

    def lock(self, rel: str, holder: str) -> Lock:
        return _Lease.acquire(self, rel, holder)


class _RetryingReader(io.RawIOBase):
    """A seekable file over an object whose reads (ranged GETs) are retried on transient errors
    (reopening the object) and counted in `read_stats()`."""

    def __init__(self, raw: pa.NativeFile, store: S3Store, rel: str):
        self._raw, self._store, self._rel = raw, store, rel
        self._size = raw.size()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, max(0, self._size - self._pos))
        if n == 0:
            return b""
        started = time.perf_counter()
        data = _retry(lambda: self._read_at(n, self._pos), self._store.url(self._rel))
        _READ_STATS.bytes += len(data)
        _READ_STATS.seconds += time.perf_counter() - started
        self._pos += len(data)
        return data

    def _read_at(self, n: int, pos: int) -> bytes:
        try:
            return self._raw.read_at(n, pos)
        except OSError:
            # a fresh connection for the next attempt (the raw file may hold a broken one)
            self._raw = self._store.fs.open_input_file(self._store._path(self._rel))
            raise

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _retry(action: Callable[[], Any], where: str, attempts: int = READ_ATTEMPTS) -> Any:
    """Run `action`, retrying an OSError (a dropped connection, a 5xx, throttling) with exponential
    back-off; a missing object or a refused permission is not retried."""
    for attempt in range(attempts):
        try:
            return action()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as e:
            if attempt == attempts - 1:
                raise OSError(f"{where}: failed after {attempts} attempts: {e}") from e
            _READ_STATS.retries += 1
            time.sleep(READ_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the lease lock of an object store


class _Lease:
    """A lock object created only if absent (If-None-Match: *), holding its owner and refreshed by
    a heartbeat thread with If-Match on its own ETag. A lease whose last write (the server's clock)
    is older than LEASE_TTL_S is taken over with If-Match on the stale ETag, so of two writers
    taking it over, one wins."""

    def __init__(self, store: S3Store, rel: str, owner: str, holder: str, etag: str):
        self.store, self.rel, self.owner, self.holder, self._etag = store, rel, owner, holder, etag
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="xc-lease", daemon=True)
        self._thread.start()

    @staticmethod
    def _body(owner: str, holder: str) -> bytes:
        return json.dumps(
            {"owner": owner, "holder": holder, "host": socket.gethostname(), "pid": os.getpid()}
        ).encode()

    @classmethod
    def acquire(cls, store: S3Store, rel: str, holder: str) -> _Lease:
        from botocore.exceptions import ClientError

        client, key = store._boto(), store.key(rel)
        owner = uuid.uuid4().hex
        try:
            reply = client.put_object(
                Bucket=store.bucket, Key=key, Body=cls._body(owner, holder), IfNoneMatch="*"
            )
            return cls(store, rel, owner, holder, reply["ETag"])
        except ClientError as e:
            if _status(e) not in (409, 412):
                raise StorageError(f"{store.url(rel)}: cannot create the lock object: {e}") from e
        head = client.get_object(Bucket=store.bucket, Key=key)
        age = _server_age_s(head)
        held_by = head["Body"].read().decode(errors="replace")
        if age < LEASE_TTL_S:
            raise LockHeld(
                f"{store.url()}: another {holder} is writing here (lock {store.url(rel)}: {held_by}, "
                f"heartbeat {age:.0f} s ago); wait for it, or choose another output. A crashed "
                f"writer's lock expires {LEASE_TTL_S:.0f} s after its last heartbeat"
            )
        try:  # a crashed writer's lease: take it over, unless another writer just did
            reply = client.put_object(
                Bucket=store.bucket, Key=key, Body=cls._body(owner, holder), IfMatch=head["ETag"]
            )
        except ClientError as e:
            raise LockHeld(f"{store.url()}: another {holder} took over the expired lock first") from e
        return cls(store, rel, owner, holder, reply["ETag"])

    def _beat(self) -> None:
        from botocore.exceptions import ClientError

        client = self.store._boto()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                reply = client.put_object(
                    Bucket=self.store.bucket,
                    Key=self.store.key(self.rel),
                    Body=self._body(self.owner, self.holder),
                    IfMatch=self._etag,
                )
                self._etag = reply["ETag"]
            except ClientError as e:
                if _status(e) in (404, 412):
                    self._lost = f"{self.store.url(self.rel)}: the lock was taken over by another writer"
                    return
            except Exception:  # a network hiccup: the next beat retries; the TTL gives room for several
                continue

    def check(self) -> None:
        if self._lost is not None:
            raise LockHeld(f"{self._lost}; stop and re-run this command when the other writer is done")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        if self._lost is None:
            try:
                self.store._boto().delete_object(Bucket=self.store.bucket, Key=self.store.key(self.rel))
            except Exception:  # it expires by itself
                pass


def _env_endpoint() -> str | None:
    """The AWS SDKs' standard endpoint variables (the S3-specific one first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _status(error: Any) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _server_age_s(reply: dict[str, Any]) -> float:
    """Seconds since the object was last written, by the server's clock (no clock skew)."""
    from email.utils import parsedate_to_datetime

    now = parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (now - reply["LastModified"]).total_seconds()
