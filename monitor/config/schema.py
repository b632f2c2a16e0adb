"""The daemon's configuration: a typed schema, loaded from YAML plus `MONITOR_` environment overrides.

`monitor check-config` and `monitor run` both call `load_config`, so a file that passes the check
is exactly a file the daemon accepts. Secrets never need to be in the file: the broker password
comes from `MONITOR_MQTT__PASSWORD`, from `mqtt.password_file`, or from systemd's
`$CREDENTIALS_DIRECTORY/mqtt_password`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationInfo, field_validator, model_validator

from monitor.config.loading import (
    Strict,
    deep_merge,
    environment_names,
    environment_overrides,
    read_yaml,
    source_of,
    unknown_variables,
    validate,
)
from monitor.errors import ConfigError

CREDENTIAL_PASSWORD = "mqtt_password"
PLAUSIBLE_TS = (946684800.0, 4102444800.0)  # 2000-01-01 and 2100-01-01 UTC, in seconds since the epoch


def topic_template(template: str, need_sensor_id: bool = False) -> str:
    """Check a per-sensor topic template: only `{sensor_id}` may be used, and no wildcard."""
    try:
        topic = template.format(sensor_id="x")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"only the field {{sensor_id}} may be used ({error})") from None
    if "+" in topic or "#" in topic:
        raise ValueError("a topic cannot contain the wildcards + or #")
    if need_sensor_id and template.count("{sensor_id}") != 1:
        raise ValueError("must contain {sensor_id} once")
    return template


def topic_filter_valid(topic_filter: str) -> str:
    """Check an MQTT topic filter: `+` and `#` only as whole levels, `#` only last."""
    levels = topic_filter.split("/")
    if not topic_filter or any(("#" in level and level != "#") or ("+" in level and level != "+") for level in levels):
        raise ValueError(f"{topic_filter!r} is not a valid MQTT topic filter")
    if "#" in levels[:-1]:
        raise ValueError(f"{topic_filter!r}: '#' must be the last level")
    return topic_filter


class TlsSettings(Strict):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_hostname_check: bool = False

    @model_validator(mode="after")
    def _files_exist(self) -> TlsSettings:
        if not self.enabled:
            return self
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {str(path)!r} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate)")
        return self


class MqttSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str = Field(default_factory=lambda: f"monitor-{socket.gethostname()}", min_length=1, max_length=128)
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_seconds: int = Field(default=30, ge=5, le=3600)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: TlsSettings = Field(default_factory=TlsSettings)
    persistent_session: bool = True
    session_expiry_seconds: int = Field(default=3600, ge=0)
    subscribe: list[str] = Field(default_factory=lambda: ["sensors/+/ecg"], min_length=1)
    subscribe_qos: Literal[0, 1, 2] = 1
    receive_maximum: int = Field(
        default=20000,
        ge=1,
        le=65535,
        description="MQTT 5: QoS 1/2 input messages the broker may send before the daemon acknowledges them (it is to "
        "keep the rest queued; monitor_input_unacknowledged shows the count). Mosquitto 2.0 honours it only until the "
        "first acknowledgement (each in-order PUBACK lets up to this many more in; no broker setting avoids it): what "
        "it sends beyond is handled and counted in monitor_input_beyond_receive_maximum_total, see RELIABILITY.md "
        "'Mosquitto settings'. MQTT 3.1.1: only the broker's max_inflight_messages, which Mosquitto 2.0 overruns alike",
    )
    sensor_id_level: int = Field(default=1, ge=0)
    ignore_retained: bool = Field(
        default=True,
        description="retained messages on sensor topics are stale input: ignored and counted (outcome retained)",
    )
    sensor_id_pattern: str | None = Field(
        default=r"[A-Za-z0-9_.:-]{1,128}",
        description="regular expression every sensor id must match whole (ASCII by default, so no id can look like "
        "another in other scripts); null accepts any printable id up to 128 characters",
    )
    alert_topic: str = "alerts/{sensor_id}"
    alert_qos: Literal[0, 1, 2] = 1
    status_topic: str = "monitor/{client_id}/status"
    reconnect_min_seconds: float = Field(default=1.0, gt=0)
    reconnect_max_seconds: float = Field(default=30.0, gt=0)
    max_queued_alerts: int = Field(default=10000, ge=1)
    max_pending_alerts_per_sensor: int = Field(
        default=1000,
        ge=1,
        description="a sensor with this many alerts waiting for the broker's acknowledgement, and more than twice its "
        "fair share of the alert queue (max_queued_alerts / active sensors), floods it: its further alerts are "
        "dropped (sensor_share), so the queue keeps room for every other sensor's",
    )
    max_inflight: int = Field(
        default=0,
        ge=0,
        description="alerts sent and not yet acknowledged by the broker; 0 = no limit other than max_queued_alerts "
        "(a limit makes paho hold the rest back and rescan them at every acknowledgement)",
    )
    drain_timeout_seconds: float = Field(default=3.0, ge=0)

    @field_validator("subscribe")
    @classmethod
    def _filters_valid(cls, filters: list[str]) -> list[str]:
        return [topic_filter_valid(topic_filter) for topic_filter in filters]

    @field_validator("sensor_id_pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a regular expression ({error})") from None
        return pattern

    @field_validator("alert_topic")
    @classmethod
    def _alert_topic_valid(cls, template: str) -> str:
        return topic_template(template)

    @field_validator("reconnect_max_seconds")
    @classmethod
    def _reconnect_order(cls, maximum: float, info: ValidationInfo) -> float:
        # A field check, not a model check: a failing model check quotes the whole section, password included.
        minimum = info.data.get("reconnect_min_seconds")
        if minimum is not None and maximum < minimum:
            raise ValueError(f"must be >= reconnect_min_seconds ({minimum})")
        return maximum

    def resolve_password(self) -> str | None:
        """The broker password from the environment/YAML, `password_file`, or `$CREDENTIALS_DIRECTORY`."""
        if self.password is not None:
            return self.password.get_secret_value()
        candidates = [self.password_file]
        if os.environ.get("CREDENTIALS_DIRECTORY"):
            candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_PASSWORD)
        for path in candidates:
            if path is not None and Path(path).is_file():
                return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        if self.password_file is not None:
            raise ConfigError(f"mqtt.password_file: {str(self.password_file)!r} does not exist")
        return None


InputFormat = Literal["json", "frame", "sparkplug_b"]


class FormatRule(Strict):
    """Messages on topics matching `filter` are in `format`."""

    filter: str
    format: InputFormat

    @field_validator("filter")
    @classmethod
    def _filter_valid(cls, topic_filter: str) -> str:
        return topic_filter_valid(topic_filter)


class SparkplugDevice(Strict):
    """A Sparkplug B edge node's device (or, without `device`, the node's own metrics) that is a sensor."""

    group: str = Field(min_length=1)
    node: str = Field(min_length=1)
    device: str | None = Field(default=None, min_length=1)
    sensor_id: str | None = Field(default=None, description="default: the device name (the node name without one)")
    channels: list[str] = Field(min_length=1, description="the metric names that are the sensor's channels, in order")
    sample_rate_hz: float = Field(
        gt=0, le=1000, description="the channels' nominal rate (Sparkplug timestamps are whole milliseconds)"
    )

    @field_validator("group", "node", "device")
    @classmethod
    def _topic_level(cls, name: str | None) -> str | None:
        if name is not None and any(character in name for character in "/+#"):
            raise ValueError(f"{name!r}: a Sparkplug id cannot contain '/', '+' or '#'")
        return name

    @property
    def sensor(self) -> str:
        return self.sensor_id or self.device or self.node


class SparkplugSettings(Strict):
    devices: list[SparkplugDevice] = Field(default_factory=list)
    rebirth: bool = Field(
        default=False,
        description="request a rebirth (NCMD Node Control/Rebirth) on DATA before BIRTH or an unknown alias",
    )
    rebirth_interval_seconds: float = Field(default=10.0, gt=0, description="per edge node, at most one request per")

    def alert_sources(self) -> dict[str, dict[str, Any]]:
        """Per sensor id, the `sparkplug` field of its alerts: group, edge node, device and the channels' metrics."""
        return {
            device.sensor: {
                "sparkplug": {
                    "group": device.group,
                    "node": device.node,
                    "device": device.device,
                    "metrics": list(device.channels),
                }
            }
            for device in self.devices
        }

    @model_validator(mode="after")
    def _unique(self) -> SparkplugSettings:
        sensors = [device.sensor for device in self.devices]
        places = [(device.group, device.node, device.device) for device in self.devices]
        if len(set(sensors)) != len(sensors) or len(set(places)) != len(places):
            raise ValueError("each mapped device needs its own sensor id and its own group/node/device")
        return self


