"""The input journal on a disk that fills up, and a journal damaged on disk, against real processes.

The disk is a small tmpfs mounted by the test (4 MiB; skipped, with the reason, where mounting is not allowed), filled
by a file the test writes until the kernel refuses; Mosquitto, the daemon as a child process and paho sensors as in
test_hardening.py. The model has threshold 0, so the alerts received are the windows scored.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.e2e.test_faults import figure, make_model
from tests.support import (
    WINDOW,
    Broker,
    DaemonProcess,
    NotifySocket,
    Sensors,
    crash_rig,
    lost_windows,
    metric,
    restart_config,
    run_cli,
    signal_samples,
    wait_until,
)

pytestmark = pytest.mark.slow

DISK_BYTES = 4 * 2**20
CHUNK = 35  # samples a message: four messages a window
START_SECONDS = 180  # a daemon start (torch, the model, a replay) on the shared, loaded machine


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (root, or CAP_SYS_ADMIN, is needed to mount it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` with a file until the kernel refuses a byte more, then give `leave` bytes back."""
    filler = disk / f"filler-{time.monotonic_ns()}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (2**16, 2**12, 1):
            with suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def free(disk: Path) -> None:
    for filler in disk.glob("filler-*"):
        filler.unlink()


class PacedSensors(threading.Thread):
    """`count` sensors sending 35-sample messages every `round_seconds`, until `stop()`, which ends on a window
    boundary: every sample sent belongs to a complete window."""

    def __init__(self, sensors: Sensors, count: int, round_seconds: float = 0.02) -> None:
        super().__init__(name="paced-sensors", daemon=True)
        self.sensors = sensors
        self.ids = [f"d{index:02d}" for index in range(count)]
        self.round_seconds = round_seconds
        self.data = signal_samples(WINDOW * 4000)
        self.sent = 0  # samples each sensor has sent
        self.halt = threading.Event()
        self.running = threading.Event()
        self.running.set()

    def run(self) -> None:
        while not (self.halt.is_set() and self.sent % WINDOW == 0):
            self.running.wait()
            for sensor_id in self.ids:
                self.sensors.send(sensor_id, self.sent, self.data[self.sent : self.sent + CHUNK])
            self.sent += CHUNK
            time.sleep(self.round_seconds)

    def stream_for(self, seconds: float) -> None:
        self.running.set()
        time.sleep(seconds)

    def __enter__(self) -> PacedSensors:
        return self

    def __exit__(self, *exc: object) -> None:
        """Never leaves the thread waiting (the test's teardown)."""
        self.halt.set()
        self.running.set()

    def stop(self) -> set[tuple[str, int]]:
        """Finish the last window; returns every (sensor_id, window_start_seq) sent."""
        self.running.set()
        self.halt.set()
        self.join(30)
        return {(sensor_id, start) for sensor_id in self.ids for start in range(0, self.sent, WINDOW)}


def descriptors(daemon: DaemonProcess) -> int:
    return psutil.Process(daemon.process.pid).num_fds()


def no_traceback(daemon: DaemonProcess) -> bool:
    return not any("Traceback" in line for line in daemon.lines)


def test_a_full_disk_holds_acknowledgements_and_loses_nothing_through_kill_9(tmp_path, small_disk):
    """The journal on a 4 MiB disk that fills up (a few KiB left, so that records and checkpoints are written in part):
    writes fail, nothing more is acknowledged (the broker holds the input), failed checkpoints are retried without
    leaking descriptors; space back: `journal_recovered`. Full again: SIGTERM ends with one error and exit 1, a start
    on the full disk too; a daemon killed (-9) on the full disk and restarted once there is space makes up every
    window."""
    broker = Broker(tmp_path / "broker").start()
    journal = {"path": str(small_disk / "journal"), "max_bytes": 2**16, "checkpoint_seconds": 1}
    config = restart_config(tmp_path, broker.port, make_model(tmp_path / "alert_all", 4, 0.0), journal=journal)
    notify = NotifySocket(tmp_path / "notify")
    with (
        crash_rig(broker, config, {"NOTIFY_SOCKET": str(notify.path)}) as (capture, sensors, daemons),
        PacedSensors(sensors, 20) as stream,
    ):
        first = daemons[0]
        stream.start()
        stream.stream_for(2)
        fill(small_disk, leave=8192)
        first.wait_for_event("journal_write_failed", timeout=30)
        stream.stream_for(1)
        wait_until(  # what `systemctl status` shows
            lambda: "STATUS=journal failing: input not acknowledged" in notify.received(), 10, what="the status"
        )
        held = metric(first.scrape(), "monitor_input_unacknowledged")
        fds = [descriptors(first)]
        for _ in range(4):  # a checkpoint is retried every second
            stream.stream_for(1)
            fds.append(descriptors(first))
        samples = first.scrape()
        assert metric(samples, "monitor_journal_failing") == 1
        assert metric(samples, "monitor_input_unacknowledged") > held > 0  # nothing acknowledged, the input held
        errors = sum(metric(samples, "monitor_journal_errors_total", operation=op) for op in ("write", "checkpoint"))
        assert errors >= 4 and max(fds) - min(fds) <= 2
        figure("full_disk", "descriptors while failing (min-max) / journal errors", f"{min(fds)}-{max(fds)} / {errors}")

        free(small_disk)
        first.wait_for_event("journal_recovered", timeout=30)
        wait_until(lambda: metric(first.scrape(), "monitor_input_unacknowledged") < 100, 30, what="the input acked")
        assert metric(first.scrape(), "monitor_journal_failing") == 0
        wait_until(lambda: "STATUS=healthy" in notify.received(), 10, what="the status back to healthy")
        stream.stream_for(1)
        fill(small_disk)
        first.wait_for_event("journal_write_failed", timeout=30, count=2)
        stream.running.clear()
        assert first.stop() == 1 and no_traceback(first)
        assert first.events("stopped")[-1]["exit_code"] == 1

        daemons.append(DaemonProcess(config))  # started on the full disk
        assert daemons[-1].process.wait(START_SECONDS) == 1 and no_traceback(daemons[-1])
        assert [e["event"] for e in daemons[-1].events() if e.get("level") == "error"] == ["journal_unusable"]

        free(small_disk)
        daemons.append(DaemonProcess(config))
        daemons[-1].wait_for_event("ready", timeout=START_SECONDS)
        stream.stream_for(2)
        fill(small_disk, leave=8192)
        daemons[-1].wait_for_event("journal_write_failed", timeout=30)
        stream.stream_for(1)
        daemons[-1].kill()
        free(small_disk)
        expected = stream.stop()
        wait_until(sensors.all_acknowledged, 60, what="the broker to take every sensor message")
        daemons.append(DaemonProcess(config))
        with suppress(AssertionError):
            wait_until(lambda: lost_windows(capture, expected)[0] == 0, 120, what="every window scored")
        lost, twice = lost_windows(capture, expected)
        assert lost == 0 and no_traceback(daemons[-1])
        figure("full_disk", "windows / lost / alerted twice", f"{len(expected)} / {lost} / {twice}")
    notify.close()


