"""One way to read and write objects under a root URI: a local folder or `s3://bucket/prefix`.

Keys are '/'-separated paths relative to the root. Every write of one object is atomic
(local: a temp file renamed into place; S3: a single PUT), and `put_if_absent` is the one
primitive that commits something exactly once (local: a hard link, which fails if the name
exists; S3: a conditional PUT with `If-None-Match: *`). Errors name the URI and the fix and
never print a secret.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

# Links followed while resolving one confined path (Linux's own limit is 40).
MAX_LINKS = 40


class StorageError(RuntimeError):
    """A storage location cannot be read or written; the message says which and why."""


class NotFound(StorageError, FileNotFoundError):
    pass


class NotRegular(StorageError):
    """Not a regular file of this root: a FIFO, device or socket, or a link leading out of a
    confined root. Never opened for reading (a FIFO would block the reader forever)."""


class TooLarge(StorageError):
    """The object is larger than the reader's byte limit; nothing of it was read."""


class ObjectInfo(NamedTuple):  # a tuple: listings make tens of thousands of these
    key: str
    size: int
    tag: str  # changes when the object changes: mtime for files, ETag for S3 objects
    modified: float = 0.0  # when it last changed, epoch seconds


def _link_target(name: str, dir_fd: int, err: OSError) -> str:
    """The target of link `name`; `err` again when `name` is not a link."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        raise err from None


def _by_key(o: ObjectInfo) -> str:
    return o.key


_NOT_UTF8 = "file name is not valid UTF-8: rename it"


def _utf8(key: str) -> bool:
    try:
        key.encode("utf-8")  # undecodable bytes of a name arrive as lone surrogates
        return True
    except UnicodeEncodeError:
        return False


def _note(rejected: list[tuple[str, str]] | None, key: str, reason: str) -> None:
    if rejected is not None:
        rejected.append((key, reason))


class Storage:
    """Base: the byte-level operations each backend implements, and Parquet on top of them."""

    root: str

    def uri(self, key: str = "") -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def child(self, prefix: str) -> Storage:
        raise NotImplementedError

    def at(self, uri: str) -> Storage:
        """The place `uri` names, inside this one (a run folder a record in the store names):
        derived from this storage, sharing its connection, instead of opened anew."""
        relative = self._relative(str(uri))
        if relative is None:
            raise StorageError(f"{uri!r} is not inside the store {self.root!r}")
        return self.child(relative) if relative else self

    def _relative(self, uri: str) -> str | None:
        root = self.root.rstrip("/")
        if uri.rstrip("/") == root:
            return ""
        return uri[len(root) + 1 :].strip("/") if uri.startswith(root + "/") else None

    def impatient(self) -> Storage:
        """The same place, with calls that give up within about a minute (a run lock's lease
        must outlast its renewal); local storage never waits."""
        return self

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; `TooLarge` without reading it when it has more than `max_bytes`."""
        raise NotImplementedError

    def open_file(self, key: str) -> BinaryIO:
        """The object as a seekable binary file, for readers that take a part at a time (a
        Parquet table's row groups): never its bytes in memory. Close it when done."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; True if this call created it."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def walk(
        self, prefix: str = "", rejected: list[tuple[str, str]] | None = None, hidden: bool = False
    ) -> Iterator[ObjectInfo]:
        """Objects under `prefix` (recursively), in no particular order. Entries that are not
        objects to read (see LocalStorage) are skipped, with (key, reason) added to `rejected`;
        so are hidden files (temp files of writes in progress) unless `hidden`."""
        raise NotImplementedError

    def stat(self, keys: list[str], rejected: list[tuple[str, str]] | None = None) -> dict[str, ObjectInfo]:
        """Size and tag of each of `keys` that exists; by default one listing under their common folder."""
        if not keys:
            return {}
        folders = {key.rpartition("/")[0] for key in keys}
        folder = "" if "" in folders else posixpath.commonpath(list(folders))
        wanted = set(keys)
        return {o.key: o for o in self.walk(folder, rejected) if o.key in wanted}

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
    """A local folder. Only regular files are objects: FIFOs, devices and sockets are never
    opened. `confined` (for sources users point at, not the store) also keeps every read and
    listing inside the folder: a symbolic link is followed only to a file inside it, never to a
    folder (no loops, no second copies) and never out."""

    def __init__(self, root: str | os.PathLike, confined: bool = False):
        self.path = Path(root).expanduser().resolve()
        self.root = str(self.path)
        self.confined = confined

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.path / prefix, self.confined)

    def _relative(self, uri: str) -> str | None:
        if "://" in uri:
            return None
        path = Path(uri).expanduser().resolve()
        return str(path.relative_to(self.path)).removeprefix(".") if path.is_relative_to(self.path) else None

    def _file(self, key: str) -> Path:
        return self.path / key

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def open_file(self, key: str) -> BinaryIO:
        """The file itself, open for reading (checked as read_bytes checks it)."""
        fd = self._open_fd(key)
        f = os.fdopen(fd, "rb")
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            f.close()
            raise NotRegular(f"{self.uri(key)} is not a regular file (a FIFO, device or socket): not read")
        return f

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with os.fdopen(self._open_fd(key), "rb") as f:
            return self._read_open(f, key, max_bytes)

    def _open_fd(self, key: str) -> int:
        try:
            if self.confined:
                fd = self._open_beneath(key)
            else:  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
                fd = os.open(self._file(key), os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)} does not exist") from None
        except OSError as err:
            raise StorageError(f"cannot read {self.uri(key)}: {err.strerror}") from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # fdopen would fail on it, leaving fd open
            os.close(fd)
            raise NotFound(f"{self.uri(key)} is a folder, not a file")
        return fd

    def _open_beneath(self, key: str) -> int:
        """Open `key` without ever leaving the root, race-free: each component is opened with
        O_NOFOLLOW relative to its parent's open descriptor, and links are resolved here against
        the root, so a component swapped for a link after any check cannot lead outside (what
        Linux's openat2 RESOLVE_BENEATH does; Python does not expose it)."""
        parts = [p for p in key.split("/") if p not in ("", ".")]
        fds = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)]
        links = 0
        try:
            while parts:
                name = parts.pop(0)
                if name == "..":
                    if len(fds) == 1:
                        raise NotRegular(f"{self.uri(key)} leads to outside {self.root}: not followed")
                    os.close(fds.pop())
                    continue
                flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_NONBLOCK if not parts else os.O_DIRECTORY)
                try:
                    fds.append(os.open(name, flags, dir_fd=fds[-1]))
                    continue
                except OSError as err:
                    # O_NOFOLLOW on a link fails with ELOOP (ENOTDIR with O_DIRECTORY).
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    target = _link_target(name, fds[-1], err)
                links += 1
                if links > MAX_LINKS:
                    raise StorageError(f"cannot read {self.uri(key)}: a loop of symbolic links")
                if target.startswith("/"):
                    if not self._inside(target):
                        raise NotRegular(f"{self.uri(key)} is a link to outside {self.root}: not followed")
                    for fd in fds[1:]:
                        os.close(fd)
                    del fds[1:]
                    target = target[len(self.root) :]
                parts[:0] = [p for p in target.split("/") if p not in ("", ".")]
            return fds.pop()
        finally:
            for fd in fds:
                os.close(fd)

    def _read_open(self, f, key: str, max_bytes: int | None) -> bytes:
        mode, size = (st := os.fstat(f.fileno())).st_mode, st.st_size
        if stat.S_ISDIR(mode):
            raise NotFound(f"{self.uri(key)} is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise NotRegular(f"{self.uri(key)} is not a regular file (a FIFO, device or socket): not read")
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"{self.uri(key)} has {size} bytes, over the limit of {max_bytes}")
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as err:
            raise StorageError(f"cannot read {self.uri(key)}: {err.strerror}") from None
        if max_bytes is not None and len(data) > max_bytes:  # it grew since fstat
            raise TooLarge(f"{self.uri(key)} has over {max_bytes} bytes, the limit")
        return data

    def _temp(self, key: str, data: bytes) -> Path:
        target, tmp = self._file(key), None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if tmp is not None:  # a full disk, say: no half-written temp file left behind
                Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {self.uri(key)}: {err.strerror}") from None
        return Path(tmp)

    def write_bytes(self, key: str, data: bytes) -> None:
        tmp = self._temp(key, data)
        try:
            os.replace(tmp, self._file(key))
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {self.uri(key)}: {err.strerror}") from None

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
        # Straight from the file: only the wanted columns' pages are read, not the whole file
        # (ParquetFile, not read_table: the dataset layer keeps ~90 MB more memory busy).
        try:
            with pq.ParquetFile(self._file(key)) as f:
                return f.read(columns=columns)
        except FileNotFoundError:
            raise NotFound(f"{self.uri(key)} does not exist") from None

    def walk(
        self, prefix: str = "", rejected: list[tuple[str, str]] | None = None, hidden: bool = False
    ) -> Iterator[ObjectInfo]:
        base = self._file(prefix) if prefix else self.path
        if not base.is_dir():
            return
        skip = len(self.root) + 1  # keys by slicing: os.path.relpath costs more than the scan
        stack = [str(base)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as err:
                _note(rejected, folder[skip:], f"unreadable folder: {err.strerror}")
                continue
            for entry in entries:
                if entry.name[0] == "." and not hidden:
                    continue  # temp files of interrupted writes, hidden files
                key = entry.path[skip:] if os.sep == "/" else entry.path[skip:].replace(os.sep, "/")
                kind, found = self._classify(entry)
                if kind == "folder":
                    stack.append(entry.path)
                elif kind == "file" and _utf8(key):
                    yield ObjectInfo(key, found.st_size, str(found.st_mtime_ns), found.st_mtime)
                elif kind == "file":
                    _note(rejected, os.fsencode(key).decode("utf-8", "backslashreplace"), _NOT_UTF8)
                elif kind == "rejected":
                    _note(rejected, key, found)

    def _classify(self, entry: os.DirEntry) -> tuple[str, os.stat_result | str | None]:
        """("folder" | "file", stat) to descend or yield, ("rejected", reason), or ("gone", None)."""
        try:
            if entry.is_symlink() and self.confined:
                if not self._inside(os.path.realpath(entry.path)):
                    return "rejected", "link out of the source folder: not followed"
                st = os.stat(entry.path)
                if stat.S_ISDIR(st.st_mode):
                    return "rejected", "link to a folder: not followed (link the files instead)"
            else:
                st = entry.stat()
        except FileNotFoundError:  # a dangling link, or deleted meanwhile
            if entry.is_symlink():
                return "rejected", "dangling link: its target does not exist"
            return "gone", None
        except OSError as err:  # ELOOP: a link loop
            return "rejected", f"unreadable: {err.strerror}"
        if stat.S_ISDIR(st.st_mode):
            return "folder", st
        if not stat.S_ISREG(st.st_mode):
            return "rejected", "not a regular file: a FIFO, socket or device is not opened"
        return "file", st

    def stat(self, keys: list[str], rejected: list[tuple[str, str]] | None = None) -> dict[str, ObjectInfo]:
        """One stat per key (never a walk of the folder around them); missing keys are left out."""
        out = {}
        for key in keys:
            path = str(self._file(key))
            if self.confined and not self._inside(os.path.realpath(path)):
                _note(rejected, key, "link out of the source folder: not followed")
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # missing: the decode step reports it
            if stat.S_ISREG(st.st_mode):
                out[key] = ObjectInfo(key, st.st_size, str(st.st_mtime_ns), st.st_mtime)
            elif not stat.S_ISDIR(st.st_mode):
                _note(rejected, key, "not a regular file: a FIFO, socket or device is not opened")
        return out

    def delete(self, key: str) -> None:
        try:
            self._file(key).unlink(missing_ok=True)
        except OSError as err:
            raise StorageError(f"cannot delete {self.uri(key)}: {err.strerror}") from None


class S3Storage(Storage):
    """An S3 prefix. Endpoint and credentials come from the usual AWS_* environment
    (AWS_ENDPOINT_URL_S3 for a non-AWS server such as SeaweedFS or MinIO)."""

    def __init__(self, uri: str, client=None, patient: bool = True):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # One client for a store and every folder derived from it (made on first use): a list,
        # so that a child made before the first request shares the client made after it.
        self._client, self.patient = [client] if not isinstance(client, list) else client, patient

    @property
    def client(self):
        if self._client[0] is None:
            import boto3
            from botocore.config import Config

            # A session of its own: boto3's module-level default session caches the
            # credentials it first saw, and a store must follow the environment it runs in.
            self._client[0] = boto3.session.Session().client(
                "s3",
                config=Config(
                    s3={"addressing_style": "path"},
                    # Standard mode retries refused connections and 5xx with jittered
                    # exponential backoff (capped at 20 s): 10 attempts ride out an S3 server's
                    # restart of about half a minute; a store that is really gone is caught in
                    # seconds by the preflight check of every run (flows/services.py).
                    # An impatient client (run locks) gives up within about a minute.
                    retries={"max_attempts": 10 if self.patient else 4, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60 if self.patient else 10,
                ),
            )
        return self._client[0]

    def __getstate__(self) -> dict:
        # Sent to another process (a Ray task): it makes its own client from its own environment.
        return {**self.__dict__, "_client": [None]}

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(f"{self.root}/{prefix.strip('/')}", self._client, self.patient)

    def impatient(self) -> S3Storage:
        return self if not self.patient else S3Storage(self.root, patient=False)

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

    def open_file(self, key: str) -> BinaryIO:
        """A local temporary copy (deleted when closed), written a chunk at a time."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:  # translated: botocore raises many unrelated types
            raise self._error(err, key, "read") from None
        f = tempfile.TemporaryFile(prefix="tofa-s3-")
        try:
            for chunk in response["Body"].iter_chunks(2**20):
                f.write(chunk)
        except Exception as err:
            f.close()
            if isinstance(err, OSError) and err.errno is not None:  # the local disk, not S3
                raise StorageError(f"cannot copy {self.uri(key)} to a local file: {err.strerror}") from None
            raise self._error(err, key, "read") from None
        f.seek(0)
        return f

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:  # translated: botocore raises many unrelated types
            raise self._error(err, key, "read") from None
        size = response.get("ContentLength", 0)
        if max_bytes is not None and size > max_bytes:
            response["Body"].close()
            raise TooLarge(f"{self.uri(key)} has {size} bytes, over the limit of {max_bytes}")
        try:
            return response["Body"].read()
        except Exception as err:
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

    def walk(
        self, prefix: str = "", rejected: list[tuple[str, str]] | None = None, hidden: bool = False
    ) -> Iterator[ObjectInfo]:
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
                        modified = obj["LastModified"].timestamp()
                        yield ObjectInfo(key, obj["Size"], obj["ETag"].strip('"'), modified)
        except Exception as err:
            raise self._error(err, prefix, "list") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            raise self._error(err, key, "delete") from None


def open_storage(uri: str | os.PathLike, client=None, confined: bool = False) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else is a local path (`confined`: see LocalStorage)."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Storage(text, client)
    if "://" in text:
        raise StorageError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(text, confined)
