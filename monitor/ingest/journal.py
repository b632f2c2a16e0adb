"""The input journal: what makes acknowledged input survive a crash (SIGKILL, OOM, power) and a failing disk.

An input message is acknowledged to the broker only once nothing of it can be lost: its samples are in this
journal on disk (appended as they are fed to the windowing, fsynced in batches every `sync_interval_seconds`)
and every window it completed has been decided (see `acks`). So the broker never forgets a message whose
samples a crash could take with it: messages not yet acknowledged are redelivered, the others are replayed
from here.

File layout: a sequence of records, each `<length u32><crc32 u32><kind u8><body>` (the CRC covers kind and body):
- `C` checkpoint (first record of every file): JSON with the windowing's `snapshot()` (every sensor's position
  and partial window, or in beat mode its detector) and the windows cut but not yet decided (`pending`, samples as
  base64 float32; beat windows with their span's end, R peak and RR interval), and with per-sensor baselines their
  `snapshot()` (`baselines`: fitted baselines, warm-ups, score scales);
- `M` message: `<topic length u16><topic utf-8><payload>`, the raw payload as received, re-decoded on replay;
- `D` decided: `<window start seq u64><sensor id utf-8>`, a window that needs nothing more (its alert was
  acknowledged, or it needed none): a replay does not score it again.

Records are collected in memory and written by the syncing thread with one `write` and one `fsync` per batch
(every `sync_interval_seconds`), not one system call per message.

Replay at start = restore the checkpoint, queue its pending windows, feed the messages after it again, and score
the windows they complete unless a `D` record says they were decided (at-least-once: a window decided after its
last `D` could be written is scored again; alerts carry (sensor_id, window_start_seq) to deduplicate on). A record
that fails its checksum is told apart by what follows it: with no good record after it, it is a torn tail (cut off
by a crash while written: never fsynced, so its message was never acknowledged and the broker redelivers it); with
good records after it, the file is damaged: the reader skips to the next good record (found by its checksum), so
only the damaged records are lost, and says how many bytes it skipped (`Replayed.damaged_bytes`).

A checkpoint is written to a temporary file, fsynced and renamed over the journal (then the directory fsynced):
the file is always a whole checkpoint followed by records. It is rewritten when the records after the checkpoint
exceed `max_bytes` or it is older than `checkpoint_seconds`, which bounds both the disk used (the checkpoint and
`max_bytes`) and the work (and duplicate alerts) of a replay. A checkpoint larger than `max_bytes` (many sensors'
baseline warm-ups) is therefore not rewritten again at once.

A write or fsync that fails (disk full, I/O error) stops the acknowledgements: the records waiting for it stay
unreleased, `failing` is set (logged once, `journal_write_failed`), nothing more is written to that file (it may
end in a torn record, and after a failed fsync its pages cannot be trusted), and the owner retries a checkpoint
(`checkpoint_due`) until one can be written. That checkpoint holds every sensor's state and undecided window,
so it covers all the records held back: they are released, and `journal_recovered` is logged. Meanwhile the
broker keeps the input (it is not acknowledged) and a crash replays the old file.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from monitor.telemetry.metrics import Metrics
from monitor.window import BeatMark, Window, decode_array, encode_array

log = structlog.get_logger("monitor.journal")

_HEADER = struct.Struct("<IIB")  # body length, CRC-32 of kind + body, kind
_TOPIC_LENGTH = struct.Struct("<H")
_START_SEQ = struct.Struct("<Q")
CHECKPOINT, MESSAGE, DECIDED = b"C", b"M", b"D"
_APPENDED_KINDS = (MESSAGE[0], DECIDED[0])  # what may follow the checkpoint


@dataclass
class Replayed:
    """What a journal held: the checkpoint's state, its pending windows, then the messages after it."""

    windowing: dict[str, Any] | None
    pending: list[Window]
    baselines: dict[str, Any] | None = None  # the per-sensor baselines' snapshot, when the daemon has them
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    # (sensor_id, window_start_seq) of windows decided after the checkpoint
    decided: Counter[tuple[str, int]] = field(default_factory=Counter)
    torn_bytes: int = 0  # a record cut off at the end (a crash while it was written; never acknowledged)
    damaged_bytes: int = 0  # bytes skipped between good records: acknowledged input that is lost
    damaged_spans: int = 0
    checkpoint_lost: bool = False  # the first record (the checkpoint) was among the damaged ones


