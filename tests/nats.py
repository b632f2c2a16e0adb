"""A real NATS server with MQTT, run from the shipped `deploy/nats/nats-server.conf` with only its ports,
store directory, partition count (and, if asked, its ack wait) replaced, so the tests exercise the recipe operators
install."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support import REPO, free_port, missing_tool, port_open, spawn, terminate, wait_until

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
DEPLOYED_CONFIG = REPO / "deploy" / "nats" / "nats-server.conf"


def require_nats_server() -> str:
    if not Path(NATS_SERVER).is_file():
        missing_tool("nats-server", "nats-server")
    return NATS_SERVER


class NatsServer:
    """`nats-server -c <the deployed config, localised>` on free loopback ports."""

    def __init__(self, directory: Path, partitions: int = 4, ack_wait: str | None = None) -> None:
        """`ack_wait` (e.g. "30s") replaces the deployed one; None keeps it."""
        self.directory = directory
        self.port = free_port()  # MQTT
        self.nats_port = free_port()
        self.partitions = partitions
        self.ack_wait = ack_wait
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def write_config(self) -> Path:
        text = DEPLOYED_CONFIG.read_text()
        replacements = [
            (r"(?m)^listen: \S+$", f"listen: 127.0.0.1:{self.nats_port}"),
            (r"(?m)^http: \S+\n", ""),
            (r'store_dir: "[^"]+"', f'store_dir: "{self.directory / "jetstream"}"'),
            (r"(?m)^  listen: \S+$", f"  listen: 127.0.0.1:{self.port}"),
            (r'ack_wait: "([^"]+)"', f'ack_wait: "{self.ack_wait}"' if self.ack_wait else r'ack_wait: "\1"'),
            (r"partition\(\d+,1\)", f"partition({self.partitions},1)"),
        ]
        for pattern, replacement in replacements:
            text, count = re.subn(pattern, replacement, text)
            assert count == 1, f"{DEPLOYED_CONFIG} no longer has exactly one match of {pattern!r}"
        path = self.directory / "nats-server.conf"
        path.write_text(text)
        return path

    def start(self) -> NatsServer:
        if not Path(NATS_SERVER).is_file():
            raise RuntimeError(f"{NATS_SERVER} not found: install the Debian package nats-server")
        command = [NATS_SERVER, "-c", str(self.write_config()), "-l", str(self.directory / "nats.log")]
        self.process = spawn("nats-server", command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: port_open(self.port) or self.process.poll() is not None, 20, what="nats-server's MQTT port")
        if self.process.poll() is not None:
            raise RuntimeError(f"nats-server failed: {self.process.stderr.read().decode()}")
        return self

    def log(self) -> str:
        path = self.directory / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.process is not None:
            terminate(self.process, first=signal.SIGKILL if kill else signal.SIGTERM)
        self.process = None
