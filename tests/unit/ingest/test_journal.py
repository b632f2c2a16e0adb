"""The input journal (real files, fsync) and the in-order acknowledgement bookkeeping."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from monitor.ingest.acks import InOrderAcks, PendingWindows
from monitor.ingest.journal import Journal, encode_windows, read_journal
from monitor.telemetry.metrics import Metrics
from monitor.window import Window
from tests.support import wait_until


def window(sensor_id: str, start: int) -> Window:
    samples = np.random.default_rng(start).normal(size=(140, 1)).astype(np.float32)
    return Window(sensor_id, start, samples, 1.7e9 + start / 250, 0.0)


def test_records_are_durable_in_order_and_read_back(tmp_path):
    durable: list[int] = []
    done = threading.Event()

    def on_durable(token: object) -> None:
        durable.append(token)
        if len(durable) == 50:
            done.set()

    journal = Journal(tmp_path / "j", on_durable, sync_interval_seconds=0.01)
    pending = [window("a", 0), window("b", 140)]
    journal.start({"windowing": {"sensors": ["state"]}, "pending": encode_windows(pending)})
    for index in range(50):
        journal.append(f"sensors/s{index % 3}/ecg", b'{"samples": [%d]}' % index, index)
    assert done.wait(5)
    assert durable == list(range(50)) and journal.syncs >= 1
    replayed = read_journal(tmp_path / "j", now=7.0)
    assert replayed.windowing == {"sensors": ["state"]} and (replayed.torn_bytes, replayed.damaged_spans) == (0, 0)
    assert [(w.sensor_id, w.start_seq, w.start_ts, w.completed_at) for w in replayed.pending] == [
        ("a", 0, pending[0].start_ts, 7.0),
        ("b", 140, pending[1].start_ts, 7.0),
    ]
    for got, want in zip(replayed.pending, pending, strict=True):
        np.testing.assert_array_equal(got.samples, want.samples)
    assert replayed.messages == [(f"sensors/s{index % 3}/ecg", b'{"samples": [%d]}' % index) for index in range(50)]
    journal.close()


def test_a_record_cut_off_by_a_crash_ends_the_replay(tmp_path):
    journal = Journal(tmp_path / "j", lambda token: None, sync_interval_seconds=10)
    journal.start({"windowing": None, "pending": []})
    for index in range(3):
        journal.append("t/x/y", b"payload %d" % index, index)
    journal.close()
    data = (tmp_path / "j").read_bytes()
    (tmp_path / "j").write_bytes(data[:-3])
    replayed = read_journal(tmp_path / "j", now=0.0)
    assert replayed.torn_bytes > 0 and replayed.damaged_spans == 0
    assert [payload for _, payload in replayed.messages] == [b"payload 0", b"payload 1"]
    (tmp_path / "j").write_bytes(data[:5])
    with pytest.raises(ValueError, match="no readable record"):
        read_journal(tmp_path / "j", now=0.0)


def test_checkpoint_releases_every_record_and_starts_a_new_file(tmp_path):
    durable: list[int] = []
    journal = Journal(tmp_path / "j", durable.append, sync_interval_seconds=60, max_bytes=100)
    journal.start({"windowing": None, "pending": []})
    journal.append("t/x/y", b"x" * 200, "first")
    assert journal.checkpoint_due(now=0.0)  # past max_bytes
    journal.checkpoint({"windowing": {"v": 2}, "pending": []})  # before any periodic fsync
    assert durable == ["first"]
    replayed = read_journal(tmp_path / "j", now=0.0)
    assert (replayed.windowing, replayed.messages) == ({"v": 2}, [])
    journal.close({"windowing": {"v": 3}, "pending": []})
    assert read_journal(tmp_path / "j", now=0.0).windowing == {"v": 3}


def test_a_checkpoint_larger_than_max_bytes_is_not_due_again_until_records_follow_it(tmp_path):
    """Many sensors' baseline warm-ups make a checkpoint larger than `max_bytes`: only what is appended after it
    counts, or every housekeeping tick would rewrite it."""
    journal = Journal(tmp_path / "j", lambda token: None, sync_interval_seconds=60, max_bytes=100)
    journal.start({"windowing": None, "pending": [], "baselines": {"warming": "x" * 500}})
    assert not journal.checkpoint_due(now=time.monotonic())
    journal.append("t/x/y", b"x" * 200, "first")
    assert journal.checkpoint_due(now=time.monotonic())
    journal.close()


def test_acknowledgements_leave_in_arrival_order_once_nothing_holds_them():
    acks = InOrderAcks()
    pending = PendingWindows(acks)
    first, second, third = (acks.received(mid, 1) for mid in (11, 12, 13))
    completed = window("a", 0)
    pending.add(completed, first)  # the first message completed a window
    for receipt in (first, second, third):
        acks.release(receipt)  # handled
    assert acks.ready() == []  # the first waits for its window, and the others wait for the first
    pending.alert_sent(completed, mid=500)
    assert acks.ready() == []
    pending.alert_acknowledged(500)
    assert [receipt.mid for receipt in acks.ready()] == [11, 12, 13]
    assert (acks.unacknowledged(), len(pending)) == (0, 0)


def test_qos_0_input_keeps_its_place_but_is_not_counted_as_unacknowledged():
    """Receive Maximum bounds QoS 1/2 messages awaiting a PUBACK; a QoS 0 message needs none."""
    acks = InOrderAcks()
    receipts = [acks.received(mid, qos) for mid, qos in ((1, 1), (0, 0), (2, 1))]
    assert acks.unacknowledged() == 2
    for receipt in receipts[1:]:
        acks.release(receipt)
    assert (acks.ready(), acks.unacknowledged()) == ([], 2)  # all wait for the first, still held
    acks.release(receipts[0])
    assert ([(r.mid, r.qos) for r in acks.ready()], acks.unacknowledged()) == ([(1, 1), (0, 0), (2, 1)], 0)


def test_what_the_broker_has_in_flight_is_counted_from_first_sends_on_the_connection():
    """The lower bound the daemon holds against Receive Maximum: QoS 1/2 first sent on this connection, unacknowledged
    (what an earlier connection left, and its redeliveries, may already be acknowledged at the broker)."""
    acks = InOrderAcks()
    carried = acks.received(1, 1)
    acks.new_connection()
    redelivered, fresh, best_effort = acks.received(1, 1, redelivered=True), acks.received(2, 1), acks.received(0, 0)
    assert (acks.first_sent_unacknowledged(), acks.unacknowledged()) == (1, 3)
    for receipt in (carried, redelivered, fresh, best_effort):
        acks.release(receipt)
    assert [r.mid for r in acks.ready()] == [1, 1, 2, 0]
    assert (acks.first_sent_unacknowledged(), acks.unacknowledged()) == (0, 0)


def test_an_alert_acknowledged_before_it_was_recorded_still_decides_its_window():
    acks = InOrderAcks()
    pending = PendingWindows(acks)
    receipt = acks.received(1, 1)
    completed = window("a", 0)
    pending.add(completed, receipt)
    acks.release(receipt)
    pending.alert_acknowledged(77)  # paho's thread was faster than the publisher
    pending.alert_sent(completed, 77)
    assert [r.mid for r in acks.ready()] == [1]


def test_decided_windows_are_recorded_for_the_replay(tmp_path):
    journal = Journal(tmp_path / "j", lambda token: None, sync_interval_seconds=60)
    journal.start({"windowing": None, "pending": []})
    journal.append("sensors/a/ecg", b"{}", "m")
    for start in (0, 140, 0):  # the same window twice: a sensor that restarted its stream
        journal.mark_decided(window("a", start))
    journal.close()
    replayed = read_journal(tmp_path / "j", now=0.0)
    assert replayed.decided == {("a", 0): 2, ("a", 140): 1} and len(replayed.messages) == 1


def test_a_failing_disk_holds_acknowledgements_until_a_checkpoint_is_written(tmp_path):
    """A write that fails (here: the descriptor is gone, as after an I/O error) releases nothing: the tokens wait,
    later appends wait too, and only a checkpoint written afterwards (which covers them all) releases them."""
    durable: list[str] = []
    registry = CollectorRegistry()
    metrics = Metrics(registry, 8, 1.0)
    journal = Journal(tmp_path / "j", durable.append, sync_interval_seconds=0.01, metrics=metrics)
    journal.start({"windowing": None, "pending": []})
    os.close(journal._fd)
    with capture_logs() as logs:
        journal.append("sensors/a/ecg", b"{}", "first")
        wait_until(lambda: journal.failing, 10, what="the failed write")
        journal.append("sensors/a/ecg", b"{}", "second")
        time.sleep(0.1)  # several sync intervals: nothing is retried into the failed file, nothing released
        assert durable == [] and journal.checkpoint_due(now=0.0)
        journal._fd = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # what the failed file leaves to close
        assert journal.checkpoint({"windowing": {"v": 1}, "pending": []})
    assert durable == ["first", "second"] and not journal.failing
    assert [entry["event"] for entry in logs] == ["journal_write_failed", "journal_recovered"]
    assert registry.get_sample_value("monitor_journal_errors_total", {"operation": "write"}) == 1
    assert registry.get_sample_value("monitor_journal_failing") == 0
    assert read_journal(tmp_path / "j", now=0.0).windowing == {"v": 1}
    journal.close()


def test_a_checkpoint_that_cannot_be_written_keeps_the_journal_and_leaks_no_descriptor(tmp_path):
    """The temporary file cannot be renamed over the journal (here: the journal's name is a non-empty directory's,
    the stand-in for any failure after the temporary file was opened): the old file goes on, nothing leaks."""
    durable: list[str] = []
    journal = Journal(tmp_path / "j", durable.append, sync_interval_seconds=60)
    journal.start({"windowing": {"v": 1}, "pending": []})
    journal.append("sensors/a/ecg", b"{}", "first")
    os.rename(tmp_path / "j", tmp_path / "moved")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x").write_bytes(b"")
    descriptors = len(os.listdir("/proc/self/fd"))
    with capture_logs() as logs:
        for _ in range(20):
            assert not journal.checkpoint({"windowing": {"v": 2}, "pending": []})
    assert len(os.listdir("/proc/self/fd")) == descriptors and not (tmp_path / ".j.tmp").exists()
    assert durable == ["first"]  # its record was written and fsynced before the checkpoint was tried
    assert [entry["event"] for entry in logs] == ["journal_checkpoint_failed"]  # once, not per retry
    journal.append("sensors/a/ecg", b"{}", "second")
    assert not journal.close({"windowing": {"v": 3}, "pending": []})  # the stop's checkpoint fails too
    assert durable == ["first", "second"]  # appended to the old file, which stays
    assert [payload for _, payload in read_journal(tmp_path / "moved", now=0.0).messages] == [b"{}", b"{}"]


def journal_with_messages(path, count: int) -> bytes:
    journal = Journal(path, lambda token: None, sync_interval_seconds=60)
    journal.start({"windowing": {"v": 1}, "pending": []})
    for index in range(count):
        journal.append(f"sensors/s{index}/ecg", b"payload %03d" % index, index)
    journal.close()
    return path.read_bytes()


def test_damage_in_the_middle_is_told_apart_from_a_torn_tail_and_skips_only_the_damaged_records(tmp_path):
    path = tmp_path / "j"
    data = journal_with_messages(path, 10)
    starts = [data.index(b"sensors/s%d/" % index) - 11 for index in range(10)]  # header (9) + topic length (2)
    record = starts[1] - starts[0]  # every message record has the same size
    damaged = bytearray(data)
    damaged[starts[3] + 4 : starts[3] + 4 + 64] = np.random.default_rng(0).bytes(64)
    path.write_bytes(bytes(damaged))
    replayed = read_journal(path, now=0.0)
    payloads = [payload for _, payload in replayed.messages]
    lost = {b"payload %03d" % index for index in range(10)} - set(payloads)
    assert replayed.windowing == {"v": 1} and replayed.damaged_spans == 1 and replayed.torn_bytes == 0
    assert lost == {b"payload 003", b"payload 004"}  # the 64 bytes reach into the second
    assert replayed.damaged_bytes == record * len(lost)
    path.write_bytes(data[:-5])  # cut off by a crash: a torn tail, not damage
    replayed = read_journal(path, now=0.0)
    assert (replayed.damaged_spans, replayed.torn_bytes, len(replayed.messages)) == (0, record - 5, 9)


def test_a_damaged_checkpoint_still_replays_the_messages_after_it(tmp_path):
    path = tmp_path / "j"
    data = bytearray(journal_with_messages(path, 4))
    data[12] ^= 0xFF  # a flipped bit in the checkpoint's body
    path.write_bytes(bytes(data))
    replayed = read_journal(path, now=0.0)
    assert replayed.checkpoint_lost and replayed.windowing is None and len(replayed.messages) == 4
    for content, reason in ((b"", "empty"), (b"\x00" * 100, "no readable record")):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=reason):
            read_journal(path, now=0.0)