class InputSettings(Strict):
    """Which payload format each sensor topic carries (docs/payload-formats.md); JSON unless a rule says otherwise."""

    format: InputFormat = Field(default="json", description="the format of topics no rule in `formats` matches")
    formats: list[FormatRule] = Field(default_factory=list, description="the first rule whose filter matches applies")
    sparkplug: SparkplugSettings = Field(default_factory=SparkplugSettings)

    @property
    def json_only(self) -> bool:
        return not self.formats and self.format == "json"

    def uses(self, input_format: str) -> bool:
        return self.format == input_format or any(rule.format == input_format for rule in self.formats)

    @model_validator(mode="after")
    def _sparkplug_mapped(self) -> InputSettings:
        if self.uses("sparkplug_b") and not self.sparkplug.devices:
            raise ValueError("sparkplug_b input needs sparkplug.devices (which devices are sensors)")
        return self


class ModelSettings(Strict):
    path: Path = Path("models/ecg5000")
    device: str = Field(
        default="auto", description="auto, cpu, cuda or cuda:N; resolved and checked by monitor.model.engine"
    )
    backend: Literal["torch", "onnx"] = "torch"
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="the number type the autoencoder computes in; bfloat16 (torch backend, hardware with native "
        "bfloat16 only) scores faster, with scores rounded a little differently (bench/RESULTS.md: a few windows at "
        "the threshold decided otherwise)",
    )
    threads: int = Field(
        default=1, ge=0, description="intra-op threads for inference; 0 = the library's default (all cores)"
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="a batch of at least 16 windows a worker is scored in this many slices at once, each on `threads` "
        "intra-op threads (the scoring pass releases the GIL, so they run on as many cores); 1: one pass a batch",
    )
    shadow_path: Path | None = Field(
        default=None, description="a second artifact that scores the same batches, never alerts, and is compared"
    )


