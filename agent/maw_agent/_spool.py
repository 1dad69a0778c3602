"""The result spool: every Result stays on disk until its ResultAck arrives.

One append-only file of records `kind (1 byte) | length (4) | crc32 (4) | payload`: kind R holds a
serialized Result, kind A the serialized Lease of an acknowledged or discarded one. Appends are
buffered; `sync()` makes everything appended so far durable with one fsync, and the sender calls it
once per batch before results go on the wire (group commit). An ack needs no fsync: losing one only
sends a Result again, which the scheduler acknowledges as a duplicate. A torn tail (crash mid-write)
is ignored on load. When the file has grown and few results are pending, it is rewritten with just
those (write, fsync, rename).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from maw.agent.v1 import agent_service_pb2 as agent_pb2

__all__ = ["LeaseKey", "ResultSpool", "lease_key"]

LeaseKey = tuple[str, int]

_HEADER = struct.Struct(">cII")
_RESULT = b"R"
_ACK = b"A"
_COMPACT_AFTER_BYTES = 16 << 20

log = logging.getLogger(__name__)


def lease_key(lease: agent_pb2.Lease) -> LeaseKey:
    """The dictionary key of a lease."""
    return (lease.subtask, lease.attempt)


class ResultSpool:
    """Results awaiting their ResultAck, kept in memory and in an append-only file."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self._path = path
        self._fsync = fsync
        self._pending: dict[LeaseKey, agent_pb2.Result] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self._file: BinaryIO = path.open("ab")
        self._written = path.stat().st_size
        self._dirty = False

    @property
    def pending(self) -> dict[LeaseKey, agent_pb2.Result]:
        """Results without an ack yet, in the order they were added."""
        return self._pending

    def add(self, result: agent_pb2.Result) -> None:
        """Keep a Result until it is acknowledged (durable after the next `sync`)."""
        self._pending[lease_key(result.lease)] = result
        self._append(_RESULT, result.SerializeToString())
        self._dirty = True

    def forget(self, lease: agent_pb2.Lease) -> bool:
        """Drop a Result (acknowledged, or released by the scheduler). False when it was not pending."""
        if self._pending.pop(lease_key(lease), None) is None:
            return False
        self._append(_ACK, lease.SerializeToString())
        return True

    def flush(self) -> int | None:
        """Hand buffered appends to the OS; the file descriptor to fsync, or None when nothing needs it."""
        self._file.flush()
        if not self._dirty or not self._fsync:
            self._dirty = False
            return None
        self._dirty = False
        return self._file.fileno()

    def sync(self) -> None:
        """Make every Result added so far durable (blocking; see `flush` for the split form)."""
        fd = self.flush()
        if fd is not None:
            os.fsync(fd)

    def maybe_compact(self) -> None:
        """Rewrite the file with only the pending results once it has grown large."""
        if self._written < _COMPACT_AFTER_BYTES or len(self._pending) > 10_000:
            return
        tmp = self._path.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for result in self._pending.values():
                out.write(encode_record(_RESULT, result.SerializeToString()))
            out.flush()
            os.fsync(out.fileno())
        self._file.close()
        os.replace(tmp, self._path)
        _fsync_dir(self._path.parent)
        self._file = self._path.open("ab")
        self._written = self._path.stat().st_size

    def close(self) -> None:
        """Flush and close the file."""
        if not self._file.closed:
            self.sync()
            self._file.close()

    def _append(self, kind: bytes, payload: bytes) -> None:
        record = encode_record(kind, payload)
        self._file.write(record)
        self._written += len(record)

    def _load(self) -> None:
        if not self._path.exists():
            return
        data = self._path.read_bytes()
        offset = 0
        while offset + _HEADER.size <= len(data):
            kind, length, crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            payload = data[start : start + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("result spool %s: ignoring a torn record at byte %d", self._path, offset)
                break
            offset = start + length
            if kind == _RESULT:
                result = agent_pb2.Result.FromString(payload)
                self._pending[lease_key(result.lease)] = result
            elif kind == _ACK:
                self._pending.pop(lease_key(agent_pb2.Lease.FromString(payload)), None)
        if offset < len(data):
            # Cut the torn tail so later appends are readable.
            with self._path.open("r+b") as handle:
                handle.truncate(offset)


def encode_record(kind: bytes, payload: bytes) -> bytes:
    """One spool record: kind, length and CRC-32 header, then the payload."""
    return _HEADER.pack(kind, len(payload), zlib.crc32(payload)) + payload


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
