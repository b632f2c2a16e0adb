"""Security against a real Mosquitto: TLS with server verification and a client certificate, user name and password,
secrets only from the environment or systemd's credentials directory and never in any output, metrics on loopback.

The CA and certificates are made here with `openssl`, the password file with `mosquitto_passwd`. Figures for
RELIABILITY.md are printed as `FIGURE <test>: <name> = <value>` lines (`pytest -s` shows them).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import psutil
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from monitor.config.schema import Config, MetricsSettings
from tests.support import DEFAULT_MODEL, SPLITS, daemon_config, free_port, run_cli, wait_until

pytestmark = pytest.mark.slow

USER = "monitor"
PASSWORD = "s3cret-Pa55word-7f1c9e"  # searched for in every line the daemon writes
SENSOR_USER = "sensor"
SENSOR_PASSWORD = "sensor-pass-4e2d"


def figure(test: str, name: str, value: object) -> None:
    print(f"FIGURE {test}: {name} = {value}")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing the broker uses
    passwords: Path


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-extensions",
        "v3_ca",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return directory / f"{name}.crt", directory / f"{name}.key"


def make_cert(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=directory,
    )
    (directory / f"{name}.ext").write_text(extensions)
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=directory,
    )
    return directory / f"{name}.crt", directory / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "test-ca")
    server = make_cert(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    client = make_cert(
        directory,
        "client",
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    other_ca = make_ca(directory, "other-ca")
    passwords = directory / "passwords"
    mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([mosquitto_passwd, "-b", "-c", str(passwords), USER, PASSWORD], check=True, timeout=30)
    subprocess.run([mosquitto_passwd, "-b", str(passwords), SENSOR_USER, SENSOR_PASSWORD], check=True, timeout=30)
    return Pki(ca[0], server[0], server[1], client[0], client[1], other_ca[0], passwords)


@pytest.fixture
def secure_broker(broker_factory, pki):
    """Mosquitto with only a TLS listener that wants a client certificate from the CA and a user name and password."""
    port = free_port()
    extra = "\n".join(
        [
            f"listener {port} 127.0.0.1",
            f"cafile {pki.ca}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "require_certificate true",
            f"password_file {pki.passwords}",
            "allow_anonymous false",
        ]
    )
    return broker_factory(port=port, extra=extra).start()


def tls_client(port: int, pki: Pki, user: str, password: str) -> mqtt.Client:
    """A sensor or alert reader of our own: the same CA, client certificate and a password."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}")
    client.tls_set(
        ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key), cert_reqs=ssl.CERT_REQUIRED
    )
    client.username_pw_set(user, password)
    return client


def secure_config(path: Path, port: int, pki: Pki, **tls) -> Path:
    settings = {
        "enabled": True,
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
        **tls,
    }
    return daemon_config(
        path, port, mqtt={"username": USER, "tls": settings}, logging={"level": "debug", "format": "json"}
    )


def assert_secret_never_written(daemon) -> None:
    leaked = [line for line in daemon.lines if PASSWORD in line]
    assert not leaked, leaked[:3]