def encode_windows(windows: Sequence[Window]) -> list[list[Any]]:
    """Windows as JSON-ready lists; a beat window adds its span's end, its R peak, its RR interval, its error
    scale and its timing score; a fixed window with an error scale (its sensor's score scale) adds that scale."""
    items = []
    for w in windows:
        item = [w.sensor_id, w.start_seq, w.start_ts, list(w.samples.shape), encode_array(w.samples)]
        if w.beat is not None:
            item += [w.beat.end_seq, w.beat.beat_seq, w.beat.rr_seconds, w.error_scale, w.timing_score]
        elif w.error_scale != 1.0:
            item.append(w.error_scale)
        items.append(item)
    return items


def decode_windows(items: list[list[Any]], now: float) -> list[Window]:
    windows: list[Window] = []
    for sensor_id, start_seq, start_ts, shape, samples, *beat in items:
        array = decode_array(samples).reshape(shape)
        ts = None if start_ts is None else float(start_ts)
        if len(beat) == 1:  # a fixed window's error scale
            windows.append(Window(str(sensor_id), int(start_seq), array, ts, now, float(beat[0])))
        elif beat:
            # no scale in records written before stretch scaling, no timing score before timing scores
            end_seq, beat_seq, rr_seconds, *scored = beat
            rr = None if rr_seconds is None else float(rr_seconds)
            mark = BeatMark(int(end_seq), int(beat_seq), rr)
            windows.append(
                Window(
                    str(sensor_id),
                    int(start_seq),
                    array,
                    ts,
                    now,
                    float(scored[0]) if scored else 1.0,
                    float(scored[1]) if len(scored) > 1 else 0.0,
                    mark,
                )
            )
        else:
            windows.append(Window(str(sensor_id), int(start_seq), array, ts, now))
    return windows


def _record(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(len(body), zlib.crc32(body, zlib.crc32(kind)), kind[0]) + body


def _record_at(data: bytes, offset: int) -> tuple[int, bytes, int] | None:
    """(kind, body, end offset) of a whole record with a good checksum at `offset`, else None."""
    if offset + _HEADER.size > len(data):
        return None
    length, crc, kind = _HEADER.unpack_from(data, offset)
    end = offset + _HEADER.size + length
    if end > len(data):
        return None
    body = data[offset + _HEADER.size : end]
    if zlib.crc32(body, zlib.crc32(bytes((kind,)))) != crc:
        return None
    return kind, body, end


def _next_record(data: bytes, start: int) -> int | None:
    """The offset of the first good message or decided record at or after `start` (a byte-by-byte search: a chance
    match needs the kind byte, a length that fits and the CRC-32)."""
    for offset in range(start, len(data) - _HEADER.size + 1):
        if data[offset + _HEADER.size - 1] in _APPENDED_KINDS and _record_at(data, offset) is not None:
            return offset
    return None


def read_journal(path: Path, now: float) -> Replayed:
    """Parse a journal file (see the module docstring for torn and damaged records); raises ValueError when it holds
    no readable record or does not start with a checkpoint, OSError when it cannot be read."""
    data = path.read_bytes()
    if not data:
        raise ValueError("the journal is empty")
    replayed = Replayed(None, [])
    first = _record_at(data, 0)
    offset = 0
    if first is not None:
        kind, body, offset = first
        if kind != CHECKPOINT[0]:
            raise ValueError("the journal does not start with a checkpoint")
        try:
            state = orjson.loads(body)
            replayed.windowing, replayed.pending = state["windowing"], decode_windows(state["pending"], now)
            replayed.baselines = state.get("baselines")
        except (KeyError, TypeError) as error:
            raise ValueError(f"the journal's checkpoint is not a checkpoint ({error!r})") from None
    while offset < len(data):
        record = _record_at(data, offset)
        if record is None:
            resume = _next_record(data, offset + 1)
            if resume is None and offset == 0:
                raise ValueError("the journal holds no readable record")
            if resume is None:
                replayed.torn_bytes = len(data) - offset
                break
            replayed.damaged_spans += 1
            replayed.damaged_bytes += resume - offset
            replayed.checkpoint_lost = replayed.checkpoint_lost or offset == 0
            offset = resume
            continue
        kind, body, offset = record
        if kind == MESSAGE[0]:
            (topic_length,) = _TOPIC_LENGTH.unpack_from(body)
            topic = body[_TOPIC_LENGTH.size : _TOPIC_LENGTH.size + topic_length].decode("utf-8", "surrogateescape")
            replayed.messages.append((topic, body[_TOPIC_LENGTH.size + topic_length :]))
        elif kind == DECIDED[0]:
            replayed.decided[(body[_START_SEQ.size :].decode("utf-8"), _START_SEQ.unpack_from(body)[0])] += 1
    return replayed


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of `data`: a short write is continued, and a write that takes nothing is an error (ENOSPC)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "write took no bytes")
        view = view[written:]


