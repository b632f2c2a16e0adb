"""The input journal: what makes acknowledged input survive a crash (SIGKILL, OOM, power).

An input message is acknowledged to the broker only once nothing of it can be lost: its samples are in this
journal on disk (appended as they are fed to the windowing, fsynced in batches every `sync_interval_seconds`)
and every window it completed has been decided (see `acks`). So the broker never forgets a message whose
samples a crash could take with it: messages not yet acknowledged are redelivered, the others are replayed
from here.

File layout: a sequence of records, each `<length u32><crc32 u32><kind u8><body>`:
- `C` checkpoint (first record of every file): JSON with the windowing's `snapshot()` (every sensor's position
  and partial window, or in beat mode its detector) and the windows cut but not yet decided (`pending`, samples as
  base64 float32; beat windows with their span's end, R peak and RR interval);
- `M` message: `<topic length u16><topic utf-8><payload>`, the raw payload as received, re-decoded on replay;
- `D` decided: `<window start seq u64><sensor id utf-8>`, a window that needs nothing more (its alert was
  acknowledged, or it needed none): a replay does not score it again.

Records are collected in memory and written by the syncing thread with one `write` and one `fsync` per batch
(every `sync_interval_seconds`), not one system call per message.

Replay at start = restore the checkpoint, queue its pending windows, feed the messages after it again, and score
the windows they complete unless a `D` record says they were decided (at-least-once: a window decided after its
last `D` could be written is scored again; alerts carry (sensor_id, window_start_seq) to deduplicate on). A record
cut off by the crash (short, or a bad CRC) ends the replay; it was never fsynced, so its message was never
acknowledged and the broker redelivers it.

The file is rewritten (a new checkpoint, then new messages) when it exceeds `max_bytes` or is older than
`checkpoint_seconds`, which bounds both the disk used and the work (and duplicate alerts) of a replay.

A write or fsync that fails (disk full, I/O error) is logged once (`journal_write_failed`) and the records are
released as if on disk: the daemon goes on scoring and acknowledging, without the crash guarantee, until a
checkpoint succeeds again, rather than holding every acknowledgement (and with them the broker's input) back.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from monitor.window import BeatMark, Window, decode_array, encode_array

log = structlog.get_logger("monitor.journal")

_HEADER = struct.Struct("<IIB")  # body length, CRC-32 of kind + body, kind
_TOPIC_LENGTH = struct.Struct("<H")
_START_SEQ = struct.Struct("<Q")
CHECKPOINT, MESSAGE, DECIDED = b"C", b"M", b"D"


@dataclass
class Replayed:
    """What a journal held: the checkpoint's state, its pending windows, then the messages after it."""

    windowing: dict[str, Any] | None
    pending: list[Window]
    messages: list[tuple[str, bytes]]
    decided: Counter[tuple[str, int]]  # (sensor_id, window_start_seq) of windows decided after the checkpoint
    truncated: bool  # the last record was cut off (a crash while it was written)


def encode_windows(windows: Sequence[Window]) -> list[list[Any]]:
    """Windows as JSON-ready lists; a beat window adds its span's end, its R peak, its RR interval and its error
    scale."""
    items = []
    for w in windows:
        item = [w.sensor_id, w.start_seq, w.start_ts, list(w.samples.shape), encode_array(w.samples)]
        if w.beat is not None:
            item += [w.beat.end_seq, w.beat.beat_seq, w.beat.rr_seconds, w.error_scale]
        items.append(item)
    return items


def decode_windows(items: list[list[Any]], now: float) -> list[Window]:
    windows: list[Window] = []
    for sensor_id, start_seq, start_ts, shape, samples, *beat in items:
        array = decode_array(samples).reshape(shape)
        ts = None if start_ts is None else float(start_ts)
        if beat:
            end_seq, beat_seq, rr_seconds, *scale = beat  # no scale in records written before stretch scaling
            rr = None if rr_seconds is None else float(rr_seconds)
            mark = BeatMark(int(end_seq), int(beat_seq), rr)
            windows.append(
                Window(str(sensor_id), int(start_seq), array, ts, now, float(scale[0]) if scale else 1.0, mark)
            )
        else:
            windows.append(Window(str(sensor_id), int(start_seq), array, ts, now))
    return windows


