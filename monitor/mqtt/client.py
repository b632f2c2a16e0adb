"""The one place that makes paho clients (paho-mqtt 2.x API): protocol, session, credentials, TLS, logger.

The daemon's connection, `monitor replay`, `monitor watch`, the benchmarks and the tests all connect
through `make_client`, so they speak the configured protocol and authenticate alike.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from monitor.config.schema import MqttSettings
from monitor.errors import ConfigError, MonitorError


class _QuietReconnectLoop(logging.Filter):
    """Drops paho's "Client is not connected" error, which it logs on every reconnect cycle:
    `broker_connect_failed` already reports each attempt once, with its reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


class Client(mqtt.Client):
    """paho's client, except that a broken connection loses no packet that had already arrived.

    When a write fails (EPIPE or ECONNRESET: the broker died), paho closes the socket at once, although packets the
    broker wrote before it died may still wait unread in the socket's receive buffer (paho reads one packet per turn
    of its loop and writes in between). Closing discards them. A broker that was SIGKILLed may have acknowledged such
    a message to its publisher and not yet saved it (Mosquitto saves every `autosave_interval`): the copy in our
    receive buffer is then the only one left. So, before paho closes the socket after an error, the complete packets
    already received are read and handled as usual (PUBLISHes reach `on_message`); it ends when no byte is left.
    """

    _draining = False

    def acknowledge_all(self, mids: list[int]) -> None:
        """PUBACK the QoS 1 messages `mids` (with `manual_ack`) as one write: their 4-byte packets joined in one
        buffer, queued once. paho's `ack` queues each PUBACK on its own, with a wake-up of the network thread and a
        socket write of its own, each a GIL hand-over between the thread that acknowledges and the one reading the
        input; at thousands of messages a second they held the reading back. The bytes sent are the same."""
        if mids:
            packet = b"".join([struct.pack("!BBH", mqtt.PUBACK, 2, mid) for mid in mids])
            self._packet_queue(mqtt.PUBACK, packet, mids[-1], 1)

    def _handle_publish(self) -> MQTTErrorCode:
        """paho's, without the work the daemon does not need, for the usual PUBLISH: QoS 0 or 1 and no MQTT 5
        properties. For every MQTT 5 PUBLISH paho builds a `Properties` object (two passes over the names of the 27
        properties) and copies the packet four times to cut the topic, the packet id and the payload out of it; here
        the payload is copied once and `properties` stays None. Anything else (QoS 2, properties present, a 3.1.1
        packet paho would refuse) is paho's own."""
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        topic_end = 2 + int.from_bytes(packet[:2], "big")
        start = topic_end + (2 if qos else 0)  # after the packet id
        if self._protocol == mqtt.MQTTv5:
            lean = start < len(packet) and packet[start] == 0  # a property length of 0
            start += 1
        else:
            lean = topic_end > 2 and start <= len(packet)
        if qos > 1 or not lean:
            return super()._handle_publish()
        mid = int.from_bytes(packet[topic_end : topic_end + 2], "big") if qos else 0
        message = mqtt.MQTTMessage(mid, bytes(packet[2:topic_end]))
        message.dup, message.qos, message.retain = bool(header & 0x08), qos, bool(header & 0x01)
        with memoryview(packet) as view:
            message.payload = bytes(view[start:])
        self._easy_log(
            mqtt.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), %r, ...  (%d bytes)",
            message.dup, qos, message.retain, mid, message._topic, len(message.payload),
        )  # fmt: skip
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _loop_rc_handle(self, rc: MQTTErrorCode) -> MQTTErrorCode:
        if self._draining:  # a write of a packet handled while draining failed too: the drain closes once it ends
            return rc
        if rc == MQTTErrorCode.MQTT_ERR_CONN_LOST and self._sock is not None:
            self._draining = True
            try:
                while self._sock is not None and _bytes_waiting(self._sock):
                    if self._packet_read() == MQTTErrorCode.MQTT_ERR_AGAIN:  # the rest of a packet never came
                        break
            finally:
                self._draining = False
        return super()._loop_rc_handle(rc)


