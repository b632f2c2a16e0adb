"""Per-sensor records for the decision-side stages (episodes, anomaly rates): bounded, idle ones expire."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

RecordT = TypeVar("RecordT")


class SensorTable(Generic[RecordT]):
    """Records keyed by sensor id, least recently touched first; at most `max_sensors` of them.

    Not thread-safe: the owner serialises access.
    """

    def __init__(self, max_sensors: int, factory: Callable[[], RecordT]) -> None:
        if max_sensors < 1:
            raise ValueError("max_sensors must be at least 1")
        self.max_sensors = max_sensors
        self.factory = factory
        self._records: OrderedDict[str, RecordT] = OrderedDict()
        self._seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, sensor_id: str) -> bool:
        return sensor_id in self._records

    def get(self, sensor_id: str) -> RecordT | None:
        return self._records.get(sensor_id)

    def items(self) -> Iterator[tuple[str, RecordT]]:
        return iter(list(self._records.items()))

    def touch(self, sensor_id: str, now: float) -> tuple[RecordT, list[tuple[str, RecordT]]]:
        """The sensor's record (made if new), marked as seen at `now`; and the records evicted to make room."""
        record = self._records.get(sensor_id)
        evicted: list[tuple[str, RecordT]] = []
        if record is None:
            while len(self._records) >= self.max_sensors:
                oldest, dropped = self._records.popitem(last=False)
                del self._seen[oldest]
                evicted.append((oldest, dropped))
            record = self._records[sensor_id] = self.factory()
        else:
            self._records.move_to_end(sensor_id)
        self._seen[sensor_id] = now
        return record, evicted

    def put(self, sensor_id: str, record: RecordT, now: float) -> list[tuple[str, RecordT]]:
        """Replace (or add) a sensor's record; returns the records evicted to make room."""
        _, evicted = self.touch(sensor_id, now)
        self._records[sensor_id] = record
        return evicted

    def pop(self, sensor_id: str) -> RecordT | None:
        """Remove and return the sensor's record (None without one)."""
        self._seen.pop(sensor_id, None)
        return self._records.pop(sensor_id, None)

    def expire(self, now: float, idle_seconds: float) -> list[tuple[str, RecordT]]:
        """Remove and return the records not touched for `idle_seconds`."""
        expired = []
        for sensor_id in list(self._records):
            if now - self._seen[sensor_id] < idle_seconds:
                break  # least recently touched first: the rest are younger
            expired.append((sensor_id, self._records.pop(sensor_id)))
            del self._seen[sensor_id]
        return expired