class WindowingSettings(Strict):
    mode: Literal["fixed", "beats"] = Field(default="fixed", description="fixed windows, or one window per beat (ECG)")
    sample_rate_hz: float | None = Field(default=None, description="the sensors' sampling rate; required in beat mode")
    stride: int | None = Field(default=None, ge=1, description="samples between window starts; default = window")
    max_samples_per_message: int = Field(default=4096, ge=1, le=65536)
    max_payload_bytes: int = Field(default=262144, ge=64)
    max_sensors: int = Field(default=10000, ge=1)
    idle_eviction_seconds: float = Field(default=300.0, gt=0)
    seq_tolerance: int = Field(
        default=1024,
        ge=0,
        description="seq jump (samples) beyond which a message ahead, or back near 0, restarts the sensor's stream",
    )
    ts_range: tuple[float, float] = Field(
        default=PLAUSIBLE_TS,
        description="plausible sensor ts (Unix seconds, inclusive); others are ignored and counted, the samples kept",
    )

    ts_tolerance_seconds: float = Field(
        default=1.0, ge=0, description="how far a later message's ts may go back before it is ignored (fixed mode)"
    )
    max_abs_value: float = Field(
        default=1e6, gt=0, description="samples with a larger magnitude reject the message (value_out_of_range)"
    )
    state_file: Path | None = Field(
        default=None, description="where the partial windows are kept across a restart (SIGTERM drain); None = not kept"
    )
    baseline: Literal["model", "sensor"] = Field(
        default="model", description="model: the artifact's normalisation for every sensor; sensor: each sensor's own"
    )
    baseline_windows: int | None = Field(
        default=None, ge=1, description="with baseline sensor: a sensor's warm-up windows; None = as trained"
    )

    @model_validator(mode="after")
    def _baseline_windows_for_sensor(self) -> WindowingSettings:
        if self.baseline_windows is not None and self.baseline != "sensor":
            raise ValueError("baseline_windows is only for baseline: sensor")
        return self

    @field_validator("ts_range")
    @classmethod
    def _ordered(cls, ts_range: tuple[float, float]) -> tuple[float, float]:
        if not ts_range[0] < ts_range[1]:
            raise ValueError(f"the first bound must be below the second, got {list(ts_range)}")
        return ts_range

    @field_validator("sample_rate_hz")
    @classmethod
    def _detectable_rate(cls, rate: float | None) -> float | None:
        if rate is not None and not 50 <= rate <= 10000:
            raise ValueError("must be between 50 and 10000 Hz (beat detection needs the QRS band, 5-15 Hz)")
        return rate

    @model_validator(mode="after")
    def _rate_in_beat_mode(self) -> WindowingSettings:
        if self.mode == "beats" and self.sample_rate_hz is None:
            raise ValueError("sample_rate_hz is required with mode: beats")
        if self.mode == "beats" and self.stride is not None:
            raise ValueError("stride belongs to mode: fixed (beat mode makes one window per beat)")
        return self


