"""The window state file (`windowing.state_file`): a drain's snapshot of every sensor, one checksummed line each.

Layout: text lines `<crc32, 8 hex digits> <JSON>`. The first line is the snapshot without its sensors (format, shape,
and the per-sensor baselines when there are any); each further line is one sensor's entry. A line whose checksum or
JSON fails costs that line only: a damaged sensor entry loses that sensor's partial window, never the others'. A
damaged first line loses the file (the shape the entries need is in it).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import orjson


def _line(document: Any) -> bytes:
    body = orjson.dumps(document)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (a snapshot with a `sensors` list) atomically: a temporary file, fsync, rename."""
    head = {key: value for key, value in state.items() if key != "sensors"}
    data = b"".join([_line(head), *(_line(item) for item in state["sensors"])])
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _parse(line: bytes) -> Any:
    crc, _, body = line.partition(b" ")
    if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
        raise ValueError("checksum mismatch")
    return orjson.loads(body)


def read_state(path: Path) -> tuple[dict[str, Any], int]:
    """The snapshot, and how many sensor lines were damaged (skipped); ValueError when the first line is."""
    lines = path.read_bytes().split(b"\n")
    try:
        state = _parse(lines[0])
    except ValueError as error:
        raise ValueError(f"the first line is damaged ({error})") from None
    if not isinstance(state, dict):
        raise ValueError("the first line is not a snapshot")
    sensors, damaged = [], 0
    for line in lines[1:]:
        if not line:
            continue
        try:
            sensors.append(_parse(line))
        except ValueError:
            damaged += 1
    return {**state, "sensors": sensors}, damaged
