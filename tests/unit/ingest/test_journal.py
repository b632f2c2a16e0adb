"""The input journal (real files, fsync) and the in-order acknowledgement bookkeeping."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from structlog.testing import capture_logs

from monitor.ingest.acks import InOrderAcks, PendingWindows
from monitor.ingest.journal import Journal, encode_windows, read_journal
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
    assert replayed.windowing == {"sensors": ["state"]} and not replayed.truncated
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
    assert replayed.truncated and [payload for _, payload in replayed.messages] == [b"payload 0", b"payload 1"]
    (tmp_path / "j").write_bytes(data[:5])
    with pytest.raises(ValueError, match="checkpoint"):
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


def test_a_failing_disk_never_holds_acknowledgements_back(tmp_path):
    """A write that fails (here: the descriptor is gone, as after an I/O error) is logged once and the records
    released with their batch, so the broker's input is not held back forever; a checkpoint brings the journal
    back."""
    durable: list[str] = []
    journal = Journal(tmp_path / "j", durable.append, sync_interval_seconds=0.01)
    journal.start({"windowing": None, "pending": []})
    os.close(journal._fd)
    with capture_logs() as logs:
        journal.append("sensors/a/ecg", b"{}", "first")
        journal.append("sensors/a/ecg", b"{}", "second")
        wait_until(lambda: len(durable) == 2, 10, what="the failed batch released")
        journal.append("sensors/a/ecg", b"{}", "third")
        wait_until(lambda: len(durable) == 3, 10, what="the next failed batch released")
    assert durable == ["first", "second", "third"] and journal.failing
    assert [entry["event"] for entry in logs] == ["journal_write_failed"]
    journal._fd = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # what the failed file leaves to close
    journal.checkpoint({"windowing": {"v": 1}, "pending": []})
    assert not journal.failing and read_journal(tmp_path / "j", now=0.0).windowing == {"v": 1}
    journal.close()