class BatchingSettings(Strict):
    max_batch: int = Field(default=64, ge=1, le=4096)
    max_wait_seconds: float = Field(default=0.05, ge=0, le=10)
    queue_capacity: int = Field(default=4096, ge=1)
    max_queued_per_sensor: int = Field(
        default=64,
        ge=1,
        description="a sensor holding this many queued windows, and more than twice its fair share of the queue "
        "(queue_capacity / active sensors), floods: its further messages and windows are dropped (sensor_share) and "
        "no other sensor waits for them; at least the windows one message can complete",
    )
    behind_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="the most of the scoring thread's time given to the windows of sensors holding more than their "
        "fair share of the queue and at least a quarter of max_queued_per_sensor: a flooding sensor leaves it idle "
        "time for the others' input (1: no limit)",
    )
    behind_batch: int = Field(
        default=8,
        ge=1,
        le=4096,
        description="the most windows in a batch begun with windows put behind (a flooding sensor's): the others' "
        "windows that arrive while it is scored wait for at most this many, not for max_batch",
    )
    admission_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        le=60,
        description="with the queue full, input waits this long for room (read no further: it waits at the broker) "
        "before the window is dropped (queue_full); keep it below 1.5 x mqtt.keepalive_seconds",
    )


@dataclass(frozen=True)
class EpisodePolicy:
    """When episodes open, resolve, pause and count as flapping (see `monitor.alerts.episodes`)."""

    open_anomalous: int = 3
    open_window: int = 5
    resolve_normal: int = 10
    cooldown_seconds: float = 0.0
    update_interval_seconds: float = 30.0
    flapping_transitions: int = 6  # 0 turns flapping detection off
    flapping_window: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.open_anomalous <= self.open_window:
            raise ValueError(f"open_anomalous must be between 1 and open_window ({self.open_window})")
        if self.resolve_normal < 1:
            raise ValueError("resolve_normal must be at least 1")
        if self.cooldown_seconds < 0 or self.update_interval_seconds < 0:
            raise ValueError("cooldown_seconds and update_interval_seconds must be >= 0")
        if self.flapping_transitions == 1 or self.flapping_transitions < 0:
            raise ValueError("flapping_transitions must be 0 (off) or at least 2")
        if self.flapping_transitions > self.flapping_window:
            raise ValueError("flapping_transitions cannot exceed flapping_window")