def _record(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(len(body), zlib.crc32(kind + body), kind[0]) + body


def read_journal(path: Path, now: float) -> Replayed:
    """Parse a journal file; raises ValueError when its first record is not a readable checkpoint."""
    data = path.read_bytes()
    windowing, pending, messages, decided, offset = None, [], [], Counter[tuple[str, int]](), 0
    while offset + _HEADER.size <= len(data):
        length, crc, kind = _HEADER.unpack_from(data, offset)
        body = data[offset + _HEADER.size : offset + _HEADER.size + length]
        if len(body) < length or zlib.crc32(bytes([kind]) + body) != crc:
            break
        offset += _HEADER.size + length
        if offset == _HEADER.size + length:  # the first record
            if kind != CHECKPOINT[0]:
                raise ValueError("the journal does not start with a checkpoint")
            state = orjson.loads(body)
            windowing, pending = state["windowing"], decode_windows(state["pending"], now)
        elif kind == MESSAGE[0]:
            (topic_length,) = _TOPIC_LENGTH.unpack_from(body)
            topic = body[_TOPIC_LENGTH.size : _TOPIC_LENGTH.size + topic_length].decode("utf-8")
            messages.append((topic, body[_TOPIC_LENGTH.size + topic_length :]))
        elif kind == DECIDED[0]:
            decided[(body[_START_SEQ.size :].decode("utf-8"), _START_SEQ.unpack_from(body)[0])] += 1
    if offset == 0 and data:
        raise ValueError("the journal's checkpoint is cut off or corrupt")
    return Replayed(windowing, pending, messages, decided, truncated=offset != len(data))


class Journal:
    """Append-only input journal with batched fsync; `on_durable(token)` is called once a record is on disk."""

    def __init__(
        self,
        path: Path,
        on_durable: Callable[[object], None],
        sync_interval_seconds: float = 0.02,
        max_bytes: int = 16 * 2**20,
        checkpoint_seconds: float = 30.0,
    ) -> None:
        self.path = path
        self.on_durable = on_durable
        self.sync_interval_seconds = sync_interval_seconds
        self.max_bytes = max_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self._lock = threading.Lock()  # appends, and the swap of the file at a checkpoint
        self._sync_lock = threading.Lock()  # one fsync at a time; a checkpoint waits for the one running
        self._fd = -1
        self._written = 0  # bytes appended to the current file, the unwritten buffer included
        self._buffer = bytearray()  # records appended since the last write
        self._waiting: deque[tuple[int, object]] = deque()  # (end offset, token) of records not yet fsynced
        self._started_at = 0.0
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.syncs = 0
        self.failing = False  # a write or fsync failed since the last checkpoint (logged once)

    def start(self, checkpoint: dict[str, Any]) -> None:
        """Write a fresh file holding only `checkpoint` and start the syncing thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite(checkpoint)
        self._syncer = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._syncer.start()

    def append(self, topic: str, payload: bytes, token: object) -> None:
        """Journal one message (the caller holds the windowing's lock, so records are in feeding order)."""
        encoded = topic.encode("utf-8")
        record = _record(MESSAGE, _TOPIC_LENGTH.pack(len(encoded)) + encoded + payload)
        with self._lock:
            self._buffer += record
            self._written += len(record)
            self._waiting.append((self._written, token))

    def mark_decided(self, window: Window) -> None:
        """Record that `window` needs nothing more (any thread; written with the next batch, never waited for)."""
        record = _record(DECIDED, _START_SEQ.pack(window.start_seq) + window.sensor_id.encode("utf-8"))
        with self._lock:
            if self._fd >= 0:
                self._buffer += record
                self._written += len(record)

    def checkpoint_due(self, now: float) -> bool:
        return self._written > self.max_bytes or now - self._started_at > self.checkpoint_seconds

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Replace the file by one starting with `state` (the caller holds the windowing's lock: no appends)."""
        with self._sync_lock, self._lock:
            self._flush(self._fd, self._take())
            self._release(self._written)
            self._rewrite(state)

    def close(self, state: dict[str, Any] | None = None) -> None:
        """Stop syncing; with `state`, leave a file holding only that checkpoint (a clean stop)."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._sync_lock, self._lock:
            if self._fd < 0:
                return
            self._flush(self._fd, self._take())
            self._release(self._written)
            if state is not None:
                self._rewrite(state)
            os.close(self._fd)
            self._fd = -1

    def _rewrite(self, state: dict[str, Any]) -> None:
        temp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        record = _record(CHECKPOINT, orjson.dumps(state))
        os.write(fd, record)
        os.fsync(fd)
        os.replace(temp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._written, self._started_at = fd, len(record), time.monotonic()
        self.failing = False

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval_seconds):
            with self._sync_lock:  # a checkpoint cannot swap the file between taking the records and writing them
                with self._lock:
                    if not self._waiting and not self._buffer:
                        continue
                    fd, end, records = self._fd, self._written, self._take()
                self._flush(fd, records)
                self.syncs += 1
                with self._lock:
                    self._release(end)

    def _take(self) -> bytearray:
        """The records appended since the last write (called with `_lock` held)."""
        records, self._buffer = self._buffer, bytearray()
        return records

    def _flush(self, fd: int, records: bytearray) -> None:
        """Write `records` and fsync; a failure is logged once and the records are released all the same."""
        try:
            view = memoryview(records)
            while view:  # a regular file takes it whole, short of a full disk
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as error:
            self._failed(error)

    def _failed(self, error: OSError) -> None:
        if not self.failing:
            self.failing = True
            log.error(
                "journal_write_failed", path=str(self.path), error=str(error), until="the next checkpoint succeeds"
            )

    def _release(self, end: int) -> None:
        """Tell the owners of records up to `end` that they are on disk (called with `_lock` held)."""
        waiting = self._waiting
        while waiting and waiting[0][0] <= end:
            self.on_durable(waiting.popleft()[1])

    def load(self, now: float) -> Replayed | None:
        """The file left by the last run, or None; raises ValueError for one that is not a journal."""
        return read_journal(self.path, now) if self.path.exists() else None
