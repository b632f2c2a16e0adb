"""The one exception family of the monitor: the CLI prints these as one line, anything else is a bug."""


class MonitorError(Exception):
    """A problem a user can fix (bad path, bad config, broken model): printed as one line."""


class ConfigError(MonitorError):
    """The configuration is invalid; the message names every bad key path."""


class DataError(MonitorError):
    """A data file the trainer, evaluator or replayer reads is missing or malformed."""


class ArtifactError(MonitorError):
    """A model artifact directory is missing, incomplete, tampered with or of another version."""


class PayloadError(MonitorError):
    """A sensor message was rejected; `reason` is the closed label used in the drop metric."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
