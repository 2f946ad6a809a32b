"""structlog set-up: JSON lines (or console) with dotted event names and bound context."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

from almanac.settings import LogSettings

# A browser's WebSocket carries its API key in the URL (``?key=``), and uvicorn logs every
# handshake with the path and its query: the key must not reach the log.
_KEY_IN_QUERY = re.compile(r"([?&]key=)[^&\s\"']+")


# The id of the HTTP request being served, for every log line written while it is. One
# variable set and reset by the request-id middleware: structlog's bind and unbind (a
# context variable per key, looked up by name) cost a POST 7k more instructions (callgrind).
REQUEST_ID: ContextVar[str | None] = ContextVar("almanac_request_id", default=None)


def add_request_id(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def redact_keys(text: str) -> str:
    return _KEY_IN_QUERY.sub(r"\1[redacted]", text)


def _blanked(value: object) -> str:
    try:
        return redact_keys(value if isinstance(value, str) else repr(value))
    except Exception:  # noqa: BLE001 - a repr that fails shows nothing of the value
        return "<unprintable>"


class _RedactKeys(logging.Filter):
    """Blanks ``key=`` query values in library records (structlog's are dicts, left alone),
    in the message as formatted: a key may come in any argument, of any type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad call is logging's to report, keys blanked
            # Its report shows the arguments as they are: each as the text it would give.
            record.msg = redact_keys(record.msg)
            args = record.args
            if isinstance(args, Mapping):
                record.args = {k: _blanked(v) for k, v in args.items()}
            elif isinstance(args, tuple):
                record.args = tuple(_blanked(a) for a in args)
            return True
        if "key=" in text:
            record.msg, record.args = redact_keys(text), None
        return True


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Log lines go to ``stream``: stdout for the roles, stderr for commands whose output is
    meant to be captured (``KEY=$(almanac keys create ...)``)."""
    level = getattr(logging, settings.level)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings.format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Calls below the level return at once: with stdlib's BoundLogger every call ran the
        # processors (timestamp and all) before logging dropped it, ~10 µs a debug line.
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    # Library logs (uvicorn, eventsourcing, psycopg) go through the same renderer.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    handler.addFilter(_RedactKeys())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
