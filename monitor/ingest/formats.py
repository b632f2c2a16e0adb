"""Which payload format a message is in, by its topic: the first `input.formats` rule whose filter matches,
else `input.format` (JSON by default). The readers themselves are monitor.ingest.payload (JSON),
monitor.ingest.frame (binary frame) and monitor.ingest.sparkplug (Sparkplug B)."""

from __future__ import annotations

from paho.mqtt.client import topic_matches_sub

from monitor.config.schema import InputSettings
from monitor.ingest.frame import FrameDecoder
from monitor.ingest.payload import PayloadDecoder
from monitor.ingest.sparkplug import DeviceMapping, SparkplugReader


class InputFormats:
    """The format of each topic, and the readers of the formats other than JSON."""

    def __init__(self, settings: InputSettings, json_decoder: PayloadDecoder) -> None:
        self.default = settings.format
        self.rules = [(rule.filter, rule.format) for rule in settings.formats]
        limits = (json_decoder.max_samples, json_decoder.max_bytes, json_decoder.max_abs_value)
        self.frame = FrameDecoder(json_decoder.channels, *limits)
        spb = settings.sparkplug
        self.sparkplug = (
            SparkplugReader(
                [
                    DeviceMapping(d.group, d.node, d.device, d.sensor, tuple(d.channels), d.sample_rate_hz)
                    for d in spb.devices
                ],
                json_decoder.channels,
                *limits,
                rebirth=spb.rebirth,
                rebirth_interval_seconds=spb.rebirth_interval_seconds,
            )
            if settings.uses("sparkplug_b")
            else None
        )

    def format_of(self, topic: str) -> str:
        for topic_filter, input_format in self.rules:
            if topic_matches_sub(topic_filter, topic):
                return input_format
        return self.default
