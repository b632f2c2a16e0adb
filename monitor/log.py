"""structlog set-up: JSON lines when stdout is not a terminal, the console renderer when it is.

The standard library's logging (paho, torch) goes through the same renderer, so every line a
process writes has one format.
"""

from __future__ import annotations

import logging
import sys
import time

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", context: dict[str, object] | None = None) -> None:
    """Configure structlog and stdlib logging once, at start; `context` goes into every line (the instance).

    A processor rather than `bind_contextvars`: context variables do not reach threads started later (paho's,
    the scorer's), and stdlib records (paho's own log) pass through the same chain.
    """
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_context(context or {}),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)  # torch's and numpy's warnings become log lines too


def _add_context(context: dict[str, object]) -> structlog.typing.Processor:
    def add(logger: object, method_name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
        for key, value in context.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


class RateLimiter:
    """Allows an event per key at most once per `interval_seconds` (per-sensor warnings)."""

    def __init__(self, interval_seconds: float, max_keys: int = 100_000) -> None:
        self.interval_seconds = interval_seconds
        self.max_keys = max_keys
        self._last: dict[object, float] = {}

    def allow(self, key: object, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self.interval_seconds:
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True