def test_tls_client_certificate_and_password_from_env_or_credentials_directory(
    secure_broker, daemon_factory, pki, tmp_path
):
    """Both ways of giving the password work over verified TLS; neither is ever written out, even at debug level."""
    from_env = secure_config(tmp_path / "env.yaml", secure_broker.port, pki)
    config = yaml.safe_load(from_env.read_text())
    del config["metrics"]["host"]  # the default address, to see where it binds
    from_env.write_text(yaml.safe_dump(config))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt_password").write_text(PASSWORD + "\n")
    credentials.chmod(0o700)
    from_credentials = secure_config(tmp_path / "cred.yaml", secure_broker.port, pki)
    by_env = daemon_factory(from_env, env={"MONITOR_MQTT__PASSWORD": PASSWORD}, ready=False)
    by_credentials = daemon_factory(from_credentials, env={"CREDENTIALS_DIRECTORY": str(credentials)}, ready=False)
    by_env.wait_for_event("ready", 90)
    by_credentials.wait_for_event("ready", 90)

    alerts: list[dict] = []
    got = threading.Event()
    reader = tls_client(secure_broker.port, pki, SENSOR_USER, SENSOR_PASSWORD)
    reader.on_connect = lambda client, userdata, flags, code, properties: client.subscribe("alerts/#", qos=1)
    reader.on_subscribe = lambda *args: got.set()
    reader.on_message = lambda client, userdata, message: alerts.append(orjson.loads(message.payload))
    reader.connect("127.0.0.1", secure_broker.port)
    reader.loop_start()
    assert got.wait(30), "the alert reader could not subscribe over TLS"
    sensor = tls_client(secure_broker.port, pki, SENSOR_USER, SENSOR_PASSWORD)
    sensor.connect("127.0.0.1", secure_broker.port)
    sensor.loop_start()
    beat = np.loadtxt(SPLITS / "test.txt.xz", max_rows=1, dtype=np.float32, ndmin=2)[0, 1:]
    flat = np.full_like(beat, 5.0)  # far from any ECG beat: an alert with the default model
    sensor.publish("sensors/tls-1/ecg", orjson.dumps({"seq": 0, "samples": flat.tolist()}), qos=1).wait_for_publish(10)
    wait_until(
        lambda: len(alerts) >= 2, 60, what="an alert from each daemon over TLS"
    )  # both daemons subscribe to the sensors
    assert {alert["sensor_id"] for alert in alerts} == {"tls-1"}
    for client in (sensor, reader):
        client.disconnect()
        client.loop_stop()

    listening = [
        c.laddr for c in psutil.Process(by_env.process.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
    ]
    assert [(address.ip, address.port) for address in listening] == [("127.0.0.1", by_env.metrics_port)]
    assert MetricsSettings().host == Config().metrics.host == "127.0.0.1"
    for daemon in (by_env, by_credentials):
        connected = daemon.events("broker_connecting")[0]
        assert connected["tls"] is True
        assert daemon.stop() == 0
        assert_secret_never_written(daemon)
    name = "tls_and_password"
    figure(name, "daemons connected over verified TLS + client cert + password (env, $CREDENTIALS_DIRECTORY)", 2)
    figure(
        name,
        "output lines searched for the password / lines containing it",
        f"{len(by_env.lines) + len(by_credentials.lines)} / 0",
    )
    figure(name, "metrics listening on", [f"{address.ip}:{address.port}" for address in listening])


def test_wrong_ca_wrong_password_or_no_client_certificate_is_a_logged_retry_not_a_crash(
    secure_broker, daemon_factory, pki, tmp_path
):
    env = {"MONITOR_MQTT__PASSWORD": PASSWORD}
    wrong_ca = daemon_factory(
        secure_config(tmp_path / "ca.yaml", secure_broker.port, pki, ca_file=str(pki.other_ca)), env=env, ready=False
    )
    wrong_password = daemon_factory(
        secure_config(tmp_path / "pw.yaml", secure_broker.port, pki),
        env={"MONITOR_MQTT__PASSWORD": "not-" + PASSWORD},
        ready=False,
    )
    no_certificate = daemon_factory(
        secure_config(tmp_path / "cert.yaml", secure_broker.port, pki, cert_file=None, key_file=None),
        env=env,
        ready=False,
    )

    failures = wrong_ca.wait_for_event("broker_connect_failed", 90, count=4)  # two attempts of each client
    assert all("CERTIFICATE_VERIFY_FAILED" in event["error"] for event in failures), failures
    refusals = wrong_password.wait_for_event("broker_refused_connection", 90, count=4)
    assert all(event["reason"] in ("Bad user name or password", "Not authorized") for event in refusals), refusals
    # TLS 1.3: the broker checks the client certificate after the handshake, so the refusal arrives on the first read
    # Two clients (input, alerts), each refused and retrying
    required = wait_until(
        lambda: (
            len(no_certificate.events("broker_disconnected")) >= 2
            and len(no_certificate.events("alert_connection_down")) >= 2
            and [event for event in no_certificate.events() if "CERTIFICATE_REQUIRED" in event["event"]]
        ),
        90,
        what="two refused attempts of each client without a client certificate",
    )
    for daemon in (wrong_ca, wrong_password, no_certificate):
        assert daemon.process.poll() is None, "the daemon exited"
        assert not daemon.events("ready")
        assert daemon.scrape()[("monitor_broker_connected", ())] == 0
    for daemon in (wrong_ca, wrong_password, no_certificate):
        assert daemon.stop() == 0
        assert not any("Traceback" in line for line in daemon.lines), "\n".join(daemon.lines[-20:])
        assert_secret_never_written(daemon)
    assert not any(("not-" + PASSWORD) in line for line in wrong_password.lines)
    name = "bad_credentials"
    figure(name, "wrong CA: log line", f"broker_connect_failed error={failures[0]['error']!r}")
    figure(name, "wrong password: log line", f"broker_refused_connection reason={refusals[0]['reason']!r}")
    figure(name, "no client certificate: log line", f"{required[0]['logger']}: {required[0]['event']!r}")
    figure(name, "crashes", 0)


def test_config_errors_never_print_the_password(tmp_path):
    """A rejected config quotes the bad values; a password from the environment is never one of them."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "mqtt": {
                    "port": 0,
                    "reconnect_min_seconds": 10,
                    "reconnect_max_seconds": 2,
                    "tls": {"enabled": True, "ca_file": "/nonexistent"},
                },
                "model": {"path": str(DEFAULT_MODEL)},
            }
        )
    )
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = run_cli(*command, timeout=60, env={"MONITOR_MQTT__PASSWORD": PASSWORD})
        assert result.returncode == 2, result.stderr
        assert (
            "mqtt.port" in result.stderr
            and "mqtt.reconnect_max_seconds" in result.stderr
            and "mqtt.tls" in result.stderr
        )
        assert PASSWORD not in result.stdout + result.stderr, result.stderr
