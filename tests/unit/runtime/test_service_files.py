"""The service files: the units' sandbox (`systemd-analyze security`), the settings other parts rely on, the
environment example's keys, the installer's syntax."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from monitor.config.schema import Config
from tests.support import REPO, missing_tool

UNIT = REPO / "systemd" / "monitor.service"
TEMPLATE_UNIT = REPO / "systemd" / "monitor@.service"
ENV_EXAMPLE = REPO / "systemd" / "monitor.env.example"
INSTALL = REPO / "systemd" / "install.sh"
MAX_EXPOSURE = 2.0


def exposure(unit: Path) -> float:
    """`systemd-analyze security --offline=true`'s overall exposure of a unit file (no running systemd needed)."""
    analyze = shutil.which("systemd-analyze") or missing_tool("systemd-analyze", "systemd")
    command = [analyze, "security", "--offline=true", "--no-pager", str(unit)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def unit_settings() -> set[str]:
    return {line.strip() for line in UNIT.read_text().splitlines() if line.strip() and not line.startswith(("#", "["))}


def test_unit_exposure():
    assert exposure(UNIT) <= MAX_EXPOSURE


def test_template_unit_exposure(tmp_path):
    instance = tmp_path / "monitor@0.service"
    instance.write_text(TEMPLATE_UNIT.read_text())
    assert exposure(instance) <= MAX_EXPOSURE


def test_unit_keeps_the_settings_others_rely_on():
    """The settings other parts rely on: sd_notify and watchdog, the config check, the credential, reload by SIGHUP."""
    expected = {
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "DynamicUser=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "ExecStartPre=/opt/monitor/.venv/bin/monitor check-config /etc/monitor/monitor.yaml",
        "ExecStart=/opt/monitor/.venv/bin/monitor run --config /etc/monitor/monitor.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LoadCredential=mqtt_password:/etc/monitor/credentials/mqtt_password",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LimitNOFILE=1024",
    }
    assert expected <= unit_settings()
    # See the unit's comments: oneDNN's JIT needs W+X pages, MKL/OpenBLAS need @resources.
    assert "MemoryDenyWriteExecute=yes" not in unit_settings()
    assert "SystemCallFilter=~@resources" not in unit_settings()


def test_env_example_names_real_keys():
    names = re.findall(r"^#?(MONITOR_\w+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert names
    for name in names:
        model: type = Config
        *sections, key = name.removeprefix("MONITOR_").lower().split("__")
        for section in sections:
            model = model.model_fields[section].annotation
        assert key in model.model_fields, name


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(INSTALL)], check=True)


def unit_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_template_unit_is_monitor_service_per_instance():
    """monitor@.service differs from monitor.service only where the instance name must go, so the sandbox,
    watchdog and drain settings stay in step."""
    plain, template = unit_lines(UNIT), unit_lines(TEMPLATE_UNIT)
    assert len(plain) == len(template)
    differing = [(a, b) for a, b in zip(plain, template, strict=True) if a != b]
    assert differing and all("%i" in b or "nats-server" in b for _, b in differing), differing
    assert "ExecStart=/opt/monitor/.venv/bin/monitor run --config /etc/monitor/monitor-%i.yaml" in template
    assert "StateDirectory=monitor-%i" in template