class LifecycleSettings(Strict):
    """Episodes per sensor on top of the per-window alerts (see monitor.alerts.episodes); off by default."""

    enabled: bool = False
    open_anomalous: int = Field(default=3, ge=1, description="k: an episode opens when k of the last n are anomalous")
    open_window: int = Field(default=5, ge=1, description="n")
    resolve_normal: int = Field(default=10, ge=1, description="m: consecutive normal decisions that resolve it")
    cooldown_seconds: float = Field(default=0.0, ge=0, description="after a resolve, no new episode before this")
    update_interval_seconds: float = Field(default=30.0, ge=0, description="`updated` events at most this often")
    flapping_transitions: int = Field(default=6, ge=0, description="opens+resolves within flapping_window; 0 = off")
    flapping_window: int = Field(default=100, ge=2, description="decisions over which changes of state count")
    per_window_alerts: bool = Field(default=True, description="keep the per-window alerts while episodes are on")
    event_topic: str = "alerts/{sensor_id}/events"
    event_qos: Literal[0, 1, 2] = 1
    state_topic: str = "alerts/{sensor_id}/state"
    resume_timeout_seconds: float = Field(
        default=3.0, ge=0, description="at start, how long to wait for the retained states of open episodes"
    )

    @field_validator("event_topic", "state_topic")
    @classmethod
    def _topic_valid(cls, template: str) -> str:
        return topic_template(template, need_sensor_id=True)

    @model_validator(mode="after")
    def _policy_valid(self) -> LifecycleSettings:
        self.policy()
        if self.event_topic == self.state_topic:
            raise ValueError("event_topic and state_topic must differ")
        return self

    def policy(self) -> EpisodePolicy:
        return EpisodePolicy(
            self.open_anomalous,
            self.open_window,
            self.resolve_normal,
            self.cooldown_seconds,
            self.update_interval_seconds,
            self.flapping_transitions,
            self.flapping_window,
        )


class AlertSettings(Strict):
    top_timesteps: int = Field(default=5, ge=0, description="how many highest-error timesteps an alert lists")
    include_profile: bool = Field(default=False, description="add the whole per-timestep error profile")
    top_channels: int = Field(
        default=3, ge=0, description="how many channels with the highest error an alert and an episode list"
    )
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)

    @property
    def per_window(self) -> bool:
        """Whether an alert goes out for every anomalous window."""
        return self.lifecycle.per_window_alerts or not self.lifecycle.enabled


class DriftSettings(Strict):
    """The drift statistic (see monitor.alerts.drift); needs an artifact that records `calibration_scores`."""

    enabled: bool = True
    window_count: int = Field(default=1000, ge=10, description="recent scores the PSI is computed over")
    min_windows: int = Field(default=200, ge=1, description="no PSI (NaN) before this many scores")
    psi_bound: float = Field(default=0.25, gt=0, description="above it: log drift_bound_crossed, alert rule fires")
    sensor_window: int = Field(default=100, ge=1, description="each sensor's recent decisions for its anomaly rate")
    sensor_min_windows: int = Field(default=20, ge=1, description="sensors with fewer decisions are not judged")
    sensor_alpha: float = Field(default=1e-4, gt=0, lt=1, description="binomial tail below which a rate is far above")

    @model_validator(mode="after")
    def _minimums_fit(self) -> DriftSettings:
        if self.min_windows > self.window_count:
            raise ValueError(f"min_windows ({self.min_windows}) must be <= window_count ({self.window_count})")
        if self.sensor_min_windows > self.sensor_window:
            raise ValueError(f"sensor_min_windows ({self.sensor_min_windows}) must be <= sensor_window")
        return self


class MetricsSettings(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)
    max_connections: int = Field(
        default=8, ge=1, le=256, description="scrape connections open at once; beyond: closed at once"
    )
    timeout_seconds: float = Field(default=5.0, gt=0, le=60, description="longest a scrape connection may stay open")


