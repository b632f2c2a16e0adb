"""The daemon's broker connections (paho-mqtt 2.x): input subscriptions and the status topic on one, alert
publishing (the alert sink's `Publisher`) on another.

Two clients, because one TCP connection delivers in order: the broker's PUBACKs for the alerts would queue behind
every input message it has for the daemon, so a sensor flooding the input (or any backlog) would hold back the
acknowledgement of every alert, fill the alert queue and cost every sensor its alerts. The alert client's id is
the daemon's with `-alerts` appended; it keeps no session (paho itself resends what was not acknowledged).

paho runs a network thread per client. Subscriptions are made in `on_connect`, so every reconnect
resubscribes; a persistent session (MQTT v5 session expiry, or clean_session=False on 3.1.1)
lets the broker keep QoS 1 input while the daemon is away. Alerts are published at QoS 1 whether
or not the connection is up: paho keeps them (bounded by `max_queued_alerts`) and sends them on
reconnect, so no home-made "connected" flag ever gates publishing.

Input is acknowledged by the daemon, not here: each message gets a `Receipt` (monitor.ingest.acks) that is handed
back once nothing of it can be lost, and `acknowledge` sends those PUBACKs in arrival order. Retained
messages are stale input: MQTT 5 subscriptions ask the broker not to send them (retain handling 2), and any
that come anyway (MQTT 3.1.1, a broker that ignores the option) are ignored and counted (`retained`).
`_on_message` never raises: an exception there would end paho's network thread, and with it all input.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Literal

import orjson
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from monitor.config.schema import MqttSettings, PartitionSettings
from monitor.ingest.acks import InOrderAcks, PendingWindows, Receipt
from monitor.mqtt.client import Client, make_client
from monitor.mqtt.publisher import DropReason, PublishRefused
from monitor.telemetry.metrics import Metrics

log = structlog.get_logger("monitor.mqtt")

MessageHandler = Callable[[str, bytes, float, Receipt, bool], None]  # topic, payload, now, receipt, redelivered


class MqttConnection:
    """Two paho clients: `client` subscribes to sensor topics and publishes the retained status, `output` publishes
    alerts (and episode events, device commands)."""

    def __init__(
        self,
        settings: MqttSettings,
        handler: MessageHandler,
        metrics: Metrics,
        acks: InOrderAcks,
        pending: PendingWindows,
        partitions: PartitionSettings | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.acks = acks
        self.pending = pending
        self.partitions = partitions
        self.status_topic = settings.status_topic.format(client_id=settings.client_id)
        self.subscribed = threading.Event()
        self._accepting = True
        self._input_lock = threading.Lock()  # a message is handled and acknowledged whole, or left to the broker
        self._count_lock = threading.Lock()
        self._published = 0
        self._acknowledged = 0
        # MQTT 5: the broker must not send a QoS 1/2 message while this many wait for their PUBACK (3.1.1: unknown).
        self._receive_maximum = settings.receive_maximum if settings.protocol == "5" else None
        self._beyond_logged = False  # one warning a connection when the broker sends beyond it
        self.client = self._make_input_client()
        self.output = self._make_output_client()

    def _make_input_client(self) -> Client:
        settings = self.settings
        client = make_client(settings, persistent_session=settings.persistent_session, manual_ack=True)
        self._reconnect_delays(client)
        client.will_set(self.status_topic, self.status("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _make_output_client(self) -> mqtt.Client:
        settings = self.settings
        client = make_client(settings, client_id=f"{settings.client_id}-alerts")
        self._reconnect_delays(client)
        client.max_queued_messages_set(settings.max_queued_alerts)
        client.max_inflight_messages_set(settings.max_inflight)
        client.on_connect = self._on_output_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_output_disconnect
        client.on_publish = self._on_publish
        return client

    def _reconnect_delays(self, client: mqtt.Client) -> None:
        settings = self.settings
        client.reconnect_delay_set(
            max(1, int(settings.reconnect_min_seconds)), max(1, int(settings.reconnect_max_seconds))
        )

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        settings = self.settings
        properties = None
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if settings.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = settings.session_expiry_seconds if settings.persistent_session else 0
            properties.ReceiveMaximum = settings.receive_maximum  # bounds the input waiting for its acknowledgement
            clean_start = not settings.persistent_session
        self.client.connect_async(
            settings.host, settings.port, settings.keepalive_seconds, clean_start=clean_start, properties=properties
        )
        output_properties = None
        if settings.protocol == "5":
            output_properties = Properties(PacketTypes.CONNECT)
            output_properties.SessionExpiryInterval = 0
        self.output.connect_async(
            settings.host, settings.port, settings.keepalive_seconds, clean_start=True, properties=output_properties
        )
        for client, name in ((self.client, "mqtt-network"), (self.output, "mqtt-alerts")):
            client.loop_start()
            if client._thread is not None:
                client._thread.name = name  # paho's thread; named so thread dumps say what it is
        log.info(
            "broker_connecting",
            host=settings.host,
            port=settings.port,
            client_id=settings.client_id,
            tls=settings.tls.enabled,
            persistent_session=settings.persistent_session,
        )

    def status(self, state: str) -> bytes:
        """The retained status: online or offline, and which instance, partitions and subscriptions it is."""
        partitions = sorted(self.partitions.consume) if self.partitions else None
        document = {"status": state, "instance": self.settings.client_id, "partitions": partitions}
        return orjson.dumps({**document, "subscriptions": self.settings.subscribe})

    def _release_other_partitions(self, client: mqtt.Client, session_present: bool) -> None:
        """A resumed session keeps the subscriptions of the last run: drop those of partitions no longer consumed
        (after `partitions.consume` changed), or their input would keep arriving here."""
        if not (session_present and self.partitions):
            return
        consumed, topic = self.partitions.consume, self.partitions.topic
        others = [topic.format(partition=p) for p in range(self.partitions.count) if p not in consumed]
        if others:
            client.unsubscribe(others)

    # paho callbacks: they run on paho's network thread, so they are short and never raise.

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker_refused_connection", reason=str(reason_code), host=self.settings.host)
            return
        self.metrics.broker_connected.set(1)
        self.metrics.broker_connects.inc()
        self._beyond_logged = False
        self.acks.new_connection()
        log.info(
            "broker_connected",
            host=self.settings.host,
            port=self.settings.port,
            session_present=bool(getattr(flags, "session_present", False)),
        )
        client.publish(self.status_topic, self.status("online"), qos=1, retain=True)
        if self._accepting:
            self._release_other_partitions(client, bool(getattr(flags, "session_present", False)))
            client.subscribe([(topic, self._subscribe_options()) for topic in self.settings.subscribe])

    def _subscribe_options(self) -> SubscribeOptions | int:
        settings = self.settings
        if settings.protocol != "5":
            return settings.subscribe_qos
        retain_handling = (
            SubscribeOptions.RETAIN_DO_NOT_SEND
            if settings.ignore_retained
            else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
        )
        return SubscribeOptions(qos=settings.subscribe_qos, retainHandling=retain_handling)

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError` (refused, unreachable, TLS handshake/verification failed).
        error = sys.exc_info()[1]
        log.warning(
            "broker_connect_failed",
            host=self.settings.host,
            port=self.settings.port,
            client="alerts" if client is self.output else "input",
            error=f"{type(error).__name__}: {error}" if error is not None else "unknown",
            retry_within_seconds=self.settings.reconnect_max_seconds,
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.metrics.broker_connected.set(0)
        self.metrics.broker_disconnects.inc()
        self.subscribed.clear()
        self.metrics.set_consuming(False)
        level = log.warning if reason_code.is_failure else log.info
        level("broker_disconnected", reason=str(reason_code), pending_alerts=self.pending_alerts())

    def _on_output_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker_refused_connection", reason=str(reason_code), host=self.settings.host, client="alerts")
            return
        self.metrics.alert_connection_up.set(1)
        log.info("alert_connection_up", host=self.settings.host, port=self.settings.port)

    def _on_output_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.metrics.alert_connection_up.set(0)
        level = log.warning if reason_code.is_failure else log.info
        level("alert_connection_down", reason=str(reason_code), pending_alerts=self.pending_alerts())

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            log.error("subscription_refused", topics=self.settings.subscribe, reasons=failed)
            return
        log.info("subscribed", topics=self.settings.subscribe, qos=self.settings.subscribe_qos)
        self.subscribed.set()
        self.metrics.set_consuming(True)

    def _on_message(self, client, userdata, message) -> None:
        with self._input_lock:
            if not self._accepting:
                return  # left unacknowledged: the broker redelivers it to the next session
            if message.qos and self._receive_maximum is not None:
                self._check_receive_maximum(self._receive_maximum)
            receipt = self.acks.received(message.mid, message.qos, bool(message.dup))
            try:
                if message.retain and self.settings.ignore_retained:
                    self.metrics.messages.labels("retained").inc()
                    return
                # Not `message.topic`: it raises for a topic that is not UTF-8, which a broker that does not
                # validate topics can pass on; the surrogates make it an invalid sensor id (bad_topic) instead.
                topic = message._topic.decode("utf-8", "surrogateescape")
                self.handler(topic, message.payload, time.monotonic(), receipt, bool(message.dup))
            except Exception:  # noqa: BLE001 - paho's thread must live on; the handler itself never raises
                self.metrics.messages.labels("internal_error").inc()
                log.exception("message_failed", mid=message.mid)
            finally:
                self.acks.release(receipt)

    def _check_receive_maximum(self, maximum: int) -> None:
        """Count a QoS 1/2 message that arrives while `maximum` others first sent on this connection wait for their
        PUBACK. The broker's count is at least that (`first_sent_unacknowledged`), so nothing is counted that it did
        not send beyond the maximum. The daemon cannot hold the broker back (RELIABILITY.md, "Mosquitto settings"):
        it handles the message, and says so."""
        unacknowledged = self.acks.first_sent_unacknowledged()
        if unacknowledged < maximum:
            return
        self.metrics.input_beyond_receive_maximum.inc()
        if not self._beyond_logged:
            self._beyond_logged = True
            log.warning(
                "broker_exceeds_receive_maximum",
                receive_maximum=maximum,
                unacknowledged=unacknowledged,
                hint="the broker does not honour MQTT 5 Receive Maximum (Mosquitto 2.0 once acknowledgements flow); "
                "see RELIABILITY.md, Mosquitto settings",
            )

    def acknowledge(self) -> int:
        """Send the PUBACKs of the input messages that nothing holds back any more, in arrival order (one thread
        only: the daemon's main loop). Returns how many."""
        ready = self.acks.ready()
        run: list[int] = []  # consecutive QoS 1 receipts: one write
        for receipt in ready:
            if receipt.qos == 1:
                run.append(receipt.mid)
            elif receipt.qos == 2:
                self.client.acknowledge_all(run)
                run = []
                self.client.ack(receipt.mid, receipt.qos)
        self.client.acknowledge_all(run)
        return len(ready)

    def connected(self) -> tuple[bool, bool]:
        """Whether the input and the alert connection are up."""
        return self.client.is_connected(), self.output.is_connected()

    def network_thread_alive(self) -> bool:
        threads = (self.client._thread, self.output._thread)
        return all(thread is not None and thread.is_alive() for thread in threads)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # paho holds its own message lock here: take ours only briefly and call nothing of paho's.
        self.pending.alert_acknowledged(mid)
        with self._count_lock:
            self._acknowledged += 1
            self.metrics.alerts_pending.set(self._published - self._acknowledged)
        self.metrics.alerts_delivered.inc()

    # used by the scoring thread and the lifecycle

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int:
        """Queue an alert and return its mid; paho sends it now or after reconnecting. Raises PublishRefused when
        it cannot.

        Counted as pending before the call (its acknowledgement may be handled before `publish`
        returns), and never under our lock while inside paho (paho's lock is held in `_on_publish`).
        """
        self._add_published(1)
        info = self.output.publish(topic, payload, qos=qos, retain=retain)
        # While disconnected paho keeps a QoS 1/2 message for the reconnect, but discards a QoS 0 one.
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0):
            return info.mid
        self._add_published(-1)
        reason: DropReason = "queue_full" if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE else "publish_error"
        raise PublishRefused(reason, mqtt.error_string(info.rc))

    def send_command(self, topic: str, payload: bytes) -> None:
        """Publish a command to a device (a Sparkplug rebirth request) at QoS 0: not an alert, never counted as one;
        a command lost with the connection is asked again by the next message that needs it."""
        self.output.publish(topic, payload, qos=0)

    def _add_published(self, count: int) -> None:
        with self._count_lock:
            self._published += count
            self.metrics.alerts_pending.set(self._published - self._acknowledged)

    def pending_alerts(self) -> int:
        with self._count_lock:
            return self._published - self._acknowledged

    def stop_input(self) -> None:
        """Take no more input. With a persistent session the subscription stays (unsubscribing would
        end it) and messages that still arrive are left unacknowledged, so the broker redelivers them
        to the next start; without one, unsubscribe."""
        with self._input_lock:  # returns once a message being handled is done: no window arrives after this
            self._accepting = False
        self.metrics.set_consuming(False)
        if not self.settings.persistent_session:
            self.client.unsubscribe(self.settings.subscribe)

    def wait_for_acknowledgements(self, timeout_seconds: float, stop_polling: float = 0.02) -> bool:
        """Wait (bounded) until the broker acknowledged every alert; False if some are still pending."""
        deadline = time.monotonic() + timeout_seconds
        while self.pending_alerts() > 0 and time.monotonic() < deadline:
            time.sleep(stop_polling)
        return self.pending_alerts() == 0

    def close(self) -> None:
        """Say offline on the status topic (when connected), disconnect and stop paho's threads; never raises
        for a broker that is down or a full alert queue."""
        status = self.client.publish(self.status_topic, self.status("offline"), qos=1, retain=True)
        if status.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            status.wait_for_publish(timeout=1.0)
        else:
            log.warning("status_not_published", status="offline", reason=mqtt.error_string(status.rc))
        for client in (self.client, self.output):
            client.disconnect()
            client.loop_stop()
        self.metrics.broker_connected.set(0)
        self.metrics.alert_connection_up.set(0)