class Journal:
    """Append-only input journal with batched fsync; `on_durable(token)` is called once a record is on disk, or once
    a checkpoint written after it is."""

    def __init__(
        self,
        path: Path,
        on_durable: Callable[[object], None],
        sync_interval_seconds: float = 0.02,
        max_bytes: int = 16 * 2**20,
        checkpoint_seconds: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.path = path
        self.on_durable = on_durable
        self.sync_interval_seconds = sync_interval_seconds
        self.max_bytes = max_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self.metrics = metrics
        self._lock = threading.Lock()  # appends, and the swap of the file at a checkpoint
        self._sync_lock = threading.Lock()  # one fsync at a time; a checkpoint waits for the one running
        self._fd = -1
        self._written = 0  # bytes appended to the current file, the unwritten buffer included
        self._checkpoint_bytes = 0  # of which the checkpoint that starts it
        self._buffer = bytearray()  # records appended since the last write
        self._buffered_records = 0
        self._waiting: deque[tuple[int, object]] = deque()  # (end offset, token) of records not yet fsynced
        self._started_at = 0.0
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.syncs = 0
        self.failing = False  # a write or fsync failed: nothing is released until a checkpoint is written
        self._checkpoint_failing = False  # the last checkpoint failed (logged once until one succeeds)

    def start(self, checkpoint: dict[str, Any]) -> None:
        """Write a fresh file holding only `checkpoint` and start the syncing thread; raises OSError when the
        checkpoint cannot be written (the file left by the last run is kept)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite(checkpoint)
        self._syncer = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._syncer.start()

    def append(self, topic: str, payload: bytes, token: object) -> None:
        """Journal one message (the caller holds the windowing's lock, so records are in feeding order). While the
        journal is failing only the token is kept: the checkpoint that ends the failure covers the message."""
        encoded = topic.encode("utf-8", "surrogateescape")
        record = _record(MESSAGE, _TOPIC_LENGTH.pack(len(encoded)) + encoded + payload)
        with self._lock:
            if not self.failing:
                self._buffer += record
                self._buffered_records += 1
                self._written += len(record)
            self._waiting.append((self._written, token))

    def mark_decided(self, window: Window) -> None:
        """Record that `window` needs nothing more (any thread; written with the next batch, never waited for)."""
        record = _record(DECIDED, _START_SEQ.pack(window.start_seq) + window.sensor_id.encode("utf-8"))
        with self._lock:
            if self._fd >= 0 and not self.failing:
                self._buffer += record
                self._buffered_records += 1
                self._written += len(record)

    def checkpoint_due(self, now: float) -> bool:
        """Time for a checkpoint: too many records after it or too old, or the journal is failing (a retry)."""
        return (
            self.failing
            or self._written - self._checkpoint_bytes > self.max_bytes
            or now - self._started_at > self.checkpoint_seconds
        )

    def checkpoint(self, state: dict[str, Any]) -> bool:
        """Replace the file by one starting with `state` (the caller holds the windowing's lock: no appends); False
        when it could not be written (counted, logged once; the current file goes on unless it is failing)."""
        with self._sync_lock, self._lock:
            if not self.failing and self._flush(self._fd, self._take()):
                self._release(self._written)
            return self._checkpoint(state)

    def close(self, state: dict[str, Any] | None = None) -> bool:
        """Stop syncing; with `state`, leave a file holding only that checkpoint (a clean stop). False when what was
        appended is not all on disk (its acknowledgements stay held: the broker redelivers that input)."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._sync_lock, self._lock:
            if self._fd < 0:
                return True
            if not self.failing and self._flush(self._fd, self._take()):
                self._release(self._written)
            written = self._checkpoint(state) if state is not None else not self.failing
            os.close(self._fd)
            self._fd = -1
            return written

    def _checkpoint(self, state: dict[str, Any]) -> bool:
        """Write the checkpoint (locks held); on success everything appended so far is covered by it, so released."""
        try:
            self._rewrite(state)
        except OSError as error:
            self._count_error("checkpoint")
            if not self._checkpoint_failing:
                self._checkpoint_failing = True
                log.error("journal_checkpoint_failed", path=str(self.path), error=str(error), failing=self.failing)
            return False
        self._checkpoint_failing = False
        self._release(None)
        if self.failing:
            self.failing = False
            self._set_failing(False)
            log.info("journal_recovered", path=str(self.path))
        return True

    def _rewrite(self, state: dict[str, Any]) -> None:
        """Temporary file, write, fsync, rename over the journal, fsync the directory; raises OSError and leaves
        the journal and the open file as they were when any step before the rename fails."""
        temp = self.path.with_name(f".{self.path.name}.tmp")
        record = _record(CHECKPOINT, orjson.dumps(state))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, record)
            os.fsync(fd)
            os.replace(temp, self.path)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(temp)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._written, self._started_at = fd, len(record), time.monotonic()
        self._checkpoint_bytes = len(record)
        self._count_written(len(record), 0)
        if self.metrics is not None:
            self.metrics.journal_checkpoints.inc()
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval_seconds):
            with self._sync_lock:  # a checkpoint cannot swap the file between taking the records and writing them
                with self._lock:
                    if self.failing or (not self._waiting and not self._buffer):
                        continue
                    fd, end, records = self._fd, self._written, self._take()
                written = self._flush(fd, records)
                self.syncs += 1
                if written:
                    with self._lock:
                        self._release(end)

    def _take(self) -> tuple[bytearray, int]:
        """The records appended since the last write, and how many (called with `_lock` held)."""
        records, count = self._buffer, self._buffered_records
        self._buffer, self._buffered_records = bytearray(), 0
        return records, count

    def _flush(self, fd: int, records: tuple[bytearray, int]) -> bool:
        """Write `records` and fsync; on failure set `failing` (logged once) and return False: the records are not
        released, and nothing more is written to this file."""
        data, count = records
        operation = "write"
        try:
            _write_all(fd, data)
            operation = "fsync"
            os.fsync(fd)
        except OSError as error:
            self._count_error(operation)
            if not self.failing:
                self.failing = True
                self._set_failing(True)
                log.error(
                    "journal_write_failed",
                    path=str(self.path),
                    operation=operation,
                    error=str(error),
                    until="a checkpoint can be written; input is not acknowledged meanwhile",
                )
            return False
        self._count_written(len(data), count)
        return True

    def _count_written(self, size: int, records: int) -> None:
        if self.metrics is not None:
            self.metrics.journal_bytes.inc(size)
            self.metrics.journal_records.inc(records)

    def _count_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.journal_errors.labels(operation).inc()

    def _set_failing(self, failing: bool) -> None:
        if self.metrics is not None:
            self.metrics.journal_failing.set(int(failing))

    def _release(self, end: int | None) -> None:
        """Tell the owners of records up to `end` (None: all) that they are on disk (called with `_lock` held)."""
        waiting = self._waiting
        while waiting and (end is None or waiting[0][0] <= end):
            self.on_durable(waiting.popleft()[1])

    def load(self, now: float) -> Replayed | None:
        """The file left by the last run, or None; raises ValueError for one that is not a journal, OSError for one
        that cannot be read."""
        return read_journal(self.path, now) if self.path.exists() else None

    def set_aside(self) -> Path:
        """Rename the current file out of the way (a damaged journal is kept as evidence, never overwritten);
        returns its new path, raises OSError."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.rename(self.path, aside)
        return aside