class LoggingSettings(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    warning_interval_seconds: float = Field(default=60.0, ge=0, description="per-sensor warnings at most this often")
    max_warning_keys: int = Field(
        default=10000, ge=1, description="(sensor, reason) pairs whose last warning is remembered"
    )
    max_warnings_per_interval: int = Field(
        default=100, ge=1, description="warning lines in all per interval (at least 1 s)"
    )


class JournalSettings(Strict):
    """The input journal that lets a crash lose nothing the broker acknowledged (monitor.ingest.journal)."""

    path: Path | None = Field(default=None, description="journal file; None = off (a crash loses the partial windows)")
    sync_interval_seconds: float = Field(
        default=0.02, gt=0, le=1, description="fsync batches: input is acknowledged after its fsync"
    )
    max_bytes: int = Field(
        default=16 * 2**20,
        ge=2**16,
        description="a checkpoint rewrites the file when the records after its last one exceed this size",
    )
    checkpoint_seconds: float = Field(
        default=30.0, gt=0, description="... or after this long, bounding a replay's duplicates"
    )

    @field_validator("path")
    @classmethod
    def _not_a_directory(cls, path: Path | None) -> Path | None:
        if path is not None and path.is_dir():
            raise ValueError(f"{path} is a directory: name the journal file in it, e.g. {path / 'journal'}")
        return path


class HealthSettings(Strict):
    stall_seconds: float = Field(
        default=10.0,
        gt=0,
        description="no batch finished and no idle poll for this long: the scorer is stalled, "
        "the systemd watchdog is no longer fed",
    )
    stall_exit_seconds: float = Field(
        default=30.0, gt=0, description="stalled this long: the daemon exits 1 by itself (with or without systemd)"
    )
    stop_timeout_seconds: float = Field(
        default=20.0, gt=0, description="SIGTERM ends the process within this, logging what it could not finish"
    )


class PartitionSettings(Strict):
    """This instance's share of the sensors when the broker partitions them (deploy/nats): the partitions it consumes.

    The subscriptions follow from it (`topic` with each consumed partition filled in), and so does the
    sensor id's topic level (the `+` of `topic`); metrics, logs and the status topic name the partitions.
    """

    count: int = Field(ge=1, le=4096, description="partitions the broker splits the sensors into (N of partition(N,1))")
    consume: list[int] = Field(min_length=1, description="the partitions this instance subscribes to")
    topic: str = Field(default="shard/{partition}/sensors/+/ecg", description="the topic filter of one partition")

    @field_validator("topic")
    @classmethod
    def _topic_valid(cls, template: str) -> str:
        if "{partition}" not in template:
            raise ValueError("must contain {partition}")
        try:
            levels = template.format(partition=0).split("/")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"only the field {{partition}} may be used ({error})") from None
        if levels.count("+") != 1 or any(("+" in level and level != "+") or "#" in level for level in levels):
            raise ValueError("needs exactly one '+' level (the sensor id) and no '#'")
        return template

    @model_validator(mode="after")
    def _consume_in_range(self) -> PartitionSettings:
        outside = [partition for partition in self.consume if not 0 <= partition < self.count]
        if outside:
            raise ValueError(f"consume: {outside} not in 0..{self.count - 1}")
        if len(set(self.consume)) != len(self.consume):
            raise ValueError(f"consume: {self.consume} names a partition twice")
        return self

    def filters(self) -> list[str]:
        return [self.topic.format(partition=partition) for partition in self.consume]

    def sensor_id_level(self) -> int:
        return self.topic.format(partition=0).split("/").index("+")

    def owns(self, sensor_id: str) -> bool:
        """Whether the broker sends this sensor to this instance: nats-server's `partition(count,1)` is FNV-1a
        (32 bit) of the sensor id modulo count (tests/e2e/test_partitions.py checks it against the real server)."""
        return partition_of(sensor_id, self.count) in self.consume


FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


