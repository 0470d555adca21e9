"""One way to read and write objects under a root URI: a local folder or `s3://bucket/prefix`.

Keys are '/'-separated paths relative to the root. Every write of one object is atomic
(local: a temp file renamed into place; S3: a single PUT), and `put_if_absent` is the one
primitive that commits something exactly once (local: a hard link, which fails if the name
exists; S3: a conditional PUT with `If-None-Match: *`). Errors name the URI and the fix and
never print a secret.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """A storage location cannot be read or written; the message says which and why."""


class NotFound(StorageError, FileNotFoundError):
    pass


class ObjectInfo(NamedTuple):  # a tuple: listings make tens of thousands of these
    key: str
    size: int
    tag: str  # changes when the object changes: mtime for files, ETag for S3 objects


def _by_key(o: ObjectInfo) -> str:
    return o.key


class Storage:
    """Base: the byte-level operations each backend implements, and Parquet on top of them."""

    root: str

    def uri(self, key: str = "") -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def child(self, prefix: str) -> Storage:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; True if this call created it."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def walk(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under `prefix` (recursively), in no particular order."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under `prefix` (recursively), sorted by key."""
        return sorted(self.walk(prefix), key=_by_key)

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def write_table(self, key: str, table: pa.Table) -> bytes:
        """Write a Parquet object; return its bytes (callers hash them)."""
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        self.write_bytes(key, data)
        return data

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), columns=columns)


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.path = Path(root).expanduser().resolve()
        self.root = str(self.path)

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.path / prefix)

    def _file(self, key: str) -> Path:
        return self.path / key

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise NotFound(f"{self.uri(key)} is a folder, not a file") from None
        except OSError as err:
            raise StorageError(f"cannot read {self.uri(key)}: {err.strerror}") from None

    def _temp(self, key: str, data: bytes) -> Path:
        target = self._file(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise StorageError(f"cannot write {self.uri(key)}: {err.strerror}") from None
        return Path(tmp)

    def write_bytes(self, key: str, data: bytes) -> None:
        tmp = self._temp(key, data)
        os.replace(tmp, self._file(key))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        tmp = self._temp(key, data)
        try:
            os.link(tmp, self._file(key))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        # Straight from the file: only the wanted columns' pages are read, not the whole file.
        try:
            return pq.read_table(self._file(key), columns=columns)
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)} does not exist") from None

    def walk(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._file(prefix) if prefix else self.path
        if not base.is_dir():
            return
        skip = len(self.root) + 1  # keys by slicing: os.path.relpath costs more than the scan
        stack = [str(base)]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.name[0] == ".":
                        continue  # temp files of interrupted writes, hidden files
                    if entry.is_dir():
                        stack.append(entry.path)
                        continue
                    try:
                        st = entry.stat()
                    except FileNotFoundError:  # a dangling link, or deleted meanwhile
                        continue
                    key = entry.path[skip:]
                    yield ObjectInfo(
                        key if os.sep == "/" else key.replace(os.sep, "/"), st.st_size, str(st.st_mtime_ns)
                    )

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)


class S3Storage(Storage):
    """An S3 prefix. Endpoint and credentials come from the usual AWS_* environment
    (AWS_ENDPOINT_URL_S3 for a non-AWS server such as SeaweedFS or MinIO)."""

    def __init__(self, uri: str, client=None):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # A session of its own: boto3's module-level default session caches the
            # credentials it first saw, and a store must follow the environment it runs in.
            self._client = boto3.session.Session().client(
                "s3",
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        return self._client

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(f"{self.root}/{prefix.strip('/')}", self._client)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, err: Exception, key: str, action: str) -> StorageError:
        """Translate boto errors into one clear sentence (never echoing credentials)."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.uri(key)
        if isinstance(err, NoCredentialsError):
            return StorageError(
                f"cannot {action} {where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(err, EndpointConnectionError):
            return StorageError(
                f"cannot {action} {where}: S3 endpoint unreachable ({err.kwargs.get('endpoint_url')}); "
                "check AWS_ENDPOINT_URL_S3 and that the server is running"
            )
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"{where} does not exist")
            if code == "NoSuchBucket":
                return StorageError(
                    f"cannot {action} {where}: bucket {self.bucket!r} does not exist; create it"
                )
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                return StorageError(
                    f"cannot {action} {where}: access denied ({code}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY and the bucket's permissions"
                )
            return StorageError(f"cannot {action} {where}: S3 error {code}")
        return StorageError(f"cannot {action} {where}: {type(err).__name__}")

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as err:  # translated: botocore raises many unrelated types
            raise self._error(err, key, "read") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as err:
            raise self._error(err, key, "write") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise self._error(err, key, "write") from None
        except Exception as err:
            raise self._error(err, key, "write") from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:
            translated = self._error(err, key, "read")
            if isinstance(translated, NotFound):
                return False
            raise translated from None

    def walk(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix)
        if full and not full.endswith("/"):
            full += "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for obj in page.get("Contents", []):
                    key = obj["Key"][skip:]
                    if key and not key.endswith("/"):
                        yield ObjectInfo(key, obj["Size"], obj["ETag"].strip('"'))
        except Exception as err:
            raise self._error(err, prefix, "list") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            raise self._error(err, key, "delete") from None


def open_storage(uri: str | os.PathLike, client=None) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else is a local path."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Storage(text, client)
    if "://" in text:
        raise StorageError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(text)
