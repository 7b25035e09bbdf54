"""Structured logs: one JSON object per line on stderr (or plain text), every job event with its job id."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any

LOGGER = "cloak.server"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "event": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_PLAIN = re.compile(r"[\w.:/@+,\[\]-]*")


def text_value(v: Any) -> str:
    """A field value for a text log line: as is when it is plain, else JSON-quoted, so that control characters
    (a newline in a client_name), spaces, quotes or '=' cannot end the line or fake another field."""
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, dict | list | tuple) else str(v)
    return s if _PLAIN.fullmatch(s) and s.isascii() else json.dumps(s)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        tail = " ".join(f"{text_value(k)}={text_value(v)}" for k, v in fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower()} {text_value(record.getMessage())} {tail}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "json", stream: Any = None, level: int = logging.INFO) -> logging.Logger:
    """Send the server's logs to stderr in the chosen format (for `cloak serve`; tests leave logging alone)."""
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        log.removeHandler(h)
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.addHandler(h)
    log.setLevel(level)
    log.propagate = False
    return log


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    logging.getLogger(LOGGER).log(level, name, extra={"fields": fields}, exc_info=exc_info)


class Throttle:
    """Rate limit for log lines that a client can cause at will (refused credentials): per key (the peer's host)
    one line per `interval` s, and `burst` lines per second in all; what is held back is counted and reported
    with the next line of that key (`suppressed`)."""

    def __init__(self, interval: float = 10.0, burst: int = 5, max_keys: int = 4096) -> None:
        self.interval, self.burst, self.max_keys = interval, burst, max_keys
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._second = 0
        self._in_second = 0

    def allow(self, key: str) -> int | None:
        """None: do not log now. Else log, and the int is how many were held back for this key before."""
        now = time.monotonic()
        with self._lock:
            second = int(now)
            if second != self._second:
                self._second, self._in_second = second, 0
            last = self._last.get(key)
            if (last is not None and now - last < self.interval) or self._in_second >= self.burst:
                if key in self._held or len(self._held) < self.max_keys:
                    self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._last) >= self.max_keys:
                self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            self._last[key] = now
            self._in_second += 1
            return self._held.pop(key, 0)