def partition_of(sensor_id: str, count: int) -> int:
    """The partition nats-server's mapping `{{partition(count,1)}}` gives a sensor id."""
    digest = FNV_OFFSET
    for byte in sensor_id.encode("utf-8"):
        digest = ((digest ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return digest % count


SHARD_REMOVED = (
    "removed: every instance received every message and dropped the others' (N instances, N times the "
    "transport). Let the broker split the sensors instead: a `partitions:` section on nats-server "
    "(deploy/nats), or a `$share/<group>/...` subscription with EMQX's hash_topic strategy (deploy/README.md)"
)


class Config(Strict):
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    windowing: WindowingSettings = Field(default_factory=WindowingSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    partitions: PartitionSettings | None = None
    # where the values came from: the file's name and the `MONITOR_` variables by key path (`load_config` sets it)
    _sources: tuple[str, dict[tuple[str, ...], str]] = PrivateAttr(default=("config", {}))

    def origin(self, key: str) -> str:
        """Where `key` (`model.path`) came from: the `MONITOR_` variable that set it, else the file."""
        return source_of(tuple(key.split(".")), *self._sources)

    @model_validator(mode="after")
    def _sparkplug_fits(self) -> Config:
        if not self.input.uses("sparkplug_b"):
            return self
        if self.journal.path is not None:
            raise ValueError("input: sparkplug_b with journal.path is not supported (a replay would lack the BIRTHs)")
        pattern = self.mqtt.sensor_id_pattern
        for device in self.input.sparkplug.devices:
            if pattern is not None and re.fullmatch(pattern, device.sensor) is None:
                raise ValueError(f"input.sparkplug: sensor id {device.sensor!r} does not match mqtt.sensor_id_pattern")
        return self

    @model_validator(mode="after")
    def _subscribe_to_partitions(self) -> Config:
        if self.partitions is not None:
            self.mqtt.subscribe = self.partitions.filters()
            self.mqtt.sensor_id_level = self.partitions.sensor_id_level()
        return self

    @property
    def instance_name(self) -> str:
        """How logs, metrics and the status topic name this instance: its MQTT client id, unique on the broker."""
        return self.mqtt.client_id

    @property
    def consumed_partitions(self) -> list[int]:
        return sorted(self.partitions.consume) if self.partitions else []


def removed_and_conflicting(data: dict[str, Any], source: str) -> list[str]:
    """Problems the schema cannot word well: a removed section, keys that `partitions` sets itself."""
    problems = [f"{source}: shard: {SHARD_REMOVED}"] if "shard" in data else []
    mqtt = data.get("mqtt")
    if data.get("partitions") is not None and isinstance(mqtt, dict):
        problems += [
            f"{source}: mqtt.{key}: leave it out with partitions (partitions.topic and consume set it)"
            for key in ("subscribe", "sensor_id_level")
            if key in mqtt
        ]
    return problems


def load_config(
    path: str | Path | None,
    environ: dict[str, str] | None = None,
    check_model: Callable[[Path], str | None] | None = None,
) -> Config:
    """Read YAML (or none), apply `MONITOR_` overrides, validate; relative model paths resolve from the file.

    Every problem is one line naming its key and its source (the file or the `MONITOR_` variable); with
    `check_model` (`model.artifact.artifact_problem`), a `model.path` that holds no model is one of them.
    """
    source = str(path or "config")
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    names = environment_names(environ)
    data = deep_merge(data, environment_overrides(environ))
    problems = unknown_variables(environ, list(Config.model_fields)) + removed_and_conflicting(data, source)
    config = None
    try:
        config = validate(Config, {key: value for key, value in data.items() if key != "shard"}, source, names)
    except ConfigError as error:
        problems.append(str(error))
    model_path = config.model.path if config else _raw_model_path(data)
    if path is not None and model_path is not None:
        model_path = _beside(model_path, path)
    if check_model is not None and model_path is not None:
        problem = check_model(model_path)
        if problem:
            problems.append(f"{source_of(('model', 'path'), source, names)}: model.path: {problem}")
    if problems:
        raise ConfigError("\n".join(problems))
    assert config is not None and model_path is not None  # a valid config always has a model path
    config._sources = (source, names)
    config.model.path = model_path
    if path is not None and config.model.shadow_path is not None:
        config.model.shadow_path = _beside(config.model.shadow_path, path)
    return config


def _beside(model: Path, config_path: str | Path) -> Path:
    """A relative model path that does not exist from here, but does from the config file's directory."""
    if model.is_absolute() or model.exists():
        return model
    beside = Path(config_path).resolve().parent / model
    return beside if beside.exists() else model


def _raw_model_path(data: dict[str, Any]) -> Path | None:
    """`model.path` of a config that failed validation, when it is usable, so its problem is reported too."""
    section = data.get("model", {})
    value = section.get("path", ModelSettings.model_fields["path"].default) if isinstance(section, dict) else None
    return Path(value) if isinstance(value, (str, Path)) and value else None