def _bytes_waiting(sock: object) -> bool:
    """Whether received bytes wait to be read, without reading them (a dead connection reads as EOF or error)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    if not isinstance(sock, socket.socket):
        return False
    try:  # the kernel's buffer, below TLS: `socket.socket.recv`, not SSLSocket's (which refuses flags)
        return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def client_id_for(settings: MqttSettings, role: str) -> str:
    """A client id of its own for a side client (replay, watch), so it never takes over the daemon's session."""
    return f"{settings.client_id}-{role}-{time.time_ns() % 10**9}"


def make_client(
    settings: MqttSettings,
    client_id: str | None = None,
    persistent_session: bool = False,
    manual_ack: bool = False,
) -> Client:
    """A paho client for `settings`: its protocol (3.1.1 or 5), credentials and TLS, and paho's log routed to ours.

    `persistent_session` asks for a session the broker keeps while the client is away (3.1.1: clean_session
    False; v5: decided at connect time by the session expiry, so clean_session stays unset).
    """
    v5 = settings.protocol == "5"
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id if client_id is not None else settings.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent_session,
        manual_ack=manual_ack,
    )
    paho_log = logging.getLogger("paho.mqtt.client")
    if not any(isinstance(existing, _QuietReconnectLoop) for existing in paho_log.filters):
        paho_log.addFilter(_QuietReconnectLoop())
    client.enable_logger(paho_log)
    apply_credentials(client, settings)
    return client


def apply_credentials(client: mqtt.Client, settings: MqttSettings) -> None:
    """Username/password and TLS (server verification, optional client certificate) from the config."""
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.resolve_password())
    if settings.tls.enabled:
        try:
            client.tls_set(
                ca_certs=str(settings.tls.ca_file) if settings.tls.ca_file else None,
                certfile=str(settings.tls.cert_file) if settings.tls.cert_file else None,
                keyfile=str(settings.tls.key_file) if settings.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"mqtt.tls: cannot load the certificates ({error})") from None
        client.tls_insecure_set(settings.tls.insecure_skip_hostname_check)


def connect_side_client(
    client: mqtt.Client, settings: MqttSettings, ready: threading.Event, timeout_seconds: float = 10.0
) -> None:
    """Connect a side client (replay, watch, `check-config --connect`) once, and wait for `ready`, which its own
    callback sets (on CONNACK, or on SUBACK). Unlike the daemon it does not retry: an unreachable or refusing broker
    is one `MonitorError` line."""
    where = f"{settings.host}:{settings.port}"
    try:
        client.connect(settings.host, settings.port, keepalive=30)
    except (OSError, ValueError) as error:
        raise MonitorError(f"cannot reach the broker at {where} ({error})") from None
    client.loop_start()
    if not ready.wait(timeout_seconds):
        client.loop_stop()
        raise MonitorError(f"the broker at {where} did not accept the connection within {timeout_seconds:g} s")


def check_broker(settings: MqttSettings, timeout_seconds: float = 10.0) -> None:
    """Connect with the configured protocol, credentials and TLS, and disconnect; a refusal is one line with the
    broker's reason."""
    client = make_client(settings, client_id_for(settings, "check"))
    ready = threading.Event()
    answers: list[str] = []

    def on_connect(client: mqtt.Client, userdata: object, flags: object, code: object, properties: object) -> None:
        answers.append(str(code) if getattr(code, "is_failure", False) else "")
        ready.set()

    client.on_connect = on_connect
    connect_side_client(client, settings, ready, timeout_seconds)
    client.disconnect()
    client.loop_stop()
    if answers and answers[0]:
        raise MonitorError(f"the broker at {settings.host}:{settings.port} refused the connection ({answers[0]})")