def damage(path: Path, offset: int, size: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = np.random.default_rng(offset).bytes(size)
    path.write_bytes(bytes(data))


def test_a_damaged_journal_replays_around_the_damage_and_is_kept(tmp_path):
    """64 random bytes in the middle of the journal a kill -9 left: the restart replays the records before and after
    them, logs the loss at error level with its counts, and keeps the damaged file under another name; an empty
    journal is reported the same way, and a journal path that is a directory is refused in one line."""
    broker = Broker(tmp_path / "broker").start()
    journal = {"path": str(tmp_path / "journal"), "checkpoint_seconds": 3600}
    config = restart_config(tmp_path, broker.port, make_model(tmp_path / "alert_all", 4, 0.0), journal=journal)
    with crash_rig(broker, config) as (_, sensors, daemons), PacedSensors(sensors, 20, 0.01) as stream:
        stream.start()
        stream.stream_for(2)
        stream.running.clear()
        time.sleep(0.2)  # the round being sent
        sent = stream.sent // CHUNK * len(stream.ids)

        def accepted() -> float:
            return metric(daemons[0].scrape(), "monitor_messages_received_total", outcome="accepted")

        wait_until(lambda: accepted() >= sent, START_SECONDS, what="every message journaled")
        time.sleep(0.2)  # ten fsync intervals
        daemons[0].kill()
        path = tmp_path / "journal"
        size = path.stat().st_size
        damage(path, size // 2, 64)
        daemons.append(DaemonProcess(config))
        damaged = daemons[-1].wait_for_event("journal_damaged", timeout=START_SECONDS)[0]
        replayed = daemons[-1].wait_for_event("journal_replayed")[0]
        daemons[-1].wait_for_event("ready", timeout=START_SECONDS)
        assert damaged["level"] == "error" and damaged["damaged_spans"] == 1
        assert 64 <= damaged["damaged_bytes"] < 2400  # the records the 64 bytes overlap (about 750 bytes each)
        assert sent - 3 <= replayed["messages"] < sent  # all but the damaged records
        assert Path(damaged["kept_as"]).stat().st_size == size and path.exists()  # kept whole; a fresh journal
        samples = daemons[-1].scrape()
        assert metric(samples, "monitor_journal_discarded_bytes_total", reason="damaged") == damaged["damaged_bytes"]
        figure(
            "damaged_journal",
            "journal bytes / damaged bytes / messages replayed / messages sent",
            f"{size} / {damaged['damaged_bytes']} / {replayed['messages']} / {sent}",
        )
        daemons[-1].kill()
        path.write_bytes(b"")
        daemons.append(DaemonProcess(config))
        unreadable = daemons[-1].wait_for_event("journal_unreadable", timeout=START_SECONDS)[0]
        assert (
            unreadable["level"] == "error" and "empty" in unreadable["error"] and Path(unreadable["kept_as"]).exists()
        )
        daemons[-1].wait_for_event("ready", timeout=START_SECONDS)
        daemons[-1].kill()
        os.unlink(path)
        path.mkdir()
        result = run_cli("run", "--config", str(config), timeout=120)
        assert result.returncode == 2 and "journal.path" in result.stderr and "Traceback" not in result.stderr
