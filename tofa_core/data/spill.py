"""Decoded pixels parked on local disk between the decode and write stages of an ingest.

Validation needs only each image's hash, shape and label, and the version id (hence the
shard paths) is known only after it, so the pixels wait here: the ingest process holds a
few hundred bytes of metadata per image, never the data set's pixels. The file is an
anonymous temporary file (unlinked at once on Linux), so a killed ingest leaves nothing
behind; it lives in TMPDIR, which needs room for the new images' raw pixels.
"""

from __future__ import annotations

import os
import tempfile
import threading


class Spill:
    """An append-only file of byte strings, read back by (offset, length)."""

    def __init__(self, directory: str | None = None):
        self._file = tempfile.TemporaryFile(dir=directory, prefix="tofa-ingest-")
        self._end = 0
        self._lock = threading.Lock()  # Prefect may run the write task in another thread

    def append(self, data: bytes) -> int:
        """Store `data`; returns its offset."""
        with self._lock:
            offset = self._end
            self._file.seek(offset)
            self._file.write(data)
            self._end += len(data)
        return offset

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._file.flush()
        parts, got = [], 0
        while got < length:  # one pread returns at most ~2 GiB
            part = os.pread(self._file.fileno(), length - got, offset + got)
            if not part:
                raise OSError(f"spill file truncated: wanted {length} bytes at {offset}, got {got}")
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def size(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
